"""Self-Forcing DMD distillation (``objective.method=dmd``): a bidirectional model -> a causal few-step streamer.

Huang et al. 2025, "Self Forcing" (guandeh17/Self-Forcing, ``model/dmd.py``, ``trainer/distillation.py``),
after DMD (Yin et al. 2024). Three networks of one family:

* the **student** (generator): ``model`` with block-causal attention (``extension.method=block-causal``),
  trained through ``optim``; it generates every training clip itself, chunk by chunk against its KV cache
  (:func:`longgen.training.rollout.self_forcing_rollout`: gradient through each chunk's random exit step only);
* the **real score** (teacher): a frozen bidirectional model (``dmd.teacher``), with CFG;
* the **fake score** (critic): a trained bidirectional model (starts from ``dmd.critic``), fitted every step
  with the denoising loss to the student's detached outputs (its own AdamW, ``dmd.critic_lr``).

The distribution-matching gradient on a generated clip ``x`` noised to ``x_t`` at one level ``t`` per video
(uniform, shifted by ``dmd.timestep_shift``, clamped into ``[min_timestep, max_timestep]``) is

    g = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|      (per sample)
    loss = 1/2 * MSE(x, sg(x - g))                                   (so d loss / d x = g / numel)

The student steps every ``dmd.generator_every`` steps, the critic every step (Self-Forcing: 5). Streaming long
tuning (LongLive / Self-Forcing++): ``dmd.rollout_latent_frames`` several times the native length with the
cache's rolling window and sink; DMD scores the rollout's last ``dmd.window_latent_frames`` (the teacher's
length) and only the newest ``dmd.grad_latent_frames`` get gradient.

Data: the text conditions only (captions or cached conds); the clip's latents give the shape. The loop
checkpoints both trained networks, both optimizers and schedules (exact resume); the teacher is reloaded.
Distributed: DDP, FSDP2 and DeepSpeed ZeRO-2 (student and critic one engine each, stepping themselves; the
frozen teacher outside any engine); ZeRO-3 is refused.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch

from ..files import atomic_path
from .denoiser import DenoiserModule
from .methods import DenoisingMethod, MethodContext, build_adamw_schedule, register_method, step_generator
from .objectives import training_loss
from .rollout import draw_exit_steps, self_forcing_rollout

__all__ = ["DMDMethod", "dmd_gradient", "dmd_loss", "sample_dmd_sigmas"]

_SHARED = 2**31 - 1
"""Process index of the step generator every process shares (exit steps, DMD levels)."""


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The DMD gradient ``(x0_fake - x0_real) / mean|x - x0_real|`` (mean per sample; NaNs zeroed)."""
    dims = tuple(range(1, x.ndim))
    normalizer = (x.detach() - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / normalizer)


