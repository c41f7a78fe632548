"""Extensions applied to a live model through its backbone adapter, each removable (see DESIGN.md).

Every extension is registered once in :mod:`longgen.extend.registry` (``apply_extension(adapter, name,
config)``); importing this package registers the built-in ones (pi, ntk, yarn, riflex, fusion, spectral,
exvideo).
"""

# isort: off
from . import rope, fusion, spectral, exvideo  # noqa: F401  registration order: the CLI lists them so

# isort: on
from .exvideo import (
    ExVideoConfig,
    ExVideoSite,
    apply_exvideo,
    exvideo_trainable_parameters,
    reflected_position_ids,
    remove_exvideo,
)
from .fusion import WindowFusionConfig, WindowFusionOptions, apply_window_fusion, remove_window_fusion
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
from .rope import (
    ROPE_METHODS,
    RiflexConfig,
    RopeExtension,
    RopeExtensionConfig,
    YarnConfig,
    apply_rope_extension,
    extension_from_args,
    get_rope_extension,
    ntk_frequencies,
    pi_frequencies,
    print_rope_info,
    remove_rope_extension,
    riflex_frequencies,
    riflex_intrinsic_frequency,
    temporal_rope_info,
    yarn_attention_temperature,
    yarn_frequencies,
)
from .spectral import (
    SpectralBlendConfig,
    SpectralBlendOptions,
    apply_spectral_blend,
    gaussian_low_pass_filter,
    remove_spectral_blend,
)

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
