"""Training objectives: per-frame noise levels (clip, Diffusion Forcing, AR-Diffusion) and native losses.

Noise levels are flow sigmas per latent frame, ``x = (1 - sigma) x0 + sigma eps`` (longgen's one
convention, :mod:`longgen.schedules`), and every adapter returns ``x0``. Each backbone's *native*
loss is therefore an x0 error with a per-frame weight ``w(sigma)``, derived here once for all models.

With ``s = sigma / (1 - sigma)`` (the variance-exploding level) the VP coefficients of a flow sigma are
``a = sqrt(alpha_bar) = (1 - sigma) / n`` and ``r = sqrt(1 - alpha_bar) = sigma / n`` with
``n = sqrt((1 - sigma)^2 + sigma^2)``, and the VP sample is ``x_vp = x / n = a x0 + r eps``. A model
output ``hat`` of any parameterisation is linear in ``x0_hat`` for fixed x, so its error is a multiple
of the x0 error:

prediction  native target         error in x0 terms          weight w(sigma) on |x0 - x0_hat|^2
----------  --------------------  -------------------------  ----------------------------------
flow        v = eps - x0          (x0 - x0_hat) / sigma      1 / sigma^2
eps         eps                   (a / r) (x0 - x0_hat)      (1 - sigma)^2 / sigma^2 = 1 / s^2
v           v = a eps - r x0      (x0 - x0_hat) / r          n^2 / sigma^2 = 1 / s^2 + 1
edm_v       D(x) = x0 (EDM)       x0 - x0_hat                (s^2 + sd^2) / (s sd)^2, sd = sigma_data

* flow (rectified flow; Wan, HunyuanVideo, LTX, SkyReels-V2): ``x0_hat = x - sigma v_hat`` so
  ``v_hat - v = (x0 - x0_hat) / sigma``.
* eps (DDPM, Ho et al. 2020; AnimateDiff): ``eps_hat = (x_vp - a x0_hat) / r`` so the error is
  ``(a / r)(x0 - x0_hat)``; ``(a / r)^2 = 1 / s^2`` is the SNR (Kingma et al. 2021).
* v (Salimans & Ho 2022; CogVideoX): ``x0 = a x_vp - r v`` so ``v_hat - v = (x0 - x0_hat) / r`` and
  ``1 / r^2 = SNR + 1`` (the weight CogVideoX's training script puts on its x0 loss, ``1 / (1 - alpha_bar)``).
* edm_v (EDM, Karras et al. 2022, Eq. 8 / Table 1; SVD):
  ``lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2`` on the denoiser's x0 error; SVD's
  preconditioning has ``sigma_data = 1``, which makes it equal to the v weight.

The weighted per-frame errors are averaged over channels and pixels, then over frames and the batch,
so the loss equals the native loss's plain mean over all elements exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..plans import sample_independent_timesteps, sample_nondecreasing_timesteps
from ..schedules import VPSchedule, shift_sigma

__all__ = ["MODES", "WEIGHTINGS", "loss_weights", "sample_training_sigmas", "training_loss"]

MODES = ("clip", "diffusion_forcing", "ar_diffusion")
WEIGHTINGS = ("native", "none", "flow", "eps", "v", "edm_v")


def sample_training_sigmas(
    batch_size: int,
    num_latent_frames: int,
    mode: str,
    *,
    causal_block_size: int = 1,
    num_timesteps: int = 1000,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    schedule: VPSchedule | None = None,
) -> torch.Tensor:
    """Per-frame flow sigmas ``[B, F]`` in (0, 1] for one training batch.

    Integer timesteps ``t`` uniform in ``[0, num_timesteps)`` are drawn per ``mode``:

    * ``clip``: one level for the whole clip (standard video diffusion training);
    * ``diffusion_forcing``: an independent level per causal block of ``causal_block_size`` latent frames
      (Diffusion Forcing, Chen et al. 2024; SkyReels-V2 trains with blocks);
    * ``ar_diffusion``: non-decreasing levels along the frames, uniform over all such sequences
      (AR-Diffusion, Sun et al. 2025), per block when ``causal_block_size > 1``.

    Then ``sigma = (t + 1) / num_timesteps`` (never 0), shifted by SD3's timestep shift (Esser et al.
    2024, Eq. 23) when ``shift != 1``, as Wan's training does. For a variance-preserving model
    (AnimateDiff, CogVideoX) pass its ``schedule`` (``adapter.schedule``) to draw its own discrete
    timesteps instead: ``sigma`` is then the schedule's level at ``t``. The shift keeps levels
    monotone in ``t``, so ``ar_diffusion``'s ordering and the block structure survive it.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if shift <= 0:
        raise ValueError(f"shift must be positive (1 = no shift), got {shift}")
    if causal_block_size < 1:
        raise ValueError(f"causal_block_size must be >= 1, got {causal_block_size}")
    if schedule is not None:
        num_timesteps = schedule.num_train_timesteps
    if mode == "clip":
        t = sample_independent_timesteps(
            batch_size,
            num_latent_frames,
            num_timesteps,
            causal_block_size=num_latent_frames,
            generator=generator,
        )
    elif mode == "diffusion_forcing":
        t = sample_independent_timesteps(
            batch_size,
            num_latent_frames,
            num_timesteps,
            causal_block_size=causal_block_size,
            generator=generator,
        )
    else:
        num_blocks = math.ceil(num_latent_frames / causal_block_size)
        t = sample_nondecreasing_timesteps(batch_size, num_blocks, num_timesteps, generator=generator)
        t = t.repeat_interleave(causal_block_size, dim=1)[:, :num_latent_frames]  # [B, F]
    if schedule is not None:
        sigma = schedule.timestep_to_sigma(t.double())
    else:
        sigma = (t.double() + 1.0) / num_timesteps
    if shift != 1.0:
        sigma = shift_sigma(sigma, shift)
    return sigma.float().to(device or t.device)


