"""Video files and safe output paths: a streaming mp4 writer, readers behind one interface, atomic writes.

* :class:`VideoWriter` pipes frames to FFmpeg (H.264, constant memory in clip length) under a hidden
  temporary name and renames the file into place only once FFmpeg has exited cleanly, so a clip
  under its final name is always complete; :meth:`VideoWriter.abort` keeps what was written of an
  interrupted clip under a name that says so (``clip.partial-45of257.mp4``).
* :func:`read_video` / :func:`probe_video` decode with one of three backends: ``torchcodec`` (PyTorch's
  own decoder, the default where it loads), ``decord`` and ``pyav``.
* :func:`atomic_path` / :func:`atomic_dir` write any file or folder under a temporary sibling name and
  rename it into place on success; :func:`chmod_umask` gives them the permissions of a plain ``open``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .files import atomic_dir, atomic_path, chmod_umask, remove_path, temp_sibling  # noqa: F401  (atomic_*: re-exported)

logger = logging.getLogger(__name__)

__all__ = [
    "VIDEO_BACKENDS",
    "VideoMeta",
    "VideoWriteError",
    "VideoWriter",
    "atomic_dir",
    "atomic_path",
    "available_backends",
    "backend_error",
    "check_video_path",
    "partial_path",
    "chmod_umask",
    "probe_video",
    "read_video",
    "resolve_backend",
    "to_uint8",
    "video_info",
    "write_video",
]


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` in [0, 1] (float) or uint8 -> contiguous uint8 array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(frames)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")
"""Containers :class:`VideoWriter` writes (H.264 in each); anything else is refused up front."""


class VideoWriteError(RuntimeError):
    """FFmpeg failed or wrote nothing; the message holds the end of FFmpeg's own error output."""


