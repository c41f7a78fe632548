"""Training objectives: per-frame noise-level samplers and native losses expressed in x0 error."""

from __future__ import annotations

import pytest
import torch

from longgen.backbones import build_tiny
from longgen.backbones.base import per_frame_to_tokens
from longgen.schedules import shift_sigma
from longgen.training.objectives import loss_weights, sample_training_sigmas, training_loss


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# noise-level samplers
# ------------------------------------------------------------------------------------------------
def test_clip_mode_is_one_uniform_level_per_clip():
    sigma = sample_training_sigmas(4000, 6, "clip", num_timesteps=100, generator=_gen())
    assert sigma.shape == (4000, 6) and sigma.dtype == torch.float32
    assert torch.equal(sigma, sigma[:, :1].expand_as(sigma))
    levels = torch.round(sigma[:, 0] * 100)
    assert torch.allclose(sigma[:, 0], levels / 100) and levels.min() == 1 and levels.max() == 100
    counts = torch.bincount(levels.long() - 1, minlength=100).float()
    assert counts.std() / counts.mean() < 0.3  # uniform over the 100 levels
    assert float(sigma.min()) > 0 and float(sigma.max()) <= 1


def test_diffusion_forcing_levels_are_independent_per_causal_block():
    sigma = sample_training_sigmas(500, 8, "diffusion_forcing", causal_block_size=3, generator=_gen(1))
    for lo, hi in ((0, 3), (3, 6), (6, 8)):
        block = sigma[:, lo:hi]
        assert torch.equal(block, block[:, :1].expand_as(block))
    firsts = sigma[:, [0, 3, 6]]
    assert (firsts[:, 0] != firsts[:, 1]).float().mean() > 0.95  # blocks are drawn independently
    corr = torch.corrcoef(firsts.T)[0, 1]
    assert abs(float(corr)) < 0.15
    per_frame = sample_training_sigmas(200, 5, "diffusion_forcing", generator=_gen(2))
    assert (per_frame[:, 1:] != per_frame[:, :-1]).float().mean() > 0.9


def test_clip_share_mixes_whole_clip_levels_into_diffusion_forcing():
    sigma = sample_training_sigmas(4000, 6, "diffusion_forcing", clip_share=0.3, generator=_gen(7))
    whole = (sigma == sigma[:, :1]).all(dim=1)
    assert abs(float(whole.float().mean()) - 0.3) < 0.03  # ~30% of the clips: one level for every frame
    rest = sigma[~whole]
    assert (rest[:, 1:] != rest[:, :-1]).float().mean() > 0.9  # the others keep per-frame levels
    levels = torch.round(sigma[whole][:, 0] * 1000)
    assert levels.min() < 100 and levels.max() > 900  # whole-clip levels span the schedule
    # 0 draws nothing extra: the per-frame draw alone, and the generator left where that draw leaves it
    from longgen.plans import sample_independent_timesteps

    g_share, g_plain = _gen(8), _gen(8)
    plain = sample_training_sigmas(8, 6, "diffusion_forcing", clip_share=0.0, generator=g_share)
    t = sample_independent_timesteps(8, 6, 1000, causal_block_size=1, generator=g_plain)
    assert torch.equal(plain, ((t.double() + 1.0) / 1000).float())
    assert torch.equal(g_share.get_state(), g_plain.get_state())
    assert (sample_training_sigmas(50, 6, "ar_diffusion", clip_share=1.0, generator=_gen(9))
            == sample_training_sigmas(50, 6, "ar_diffusion", clip_share=1.0, generator=_gen(9))[:, :1]).all()
    with pytest.raises(ValueError, match="clip_share"):
        sample_training_sigmas(2, 6, "diffusion_forcing", clip_share=1.5)


def test_clip_share_config_is_checked():
    from longgen.training.config import load_config

    assert load_config(None, ["model.tiny=wan", "objective.clip_share=0.5"]).objective.clip_share == 0.5
    with pytest.raises(ValueError, match="mode=clip every clip"):
        load_config(None, ["model.tiny=wan", "objective.mode=clip", "objective.clip_share=0.5"])
    with pytest.raises(ValueError, match=r"clip_share is a probability"):
        load_config(None, ["model.tiny=wan", "objective.clip_share=2"])


