"""The extension registry: every extension is ``apply(adapter, config) -> state`` plus ``remove(adapter)``, registered once.

The pipeline (``LongVideoPipeline.apply_extension``), the CLI (``--extension`` and its option flags), training
(which extension, its trainable parameters) and checkpoint metadata (``longgen_extension.json``) read this
registry, so a new extension is one module with a config dataclass and one :func:`register_extension` call.

Adding a built-in extension: write ``longgen/extend/<name>.py`` with ``apply_<name>(adapter, ...)``,
``remove_<name>``; put its frozen config dataclass (field ``metadata={"help": ...}``; a ``target_latent_frames``
field if it extends positions) in the torch-free :mod:`longgen.extend.configs`, and one
``register_extension(ExtensionSpec(...))`` with ``"longgen.extend.<name>:function"`` strings in
:mod:`longgen.extend.builtin` (so the CLI parser imports no torch); add its tests. Third-party code registers
an ``ExtensionSpec`` with real callables. The pipeline, the CLI flags (``--<name>-<field>``),
the metadata round trip and the training config read the registry. If it needs something of the model, read
it through a capability type of :mod:`longgen.backbones.capabilities` (``isinstance``), never a family name.
"""

from __future__ import annotations

import dataclasses
import importlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ExtensionHandle",
    "ExtensionSpec",
    "LazyFunction",
    "apply_extension",
    "extension_from_metadata",
    "extension_names",
    "extension_option_fields",
    "get_extension",
    "register_extension",
]

TARGET_FIELDS = ("target_latent_frames", "train_latent_frames")
"""Config fields set from the clip lengths (``--target-frames``, the native clip), not from option flags."""


@dataclass(frozen=True)
class ExtensionSpec:
    """One registered extension.

    * ``config_cls``: a dataclass of the extension's options (field ``metadata={"help": ...}`` becomes the CLI
      help); ``target_latent_frames`` is its first field when ``needs_target_frames``;
    * ``apply(adapter, config)`` applies it and returns its state (anything; ``describe()`` of it, if it has
      one, goes into the handle's description); ``remove(adapter)`` restores the stock model;
    * ``sets_window``: windowed samplers default to windows of the target (RoPE, ExVideo);
    * ``trainable_parameters(adapter)``: the parameters post-tuning trains (ExVideo), None for "the model's";
    * ``training_options``: config values training applies it with (ExVideo ``set_trainable``, RIFLEx
      ``finetune``); they are stored in the checkpoint metadata, so inference reapplies the trained form.

    ``apply``, ``remove`` and ``trainable_parameters`` may also be ``"module:function"`` strings, imported on
    first call (the built-ins do this, :mod:`longgen.extend.builtin`, so the CLI parser needs no torch); the
    spec holds them as callables either way.
    """

    name: str
    config_cls: type
    apply: Callable[[Any, Any], Any] | str
    remove: Callable[[Any], Any] | str
    description: str
    needs_target_frames: bool = False
    sets_window: bool = False
    trainable_parameters: Callable[[Any], list] | str | None = None
    training_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in ("apply", "remove", "trainable_parameters"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, LazyFunction(value))
            elif value is not None and not callable(value):
                raise TypeError(f"extension {self.name!r}: {name} must be callable or 'module:function', got {value!r}")


class LazyFunction:
    """A ``"module:function"`` reference that imports the function on its first call (torch-free until then)."""

    def __init__(self, target: str):
        module, sep, attr = target.partition(":")
        if not (module and sep and attr):
            raise ValueError(f"a lazy function is named 'module:function', got {target!r}")
        self.target = target
        self._fn: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        """The function itself (imported now if not yet)."""
        if self._fn is None:
            module, _, attr = self.target.partition(":")
            self._fn = getattr(importlib.import_module(module), attr)
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LazyFunction) and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)

    def __repr__(self) -> str:
        return f"LazyFunction({self.target!r})"


_REGISTRY: dict[str, ExtensionSpec] = {}


def register_extension(spec: ExtensionSpec) -> ExtensionSpec:
    """Add an extension to the registry (its name must be new)."""
    if not dataclasses.is_dataclass(spec.config_cls):
        raise TypeError(f"extension {spec.name!r}: config_cls must be a dataclass, got {spec.config_cls!r}")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"an extension named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    importlib.import_module("longgen.extend.builtin")  # registers the built-in extensions (torch-free)


