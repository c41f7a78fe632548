"""Typed training configuration: YAML recipe + dotted overrides, validated before any model loads.

Follows torchtitan's ``Trainer.Config`` pattern: one dataclass per section whose ``__post_init__``
raises a :class:`ConfigError` naming the fix, and nanoGPT's habit of saving the resolved config with
every checkpoint.

Parsing, type conversion and merging are OmegaConf's structured configs (``OmegaConf.structured`` on
these dataclasses, ``OmegaConf.merge`` of the recipe, ``OmegaConf.update`` per override,
``OmegaConf.to_object`` to build the dataclasses and run their ``__post_init__`` checks). OmegaConf
is the project's choice over tyro because the recipes are YAML files first and command lines second:
OmegaConf merges YAML mappings and ``section.key=value`` overrides into one typed tree (it already
is the config layer of the Hydra / NeMo training stacks), checks ``Literal`` choices, ``Optional``
and container types, and rejects unknown keys in struct mode; tyro builds a CLI from the dataclasses
but has no YAML-recipe merge of its own. This module only turns OmegaConf's errors into messages that
name the key and the fix (the closest valid key for a typo).

>>> config = load_config("configs/tiny_synthetic.yaml", ["train.steps=4", "lora.rank=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..data.synthetic import CAPTION_STYLES, DEFAULT_COLORS, DEFAULT_NUM_OBJECTS, DEFAULT_SIZE_RANGE, PALETTE
from ..dtypes import DTYPE_NAMES
from .objectives import MODES as OBJECTIVE_MODES  # clip, diffusion_forcing, ar_diffusion
from .objectives import WEIGHTINGS as LOSS_WEIGHTINGS  # native, none, flow, eps, v, edm_v

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
DTYPES = DTYPE_NAMES
REPORT_TO = ("none", "tensorboard", "wandb")
LR_SCHEDULES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)

# Literal types of the choice keys (OmegaConf checks them; the tuples above stay the public lists).
DType = Literal[DTYPES]
MixedPrecision = Literal[MIXED_PRECISION]
ReportTo = Literal[REPORT_TO]
LRSchedule = Literal[LR_SCHEDULES]
ObjectiveMode = Literal[OBJECTIVE_MODES]
VideoBackend = Literal["auto", "torchcodec", "decord", "pyav"]  # longgen.io.VIDEO_BACKENDS
LossWeighting = Literal[LOSS_WEIGHTINGS]


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    _check(value in choices, f"{key} must be one of {list(choices)}, got {value!r}")


# --- sections ------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The model to post-tune: a local diffusers pipeline folder, or a tiny random model of a family."""

    path: str | None = None
    """Local diffusers pipeline folder (``model_index.json``); takes precedence over ``tiny``."""
    tiny: str | None = "wan"
    """Family of a tiny randomly initialised model (CPU tests, the tiny recipe); used when path is null."""
    tiny_seed: int = 0
    dtype: DType = "fp32"
    """Weights dtype of the loaded pipeline. LoRA keeps its own weights in fp32 on a bf16 base."""

    def __post_init__(self) -> None:
        _check(
            self.path is not None or self.tiny is not None,
            "set model.path (a local diffusers pipeline folder) or model.tiny (a family name such as wan)",
        )
        if self.path is None:
            from longgen.backbones import FAMILIES

            _choice("model.tiny", self.tiny, FAMILIES)
        _choice("model.dtype", self.dtype, DTYPES)


@dataclass
class SyntheticDataConfig:
    """The synthetic moving-shapes data set written when ``data.source`` is null."""

    num_videos: int = 8
    num_frames: int = 33
    height: int | None = None
    """Rendered frame size; null = data.height / data.width."""
    width: int | None = None
    fps: float = 16.0
    seed: int = 0
    size_range: list[float] = field(default_factory=lambda: list(DEFAULT_SIZE_RANGE))
    """Object radius (half side for squares) range as a fraction of the short side (``sample_world``)."""
    num_objects: list[int] = field(default_factory=lambda: list(DEFAULT_NUM_OBJECTS))
    """Inclusive range of objects per world (one colour each: at most the number of ``colors``)."""
    caption_style: str = "full"
    """Captions as a sentence (``full``), only the words that differ between worlds (``short``), or those plus where
    each object is and heads at the first frame (``position``)."""
    colors: list[str] = field(default_factory=lambda: list(DEFAULT_COLORS))
    """Palette colours the objects are drawn from (``sample_world``; distinct, at least num_objects' high)."""

    def __post_init__(self) -> None:
        _check(
            len(self.size_range) == 2 and 0.0 < self.size_range[0] <= self.size_range[1] < 0.5,
            f"data.synthetic.size_range is [low, high] with 0 < low <= high < 0.5 (fractions of the short side), "
            f"got {self.size_range}",
        )
        _check(
            len(self.num_objects) == 2 and 1 <= self.num_objects[0] <= self.num_objects[1] <= len(PALETTE),
            f"data.synthetic.num_objects is [low, high] with 1 <= low <= high <= {len(PALETTE)} (one colour each), "
            f"got {self.num_objects}",
        )
        _choice("data.synthetic.caption_style", self.caption_style, CAPTION_STYLES)
        _check(
            bool(self.colors) and len(set(self.colors)) == len(self.colors) and set(self.colors) <= set(PALETTE),
            f"data.synthetic.colors are distinct palette colours from {sorted(PALETTE)}, got {self.colors}",
        )
        _check(
            self.num_objects[1] <= len(self.colors),
            f"data.synthetic.num_objects allows {self.num_objects[1]} objects but data.synthetic.colors has only "
            f"{len(self.colors)} colours (one per object): add colours or lower num_objects",
        )
        _check(self.num_videos >= 1, f"data.synthetic.num_videos must be >= 1, got {self.num_videos}")
        _check(self.num_frames >= 1, f"data.synthetic.num_frames must be >= 1, got {self.num_frames}")
        _check(self.fps > 0, f"data.synthetic.fps must be positive, got {self.fps}")


