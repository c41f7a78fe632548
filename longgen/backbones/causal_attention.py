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
* ``attend(attn, q, k, v, mask=None)``: attention through diffusers' ``dispatch_attention_fn`` and the processor's
  configured backend (SDPA by default), unmasked so flash kernels stay usable (only HunyuanVideo's padded-prompt
  key mask is passed); returns ``[B, Sq, inner]``;
* ``output(attn, hidden)``: the output projection;
* ``dense_mask(mask, batch, num_text)``: the boolean ``[S, S]`` block-causal mask in the form the stock processor
  takes (the reference path; joint attention: over text and video, see below);
* ``install(model, cache)``: optional model-specific hooks, given the :class:`~longgen.extend.causal.KVCache` (LTX
  records its RoPE scale; the joint families below), returning a function that removes them;
* ``text``: where the text tokens are. ``"cross_attention"``: the self-attention sees only video tokens (text enters
  through ``attn2``, untouched), so causality concerns the video tokens alone. ``"text_first"`` / ``"text_last"``:
  joint text-video attention, one softmax over ``[text; video]`` (CogVideoX) or ``[video; text]`` (HunyuanVideo),
  with ``project_text`` / ``output_text`` (the text tokens' projections) and ``text_key_mask`` (padded prompt keys).

Families with a spec: Wan 2.1 / 2.2 (``WanAttnProcessor``), SkyReels-V2 (``SkyReelsV2AttnProcessor``, the same
computation) and LTX-Video (``LTXVideoAttnProcessor``; the latent-grid RoPE of ``LTXPipeline`` /
``LTXImageToVideoPipeline``; ``LTXConditionPipeline``'s pixel coordinates are refused); CogVideoX 1.0 text-to-video
(``CogVideoXAttnProcessor2_0``: 5b with 3D RoPE from the adapter's RoPE module, 2b with the sin-cos positions of its
patch embedding) and HunyuanVideo (``HunyuanVideoAttnProcessor2_0``, dual- and single-stream blocks).

Joint text-video attention (MM-DiT; the departures from the stock models are marked):

* Video tokens of chunk ``k`` attend to every text token and to the video of chunks ``<= k`` (the cache's window and
  sink rules); text tokens attend to the text only (departure: the stock models let text attend to the video). So
  the text stream never depends on video content and is the same with or without a cache; block-causal attention is
  therefore never the identity on these families, even with one chunk. Its keys/values are recomputed in every call
  (cheap, and timestep-dependent); the cache holds the video keys/values of finished chunks only (post-norm,
  un-rotated), and text tokens never count as frames.
* The text tokens' adaLN modulation (and HunyuanVideo's token refiner) takes one timestep per sample, which the
  adapters' per-frame hooks set to the mean of the frames' levels. Here it is the level of the clip's **first latent
  frame** (departure): the call's own when it holds frame 0, else the level frame 0 was last run at (after chunk 0's
  context pass, the context level). Why: the cached keys/values of earlier chunks come from their context pass,
  whose text sat at the context level; the no-cache reference (the whole prefix re-run in one call, the finished
  frames at the context level) has one text stream for the prefix and the new chunk alike. They agree only if every
  call after chunk 0 conditions the text at the same level, the context level; chunk 0's own calls can keep their
  level (no prefix). Measured on the tiny CogVideoX, cached vs no-cache rollout: 5e-7 with this rule, 3e-4 with the
  current chunk's level, 5e-3 with the stock per-frame mean. The rule is also causal in the noise levels (the mean
  makes early chunks depend on the levels of later frames). Every call goes through the adapter's per-frame path
  while the hooks are on (``force_per_frame_timesteps``), since a streamed chunk at one level still needs its text
  at another.
