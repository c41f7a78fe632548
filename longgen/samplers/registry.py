"""The sampler registry: every long sampler declares itself once, as a :class:`SamplerSpec`.

A spec names the sampler's function, its typed knob dataclass (names, defaults, help, validation), how
many model steps it takes and whether it streams frames. The pipeline, the ``longgen generate`` flags
and ``--help``, YAML configs, the demo and the benchmarks all read this registry, so no code outside
``longgen/samplers/`` branches on a sampler's name. This module imports no torch (the CLI builds its
parser from it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

INTERNAL_ARGUMENTS = frozenset(
    {"denoise", "noise", "sigmas", "callback", "disable", "on_frames", "return_latents", "generator",
     "num_latent_frames", "init_clip", "cache", "prompt_switches", "conditioning"}
)
"""Sampler-function arguments the pipeline passes itself; they are never knobs."""


@dataclass(frozen=True)
class SamplerContext:
    """What a spec's hooks may read about the generation: no model object, only numbers.

    ``default_window``: the window of windowed samplers in latent frames (the model's native length, or an
    extension's target), already capped at ``num_latent_frames``. ``requested_steps``: ``--steps`` (None
    when not given); ``default_steps``: the adapter's default. ``fixed_causal_blocks``: the model's
    block-causal attention needs every model call to hold whole causal blocks (SkyReels-V2).
    ``num_pixel_frames`` maps latent frames to pixel frames (for error messages naming ``--num-frames``).
    """

    default_window: int
    num_latent_frames: int
    requested_steps: int | None = None
    default_steps: int = 30
    fixed_causal_blocks: bool = False
    num_pixel_frames: Callable[[int], int] = lambda n: n


def _default_resolve(knobs: Any, ctx: SamplerContext) -> Any:
    return knobs


def _default_num_steps(knobs: Any, ctx: SamplerContext) -> int:
    return ctx.requested_steps if ctx.requested_steps is not None else ctx.default_steps


@dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler.

    * ``name``: the ``--sampler`` value; ``description``: one line for ``--help``.
    * ``fn``: the sampler function ``fn(denoise, noise, sigmas, **knobs)``, or ``"module:attr"`` imported
      on first use (built-ins do this so the CLI parser needs no torch).
    * ``knobs``: a dataclass type; each field is one knob (and one ``--knob-name`` flag), its help in
      ``field(metadata={"help": ...})``; a ``None`` default means "derived from the model" (filled by
      ``resolve``); ``__post_init__`` validates, naming the flag.
    * ``streams``: ``fn`` takes ``on_frames`` / ``return_latents`` / ``generator`` and hands finished
      latent frames out while it runs (constant memory in clip length).
    * ``resolve(knobs, ctx) -> knobs``: fill model-derived defaults (return a new dataclass instance).
    * ``num_steps(knobs, ctx) -> int``: model steps the sampler takes (default: ``--steps`` or the model's).
    * ``fit_steps(num_steps, ctx) -> dict``: for samplers whose step count is set by knobs (fifo), the knob
      options that come closest to a budget of ``num_steps`` (see :func:`options_for_steps`).
    * ``hooks(adapter, knobs: dict)``: a context manager the pipeline runs ``fn`` under, for samplers that
      need hooks on the model while they run (causal: block-causal attention + KV cache); it yields a dict of
      extra keyword arguments for ``fn`` (``{"cache": ...}``) and removes its hooks on exit. ``"module:attr"``
      strings are imported on first use.
    """

    name: str
    fn: Callable[..., Any] | str
    knobs: type
    description: str = ""
    streams: bool = False
    resamples: bool = False
    """``fn`` runs RePaint's resampling (``conditioning.resample`` steps, ``--resample-steps``) around given frames."""
    resolve: Callable[[Any, SamplerContext], Any] = _default_resolve
    num_steps: Callable[[Any, SamplerContext], int] = _default_num_steps
    fit_steps: Callable[[int, SamplerContext], dict[str, Any]] | None = None
    hooks: Callable[[Any, dict[str, Any]], Any] | str | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a sampler name must be a non-empty string, got {self.name!r}")
        if not dataclasses.is_dataclass(self.knobs) or not isinstance(self.knobs, type):
            raise TypeError(f"sampler {self.name!r}: knobs must be a dataclass type, got {self.knobs!r}")
        clash = sorted(f.name for f in dataclasses.fields(self.knobs) if f.name in INTERNAL_ARGUMENTS)
        if clash:
            raise ValueError(f"sampler {self.name!r}: knob names {clash} are reserved for the pipeline")

    def function(self) -> Callable[..., Any]:
        """The sampler function (imported now when ``fn`` is a ``"module:attr"`` string)."""
        return _resolve(self.fn)

    def model_hooks(self, adapter: Any, knobs: dict[str, Any]):
        """The context manager of ``hooks`` (one that yields ``{}`` for samplers without model hooks)."""
        if self.hooks is None:
            return contextlib.nullcontext({})
        return _resolve(self.hooks)(adapter, knobs)

    def knob_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.knobs)]

    def make_knobs(self, options: Mapping[str, Any] | None) -> Any:
        """The knob dataclass from ``options`` (None values = not given); unknown names are a clear error."""
        given = {k: v for k, v in dict(options or {}).items() if v is not None}
        names = self.knob_names()
        unknown = sorted(set(given) - set(names))
        if unknown:
            flags = ", ".join("--" + n.replace("_", "-") for n in names) or "none"
            raise ValueError(
                f"sampler {self.name!r} takes no option(s) {unknown}; it takes {names} (flags: {flags})"
            )
        return self.knobs(**{k: _coerce(self.name, k, _field_type(self.knobs, k), v) for k, v in given.items()})


