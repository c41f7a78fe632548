"""Window fusion (FreeNoise, Qiu et al. ICLR 2024, Sec. 3.3) as a removable hook on temporal attention.

FreeNoise lets a short-clip model denoise a long clip in one pass: every temporal self-attention over the
``F`` frames is computed in windows ``[kS, kS + W)`` of the native length ``W`` (stride ``S``), plus a tail
window ``[F - W, F)`` when the strided windows miss the last frames, and each frame's output is the weighted
mean of its window outputs, ``out_f = sum_k w_k(f) out_k(f) / sum_k w_k(f)``, with pyramid weights
``w(i) = min(i + 1, W - i)`` over a window's positions (``[1..W/2, W/2..1]``): a window trusts its centre most.

Differences from diffusers' ``FreeNoiseTransformerBlock`` (AnimateDiff only): the hook wraps the attention
layer itself, so it works on any backbone whose temporal attention runs over the frame axis (the UNet motion
modules of AnimateDiff and SVD) without rebuilding blocks; the tail window contributes all of its frames to
the weighted mean, weighted by the pyramid like every other window (diffusers indexes the tail weights with
``weights[:, -k]`` where ``weights[:, -k:]`` is meant).

Frame positions: where the adapter declares an additive position embedding per attention
(``temporal_attention_positions()``; AnimateDiff's ``pos_embed``), the embedding is applied per window, so
positions restart at 0 in every window as in FreeNoise and clips longer than the position table work. SVD adds
its positions before the temporal block, so its windows keep the clip's global positions.

DiTs (Wan incl. every Wan 2.2 expert, SkyReels-V2, LTX-Video): their self-attention runs over all video
tokens ``[B, f*h*w, D]`` (frame-major, ``h*w`` tokens per latent frame) with the rotary embedding passed to the
attention call. The hook on each block's ``attn1`` runs the stock attention on the tokens of each frame window
``[kS, kS + W)`` (same windows, tail window and pyramid weights as above) with the rotary tables sliced to the
same tokens, and fuses the outputs per latent frame. RoPE scores depend only on position differences, so the
sliced tables equal positions restarted at 0 in each window, as FreeNoise restarts AnimateDiff's positions;
SkyReels-V2's block-causal mask is sliced to the window too. The grid ``(f, h, w)`` comes from a pre-forward hook
on the transformer; ``attn2`` (text cross-attention) is untouched. See :mod:`longgen.extend.dit_attention`.
Window and stride count latent frames (the DiT must patch time by 1: CogVideoX 1.5 is refused).

CogVideoX and HunyuanVideo attend over text and video tokens jointly (CogVideoX ``attn1``, HunyuanVideo's
dual- and single-stream ``attn``): each window runs the stock attention on its video tokens plus *all* text
tokens (HunyuanVideo's padded-text mask sliced alike), with the rotary table of frames ``0 .. W-1`` (text
tokens are not rotated, so here a sliced table would not equal FreeNoise's restarted positions). The video
outputs are pyramid-fused per frame as above; the text tokens' outputs are averaged uniformly over the windows.
Departure: FreeNoise's temporal attention has no text tokens; the uniform mean keeps the text stream's scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..backbones.capabilities import FrameAttention, WindowAttention
from ..windows import fuse_window_outputs, fuse_windows, pyramid_weights, window_starts
from .configs import WindowFusionOptions
from .dit_attention import (
    DiTAttentionSite,
    DiTWindowHook,
    dit_self_attention_layers,
    register_dit_window_hooks,
)
from .hooks import (
    SPECTRAL_BLEND_HOOK,
    WINDOW_FUSION_HOOK,
    check_no_hook,
    frame_attention_layers,
    has_hook,
    remove_hooks,
    window_families,
)

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "WINDOW_FUSION_HOOK",
    "WindowFusionConfig",
    "WindowFusionOptions",
    "apply_window_fusion",
    "fuse_window_outputs",
    "fuse_windows",
    "has_window_fusion",
    "pyramid_weights",
    "remove_window_fusion",
    "window_families",
    "window_starts",
]

_POSITION_HOOK = "longgen_window_fusion_positions"
_GRID_HOOK = "longgen_window_fusion_grid"


@dataclass(frozen=True)
class WindowFusionConfig:
    """FreeNoise window fusion: windows of ``window`` latent frames every ``stride`` frames (paper: 16 and 4)."""

    window: int = 16
    stride: int = 4

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1 latent frame, got {self.window}")
        if not 1 <= self.stride <= self.window:
            raise ValueError(
                f"stride must be in [1, window={self.window}] so that the windows cover every frame, got {self.stride}"
            )


class _PositionBypassHook(ModelHook):
    """While window fusion is on, the block's own position call is a no-op; the fusion hook adds positions per window."""

    def new_forward(self, module, x, *args, **kwargs):
        return x

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding the block would have added (everything hooked below this hook included)."""
        return self.fn_ref.original_forward(x)


class _WindowFusionHook(ModelHook):
    """Runs a temporal self-attention layer per frame window and fuses the outputs (FreeNoise)."""

    def __init__(self, config: WindowFusionConfig, position_hook: _PositionBypassHook | None = None):
        super().__init__()
        self.config = config
        self.position_hook = position_hook

    def new_forward(self, module, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        original = self.fn_ref.original_forward
        position = self.position_hook.positions if self.position_hook is not None else None
        if encoder_hidden_states is not None:
            # cross-attention to a non-frame context: every query is independent, nothing to window
            x = position(hidden_states) if position is not None else hidden_states
            return original(x, encoder_hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError(
                "window fusion cannot window a temporal attention that is given an attention mask; remove the mask "
                "or the window fusion (remove_window_fusion)"
            )
        if hidden_states.ndim != 3:
            raise ValueError(
                f"window fusion expects temporal tokens [N, F, C], got {tuple(hidden_states.shape)}"
            )

        def attend(x: torch.Tensor) -> torch.Tensor:
            if position is not None:
                x = position(x)
            return original(x, **kwargs)

        return fuse_windows(attend, hidden_states, self.config.window, self.config.stride)


class _DiTWindowFusionHook(DiTWindowHook):
    """Runs a DiT's video self-attention per frame window (rotary tables sliced alike) and fuses (FreeNoise)."""

    def __init__(self, config: WindowFusionConfig, site: DiTAttentionSite):
        super().__init__(site, "window fusion")
        self.config = config

    def new_forward(self, module, *args, **kwargs):
        call = self.bind(args, kwargs)
        if not self.is_windowed_call(call):
            return self.fn_ref.original_forward(*args, **kwargs)
        grid = self.token_grid(call["hidden_states"])
        if grid[0] <= self.config.window:  # one window: the stock attention, bit for bit
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.windowed(call, grid, self.config.window, self.config.stride)


