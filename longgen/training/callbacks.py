"""Callbacks of the training loop: EMA, logging, checkpointing, validation and export.

Each callback does one job at fixed points of the loop (``on_train_start``, ``on_step_end``,
``on_loop_exit``, ``on_train_end``) and keeps its own state; a callback with state to resume exposes
``state_dict`` / ``load_state_dict`` and is registered with Accelerate's checkpointing by the trainer
(the EMA today). The order of the list is the order of the calls: EMA, logging, checkpoint,
validation, export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .build import sharded
from .checkpoint import checkpoint_root, prune_checkpoints, save_checkpoint
from .denoiser import AdapterView
from .export import export_weights

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer, TrainResult

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
FINAL_EMA_DIR = "final_ema"
METRICS_FILE = "metrics.jsonl"

__all__ = [
    "Callback",
    "CheckpointCallback",
    "EMACallback",
    "ExportCallback",
    "LoggingCallback",
    "ValidationCallback",
]


class Callback:
    """No-op hooks; subclasses override what they need."""

    def on_train_start(self, trainer: Trainer, stop_at: int) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, loss: float, result: TrainResult) -> None: ...

    def on_loop_exit(self, trainer: Trainer) -> None:
        """Always called when the step loop ends (also on an exception)."""

    def on_train_end(self, trainer: Trainer, result: TrainResult, finished: bool) -> None: ...


class EMACallback(Callback):
    """Exponential moving average of the trained parameters (``diffusers.training_utils.EMAModel``)."""

    def __init__(self, config, params: list[torch.nn.Parameter], device):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.device = device
        self.model = EMAModel(
            params,
            decay=config.ema.decay,
            update_after_step=config.ema.update_after_step,
            use_ema_warmup=config.ema.warmup,
        )
        self.model.to(device)

    def on_step_end(self, trainer, step, loss, result) -> None:
        self.model.step(self.params)

    @contextlib.contextmanager
    def averaged(self):
        """The averaged weights in the trained parameters for the block (validation, export)."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.model.to(self.device)


