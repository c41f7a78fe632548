"""SpectralBlend temporal attention (FreeLong, Lu et al. NeurIPS 2024, Sec. 4) as a removable hook.

FreeLong's diagnosis: attending over a clip longer than the training length keeps the low-frequency layout
but blurs the high frequencies (details, fast motion). SpectralBlend runs each temporal self-attention twice
with the same weights,

* global branch: every frame attends to all ``F`` frames (``Attn(x)``), and
* local branch: frame ``i`` attends only to a window of ``L`` frames around it (``L = 16`` in the paper, the
  native length); windows are shifted inwards at the clip's edges so each has exactly ``L`` frames,

and blends them in the 3D frequency domain of the ``[C, F, H, W]`` feature volume:

    out = Re IFFT3( IFFTSHIFT( LPF * FFTSHIFT(FFT3(global)) + (1 - LPF) * FFTSHIFT(FFT3(local)) ) )

with the Gaussian low-pass filter ``LPF(t, h, w) = exp(-1/2 [(t/d_t)^2 + (h/d_s)^2 + (w/d_s)^2])`` on the
centred grids ``t = 2k/F - 1`` (and likewise ``h``, ``w``) in ``[-1, 1)``; ``d_s = d_t = 0.25``. This is
the filter of FreeInit (diffusers ``FreeInitMixin._get_free_init_freq_filter(..., "gaussian", ...)``),
vectorised here (:func:`gaussian_low_pass_filter`). ``d = inf`` gives an all-pass filter (output = global
branch), ``d = 0`` an all-stop one (output = local branch).

The feature-map size: a temporal attention sees tokens ``[B*H*W, F, C]`` (pixels folded into the batch), so
its ``(H, W)`` cannot be read from its input. The hook records it from the input ``[B*F, C, H, W]`` of the
nearest enclosing module that takes a feature map (AnimateDiff's motion module ``AnimateDiffTransformer3D``,
SVD's ``TransformerSpatioTemporalModel``) with a pre-forward hook on the attention's ancestors.

Where ``F <= L`` the local window is the whole clip, both branches agree, and the stock attention runs alone,
so clips up to the native length are bit-identical to the stock model.

Differences from the FreeLong reference code (``freelong_temp_attn`` for LaVie): its local window spans
``i - L/2 .. i + L/2`` (``L + 1`` frames) inside the clip; here it is exactly ``L`` frames everywhere. The
filter is built per feature size on the fly and cached, instead of a table of hard-coded sizes.

DiTs (Wan incl. every Wan 2.2 expert, SkyReels-V2, LTX-Video; :mod:`longgen.extend.dit_attention`): each
block's video self-attention ``attn1`` over the tokens ``[B, f*h*w, D]`` (frame-major) is the hooked layer.

* global branch: the stock attention over all tokens (full rotary tables, SkyReels-V2's mask);
* local branch: FreeNoise window fusion of the same attention, windows of ``L`` latent frames every
  ``local_stride`` frames (default ``L // 4``), each window with the rotary tables sliced to its tokens
  (equal to positions restarted at 0: RoPE is relative), fused per frame with the pyramid weights;
* the blend: the outputs as volumes ``[B, D, f, h, w]`` over the token grid (recorded by a pre-forward hook on
  the transformer), the same Gaussian filter and :func:`spectral_blend` as for the UNets.

Departure from FreeLong on DiTs: its local branch lets each frame attend to its own centred window (an
attention mask). Over DiT tokens that mask is ``[S, S]`` with ``S = f*h*w`` (about 10^9 entries at Wan's
480p x 81 frames) and forces a masked, non-flash attention kernel; fused windows use the stock kernels on
``L*h*w`` tokens at a time, every frame still attends only to frames within ``L`` of it, and the windows
around a frame are weighted towards the one centred on it. Cross-attention (``attn2``) is untouched.

CogVideoX and HunyuanVideo (joint text-video attention; windows as in :mod:`longgen.extend.fusion`): the video
outputs are blended as above. The text tokens' outputs (global: the stock call; local: the mean over the
windows) are blended as a signal that is constant over the token grid, whose spectrum is its zero frequency
alone: ``text = g * text_global + (1 - g) * text_local`` with ``g`` the filter's gain at zero frequency (index
``(f//2, h//2, w//2)`` of the centred filter; 1 for the all-pass filter, 0 for the all-stop one).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..backbones.capabilities import WindowAttention
from .configs import SpectralBlendOptions
from .dit_attention import (
    DiTAttentionSite,
    DiTWindowHook,
    dit_self_attention_layers,
    register_dit_window_hooks,
)
from .hooks import SPECTRAL_BLEND_HOOK, WINDOW_FUSION_HOOK, frame_attention_layers, has_hook, remove_hooks

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "SpectralBlendConfig",
    "SpectralBlendOptions",
    "apply_spectral_blend",
    "gaussian_low_pass_filter",
    "has_spectral_blend",
    "local_attention_mask",
    "local_window_starts",
    "remove_spectral_blend",
    "spectral_blend",
]

_SIZE_HOOK = "longgen_spectral_blend_size"
_GRID_HOOK = "longgen_spectral_blend_grid"


@dataclass(frozen=True)
class SpectralBlendConfig:
    """FreeLong SpectralBlend: local window ``local_window`` frames, Gaussian stop frequencies ``d_s``, ``d_t``.

    ``local_stride``: stride of the fused local windows on DiTs (None on UNets, whose local branch is masked).
    """

    local_window: int = 16
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25
    local_stride: int | None = None

    def __post_init__(self):
        if self.local_window < 1:
            raise ValueError(f"local_window must be >= 1 latent frame, got {self.local_window}")
        if self.local_stride is not None and not 1 <= self.local_stride <= self.local_window:
            raise ValueError(
                f"local_stride must be in [1, local_window={self.local_window}] so that the local windows cover "
                f"every frame, got {self.local_stride}"
            )
        if self.spatial_stop_frequency < 0 or self.temporal_stop_frequency < 0:
            raise ValueError(
                "stop frequencies must be >= 0 (0: all-stop, inf: all-pass), got "
                f"d_s={self.spatial_stop_frequency}, d_t={self.temporal_stop_frequency}"
            )


def _axis(n: int, stop: float, device) -> torch.Tensor:
    """``((2k/n - 1) / d)^2`` for k < n, float64; 0 where ``d = inf``."""
    grid = 2.0 * torch.arange(n, device=device, dtype=torch.float64) / n - 1.0
    if math.isinf(stop):
        return torch.zeros_like(grid)
    return (grid / stop) ** 2


def gaussian_low_pass_filter(
    num_frames: int,
    height: int,
    width: int,
    spatial_stop_frequency: float = 0.25,
    temporal_stop_frequency: float = 0.25,
    device=None,
) -> torch.Tensor:
    """FreeLong/FreeInit Gaussian low-pass filter ``[F, H, W]`` (float32) for fftshift-ed spectra.

    ``exp(-1/2 [(t/d_t)^2 + (h/d_s)^2 + (w/d_s)^2])`` with ``t, h, w = 2k/n - 1``. A stop frequency of 0 gives
    the all-zero filter (as diffusers' FreeInit helper does), ``inf`` drops that term.
    """
    if spatial_stop_frequency == 0 or temporal_stop_frequency == 0:
        return torch.zeros(num_frames, height, width, device=device)
    d2 = (
        _axis(num_frames, temporal_stop_frequency, device)[:, None, None]
        + _axis(height, spatial_stop_frequency, device)[None, :, None]
        + _axis(width, spatial_stop_frequency, device)[None, None, :]
    )  # [F, H, W]
    return torch.exp(-0.5 * d2).float()


def spectral_blend(
    global_feat: torch.Tensor, local_feat: torch.Tensor, low_pass: torch.Tensor
) -> torch.Tensor:
    """FreeLong's SpectralBlend of two ``[..., F, H, W]`` volumes (float32): low frequencies of ``global_feat``,
    high frequencies of ``local_feat``; ``low_pass`` ``[F, H, W]`` is centred (for fftshift-ed spectra)."""
    dims = (-3, -2, -1)
    g = torch.fft.fftshift(torch.fft.fftn(global_feat.float(), dim=dims), dim=dims)
    loc = torch.fft.fftshift(torch.fft.fftn(local_feat.float(), dim=dims), dim=dims)
    mixed = low_pass * g + (1.0 - low_pass) * loc
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


def local_window_starts(num_frames: int, window: int) -> torch.Tensor:
    """Start of frame ``i``'s local window ``[s_i, s_i + L)``: centred (``i - L//2``), shifted inside the clip."""
    i = torch.arange(num_frames)
    return (i - window // 2).clamp(min=0, max=max(num_frames - window, 0))


def local_attention_mask(
    num_frames: int, window: int, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive mask ``[F, F]``: 0 where key frame j is in query frame i's local window, ``-inf`` elsewhere."""
    starts = local_window_starts(num_frames, window).to(device)[:, None]  # [F, 1]
    j = torch.arange(num_frames, device=device)[None, :]  # [1, F]
    inside = (j >= starts) & (j < starts + window)
    mask = torch.zeros(num_frames, num_frames, device=device, dtype=dtype)
    return mask.masked_fill(~inside, float("-inf"))


@dataclass(eq=False)
class _SizeRecord:
    """(H, W) of an ancestor's latest input ``[B*F, C, H, W]``; None if its input is not a feature map."""

    size: tuple[int, int] | None = None


class _SizeHook(ModelHook):
    def __init__(self, record: _SizeRecord):
        super().__init__()
        self.record = record

    def pre_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        is_map = isinstance(hidden, torch.Tensor) and hidden.ndim == 4
        self.record.size = (int(hidden.shape[-2]), int(hidden.shape[-1])) if is_map else None
        return args, kwargs


class _SpectralBlendHook(ModelHook):
    """FreeLong's two-branch temporal attention, blended in 3D frequency space."""

    def __init__(self, config: SpectralBlendConfig, name: str, ancestors: list[_SizeRecord]):
        super().__init__()
        self.config = config
        self.name = name
        self.ancestors = ancestors  # deepest first
        self.low_pass = _LowPassCache(config)

    def feature_size(self) -> tuple[int, int]:
        for record in self.ancestors:
            if record.size is not None:
                return record.size
        raise RuntimeError(
            f"SpectralBlend could not find the feature-map size of {self.name}: no enclosing module took a "
            "[B*F, C, H, W] input in this forward"
        )

    def new_forward(self, module, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        original = self.fn_ref.original_forward
        num_frames = hidden_states.shape[1] if hidden_states.ndim == 3 else 0
        if (
            encoder_hidden_states is not None
            or attention_mask is not None
            or num_frames <= self.config.local_window
        ):
            # not self-attention over frames, or the local window is the whole clip: both branches agree
            return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        height, width = self.feature_size()
        rows, _, channels = hidden_states.shape
        if rows % (height * width):
            raise RuntimeError(
                f"SpectralBlend: {self.name} got {rows} token rows, not a multiple of its {height}x{width} feature map"
            )
        batch = rows // (height * width)
        global_out = original(hidden_states, **kwargs)  # [B*H*W, F, C']
        mask = local_attention_mask(
            num_frames, self.config.local_window, hidden_states.device, hidden_states.dtype
        )
        local_out = original(hidden_states, attention_mask=mask.expand(rows, -1, -1), **kwargs)
        out_channels = global_out.shape[-1]

        def volume(t: torch.Tensor) -> torch.Tensor:  # [B*H*W, F, C] -> [B, C, F, H, W]
            return t.reshape(batch, height, width, num_frames, out_channels).permute(0, 4, 3, 1, 2)

        lpf = self.low_pass(num_frames, height, width, hidden_states.device)
        blended = spectral_blend(volume(global_out), volume(local_out), lpf)  # [B, C, F, H, W]
        blended = blended.permute(0, 3, 4, 2, 1).reshape(rows, num_frames, out_channels)
        return blended.to(global_out.dtype)


class _LowPassCache:
    """The Gaussian low-pass filter of a config per ``(F, H, W, device)``, built once."""

    def __init__(self, config: SpectralBlendConfig):
        self.config = config
        self._filters: dict[tuple, torch.Tensor] = {}

    def __call__(self, num_frames: int, height: int, width: int, device) -> torch.Tensor:
        key = (num_frames, height, width, str(device))
        if key not in self._filters:
            c = self.config
            self._filters[key] = gaussian_low_pass_filter(
                num_frames, height, width, c.spatial_stop_frequency, c.temporal_stop_frequency, device
            )
        return self._filters[key]


class _DiTSpectralBlendHook(DiTWindowHook):
    """FreeLong on a DiT: stock attention over all tokens (global) and fused frame windows (local), blended."""

    def __init__(self, config: SpectralBlendConfig, site: DiTAttentionSite):
        super().__init__(site, "SpectralBlend")
        self.config = config
        self.low_pass = _LowPassCache(config)

    def new_forward(self, module, *args, **kwargs):
        original = self.fn_ref.original_forward
        call = self.bind(args, kwargs)
        if not self.is_windowed_call(call):
            return original(*args, **kwargs)
        grid = self.token_grid(call["hidden_states"])
        window = self.config.local_window
        if grid[0] <= window:  # the local window is the whole clip: both branches agree
            return original(*args, **kwargs)
        stride = self.config.local_stride or max(1, window // 4)
        global_out = original(*args, **kwargs)  # [B, f*h*w, D'] (joint: and text [B, L, D'])
        local_out = self.windowed(call, grid, window, stride)  # [B, f*h*w, D'] (joint: and text [B, L, D'])
        if self.joint:
            (global_out, global_text), (local_out, local_text) = global_out, local_out
        f, h, w = grid
        batch, seq_len, channels = global_out.shape

        def volume(t: torch.Tensor) -> torch.Tensor:  # [B, f*h*w, D] -> [B, D, f, h, w]
            return t.reshape(batch, f, h, w, channels).permute(0, 4, 1, 2, 3)

        lpf = self.low_pass(f, h, w, global_out.device)
        blended = spectral_blend(volume(global_out), volume(local_out), lpf)  # [B, D, f, h, w]
        video = blended.permute(0, 2, 3, 4, 1).reshape(batch, seq_len, channels).to(global_out.dtype)
        if not self.joint:
            return video
        dc = lpf[f // 2, h // 2, w // 2]  # the filter's gain at zero frequency (fftshift puts it at n // 2)
        text = dc * global_text.float() + (1.0 - dc) * local_text.float()  # [B, L, D']
        return video, text.to(global_text.dtype)


def apply_spectral_blend(
    adapter: BackboneAdapter,
    local_window: int | None = None,
    spatial_stop_frequency: float = 0.25,
    temporal_stop_frequency: float = 0.25,
    local_stride: int | None = None,
) -> SpectralBlendConfig:
    """Apply FreeLong's SpectralBlend (Lu et al. 2024) to every temporal attention layer of the adapter's model.

    ``local_window`` defaults to the model's native clip in latent frames (FreeLong: 16); ``d_s``/``d_t`` are the
    Gaussian filter's stop frequencies (FreeLong: 0.25). FreeLong pairs it with FreeNoise noise rescheduling
    (``LongVideoPipeline.generate(noise="freenoise")``). Undo with :func:`remove_spectral_blend`.

    UNets (AnimateDiff, SVD): temporal attention over the frame axis, local branch masked per frame. DiTs (Wan,
    SkyReels-V2, LTX-Video; CogVideoX and HunyuanVideo's joint text-video attention): every block's video
    self-attention, local branch fused frame windows of ``local_window`` latent frames every ``local_stride``
    frames (default ``local_window // 4``).
    """
    is_dit = isinstance(adapter, WindowAttention)
    modules = (
        dit_self_attention_layers(adapter, "SpectralBlend")
        if is_dit
        else frame_attention_layers(adapter, "SpectralBlend")
    )
    for name, module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(SPECTRAL_BLEND_HOOK) is not None:
            raise RuntimeError("SpectralBlend is already applied; call remove_spectral_blend(adapter) first")
        if registry is not None and registry.get_hook(WINDOW_FUSION_HOOK) is not None:
            raise RuntimeError(
                f"window fusion is applied to {name}: window fusion and SpectralBlend both replace temporal "
                "attention; remove_window_fusion(adapter) first"
            )
    native = adapter.num_latent_frames(adapter.native_video_size[0])
    local_window = local_window or native
    if is_dit:
        config = SpectralBlendConfig(
            local_window,
            spatial_stop_frequency,
            temporal_stop_frequency,
            local_stride or max(1, local_window // 4),
        )
        register_dit_window_hooks(
            adapter,
            _GRID_HOOK,
            SPECTRAL_BLEND_HOOK,
            lambda site: _DiTSpectralBlendHook(config, site),
        )
        return config
    if local_stride is not None:
        raise ValueError(
            "local_stride applies to DiTs only: on a UNet the local branch is a per-frame window mask"
        )
    config = SpectralBlendConfig(local_window, spatial_stop_frequency, temporal_stop_frequency)
    model = adapter.model
    records: dict[str, _SizeRecord] = {}
    for name, module in modules:
        parts = name.split(".")
        ancestors = []
        for depth in range(len(parts) - 1, 0, -1):  # deepest first, the root model excluded
            parent_name = ".".join(parts[:depth])
            parent = model.get_submodule(parent_name)
            if isinstance(parent, (nn.ModuleList, nn.ModuleDict)):
                continue  # containers are never called
            if parent_name not in records:
                records[parent_name] = _SizeRecord()
                HookRegistry.check_if_exists_or_initialize(parent).register_hook(
                    _SizeHook(records[parent_name]), _SIZE_HOOK
                )
            ancestors.append(records[parent_name])
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _SpectralBlendHook(config, name, ancestors), SPECTRAL_BLEND_HOOK
        )
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return config


def remove_spectral_blend(adapter: BackboneAdapter) -> None:
    """Remove the hooks of :func:`apply_spectral_blend`; the model is the stock model again."""
    remove_hooks(adapter, SPECTRAL_BLEND_HOOK, _SIZE_HOOK, _GRID_HOOK)


def has_spectral_blend(adapter: BackboneAdapter) -> bool:
    """True when SpectralBlend hooks are on the adapter's model."""
    return has_hook(adapter, SPECTRAL_BLEND_HOOK)


def _apply_from_options(adapter: BackboneAdapter, options: SpectralBlendOptions) -> SpectralBlendConfig:
    """The ``apply`` of the registry entry (:mod:`longgen.extend.builtin`)."""
    return apply_spectral_blend(adapter, **dataclasses.asdict(options))