def _coerce(sampler: str, name: str, kind: Any, value: Any) -> Any:
    """A knob value as its field's type (bool / int / float; a YAML or CLI string too), or a ValueError naming the
    knob: a wrong type used to fail deep inside the sampler, and any string ran as True for a bool knob."""
    import math
    import numbers

    where = f"sampler {sampler!r}: {name}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        from ..configfile import BOOL_WORDS

        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        raise ValueError(f"{where} is true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"{where} is an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"{where} is an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} is a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} is a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return number
    return value


def _resolve(target: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, SamplerSpec] = {}


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add a sampler to the registry (``--sampler NAME`` everywhere); a taken name is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(
            f"a sampler named {spec.name!r} is already registered; pick another name or unregister_sampler() it"
        )
    for other in _REGISTRY.values():  # a knob shared by name (one CLI flag) must have one type
        theirs = set(other.knob_names())
        for f in dataclasses.fields(spec.knobs):
            if f.name in theirs and _field_type(other.knobs, f.name) != _field_type(spec.knobs, f.name):
                raise ValueError(
                    f"sampler {spec.name!r}: knob {f.name!r} has a different type than in sampler {other.name!r} "
                    "(both map to one --flag); rename it"
                )
    _REGISTRY[spec.name] = spec
    return spec


def unregister_sampler(name: str) -> None:
    """Remove a sampler (tests and plugins that re-register)."""
    _REGISTRY.pop(name, None)


def get_sampler(name: str) -> SamplerSpec:
    """The spec of a registered sampler; an unknown name is an error listing the choices."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown sampler {name!r}{hint}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def sampler_names() -> tuple[str, ...]:
    """Registered sampler names, in registration order."""
    return tuple(_REGISTRY)


def options_for_steps(name: str, num_steps: int, ctx: SamplerContext) -> tuple[dict[str, Any], int | None]:
    """(knob options, steps to request) that give sampler ``name`` about ``num_steps`` model steps.

    Most samplers take ``num_steps`` as asked (``({}, num_steps)``); one whose step count follows from its
    knobs gets the knobs from its ``fit_steps`` and no step request. Lets comparisons (demo, benchmarks)
    give every sampler the same budget without naming any.
    """
    spec = get_sampler(name)
    if spec.fit_steps is None:
        return {}, num_steps
    return dict(spec.fit_steps(num_steps, ctx)), None


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """Knob options as ``longgen generate`` flags: ``{"num_partitions": 2}`` -> ``["--num-partitions", "2"]``."""
    flags: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


@dataclass(frozen=True)
class KnobInfo:
    """One knob across samplers: what the CLI turns into one ``--name`` flag."""

    name: str
    type: type
    choices: tuple[Any, ...] | None
    help: str
    samplers: tuple[str, ...] = field(default=())


def all_knobs() -> list[KnobInfo]:
    """Every knob of every registered sampler, merged by name (first registration's help and type)."""
    merged: dict[str, KnobInfo] = {}
    for spec in _REGISTRY.values():
        for f in dataclasses.fields(spec.knobs):
            if f.name in merged:
                info = merged[f.name]
                merged[f.name] = dataclasses.replace(info, samplers=(*info.samplers, spec.name))
                continue
            base, choices = _field_type(spec.knobs, f.name), None
            if typing.get_origin(base) is typing.Literal:
                choices = typing.get_args(base)
                base = type(choices[0])
            default = None if f.default is dataclasses.MISSING else f.default
            text = f.metadata.get("help", "")
            if default is not None and "default" not in text:
                text += f" (default {default})"
            merged[f.name] = KnobInfo(f.name, base, choices, text, (spec.name,))
    return list(merged.values())


def _field_type(owner: type, name: str) -> Any:
    """A knob field's type with ``| None`` stripped (string annotations resolved)."""
    annotation = typing.get_type_hints(owner)[name]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
