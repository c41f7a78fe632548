"""Per-family parts of block-causal attention with a KV cache (CausVid / Self-Forcing style streaming).

:mod:`longgen.extend.causal` runs a DiT's video self-attention chunk by chunk, each chunk's queries against the
keys/values of the frames it may see (earlier chunks from a cache, its own chunk from this call). What that needs
from a model is written here, one :class:`CausalAttentionSpec` per family:

* ``project(attn, hidden_states)``: the layer's un-rotated ``q, k, v`` ``[B, S, heads, head_dim]`` of the video
  tokens, exactly as the stock processor computes them (projections, QK norms);
* ``rope_table(model, frames, h, w)``: the rotary tables of the tokens of the latent frames ``frames`` (a 1-D
  integer tensor of temporal positions, frame-major, ``h * w`` tokens each), read from the model's own RoPE
  buffers (so a temporal RoPE extension that rewrote them applies; positions are absolute frame indices or
  window-relative ones, whichever the caller passes);
* ``apply_rope(x, table)``: the processor's rotation of ``q`` or ``k``;
* ``attend(attn, q, k, v)``: attention without a mask through diffusers' ``dispatch_attention_fn`` and the
  processor's configured backend (SDPA by default), so flash kernels stay usable; returns ``[B, Sq, inner]``;
* ``output(attn, hidden)``: the output projection;
* ``dense_mask(mask, batch)``: a boolean ``[S, S]`` block-causal mask in the form the stock processor takes (the
  reference path);
* ``install(model)``: optional model-specific hooks the RoPE tables need (LTX records its RoPE scale), returning
  a function that removes them;
* ``text``: where the text tokens are. ``"cross_attention"``: the self-attention sees only video tokens (text enters
  through ``attn2``, untouched), so causality concerns the video tokens alone.

Families with a spec: Wan 2.1 / 2.2 (``WanAttnProcessor``), SkyReels-V2 (``SkyReelsV2AttnProcessor``, the same
computation) and LTX-Video (``LTXVideoAttnProcessor``; the latent-grid RoPE of ``LTXPipeline`` /
``LTXImageToVideoPipeline``; ``LTXConditionPipeline``'s pixel coordinates are refused). CogVideoX and HunyuanVideo
(joint text-video attention) have no spec yet (:func:`causal_attention_spec` says so).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

if TYPE_CHECKING:
    from .base import BackboneAdapter

__all__ = ["CAUSAL_FAMILIES", "CausalAttentionSpec", "causal_attention_spec"]

CAUSAL_FAMILIES = ("wan", "skyreels_v2", "ltx")
"""Families whose block-causal attention and KV cache are implemented (and tested)."""

_UNET_FAMILIES = ("animatediff", "svd")


@dataclass(frozen=True)
class CausalAttentionSpec:
    """How block-causal attention reaches one family's video self-attention (see the module docstring)."""

    family: str
    processors: tuple[str, ...]
    project: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rope_table: Callable[[nn.Module, torch.Tensor, int, int], Any]
    apply_rope: Callable[[torch.Tensor, Any], torch.Tensor]
    attend: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    dense_mask: Callable[[torch.Tensor, int], torch.Tensor]
    install: Callable[[nn.Module], Callable[[], None]] | None = None
    text: str = "cross_attention"


# --- Wan 2.1 / 2.2 and SkyReels-V2 ---------------------------------------------------------------------------
def _wan_project(attn: nn.Module, hidden_states: torch.Tensor):
    """``WanAttnProcessor``'s self-attention q/k/v (fused or separate projections, RMS norm across heads)."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    heads = attn.heads
    return query.unflatten(2, (heads, -1)), key.unflatten(2, (heads, -1)), value.unflatten(2, (heads, -1))


def _wan_rope_table(model: nn.Module, frames: torch.Tensor, h: int, w: int):
    """``WanRotaryPosEmbed.forward`` for the tokens of latent frames ``frames`` (any temporal positions)."""
    rope = model.rope
    if int(frames.max()) >= rope.freqs_cos.shape[0]:
        raise ValueError(
            f"temporal position {int(frames.max())} is past this model's RoPE table ({rope.freqs_cos.shape[0]} "
            "positions, config.rope_max_seq_len): use a rolling window with window RoPE positions "
            "(--local-attn-size with --causal-rope window)"
        )
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    n = frames.numel()
    frames = frames.to(rope.freqs_cos.device)

    def table(freqs: torch.Tensor) -> torch.Tensor:
        t, hh, ww = freqs.split(split, dim=1)
        parts = [
            t[frames].view(n, 1, 1, -1).expand(n, h, w, -1),
            hh[:h].view(1, h, 1, -1).expand(n, h, w, -1),
            ww[:w].view(1, 1, w, -1).expand(n, h, w, -1),
        ]
        return torch.cat(parts, dim=-1).reshape(1, n * h * w, 1, -1)

    return table(rope.freqs_cos), table(rope.freqs_sin)


def _wan_apply_rope(x: torch.Tensor, table) -> torch.Tensor:
    """The stock processor's interleaved rotation (same operations, so results match it bit for bit)."""
    freqs_cos, freqs_sin = table
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _dispatch_attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention over ``[B, S, heads, head_dim]`` through the processor's backend (flash-capable)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = getattr(attn.processor, "_attention_backend", None)
    out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
    return out.flatten(2, 3).type_as(q)


def _wan_output(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](hidden_states))


