"""A latent + text-embedding cache: encode a video data set once, train from safetensors shards.

Training a video DiT spends much of its step in the VAE encoder and the text encoder when they run on
the fly; both are frozen, so ``longgen precompute`` runs them once. The cache folder holds

* ``shard_00000.safetensors``, ...: per sample ``"<i>/latents"`` ``[C, f, h, w]`` (``adapter.encode_video``)
  and ``"<i>/cond/<key>"`` (each tensor of ``adapter.encode_prompt``'s cond, batch dim removed);
* ``null_cond.safetensors``: the cond of the empty prompt (for caption dropout / CFG training), when the
  model has a text encoder;
* optionally further per-sample tensors ``"<i>/<key>"`` for the keys the index lists in ``sample_keys`` (an
  ODE-pair cache of :mod:`longgen.training.ode_pairs`: ``ode_states``);
* ``index.json``: format and ``version``, model ``family``, clip ``num_frames`` and ``clip_shape``, latent
  ``dtype`` and shape, cond keys, sample -> shard, captions, source paths. It is written last, so a folder
  without it is an unfinished precompute (shards are written atomically too, with the umask's mode).

:class:`CacheWriter` is the one writer (``longgen precompute`` and the demo's window cache).

:class:`LatentCacheDataset` reads it back, one sample at a time through safetensors' memory map.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
NULL_COND_NAME = "null_cond.safetensors"
CACHE_FORMAT = "longgen-latent-cache"
CACHE_VERSION = 2
"""Version 2 adds ``num_frames`` and ``dtype`` to the index; version-1 caches read the same otherwise."""
READABLE_VERSIONS = (1, 2)

__all__ = [
    "CacheWriter",
    "LatentCacheDataset",
    "add_precompute_parser",
    "collate_latents",
    "is_latent_cache",
    "precompute_cache",
]


def cache_root(path: str | os.PathLike) -> str:
    """The cache folder for ``path``: the folder itself, or the folder of its ``index.json``."""
    path = os.fspath(path)
    return os.path.dirname(path) if os.path.basename(path) == INDEX_NAME and os.path.isfile(path) else path


def is_latent_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is a finished latent cache (a folder with its ``index.json``, or that file)."""
    return os.path.isfile(os.path.join(cache_root(path), INDEX_NAME))


def _save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    from ..files import atomic_path

    with atomic_path(path) as tmp:  # safetensors creates 0600 files: atomic_path restores the umask's mode
        save_file(tensors, tmp, metadata=metadata)


def dtype_name(dtype: torch.dtype) -> str:
    """The :data:`longgen.dtypes.DTYPE_NAMES` name of ``dtype`` (``str(dtype)`` for any other)."""
    from ..dtypes import DTYPE_NAMES, torch_dtype

    return next((n for n in DTYPE_NAMES if torch_dtype(n) == dtype), str(dtype).replace("torch.", ""))


