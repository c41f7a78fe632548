"""Causal streaming sampler (longgen.samplers.causal) on Wan, SkyReels-V2, LTX-Video and the joint text-video
families (CogVideoX 1.0 with RoPE, CogVideoX-2b-style sin-cos positions, HunyuanVideo): the KV-cache rollout equals
re-running the whole prefix with the block-causal mask and no cache (full cache, sink + rolling window, Rolling Forcing,
context noise, CFG), causality, constant cache memory with a rolling window, LongLive recache == a fresh cache under
the new prompt, one chunk == plain sampling, streaming callbacks, bad input, the CLI."""

import pytest
import torch
from tiny_causal import tiny_adapter

from longgen.backbones import build_tiny
from longgen.extend.causal import BlockCausalConfig, apply_block_causal
from longgen.pipeline import GuidedDenoiser
from longgen.prompts import multi_prompt_denoiser
from longgen.samplers.causal import CausalSamplerConfig, sample_causal, warped_sigmas
from longgen.samplers.full import sample_full
from longgen.schedules import ddim_step

FRAMES = 8


SIGMAS = warped_sigmas([1000, 750, 500, 250])
JOINT = ("cogvideox", "hunyuan_video")


@pytest.fixture(scope="module", params=["wan", "skyreels_v2", "ltx", "cogvideox", "cogvideox_2b", "hunyuan_video"])
def setup(request):
    torch.manual_seed(0)
    adapter = tiny_adapter(request.param)
    cond, uncond = adapter.encode_prompt(["a red ball bouncing"])
    noise = torch.randn(1, adapter.latent_channels, FRAMES, 4, 4, generator=torch.Generator().manual_seed(0))
    return adapter, cond, uncond, noise


def _sample(adapter, denoise, noise, block: BlockCausalConfig, use_cache=True, sigmas=SIGMAS, **options):
    """Rollout with the KV cache, or (use_cache=False) the no-cache reference through the stock processor + mask."""
    if not use_cache:
        block = BlockCausalConfig(**{**block.__dict__, "attention": "mask"})
    handle = apply_block_causal(adapter, block)
    try:
        return sample_causal(
            denoise,
            noise,
            sigmas,
            cache=handle.cache if use_cache else None,
            chunk_size=block.chunk_size,
            generator=torch.Generator().manual_seed(1),
            disable=True,
            **options,
        )
    finally:
        handle.remove()


def test_warped_self_forcing_schedule():
    torch.testing.assert_close(SIGMAS * 1000, torch.tensor([1000.0, 937.5, 833.3333, 625.0, 0.0]))
    with pytest.raises(ValueError, match="--denoising-steps"):
        warped_sigmas([250, 500])


@pytest.mark.parametrize(
    "block, options",
    [
        (dict(chunk_size=2), {}),
        (dict(chunk_size=1), {}),
        (
            dict(chunk_size=2, local_attn_size=4, sink_size=1),
            dict(config=CausalSamplerConfig(context_noise=0.1)),
        ),
        (dict(chunk_size=2, local_attn_size=5, sink_size=2), {}),
        (
            dict(chunk_size=2, local_attn_size=4),
            dict(config=CausalSamplerConfig(rolling_window=4, step="ddim")),
        ),
    ],
    ids=["full-cache", "frame-causal", "sink+window+context-noise", "sink2+window", "rolling-forcing"],
)
def test_kv_cache_rollout_equals_recomputing_the_prefix_with_the_mask(setup, block, options):
    adapter, cond, uncond, noise = setup
    denoise = GuidedDenoiser(adapter, cond, uncond, guidance_scale=3.0)
    block = BlockCausalConfig(**block)
    cached = _sample(adapter, denoise, noise, block, **options)
    reference = _sample(adapter, denoise, noise, block, use_cache=False, **options)
    assert cached.shape == noise.shape
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)


def test_window_rope_positions(setup):
    """Without a sink a chunk sees a contiguous run of frames, so window positions are absolute ones shifted per
    chunk and RoPE's relativity makes them agree; with a sink the gap to the sink closes and the outputs differ."""
    adapter, cond, _, noise = setup
    denoise = GuidedDenoiser(adapter, cond)

    def run(**options):
        return _sample(adapter, denoise, noise, BlockCausalConfig(chunk_size=2, local_attn_size=4, **options))

    if adapter.family in JOINT:
        # text tokens carry no rotation, so a text-video score depends on the video token's own position: window
        # positions change the chunks past the first window, sink or not (relativity covers the video pairs only)
        if adapter.rope_module() is None:  # CogVideoX-2b: absolute sin-cos positions at the patch embedding
            with pytest.raises(ValueError, match="--causal-rope absolute"):
                run(rope_positions="window")
            return
        window, absolute = run(rope_positions="window"), run()
        torch.testing.assert_close(window[:, :, :4], absolute[:, :, :4], atol=1e-5, rtol=1e-5)
        assert (window[:, :, 4:] - absolute[:, :, 4:]).abs().max() > 1e-4
        return
    # LTX computes RoPE angles from fractional coordinates in float32: relativity holds to ~5e-5 there
    tol = 1e-4 if adapter.family == "ltx" else 1e-5
    torch.testing.assert_close(run(rope_positions="window"), run(), atol=tol, rtol=tol)
    sink_window, sink_absolute = run(sink_size=1, rope_positions="window"), run(sink_size=1)
    torch.testing.assert_close(sink_window[:, :, :4], sink_absolute[:, :, :4], atol=1e-5, rtol=1e-5)
    assert (sink_window[:, :, 4:] - sink_absolute[:, :, 4:]).abs().max() > 3 * tol


