"""Plain synchronous sampling: every frame at the same noise level, the whole clip in one call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import trange

from .base import Denoiser, ddim_eta_step


def sample_full(
    denoise: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Implements DDIM (Song et al. 2021; deterministic with the default eta=0) over the whole clip at once.

    ``noise`` is ``[B, C, F, H, W]`` standard Gaussian; ``sigmas`` is a descending ``[S + 1]`` flow-sigma
    schedule ending at 0. Starts from ``x = sigmas[0] * noise`` and returns the final x0. This is the
    naive baseline for long clips (the model simply run at the long length). ``eta > 0`` adds DDIM's
    stochastic term (:func:`~longgen.samplers.base.ddim_eta_step`) drawn from ``generator``.
    """
    sigmas = sigmas.to(noise.device, torch.float32)
    x = noise * sigmas[0]
    batch, _, num_latent_frames = noise.shape[:3]
    for i in trange(len(sigmas) - 1, disable=disable, desc="denoising", leave=False):
        sigma = sigmas[i].expand(batch, num_latent_frames)
        x0 = denoise(x, sigma)
        x = ddim_eta_step(x, x0, sigmas[i], sigmas[i + 1], eta, generator)
        if callback is not None:
            callback({"i": i, "x": x, "x0": x0, "sigma": sigmas[i]})
    return x