def extension_names() -> list[str]:
    """Registered extension names, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def get_extension(name: str) -> ExtensionSpec:
    """The spec of a registered extension; a ValueError listing the names for an unknown one."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown extension {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def extension_option_fields(name: str) -> list[dataclasses.Field]:
    """The config fields of an extension a user sets as options (the clip-length fields excluded)."""
    return [f for f in dataclasses.fields(get_extension(name).config_cls) if f.name not in TARGET_FIELDS]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # tensors
        return value.tolist()
    return repr(value)


class ExtensionHandle:
    """An applied extension: ``remove()`` restores the stock model, ``describe()`` is JSON for metadata."""

    def __init__(self, spec: ExtensionSpec, adapter: Any, config: Any, state: Any):
        self.spec = spec
        self.config = config
        self.state = state
        self._adapter = weakref.ref(adapter)
        self.removed = False

    @property
    def name(self) -> str:
        return self.spec.name

    def remove(self) -> None:
        """Undo the extension (a second call does nothing)."""
        adapter = self._adapter()
        if adapter is not None and not self.removed:
            self.spec.remove(adapter)
        self.removed = True

    def trainable_parameters(self) -> list | None:
        """What post-tuning trains for this extension; None: the extension adds nothing to train."""
        fn = self.spec.trainable_parameters
        adapter = self._adapter()
        return None if fn is None or adapter is None else fn(adapter)

    def describe(self) -> dict[str, Any]:
        """``{"method", "options", "details"}``: ``options`` rebuild it (:func:`extension_from_metadata`),
        ``details`` is what it resolved (RIFLEx's k, the installed frequencies, the window defaults)."""
        options = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        describe = getattr(self.state, "describe", None)  # extension-specific state, not an adapter
        details = describe() if callable(describe) else self.state
        return {"method": self.name, "options": _jsonable(options), "details": _jsonable(details)}

    def __enter__(self) -> ExtensionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"ExtensionHandle({self.name!r}, {self.config!r})"


def make_config(name: str, options: Any = None, **overrides: Any) -> Any:
    """The config of extension ``name`` from a config instance, a dict of options, or keywords; unknown option
    names are a ValueError listing the accepted ones."""
    spec = get_extension(name)
    if isinstance(options, spec.config_cls):
        return dataclasses.replace(options, **overrides) if overrides else options
    values = {**dict(options or {}), **overrides}
    accepted = [f.name for f in dataclasses.fields(spec.config_cls)]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(f"extension {name!r} takes no option(s) {unknown}; it takes: {', '.join(accepted)}")
    missing = [
        f.name
        for f in dataclasses.fields(spec.config_cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        flag = " (--target-frames)" if "target_latent_frames" in missing else ""
        raise ValueError(f"extension {name!r} needs {', '.join(missing)}{flag}")
    return spec.config_cls(**values)


def apply_extension(
    adapter: Any, name: str, config: Any = None, *, training: bool = False, **options: Any
) -> ExtensionHandle:
    """Apply a registered extension to an adapter; ``config`` is its config dataclass or a dict of options.

    ``training=True`` applies it as post-tuning does (the spec's ``training_options`` over the options)."""
    spec = get_extension(name)
    if training:
        options = {**options, **dict(spec.training_options)}
    cfg = make_config(name, config, **options)
    state = spec.apply(adapter, cfg)
    return ExtensionHandle(spec, adapter, cfg, state)


def extension_from_metadata(adapter: Any, metadata: dict[str, Any]) -> ExtensionHandle:
    """Reapply an extension from ``ExtensionHandle.describe()`` (what ``longgen_extension.json`` stores), so
    inference runs the extension a checkpoint was trained with. Top-level config fields (the trainer's
    ``train_latent_frames`` / ``target_latent_frames``) count as options too."""
    if "method" not in metadata:
        raise ValueError(f"extension metadata names no 'method': {sorted(metadata)}")
    name = metadata["method"]
    fields = {f.name for f in dataclasses.fields(get_extension(name).config_cls)}
    options = {k: v for k, v in metadata.items() if k in fields}
    options.update(metadata.get("options") or {})
    return apply_extension(adapter, name, options)