* Positions: rotary tables at absolute (or window) frame indices, built per call from the family's own RoPE module
  (so a temporal RoPE extension applies). Text tokens carry no rotation, so a text-video score depends on the video
  token's own position: window positions change the result even without a sink. CogVideoX-2b (no RoPE) adds its
  sin-cos positions at the patch embedding; a streamed call gets those of its absolute frames, and window positions
  are refused. CogVideoX image-to-video (the image latent sits at every call's first frame; learned positions) and
  CogVideoX 1.5 (two latent frames per token) are refused.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

if TYPE_CHECKING:
    from .base import BackboneAdapter

__all__ = ["CAUSAL_FAMILIES", "CausalAttentionSpec", "causal_attention_spec", "joint_dense_mask"]

CAUSAL_FAMILIES = ("wan", "skyreels_v2", "ltx", "cogvideox", "hunyuan_video")
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
    attend: Callable[..., torch.Tensor]
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    dense_mask: Callable[[torch.Tensor, int, int], torch.Tensor]
    install: Callable[[nn.Module, Any], Callable[[], None]] | None = None
    text: str = "cross_attention"
    project_text: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    output_text: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    text_key_mask: Callable[[torch.Tensor | None, int, int], torch.Tensor | None] | None = None


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


def _dispatch_attend(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention over ``[B, S, heads, head_dim]`` through the processor's backend (flash-capable when unmasked;
    ``mask``: HunyuanVideo's boolean ``[B, 1, 1, K]`` key mask of padded text)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = getattr(attn.processor, "_attention_backend", None)
    out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend)
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
    dense_mask=lambda mask, batch, num_text: mask[None, None],  # [1, 1, S, S], SDPA's boolean form
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


def _ltx_install(model: nn.Module, cache: Any = None) -> Callable[[], None]:
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
    dense_mask=lambda mask, batch, num_text: mask.expand(batch, -1, -1),
    install=_ltx_install,
)

# --- joint text-video attention: CogVideoX 1.0 and HunyuanVideo ---------------------------------------------
def joint_dense_mask(mask: torch.Tensor, num_text: int, text_order: str, text_sees_video: bool = False) -> torch.Tensor:
    """``[N, N]`` (``N = S + L``) in the processor's token order: video rows see every text token and the
    video ``mask`` ``[S, S]``; text rows see the text only (block-causal) or, with ``text_sees_video``, every
    token (the stock rows; sparse attention)."""
    s = mask.shape[0]
    ones = mask.new_ones
    text_video = ones(num_text, s) if text_sees_video else ones(num_text, s).logical_not()
    video_rows, text_rows = (mask, ones(s, num_text)), (text_video, ones(num_text, num_text))
    if text_order == "text_first":  # [text; video]
        return torch.cat([torch.cat(text_rows[::-1], 1), torch.cat(video_rows[::-1], 1)], dim=0)
    return torch.cat([torch.cat(video_rows, 1), torch.cat(text_rows, 1)], dim=0)  # [video; text]


