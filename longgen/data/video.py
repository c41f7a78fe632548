"""Video clip data sets for training: a folder of videos with captions or a CSV / JSONL manifest.

Clips are decoded with :func:`longgen.io.read_video` (``video_backend``: torchcodec where it loads, else
decord; or PyAV), reading only the frames a clip needs, so clips of hundreds of frames
from hour-long files cost what the clip costs. Frame sampling follows a *target fps* (the stride comes
from each file's own fps) or a fixed *frame stride*, from a random start that is reproducible from
``(seed, epoch, index)``. Frames are resized so that they cover ``height x width`` (the shorter side
relative to the target aspect) and centre-cropped.

Bad files never stop a run: at construction every file is probed (length and fps only, plus one
frame for its size); unreadable or too-short files are logged once with their path, counted in
:attr:`VideoClipDataset.skipped` by reason, and left out. A file that fails later while decoding is
counted under ``decode_error`` and replaced by the next good clip.

Metadata layouts (``source``):

* a folder: every video file (``.mp4 .mov .mkv .avi .webm .m4v``) with a same-name ``.txt`` caption;
* ``*.csv``: a header row with ``path`` and ``caption`` columns, optional ``start`` and ``end``;
* ``*.jsonl``: one object per line with the same keys (``video`` is accepted for ``path``, as in the
  synthetic data set's manifest, and ``caption_file`` for an inline caption).

Paths are relative to the manifest's folder or absolute; ``start`` / ``end`` are pixel-frame indices
of the usable span, ``end`` exclusive (a Python slice), empty for the whole file.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")

__all__ = [
    "BucketSampler",
    "ClipRecord",
    "VideoClipDataset",
    "clip_frame_indices",
    "collate_clips",
    "frame_step",
    "read_metadata",
    "resize_center_crop",
]


@dataclass
class ClipRecord:
    """One usable video: where it is, its caption, and what the probe found."""

    path: str
    caption: str
    start: int
    """First usable pixel frame."""
    end: int
    """One past the last usable pixel frame."""
    fps: float
    height: int
    width: int


# ------------------------------------------------------------------------------------------------
# frame sampling and resizing (pure functions; tested on their own)
# ------------------------------------------------------------------------------------------------
def frame_step(fps: float, frame_stride: int = 1, target_fps: float | None = None) -> float:
    """Source frames per sampled frame: ``fps / target_fps`` with a target fps, else ``frame_stride``."""
    if target_fps is None:
        return float(frame_stride)
    if fps <= 0:
        raise ValueError(f"the video reports fps={fps}; cannot sample at a target fps")
    return fps / target_fps


def clip_span(num_frames: int, step: float) -> int:
    """Source frames a clip of ``num_frames`` sampled frames covers (first to last, inclusive)."""
    return int(math.floor((num_frames - 1) * step + 1e-6)) + 1


def clip_frame_indices(start: int, num_frames: int, step: float) -> list[int]:
    """Source frame indices of a clip: ``start + floor(k * step)``, ``k = 0 .. num_frames - 1``.

    With a target fps, sampled frame ``k`` is at time ``k / target_fps``, and the source frame showing at
    time ``t`` is ``floor(t * fps)``; ``step = fps / target_fps``. An integer step is a plain stride. A
    step below 1 (target fps above the file's) repeats frames.
    """
    k = np.arange(num_frames, dtype=np.float64)
    return [int(start + i) for i in np.floor(k * step + 1e-6).astype(np.int64)]


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Frames ``[T, h, w, 3]`` -> ``[T, height, width, 3]``: scale to cover the target, then centre-crop.

    The scale is ``max(height / h, width / w)``, so the side that is shorter relative to the target
    aspect ratio lands exactly on the target and the other is cropped (for a square target: the
    shorter side). Bilinear, antialiased when shrinking.
    """
    num_frames, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = frames.permute(0, 3, 1, 2)  # [T, 3, h, w]
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.permute(0, 2, 3, 1).clamp(0, 1).contiguous()  # [T, height, width, 3]


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------
def _optional_int(value, what: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be an integer frame index or empty, got {value!r}") from err


def _read_caption_file(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def read_metadata(source: str | os.PathLike) -> tuple[list[dict], Counter]:
    """Entries ``{"path", "caption", "start", "end"}`` of a folder or manifest, and entries dropped by reason.

    Entries without a caption are dropped as ``missing_caption`` (logged with the path); a missing
    manifest column or malformed line is a ``ValueError`` naming the line, since it is a bug in the
    manifest rather than one bad video.
    """
    source = os.fspath(source)
    dropped: Counter = Counter()
    entries: list[dict] = []
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(VIDEO_EXTENSIONS))
        for name in names:
            path = os.path.join(source, name)
            caption = _read_caption_file(os.path.splitext(path)[0] + ".txt")
            if caption is None:
                logger.warning("skipping %s: no caption file %s", path, os.path.splitext(name)[0] + ".txt")
                dropped["missing_caption"] += 1
                continue
            entries.append({"path": path, "caption": caption, "start": None, "end": None})
        return entries, dropped
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"data source {source!r} does not exist: pass a folder of videos with .txt captions or a "
            ".csv / .jsonl manifest"
        )
    root = os.path.dirname(os.path.abspath(source))
    lower = source.lower()
    if lower.endswith(".csv"):
        with open(source, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or ())
            if not ({"path", "video"} & fields) or not ({"caption", "caption_file"} & fields):
                raise ValueError(
                    f"{source}: a CSV manifest needs a header with 'path' and 'caption' columns "
                    f"(optional 'start', 'end'); found {sorted(fields)}"
                )
            rows = [(line_no, row) for line_no, row in enumerate(reader, 2)]
    elif lower.endswith((".jsonl", ".json")):
        rows = []
        with open(source, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source}:{line_no}: not valid JSON ({err})") from err
    else:
        raise ValueError(f"unknown data source {source!r}: use a folder, a .csv or a .jsonl manifest")
    for line_no, row in rows:
        where = f"{source}:{line_no}"
        rel = row.get("path") or row.get("video")
        if not rel:
            raise ValueError(f"{where}: entry has no 'path' (or 'video')")
        path = rel if os.path.isabs(rel) else os.path.join(root, rel)
        caption = row.get("caption")
        if caption is None and row.get("caption_file"):
            cap_path = row["caption_file"]
            caption = _read_caption_file(
                cap_path if os.path.isabs(cap_path) else os.path.join(root, cap_path)
            )
        if caption is None:
            logger.warning("skipping %s (%s): no caption", path, where)
            dropped["missing_caption"] += 1
            continue
        start = _optional_int(row.get("start"), f"{where}: start")
        end = _optional_int(row.get("end"), f"{where}: end")
        entries.append({"path": path, "caption": str(caption).strip(), "start": start, "end": end})
    return entries, dropped


def probe_video(path: str, backend: str = "auto") -> tuple[int, float, int, int]:
    """(frame count, fps, height, width): the container index plus one decoded frame."""
    from ..io import probe_video as probe

    meta = probe(path, backend)
    return meta.num_frames, meta.fps, meta.height, meta.width


# ------------------------------------------------------------------------------------------------
# the data set
# ------------------------------------------------------------------------------------------------
class VideoClipDataset(torch.utils.data.Dataset):
    """Captioned video clips ``{"video": [T, H, W, 3] in [0, 1], "caption", "path"}`` (see module doc).

    ``num_frames`` is the clip length in pixel frames (``4k + 1`` for causal video VAEs such as Wan's).
    Set ``target_fps`` to sample every file at that rate (the stride follows each file's fps), or
    ``frame_stride`` for a fixed stride. ``random_start`` draws the clip's first frame uniformly over
    the usable span, from ``numpy.random.default_rng((seed, epoch, index))``: the same clip for the same
    (seed, epoch, index) in any process; call :meth:`set_epoch` each epoch. Without it clips start at
    the span's first frame.

    ``video_backend`` picks the reader (:data:`longgen.io.VIDEO_BACKENDS`: ``auto`` is torchcodec where
    it loads, else decord with one warning; ``torchcodec``, ``decord`` or ``pyav`` to force one).

    ``dataset[i]`` takes an index, or ``(index, num_frames, height, width)`` from :class:`BucketSampler`.
    """

    def __init__(
        self,
        source: str,
        num_frames: int,
        height: int,
        width: int,
        frame_stride: int = 1,
        target_fps: float | None = None,
        random_start: bool = True,
        seed: int = 0,
        video_backend: str = "auto",
    ):
        from ..io import resolve_backend

        if num_frames < 1 or height < 1 or width < 1:
            raise ValueError(
                f"num_frames, height and width must be positive, got {num_frames}, {height}x{width}"
            )
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if target_fps is not None and target_fps <= 0:
            raise ValueError(f"target_fps must be positive (or None to use frame_stride), got {target_fps}")
        if target_fps is not None and frame_stride != 1:
            raise ValueError(
                f"set either target_fps ({target_fps}) or frame_stride ({frame_stride}), not both: with a "
                "target fps the stride follows each video's own fps"
            )
        # Resolved once here, so an unknown or unloadable backend fails before any file is probed.
        self.video_backend = resolve_backend(video_backend)
        self.source = os.fspath(source)
        self.num_frames = int(num_frames)
        self.height = int(height)
        self.width = int(width)
        self.frame_stride = int(frame_stride)
        self.target_fps = target_fps
        self.random_start = random_start
        self.seed = int(seed)
        self.epoch = 0
        entries, dropped = read_metadata(self.source)
        self.skipped: dict[str, int] = dict(dropped)
        """Files left out, by reason (``missing_caption``, ``unreadable``, ``too_short``, ``bad_span``,
        ``decode_error``); each was logged once with its path."""
        self.records: list[ClipRecord] = []
        for entry in entries:
            record = self._probe(entry)
            if record is not None:
                self.records.append(record)
        total_skipped = sum(self.skipped.values())
        if not self.records:
            reasons = (
                ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "no video files found"
            )
            raise ValueError(
                f"no usable videos in {self.source!r} for {self.num_frames}-frame clips "
                f"({self._sampling_text()}); skipped by reason: {reasons}"
            )
        if total_skipped:
            logger.warning(
                "%s: using %d videos, skipped %d (%s)",
                self.source,
                len(self.records),
                total_skipped,
                ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())),
            )
        self._failed: set[str] = set()

    def _sampling_text(self) -> str:
        return f"target_fps={self.target_fps}" if self.target_fps else f"frame_stride={self.frame_stride}"

    def _skip(self, path: str, reason: str, detail: str) -> None:
        logger.warning("skipping %s (%s): %s", path, reason, detail)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _probe(self, entry: dict) -> ClipRecord | None:
        path = entry["path"]
        try:
            length, fps, height, width = probe_video(path, self.video_backend)
        except Exception as err:  # a ValueError naming the file, or the reader's own error types
            self._skip(path, "unreadable", str(err).splitlines()[0] if str(err) else type(err).__name__)
            return None
        start = entry["start"] or 0
        end = length if entry["end"] is None else min(entry["end"], length)
        if start < 0 or end <= start:
            self._skip(
                path, "bad_span", f"start={entry['start']} end={entry['end']} in a {length}-frame video"
            )
            return None
        record = ClipRecord(path, entry["caption"], start, end, fps, height, width)
        try:
            step = self.step(record)
        except ValueError as err:
            self._skip(path, "unreadable", str(err))
            return None
        need = clip_span(self.num_frames, step)
        if end - start < need:
            self._skip(
                path,
                "too_short",
                f"{end - start} usable frames; a {self.num_frames}-frame clip with step {step:g} "
                f"needs {need}",
            )
            return None
        return record

    def step(self, record: ClipRecord) -> float:
        """Source frames per sampled frame for one video."""
        return frame_step(record.fps, self.frame_stride, self.target_fps)

    def max_num_frames(self, record: ClipRecord) -> int:
        """The longest clip (in sampled frames) that fits a video's usable span."""
        step = self.step(record)
        return int(math.floor((record.end - record.start - 1) / step + 1e-6)) + 1

    def set_epoch(self, epoch: int) -> None:
        """Change the random starts (call once per epoch, before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def clip_indices(self, index: int, num_frames: int | None = None) -> list[int]:
        """Source frame indices of clip ``index`` this epoch (deterministic in seed, epoch, index)."""
        record = self.records[index]
        num_frames = num_frames or self.num_frames
        step = self.step(record)
        last_start = record.end - clip_span(num_frames, step)
        if last_start < record.start:
            raise ValueError(f"{record.path} is too short for {num_frames} frames at step {step:g}")
        start = record.start
        if self.random_start and last_start > record.start:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            start = int(rng.integers(record.start, last_start + 1))
        return clip_frame_indices(start, num_frames, step)

    def __getitem__(self, item: int | tuple[int, int, int, int]) -> dict:
        if isinstance(item, tuple):
            index, num_frames, height, width = item
        else:
            index, num_frames, height, width = item, self.num_frames, self.height, self.width
        # A file that probed fine but fails to decode is replaced by the next one (at most one pass).
        for offset in range(len(self.records)):
            i = (index + offset) % len(self.records)
            record = self.records[i]
            if record.path in self._failed:
                continue
            try:
                return self._load(i, num_frames, height, width)
            except Exception as err:
                self._failed.add(record.path)
                self._skip(record.path, "decode_error", str(err).splitlines()[0] if str(err) else repr(err))
        raise RuntimeError(f"every video in {self.source!r} failed to decode; see the warnings above")

    def _load(self, index: int, num_frames: int, height: int, width: int) -> dict:
        from ..io import read_video

        record = self.records[index]
        indices = self.clip_indices(index, num_frames)
        # [T, h, w, 3] uint8, only the needed frames
        frames = read_video(record.path, indices, backend=self.video_backend)
        video = torch.from_numpy(frames).float().div_(255.0)
        video = resize_center_crop(video, height, width)
        return {"video": video, "caption": record.caption, "path": record.path}


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack clips: ``{"video": [B, T, H, W, 3], "caption": list[str], "path": list[str]}``."""
    shapes = {tuple(item["video"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"clips in one batch differ in shape {sorted(shapes)}: batch by bucket (BucketSampler) or use "
            "one clip size"
        )
    return {
        "video": torch.stack([item["video"] for item in items]),
        "caption": [item["caption"] for item in items],
        "path": [item["path"] for item in items],
    }


# ------------------------------------------------------------------------------------------------
# buckets
# ------------------------------------------------------------------------------------------------
class BucketSampler(torch.utils.data.Sampler):
    """Batches of clips that share a bucket ``(num_frames, height, width)``: a ``batch_sampler``.

    Each video goes to the bucket whose aspect ratio is closest to its own (in ``|log(h/w)|``) among
    the buckets whose frame count fits the video's usable span; ties go to the longer bucket, then the
    larger frame. Videos that fit no bucket are left out and counted in :attr:`skipped`. Every epoch
    the videos of each bucket are shuffled (``(seed, epoch)``), cut into batches of ``batch_size``
    (the short remainder dropped with ``drop_last``), and the batches are shuffled across buckets.
    With ``num_replicas > 1`` rank ``r`` takes every ``num_replicas``-th batch, all ranks the same
    count. It yields lists of ``(index, num_frames, height, width)``, which
    :class:`VideoClipDataset` accepts as items::

        sampler = BucketSampler(dataset, 2, [(49, 480, 832), (81, 480, 480)])
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_clips)
    """

    def __init__(
        self,
        dataset: VideoClipDataset,
        batch_size: int,
        buckets: Sequence[tuple[int, int, int]],
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not buckets:
            raise ValueError("give at least one bucket (num_frames, height, width)")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.buckets = [tuple(int(v) for v in b) for b in buckets]
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self.assignment: dict[tuple[int, int, int], list[int]] = {b: [] for b in self.buckets}
        for index, record in enumerate(dataset.records):
            bucket = self.assign(record)
            if bucket is None:
                logger.warning(
                    "bucketing leaves out %s: %d usable frames fit no bucket %s",
                    record.path,
                    record.end - record.start,
                    self.buckets,
                )
                self.skipped["fits_no_bucket"] = self.skipped.get("fits_no_bucket", 0) + 1
            else:
                self.assignment[bucket].append(index)
        if not any(self.assignment.values()):
            raise ValueError(f"no video of {dataset.source!r} fits any bucket {self.buckets}")

    def assign(self, record: ClipRecord) -> tuple[int, int, int] | None:
        """The bucket of one video, or None when it is too short for every bucket."""
        max_frames = self.dataset.max_num_frames(record)
        aspect = math.log(record.height / record.width)
        fitting = [b for b in self.buckets if b[0] <= max_frames]
        if not fitting:
            return None
        return min(
            fitting, key=lambda b: (round(abs(math.log(b[1] / b[2]) - aspect), 9), -b[0], -b[1] * b[2])
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[list[tuple[int, int, int, int]]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        batches = []
        for bucket in self.buckets:
            indices = list(self.assignment[bucket])
            if self.shuffle:
                indices = [indices[i] for i in rng.permutation(len(indices))]
            for s in range(0, len(indices), self.batch_size):
                chunk = indices[s : s + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append([(i, *bucket) for i in chunk])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(batches) // self.num_replicas
        return batches[self.rank : per_rank * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
