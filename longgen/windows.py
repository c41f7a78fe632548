"""Frame-window math shared by the windowed samplers and the window extensions (a leaf module: torch only).

FreeNoise (Qiu et al. ICLR 2024, Sec. 3.3) windows ``[kS, kS + W)`` of ``W`` frames every ``S`` frames, plus
a tail window ending at the last frame, fused per frame with pyramid weights ``w(i) = min(i + 1, W - i)``.
The sliding sampler (:mod:`longgen.samplers.sliding`) and window fusion / SpectralBlend
(:mod:`longgen.extend`) use the same windows; this module is their one implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["fuse_window_outputs", "fuse_windows", "pyramid_weights", "window_starts"]


def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """Starts of the windows ``[s, s + W)``: ``0, S, 2S, ..`` while they fit, plus a tail window ending at the
    last frame, so every frame is covered even when ``S`` does not divide ``F - W``.

    A window longer than the clip or a stride longer than the window is a ValueError naming the fix (the
    extensions, whose windows may exceed a short clip, run the stock layer there and never call this).
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    if window > num_frames:
        raise ValueError(
            f"window of {window} latent frames is longer than the clip ({num_frames} latent frames): "
            f"use --window <= {num_frames} or generate more frames"
        )
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} leaves frames uncovered: use --stride <= {window}")
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


def pyramid_weights(window: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FreeNoise's pyramid weights ``w(i) = min(i + 1, W - i)``: ``[1, 2, .., W/2, W/2, .., 2, 1]`` (odd W: one peak)."""
    i = torch.arange(window, device=device)
    return torch.minimum(i + 1, window - i).to(dtype)


def fuse_window_outputs(
    run: Callable[[int], torch.Tensor], num_frames: int, window: int, stride: int
) -> torch.Tensor:
    """FreeNoise's pyramid-weighted mean of window outputs (Eq. 6) over ``num_frames`` frames.

    ``run(start)`` returns the output ``[N, W, ...]`` (frame axis 1) of the window ``[start, start + W)``; the
    windows are :func:`window_starts` (``num_frames >= window``). Returns ``[N, F, ...]``. The sums run in
    float32; the result has the windows' dtype.
    """
    weights = pyramid_weights(window)  # [W]
    total = torch.zeros(num_frames)  # [F]
    acc = None
    out_dtype = torch.float32
    for start in window_starts(num_frames, window, stride):
        out = run(start)  # [N, W, ...]
        if acc is None:
            acc = torch.zeros(out.shape[0], num_frames, *out.shape[2:], device=out.device)  # [N, F, ...]
            weights = weights.to(out.device).view(1, window, *([1] * (out.ndim - 2)))
            total = total.to(out.device)
            out_dtype = out.dtype
        acc[:, start : start + window] += weights * out.float()
        total[start : start + window] += weights.flatten()
    return (acc / total.view(1, num_frames, *([1] * (acc.ndim - 2)))).to(out_dtype)


def fuse_windows(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: int, stride: int
) -> torch.Tensor:
    """Apply ``fn`` to frame windows of ``x`` ``[N, F, C]`` and fuse them with pyramid weights (FreeNoise Eq. 6).

    ``fn`` maps ``[N, W', C]`` to ``[N, W', C']``. With one window (``F <= W``) this is ``fn(x)`` exactly. The sums
    run in float32; the result has ``fn``'s dtype.
    """
    num_frames = x.shape[1]
    if num_frames <= window:
        return fn(x)
    return fuse_window_outputs(lambda start: fn(x[:, start : start + window]), num_frames, window, stride)
