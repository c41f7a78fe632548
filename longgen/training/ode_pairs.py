"""ODE pairs from a bidirectional teacher: the data of CausVid's ODE initialisation (``longgen ode-pairs``).

CausVid (Yin et al. 2025, Sec. 4.2; ``generate_ode_pairs.py``) samples the bidirectional teacher with 50 Euler
steps (shift 8, guidance 6) and keeps a few states of each trajectory (steps 0/36/44 and the clean end 50:
t = 1000/757/522/0); the causal student is then regressed from those states onto the clean end
(``objective.method=ode_regression``, :mod:`longgen.training.causal_methods`).

The cache is a ``longgen-latent-cache`` (:mod:`longgen.data.cache`) in ``data.cache_dir``: per sample the clean
end as ``"<i>/latents"``, the prompt's cond as ``"<i>/cond/<key>"`` (the trainer then frees the text encoders) and
the kept states ``"<i>/ode_states"`` ``[K, C, f, h, w]`` (listed in the index's ``sample_keys``); the index's
``ode`` entry holds the kept flow sigmas (the student's few-step levels), their timesteps and the settings.

Several processes (one per GPU) share a build with ``worker=(k, n)`` (``longgen ode-pairs --worker k/n``, or
under ``torchrun`` / ``accelerate launch`` from ``RANK`` / ``WORLD_SIZE``): each takes every n-th shard.

Resumable: sample ``i``'s noise comes from ``(ode.seed, i)`` and shard ``n`` holds samples
``[n * shard_size, (n + 1) * shard_size)``, written atomically, so an interrupted build rerun with the same
settings skips the finished shards and ends with the same cache as an uninterrupted one. ``ode_pairs.json`` holds
the settings of the build in progress (a rerun with other settings is refused); ``index.json`` is written last.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..data.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_NAME,
    ODE_SETTINGS_NAME,
    _progress,
    _save_atomic,
    _tensor_items,
    dtype_name,
)
from ..files import make_output_dir, write_json_atomic
from ..schedules import ddim_step
from .causal_methods import ODE_STATES_KEY

logger = logging.getLogger(__name__)

SETTINGS_NAME = ODE_SETTINGS_NAME
BUILD_COMMAND = "longgen ode-pairs --config CONFIG"

__all__ = ["BUILD_COMMAND", "ODEBuild", "build_ode_pairs", "ode_trajectory", "read_prompts"]


@torch.no_grad()
def ode_trajectory(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    keep_steps: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler (DDIM, eta 0) steps of the probability-flow ODE over ``sigmas`` from ``noise`` ``[B, C, F, H, W]``.

    Returns ``(states, x0)``: ``states`` ``[B, K, C, F, H, W]``, the inputs of steps ``keep_steps`` (the state at
    ``sigmas[k]``), and ``x0`` the end at sigma 0. ``denoise(x, sigma[B, F]) -> x0`` (guidance bound)."""
    x = noise.float() * sigmas[0]
    kept = []
    for i in range(len(sigmas) - 1):
        if i in keep_steps:
            kept.append(x)
        level = sigmas[i].expand(x.shape[0], x.shape[2]).to(x.device)
        x0 = denoise(x, level).float()
        x = ddim_step(x, x0, sigmas[i].to(x.device), sigmas[i + 1].to(x.device))
    return torch.stack(kept, dim=1), x


