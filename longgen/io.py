"""Video files: a streaming mp4 writer (constant memory in clip length) and a decord reader."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import numpy as np
import torch

logger = logging.getLogger(__name__)


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` in [0, 1] (float) or uint8 -> contiguous uint8 array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(frames)


class VideoWriter:
    """Append frames to an mp4 as they are produced (H.264 through imageio-ffmpeg's bundled ffmpeg).

    Frames are piped straight to the encoder, so memory does not grow with the number of frames::

        with VideoWriter("out.mp4", fps=16) as writer:
            for block in frame_blocks:        # [n, H, W, 3] each
                writer.write(block)
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16.0, quality: int = 18):
        self.path = os.fspath(path)
        self.fps = fps
        self.crf = quality
        self.num_frames = 0
        self._gen = None
        self._size: tuple[int, int] | None = None
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)

    def _open(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        self._size = (height, width)
        # yuv420p needs even sizes: pad odd sizes by one pixel instead of failing.
        pad = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"] if (height % 2 or width % 2) else []
        self._gen = imageio_ffmpeg.write_frames(
            self.path,
            (width, height),
            fps=self.fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            output_params=["-crf", str(self.crf), *pad],
        )
        self._gen.send(None)

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames ``[n, H, W, 3]`` (float in [0, 1] or uint8)."""
        frames = to_uint8(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames [n, H, W, 3], got shape {tuple(frames.shape)}")
        if self._gen is None:
            self._open(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]} mid-video")
        for frame in frames:
            self._gen.send(frame.tobytes())
        self.num_frames += len(frames)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames: Iterable[torch.Tensor | np.ndarray], fps: float = 16.0) -> int:
    """Write an iterable of frame blocks ``[n, H, W, 3]`` to ``path``; returns the frame count."""
    with VideoWriter(path, fps=fps) as writer:
        for block in frames:
            writer.write(block)
    return writer.num_frames


def read_video(path: str | os.PathLike, indices: list[int] | None = None) -> np.ndarray:
    """Read frames ``[N, H, W, 3]`` uint8 with decord; a clear error names an unreadable file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist")
    try:
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        n = len(reader)
    except Exception as err:  # decord raises its own DECORDError and RuntimeError types
        raise ValueError(f"cannot decode video {path!r}: {err}") from err
    if n == 0:
        raise ValueError(f"video {path!r} has no frames")
    idx = list(range(n)) if indices is None else list(indices)
    try:
        return reader.get_batch(idx).asnumpy()
    except Exception as err:
        # decord 0.6 mis-sizes some frame widths (e.g. 48 px); PyAV decodes those correctly.
        logger.warning("decord failed on %s (%s); decoding with PyAV instead", path, err)
        return _read_video_av(path, idx)


def _read_video_av(path: str, indices: list[int]) -> np.ndarray:
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in indices])


def video_info(path: str | os.PathLike) -> dict:
    """Frame count, fps and size of a video file (decord)."""
    import decord

    reader = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0), num_threads=1)
    h, w = reader[0].shape[:2]
    return {"num_frames": len(reader), "fps": float(reader.get_avg_fps()), "height": h, "width": w}
