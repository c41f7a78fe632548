"""FIFO-Diffusion: a queue of latent frames at increasing noise levels, one clean frame out per step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..noise import NoiseSource, gaussian_noise, noise_frames
from .base import Denoiser, FrameConditioning, WindowBatcher, ddim_eta_step
from .full import sample_full

FramesHook = Callable[[int, torch.Tensor], None]
"""``on_frames(start, latents[B, C, n, H, W])``: latent frames ``[start, start + n)`` are final."""


def _check_fifo(
    noise: torch.Tensor | NoiseSource,
    num_steps: int,
    window: int,
    num_partitions: int,
    lookahead: bool,
    num_latent_frames: int | None,
) -> int:
    """Validate FIFO's arguments (clear errors naming the fix); returns the clip length in latent frames."""
    queue_length = num_partitions * window
    if window < 1 or num_partitions < 1:
        raise ValueError(
            f"window and num_partitions must be >= 1, got window={window}, num_partitions={num_partitions}"
        )
    if num_steps != queue_length:
        raise ValueError(
            f"FIFO-Diffusion takes one step per queue slot: num_partitions * window = {queue_length} steps, "
            f"but sigmas has {num_steps} steps; pass sigmas for num_steps={queue_length} "
            f"(e.g. adapter.sigmas({queue_length}))"
        )
    if lookahead and window % 2:
        raise ValueError(
            f"lookahead denoising uses half windows, so window must be even, got {window}: use window="
            f"{window + 1 if window > 1 else 2} or lookahead=False"
        )
    if isinstance(noise, torch.Tensor):
        if noise.ndim != 5:
            raise ValueError(f"noise must be [B, C, F, H, W], got shape {tuple(noise.shape)}")
        num_latent_frames = noise.shape[2] if num_latent_frames is None else num_latent_frames
    elif num_latent_frames is None:
        raise ValueError("with a NoiseSource, pass num_latent_frames (the length of the clip to generate)")
    if window > num_latent_frames:
        raise ValueError(
            f"FIFO window of {window} latent frames is longer than the clip ({num_latent_frames} latent frames): "
            f"use window <= {num_latent_frames} or generate more frames"
        )
    return num_latent_frames


def _initial_clip(denoise, noise, sigmas, window: int, eta: float, generator, conditioning, num_latent_frames: int):
    """The queue's first clip: the given frames when they fill the first window, else generated (with them)."""
    if conditioning is not None and conditioning.given_prefix(window) == window:
        batch = noise_frames(noise, 0, 1, generator).shape[0]
        return conditioning.window(0, window).known.expand(batch, -1, -1, -1, -1)
    return sample_full(
        denoise, noise_frames(noise, 0, window, generator), sigmas, eta=eta, generator=generator,
        conditioning=conditioning, disable=True,
    )