class LoggingCallback(Callback):
    """Progress bar, ``metrics.jsonl`` and the tracker's scalars; stops on a non-finite loss."""

    def __init__(self, config, output_dir: str):
        self.config = config
        self.output_dir = output_dir
        self.bar = None
        self.metrics = None
        self.stop_at = 0

    def on_train_start(self, trainer, stop_at) -> None:
        from tqdm.auto import tqdm

        acc = trainer.accelerator
        self.stop_at = stop_at
        self.bar = tqdm(
            total=self.config.train.steps,
            initial=trainer.state.step,
            desc="train",
            unit="step",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        if acc.is_main_process:
            self.metrics = open(os.path.join(self.output_dir, METRICS_FILE), "a")

    def on_step_end(self, trainer, step, loss, result) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss} at step {step}: lower optim.lr, keep optim.grad_clip on, or use "
                "train.mixed_precision=bf16 instead of fp16"
            )
        lr = trainer.scheduler.get_last_lr()[0]
        epoch = trainer.state.epoch
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % self.config.train.log_every == 0 or step == self.stop_at:
            trainer.accelerator.log({"train/loss": loss, "train/lr": lr, "train/epoch": epoch}, step=step)
            if self.metrics is not None:
                record = {"step": step, "loss": loss, "lr": lr, "epoch": epoch, "time": time.time()}
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()

    def on_loop_exit(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


class CheckpointCallback(Callback):
    """A checkpoint every ``train.checkpoint_every`` steps and always at the end of a run."""

    def __init__(self, config, output_dir: str):
        self.config = config
        self.output_dir = output_dir
        self.saved_step: int | None = None

    def save(self, trainer) -> str:
        """A complete, atomically written checkpoint of the current step (all processes call this)."""
        acc, state = trainer.accelerator, trainer.state
        extra = {"epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch}
        path = save_checkpoint(acc, self.output_dir, state.step, self.config, extra=extra)
        if acc.is_main_process:
            prune_checkpoints(checkpoint_root(self.output_dir), self.config.train.keep_last)
        acc.wait_for_everyone()
        self.saved_step = state.step
        return path

    def on_step_end(self, trainer, step, loss, result) -> None:
        every = self.config.train.checkpoint_every
        if every and step % every == 0:
            result.last_checkpoint = self.save(trainer)

    def on_train_end(self, trainer, result, finished) -> None:
        # Every run ends resumable: a stopped one continues, a finished one can be extended (more steps).
        if self.saved_step != trainer.state.step:
            result.last_checkpoint = self.save(trainer)


class ValidationCallback(Callback):
    """A long validation clip every ``validation.every`` steps (and at the end), written and logged."""

    def __init__(self, config, output_dir: str, ema: EMACallback | None, prompts=None):
        self.config = config
        self.output_dir = output_dir
        self.ema = ema
        self.prompts = prompts
        """Prompt source for the pipeline (the validation prompt encoded once), or None: the adapter's."""
        self.validated_step: int | None = None

    def check(self, adapter, method) -> None:
        """The validation clip's size and sampler options, checked when the trainer is built: they are otherwise
        first read at step ``validation.every``, after that many steps of training."""
        vcfg, data = self.config.validation, self.config.data
        if not (vcfg.every or vcfg.at_end) or getattr(method, "generate_validation", None) is not None:
            return
        from ..pipeline import LongVideoPipeline

        native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
        num_frames = vcfg.num_frames or adapter.num_pixel_frames(2 * native_latent)
        try:
            shape = adapter.latent_shape(num_frames, vcfg.height or data.height, vcfg.width or data.width)
            _, knobs, _ = LongVideoPipeline(adapter).plan_sampler(
                vcfg.sampler, shape[2], dict(vcfg.sampler_options), vcfg.steps
            )
            window, stride = getattr(knobs, "window", None), getattr(knobs, "stride", None)
            if isinstance(window, int):  # windowed samplers check their windows against the clip only when run
                from ..windows import window_starts

                window_starts(shape[2], window, stride if isinstance(stride, int) else 1)
        except ValueError as err:
            raise ValueError(
                f"the validation clip cannot be generated: {err} (validation.num_frames / height / width / sampler / "
                "sampler_options; validation.every=0 and validation.at_end=false train without one)"
            ) from None

    def on_step_end(self, trainer, step, loss, result) -> None:
        every = self.config.validation.every
        if every and step % every == 0:
            self._run(trainer, step, result)

    def on_train_end(self, trainer, result, finished) -> None:
        if finished and self.config.validation.at_end and self.validated_step != trainer.state.step:
            self._run(trainer, trainer.state.step, result)

    def _run(self, trainer, step, result) -> None:
        path = self.validate(trainer, step)
        self.validated_step = step
        if path:
            result.validation_videos.append(path)

    @torch.no_grad()
    def validate(self, trainer, step: int) -> str | None:
        """Generate the validation clip with the configured sampler, write it and log it (main process).

        Plain and DDP runs generate on the main process only; with DeepSpeed / FSDP every process takes
        part (the weights are sharded), and only the main one writes the video.
        """
        acc = trainer.accelerator
        is_sharded = sharded(acc)
        everyone = is_sharded or trainer.cp_degree > 1  # sharded weights / split sequences need everyone
        if not everyone and not acc.is_main_process:
            acc.wait_for_everyone()
            return None
        path = None
        if acc.is_main_process:
            folder = os.path.join(self.output_dir, "validation")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"step_{step:08d}.mp4")
        # Bypass DDP when only the main process generates: its collectives would wait for the others.
        denoise = trainer.wrapped if is_sharded else acc.unwrap_model(trainer.wrapped, keep_fp32_wrapper=True)
        use_ema = self.ema is not None and self.config.validation.use_ema
        was_training = trainer.wrapped.training
        trainer.wrapped.eval()
        try:
            view = AdapterView(trainer.adapter, denoise, self.prompts)
            # a method may generate its own clip (a causal student streams through its own KV cache)
            generate = getattr(trainer.method, "generate_validation", None) or self._generate
            with self.ema.averaged() if use_ema else contextlib.nullcontext():
                generate(view, acc.device, path)
        finally:
            trainer.wrapped.train(was_training)
        if path is not None:
            logger.info("validation clip of step %d: %s", step, path)
            self.log_video(acc, path, step)
            if self.config.validation.drift_metrics:
                self.log_drift(acc, path, step)
        if not everyone:
            acc.wait_for_everyone()
        return path

    def _generate(self, adapter, device, path: str | None) -> None:
        from ..pipeline import LongVideoPipeline

        vcfg, data = self.config.validation, self.config.data
        native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
        LongVideoPipeline(adapter, device=device).generate(
            prompt=vcfg.prompt,
            negative_prompt=vcfg.negative_prompt,
            num_frames=vcfg.num_frames or adapter.num_pixel_frames(2 * native_latent),
            height=vcfg.height or data.height,
            width=vcfg.width or data.width,
            num_inference_steps=vcfg.steps,
            guidance_scale=vcfg.guidance_scale,
            seed=vcfg.seed,
            sampler=vcfg.sampler,
            sampler_options=dict(vcfg.sampler_options),
            output_path=path,
            fps=vcfg.fps,
            show_progress=False,
        )

    def log_drift(self, accelerator, path: str, step: int) -> dict[str, float]:
        """Score the clip for drift (:mod:`.drift`), log the scalars and write them beside it as JSON."""
        from ..files import write_json_atomic
        from .drift import drift_scalars, synthetic_world

        world = synthetic_world(self.config, self.output_dir, self.config.validation.prompt)
        scalars = drift_scalars(path, world)
        write_json_atomic(os.path.splitext(path)[0] + ".json", {"step": step, **scalars})
        if accelerator.trackers:
            accelerator.log({f"validation/{k}": v for k, v in scalars.items()}, step=step)
        return scalars

    @staticmethod
    def log_video(accelerator, path: str, step: int) -> None:
        """Send the clip to the trackers: tensorboard gets a strip of frames (NHWC), wandb the video."""
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                from ..io import read_video

                frames = read_video(path)
                picks = np.linspace(0, len(frames) - 1, num=min(8, len(frames))).round().astype(int)
                tracker.log_images({"validation/frames": frames[picks]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation/video": wandb.Video(path, format="mp4")}, step=step)


class ExportCallback(Callback):
    """At the end of a finished run: ``final/`` (and ``final_ema/`` with EMA), see :mod:`.export`."""

    def __init__(self, config, output_dir: str, ema: EMACallback | None):
        self.config = config
        self.output_dir = output_dir
        self.ema = ema

    def on_train_end(self, trainer, result, finished) -> None:
        if finished and self.config.train.save_final:
            result.final_dir, result.ema_dir = self.export(trainer)

    def export(self, trainer) -> tuple[str | None, str | None]:
        """LoRA: ``final/pytorch_lora_weights.safetensors`` (diffusers format); full fine-tune: a diffusers
        model folder; ExVideo: its trained parameters. With EMA the averaged weights go to ``final_ema/``."""
        final = self._export(trainer, FINAL_DIR)
        ema_dir = None
        if self.ema is not None:
            with self.ema.averaged():
                ema_dir = self._export(trainer, FINAL_EMA_DIR)
        return final, ema_dir

    def _export(self, trainer, name: str) -> str | None:
        return export_weights(
            os.path.join(self.output_dir, name),
            accelerator=trainer.accelerator,
            wrapped=trainer.wrapped,
            adapter=trainer.adapter,
            config=self.config,
            trainable_names=trainer.trainable_names,
            extension=trainer.extension,
        )
