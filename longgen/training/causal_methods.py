"""Causal training methods: a bidirectional DiT becomes a block-causal, few-step streaming student.

Both methods train under the block-causal attention the ``causal`` sampler streams through
(:func:`longgen.extend.causal.apply_block_causal`), set as for ``objective.method=dmd``: ``extension.method=
block-causal`` with ``extension.options`` (chunk_size, local_attn_size, sink_size, rope_positions, attention),
applied by the trainer through the extension registry before LoRA and Accelerate, so DDP / FSDP / DeepSpeed run
the masked model and ``final/longgen_extension.json`` records it (``causal`` holds causal_forcing's knobs only):

* ``causal_forcing``: the backbone's native denoising loss at per-frame noise levels, with the mask.
  ``causal.forcing=diffusion`` draws an independent level per chunk (Diffusion Forcing, Chen et al. 2024;
  CausVid's causal pre-training); ``teacher`` keeps the context chunks clean (at ``causal.context_noise``,
  the level of the sampler's cache pass) and noises one current chunk, uniformly chosen, whose loss is the
  step's loss (teacher forcing). Later chunks cannot influence it under the mask, so they are dropped.
* ``ode_regression``: CausVid's ODE initialisation (Yin et al. 2025, Sec. 4.2): the cache of
  :mod:`longgen.training.ode_pairs` holds teacher trajectories at the student's few-step levels; every
  chunk takes the state of a randomly chosen level, and the student's x0 prediction regresses onto the
  trajectory's clean end (plain MSE, as CausVid's ``ode_regression.py``).

The mask is what makes these causal, so it is tested in training (FastVideo's PR #1307 found its
diffusion-forcing fine-tune silently bidirectional): ``tests/training/test_causal_training.py``.
"""

from __future__ import annotations

import json
import os

import torch

from .methods import DenoisingMethod, MethodContext, register_method, step_generator
from .objectives import loss_weights, sample_training_sigmas

__all__ = [
    "CausalForcingMethod",
    "ODERegressionMethod",
    "check_chunk_divides",
    "masked_x0_loss",
    "teacher_forcing_sigmas",
    "training_mask",
]


def check_chunk_divides(adapter, config, chunk: int, num_latent_frames: int) -> None:
    """Refuse a chunk size that does not divide the clip's latent frames (the sampler would refuse the clip, and
    the last chunk would train shorter than the sampler runs it); the error names the clip lengths that fit."""
    if num_latent_frames % chunk and config.objective.method == "dmd" and config.dmd.rollout_latent_frames:
        raise ValueError(
            f"extension.options.chunk_size={chunk} does not divide the {num_latent_frames} latent frames of the "
            f"training rollout (dmd.rollout_latent_frames): use a chunk size or a rollout length that fit"
        )
    if num_latent_frames % chunk:
        lower, upper = num_latent_frames // chunk * chunk, (num_latent_frames // chunk + 1) * chunk
        options = [adapter.num_pixel_frames(n) for n in (lower, upper) if n >= chunk]
        raise ValueError(
            f"extension.options.chunk_size={chunk} does not divide the training clip's {num_latent_frames} latent "
            f"frames (data.num_frames={config.data.num_frames}): set data.num_frames to one of "
            f"{options} (latent frames {[n for n in (lower, upper) if n >= chunk]}) or an "
            f"extension.options.chunk_size that divides {num_latent_frames}"
        )


def training_mask(context: MethodContext, num_latent_frames: int):
    """The block-causal hooks the trainer applied through the extension registry (``extension.method=block-causal``,
    :func:`longgen.training.build.apply_extension`, before LoRA and Accelerate: DDP / FSDP / DeepSpeed run the
    masked model; ``final/longgen_extension.json`` records it): the :class:`~longgen.extend.causal.BlockCausalHandle`
    (``.config``, ``.cache``), after checking its chunk size divides the clip."""
    config = context.config
    handle = getattr(context.extension, "handle", None)  # the registry's ExtensionHandle
    mask = getattr(handle, "state", None)
    if config.extension.method != "block-causal" or getattr(mask, "cache", None) is None:
        raise ValueError(
            f"objective.method={config.objective.method} trains a causal streaming student: set "
            "extension.method=block-causal (extension.options.chunk_size, local_attn_size, sink_size shape its mask)"
        )
    check_chunk_divides(context.adapter, config, mask.config.chunk_size, num_latent_frames)
    return mask


