"""Long-video samplers: pure functions ``sample_<name>(denoise, noise, sigmas, **knobs)`` and their registry.

Importing this package registers the built-in samplers (:mod:`longgen.samplers.builtin`) without importing
torch; the sampler functions and helpers below are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import builtin  # noqa: F401  (registers full, sliding, fifo, df)
from .registry import (
    SamplerContext,
    SamplerSpec,
    all_knobs,
    get_sampler,
    option_flags,
    options_for_steps,
    register_sampler,
    sampler_names,
    unregister_sampler,
)

_LAZY = {
    "Denoiser": ".base",
    "ddim_eta_step": ".base",
    "fusion_weights": ".base",
    "window_starts": ".base",
    "sample_diffusion_forcing": ".diffusion_forcing",
    "scheduler_sigmas": ".diffusion_forcing",
    "sample_fifo": ".fifo",
    "sample_full": ".full",
    "sample_sliding": ".sliding",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SamplerContext",
    "SamplerSpec",
    "all_knobs",
    "get_sampler",
    "option_flags",
    "options_for_steps",
    "register_sampler",
    "sampler_names",
    "unregister_sampler",
    *_LAZY,
]
