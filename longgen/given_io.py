"""Given frames from files: ``longgen generate --video / --end-video / --frames-at / --mask ...`` as GivenFrames.

Four uses of :mod:`longgen.conditioning`, chosen by the flags:

* **continue** (``--video in.mp4``): the input's last ``--context-frames`` frames are output frames
  ``0 .. N-1``; the rest of ``--num-frames`` (which counts them) is new. ``--keep-input`` writes the whole input
  and then the new frames, as one mp4 at the input's fps.
* **transition** (``--video a.mp4 --end-video b.mp4``, SEINE): a's last N frames start the clip, b's first N end
  it; the frames between are generated. ``--keep-input``: a, the transition, then the rest of b.
* **keyframes** (``--frames-at 0:first.png 80:last.png``): images at output pixel frames (with or without a video).
* **repaint** (``--video in.mp4`` with ``--mask mask.mp4``, ``--mask-image``, ``--mask-box`` or ``--outpaint``,
  VideoPainter's task, training-free): every frame of the input is given except the masked region (white =
  repaint), for a clip as long as the input (or ``--num-frames``, at most that).

Frames are resized to the generation's height and width (bilinear); masks must have the video's own size and
are resized with it (nearest). Every bad input is a ``ValueError`` that names the flag and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .conditioning import GivenFrames, OutputFraming

logger = logging.getLogger(__name__)

__all__ = ["GivenInputs", "GivenPlan", "plan_given_frames"]


@dataclass
class GivenInputs:
    """The given-frame flags of ``longgen generate`` (paths and strings, as parsed)."""

    video: str | None = None
    end_video: str | None = None
    frames_at: Sequence[str] = ()
    mask: str | None = None
    mask_image: str | None = None
    mask_box: str | None = None
    outpaint: str | None = None
    context_frames: int | None = None
    keep_input: bool = False
    resample: int = 1
    given_level: str = "renoise"

    @property
    def repaints(self) -> bool:
        return any(v is not None for v in (self.mask, self.mask_image, self.mask_box, self.outpaint))

    @property
    def any(self) -> bool:
        return self.video is not None or self.end_video is not None or bool(self.frames_at) or self.repaints


@dataclass
class GivenPlan:
    """What the flags resolve to: the given frames, the clip length and size, the input's fps, the mp4 framing."""

    given: GivenFrames | None
    num_frames: int | None
    height: int
    width: int
    fps: float | None = None
    framing: OutputFraming | None = None
    notes: list[str] = field(default_factory=list)


def missing_file(flag: str, path: str) -> FileNotFoundError:
    """The error for a flag's input file that is not a file: a folder, or nothing at all."""
    if os.path.isdir(path):
        return FileNotFoundError(f"{flag} {path!r} is a folder: pass a file inside it")
    return FileNotFoundError(f"{flag} {path!r} does not exist")


def _read_clip(path: str, flag: str, indices: Sequence[int] | None = None) -> np.ndarray:
    from .io import read_video

    if not os.path.isfile(path):
        raise missing_file(flag, path)
    try:
        return read_video(path, indices)
    except (ValueError, OSError) as err:
        raise ValueError(f"{flag} {path!r} is not a readable video ({err}); pass an mp4 (or any FFmpeg format)") from None


