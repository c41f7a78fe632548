"""Extensions applied to a live model through its backbone adapter, each removable (see DESIGN.md)."""

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

__all__ = [
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
