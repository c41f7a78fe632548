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

**Given (conditioning) frames.** A frame the model is given rather than asked to generate sits at noise
level 0 in the per-frame contract (DESIGN.md "Given frames are part of the contract"): it is fed clean
(or at a small ``given_sigma``), and its loss term is dropped, so the model learns continuation, bridges
and backward prediction from the frames beside it. :func:`sample_given_frames` draws which frames are given
per clip: MCVD's random masking of past and future frames (Voleti et al. 2022: past / future / both /
neither) and SEINE's first- and last-frame masks (Chen et al. 2023), in latent frames.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..plans import sample_independent_timesteps, sample_nondecreasing_timesteps
from ..schedules import VPSchedule, shift_sigma

__all__ = [
    "CONDITIONING_TASKS",
    "MODES",
    "WEIGHTINGS",
    "check_conditioning_tasks",
    "loss_weights",
    "sample_given_frames",
    "sample_training_sigmas",
    "training_loss",
]

MODES = ("clip", "diffusion_forcing", "ar_diffusion")
WEIGHTINGS = ("native", "none", "flow", "eps", "v", "edm_v")
CONDITIONING_TASKS = ("none", "past", "future", "past_future", "first", "first_last")
"""Which latent frames of a clip are given (:func:`sample_given_frames`):

* ``none``: no frame (plain generation; keeps the unconditioned skill);
* ``past``: the first k frames (continuation; MCVD's future-prediction mask);
* ``future``: the last k frames (what leads up to an ending; MCVD's past-prediction mask);
* ``past_future``: the first k1 and the last k2 frames (bridge / interpolation; MCVD with both masked);
* ``first``: the first frame only (SEINE's image-to-video mask);
* ``first_last``: the first and the last frame (SEINE's transition mask).

k, k1, k2 are uniform in ``[min_context, max_context]``, capped so that at least one frame is generated.
MCVD's independent past / future masking with probability p is ``{none: (1-p)^2, past: p(1-p),
future: p(1-p), past_future: p^2}``.
"""


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
    clip_share: float = 0.0,
) -> torch.Tensor:
    """Per-frame flow sigmas ``[B, F]`` in (0, 1] for one training batch.

    Integer timesteps ``t`` uniform in ``[0, num_timesteps)`` are drawn per ``mode``:

    * ``clip``: one level for the whole clip (standard video diffusion training);
    * ``diffusion_forcing``: an independent level per causal block of ``causal_block_size`` latent frames
      (Diffusion Forcing, Chen et al. 2024; SkyReels-V2 trains with blocks);
    * ``ar_diffusion``: non-decreasing levels along the frames, uniform over all such sequences
      (AR-Diffusion, Sun et al. 2025), per block when ``causal_block_size > 1``.

    With ``clip_share`` > 0 (per-frame modes), each clip of the batch is instead drawn as ``clip`` (one level
    for every frame) with that probability: a diffusion-forcing model then also learns the all-frames-equally-
    noisy case that full-clip samplers (``full``, ``sliding``, ``fifo``) start from, where no cleaner neighbour
    exists to copy from and the frames must agree on one layout from noise alone (SkyReels-V2 likewise starts
    diffusion forcing from a model trained with synchronous noise). 0 draws nothing extra from ``generator``.

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
    if not 0.0 <= clip_share <= 1.0:
        raise ValueError(f"clip_share is a probability in [0, 1], got {clip_share}")
    if clip_share > 0 and mode != "clip":
        as_clip = torch.rand(batch_size, generator=generator, device=t.device) < clip_share
        one = sample_independent_timesteps(batch_size, num_latent_frames, num_timesteps,
                                           causal_block_size=num_latent_frames, generator=generator)
        t = torch.where(as_clip[:, None], one.to(t.device), t)
    if schedule is not None:
        sigma = schedule.timestep_to_sigma(t.double())
    else:
        sigma = (t.double() + 1.0) / num_timesteps
    if shift != 1.0:
        sigma = shift_sigma(sigma, shift)
    return sigma.float().to(device or t.device)


def _min_frames(task: str, min_context: int) -> int:
    """Latent frames a clip needs for ``task`` (its given frames plus one to generate)."""
    given = {"none": 0, "past": min_context, "future": min_context, "past_future": 2 * min_context,
             "first": 1, "first_last": 2}[task]
    return given + 1


def check_conditioning_tasks(
    tasks: dict[str, float], num_latent_frames: int | None = None, *, min_context: int = 1
) -> None:
    """Raise ``ValueError`` naming the fix for unknown task names, bad probabilities or too short clips."""
    import difflib

    if not tasks:
        raise ValueError(f"conditioning tasks are empty: give probabilities for some of {CONDITIONING_TASKS}")
    for name, prob in tasks.items():
        if name not in CONDITIONING_TASKS:
            close = difflib.get_close_matches(str(name), CONDITIONING_TASKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown conditioning task {name!r}{hint} choose from {list(CONDITIONING_TASKS)}")
        if not (isinstance(prob, (int, float)) and math.isfinite(prob) and 0.0 <= prob <= 1.0):
            raise ValueError(f"conditioning task {name!r} has probability {prob!r}; it must be in [0, 1]")
    total = float(sum(tasks.values()))
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"conditioning task probabilities must sum to 1, got {total:g}"
            + (f" (add none: {1.0 - total:g} to train the other clips without given frames)" if total < 1 else "")
        )
    if min_context < 1:
        raise ValueError(f"the minimum context must be >= 1 latent frame, got {min_context}")
    if num_latent_frames is not None:
        for name, prob in tasks.items():
            need = _min_frames(name, min_context)
            if prob > 0 and num_latent_frames < need:
                raise ValueError(
                    f"conditioning task {name!r} needs clips of >= {need} latent frames (given frames plus one "
                    f"to generate), the training clips have {num_latent_frames}: use longer clips "
                    "(data.num_frames) or a smaller min_context_latent_frames, or drop the task"
                )


def sample_given_frames(
    batch_size: int,
    num_latent_frames: int,
    tasks: dict[str, float],
    *,
    min_context: int = 1,
    max_context: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which latent frames each clip is given: a bool mask ``[B, F]`` (True = given, kept out of the loss).

    Each clip draws one task of ``tasks`` (name -> probability, :data:`CONDITIONING_TASKS`), then its
    context lengths uniformly in ``[min_context, max_context]`` (None: as many as leave one frame to
    generate). Draws come from ``generator`` on the CPU, so a seeded step gives the same masks on every
    process of a context-parallel group.
    """
    check_conditioning_tasks(tasks, num_latent_frames, min_context=min_context)
    if max_context is not None and max_context < min_context:
        raise ValueError(f"max_context ({max_context}) must be >= min_context ({min_context}) or None")
    names = [name for name, prob in tasks.items() if prob > 0]
    probs = torch.tensor([float(tasks[name]) for name in names], dtype=torch.float64)
    choice = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    uniform = torch.rand(batch_size, 2, generator=generator, dtype=torch.float64)
    given = torch.zeros(batch_size, num_latent_frames, dtype=torch.bool)
    for b in range(batch_size):
        task = names[int(choice[b])]
        if task in ("first", "first_last"):
            given[b, 0] = True
            given[b, -1] = task == "first_last"
            continue
        if task == "none":
            continue
        sides = 2 if task == "past_future" else 1
        cap = (num_latent_frames - 1) // sides  # leave >= 1 frame to generate
        hi = cap if max_context is None else min(cap, max_context)
        lengths = [min_context + int(u * (hi - min_context + 1)) for u in uniform[b, :sides].tolist()]
        if task in ("past", "past_future"):
            given[b, : lengths[0]] = True
        if task in ("future", "past_future"):
            given[b, num_latent_frames - lengths[-1] :] = True
    return given


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
    given: torch.Tensor | None = None,
    given_sigma: float = 0.0,
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

    ``given`` ``[B, F]`` (bool, :func:`sample_given_frames`) marks conditioning frames: they are fed at
    ``given_sigma`` (0: exactly clean, ``x = x0``; not clamped) with that level as their sigma, and their
    loss terms are dropped, so the loss is the mean over the generated frames only,
    ``sum_{b, f not given} w * mse / #generated``. ``info["given"]`` holds the mask.
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
    weight = loss_weights(prediction, sigma, float(adapter.sigma_data)).float()
    if given is not None:
        given = _check_given(given, batch_size, num_latent_frames, given_sigma).to(x0.device)
        sigma = torch.where(given, torch.full_like(sigma, given_sigma), sigma)  # given frames: not clamped
        weight = torch.where(given, torch.zeros_like(weight), weight)
    s5 = sigma[:, None, :, None, None]  # [B, 1, F, 1, 1]
    x = (1.0 - s5) * x0 + s5 * noise  # a given frame at sigma 0 is x0 exactly

    x0_pred = (adapter.denoise if denoise is None else denoise)(x, sigma, cond).float()
    x0_mse = (x0_pred - x0).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    per_frame = weight * x0_mse
    if given is None:
        loss = per_frame.mean()
    else:  # the mean over generated frames; given ones carry weight 0 (where, so no 0 * inf)
        per_frame = torch.where(given, torch.zeros_like(per_frame), per_frame)
        loss = per_frame.sum() / (~given).sum()
    info = {
        "loss_per_frame": per_frame.detach(),
        "x0_mse_per_frame": x0_mse.detach(),
        "weight": weight,
        "sigma": sigma,
    }
    if given is not None:
        info["given"] = given
    return loss, info


def _check_given(given: torch.Tensor, batch_size: int, num_latent_frames: int, given_sigma: float) -> torch.Tensor:
    if given.dtype != torch.bool or tuple(given.shape) != (batch_size, num_latent_frames):
        raise ValueError(
            f"given must be a bool mask of shape {(batch_size, num_latent_frames)} (True = given frame), "
            f"got {given.dtype} {tuple(given.shape)}"
        )
    if bool(given.all(dim=1).any()):
        raise ValueError("a clip has every frame given: leave at least one latent frame to generate")
    if not 0.0 <= given_sigma < 1.0:
        raise ValueError(f"given_sigma must be in [0, 1) (0 = clean given frames), got {given_sigma}")
    return given
