"""The Accelerate training loop: post-tune a diffusers video model through its longgen adapter.

One code path for one CPU, one GPU and many: Accelerate does mixed precision, gradient accumulation,
DDP, DeepSpeed ZeRO and FSDP (chosen by ``accelerate launch --config_file``), PEFT adds LoRA, diffusers
gives the LR schedules and the EMA. The parts: :mod:`.build` (accelerator, model, extension, LoRA,
data), :mod:`.methods` (a training method owns its modules, optimizer and step; ``denoising`` is the
first), :mod:`.callbacks` (EMA, logging, checkpoints, validation, export). This module is the loop.

Exact resume: every random draw of a step (noise levels, noise, caption dropout) comes from a CPU
generator seeded by ``(seed, process, micro-step)``, the data order by ``(seed, epoch)`` (Accelerate's
seedable sampler) and the clip starts by ``(seed, epoch, index)`` (the data set); the checkpoint holds
the weights, optimizer, scheduler, EMA, RNG states and the data position, so a resumed run continues
the same loss curve.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import set_seed

from . import build
from .build import enable_context_parallel, resolve_mixed_precision
from .callbacks import (  # noqa: F401  (re-exported names)
    FINAL_DIR,
    FINAL_EMA_DIR,
    METRICS_FILE,
    CheckpointCallback,
    EMACallback,
    ExportCallback,
    LoggingCallback,
    ValidationCallback,
)
from .checkpoint import TrainingState, load_checkpoint, register_trainable_state_hooks, resolve_resume
from .config import Config
from .denoiser import DenoiserModule
from .export import EXTENSION_INFO, EXVIDEO_WEIGHTS  # noqa: F401  (re-exported names)
from .methods import MethodContext, get_method

logger = logging.getLogger(__name__)

__all__ = ["DenoiserModule", "TrainResult", "Trainer", "enable_context_parallel", "resolve_mixed_precision"]


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


class Trainer:
    """Build everything from a :class:`Config` (``Trainer(config)``), then ``train()`` and ``close()``."""

    def __init__(self, config: Config):
        self.config = config
        self.output_dir = os.path.abspath(config.train.output_dir)
        self.accelerator = acc = build.build_accelerator(config, self.output_dir)
        if config.ema.enabled and build.sharded_weights(acc):
            raise ValueError(
                "ema.enabled=true needs whole weights on every process; with DeepSpeed ZeRO-3 or FSDP set "
                "ema.enabled=false, or train with configs/accelerate/ddp.yaml or zero2.yaml"
            )
        self.cache_index = build.latent_cache_index(config)  # a wrong cache fails before the model loads
        self.resumed_from = resolve_resume(config.train.resume, self.output_dir)
        if self.resumed_from is not None:
            build.check_resume_config(self.resumed_from, config)
        set_seed(config.train.seed)
        if acc.is_main_process:
            from ..files import make_output_dir

            make_output_dir(self.output_dir, "train.output_dir")
            config.save(os.path.join(self.output_dir, "config.yaml"))
        self._build_model()
        self.dataset, loader, null_cond = build.build_data(config, acc, self.output_dir, self.dp_size, self.adapter.family)
        self.method = get_method(
            config.objective.method,
            MethodContext(config, self.adapter, acc, self.dp_rank, null_cond, extension=self.extension),
        )
        modules = self.method.modules()
        if hasattr(self.method, "build_optimizers"):  # one optimizer per module (methods.py docstring)
            pairs = self.method.build_optimizers()
        else:
            pairs = [self.method.build_optimizer([p for m in modules for p in m.parameters() if p.requires_grad])]
        build.configure_deepspeed(acc, config)
        prepared, self.optimizers, self.schedulers, self.loader = build.prepare(
            acc, modules, [o for o, _ in pairs], [s for _, s in pairs], loader, config, self.dp_size, self.dp_rank
        )
        self.optimizer, self.scheduler = self.optimizers[0], self.schedulers[0]
        self.method.bind(prepared)
        if hasattr(self.method, "bind_optimizers"):
            self.method.bind_optimizers(self.optimizers, self.schedulers)
        self.wrapped = prepared[0]
        # the trained denoiser's parameters (EMA, clipping); with one optimizer over all modules, all of them
        owned = prepared[:1] if len(pairs) > 1 else prepared
        self.params = [p for m in owned for p in acc.unwrap_model(m).parameters() if p.requires_grad]
        self._build_callbacks()
        self.validation.check(self.adapter, self.method)
        register_trainable_state_hooks(acc)
        if self.resumed_from is not None:
            load_checkpoint(acc, self.resumed_from)
            logger.info("resumed from %s at step %d", self.resumed_from, self.state.step)
        self._init_trackers()
        self._paths_file = self._open_paths_log() if config.train.log_data_paths else None

    def _build_model(self) -> None:
        """The adapter, its extension, the trainable parameters and the parallel layout."""
        config, acc = self.config, self.accelerator
        self.adapter = build.build_adapter(config, acc.device)
        self.prompts = None
        if self.cache_index is not None:
            self.prompts = build.release_text_encoders(self.adapter, config, acc.device)
        data = config.data
        self.num_latent_frames = self.adapter.latent_shape(data.num_frames, data.height, data.width)[2]
        self.extension = build.apply_extension(self.adapter, config, self.num_latent_frames)
        self.extension_state = None if self.extension is None else self.extension.handle
        self.trainable_names = build.select_trainable(self.adapter, config, self.extension)
        self.cp_degree = config.train.ulysses_degree * config.train.ring_degree
        if acc.num_processes % self.cp_degree:
            raise ValueError(
                f"{acc.num_processes} processes cannot form groups of train.ulysses_degree x train.ring_degree = "
                f"{self.cp_degree}; launch a multiple of {self.cp_degree} processes"
            )
        self.dp_size = acc.num_processes // self.cp_degree
        self.dp_rank = acc.process_index // self.cp_degree  # ranks of one context-parallel group are adjacent
        if self.cp_degree > 1:
            build.setup_context_parallel(self.adapter, config, acc, self.dp_size)
        if config.train.gradient_checkpointing:
            build.enable_gradient_checkpointing(self.adapter)

    def _build_callbacks(self) -> None:
        """Loop state and callbacks, registered for checkpointing in a fixed order (state, then EMA)."""
        config, acc, out = self.config, self.accelerator, self.output_dir
        self.state = TrainingState()
        acc.register_for_checkpointing(self.state)
        self.ema_callback = EMACallback(config, self.params, acc.device) if config.ema.enabled else None
        if self.ema_callback is not None:
            acc.register_for_checkpointing(self.ema_callback)
        self.checkpointing = CheckpointCallback(config, out)
        self.validation = ValidationCallback(config, out, self.ema_callback, self.prompts)
        self.callbacks = [cb for cb in (self.ema_callback,) if cb is not None] + [
            LoggingCallback(config, out),
            self.checkpointing,
            self.validation,
            ExportCallback(config, out, self.ema_callback),
        ]

    @property
    def ema(self):
        """The ``EMAModel`` (None without EMA)."""
        return None if self.ema_callback is None else self.ema_callback.model

    # --- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until ``train.steps`` (or ``train.stop_after_steps`` more); the callbacks do the rest."""
        tcfg, state = self.config.train, self.state
        result = TrainResult(step=state.step)
        stop_at = (
            tcfg.steps
            if tcfg.stop_after_steps is None
            else min(tcfg.steps, state.step + tcfg.stop_after_steps)
        )
        batches = self._batches()
        for callback in self.callbacks:
            callback.on_train_start(self, stop_at)
        self.wrapped.train()
        try:
            while state.step < stop_at:
                loss = self._optimizer_step(batches)
                state.step += 1
                result.losses[state.step] = loss
                for callback in self.callbacks:
                    callback.on_step_end(self, state.step, loss, result)
        finally:
            for callback in self.callbacks:
                callback.on_loop_exit(self)
        result.step = state.step
        for callback in self.callbacks:
            callback.on_train_end(self, result, state.step >= tcfg.steps)
        return result

    def _optimizer_step(self, batches: Iterator[dict]) -> float:
        """One optimizer step over ``train.grad_accumulation`` micro-batches; the loss over all processes."""
        acc, tcfg, clip = self.accelerator, self.config.train, self.config.optim.grad_clip
        losses = []
        for micro in range(tcfg.grad_accumulation):
            batch = next(batches)
            self._log_paths(batch, micro)
            if hasattr(self.method, "train_step"):  # the method steps its own optimizers
                losses.append(self.method.train_step(batch, self.state.step * tcfg.grad_accumulation + micro))
                continue
            with acc.accumulate(self.wrapped):
                loss = self.method.loss(batch, self.state.step * tcfg.grad_accumulation + micro)
                acc.backward(loss * self.cp_degree if self.cp_degree > 1 else loss)
                if acc.sync_gradients and clip:
                    acc.clip_grad_norm_(self.params, clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if not acc.sync_gradients:
            raise RuntimeError(
                "gradient accumulation is out of step with train.grad_accumulation; the accelerate config "
                "must not set its own gradient_accumulation_steps"
            )
        return acc.reduce(torch.stack(losses).mean(), reduction="mean").item()

    def _batches(self) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch, starting at the saved data position."""
        state = self.state
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(state.epoch)
            self.loader.set_epoch(state.epoch)
            loader = self.loader
            if state.batches_in_epoch:
                loader = self.accelerator.skip_first_batches(self.loader, state.batches_in_epoch)
                loader.set_epoch(state.epoch)
            for batch in loader:
                state.batches_in_epoch += 1
                yield batch
            state.epoch += 1
            state.batches_in_epoch = 0

    # --- entry points of the parts -----------------------------------------------------------------
    def _encode(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """Clean latents and cond of a micro-batch (the denoising method's encoder)."""
        return self.method.encode(batch, generator)

    def save_checkpoint(self) -> str:
        """A complete, atomically written checkpoint of the current step (all processes call this)."""
        return self.checkpointing.save(self)

    def validate(self, step: int) -> str | None:
        """Generate, write and log the validation clip of ``step`` (see :class:`.ValidationCallback`)."""
        return self.validation.validate(self, step)

    def export(self) -> tuple[str | None, str | None]:
        """Write ``final/`` (and ``final_ema/``); see :class:`.ExportCallback`."""
        return self.callbacks[-1].export(self)

    def _log_video(self, path: str, step: int) -> None:
        ValidationCallback.log_video(self.accelerator, path, step)

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

    def _open_paths_log(self):
        folder = os.path.join(self.output_dir, "data_paths")
        os.makedirs(folder, exist_ok=True)
        return open(os.path.join(folder, f"rank{self.accelerator.process_index}.txt"), "a")

    def _log_paths(self, batch: dict, micro_step: int) -> None:
        if self._paths_file is None:
            return
        for name in batch.get("path") or batch.get("caption") or []:
            self._paths_file.write(f"{self.state.step}\t{micro_step}\t{name}\n")
        self._paths_file.flush()

    def close(self) -> None:
        """End the trackers and close the data-path log."""
        if self._paths_file is not None:
            self._paths_file.close()
            self._paths_file = None
        self.accelerator.end_training()


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
