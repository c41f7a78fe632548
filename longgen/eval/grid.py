"""Side-by-side comparison of clips: a PNG grid of frames sampled over time and an mp4 of the rows playing.

Rows are clips (ground truth, the VAE ceiling, each method), columns are frames sampled evenly over time, each
row labelled on its left with PIL's built-in bitmap font (no font files). The mp4 stacks the same rows and
plays them together; a shorter row holds its last frame, so every row covers the same time axis.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["GRID_BACKGROUND", "grid_layout", "write_comparison_grid"]

GRID_BACKGROUND = (255, 255, 255)
"""Colour of the label column, the header and the gaps between cells."""
_TEXT = (0, 0, 0)
_PAD = 4  # pixels of background between cells and around the labels
_MIN_CELL = 96  # small clips (the demo's 32x32) are upscaled by an integer factor to about this size


def _load_rows(rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{label: uint8 [N, H, W, 3]}`` from video paths or frame arrays; every row must share one frame size."""
    from longgen.io import read_video, to_uint8

    if not rows:
        raise ValueError("write_comparison_grid needs at least one row: pass {label: video path or frames}")
    loaded: dict[str, np.ndarray] = {}
    for label, source in rows.items():
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise ValueError(f"row {label!r}: no video at {os.fspath(source)!r}")
            frames = read_video(source)
        elif isinstance(source, (np.ndarray, torch.Tensor)):
            frames = to_uint8(source)
        else:
            raise ValueError(
                f"row {label!r}: expected a video path or frames [N, H, W, 3], got {type(source).__name__}"
            )
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"row {label!r}: frames must be a non-empty [N, H, W, 3] array, got {frames.shape}")
        loaded[str(label)] = frames
    sizes = {label: f.shape[1:3] for label, f in loaded.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the rows have different frame sizes {sizes}: resize them to one size first")
    return loaded


def _font():
    from PIL import ImageFont

    # the bitmap font Pillow ships inside itself: no font file is read or downloaded
    loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    return loader()


def grid_layout(labels: list[str], frame_size: tuple[int, int], num_columns: int) -> dict[str, int]:
    """Pixel layout of the grid: ``scale`` (integer upscaling of each frame), ``cell_h`` / ``cell_w`` (a
    scaled frame), ``label_w`` (the label column), ``header_h`` (the frame-number row), ``pad`` and the PNG's
    ``height`` / ``width``. The mp4 uses the same rows without the header. Sizes are even (H.264 4:2:0)."""
    font = _font()
    height, width = frame_size
    scale = max(1, math.ceil(_MIN_CELL / max(height, width)))
    text_w = max(font.getbbox(label)[2] for label in labels)
    text_h = max(font.getbbox("Ag0")[3], 1)
    label_w = text_w + 2 * _PAD
    label_w += label_w % 2
    header_h = text_h + 2 * _PAD
    header_h += header_h % 2
    cell_h, cell_w = height * scale, width * scale
    row_h, col_w = cell_h + _PAD, cell_w + _PAD
    body_h = len(labels) * row_h + _PAD
    body_h += body_h % 2
    grid_w = label_w + num_columns * col_w
    grid_w += grid_w % 2
    return {
        "scale": scale,
        "cell_h": cell_h,
        "cell_w": cell_w,
        "label_w": label_w,
        "header_h": header_h,
        "pad": _PAD,
        "body_h": body_h,
        "height": header_h + body_h,
        "width": grid_w,
    }


def _draw_body(frames_per_row: list[np.ndarray], labels: list[str], layout: dict, num_columns: int):
    """The labelled rows (no header) as a PIL image: row ``r`` column ``c`` shows ``frames_per_row[r][c]``."""
    from PIL import Image, ImageDraw

    canvas = np.full((layout["body_h"], layout["width"], 3), GRID_BACKGROUND, dtype=np.uint8)
    s, pad = layout["scale"], layout["pad"]
    for r, frames in enumerate(frames_per_row):
        top = pad + r * (layout["cell_h"] + pad)
        for c in range(num_columns):
            left = layout["label_w"] + c * (layout["cell_w"] + pad)
            cell = frames[c].repeat(s, axis=0).repeat(s, axis=1)  # nearest neighbour: pixels stay visible
            canvas[top : top + layout["cell_h"], left : left + layout["cell_w"]] = cell
    image = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(image), _font()
    for r, label in enumerate(labels):
        top = pad + r * (layout["cell_h"] + pad)
        text_h = font.getbbox(label)[3]
        draw.text((pad, top + (layout["cell_h"] - text_h) // 2), label, fill=_TEXT, font=font)
    return image


def write_comparison_grid(
    rows: Mapping[str, Any],
    out_png: str | os.PathLike,
    out_mp4: str | os.PathLike | None = None,
    num_samples: int = 8,
    fps: float = 16.0,
) -> dict[str, Any]:
    """Write a labelled side-by-side comparison of clips: ``rows`` is ``{label: video path or frames
    [N, H, W, 3]}`` (uint8, or float in [0, 1]), in display order.

    ``out_png``: one row per clip, ``num_samples`` columns of frames sampled evenly over the longest clip
    (first and last frame included; a shorter clip shows its last frame past its end), frame numbers on top.
    ``out_mp4`` (optional): the same labelled rows stacked, playing together for the longest clip's length
    (shorter rows hold their last frame). Both are written atomically (a temporary sibling renamed into
    place; :func:`longgen.files.atomic_path`, :class:`longgen.io.VideoWriter`). Returns ``{"png", "mp4",
    "labels", "frame_indices", "num_frames", "layout"}``.
    """
    from PIL import Image, ImageDraw

    from longgen.files import atomic_path
    from longgen.io import VideoWriter, check_video_path

    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if out_mp4 is not None:
        check_video_path(out_mp4)  # a bad path fails before any work
    loaded = _load_rows(rows)
    labels = list(loaded)
    length = max(len(f) for f in loaded.values())
    indices = [int(round(i)) for i in np.linspace(0, length - 1, min(num_samples, length))]
    layout = grid_layout(labels, next(iter(loaded.values())).shape[1:3], len(indices))

    def at(frames: np.ndarray, t: int) -> np.ndarray:
        return frames[min(t, len(frames) - 1)]  # past its end a shorter row holds its last frame

    body = _draw_body([[at(f, t) for t in indices] for f in loaded.values()], labels, layout, len(indices))
    image = Image.new("RGB", (layout["width"], layout["height"]), GRID_BACKGROUND)
    image.paste(body, (0, layout["header_h"]))
    draw, font = ImageDraw.Draw(image), _font()
    for c, t in enumerate(indices):
        left = layout["label_w"] + c * (layout["cell_w"] + layout["pad"])
        draw.text((left, layout["pad"]), f"t={t}", fill=_TEXT, font=font)
    with atomic_path(out_png) as tmp:
        image.save(tmp, format="PNG")
    if out_mp4 is not None:
        video_w = layout["label_w"] + layout["cell_w"] + layout["pad"]
        video_layout = {**layout, "width": video_w + video_w % 2}  # one column: the rows at frame t
        with VideoWriter(out_mp4, fps=fps, total_frames=length) as writer:
            for t in range(length):
                frame = _draw_body([[at(f, t)] for f in loaded.values()], labels, video_layout, 1)
                writer.write(np.asarray(frame)[None])
    return {
        "png": os.fspath(out_png),
        "mp4": os.fspath(out_mp4) if out_mp4 is not None else None,
        "labels": labels,
        "frame_indices": indices,
        "num_frames": length,
        "layout": layout,
    }