def _tensor_items(cond: dict[str, Any], dropped: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif value is not None and key not in dropped:
            logger.warning(
                "latent cache: cond entry %r is a %s, not a tensor; not cached", key, type(value).__name__
            )
            dropped.add(key)
    return out


def _first_frame_images(video: torch.Tensor) -> list:
    """First frames of clips ``[B, T, H, W, 3]`` as PIL images (all image-conditioned adapters take PIL)."""
    import PIL.Image

    from ..io import to_uint8

    return [PIL.Image.fromarray(frame) for frame in to_uint8(video[:, 0])]


@torch.no_grad()
def encode_conds(adapter, captions: list[str], video: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cond tensors ``[B, ...]`` for a batch: text (and the first frame for image-conditioned models)."""
    num_frames, height, width = video.shape[1:4]
    kwargs = dict(do_classifier_free_guidance=False, num_frames=num_frames, height=height, width=width)
    if not adapter.requires_image_condition:
        return adapter.encode_prompt(captions, **kwargs)[0]
    # Image-conditioned pipelines take one conditioning image per call in general (Wan I2V): one sample each.
    conds = [
        adapter.encode_prompt([c], image=img, **kwargs)[0]
        for c, img in zip(captions, _first_frame_images(video))
    ]
    from ..backbones.base import cat_conds

    return cat_conds(conds)


ODE_SETTINGS_NAME = "ode_pairs.json"
"""What marks a folder as an ODE-pair build (:data:`longgen.training.ode_pairs.SETTINGS_NAME`)."""


class CacheWriter:
    """The one writer of the ``longgen-latent-cache`` format (``longgen precompute`` and the demo).

    ``add`` one sample at a time (latents ``[C, f, h, w]``, cond tensors without batch dim), optionally
    ``write_null_cond``, then ``finish``. Shards are written atomically every ``shard_size`` samples;
    ``index.json`` last (an old one is removed first, so the folder is unfinished until then). The index
    records the model ``family``, the clip's pixel ``num_frames``, the latents' ``dtype`` and the format
    ``version``, which :class:`LatentCacheDataset` checks.
    """

    def __init__(self, out_dir: str | os.PathLike, *, family: str, shard_size: int = 64):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = os.fspath(out_dir)
        self.family = family
        self.shard_size = shard_size
        from ..files import make_output_dir

        if os.path.isfile(os.path.join(self.out_dir, ODE_SETTINGS_NAME)):
            raise ValueError(
                f"{self.out_dir} holds ODE pairs (`longgen ode-pairs`, {ODE_SETTINGS_NAME}); writing a latent cache "
                "into it would mix the two: choose another folder"
            )
        make_output_dir(self.out_dir, "the latent cache folder (--out, data.cache_dir)")
        stale = os.path.join(self.out_dir, INDEX_NAME)
        if os.path.exists(stale):
            os.remove(stale)  # the folder is unfinished until the new index is written
        self.samples: list[dict] = []
        self.shards: list[str] = []
        self.cond_keys: list[str] | None = None
        self.latent_shape: list[int] | None = None
        self.dtype: str | None = None
        self.null_cond_file: str | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def add(self, latents: torch.Tensor, cond: dict[str, torch.Tensor], caption: str, path: str) -> None:
        """Queue one sample; every cond must carry the keys of the first."""
        keys = sorted(cond)
        if self.cond_keys is None:
            self.cond_keys, self.latent_shape = keys, [int(v) for v in latents.shape]
            self.dtype = dtype_name(latents.dtype)
        elif keys != self.cond_keys:
            raise ValueError(f"sample {path!r} has cond keys {keys}, the cache {self.cond_keys}")
        i = len(self.samples)
        # clone(): safetensors refuses tensors that share storage (rows of one batch, windows of one video do)
        self._pending[f"{i}/latents"] = latents.detach().cpu().contiguous().clone()
        for key, value in cond.items():
            self._pending[f"{i}/cond/{key}"] = value.detach().cpu().contiguous().clone()
        self.samples.append({"shard": len(self.shards), "caption": caption, "path": path})
        if len(self.samples) % self.shard_size == 0:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard_{len(self.shards):05d}.safetensors"
        _save_atomic(self._pending, os.path.join(self.out_dir, name))
        self.shards.append(name)
        logger.info("latent cache: wrote %s (%d samples so far)", name, len(self.samples))
        self._pending = {}

    def write_null_cond(self, adapter, dropped: set[str]) -> None:
        """Store the empty prompt's cond (caption dropout / CFG training); a model without a text encoder
        (or an image-conditioned one) gets none."""
        if adapter.requires_image_condition:
            return
        try:
            null = _tensor_items(adapter.encode_prompt([""], do_classifier_free_guidance=False)[0], dropped)
        except Exception as err:  # a model without a text encoder: no null cond, no caption dropout
            logger.info("latent cache: no empty-prompt cond (%s)", err)
            return
        tensors = {k: v[0].detach().cpu().contiguous().clone() for k, v in null.items()}
        _save_atomic(tensors, os.path.join(self.out_dir, NULL_COND_NAME))
        self.null_cond_file = NULL_COND_NAME

    def finish(
        self,
        clip_shape: Sequence[int],
        *,
        source: str | None = None,
        skipped: dict | None = None,
        dropped: set[str] | None = None,
    ) -> str:
        """Write the last shard and ``index.json`` (atomically). ``clip_shape``: ``[frames, H, W, 3]`` of
        one pixel clip. Returns the index path."""
        self._flush()
        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "family": self.family,
            "num_frames": int(clip_shape[0]) if clip_shape else None,
            "dtype": self.dtype,
            "num_samples": len(self.samples),
            "clip_shape": [int(v) for v in clip_shape],
            "latent_shape": self.latent_shape or [],
            "cond_keys": self.cond_keys or [],
            "dropped_cond_keys": sorted(dropped or ()),
            "null_cond": self.null_cond_file,
            "shards": self.shards,
            "samples": self.samples,
            "source": source,
            "skipped": dict(skipped or {}),
        }
        from ..files import write_json_atomic

        index_path = write_json_atomic(os.path.join(self.out_dir, INDEX_NAME), index, indent=1)
        logger.info(
            "latent cache: %d samples in %d shards at %s", len(self.samples), len(self.shards), self.out_dir
        )
        return index_path


def _progress(total: int, desc: str, show: bool | None):
    """A tqdm bar on stderr (off when ``show`` is False; None: only on a terminal)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="clip", disable=not sys.stderr.isatty() if show is None else not show
    )


@torch.no_grad()
def precompute_cache(
    adapter,
    dataset,
    out_dir: str | os.PathLike,
    batch_size: int = 1,
    shard_size: int = 64,
    show_progress: bool | None = False,
) -> str:
    """Encode every clip of ``dataset`` (a :class:`~longgen.data.video.VideoClipDataset`) into a cache.

    Latents come from ``adapter.encode_video`` (the model's latent space), conds from
    ``adapter.encode_prompt(captions, do_classifier_free_guidance=False)`` (plus the clip's first frame
    as the image of image-to-video models). Only tensor cond entries are stored; others are logged and
    listed in the index (``dropped_cond_keys``). One clip per video: the dataset's clip at its current
    epoch. ``show_progress``: a progress bar (None: when stderr is a terminal). Returns the path of
    ``index.json``.
    """
    from .video import collate_clips

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    writer = CacheWriter(out_dir, family=adapter.family, shard_size=shard_size)
    dropped: set[str] = set()
    clip_shape: tuple[int, ...] = ()
    num_items = len(dataset)
    with _progress(num_items, "precompute", show_progress) as bar:
        for begin in range(0, num_items, batch_size):
            batch = collate_clips([dataset[i] for i in range(begin, min(begin + batch_size, num_items))])
            video = batch["video"]  # [B, T, H, W, 3]
            latents = adapter.encode_video(video)  # [B, C, f, h, w]
            cond = _tensor_items(encode_conds(adapter, batch["caption"], video), dropped)
            clip_shape = clip_shape or tuple(video.shape[1:])
            for j in range(latents.shape[0]):
                writer.add(
                    latents[j], {k: v[j] for k, v in cond.items()}, batch["caption"][j], batch["path"][j]
                )
            bar.update(latents.shape[0])
    writer.write_null_cond(adapter, dropped)
    return writer.finish(
        clip_shape,
        source=getattr(dataset, "source", None),
        skipped=getattr(dataset, "skipped", {}),
        dropped=dropped,
    )


class LatentCacheDataset(torch.utils.data.Dataset):
    """Samples ``{"latents": [C, f, h, w], "cond": {key: tensor}, "caption": str}`` of a latent cache."""

    def __init__(self, out_dir: str | os.PathLike, family: str | None = None):
        self.root = cache_root(out_dir)
        index_path = os.path.join(self.root, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"{self.root!r} is not a finished latent cache (no {INDEX_NAME}); build it with "
                "`longgen precompute --model MODEL --data SOURCE --out DIR`"
            )
        with open(index_path) as f:
            self.index = json.load(f)
        if self.index.get("format") != CACHE_FORMAT or self.index.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{index_path} is not a {CACHE_FORMAT} index of version {READABLE_VERSIONS} "
                f"(got format {self.index.get('format')!r}, version {self.index.get('version')!r}); "
                "rebuild it with longgen precompute"
            )
        self.cond_keys: list[str] = list(self.index["cond_keys"])
        self.family: str = self.index.get("family", "")
        self.num_frames: int | None = self.index.get("num_frames")
        self.dtype: str | None = self.index.get("dtype")
        self.sample_keys: list[str] = list(self.index.get("sample_keys", []))
        """Further per-sample tensors ``"<i>/<key>"`` (an ODE-pair cache's ``ode_states``), returned by key."""
        if family is not None:
            self.require_family(family)

    def require_family(self, family: str) -> None:
        """Raise a clear error when the cache was encoded by another model family than ``family`` (its
        latents and text embeddings mean nothing to that model, and its cond keys differ)."""
        if self.family and family and self.family != family:
            command = self.index.get("built_by", "longgen precompute --model MODEL --data SOURCE --out DIR")
            raise ValueError(
                f"the latent cache {self.root!r} was encoded with a {self.family!r} model, but the model "
                f"being trained is {family!r} (cond keys {self.cond_keys}); rebuild the cache for this model "
                f"with `{command}`, or point data.cache_dir at a {family!r} cache"
            )

    def __len__(self) -> int:
        return int(self.index["num_samples"])

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)}")
        sample = self.index["samples"][i]
        shard = os.path.join(self.root, self.index["shards"][sample["shard"]])
        # One memory-mapped handle per shard and process (DataLoader workers open their own): reopening the
        # file per sample cost ~1 ms a step in benchmarks/trainer_overhead.py.
        handles = self.__dict__.setdefault("_handles", {})
        key = (os.getpid(), shard)
        if key not in handles:
            handles[key] = safe_open(shard, framework="pt")
        f = handles[key]
        latents = f.get_tensor(f"{i}/latents")
        cond = {name: f.get_tensor(f"{i}/cond/{name}") for name in self.cond_keys}
        extra = {name: f.get_tensor(f"{i}/{name}") for name in self.sample_keys}
        return {"latents": latents, "cond": cond, "caption": sample["caption"], **extra}

    def __getstate__(self) -> dict:
        # open shard handles do not pickle (DataLoader workers under spawn): each process reopens its own
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def null_cond(self) -> dict[str, torch.Tensor] | None:
        """The empty prompt's cond (batch dim removed), or None when the cache has none."""
        name = self.index.get("null_cond")
        if not name:
            return None
        from safetensors.torch import load_file

        return load_file(os.path.join(self.root, name))


