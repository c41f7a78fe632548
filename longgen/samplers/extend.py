"""Chunk-by-chunk continuation around given frames, with FramePack-style anti-drifting orders.

A long clip is generated one window of the model's native length at a time. Each window holds the frames it
generates plus *given* frames at noise level 0 (the per-frame contract's given frame): ``context`` latent frames
of what is already known next to it (the previous chunk, or the input video's last frames) and, with
``anchor > 0``, the clip's first ``anchor`` latent frames (the input video's start or the first chunk), so
every chunk is tied to the start of the clip and not only to its drifting neighbour.

* ``order="forward"``: chunks left to right, each continuing the one before (diffusion forcing with clean
  history, as the ``df`` sampler's chunk loop).
* ``order="inverted"``: FramePack's anti-drifting order (Zhang and Agrawala 2025, "Packing input frame context
  in next-frame prediction models for video generation", Sec. 3.3 "inverted anti-drifting sampling"): after
  the anchor, the *last* chunk is generated first from the anchor alone, then chunks right to left, each
  bridging the anchor and the start of the chunk after it, so the frames next to the anchor come last and no
  error accumulates away from it.
* ``stats_anchor``: colour / statistics anchoring: each new chunk's per-channel latent mean and standard
  deviation are pulled toward those of its given frames (AdaIN-style, Huang and Belongie 2017), strength 0-1.

Within a window every step is a DDIM step (:func:`~longgen.samplers.base.ddim_eta_step`) of the new frames; the
given ones stay at sigma 0 and are returned exactly. ``context_transform`` (library use, e.g. a VAE round trip
in ``benchmarks/continuation_drift.py``) maps a chunk's latents before they serve as context.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .base import Denoiser, ddim_eta_step

ORDERS = ("forward", "inverted")


def match_statistics(x: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``x`` ``[B, C, f, h, w]`` with its per-(sample, channel) mean and std moved toward ``reference``'s.

    ``strength`` 1 matches them exactly (AdaIN, Huang and Belongie 2017, Eq. 8, over frames and pixels); 0 is
    the identity; in between blends linearly."""
    if strength == 0:
        return x
    dims = (2, 3, 4)
    mu, sd = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    mu_ref, sd_ref = reference.mean(dim=dims, keepdim=True), reference.std(dim=dims, keepdim=True)
    matched = (x - mu) / sd * sd_ref + mu_ref
    return x + strength * (matched - x)