def check_video_path(path: str | os.PathLike) -> str:
    """The output path as a string, or a ``ValueError`` that names the fix (checked before any work)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        example = os.path.join(path, "clip.mp4")
        raise ValueError(f"{path!r} is a folder: name a file inside it, e.g. {example}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"cannot write {path!r}: longgen writes H.264 video, use .mp4 (or .mov / .mkv), "
            f"not {suffix or 'a name without a suffix'}"
        )
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):  # the first existing ancestor must be a writable folder
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"cannot write {path!r}: {probe!r} is a file, not a folder; pick another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path!r}: no write permission in {probe!r}; pick another path")
    return path


def partial_path(path: str | os.PathLike, num_frames: int, total_frames: int | None = None) -> str:
    """Where an interrupted clip is kept: ``clip.mp4`` -> ``clip.partial-45of257.mp4`` (``.partial-45``)."""
    stem, suffix = os.path.splitext(os.fspath(path))
    of = f"of{total_frames}" if total_frames is not None else ""
    return f"{stem}.partial-{num_frames}{of}{suffix}"


class VideoWriter:
    """Append frames to an mp4 as they are produced (H.264 through imageio-ffmpeg's bundled FFmpeg).

    Frames are piped straight to the encoder, so memory does not grow with the number of frames::

        with VideoWriter("out.mp4", fps=16) as writer:
            for block in frame_blocks:        # [n, H, W, 3] each
                writer.write(block)

    The path is checked at construction (a folder, a parent that is a file, or a suffix other than
    .mp4 / .mov / .mkv is a ``ValueError`` naming the fix). FFmpeg writes to a hidden temporary
    sibling; :meth:`close` checks FFmpeg's exit status and the file's size, then renames it into
    place (``os.replace``), or removes it and raises :class:`VideoWriteError` with FFmpeg's error
    output. With ``total_frames`` set, closing after fewer frames is not a success: the clip is kept
    as :func:`partial_path` and :class:`VideoWriteError` says so. Leaving the ``with`` block on an
    exception discards the clip; call :meth:`abort` to keep the partial one.
    """

    def __init__(
        self, path: str | os.PathLike, fps: float = 16.0, quality: int = 18, total_frames: int | None = None
    ):
        self.path = check_video_path(path)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.crf = quality
        self.total_frames = total_frames
        self.num_frames = 0
        self.closed = False
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._tmp: str | None = None
        self._size: tuple[int, int] | None = None

    def _open(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._tmp = temp_sibling(self.path, directory=False)
        self._size = (height, width)
        # yuv420p needs even sizes: pad odd sizes by one pixel instead of failing.
        pad = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"] if (height % 2 or width % 2) else []
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-r", str(Fraction(self.fps).limit_denominator()), "-i", "-",
            "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(self.crf), *pad, self._tmp,
        ]  # fmt: skip
        # stderr to a file, not a pipe: a pipe nobody reads can fill and stall FFmpeg.
        self._stderr = tempfile.TemporaryFile()
        # Own session: Ctrl-C reaches Python only, so abort() can still finish the partial clip.
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True
        )

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames ``[n, H, W, 3]`` (float in [0, 1] or uint8)."""
        if self.closed:
            raise ValueError(f"the writer of {self.path!r} is already closed")
        frames = to_uint8(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames [n, H, W, 3], got shape {tuple(frames.shape)}")
        if self._proc is None:
            self._open(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]} mid-video")
        try:
            self._proc.stdin.write(frames.tobytes())
        except (BrokenPipeError, OSError) as err:
            code = self._proc.wait()
            message = self._fail(f"FFmpeg stopped while writing frame {self.num_frames} (exit status {code})")
            raise VideoWriteError(message) from err
        self.num_frames += len(frames)

    def _finish(self) -> int:
        """Close FFmpeg's input and wait for it; its exit status."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self._proc.stdin.close()
        return self._proc.wait()

    def _stderr_tail(self, limit: int = 2000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return text[-limit:]

    def _fail(self, what: str) -> str:
        """Remove the temporary file; the error message with FFmpeg's output."""
        tail = self._stderr_tail()
        self._cleanup()
        return f"could not write {self.path!r}: {what}" + (f"; FFmpeg said:\n{tail}" if tail else "")

    def _cleanup(self) -> None:
        self.closed = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._tmp is not None:
            remove_path(self._tmp)
            self._tmp = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _encode_ok(self) -> str | None:
        """Finish FFmpeg; None when the temporary file is complete, else what went wrong."""
        code = self._finish()
        if code != 0:
            return f"FFmpeg exited with status {code}"
        if not os.path.isfile(self._tmp) or os.path.getsize(self._tmp) == 0:
            return "FFmpeg wrote an empty file"
        return None

    def close(self) -> None:
        """Finish the clip and rename it into place; :class:`VideoWriteError` if it is not complete.

        Called while an exception propagates (``try: ... finally: writer.close()``), it discards the
        clip rather than publish a partial one under the final name, and raises nothing, so the
        original error surfaces; call :meth:`abort` in the ``except`` clause to keep the partial clip.
        """
        if self.closed:
            return
        if sys.exc_info()[0] is not None:
            self.abort(keep_partial=False)
            return
        if self._proc is None:
            self.closed = True
            raise VideoWriteError(f"no frames were written to {self.path!r}; nothing was saved")
        if self.total_frames is not None and self.num_frames < self.total_frames:
            kept = self.abort(keep_partial=True)
            where = f"; the partial clip is kept at {kept}" if kept else ""
            raise VideoWriteError(
                f"{self.path!r} got {self.num_frames} of {self.total_frames} frames, so it was not "
                f"saved{where}"
            )
        problem = self._encode_ok()
        if problem is not None:
            raise VideoWriteError(self._fail(problem))
        chmod_umask(self._tmp)
        os.replace(self._tmp, self.path)
        self._tmp = None
        self._cleanup()

    def abort(self, keep_partial: bool = True, total_frames: int | None = None) -> str | None:
        """Stop early: keep what was written as :func:`partial_path` (returned), never at the final path.

        Returns None when nothing was written, FFmpeg failed, or ``keep_partial`` is False (then the
        temporary file is removed). ``total_frames`` (default: the constructor's) names the clip
        ``clip.partial-45of257.mp4``. Safe to call more than once, and after :meth:`close` (a no-op).
        """
        if self.closed:
            return None
        if self._proc is None or self.num_frames == 0 or not keep_partial:
            self._cleanup()
            return None
        problem = self._encode_ok()
        if problem is not None:
            logger.warning("%s", self._fail(f"{problem}; no partial clip kept"))
            return None
        total = self.total_frames if total_frames is None else total_frames
        kept = partial_path(self.path, self.num_frames, total)
        chmod_umask(self._tmp)
        os.replace(self._tmp, kept)
        self._tmp = None
        self._cleanup()
        return kept

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(keep_partial=False)

    def __del__(self) -> None:
        # A writer dropped without close() leaves no hidden temporary file or FFmpeg process behind.
        with contextlib.suppress(Exception):
            if not self.closed:
                self._cleanup()


def write_video(
    path: str | os.PathLike, frames: Iterable[torch.Tensor | np.ndarray], fps: float = 16.0
) -> int:
    """Write an iterable of frame blocks ``[n, H, W, 3]`` to ``path``; returns the frame count."""
    with VideoWriter(path, fps=fps) as writer:
        for block in frames:
            writer.write(block)
    return writer.num_frames


# ------------------------------------------------------------------------------------------------
# reading: torchcodec, decord, PyAV behind one interface
# ------------------------------------------------------------------------------------------------
VIDEO_BACKENDS = ("auto", "torchcodec", "decord", "pyav")
"""Reader choices. ``auto``: torchcodec where it loads, else decord (one warning says why)."""


@dataclass(frozen=True)
class VideoMeta:
    """What a probe finds: the frame count from the container's index, the average fps, the frame size."""

    num_frames: int
    fps: float
    height: int
    width: int


@functools.cache
def backend_error(name: str) -> str | None:
    """None when ``name`` can decode here, else why not (checked once per process)."""
    try:
        if name == "torchcodec":
            import torchcodec

            if torchcodec.ffmpeg_major_version is None:
                return (
                    "torchcodec found no FFmpeg 4-8 shared libraries (on Debian/Ubuntu: apt-get install "
                    "libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 "
                    "libavfilter8, or the distribution's ffmpeg package)"
                )
        elif name == "decord":
            import decord  # noqa: F401
        elif name == "pyav":
            import av  # noqa: F401
        else:
            raise ValueError(name)
    except ValueError:
        raise
    except Exception as err:  # ImportError, or OSError when a native library does not load
        causes = [err]
        while causes[-1].__cause__ is not None and len(causes) < 5:
            causes.append(causes[-1].__cause__)
        why = "; ".join(_first_line(e) for e in causes)
        if name == "torchcodec" and any(k in why for k in ("nvrtc", "cuda", "libc10_cuda")):
            why += (
                f" (this torchcodec build links PyTorch's CUDA libraries, but torch {torch.__version__} is "
                "not a CUDA build: install torchcodec from the same index as torch)"
            )
        return f"{name} cannot load: {why}"
    return None


def available_backends() -> list[str]:
    """The concrete backends that load in this process (a subset of torchcodec, decord, pyav)."""
    return [b for b in VIDEO_BACKENDS[1:] if backend_error(b) is None]


@functools.cache
def _auto_backend() -> str:
    error = backend_error("torchcodec")
    if error is None:
        return "torchcodec"
    fallback = "decord" if backend_error("decord") is None else "pyav"
    # Once per process: training reads thousands of clips and should not warn on each.
    logger.warning("video reader: %s; using %s instead (see the README's set-up)", error, fallback)
    return fallback


def resolve_backend(backend: str = "auto") -> str:
    """The concrete reader for ``backend``; a ``ValueError`` naming the choices or why one cannot load."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}: choose one of {', '.join(VIDEO_BACKENDS)}")
    name = _auto_backend() if backend == "auto" else backend
    error = backend_error(name)
    if error is not None:
        loads = ", ".join(available_backends()) or "none"
        raise ValueError(f"video backend {backend!r} is not usable: {error}; backends that load: {loads}")
    return name


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist")
    return path


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def probe_video(path: str | os.PathLike, backend: str = "auto") -> VideoMeta:
    """Frame count, fps and size of a video (container index plus one decoded frame for the size).

    An unreadable file is a ``ValueError`` naming it; a missing one a ``FileNotFoundError``.
    """
    path = _check_file(path)
    name = resolve_backend(backend)
    try:
        meta = _PROBES[name](path)
    except Exception as err:  # each library raises its own types for a malformed file
        raise ValueError(f"cannot decode video {path!r} ({name}): {_first_line(err)}") from err
    if meta.num_frames <= 0:
        raise ValueError(f"video {path!r} has no frames")
    return meta


def read_video(
    path: str | os.PathLike, indices: Sequence[int] | None = None, backend: str = "auto"
) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` uint8 at ``indices`` (all frames by default), decoding only what they need.

    ``backend``: one of :data:`VIDEO_BACKENDS`. An unreadable file or an index past the end is a
    ``ValueError`` naming the file; a missing file a ``FileNotFoundError``.
    """
    path = _check_file(path)
    name = resolve_backend(backend)
    idx = None if indices is None else [int(i) for i in indices]
    if idx is not None and any(i < 0 for i in idx):
        raise ValueError(f"frame indices must be >= 0, got {min(idx)} for {path!r}")
    try:
        frames = _READERS[name](path, idx)
    except Exception as err:
        raise ValueError(f"cannot decode video {path!r} ({name}): {_first_line(err)}") from err
    if len(frames) == 0:
        raise ValueError(f"video {path!r} has no frames")
    return frames


def video_info(path: str | os.PathLike, backend: str = "auto") -> dict:
    """``{"num_frames", "fps", "height", "width"}`` of a video file (see :func:`probe_video`)."""
    meta = probe_video(path, backend)
    return {"num_frames": meta.num_frames, "fps": meta.fps, "height": meta.height, "width": meta.width}


def _check_range(idx: list[int], n: int) -> None:
    if idx and max(idx) >= n:
        raise IndexError(f"frame index {max(idx)} is past the last frame ({n} frames)")


# torchcodec ----------------------------------------------------------------------------------------
def _torchcodec_decoder(path: str):
    from torchcodec.decoders import VideoDecoder

    # exact: the frame count and indices come from a scan of the packets, as decord's index does;
    # one FFmpeg thread, since DataLoader workers already decode in parallel.
    return VideoDecoder(path, dimension_order="NHWC", seek_mode="exact", num_ffmpeg_threads=1)


def _probe_torchcodec(path: str) -> VideoMeta:
    decoder = _torchcodec_decoder(path)
    meta = decoder.metadata
    n = len(decoder)
    if n == 0:
        return VideoMeta(0, 0.0, 0, 0)
    fps = meta.average_fps or 0.0
    return VideoMeta(n, float(fps), int(meta.height), int(meta.width))


def _read_torchcodec(path: str, idx: list[int] | None) -> np.ndarray:
    decoder = _torchcodec_decoder(path)
    n = len(decoder)
    idx = list(range(n)) if idx is None else idx
    if not idx:
        return np.zeros((0, 0, 0, 3), np.uint8)
    _check_range(idx, n)
    return decoder.get_frames_at(indices=idx).data.numpy()


# decord --------------------------------------------------------------------------------------------
def _decord_reader(path: str):
    import decord

    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)