def test_ar_diffusion_levels_never_decrease_along_frames():
    sigma = sample_training_sigmas(500, 7, "ar_diffusion", num_timesteps=50, generator=_gen(3))
    assert (sigma[:, 1:] >= sigma[:, :-1]).all()
    assert (sigma[:, -1] > sigma[:, 0]).float().mean() > 0.9  # not one level per clip
    blocks = sample_training_sigmas(300, 8, "ar_diffusion", causal_block_size=2, generator=_gen(4))
    assert (blocks[:, 1:] >= blocks[:, :-1]).all()
    assert torch.equal(blocks[:, 0::2], blocks[:, 1::2])


def test_shift_and_schedule_and_determinism():
    plain = sample_training_sigmas(16, 5, "diffusion_forcing", generator=_gen(5))
    again = sample_training_sigmas(16, 5, "diffusion_forcing", generator=_gen(5))
    shifted = sample_training_sigmas(16, 5, "diffusion_forcing", shift=3.0, generator=_gen(5))
    assert torch.equal(plain, again)
    assert torch.allclose(shifted, shift_sigma(plain.double(), 3.0).float(), atol=1e-6)
    assert (shifted >= plain).all()
    adapter = build_tiny("animatediff")
    vp = sample_training_sigmas(16, 5, "ar_diffusion", generator=_gen(6), schedule=adapter.schedule)
    t = adapter.schedule.sigma_to_timestep(vp.double())
    assert torch.allclose(t, t.round(), atol=1e-3)  # the schedule's own discrete levels
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_training_sigmas(1, 2, "fifo")


