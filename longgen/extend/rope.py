"""Temporal RoPE extension for 3D-RoPE video DiTs: PI, NTK-aware scaling, YaRN and RIFLEx.

A video DiT trained on clips of ``L`` latent frames has only seen temporal RoPE angles ``p * theta_j``
for positions ``p < L``. To sample ``L' = s * L`` frames in one window, these methods change the temporal
frequencies ``theta_j = b^(-2j/d)`` (``d`` temporal channels per head, base ``b``) and nothing else:

* **PI** (Chen et al. 2023, "Extending Context Window of Large Language Models via Positional
  Interpolation"): positions scaled by ``L / L'``, i.e. ``theta_j' = theta_j / s`` (diffusers'
  ``get_1d_rotary_pos_embed(linear_factor=s)``).
* **NTK-aware** (bloc97 2023, "NTK-Aware Scaled RoPE"): base ``b' = b * s^(d / (d - 2))``
  (``ntk_factor``): the highest frequency is kept, the lowest is interpolated by exactly ``s``.
* **YaRN** (Peng et al. 2024, "YaRN: Efficient Context Window Extension of Large Language Models",
  Sec. 3.2-3.4): per frequency, ``r_j = L / lambda_j`` turns over the native clip (``lambda_j = 2 pi /
  theta_j``), ramp ``gamma_j = clip((r_j - beta_slow) / (beta_fast - beta_slow), 0, 1)`` and
  ``theta_j' = (1 - gamma_j) theta_j / s + gamma_j theta_j`` (extrapolate components that turned often,
  interpolate those that did not complete a turn), plus the attention temperature
  ``1 / t = (0.1 ln s + 1)^2`` multiplying every query-key logit.
* **RIFLEx** (Zhao et al. 2025, "RIFLEx: A Free Lunch for Length Extrapolation in Video Diffusion
  Transformers", Eq. 4-8; thu-ml/RIFLEx ``riflex_utils.py``): find the intrinsic component ``k`` (1-based)
  whose period ``N_k = round(2 pi / theta_k)`` sets where a video starts to repeat, and lower only it,
  ``theta_k' = 0.9 * 2 pi / L'``, so the whole clip stays within 90% of one period. Training-free, this
  happens only when the target outgrows that period, ``L' > N_k`` (below it component k never wraps and
  the stock RoPE runs), as the official scripts do (``if L_test > N_k or finetune``); ``finetune=True``
  (a model post-tuned with RIFLEx) always lowers it.

The model-specific part (where the frequencies live: Wan's precomputed tables, HunyuanVideo's RoPE
module, CogVideoX's ``temporal_inv_freq``, LTX's fractional coordinates) is each backbone adapter's
``temporal_rope_frequencies`` / ``set_temporal_rope_frequencies`` (LTX: ``set_temporal_position_scale``);
this module only computes frequencies, installs them through the adapter and hooks the attention
temperature. Every change is removable and ``remove_rope_extension`` restores the model bit for bit; at
``target == train`` every method is the identity.

Lengths: ``train_latent_frames`` / ``target_latent_frames`` count latent frames; RoPE positions are
token frames, ``ceil(latent_frames / patch_size_t)`` (they differ only for CogVideoX 1.5), and the scale
is ``s = target_positions / train_positions``, at least 1 (a shorter clip runs the stock model).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..backbones.capabilities import TemporalRope, TemporalRopeScale
from .configs import (
    ROPE_METHODS,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    RiflexConfig,
    RopeExtensionConfig,
    YarnConfig,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ROPE_METHODS",
    "YARN_BETA_FAST",
    "YARN_BETA_SLOW",
    "RiflexConfig",
    "RopeExtension",
    "RopeExtensionConfig",
    "YarnConfig",
    "apply_rope_extension",
    "extension_from_args",
    "get_rope_extension",
    "ntk_base",
    "ntk_frequencies",
    "pi_frequencies",
    "print_rope_info",
    "remove_rope_extension",
    "riflex_frequencies",
    "riflex_intrinsic_frequency",
    "riflex_periods",
    "rope_frequencies",
    "temporal_rope_info",
    "yarn_attention_temperature",
    "yarn_frequencies",
    "yarn_ramp",
]

YARN_TEMPERATURE_HOOK = "longgen_rope_yarn_temperature"
"""Name of the hooks that scale attention queries by YaRN's temperature."""

