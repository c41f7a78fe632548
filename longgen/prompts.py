"""Multi-prompt long video: prompts on latent-frame ranges, conditioning blended between neighbours.

Pure functions over cond dicts (see :data:`longgen.backbones.base.Cond`): a windowed sampler asks for
the cond of the window ``[frame_offset, frame_offset + n)`` and gets the prompts' conds weighted by how
much of the window each prompt covers, with optional linear cross-fades of ``transition`` latent frames
at the boundaries (diffusers' FreeNoise multi-prompt interpolates embeddings per frame in the same way;
here it is done per window because a DiT's text conditioning is per clip).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["PromptSchedule", "cond_for_window", "multi_prompt_denoiser", "prompt_weights", "validate_ranges"]

Cond = dict[str, Any]


def validate_ranges(ranges: Sequence[tuple[int, int]]) -> None:
    """Prompt ranges must be non-empty, start at 0 and follow each other without gaps or overlaps."""
    if not ranges:
        raise ValueError("give at least one prompt range")
    expected = 0
    for i, (start, stop) in enumerate(ranges):
        if start != expected or stop <= start:
            raise ValueError(
                f"prompt ranges must be contiguous latent-frame ranges starting at 0, like [(0, 8), (8, 20)]; "
                f"range {i} is ({start}, {stop}) but should start at {expected} and be non-empty"
            )
        expected = stop


def prompt_weights(
    ranges: Sequence[tuple[int, int]], frame_offset: int, num_latent_frames: int, transition: float = 0.0
) -> torch.Tensor:
    """Weights ``[P]`` (summing to 1) of each prompt for the window ``[frame_offset, frame_offset + n)``.

    Per frame ``t`` (at its centre ``t + 0.5``), prompt ``i``'s weight is ``r_i(t) - r_{i+1}(t)`` with
    ``r_0 = 1``, ``r_P = 0`` and ``r_k`` a ramp from 0 to 1 over ``transition`` frames centred on the
    boundary ``b_k`` between prompts ``k - 1`` and ``k`` (a step at ``b_k`` when ``transition == 0``).
    The window's weights are the frames' mean. Frames before 0 (FIFO warm-up) and past the last range
    belong to the first and last prompt.
    """
    validate_ranges(ranges)
    if num_latent_frames < 1:
        raise ValueError(f"a window holds at least one latent frame, got {num_latent_frames}")
    if transition < 0:
        raise ValueError(f"transition must be >= 0 latent frames, got {transition}")
    centres = torch.arange(num_latent_frames, dtype=torch.float64) + frame_offset + 0.5  # [n]
    boundaries = torch.tensor([start for start, _ in ranges[1:]], dtype=torch.float64)  # [P - 1]
    delta = centres.unsqueeze(0) - boundaries.unsqueeze(1)  # [P - 1, n]
    if transition > 0:
        ramps = (delta / transition + 0.5).clamp(0, 1)
    else:
        ramps = (delta >= 0).double()
    ones = torch.ones(1, num_latent_frames, dtype=torch.float64)
    r = torch.cat([ones, ramps, torch.zeros_like(ones)], dim=0)  # [P + 1, n]
    per_frame = r[:-1] - r[1:]  # [P, n]
    return per_frame.mean(dim=1).float()


def cond_for_window(
    conds: Sequence[Cond],
    ranges: Sequence[tuple[int, int]],
    frame_offset: int,
    num_latent_frames: int,
    transition: float = 0.0,
) -> Cond:
    """The cond of the window ``[frame_offset, frame_offset + n)``: floating tensors blended by
    :func:`prompt_weights`; other entries (integer masks, flags, ``None``) come from the prompt with
    the largest weight. A window inside one prompt's range gets that prompt's cond unchanged.
    """
    if len(conds) != len(ranges):
        raise ValueError(f"{len(conds)} conds for {len(ranges)} prompt ranges: give one cond per range")
    weights = prompt_weights(ranges, frame_offset, num_latent_frames, transition)
    main = int(torch.argmax(weights))
    nonzero = [i for i in range(len(conds)) if weights[i] > 0]
    if len(nonzero) == 1:
        return dict(conds[nonzero[0]])
    out: Cond = {}
    for key, value in conds[main].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            shapes = {tuple(conds[i][key].shape) for i in nonzero}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot blend cond entry {key!r} of shapes {sorted(shapes)}: encode all prompts with the same "
                    "padding length (max_sequence_length)"
                )
            blended = sum(weights[i].to(value.dtype) * conds[i][key] for i in nonzero)
            out[key] = blended.to(value.dtype)
        else:
            out[key] = value
    return out


def multi_prompt_denoiser(
    denoise: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    conds: Sequence[Cond],
    ranges: Sequence[tuple[int, int]],
    transition: float = 0.0,
) -> Callable[..., torch.Tensor]:
    """Bind ``denoise(x, sigma, cond)`` to per-window prompts: a sampler-facing ``Denoiser``."""
    validate_ranges(ranges)

    def bound(x: torch.Tensor, sigma: torch.Tensor, frame_offset: int = 0) -> torch.Tensor:
        return denoise(x, sigma, cond_for_window(conds, ranges, frame_offset, x.shape[2], transition))

    return bound


class PromptSchedule:
    """A multi-prompt video's conditioning: ``schedule(frame_offset, num_latent_frames) -> cond`` of a window
    (:func:`cond_for_window`), plus ``switches``, the latent frames where a later prompt starts (samplers that
    keep a cache of past frames, the causal one, rebuild it there)."""

    def __init__(self, conds: Sequence[Cond], ranges: Sequence[tuple[int, int]], transition: float = 0.0):
        validate_ranges(ranges)
        self.conds, self.ranges, self.transition = list(conds), list(ranges), transition
        self.switches = [start for start, _ in self.ranges[1:]]

    def __call__(self, frame_offset: int, num_latent_frames: int) -> Cond:
        return cond_for_window(self.conds, self.ranges, frame_offset, num_latent_frames, self.transition)
