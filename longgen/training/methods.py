"""Training methods: plug-ins of one loop (DESIGN.md "Training methods are plug-ins of one loop").

A training method owns its trainable modules, its optimizers and its step; the loop, the callbacks and
Accelerate stay the same. The loop asks a method for

* ``modules()``: the ``nn.Module`` s Accelerate prepares (the first is the trained denoiser),
* ``build_optimizer(params)`` -> ``(optimizer, lr_scheduler)``,
* ``bind(prepared)``: the prepared modules, after ``accelerator.prepare``,
* ``loss(batch, micro_step)``: the scalar loss of one micro-batch (the loop does backward, clipping,
  the optimizer step and accumulation).

A method that trains several networks with their own optimizers (DMD: a student and a critic) defines
instead ``build_optimizers()`` -> ``[(optimizer, lr_scheduler), ...]`` (one per module, same order),
``bind_optimizers(optimizers, schedulers)`` (the prepared ones) and ``train_step(batch, micro_step)``,
which does its own backward passes and optimizer steps and returns the loss to log. The first module
stays the trained denoiser (EMA, validation and export use it). Under FSDP2 and DeepSpeed each module is
prepared with its optimizer on its own (DeepSpeed: one engine each, which the method steps through
``engine.backward`` / ``engine.step``: ``accelerator.backward`` drives only the first engine).

Methods register by name (:func:`register_method`) and ``objective.method`` selects one. The first one,
``denoising``, is the backbone's native denoising loss at per-frame noise levels (clip, Diffusion
Forcing, AR-Diffusion; :mod:`longgen.training.objectives`). Later methods (ODE regression, DMD with a
critic, ...) add their own modules and optimizers the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from .denoiser import DenoiserModule
from .objectives import check_conditioning_tasks, sample_given_frames, sample_training_sigmas, training_loss

__all__ = [
    "DenoisingMethod",
    "MethodContext",
    "TrainingMethod",
    "get_method",
    "method_names",
    "register_method",
    "step_generator",
]


def step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """A CPU generator for one micro-step: independent across processes and steps, stateless in between."""
    (state,) = np.random.SeedSequence([seed, process_index, micro_step]).generate_state(1, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(state) & ((1 << 63) - 1))


class MethodContext:
    """What a method is built from: the config, the adapter, the accelerator, its data-parallel rank."""

    def __init__(self, config, adapter, accelerator, dp_rank: int, null_cond: dict | None, extension=None):
        self.config = config
        self.adapter = adapter
        self.accelerator = accelerator
        self.dp_rank = dp_rank
        self.null_cond = null_cond
        self.extension = extension
        """The applied ``extension.method`` (``build.AppliedExtension``: ``.handle``), or None."""


class TrainingMethod(Protocol):
    """The interface the loop drives (see the module docstring)."""

    name: str

    def modules(self) -> list[torch.nn.Module]: ...

    def build_optimizer(self, params: list[torch.nn.Parameter]) -> tuple[Any, Any]: ...

    def bind(self, prepared: list[torch.nn.Module]) -> None: ...

    def loss(self, batch: dict, micro_step: int) -> torch.Tensor: ...


_METHODS: dict[str, Callable[[MethodContext], TrainingMethod]] = {}


def register_method(name: str, factory: Callable[[MethodContext], TrainingMethod]) -> None:
    """Make ``objective.method=<name>`` build ``factory(context)``."""
    _METHODS[name] = factory


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str, context: MethodContext) -> TrainingMethod:
    if name not in _METHODS:
        raise ValueError(f"unknown objective.method {name!r}; choose one of: {', '.join(_METHODS)}")
    return _METHODS[name](context)


def build_adamw_schedule(config, accelerator, params):
    """AdamW over ``params`` with the configured diffusers LR schedule (stepped once per process)."""
    from diffusers.optimization import get_scheduler

    cfg = config.optim
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    n = accelerator.num_processes  # Accelerate steps a prepared scheduler once per process per step
    scheduler = get_scheduler(
        cfg.schedule,
        optimizer,
        num_warmup_steps=cfg.warmup_steps * n,
        num_training_steps=config.train.steps * n,
    )
    return optimizer, scheduler


class DenoisingMethod:
    """The backbone's native denoising loss at per-frame noise levels drawn by ``objective.mode``.

    With ``conditioning.tasks`` set, each clip also draws given frames (:func:`sample_given_frames`): fed
    clean at noise level 0 (or ``conditioning.context_sigma``) and left out of the loss.
    """

    name = "denoising"

    def __init__(self, context: MethodContext):
        self.ctx = context
        self.denoiser = DenoiserModule(context.adapter)
        self.prepared: torch.nn.Module = self.denoiser
        cfg = context.config.conditioning
        if cfg.tasks:  # fail before training when the clips are too short for a task
            num_latent_frames = context.adapter.num_latent_frames(context.config.data.num_frames)
            try:
                check_conditioning_tasks(
                    dict(cfg.tasks), num_latent_frames, min_context=cfg.min_context_latent_frames
                )
            except ValueError as err:
                from .config import ConfigError

                raise ConfigError(f"conditioning.tasks: {err}") from None

    def modules(self) -> list[torch.nn.Module]:
        return [self.denoiser]

    def build_optimizer(self, params):
        return build_adamw_schedule(self.ctx.config, self.ctx.accelerator, params)

    def bind(self, prepared: list[torch.nn.Module]) -> None:
        (self.prepared,) = prepared

    @torch.no_grad()
    def encode(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """Clean latents ``[B, C, f, h, w]`` and the cond of a micro-batch (cached, or encoded now)."""
        ctx = self.ctx
        device = ctx.accelerator.device
        dropout = ctx.config.data.caption_dropout
        if "latents" in batch:
            latents = batch["latents"].to(device)
            cond = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch["cond"].items()}
            if dropout > 0:
                drop = (torch.rand(latents.shape[0], generator=generator) < dropout).to(device)
                for key, value in cond.items():
                    null = ctx.null_cond[key].to(device=device, dtype=value.dtype).expand_as(value)
                    cond[key] = torch.where(drop.view(-1, *([1] * (value.ndim - 1))), null, value)
            return latents, cond
        from ..data.cache import encode_conds

        video = batch["video"].to(device)
        captions = list(batch["caption"])
        if dropout > 0:
            drop = torch.rand(len(captions), generator=generator) < dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return ctx.adapter.encode_video(video), encode_conds(ctx.adapter, captions, video)

    def loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        ctx = self.ctx
        obj = ctx.config.objective
        generator = step_generator(ctx.config.train.seed, ctx.dp_rank, micro_step)  # shared within a CP group
        latents, cond = self.encode(batch, generator)
        sigma = sample_training_sigmas(
            latents.shape[0],
            latents.shape[2],
            obj.mode,
            causal_block_size=obj.causal_block_size,
            num_timesteps=obj.num_timesteps,
            shift=obj.shift,
            generator=generator,
            device=ctx.accelerator.device,
            schedule=ctx.adapter.schedule,  # VP models' discrete schedule (eps/v), None for flow models
            clip_share=obj.clip_share,
        )
        given = self.given_frames(latents.shape[0], latents.shape[2], generator)
        loss, _ = training_loss(
            ctx.adapter,
            latents,
            cond,
            sigma,
            generator=generator,
            weighting=obj.weighting,
            denoise=self.prepared,
            given=given,
            given_sigma=ctx.config.conditioning.context_sigma,
        )
        return loss

    def given_frames(self, batch_size: int, num_latent_frames: int, generator) -> torch.Tensor | None:
        """The micro-batch's given-frame mask ``[B, F]`` (None without ``conditioning.tasks``)."""
        cfg = self.ctx.config.conditioning
        if not cfg.tasks:
            return None
        return sample_given_frames(
            batch_size,
            num_latent_frames,
            dict(cfg.tasks),
            min_context=cfg.min_context_latent_frames,
            max_context=cfg.max_context_latent_frames,
            generator=generator,
        ).to(self.ctx.accelerator.device)


register_method(DenoisingMethod.name, DenoisingMethod)


def data_cache_command(name: str) -> str | None:
    """The command that builds the ``data.cache_dir`` method ``name`` reads (None: ``longgen precompute``)."""
    return getattr(_METHODS.get(name), "data_cache_command", None)


# The methods beyond ``denoising`` register themselves on import (causal_forcing and ode_regression; dmd).
from . import causal_methods, self_forcing  # noqa: E402, F401
