"""What every sampler shares: the denoiser protocol and window helpers."""

from __future__ import annotations

from typing import Protocol

import torch

from ..windows import window_starts  # noqa: F401  (one implementation, shared with longgen.extend)


class Denoiser(Protocol):
    """``denoise(x[B,C,F,H,W], sigma[B,F], frame_offset=0) -> x0``.

    The sampler-facing denoiser: an adapter's ``denoise`` with the conditioning (and classifier-free
    guidance) bound. ``frame_offset`` is the absolute index of ``x``'s first latent frame in the whole
    video, so windowed samplers let multi-prompt conditioning pick each window's prompt.
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, frame_offset: int = 0) -> torch.Tensor: ...


def fusion_weights(window: int, kind: str = "pyramid") -> torch.Tensor:
    """Per-frame weights ``[window]`` for blending overlapping windows.

    ``pyramid``: 1, 2, ..., ceil(W/2), ..., 2, 1 (FreeNoise, Qiu et al. 2024, Sec. 3.3);
    ``uniform``: all ones (plain averaging, MultiDiffusion).
    """
    if kind == "pyramid":
        idx = torch.arange(window)
        return torch.minimum(idx + 1, window - idx).float()
    if kind == "uniform":
        return torch.ones(window)
    raise ValueError(f"fusion weights must be 'pyramid' or 'uniform', got {kind!r}")


def ddim_eta_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM step with stochasticity ``eta`` (Song et al. 2021, Eq. 12 and 16) in flow sigmas.

    With x = (1 - s) x0 + s eps, DDIM's sigma_t mapped from the variance-preserving form gives the noise
    scale c = eta * s' * sqrt(1 - (r' / r)^2), r = s / (1 - s) (r' for s'), and
    x' = (1 - s') x0 + sqrt(s'^2 - c^2) eps_hat + c z, z ~ N(0, I) from ``generator``. ``eta=0`` is exactly
    :func:`~longgen.schedules.ddim_step` (the same code path, bit for bit); ``eta=1`` is DDPM's ancestral
    step. Frames at sigma == 0 stay where they are.
    """
    from ..noise import gaussian_noise
    from ..schedules import ddim_step

    if eta == 0:
        return ddim_step(x, x0, sigma, sigma_next)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)
    safe = sigma.clamp_min(1e-12)
    eps = (x - (1.0 - sigma) * x0) / safe
    # r' / r = s' (1 - s) / ((1 - s') s); at s = 1 (pure noise) the ratio is 0.
    ratio = sigma_next * (1.0 - sigma) / ((1.0 - sigma_next).clamp_min(1e-12) * safe)
    c = eta * sigma_next * (1.0 - ratio.clamp(0.0, 1.0) ** 2).sqrt()
    z = gaussian_noise(x.shape, generator, x.device, x.dtype)
    out = (1.0 - sigma_next) * x0 + (sigma_next**2 - c**2).clamp_min(0.0).sqrt() * eps + c * z
    return torch.where(sigma > 0, out, x)
