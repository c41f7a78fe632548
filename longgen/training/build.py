"""Building a run: the accelerator, the model and its extension, LoRA, the data and the resume checks.

Each function has one job and takes what it needs explicitly; :class:`~longgen.training.loop.Trainer`
calls them in order. Extension application lives in :func:`apply_extension` only (one place to switch
to an extension registry).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backbones import MixtureOfExperts
from ..dtypes import torch_dtype
from ..parallel import check_heads, check_token_split, enable_context_parallel
from .config import Config, ConfigError
from .denoiser import EncodedPrompts

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
"""Pipeline components that only encode prompts (freed when training from a latent cache)."""

__all__ = [
    "AppliedExtension",
    "apply_extension",
    "build_accelerator",
    "build_adapter",
    "build_data",
    "check_launch",
    "check_resume_config",
    "configure_deepspeed",
    "enable_context_parallel",
    "latent_cache_index",
    "loaded_text_encoders",
    "release_text_encoders",
    "resolve_mixed_precision",
    "select_trainable",
    "sharded",
    "sharded_weights",
]


# --- accelerator ----------------------------------------------------------------------------------
def resolve_mixed_precision(name: str) -> str:
    """``auto`` -> bf16 on a GPU that supports it, fp32 (``no``) on CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _check_tracker(report_to: str) -> None:
    if report_to == "none":
        return
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
    try:
        __import__(module)
    except ImportError as err:
        raise ImportError(
            f"validation.report_to={report_to} needs the {module} package: pip install {module} "
            "(or pip install 'longgen[train]'), or set validation.report_to=none"
        ) from err


def build_accelerator(config: Config, output_dir: str):
    """The Accelerator of the run (mixed precision, accumulation, trackers, seedable data order)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    report_to = config.validation.report_to
    _check_tracker(report_to)
    # Accelerate keeps mixed precision and plugins in a process-wide singleton that refuses new settings;
    # a second Trainer in one process (a sweep, the demo, tests) starts from a clean one. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.train.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.train.grad_accumulation, sync_with_dataloader=False
        ),
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(
            project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed),
    )
    check_launch(accelerator.num_processes)
    return accelerator


def check_launch(num_processes: int, environ: dict[str, str] | None = None) -> None:
    """Stop when the launcher started more processes than Accelerate joined into one run.

    ``accelerate launch --multi_gpu`` (or ``configs/accelerate/ddp.yaml``) with 2 processes on a machine
    without GPUs starts two processes that each become an independent single-process run (no process
    group), writing into one folder. ``WORLD_SIZE`` is what the launcher started.
    """
    env = os.environ if environ is None else environ
    launched = int(env.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but each one runs alone "
            "(accelerator.num_processes=1): there is no GPU for the multi-GPU config. On CPU launch with "
            "ACCELERATE_USE_CPU=true (or accelerate launch --cpu ...), or launch 1 process"
        )


def sharded_weights(accelerator) -> bool:
    """Weights split across processes (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and plugin is not None
        and plugin.zero_stage == 3
    )


def sharded(accelerator) -> bool:
    """The model runs inside a sharding engine (FSDP or DeepSpeed, any stage)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_deepspeed(accelerator, config: Config) -> None:
    """Fill DeepSpeed's ``auto`` gradient clipping from ``optim.grad_clip`` (DeepSpeed clips itself)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds_config = plugin.deepspeed_config
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = float(config.optim.grad_clip or 0.0)
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = config.train.batch_size