@dataclass
class DataConfig:
    """Training clips: a folder of videos with ``.txt`` captions or a CSV/JSONL manifest."""

    source: str | None = None
    """Folder or manifest; null = the synthetic data set, generated into ``<output_dir>/synthetic_data``."""
    num_frames: int = 9
    """Pixel frames per training clip (e.g. 4k+1 for causal video VAEs)."""
    height: int = 32
    width: int = 32
    frame_stride: int = 1
    target_fps: float | None = None
    """Resample clips to this frame rate before striding (null: the file's own rate)."""
    random_start: bool = True
    cache_dir: str | None = None
    """Latent + text-embedding cache from ``longgen precompute``; used instead of decoding when it exists."""
    num_workers: int = 0
    shuffle: bool = True
    caption_dropout: float = 0.0
    """Probability of training a clip with the empty caption (enables classifier-free guidance)."""
    video_backend: VideoBackend = "auto"
    """Video reader: auto (torchcodec where it loads, else decord), torchcodec, decord or pyav."""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def __post_init__(self) -> None:
        _check(self.num_frames >= 1, f"data.num_frames must be >= 1, got {self.num_frames}")
        _check(
            self.height >= 8 and self.width >= 8,
            f"data.height/width must be >= 8, got {self.height}x{self.width}",
        )
        _check(self.frame_stride >= 1, f"data.frame_stride must be >= 1, got {self.frame_stride}")
        _check(
            self.target_fps is None or self.target_fps > 0,
            f"data.target_fps must be positive or null, got {self.target_fps}",
        )
        _check(
            self.target_fps is None or self.frame_stride == 1,
            f"set data.target_fps ({self.target_fps}) or data.frame_stride ({self.frame_stride}), not both: "
            "with a target fps the stride follows each video's own fps",
        )
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(
            0.0 <= self.caption_dropout < 1.0,
            f"data.caption_dropout is a probability in [0, 1), got {self.caption_dropout}",
        )
        span = (self.num_frames - 1) * self.frame_stride + 1
        _check(
            self.source is not None or self.synthetic.caption_style != "position" or self.synthetic.num_frames == span,
            f"data.synthetic.caption_style=position describes each video's first frame, so a training clip must be the "
            f"whole video: set data.synthetic.num_frames={span} (the clip's span), not {self.synthetic.num_frames}, or "
            "use caption_style full or short",
        )


@dataclass
class ObjectiveConfig:
    """The training method and its objective: by default the native loss at per-frame noise levels (``mode``)."""

    method: str = "denoising"
    """Training method (``longgen.training.methods`` registry); ``denoising`` is the native denoising loss."""
    mode: ObjectiveMode = "diffusion_forcing"
    causal_block_size: int = 1
    """Latent frames that share one noise level (diffusion forcing / AR-Diffusion in causal blocks)."""
    num_timesteps: int = 1000
    shift: float = 1.0
    """Flow shift applied to the sampled levels (SD3 / Wan shift; 1 = uniform)."""
    weighting: LossWeighting = "native"
    clip_share: float = 0.0
    """Per-frame modes: share of training clips drawn with one noise level for all their frames (as ``clip``),
    so the model also learns the equally-noisy clip that ``full`` / ``sliding`` / ``fifo`` sample from."""

    def __post_init__(self) -> None:
        from .methods import method_names

        _choice("objective.method", self.method, method_names())
        _choice("objective.mode", self.mode, OBJECTIVE_MODES)
        _check(
            self.causal_block_size >= 1,
            f"objective.causal_block_size must be >= 1, got {self.causal_block_size}",
        )
        _check(self.num_timesteps >= 1, f"objective.num_timesteps must be >= 1, got {self.num_timesteps}")
        _check(self.shift > 0, f"objective.shift must be positive, got {self.shift}")
        _choice("objective.weighting", self.weighting, LOSS_WEIGHTINGS)
        _check(0.0 <= self.clip_share <= 1.0, f"objective.clip_share is a probability in [0, 1], got {self.clip_share}")
        _check(
            self.clip_share == 0.0 or self.mode != "clip",
            "objective.clip_share mixes whole-clip levels into a per-frame mode; with objective.mode=clip every "
            "clip already has one level: drop clip_share or use mode=diffusion_forcing",
        )


