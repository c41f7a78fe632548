"""SkyReels-V2 adapter: parity with the stock transformer and the diffusion-forcing pipeline's model calls."""

import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2ImageToVideoPipeline

from longgen.backbones import build_tiny, cat_conds, load_adapter
from longgen.backbones.skyreels_v2 import SkyReelsV2Adapter
from longgen.backbones.wan import CONDITION_LATENTS, WanAdapter
from longgen.schedules import flow_sigmas

PROMPT = ["a red ball bouncing on the sea"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("skyreels_tiny")
    build_tiny("skyreels_v2", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(saved):
    return load_adapter(saved)


def _latents(adapter, seed=0, batch=1, num_latent_frames=None):
    num_frames, height, width = adapter.native_video_size
    shape = list(adapter.latent_shape(num_frames, height, width, batch_size=batch))
    shape[2] = num_latent_frames or shape[2]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _text(batch, seed=0, length=7):
    return {
        "encoder_hidden_states": torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))
    }


def _stock_velocity(model, x, timestep, cond, **kwargs):
    with torch.no_grad():
        return model(hidden_states=x, timestep=timestep, return_dict=False, **cond, **kwargs)[0]


def test_load_adapter_gives_skyreels_with_wan_geometry(adapter):
    assert isinstance(adapter, SkyReelsV2Adapter) and isinstance(adapter, WanAdapter)
    assert isinstance(adapter.pipe, SkyReelsV2DiffusionForcingPipeline)
    assert adapter.native_video_size == SkyReelsV2Adapter.tiny_video_size
    assert (adapter.temporal_compression, adapter.spatial_compression, adapter.patch_size) == (
        4,
        8,
        (1, 2, 2),
    )
    assert adapter.default_shift == 8.0
    torch.testing.assert_close(adapter.sigmas(3), flow_sigmas(3, shift=8.0))
    assert adapter.model.config.inject_sample_info and adapter.fps_index == 1
    assert adapter.rope_module() is adapter.model.rope
    assert [n for n, _ in adapter.temporal_attention_modules()] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert adapter.context_parallel_plan() is None  # diffusers ships no _cp_plan for SkyReels-V2
    with pytest.raises(ValueError, match=r"4k\+1.*93 or 97"):
        adapter.latent_shape(96, 544, 960)


def test_uniform_sigma_matches_stock_model_with_scalar_timestep(adapter):
    x = _latents(adapter, batch=2)
    cond = _text(2)
    sigma = torch.tensor([[0.7] * 3, [0.25] * 3])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
    v = _stock_velocity(adapter.model, x, torch.tensor([700.0, 250.0]), cond, fps=[1, 1])
    assert x0.dtype == torch.float32 and x0.shape == x.shape
    torch.testing.assert_close(x0, x - sigma[:, None, :, None, None] * v, atol=1e-5, rtol=0)
    adapter.force_per_frame_timesteps = True
    try:
        with torch.no_grad():
            forced = adapter.denoise(x, sigma, cond)
    finally:
        adapter.force_per_frame_timesteps = False
    torch.testing.assert_close(forced, x0, atol=1e-5, rtol=0)


def test_per_frame_sigma_matches_native_diffusion_forcing_timesteps(adapter):
    x = _latents(adapter, seed=1, batch=2)
    cond = _text(2, seed=1)
    sigma = torch.tensor([[0.9, 0.5, 0.0], [0.2, 0.6, 1.0]])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
    # The DF pipeline's call: timestep (B, F) = level * 1000 per latent frame, enable_diffusion_forcing=True.
    # With inject_sample_info the stock model only takes one sample per call (it fails on a batch of 2),
    # so the reference runs sample by sample.
    expected = []
    for b in range(2):
        timestep = torch.tensor([[sigma[b, f].item() * 1000 for f in range(3)]])
        v = _stock_velocity(
            adapter.model,
            x[b : b + 1],
            timestep,
            {"encoder_hidden_states": cond["encoder_hidden_states"][b : b + 1]},
            enable_diffusion_forcing=True,
            fps=[1],
        )
        expected.append(x[b : b + 1] - sigma[b, None, :, None, None] * v)
    torch.testing.assert_close(x0, torch.cat(expected), atol=1e-6, rtol=0)

    changed = sigma.clone()
    changed[0, 2] = 0.4
    with torch.no_grad():
        x0_changed = adapter.denoise(x, changed, cond)
    assert (x0_changed[0, :, 0] - x0[0, :, 0]).abs().max() > 1e-4  # bidirectional attention by default
    torch.testing.assert_close(x0_changed[1], x0[1], atol=0, rtol=0)


def test_fps_embedding_enters_the_model(adapter):
    x = _latents(adapter, seed=2)
    sigma = torch.tensor([[0.8, 0.5, 0.2]])
    with torch.no_grad():
        at_24 = adapter.denoise(x, sigma, _text(1))
        adapter.fps = 16
        try:
            at_16 = adapter.denoise(x, sigma, _text(1))
        finally:
            adapter.fps = 24
    assert (at_16 - at_24).abs().max() > 1e-4


