"""Given frames through every sampler, against an exact denoiser (the posterior mean of a two-clip data set).

The data are two clips A and B; the exact x0 of ``x = (1 - s) x0 + s eps`` is the posterior mean over {A, B}. From
pure noise a sampler lands on one of them; given frames of A or B at some positions must steer every sampler to
that clip everywhere (the information reaches the frames that are not given), and the output must equal the
given latents exactly where given.
"""

import dataclasses

import pytest
import torch

from longgen.conditioning import FrameConditioning, renoise_up
from longgen.samplers import sample_diffusion_forcing, sample_fifo, sample_full, sample_sliding
from longgen.samplers.causal import CausalSamplerConfig, sample_causal
from longgen.schedules import flow_sigmas

FRAMES, C, H, W = 8, 2, 4, 4


def _clips():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 1, C, FRAMES + 16, H, W, generator=g)  # [clip, B, C, F (+ FIFO padding), H, W]


class ClipPosterior:
    """Exact x0 for a uniform two-clip data set, on any window (``frame_offset``) at per-frame levels.

    Frames at sigma 0 are returned as they are (and weigh in through a small floor on sigma)."""

    def __init__(self, clips):
        self.clips = clips
        self.calls = 0

    def __call__(self, x, sigma, frame_offset=0):
        self.calls += 1
        n = x.shape[2]
        idx = (torch.arange(n) + frame_offset).clamp_min(0)  # FIFO's warm-up windows: copies of frame 0
        templates = self.clips[:, :, :, idx]  # [2, 1, C, n, H, W]
        s = sigma[None, :, None, :, None, None].clamp_min(1e-2)
        sq = ((x[None] - (1 - s) * templates) ** 2 / (2 * s**2)).sum(dim=(2, 3, 4, 5))  # [2, B]
        weights = torch.softmax(-sq, dim=0)[:, :, None, None, None, None]
        x0 = (weights * templates).sum(0)
        clean = (sigma == 0)[:, None, :, None, None]
        return torch.where(clean, x, x0)


def _run(name, denoise, noise, conditioning, seed=7):
    sigmas = flow_sigmas(8, shift=1.0)
    common = dict(conditioning=conditioning, generator=torch.Generator().manual_seed(seed), disable=True)
    if name == "full":
        return sample_full(denoise, noise, sigmas, **common)
    if name == "sliding":
        # windows decide their half of a two-clip posterior early: RePaint's resampling makes them agree with the
        # given frames (without it about 1 seed in 3 ends on the other clip in the windows' free frames)
        common["conditioning"] = dataclasses.replace(conditioning, resample=4)
        return sample_sliding(denoise, noise, sigmas, window=4, stride=1, **common)
    if name == "fifo":
        return sample_fifo(denoise, noise, sigmas, window=4, num_partitions=2, **common)
    if name == "df":
        return sample_diffusion_forcing(denoise, noise, sigmas, base_num_latent_frames=4, overlap_history=2, **common)
    if name == "df_pyramid":
        return sample_diffusion_forcing(denoise, noise, sigmas, base_num_latent_frames=4, ar_step=4, **common)
    return sample_causal(denoise, noise, flow_sigmas(4), cache=None, chunk_size=2,
                         config=CausalSamplerConfig(step="ddim"), **common)