@dataclass
class LoraConfig:
    """LoRA through PEFT (``model.add_adapter``); ``enabled: false`` is a full (or subset) fine-tune."""

    enabled: bool = True
    rank: int = 16
    alpha: float | None = None
    """LoRA scale numerator (scale = alpha / rank); null = rank (scale 1)."""
    dropout: float = 0.0
    target_modules: list[str] | None = None
    """Module name suffixes to adapt; null = the adapter's ``lora_target_modules``."""

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, f"lora.alpha must be positive or null, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(
            self.target_modules is None or len(self.target_modules) > 0,
            "lora.target_modules is empty: list module names, or null for the backbone's defaults",
        )


@dataclass
class OptimConfig:
    """AdamW with a diffusers LR schedule (``diffusers.optimization.get_scheduler``)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: LRSchedule = "constant_with_warmup"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    """Max global gradient norm; null or 0 disables clipping."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _check(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _choice("optim.schedule", self.schedule, LR_SCHEDULES)
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            self.grad_clip is None or self.grad_clip >= 0,
            f"optim.grad_clip must be >= 0 or null, got {self.grad_clip}",
        )


@dataclass
class TrainConfig:
    """Steps, batch, precision, checkpoints. One step is one optimizer update."""

    steps: int = 100
    batch_size: int = 1
    """Clips per process per micro-step; the global batch is batch_size x processes x grad_accumulation."""
    grad_accumulation: int = 1
    mixed_precision: MixedPrecision = "auto"
    """auto (bf16 on a GPU, fp32 on CPU) | no | fp16 | bf16."""
    gradient_checkpointing: bool = False
    ulysses_degree: int = 1
    """Context parallel: processes that split one clip's tokens (Ulysses all-to-all attention, diffusers'
    ``ContextParallelConfig``); needs a backbone with a ``_cp_plan`` (Wan, LTX). Data parallel over the rest."""
    ring_degree: int = 1
    """Context parallel ring attention: processes that pass K/V blocks around a ring (diffusers' ring with a GPU
    kernel that returns the LSE, e.g. flash; longgen's own ``longgen.parallel.ring_attention`` with the native
    backend, CPU included). Ring and Ulysses together need the GPU kernel. The product
    ``ulysses_degree x ring_degree`` must divide the clip's tokens (latent frames x token rows x columns)."""
    seed: int = 0
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end, so a finished run can be extended)."""
    keep_last: int = 2
    """Complete checkpoints to keep (0: all)."""
    output_dir: str = "outputs/tiny_synthetic"
    resume: str | None = None
    """null | latest (newest complete checkpoint in output_dir; fresh start when none) | a checkpoint dir."""
    stop_after_steps: int | None = None
    """End this run after N more steps with a checkpoint (time-sliced jobs); the schedule still spans steps."""
    trainable_patterns: list[str] = field(default_factory=list)
    """Full fine-tune only: regexes (``re.search``) over parameter names to train; empty = all."""
    log_every: int = 1
    log_data_paths: bool = False
    """Write the clip paths each process trains on to ``<output_dir>/data_paths/rank<i>.txt``."""
    save_final: bool = True
    """Export the trained weights (diffusers LoRA safetensors or a diffusers model folder) at the end."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(
            self.grad_accumulation >= 1, f"train.grad_accumulation must be >= 1, got {self.grad_accumulation}"
        )
        _choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check(
            self.ulysses_degree >= 1 and self.ring_degree >= 1,
            f"train.ulysses_degree and train.ring_degree must be >= 1 (1 = off), got {self.ulysses_degree}, "
            f"{self.ring_degree}",
        )
        _check(
            self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}"
        )
        _check(self.keep_last >= 0, f"train.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        _check(bool(self.output_dir), "train.output_dir must be set")
        _check(
            self.stop_after_steps is None or self.stop_after_steps >= 1,
            f"train.stop_after_steps must be >= 1 or null, got {self.stop_after_steps}",
        )
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        import re

        for pattern in self.trainable_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(
                    f"train.trainable_patterns entry {pattern!r} is not a valid regex: {err}"
                ) from err


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (``diffusers.training_utils.EMAModel``)."""

    enabled: bool = False
    decay: float = 0.999
    update_after_step: int = 0
    warmup: bool = False
    """EMAModel's ``use_ema_warmup`` (decay ramps as 1 - (1 + step / inv_gamma) ** -power)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.decay < 1.0, f"ema.decay must be in (0, 1), got {self.decay}")
        _check(
            self.update_after_step >= 0, f"ema.update_after_step must be >= 0, got {self.update_after_step}"
        )


@dataclass
class ValidationConfig:
    """A long validation clip every N steps, written to mp4 and logged to the configured tracker."""

    every: int = 0
    """Generate every N steps (0: never during training)."""
    at_end: bool = False
    prompt: str = (
        "2 shapes on a dark grey background: a large red circle moving slowly and a small blue square"
    )
    negative_prompt: str = ""
    num_frames: int | None = None
    """Pixel frames of the validation clip (null: twice the model's native clip)."""
    height: int | None = None
    width: int | None = None
    sampler: str = "sliding"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    fps: float = 16.0
    use_ema: bool = True
    """Validate with the EMA weights when EMA is on."""
    drift_metrics: bool = False
    """Score every validation clip for drift (``longgen.training.drift``: pixel drift metrics, and the synthetic
    scorer when the prompt is a synthetic caption) and log the scalars."""
    report_to: ReportTo = "none"
    """Tracker for scalars and validation clips: none | tensorboard | wandb (WANDB_MODE=offline works)."""
    project: str = "longgen"

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"validation.every must be >= 0 (0 disables), got {self.every}")
        _check(
            self.num_frames is None or self.num_frames >= 1,
            f"validation.num_frames must be >= 1, got {self.num_frames}",
        )
        _check(self.steps is None or self.steps >= 1, f"validation.steps must be >= 1, got {self.steps}")
        _check(self.fps > 0, f"validation.fps must be positive, got {self.fps}")
        _choice("validation.report_to", self.report_to, REPORT_TO)
        from longgen.pipeline import sampler_registry

        _choice("validation.sampler", self.sampler, tuple(sampler_registry()))


