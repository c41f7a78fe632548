"""Sliding temporal windows with overlap fusion."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from tqdm.auto import trange

from .base import Denoiser, FrameConditioning, WindowBatcher, fusion_weights, repaint_step, window_starts


def sample_sliding(
    denoise: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    window: int,
    stride: int,
    weighting: str = "pyramid",
    eta: float = 0.0,
    window_batch: int | None = None,
    generator: torch.Generator | None = None,
    conditioning: FrameConditioning | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Temporal MultiDiffusion (Bar-Tal et al. 2023, Eq. 5) with FreeNoise's pyramid weights.

    At every step each window of ``window`` latent frames (every ``stride`` frames, plus a tail window
    ending at the last frame) is denoised on its own, the windows' x0 predictions are averaged per frame
    with ``weighting`` weights, and one DDIM step is taken for the whole clip. The model only ever sees
    clips of its native length; compute grows linearly with the clip. With one window covering the
    clip this is exactly :func:`~longgen.samplers.full.sample_full`. ``eta > 0``: stochastic DDIM with noise
    from ``generator`` (:func:`~longgen.samplers.base.ddim_eta_step`). The windows of a step are independent:
    ``window_batch`` of them run as one batched model call (:class:`~longgen.samplers.base.WindowBatcher`;
    None: from free memory on CUDA, 1 on CPU), the same result to float tolerance.

    ``conditioning`` (:class:`~longgen.conditioning.FrameConditioning`): given frames kept by per-step
    replacement on the whole clip before the windows see it, and the fused x0 clamped to them (RePaint,
    :func:`~longgen.samplers.base.repaint_step`); the result equals the given latents where they are given.
    """
    sigmas = sigmas.to(noise.device, torch.float32)
    batch, _, num_latent_frames = noise.shape[:3]
    starts = window_starts(num_latent_frames, window, stride)
    w = fusion_weights(window, weighting).to(noise.device).view(1, 1, window, 1, 1)
    x = noise * sigmas[0]
    batcher = WindowBatcher(denoise, window_batch)
    given = conditioning.to(noise.device).window(0, num_latent_frames) if conditioning is not None else None
    resample = conditioning.resample if conditioning is not None else 1

    def fused_x0(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        if len(starts) == 1:  # one window covers the clip: no fusion, exactly plain sampling
            return denoise(x, levels[:, :window])
        acc = torch.zeros_like(x)
        norm = torch.zeros(1, 1, num_latent_frames, 1, 1, device=x.device)
        x0s = batcher(
            [x[:, :, s : s + window] for s in starts], [levels[:, s : s + window] for s in starts], starts
        )
        for start, x0_window in zip(starts, x0s):  # fused in window order, as sequential sampling does
            sl = slice(start, start + window)
            acc[:, :, sl] += w * x0_window
            norm[:, :, sl] += w
        return acc / norm

    for i in trange(len(sigmas) - 1, disable=disable, desc="denoising (sliding)", leave=False):
        sigma = sigmas[i].expand(batch, num_latent_frames)
        levels = given.levels(sigma) if given is not None else sigma
        x, x0, _ = repaint_step(
            x, sigmas[i], sigmas[i + 1], partial(fused_x0, levels=levels), given, resample, eta, generator
        )
        if callback is not None:
            callback({"i": i, "x": x, "x0": x0, "sigma": sigmas[i]})
    return given.clamp(x) if given is not None else x