def has_window_fusion(adapter: BackboneAdapter) -> bool:
    """True when window fusion hooks are on the adapter's model."""
    return has_hook(adapter, WINDOW_FUSION_HOOK)


def apply_window_fusion(
    adapter: BackboneAdapter, window: int | None = None, stride: int | None = None
) -> WindowFusionConfig:
    """Apply FreeNoise window fusion (Qiu et al. 2024) to every temporal attention layer of the adapter's model.

    UNets (AnimateDiff, SVD): the temporal attention over the frame axis; DiTs (Wan, SkyReels-V2, LTX-Video):
    every block's video self-attention ``attn1``, windowed per latent frame with sliced RoPE tables; CogVideoX,
    HunyuanVideo: every block's joint text-video attention, windows of video tokens plus all text tokens.

    ``window`` defaults to the model's native clip in latent frames (FreeNoise: 16, AnimateDiff's length) and
    ``stride`` to a quarter of it (FreeNoise: 4). Clips of at most ``window`` frames run the stock model exactly.
    Undo with :func:`remove_window_fusion`.
    """
    is_dit = isinstance(adapter, WindowAttention)
    modules = (
        dit_self_attention_layers(adapter, "window fusion")
        if is_dit
        else frame_attention_layers(adapter, "window fusion")
    )
    if has_window_fusion(adapter):
        raise RuntimeError("window fusion is already applied; call remove_window_fusion(adapter) first")
    check_no_hook(
        modules,
        SPECTRAL_BLEND_HOOK,
        "SpectralBlend is applied to {name}: window fusion and SpectralBlend both replace temporal attention; "
        "remove_spectral_blend(adapter) first",
    )
    native = adapter.num_latent_frames(adapter.native_video_size[0])
    window = window or native
    config = WindowFusionConfig(window=window, stride=stride or max(1, window // 4))
    if is_dit:
        register_dit_window_hooks(
            adapter,
            _GRID_HOOK,
            WINDOW_FUSION_HOOK,
            lambda site: _DiTWindowFusionHook(config, site),
        )
        return config
    positions = adapter.temporal_attention_positions()  # a FrameAttention UNet here
    bypass: dict[int, _PositionBypassHook] = {}
    for name, module in modules:
        position_hook = None
        position = positions.get(name)
        if position is not None:
            position_hook = bypass.get(id(position))
            if position_hook is None:  # one bypass per embedding, shared by attn1 and attn2 of a block
                position_hook = bypass[id(position)] = _PositionBypassHook()
                HookRegistry.check_if_exists_or_initialize(position).register_hook(
                    position_hook, _POSITION_HOOK
                )
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _WindowFusionHook(config, position_hook), WINDOW_FUSION_HOOK
        )
    HookRegistry.check_if_exists_or_initialize(adapter.model).invalidate_child_registries_cache()
    if bypass:
        adapter.position_window = config.window
    return config


def remove_window_fusion(adapter: BackboneAdapter) -> None:
    """Remove the hooks of :func:`apply_window_fusion`; the model is the stock model again."""
    remove_hooks(adapter, WINDOW_FUSION_HOOK, _POSITION_HOOK, _GRID_HOOK)
    if isinstance(adapter, FrameAttention):
        adapter.position_window = None


def _apply_from_options(adapter: BackboneAdapter, options: WindowFusionOptions) -> WindowFusionConfig:
    """The ``apply`` of the registry entry (:mod:`longgen.extend.builtin`)."""
    return apply_window_fusion(adapter, **dataclasses.asdict(options))