def _sample_window(
    denoise: Denoiser,
    x_given: torch.Tensor,
    given: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    frame_offset: int,
    eta: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DDIM over ``sigmas`` of one window: frames where ``given`` ``[f]`` is True are ``x_given`` at sigma 0
    throughout; the others start from ``sigmas[0] * noise``. Returns the window's final latents."""
    g = given.to(noise.device)[None, None, :, None, None]  # [1, 1, f, 1, 1]
    x = torch.where(g, x_given, noise * sigmas[0])
    batch, num = noise.shape[0], noise.shape[2]
    for i in range(len(sigmas) - 1):
        levels = torch.where(given.to(noise.device), 0.0, sigmas[i]).expand(batch, num)
        x0 = denoise(x, levels, frame_offset)
        x = torch.where(g, x_given, ddim_eta_step(x, x0, sigmas[i], sigmas[i + 1], eta, generator))
    return x


def _known_from_conditioning(conditioning, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents ``[B, C, F, h, w]`` holding the given frames, bool ``[F]`` of the fully given frames)."""
    num_latent_frames = noise.shape[2]
    out = torch.zeros_like(noise)
    known = torch.zeros(num_latent_frames, dtype=torch.bool)
    if conditioning is None:
        return out, known
    conditioning.check(num_latent_frames, tuple(noise.shape))
    if not all(conditioning.fully_given()):
        raise ValueError(
            "the extend sampler keeps whole given frames; for spatial masks (--mask) use --sampler full or sliding"
        )
    lat = conditioning.latents.to(noise)
    for i, p in enumerate(conditioning.positions):
        out[:, :, p] = lat[:, :, i]
        known[p] = True
    return out, known


def _plan(known: torch.Tensor, window: int, context: int, anchor: int, order: str) -> list[tuple[list, list]]:
    """The windows, in order: (given positions, new positions) each, for a clip whose ``known`` frames are set.

    Mirrors :func:`sample_extend`'s loop (it is run on the plan), so tests can read the schedule."""
    known = known.clone()
    total = known.numel()
    plan = []
    while not bool(known.all()):
        unknown = [i for i in range(total) if not known[i]]
        anchors = [i for i in range(min(anchor, total)) if known[i]]
        if order == "inverted" and anchors:
            stop = unknown[-1] + 1  # the last unknown run, filled from its end backward
            start = stop
            while start > 0 and not known[start - 1]:
                start -= 1
            after = [i for i in range(stop, total) if known[i]][:context]
            budget = window - len(anchors) - len(after)
            if stop - start <= budget:  # the section next to the known start: as much of its context as fits
                room = budget - (stop - start)
                before = [i for i in range(max(0, start - context), start) if known[i] and i not in anchors]
                new, before = list(range(start, stop)), before[len(before) - room:] if room > 0 else []
            else:  # FramePack: the anchor plus the future context
                new, before = list(range(stop - budget, stop)), []
            given = sorted(set(anchors) | set(before) | set(after))
        else:
            first = unknown[0]
            before = [i for i in range(max(0, first - context), first) if known[i]]
            anchors = [i for i in anchors if i not in before]
            budget = window - len(anchors) - len(before)
            new = [i for i in range(first, min(total, first + budget)) if not known[i]]
            after = [i for i in range(first, min(total, first + budget)) if known[i]]  # given frames in reach
            given = sorted(set(anchors) | set(before) | set(after))
        if budget < 1:
            raise ValueError(
                f"--window {window} leaves no frame to generate beside {len(given)} given frames; raise --window "
                "or lower --chunk-context / --anchor-frames"
            )
        plan.append((given, new))
        known[new] = True
    return plan


def sample_extend(
    denoise: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    window: int,
    chunk_context: int,
    anchor_frames: int = 0,
    order: str = "forward",
    stats_anchor: float = 0.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    conditioning=None,
    context_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Generate ``noise``'s clip ``[B, C, F, h, w]`` window by window around given frames (module docstring).

    ``conditioning`` (:class:`~longgen.conditioning.FrameConditioning`, whole frames): frames kept exactly;
    without it the first window is generated from noise alone (and is the anchor with ``anchor_frames``).
    Each frame uses its own slice of ``noise``, so options compare on the same noise. With ``window >= F``, no
    given frames and ``stats_anchor=0`` this is exactly the ``full`` sampler.
    """
    if order not in ORDERS:
        raise ValueError(f"--order must be one of {ORDERS}, got {order!r}")
    sigmas = sigmas.to(noise.device, torch.float32)
    out, known = _known_from_conditioning(conditioning, noise)
    if order == "inverted" and anchor_frames > 0 and not bool(known[:anchor_frames].any()):
        # nothing to anchor to yet: the first window is generated forward, then the rest inverted
        first = _plan(known, window, chunk_context, 0, "forward")[0]
        out, known = _fill(denoise, out, known, first, noise, sigmas, eta, generator, 0.0, context_transform)
    for given, new in tqdm(_plan(known, window, chunk_context, anchor_frames, order), disable=disable,
                           desc="chunks", leave=False):
        out, known = _fill(denoise, out, known, (given, new), noise, sigmas, eta, generator, stats_anchor,
                           context_transform)
    return out


def _fill(denoise, out, known, step, noise, sigmas, eta, generator, stats_anchor, context_transform):
    """Sample one planned window and write its new frames into ``out``; returns (out, known)."""
    given, new = step
    positions = sorted(given + new)
    is_given = torch.tensor([p in given for p in positions])
    x_given = out[:, :, positions]
    x = _sample_window(denoise, x_given, is_given, noise[:, :, positions], sigmas, positions[0], eta, generator)
    fresh = x[:, :, ~is_given.to(x.device)]
    if stats_anchor > 0 and given:
        fresh = match_statistics(fresh, out[:, :, given], stats_anchor)
    if context_transform is not None:
        fresh = context_transform(fresh)
    out = out.clone()
    out[:, :, new] = fresh
    known = known.clone()
    known[new] = True
    return out, known