_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "pi": (),
    "ntk": (),
    "yarn": ("beta_fast", "beta_slow", "attention_temperature"),
    "riflex": ("k", "repetition_frame", "finetune"),
}


# ----------------------------------------------------------------------------------------------------
# Frequencies: the papers' equations (float64, pure functions)
# ----------------------------------------------------------------------------------------------------
def rope_frequencies(dim: int, base: float) -> torch.Tensor:
    """RoPE frequencies ``theta_j = base^(-2j / dim)``, ``j = 0 .. dim/2 - 1`` (Su et al. 2021), float64."""
    if dim < 2 or dim % 2:
        raise ValueError(f"a RoPE axis needs an even number of channels >= 2, got {dim}")
    return 1.0 / (float(base) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def pi_frequencies(frequencies: torch.Tensor, scale: float) -> torch.Tensor:
    """Positional interpolation (Chen et al. 2023): positions times ``1 / s`` is ``theta_j / s``."""
    return frequencies.double() / float(scale)


def ntk_base(base: float, scale: float, dim: int) -> float:
    """NTK-aware base (bloc97 2023): ``b' = b * s^(d / (d - 2))`` for ``d`` channels."""
    if dim <= 2:
        raise ValueError(f"NTK-aware scaling needs more than 2 channels on the axis (d / (d - 2)), got {dim}")
    return float(base) * float(scale) ** (dim / (dim - 2))


def ntk_frequencies(frequencies: torch.Tensor, scale: float) -> torch.Tensor:
    """NTK-aware scaling (bloc97 2023) of ``theta_j = b^(-2j/d)``:
    ``(b s^(d/(d-2)))^(-2j/d) = theta_j * s^(-2j / (d - 2))``.

    Written as a factor on the given frequencies so that ``s = 1`` returns them unchanged, bit for bit.
    """
    dim = 2 * frequencies.numel()
    if dim <= 2:
        raise ValueError(f"NTK-aware scaling needs more than 2 channels on the axis (d / (d - 2)), got {dim}")
    j = torch.arange(frequencies.numel(), dtype=torch.float64)
    return frequencies.double() * float(scale) ** (-2.0 * j / (dim - 2))


def yarn_ramp(
    frequencies: torch.Tensor,
    train_positions: int,
    beta_fast: float = YARN_BETA_FAST,
    beta_slow: float = YARN_BETA_SLOW,
) -> torch.Tensor:
    """YaRN's ramp (Peng et al. 2024, Eq. 18): ``gamma(r_j) = clip((r_j - alpha) / (beta - alpha), 0, 1)``
    with ``r_j = L / lambda_j = L * theta_j / (2 pi)`` turns of component j over the native clip.

    1 keeps a frequency (extrapolation), 0 interpolates it. (transformers' ``_compute_yarn_parameters``
    ramps linearly in the channel index between the same two turn counts instead.)
    """
    if not beta_fast > beta_slow:
        raise ValueError(
            f"YaRN needs beta_fast > beta_slow, got beta_fast={beta_fast}, beta_slow={beta_slow}"
        )
    turns = train_positions * frequencies.double() / (2 * math.pi)
    return ((turns - beta_slow) / (beta_fast - beta_slow)).clamp(0.0, 1.0)


def yarn_frequencies(
    frequencies: torch.Tensor,
    scale: float,
    train_positions: int,
    beta_fast: float = YARN_BETA_FAST,
    beta_slow: float = YARN_BETA_SLOW,
) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies (Peng et al. 2024, Eq. 19): ``(1 - gamma) theta / s + gamma theta``.

    Computed as ``theta / s + gamma (theta - theta / s)``, which is exactly ``theta`` at ``s = 1``.
    """
    theta = frequencies.double()
    gamma = yarn_ramp(theta, train_positions, beta_fast, beta_slow)
    interpolated = theta / float(scale)
    return interpolated + gamma * (theta - interpolated)


def yarn_attention_temperature(scale: float) -> float:
    """YaRN's logit multiplier ``1 / t = (0.1 ln s + 1)^2`` (Peng et al. 2024, Eq. 22); 1 for ``s <= 1``."""
    return (0.1 * math.log(scale) + 1.0) ** 2 if scale > 1 else 1.0


def riflex_periods(temporal_dim: int, base: float) -> list[int]:
    """RIFLEx Eq. 4: ``N_j = round(2 pi / theta_j)``, ``theta_j = b^(-2(j-1)/d)``, for ``j = 1 .. d/2``."""
    return [round(2 * math.pi / float(theta)) for theta in rope_frequencies(temporal_dim, base)]


def riflex_intrinsic_frequency(
    temporal_dim: int,
    base: float,
    repetition_frame: int | None = None,
    train_latent_frames: int | None = None,
) -> tuple[int, int]:
    """RIFLEx's intrinsic frequency component (Zhao et al. 2025, Eq. 7): ``(k, N_k)``, ``k`` 1-based.

    With ``repetition_frame`` N (the latent frame where extrapolated videos first repeat, observed on the
    model): the component whose period is closest to N, the first one on ties (``identify_k`` in
    thu-ml/RIFLEx's ``riflex_utils.py``). Without it, from the native length L: the first component whose
    period is at least L, i.e. the fastest one that never completed a turn during training, whose
    wrap-around is what makes longer videos repeat. Both rules give HunyuanVideo (b=256, d=16; L=33 or
    N=48) k=4, N_k=50 and CogVideoX-5B (b=10000, d=16; L=13) k=2, N_k=20.
    """
    periods = riflex_periods(temporal_dim, base)
    if repetition_frame is not None:
        if repetition_frame < 1:
            raise ValueError(
                f"repetition_frame must be a positive latent frame index, got {repetition_frame}"
            )
        diffs = [abs(n - repetition_frame) for n in periods]
        k = diffs.index(min(diffs)) + 1
    elif train_latent_frames is not None:
        if train_latent_frames < 1:
            raise ValueError(f"train_latent_frames must be positive, got {train_latent_frames}")
        longer = [j for j, n in enumerate(periods, start=1) if n >= train_latent_frames]
        if not longer:
            raise ValueError(
                f"every temporal RoPE period ({periods}) is shorter than {train_latent_frames} frames; "
                "pass repetition_frame= or k= explicitly"
            )
        k = longer[0]
    else:
        raise ValueError("riflex_intrinsic_frequency needs repetition_frame or train_latent_frames")
    return k, periods[k - 1]


def riflex_frequencies(frequencies: torch.Tensor, k: int, target_positions: int) -> torch.Tensor:
    """RIFLEx Eq. 8 with the paper's 0.9 margin: ``theta_k' = 0.9 * 2 pi / L'`` (``k`` 1-based), rest kept."""
    if not 1 <= k <= frequencies.numel():
        raise ValueError(f"RIFLEx component k must be in 1..{frequencies.numel()} (1-based), got {k}")
    out = frequencies.double().clone()
    out[k - 1] = 0.9 * 2 * math.pi / target_positions
    return out


# ----------------------------------------------------------------------------------------------------
# Applying to a model
# ----------------------------------------------------------------------------------------------------
class _QueryScaleHook(ModelHook):
    """Multiplies a query projection's output by a constant: every logit ``q . k`` is scaled by it."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def post_forward(self, module, output):
        return output * self.factor


def _query_modules(attn: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The last module on each query path of a diffusers attention layer: ``norm_q`` (else ``to_q``) for
    the main tokens and ``norm_added_q`` (else ``add_q_proj``) for joint-attention text tokens. Scaling
    after the q-norm matters: an RMS/LayerNorm would undo a scale applied before it."""
    modules = []
    for proj, norm in (("to_q", "norm_q"), ("add_q_proj", "norm_added_q")):
        norm_module, proj_module = getattr(attn, norm, None), getattr(attn, proj, None)
        if norm_module is not None:
            modules.append(norm_module)
        elif proj_module is not None:
            if getattr(attn, "fused_projections", False):
                raise ValueError(
                    f"{name}: fused QKV projections without a q-norm leave no query module to scale for "
                    "YaRN's attention temperature; call unfuse_qkv_projections() first"
                )
            modules.append(proj_module)
        elif proj == "to_q":
            raise ValueError(
                f"{name} ({type(attn).__name__}) has no to_q / norm_q to apply YaRN's temperature to"
            )
    return modules


@dataclass
class RopeExtension:
    """A temporal RoPE extension applied to one adapter (the handle ``apply_rope_extension`` returns).

    ``frequencies`` are the installed temporal frequencies (rad per temporal position, float64) and
    ``stock_frequencies`` the model's own; LTX (positional interpolation through its coordinate scale)
    has neither. ``intrinsic_component`` is RIFLEx's ``(k, N_k)``.
    """

    method: str
    family: str
    train_latent_frames: int
    target_latent_frames: int
    train_positions: int
    target_positions: int
    scale: float
    stock_frequencies: torch.Tensor | None = None
    frequencies: torch.Tensor | None = None
    attention_temperature: float = 1.0
    intrinsic_component: tuple[int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    _adapter_ref: Any = field(default=None, repr=False)
    _hooked_modules: list[torch.nn.Module] = field(default_factory=list, repr=False)
    _previous_position_scale: float | None = field(default=None, repr=False)

    def remove(self) -> bool:
        """Undo this extension (see :func:`remove_rope_extension`)."""
        adapter = self._adapter_ref() if self._adapter_ref is not None else None
        return False if adapter is None else remove_rope_extension(adapter)

    def __enter__(self) -> RopeExtension:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (frequencies and periods as lists)."""
        out: dict[str, Any] = {
            "method": self.method,
            "train_latent_frames": self.train_latent_frames,
            "target_latent_frames": self.target_latent_frames,
            "scale": self.scale,
            "attention_temperature": self.attention_temperature,
            **self.options,
        }
        if self.intrinsic_component is not None:
            out["riflex_k"], out["riflex_N_k"] = self.intrinsic_component
        if self.frequencies is not None:
            out["frequencies"] = [float(v) for v in self.frequencies]
            out["periods"] = [2 * math.pi / float(v) for v in self.frequencies]
        return out


# rope module -> the extension applied through it (one per model; keyed on the module so that two adapters
# wrapping one model cannot stack extensions on it by accident)
_APPLIED: weakref.WeakKeyDictionary[torch.nn.Module, RopeExtension] = weakref.WeakKeyDictionary()


def _supported_families() -> str:
    """``family (methods)`` of every registered backbone that declares temporal RoPE (:class:`TemporalRope`)."""
    from ..backbones import families_with, get_adapter_class

    parts = []
    for family in families_with(TemporalRope):
        methods = get_adapter_class(family).rope_extension_methods
        if methods:
            parts.append(
                family if tuple(methods) == ROPE_METHODS else f"{family} ({', '.join(methods)} only)"
            )
    return ", ".join(parts)


def _check_supported(adapter, method: str | None = None) -> tuple[str, ...]:
    """The adapter's RoPE extension methods; a ValueError naming the supported backbones if it has none."""
    family = adapter.family
    methods = tuple(adapter.rope_extension_methods) if isinstance(adapter, TemporalRope) else ()
    if not methods or adapter.rope_module() is None:
        if methods:  # e.g. CogVideoX-2b: the family has RoPE, this checkpoint does not
            adapter.require_rope()
        raise ValueError(
            f"RoPE extension needs a video DiT with rotary position embeddings on the time axis; {family} "
            f"({type(adapter.model).__name__}) has none. Backbones that support it: {_supported_families()}. "
            "For UNet video models use window fusion (FreeNoise), SpectralBlend (FreeLong) or ExVideo."
        )
    if method is not None and method not in methods:
        if methods == ("pi",):
            raise ValueError(
                f"RoPE extension method {method!r} is not supported for {family}: its RoPE takes fractional "
                "coordinates (frame index / frame_rate), not integer positions with a base; use method='pi', "
                "which rescales those coordinates."
            )
        raise ValueError(
            f"RoPE extension method {method!r} is not supported for {family}; it supports {methods}"
        )
    return methods


def _positions(adapter, latent_frames: int) -> int:
    """Temporal RoPE positions (token frames) of ``latent_frames``: ``ceil(latent_frames / patch_size_t)``."""
    p_t = int(adapter.patch_size[0])
    return -(-int(latent_frames) // p_t)


def _native_latent_frames(adapter) -> int:
    return int(adapter.num_latent_frames(adapter.native_video_size[0]))


def get_rope_extension(adapter) -> RopeExtension | None:
    """The RoPE extension currently applied to the adapter's model, or None."""
    rope = adapter.rope_module() if isinstance(adapter, TemporalRope) else None
    return None if rope is None else _APPLIED.get(rope)


def apply_rope_extension(
    adapter,
    method: str,
    train_latent_frames: int | None,
    target_latent_frames: int,
    **method_kwargs: Any,
) -> RopeExtension:
    """Extend the adapter's model from ``train_latent_frames`` to ``target_latent_frames`` on the time axis.

    ``method``: ``pi`` | ``ntk`` | ``yarn`` | ``riflex`` (see the module docstring for the equations).
    ``train_latent_frames`` None means the adapter's native clip. Options: YaRN ``beta_fast`` (default
    :data:`YARN_BETA_FAST`), ``beta_slow`` (:data:`YARN_BETA_SLOW`), ``attention_temperature`` (logit
    multiplier; default ``(0.1 ln s + 1)^2``); RIFLEx ``k`` (1-based component, default identified) and
    ``repetition_frame`` (identify k as the period closest to it) and ``finetune`` (change RoPE even when
    the target fits the intrinsic period ``N_k``; training-free RIFLEx leaves it stock there). Returns a handle; undo with
    :func:`remove_rope_extension` (or ``handle.remove()``, or use the handle as a context manager).
    Apply it before ``LongVideoPipeline.generate``; it acts on every later ``denoise`` call.
    """
    if method not in ROPE_METHODS:
        raise ValueError(
            f"unknown RoPE extension method {method!r}; choose one of: {', '.join(ROPE_METHODS)}"
        )
    _check_supported(adapter, method)
    unknown = sorted(set(method_kwargs) - set(_METHOD_OPTIONS[method]))
    if unknown:
        accepted = ", ".join(_METHOD_OPTIONS[method]) or "none"
        raise ValueError(f"RoPE extension {method!r} takes no option(s) {unknown}; it takes: {accepted}")
    rope = adapter.rope_module()
    if rope in _APPLIED:
        raise ValueError(
            f"a RoPE extension ({_APPLIED[rope].method}) is already applied to this {adapter.family} model; "
            "call remove_rope_extension(adapter) first"
        )
    if train_latent_frames is None:
        train_latent_frames = _native_latent_frames(adapter)
    for name, value in (
        ("train_latent_frames", train_latent_frames),
        ("target_latent_frames", target_latent_frames),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive number of latent frames, got {value!r}")
    train_positions, target_positions = (
        _positions(adapter, train_latent_frames),
        _positions(adapter, target_latent_frames),
    )
    scale = max(1.0, target_positions / train_positions)
    handle = RopeExtension(
        method=method,
        family=adapter.family,
        train_latent_frames=int(train_latent_frames),
        target_latent_frames=int(target_latent_frames),
        train_positions=train_positions,
        target_positions=target_positions,
        scale=scale,
        options=dict(method_kwargs),
        _adapter_ref=weakref.ref(adapter),
    )
    _APPLIED[rope] = handle
    try:
        if isinstance(adapter, TemporalRopeScale):  # LTX: PI through the coordinate scale
            handle._previous_position_scale = float(adapter.temporal_position_scale)
            adapter.set_temporal_position_scale(handle._previous_position_scale * scale)
        else:
            _install_frequencies(adapter, handle, **method_kwargs)
    except BaseException:
        remove_rope_extension(adapter)
        raise
    logger.info(
        "RoPE extension %s on %s: %d -> %d latent frames (s=%.4g)%s",
        method,
        adapter.family,
        handle.train_latent_frames,
        handle.target_latent_frames,
        scale,
        f", RIFLEx k={handle.intrinsic_component[0]} N_k={handle.intrinsic_component[1]}"
        if handle.intrinsic_component
        else "",
    )
    return handle


def _install_frequencies(
    adapter,
    handle: RopeExtension,
    beta_fast: float = YARN_BETA_FAST,
    beta_slow: float = YARN_BETA_SLOW,
    attention_temperature: float | None = None,
    k: int | None = None,
    repetition_frame: int | None = None,
    finetune: bool = False,
) -> None:
    """Compute the method's temporal frequencies from the model's own and install them via the adapter."""
    stock = adapter.temporal_rope_frequencies()
    scale, method = handle.scale, handle.method
    if method == "pi":
        new = pi_frequencies(stock, scale)
    elif method == "ntk":
        new = ntk_frequencies(stock, scale)
    elif method == "yarn":
        new = yarn_frequencies(stock, scale, handle.train_positions, beta_fast, beta_slow)
        handle.options.update(beta_fast=beta_fast, beta_slow=beta_slow)
        temperature = (
            yarn_attention_temperature(scale) if attention_temperature is None else attention_temperature
        )
        handle.attention_temperature = float(temperature)
    else:  # riflex
        axis = adapter.rope_axes()[0]
        if k is None:
            k, n_k = riflex_intrinsic_frequency(
                axis["dim"],
                axis["base"],
                repetition_frame=repetition_frame,
                train_latent_frames=handle.train_positions,
            )
        else:
            if int(k) != k or not 1 <= k <= axis["dim"] // 2:
                raise ValueError(f"RIFLEx component k must be in 1..{axis['dim'] // 2} (1-based), got {k!r}")
            n_k = riflex_periods(axis["dim"], axis["base"])[k - 1]
        handle.intrinsic_component = (int(k), int(n_k))
        handle.options["finetune"] = bool(finetune)
        # Training-free RIFLEx changes RoPE only when the target outgrows the intrinsic period (L' > N_k);
        # within one period the component never wraps, so the stock model runs (thu-ml/RIFLEx applies its
        # modified RoPE only `if L_test > N_k or finetune`). A model fine-tuned with RIFLEx always uses it.
        modify = finetune or handle.target_positions > n_k
        new = riflex_frequencies(stock, k, handle.target_positions) if modify else stock.clone()
    handle.stock_frequencies, handle.frequencies = stock, new
    adapter.set_temporal_rope_frequencies(new)
    if handle.attention_temperature != 1.0:
        for name, attn in adapter.rope_attention_modules():
            for module in _query_modules(attn, name):
                HookRegistry.check_if_exists_or_initialize(module).register_hook(
                    _QueryScaleHook(handle.attention_temperature), YARN_TEMPERATURE_HOOK
                )
                handle._hooked_modules.append(module)


def remove_rope_extension(adapter) -> bool:
    """Restore the stock model bit for bit; returns False when no RoPE extension was applied."""
    rope = adapter.rope_module() if isinstance(adapter, TemporalRope) else None
    handle = None if rope is None else _APPLIED.pop(rope, None)
    if handle is None:
        return False
    for module in handle._hooked_modules:
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(YARN_TEMPERATURE_HOOK, recurse=False)
    handle._hooked_modules.clear()
    if handle._previous_position_scale is not None:
        adapter.set_temporal_position_scale(handle._previous_position_scale)
    else:
        adapter.set_temporal_rope_frequencies(None)
    return True


def extension_from_args(
    adapter, method: str | None, target_latent_frames: int, train_latent_frames: int | None = None
) -> RopeExtension | None:
    """``longgen generate --extension {pi,ntk,yarn,riflex} --target-frames N``: apply one RoPE extension.

    ``target_latent_frames`` is the clip the model will see in one window, in latent frames (convert pixel
    frames with ``adapter.num_latent_frames``); ``train_latent_frames`` defaults to the native clip.
    ``method`` None or ``"none"`` applies nothing and returns None.
    """
    if method is None or method == "none":
        return None
    if method not in ROPE_METHODS:
        raise ValueError(
            f"--extension {method!r} is not a RoPE extension; choose one of: {', '.join(ROPE_METHODS)}"
        )
    if target_latent_frames is None:
        raise ValueError(f"--extension {method} needs --target-frames (the length the model should see)")
    return apply_rope_extension(adapter, method, train_latent_frames, target_latent_frames)


# ----------------------------------------------------------------------------------------------------
# Inspection
# ----------------------------------------------------------------------------------------------------
def temporal_rope_info(adapter) -> dict[str, Any]:
    """Each RoPE axis's channels, base, frequencies (rad per token step) and periods ``2 pi / theta_j``.

    Also the native length, the extension methods the family supports, RIFLEx's intrinsic component for
    the native length (integer-position RoPE only) and the applied extension, if any.
    """
    methods = _check_supported(adapter)
    native = _native_latent_frames(adapter)
    axes = []
    for axis in adapter.rope_axes():
        freqs = axis["frequencies"].double()
        periods = [2 * math.pi / float(v) for v in freqs]
        axes.append(
            {
                "axis": axis["axis"],
                "dim": int(axis["dim"]),
                "base": float(axis["base"]),
                "unit": axis["unit"],
                "frequencies": [float(v) for v in freqs],
                "periods": periods,
                "periods_rounded": [round(p) for p in periods],
            }
        )
    info: dict[str, Any] = {
        "family": adapter.family,
        "rope_module": type(adapter.rope_module()).__name__,
        "native_latent_frames": native,
        "native_positions": _positions(adapter, native),
        "patch_size_t": int(adapter.patch_size[0]),
        "extension_methods": list(methods),
        "axes": axes,
    }
    if "riflex" in methods:
        k, n_k = riflex_intrinsic_frequency(
            axes[0]["dim"], axes[0]["base"], train_latent_frames=info["native_positions"]
        )
        info["riflex"] = {"k": k, "N_k": n_k}
    extension = get_rope_extension(adapter)
    info["extension"] = None if extension is None else extension.describe()
    return info


def print_rope_info(info: dict[str, Any]) -> None:
    """Print :func:`temporal_rope_info` as tables (``longgen inspect-rope``)."""
    import json

    methods = ", ".join(info["extension_methods"])
    print(
        f"{info['family']} ({info['rope_module']}): native clip {info['native_latent_frames']} latent frames "
        f"({info['native_positions']} temporal RoPE positions); RoPE extension: {methods}"
    )
    for axis in info["axes"]:
        num = len(axis["frequencies"])
        print(
            f"\naxis {axis['axis']}: {axis['dim']} channels per head ({num} frequencies), "
            f"base {axis['base']:g}, position unit: {axis['unit']}"
        )
        print(f"  {'j':>3}  {'frequency (rad/unit)':>20}  {'period (units)':>14}  {'N_j':>6}")
        rows = zip(axis["frequencies"], axis["periods"], axis["periods_rounded"])
        for j, (freq, period, rounded) in enumerate(rows, start=1):
            print(f"  {j:>3}  {freq:>20.6e}  {period:>14.3f}  {rounded:>6d}")
    if "riflex" in info:
        k, n_k = info["riflex"]["k"], info["riflex"]["N_k"]
        print(
            f"\nRIFLEx intrinsic component: k={k} (N_k={n_k}, the first period "
            f">= the native {info['native_positions']} positions)"
        )
    if info["extension"] is not None:
        print(f"\napplied extension: {json.dumps(info['extension'])}")


# ----------------------------------------------------------------------------------------------------
# Registry entries: pi, ntk, yarn, riflex
# ----------------------------------------------------------------------------------------------------
def _rope_apply(method: str):
    def apply(adapter, config: RopeExtensionConfig) -> RopeExtension:
        options = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in ("target_latent_frames", "train_latent_frames")
        }
        options = {k: v for k, v in options.items() if v is not None}
        return apply_rope_extension(
            adapter, method, config.train_latent_frames, config.target_latent_frames, **options
        )

    return apply


# the registry entries (longgen.extend.builtin) name these by "module:function", imported on first use
_apply_pi = _rope_apply("pi")
_apply_ntk = _rope_apply("ntk")
_apply_yarn = _rope_apply("yarn")
_apply_riflex = _rope_apply("riflex")
