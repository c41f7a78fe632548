"""Backbone adapters, one per diffusers family, and the registry that picks one for a model folder.

Adding a backbone: write ``longgen/backbones/<family>.py`` with a ``BackboneAdapter`` subclass (the abstract
``tiny_pipeline``, ``encode_prompt``, ``denoise``, ``decode``) whose bases also list the capabilities it has
(:mod:`.capabilities`: ``WindowAttention``, ``TemporalRopeFrequencies``, ...), add one line to ``_ADAPTERS``
below (``FAMILIES`` follows): ``tests/backbones/test_conformance.py`` then runs the
contract and every declared capability on it; add its stock-parity tests in ``tests/backbones/test_<family>.py``.
Extensions find it through its capabilities; nothing in ``longgen/extend`` lists families.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from .base import BackboneAdapter, Cond, FrameLayout, cat_conds, read_model_index, repeat_cond
from .capabilities import (
    CAPABILITIES,
    CausalBlockMask,
    ExVideoSites,
    FrameAttention,
    ImageConditioning,
    MixtureOfExperts,
    TemporalRope,
    TemporalRopeFrequencies,
    TemporalRopeScale,
    WindowAttention,
    denoiser_models,
)

logger = logging.getLogger(__name__)

# family -> "module:Class"; modules are imported on first use so a missing optional piece of one
# family never breaks the others.
_ADAPTERS: dict[str, str] = {
    "wan": "longgen.backbones.wan:WanAdapter",
    "skyreels_v2": "longgen.backbones.skyreels_v2:SkyReelsV2Adapter",
    "ltx": "longgen.backbones.ltx:LTXAdapter",
    "cogvideox": "longgen.backbones.cogvideox:CogVideoXAdapter",
    "hunyuan_video": "longgen.backbones.hunyuan_video:HunyuanVideoAdapter",
    "animatediff": "longgen.backbones.animatediff:AnimateDiffAdapter",
    "svd": "longgen.backbones.svd:SVDAdapter",
}

FAMILIES = tuple(_ADAPTERS)


def get_adapter_class(family: str) -> type[BackboneAdapter]:
    """The adapter class of a family name (``wan``, ``ltx``, ...)."""
    if family not in _ADAPTERS:
        raise ValueError(f"unknown backbone family {family!r}; choose one of: {', '.join(FAMILIES)}")
    module, name = _ADAPTERS[family].split(":")
    return getattr(importlib.import_module(module), name)


def families_with(capability: type) -> list[str]:
    """The families whose adapter class declares ``capability`` (a type of :mod:`.capabilities`), in
    :data:`FAMILIES` order; for error messages that list what supports an extension."""
    out = []
    for family in FAMILIES:
        try:
            cls = get_adapter_class(family)
        except ImportError:  # a family whose optional dependency is missing supports nothing here
            continue
        if issubclass(cls, capability):
            out.append(family)
    return out


def adapter_class_for_pipeline(class_name: str) -> type[BackboneAdapter]:
    """The adapter whose ``pipeline_class_names`` lists a diffusers pipeline class name."""
    supported = []
    for family in FAMILIES:
        try:
            cls = get_adapter_class(family)
        except ImportError as err:  # one family's missing optional dependency must not hide the others
            logger.warning("backbone family %s unavailable: %s", family, err)
            continue
        if class_name in cls.pipeline_class_names:
            return cls
        supported.extend(cls.pipeline_class_names)
    raise ValueError(
        f"longgen has no backbone adapter for diffusers pipeline class {class_name!r}. "
        f"Supported pipeline classes: {', '.join(supported)}."
    )


def load_adapter(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, **kwargs) -> BackboneAdapter:
    """Load a local diffusers pipeline folder and wrap it in the adapter its ``model_index.json`` names."""
    index = read_model_index(os.fspath(path))
    cls = adapter_class_for_pipeline(index.get("_class_name", "<missing _class_name>"))
    _check_components(os.fspath(path), index, given=kwargs)
    try:
        return cls.from_pretrained(path, torch_dtype=torch_dtype, **kwargs)
    except (OSError, RuntimeError) as err:  # diffusers' "no file named ...", safetensors' "Error while deserializing"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(
            f"the model folder {os.fspath(path)} could not be loaded ({first}): a file in it is missing or damaged "
            "(a truncated weights file, a deleted config.json); copy the pipeline folder again, or re-save it with "
            "save_pretrained"
        ) from err


def _check_components(path: str, index: dict, given: dict) -> None:
    """Every component ``model_index.json`` lists (and the caller does not pass) has its subfolder, and a model
    subfolder its ``config.json``; diffusers' own error for a missing ``vae/`` names the pipeline folder instead."""
    problems = []
    for name, spec in index.items():
        if name.startswith("_") or name in given or not isinstance(spec, (list, tuple)) or None in spec:
            continue
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            problems.append(f"{name}/ is missing")
        elif spec[0] == "diffusers" and not os.path.isfile(os.path.join(sub, "config.json")) and not any(
            f.endswith("_config.json") for f in os.listdir(sub)
        ):
            problems.append(f"{name}/config.json is missing")
    if problems:
        raise ValueError(
            f"the model folder {path} is incomplete: {'; '.join(problems)} (listed in model_index.json"
            "); copy the whole pipeline folder, or re-save it with save_pretrained"
        )


def build_tiny(family: str, seed: int = 0) -> BackboneAdapter:
    """A tiny randomly initialised adapter of a family (CPU tests and the demo; no downloads)."""
    cls = get_adapter_class(family)
    return cls(cls.tiny_pipeline(seed=seed), native_video_size=cls.tiny_video_size)


__all__ = [
    "CAPABILITIES",
    "FAMILIES",
    "BackboneAdapter",
    "CausalBlockMask",
    "Cond",
    "ExVideoSites",
    "FrameAttention",
    "FrameLayout",
    "ImageConditioning",
    "MixtureOfExperts",
    "TemporalRope",
    "TemporalRopeFrequencies",
    "TemporalRopeScale",
    "WindowAttention",
    "denoiser_models",
    "families_with",
    "adapter_class_for_pipeline",
    "build_tiny",
    "cat_conds",
    "get_adapter_class",
    "load_adapter",
    "read_model_index",
    "repeat_cond",
]
