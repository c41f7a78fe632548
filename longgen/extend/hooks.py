"""Hook names and hook bookkeeping shared by the extensions (a leaf of :mod:`longgen.extend`).

Window fusion, SpectralBlend and ExVideo check each other's hooks (two of them replace the same temporal
attention; ExVideo must sit below window fusion). The names live here, so the extension modules need not
import one another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusers.hooks import HookRegistry
from torch import nn

from ..backbones.capabilities import FrameAttention, TemporalRope, WindowAttention, denoiser_models

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "SPECTRAL_BLEND_HOOK",
    "WINDOW_FUSION_HOOK",
    "check_no_hook",
    "frame_attention_layers",
    "has_hook",
    "remove_hooks",
    "window_families",
]

WINDOW_FUSION_HOOK = "longgen_window_fusion"
SPECTRAL_BLEND_HOOK = "longgen_spectral_blend"


def has_hook(adapter: BackboneAdapter, hook_name: str) -> bool:
    """True when a hook named ``hook_name`` is on any module of the adapter's denoiser model(s)."""
    return any(
        getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(hook_name) is not None
        for model in denoiser_models(adapter)
        for m in model.modules()
    )


def check_no_hook(modules: list[tuple[str, nn.Module]], hook_name: str, message: str) -> None:
    """RuntimeError ``message.format(name=...)`` when one of ``modules`` carries the hook ``hook_name``."""
    for name, module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(hook_name) is not None:
            raise RuntimeError(message.format(name=name))


def remove_hooks(adapter: BackboneAdapter, *hook_names: str) -> None:
    """Remove the named hooks from every denoiser model of the adapter and its submodules."""
    for model in denoiser_models(adapter):
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


def window_families() -> list[str]:
    """Families window fusion and SpectralBlend support: frame-axis UNets, then the video-token DiTs."""
    from ..backbones import families_with

    return [*families_with(FrameAttention), *families_with(WindowAttention)]


def frame_attention_layers(adapter: BackboneAdapter, method: str) -> list[tuple[str, nn.Module]]:
    """The frame-axis temporal attention layers of a :class:`FrameAttention` UNet, or a ValueError naming the
    supported backbones."""
    if not isinstance(adapter, FrameAttention):
        rope = " or the RoPE extensions (pi, ntk, yarn, riflex)" if isinstance(adapter, TemporalRope) else ""
        raise ValueError(
            f"{method} is not available for the {adapter.family!r} backbone; supported: "
            f"{', '.join(window_families())} (temporal attention over the frame axis, or self-attention over "
            f"video tokens with RoPE, windowed per latent frame). For long clips on {adapter.family!r} use the "
            f"sliding, fifo or df samplers{rope}."
        )
    modules = adapter.temporal_attention_modules()
    if not modules:
        raise ValueError(f"the {adapter.family!r} model declares no temporal attention layers for {method}")
    return modules