def loss_weights(prediction: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Per-frame weight ``w(sigma)`` that turns the x0 squared error into a native loss (module table).

    ``prediction`` is ``flow``, ``eps``, ``v``, ``edm_v`` or ``none`` (weight 1). ``sigma`` must lie in
    (0, 1); computed in float64.
    """
    s64 = sigma.double()
    if prediction == "none":
        return torch.ones_like(s64)
    if prediction == "flow":
        return 1.0 / s64**2
    if prediction == "eps":
        return ((1.0 - s64) / s64) ** 2
    if prediction == "v":
        return ((1.0 - s64) ** 2 + s64**2) / s64**2
    if prediction == "edm_v":
        s = s64 / (1.0 - s64)
        return (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    raise ValueError(f"unknown prediction/weighting {prediction!r}: use one of {WEIGHTINGS}")


def training_loss(
    adapter,
    latents: torch.Tensor,
    cond: dict[str, Any],
    sigma: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    weighting: str = "native",
    min_sigma: float = 1e-3,
    max_sigma: float = 1.0 - 1e-4,
    denoise=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The backbone's native denoising loss at per-frame noise levels, through ``adapter.denoise``.

    ``latents`` ``[B, C, F, H, W]`` are clean model latents (``adapter.encode_video`` or the latent
    cache), ``sigma`` ``[B, F]`` flow sigmas (:func:`sample_training_sigmas`), ``noise`` like
    ``latents`` (drawn from ``generator`` when None). ``x = (1 - sigma) x0 + sigma eps`` per frame, then
    ``x0_hat = adapter.denoise(x, sigma, cond)`` and

        loss = mean_{b, f} w(sigma_bf) * mean_{c, h, w} (x0 - x0_hat)^2

    with ``w`` of ``adapter.prediction`` (``weighting="native"``, see the module table), a named
    parameterisation (``"flow"``, ``"eps"``, ``"v"``, ``"edm_v"``) or ``"none"`` (plain x0 MSE). Sigmas
    are clamped into ``[min_sigma, max_sigma]`` for both the noising and the weight: the weights grow
    like ``1 / sigma^2`` near 0, and at ``sigma = 1`` a VP model's x0 is undefined.

    Returns ``(loss, info)``; ``info`` holds detached ``loss_per_frame`` ``[B, F]``, ``x0_mse_per_frame``
    ``[B, F]``, ``weight`` ``[B, F]`` and the clamped ``sigma``. The loss is float32 whatever the model
    dtype, and differentiable in the model's parameters.

    ``denoise`` is the model call ``(x, sigma, cond) -> x0_hat``; None is ``adapter.denoise``. The trainer
    passes its prepared :class:`~longgen.training.denoiser.DenoiserModule` (DDP / FSDP / DeepSpeed wrapped),
    so no adapter attribute is replaced for training.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(latents.shape)}")
    batch_size, _, num_latent_frames = latents.shape[:3]
    if tuple(sigma.shape) != (batch_size, num_latent_frames):
        raise ValueError(
            f"sigma must hold one level per latent frame, shape {(batch_size, num_latent_frames)}; "
            f"got {tuple(sigma.shape)}"
        )
    if not 0.0 < min_sigma < max_sigma <= 1.0:
        raise ValueError(f"need 0 < min_sigma < max_sigma <= 1, got {min_sigma}, {max_sigma}")
    prediction = adapter.prediction if weighting == "native" else weighting
    if prediction not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    x0 = latents.float()
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32)
    elif noise.shape != latents.shape:
        raise ValueError(
            f"noise must be shaped like latents {tuple(latents.shape)}, got {tuple(noise.shape)}"
        )
    noise = noise.to(device=x0.device, dtype=torch.float32)
    sigma = sigma.detach().to(device=x0.device, dtype=torch.float32).clamp(min_sigma, max_sigma)
    s5 = sigma[:, None, :, None, None]  # [B, 1, F, 1, 1]
    x = (1.0 - s5) * x0 + s5 * noise

    x0_pred = (adapter.denoise if denoise is None else denoise)(x, sigma, cond).float()
    x0_mse = (x0_pred - x0).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    weight = loss_weights(prediction, sigma, float(adapter.sigma_data)).float()
    per_frame = weight * x0_mse
    loss = per_frame.mean()
    info = {
        "loss_per_frame": per_frame.detach(),
        "x0_mse_per_frame": x0_mse.detach(),
        "weight": weight,
        "sigma": sigma,
    }
    return loss, info