def read_prompts(config) -> list[str]:
    """``ode.prompts_file`` (one prompt per line), else the captions of ``data.source`` (or of the synthetic data
    set the trainer writes into ``train.output_dir`` when it is null)."""
    ode, data = config.ode, config.data
    if ode.prompts_file is not None:
        if not os.path.isfile(ode.prompts_file):
            raise FileNotFoundError(f"ode.prompts_file={ode.prompts_file} does not exist: give a text file, one prompt a line")
        with open(ode.prompts_file, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
    else:
        from ..data.video import read_metadata

        source = data.source
        if source is None:
            from ..data.synthetic import ensure_synthetic_dataset

            folder = os.path.join(config.train.output_dir, "synthetic_data")
            ensure_synthetic_dataset(folder, data)
            source = os.path.join(folder, "manifest.jsonl")
        prompts = [entry["caption"] for entry in read_metadata(source)[0]]
    if not prompts:
        raise ValueError("no prompts for the ODE pairs: set ode.prompts_file or data.source (captions)")
    return prompts


@dataclass
class ODEBuild:
    """What :func:`build_ode_pairs` did: ``index`` is None when shards are still missing (``max_shards``, or
    other workers not finished)."""

    out_dir: str
    num_shards: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    index: str | None = None


def _settings(config, family: str, latent_shape: list[int], sigmas: torch.Tensor, num_samples: int) -> dict:
    ode, data = config.ode, config.data
    teacher = ode.teacher_path or config.model.path or f"tiny:{config.model.tiny}:{config.model.tiny_seed}"
    keep = [float(sigmas[k]) for k in ode.keep_steps]
    return {
        "teacher": teacher,
        "family": family,
        "latent_shape": latent_shape,
        "clip": [data.num_frames, data.height, data.width],
        "dtype": config.model.dtype,
        "num_samples": num_samples,
        "sigmas": keep,
        "timesteps": [round(1000.0 * s, 3) for s in keep],
        **{k: v for k, v in asdict(ode).items() if k not in ("teacher_path", "device", "batch_size")},
    }


def _check_settings(out_dir: str, settings: dict) -> None:
    """Refuse to continue a build of other settings; record these for the next resume."""
    path = os.path.join(out_dir, SETTINGS_NAME)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, INDEX_NAME)):
        raise ValueError(
            f"data.cache_dir={out_dir} holds a latent cache of `longgen precompute` (its {INDEX_NAME}, no "
            f"{SETTINGS_NAME}); writing ODE pairs into it would mix the two: set data.cache_dir to a new folder"
        )
    if os.path.isfile(path):
        with open(path) as fh:
            saved = json.load(fh)
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"data.cache_dir={out_dir} holds ODE pairs of other settings ({details}): rerun with the same "
                "settings to continue that build, or set data.cache_dir to a new folder"
            )
    make_output_dir(out_dir, "data.cache_dir")
    write_json_atomic(path, settings, indent=1)


def _sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Sample ``index``'s initial noise, from ``(seed, index)`` alone (independent of batching and resume)."""
    (state,) = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    generator = torch.Generator("cpu").manual_seed(int(state) & ((1 << 63) - 1))
    return torch.randn(shape, generator=generator)


def _check_teacher_family(config, teacher_family: str) -> None:
    """The teacher must be of the student's family (its latents and conds are what the student reads)."""
    from ..backbones import adapter_class_for_pipeline, read_model_index

    model = config.model
    student = model.tiny if model.path is None else adapter_class_for_pipeline(
        read_model_index(model.path)["_class_name"]).family
    if student != teacher_family:
        raise ValueError(
            f"the teacher ode.teacher_path={config.ode.teacher_path} is a {teacher_family!r} model but the student "
            f"(model.*) is {student!r}: ODE regression needs a teacher of the student's family and latent space; "
            "set ode.teacher_path to such a model, or null to use the student's own weights as the teacher"
        )


def load_teacher(config):
    """The bidirectional teacher: ``ode.teacher_path``, else the student's model (path or tiny), on its device."""
    from ..backbones import build_tiny, load_adapter
    from ..dtypes import torch_dtype

    device = config.ode.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(config.model.dtype)
    path = config.ode.teacher_path or config.model.path
    if path is not None:
        adapter = load_adapter(path, torch_dtype=dtype)
    else:
        adapter = build_tiny(config.model.tiny, seed=config.model.tiny_seed)
        if dtype != torch.float32:
            adapter.pipe.to(dtype=dtype)
    adapter.pipe.to(device)
    for component in adapter.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return adapter


def _shard(adapter, config, prompts: list[str], sigmas, samples: range, latent_shape) -> tuple[dict, list[str]]:
    """The tensors and captions of one shard: the teacher's trajectories of ``samples``."""
    from ..pipeline import GuidedDenoiser

    ode, data = config.ode, config.data
    guidance = adapter.default_guidance_scale if ode.guidance_scale is None else ode.guidance_scale
    tensors: dict[str, torch.Tensor] = {}
    captions: list[str] = []
    ids = list(samples)
    for begin in range(0, len(ids), ode.batch_size):
        batch = ids[begin : begin + ode.batch_size]
        texts = [prompts[i % len(prompts)] for i in batch]
        cond, uncond = adapter.encode_prompt(
            texts, [ode.negative_prompt] * len(texts), do_classifier_free_guidance=guidance != 1.0,
            num_frames=data.num_frames, height=data.height, width=data.width,
        )
        guided = GuidedDenoiser(adapter, cond, uncond, guidance)
        noise = torch.stack([_sample_noise(ode.seed, i, tuple(latent_shape)) for i in batch]).to(adapter.device)
        states, x0 = ode_trajectory(guided, noise, sigmas, list(ode.keep_steps))
        stored = _tensor_items(cond, set())
        dtype = adapter.dtype
        for j, i in enumerate(batch):
            tensors[f"{i}/latents"] = x0[j].to(dtype).cpu().contiguous().clone()
            tensors[f"{i}/{ODE_STATES_KEY}"] = states[j].to(dtype).cpu().contiguous().clone()
            for key, value in stored.items():
                tensors[f"{i}/cond/{key}"] = value[j].detach().cpu().contiguous().clone()
        captions += texts
    return tensors, captions