def collate_latents(items: Sequence[dict]) -> dict:
    """Stack cached samples: ``{"latents": [B, C, f, h, w], "cond": {key: [B, ...]}, "caption": list}``."""
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"cached latents in one batch differ in shape {sorted(shapes)}: use batch size 1 or one clip size"
        )
    extra = [k for k, v in items[0].items() if isinstance(v, torch.Tensor) and k != "latents"]  # sample_keys
    return {
        "latents": torch.stack([item["latents"] for item in items]),
        "cond": {key: torch.stack([item["cond"][key] for item in items]) for key in items[0]["cond"]},
        "caption": [item.get("caption", "") for item in items],
        **{key: torch.stack([item[key] for item in items]) for key in extra},
    }


# ------------------------------------------------------------------------------------------------
# the `longgen precompute` command
# ------------------------------------------------------------------------------------------------
def add_precompute_parser(sub) -> argparse.ArgumentParser:
    """Register ``longgen precompute`` on a subparsers object (``parser.add_subparsers()``)."""
    from ..dtypes import DTYPE_NAMES

    p = sub.add_parser(
        "precompute",
        help="encode a video data set into a latent + text-embedding cache (safetensors shards) for training",
        description="Run the model's VAE and text encoder once over a data set (folder of videos with .txt "
        "captions, or a .csv / .jsonl manifest) and write safetensors shards + index.json; train from it "
        "with `train/train.py ... data.cache_dir=OUT` (the trainer then frees the text encoder).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (with model_index.json)")
    p.add_argument(
        "--data", required=True, help="folder of videos with .txt captions, or a .csv / .jsonl manifest"
    )
    p.add_argument("--out", required=True, help="output folder of the cache")
    p.add_argument(
        "--num-frames", type=int, default=None, help="pixel frames per clip (default: the model's native)"
    )
    p.add_argument("--height", type=int, default=None, help="clip height in pixels (default: native)")
    p.add_argument("--width", type=int, default=None, help="clip width in pixels (default: native)")
    p.add_argument("--frame-stride", type=int, default=1, help="source frames between sampled frames")
    p.add_argument(
        "--target-fps", type=float, default=None, help="sample at this fps (overrides --frame-stride)"
    )
    p.add_argument(
        "--random-start", action="store_true", help="random clip start per video (seeded); default: start"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the clip starts")
    p.add_argument(
        "--video-backend",
        choices=["auto", "torchcodec", "decord", "pyav"],
        default="auto",
        help="video reader (auto: torchcodec where it loads, else decord)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="clips encoded per call")
    p.add_argument("--shard-size", type=int, default=64, help="samples per safetensors shard")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="encoder dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    p.set_defaults(func=cmd_precompute)
    return p


def cmd_precompute(args: argparse.Namespace) -> int:
    from ..backbones import load_adapter
    from ..dtypes import torch_dtype
    from .video import VideoClipDataset

    adapter = load_adapter(args.model, torch_dtype=torch_dtype(args.dtype))
    adapter.pipe.to(args.device)
    native_frames, native_height, native_width = adapter.native_video_size
    num_frames, height, width = args.num_frames or native_frames, args.height or native_height, args.width or native_width
    # the sizes generation and training take (frames of the VAE's stride, VAE x patch multiples): a cache of
    # others would only fail later, in the trainer's first step
    adapter.latent_shape(num_frames, height, width)
    dataset = VideoClipDataset(
        args.data,
        num_frames=num_frames,
        height=height,
        width=width,
        frame_stride=args.frame_stride,
        target_fps=args.target_fps,
        random_start=args.random_start,
        seed=args.seed,
        video_backend=args.video_backend,
    )
    index_path = precompute_cache(
        adapter,
        dataset,
        args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        show_progress=None if not getattr(args, "no_progress", False) else False,
    )
    with open(index_path) as f:
        index = json.load(f)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(dataset.skipped.items())) or "none"
    print(
        f"cached {index['num_samples']} clips ({index['clip_shape']} -> latents {index['latent_shape']}) in "
        f"{len(index['shards'])} shards at {args.out}; skipped videos: {skipped}"
    )
    return 0