def training_extensions() -> list[str]:
    """Registered extensions post-tuning can train with: those that extend positions to a target length, and
    ``block-causal`` (the mask of the causal students, :data:`CAUSAL_METHODS`)."""
    from ..extend.registry import extension_names, get_extension

    return [n for n in extension_names() if get_extension(n).needs_target_frames or n == "block-causal"]


def _selects_parameters(method: str) -> bool:
    from ..extend.registry import get_extension

    return get_extension(method).trainable_parameters is not None


@dataclass
class ExtensionConfig:
    """Extension-aware post-tuning: a RoPE extension (train on longer clips) or ExVideo's trainable subset."""

    method: str | None = None
    """null, or a registered extension that post-tuning trains with (``longgen.extend.registry``: those that
    extend positions to a target length: pi, ntk, yarn, riflex, exvideo; and ``block-causal``, the mask every
    causal method trains under: causal_forcing, ode_regression, dmd)."""
    train_latent_frames: int | None = None
    """The model's native length in latent frames (null: from the adapter's native clip)."""
    target_latent_frames: int | None = None
    """Length the RoPE is extended to (null: the training clip's latent frames)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the extension (e.g. ExVideo's ``max_num_frames``; block-causal's
    ``chunk_size``, ``local_attn_size``, ``sink_size``, ``rope_positions``, ``attention``)."""

    def __post_init__(self) -> None:
        if self.method is not None:
            _choice("extension.method", self.method, training_extensions())
        for key in ("train_latent_frames", "target_latent_frames"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"extension.{key} must be >= 1 or null, got {value}")


@dataclass
class ConditioningConfig:
    """Given frames per training clip (continuation, bridges, backward prediction; ``objective.method=denoising``).

    Each clip draws a task (``longgen.training.objectives.CONDITIONING_TASKS``): its given latent frames are
    fed clean (noise level 0 in the per-frame contract, or ``context_sigma``) and left out of the loss, so a
    LoRA learns to continue or bridge the user's clips. MCVD (Voleti et al. 2022) masks past and future
    frames at random; SEINE (Chen et al. 2023) gives the first and/or last frame.
    """

    tasks: dict[str, float] = field(default_factory=dict)
    """Task name -> probability, summing to 1 (empty: off). Names: none, past, future, past_future, first,
    first_last; e.g. ``{none: 0.1, past: 0.5, future: 0.1, past_future: 0.3}``."""
    min_context_latent_frames: int = 1
    """Fewest given latent frames per side for past / future / past_future."""
    max_context_latent_frames: int | None = None
    """Most given latent frames per side (null: all but one frame to generate)."""
    context_sigma: float = 0.0
    """Noise level the given frames are fed at (0: clean, as samplers feed given frames; a small level such as
    0.02 trains with noised history, like the df sampler's addnoise_condition=20)."""

    def __post_init__(self) -> None:
        from .objectives import check_conditioning_tasks

        _check(
            self.min_context_latent_frames >= 1,
            f"conditioning.min_context_latent_frames must be >= 1, got {self.min_context_latent_frames}",
        )
        if self.tasks:
            try:
                check_conditioning_tasks(dict(self.tasks), min_context=self.min_context_latent_frames)
            except ValueError as err:
                raise ConfigError(f"conditioning.tasks: {err}") from None
        _check(
            self.max_context_latent_frames is None or self.max_context_latent_frames >= self.min_context_latent_frames,
            f"conditioning.max_context_latent_frames ({self.max_context_latent_frames}) must be >= "
            f"min_context_latent_frames ({self.min_context_latent_frames}) or null",
        )
        _check(
            0.0 <= self.context_sigma < 1.0,
            f"conditioning.context_sigma must be in [0, 1) (0 = clean given frames), got {self.context_sigma}",
        )