def sample_fifo(
    denoise: Denoiser,
    noise: torch.Tensor | NoiseSource,
    sigmas: torch.Tensor,
    *,
    window: int,
    num_partitions: int = 4,
    lookahead: bool = True,
    eta: float = 0.0,
    window_batch: int | None = None,
    num_latent_frames: int | None = None,
    init_clip: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    conditioning: FrameConditioning | None = None,
    on_frames: FramesHook | None = None,
    callback: Callable[[dict], None] | None = None,
    return_latents: bool = True,
    disable: bool | None = None,
) -> torch.Tensor | None:
    """Implements FIFO-Diffusion (Kim et al. 2024): diagonal denoising, latent partitioning, lookahead denoising.

    A queue of ``L = num_partitions * window`` latent frames holds one frame per step of an ``S = L``
    step schedule (``sigmas`` has ``L + 1`` entries): queue slot ``i`` (0 = head) is at
    ``sigmas[S - 1 - i]``. Every iteration the queue is cut into ``num_partitions`` windows of ``window``
    frames (the model's native length), each window is denoised with its per-frame levels and every
    frame takes one DDIM step (diagonal denoising); the now clean head frame is output and a fresh
    noise frame enters at the tail. With ``lookahead`` ``window // 2`` clean frames are kept
    in front of the head as context and ``2 * num_partitions`` windows at stride ``window // 2`` are
    denoised, each writing back only its noisier half, so every frame is denoised with ``window // 2``
    less noisy frames before it (twice the model calls). ``eta`` is DDIM's stochasticity
    (:func:`~longgen.samplers.base.ddim_eta_step`; the official code's default is 1, longgen's 0 = deterministic)
    with noise from ``generator``. As in the official code, those context frames
    are shown to the model at the smallest nonzero level ``sigmas[S - 1]``.

    The queue starts from ``init_clip`` (``[B, C, window, H, W]``, clean; by default generated first with
    :func:`~longgen.samplers.full.sample_full` from ``noise[:, :, :window]`` and the same ``sigmas``),
    re-noised so slot ``i`` is at its level: the last ``window`` slots hold clip frames 0..window-1, the
    slots before them copies of clip frame 0 (warm-up, as in the official ``prepare_latents``). The
    ``L - window`` warm-up frames are popped first and dropped; output frame ``j`` is the clip's frame
    ``j`` re-generated for ``j < window`` and new content after it. Windows holding warm-up frames get a
    negative ``frame_offset`` (the absolute index of their first frame). Output frame ``j >= window``
    starts from ``sigmas[0] * noise[:, :, j]``; re-noising and the queue's padding past the last output
    frame use ``generator``.

    Memory is constant in the clip length: the queue, one window's activations, and (unless
    ``return_latents=False``) the returned clip ``[B, C, F, H, W]``. Frames go to
    ``on_frames(j, latent[B, C, 1, H, W])`` as they leave the queue. The windows of one iteration read
    the same queue state, so they are independent (the official code runs them on separate GPUs): ``window_batch``
    of them run as one batched model call (:class:`~longgen.samplers.base.WindowBatcher`; None: from free
    memory on CUDA, 1 on CPU), the same result to float tolerance; step caches keep one state per window.

    ``conditioning`` (:class:`~longgen.conditioning.FrameConditioning`): given frames. When the first ``window``
    latent frames are fully given they are the queue's initial clip (no warm-up generation); otherwise the
    initial clip is generated with them (:func:`~longgen.samplers.full.sample_full`). At every iteration the given
    region of every queue slot is replaced by the given latents re-noised to the slot's level and each window's
    x0 is clamped to them, so output frames equal the given latents where given.
    """
    sigmas = sigmas.float()
    num_steps = len(sigmas) - 1
    queue_length = num_partitions * window
    num_latent_frames = _check_fifo(noise, num_steps, window, num_partitions, lookahead, num_latent_frames)

    if conditioning is not None:
        conditioning.check(num_latent_frames)
    if init_clip is None:
        init_clip = _initial_clip(denoise, noise, sigmas, window, eta, generator, conditioning, num_latent_frames)
    elif init_clip.shape[2] != window:
        raise ValueError(f"init_clip must have window={window} latent frames, got {init_clip.shape[2]}")
    device = init_clip.device
    sigmas = sigmas.to(device)
    batch = init_clip.shape[0]
    context = window // 2 if lookahead else 0
    warmup = queue_length - window

    # Slot levels never change: frames move through them. Context slots sit at the smallest nonzero level.
    real_levels = torch.arange(num_steps - 1, -1, -1, device=device)  # [L]: slot i at S - 1 - i
    levels = torch.cat([real_levels.new_full((context,), num_steps - 1), real_levels])  # [Q]
    slot_sigma = sigmas[levels].view(1, 1, -1, 1, 1)
    slot_sigma_next = sigmas[levels + 1].view(1, 1, -1, 1, 1)

    # Initial queue: clip frame max(0, i - warmup) re-noised to slot i's level (context: clip frame 0).
    clip_index = (torch.arange(-context, queue_length, device=device) - warmup).clamp_min(0)  # [Q]
    clean = init_clip[:, :, clip_index]  # [B, C, Q, H, W]
    eps = gaussian_noise(clean.shape, generator, device, clean.dtype)
    queue = (1.0 - slot_sigma) * clean + slot_sigma * eps

    if lookahead:
        starts = [r * (window // 2) for r in range(2 * num_partitions)]
        keep = window // 2  # only the noisier half of each window is written back
    else:
        starts = [r * window for r in range(num_partitions)]
        keep = window

    batcher = WindowBatcher(denoise, window_batch)
    pieces: list[torch.Tensor] = []
    progress = tqdm(total=num_latent_frames, disable=disable, desc="fifo (latent frames)", leave=False)
    num_iterations = num_latent_frames + warmup
    conditioning = conditioning.to(device) if conditioning is not None else None
    for it in range(num_iterations):
        offset = it - context - warmup  # absolute frame index of queue slot 0
        given = conditioning.window(offset, offset + queue.shape[2]) if conditioning is not None else None
        slot_levels = sigmas[levels].expand(batch, -1)  # [B, Q]
        if given is not None:
            queue = given.impose(queue, slot_levels, generator)
            slot_levels = given.levels(slot_levels)
        updated = queue.clone()
        x0s = batcher(
            [queue[:, :, s : s + window] for s in starts],
            [slot_levels[:, s : s + window] for s in starts],
            [offset + s for s in starts],
        )
        for start, x0 in zip(starts, x0s):
            sl = slice(start, start + window)
            if given is not None:
                x0 = given.part(start, start + window).clamp(x0)
            stepped = ddim_eta_step(
                queue[:, :, sl], x0, slot_sigma[:, :, sl], slot_sigma_next[:, :, sl], eta, generator
            )
            updated[:, :, start + window - keep : start + window] = stepped[:, :, window - keep :]
        if callback is not None:
            callback({"i": it, "x": updated, "levels": levels, "frame_offset": offset})
        head = it - warmup  # output index of the frame that just became clean
        if head >= 0:
            frame = updated[:, :, context : context + 1].clone()
            if on_frames is not None:
                on_frames(head, frame)
            if return_latents:
                pieces.append(frame)
            progress.update(1)
        if it == num_iterations - 1:
            break
        tail = it + window  # output index of the frame entering the queue
        fresh = noise_frames(noise, tail, tail + 1, generator).to(device, queue.dtype) * sigmas[0]
        queue = torch.cat([updated[:, :, 1:], fresh], dim=2)  # pop the head, push noise at the tail
    progress.close()
    return torch.cat(pieces, dim=2) if return_latents else None
