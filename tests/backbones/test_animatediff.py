"""AnimateDiff adapter: parity with the stock UNetMotionModel and pipeline, per-frame timesteps, VAE."""

import pytest
import torch
from diffusers import DDIMScheduler, UNetMotionModel

from longgen.backbones import TemporalRope, build_tiny, cat_conds, load_adapter
from longgen.backbones.animatediff import AnimateDiffAdapter
from longgen.samplers import sample_full

PROMPT = ["a red ball bouncing on the sea"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("animatediff_tiny")
    build_tiny("animatediff", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(saved):
    return AnimateDiffAdapter.from_pretrained(saved)


@pytest.fixture(scope="module")
def cond(adapter):
    with torch.no_grad():
        return adapter.encode_prompt(PROMPT * 2, do_classifier_free_guidance=False)[0]


def _latents(adapter, seed=0, batch=2, num_frames=None):
    frames, height, width = adapter.native_video_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(
        adapter.latent_shape(num_frames or frames, height, width, batch_size=batch), generator=gen
    )


def _ddim_timesteps(adapter, num_steps):
    sched = DDIMScheduler.from_config(adapter.pipe.scheduler.config)
    sched.set_timesteps(num_steps)
    return sched.timesteps, sched.alphas_cumprod.double()


def _stock_x0(adapter, x, timesteps, ehs):
    """The stock UNet at per-sample integer timesteps, converted to x0 here from the DDPM formulas."""
    ab = adapter.pipe.scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1, 1)  # [B,1,1,1,1]
    s = ((1 - ab) / ab).sqrt()
    sigma = s / (1 + s)  # flow sigma of the integer timestep
    x_vp = (ab.sqrt() * x.double() / (1 - sigma)).float()
    ehs = ehs.repeat_interleave(x.shape[2], dim=0)  # the UNet folds frames into the batch
    with torch.no_grad():
        eps = adapter.model(x_vp, timesteps, encoder_hidden_states=ehs).sample.double()
    return ((x_vp.double() - (1 - ab).sqrt() * eps) / ab.sqrt()).float(), sigma.view(-1).float()


def _zero_motion_modules(adapter):
    """Make every motion module the identity (output = 0 + residual): frames no longer interact."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    count = 0
    for module in adapter.model.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
            count += 1
    assert count == 7


# --- (a) loading and uniform noise levels -----------------------------------------------------
def test_load_adapter_picks_animatediff(saved):
    assert type(load_adapter(saved)) is AnimateDiffAdapter


def test_save_load_gives_animatediff_adapter(adapter):
    assert isinstance(adapter, AnimateDiffAdapter)
    assert isinstance(adapter.model, UNetMotionModel)
    assert adapter.prediction == "eps"
    assert adapter.native_video_size == AnimateDiffAdapter.tiny_video_size == (8, 32, 32)
    assert adapter.latent_shape(8, 32, 32) == (1, 4, 8, 4, 4)
    assert adapter.num_pixel_frames(8) == 8 and adapter.num_latent_frames(13) == 13


def test_uniform_sigma_at_ddim_timesteps_matches_stock_unet(adapter, cond):
    x = _latents(adapter)
    sigmas = adapter.sigmas(10)
    timesteps, _ = _ddim_timesteps(adapter, 10)
    ehs = cond["encoder_hidden_states"]
    for i, j in [(0, 0), (3, 7), (9, 5)]:  # per sample: one DDIM timestep for all its frames
        t = torch.tensor([int(timesteps[i]), int(timesteps[j])])
        ref, sigma_ref = _stock_x0(adapter, x, t, ehs)
        sigma = torch.stack([sigmas[i], sigmas[j]])
        torch.testing.assert_close(sigma, sigma_ref, atol=1e-6, rtol=0)
        with torch.no_grad():
            out = adapter.denoise(x, sigma[:, None].expand(2, x.shape[2]).contiguous(), cond)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_v_prediction_follows_the_scheduler(saved, cond):
    ad = AnimateDiffAdapter.from_pretrained(saved)
    ad.pipe.scheduler = DDIMScheduler.from_config(ad.pipe.scheduler.config, prediction_type="v_prediction")
    ad = AnimateDiffAdapter(ad.pipe, native_video_size=ad.native_video_size)
    assert ad.prediction == "v"
    x = _latents(ad)
    timesteps, ac = _ddim_timesteps(ad, 10)
    t = int(timesteps[4])
    ab = ac[t]
    sigma = float(ad.sigmas(10)[4])
    x_vp = (ab.sqrt() * x.double() / (1 - sigma)).float()
    with torch.no_grad():
        v = ad.model(
            x_vp, t, encoder_hidden_states=cond["encoder_hidden_states"].repeat_interleave(8, 0)
        ).sample
        out = ad.denoise(x, torch.full((2, 8), sigma), cond)
    ref = (ab.sqrt() * x_vp.double() - (1 - ab).sqrt() * v.double()).float()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sigmas_are_the_schedulers_ddim_timesteps(adapter):
    sigmas = adapter.sigmas(25)
    timesteps, ac = _ddim_timesteps(adapter, 25)
    assert sigmas.shape == (26,) and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    s = ((1 - ac[timesteps]) / ac[timesteps]).sqrt()
    torch.testing.assert_close(sigmas[:-1].double(), s / (1 + s), atol=1e-6, rtol=0)
    assert torch.equal(adapter.model_timesteps(sigmas[:-1]), timesteps.double())  # float32 sigmas snap back
    with pytest.raises(ValueError, match="shift"):
        adapter.sigmas(10, shift=3.0)


def test_clean_frames_return_unchanged_and_pure_noise_is_finite(adapter, cond):
    x = _latents(adapter)
    sigma = torch.tensor([[0.0, 0.0, 0.5, 1.0, 0.3, 0.0, 0.9, 1.0]] * 2)
    with torch.no_grad():
        out = adapter.denoise(x, sigma, cond)
    clean = sigma[0] == 0
    assert torch.equal(out[:, :, clean], x[:, :, clean])
    assert torch.isfinite(out).all()
    # above the table (sigma -> 1) the model sees the noise at its top level: x at sigma = 1 is treated
    # as the same model input as sigma_max * x at sigma_max
    top = adapter.schedule.sigma_max
    with torch.no_grad():
        at_one = adapter.denoise(x, torch.ones(2, 8), cond)
        at_top = adapter.denoise(x * top, torch.full((2, 8), top), cond)
    torch.testing.assert_close(at_one, at_top, atol=1e-5, rtol=1e-5)


def test_too_many_frames_for_the_motion_modules_is_a_clear_error(adapter, cond):
    x = _latents(adapter, batch=1, num_frames=33)
    with pytest.raises(ValueError, match="at most 32 latent frames"):
        adapter.denoise(
            x, torch.full((1, 33), 0.5), {"encoder_hidden_states": cond["encoder_hidden_states"][:1]}
        )


# --- (b) per-frame noise levels through the hooks --------------------------------------------
def test_forced_per_frame_path_is_stock_and_hook_removal_restores_it(saved, cond):
    ad = AnimateDiffAdapter.from_pretrained(saved)
    x = _latents(ad)
    sigma = ad.sigmas(10)[[2, 6]][:, None].expand(2, 8).contiguous()
    assert not hasattr(ad.model.time_embedding, "_diffusers_hook")  # uniform calls install nothing
    with torch.no_grad():
        stock = ad.denoise(x, sigma, cond)
        ad.force_per_frame_timesteps = True
        forced = ad.denoise(x, sigma, cond)
        ad.force_per_frame_timesteps = False
        hooked_uniform = ad.denoise(x, sigma, cond)  # hooks installed but inert
        # a non-uniform call, so the hooks hold state when they are removed
        ad.denoise(x, torch.linspace(0.1, 0.9, 8).expand(2, 8).contiguous(), cond)
    assert torch.equal(forced, stock)
    assert torch.equal(hooked_uniform, stock)
    ad.remove_frame_timestep_hooks()
    assert ad.model.time_embedding._diffusers_hook.get_hook("longgen_frame_timesteps") is None
    assert not any(
        getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
        for m in ad.model.modules()
    )
    with torch.no_grad():
        assert torch.equal(ad.denoise(x, sigma, cond), stock)


def test_each_frame_gets_its_own_timestep_embedding(saved, cond):
    """Without motion modules every frame is an image: frame f must equal the stock UNet run at its own
    timestep. A frame given another frame's (or another sample's) embedding would match another reference."""
    ad = AnimateDiffAdapter.from_pretrained(saved)
    _zero_motion_modules(ad)
    x = _latents(ad, batch=2)
    sig = ad.sigmas(10)
    timesteps, _ = _ddim_timesteps(ad, 10)
    levels = [1, 4, 8]
    index = torch.tensor([[0, 1, 2, 0, 1, 2, 2, 0], [2, 2, 1, 0, 0, 1, 0, 1]])  # [B, F] -> level
    sigma = sig[levels][index]
    # references: the stock UNet (no hooks yet) at each level's integer timestep, converted here
    refs = [_stock_x0(ad, x, timesteps[[lv, lv]], cond["encoder_hidden_states"])[0] for lv in levels]
    with torch.no_grad():
        out = ad.denoise(x, sigma, cond)
    for b in range(2):
        for f in range(8):
            own = int(index[b, f])
            torch.testing.assert_close(out[b, :, f], refs[own][b, :, f], atol=1e-5, rtol=1e-5)
            for other in set(range(3)) - {own}:  # the check can tell the levels apart
                assert (out[b, :, f] - refs[other][b, :, f]).abs().max() > 1e-2


def test_per_frame_path_keeps_samples_apart_with_motion_modules(adapter, cond):
    x = _latents(adapter, batch=2)
    sigma = torch.stack([torch.linspace(0.2, 0.9, 8), torch.linspace(0.9, 0.1, 8)])
    with torch.no_grad():
        both = adapter.denoise(x, sigma, cond)
        single = [
            adapter.denoise(
                x[b : b + 1],
                sigma[b : b + 1],
                {"encoder_hidden_states": cond["encoder_hidden_states"][b : b + 1]},
            )
            for b in range(2)
        ]
        # the motion modules do mix frames: changing frame 0's level moves frame 7's prediction
        moved = adapter.denoise(x, torch.cat([sigma[:, :1] * 0.5, sigma[:, 1:]], dim=1), cond)
    torch.testing.assert_close(both, torch.cat(single), atol=1e-5, rtol=1e-5)
    assert (moved[:, :, 7] - both[:, :, 7]).abs().max() > 1e-4


def test_per_frame_gradients_survive_checkpointing_and_later_forwards(saved, cond):
    """Checkpoint recomputation of a per-frame forward uses that forward's embedding, even after another call."""
    x = _latents(AnimateDiffAdapter.from_pretrained(saved), batch=1)
    ehs = {"encoder_hidden_states": cond["encoder_hidden_states"][:1]}
    sigma = torch.linspace(0.2, 0.9, 8)[None]
    grads = []
    for checkpointing in (False, True):
        ad = AnimateDiffAdapter.from_pretrained(saved)
        if checkpointing:
            ad.model.enable_gradient_checkpointing()
        loss = ad.denoise(x, sigma, ehs).square().mean()
        ad.denoise(x, sigma.flip(1), ehs)  # a later forward with other per-frame timesteps
        loss.backward()
        grads.append(ad.model.time_embedding.linear_1.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# --- (c) prompt -> sampling -> frames ----------------------------------------------------------
def test_matches_stock_animatediff_pipeline_with_cfg(saved):
    """longgen's DDIM in flow sigmas (sample_full + x0-space CFG) equals AnimateDiffPipeline's DDIM loop."""
    ad = AnimateDiffAdapter.from_pretrained(saved)
    # "trailing" spacing: the stock DDIM step then lands exactly on the next listed timestep. (With the
    # "linspace" spacing AnimateDiff ships, diffusers' DDIM steps from t to t - 1000 // steps, which is not
    # the next timestep it evaluates; longgen's sampler steps between the listed timesteps.)
    ad.pipe.scheduler = DDIMScheduler.from_config(ad.pipe.scheduler.config, timestep_spacing="trailing")
    steps, guidance = 4, 7.5
    noise = torch.randn(1, 4, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = ad.pipe(
            PROMPT,
            num_frames=8,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise,
            output_type="latent",
        ).frames
        cond, uncond = ad.encode_prompt(PROMPT, do_classifier_free_guidance=True)
        both = cat_conds([uncond, cond])

        def denoise(x, sigma, frame_offset=0):
            x0_u, x0_c = ad.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            return x0_u + guidance * (x0_c - x0_u)

        sigmas = ad.sigmas(steps)
        # sample_full starts at sigmas[0] * noise; the stock loop starts at x_vp = noise = r0 * (that / sigma0)
        r0 = (1 - ad.pipe.scheduler.alphas_cumprod[999].double()).sqrt()
        ours = sample_full(denoise, (noise.double() / r0).float(), sigmas, disable=True)
    scale = stock.abs().max()  # CFG 7.5 on a random tiny UNet gives latents of ~1e2: compare relative to that
    torch.testing.assert_close(ours / scale, stock / scale, atol=1e-5, rtol=0)


def test_prompt_to_frames_and_chunked_decode(adapter):
    with torch.no_grad():
        cond, uncond = adapter.encode_prompt(PROMPT, ["blurry"], do_classifier_free_guidance=True)
        assert cond["encoder_hidden_states"].shape == (1, 32, 32) == uncond["encoder_hidden_states"].shape
        x = _latents(adapter, batch=1)
        latents = sample_full(
            lambda x, s, frame_offset=0: adapter.denoise(x, s, cond), x, adapter.sigmas(3), disable=True
        )
        frames = adapter.decode(latents)
        chunks = list(adapter.iter_decode(latents, chunk_latent_frames=3))
    assert frames.shape == (1, 8, 32, 32, 3) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0
    assert [c.shape[1] for c in chunks] == [3, 3, 2]
    torch.testing.assert_close(torch.cat(chunks, dim=1), frames, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no conditioning image"):
        adapter.encode_prompt(PROMPT, image=torch.zeros(1, 3, 32, 32))


def test_temporal_modules_for_extensions(adapter):
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    attn = adapter.temporal_attention_modules()
    pos = adapter.temporal_position_embeddings()
    # 7 motion modules (2 down, 1 mid, 4 up), one transformer block each with attn1 + attn2
    assert len(attn) == 14 and all(isinstance(m, Attention) and ".motion_modules." in n for n, m in attn)
    assert len(pos) == 7 and all(isinstance(m, SinusoidalPositionalEmbedding) for _, m in pos)
    assert all(adapter.model.get_submodule(n) is m for n, m in attn + pos)
    assert pos[0][1].pe.shape[1] == adapter.max_num_frames() == 32
    assert not isinstance(adapter, TemporalRope) and adapter.default_num_frames == 16  # no RoPE capability
    lora = adapter.motion_lora_target_modules()
    assert len(lora) == 14 * 4 and all(".motion_modules." in n for n in lora)
    assert {n.rsplit(".", 1)[-1] for n in lora} == {"to_q", "to_k", "to_v", "0"}