# --- model ----------------------------------------------------------------------------------------
def build_adapter(config: Config, device):
    """Load the model (a pipeline folder or a tiny random one), frozen and in eval mode, on ``device``."""
    from ..backbones import build_tiny, load_adapter

    cfg = config.model
    if cfg.path is not None:
        adapter = load_adapter(cfg.path, torch_dtype=torch_dtype(cfg.dtype))
    else:
        adapter = build_tiny(cfg.tiny, seed=cfg.tiny_seed)
        if cfg.dtype != "fp32":
            adapter.pipe.to(dtype=torch_dtype(cfg.dtype))
    if isinstance(adapter, MixtureOfExperts) and len(adapter.experts()) > 1:
        raise NotImplementedError(
            "training a two-expert model (Wan 2.2 A14B: transformer + transformer_2) is not supported: "
            "train one expert as its own single-transformer pipeline folder"
        )
    adapter.pipe.to(device)
    for component in adapter.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    return adapter


def loaded_text_encoders(adapter) -> list[str]:
    """Names of the pipeline's text encoders still loaded (:func:`release_text_encoders` frees them)."""
    components = adapter.pipe.components  # diffusers' name -> component map (None once freed)
    return [n for n in TEXT_ENCODERS if isinstance(components.get(n), torch.nn.Module)]


def release_text_encoders(adapter, config: Config, device) -> EncodedPrompts | None:
    """Free the text encoders when training reads text embeddings from the latent cache.

    The validation prompt is encoded once, now, and returned as the prompt source of validation, so a
    large text encoder (Wan's UMT5-XXL: 5.7B parameters) occupies neither the accelerator nor host memory
    during training. Image-conditioned models keep their encoders (validation would need a new image).
    """
    pipe = adapter.pipe
    if adapter.requires_image_condition:
        return None
    names = loaded_text_encoders(adapter)
    if not names:
        return None
    vcfg = config.validation
    prompts = None
    if vcfg.every > 0 or vcfg.at_end:
        guidance = adapter.default_guidance_scale if vcfg.guidance_scale is None else vcfg.guidance_scale
        prompts = EncodedPrompts(adapter.encode_prompt, [vcfg.prompt], vcfg.negative_prompt, guidance != 1.0)
    freed = sum(p.numel() for n in names for p in getattr(pipe, n).parameters())
    for name in names:
        setattr(pipe, name, None)
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    logger.info(
        "freed %s (%.1fM parameters): text embeddings come from the latent cache%s",
        ", ".join(names),
        freed / 1e6,
        "; the validation prompt was encoded once" if prompts is not None else "",
    )
    return prompts


@dataclass
class AppliedExtension:
    """An extension applied for training: its handle, what to export and whether it picks its parameters."""

    method: str
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)
    """What ``final/longgen_extension.json`` records (apply the same extension at inference)."""
    selects_parameters: bool = False
    """True when the extension marked its own trainable parameters (ExVideo): exported on their own."""


def apply_extension(adapter, config: Config, num_latent_frames: int) -> AppliedExtension | None:
    """Apply ``extension.method`` through the extension registry before LoRA, so LoRA and the optimizer see
    the final model; applied in its training form (the spec's ``training_options``, e.g. RIFLEx ``finetune``).

    The one place the trainer applies extensions: what it records for inference is the registry's
    ``handle.describe()`` (rebuilt by ``extension_from_metadata``), plus the two lengths at the top level.
    """
    import dataclasses

    from ..extend.registry import apply_extension as apply_registered
    from ..extend.registry import get_extension

    ext = config.extension
    if ext.method is None:
        return None
    spec = get_extension(ext.method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    lengths = {}
    if "train_latent_frames" in fields:
        native = adapter.num_latent_frames(adapter.native_video_size[0])
        lengths["train_latent_frames"] = ext.train_latent_frames or native
    if "target_latent_frames" in fields:
        lengths["target_latent_frames"] = ext.target_latent_frames or num_latent_frames
    handle = apply_registered(adapter, ext.method, {**ext.options, **lengths}, training=True)
    info = {**handle.describe(), **lengths, "note": "longgen generate re-applies this extension (longgen.extend)"}
    return AppliedExtension(ext.method, handle, info, selects_parameters=spec.trainable_parameters is not None)


def _add_lora(adapter, config: Config) -> None:
    from peft import LoraConfig as PeftLoraConfig

    cfg, model = config.lora, adapter.model
    targets = list(cfg.target_modules or adapter.lora_target_modules)
    peft_config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights=True,
    )
    try:
        model.add_adapter(peft_config)
    except ValueError as err:
        raise ValueError(
            f"LoRA targets {targets} do not match {type(model).__name__}: {err}. Set lora.target_modules "
            f"to module name suffixes of the model (the backbone's defaults: {list(adapter.lora_target_modules)})"
        ) from err
    if config.model.dtype != "fp32":
        from diffusers.training_utils import cast_training_params

        cast_training_params(model, dtype=torch.float32)  # LoRA weights train in fp32 on a low-precision base


