"""Optional adapter capabilities as declared types (mixins with abstract methods).

:class:`~longgen.backbones.base.BackboneAdapter` is what every family implements. What only some families can do
is a mixin here: an adapter class lists the capabilities it has among its bases, and callers test
``isinstance(adapter, WindowAttention)`` instead of probing attributes. A capability's abstract methods must be
implemented by the class that declares it (Python refuses to instantiate it otherwise), so "declared" and
"usable" cannot drift apart; ``tests/backbones/test_conformance.py`` runs every declared capability of every
family. :func:`longgen.backbones.families_with` lists the families that have one (for error messages).

The mixins hold no model code: they name the methods and their contracts (the per-family code stays in
``longgen/backbones/<family>.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from ..extend.exvideo import ExVideoSite
    from .base import WindowAttentionSpec

__all__ = [
    "CAPABILITIES",
    "CausalBlockMask",
    "ExVideoSites",
    "FrameAttention",
    "ImageConditioning",
    "MixtureOfExperts",
    "TemporalRope",
    "TemporalRopeFrequencies",
    "TemporalRopeScale",
    "WindowAttention",
    "denoiser_models",
]


class WindowAttention(ABC):
    """A DiT whose video self-attention frame-window extensions (window fusion, SpectralBlend) can reach."""

    @abstractmethod
    def window_attention_spec(self) -> WindowAttentionSpec:
        """Layer pattern, token-grid reader, text order and RoPE argument of the video attention."""


class FrameAttention(ABC):  # noqa: B024  (a marker with defaults; temporal_attention_modules is on the base)
    """A UNet whose temporal attention layers attend over the frame axis (tokens ``[B*H*W, F, C]``).

    ``temporal_attention_modules()`` (on the base class) must list those layers. ``position_window`` is set by
    window fusion while it windows the positions (an adapter may then skip a position-table length check).
    """

    position_window: int | None = None

    def temporal_attention_positions(self) -> dict[str, torch.nn.Module]:
        """Attention name -> the additive frame-position embedding added right before it; {} when positions
        enter before the temporal block (SVD)."""
        return {}


class ExVideoSites(ABC):
    """A UNet with frame-position tables ExVideo (Duan et al. 2024) extends."""

    @abstractmethod
    def exvideo_sites(self) -> list[ExVideoSite]:
        """Where ExVideo adds its table and Conv3d, and which modules it post-tunes."""


class MixtureOfExperts(ABC):
    """Several denoising networks selected by noise level (Wan 2.2 MoE); hooks go on every one."""

    @abstractmethod
    def experts(self) -> list[torch.nn.Module]:
        """The denoising networks, the adapter's ``model`` first."""


class CausalBlockMask(ABC):
    """Block-causal attention over latent frames (SkyReels-V2 diffusion forcing)."""

    @property
    @abstractmethod
    def causal_block_size(self) -> int:
        """Latent frames per causal block (1: full bidirectional attention)."""

    @abstractmethod
    def set_causal_block_size(self, causal_block_size: int) -> None:
        """Set the block-causal mask; ValueError for a size < 1."""


class TemporalRope(ABC):
    """A video DiT with rotary position embeddings on the time axis (temporal RoPE extensions apply).

    Use one of the two concrete forms: :class:`TemporalRopeFrequencies` (integer positions with a base: PI,
    NTK, YaRN, RIFLEx rewrite the frequencies) or :class:`TemporalRopeScale` (fractional coordinates: PI by a
    coordinate scale, LTX).
    """

    rope_extension_methods: ClassVar[tuple[str, ...]] = ()
    """Temporal RoPE extension methods (``pi``, ``ntk``, ``yarn``, ``riflex``) the family supports."""

    @abstractmethod
    def rope_module(self) -> torch.nn.Module | None:
        """The rotary embedding module; None for a checkpoint of the family without RoPE (CogVideoX-2b)."""

    @abstractmethod
    def rope_axes(self) -> list[dict[str, Any]]:
        """Per axis (t first): ``axis``, ``dim``, ``base``, ``frequencies`` (float64), ``unit``."""

    def require_rope(self) -> None:  # noqa: B027  (optional override: most checkpoints always have RoPE)
        """Raise a ValueError that names the fix when this checkpoint has no RoPE (``rope_module()`` None)."""

    def rope_attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The attention layers whose query-key products carry the RoPE (YaRN scales their queries)."""
        return self.temporal_attention_modules()  # type: ignore[attr-defined]


class TemporalRopeFrequencies(TemporalRope):
    """Temporal RoPE over integer positions: the temporal frequencies can be read and replaced."""

    @abstractmethod
    def temporal_rope_frequencies(self) -> torch.Tensor:
        """The stock temporal frequencies (rad per position), float64."""

    @abstractmethod
    def set_temporal_rope_frequencies(self, frequencies: torch.Tensor | None) -> None:
        """Install temporal frequencies; None restores the stock tables bit for bit."""


class TemporalRopeScale(TemporalRope):
    """Temporal RoPE over fractional coordinates: positional interpolation divides them by a scale."""

    temporal_position_scale: float = 1.0

    @abstractmethod
    def set_temporal_position_scale(self, scale: float) -> None:
        """Temporal RoPE coordinates divided by ``scale`` (1: the stock model)."""


class ImageConditioning(ABC):  # noqa: B024  (a marker: the attributes are per instance, on the base)
    """A family with image-conditioned checkpoints (I2V). Whether a loaded checkpoint takes or needs an image
    is per instance: ``supports_image_condition`` / ``requires_image_condition`` (declared on the base)."""


CAPABILITIES: tuple[type, ...] = (
    WindowAttention,
    FrameAttention,
    ExVideoSites,
    MixtureOfExperts,
    CausalBlockMask,
    TemporalRope,
    TemporalRopeFrequencies,
    TemporalRopeScale,
    ImageConditioning,
)
"""Every capability type, for the conformance suite and ``families_with``."""


def denoiser_models(adapter: Any) -> list[torch.nn.Module]:
    """The adapter's denoising networks: every expert of a :class:`MixtureOfExperts`, else ``[adapter.model]``."""
    return list(adapter.experts()) if isinstance(adapter, MixtureOfExperts) else [adapter.model]