def _probe_decord(path: str) -> VideoMeta:
    reader = _decord_reader(path)
    n = len(reader)
    if n == 0:
        return VideoMeta(0, 0.0, 0, 0)
    height, width = reader[0].shape[:2]
    return VideoMeta(n, float(reader.get_avg_fps()), int(height), int(width))


def _read_decord(path: str, idx: list[int] | None) -> np.ndarray:
    reader = _decord_reader(path)
    n = len(reader)
    idx = list(range(n)) if idx is None else idx
    _check_range(idx, n)
    try:
        return reader.get_batch(idx).asnumpy()
    except Exception as err:
        # decord 0.6 mis-sizes some frame widths (e.g. 48 px); PyAV decodes those correctly.
        logger.warning("decord failed on %s (%s); decoding with PyAV instead", path, err)
        return _read_pyav(path, idx)


# PyAV ----------------------------------------------------------------------------------------------
def _probe_pyav(path: str) -> VideoMeta:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        n = int(stream.frames)
        first = None
        count = 0
        # Some containers (mkv, webm) keep no frame count: count the packets' frames by decoding.
        for frame in container.decode(video=0):
            first = first or frame
            count += 1
            if n and first is not None:
                break
        if first is None:
            return VideoMeta(0, fps, 0, 0)
        return VideoMeta(n or count, fps, int(first.height), int(first.width))


def _read_pyav(path: str, idx: list[int] | None) -> np.ndarray:
    import av

    want = None if idx is None else set(idx)
    last = None if idx is None else max(idx, default=-1)
    frames: dict[int, np.ndarray] = {}
    count = 0
    with av.open(path) as container:
        # One thread, as the other readers: DataLoader workers already decode in parallel.
        container.streams.video[0].thread_count = 1
        # Decode in order up to the last wanted frame: no seeking, so indices are exact (as decord's
        # are) but a clip late in a long file costs decoding everything before it.
        for i, frame in enumerate(container.decode(video=0)):
            count = i + 1
            if want is None or i in want:
                frames[i] = frame.to_ndarray(format="rgb24")
            if last is not None and i >= last:
                break
    if idx is None:
        idx = sorted(frames)
    _check_range(idx, count)
    if not idx:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack([frames[i] for i in idx])


_PROBES = {"torchcodec": _probe_torchcodec, "decord": _probe_decord, "pyav": _probe_pyav}
_READERS = {"torchcodec": _read_torchcodec, "decord": _read_decord, "pyav": _read_pyav}
