"""LTX-Video adapter: parity with the stock transformer and pipelines, per-frame noise levels, frame math."""

import pytest
import torch
from diffusers import LTXConditionPipeline, LTXPipeline

from longgen.backbones import build_tiny, load_adapter
from longgen.backbones.ltx import LTXAdapter
from longgen.samplers import sample_full

PROMPT = ["a red ball bouncing on the sea"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny adapter saved to disk and loaded back through the registry (test (a)'s first half)."""
    path = tmp_path_factory.mktemp("ltx_tiny")
    build_tiny("ltx", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(saved):
    return load_adapter(saved)


@pytest.fixture(scope="module")
def cond(adapter):
    with torch.no_grad():
        return adapter.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]


def _latents(adapter, seed=0, batch=1):
    num_frames, height, width = adapter.native_video_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(adapter.latent_shape(num_frames, height, width, batch_size=batch), generator=gen)


def test_load_adapter_gives_ltx_with_native_geometry(adapter):
    assert isinstance(adapter, LTXAdapter)
    assert isinstance(adapter.pipe, LTXPipeline)
    assert adapter.native_video_size == LTXAdapter.tiny_video_size
    assert adapter.patch_size == (1, 1, 1)
    assert (adapter.temporal_compression, adapter.spatial_compression) == (8, 32)
    assert adapter.latent_shape(17, 64, 64) == (1, 8, 3, 2, 2)
    assert adapter.rope_module() is adapter.model.rope
    names = [name for name, _ in adapter.temporal_attention_modules()]
    assert names == ["transformer_blocks.0.attn1"]


def test_uniform_sigma_matches_stock_model_with_scalar_timestep(adapter, cond):
    x = _latents(adapter, batch=2)
    cond2 = {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in cond.items()}
    batch, _, f, h, w = x.shape
    sigma_value = 0.6
    with torch.no_grad():
        x0 = adapter.denoise(x, torch.full((batch, f), sigma_value), cond2)
        # Exactly what LTXPipeline.__call__ hands the transformer at one step (no CFG).
        t = torch.tensor(sigma_value * 1000.0)
        v = adapter.model(
            hidden_states=LTXPipeline._pack_latents(x, 1, 1),
            encoder_hidden_states=cond2["prompt_embeds"],
            timestep=t.expand(batch),
            encoder_attention_mask=cond2["prompt_attention_mask"],
            num_frames=f,
            height=h,
            width=w,
            rope_interpolation_scale=(8 / 25, 32, 32),
            return_dict=False,
        )[0]
    v = LTXPipeline._unpack_latents(v, f, h, w, 1, 1)
    expected = x - sigma_value * v  # flow: v = eps - x0
    assert x0.dtype == torch.float32 and x0.shape == x.shape
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)


def test_per_frame_sigma_matches_native_per_token_timesteps(adapter, cond):
    x = _latents(adapter, seed=1)
    batch, _, f, h, w = x.shape
    sigma = torch.tensor([[0.0, 0.35, 0.9]])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
        # The per-token form LTXImageToVideoPipeline uses: timestep [B, seq], frames outermost.
        timestep = (sigma * 1000.0)[:, :, None].expand(batch, f, h * w).reshape(batch, f * h * w)
        v = adapter.model(
            hidden_states=LTXPipeline._pack_latents(x, 1, 1),
            encoder_hidden_states=cond["prompt_embeds"],
            timestep=timestep,
            encoder_attention_mask=cond["prompt_attention_mask"],
            num_frames=f,
            height=h,
            width=w,
            rope_interpolation_scale=(8 / 25, 32, 32),
            return_dict=False,
        )[0]
        expected = x - sigma[:, None, :, None, None] * LTXPipeline._unpack_latents(v, f, h, w, 1, 1)
        torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)
        # A frame at sigma 0 is clean context: its x0 is its input.
        torch.testing.assert_close(x0[:, :, 0], x[:, :, 0], atol=0, rtol=0)

        # Changing one frame's noise level changes the prediction (the level reaches the model per frame).
        changed = adapter.denoise(x, torch.tensor([[0.0, 0.35, 0.5]]), cond)
    assert (changed[:, :, :2] - x0[:, :, :2]).abs().max() > 1e-4  # other frames see it through attention
    assert (changed[:, :, 2] - x0[:, :, 2]).abs().max() > 1e-3


