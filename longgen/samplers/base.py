"""What every sampler shares: the denoiser protocol and window helpers."""

from __future__ import annotations

from typing import Protocol

import torch


class Denoiser(Protocol):
    """``denoise(x[B,C,F,H,W], sigma[B,F], frame_offset=0) -> x0``.

    The sampler-facing denoiser: an adapter's ``denoise`` with the conditioning (and classifier-free
    guidance) bound. ``frame_offset`` is the absolute index of ``x``'s first latent frame in the whole
    video, so windowed samplers let multi-prompt conditioning pick each window's prompt.
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, frame_offset: int = 0) -> torch.Tensor: ...


def window_starts(num_latent_frames: int, window: int, stride: int) -> list[int]:
    """Start indices of windows of ``window`` frames every ``stride`` frames, plus a tail window.

    The tail window ends at the last frame, so every frame is covered even when the stride does not
    divide ``num_latent_frames - window``.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    if window > num_latent_frames:
        raise ValueError(
            f"window of {window} latent frames is longer than the clip ({num_latent_frames} latent frames): "
            f"use --window <= {num_latent_frames} or generate more frames"
        )
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} leaves frames uncovered: use --stride <= {window}")
    starts = list(range(0, num_latent_frames - window + 1, stride))
    if starts[-1] + window < num_latent_frames:
        starts.append(num_latent_frames - window)
    return starts


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