def _probe(path: str, flag: str):
    from .io import probe_video

    if not os.path.isfile(path):
        raise missing_file(flag, path)
    try:
        return probe_video(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{flag} {path!r} is not a readable video ({err}); pass an mp4 (or any FFmpeg format)") from None


def _read_image(path: str, flag: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise missing_file(flag, path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{flag} {path!r} is not a readable image ({err}); pass a PNG or JPEG file") from None


def _resize(frames: np.ndarray, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 ``[T, h, w, 3]`` (or ``[T, h, w]``) -> float ``[T, height, width(, 3)]`` in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
    gray = x.ndim == 3
    x = x[..., None] if gray else x
    if tuple(x.shape[1:3]) != (height, width):
        x = x.permute(0, 3, 1, 2)
        kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
        x = torch.nn.functional.interpolate(x, size=(height, width), mode=mode, **kwargs).permute(0, 2, 3, 1)
    x = x.clamp(0, 1)
    return x[..., 0] if gray else x


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def largest_valid_length(num_frames: int, adapter: Any) -> int:
    """The longest clip of at most ``num_frames`` pixel frames this model's VAE can make."""
    tc = adapter.temporal_compression
    if adapter.causal_vae and tc > 1:
        return (num_frames - 1) // tc * tc + 1
    return num_frames // tc * tc


def default_context_frames(adapter: Any) -> int:
    """``--context-frames`` default: a quarter of the model's native clip, in whole latent frames."""
    native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
    return adapter.num_pixel_frames(max(1, native_latent // 4))


def _check_flags(inputs: GivenInputs) -> None:
    if inputs.video is None:
        if inputs.end_video is not None:
            raise ValueError("--end-video is the end of a transition: also give its start with --video")
        if inputs.repaints:
            raise ValueError("--mask / --mask-image / --mask-box / --outpaint repaint a video: give it with --video")
        if inputs.keep_input:
            raise ValueError("--keep-input writes the input video before the new frames: give it with --video")
    if inputs.repaints:
        if inputs.end_video is not None:
            raise ValueError("--end-video makes a transition, masks repaint one video: use one or the other")
        if inputs.keep_input:
            raise ValueError("--keep-input is for continuations and transitions; a repainted video replaces its input")
        if sum(v is not None for v in (inputs.mask, inputs.mask_image, inputs.mask_box, inputs.outpaint)) > 1:
            raise ValueError("give one of --mask, --mask-image, --mask-box, --outpaint")
    if inputs.context_frames is not None and inputs.context_frames < 1:
        raise ValueError(f"--context-frames must be >= 1, got {inputs.context_frames}")
    if inputs.context_frames is not None and (inputs.video is None or inputs.repaints):
        raise ValueError(
            "--context-frames sets how many frames of --video start the clip: it needs --video, and a repaint "
            "(--mask, --mask-image, --mask-box, --outpaint) keeps the whole video; drop --context-frames"
        )
    if inputs.resample != 1 and not inputs.any:
        raise ValueError(
            "--resample-steps re-noises around given frames (--video, --end-video, --frames-at, a mask): there are "
            "none here; drop it"
        )


def plan_given_frames(
    inputs: GivenInputs, adapter: Any, num_frames: int | None, height: int | None, width: int | None
) -> GivenPlan:
    """Read and check every given-frame input; the :class:`GivenPlan` to generate from (given None: no flags)."""
    _check_flags(inputs)
    _, native_h, native_w = adapter.native_video_size
    height, width = height or native_h, width or native_w
    plan = GivenPlan(None, num_frames, height, width)
    if not inputs.any:
        return plan
    frames, positions, repaint = [], [], None
    if inputs.video is not None and inputs.repaints:
        frames, repaint = _repaint_frames(inputs, adapter, plan)
        positions = list(range(len(frames)))
    elif inputs.video is not None:
        frames, positions = _context_frames(inputs, adapter, plan)
    if plan.num_frames is None:
        plan.num_frames = adapter.native_video_size[0]
    keys = _keyframes(inputs.frames_at, plan)
    if keys:
        taken = set(positions)
        clash = sorted(p for p, _ in keys if p in taken)
        if clash:
            raise ValueError(f"--frames-at positions {clash} are already given by --video; pick other frames")
        positions += [p for p, _ in keys]
        frames = list(frames) + [f for _, f in keys]
        if repaint is not None:
            repaint = torch.cat([repaint, torch.zeros(len(keys), height, width)])
    stacked = torch.stack(list(frames)) if isinstance(frames, list) else frames
    last = max(positions)
    if plan.num_frames is not None and last >= plan.num_frames:
        raise ValueError(
            f"a given frame at pixel frame {last} is outside the clip of {plan.num_frames} frames: raise --num-frames "
            f"to at least {last + 1} (and a length the VAE takes) or give frames inside the clip"
        )
    plan.given = GivenFrames(stacked, positions, repaint, inputs.resample, inputs.given_level)
    return plan


def _context_frames(inputs: GivenInputs, adapter: Any, plan: GivenPlan) -> tuple[torch.Tensor, list[int]]:
    """Continue / transition: the input's last N frames at 0..N-1 (and the end video's first N at the end)."""
    meta = _probe(inputs.video, "--video")
    n = inputs.context_frames or default_context_frames(adapter)
    if meta.num_frames < n:
        raise ValueError(
            f"--video {inputs.video!r} has {meta.num_frames} frames, fewer than the {n} context frames: pass "
            f"--context-frames {meta.num_frames} or less, or a longer video"
        )
    plan.fps = meta.fps
    if plan.num_frames is None:
        plan.num_frames = adapter.native_video_size[0]
    extra = n if inputs.end_video is not None else 0
    if plan.num_frames <= n + extra:
        raise ValueError(
            f"--num-frames {plan.num_frames} counts the {n + extra} given context frames and leaves none to generate: "
            f"raise --num-frames (e.g. {largest_valid_length(n + extra + 4 * adapter.temporal_compression, adapter)})"
        )
    full = _read_clip(inputs.video, "--video", None if inputs.keep_input else range(meta.num_frames - n, meta.num_frames))
    tail = _resize(full[-n:], plan.height, plan.width)
    frames, positions = [tail], list(range(n))
    head = _to_uint8(_resize(full, plan.height, plan.width)) if inputs.keep_input else None
    end_tail = None
    if inputs.end_video is not None:
        end_meta = _probe(inputs.end_video, "--end-video")
        if end_meta.num_frames < n:
            raise ValueError(
                f"--end-video {inputs.end_video!r} has {end_meta.num_frames} frames, fewer than the {n} context "
                f"frames: pass --context-frames {end_meta.num_frames} or less"
            )
        if meta.fps and end_meta.fps and abs(meta.fps - end_meta.fps) > 0.01 * meta.fps:
            logger.warning(
                "--end-video runs at %.3g fps and --video at %.3g: the transition is written at %.3g fps, so the end "
                "clip plays %.2gx as fast (resample one of them to the other's rate for a seamless bridge)",
                end_meta.fps, meta.fps, meta.fps, end_meta.fps / meta.fps,
            )
        end = _read_clip(inputs.end_video, "--end-video", None if inputs.keep_input else range(n))
        frames.append(_resize(end[:n], plan.height, plan.width))
        positions += list(range(plan.num_frames - n, plan.num_frames))
        end_tail = _to_uint8(_resize(end[n:], plan.height, plan.width)) if inputs.keep_input and len(end) > n else None
    if inputs.keep_input:
        plan.framing = OutputFraming(head=head, skip=n, tail=end_tail)
    return torch.cat(frames), positions


def _keyframes(specs: Sequence[str], plan: GivenPlan) -> list[tuple[int, torch.Tensor]]:
    """``--frames-at P:IMAGE ...`` as (pixel frame, frame ``[H, W, 3]``)."""
    out = []
    for spec in specs or ():
        position, sep, path = str(spec).partition(":")
        try:
            index = int(position)
        except ValueError:
            index = -1
        if not sep or not path or index < 0:
            raise ValueError(f"--frames-at takes FRAME:IMAGE pairs such as 0:first.png 80:last.png, got {spec!r}")
        out.append((index, _resize(_read_image(path, "--frames-at")[None], plan.height, plan.width)[0]))
    seen = [p for p, _ in out]
    if len(set(seen)) != len(seen):
        raise ValueError(f"--frames-at gives frame positions more than once: {seen}")
    return out


def _margins(text: str) -> tuple[int, int, int, int]:
    """``--outpaint N`` or ``L,T,R,B`` pixel margins."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 4
    if len(values) != 4 or min(values) < 0 or max(values) == 0:
        raise ValueError(f"--outpaint takes N or LEFT,TOP,RIGHT,BOTTOM pixel margins (>= 0, not all 0), got {text!r}")
    return values[0], values[1], values[2], values[3]


def _box(text: str, height: int, width: int) -> tuple[int, int, int, int]:
    """``--mask-box X0,Y0,X1,Y1`` in output pixels (the repainted rectangle)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--mask-box takes X0,Y0,X1,Y1 pixel corners, got {text!r}") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"--mask-box {text} is not a rectangle inside the {width}x{height} output: need 0 <= X0 < X1 <= {width} "
            f"and 0 <= Y0 < Y1 <= {height}"
        )
    return x0, y0, x1, y1


def _repaint_frames(inputs: GivenInputs, adapter: Any, plan: GivenPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Repaint / outpaint: every input frame given, ``repaint`` ``[T, H, W]`` 1 where it is regenerated."""
    meta = _probe(inputs.video, "--video")
    plan.fps = meta.fps
    longest = largest_valid_length(meta.num_frames, adapter)
    if longest < 1:
        raise ValueError(f"--video {inputs.video!r} has {meta.num_frames} frames, too few for this model's VAE")
    if plan.num_frames is not None and plan.num_frames > meta.num_frames:
        raise ValueError(
            f"--num-frames {plan.num_frames} is longer than --video's {meta.num_frames} frames: a repainted clip is at "
            f"most the input's length (omit --num-frames for {longest})"
        )
    n = plan.num_frames = plan.num_frames or longest
    raw = _read_clip(inputs.video, "--video", range(n))
    h, w = plan.height, plan.width
    if inputs.outpaint is not None:
        left, top, right, bottom = _margins(inputs.outpaint)
        if left + right >= w or top + bottom >= h:
            raise ValueError(f"--outpaint {inputs.outpaint} leaves no room for the video in the {w}x{h} output")
        frames = torch.full((n, h, w, 3), 0.5)
        frames[:, top : h - bottom, left : w - right] = _resize(raw, h - top - bottom, w - left - right)
        repaint = torch.ones(n, h, w)
        repaint[:, top : h - bottom, left : w - right] = 0.0
        return frames, repaint
    frames = _resize(raw, h, w)
    if inputs.mask_box is not None:
        x0, y0, x1, y1 = _box(inputs.mask_box, h, w)
        repaint = torch.zeros(n, h, w)
        repaint[:, y0:y1, x0:x1] = 1.0
        return frames, repaint
    if inputs.mask is not None:
        mask_meta = _probe(inputs.mask, "--mask")
        if mask_meta.num_frames < n:
            raise ValueError(f"--mask has {mask_meta.num_frames} frames but {n} are repainted: give one mask frame each")
        masks = _read_clip(inputs.mask, "--mask", range(n))
    else:
        masks = _read_image(inputs.mask_image, "--mask-image")[None].repeat(n, axis=0)
    flag = "--mask" if inputs.mask is not None else "--mask-image"
    if tuple(masks.shape[1:3]) != tuple(raw.shape[1:3]):
        raise ValueError(
            f"{flag} is {masks.shape[2]}x{masks.shape[1]} but --video is {raw.shape[2]}x{raw.shape[1]}: the mask must "
            "have the video's size (white = repaint)"
        )
    gray = masks.mean(axis=-1).astype(np.uint8)  # [T, h, w]
    repaint = (_resize(gray, h, w, mode="nearest") > 0.5).float()
    return frames, repaint