@dataclass
class Config:
    """A whole training run. The defaults are the embedded tiny recipe (``configs/tiny_synthetic.yaml``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    extension: ExtensionConfig = field(default_factory=ExtensionConfig)
    causal: CausalConfig = field(default_factory=lambda: CausalConfig())
    ode: ODEConfig = field(default_factory=lambda: ODEConfig())
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    dmd: DMDConfig = field(default_factory=lambda: DMDConfig())

    def __post_init__(self) -> None:
        check_causal_config(self)
        if not self.lora.enabled:
            _check(
                self.model.dtype == "fp32",
                f"a full fine-tune keeps its master weights in fp32; set model.dtype=fp32 (got {self.model.dtype}) "
                "and use train.mixed_precision=bf16 for speed, or enable LoRA (lora.enabled=true)",
            )
        elif self.train.trainable_patterns:
            raise ConfigError(
                "train.trainable_patterns selects parameters for a full fine-tune; with LoRA the targets are "
                "lora.target_modules. Set lora.enabled=false or drop train.trainable_patterns."
            )
        if self.extension.method is not None and self.lora.enabled and _selects_parameters(self.extension.method):
            raise ConfigError(
                f"extension {self.extension.method} trains its own parameters (ExVideo: new position tables, "
                "convolutions and the temporal blocks) directly; set lora.enabled=false"
            )
        if self.ema.enabled and self.ema.update_after_step >= self.train.steps:
            raise ConfigError(
                f"ema.update_after_step={self.ema.update_after_step} is not below train.steps={self.train.steps}: "
                "the EMA would never update; lower it or disable ema"
            )
        if self.conditioning.tasks and self.objective.method != "denoising":
            raise ConfigError(
                f"conditioning.tasks trains given frames with objective.method=denoising; "
                f"{self.objective.method!r} does not use them: set conditioning.tasks={{}} or method denoising"
            )
        if self.objective.mode == "clip" and self.objective.causal_block_size != 1:
            raise ConfigError(
                "objective.causal_block_size only applies to per-frame modes (diffusion_forcing, ar_diffusion); "
                "set objective.causal_block_size=1 for mode clip"
            )

    # --- I/O -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as fh:
            fh.write(self.to_yaml())
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Config:
        return _build_config(_merged(dict(data or {})))


# --- OmegaConf: merge, convert, check ------------------------------------------------------------
def _field_type(cls: type, path: list[str]) -> Any:
    """The annotation of the dotted key ``path`` under dataclass ``cls`` (None when unknown)."""
    tp: Any = cls
    for part in path:
        tp = _unwrap_optional(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _expected(tp: Any, key: str, value: Any) -> str:
    """``<key> must be ...`` for a value OmegaConf could not convert to annotation ``tp``."""
    optional = type(None) in typing.get_args(tp)
    tp = _unwrap_optional(tp)
    null = " or null" if optional else ""
    if typing.get_origin(tp) is Literal:
        return f"{key} must be one of {list(typing.get_args(tp))}{null}, got {value!r}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return f"{key} must be {names[tp]}{null}, got {value!r}"
    if typing.get_origin(tp) is list:
        return f"{key} must be a list{null}, got {value!r}"
    if typing.get_origin(tp) is dict:
        return f"{key} must be a mapping{null}, got {value!r}"
    if dataclasses.is_dataclass(tp):
        return f"{key} is a section: give a mapping of its keys, got {value!r}"
    return f"{key}: bad value {value!r} (expected {tp})"


def _unknown_key(full_key: str) -> ConfigError:
    """An unknown key, by name, with the closest valid key and the keys its section takes (or where a key of
    earlier recipes moved: :data:`MOVED_KEYS`)."""
    if full_key in MOVED_KEYS:
        return ConfigError(
            f"unknown config key '{full_key}': it moved to '{MOVED_KEYS[full_key]}' (with extension.method="
            "block-causal, the one place for the block-causal mask of every causal method)"
        )
    parts = full_key.split(".")
    section = _field_type(Config, parts[:-1]) if len(parts) > 1 else Config
    section = _unwrap_optional(section)
    valid = [f.name for f in dataclasses.fields(section)] if dataclasses.is_dataclass(section) else []
    close = difflib.get_close_matches(parts[-1], valid, n=1)
    hint = f"; did you mean '{'.'.join([*parts[:-1], close[0]])}'?" if close else ";"
    where = f"section '{'.'.join(parts[:-1])}'" if len(parts) > 1 else "the top level"
    return ConfigError(f"unknown config key '{full_key}'{hint} valid keys in {where}: {', '.join(valid)}")


def _translate(err: Exception, value: Any = None) -> ConfigError:
    """OmegaConf's error -> a :class:`ConfigError` that names the key and what it takes."""
    from omegaconf.errors import ConfigKeyError

    full_key = str(getattr(err, "full_key", "") or "")
    if isinstance(err, ConfigKeyError) or "not in" in str(err).split("\n", 1)[0]:
        return _unknown_key(full_key)
    tp = _field_type(Config, full_key.split(".")) if full_key else None
    if tp is None:
        return ConfigError(f"{full_key or 'config'}: {str(err).splitlines()[0]}")
    shown = value if value is not None else _value_in_message(err)
    return ConfigError(_expected(tp, full_key, shown))


