"""The built-in samplers' knobs and registrations (torch-free: the functions are imported on first use).

Each knob dataclass is the one place a knob's name, default, help text and validation live; ``None``
defaults are derived from the model by the spec's ``resolve`` hook (windows default to the native
length, or an extension's target).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .registry import SamplerContext, SamplerSpec, register_sampler

_ETA_HELP = (
    "DDIM stochasticity (Song et al. 2021): 0 = deterministic DDIM, 1 = DDPM-like ancestral noise, drawn "
    "from the seeded generator; the official FIFO-Diffusion code uses 1"
)


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{flag} must be >= 1, got {value}")


# The help text lives with the batching helper (torch-free copy here: the CLI parser imports no torch).
_WINDOW_BATCH_HELP = (
    "windows of one step denoised in one batched model call (they are independent within a step); default: "
    "from free GPU memory on CUDA, 1 (sequential) on CPU; a batch too large for memory is halved with a warning"
)


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1] (0 = deterministic DDIM), got {eta}")


@dataclass(frozen=True)
class FullKnobs:
    """Knobs of :func:`~longgen.samplers.full.sample_full`."""

    eta: float = field(default=0.0, metadata={"help": _ETA_HELP})

    def __post_init__(self) -> None:
        _check_eta(self.eta)


@dataclass(frozen=True)
class SlidingKnobs:
    """Knobs of :func:`~longgen.samplers.sliding.sample_sliding`."""

    window: int | None = field(
        default=None, metadata={"help": "window in latent frames (default: native length, or the extension's target)"}
    )
    stride: int | None = field(
        default=None, metadata={"help": "sliding window stride in latent frames (default: window/2)"}
    )
    weighting: Literal["pyramid", "uniform"] = field(
        default="pyramid", metadata={"help": "how overlapping windows are blended (FreeNoise pyramid or uniform)"}
    )
    eta: float = field(default=0.0, metadata={"help": _ETA_HELP})
    window_batch: int | None = field(default=None, metadata={"help": _WINDOW_BATCH_HELP})

    def __post_init__(self) -> None:
        _positive("window", self.window)
        _positive("stride", self.stride)
        _positive("window-batch", self.window_batch)
        if self.weighting not in ("pyramid", "uniform"):
            raise ValueError(f"--weighting must be 'pyramid' or 'uniform', got {self.weighting!r}")
        _check_eta(self.eta)


def _resolve_sliding(knobs: SlidingKnobs, ctx: SamplerContext) -> SlidingKnobs:
    window = knobs.window or ctx.default_window
    return dataclasses.replace(knobs, window=window, stride=knobs.stride or max(1, window // 2))


@dataclass(frozen=True)
class FifoKnobs:
    """Knobs of :func:`~longgen.samplers.fifo.sample_fifo`."""

    window: int | None = field(default=None, metadata={"help": "window in latent frames (default: native length)"})
    num_partitions: int = field(
        default=4,
        metadata={"help": "fifo: latent partitions n; the queue holds n*window frames and sampling takes "
                  "n*window steps"},
    )
    lookahead: bool = field(
        default=True,
        metadata={"help": "fifo: lookahead denoising (windows at half stride, only the noisier half written "
                  "back; twice the model calls; needs an even window)"},
    )
    eta: float = field(default=0.0, metadata={"help": _ETA_HELP})
    window_batch: int | None = field(default=None, metadata={"help": _WINDOW_BATCH_HELP})

    def __post_init__(self) -> None:
        _positive("window", self.window)
        _positive("num-partitions", self.num_partitions)
        _positive("window-batch", self.window_batch)
        _check_eta(self.eta)


def _resolve_fifo(knobs: FifoKnobs, ctx: SamplerContext) -> FifoKnobs:
    if knobs.window is not None:
        return knobs
    window = ctx.default_window
    if knobs.lookahead:  # lookahead needs an even window: round the default down
        window = max(2, window - window % 2)
    return dataclasses.replace(knobs, window=window)


def _fifo_steps(knobs: FifoKnobs, ctx: SamplerContext) -> int:
    # FIFO-Diffusion has one denoising step per queue slot: S = num_partitions * window.
    needed = knobs.num_partitions * knobs.window
    if ctx.requested_steps is not None and ctx.requested_steps != needed:
        raise ValueError(
            f"the fifo sampler takes num_partitions * window = {needed} steps (one per queue slot); got "
            f"--steps {ctx.requested_steps}. Omit --steps, or change --num-partitions / --window."
        )
    return needed


def _fifo_fit_steps(num_steps: int, ctx: SamplerContext) -> dict:
    window = _resolve_fifo(FifoKnobs(), ctx).window
    return {"num_partitions": max(1, round(num_steps / window))}


@dataclass(frozen=True)
class DiffusionForcingKnobs:
    """Knobs of :func:`~longgen.samplers.diffusion_forcing.sample_diffusion_forcing`."""

    base_num_latent_frames: int | None = field(
        default=None, metadata={"help": "df: latent frames per chunk (default: native length)"}
    )
    ar_step: int | None = field(
        default=None,
        metadata={"help": "df: steps block i+1 lags block i (default 0 = synchronous; SkyReels-V2 asynchronous "
                  "uses 5)"},
    )
    causal_block_size: int = field(
        default=1, metadata={"help": "df: latent frames that share one noise level (SkyReels-V2 uses 5 with ar_step 5)"}
    )
    overlap_history: int | None = field(
        default=None,
        metadata={"help": "df: latent frames of the previous chunk kept as context for the next (chunked "
                  "generation in constant memory; default ~1/5 of a chunk for clips longer than one chunk "
                  "unless --ar-step is given)"},
    )
    addnoise_condition: float = field(
        default=0.0,
        metadata={"help": "df: re-noise history frames to this level (0-1000, SkyReels-V2 uses 20) to reduce drift"},
    )

    solver: Literal["ddim", "unipc"] = field(
        default="ddim",
        metadata={"help": "df: per-frame solver: ddim (Euler on flow models) or unipc (diffusers' UniPC "
                  "multistep, as its SkyReels-V2 diffusion-forcing pipeline), over the same sigmas"},
    )

    def __post_init__(self) -> None:
        if self.solver not in ("ddim", "unipc"):
            raise ValueError(f"--solver must be 'ddim' or 'unipc', got {self.solver!r}")
        _positive("base-num-latent-frames", self.base_num_latent_frames)
        _positive("causal-block-size", self.causal_block_size)
        _positive("overlap-history", self.overlap_history)
        if self.ar_step is not None and self.ar_step < 0:
            raise ValueError(f"--ar-step must be >= 0 (0 = synchronous), got {self.ar_step}")
        if not 0 <= self.addnoise_condition < 1000:
            raise ValueError(f"--addnoise-condition must be in [0, 1000) (20 is typical), got {self.addnoise_condition}")


def _resolve_df(knobs: DiffusionForcingKnobs, ctx: SamplerContext) -> DiffusionForcingKnobs:
    total = ctx.num_latent_frames
    base = knobs.base_num_latent_frames or ctx.default_window
    overlap = knobs.overlap_history
    if total > base and overlap is None and knobs.ar_step is None:
        # Longer than one chunk: chunked generation with ~1/5 of a chunk as history (SkyReels-V2 uses 17 of
        # 97 pixel frames), a multiple of the causal block; constant memory in clip length. (An explicit
        # --ar-step without history asks for one rolling pyramid.)
        block = knobs.causal_block_size
        overlap = min(max(block, base // 5 // block * block), base - block)
    knobs = dataclasses.replace(knobs, base_num_latent_frames=base, ar_step=knobs.ar_step or 0, overlap_history=overlap)
    if ctx.fixed_causal_blocks and knobs.causal_block_size > 1:
        _check_whole_blocks(knobs, ctx)
    return knobs


def df_model_call_lengths(total: int, base: int, overlap_history: int | None) -> list[int]:
    """Latent frames of each chunk the diffusion-forcing sampler hands the model (mirrors its chunk loop)."""
    base = min(base, total)
    if overlap_history is None or total <= base or not 0 < overlap_history < base:
        return [total] if total <= base else [base]
    lengths, start = [], 0
    while True:
        length = min(base, total - start)
        lengths.append(length)
        if start + length >= total:
            return lengths
        start += length - overlap_history


def _check_whole_blocks(knobs: DiffusionForcingKnobs, ctx: SamplerContext) -> None:
    """Block-causal models need whole blocks in every call: refuse before any model call, naming fitting sizes."""
    block = knobs.causal_block_size

    def fits(total: int) -> bool:
        lengths = df_model_call_lengths(total, knobs.base_num_latent_frames, knobs.overlap_history)
        if knobs.overlap_history is None and total > knobs.base_num_latent_frames:
            lengths = [total]  # one rolling pyramid: the window slides over the whole clip's blocks
        return all(n % block == 0 for n in lengths)

    total = ctx.num_latent_frames
    if fits(total):
        return
    lower = next((n for n in range(total - 1, 0, -1) if fits(n)), None)
    upper = next((n for n in range(total + 1, total + 4 * block * max(1, knobs.base_num_latent_frames)) if fits(n)), None)
    options = [f"--num-frames {ctx.num_pixel_frames(n)} ({n} latent frames)" for n in (lower, upper) if n]
    raise ValueError(
        f"this model's block-causal attention needs whole blocks of --causal-block-size {block} in every chunk, "
        f"but {total} latent frames with --base-num-latent-frames {knobs.base_num_latent_frames} and "
        f"--overlap-history {knobs.overlap_history} give a chunk that is not a multiple of {block}; use "
        + (" or ".join(options) or "another --num-frames")
        + ", or --causal-block-size 1"
    )


@dataclass(frozen=True)
class CausalKnobs:
    """Knobs of :func:`~longgen.samplers.causal.sample_causal_streaming`: the KV cache's shape (block-causal
    attention, :class:`~longgen.extend.configs.BlockCausalConfig`) and the rollout
    (:class:`~longgen.samplers.causal.CausalSamplerConfig`); both validate here."""

    chunk_size: int = field(default=3, metadata={"help": "latent frames per causal chunk (1 = frame-causal; "
                                                 "Self-Forcing, CausVid, LongLive: 3)"})
    local_attn_size: int = field(default=-1, metadata={"help": "latent frames a chunk attends to, sink and own "
                                                       "chunk included (-1 = the whole cache; LongLive 12)"})
    sink_size: int = field(default=0, metadata={"help": "first latent frames every chunk keeps attending to "
                                                "(attention sink, with --local-attn-size; LongLive 3)"})
    causal_rope: Literal["absolute", "window"] = field(
        default="absolute", metadata={"help": "RoPE positions: absolute frame index (the public causal "
                                      "checkpoints) or re-indexed within the frames a chunk sees"})
    causal_attention: Literal["chunked", "mask"] = field(
        default="chunked", metadata={"help": "per-chunk SDPA calls (flash-capable) or one dense mask"})
    context_noise: float = field(default=0.0, metadata={"help": "flow sigma of the clean pass that writes a "
                                                        "finished chunk into the KV cache (Self-Forcing: 0)"})
    rolling_window: int = field(default=1, metadata={"help": "chunks denoised together at rising noise levels "
                                                     "(Rolling Forcing: the number of steps; 1 = one at a time)"})
    causal_step: Literal["auto", "renoise", "ddim"] = field(
        default="auto", metadata={"help": "renoise: x = (1-s') x0 + s' fresh noise (few-step distilled "
                                  "models); ddim: deterministic step (full schedules); auto: renoise with "
                                  "--denoising-steps (a distilled model's few steps), else ddim"})
    recache: bool = field(default=True, metadata={"help": "at a --prompt-frames switch, recompute the cached "
                                                  "keys/values under the new prompt (LongLive KV recache)"})
    denoising_steps: str | None = field(default=None, metadata={
        "help": "per-chunk timesteps, e.g. 1000,750,500,250 (overrides --steps; default: --steps of the model's "
        "schedule)"})
    warp_denoising_step: bool = field(default=False, metadata={
        "help": "map --denoising-steps through a shifted 1000-step table (Self-Forcing's warp_denoising_step)"})
    timestep_shift: float = field(default=5.0, metadata={"help": "shift of that table (Self-Forcing: 5)"})

    def __post_init__(self) -> None:
        from ..extend.configs import BlockCausalConfig

        BlockCausalConfig(chunk_size=self.chunk_size, local_attn_size=self.local_attn_size,
                          sink_size=self.sink_size, rope_positions=self.causal_rope,
                          attention=self.causal_attention)
        if not 0.0 <= float(self.context_noise) < 1.0:
            raise ValueError(f"--context-noise must be a flow sigma in [0, 1), got {self.context_noise}")
        _positive("rolling-window", self.rolling_window)
        if self.causal_step not in ("auto", "renoise", "ddim"):
            raise ValueError(f"--causal-step must be 'auto', 'renoise' or 'ddim', got {self.causal_step!r}")
        if self.timestep_shift <= 0:
            raise ValueError(f"--timestep-shift must be > 0, got {self.timestep_shift}")
        if self.warp_denoising_step and self.denoising_steps is None:
            raise ValueError(
                "--warp-denoising-step maps the --denoising-steps timesteps through a shifted table: give "
                "--denoising-steps too (e.g. 1000,750,500,250), or drop it"
            )
        if self.denoising_steps is not None:
            try:
                steps = [float(t) for t in str(self.denoising_steps).replace(" ", "").split(",") if t]
            except ValueError:
                steps = []
            if not steps or any(b >= a for a, b in zip(steps, steps[1:])) or not all(0 < t <= 1000 for t in steps):
                raise ValueError(
                    "--denoising-steps takes strictly descending timesteps in (0, 1000], comma-separated, e.g. "
                    f"1000,750,500,250; got {self.denoising_steps!r}"
                )


def _causal_steps(knobs: CausalKnobs, ctx: SamplerContext) -> int:
    if knobs.denoising_steps is None:
        return ctx.requested_steps if ctx.requested_steps is not None else ctx.default_steps
    steps = len([t for t in str(knobs.denoising_steps).split(",") if t.strip()])
    if ctx.requested_steps is not None and ctx.requested_steps != steps:
        raise ValueError(f"--steps {ctx.requested_steps} disagrees with --denoising-steps ({steps} steps): drop one")
    return steps


def _check_causal(knobs: CausalKnobs, ctx: SamplerContext) -> CausalKnobs:
    if ctx.num_latent_frames % knobs.chunk_size:
        n = ctx.num_latent_frames
        lower, upper = n // knobs.chunk_size * knobs.chunk_size, (n // knobs.chunk_size + 1) * knobs.chunk_size
        fits = [f"--num-frames {ctx.num_pixel_frames(m)} ({m} latent frames)" for m in (lower, upper) if m > 0]
        raise ValueError(
            f"--chunk-size {knobs.chunk_size} does not divide the clip's {n} latent frames; use "
            + " or ".join(fits) + f", or a --chunk-size that divides {n}"
        )
    return knobs


register_sampler(SamplerSpec(
    name="full",
    fn="longgen.samplers.full:sample_full",
    knobs=FullKnobs,
    description="the whole clip at once (naive baseline)",
    resamples=True,
))
register_sampler(SamplerSpec(
    name="sliding",
    fn="longgen.samplers.sliding:sample_sliding",
    knobs=SlidingKnobs,
    description="overlapping windows of the native length fused every step (MultiDiffusion / FreeNoise)",
    resolve=_resolve_sliding,
    resamples=True,
))
register_sampler(SamplerSpec(
    name="fifo",
    fn="longgen.samplers.fifo:sample_fifo",
    knobs=FifoKnobs,
    description="FIFO-Diffusion queue (diagonal denoising, constant memory; takes num_partitions*window steps)",
    streams=True,
    resolve=_resolve_fifo,
    num_steps=_fifo_steps,
    fit_steps=_fifo_fit_steps,
))
register_sampler(SamplerSpec(
    name="df",
    fn="longgen.samplers.diffusion_forcing:sample_diffusion_forcing",
    knobs=DiffusionForcingKnobs,
    description="diffusion forcing, chunk after chunk with per-frame noise levels (constant memory with "
    "--overlap-history)",
    streams=True,
    resolve=_resolve_df,
))
register_sampler(SamplerSpec(
    name="causal",
    fn="longgen.samplers.causal:sample_causal_streaming",
    knobs=CausalKnobs,
    description="causal streaming: chunk after chunk with a KV cache of the finished ones (CausVid / "
    "Self-Forcing; rolling window + sink as LongLive; DiTs)",
    streams=True,
    resolve=_check_causal,
    num_steps=_causal_steps,
    hooks="longgen.samplers.causal:causal_hooks",
))


@dataclass(frozen=True)
class ExtendKnobs:
    """Knobs of :func:`~longgen.samplers.extend.sample_extend`."""

    window: int | None = field(default=None, metadata={"help": "window in latent frames (default: native length)"})
    chunk_context: int | None = field(
        default=None,
        metadata={"help": "extend: latent frames next to each new chunk given clean as its context (default: "
                  "a third of the window)"},
    )
    anchor_frames: int = field(
        default=0,
        metadata={"help": "extend: the clip's first latent frames kept as given context in every window "
                  "(FramePack-style anchor; 0 = off)"},
    )
    order: Literal["forward", "inverted"] = field(
        default="forward",
        metadata={"help": "extend: chunk order; inverted = FramePack's anti-drifting order (the last chunk "
                  "first from the anchor, then backward; needs --anchor-frames)"},
    )
    stats_anchor: float = field(
        default=0.0,
        metadata={"help": "extend: pull each new chunk's per-channel latent mean/std toward its context's "
                  "(0 = off, 1 = match)"},
    )
    eta: float = field(default=0.0, metadata={"help": _ETA_HELP})

    def __post_init__(self) -> None:
        _positive("window", self.window)
        _positive("chunk-context", self.chunk_context)
        if self.anchor_frames < 0:
            raise ValueError(f"--anchor-frames must be >= 0 (0 = no anchor), got {self.anchor_frames}")
        if self.order not in ("forward", "inverted"):
            raise ValueError(f"--order must be 'forward' or 'inverted', got {self.order!r}")
        if self.order == "inverted" and self.anchor_frames == 0:
            raise ValueError("--order inverted generates backward from an anchor: set --anchor-frames >= 1")
        if not 0.0 <= self.stats_anchor <= 1.0:
            raise ValueError(f"--stats-anchor must be in [0, 1] (0 = off), got {self.stats_anchor}")
        _check_eta(self.eta)


def _resolve_extend(knobs: ExtendKnobs, ctx: SamplerContext) -> ExtendKnobs:
    window = knobs.window or ctx.default_window
    context = knobs.chunk_context if knobs.chunk_context is not None else max(1, window // 3)
    if context + knobs.anchor_frames >= window:
        raise ValueError(
            f"--chunk-context {context} + --anchor-frames {knobs.anchor_frames} leave no frame of the "
            f"{window}-frame window to generate; lower them or raise --window"
        )
    return dataclasses.replace(knobs, window=window, chunk_context=context)


register_sampler(SamplerSpec(
    name="extend",
    fn="longgen.samplers.extend:sample_extend",
    knobs=ExtendKnobs,
    description="chunk-by-chunk continuation around given frames (clean context; FramePack-style anchor and "
    "inverted order; statistics anchoring)",
    resolve=_resolve_extend,
))