_WAN = CausalAttentionSpec(
    family="wan",
    processors=("WanAttnProcessor", "SkyReelsV2AttnProcessor"),
    project=_wan_project,
    rope_table=_wan_rope_table,
    apply_rope=_wan_apply_rope,
    attend=_dispatch_attend,
    output=_wan_output,
    dense_mask=lambda mask, batch: mask[None, None],  # [1, 1, S, S], SDPA's boolean form
)


# --- LTX-Video ----------------------------------------------------------------------------------------------
_LTX_ROPE_HOOK = "longgen_block_causal_rope"
_LTX_ROPE_CALLS: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # model -> RoPE inputs of its last call


class _RecordRopeInputs(ModelHook):
    """Records the inputs of ``LTXVideoRotaryPosEmbed`` (its scale decides the tables of any frame)."""

    _NAMES = ("hidden_states", "num_frames", "height", "width", "rope_interpolation_scale", "video_coords")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = weakref.ref(model)

    def pre_forward(self, module, *args, **kwargs):
        call = {**dict(zip(self._NAMES, args)), **kwargs}
        call["hidden_states"] = torch.empty(
            1, 1, device=call["hidden_states"].device
        )  # only its device is read
        _LTX_ROPE_CALLS[self.model()] = call
        return args, kwargs


def _ltx_install(model: nn.Module) -> Callable[[], None]:
    registry = HookRegistry.check_if_exists_or_initialize(model.rope)
    registry.register_hook(_RecordRopeInputs(model), _LTX_ROPE_HOOK)

    def remove() -> None:
        registry.remove_hook(_LTX_ROPE_HOOK, recurse=False)
        _LTX_ROPE_CALLS.pop(model, None)

    return remove


def _ltx_project(attn: nn.Module, hidden_states: torch.Tensor):
    """``LTXVideoAttnProcessor``'s q/k/v (QK RMS norm over the full inner dim, then heads)."""
    query = attn.norm_q(attn.to_q(hidden_states))
    key = attn.norm_k(attn.to_k(hidden_states))
    value = attn.to_v(hidden_states)
    heads = attn.heads
    return query.unflatten(2, (heads, -1)), key.unflatten(2, (heads, -1)), value.unflatten(2, (heads, -1))


def _ltx_rope_table(model: nn.Module, frames: torch.Tensor, h: int, w: int):
    """``LTXVideoRotaryPosEmbed`` at latent frames ``frames``: the latent-grid coordinates the model's last call
    scaled by ``rope_interpolation_scale``, as ``video_coords`` (``grid * scale * patch``, the module's own order)."""
    call = _LTX_ROPE_CALLS.get(model)
    if call is None:
        raise RuntimeError("the LTX transformer has not been called yet: its RoPE scale is unknown")
    if call.get("video_coords") is not None or call.get("rope_interpolation_scale") is None:
        raise ValueError(
            "causal LTX-Video needs the latent-grid RoPE of LTXPipeline / LTXImageToVideoPipeline; the pixel "
            "coordinates of LTXConditionPipeline are not supported: load the model with LTXPipeline"
        )
    rope = model.rope
    device = call["hidden_states"].device
    scale = call["rope_interpolation_scale"]
    grid = torch.meshgrid(
        frames.to(device=device, dtype=torch.float32),
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    grid = torch.stack(grid, dim=0).unsqueeze(0)  # [1, 3, n, h, w]
    coords = torch.cat(
        [
            grid[:, 0:1] * scale[0] * rope.patch_size_t,
            grid[:, 1:2] * scale[1] * rope.patch_size,
            grid[:, 2:3] * scale[2] * rope.patch_size,
        ],
        dim=1,
    ).flatten(2)  # [1, 3, n*h*w]
    registry = HookRegistry.check_if_exists_or_initialize(rope)
    hook = registry.get_hook(_LTX_ROPE_HOOK)
    if hook is not None:  # this call must not overwrite the record of the model's own call
        registry.remove_hook(_LTX_ROPE_HOOK, recurse=False)
    try:
        return rope(call["hidden_states"], video_coords=coords)  # (cos, sin) [1, n*h*w, dim]
    finally:
        if hook is not None:
            registry.register_hook(_RecordRopeInputs(model), _LTX_ROPE_HOOK)


def _ltx_apply_rope(x: torch.Tensor, table) -> torch.Tensor:
    """LTX's rotation, applied (as the stock processor does) over the flattened heads."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    return apply_rotary_emb(x.flatten(2), table).unflatten(2, (x.shape[2], -1))


_LTX = CausalAttentionSpec(
    family="ltx",
    processors=("LTXVideoAttnProcessor",),
    project=_ltx_project,
    rope_table=_ltx_rope_table,
    apply_rope=_ltx_apply_rope,
    attend=_dispatch_attend,
    output=_wan_output,
    # prepare_attention_mask repeats a [B, S, S] mask per head and the processor views it [B, heads, S, S]
    dense_mask=lambda mask, batch: mask.expand(batch, -1, -1),
    install=_ltx_install,
)

_SPECS = {"wan": _WAN, "skyreels_v2": _WAN, "ltx": _LTX}


def causal_attention_spec(adapter: BackboneAdapter) -> CausalAttentionSpec:
    """The family's :class:`CausalAttentionSpec`, or a ValueError that says what to use instead."""
    family = adapter.family
    if family in _UNET_FAMILIES:
        raise ValueError(
            f"block-causal attention / the causal sampler is not supported for UNet motion modules ({family}): "
            "use --sampler sliding or fifo"
        )
    spec = _SPECS.get(family)
    if spec is None:
        raise ValueError(
            f"block-causal attention with a KV cache is not implemented for the {family!r} family yet "
            f"(supported: {', '.join(CAUSAL_FAMILIES)}); use --sampler df, sliding or fifo"
        )
    return spec