def _value_in_message(err: Exception) -> Any:
    """The offending value as OmegaConf quotes it (``Value 'two' of type ...``)."""
    import re

    match = re.search(r"(?:Value|value) '([^']*)'", str(err))
    return match.group(1) if match else "?"


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float of the built config is finite (OmegaConf accepts ``inf`` and ``nan``)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, float):
            _check(math.isfinite(value), f"{key} must be finite, got {value}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                _check(not isinstance(item, float) or math.isfinite(item), f"{key}[{i}] must be finite")


def _merged(data: Mapping[str, Any]):
    """The recipe merged into the structured schema of :class:`Config` (an OmegaConf DictConfig)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Config)
    try:
        return OmegaConf.merge(schema, dict(data))
    except OmegaConfBaseException as err:
        raise _translate(err) from None


def _build_config(tree) -> Config:
    """``OmegaConf.to_object``: builds the dataclasses and runs every ``__post_init__`` check."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = OmegaConf.to_object(tree)
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise _translate(err) from None
    _check_finite(config)
    return config


# --- YAML + dotted overrides ----------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=4"`` -> (["train", "steps"], 4); values are parsed as YAML 1.2 (``null``, lists, ...;
    ``no`` is the string, as in ``train.mixed_precision=no``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.steps=4)")
    key, raw = text.split("=", 1)
    key = key.strip().removeprefix("--")
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r} has an empty key part; write section.key=value")
    from ..configfile import yaml_load

    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_override(tree, text: str) -> None:
    """Apply one ``section.key=value`` to an OmegaConf tree (typed, unknown keys rejected by name)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parts, value = parse_override(text)
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, DictConfig) and part in node else None
        if child is not None and not isinstance(child, DictConfig):
            raise ConfigError(f"override {text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        if child is None:
            break
        node = child
    try:
        OmegaConf.update(tree, ".".join(parts), value, merge=True)
    except OmegaConfBaseException as err:
        raise _translate(err, value) from None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); sections are created as needed, keys checked later."""
    from omegaconf import OmegaConf

    tree = OmegaConf.create(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                node[part] = {}
                child = node[part]
            if not OmegaConf.is_dict(child):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return OmegaConf.to_container(tree)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file as a mapping; a YAML syntax error is a :class:`ConfigError` with file and line."""
    from ..configfile import read_yaml as read_mapping

    try:
        return read_mapping(path, what="training recipe", error=ConfigError)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {os.fspath(path)!r} does not exist (see configs/ for recipes)") from None


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from a YAML file (or the defaults) and dotted overrides."""
    tree = _merged(read_yaml(path) if path is not None else {})
    for text in overrides:
        _set_override(tree, text)
    return _build_config(tree)


# --- causal training (block-causal student) and the ODE-pair cache ----------------------------------
CAUSAL_METHODS = ("causal_forcing", "ode_regression", "dmd")
"""Training methods that train a block-causal student: each needs ``extension.method=block-causal``, whose
``extension.options`` (:class:`~longgen.extend.configs.BlockCausalConfig`: chunk_size, local_attn_size,
sink_size, rope_positions, attention) set the mask, the same fields as the causal sampler's flags."""
CausalForcing = Literal["diffusion", "teacher"]

MOVED_KEYS = {
    f"causal.{name}": f"extension.options.{name}"
    for name in ("chunk_size", "local_attn_size", "sink_size", "rope_positions", "attention")
}
"""Keys of earlier recipes -> where they live now (the block-causal mask is ``extension.method=block-causal``)."""

_CAUSAL_FLAG_KEYS = {
    "--local-attn-size": "extension.options.local_attn_size",
    "--sink-size": "extension.options.sink_size",
    "--chunk-size": "extension.options.chunk_size",
    "--causal-rope": "extension.options.rope_positions",
    "--causal-attention": "extension.options.attention",
}


@dataclass
class CausalConfig:
    """What ``objective.method=causal_forcing`` trains the chunks at. The block-causal mask itself (chunk size,
    window, sink) is ``extension.method=block-causal`` with its ``extension.options``, for every causal method."""

    forcing: CausalForcing = "diffusion"
    """causal_forcing only: ``diffusion`` (independent noise level per chunk, the objective.mode levels) or
    ``teacher`` (clean context chunks, one noisy current chunk, the loss on it)."""
    context_noise: float = 0.0
    """Teacher forcing: flow sigma of the context chunks (the causal sampler's --context-noise; 0 = clean)."""

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.context_noise < 1.0, f"causal.context_noise is a flow sigma in [0, 1), got {self.context_noise}"
        )


def block_causal_config(config: Config):
    """The :class:`~longgen.extend.configs.BlockCausalConfig` of ``extension.options`` (``extension.method`` must
    be ``block-causal``); bad or unknown options are a :class:`ConfigError` naming the ``extension.options`` key."""
    from ..extend.configs import BlockCausalConfig

    options = dict(config.extension.options)
    valid = [f.name for f in dataclasses.fields(BlockCausalConfig)]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean 'extension.options.{close[0]}'?" if close else ";"
            raise ConfigError(
                f"unknown block-causal option 'extension.options.{key}'{hint} valid options: {', '.join(valid)}"
            )
    try:
        return BlockCausalConfig(**options)
    except (TypeError, ValueError) as err:  # BlockCausalConfig names the sampler's flags; here they are options
        text = str(err)
        for flag, key in _CAUSAL_FLAG_KEYS.items():
            text = text.replace(flag, key)
        raise ConfigError(text) from None


