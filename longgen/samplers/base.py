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
