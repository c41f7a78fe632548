"""The option dataclasses of the built-in extensions (torch-free: the CLI builds its flags from them).

Each dataclass is the one place an extension option's name, default and help live; the extension modules
(:mod:`longgen.extend.rope`, :mod:`~longgen.extend.fusion`, :mod:`~longgen.extend.spectral`,
:mod:`~longgen.extend.exvideo`) re-export them, and :mod:`longgen.extend.builtin` registers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module stays torch-free
    import torch

__all__ = [
    "BlockCausalConfig",
    "ROPE_METHODS",
    "YARN_BETA_FAST",
    "YARN_BETA_SLOW",
    "ExVideoConfig",
    "RiflexConfig",
    "RopeExtensionConfig",
    "SPARSE_ATTENTION_MODES",
    "STEP_CACHE_KINDS",
    "SparseAttentionConfig",
    "SpectralBlendOptions",
    "StepCacheConfig",
    "WindowFusionOptions",
    "YarnConfig",
]

ROPE_METHODS = ("pi", "ntk", "yarn", "riflex")

YARN_BETA_FAST = 2.0
"""YaRN's beta (``beta_fast``) for video: components that turn at least twice over the native clip keep
their frequency (pure extrapolation). The paper's text defaults (beta=32, alpha=1) assume thousands of
positions; with 13-33 latent frames even the fastest temporal component turns only ``L / 2 pi`` = 2-5
times (CogVideoX 13 -> 2.1, Wan 21 -> 3.3, HunyuanVideo 33 -> 5.3), so beta=32 would make YaRN plain PI.
With beta=2 the fastest one or two components (frame-to-frame order) are kept, the ramp covers the
components that turn once or twice, and slower ones are interpolated."""
YARN_BETA_SLOW = 1.0
"""YaRN's alpha (``beta_slow``): components that complete less than one turn over the native clip never
saw their angle wrap and are fully interpolated (the paper's value)."""


# --- RoPE: pi, ntk, yarn, riflex (longgen.extend.rope) --------------------------------------------
@dataclass(frozen=True)
class RopeExtensionConfig:
    """Temporal RoPE extension (PI, NTK): from ``train_latent_frames`` (None: the native clip) to the target."""

    target_latent_frames: int = field(metadata={"help": "length the model sees in one window (latent frames)"})
    train_latent_frames: int | None = field(default=None, metadata={"help": "native length (latent frames)"})


@dataclass(frozen=True)
class YarnConfig(RopeExtensionConfig):
    """YaRN (Peng et al. 2024): ramp between extrapolated and interpolated components, attention temperature."""

    beta_fast: float = field(default=YARN_BETA_FAST, metadata={"help": "turns over the native clip above which "
                             "a component keeps its frequency"})
    beta_slow: float = field(default=YARN_BETA_SLOW, metadata={"help": "turns below which it is interpolated"})
    attention_temperature: float | None = field(default=None, metadata={"help": "logit multiplier (default "
                                                "(0.1 ln s + 1)^2)"})


@dataclass(frozen=True)
class RiflexConfig(RopeExtensionConfig):
    """RIFLEx (Zhao et al. 2025): lower the intrinsic component's frequency to keep the target in one period."""

    k: int | None = field(default=None, metadata={"help": "intrinsic component, 1-based (default: identified)"})
    repetition_frame: int | None = field(default=None, metadata={"help": "latent frame where extrapolated videos "
                                         "first repeat (identifies k)"})
    finetune: bool = field(default=False, metadata={"help": "the model was fine-tuned with RIFLEx: change RoPE "
                           "even when the target fits the intrinsic period"})


# --- FreeNoise window fusion (longgen.extend.fusion) -----------------------------------------------
@dataclass(frozen=True)
class WindowFusionOptions:
    """Options of the ``fusion`` registry entry (None: from the native clip, see
    :func:`~longgen.extend.fusion.apply_window_fusion`)."""

    window: int | None = field(default=None, metadata={"help": "window in latent frames (default: native clip)"})
    stride: int | None = field(default=None, metadata={"help": "stride in latent frames (default: window // 4)"})


# --- FreeLong SpectralBlend (longgen.extend.spectral) ----------------------------------------------
@dataclass(frozen=True)
class SpectralBlendOptions:
    """Options of the ``spectral`` registry entry (see :func:`~longgen.extend.spectral.apply_spectral_blend`)."""

    local_window: int | None = field(default=None, metadata={"help": "local window, latent frames (default: "
                                     "native clip)"})
    spatial_stop_frequency: float = field(default=0.25, metadata={"help": "Gaussian low-pass d_s"})
    temporal_stop_frequency: float = field(default=0.25, metadata={"help": "Gaussian low-pass d_t"})
    local_stride: int | None = field(default=None, metadata={"help": "DiTs: stride of the local windows"})


# --- ExVideo (longgen.extend.exvideo) -------------------------------------------------------------
@dataclass(frozen=True)
class ExVideoConfig:
    """ExVideo (Duan et al. 2024) options of the registry entry (see :func:`~longgen.extend.exvideo.apply_exvideo`)."""

    target_latent_frames: int = field(metadata={"help": "frames the extended position table covers (latent)"})
    train_latent_frames: int | None = field(default=None, metadata={"help": "trained length (latent frames)"})
    repeat_length: int | None = field(default=None, metadata={"help": "period of the reflected positions"})
    positional_conv: bool = field(default=True, metadata={"help": "add the identity-initialised Conv3d"})
    set_trainable: bool = field(default=False, metadata={"help": "freeze all but ExVideo's parameters (training)", "cli": False})


@dataclass
class BlockCausalConfig:
    """Block-causal attention over latent chunks with a KV cache (:mod:`longgen.extend.causal`). The causal sampler
    sets these from ``--chunk-size``, ``--local-attn-size``, ``--sink-size``, ``--causal-rope``, ``--causal-attention``;
    ``--extension block-causal`` from ``--block-causal-<field>``."""

    chunk_size: int = field(
        default=3,
        metadata={"help": "latent frames per causal chunk (1 = frame-causal; Self-Forcing 3)"},
    )
    local_attn_size: int = field(
        default=-1,
        metadata={
            "help": "latent frames a chunk attends to, sink and own chunk included "
            "(-1 = all earlier frames; LongLive 12)"
        },
    )
    sink_size: int = field(
        default=0,
        metadata={
            "help": "first latent frames of the clip every chunk keeps attending to (LongLive 3)"
        },
    )
    rope_positions: str = field(
        default="absolute",
        metadata={
            "help": "'absolute' (frame index in the clip; Self-Forcing/CausVid/LongLive v1 "
            "checkpoints) or 'window' (positions re-indexed within the frames a chunk sees)"
        },
    )
    attention: str = field(
        default="chunked",
        metadata={
            "help": "full-clip calls as 'chunked' per-chunk SDPA calls (flash-capable) or "
            "one dense 'mask' through the stock processor"
        },
    )

    def __post_init__(self) -> None:
        if int(self.chunk_size) < 1:
            raise ValueError(f"--chunk-size must be >= 1 latent frame, got {self.chunk_size}")
        if int(self.sink_size) < 0:
            raise ValueError(f"--sink-size must be >= 0 latent frames, got {self.sink_size}")
        if self.local_attn_size != -1:
            if self.local_attn_size - self.sink_size < self.chunk_size:
                raise ValueError(
                    f"--local-attn-size {self.local_attn_size} leaves {self.local_attn_size - self.sink_size} frames "
                    f"besides the {self.sink_size}-frame sink, smaller than a chunk ({self.chunk_size}): use "
                    f"--local-attn-size >= {self.chunk_size + self.sink_size} (or -1 for the full cache)"
                )
        elif self.sink_size:
            raise ValueError("--sink-size only applies with a rolling window: set --local-attn-size too")
        if self.rope_positions not in ("absolute", "window"):
            raise ValueError(f"--causal-rope must be 'absolute' or 'window', got {self.rope_positions!r}")
        if self.attention not in ("chunked", "mask"):
            raise ValueError(f"--causal-attention must be 'chunked' or 'mask', got {self.attention!r}")
        if self.attention == "mask" and self.rope_positions == "window":
            raise ValueError(
                "--causal-attention mask runs the stock processor at absolute positions; window RoPE positions "
                "need --causal-attention chunked"
            )

    @property
    def recent_frames(self) -> int | None:
        """Frames of the rolling window besides the sink (None: no window)."""
        return None if self.local_attn_size == -1 else self.local_attn_size - self.sink_size

    def chunk_end(self, frame: int) -> int:
        """End (exclusive) of the chunk holding latent frame ``frame``."""
        return (frame // self.chunk_size + 1) * self.chunk_size

    def visible(self, key_frame: torch.Tensor, chunk_end: int) -> torch.Tensor:
        """Whether queries of the chunk ending at ``chunk_end`` see each of ``key_frame`` (bool, same shape)."""
        seen = key_frame < chunk_end
        if self.recent_frames is not None:
            seen &= (key_frame < self.sink_size) | (key_frame >= chunk_end - self.recent_frames)
        return seen

    def first_needed(self, next_chunk_end: int) -> int:
        """Frames at or past this index (besides the sink) may still be seen by the chunk ending at
        ``next_chunk_end`` or later ones; earlier ones can be evicted."""
        return 0 if self.recent_frames is None else next_chunk_end - self.recent_frames


# --- step caching (longgen.extend.step_cache) -------------------------------------------------------
STEP_CACHE_KINDS = ("fbc", "taylorseer")


@dataclass(frozen=True)
class StepCacheConfig:
    """Options of the ``cache`` registry entry (diffusers' cache hooks, one cache state per window)."""

    kind: str = field(default="fbc", metadata={"help": "fbc = First Block Cache (skip the other blocks when the "
                      "first block's residual barely changed), taylorseer = TaylorSeer (Taylor-extrapolated "
                      "block outputs between full steps)"})
    threshold: float = field(default=0.05, metadata={"help": "fbc: relative change of the first block's residual "
                             "below which the remaining blocks are skipped (higher = faster, more drift)"})
    interval: int = field(default=5, metadata={"help": "taylorseer: steps between full computations"})
    warmup_steps: int = field(default=3, metadata={"help": "taylorseer: full steps before caching starts"})
    order: int = field(default=1, metadata={"help": "taylorseer: order of the Taylor expansion"})

    def __post_init__(self) -> None:
        if self.kind not in STEP_CACHE_KINDS:
            raise ValueError(f"--cache-kind must be one of {', '.join(STEP_CACHE_KINDS)}, got {self.kind!r}")
        if self.threshold < 0:
            raise ValueError(f"--cache-threshold must be >= 0 (0 never skips), got {self.threshold}")
        for flag, value in (("interval", self.interval), ("warmup-steps", self.warmup_steps), ("order", self.order)):
            if value < 1:
                raise ValueError(f"--cache-{flag} must be >= 1, got {value}")


# --- temporal-local sparse attention (longgen.extend.sparse_attention) -------------------------------
SPARSE_ATTENTION_MODES = ("blocks", "mask")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Options of the ``sparse`` registry entry: temporal sliding-tile attention over latent frames. The query frames
    are cut into tiles of ``tile`` frames; a tile ``[a, b)`` attends to the key frames ``[a - radius, b + radius)``
    (clipped to the clip), every text token (joint families) and nothing else; text queries stay dense."""

    radius: int | None = field(default=None, metadata={"help": "latent frames a query tile sees on each side "
                               "(default: the native clip - 1: every query-key distance the model was trained on, "
                               "and exactly dense on native-length clips)"})
    tile: int = field(default=1, metadata={"help": "latent frames per query tile (larger: fewer attention calls, "
                      "more keys per query)"})
    attention: str = field(default="blocks", metadata={"help": "'blocks' computes only each tile's local key "
                           "frames (saves FLOPs and time); 'mask' runs the stock processor with a dense boolean "
                           "mask (the reference; saves nothing)"})

    def __post_init__(self) -> None:
        if self.radius is not None and int(self.radius) < 0:
            raise ValueError(f"--sparse-radius must be >= 0 latent frames, got {self.radius}")
        if int(self.tile) < 1:
            raise ValueError(f"--sparse-tile must be >= 1 latent frame, got {self.tile}")
        if self.attention not in SPARSE_ATTENTION_MODES:
            raise ValueError(
                f"--sparse-attention must be one of {', '.join(SPARSE_ATTENTION_MODES)}, got {self.attention!r}"
            )

    def key_range(self, start: int, stop: int, num_frames: int, radius: int) -> tuple[int, int]:
        """Key frames ``[lo, hi)`` the query tile ``[start, stop)`` of a ``num_frames`` clip attends to."""
        return max(0, start - radius), min(num_frames, stop + radius)

    def tiles(self, num_frames: int) -> list[tuple[int, int]]:
        """The query tiles ``[(start, stop), ...]`` of a ``num_frames`` clip (the last one may be shorter)."""
        return [(a, min(a + self.tile, num_frames)) for a in range(0, num_frames, self.tile)]

    def attended_pairs(self, num_frames: int, radius: int) -> int:
        """(query frame, key frame) pairs computed: the self-attention share of ``num_frames ** 2`` that remains."""
        return sum((b - a) * (hi - lo) for a, b in self.tiles(num_frames)
                   for lo, hi in [self.key_range(a, b, num_frames, radius)])