@dataclass
class ODEConfig:
    """ODE pairs from a bidirectional teacher (CausVid's ODE initialisation; ``longgen ode-pairs --config``).

    ``longgen ode-pairs`` writes them into ``data.cache_dir`` (a latent cache whose samples also hold the kept
    trajectory states); ``objective.method=ode_regression`` then trains the causal student on that cache.
    """

    teacher_path: str | None = None
    """Local diffusers pipeline folder of the teacher (null: the student's model.path / model.tiny)."""
    prompts_file: str | None = None
    """Text file, one prompt per line (null: the captions of data.source)."""
    num_samples: int | None = None
    """Trajectories to sample (null: one per prompt); prompts are cycled."""
    num_steps: int = 50
    """Teacher Euler steps (CausVid: 50)."""
    shift: float = 8.0
    """Flow shift of the teacher's schedule (CausVid: 8)."""
    keep_steps: list[int] = field(default_factory=lambda: [0, 36, 44])
    """Indices into the teacher's schedule whose states are kept (the student's few-step levels; the clean
    end is always kept). CausVid keeps 0/36/44/50 of 50 steps at shift 8: t = 1000/757/522/0."""
    guidance_scale: float | None = 6.0
    """Teacher classifier-free guidance (CausVid: 6; null: the model's default)."""
    negative_prompt: str = ""
    seed: int = 0
    """Sample i's noise is drawn from (seed, i): a resumed build continues with the same trajectories."""
    batch_size: int = 1
    """Trajectories per teacher call."""
    shard_size: int = 16
    """Samples per safetensors shard (the unit of resume)."""
    device: str | None = None
    """Device of the teacher (null: cuda when available, else cpu)."""

    def __post_init__(self) -> None:
        _check(self.num_steps >= 1, f"ode.num_steps must be >= 1, got {self.num_steps}")
        _check(self.shift > 0, f"ode.shift must be positive, got {self.shift}")
        _check(len(self.keep_steps) >= 1, "ode.keep_steps is empty: list teacher step indices, e.g. [0, 36, 44]")
        _check(
            list(self.keep_steps) == sorted(set(self.keep_steps)) and 0 <= self.keep_steps[0]
            and self.keep_steps[-1] < self.num_steps,
            f"ode.keep_steps must be ascending distinct step indices in [0, ode.num_steps={self.num_steps}), "
            f"got {list(self.keep_steps)}",
        )
        _check(
            self.num_samples is None or self.num_samples >= 1, f"ode.num_samples must be >= 1, got {self.num_samples}"
        )
        _check(self.batch_size >= 1, f"ode.batch_size must be >= 1, got {self.batch_size}")
        _check(self.shard_size >= 1, f"ode.shard_size must be >= 1, got {self.shard_size}")


def _unet_family(config: Config) -> str | None:
    """The family of a UNet model (no block-causal attention), else None (read from the folder, no weights)."""
    if config.model.path is None:
        family = config.model.tiny
    else:
        index = os.path.join(config.model.path, "model_index.json")
        if not os.path.isfile(index):
            return None
        import json

        with open(index) as fh:
            names = json.dumps(json.load(fh))
        family = "animatediff" if "AnimateDiff" in names else "svd" if "StableVideoDiffusion" in names else None
    return family if family in ("animatediff", "svd") else None


def check_causal_config(config: Config) -> None:
    """Cross-section checks of causal training (called by :class:`Config`): every method of
    :data:`CAUSAL_METHODS` trains under ``extension.method=block-causal`` on a DiT; causal diffusion forcing draws
    one ``objective.mode`` level per chunk."""
    obj = config.objective
    if obj.method not in CAUSAL_METHODS:
        return
    unet = _unet_family(config)
    if unet is not None:
        raise ConfigError(
            f"objective.method={obj.method} trains with block-causal attention, which UNet motion-module models "
            f"({unet}) do not have: use a DiT backbone (Wan, SkyReels-V2, LTX-Video, CogVideoX, HunyuanVideo), or "
            "objective.method=denoising"
        )
    _check(
        config.extension.method == "block-causal",
        f"objective.method={obj.method} trains a causal streaming student: set extension.method=block-causal "
        f"(got {config.extension.method}); extension.options.chunk_size, local_attn_size, sink_size, "
        "rope_positions, attention shape its mask and KV cache (the causal sampler's --chunk-size, "
        "--local-attn-size, --sink-size, --causal-rope, --causal-attention)",
    )
    chunk = block_causal_config(config).chunk_size
    if obj.method == "causal_forcing" and config.causal.forcing == "diffusion":
        _check(
            obj.mode != "clip",
            "causal diffusion forcing draws a noise level per chunk: set objective.mode=diffusion_forcing (or "
            "ar_diffusion), or causal.forcing=teacher",
        )
        _check(
            obj.causal_block_size == chunk,
            f"objective.causal_block_size={obj.causal_block_size} differs from extension.options.chunk_size={chunk}: "
            f"the causal sampler runs one noise level per chunk, so set objective.causal_block_size={chunk}",
        )  # ode_regression and dmd draw their own levels per chunk (objective.mode is not theirs)
    if obj.method == "ode_regression":
        _check(
            config.data.cache_dir is not None,
            "objective.method=ode_regression trains on the ODE-pair cache: set data.cache_dir to the folder "
            "`longgen ode-pairs --config CONFIG` writes (the same key: it builds into data.cache_dir)",
        )