def test_chunk_outputs_do_not_depend_on_later_noise(setup):
    adapter, cond, _, noise = setup
    denoise = GuidedDenoiser(adapter, cond)
    block = BlockCausalConfig(chunk_size=2)
    later = noise.clone()
    later[:, :, 4:] = torch.randn_like(later[:, :, 4:])
    a, b = _sample(adapter, denoise, noise, block), _sample(adapter, denoise, later, block)
    assert torch.equal(a[:, :, :4], b[:, :, :4])
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:], atol=1e-5)
    earlier = noise.clone()
    earlier[:, :, :2] = torch.randn_like(earlier[:, :, :2])
    c = _sample(adapter, denoise, earlier, block)
    if adapter.family == "cogvideox":  # the tiny CogVideoX's x0 barely follows its noise: chunk 0 itself moves ~2e-3
        moved = (a[:, :, 4:] - c[:, :, 4:]).abs().max()
        assert moved > 1e-3 * (a[:, :, :2] - c[:, :, :2]).abs().max()  # later chunks do see earlier ones
    else:
        assert not torch.allclose(a[:, :, 4:], c[:, :, 4:], atol=1e-5)  # later chunks do see earlier ones


def test_one_chunk_is_plain_sampling(setup):
    adapter, cond, uncond, noise = setup
    denoise = GuidedDenoiser(adapter, cond, uncond, guidance_scale=2.0)
    sigmas = adapter.sigmas(5)
    ours = _sample(
        adapter,
        denoise,
        noise,
        BlockCausalConfig(chunk_size=FRAMES),
        sigmas=sigmas,
        config=CausalSamplerConfig(step="ddim"),
    )
    stock = sample_full(denoise, noise, sigmas, disable=True)
    if adapter.family in JOINT:  # one chunk of joint attention: plain sampling of the model whose text sees text only
        handle = apply_block_causal(adapter, BlockCausalConfig(chunk_size=FRAMES, attention="mask"))
        try:
            reference = sample_full(denoise, noise, sigmas, disable=True)
        finally:
            handle.remove()
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours, stock, atol=1e-4)
        return
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_rolling_window_keeps_cache_memory_constant(setup):
    adapter, cond, _, _ = setup
    denoise = GuidedDenoiser(adapter, cond)
    block = BlockCausalConfig(chunk_size=2, local_attn_size=6, sink_size=2)
    peaks = []
    for frames in (8, 16):
        noise = torch.randn(1, adapter.latent_channels, frames, 4, 4)
        handle = apply_block_causal(adapter, block)
        seen: list[tuple[int, list[int]]] = []
        sample_causal(
            denoise,
            noise,
            warped_sigmas([1000, 500]),
            cache=handle.cache,
            disable=True,
            return_latents=False,
            callback=lambda info, c=handle.cache, seen=seen: seen.append((c.num_bytes(), c.frames)),
        )
        handle.remove()
        peaks.append(max(n for n, _ in seen))
        # sink [0, 2) + the newest frames a later chunk can still see (window 4 - chunk 2 = 2)
        assert seen[-1][1] == [0, 1, frames - 4, frames - 3]
    assert peaks[0] == peaks[1] > 0


def test_frames_stream_in_order(setup):
    adapter, cond, _, noise = setup
    streamed = []
    out = _sample(
        adapter,
        GuidedDenoiser(adapter, cond),
        noise,
        BlockCausalConfig(chunk_size=2),
        on_frames=lambda start, x: streamed.append((start, x)),
    )
    assert [s for s, _ in streamed] == [0, 2, 4, 6]
    assert torch.equal(torch.cat([x for _, x in streamed], dim=2), out)


