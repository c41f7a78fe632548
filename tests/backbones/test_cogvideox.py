"""CogVideoX adapter: parity with the stock model, the per-frame timestep hook, RoPE, schedule, I/O."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero

from longgen.backbones import cat_conds, load_adapter
from longgen.backbones.cogvideox import (
    PER_FRAME_TIMESTEP_HOOK,
    CogVideoXAdapter,
    apply_per_frame_timesteps,
    per_frame_timesteps,
    remove_per_frame_timesteps,
)
from longgen.schedules import ddim_step

ATOL = 1e-5


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> CogVideoXAdapter:
    """The tiny pipeline after a save_pretrained / load_adapter round trip."""
    path = tmp_path_factory.mktemp("tiny_cogvideox")
    CogVideoXAdapter(CogVideoXAdapter.tiny_pipeline(seed=0)).save_pretrained(path)
    loaded = load_adapter(path)
    assert type(loaded) is CogVideoXAdapter
    return loaded


@pytest.fixture(scope="module")
def cond(adapter):
    cond, uncond = adapter.encode_prompt(
        ["a red ball moving", "blue sky at night"], do_classifier_free_guidance=True
    )
    return cond


def _latents(
    adapter, num_latent_frames: int | None = None, batch_size: int = 2, seed: int = 0
) -> torch.Tensor:
    num_frames, height, width = adapter.native_video_size
    shape = list(adapter.latent_shape(num_frames, height, width, batch_size=batch_size))
    if num_latent_frames is not None:
        shape[2] = num_latent_frames
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU they only oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vp_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Flow sigma of a VP level: s / (1 + s) with s = sqrt((1 - ab) / ab), written to be 1 at ab = 0."""
    return (1 - alpha_bar).sqrt() / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())