# --- Self-Forcing DMD distillation (objective.method=dmd; longgen.training.self_forcing) -------------
@dataclass
class DMDConfig:
    """Self-Forcing DMD (Huang et al. 2025) and streaming long tuning (LongLive, Self-Forcing++): a causal
    few-step student rolls out chunk by chunk against its KV cache; a frozen real score (the teacher, with CFG)
    and a trained fake score (the critic) give the distribution-matching gradient. The student is ``model``
    with ``extension.method=block-causal`` (its chunk size, window and sink); ``optim`` is the student's."""

    teacher: str | None = None
    """Pipeline folder of the real-score model; None = the model the student is built from (``model``)."""
    critic: str | None = None
    """Pipeline folder the fake score starts from; None = the teacher's."""
    teacher_dtype: DType | None = None
    """Weights dtype of the frozen teacher (bf16 halves a 14B real score); None = ``model.dtype``. The critic
    keeps fp32 master weights (it trains all of them)."""
    guidance_scale: float = 3.0
    """CFG scale of the real score (Self-Forcing 3.0; 1 = no guidance); the fake score runs without."""
    denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    """The student's per-chunk timesteps (before warping)."""
    warp_denoising_step: bool = True
    """Warp the timesteps through the shifted table (Self-Forcing ``warp_denoising_step``)."""
    timestep_shift: float = 5.0
    """Shift of the warped student steps and of the DMD / critic noise levels."""
    min_timestep: float = 0.02
    max_timestep: float = 0.98
    """DMD / critic noise levels are clamped into [min, max] (Self-Forcing 20 / 980 of 1000)."""
    context_noise: float = 0.0
    """Flow sigma of the clean context pass that fills the KV cache after a chunk."""
    same_exit_step: bool = False
    """True: one random exit step for every chunk of a rollout; False: one per chunk."""
    generator_every: int = 5
    """Update the student every N steps (the critic every step; Self-Forcing 5)."""
    critic_lr: float = 4e-7
    """AdamW learning rate of the critic (betas, eps, weight decay, schedule from ``optim``)."""
    rollout_latent_frames: int | None = None
    """Latent frames of each rollout; None = the training clip. Longer = streaming long tuning."""
    window_latent_frames: int | None = None
    """Latent frames of the rollout's end window that DMD scores (the teacher's length); None = all."""
    grad_latent_frames: int | None = None
    """Newest latent frames that receive gradient; None = the whole DMD window."""

    def __post_init__(self) -> None:
        _check(self.guidance_scale >= 1.0, f"dmd.guidance_scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        _check(self.generator_every >= 1, f"dmd.generator_every must be >= 1, got {self.generator_every}")
        _check(self.critic_lr > 0, f"dmd.critic_lr must be > 0, got {self.critic_lr}")
        _check(self.timestep_shift > 0, f"dmd.timestep_shift must be > 0, got {self.timestep_shift}")
        _check(
            0.0 <= self.min_timestep < self.max_timestep <= 1.0,
            f"need 0 <= dmd.min_timestep < dmd.max_timestep <= 1, got {self.min_timestep}, {self.max_timestep}",
        )
        _check(0.0 <= self.context_noise < 1.0, f"dmd.context_noise must be in [0, 1), got {self.context_noise}")
        steps = list(self.denoising_steps)
        _check(
            len(steps) >= 1 and all(0 < t <= 1000 for t in steps) and all(a > b for a, b in zip(steps, steps[1:])),
            f"dmd.denoising_steps must be strictly descending timesteps in (0, 1000], got {steps}",
        )
        for key in ("rollout_latent_frames", "window_latent_frames", "grad_latent_frames"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"dmd.{key} must be >= 1 latent frame or null, got {value}")
        if self.window_latent_frames is not None and self.rollout_latent_frames is not None:
            _check(
                self.window_latent_frames <= self.rollout_latent_frames,
                f"dmd.window_latent_frames {self.window_latent_frames} exceeds dmd.rollout_latent_frames "
                f"{self.rollout_latent_frames}",
            )


__all__ = [
    "CAUSAL_METHODS",
    "MOVED_KEYS",
    "CausalConfig",
    "block_causal_config",
    "ConditioningConfig",
    "Config",
    "ConfigError",
    "DMDConfig",
    "DataConfig",
    "EMAConfig",
    "ExtensionConfig",
    "LoraConfig",
    "ModelConfig",
    "ODEConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_config",
    "parse_override",
]
