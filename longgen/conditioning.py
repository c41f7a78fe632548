"""Given frames: latent (or pixel) frames at chosen positions that every sampler keeps fixed.

Continuation, transitions (SEINE, Chen et al. 2023), keyframe interpolation and prediction (MCVD, Voleti et al.
2022), mask modelling (VDT, Lu et al. 2023) and any-length inpainting (VideoPainter, Bian et al. 2025) are all
"some frames, or some regions of some frames, are given". longgen's per-frame noise levels express that
directly, so it is one data type every sampler takes, not a new sampler:

* :class:`FrameConditioning`: clean *model latents* at latent-frame positions of the clip, with an optional
  spatial ``keep`` mask per frame (1 = given, 0 = generate). Samplers receive it as ``conditioning=``.
* :class:`GivenFrames`: the same in *pixel* frames (what the CLI builds from ``--video``, ``--frames-at``,
  ``--mask``); :func:`encode_given_frames` turns it into a :class:`FrameConditioning` once, so given
  frames never go through the VAE again between chunks or windows.

How each sampler keeps them (see each sampler's docstring):

* ``full``, ``sliding`` (windowed samplers): per-step replacement (RePaint, Lugmayr et al. 2022, Alg. 1):
  before every model call the given region of ``x`` is replaced by the given latents re-noised to the
  current level, ``(1 - s) x_given + s eps``; the model's x0 is clamped to the given latents there; with
  ``resample = U > 1`` every step is repeated U times, jumping back up one level in between (RePaint's
  resampling). ``given_level="clean"`` instead shows *fully* given frames to the model at sigma 0 (for models
  trained with conditioning masks, item 3 of issue 15).
* ``fifo``: the queue's initial clip is the given frames when the first window is fully given; frames entering
  or moving through the queue are replaced at their slot's level.
* ``df``, ``causal``: a fully given prefix is clean history (``num_ready`` frames at sigma 0 / chunks written
  straight to the KV cache); any other given frame is replaced at its own level, per frame.

In every sampler the returned latents equal the given latents exactly where ``keep == 1``.

**Pixel to latent positions.** A causal video VAE (Wan, LTX, HunyuanVideo, CogVideoX; temporal compression
``tc``) puts pixel frame 0 alone in latent frame 0 and pixel frames ``tc*(k-1)+1 .. tc*k`` in latent frame
``k``; a non-causal one (AnimateDiff, SVD: ``tc`` = 1) puts pixel frames ``tc*k .. tc*k+tc-1`` in latent frame
``k`` (:func:`latent_index`). A latent frame is *given* when at least one of its pixel frames is given; it is
encoded from its pixel frames with each missing one filled by the nearest given pixel frame of the same latent
frame (so a keyframe at pixel 80 with ``tc`` = 4 fixes latent frame 20, pixels 77..80, to that image held still).
Its spatial keep mask is the intersection of its given pixel frames' keep masks, min-pooled to the latent grid
(a latent cell is kept only if every pixel under it is kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from .noise import gaussian_noise

__all__ = [
    "GIVEN_LEVELS",
    "FrameConditioning",
    "GivenFrames",
    "GivenWindow",
    "encode_given_frames",
    "latent_index",
    "renoise_up",
]

GIVEN_LEVELS = ("renoise", "clean")
"""How windowed samplers show fully given frames to the model: re-noised to the step's level (RePaint, any
model) or clean at sigma 0 (models trained with conditioning frames)."""


@dataclass(frozen=True)
class FrameConditioning:
    """Clean model latents given at latent-frame positions of the clip to generate.

    ``latents`` ``[B or 1, C, K, h, w]``: the given frames (model latents, as ``adapter.encode_video`` makes
    them). ``positions``: the latent frame (0-based, in the generated clip) of each of the K frames, strictly
    increasing. ``keep`` ``[B or 1, 1, K, h, w]`` in [0, 1] or None (whole frames given): 1 where the frame is
    given, 0 where it is generated (values between blend). ``resample``: RePaint's U, model passes per step for
    the replacement samplers (1 = no resampling). ``given_level``: one of :data:`GIVEN_LEVELS`.
    """

    latents: torch.Tensor
    positions: tuple[int, ...]
    keep: torch.Tensor | None = None
    resample: int = 1
    given_level: str = "renoise"

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        lat, pos = self.latents, self.positions
        if lat.ndim != 5:
            raise ValueError(f"given latents must be [B, C, K, h, w], got shape {tuple(lat.shape)}")
        if len(pos) != lat.shape[2]:
            raise ValueError(f"{lat.shape[2]} given latent frames but {len(pos)} positions: give one position each")
        if any(b <= a for a, b in zip(pos, pos[1:])) or (pos and pos[0] < 0):
            raise ValueError(f"given frame positions must be distinct, increasing and >= 0, got {list(pos)}")
        if self.keep is not None:
            k = self.keep
            if k.ndim != 5 or k.shape[1] != 1 or k.shape[2] != lat.shape[2] or k.shape[3:] != lat.shape[3:]:
                raise ValueError(
                    f"keep mask must be [B or 1, 1, {lat.shape[2]}, {lat.shape[3]}, {lat.shape[4]}] (one latent-grid "
                    f"mask per given frame), got {tuple(k.shape)}"
                )
        if int(self.resample) < 1:
            raise ValueError(f"--resample-steps must be >= 1 (1 = no RePaint resampling), got {self.resample}")
        if self.given_level not in GIVEN_LEVELS:
            raise ValueError(f"--given-level must be one of {', '.join(GIVEN_LEVELS)}, got {self.given_level!r}")

    @property
    def num_given(self) -> int:
        return len(self.positions)

    def check(self, num_latent_frames: int, latent_shape: Sequence[int] | None = None) -> None:
        """Clear errors for given frames outside a clip of ``num_latent_frames`` or of the wrong latent shape."""
        outside = [p for p in self.positions if p >= num_latent_frames]
        if outside:
            raise ValueError(
                f"given frames at latent positions {outside} are outside the clip of {num_latent_frames} latent "
                "frames: generate more frames (--num-frames) or give frames inside the clip"
            )
        if latent_shape is not None:
            b, c, _, h, w = latent_shape
            lat = self.latents
            if lat.shape[1] != c or tuple(lat.shape[3:]) != (h, w) or lat.shape[0] not in (1, b):
                raise ValueError(
                    f"given latents {tuple(lat.shape)} do not fit the clip's latents {tuple(latent_shape)}: encode "
                    "them at the generation's height and width with this model's VAE"
                )

    def to(self, device: torch.device | str) -> FrameConditioning:
        keep = None if self.keep is None else self.keep.to(device)
        return replace(self, latents=self.latents.to(device), keep=keep)

    def fully_given(self) -> list[bool]:
        """Per given frame: True when its whole spatial extent is given (``keep`` all ones)."""
        return list(self._fully_given)

    @cached_property
    def _fully_given(self) -> tuple[bool, ...]:  # computed once: samplers ask at every step
        if self.keep is None:
            return (True,) * self.num_given
        return tuple((self.keep >= 1).flatten(3).all(dim=3).all(dim=0).all(dim=0).tolist())

    def given_prefix(self, limit: int | None = None) -> int:
        """How many leading latent frames 0, 1, ... are fully given (continuation context), at most ``limit``."""
        full = dict(zip(self.positions, self.fully_given()))
        n = 0
        while full.get(n, False) and (limit is None or n < limit):
            n += 1
        return n

    def window(self, start: int, stop: int) -> GivenWindow | None:
        """The given frames of latent frames ``[start, stop)`` as dense tensors, or None when none is given there.

        ``start`` may be negative (FIFO's warm-up slots hold no given frame)."""
        idx = [i for i, p in enumerate(self.positions) if start <= p < stop]
        if not idx:
            return None
        lat = self.latents
        n = stop - start
        known = lat.new_zeros((lat.shape[0], lat.shape[1], n, *lat.shape[3:]))
        kb = 1 if self.keep is None else self.keep.shape[0]
        keep = lat.new_zeros((kb, 1, n, *lat.shape[3:]))
        full = torch.zeros(n, dtype=torch.bool)
        fully = self.fully_given()
        for i in idx:
            f = self.positions[i] - start
            known[:, :, f] = lat[:, :, i]
            keep[:, :, f] = 1.0 if self.keep is None else self.keep[:, :, i].to(lat)
            full[f] = fully[i]
        return GivenWindow(known, keep, full, self.given_level)


@dataclass
class GivenWindow:
    """The given frames of one range of latent frames, dense: what a sampler applies to its state there.

    ``known`` ``[B or 1, C, n, h, w]`` (zeros where nothing is given), ``keep`` ``[B or 1, 1, n, h, w]``
    (0 where nothing is given), ``full`` ``[n]`` bool (frame fully given).
    """

    known: torch.Tensor
    keep: torch.Tensor
    full: torch.Tensor
    given_level: str = "renoise"

    def part(self, start: int, stop: int) -> GivenWindow:
        """Frames ``[start, stop)`` of this window (indices relative to its first frame)."""
        return GivenWindow(
            self.known[:, :, start:stop], self.keep[:, :, start:stop], self.full[start:stop], self.given_level
        )

    def impose(self, x: torch.Tensor, sigma: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Implements RePaint's known-region step (Lugmayr et al. 2022, Alg. 1 line 5) in flow sigmas: ``x`` with
        the given region replaced by ``(1 - s) x_given + s eps`` (fresh ``eps`` from ``generator``) at ``sigma``
        (a number, per frame ``[n]`` or ``[B, n]``). At sigma 0 the given region is the given latents exactly."""
        s = _frame_sigma(sigma, x)
        keep = self.keep.to(x)
        eps = gaussian_noise(x.shape, generator, x.device, x.dtype)
        noisy = (1.0 - s) * self.known.to(x) + s * eps
        noisy = torch.where(s == 0, self.known.to(x).expand_as(x), noisy)  # exact at sigma 0
        return torch.where(keep >= 1, noisy, keep * noisy + (1.0 - keep) * x)

    def clamp(self, x0: torch.Tensor) -> torch.Tensor:
        """The x0 prediction with the given region set to the given latents (exactly where ``keep == 1``)."""
        keep = self.keep.to(x0)
        known = self.known.to(x0).expand_as(x0)
        return torch.where(keep >= 1, known, keep * known + (1.0 - keep) * x0)

    def levels(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-frame levels ``[B, n]`` the model is told: with ``given_level="clean"`` 0 for fully given frames."""
        if self.given_level != "clean" or not bool(self.full.any()):
            return sigma
        return torch.where(self.full.to(sigma.device), torch.zeros_like(sigma), sigma)


def _frame_sigma(sigma: Any, x: torch.Tensor) -> torch.Tensor:
    """A number, ``[n]`` or ``[B, n]`` per-frame sigma as ``[B or 1, 1, n, 1, 1]`` on ``x``'s device."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        return s.view(1, 1, 1, 1, 1)
    if s.ndim == 1:
        return s.view(1, 1, -1, 1, 1)
    return s.view(s.shape[0], 1, s.shape[1], 1, 1)


def renoise_up(x: torch.Tensor, sigma_from: Any, sigma_to: Any, generator: torch.Generator | None = None) -> torch.Tensor:
    """Implements RePaint's resampling jump (Lugmayr et al. 2022, Alg. 1 line 8) in flow sigmas: ``x`` at
    ``sigma_from`` taken up to ``sigma_to >= sigma_from`` by the forward process, ``x' = a x + b z`` with
    ``a = (1 - s_to) / (1 - s_from)``, ``b^2 = s_to^2 - a^2 s_from^2`` (so ``x0`` is kept and the noise grows)."""
    s0 = _frame_sigma(sigma_from, x)
    s1 = _frame_sigma(sigma_to, x)
    a = (1.0 - s1) / (1.0 - s0).clamp_min(1e-12)
    b = (s1**2 - (a * s0) ** 2).clamp_min(0.0).sqrt()
    return a * x + b * gaussian_noise(x.shape, generator, x.device, x.dtype)


# --- pixel frames ---------------------------------------------------------------------------------
@dataclass
class GivenFrames:
    """Pixel frames given at pixel-frame positions of the clip to generate (before VAE encoding).

    ``frames`` ``[T, H, W, 3]`` in [0, 1] (the generation's height and width); ``positions``: the output pixel
    frame of each of the T frames (distinct). ``repaint`` ``[T, H, W]`` in [0, 1] or None: 1 where the frame is
    to be regenerated (VideoPainter's mask: white = repaint), 0 where it is kept; None keeps whole frames.
    ``resample`` / ``given_level``: as in :class:`FrameConditioning`.
    """

    frames: torch.Tensor
    positions: Sequence[int]
    repaint: torch.Tensor | None = None
    resample: int = 1
    given_level: str = "renoise"
    encode_chunk: int = field(default=8)
    """Latent frames per VAE encode call (memory is one chunk; each chunk after the first gets its first pixel
    frame repeated in front as the causal VAE's warm-up)."""

    def __post_init__(self) -> None:
        self.positions = [int(p) for p in self.positions]
        if not isinstance(self.frames, torch.Tensor):
            raise TypeError(
                f"given frames must be a torch.Tensor [T, H, W, 3] in [0, 1], got {type(self.frames).__name__} "
                "(a numpy array: torch.from_numpy(frames))"
            )
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"given frames must be [T, H, W, 3] in [0, 1], got shape {tuple(self.frames.shape)}")
        if self.frames.dtype == torch.uint8:  # what video readers return (torchvision.io.read_video, longgen's)
            self.frames = self.frames.float() / 255.0
        elif not self.frames.is_floating_point():
            raise TypeError(f"given frames must be uint8 (0..255) or float in [0, 1], got {self.frames.dtype}")
        elif self.frames.numel() and (float(self.frames.min()) < -1e-3 or float(self.frames.max()) > 1 + 1e-3):
            lo, hi = float(self.frames.min()), float(self.frames.max())
            hint = " ([-1, 1] input: (frames + 1) / 2)" if lo < 0 else " (0..255 floats: frames / 255)"
            raise ValueError(f"given frames must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
        if len(self.positions) != self.frames.shape[0]:
            raise ValueError(f"{self.frames.shape[0]} given frames but {len(self.positions)} positions: one each")
        if len(set(self.positions)) != len(self.positions) or min(self.positions, default=0) < 0:
            raise ValueError(f"given frame positions must be distinct and >= 0, got {self.positions}")
        if self.repaint is not None and tuple(self.repaint.shape) != tuple(self.frames.shape[:3]):
            raise ValueError(
                f"the repaint mask is {tuple(self.repaint.shape)} but the frames are {tuple(self.frames.shape[:3])} "
                "[T, H, W]: give one mask frame per given frame, at the frames' size"
            )


def latent_index(pixel_frame: int, temporal_compression: int, causal: bool) -> int:
    """The latent frame holding ``pixel_frame`` (causal VAE: frame 0 alone, then ``tc`` per latent frame)."""
    tc = temporal_compression
    if causal and tc > 1:
        return 0 if pixel_frame == 0 else (pixel_frame - 1) // tc + 1
    return pixel_frame // tc


def _pixel_span(k: int, tc: int, causal: bool) -> range:
    """Pixel frames of latent frame ``k``."""
    if causal and tc > 1:
        return range(0, 1) if k == 0 else range(tc * (k - 1) + 1, tc * k + 1)
    return range(tc * k, tc * k + tc)


def _filled_latent_frames(given: GivenFrames, tc: int, causal: bool) -> dict[int, tuple[list[int], list[int]]]:
    """latent frame -> (index into ``given.frames`` for each of its pixel frames, indices actually given)."""
    by_pixel = {p: i for i, p in enumerate(given.positions)}
    out: dict[int, tuple[list[int], list[int]]] = {}
    for k in sorted({latent_index(p, tc, causal) for p in given.positions}):
        span = list(_pixel_span(k, tc, causal))
        present = [p for p in span if p in by_pixel]
        fill = [by_pixel[min(present, key=lambda q: (abs(q - p), q))] for p in span]  # nearest, earlier on ties
        out[k] = (fill, [by_pixel[p] for p in present])
    return out


def _runs(keys: list[int], chunk: int) -> list[list[int]]:
    """Consecutive latent frames grouped into runs of at most ``chunk``."""
    runs: list[list[int]] = []
    for k in keys:
        if runs and runs[-1][-1] == k - 1 and len(runs[-1]) < chunk:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def encode_given_frames(adapter: Any, given: GivenFrames, num_latent_frames: int | None = None) -> FrameConditioning:
    """Encode pixel :class:`GivenFrames` once with ``adapter.encode_video`` into a :class:`FrameConditioning`.

    Latent positions and partially covered latent frames follow the module docstring. Runs of consecutive given
    latent frames are encoded together, ``given.encode_chunk`` at a time; a run that does not start at latent
    frame 0 of a causal VAE gets its first pixel frame repeated in front (the VAE's lone first frame) and that
    latent dropped, so every given latent is a "later" latent as in a clip. ``num_latent_frames``: the clip's
    length, for a clear error on frames outside it.
    """
    tc, causal = int(adapter.temporal_compression), bool(adapter.causal_vae)
    plan = _filled_latent_frames(given, tc, causal)
    keys = sorted(plan)
    if num_latent_frames is not None and keys and keys[-1] >= num_latent_frames:
        last = max(given.positions)
        raise ValueError(
            f"a given frame at pixel frame {last} is outside the clip of {adapter.num_pixel_frames(num_latent_frames)} "
            "frames: raise --num-frames or give frames inside the clip"
        )
    if num_latent_frames is not None and given.repaint is None and len(keys) == num_latent_frames:
        # a latent frame holds several pixel frames: one given pixel frame fixes all of them
        raise ValueError(
            f"the given frames fill every one of the clip's {num_latent_frames} latent frames (each holds up to {tc} "
            f"pixel frames, and one given pixel frame fixes its whole latent frame): nothing is left to generate. "
            f"Raise --num-frames to at least {adapter.num_pixel_frames(num_latent_frames + 1)}, or give fewer frames"
        )
    pieces = []
    for run in _runs(keys, max(1, int(given.encode_chunk))):
        index = [i for k in run for i in plan[k][0]]
        warm = causal and tc > 1 and run[0] > 0
        pixels = given.frames[[index[0]] * warm + index]  # [T, H, W, 3]
        z = adapter.encode_video(pixels.unsqueeze(0).float())  # [1, C, n(+1), h, w]
        pieces.append(z[:, :, 1:] if warm else z)
    latents = torch.cat(pieces, dim=2).float()
    keep = None
    if given.repaint is not None:
        keep = _latent_keep(given, plan, keys, latents.shape[3:], latents.device)
    return FrameConditioning(latents, keys, keep, given.resample, given.given_level)


def _latent_keep(given: GivenFrames, plan, keys: list[int], grid: Sequence[int], device) -> torch.Tensor:
    """``[1, 1, K, h, w]`` keep masks: 1 - repaint, intersected over each latent frame's given pixel frames and
    min-pooled to the latent grid (kept only where every pixel is kept)."""
    keep_px = 1.0 - given.repaint.float().clamp(0, 1)  # [T, H, W]
    h, w = grid
    height, width = keep_px.shape[1:]
    if height % h or width % w:
        raise ValueError(f"mask of {height}x{width} pixels does not tile the {h}x{w} latent grid")
    out = []
    for k in keys:
        m = keep_px[plan[k][1]].amin(dim=0)  # [H, W]
        pooled = -torch.nn.functional.max_pool2d(-m[None, None], (height // h, width // w))  # min-pool
        out.append(pooled[0, 0])
    return torch.stack(out)[None, None].to(device)  # [1, 1, K, h, w]


def pixel_frames_of(num_latent_frames: int, temporal_compression: int, causal: bool) -> int:
    """Pixel frames of a clip of ``num_latent_frames`` (the layout of :func:`latent_index`)."""
    tc = temporal_compression
    return tc * (num_latent_frames - 1) + 1 if (causal and tc > 1) else tc * num_latent_frames


def latent_frames_covering(num_pixel_frames: int, temporal_compression: int, causal: bool) -> int:
    """Latent frames that hold pixel frames ``0 .. num_pixel_frames - 1`` (the last may be partly covered)."""
    return latent_index(num_pixel_frames - 1, temporal_compression, causal) + 1 if num_pixel_frames > 0 else 0



# --- what the pipeline does with them -------------------------------------------------------------
def prepare_conditioning(
    adapter: Any, conditioning: FrameConditioning | GivenFrames | None, latent_shape: Sequence[int], sampler_fn: Any,
    sampler_name: str = "this sampler",
) -> dict[str, FrameConditioning]:
    """The ``conditioning=`` argument of a sampler call ({} without given frames): pixel :class:`GivenFrames`
    encoded once, checked against the clip's latent shape, on the adapter's device."""
    if conditioning is None:
        return {}
    import inspect

    if "conditioning" not in inspect.signature(sampler_fn).parameters:
        raise ValueError(
            f"sampler {sampler_name!r} takes no given frames (its function has no conditioning= argument); use "
            "full, sliding, fifo, df or causal"
        )
    if isinstance(conditioning, GivenFrames):
        height = latent_shape[3] * adapter.spatial_compression
        width = latent_shape[4] * adapter.spatial_compression
        if tuple(conditioning.frames.shape[1:3]) != (height, width):
            raise ValueError(
                f"given frames are {conditioning.frames.shape[2]}x{conditioning.frames.shape[1]} but the clip is "
                f"{width}x{height}: resize them to the generation's --width/--height"
            )
        conditioning = encode_given_frames(adapter, conditioning, latent_shape[2])
    if not isinstance(conditioning, FrameConditioning):
        raise TypeError(f"conditioning must be FrameConditioning or GivenFrames, got {type(conditioning).__name__}")
    conditioning.check(latent_shape[2], latent_shape)
    return {"conditioning": conditioning.to(adapter.device)}


@dataclass
class OutputFraming:
    """What an mp4 holds around the generated frames: ``head`` frames written first (the input clip before a
    continuation), the first ``skip`` generated frames dropped (its context, already in ``head``), and ``tail``
    frames written last (the rest of a transition's end clip). ``head``/``tail``: uint8 ``[n, H, W, 3]``."""

    head: Any = None
    skip: int = 0
    tail: Any = None

    def total(self, num_generated: int) -> int:
        """Frames in the mp4 for ``num_generated`` generated frames."""
        n = lambda a: 0 if a is None else len(a)  # noqa: E731
        return n(self.head) + num_generated - self.skip + n(self.tail)