def test_causal_blocks_hide_later_frames_from_earlier_ones(tmp_path):
    adapter = SkyReelsV2Adapter(SkyReelsV2Adapter.tiny_pipeline(seed=0), SkyReelsV2Adapter.tiny_video_size)
    adapter.set_causal_block_size(2)
    assert adapter.causal_block_size == 2
    x = _latents(adapter, seed=3, num_latent_frames=4)
    sigma = torch.tensor([[0.0, 0.1, 0.6, 0.9]])
    changed = torch.tensor([[0.0, 0.1, 0.6, 0.3]])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, _text(1))
        x0_changed = adapter.denoise(x, changed, _text(1))
    torch.testing.assert_close(
        x0_changed[:, :, :2], x0[:, :, :2], atol=0, rtol=0
    )  # block 0 cannot see block 1
    assert (x0_changed[:, :, 2] - x0[:, :, 2]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="causal_block_size=2.*Use 2 or 4"):
        adapter.denoise(x[:, :, :3], sigma[:, :3], _text(1))
    with pytest.raises(ValueError, match=">= 1"):
        adapter.set_causal_block_size(0)


def test_adapter_reproduces_the_diffusion_forcing_pipeline_model_calls(adapter):
    """Every transformer call of a stock DF run (async, ar_step 1) equals adapter.denoise on its inputs."""
    pipe = adapter.pipe
    calls = []

    def record(module, args, kwargs, output):
        calls.append(
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            | {"out": output[0]}
        )

    handle = adapter.model.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            latents = pipe(
                prompt=PROMPT,
                num_frames=13,
                height=32,
                width=32,
                num_inference_steps=2,
                guidance_scale=6.0,
                ar_step=1,
                causal_block_size=1,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).frames
    finally:
        handle.remove()
    assert latents.shape == (1, 4, 4, 4, 4)
    assert len(calls) >= 4 and any(
        len(set(c["timestep"][0].tolist())) > 1 for c in calls
    )  # per-frame levels ran

    scheduler = pipe.scheduler  # set_timesteps(2) by the run
    adapter.match_scheduler_timesteps(scheduler)
    # The DF matrix labels frames that have not started with 999 and finished ones with 0.
    table_sigmas = torch.cat([scheduler.sigmas[:-1], torch.tensor([0.999, 0.0])])
    table_timesteps = torch.cat([scheduler.timesteps.float(), torch.tensor([999.0, 0.0])])
    adapter.timestep_table = (table_sigmas, table_timesteps)
    try:
        for call in calls:
            timestep = call["timestep"].float()
            sigma = table_sigmas[(timestep[..., None] == table_timesteps).float().argmax(-1)]
            cond = {"encoder_hidden_states": call["encoder_hidden_states"]}
            with torch.no_grad():
                x0 = adapter.denoise(call["hidden_states"], sigma, cond)
            expected = call["hidden_states"] - sigma[:, None, :, None, None] * call["out"]
            torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)
    finally:
        adapter.timestep_table = None


def test_encode_denoise_decode_and_chunked_decode(adapter):
    cond, uncond = adapter.encode_prompt(PROMPT, negative_prompt=["blurry"])
    assert cond["encoder_hidden_states"].shape == uncond["encoder_hidden_states"].shape == (1, 512, 32)
    x = _latents(adapter, batch=1)
    with torch.no_grad():
        x0 = adapter.denoise(
            torch.cat([x, x]), torch.tensor([[0.9, 0.6, 0.3]] * 2), cat_conds([cond, uncond])
        )
    assert not torch.allclose(x0[0], x0[1])  # the prompts differ
    frames = adapter.decode(x0)
    assert frames.shape == (2, 9, 32, 32, 3) and frames.min() >= 0 and frames.max() <= 1
    blocks = list(adapter.iter_decode(x0[:1], chunk_latent_frames=1, context_latent_frames=1))
    assert [b.shape[1] for b in blocks] == [1, 4, 4]


def test_image_to_video_pipeline_loads_and_conditions(tmp_path):
    from PIL import Image

    pipe = SkyReelsV2Adapter.tiny_pipeline(seed=0, image_to_video=True)
    SkyReelsV2Adapter(pipe, SkyReelsV2Adapter.tiny_video_size).save_pretrained(tmp_path)
    adapter = load_adapter(tmp_path)
    assert isinstance(adapter, SkyReelsV2Adapter) and isinstance(adapter.pipe, SkyReelsV2ImageToVideoPipeline)
    cond, _ = adapter.encode_prompt(PROMPT, image=Image.new("RGB", (32, 32), (200, 60, 20)))
    assert cond[CONDITION_LATENTS].shape == (1, 8, 3, 4, 4)
    x = _latents(adapter, seed=4)
    sigma = torch.tensor([[0.2, 0.5, 0.8]])
    with torch.no_grad():
        x0 = adapter.denoise(x, sigma, cond)
    v = _stock_velocity(
        adapter.model,
        torch.cat([x, cond[CONDITION_LATENTS]], dim=1),
        sigma * 1000,
        {k: cond[k] for k in ("encoder_hidden_states", "encoder_hidden_states_image")},
        enable_diffusion_forcing=True,
        fps=[1],
    )
    torch.testing.assert_close(x0, x - sigma[:, None, :, None, None] * v, atol=1e-6, rtol=0)
