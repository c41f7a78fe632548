"""The Accelerate training loop: post-tune a diffusers video model through its longgen adapter.

One code path for one CPU, one GPU and many: Accelerate does mixed precision, gradient accumulation,
DDP, DeepSpeed ZeRO and FSDP (chosen by ``accelerate launch --config_file``), PEFT adds LoRA
(``model.add_adapter``), diffusers gives the LR schedules and the EMA. longgen adds only what is
specific to long video: per-frame noise levels (:mod:`longgen.training.objectives`), extension-aware
post-tuning, long validation clips, and checkpoints that resume bit for bit.

The adapter's ``denoise`` is the model call of every objective. To let Accelerate's wrappers (DDP's
gradient hooks, FSDP's unsharding, DeepSpeed's engine, autocast) see that call, the trainer wraps
``denoise`` in a small ``nn.Module`` (:class:`DenoiserModule`) that owns the trained network, prepares
that module, and routes ``adapter.denoise`` through the prepared wrapper for the run.

Exact resume: every random draw of a step (noise levels, noise, caption dropout) comes from a CPU
generator seeded by ``(seed, process, micro-step)``, the data order by ``(seed, epoch)`` (Accelerate's
seedable sampler) and the clip starts by ``(seed, epoch, index)`` (the data set); the checkpoint holds
the weights, optimizer, scheduler, EMA, RNG states and the data position, so a resumed run continues
the same loss curve.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    TrainingState,
    checkpoint_root,
    prune_checkpoints,
    register_trainable_state_hooks,
    resolve_resume,
    save_checkpoint,
)
from .config import ROPE_METHODS, Config
from .objectives import sample_training_sigmas, training_loss

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FINAL_DIR = "final"
FINAL_EMA_DIR = "final_ema"
EXTENSION_INFO = "longgen_extension.json"
EXVIDEO_WEIGHTS = "exvideo_weights.safetensors"
METRICS_FILE = "metrics.jsonl"

__all__ = ["DenoiserModule", "TrainResult", "Trainer", "enable_context_parallel", "resolve_mixed_precision"]


# --- pieces ---------------------------------------------------------------------------------------
class DenoiserModule(torch.nn.Module):
    """``adapter.denoise`` as an ``nn.Module`` that owns the trained network (``self.model``).

    Accelerate prepares this module, so DDP / FSDP / DeepSpeed / autocast wrap the whole denoiser call,
    conversions and all, while the stock diffusers network inside stays unmodified.
    """

    def __init__(self, adapter):
        super().__init__()
        self.model = adapter.model
        object.__setattr__(self, "_adapter", adapter)  # a plain reference, not a submodule

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        # The class's method, not the instance attribute the trainer points at this module.
        return type(self._adapter).denoise(self._adapter, x, sigma, cond)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
"""Pipeline components that only encode prompts (freed when training from a latent cache)."""


class _EncodedPrompts:
    """``adapter.encode_prompt`` for a fixed validation prompt, encoded once before the text encoder is freed."""

    def __init__(self, encode, prompts: list[str], negative_prompt: str | None, guidance: bool):
        negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
        self.key = (tuple(prompts), None if negatives is None else tuple(negatives), guidance)
        self.value = encode(prompts, negatives, do_classifier_free_guidance=guidance)

    def __call__(self, prompt, negative_prompt=None, image=None, do_classifier_free_guidance=True, **_):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        key = (tuple(prompts), None if negatives is None else tuple(negatives), do_classifier_free_guidance)
        if image is not None or key != self.key:
            raise RuntimeError(
                "the text encoder was freed because training reads text embeddings from the latent cache "
                f"(data.cache_dir); only the validation prompt {self.key[0]!r} was encoded. Generate other "
                "prompts with the exported weights (longgen generate)"
            )
        return self.value


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    step: int
    losses: dict[int, float] = field(default_factory=dict)
    """Optimizer step -> loss averaged over micro-batches and processes (this run's steps only)."""
    final_dir: str | None = None
    ema_dir: str | None = None
    last_checkpoint: str | None = None
    validation_videos: list[str] = field(default_factory=list)


def resolve_mixed_precision(name: str) -> str:
    """``auto`` -> bf16 on a GPU that supports it, fp32 (``no``) on CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """A CPU generator for one micro-step: independent across processes and steps, stateless in between."""
    (state,) = np.random.SeedSequence([seed, process_index, micro_step]).generate_state(1, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(state) & ((1 << 63) - 1))


def _flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"train.steps": 4, ...}`` with scalar values (what trackers accept as hparams)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            out[name] = str(value)
        else:
            out[name] = value
    return out


def _replace_dir(tmp: str, final: str) -> None:
    """Move a finished output folder into place, replacing an older one."""
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def enable_context_parallel(
    model: torch.nn.Module,
    ulysses_degree: int,
    ring_degree: int = 1,
    device_type: str = "cuda",
    dp_size: int = 1,
) -> None:
    """Split the model's token sequence over ``ulysses_degree x ring_degree`` processes (diffusers CP).

    The device mesh is ``(dp, ring, ulysses)`` over all processes, with the ranks of one context-parallel
    group adjacent, so data parallelism runs across groups. Every rank of a group sees the gathered
    output, but its backward yields only its share of the gradients: the group's gradients *sum* to the
    full ones. A data-parallel wrapper that averages over all processes (DDP, FSDP) therefore needs the
    loss scaled by the CP degree (the trainer does this).
    """
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device_type, (dp_size, ring_degree, ulysses_degree), mesh_dim_names=("dp", "ring", "ulysses")
    )
    cp_config = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree, mesh=mesh)
    if device_type == "cpu" and torch.accelerator.device_count() == 0:
        # diffusers picks the device as rank % device_count(), which divides by zero on CPU-only hosts.
        original = torch.accelerator.device_count
        torch.accelerator.device_count = lambda: 1
        try:
            model.enable_parallelism(config=cp_config)
        finally:
            torch.accelerator.device_count = original
    else:
        model.enable_parallelism(config=cp_config)


# --- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Build everything from a :class:`Config` (``Trainer(config)``), then ``train()`` and ``close()``.

    Construction validates the clip size against the model, loads the model, applies the extension,
    adds LoRA (or selects the parameters of a full fine-tune), builds the data, optimizer and schedule,
    prepares them with Accelerate and restores the checkpoint named by ``train.resume``.
    """

    def __init__(self, config: Config):
        from accelerate.utils import set_seed

        self.config = config
        self.output_dir = os.path.abspath(config.train.output_dir)
        self.accelerator = self._build_accelerator()
        acc = self.accelerator
        if config.ema.enabled and self._sharded_weights():
            raise ValueError(
                "ema.enabled=true needs whole weights on every process; with DeepSpeed ZeRO-3 or FSDP set "
                "ema.enabled=false, or train with configs/accelerate/ddp.yaml or zero2.yaml"
            )
        set_seed(config.train.seed)
        if acc.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            config.save(os.path.join(self.output_dir, "config.yaml"))

        self.adapter = self._build_adapter()
        if self._uses_latent_cache():
            self._release_encoders()
        latent_shape = self.adapter.latent_shape(
            config.data.num_frames, config.data.height, config.data.width
        )
        self.num_latent_frames = latent_shape[2]
        self.extension_state = self._apply_extension()
        self.trainable_names = self._select_trainable()
        self.cp_degree = config.train.ulysses_degree * config.train.ring_degree
        if acc.num_processes % self.cp_degree:
            raise ValueError(
                f"{acc.num_processes} processes cannot form groups of train.ulysses_degree x train.ring_degree = "
                f"{self.cp_degree}; launch a multiple of {self.cp_degree} processes"
            )
        self.dp_size = acc.num_processes // self.cp_degree
        self.dp_rank = acc.process_index // self.cp_degree  # ranks of one context-parallel group are adjacent
        if self.cp_degree > 1:
            self._enable_context_parallel()
        if config.train.gradient_checkpointing:
            model = self.adapter.model
            if not getattr(model, "_supports_gradient_checkpointing", False):
                raise ValueError(
                    f"{type(model).__name__} does not support gradient checkpointing; set "
                    "train.gradient_checkpointing=false"
                )
            model.enable_gradient_checkpointing()

        self.dataset, loader = self._build_data()
        self.denoiser = DenoiserModule(self.adapter)
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        optimizer, scheduler = self._build_optimizer(params)
        self._configure_deepspeed()
        if self.cp_degree > 1:
            # One clip per context-parallel group: shard the data over the data-parallel ranks only.
            from accelerate.data_loader import prepare_data_loader

            self.wrapped, self.optimizer, self.scheduler = acc.prepare(self.denoiser, optimizer, scheduler)
            self.loader = prepare_data_loader(
                loader,
                acc.device,
                num_processes=self.dp_size,
                process_index=self.dp_rank,
                put_on_device=True,
                use_seedable_sampler=True,
                data_seed=config.train.seed,
            )
        else:
            self.wrapped, self.optimizer, self.loader, self.scheduler = acc.prepare(
                self.denoiser, optimizer, loader, scheduler
            )
        self.adapter.denoise = self.wrapped  # every adapter.denoise call now goes through the wrapper
        self.params = [p for p in acc.unwrap_model(self.wrapped).parameters() if p.requires_grad]

        self.state = TrainingState()
        acc.register_for_checkpointing(self.state)
        self.ema = None
        if config.ema.enabled:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(
                self.params,
                decay=config.ema.decay,
                update_after_step=config.ema.update_after_step,
                use_ema_warmup=config.ema.warmup,
            )
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        register_trainable_state_hooks(acc)

        self.resumed_from = resolve_resume(config.train.resume, self.output_dir)
        if self.resumed_from is not None:
            acc.load_state(self.resumed_from)
            if self.ema is not None:
                self.ema.to(acc.device)
            logger.info("resumed from %s at step %d", self.resumed_from, self.state.step)
        self._init_trackers()
        self._paths_file = None
        if config.train.log_data_paths:
            folder = os.path.join(self.output_dir, "data_paths")
            os.makedirs(folder, exist_ok=True)
            self._paths_file = open(os.path.join(folder, f"rank{acc.process_index}.txt"), "a")

    # --- construction ------------------------------------------------------------------------------
    def _build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

        cfg = self.config
        report_to = cfg.validation.report_to
        if report_to != "none":
            module = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
            try:
                __import__(module)
            except ImportError as err:
                raise ImportError(
                    f"validation.report_to={report_to} needs the {module} package: pip install {module} "
                    "(or pip install 'longgen[train]'), or set validation.report_to=none"
                ) from err
        from accelerate.state import AcceleratorState

        # Accelerate keeps mixed precision and plugins in a process-wide singleton that refuses new settings;
        # a second Trainer in one process (a sweep, the demo, tests) starts from a clean one. The process
        # group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.train.grad_accumulation, sync_with_dataloader=False
            ),
            log_with=None if report_to == "none" else report_to,
            project_config=ProjectConfiguration(
                project_dir=self.output_dir, logging_dir=os.path.join(self.output_dir, "logs")
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        )

    def _build_adapter(self):
        from ..backbones import build_tiny, load_adapter

        cfg = self.config.model
        if cfg.path is not None:
            adapter = load_adapter(cfg.path, torch_dtype=TORCH_DTYPES[cfg.dtype])
        else:
            adapter = build_tiny(cfg.tiny, seed=cfg.tiny_seed)
            if cfg.dtype != "fp32":
                adapter.pipe.to(dtype=TORCH_DTYPES[cfg.dtype])
        experts = getattr(adapter, "experts", None)
        if experts is not None and len(experts()) > 1:
            raise NotImplementedError(
                "training a two-expert model (Wan 2.2 A14B: transformer + transformer_2) is not supported: "
                "train one expert as its own single-transformer pipeline folder"
            )
        adapter.pipe.to(self.accelerator.device)
        for component in adapter.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.eval()
        return adapter

    def _uses_latent_cache(self) -> bool:
        from ..data.cache import is_latent_cache

        cache_dir = self.config.data.cache_dir
        return cache_dir is not None and is_latent_cache(cache_dir)

    def _release_encoders(self) -> None:
        """Free the text encoders when training reads text embeddings from the latent cache.

        The validation prompt is encoded once, now, and served from memory afterwards, so a large text
        encoder (Wan's UMT5-XXL: 5.7B parameters) occupies neither the accelerator nor host memory during
        training. Image-conditioned models keep their encoders (validation would need a new image).
        """
        adapter, pipe = self.adapter, self.adapter.pipe
        if getattr(adapter, "requires_image_condition", False):
            return
        names = [n for n in TEXT_ENCODERS if isinstance(getattr(pipe, n, None), torch.nn.Module)]
        if not names:
            return
        vcfg = self.config.validation
        if vcfg.every > 0:
            guidance = adapter.default_guidance_scale if vcfg.guidance_scale is None else vcfg.guidance_scale
            adapter.encode_prompt = _EncodedPrompts(
                adapter.encode_prompt, [vcfg.prompt], vcfg.negative_prompt, guidance != 1.0
            )
        freed = sum(p.numel() for n in names for p in getattr(pipe, n).parameters())
        for name in names:
            setattr(pipe, name, None)
        gc.collect()
        if self.accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info(
            "freed %s (%.1fM parameters): text embeddings come from the latent cache%s",
            ", ".join(names),
            freed / 1e6,
            "; the validation prompt was encoded once" if vcfg.every > 0 else "",
        )

    def _apply_extension(self):
        """Apply the configured extension before LoRA, so LoRA and the optimizer see the final model."""
        ext = self.config.extension
        if ext.method is None:
            return None
        adapter = self.adapter
        train_latent_frames = ext.train_latent_frames or adapter.num_latent_frames(
            adapter.native_video_size[0]
        )
        target = ext.target_latent_frames or self.num_latent_frames
        from ..extend import apply_exvideo, apply_rope_extension

        if ext.method in ROPE_METHODS:
            return apply_rope_extension(adapter, ext.method, train_latent_frames, target, **ext.options)
        options = {"train_latent_frames": train_latent_frames, **ext.options}
        return apply_exvideo(adapter, target, set_trainable=True, **options)

    def _select_trainable(self) -> list[str]:
        """Add LoRA through PEFT, or mark the parameters of a full (or subset) fine-tune trainable."""
        cfg = self.config
        model = self.adapter.model
        if cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig

            targets = list(cfg.lora.target_modules or self.adapter.lora_target_modules)
            peft_config = PeftLoraConfig(
                r=cfg.lora.rank,
                lora_alpha=cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank,
                lora_dropout=cfg.lora.dropout,
                target_modules=targets,
                init_lora_weights=True,
            )
            try:
                model.add_adapter(peft_config)
            except ValueError as err:
                raise ValueError(
                    f"LoRA targets {targets} do not match {type(model).__name__}: {err}. Set lora.target_modules "
                    f"to module name suffixes of the model (the backbone's defaults: "
                    f"{list(self.adapter.lora_target_modules)})"
                ) from err
            if cfg.model.dtype != "fp32":
                from diffusers.training_utils import cast_training_params

                # LoRA weights train in fp32 on a low-precision base
                cast_training_params(model, dtype=torch.float32)
        elif cfg.extension.method == "exvideo" and not cfg.train.trainable_patterns:
            pass  # apply_exvideo marked its tables, convolutions and temporal blocks trainable
        else:
            patterns = [re.compile(p) for p in cfg.train.trainable_patterns]
            for name, param in model.named_parameters():
                param.requires_grad_(not patterns or any(p.search(name) for p in patterns))
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not names:
            sample = [name for name, _ in model.named_parameters()][:8]
            raise ValueError(
                f"no parameter trains: train.trainable_patterns {cfg.train.trainable_patterns} match none of the "
                f"model's parameters (e.g. {sample})"
            )
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("training %d of %d parameters (%.3f%%)", trained, total, 100.0 * trained / max(total, 1))
        return names

    def _enable_context_parallel(self) -> None:
        cfg = self.config.train
        model = self.adapter.model
        if self.adapter.context_parallel_plan() is None:
            raise ValueError(
                f"{type(model).__name__} has no context-parallel plan (_cp_plan); set train.ulysses_degree=1 and "
                "train.ring_degree=1 (Wan and LTX support context parallel)"
            )
        enable_context_parallel(
            model, cfg.ulysses_degree, cfg.ring_degree, self.accelerator.device.type, dp_size=self.dp_size
        )

    def _synthetic_source(self) -> str:
        """Write the synthetic moving-shapes data set into the output folder once (main process)."""
        from ..data.synthetic import ensure_synthetic_dataset

        folder = os.path.join(self.output_dir, "synthetic_data")
        if self.accelerator.is_main_process:
            ensure_synthetic_dataset(folder, self.config.data)
        self.accelerator.wait_for_everyone()
        return os.path.join(folder, "manifest.jsonl")

    def _build_data(self):
        from torch.utils.data import DataLoader

        cfg = self.config
        data = cfg.data
        from ..data.cache import LatentCacheDataset, collate_latents, is_latent_cache

        self.null_cond = None
        if data.cache_dir is not None and is_latent_cache(data.cache_dir):
            dataset = LatentCacheDataset(data.cache_dir)
            collate = collate_latents
            if data.caption_dropout > 0:
                null = dataset.null_cond()
                if null is None:
                    raise ValueError(
                        f"data.caption_dropout={data.caption_dropout} needs the empty prompt's cond in the cache "
                        f"{data.cache_dir}; rebuild it with longgen precompute or set data.caption_dropout=0"
                    )
                self.null_cond = null
            logger.info("training from the latent cache %s (%d clips)", data.cache_dir, len(dataset))
        else:
            from ..data.video import VideoClipDataset, collate_clips

            if data.cache_dir is not None:
                logger.warning(
                    "data.cache_dir=%s holds no finished latent cache; decoding videos", data.cache_dir
                )
            source = data.source if data.source is not None else self._synthetic_source()
            dataset = VideoClipDataset(
                source,
                data.num_frames,
                data.height,
                data.width,
                frame_stride=data.frame_stride,
                target_fps=data.target_fps,
                random_start=data.random_start,
                seed=cfg.train.seed,
            )
            collate = collate_clips
        per_step = cfg.train.batch_size * self.dp_size
        if len(dataset) < per_step:
            raise ValueError(
                f"the data set has {len(dataset)} clips but one micro-step takes train.batch_size x data-parallel "
                f"processes = {per_step}; add videos or lower train.batch_size"
            )
        loader = DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            shuffle=data.shuffle,
            collate_fn=collate,
            num_workers=data.num_workers,
            drop_last=True,
        )
        return dataset, loader

    def _build_optimizer(self, params):
        from diffusers.optimization import get_scheduler

        cfg = self.config.optim
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        # Accelerate steps a prepared scheduler once per process per optimizer step.
        n = self.accelerator.num_processes
        scheduler = get_scheduler(
            cfg.schedule,
            optimizer,
            num_warmup_steps=cfg.warmup_steps * n,
            num_training_steps=self.config.train.steps * n,
        )
        return optimizer, scheduler

    def _configure_deepspeed(self) -> None:
        """Fill DeepSpeed's ``auto`` gradient clipping from ``optim.grad_clip`` (DeepSpeed clips itself)."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        ds_config = plugin.deepspeed_config
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = float(self.config.optim.grad_clip or 0.0)
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = self.config.train.batch_size

    def _init_trackers(self) -> None:
        vcfg = self.config.validation
        if vcfg.report_to == "none":
            return
        init_kwargs = {}
        if vcfg.report_to == "wandb":
            init_kwargs["wandb"] = {"dir": self.output_dir, "name": os.path.basename(self.output_dir)}
        self.accelerator.init_trackers(
            vcfg.project, config=_flat_config(self.config.to_dict()), init_kwargs=init_kwargs
        )

    # --- one step ----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch, starting at the saved data position."""
        acc = self.accelerator
        state = self.state
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(state.epoch)
            self.loader.set_epoch(state.epoch)
            loader = self.loader
            if state.batches_in_epoch:
                loader = acc.skip_first_batches(self.loader, state.batches_in_epoch)
                loader.set_epoch(state.epoch)
            for batch in loader:
                state.batches_in_epoch += 1
                yield batch
            state.epoch += 1
            state.batches_in_epoch = 0

    @torch.no_grad()
    def _encode(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """Clean latents ``[B, C, f, h, w]`` and the cond of a micro-batch (cached, or encoded now)."""
        device = self.accelerator.device
        dropout = self.config.data.caption_dropout
        if "latents" in batch:
            latents = batch["latents"].to(device)
            cond = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch["cond"].items()}
            if dropout > 0:
                drop = (torch.rand(latents.shape[0], generator=generator) < dropout).to(device)
                for key, value in cond.items():
                    null = self.null_cond[key].to(device=device, dtype=value.dtype).expand_as(value)
                    cond[key] = torch.where(drop.view(-1, *([1] * (value.ndim - 1))), null, value)
            return latents, cond
        from ..data.cache import encode_conds

        video = batch["video"].to(device)
        captions = list(batch["caption"])
        if dropout > 0:
            drop = torch.rand(len(captions), generator=generator) < dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        latents = self.adapter.encode_video(video)
        cond = encode_conds(self.adapter, captions, video)
        return latents, cond

    def _micro_step_loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        cfg = self.config
        acc = self.accelerator
        generator = _step_generator(cfg.train.seed, self.dp_rank, micro_step)  # shared within a CP group
        latents, cond = self._encode(batch, generator)
        schedule = getattr(self.adapter, "schedule", None)
        from ..schedules import VPSchedule

        sigma = sample_training_sigmas(
            latents.shape[0],
            latents.shape[2],
            cfg.objective.mode,
            causal_block_size=cfg.objective.causal_block_size,
            num_timesteps=cfg.objective.num_timesteps,
            shift=cfg.objective.shift,
            generator=generator,
            device=acc.device,
            schedule=schedule if isinstance(schedule, VPSchedule) else None,
        )
        loss, _ = training_loss(
            self.adapter, latents, cond, sigma, generator=generator, weighting=cfg.objective.weighting
        )
        return loss

    def _log_paths(self, batch: dict, micro_step: int) -> None:
        if self._paths_file is None:
            return
        names = batch.get("path") or batch.get("caption") or []
        for name in names:
            self._paths_file.write(f"{self.state.step}\t{micro_step}\t{name}\n")
        self._paths_file.flush()

    # --- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until ``train.steps`` (or ``train.stop_after_steps`` more); checkpoint, validate, export."""
        cfg = self.config
        tcfg = cfg.train
        acc = self.accelerator
        state = self.state
        result = TrainResult(step=state.step)
        stop_at = tcfg.steps
        if tcfg.stop_after_steps is not None:
            stop_at = min(stop_at, state.step + tcfg.stop_after_steps)
        batches = self._batches()
        bar = tqdm(
            total=tcfg.steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        metrics = open(os.path.join(self.output_dir, METRICS_FILE), "a") if acc.is_main_process else None
        clip = cfg.optim.grad_clip
        self.wrapped.train()
        try:
            while state.step < stop_at:
                micro_losses = []
                for micro in range(tcfg.grad_accumulation):
                    micro_step = state.step * tcfg.grad_accumulation + micro
                    batch = next(batches)
                    self._log_paths(batch, micro)
                    with acc.accumulate(self.wrapped):
                        loss = self._micro_step_loss(batch, micro_step)
                        acc.backward(loss * self.cp_degree if self.cp_degree > 1 else loss)
                        if acc.sync_gradients and clip:
                            acc.clip_grad_norm_(self.params, clip)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    micro_losses.append(loss.detach())
                if not acc.sync_gradients:
                    raise RuntimeError(
                        "gradient accumulation is out of step with train.grad_accumulation; the accelerate config "
                        "must not set its own gradient_accumulation_steps"
                    )
                if self.ema is not None:
                    self.ema.step(self.params)
                state.step += 1
                step_loss = acc.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                if not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"the loss is {step_loss} at step {state.step}: lower optim.lr, keep optim.grad_clip on, or "
                        "use train.mixed_precision=bf16 instead of fp16"
                    )
                result.losses[state.step] = step_loss
                lr = self.scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if state.step % tcfg.log_every == 0 or state.step == stop_at:
                    record = {"step": state.step, "loss": step_loss, "lr": lr, "epoch": state.epoch}
                    acc.log(
                        {"train/loss": step_loss, "train/lr": lr, "train/epoch": state.epoch}, step=state.step
                    )
                    if metrics is not None:
                        metrics.write(json.dumps({**record, "time": time.time()}) + "\n")
                        metrics.flush()
                if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
                    result.last_checkpoint = self.save_checkpoint()
                vcfg = cfg.validation
                if vcfg.every and state.step % vcfg.every == 0:
                    path = self.validate(state.step)
                    if path:
                        result.validation_videos.append(path)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        result.step = state.step
        finished = state.step >= tcfg.steps
        if not finished or (tcfg.checkpoint_every and state.step % tcfg.checkpoint_every):
            result.last_checkpoint = self.save_checkpoint()  # a stopped run is always resumable
        if finished:
            if cfg.validation.at_end and not (
                cfg.validation.every and state.step % cfg.validation.every == 0
            ):
                path = self.validate(state.step)
                if path:
                    result.validation_videos.append(path)
            if tcfg.save_final:
                result.final_dir, result.ema_dir = self.export()
        return result

    # --- checkpoints, validation, export ------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """A complete, atomically written checkpoint of the current step (all processes call this)."""
        path = save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state.step,
            self.config,
            extra={"epoch": self.state.epoch, "batches_in_epoch": self.state.batches_in_epoch},
        )
        if self.accelerator.is_main_process:
            prune_checkpoints(checkpoint_root(self.output_dir), self.config.train.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def _sharded_weights(self) -> bool:
        """Weights split across processes (FSDP, DeepSpeed ZeRO-3)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            return True
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        return (
            acc.distributed_type == DistributedType.DEEPSPEED
            and plugin is not None
            and plugin.zero_stage == 3
        )

    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    @torch.no_grad()
    def validate(self, step: int) -> str | None:
        """Generate the validation clip with the configured sampler, write it and log it (main process).

        Plain and DDP runs generate on the main process only; with DeepSpeed / FSDP every process takes
        part (the weights are sharded), and only the main one writes the video.
        """
        from ..pipeline import LongVideoPipeline

        acc = self.accelerator
        vcfg = self.config.validation
        sharded = self._sharded()
        everyone = sharded or self.cp_degree > 1  # sharded weights / split sequences need every process
        if not everyone and not acc.is_main_process:
            acc.wait_for_everyone()
            return None
        adapter = self.adapter
        native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
        num_frames = vcfg.num_frames or adapter.num_pixel_frames(2 * native_latent)
        path = None
        if acc.is_main_process:
            folder = os.path.join(self.output_dir, "validation")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"step_{step:08d}.mp4")
        use_ema = self.ema is not None and vcfg.use_ema
        was_training = self.wrapped.training
        self.wrapped.eval()
        if use_ema:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        if not sharded:  # bypass DDP: its collectives would wait for processes that do not validate
            adapter.denoise = acc.unwrap_model(self.wrapped, keep_fp32_wrapper=True)
        try:
            LongVideoPipeline(adapter, device=acc.device).generate(
                prompt=vcfg.prompt,
                negative_prompt=vcfg.negative_prompt,
                num_frames=num_frames,
                height=vcfg.height or self.config.data.height,
                width=vcfg.width or self.config.data.width,
                num_inference_steps=vcfg.steps,
                guidance_scale=vcfg.guidance_scale,
                seed=vcfg.seed,
                sampler=vcfg.sampler,
                sampler_options=dict(vcfg.sampler_options),
                output_path=path,
                fps=vcfg.fps,
                show_progress=False,
            )
        finally:
            adapter.denoise = self.wrapped
            if use_ema:
                self.ema.restore(self.params)
            self.wrapped.train(was_training)
        if path is not None:
            self._log_video(path, step)
        if not everyone:
            acc.wait_for_everyone()
        return path

    def _log_video(self, path: str, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                from ..io import read_video

                frames = read_video(path)
                picks = np.linspace(0, len(frames) - 1, num=min(8, len(frames))).round().astype(int)
                tracker.log_images({"validation/frames": frames[picks]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation/video": wandb.Video(path, format="mp4")}, step=step)

    def _model_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained network's full state dict (gathered under DeepSpeed / FSDP; all processes call)."""
        if self._sharded():
            full = self.accelerator.get_state_dict(self.wrapped)
            if full is None:  # DeepSpeed ZeRO-3 gathers the 16-bit state dict on the main process only
                return {}
            return {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
        return self.adapter.model.state_dict()

    def export(self) -> tuple[str | None, str | None]:
        """Write the trained weights for use outside longgen (all processes call; the main one writes).

        LoRA: ``final/pytorch_lora_weights.safetensors`` in the diffusers LoRA format (the pipeline class's
        ``save_lora_weights``), loadable with the stock pipeline's ``load_lora_weights``. Full fine-tune:
        ``final/<transformer|unet>/``, a diffusers model folder. ExVideo: its trained parameters. With EMA
        the averaged weights go to ``final_ema/`` the same way.
        """
        final = self._export_weights(os.path.join(self.output_dir, FINAL_DIR))
        ema_dir = None
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
            try:
                ema_dir = self._export_weights(os.path.join(self.output_dir, FINAL_EMA_DIR))
            finally:
                self.ema.restore(self.params)
        return final, ema_dir

    def _export_weights(self, target: str) -> str | None:
        acc = self.accelerator
        cfg = self.config
        acc.wait_for_everyone()
        state_dict = self._model_state_dict()
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return None
        tmp = f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        model = self.adapter.model
        if cfg.lora.enabled:
            self._save_lora(tmp, model, state_dict)
        elif cfg.extension.method == "exvideo":
            from safetensors.torch import save_file

            trained = {n: state_dict[n].detach().cpu().contiguous() for n in self.trainable_names}
            save_file(trained, os.path.join(tmp, EXVIDEO_WEIGHTS))
        else:
            folder = os.path.join(tmp, self.adapter.model_attr)
            if self._sharded():
                from safetensors.torch import save_file

                model.save_config(folder)
                weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
                save_file(
                    weights,
                    os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                    metadata={"format": "pt"},
                )
            else:
                model.save_pretrained(folder)
        if cfg.extension.method is not None:
            info = {
                "method": cfg.extension.method,
                "train_latent_frames": cfg.extension.train_latent_frames
                or self.adapter.num_latent_frames(self.adapter.native_video_size[0]),
                "target_latent_frames": cfg.extension.target_latent_frames or self.num_latent_frames,
                "options": cfg.extension.options,
                "note": "apply this extension at inference too (longgen.extend)",
            }
            with open(os.path.join(tmp, EXTENSION_INFO), "w") as fh:
                json.dump(info, fh, indent=2)
        cfg.save(os.path.join(tmp, "config.yaml"))
        _replace_dir(tmp, target)
        acc.wait_for_everyone()
        return target

    def _save_lora(self, folder: str, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        """Diffusers LoRA format through the pipeline class's ``save_lora_weights`` (PEFT keys + config)."""
        from peft.utils import get_peft_model_state_dict

        lora = {
            k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items()
        }
        peft_config = model.peft_config["default"].to_dict()
        pipe_cls = type(self.adapter.pipe)
        attr = self.adapter.model_attr
        save = getattr(pipe_cls, "save_lora_weights", None)
        params = inspect.signature(save).parameters if save is not None else {}
        if f"{attr}_lora_layers" in params:
            kwargs: dict[str, Any] = {f"{attr}_lora_layers": lora, "safe_serialization": True}
            if f"{attr}_lora_adapter_metadata" in params:
                kwargs[f"{attr}_lora_adapter_metadata"] = peft_config
            pipe_cls.save_lora_weights(folder, **kwargs)
            return
        # No LoRA loader on this pipeline (e.g. SVD): the model's own PEFT adapter file.
        logger.warning(
            "%s has no save_lora_weights; writing the LoRA with %s.save_lora_adapter (load it with "
            "model.load_lora_adapter)",
            pipe_cls.__name__,
            type(model).__name__,
        )
        model.save_lora_adapter(folder, safe_serialization=True)

    def close(self) -> None:
        """End trackers and release the adapter (its ``denoise`` is the stock method again)."""
        if self._paths_file is not None:
            self._paths_file.close()
            self._paths_file = None
        self.adapter.__dict__.pop("denoise", None)
        self.adapter.__dict__.pop("encode_prompt", None)
        self.accelerator.end_training()