def select_trainable(adapter, config: Config, extension: AppliedExtension | None) -> list[str]:
    """Add LoRA through PEFT, or mark the parameters of a full (or subset) fine-tune trainable."""
    model = adapter.model
    patterns = config.train.trainable_patterns
    if config.lora.enabled:
        _add_lora(adapter, config)
    elif not (extension is not None and extension.selects_parameters and not patterns):
        compiled = [re.compile(p) for p in patterns]
        for name, param in model.named_parameters():
            param.requires_grad_(not compiled or any(p.search(name) for p in compiled))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if not names:
        sample = [name for name, _ in model.named_parameters()][:8]
        raise ValueError(
            f"no parameter trains: train.trainable_patterns {patterns} match none of the model's parameters "
            f"(e.g. {sample})"
        )
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("training %d of %d parameters (%.3f%%)", trained, total, 100.0 * trained / max(total, 1))
    return names


def enable_gradient_checkpointing(adapter) -> None:
    model = adapter.model
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; set train.gradient_checkpointing=false"
        )
    model.enable_gradient_checkpointing()


def setup_context_parallel(adapter, config: Config, accelerator, dp_size: int) -> None:
    """Context parallel over ``train.ulysses_degree x train.ring_degree`` processes, with the adapter's plan.

    The degree must divide the model's heads (Ulysses) and the clip's token sequence; a ring on the native backend runs longgen's :func:`~longgen.parallel.ring_attention`.
    """
    plan = adapter.context_parallel_plan()
    if plan is None:
        raise ValueError(
            f"{type(adapter.model).__name__} has no context-parallel plan (_cp_plan); set train.ulysses_degree=1 "
            "and train.ring_degree=1 (Wan and LTX support context parallel)"
        )
    cfg = config.train
    check_heads(adapter.model, cfg.ulysses_degree, what="train.ulysses_degree")
    shape = adapter.latent_shape(config.data.num_frames, config.data.height, config.data.width)
    check_token_split(shape, adapter.patch_size, cfg.ulysses_degree * cfg.ring_degree,
                      what="train.ulysses_degree x train.ring_degree =")
    enable_context_parallel(
        adapter.model, cfg.ulysses_degree, cfg.ring_degree, accelerator.device.type, dp_size=dp_size, cp_plan=plan
    )