def test_frame_rate_is_the_rope_time_scale(adapter, cond):
    x = _latents(adapter, seed=2)
    sigma = torch.full((1, x.shape[2]), 0.5)
    with torch.no_grad():
        base = adapter.denoise(x, sigma, cond)
        via_cond = adapter.denoise(x, sigma, {**cond, "frame_rate": 50.0})
        adapter.frame_rate = 50.0
        try:
            via_attr = adapter.denoise(x, sigma, cond)
        finally:
            adapter.frame_rate = LTXAdapter.default_frame_rate
        again = adapter.denoise(x, sigma, cond)
    assert (via_cond - base).abs().max() > 1e-4
    torch.testing.assert_close(via_attr, via_cond, atol=0, rtol=0)
    torch.testing.assert_close(again, base, atol=0, rtol=0)


def test_sampling_and_decode_match_ltx_pipeline(adapter, cond):
    """sample_full with adapter.sigmas equals LTXPipeline's Euler loop; decode equals its VAE output."""
    num_frames, height, width = adapter.native_video_size
    noise = _latents(adapter, seed=3)
    _, _, f, h, w = noise.shape
    steps = 3
    call = dict(
        prompt=PROMPT,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=1.0,
        latents=LTXPipeline._pack_latents(noise, 1, 1),
        max_sequence_length=32,
    )
    with torch.no_grad():
        ours = sample_full(
            lambda x, s, frame_offset=0: adapter.denoise(x, s, cond), noise, adapter.sigmas(steps)
        )
        theirs = adapter.pipe(**call, output_type="latent").frames
        theirs = LTXPipeline._unpack_latents(theirs, f, h, w, 1, 1)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert adapter.pipe.scheduler.sigmas[1] < 1.0  # the dynamic shift and terminal stretch were exercised
        torch.testing.assert_close(
            adapter.sigmas(steps), adapter.pipe.scheduler.sigmas.cpu(), atol=1e-6, rtol=0
        )

        video = adapter.pipe(**call, output_type="pt").frames  # (B, T, 3, H, W) in [0, 1]
        frames = adapter.decode(theirs)
    torch.testing.assert_close(frames, video.permute(0, 1, 3, 4, 2), atol=1e-5, rtol=0)


def test_encode_denoise_decode_runs(adapter):
    num_frames, height, width = adapter.native_video_size
    with torch.no_grad():
        cond, uncond = adapter.encode_prompt(PROMPT * 2, negative_prompt=["dark", "blurry w3"])
        assert cond["prompt_embeds"].shape == uncond["prompt_embeds"].shape == (2, 32, 32)
        x = _latents(adapter, seed=4, batch=2)
        x0 = adapter.denoise(x, torch.rand(2, x.shape[2]), cond)
        frames = adapter.decode(x0)
    assert frames.shape == (2, 8 * (x.shape[2] - 1) + 1, height, width, 3)
    assert frames.shape[1] == num_frames
    assert torch.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0
    assert frames.std() > 0


def test_decode_timestep_follows_pipeline_knobs(adapter):
    z = _latents(adapter, seed=5)
    with torch.no_grad():
        base = adapter.decode(z)
        adapter.decode_timestep, adapter.decode_noise_scale = 0.05, 0.0
        try:
            at_t = adapter.decode(z)
            adapter.decode_noise_scale = 0.5
            noisy_a = adapter.decode(z, generator=torch.Generator().manual_seed(0))
            noisy_b = adapter.decode(z, generator=torch.Generator().manual_seed(0))
        finally:
            adapter.decode_timestep, adapter.decode_noise_scale = 0.0, None
    assert (at_t - base).abs().max() > 1e-5  # the VAE's timestep conditioning is reached
    assert (noisy_a - at_t).abs().max() > 1e-4
    torch.testing.assert_close(noisy_a, noisy_b, atol=0, rtol=0)