def teacher_forcing_sigmas(
    batch_size: int, num_latent_frames: int, chunk_size: int, context_noise: float, level: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``[B, (chunk + 1) * chunk_size]`` flow sigmas: ``chunk`` clean context chunks at ``context_noise``, then
    the current chunk at ``level`` ``[B]`` (teacher forcing; the frames after it are dropped)."""
    if not 0 <= chunk < num_latent_frames // chunk_size:
        raise ValueError(f"chunk {chunk} is outside the clip's {num_latent_frames // chunk_size} chunks")
    context = level.new_full((batch_size, chunk * chunk_size), float(context_noise))
    return torch.cat([context, level[:, None].expand(batch_size, chunk_size)], dim=1)


def masked_x0_loss(
    adapter,
    latents: torch.Tensor,
    cond: dict,
    sigma: torch.Tensor,
    loss_frames: tuple[int, int],
    *,
    denoise,
    generator: torch.Generator,
    weighting: str = "native",
    min_sigma: float = 1e-3,
    max_sigma: float = 1.0 - 1e-4,
) -> torch.Tensor:
    """The native loss (the weights of :func:`longgen.training.objectives.training_loss`) on the latent frames
    ``[first, last) = loss_frames`` only. The other frames are noised at exactly their ``sigma`` (context at 0 is
    clean, as the sampler's cache pass runs it) and carry no loss; loss frames are clamped into
    ``[min_sigma, max_sigma]`` (the weights grow like 1 / sigma^2 near 0)."""
    first, last = loss_frames
    x0 = latents.float()
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x0.device)
    frames = torch.arange(sigma.shape[1], device=sigma.device)
    in_loss = (frames >= first) & (frames < last)
    sigma = torch.where(in_loss, sigma.clamp(min_sigma, max_sigma), sigma).to(x0.device)
    s5 = sigma[:, None, :, None, None]  # [B, 1, F, 1, 1]
    x0_pred = denoise((1.0 - s5) * x0 + s5 * noise, sigma, cond).float()
    x0_mse = (x0_pred - x0).pow(2).mean(dim=(1, 3, 4))[:, first:last]  # [B, F_loss]
    prediction = adapter.prediction if weighting == "native" else weighting
    weight = loss_weights(prediction, sigma[:, first:last], float(adapter.sigma_data)).float()
    return (weight * x0_mse).mean()


def _clip_latent_frames(context: MethodContext) -> int:
    data = context.config.data
    return context.adapter.latent_shape(data.num_frames, data.height, data.width)[2]


class CausalForcingMethod(DenoisingMethod):
    """Diffusion forcing / teacher forcing under block-causal attention (see the module docstring)."""

    name = "causal_forcing"

    def __init__(self, context: MethodContext):
        self.num_latent_frames = _clip_latent_frames(context)
        self.mask = training_mask(context, self.num_latent_frames)
        super().__init__(context)

    def loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        if self.ctx.config.causal.forcing == "diffusion":
            return super().loss(batch, micro_step)  # objective.mode levels per chunk; the mask does the rest
        return self.teacher_forcing_loss(batch, micro_step)

    def teacher_forcing_loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        """Clean context chunks, one noisy current chunk (uniform over the clip's chunks, one per micro-batch),
        the loss on it. Frames after it are dropped (invisible under the mask), except for image-conditioned
        models whose cond spans the clip: there they stay in as pure noise, outside the loss."""
        ctx, obj, causal = self.ctx, self.ctx.config.objective, self.ctx.config.causal
        generator = step_generator(ctx.config.train.seed, ctx.dp_rank, micro_step)
        latents, cond = self.encode(batch, generator)
        batch_size, chunk, num_frames = latents.shape[0], self.mask.config.chunk_size, latents.shape[2]
        current = int(torch.randint(num_frames // chunk, (1,), generator=generator))
        level = sample_training_sigmas(
            batch_size, 1, "clip", num_timesteps=obj.num_timesteps, shift=obj.shift, generator=generator,
            schedule=ctx.adapter.schedule,
        )[:, 0]
        sigma = teacher_forcing_sigmas(batch_size, num_frames, chunk, causal.context_noise, level, current)
        end = sigma.shape[1]
        if ctx.adapter.requires_image_condition:
            sigma = torch.cat([sigma, sigma.new_ones(batch_size, num_frames - end)], dim=1)
        else:
            latents = latents[:, :, :end]
        return masked_x0_loss(
            ctx.adapter, latents, cond, sigma.to(ctx.accelerator.device), (current * chunk, end),
            denoise=self.prepared, generator=generator, weighting=obj.weighting,
        )


register_method(CausalForcingMethod.name, CausalForcingMethod)


ODE_STATES_KEY = "ode_states"
"""Per-sample tensor of an ODE-pair cache: the kept trajectory states ``[K, C, f, h, w]``."""


def read_ode_index(cache_dir: str) -> dict:
    """The ``index.json`` of an ODE-pair cache, or a ValueError that says how to build one."""
    from ..data.cache import INDEX_NAME, cache_root

    path = os.path.join(cache_root(cache_dir), INDEX_NAME)
    with open(path) as fh:
        index = json.load(fh)
    if "ode" not in index or ODE_STATES_KEY not in index.get("sample_keys", []):
        raise ValueError(
            f"data.cache_dir={cache_dir} is a latent cache without ODE trajectories (longgen precompute's): "
            "build the ODE-pair cache with `longgen ode-pairs --config CONFIG` into another data.cache_dir"
        )
    return index


def check_ode_cache(index: dict, adapter, config) -> None:
    """The cache's teacher and the student must share the family and the latent shape of the clip."""
    data = config.data
    want = list(adapter.latent_shape(data.num_frames, data.height, data.width)[1:])
    teacher = index["ode"].get("teacher", "?")
    if index.get("family") != adapter.family or list(index.get("latent_shape", [])) != want:
        raise ValueError(
            f"the ODE-pair cache {data.cache_dir} was sampled from a {index.get('family')!r} teacher ({teacher}) "
            f"with latents {index.get('latent_shape')}, but the student is {adapter.family!r} with latents {want} "
            f"for data.num_frames={data.num_frames}, {data.height}x{data.width}: ODE regression needs a teacher of "
            "the student's family and latent space; set ode.teacher_path to such a model (null: the student "
            "itself) and rebuild the cache with `longgen ode-pairs --config CONFIG` into a new data.cache_dir"
        )


class ODERegressionMethod(DenoisingMethod):
    """CausVid's ODE initialisation: regress the causal student's x0 on the teacher's clean trajectory end."""

    name = "ode_regression"
    data_cache_command = "longgen ode-pairs --config CONFIG"
    """How the data this method reads is built (named in the error for a missing ``data.cache_dir``)."""

    def __init__(self, context: MethodContext):
        self.index = read_ode_index(context.config.data.cache_dir)
        check_ode_cache(self.index, context.adapter, context.config)
        self.level_sigmas = torch.tensor(self.index["ode"]["sigmas"], dtype=torch.float32)  # [K], descending
        self.num_latent_frames = _clip_latent_frames(context)
        self.mask = training_mask(context, self.num_latent_frames)
        super().__init__(context)

    def loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        ctx = self.ctx
        generator = step_generator(ctx.config.train.seed, ctx.dp_rank, micro_step)
        clean, cond = self.encode(batch, generator)  # the trajectory's end; cond with caption dropout
        states = batch[ODE_STATES_KEY].to(clean.device)  # [B, K, C, F, H, W]
        batch_size, num_levels, _, num_frames = states.shape[:4]
        chunk = self.mask.config.chunk_size
        picks = torch.randint(num_levels, (batch_size, num_frames // chunk), generator=generator)
        picks = picks.repeat_interleave(chunk, dim=1).to(clean.device)  # [B, F]: one level per chunk
        rows = torch.arange(batch_size, device=clean.device)[:, None]
        cols = torch.arange(num_frames, device=clean.device)[None, :]
        x = states[rows, picks, :, cols].permute(0, 2, 1, 3, 4)  # [B, F, C, H, W] -> [B, C, F, H, W]
        sigma = self.level_sigmas.to(clean.device)[picks]
        x0_pred = self.prepared(x.float(), sigma, cond).float()
        return (x0_pred - clean.float()).pow(2).mean()


register_method(ODERegressionMethod.name, ODERegressionMethod)