# --- data -----------------------------------------------------------------------------------------
def latent_cache_index(config: Config) -> dict[str, Any] | None:
    """The latent cache's ``index.json`` when ``data.cache_dir`` is set, checked against the config.

    A ``data.cache_dir`` without a finished cache, or one whose clips have another frame count than
    ``data.num_frames``, is an error: training would otherwise run on other data than asked for.
    """
    from ..data.cache import INDEX_NAME, cache_root, is_latent_cache

    data = config.data
    if data.cache_dir is None:
        return None
    if not is_latent_cache(data.cache_dir):
        state = (
            "does not exist"
            if not os.path.exists(data.cache_dir)
            else f"holds no finished cache ({INDEX_NAME})"
        )
        from .methods import data_cache_command

        command = data_cache_command(config.objective.method)
        if command is not None:  # a method that reads its own kind of cache (ode_regression: ODE pairs)
            raise ValueError(
                f"data.cache_dir={data.cache_dir} {state}: objective.method={config.objective.method} trains on "
                f"the cache that `{command}` builds into data.cache_dir; run it first"
            )
        raise ValueError(
            f"data.cache_dir={data.cache_dir} {state}: build it with longgen precompute (--num-frames "
            f"{data.num_frames}), or set data.cache_dir=null to decode the videos of data.source"
        )
    with open(os.path.join(cache_root(data.cache_dir), INDEX_NAME)) as fh:
        index = json.load(fh)
    clip_shape = list(index.get("clip_shape") or [])
    if clip_shape and int(clip_shape[0]) != data.num_frames:
        raise ValueError(
            f"the latent cache {data.cache_dir} holds clips of {clip_shape[0]} frames but data.num_frames="
            f"{data.num_frames}; set data.num_frames={clip_shape[0]} or rebuild the cache with longgen "
            f"precompute --num-frames {data.num_frames}"
        )
    return index


def _synthetic_source(config: Config, accelerator, output_dir: str) -> str:
    """Write the synthetic moving-shapes data set into the output folder once (main process)."""
    from ..data.synthetic import ensure_synthetic_dataset

    folder = os.path.join(output_dir, "synthetic_data")
    if accelerator.is_main_process:
        ensure_synthetic_dataset(folder, config.data)
    accelerator.wait_for_everyone()
    return os.path.join(folder, "manifest.jsonl")


def _cache_dataset(config: Config, family: str):
    from ..data.cache import LatentCacheDataset, collate_latents

    data = config.data
    dataset = LatentCacheDataset(data.cache_dir, family=family)  # a cache of another family: a clear error
    null_cond = dataset.null_cond()  # the empty prompt (caption dropout, DMD's guided real score) or None
    if data.caption_dropout > 0:
        if null_cond is None:
            raise ValueError(
                f"data.caption_dropout={data.caption_dropout} needs the empty prompt's cond in the cache "
                f"{data.cache_dir}; rebuild it with longgen precompute or set data.caption_dropout=0"
            )
    logger.info("training from the latent cache %s (%d clips)", data.cache_dir, len(dataset))
    return dataset, collate_latents, null_cond


def build_data(config: Config, accelerator, output_dir: str, dp_size: int, family: str):
    """``(dataset, loader, null_cond)``: the latent cache or the videos, one DataLoader (not yet prepared)."""
    from torch.utils.data import DataLoader

    data = config.data
    if latent_cache_index(config) is not None:
        dataset, collate, null_cond = _cache_dataset(config, family)
    else:
        from ..data.video import VideoClipDataset, collate_clips

        source = (
            data.source if data.source is not None else _synthetic_source(config, accelerator, output_dir)
        )
        dataset = VideoClipDataset(
            source,
            data.num_frames,
            data.height,
            data.width,
            frame_stride=data.frame_stride,
            target_fps=data.target_fps,
            random_start=data.random_start,
            seed=config.train.seed,
            video_backend=data.video_backend,
        )
        collate, null_cond = collate_clips, None
    per_step = config.train.batch_size * dp_size
    if len(dataset) < per_step:
        raise ValueError(
            f"the data set has {len(dataset)} clips but one micro-step takes train.batch_size x data-parallel "
            f"processes = {per_step}; add videos or lower train.batch_size"
        )
    loader = DataLoader(
        dataset,
        batch_size=config.train.batch_size,
        shuffle=data.shuffle,
        collate_fn=collate,
        num_workers=data.num_workers,
        drop_last=True,
    )
    return dataset, loader, null_cond