SAMPLERS = ["full", "sliding", "fifo", "df", "df_pyramid", "causal"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_given_prefix_is_reproduced_exactly_and_steers_the_rest(name):
    clips = _clips()
    noise = torch.randn(1, C, FRAMES, H, W, generator=torch.Generator().manual_seed(0))
    positions = (0, 1, 2, 3, 4, 5)  # every sliding window holds given frames
    results = []
    for k in (0, 1):
        given = FrameConditioning(clips[k][:, :, list(positions)], positions)
        out = _run(name, ClipPosterior(clips), noise, given)
        assert out.shape == noise.shape
        assert torch.equal(out[:, :, list(positions)], given.latents), "given frames must come back bit for bit"
        results.append(out)
    for k in (0, 1):  # the continuation follows the given clip, not the other one
        err_own = (results[k][:, :, 6:] - clips[k][:, :, 6:FRAMES]).abs().max()
        err_other = (results[k][:, :, 6:] - clips[1 - k][:, :, 6:FRAMES]).abs().max()
        assert err_own < 1e-2 < err_other, (name, k, float(err_own), float(err_other))


@pytest.mark.parametrize("name", ["full", "sliding", "fifo", "df", "causal"])
def test_given_end_frames_and_masks(name):
    """A transition's last frames and a spatial keep mask (half of every frame given): exact where kept; with
    RePaint resampling (full, sliding) the repainted half follows the clip the kept half comes from (the
    single-pass replacement of the other samplers may settle the repainted half on the other clip)."""
    clips = _clips()
    noise = torch.randn(1, C, FRAMES, H, W, generator=torch.Generator().manual_seed(1))
    keep = torch.zeros(1, 1, FRAMES, H, W)
    keep[..., : W // 2] = 1.0
    for k in (0, 1):
        given = FrameConditioning(clips[k][:, :, :FRAMES], range(FRAMES), keep=keep, resample=4)
        out = _run(name, ClipPosterior(clips), noise, given)
        kept = keep.expand_as(out) > 0
        assert torch.equal(out[kept], clips[k][:, :, :FRAMES][kept])
        if name in ("full", "sliding"):
            assert (out - clips[k][:, :, :FRAMES]).abs().max() < 1e-2
        last = FrameConditioning(clips[k][:, :, FRAMES - 2 : FRAMES], (FRAMES - 2, FRAMES - 1))
        out = _run(name, ClipPosterior(clips), noise, last)
        assert torch.equal(out[:, :, FRAMES - 2 :], last.latents)


def test_resampling_and_clean_level_options():
    """RePaint resampling takes U model calls per step; ``given_level='clean'`` tells the model sigma 0 for fully
    given frames; both still reproduce the given frames. ``renoise_up`` keeps x0 and raises the noise level."""
    clips = _clips()
    noise = torch.randn(1, C, FRAMES, H, W, generator=torch.Generator().manual_seed(2))
    given = FrameConditioning(clips[1][:, :, [0, 1]], (0, 1), resample=3)
    denoise = ClipPosterior(clips)
    out = sample_full(denoise, noise, flow_sigmas(8), conditioning=given, disable=True)
    assert denoise.calls == 3 * 8 and torch.equal(out[:, :, :2], given.latents)
    seen = []

    def spy(x, sigma, frame_offset=0):
        seen.append(sigma.clone())
        return ClipPosterior(clips)(x, sigma, frame_offset)

    clean = FrameConditioning(clips[1][:, :, [0, 1]], (0, 1), given_level="clean")
    out = sample_sliding(spy, noise, flow_sigmas(4), window=4, stride=2, conditioning=clean, disable=True)
    assert torch.equal(out[:, :, :2], clean.latents)
    assert all(float(s[0, :2].abs().max()) == 0 and float(s[0, 2]) > 0 for s in seen[::3])
    x0 = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    x = renoise_up((1 - 0.3) * x0 + 0.3 * eps, 0.3, 0.7, torch.Generator().manual_seed(2))
    residual = x - (1 - 0.7) * x0  # should be 0.7 * standard normal
    assert abs(float(residual.std()) - 0.7) < 0.02


def test_bad_given_frames_are_clear_errors():
    lat = torch.zeros(1, C, 2, H, W)
    with pytest.raises(ValueError, match="increasing"):
        FrameConditioning(lat, (1, 0))
    with pytest.raises(ValueError, match="one position each"):
        FrameConditioning(lat, (0,))
    with pytest.raises(ValueError, match="keep mask"):
        FrameConditioning(lat, (0, 1), keep=torch.ones(1, 1, 2, H + 1, W))
    with pytest.raises(ValueError, match="resample"):
        FrameConditioning(lat, (0, 1), resample=0)
    with pytest.raises(ValueError, match="outside the clip"):
        sample_fifo(ClipPosterior(_clips()), torch.zeros(1, C, FRAMES, H, W), flow_sigmas(8), window=4,
                    num_partitions=2, conditioning=FrameConditioning(lat, (0, FRAMES)), disable=True)


def test_causal_given_history_through_the_kv_cache_equals_recomputing_it():
    """On a real block-causal DiT (tiny Wan): given chunks written straight to the KV cache, and a given frame
    with a mask later on, roll out exactly as the no-cache reference (prefix re-run with the mask), and the
    output holds the given latents where given."""
    from tiny_causal import tiny_adapter

    from longgen.extend.causal import BlockCausalConfig, apply_block_causal
    from longgen.pipeline import GuidedDenoiser
    from longgen.samplers.causal import warped_sigmas

    torch.manual_seed(0)
    adapter = tiny_adapter("wan")
    cond, _ = adapter.encode_prompt(["a red ball"], None, do_classifier_free_guidance=False)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, adapter.latent_channels, 8, 4, 4, generator=g)
    keep = torch.ones(1, 1, 5, 4, 4)
    keep[:, :, 4, :, 2:] = 0.0  # frame 6: left half given
    given = FrameConditioning(torch.randn(1, adapter.latent_channels, 5, 4, 4, generator=g), (0, 1, 2, 3, 6), keep)
    outs = []
    for use_cache in (True, False):
        handle = apply_block_causal(adapter, BlockCausalConfig(chunk_size=2, attention="chunked" if use_cache else "mask"))
        try:
            outs.append(sample_causal(GuidedDenoiser(adapter, cond), noise, warped_sigmas([1000, 750, 500, 250]),
                                      cache=handle.cache if use_cache else None, chunk_size=2, conditioning=given,
                                      generator=torch.Generator().manual_seed(1), disable=True))
        finally:
            handle.remove()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    kept = given.window(0, 8)
    assert torch.equal(outs[0][:, :, :4], given.latents[:, :, :4])
    assert torch.equal(outs[0][:, :, 6][kept.keep[:, :, 6].expand(1, adapter.latent_channels, 4, 4) > 0],
                       given.latents[:, :, 4][keep[:, :, 4].expand(1, adapter.latent_channels, 4, 4) > 0])
