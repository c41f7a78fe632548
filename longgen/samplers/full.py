"""Plain synchronous sampling: every frame at the same noise level, the whole clip in one call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import trange

from .base import Denoiser, FrameConditioning, repaint_step


def sample_full(
    denoise: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    conditioning: FrameConditioning | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Implements DDIM (Song et al. 2021; deterministic with the default eta=0) over the whole clip at once.

    ``noise`` is ``[B, C, F, H, W]`` standard Gaussian; ``sigmas`` is a descending ``[S + 1]`` flow-sigma
    schedule ending at 0. Starts from ``x = sigmas[0] * noise`` and returns the final x0. This is the
    naive baseline for long clips (the model simply run at the long length). ``eta > 0`` adds DDIM's
    stochastic term (:func:`~longgen.samplers.base.ddim_eta_step`) drawn from ``generator``.

    ``conditioning`` (:class:`~longgen.conditioning.FrameConditioning`): given frames kept by per-step
    replacement (RePaint, :func:`~longgen.samplers.base.repaint_step`, with its ``resample`` steps); the result
    equals the given latents where they are given. Given frames past the clip's end are ignored.
    """
    sigmas = sigmas.to(noise.device, torch.float32)
    x = noise * sigmas[0]
    batch, _, num_latent_frames = noise.shape[:3]
    given = conditioning.to(noise.device).window(0, num_latent_frames) if conditioning is not None else None
    resample = conditioning.resample if conditioning is not None else 1
    for i in trange(len(sigmas) - 1, disable=disable, desc="denoising", leave=False):
        sigma = sigmas[i].expand(batch, num_latent_frames)
        levels = given.levels(sigma) if given is not None else sigma
        x, x0, _ = repaint_step(
            x, sigmas[i], sigmas[i + 1], lambda x_in, levels=levels: denoise(x_in, levels), given, resample, eta, generator
        )
        if callback is not None:
            callback({"i": i, "x": x, "x0": x0, "sigma": sigmas[i]})
    return given.clamp(x) if given is not None else x
