"""Sliding temporal windows with overlap fusion."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import trange

from .base import Denoiser, WindowBatcher, ddim_eta_step, fusion_weights, window_starts


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
    """
    sigmas = sigmas.to(noise.device, torch.float32)
    batch, _, num_latent_frames = noise.shape[:3]
    starts = window_starts(num_latent_frames, window, stride)
    w = fusion_weights(window, weighting).to(noise.device).view(1, 1, window, 1, 1)
    x = noise * sigmas[0]
    batcher = WindowBatcher(denoise, window_batch)
    for i in trange(len(sigmas) - 1, disable=disable, desc="denoising (sliding)", leave=False):
        acc = torch.zeros_like(x)
        norm = torch.zeros(1, 1, num_latent_frames, 1, 1, device=x.device)
        sigma = sigmas[i].expand(batch, window)
        if len(starts) == 1:  # one window covers the clip: no fusion, exactly plain sampling
            x0 = denoise(x, sigma)
        else:
            x0s = batcher([x[:, :, s : s + window] for s in starts], [sigma] * len(starts), starts)
            for start, x0_window in zip(starts, x0s):  # fused in window order, as sequential sampling does
                sl = slice(start, start + window)
                acc[:, :, sl] += w * x0_window
                norm[:, :, sl] += w
            x0 = acc / norm
        x = ddim_eta_step(x, x0, sigmas[i], sigmas[i + 1], eta, generator)
        if callback is not None:
            callback({"i": i, "x": x, "x0": x0, "sigma": sigmas[i]})
    return x