def test_latent_shape_names_valid_frame_counts(adapter):
    with pytest.raises(ValueError, match=r"8k\+1.*Use 9 or 17"):
        adapter.latent_shape(num_frames=16, height=64, width=64)
    with pytest.raises(ValueError, match="divisible by 32"):
        adapter.latent_shape(num_frames=17, height=48, width=64)


def test_condition_pipeline_uses_its_pixel_rope_coordinates(adapter, cond, tmp_path):
    pipe = LTXConditionPipeline(**adapter.pipe.components)
    cadapter = LTXAdapter(pipe, native_video_size=adapter.native_video_size)
    assert cadapter.pixel_rope_coords and not adapter.pixel_rope_coords
    x = _latents(adapter, seed=6)
    batch, _, f, h, w = x.shape
    sigma = torch.tensor([[0.2, 0.5, 0.7]])
    with torch.no_grad():
        x0 = cadapter.denoise(x, sigma, cond)
        # As LTXConditionPipeline.__call__ builds them: pixel coordinates, causal offset, seconds.
        coords = pipe._prepare_video_ids(batch, f, h, w, 1, 1)
        coords = pipe._scale_video_ids(coords, 32, 8, 0).float()
        coords[:, 0] = coords[:, 0] * (1.0 / 25)
        timestep = (sigma * 1000.0)[:, :, None].expand(batch, f, h * w).reshape(batch, -1)
        v = pipe.transformer(
            hidden_states=pipe._pack_latents(x, 1, 1),
            encoder_hidden_states=cond["prompt_embeds"],
            timestep=timestep,
            encoder_attention_mask=cond["prompt_attention_mask"],
            video_coords=coords,
            return_dict=False,
        )[0]
        expected = x - sigma[:, None, :, None, None] * pipe._unpack_latents(v, f, h, w, 1, 1)
        torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)
        assert (x0 - adapter.denoise(x, sigma, cond)).abs().max() > 1e-4  # the two conventions differ

    # Its default schedule is the pipeline's linear-quadratic one, and a saved folder loads back as it.
    sig = cadapter.sigmas(4)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and torch.all(sig[1:] < sig[:-1])
    cadapter.save_pretrained(tmp_path)
    loaded = load_adapter(tmp_path)
    assert isinstance(loaded, LTXAdapter) and isinstance(loaded.pipe, LTXConditionPipeline)


def test_context_parallel_plan_shards_per_token_timesteps(adapter):
    plan = adapter.context_parallel_plan()
    assert plan[""]["timestep"].split_dim == 1 and plan[""]["timestep"].expected_dims == 2
    assert "timestep" not in adapter.model._cp_plan[""]  # the stock plan is not modified
    assert plan["proj_out"] is adapter.model._cp_plan["proj_out"]


def test_explicit_shift_is_sd3_shift_through_the_schedulers_terminal_stretch(adapter):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # shift 1: LTXPipeline's linspace(1, 1/N, N), stretched so the last nonzero sigma is shift_terminal.
    torch.testing.assert_close(
        adapter.sigmas(3, shift=1.0), torch.tensor([1.0, 0.55, 0.1, 0.0]), atol=1e-6, rtol=0
    )
    fixed = FlowMatchEulerDiscreteScheduler.from_config(
        adapter.pipe.scheduler.config, use_dynamic_shifting=False, shift=5.0
    )
    fixed.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(adapter.sigmas(4, shift=5.0), fixed.sigmas, atol=1e-6, rtol=0)
    # The default shift depends on the sequence length: a larger clip is shifted further to noise.
    assert adapter.sigmas(4, video_size=(161, 480, 704))[1] > adapter.sigmas(4)[1]
