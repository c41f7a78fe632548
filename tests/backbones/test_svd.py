"""SVDAdapter: stock parity (EDM v-prediction through EulerDiscreteScheduler, the whole pipeline), the
per-frame timestep hook (uniform = stock, each frame gets its own embedding, removal restores stock),
and image conditioning end to end. fp32, tiny random components, CPU."""

import pytest
import torch
import torch.utils.checkpoint
from PIL import Image

from longgen.backbones import TemporalRope, cat_conds, load_adapter
from longgen.backbones.svd import SVDAdapter, has_svd_per_frame_timesteps
from longgen.schedules import ddim_step, edm_sigma_to_flow

NUM_FRAMES, HEIGHT, WIDTH = SVDAdapter.tiny_video_size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and do not fight other test processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("svd")
    SVDAdapter(
        SVDAdapter.tiny_pipeline(seed=0), native_video_size=SVDAdapter.tiny_video_size
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapter(saved):
    return SVDAdapter.from_pretrained(saved)


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def conds(adapter, image):
    return adapter.encode_prompt([], image=image, height=HEIGHT, width=WIDTH)


def _latents(seed: int, batch: int = 2) -> torch.Tensor:
    h, w = HEIGHT // 8, WIDTH // 8
    return torch.randn(batch, 4, NUM_FRAMES, h, w, generator=torch.Generator().manual_seed(seed))


def _stock_unet_call(unet, x_edm, t, cond):
    """The UNet call of StableVideoDiffusionPipeline's loop on EDM latents ``[B, C, F, H, W]``."""
    sample = torch.cat(
        [x_edm.permute(0, 2, 1, 3, 4), cond["image_latents"][:, None].expand(-1, x_edm.shape[2], -1, -1, -1)],
        dim=2,
    )
    out = unet(
        sample,
        t,
        encoder_hidden_states=cond["encoder_hidden_states"],
        added_time_ids=cond["added_time_ids"],
        return_dict=False,
    )[0]
    return out.permute(0, 2, 1, 3, 4)


# --- (a) loading, declarations, schedule, stock parity ------------------------------------------
def test_load_adapter_gives_svd_adapter(saved):
    adapter = load_adapter(saved)
    assert isinstance(adapter, SVDAdapter)
    assert adapter.native_video_size == SVDAdapter.tiny_video_size
    assert adapter.default_num_frames == NUM_FRAMES  # read from unet.config.num_frames
    assert adapter.latent_channels == 4  # not the UNet's 8 input channels (4 + image latent)
    assert adapter.latent_shape(NUM_FRAMES, HEIGHT, WIDTH) == (1, 4, NUM_FRAMES, HEIGHT // 8, WIDTH // 8)
    assert adapter.num_pixel_frames(5) == 5 and adapter.num_latent_frames(7) == 7


def test_declared_modules(adapter):
    from diffusers.models.attention import TemporalBasicTransformerBlock
    from diffusers.models.embeddings import TimestepEmbedding

    temporal = adapter.temporal_attention_modules()
    blocks = [m for m in adapter.model.modules() if isinstance(m, TemporalBasicTransformerBlock)]
    assert len(temporal) == len(blocks) > 0
    assert all(name.endswith("temporal_transformer_blocks.0.attn1") for name, _ in temporal)
    positions = adapter.temporal_position_embeddings()
    assert len(positions) == len(blocks) and all(isinstance(m, TimestepEmbedding) for _, m in positions)
    names = {n.rsplit(".", 1)[-1] for n, _ in adapter.model.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names and not isinstance(adapter, TemporalRope)
    assert torch.equal(
        adapter.guidance_scale_per_frame(5, max_guidance_scale=3.0), torch.linspace(1.0, 3.0, 5)
    )


def test_sigmas_are_the_schedulers_karras_sigmas(adapter):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(adapter.pipe.scheduler.config)
    sched.set_timesteps(7)
    sigmas = adapter.sigmas(7)
    assert sigmas.shape == (8,) and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    torch.testing.assert_close(sigmas, edm_sigma_to_flow(sched.sigmas.double()).float(), rtol=0, atol=1e-7)
    assert abs(sigmas[0].item() - 700 / 701) < 1e-6 and abs(sigmas[-2].item() - 0.002 / 1.002) < 1e-6


@pytest.mark.parametrize("step", [0, 3, 6])
def test_uniform_sigma_matches_scheduler_step(adapter, conds, step):
    """denoise == the pipeline's scale_model_input -> unet -> EulerDiscreteScheduler x0, at SVD's sigmas."""
    sched = adapter.pipe.scheduler
    sched.set_timesteps(8)
    t, s = sched.timesteps[step], sched.sigmas[step]
    cond = cat_conds(list(conds))  # uncond and cond: batch 4
    x0_true, eps = _latents(2, batch=4), _latents(3, batch=4)
    x_edm = x0_true + s * eps
    with torch.no_grad():
        model_in = sched.scale_model_input(x_edm, t)
        v = _stock_unet_call(adapter.model, model_in, t, cond)
        expected = sched.step(v, t, x_edm).pred_original_sample
        # float64 flow sigma: near sigma = 1 a float32 one moves the EDM level (700 -> 700.03 at step 0)
        sigma = edm_sigma_to_flow(s.double())
        got = adapter.denoise((x_edm * (1 - sigma)).float(), sigma.expand(4, NUM_FRAMES), cond)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_matches_stable_video_diffusion_pipeline(adapter, image):
    """Full sampling (per-frame linear guidance, Euler = DDIM in flow sigmas) equals the stock pipeline."""
    steps, gen = 3, torch.Generator().manual_seed(7)
    with torch.no_grad():
        expected = adapter.pipe(
            image,
            height=HEIGHT,
            width=WIDTH,
            num_frames=NUM_FRAMES,
            num_inference_steps=steps,
            generator=gen,
            output_type="latent",
        ).frames  # [B, F, C, h, w]
        gen = torch.Generator().manual_seed(7)  # the pipeline draws the image noise first, then the latents
        cond, uncond = adapter.encode_prompt([], image=image, height=HEIGHT, width=WIDTH, generator=gen)
        shape = (2, NUM_FRAMES, 4, HEIGHT // 8, WIDTH // 8)
        sched = adapter.pipe.scheduler
        sched.set_timesteps(steps)
        x_edm = torch.randn(shape, generator=gen) * sched.init_noise_sigma
        sigmas = adapter.sigmas(steps)
        x = x_edm.permute(0, 2, 1, 3, 4) * (1 - sigmas[0])
        scale = adapter.guidance_scale_per_frame(NUM_FRAMES)[None, None, :, None, None]
        batch = cat_conds([uncond, cond])
        for i in range(steps):
            sigma = sigmas[i].expand(2, NUM_FRAMES)
            x0_u, x0_c = adapter.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), batch).chunk(2)
            x = ddim_step(x, x0_u + scale * (x0_c - x0_u), sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x, expected.permute(0, 2, 1, 3, 4), rtol=0, atol=1e-4)


# --- (b) the per-frame timestep hook ------------------------------------------------------------
def test_forced_per_frame_path_equals_stock(adapter, conds):
    cond = conds[0]
    x, sigma = _latents(4), torch.full((2, NUM_FRAMES), 0.7)
    calls = []
    handle = adapter.model.time_proj.register_forward_hook(lambda m, args, out: calls.append(args[0].numel()))
    try:
        with torch.no_grad():
            stock = adapter.denoise(x, sigma, cond)
            assert calls == [2]  # one timestep per sample: the stock path
            adapter.force_per_frame_timesteps = True
            forced = adapter.denoise(x, sigma, cond)
            assert calls[1:] == [2, 2 * NUM_FRAMES]  # the hook built one embedding per (sample, frame)
    finally:
        adapter.force_per_frame_timesteps = False
        handle.remove()
    torch.testing.assert_close(forced, stock, rtol=0, atol=1e-5)


def _capture_temb(unet):
    """Record the temb every SpatioTemporalResBlock receives (down, mid and up)."""
    from diffusers.models.resnet import SpatioTemporalResBlock

    seen, handles = [], []
    for module in unet.modules():
        if isinstance(module, SpatioTemporalResBlock):
            handles.append(module.register_forward_pre_hook(lambda m, args: seen.append(args[1])))
    return seen, handles


def test_each_frame_gets_its_own_embedding(adapter, conds):
    """Row b*F+f of every block's temb is the stock embedding of sigma[b, f] (fails if frames are mixed up)."""
    cond = dict(conds[0])
    # a different motion bucket per sample, so the samples' added embeddings differ too
    cond["added_time_ids"] = torch.tensor([[6.0, 127.0, 0.02], [6.0, 30.0, 0.02]])
    x = _latents(5)
    sigma = torch.tensor([[0.0, 0.3, 0.6, 0.95], [0.9, 0.1, 0.5, 0.2]])
    seen, handles = _capture_temb(adapter.model)
    try:
        with torch.no_grad():
            adapter.denoise(x, sigma, cond)
            per_frame = list(seen)
            expected = torch.empty_like(per_frame[0])
            for f in range(NUM_FRAMES):
                seen.clear()
                adapter.denoise(
                    x, sigma[:, f : f + 1].expand(-1, NUM_FRAMES), cond
                )  # stock, per-sample level
                rows = torch.arange(2) * NUM_FRAMES + f
                expected[rows] = seen[0][rows]
    finally:
        for h in handles:
            h.remove()
    assert len(per_frame) == len(seen) > 2
    for temb in per_frame:
        torch.testing.assert_close(temb, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])  # the levels really differ


def test_non_uniform_sigma_reaches_each_frame_end_to_end(saved, conds):
    """With the spatio-temporal mixers set to spatial only, frames are independent: frame f of a
    per-frame call equals frame f of a uniform call at sigma[:, f]."""
    from diffusers.models.resnet import AlphaBlender

    adapter = SVDAdapter.from_pretrained(saved)
    for m in adapter.model.modules():
        if isinstance(m, AlphaBlender):
            m.mix_factor.data.fill_(-100.0 if m.switch_spatial_to_temporal_mix else 100.0)  # alpha = 1
    cond, x = conds[0], _latents(6)
    sigma = torch.tensor([[0.2, 0.5, 0.8, 0.97], [0.97, 0.8, 0.5, 0.2]])
    with torch.no_grad():
        mixed = adapter.denoise(x, sigma, cond)
        for f in range(NUM_FRAMES):
            uniform = adapter.denoise(x, sigma[:, f : f + 1].expand(-1, NUM_FRAMES), cond)
            torch.testing.assert_close(mixed[:, :, f], uniform[:, :, f], rtol=0, atol=1e-5)
        first_level = adapter.denoise(x, sigma[:, :1].expand(-1, NUM_FRAMES), cond)
    assert not torch.allclose(mixed, first_level, atol=1e-3)


def test_non_uniform_sigma_changes_output(adapter, conds):
    cond, x = conds[0], _latents(7)
    sigma = torch.tensor([[0.5, 0.6, 0.7, 0.8]]).expand(2, -1)
    with torch.no_grad():
        per_frame = adapter.denoise(x, sigma, cond)
        uniform = adapter.denoise(x, torch.full_like(sigma, 0.5), cond)
    assert (per_frame[:, :, 1:] - uniform[:, :, 1:]).abs().max() > 1e-3


def test_hook_is_inert_and_removal_restores_stock(saved, conds):
    from diffusers import UNetSpatioTemporalConditionModel

    adapter = SVDAdapter.from_pretrained(saved)
    reference = UNetSpatioTemporalConditionModel.from_pretrained(saved, subfolder="unet")  # never hooked
    cond, x = conds[0], _latents(8)
    t = torch.tensor([0.5, -1.0])
    sigma = torch.tensor([[0.1, 0.4, 0.7, 0.9]]).expand(2, -1)
    with torch.no_grad():
        stock = _stock_unet_call(reference, x, t, cond)
        assert has_svd_per_frame_timesteps(adapter.model)
        assert torch.equal(_stock_unet_call(adapter.model, x, t, cond), stock)  # installed but inert
        per_frame = adapter.denoise(x, sigma, cond)
        adapter.remove_per_frame_hook()
        assert not has_svd_per_frame_timesteps(adapter.model)
        assert torch.equal(_stock_unet_call(adapter.model, x, t, cond), stock)
        again = adapter.denoise(x, sigma, cond)  # a per-frame call installs the hook again
    assert has_svd_per_frame_timesteps(adapter.model)
    assert torch.equal(again, per_frame)


class _ExternalCheckpoint(torch.nn.Module):
    """Activation checkpointing applied from outside a block (as FSDP / Accelerate wrappers do)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


@pytest.mark.parametrize("checkpointing", ["diffusers", "external"])
def test_per_frame_training_step_with_gradient_checkpointing(saved, conds, checkpointing):
    """Per-frame levels train: gradients reach the time embedding and checkpointing changes nothing,
    also when a block is re-run by a wrapper after the forward pass (the hook's identity-keyed memory)."""
    cond, x = conds[0], _latents(9)
    sigma = torch.tensor([[0.1, 0.4, 0.7, 0.9]]).expand(2, -1)
    results = []
    for use_checkpointing in (False, True):
        adapter = SVDAdapter.from_pretrained(saved)
        adapter.model.train()
        if use_checkpointing and checkpointing == "diffusers":
            adapter.model.enable_gradient_checkpointing()
        elif use_checkpointing:
            adapter.model.mid_block = _ExternalCheckpoint(adapter.model.mid_block)
        x0 = adapter.denoise(x, sigma, cond)
        x0.square().mean().backward()
        grad = adapter.model.time_embedding.linear_1.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        results.append((x0.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-8)


# --- (c) image conditioning end to end ----------------------------------------------------------
def test_conditioning_matches_pipeline_encoders(adapter, image):
    gen = torch.Generator().manual_seed(3)
    cond, uncond = adapter.encode_prompt([], image=image, height=HEIGHT, width=WIDTH, generator=gen)
    pipe = adapter.pipe
    with torch.no_grad():
        embeds = pipe._encode_image(image, "cpu", 1, False)
        pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH)
        noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(3))
        latents = pipe._encode_vae_image(pixels + 0.02 * noise, "cpu", 1, False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["image_latents"], latents, rtol=0, atol=1e-6)
    assert cond["added_time_ids"].tolist() == [[6.0, 127.0, pytest.approx(0.02)]] * 2  # fps - 1
    assert not uncond["encoder_hidden_states"].any() and not uncond["image_latents"].any()
    assert torch.equal(uncond["added_time_ids"], cond["added_time_ids"])


def test_image_to_video_end_to_end(adapter, tmp_path):
    path = tmp_path / "cond.png"
    Image.new("RGB", (48, 40), (200, 40, 40)).save(path)
    pil = Image.open(path).convert("RGB")
    for img in (pil, str(path)):
        cond, uncond = adapter.encode_prompt(
            ["a red ball", "a red ball"], ["", ""], image=img, height=HEIGHT, width=WIDTH
        )
        assert cond["image_latents"].shape == (2, 4, HEIGHT // 8, WIDTH // 8)
    noise = torch.randn(2, 4, NUM_FRAMES, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    sigmas = adapter.sigmas(3)
    x = noise * sigmas[0]
    batch = cat_conds([uncond, cond])
    with torch.no_grad():
        for i in range(3):
            sigma = sigmas[i].expand(2, NUM_FRAMES)
            x0_u, x0_c = adapter.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), batch).chunk(2)
            x = ddim_step(x, x0_u + 2.0 * (x0_c - x0_u), sigmas[i], sigmas[i + 1])
        frames = adapter.decode(x)
        adapter.decode_chunk_size = 2
        chunked = adapter.decode(x)
        adapter.decode_chunk_size = None
    assert frames.shape == (2, NUM_FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1 and torch.isfinite(frames).all()
    assert chunked.shape == frames.shape


def test_image_is_required(adapter):
    with pytest.raises(ValueError, match="SVD is image-to-video: pass --image PATH"):
        adapter.encode_prompt(["a red ball"], image=None)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        adapter.encode_prompt([], image=torch.full((1, 3, HEIGHT, WIDTH), -1.0), height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="one image or one per prompt"):
        adapter.encode_prompt(
            ["a", "b", "c"], image=torch.rand(2, 3, HEIGHT, WIDTH), height=HEIGHT, width=WIDTH
        )
