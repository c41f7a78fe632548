"""The Self-Forcing training rollout: a causal student generates chunk by chunk against its own KV cache.

Self-Forcing (Huang et al. 2025, ``pipeline/self_forcing_training.py``) trains on what the student itself
generates, not on noised data: every chunk of ``chunk`` latent frames starts from fresh noise and runs the
few-step schedule ``sigmas`` (Self-Forcing's renoise step ``x_next = (1 - s') x0 + s' eps``), attending to the
cached keys/values of the chunks before it. Each chunk stops at its **exit step** (drawn at random per chunk
or per rollout by the caller) and its x0 prediction there is the chunk's output. Gradient flows only
through that exit call: every earlier step runs under ``no_grad``, so the exit call's input carries no graph,
and the clean context pass that writes the chunk into the cache runs under ``no_grad`` on the detached
output, so later chunks see a detached cache (the paper's memory-bounded truncation).

With a rolling window and a sink on the cache (``local_attn_size`` / ``sink_size`` of the block-causal
extension) the rollout may be many times the native length (LongLive's streaming long tuning); ``grad_from``
restricts the gradient to the newest frames (earlier chunks run every call under ``no_grad``).

At ``exit_steps = [len(sigmas) - 2] * num_chunks`` under ``no_grad`` the rollout is exactly
:func:`longgen.samplers.causal.sample_causal` with the ``renoise`` step (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..extend.causal import KVCache
from ..noise import gaussian_noise

__all__ = ["draw_exit_steps", "self_forcing_rollout"]

StudentCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``student(x [B, C, n, H, W], sigma [B, n]) -> x0`` (the cond bound by the caller)."""


def draw_exit_steps(num_chunks: int, num_steps: int, generator: torch.Generator, same: bool) -> list[int]:
    """Exit step of every chunk, uniform over ``0 .. num_steps - 1`` (one shared draw when ``same``).

    Draw from a generator that is the same on every process: each process must run the same number of
    model calls (FSDP gathers weights collectively per call), as Self-Forcing syncs its exit flags."""
    draws = torch.randint(0, num_steps, (1 if same else num_chunks,), generator=generator).tolist()
    return draws * num_chunks if same else draws


def self_forcing_rollout(
    student: StudentCall,
    cache: KVCache,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    exit_steps: Sequence[int],
    *,
    context_noise: float = 0.0,
    grad_from: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate ``noise.shape[2]`` latent frames chunk by chunk; returns the chunks' exit-step x0 ``[B, C, F, H, W]``.

    ``cache`` is the student's block-causal KV cache (its chunk size is the rollout's); it is cleared first.
    ``sigmas`` is the per-chunk schedule ending at 0; ``exit_steps[j]`` in ``0 .. len(sigmas) - 2``. Frames
    ``>= grad_from`` get gradient (when grad mode is on) through their exit call only. Renoise and context
    noise come from ``generator``.
    """
    if noise.ndim != 5:
        raise ValueError(f"noise must be [B, C, F, H, W], got shape {tuple(noise.shape)}")
    chunk, num_frames = cache.config.chunk_size, noise.shape[2]
    if num_frames % chunk:
        raise ValueError(
            f"the block-causal chunk size {chunk} does not divide the rollout's {num_frames} latent frames: set "
            f"extension.options.chunk_size to a divisor of {num_frames} (or a rollout length that is a multiple of {chunk})"
        )
    num_steps = len(sigmas) - 1
    if num_steps < 1 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must be a descending schedule ending at 0, got {sigmas.tolist()}")
    if len(exit_steps) != num_frames // chunk or any(not 0 <= s < num_steps for s in exit_steps):
        raise ValueError(
            f"need one exit step in 0..{num_steps - 1} per chunk ({num_frames // chunk}), got {list(exit_steps)}"
        )
    grad_on = torch.is_grad_enabled()
    batch, device = noise.shape[0], noise.device
    sigmas = sigmas.float().to(device)
    cache.clear()
    outputs = []
    for j, exit_step in enumerate(exit_steps):
        start = j * chunk
        x = noise[:, :, start : start + chunk].float() * sigmas[0]
        for i in range(exit_step + 1):
            with torch.set_grad_enabled(grad_on and i == exit_step and start + chunk > grad_from):
                with cache.stream(start, chunk):
                    x0 = student(x, sigmas[i].expand(batch, chunk)).float()
            if i < exit_step:
                eps = gaussian_noise(x0.shape, generator, device, x0.dtype)
                x = (1.0 - sigmas[i + 1]) * x0.detach() + sigmas[i + 1] * eps
        outputs.append(x0)
        _context_pass(student, cache, x0.detach(), start, context_noise, generator)
    return torch.cat(outputs, dim=2)


@torch.no_grad()
def _context_pass(student, cache: KVCache, x0, start: int, context_noise: float, generator) -> None:
    """Write a finished chunk into the cache: one call on its (detached) x0 at ``context_noise``."""
    ctx = x0
    if context_noise > 0:
        ctx = (1.0 - context_noise) * x0 + context_noise * gaussian_noise(x0.shape, generator, x0.device, x0.dtype)
    with cache.stream(start, x0.shape[2], write=True):
        student(ctx, torch.full((x0.shape[0], x0.shape[2]), float(context_noise), device=x0.device))
