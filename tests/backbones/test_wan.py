"""Wan adapter: parity with the stock transformer and WanPipeline, per-frame levels, I2V, MoE, frame math."""

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

from longgen.backbones import build_tiny, cat_conds, load_adapter
from longgen.backbones.wan import CONDITION_LATENTS, WanAdapter
from longgen.pipeline import GuidedDenoiser
from longgen.samplers import sample_full
from longgen.schedules import flow_sigmas

PROMPT = ["a red ball bouncing on the sea"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_tiny")
    build_tiny("wan", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(saved):
    return load_adapter(saved)


def _latents(adapter, seed=0, batch=1):
    num_frames, height, width = adapter.native_video_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(adapter.latent_shape(num_frames, height, width, batch_size=batch), generator=gen)


def _text(batch, seed=0, length=7):
    return {
        "encoder_hidden_states": torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))
    }


def _stock_velocity(model, x, timestep, cond):
    with torch.no_grad():
        return model(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]


def test_load_adapter_gives_wan_with_native_geometry(adapter):
    assert isinstance(adapter, WanAdapter) and isinstance(adapter.pipe, WanPipeline)
    assert adapter.native_video_size == WanAdapter.tiny_video_size
    assert (adapter.temporal_compression, adapter.spatial_compression, adapter.patch_size) == (
        4,
        8,
        (1, 2, 2),
    )
    assert adapter.latent_shape(81, 480, 832) == (1, 4, 21, 60, 104)
    assert adapter.default_shift == 3.0  # the tiny UniPC scheduler's flow_shift
    torch.testing.assert_close(adapter.sigmas(4), flow_sigmas(4, shift=3.0))
    torch.testing.assert_close(adapter.sigmas(4, shift=1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_uniform_sigma_matches_stock_model_with_scalar_timestep(adapter):
    x = _latents(adapter, batch=2)
    cond = _text(2)
    sigma = torch.tensor([[0.7] * 3, [0.3] * 3])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
    v = _stock_velocity(adapter.model, x, torch.tensor([700.0, 300.0]), cond)
    expected = x - sigma[:, None, :, None, None] * v  # flow: v = eps - x0
    assert x0.dtype == torch.float32 and x0.shape == x.shape
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)
    # The per-token path with equal levels is the same function (to float error).
    adapter.force_per_frame_timesteps = True
    try:
        with torch.no_grad():
            forced = adapter.denoise(x, sigma, cond)
    finally:
        adapter.force_per_frame_timesteps = False
    torch.testing.assert_close(forced, x0, atol=1e-5, rtol=0)


def test_per_frame_sigma_matches_native_per_token_timesteps(adapter):
    x = _latents(adapter, seed=1, batch=2)
    cond = _text(2, seed=1)
    batch, _, num_latent_frames, height, width = x.shape
    sigma = torch.tensor([[0.9, 0.5, 0.0], [0.2, 0.6, 1.0]])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
    # Per-token timesteps from the definition: token (f, i, j) of the (F, H/2, W/2) patch grid, frame-major.
    rows, cols = height // 2, width // 2
    timestep = torch.empty(batch, num_latent_frames * rows * cols)
    for b in range(batch):
        for f in range(num_latent_frames):
            for i in range(rows):
                for j in range(cols):
                    timestep[b, f * rows * cols + i * cols + j] = sigma[b, f] * 1000
    v = _stock_velocity(adapter.model, x, timestep, cond)
    torch.testing.assert_close(x0, x - sigma[:, None, :, None, None] * v, atol=1e-6, rtol=0)

    changed = sigma.clone()
    changed[0, 2] = 0.4
    with torch.no_grad():
        x0_changed = adapter.denoise(x, changed, cond)
    assert (x0_changed[0] - x0[0]).abs().max() > 1e-3  # full attention: every frame of sample 0 moves
    assert (x0_changed[0, :, 0] - x0[0, :, 0]).abs().max() > 1e-4
    torch.testing.assert_close(x0_changed[1], x0[1], atol=0, rtol=0)  # samples stay independent


def test_bad_inputs_are_explained(adapter):
    x = _latents(adapter)
    with pytest.raises(ValueError, match=r"one flow sigma per latent frame"):
        adapter.denoise(x, torch.full((1,), 0.5), _text(1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adapter.denoise(x, torch.full((1, 3), 1.5), _text(1))
    with pytest.raises(ValueError, match="unknown cond keys.*encoder_hidden_states"):
        adapter.denoise(x, torch.full((1, 3), 0.5), {**_text(1), "prompt_embeds": torch.zeros(1)})
    with pytest.raises(ValueError, match="takes no image"):
        adapter.encode_prompt(PROMPT, image=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"4k\+1.*77 or 81"):
        adapter.latent_shape(80, 480, 832)
    with pytest.raises(ValueError, match="divisible by 16"):
        adapter.latent_shape(81, 480, 840)


def test_encode_denoise_decode_and_chunked_decode(adapter):
    cond, uncond = adapter.encode_prompt(PROMPT * 2, num_frames=9, height=32, width=32)
    assert cond["encoder_hidden_states"].shape == (2, 512, 32)
    assert uncond["encoder_hidden_states"].shape == (2, 512, 32)
    assert not torch.equal(cond["encoder_hidden_states"], uncond["encoder_hidden_states"])
    assert adapter.encode_prompt(PROMPT, do_classifier_free_guidance=False)[1] is None

    x = _latents(adapter, batch=2)
    with torch.no_grad():
        x0 = adapter.denoise(torch.cat([x, x]), torch.full((4, 3), 0.8), cat_conds([cond, uncond]))
    frames = adapter.decode(x0[:2])
    assert frames.shape == (2, 9, 32, 32, 3) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0

    for chunk in (1,):
        blocks = list(adapter.iter_decode(x0[:1], chunk_latent_frames=chunk, context_latent_frames=1))
        assert sum(b.shape[1] for b in blocks) == 9
        assert all(b.shape[0] == 1 and b.shape[2:] == (32, 32, 3) for b in blocks)
    # one chunk is the plain decode
    (whole,) = adapter.iter_decode(x0[:1], chunk_latent_frames=3)
    torch.testing.assert_close(whole, frames[:1], atol=1e-5, rtol=0)  # batch 1 vs 2 convs: float error


def test_decode_uses_wan_pipeline_latent_normalisation(adapter):
    latents = _latents(adapter, seed=3)
    vae = adapter.vae
    # WanPipeline: latents / (1 / std) + mean before vae.decode
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    expected = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(adapter.decode(latents), expected, atol=1e-6, rtol=0)
    # encode_video inverts the normalisation: the latents of a decoded clip have the clip's shape
    encoded = adapter.encode_video(adapter.decode(latents))
    assert encoded.shape == latents.shape
    with pytest.raises(ValueError, match=r"4k\+1"):
        adapter.encode_video(torch.zeros(1, 8, 32, 32, 3))


def test_euler_sampling_reproduces_wan_pipeline(adapter):
    """The adapter + DDIM/Euler over its denoiser equals WanPipeline with the flow-match Euler scheduler."""
    pipe = adapter.pipe
    original = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    try:
        noise = _latents(adapter, seed=4)
        with torch.no_grad():
            expected = pipe(
                prompt=PROMPT,
                num_frames=9,
                height=32,
                width=32,
                num_inference_steps=3,
                guidance_scale=5.0,
                latents=noise.clone(),
                output_type="latent",
            ).frames
        sigmas = pipe.scheduler.sigmas.clone()
    finally:
        pipe.scheduler = original
    cond, uncond = adapter.encode_prompt(PROMPT)
    with torch.no_grad():
        latents = sample_full(GuidedDenoiser(adapter, cond, uncond, 5.0), noise, sigmas, disable=True)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)


def test_scheduler_timestep_table_gives_unipc_integer_timesteps(adapter):
    scheduler = adapter.pipe.scheduler
    scheduler.set_timesteps(3)
    adapter.match_scheduler_timesteps(scheduler)
    try:
        t = adapter.model_timestep(scheduler.sigmas[:3].repeat(2, 1))
        assert torch.equal(t, scheduler.timesteps.float().repeat(2, 1))
        assert not torch.equal(t[0], scheduler.sigmas[:3] * 1000)  # UniPC truncates to integers
        # levels outside the table keep the continuous map
        torch.testing.assert_close(adapter.model_timestep(torch.tensor([[0.123]])), torch.tensor([[123.0]]))
    finally:
        adapter.timestep_table = None
    torch.testing.assert_close(adapter.model_timestep(scheduler.sigmas[:1]), scheduler.sigmas[:1] * 1000)


def test_extension_and_training_declarations(adapter):
    model = adapter.model
    assert adapter.rope_module() is model.rope
    names = [name for name, _ in adapter.temporal_attention_modules()]
    assert names == [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    assert all(module is model.get_submodule(name) for name, module in adapter.temporal_attention_modules())
    assert adapter.context_parallel_plan() is WanTransformer3DModel._cp_plan
    module_names = [name for name, _ in model.named_modules()]
    for target in adapter.lora_target_modules:  # PEFT matches a target as a dotted suffix
        assert any(n == target or n.endswith("." + target) for n in module_names), target
    assert adapter.experts() == [model]


def test_two_expert_moe_picks_the_expert_per_sample():
    adapter = WanAdapter(WanAdapter.tiny_pipeline(seed=0, two_experts=True), WanAdapter.tiny_video_size)
    high_noise, low_noise = adapter.pipe.transformer, adapter.pipe.transformer_2
    assert adapter.experts() == [high_noise, low_noise]
    x = _latents(adapter, seed=5, batch=2)
    cond = _text(2, seed=5)
    sigma = torch.tensor([[0.9, 0.2, 0.0], [0.3, 0.3, 0.1]])  # sample 0 max 0.9 >= 0.5, sample 1 max 0.3
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
        first = adapter.denoise(x[:1], sigma[:1], _text(1, seed=5))
    tokens = 4
    v_high = _stock_velocity(
        high_noise, x[:1], (sigma[:1] * 1000).repeat_interleave(tokens, 1), _text(1, seed=5)
    )
    v_low = _stock_velocity(
        low_noise,
        x[1:],
        (sigma[1:] * 1000).repeat_interleave(tokens, 1),
        {"encoder_hidden_states": cond["encoder_hidden_states"][1:]},
    )
    torch.testing.assert_close(x0[:1], x[:1] - sigma[:1, None, :, None, None] * v_high, atol=1e-6, rtol=0)
    torch.testing.assert_close(x0[1:], x[1:] - sigma[1:, None, :, None, None] * v_low, atol=1e-6, rtol=0)
    torch.testing.assert_close(first, x0[:1], atol=1e-6, rtol=0)


def test_image_to_video_conditioning(tmp_path):
    from PIL import Image

    WanAdapter(
        WanAdapter.tiny_pipeline(seed=0, image_to_video=True), WanAdapter.tiny_video_size
    ).save_pretrained(tmp_path)
    adapter = load_adapter(tmp_path)
    assert isinstance(adapter, WanAdapter) and isinstance(adapter.pipe, WanImageToVideoPipeline)
    assert adapter.requires_image_condition and adapter.latent_channels == 4
    with pytest.raises(ValueError, match="image="):
        adapter.encode_prompt(PROMPT)
    red, blue = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))
    cond, uncond = adapter.encode_prompt(PROMPT, image=red, num_frames=9, height=32, width=32)
    assert cond[CONDITION_LATENTS].shape == (1, 4 + 4, 3, 4, 4)
    assert cond["encoder_hidden_states_image"].shape == (1, 17, 32)  # 16 patches + class token
    assert uncond[CONDITION_LATENTS] is cond[CONDITION_LATENTS]

    x = _latents(adapter, seed=6)
    sigma = torch.tensor([[0.0, 0.5, 0.9]])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
    v = _stock_velocity(
        adapter.model,
        torch.cat([x, cond[CONDITION_LATENTS]], dim=1),
        (sigma * 1000).repeat_interleave(4, 1),
        {k: cond[k] for k in ("encoder_hidden_states", "encoder_hidden_states_image")},
    )
    torch.testing.assert_close(x0, x - sigma[:, None, :, None, None] * v, atol=1e-6, rtol=0)
    with torch.no_grad():
        x0_blue = adapter.denoise(x, sigma, adapter.encode_prompt(PROMPT, image=blue, num_frames=9)[0])
    assert (x0_blue - x0).abs().max() > 1e-4
    with pytest.raises(ValueError, match="covers 3 latent frames but x has 2"):
        adapter.denoise(x[:, :, :2], sigma[:, :2], cond)
    with pytest.raises(ValueError, match="needs the image condition"):
        adapter.denoise(x, sigma, _text(1))


def test_vae_without_time_compression_encodes_every_frame():
    """AutoencoderKLWan reads frame 0 then chunks of 4 and drops a remainder; with no time compression
    (the demo's VAE) every frame count is valid, so the adapter pads with the last frame and crops."""
    vae_kwargs = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1], "num_res_blocks": 1,
                  "temperal_downsample": [False], "scale_factor_spatial": 2, "scale_factor_temporal": 1}  # fmt: skip
    adapter = WanAdapter(WanAdapter.tiny_pipeline(seed=0, vae_kwargs=vae_kwargs), native_video_size=(9, 16, 16))
    assert adapter.temporal_compression == 1
    frames = torch.rand(1, 7, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    latents = adapter.encode_video(frames)
    assert latents.shape[2] == 7  # not 5
    # the causal encoder: the 5 first frames alone give the same first 5 latent frames
    torch.testing.assert_close(latents[:, :, :5], adapter.encode_video(frames[:, :5]), atol=1e-5, rtol=1e-5)