def _stock_v(
    adapter, x_vp: torch.Tensor, prompt_embeds: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The stock transformer as CogVideoXPipeline calls it (its own RoPE), output as [B, C, F, H, W]."""
    num_latent_frames, height, width = x_vp.shape[2:]
    spatial = adapter.pipe.vae_scale_factor_spatial
    rope = adapter.pipe._prepare_rotary_positional_embeddings(
        height * spatial, width * spatial, num_latent_frames, x_vp.device
    )
    v = adapter.model(
        hidden_states=x_vp.permute(0, 2, 1, 3, 4),
        encoder_hidden_states=prompt_embeds,
        timestep=timestep,
        image_rotary_emb=rope,
        return_dict=False,
    )[0]
    return v.permute(0, 2, 1, 3, 4)


# --- (a) uniform sigma == the stock model ------------------------------------------------------------
@torch.no_grad()
def test_uniform_sigma_matches_stock_model_at_ddim_timesteps(adapter, cond):
    scheduler = adapter.pipe.scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    scheduler.set_timesteps(10)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    x = _latents(adapter)
    num_latent_frames = x.shape[2]
    # Sample 0 and 1 at different DDIM timesteps: one timestep per sample, as the stock model takes.
    for t_pair in [
        (scheduler.timesteps[1], scheduler.timesteps[4]),
        (scheduler.timesteps[7], scheduler.timesteps[9]),
    ]:
        t = torch.stack(t_pair)  # int64 [B], as the pipeline passes it
        ab = alphas_cumprod[t][:, None, None, None, None]
        sigma = _vp_sigma(ab)
        x_vp = (ab.sqrt() * x.double() / (1 - sigma)).float()
        v = _stock_v(adapter, x_vp, cond["prompt_embeds"], t)
        x0_ref = ab.sqrt().float() * x_vp - (1 - ab).sqrt().float() * v
        sigma_frames = sigma.reshape(2, 1).expand(2, num_latent_frames).float()
        x0 = adapter.denoise(x, sigma_frames, cond)
        assert x0.dtype == torch.float32 and x0.shape == x.shape
        torch.testing.assert_close(x0, x0_ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_pure_noise_level_is_the_zero_snr_limit(adapter, cond):
    """sigma = 1 (zero terminal SNR, alpha_bar = 0): x_vp = x at t = 999 and x0 = -v, finite."""
    x = _latents(adapter)
    last_t = adapter.pipe.scheduler.config.num_train_timesteps - 1
    v = _stock_v(adapter, x, cond["prompt_embeds"], torch.full((2,), last_t))
    x0 = adapter.denoise(x, torch.ones(x.shape[0], x.shape[2]), cond)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0, -v, atol=ATOL, rtol=0)


@torch.no_grad()
def test_clean_frames_are_returned_unchanged(adapter, cond):
    x = _latents(adapter)
    sigma = torch.tensor([[0.9, 0.6, 0.0, 0.0], [0.0, 0.3, 0.5, 0.7]])
    x0 = adapter.denoise(x, sigma, cond)
    torch.testing.assert_close(x0[0, :, 2:], x[0, :, 2:], atol=ATOL, rtol=0)
    torch.testing.assert_close(x0[1, :, :1], x[1, :, :1], atol=ATOL, rtol=0)


# --- (b) the per-frame timestep hook -----------------------------------------------------------------
@torch.no_grad()
def test_forced_per_frame_path_with_uniform_sigma_equals_stock_path(adapter, cond):
    x = _latents(adapter, seed=1)
    sigma = torch.tensor([[0.7], [0.4]]).expand(2, x.shape[2])
    stock = adapter.denoise(x, sigma, cond)
    adapter.force_per_frame_timesteps = True
    try:
        hooked = adapter.denoise(x, sigma, cond)
    finally:
        adapter.force_per_frame_timesteps = False
    assert adapter.model._diffusers_hook.get_hook(PER_FRAME_TIMESTEP_HOOK) is not None  # the hook path ran
    torch.testing.assert_close(hooked, stock, atol=1e-6, rtol=0)


@torch.no_grad()
def test_changing_one_frames_sigma_changes_the_output(adapter, cond):
    x = _latents(adapter, seed=2)
    sigma = torch.tensor([[0.8, 0.6, 0.4, 0.2]]).expand(2, -1).clone()
    base = adapter.denoise(x, sigma, cond)
    for j in range(x.shape[2]):
        changed = sigma.clone()
        changed[:, j] = 0.5 if sigma[0, j] != 0.5 else 0.9
        out = adapter.denoise(x, changed, cond)
        assert (out[:, :, j] - base[:, :, j]).abs().max() > 1e-3, f"frame {j} ignores its own sigma"


def _reference_per_frame_v(model, hidden_states, prompt_embeds, frame_timesteps, rope):
    """Independent reference: the stock model run at the mean timestep, with torch forward hooks that
    redo every adaptive norm's *video* output one frame slice at a time with that frame's embedding."""
    num_frames = hidden_states.shape[1]
    frame_emb = [model.time_embedding(model.time_proj(frame_timesteps[:, f])) for f in range(num_frames)]

    def norm_zero_hook(module, args, output):
        video, _, text, text_gate = output[0], output[2], output[1], output[3]
        hs, enc, _ = args
        n = hs.shape[1] // num_frames
        outs = [
            CogVideoXLayerNormZero.forward(module, hs[:, f * n : (f + 1) * n], enc, frame_emb[f])
            for f in range(num_frames)
        ]
        video = torch.cat([o[0] for o in outs], dim=1)
        gate = torch.cat([o[2].expand(-1, n, -1) for o in outs], dim=1)
        return video, text, gate, text_gate

    def norm_out_hook(module, args, kwargs, output):
        x = args[0]
        n = x.shape[1] // num_frames
        slices = [
            AdaLayerNorm.forward(module, x[:, f * n : (f + 1) * n], temb=frame_emb[f])
            for f in range(num_frames)
        ]
        return torch.cat(slices, dim=1)

    handles = [model.norm_out.register_forward_hook(norm_out_hook, with_kwargs=True)]
    for block in model.transformer_blocks:
        handles += [
            block.norm1.register_forward_hook(norm_zero_hook),
            block.norm2.register_forward_hook(norm_zero_hook),
        ]
    try:
        return model(
            hidden_states=hidden_states,
            encoder_hidden_states=prompt_embeds,
            timestep=frame_timesteps.mean(dim=1),
            image_rotary_emb=rope,
            return_dict=False,
        )[0]
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_per_frame_embeddings_go_to_their_own_frames(adapter, cond):
    """Non-uniform per-frame timesteps against a frame-by-frame reference; fails if frames are permuted."""
    scheduler = adapter.pipe.scheduler
    alphas_cumprod = scheduler.alphas_cumprod.double()
    x = _latents(adapter, seed=3)
    frame_t = torch.tensor([[899, 599, 299, 99], [199, 999, 499, 699]])  # distinct, not symmetric
    ab = alphas_cumprod[frame_t][:, None, :, None, None]  # [B, 1, F, 1, 1]
    sigma = _vp_sigma(ab)
    x_vp = (ab.sqrt() * x.double() / (1 - sigma).clamp_min(1e-12)).float()
    assert ab[1, 0, 1] == 0 and sigma[1, 0, 1] == 1
    x_vp[1, :, 1] = x[1, :, 1]  # t = 999: alpha_bar = 0, the zero-SNR limit of sqrt(ab) / (1 - sigma) is 1
    height, width = x.shape[-2:]
    rope = adapter.pipe._prepare_rotary_positional_embeddings(height * 8, width * 8, x.shape[2], x.device)

    v_ref = _reference_per_frame_v(
        adapter.model, x_vp.permute(0, 2, 1, 3, 4), cond["prompt_embeds"], frame_t.float(), rope
    ).permute(0, 2, 1, 3, 4)
    x0_ref = ab.sqrt().float() * x_vp - (1 - ab).sqrt().float() * v_ref
    x0 = adapter.denoise(x, sigma.reshape(2, -1).float(), cond)
    torch.testing.assert_close(x0, x0_ref, atol=ATOL, rtol=0)

    # The same reference with the frames' embeddings in reversed order must not match.
    v_wrong = _reference_per_frame_v(
        adapter.model, x_vp.permute(0, 2, 1, 3, 4), cond["prompt_embeds"], frame_t.flip(1).float(), rope
    ).permute(0, 2, 1, 3, 4)
    assert (ab.sqrt().float() * x_vp - (1 - ab).sqrt().float() * v_wrong - x0).abs().max() > 1e-2


@torch.no_grad()
def test_hook_is_inert_without_timesteps_and_removable(cond):
    pipe = CogVideoXAdapter.tiny_pipeline(seed=4)
    model = pipe.transformer
    x_vp = torch.randn(2, 4, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    rope = pipe._prepare_rotary_positional_embeddings(32, 48, 4, x_vp.device)
    kwargs = dict(
        hidden_states=x_vp,
        encoder_hidden_states=cond["prompt_embeds"],
        image_rotary_emb=rope,
        return_dict=False,
    )
    t = torch.tensor([500, 250])
    stock = model(timestep=t, **kwargs)[0]

    apply_per_frame_timesteps(model)
    assert apply_per_frame_timesteps(model) is apply_per_frame_timesteps(model)  # idempotent
    assert torch.equal(model(timestep=t, **kwargs)[0], stock)  # inert: no timesteps set
    frame_t = torch.tensor([[900.0, 700.0, 300.0, 10.0], [250.0, 250.0, 250.0, 250.0]])
    with per_frame_timesteps(model, frame_t):
        hooked = model(timestep=t, **kwargs)[0]
    assert (hooked[0] - stock[0]).abs().max() > 1e-3
    torch.testing.assert_close(hooked[1], stock[1], atol=1e-6, rtol=0)  # uniform row = stock row
    assert torch.equal(model(timestep=t, **kwargs)[0], stock)  # the state is cleared after the block

    remove_per_frame_timesteps(model)
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or registry.get_hook(PER_FRAME_TIMESTEP_HOOK) is None
    assert torch.equal(model(timestep=t, **kwargs)[0], stock)
    with pytest.raises(RuntimeError, match="apply_per_frame_timesteps"):
        with per_frame_timesteps(model, frame_t):
            pass


# --- RoPE -----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_rope_matches_the_pipeline_for_any_window_and_is_the_extension_point(adapter):
    rope_module = adapter.rope_module()
    assert rope_module is not None
    config = adapter.rope_config()
    assert config == {
        "temporal_dim": 4,  # head 16 / 4
        "base": 10000.0,
        "train_latent_frames": 4,  # 13 pixel frames
        "train_positions": 4,
        "patch_size_t": 1,
        "attention_head_dim": 16,
    }
    for num_latent_frames, height, width in [(4, 32, 48), (2, 32, 48), (7, 48, 32), (1, 64, 64)]:
        ours = adapter.rotary_embeddings(num_latent_frames, height // 8, width // 8)
        ref = adapter.pipe._prepare_rotary_positional_embeddings(
            height, width, num_latent_frames, torch.device("cpu")
        )
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    # Position interpolation through the buffer changes only the temporal channels.
    base = adapter.rotary_embeddings(6, 4, 6)
    original = rope_module.temporal_inv_freq.clone()
    rope_module.temporal_inv_freq.mul_(0.5)
    try:
        scaled = adapter.rotary_embeddings(6, 4, 6)
    finally:
        rope_module.temporal_inv_freq.copy_(original)
    temporal = config["temporal_dim"]
    assert (scaled[0][:, :temporal] - base[0][:, :temporal]).abs().max() > 1e-2
    assert torch.equal(scaled[0][:, temporal:], base[0][:, temporal:])
    assert [n for n, _ in adapter.temporal_attention_modules()] == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]


# --- (c) encode_prompt -> denoise -> decode -------------------------------------------------------------
@torch.no_grad()
def test_encode_denoise_decode_with_cfg_and_windows(adapter):
    cond, uncond = adapter.encode_prompt(["a red ball", "a cat"], negative_prompt=["dark", "dark"])
    assert cond["prompt_embeds"].shape == (2, 16, 32) and uncond["prompt_embeds"].shape == (2, 16, 32)
    both = cat_conds([cond, uncond])
    x = _latents(adapter, seed=5)
    sigmas = adapter.sigmas(3)
    for i in range(3):
        sigma = sigmas[i].expand(2, x.shape[2])
        x0_cond, x0_uncond = adapter.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        x0 = x0_uncond + 6.0 * (x0_cond - x0_uncond)
        x = ddim_step(x, x0, sigmas[i].view(1, 1, 1, 1, 1), sigmas[i + 1].view(1, 1, 1, 1, 1))
    frames = adapter.decode(x)
    num_latent_frames = x.shape[2]
    assert frames.shape == (2, 4 * (num_latent_frames - 1) + 1, 32, 48, 3)
    assert frames.dtype == torch.float32 and frames.min() >= 0 and frames.max() <= 1
    for f in (1, 2, 3):  # odd and even latent counts keep the causal layout
        assert adapter.decode(x[:, :, :f]).shape[1] == adapter.num_pixel_frames(f)
    # Windows shorter and longer than the native clip, with per-frame levels.
    for f in (2, 3, 7):
        window = _latents(adapter, num_latent_frames=f, seed=6)
        sigma = torch.linspace(0.1, 0.9, f).expand(2, f)
        out = adapter.denoise(window, sigma, cond)
        assert out.shape == window.shape and torch.isfinite(out).all()
    # Latents from encode_video decode back to the frame count they came from.
    video = torch.rand(1, 13, 32, 48, 3, generator=torch.Generator().manual_seed(7))
    assert adapter.encode_video(video).shape == (1, 4, 4, 4, 6)


# --- (d) the VP schedule in flow sigmas -----------------------------------------------------------------
def test_schedule_round_trip_and_ddim_sigmas(adapter):
    scheduler = adapter.pipe.scheduler
    schedule = adapter.schedule
    scheduler.set_timesteps(50)
    t = scheduler.timesteps
    sigma = schedule.timestep_to_sigma(t)
    inner = t < scheduler.config.num_train_timesteps - 1  # alpha_bar > 0 there
    torch.testing.assert_close(
        sigma[inner], _vp_sigma(scheduler.alphas_cumprod.double()[t[inner]]), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(schedule.sigma_to_timestep(sigma), t.double(), atol=1e-6, rtol=0)
    assert torch.equal(adapter.sigma_to_timestep(sigma.float()), t.double())  # float32 sigmas snap back
    torch.testing.assert_close(
        schedule.timestep_to_sigma(schedule.sigma_to_timestep(sigma)), sigma, atol=1e-9, rtol=0
    )
    for num_steps in (1, 10, 50):
        scheduler.set_timesteps(num_steps)
        sigmas = adapter.sigmas(num_steps)
        assert sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
        assert torch.all(sigmas[:-1] > sigmas[1:])
        torch.testing.assert_close(sigmas[:-1], schedule.timestep_to_sigma(scheduler.timesteps).float())
    shifted = adapter.sigmas(10, shift=3.0)
    assert torch.all(shifted[1:-1] > adapter.sigmas(10)[1:-1])


# --- CogVideoX 1.5 temporal patch and image-to-video ---------------------------------------------------
@torch.no_grad()
def test_temporal_patch_pads_odd_windows_and_matches_stock_on_even(cond):
    adapter = CogVideoXAdapter(
        CogVideoXAdapter.tiny_pipeline(seed=8, patch_size_t=2),
        native_video_size=CogVideoXAdapter.tiny_video_size,
    )
    assert adapter.patch_size == (2, 2, 2) and adapter.rope_config()["train_positions"] == 2
    x = _latents(adapter, seed=8)  # 4 latent frames: two token frames
    for num_latent_frames in (2, 4, 6):  # the "slice" RoPE grid of CogVideoX 1.5
        ours = adapter.rotary_embeddings(num_latent_frames, 4, 6)
        ref = adapter.pipe._prepare_rotary_positional_embeddings(
            32, 48, num_latent_frames, torch.device("cpu")
        )
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    scheduler = adapter.pipe.scheduler
    t = torch.tensor([599, 599])
    ab = scheduler.alphas_cumprod.double()[t][:, None, None, None, None]
    sigma = _vp_sigma(ab)
    x_vp = (ab.sqrt() * x.double() / (1 - sigma)).float()
    x0_ref = ab.sqrt().float() * x_vp - (1 - ab).sqrt().float() * _stock_v(
        adapter, x_vp, cond["prompt_embeds"], t
    )
    torch.testing.assert_close(
        adapter.denoise(x, sigma.reshape(2, 1).expand(2, 4).float(), cond), x0_ref, atol=ATOL, rtol=0
    )
    for f in (3, 5):
        window = _latents(adapter, num_latent_frames=f, seed=9)
        out = adapter.denoise(window, torch.linspace(0.2, 0.8, f).expand(2, f), cond)
        assert out.shape == window.shape and torch.isfinite(out).all()


@torch.no_grad()
def test_image_to_video_pipeline_loads_and_uses_the_image(tmp_path):
    CogVideoXAdapter(CogVideoXAdapter.tiny_pipeline(seed=10, image_to_video=True)).save_pretrained(tmp_path)
    adapter = load_adapter(tmp_path)
    assert (
        type(adapter) is CogVideoXAdapter and type(adapter.pipe).__name__ == "CogVideoXImageToVideoPipeline"
    )
    assert adapter.requires_image_condition and adapter.latent_channels == 4
    num_frames, height, width = adapter.native_video_size
    with pytest.raises(ValueError, match="image"):
        adapter.encode_prompt(["a cat"])
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(10))
    outs = []
    for image in images:
        cond, uncond = adapter.encode_prompt(["a cat"], image=image[None], height=height, width=width)
        assert cond["image_latents"].shape == (1, 4, 1, height // 8, width // 8)
        assert torch.equal(uncond["image_latents"], cond["image_latents"])
        x = _latents(adapter, batch_size=1, seed=11)
        outs.append(adapter.denoise(x, torch.full((1, x.shape[2]), 0.6), cond))
    assert outs[0].shape == x.shape and (outs[0] - outs[1]).abs().max() > 1e-3


def test_per_frame_path_trains_with_gradient_checkpointing(cond):
    """Diffusion-forcing training: gradients reach the time MLP through the hooks, checkpointed or not."""
    adapter = CogVideoXAdapter(CogVideoXAdapter.tiny_pipeline(seed=12))
    model = adapter.model
    x = _latents(adapter, seed=12)
    sigma = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.3, 0.7, 0.2, 0.8]])
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.enable_gradient_checkpointing()
        adapter.denoise(x, sigma, cond).square().mean().backward()
        grads.append(model.time_embedding.linear_1.weight.grad.clone())
    assert grads[0].abs().max() > 0 and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_cogvideox15_image_to_video_ofs_embedding_per_frame():
    """CogVideoX 1.5 I2V (temporal patch + ofs embedding): the hook path keeps the ofs term."""
    adapter = CogVideoXAdapter(
        CogVideoXAdapter.tiny_pipeline(seed=13, image_to_video=True, patch_size_t=2),
        native_video_size=CogVideoXAdapter.tiny_video_size,
    )
    assert adapter.model.ofs_embedding is not None
    num_frames, height, width = adapter.native_video_size
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(13))
    cond, _ = adapter.encode_prompt(["a cat", "a dog"], image=image, do_classifier_free_guidance=False)
    x = _latents(adapter, seed=13)
    sigma = torch.tensor([[0.6], [0.3]]).expand(2, x.shape[2])
    stock = adapter.denoise(x, sigma, cond)
    adapter.force_per_frame_timesteps = True
    torch.testing.assert_close(adapter.denoise(x, sigma, cond), stock, atol=1e-6, rtol=0)
    adapter.force_per_frame_timesteps = False
    window = _latents(adapter, num_latent_frames=3, seed=14)
    out = adapter.denoise(window, torch.tensor([[0.2, 0.5, 0.8]]).expand(2, 3), cond)
    assert out.shape == window.shape and torch.isfinite(out).all()