def test_prompt_switch_with_recache_equals_a_fresh_cache_under_the_new_prompt(setup):
    """Prompt A on frames [0, 4), B from 4 on. With recache, the chunks after the switch equal re-running the whole
    prefix under B (what a cache built fresh under B gives); without recache they differ."""
    adapter, _, _, noise = setup
    (cond_a, _), (cond_b, _) = (
        adapter.encode_prompt([p], do_classifier_free_guidance=False)
        for p in ("a red ball", "a blue square at night")
    )
    denoise = multi_prompt_denoiser(adapter.denoise, [cond_a, cond_b], [(0, 4), (4, FRAMES)])
    block = BlockCausalConfig(chunk_size=2)
    step = CausalSamplerConfig(step="ddim")
    recached = _sample(adapter, denoise, noise, block, prompt_switches=[4], config=step)
    stale = _sample(
        adapter,
        denoise,
        noise,
        block,
        prompt_switches=[4],
        config=CausalSamplerConfig(step="ddim", recache=False),
    )
    torch.testing.assert_close(recached[:, :, :4], stale[:, :, :4], atol=0, rtol=0)

    # reference: chunks 2 and 3 from the no-cache prefix under prompt B, frames [0, 4) as generated
    handle = apply_block_causal(adapter, BlockCausalConfig(chunk_size=2, attention="mask"))
    prefix = recached[:, :, :4]
    for j in (2, 3):
        x = noise[:, :, 2 * j : 2 * j + 2] * SIGMAS[0]
        for i in range(len(SIGMAS) - 1):
            sigma = torch.cat([torch.zeros(1, prefix.shape[2]), SIGMAS[i].expand(1, 2)], dim=1)
            x0 = adapter.denoise(torch.cat([prefix, x], dim=2), sigma, cond_b)[:, :, -2:]
            x = x0 if i == len(SIGMAS) - 2 else ddim_step(x, x0, SIGMAS[i], SIGMAS[i + 1])
        prefix = torch.cat([prefix, x], dim=2)
    handle.remove()
    torch.testing.assert_close(recached, prefix, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stale[:, :, 4:], prefix[:, :, 4:], atol=1e-4)


def test_bad_input(setup):
    adapter, cond, _, noise = setup
    denoise = GuidedDenoiser(adapter, cond)
    with pytest.raises(ValueError, match="--chunk-size 3 does not divide"):
        _sample(adapter, denoise, noise, BlockCausalConfig(chunk_size=3))
    with pytest.raises(ValueError, match="--rolling-window"):
        _sample(
            adapter,
            denoise,
            noise,
            BlockCausalConfig(chunk_size=2),
            config=CausalSamplerConfig(rolling_window=3),
        )
    with pytest.raises(ValueError, match="--context-noise"):
        CausalSamplerConfig(context_noise=1.0)
    with pytest.raises(ValueError, match="--causal-step"):
        CausalSamplerConfig(step="euler")
    with pytest.raises(ValueError, match="not chunk starts"):
        _sample(adapter, denoise, noise, BlockCausalConfig(chunk_size=2), prompt_switches=[3])
    handle = apply_block_causal(adapter, BlockCausalConfig(chunk_size=2))
    handle.remove()
    with pytest.raises(RuntimeError, match="apply_block_causal again"):
        sample_causal(denoise, noise, SIGMAS, cache=handle.cache, disable=True)
    with pytest.raises(ValueError, match="one prompt"):
        _sample(
            adapter, denoise, noise, BlockCausalConfig(chunk_size=2), use_cache=False, prompt_switches=[4]
        )


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
@pytest.mark.parametrize("method", ["ntk", "yarn"])
def test_rope_extension_applies_to_the_streamed_positions(method, family):
    """A temporal RoPE extension rewrites the model's tables (YaRN also scales the queries); the cache rollout reads
    the same tables (CogVideoX: the adapter's RoPE module; HunyuanVideo: the model's, through its hooks), so it still
    equals the no-cache reference, and differs from the rollout without the extension."""
    from longgen.extend.rope import apply_rope_extension

    adapter = build_tiny(family)
    cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)
    noise = torch.randn(1, adapter.latent_channels, FRAMES, 4, 4, generator=torch.Generator().manual_seed(2))
    denoise = GuidedDenoiser(adapter, cond)
    block = BlockCausalConfig(chunk_size=2)
    plain = _sample(adapter, denoise, noise, block)
    with apply_rope_extension(adapter, method, 3, 4 * FRAMES):
        cached = _sample(adapter, denoise, noise, block)
        reference = _sample(adapter, denoise, noise, block, use_cache=False)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached, plain, atol=1e-4)


@pytest.mark.parametrize("family, num_frames, chunk", [("cogvideox", 13, 2), ("hunyuan_video", 17, 1)])
def test_joint_families_stream_from_the_cli(saved, tmp_path, family, num_frames, chunk):
    """`--sampler causal` on the joint text-video families from the user's entry point (sink + rolling window)."""
    from longgen.cli import main
    from longgen.io import video_info

    out = tmp_path / "causal.mp4"
    rc = main(["generate", "--model", saved(family), "--sampler", "causal", "--chunk-size", str(chunk),
               "--local-attn-size", "3", "--sink-size", "1", "--denoising-steps", "1000,750,500,250",
               "--warp-denoising-step", "--num-frames", str(num_frames), "--quiet", "--out", str(out)])
    assert rc == 0 and video_info(out)["num_frames"] == num_frames
