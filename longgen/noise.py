"""Initial-noise strategies for long clips: plain Gaussian and FreeNoise shuffle rescheduling.

Every function returns standard-normal noise ``[B, C, F, H, W]`` (``F`` latent frames) that a sampler
scales to its first noise level. The samplers that run in constant memory (FIFO-Diffusion, diffusion
forcing) also accept a :data:`NoiseSource`, a function ``(start, stop) -> [B, C, stop - start, H, W]``
that makes the noise of a frame range on demand, so the noise of a very long clip never has to exist
all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["NoiseSource", "freenoise_noise", "gaussian_noise", "gaussian_source", "noise_frames"]

NoiseSource = Callable[[int, int], torch.Tensor]
"""``source(start, stop) -> noise [B, C, stop - start, H, W]`` of latent frames ``[start, stop)``."""


def gaussian_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Independent standard-normal noise of ``shape`` (``[B, C, F, H, W]``).

    The noise is drawn on the generator's device (CPU when there is none) and then moved, so one seed
    gives the same noise on every device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=device or gen_device, dtype=dtype)


def freenoise_noise(
    shape: Sequence[int],
    window: int,
    stride: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Implements FreeNoise's noise rescheduling (Qiu et al. 2024, local noise shuffle).

    Noise is drawn for every frame, then for ``i = W, W + S, W + 2S, ...`` the frames ``[i, i + S)``
    are replaced by a random permutation of frames ``[i - W, i - W + S)`` (already rescheduled when
    ``i - W >= W``). Every frame past the first window is thus a copy of a frame of the first window;
    when ``S`` divides ``W`` every window starting at a multiple of ``S`` holds ``W`` distinct frames, so
    the model sees in-distribution noise in each window while distant windows share content. When ``S`` does not
    divide ``F - W`` the last group is a truncated permutation (as diffusers does). Permutations come
    from ``generator``, so the result is reproducible.
    """
    shape = tuple(shape)
    if len(shape) != 5:
        raise ValueError(f"FreeNoise noise needs a [B, C, F, H, W] shape, got {shape}")
    num_latent_frames = shape[2]
    if window < 1 or stride < 1:
        raise ValueError(f"FreeNoise window and stride must be >= 1, got window={window}, stride={stride}")
    if stride > window:
        raise ValueError(
            f"FreeNoise stride {stride} > window {window} would copy frames that are not yet rescheduled: "
            f"use stride <= {window}"
        )
    noise = gaussian_noise(shape, generator=generator, device=device, dtype=dtype)
    perm_device = generator.device if generator is not None else torch.device("cpu")
    for start in range(window, num_latent_frames, stride):
        count = min(stride, num_latent_frames - start)
        perm = torch.randperm(stride, generator=generator, device=perm_device)[:count]
        source = (start - window + perm).to(noise.device)
        noise[:, :, start : start + count] = noise[:, :, source]
    return noise


def gaussian_source(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> NoiseSource:
    """A :data:`NoiseSource` of fresh Gaussian noise; ``shape`` is ``[B, C, H, W]`` (no frame axis).

    Frames are drawn one at a time in the order they are asked for (the constant-memory samplers ask
    for consecutive ranges), so the noise of a frame does not depend on how the ranges are split.
    """
    batch, channels, height, width = shape

    def source(start: int, stop: int) -> torch.Tensor:
        frames = [
            gaussian_noise((batch, channels, 1, height, width), generator, device, dtype)
            for _ in range(start, stop)
        ]
        return torch.cat(frames, dim=2)

    return source


def noise_frames(
    noise: torch.Tensor | NoiseSource, start: int, stop: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise of latent frames ``[start, stop)`` from a tensor ``[B, C, F, H, W]`` or a :data:`NoiseSource`.

    Frames at or past the end of a tensor (padding that samplers need but never output, e.g. FIFO's
    queue tail at the end of a clip) are fresh Gaussian noise from ``generator``.
    """
    if callable(noise) and not isinstance(noise, torch.Tensor):
        return noise(start, stop)
    have = max(0, min(stop, noise.shape[2]) - start)
    parts = [noise[:, :, start : start + have]] if have > 0 else []
    if stop - start > have:
        b, c, _, h, w = noise.shape
        parts.append(gaussian_noise((b, c, stop - start - have, h, w), generator, noise.device, noise.dtype))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