def _rotate_real(x: torch.Tensor, table) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (real pairs) on ``[B, S, heads, head_dim]``, as both processors call it on
    the video tokens; None (CogVideoX-2b, no RoPE): unchanged."""
    if table is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, table, sequence_dim=1)


def _split_rope_table(temporal, spatial, temporal_dim: int, frames: torch.Tensor, h: int, w: int):
    """RoPE ``(cos, sin)`` ``[n*h*w, head_dim]`` of the latent frames ``frames`` from a table of frames ``0..T-1`` on a
    1x1 grid (``temporal``, rows = frames) and a table of one frame on the ``h x w`` grid (``spatial``): both
    families lay out the channels as ``[t | h | w]`` and compute each axis elementwise from its own position,
    so this equals the rows of the full ``T x h x w`` table without building it (its size grows with the stream)."""
    n, hw = frames.numel(), h * w
    rows = frames.to(temporal[0].device)

    def build(t: torch.Tensor, sp: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[rows, :temporal_dim].repeat_interleave(hw, 0), sp[:, temporal_dim:].repeat(n, 1)], 1)

    return build(temporal[0], spatial[0]), build(temporal[1], spatial[1])


def _qkv(attn: nn.Module, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k):
    """Projections, heads ``[B, S, heads, head_dim]`` and per-head QK norms (both processors' order)."""
    heads = attn.heads
    q, k, v = (proj(x).unflatten(2, (heads, -1)) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def _cogvideox_project(attn: nn.Module, x: torch.Tensor):
    """``CogVideoXAttnProcessor2_0``'s q/k/v (text and video share the projections; LayerNorm per head)."""
    return _qkv(attn, x, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)


def _hunyuan_project(attn: nn.Module, x: torch.Tensor):
    return _qkv(attn, x, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)


def _hunyuan_project_text(attn: nn.Module, x: torch.Tensor):
    """Dual-stream blocks: the text stream's own ``add_*_proj`` and norms; single-stream: the shared ones."""
    if attn.add_q_proj is None:
        return _hunyuan_project(attn, x)
    return _qkv(attn, x, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)


def _hunyuan_output(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Video output projection (single-stream blocks have none: ``proj_out`` follows, outside attention)."""
    return x if getattr(attn, "to_out", None) is None else attn.to_out[1](attn.to_out[0](x))


def _hunyuan_output_text(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if getattr(attn, "to_add_out", None) is None else attn.to_add_out(x)


def _hunyuan_text_key_mask(attention_mask: torch.Tensor | None, num_video: int, num_text: int):
    """The text part ``[B, 1, 1, L]`` (bool) of HunyuanVideo's ``[B, 1, 1, S + L]`` padded-prompt key mask."""
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != num_video + num_text:
        raise ValueError(
            f"HunyuanVideo's attention mask covers {attention_mask.shape[-1]} tokens, not the {num_video} video + "
            f"{num_text} text tokens of the call"
        )
    return attention_mask[..., num_video:].to(torch.bool).reshape(attention_mask.shape[0], 1, 1, num_text)


def _no_text_mask(attention_mask: torch.Tensor | None, num_video: int, num_text: int) -> None:
    if attention_mask is not None:
        raise ValueError("CogVideoX's joint attention takes no attention mask; something else passed one")
    return None


def _cogvideox_frame_levels(model: nn.Module) -> torch.Tensor | None:
    """``[B, F]`` timesteps of the current per-frame call (the adapter's per-frame hook state), else None."""
    from .cogvideox import PER_FRAME_TIMESTEP_HOOK

    registry = getattr(model, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(PER_FRAME_TIMESTEP_HOOK)
    return None if hook is None else hook.state.token_timesteps


def _hunyuan_frame_levels(model: nn.Module) -> torch.Tensor | None:
    from .hunyuan_video import PER_FRAME_HOOK

    registry = getattr(model, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(PER_FRAME_HOOK)
    return None if hook is None else hook.state.request


_TEXT_LEVEL_HOOK = "longgen_block_causal_text_level"
_POSITIONS_HOOK = "longgen_block_causal_positions"


class _TextLevelHook(ModelHook):
    """Gives the text tokens the noise level of the clip's first latent frame (see :func:`causal_attention_spec`).

    Sits inside the adapter's per-frame-timestep hook on the transformer (that one replaces the model's
    ``timestep``, which conditions everything textual, by the mean of the frames' levels); this one replaces it
    again by frame 0's level: the call's own when it holds frame 0, else the level frame 0 was last streamed at."""

    def __init__(self, cache: Any, frame_levels: Callable[[nn.Module], torch.Tensor | None]):
        super().__init__()
        self.cache = cache
        self.frame_levels = frame_levels
        self.first: torch.Tensor | None = None  # [B] model timestep of frame 0 in its latest call

    def initialize_hook(self, module):
        self._index = list(inspect.signature(type(module).forward).parameters).index("timestep") - 1
        return module

    def pre_forward(self, module, *args, **kwargs):
        timestep = args[self._index] if len(args) > self._index else kwargs["timestep"]
        levels = self.frame_levels(module)  # [B, F], or None: a stock (uniform) call
        stream = self.cache.active
        start = 0 if stream is None else stream.start
        if start == 0:
            self.first = (timestep if levels is None else levels[:, 0]).detach().clone()
            new = self.first
        elif self.first is None:
            raise RuntimeError(
                "a streaming call after frame 0 ran before any call on frame 0: the text tokens' noise level (frame "
                "0's) is unknown; stream the clip from its first chunk"
            )
        else:
            new = self.first if self.first.shape[0] == timestep.shape[0] else self.first[:1].expand(timestep.shape[0])
            if levels is None and not torch.equal(new.to(timestep), timestep.reshape(-1).expand_as(new).to(timestep)):
                raise RuntimeError(
                    "block-causal joint attention needs the adapter's per-frame path for streamed calls (call the "
                    "model through the adapter's denoise)"
                )
        new = new.to(device=timestep.device, dtype=timestep.dtype)
        if len(args) > self._index:
            return (*args[: self._index], new, *args[self._index + 1 :]), kwargs
        return args, {**kwargs, "timestep": new}


class _StreamPositionsHook(ModelHook):
    """CogVideoX-2b (no RoPE): the sin-cos positions its patch embedding adds, at the streamed frames' absolute
    indices (the stock module numbers the frames of every call from 0)."""

    def __init__(self, cache: Any):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, text_embeds, image_embeds):
        if self.cache.config.rope_positions == "window":
            raise ValueError(
                "this CogVideoX model has no RoPE (CogVideoX-2b adds absolute sin-cos positions at the patch "
                "embedding), so positions cannot be re-indexed per chunk: use --causal-rope absolute"
            )
        stream = self.cache.active
        if stream is None or stream.start == 0:
            return self.fn_ref.original_forward(text_embeds, image_embeds)
        module.use_positional_embeddings = False
        try:
            embeds = self.fn_ref.original_forward(text_embeds, image_embeds)
        finally:
            module.use_positional_embeddings = True
        _, num_frames, _, height, width = image_embeds.shape
        pixel_frames = (stream.start + num_frames - 1) * module.temporal_compression_ratio + 1
        pos = module._get_positional_embeddings(height, width, pixel_frames, device=embeds.device)
        text, hw = module.max_text_seq_length, (height // module.patch_size) * (width // module.patch_size)
        pos = torch.cat([pos[:, :text], pos[:, text + stream.start * hw :]], dim=1)  # text rows are zeros
        return embeds + pos.to(dtype=embeds.dtype)


def _register(module: nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    return lambda: registry.remove_hook(name, recurse=False)


def _joint_install(adapter_ref, frame_levels, remove_per_frame_hooks, positions: bool):
    """``install`` of a joint family: the text-level hook (inside the adapter's per-frame hook, which is removed
    here and re-added outermost on the next call), every call through the per-frame path (a streamed chunk at one
    level still needs text and video at different levels), CogVideoX-2b's streamed sin-cos positions."""

    def install(model: nn.Module, cache: Any) -> Callable[[], None]:
        adapter = adapter_ref()
        forced = adapter.force_per_frame_timesteps
        remove_per_frame_hooks(model)
        removers = [_register(model, _TextLevelHook(cache, frame_levels), _TEXT_LEVEL_HOOK)]
        if positions:
            removers.append(_register(model.patch_embed, _StreamPositionsHook(cache), _POSITIONS_HOOK))
        adapter.force_per_frame_timesteps = True

        def remove() -> None:
            # outermost first: diffusers' remove_hook relinks the next hook's ``forward``, which bypasses a
            # ``new_forward`` hook above (the CogVideoX per-frame one); the adapter re-adds its hooks when needed
            remove_per_frame_hooks(model)
            for remover in reversed(removers):
                remover()
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            live = adapter_ref()
            if live is not None:
                live.force_per_frame_timesteps = forced

        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        return remove

    return install


def _cogvideox_spec(adapter: BackboneAdapter) -> CausalAttentionSpec:
    from .cogvideox import remove_per_frame_timesteps

    model = adapter.model
    if adapter.requires_image_condition or model.patch_embed.use_learned_positional_embeddings:
        raise ValueError(
            "block-causal attention is not supported for CogVideoX image-to-video (the image latent sits at the "
            "first frame of every model call, and the learned positions are fixed to the training clip); use a "
            "text-to-video CogVideoX, or --sampler df, sliding or fifo"
        )
    ref = weakref.ref(adapter)

    def rope_table(model: nn.Module, frames: torch.Tensor, h: int, w: int):
        live = ref()
        rope = None if live is None else live.rope_module()
        if rope is None:
            return None
        device = live.device
        temporal = rope(int(frames.max()) + 1, 1, 1, device=device)
        return _split_rope_table(temporal, rope(1, h, w, device=device), rope.temporal_dim, frames, h, w)

    return CausalAttentionSpec(
        family="cogvideox",
        processors=("CogVideoXAttnProcessor2_0",),
        project=_cogvideox_project,
        rope_table=rope_table,
        apply_rope=_rotate_real,
        attend=_dispatch_attend,
        output=_wan_output,
        # prepare_attention_mask repeats a [B, N, N] mask per head and the processor views it [B, heads, N, N]
        dense_mask=lambda mask, batch, num_text: joint_dense_mask(mask, num_text, "text_first").expand(batch, -1, -1),
        install=_joint_install(
            ref, _cogvideox_frame_levels, remove_per_frame_timesteps, positions=adapter.rope_module() is None
        ),
        text="text_first",
        project_text=_cogvideox_project,
        output_text=_wan_output,
        text_key_mask=_no_text_mask,
    )


def _hunyuan_rope_table(model: nn.Module, frames: torch.Tensor, h: int, w: int):
    """``HunyuanVideoRotaryPosEmbed`` (through its hooks: a temporal RoPE extension applies) at ``frames``."""
    rope = model.rope
    p, pt = int(rope.patch_size), int(rope.patch_size_t)
    device = model.x_embedder.proj.weight.device
    temporal = rope(torch.empty(1, 0, (int(frames.max()) + 1) * pt, p, p, device=device))
    spatial = rope(torch.empty(1, 0, pt, h * p, w * p, device=device))
    return _split_rope_table(temporal, spatial, int(rope.rope_dim[0]), frames, h, w)


def _hunyuan_spec(adapter: BackboneAdapter) -> CausalAttentionSpec:
    from .hunyuan_video import remove_per_frame_timesteps

    return CausalAttentionSpec(
        family="hunyuan_video",
        processors=("HunyuanVideoAttnProcessor2_0",),
        project=_hunyuan_project,
        rope_table=_hunyuan_rope_table,
        apply_rope=_rotate_real,
        attend=_dispatch_attend,
        output=_hunyuan_output,
        dense_mask=lambda mask, batch, num_text: joint_dense_mask(mask, num_text, "text_last")[None, None],
        install=_joint_install(weakref.ref(adapter), _hunyuan_frame_levels, remove_per_frame_timesteps, False),
        text="text_last",
        project_text=_hunyuan_project_text,
        output_text=_hunyuan_output_text,
        text_key_mask=_hunyuan_text_key_mask,
    )


_SPECS: dict[str, Any] = {
    "wan": _WAN,
    "skyreels_v2": _WAN,
    "ltx": _LTX,
    "cogvideox": _cogvideox_spec,
    "hunyuan_video": _hunyuan_spec,
}
"""Each family's spec, or a function of the adapter that builds it (joint families read the adapter's RoPE)."""


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
    return spec if isinstance(spec, CausalAttentionSpec) else spec(adapter)