# ------------------------------------------------------------------------------------------------
# native losses through the x0 contract vs. the native target computed directly
# ------------------------------------------------------------------------------------------------
def test_flow_loss_equals_velocity_mse_wan():
    torch.manual_seed(0)
    adapter = build_tiny("wan")
    cond, _ = adapter.encode_prompt(["a red ball", "a blue cat"], do_classifier_free_guidance=False)
    x0 = torch.randn(2, adapter.latent_channels, 3, 4, 4)
    eps = torch.randn_like(x0)
    sigma = torch.tensor([[0.2, 0.5, 0.9], [0.7, 0.3, 0.05]])
    loss, info = training_loss(adapter, x0, cond, sigma, eps)

    s5 = sigma[:, None, :, None, None]
    x = (1 - s5) * x0 + s5 * eps
    timestep = per_frame_to_tokens(sigma * 1000, 2 * 2)  # [B, F * tokens per frame]
    v_hat = adapter.model(
        hidden_states=x,
        timestep=timestep,
        encoder_hidden_states=cond["encoder_hidden_states"],
        return_dict=False,
    )[0]
    native = (v_hat - (eps - x0)).pow(2).mean()
    torch.testing.assert_close(loss, native, rtol=1e-5, atol=0)
    per_frame = (v_hat - (eps - x0)).pow(2).mean(dim=(1, 3, 4))
    torch.testing.assert_close(info["loss_per_frame"], per_frame.detach(), rtol=1e-5, atol=0)

    plain, _ = training_loss(adapter, x0, cond, sigma, eps, weighting="none")
    x0_hat = adapter.denoise(x, sigma, cond)
    torch.testing.assert_close(plain, (x0_hat - x0).pow(2).mean(), rtol=1e-5, atol=0)

    adapter.model.zero_grad()
    loss.backward()
    grads = [p.grad for p in adapter.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert adapter.model.proj_out.weight.grad.abs().sum() > 0
    assert sum(float(g.abs().sum() > 0) for g in grads) > 0.8 * len(grads)


def test_eps_loss_equals_eps_mse_animatediff():
    torch.manual_seed(1)
    adapter = build_tiny("animatediff")
    scheduler = adapter.pipe.scheduler
    cond, _ = adapter.encode_prompt(["a red ball", "a cat"], do_classifier_free_guidance=False)
    num_frames = 4
    x0 = torch.randn(2, 4, num_frames, 4, 4)
    eps = torch.randn_like(x0)
    t = torch.tensor([100, 600])
    sigma = adapter.schedule.timestep_to_sigma(t).float()[:, None].expand(2, num_frames)
    loss, _ = training_loss(adapter, x0, cond, sigma, eps)

    x_vp = scheduler.add_noise(x0, eps, t)  # the diffusers scheduler's own forward process
    ehs = cond["encoder_hidden_states"].repeat_interleave(num_frames, dim=0)  # [B * F, L, D]
    eps_hat = adapter.model(x_vp, t, encoder_hidden_states=ehs, return_dict=False)[0]
    native = (eps_hat - eps).pow(2).mean()
    torch.testing.assert_close(loss, native, rtol=2e-5, atol=0)

    adapter.model.zero_grad()
    loss.backward()
    assert adapter.model.conv_out.weight.grad.abs().sum() > 0


def test_v_loss_equals_v_mse_cogvideox():
    torch.manual_seed(2)
    adapter = build_tiny("cogvideox")
    scheduler = adapter.pipe.scheduler
    cond, _ = adapter.encode_prompt(["a red ball", "a cat"], do_classifier_free_guidance=False)
    num_latent_frames, height, width = 4, 4, 6
    x0 = torch.randn(2, adapter.latent_channels, num_latent_frames, height, width)
    eps = torch.randn_like(x0)
    t = torch.tensor([50, 700])
    sigma = adapter.schedule.timestep_to_sigma(t).float()[:, None].expand(2, num_latent_frames)
    loss, _ = training_loss(adapter, x0, cond, sigma, eps)

    x_vp = scheduler.add_noise(x0, eps, t)
    v_target = scheduler.get_velocity(x0, eps, t)
    v_hat = adapter.model(
        hidden_states=x_vp.permute(0, 2, 1, 3, 4),  # [B, F, C, H, W]
        encoder_hidden_states=cond["prompt_embeds"],
        timestep=t,
        image_rotary_emb=adapter.rotary_embeddings(num_latent_frames, height, width),
        return_dict=False,
    )[0].permute(0, 2, 1, 3, 4)
    native = (v_hat - v_target).pow(2).mean()
    torch.testing.assert_close(loss, native, rtol=2e-5, atol=0)

    adapter.model.zero_grad()
    loss.backward()
    assert adapter.model.proj_out.weight.grad.abs().sum() > 0


def test_edm_loss_equals_preconditioned_target_mse_svd():
    torch.manual_seed(3)
    adapter = build_tiny("svd")
    cond, _ = adapter.encode_prompt(
        [], image=torch.rand(2, 3, 32, 32), do_classifier_free_guidance=False, height=32, width=32
    )
    num_frames = adapter.native_video_size[0]
    x0 = torch.randn(2, 4, num_frames, 4, 4)
    eps = torch.randn_like(x0)
    sigma = torch.tensor([0.3, 0.8])[:, None].expand(2, num_frames)
    loss, _ = training_loss(adapter, x0, cond, sigma, eps)

    # EDM (Karras et al. 2022, Eq. 8): F's target is (x0 - c_skip x_edm) / c_out, unit weight.
    s = (sigma / (1 - sigma))[:, None, :, None, None].double()
    x_edm = (x0 + s * eps).double()
    var = s * s + 1
    c_skip, c_out, c_in = 1 / var, -s / var.sqrt(), 1 / var.sqrt()
    sample = torch.cat(
        [
            (c_in * x_edm).float().permute(0, 2, 1, 3, 4),
            cond["image_latents"][:, None].expand(-1, num_frames, -1, -1, -1),
        ],
        dim=2,
    )
    f_hat = adapter.model(
        sample,
        (0.25 * s.log()).float().flatten()[::num_frames],
        encoder_hidden_states=cond["encoder_hidden_states"],
        added_time_ids=cond["added_time_ids"],
        return_dict=False,
    )[0].permute(0, 2, 1, 3, 4)
    f_target = (x0.double() - c_skip * x_edm) / c_out
    native = (f_hat.double() - f_target).pow(2).mean().float()
    torch.testing.assert_close(loss, native, rtol=1e-4, atol=0)


def test_loss_weights_match_the_derivation():
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    s = sigma / (1 - sigma)
    torch.testing.assert_close(loss_weights("flow", sigma), 1 / sigma**2)
    torch.testing.assert_close(loss_weights("eps", sigma), 1 / s**2)  # SNR
    torch.testing.assert_close(loss_weights("v", sigma), 1 / s**2 + 1)  # SNR + 1
    torch.testing.assert_close(loss_weights("edm_v", sigma, sigma_data=0.5), (s**2 + 0.25) / (0.5 * s) ** 2)
    with pytest.raises(ValueError, match="weighting must be one of"):
        training_loss(None, torch.zeros(1, 1, 1, 1, 1), {}, torch.full((1, 1), 0.5), weighting="x0")