def build_ode_pairs(
    config,
    *,
    max_shards: int | None = None,
    worker: tuple[int, int] = (0, 1),
    show_progress: bool | None = False,
) -> ODEBuild:
    """Sample the teacher's ODE trajectories into ``config.data.cache_dir`` (see the module docstring).

    ``max_shards``: stop after writing that many new shards (a time-sliced job; rerun to continue).
    ``worker = (k, n)``: this process builds the shards ``i`` with ``i % n == k`` (``n`` processes, e.g. one per
    GPU, share one folder); whichever finds every shard on disk at its end writes ``index.json``."""
    out_dir = config.data.cache_dir
    if out_dir is None:
        raise ValueError(f"set data.cache_dir: {BUILD_COMMAND} writes the ODE-pair cache there")
    rank, world = worker
    if not 0 <= rank < world:
        raise ValueError(f"worker must be K/N with 0 <= K < N, got {rank}/{world}")
    prompts = read_prompts(config)
    num_samples = config.ode.num_samples or len(prompts)
    adapter = load_teacher(config)
    _check_teacher_family(config, adapter.family)
    data = config.data
    latent_shape = list(adapter.latent_shape(data.num_frames, data.height, data.width)[1:])
    sigmas = adapter.sigmas(config.ode.num_steps, shift=config.ode.shift).float()
    settings = _settings(config, adapter.family, latent_shape, sigmas, num_samples)
    _check_settings(out_dir, settings)
    size = config.ode.shard_size
    num_shards = -(-num_samples // size)
    build = ODEBuild(out_dir, num_shards, [], [], None)
    mine = [n for n in range(num_shards) if n % world == rank]
    with _progress(sum(len(_shard_samples(n, size, num_samples)) for n in mine), "ode-pairs", show_progress) as bar:
        for n in mine:
            name = _shard_name(n)
            path = os.path.join(out_dir, name)
            if os.path.isfile(path):  # shards are atomic: a file under its name is complete
                build.skipped.append(name)
            elif max_shards is not None and len(build.written) >= max_shards:
                logger.info("ode-pairs: stopped after %d new shards; rerun to continue", len(build.written))
                return build
            else:
                tensors, texts = _shard(adapter, config, prompts, sigmas, _shard_samples(n, size, num_samples),
                                        latent_shape)  # fmt: skip
                _save_atomic(tensors, path, metadata={"captions": json.dumps(texts)})
                build.written.append(name)
            bar.update(len(_shard_samples(n, size, num_samples)))
    if all(os.path.isfile(os.path.join(out_dir, _shard_name(n))) for n in range(num_shards)):
        build.index = _write_index(out_dir, settings, num_shards)
    return build


def _shard_name(n: int) -> str:
    return f"shard_{n:05d}.safetensors"


def _shard_samples(n: int, size: int, num_samples: int) -> range:
    """The samples of shard ``n``: ``[n * size, (n + 1) * size)`` (the last shard may be shorter)."""
    return range(n * size, min(num_samples, (n + 1) * size))


def _write_index(out_dir: str, settings: dict, num_shards: int) -> str:
    """``index.json`` of the finished cache, from the shards on disk (captions from their metadata)."""
    from safetensors import safe_open

    shards, samples, cond_keys = [], [], []
    for n in range(num_shards):
        name = _shard_name(n)
        with safe_open(os.path.join(out_dir, name), framework="pt") as fh:
            texts = json.loads(fh.metadata()["captions"])
            if not cond_keys:
                first = next(k for k in fh.keys() if k.endswith("/latents")).split("/")[0]
                cond_keys = sorted(k.split("/", 2)[2] for k in fh.keys() if k.startswith(f"{first}/cond/"))
                dtype = dtype_name(fh.get_tensor(f"{first}/latents").dtype)
        shards.append(name)
        samples += [{"shard": n, "caption": text, "path": None} for text in texts]
    frames, height, width = settings["clip"]
    index = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "family": settings["family"], "num_frames": frames,
        "dtype": dtype, "num_samples": len(samples), "clip_shape": [frames, height, width, 3],
        "latent_shape": settings["latent_shape"], "cond_keys": cond_keys, "dropped_cond_keys": [],
        "null_cond": None, "shards": shards, "samples": samples, "source": settings["teacher"], "skipped": {},
        "sample_keys": [ODE_STATES_KEY], "built_by": BUILD_COMMAND, "ode": settings,
    }  # fmt: skip
    path = write_json_atomic(os.path.join(out_dir, INDEX_NAME), index, indent=1)
    logger.info("ode-pairs: %d trajectories in %d shards at %s", len(samples), len(shards), out_dir)
    return path