def dmd_loss(x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``1/2 MSE(x, sg(x - g))``: its gradient in ``x`` is ``g / x.numel()``."""
    target = (x.detach().double() - gradient.double()).detach()
    return 0.5 * torch.nn.functional.mse_loss(x.double(), target, reduction="mean").float()


def sample_dmd_sigmas(batch: int, cfg, generator: torch.Generator) -> torch.Tensor:
    """One flow sigma per video ``[B]``: uniform, shifted by ``cfg.timestep_shift``, clamped (Self-Forcing)."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    shift = float(cfg.timestep_shift)
    sigma = shift * u / (1.0 + (shift - 1.0) * u)
    return sigma.clamp(cfg.min_timestep, cfg.max_timestep).float()


def _score_adapter(config, adapter, path: str | None, device, what: str, dtype: str | None = None):
    """A bidirectional copy of the model family for the real / fake score, checked against the student."""
    from . import build

    source = dataclasses.replace(config.model, path=path) if path is not None else config.model
    if dtype is not None:
        source = dataclasses.replace(source, dtype=dtype)
    other = build.build_adapter(SimpleNamespace(model=source), device)  # reads config.model only
    if getattr(other, "model_attr", "transformer") != "transformer":
        raise ValueError(f"dmd.{what}: {other.family} is a UNet; DMD distillation needs a DiT teacher and critic")
    if other.family != adapter.family or other.latent_channels != adapter.latent_channels:
        raise ValueError(
            f"dmd.{what} is a {other.family!r} model with {other.latent_channels} latent channels but the student is "
            f"{adapter.family!r} with {adapter.latent_channels}: teacher, critic and student must share the family "
            "and latent space; point dmd.teacher / dmd.critic at a pipeline folder of the student's family"
        )
    return other


class DMDMethod(DenoisingMethod):
    """Self-Forcing DMD: student rollout, frozen real score with CFG, trained fake score (module docstring)."""

    name = "dmd"

    def __init__(self, context: MethodContext):
        super().__init__(context)
        config, cfg = context.config, context.config.dmd
        # here, not at the top: causal_methods and this module are both imported by methods.py to register
        from .causal_methods import training_mask

        # the student's block-causal hooks and KV cache (extension.method=block-causal, as every causal method)
        cache = training_mask(context, self._rollout_frames(config, context.adapter)).cache
        if config.train.grad_accumulation != 1:
            raise ValueError("objective.method=dmd steps its own optimizers: set train.grad_accumulation=1 "
                             "(raise train.batch_size instead)")
        self._deepspeed = self._check_deepspeed(context.accelerator)
        self.cache = cache
        self._check_window(config, self._rollout_frames(config, context.adapter))
        device = context.accelerator.device
        self.teacher = DenoiserModule(_score_adapter(config, context.adapter, cfg.teacher, device, "teacher",
                                                    cfg.teacher_dtype))
        # the critic trains all its weights: fp32 master weights whatever the student's base dtype (bf16 compute
        # comes from train.mixed_precision)
        critic_adapter = _score_adapter(config, context.adapter, cfg.critic or cfg.teacher, device, "critic", "fp32")
        critic_adapter.model.requires_grad_(True)
        critic_adapter.model.train()
        self.critic_adapter = critic_adapter
        self.critic = DenoiserModule(critic_adapter)
        self.critic_prepared: torch.nn.Module = self.critic
        from ..samplers.causal import warped_sigmas

        steps = [float(t) for t in cfg.denoising_steps]
        self.sigmas = (warped_sigmas(steps, shift=cfg.timestep_shift) if cfg.warp_denoising_step
                       else torch.tensor([*[t / 1000.0 for t in steps], 0.0]))
        self.metrics: dict[str, float] = {}
        self._null: dict[str, Any] | None = None

    @staticmethod
    def _rollout_frames(config, adapter) -> int:
        """Latent frames of each rollout: ``dmd.rollout_latent_frames``, else the training clip's."""
        data = config.data
        return config.dmd.rollout_latent_frames or adapter.latent_shape(data.num_frames, data.height, data.width)[2]

    @staticmethod
    def _check_deepspeed(accelerator) -> bool:
        """Whether the run is DeepSpeed (ZeRO-1/2: one engine per trained network; ZeRO-2 tested); ZeRO-3 is refused."""
        from . import build

        if accelerator.distributed_type.value != "DEEPSPEED":
            return False
        if build.sharded_weights(accelerator):
            raise ValueError(
                "objective.method=dmd does not support DeepSpeed ZeRO-3 (its two engines are tested under ZeRO-2, "
                "which keeps whole weights): launch with configs/accelerate/zero2.yaml, or "
                "configs/accelerate/fsdp.yaml (FSDP2) to shard the weights"
            )
        return True

    @staticmethod
    def _check_window(config, frames: int) -> None:
        """The DMD window fits in the rollout and the gradient frames in the window (errors name the keys)."""
        cfg = config.dmd
        window = cfg.window_latent_frames or frames
        if window > frames or (cfg.grad_latent_frames or window) > window:
            raise ValueError(
                f"dmd.window_latent_frames ({window}) must fit in the {frames}-frame rollout and "
                f"dmd.grad_latent_frames ({cfg.grad_latent_frames}) in the window"
            )

    # --- the loop's interface ---------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.critic]

    def build_optimizers(self) -> list[tuple[Any, Any]]:
        """Student AdamW (``optim``) and critic AdamW (``dmd.critic_lr``), each with the configured schedule."""
        config, acc = self.ctx.config, self.ctx.accelerator
        student = [p for p in self.denoiser.parameters() if p.requires_grad]
        critic_config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=config.dmd.critic_lr))
        critic = [p for p in self.critic.parameters() if p.requires_grad]
        return [build_adamw_schedule(config, acc, student), build_adamw_schedule(critic_config, acc, critic)]

    def bind(self, prepared: list[torch.nn.Module]) -> None:
        self.prepared, self.critic_prepared = prepared

    def bind_optimizers(self, optimizers: list, schedulers: list) -> None:
        self.optimizers, self.schedulers = optimizers, schedulers

    def train_step(self, batch: dict, micro_step: int) -> torch.Tensor:
        """One DMD iteration: the student every ``dmd.generator_every`` steps, then the critic. Returns the
        critic's denoising loss (the generator's DMD loss is in ``self.metrics``)."""
        ctx, cfg = self.ctx, self.ctx.config.dmd
        generator = step_generator(ctx.config.train.seed, ctx.dp_rank, micro_step)
        shared = step_generator(ctx.config.train.seed, _SHARED, micro_step)  # the same draw on every process
        shape, cond = self._shape_and_cond(batch, generator)
        self.metrics = {}
        if micro_step % cfg.generator_every == 0:
            loss = self._generator_loss(shape, cond, generator, shared)
            self._update(loss, self.prepared, 0)
            self.metrics["dmd/generator_loss"] = float(loss.detach())
        loss = self._critic_loss(shape, cond, generator, shared)
        self._update(loss, self.critic_prepared, 1)
        self.metrics["dmd/critic_loss"] = float(loss.detach())
        if ctx.accelerator.trackers:  # this process's values (the loop logs the averaged critic loss)
            ctx.accelerator.log(self.metrics, step=micro_step + 1)
        return loss.detach()

    @torch.no_grad()
    def generate_validation(self, view, device, path: str | None) -> None:
        """The validation clip as the distilled model runs at inference: streamed chunk by chunk through the
        student's KV cache with its few-step schedule, no CFG (``longgen generate --sampler causal``). Long by
        default (``validation.num_frames``, else twice the native length), so drift shows over training."""
        from ..io import write_video
        from ..samplers.causal import CausalSamplerConfig, sample_causal

        config = self.ctx.config
        vcfg, data, chunk = config.validation, config.data, self.cache.config.chunk_size
        num_frames = vcfg.num_frames or view.num_pixel_frames(2 * view.num_latent_frames(view.native_video_size[0]))
        height, width = vcfg.height or data.height, vcfg.width or data.width
        shape = list(view.latent_shape(num_frames, height, width))
        shape[2] = shape[2] // chunk * chunk or chunk  # whole chunks
        guidance = view.default_guidance_scale if vcfg.guidance_scale is None else vcfg.guidance_scale
        cond = view.encode_prompt(vcfg.prompt, negative_prompt=vcfg.negative_prompt, do_classifier_free_guidance=
                                  guidance != 1.0, num_frames=num_frames, height=height, width=width)[0]
        generator = torch.Generator("cpu").manual_seed(vcfg.seed)
        noise = torch.randn(shape, generator=generator).to(device)
        latents = sample_causal(
            lambda x, sigma, frame_offset=0: view.denoise(x, sigma, cond), noise, self.sigmas.to(device),
            cache=self.cache, config=CausalSamplerConfig(context_noise=config.dmd.context_noise),
            generator=generator, disable=True,
        )
        if path is not None:
            frames = (view.decode(latents)[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            with atomic_path(path) as tmp:
                write_video(tmp, iter([frames]), fps=vcfg.fps)

    # --- parts --------------------------------------------------------------------------------------
    def _shape_and_cond(self, batch: dict, generator) -> tuple[tuple[int, ...], dict[str, Any]]:
        """The rollout's latent shape ``(B, C, F, H, W)`` and the batch's text cond (the clip itself is unused)."""
        latents, cond = self.encode(batch, generator)
        frames = self.ctx.config.dmd.rollout_latent_frames or latents.shape[2]
        return (latents.shape[0], latents.shape[1], frames, *latents.shape[3:]), cond

    def _rollout(self, shape, cond, generator, shared, grad: bool) -> torch.Tensor:
        """The student's clip (gradient only through the exit steps of the newest ``grad_latent_frames``)."""
        cfg, chunk = self.ctx.config.dmd, self.cache.config.chunk_size
        device = self.ctx.accelerator.device
        noise = torch.randn(shape, generator=generator).to(device)
        exits = draw_exit_steps(shape[2] // chunk, len(self.sigmas) - 1, shared, cfg.same_exit_step)
        grad_frames = cfg.grad_latent_frames or cfg.window_latent_frames or shape[2]
        student = self.prepared if grad else self.ctx.accelerator.unwrap_model(self.prepared)
        with torch.set_grad_enabled(grad):
            x = self_forcing_rollout(
                lambda x, sigma: student(x, sigma, cond), self.cache, noise, self.sigmas, exits,
                context_noise=cfg.context_noise, grad_from=shape[2] - grad_frames, generator=generator,
            )
        window = cfg.window_latent_frames or shape[2]
        return x[:, :, -window:]

    def _noised(self, x: torch.Tensor, shared, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` at one DMD level per video, and the levels ``[B, F]``."""
        sigma = sample_dmd_sigmas(x.shape[0], self.ctx.config.dmd, shared).to(x.device)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        s5 = sigma[:, None, None, None, None]
        return (1.0 - s5) * x.detach() + s5 * eps, sigma[:, None].expand(-1, x.shape[2])

    def _generator_loss(self, shape, cond, generator, shared) -> torch.Tensor:
        x = self._rollout(shape, cond, generator, shared, grad=True)
        with torch.no_grad():
            x_t, sigma = self._noised(x, shared, generator)
            x0_real = self.teacher(x_t, sigma, cond)
            scale = self.ctx.config.dmd.guidance_scale
            if scale != 1.0:
                uncond = self.teacher(x_t, sigma, self._null_cond(cond))
                x0_real = uncond + scale * (x0_real - uncond)
            critic = self.ctx.accelerator.unwrap_model(self.critic_prepared)
            x0_fake = critic(x_t, sigma, cond)
            gradient = dmd_gradient(x.float(), x0_real.float(), x0_fake.float())
        return dmd_loss(x.float(), gradient)

    def _critic_loss(self, shape, cond, generator, shared) -> torch.Tensor:
        with torch.no_grad():
            x = self._rollout(shape, cond, generator, shared, grad=False)
        sigma = sample_dmd_sigmas(x.shape[0], self.ctx.config.dmd, shared).to(x.device)
        loss, _ = training_loss(
            self.critic_adapter, x, cond, sigma[:, None].expand(-1, x.shape[2]), generator=generator,
            weighting=self.ctx.config.objective.weighting, denoise=self.critic_prepared,
        )
        return loss

    def _update(self, loss: torch.Tensor, module, index: int) -> None:
        """Backward, clip at ``optim.grad_clip``, step ``module``'s optimizer and schedule, zero its grads.

        Under DeepSpeed each trained network is its own engine and steps itself (``engine.step``: averaged
        gradients, the engine's clipping, filled from ``optim.grad_clip`` by ``configure_deepspeed``, AdamW,
        zeroed grads); ``accelerator.backward`` would drive only the first engine prepared (the student).
        """
        acc, clip = self.ctx.accelerator, self.ctx.config.optim.grad_clip
        if self._deepspeed:
            module.backward(loss)
            module.step()
        else:
            acc.backward(loss)
            if clip:
                acc.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], clip)
        self.optimizers[index].step()
        self.schedulers[index].step()
        self.optimizers[index].zero_grad(set_to_none=True)

    def _null_cond(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The empty prompt's cond, batch-expanded (from the latent cache, or encoded once)."""
        if self._null is None:
            if self.ctx.null_cond is not None:
                self._null = dict(self.ctx.null_cond)
            else:
                self._null = self._encode_empty_prompt()
        device = self.ctx.accelerator.device
        batch = next(v for v in cond.values() if isinstance(v, torch.Tensor)).shape[0]
        return {k: (v.to(device).expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) else v)
                for k, v in self._null.items()}

    def _encode_empty_prompt(self) -> dict[str, Any]:
        adapter = self.ctx.adapter
        from . import build

        if not build.loaded_text_encoders(adapter):
            raise ValueError(
                "dmd.guidance_scale > 1 needs the empty prompt's cond: rebuild the latent cache with longgen "
                "precompute (it stores it) or set dmd.guidance_scale=1"
            )
        data = self.ctx.config.data
        cond = adapter.encode_prompt([""], do_classifier_free_guidance=False, num_frames=data.num_frames,
                                     height=data.height, width=data.width)[0]
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


register_method(DMDMethod.name, DMDMethod)
