"""Extensions applied to a live model through its backbone adapter, each removable (see DESIGN.md).

Every extension is registered once in :mod:`longgen.extend.registry` (``apply_extension(adapter, name,
config)``); importing this package registers the built-in ones (pi, ntk, yarn, riflex, fusion, spectral,
exvideo) without importing torch (:mod:`longgen.extend.builtin`); the torch-backed functions below are imported
on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import builtin  # noqa: F401  registers pi, ntk, yarn, riflex, fusion, spectral, exvideo (in that order)
from .configs import (
    ROPE_METHODS,
    ExVideoConfig,
    RiflexConfig,
    RopeExtensionConfig,
    SpectralBlendOptions,
    WindowFusionOptions,
    YarnConfig,
)
from .registry import (
    ExtensionHandle,
    ExtensionSpec,
    apply_extension,
    extension_from_metadata,
    extension_names,
    extension_option_fields,
    get_extension,
    register_extension,
)

# torch-backed names, imported on first access so `import longgen.extend.registry` (the CLI parser) needs no torch
_LAZY = {
    **dict.fromkeys(
        ("ExVideoSite", "apply_exvideo", "exvideo_trainable_parameters", "reflected_position_ids", "remove_exvideo"),
        ".exvideo",
    ),
    **dict.fromkeys(("WindowFusionConfig", "apply_window_fusion", "remove_window_fusion"), ".fusion"),
    **dict.fromkeys(
        (
            "RopeExtension",
            "apply_rope_extension",
            "extension_from_args",
            "get_rope_extension",
            "ntk_frequencies",
            "pi_frequencies",
            "print_rope_info",
            "remove_rope_extension",
            "riflex_frequencies",
            "riflex_intrinsic_frequency",
            "temporal_rope_info",
            "yarn_attention_temperature",
            "yarn_frequencies",
        ),
        ".rope",
    ),
    **dict.fromkeys(
        ("SpectralBlendConfig", "apply_spectral_blend", "gaussian_low_pass_filter", "remove_spectral_blend"),
        ".spectral",
    ),
}
_SUBMODULES = ("dit_attention", "exvideo", "fusion", "hooks", "rope", "spectral")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


EXTENSIONS = tuple(extension_names())
"""Registered extension names (read the registry, :func:`extension_names`, for ones registered later)."""

__all__ = [
    "EXTENSIONS",
    "ExVideoConfig",
    "ExVideoSite",
    "ExtensionHandle",
    "ExtensionSpec",
    "RiflexConfig",
    "RopeExtensionConfig",
    "SpectralBlendConfig",
    "SpectralBlendOptions",
    "WindowFusionConfig",
    "WindowFusionOptions",
    "YarnConfig",
    "apply_extension",
    "apply_exvideo",
    "apply_spectral_blend",
    "apply_window_fusion",
    "extension_from_metadata",
    "extension_names",
    "extension_option_fields",
    "exvideo_trainable_parameters",
    "gaussian_low_pass_filter",
    "get_extension",
    "reflected_position_ids",
    "register_extension",
    "remove_exvideo",
    "remove_spectral_blend",
    "remove_window_fusion",
    "ROPE_METHODS",
    "RopeExtension",
    "apply_rope_extension",
    "extension_from_args",
    "get_rope_extension",
    "ntk_frequencies",
    "pi_frequencies",
    "print_rope_info",
    "remove_rope_extension",
    "riflex_frequencies",
    "riflex_intrinsic_frequency",
    "temporal_rope_info",
    "yarn_attention_temperature",
    "yarn_frequencies",
]
