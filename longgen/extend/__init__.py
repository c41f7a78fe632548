"""Extensions applied to a live model through its backbone adapter, each removable (see DESIGN.md)."""

from .exvideo import (
    ExVideoSite,
    apply_exvideo,
    exvideo_trainable_parameters,
    reflected_position_ids,
    remove_exvideo,
)
from .fusion import WindowFusionConfig, apply_window_fusion, remove_window_fusion
from .rope import (
    ROPE_METHODS,
    RopeExtension,
    add_inspect_rope_parser,
    apply_rope_extension,
    extension_from_args,
    get_rope_extension,
    ntk_frequencies,
    pi_frequencies,
    remove_rope_extension,
    riflex_frequencies,
    riflex_intrinsic_frequency,
    temporal_rope_info,
    yarn_attention_temperature,
    yarn_frequencies,
)
from .spectral import (
    SpectralBlendConfig,
    apply_spectral_blend,
    gaussian_low_pass_filter,
    remove_spectral_blend,
)

EXTENSIONS = (*ROPE_METHODS, "fusion", "spectral", "exvideo")
"""Names accepted by ``LongVideoPipeline.apply_extension`` and ``longgen generate --extension``."""

__all__ = [
    "EXTENSIONS",
    "ExVideoSite",
    "SpectralBlendConfig",
    "WindowFusionConfig",
    "apply_exvideo",
    "apply_spectral_blend",
    "apply_window_fusion",
    "exvideo_trainable_parameters",
    "gaussian_low_pass_filter",
    "reflected_position_ids",
    "remove_exvideo",
    "remove_spectral_blend",
    "remove_window_fusion",
    "ROPE_METHODS",
    "RopeExtension",
    "add_inspect_rope_parser",
    "apply_rope_extension",
    "extension_from_args",
    "get_rope_extension",
    "ntk_frequencies",
    "pi_frequencies",
    "remove_rope_extension",
    "riflex_frequencies",
    "riflex_intrinsic_frequency",
    "temporal_rope_info",
    "yarn_attention_temperature",
    "yarn_frequencies",
]