def prepare(accelerator, modules, optimizers, schedulers, loader, config: Config, dp_size: int, dp_rank: int):
    """``accelerator.prepare`` the method's modules, its optimizers and schedules (lists) and the data.

    With context parallelism the clips are sharded over the data-parallel ranks only (one clip per
    context-parallel group). FSDP2 and DeepSpeed take one model per ``prepare`` call, so a method with one
    optimizer per module (DMD's student and critic) is prepared pair by pair there: under DeepSpeed that makes
    one engine per module, each with its own optimizer, saved by ``save_state`` as ``pytorch_model`` and
    ``pytorch_model_1``. Returns ``(prepared modules, optimizers, schedulers, loader)``.
    """
    from accelerate.utils import DistributedType

    n, k = len(modules), len(optimizers)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    one_model_per_call = getattr(accelerator, "is_fsdp2", False) or deepspeed
    if n > 1 and n == k and one_model_per_call:
        pairs = [accelerator.prepare(m, o, s) for m, o, s in zip(modules, optimizers, schedulers)]
        prepared = ([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs])
    elif dp_size == accelerator.num_processes:
        out = accelerator.prepare(*modules, *optimizers, loader, *schedulers)
        return list(out[:n]), list(out[n : n + k]), list(out[n + k + 1 :]), out[n + k]
    else:
        out = accelerator.prepare(*modules, *optimizers, *schedulers)
        prepared = (list(out[:n]), list(out[n : n + k]), list(out[n + k :]))
    if dp_size == accelerator.num_processes:
        return (*prepared, accelerator.prepare(loader))
    from accelerate.data_loader import prepare_data_loader

    loader = prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=dp_size,
        process_index=dp_rank,
        put_on_device=True,
        use_seedable_sampler=True,
        data_seed=config.train.seed,
    )
    return (*prepared, loader)


# --- resume ---------------------------------------------------------------------------------------
RESUMABLE_CHANGES = (
    "train.steps",
    "train.stop_after_steps",
    "train.resume",
    "train.output_dir",
    "train.checkpoint_every",
    "train.keep_last",
    "train.log_every",
    "train.log_data_paths",
    "train.save_final",
    "data.num_workers",
    "data.cache_dir",
    "data.source",
    "validation.",
    "ema.update_after_step",
)
"""Keys (or section prefixes) that may differ between a checkpoint's config and the resuming run."""


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and not key.endswith("options"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _comparable(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config in one form for the resume check: the block-causal options resolved to all their fields (a
    default spelled out or left out is the same run), and a checkpoint of the short-lived ``causal.chunk_size`` /
    ``local_attn_size`` / ... keys (:data:`~longgen.training.config.MOVED_KEYS`) read as the extension it was."""
    import dataclasses

    from ..extend.configs import BlockCausalConfig
    from .config import CAUSAL_METHODS, MOVED_KEYS

    flat = dict(flat)
    moved = {new.rsplit(".", 1)[1]: flat.pop(old) for old, new in MOVED_KEYS.items() if old in flat}
    if moved and flat.get("objective.method") in CAUSAL_METHODS and flat.get("extension.method") is None:
        flat["extension.method"], flat["extension.options"] = "block-causal", moved
    if flat.get("extension.method") == "block-causal":
        try:
            flat["extension.options"] = dataclasses.asdict(BlockCausalConfig(**(flat.get("extension.options") or {})))
        except (TypeError, ValueError):
            pass  # compared as written
    return flat


def check_resume_config(checkpoint: str, config: Config) -> None:
    """Refuse to resume a checkpoint whose saved config differs in keys that change the model or the math."""
    import yaml

    from .checkpoint import CONFIG_NAME

    path = os.path.join(checkpoint, CONFIG_NAME)
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        saved = _flat(yaml.safe_load(fh) or {})
    current = _flat(config.to_dict())
    # a key the checkpoint's config lacks (a section added since it was written) had its default then
    defaults = _flat(Config().to_dict())
    saved = _comparable({**{k: v for k, v in defaults.items() if k not in saved and k in current}, **saved})
    current = _comparable(current)
    changed = [
        key
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {checkpoint}: its run used other settings ({details}). Resume with the same "
            f"values, or start a new run in another train.output_dir"
        )
