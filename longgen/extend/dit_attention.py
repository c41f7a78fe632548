"""Frame windows of a DiT's 3D self-attention (FreeNoise window fusion and FreeLong SpectralBlend on DiTs).

Shared plumbing of :mod:`longgen.extend.fusion` and :mod:`longgen.extend.spectral` for the DiTs whose
self-attention over the video tokens takes its rotary embedding as an argument. Two kinds:

Video-only self-attention (the text enters through a separate cross-attention ``attn2``, never touched):

* Wan (``WanTransformer3DModel``; every expert of Wan 2.2 MoE) and SkyReels-V2
  (``SkyReelsV2Transformer3DModel``): ``blocks[i].attn1(hidden_states, None, attention_mask, rotary_emb)``,
  ``rotary_emb = (cos, sin)`` of shape ``[1, S, 1, head_dim]``; SkyReels-V2's block-causal diffusion-forcing
  mask ``[1, 1, S, S]`` is the only attention mask;
* LTX-Video (``LTXVideoTransformer3DModel``): ``transformer_blocks[i].attn1(..., image_rotary_emb=(cos, sin))``
  of shape ``[B, S, inner_dim]``.

Joint text-video attention (MM-DiT: one softmax over the text and video tokens; the call takes the video tokens
as ``hidden_states`` and the text tokens as ``encoder_hidden_states`` and returns ``(video_out, text_out)``):

* CogVideoX (``CogVideoXTransformer3DModel``): ``transformer_blocks[i].attn1(hidden_states=video,
  encoder_hidden_states=text, image_rotary_emb=(cos, sin))``; the processor attends over ``[text; video]`` with
  RoPE (tables ``[S, head_dim]``) on the video part only; no attention mask. CogVideoX 1.0 2B has no RoPE
  (``image_rotary_emb=None``): its sin-cos positions are added once at the patch embedding, so its windows keep
  the clip's global positions (as SVD's do). CogVideoX 1.5 patches 2 latent frames per token
  (``patch_size_t``) and is refused (:func:`dit_self_attention_layers`).
* HunyuanVideo (``HunyuanVideoTransformer3DModel``): dual-stream ``transformer_blocks[i].attn`` and
  single-stream ``single_transformer_blocks[i].attn``, both called as ``attn(video, text, attention_mask,
  image_rotary_emb)``; they attend over ``[video; text]`` with RoPE (tables ``[S, head_dim]``) on the video part;
  ``attention_mask [B, 1, 1, S + L]`` (bool) masks the padded text keys. The token refiner's ``attn``
  (text only, inside ``context_embedder``) is not a video attention and is not hooked.

Token layout: all five flatten the patchified latent ``[B, C, f, h, w]`` frame-major, token
``t = (i_f * h + i_h) * w + i_w`` (Wan, HunyuanVideo: ``Conv3d`` patch embedding, ``flatten(2).transpose(1, 2)``;
LTX: the pipelines' ``_pack_latents``, ``b (f h w) c``; CogVideoX 1.0: ``[B, F, h*w, D].flatten(1, 2)`` in
``CogVideoXPatchEmbed``), so latent frame ``i`` owns the contiguous token slice ``[i*h*w, (i+1)*h*w)`` and a
frame window ``[s, s + W)`` is the slice ``[s*h*w, (s+W)*h*w)``. The grid ``(f, h, w)`` is not visible inside the
attention call; a pre-forward hook on each transformer records it from the model input (Wan/SkyReels:
``hidden_states [B, C, F, H, W]`` and ``config.patch_size``; HunyuanVideo: the same with ``patch_size_t`` and
``patch_size``; CogVideoX: ``hidden_states [B, F, C, H, W]``; LTX: the ``num_frames``/``height``/``width``
arguments, or the distinct values of ``video_coords`` per axis).

Windowed attention: the stock attention (processor, kernels and all) runs on each window's video tokens.

* Video-only attention: the rotary tables are sliced to the same tokens (and a mask to the window's rows and
  columns). RoPE makes a query-key score depend on positions only through their difference
  (``R(p_q)^T R(p_k) = R(p_k - p_q)``), so the sliced global table gives the same attention as positions
  restarted at 0 in every window, which is what FreeNoise does with AnimateDiff's position table; it also keeps
  each token's true coordinates where the grid is not uniform (LTX's pixel ``video_coords``, whose first latent
  frame is squeezed by the causal VAE).
* Joint attention: each window attends over its video tokens and **all** text tokens (the mask keeps the
  window's video columns and every text column). The text tokens carry no rotation, so a text-video score
  depends on the video token's absolute position and a sliced table is *not* the same as positions restarted
  at 0; the windows use the table of the clip's first ``W`` frames, i.e. temporal positions ``0 .. W-1``
  exactly as the model would build them for a native-length clip (FreeNoise's restart; both grids are uniform).
  Each window returns outputs for all text tokens; the text outputs are averaged uniformly over the windows.
  Departure: FreeNoise's temporal attention has no text tokens; a uniform mean keeps the text stream's scale
  (every window's text output is a full attention output) and treats every part of the clip alike.

Video outputs of frames covered by several windows are fused with FreeNoise's pyramid weights
(:func:`longgen.extend.fusion.fuse_window_outputs`). With one window (``f <= W``) the stock call runs untouched.
HunyuanVideo's per-frame-timestep hook gates the dual-stream attention output per frame with a hook on the same
``attn``; it must wrap the window hook, so registering window hooks removes it (the adapter re-adds it, outside,
on its next per-frame call). The hooks assume the whole sequence is on this process (no context-parallel
sharding).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..backbones.base import WindowAttentionSpec
from ..backbones.capabilities import WindowAttention, denoiser_models
from ..windows import fuse_window_outputs
from .hooks import remove_hooks

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "DiTAttentionSite",
    "DiTWindowHook",
    "TokenGrid",
    "denoiser_models",
    "dit_attention_sites",
    "dit_self_attention_layers",
    "register_dit_window_hooks",
    "remove_hooks",
    "slice_rotary_embedding",
]

_ROPE_ARGS = ("rotary_emb", "image_rotary_emb")


@dataclass(eq=False)
class TokenGrid:
    """Token grid ``(f, h, w)`` of a transformer's latest input (post-patch), recorded by a pre-forward hook."""

    grid: tuple[int, int, int] | None = None


class _GridHook(ModelHook):
    """Records the token grid of the transformer's input before each forward."""

    def __init__(self, record: TokenGrid, reader: Callable[[nn.Module, tuple, dict], Any]):
        super().__init__()
        self.record = record
        self.reader = reader

    def pre_forward(self, module, *args, **kwargs):
        self.record.grid = self.reader(module, args, kwargs)
        return args, kwargs


@dataclass(eq=False)
class DiTAttentionSite:
    """One self-attention layer of a DiT with the token-grid record of the transformer it belongs to.

    ``text_order``: None for video-only self-attention, else where the processor puts the text tokens
    (``"text_first"``: CogVideoX, ``"text_last"``: HunyuanVideo). ``rope_arg``: the rotary argument's name.
    """

    name: str
    module: nn.Module
    grid: TokenGrid
    text_order: str | None = None
    rope_arg: str = "image_rotary_emb"


def _models(adapter: BackboneAdapter) -> list[tuple[str, nn.Module]]:
    """(name prefix, transformer) pairs, the prefix ``transformer_2.`` for Wan 2.2's second expert."""
    return [("" if i == 0 else "transformer_2.", model) for i, model in enumerate(denoiser_models(adapter))]


def _spec(adapter: BackboneAdapter) -> WindowAttentionSpec:
    spec = adapter.window_attention_spec() if isinstance(adapter, WindowAttention) else None
    if spec is None:
        raise ValueError(
            f"the {adapter.family!r} adapter declares no window attention (window_attention_spec)"
        )
    return spec


def _self_attention_layers(model: nn.Module, spec: WindowAttentionSpec) -> list[tuple[str, nn.Module]]:
    """The attention layers the adapter's spec names (``layer_pattern`` over module names)."""
    pattern = re.compile(spec.layer_pattern)
    return [(name, module) for name, module in model.named_modules() if name and pattern.search(name)]


def dit_self_attention_layers(adapter: BackboneAdapter, method: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of the video self-attention layers of every transformer of a DiT adapter (its spec).

    Windows count latent frames, so the transformer must patch time by 1 (every released Wan, SkyReels-V2,
    LTX-Video, HunyuanVideo and CogVideoX 1.0 model does; CogVideoX 1.5 does not); otherwise a ValueError.
    """
    patch_t = int(adapter.patch_size[0])
    if patch_t != 1:
        raise ValueError(
            f"{method} windows latent frames, but this {adapter.family!r} transformer groups {patch_t} latent "
            "frames per token (patch_size_t); use the sliding, fifo or df samplers instead"
        )
    return [
        (prefix + name, module)
        for prefix, model in _models(adapter)
        for name, module in _self_attention_layers(model, _spec(adapter))
    ]


def dit_attention_sites(adapter: BackboneAdapter, grid_hook_name: str) -> list[DiTAttentionSite]:
    """Register a token-grid hook named ``grid_hook_name`` on each transformer of ``adapter`` and return its
    self-attention layers. Remove the grid hooks with ``registry.remove_hook(grid_hook_name, recurse=True)``."""
    spec = _spec(adapter)
    sites = []
    for prefix, model in _models(adapter):
        layers = _self_attention_layers(model, spec)
        if not layers:
            raise ValueError(
                f"the {adapter.family!r} model has none of the self-attention layers windows need"
            )
        record = TokenGrid()
        HookRegistry.check_if_exists_or_initialize(model).register_hook(
            _GridHook(record, spec.token_grid), grid_hook_name
        )
        sites.extend(
            DiTAttentionSite(prefix + name, module, record, spec.text_order, spec.rope_arg)
            for name, module in layers
        )
    return sites


def slice_rotary_embedding(rotary: Any, seq_len: int, start: int, stop: int) -> Any:
    """Tokens ``[start, stop)`` of a rotary embedding: a tensor or tuple of tensors whose token axis has
    ``seq_len`` entries (axis 1 of 3+ dims: Wan ``[1, S, 1, D]``, LTX ``[B, S, D]``; axis 0 of 1-2 dims:
    CogVideoX, HunyuanVideo ``[S, D]``)."""
    if rotary is None:
        return None
    if isinstance(rotary, (tuple, list)):
        return type(rotary)(slice_rotary_embedding(t, seq_len, start, stop) for t in rotary)
    axis = 1 if rotary.ndim >= 3 else 0
    if rotary.shape[axis] == seq_len:
        return rotary.narrow(axis, start, stop - start)
    raise ValueError(
        f"cannot find the {seq_len}-token axis of a rotary embedding of shape {tuple(rotary.shape)}"
    )


def _slice_mask(mask: torch.Tensor | None, seq_len: int, start: int, stop: int) -> torch.Tensor | None:
    """Rows and columns ``[start, stop)`` of a self-attention mask ``[..., S, S]`` (SkyReels-V2 block-causal)."""
    if mask is None:
        return None
    if mask.ndim < 2 or mask.shape[-1] != seq_len or mask.shape[-2] not in (1, seq_len):
        raise ValueError(
            f"frame windows need a [..., S, S] self-attention mask over the {seq_len} video tokens, got "
            f"{tuple(mask.shape)}; remove the window fusion / SpectralBlend for this model"
        )
    rows = slice(start, stop) if mask.shape[-2] == seq_len else slice(None)
    return mask[..., rows, start:stop]


def _slice_joint_mask(
    mask: torch.Tensor | None, num_video: int, num_text: int, start: int, stop: int, text_order: str
) -> torch.Tensor | None:
    """A joint text-video mask ``[..., 1 or N, N]`` (``N = S + L``) restricted to the video tokens
    ``[start, stop)`` and every text token, in the processor's order (HunyuanVideo's padded-text key mask)."""
    if mask is None:
        return None
    n = num_video + num_text
    if mask.ndim < 2 or mask.shape[-1] != n or mask.shape[-2] not in (1, n):
        raise ValueError(
            f"frame windows need a [..., 1 or N, N] attention mask over the N = {num_video} video + {num_text} "
            f"text tokens, got {tuple(mask.shape)}; remove the window fusion / SpectralBlend for this model"
        )
    video = torch.arange(start, stop, device=mask.device)
    if text_order == "text_first":  # [text; video]
        keep = torch.cat([torch.arange(num_text, device=mask.device), num_text + video])
    else:  # [video; text]
        keep = torch.cat([video, torch.arange(num_video, n, device=mask.device)])
    mask = mask.index_select(-1, keep)  # [..., 1 or N, W*h*w + L]
    return mask.index_select(-2, keep) if mask.shape[-2] == n else mask


class DiTWindowHook(ModelHook):
    """Base of the DiT self-attention hooks: binds the attention call and runs it on frame windows."""

    def __init__(self, site: DiTAttentionSite, method: str):
        super().__init__()
        self.name = site.name
        self.grid_record = site.grid
        self.text_order = site.text_order
        self.method = method
        self._names: list[str] | None = None
        self._rope_arg = site.rope_arg

    @property
    def joint(self) -> bool:
        """True for joint text-video attention (CogVideoX, HunyuanVideo): calls return ``(video, text)``."""
        return self.text_order is not None

    def initialize_hook(self, module):
        params = inspect.signature(module.forward).parameters
        self._names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._rope_arg = next((n for n in _ROPE_ARGS if n in params), self._rope_arg)
        return module

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name (``hidden_states``, ``encoder_hidden_states``, ``attention_mask``, rope)."""
        if len(args) > len(self._names):
            raise TypeError(f"{self.name}: {len(args)} positional arguments for {self._names}")
        return {**dict(zip(self._names, args)), **kwargs}

    def token_grid(self, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """The ``(f, h, w)`` grid of this call's ``[B, f*h*w, D]`` tokens (a clear error if unknown or wrong)."""
        grid = self.grid_record.grid
        if grid is None:
            raise RuntimeError(
                f"{self.method}: the token grid of {self.name} is unknown: the enclosing transformer was not "
                "called with a video input in this forward"
            )
        f, h, w = grid
        if hidden_states.ndim != 3 or hidden_states.shape[1] != f * h * w:
            raise RuntimeError(
                f"{self.method}: {self.name} got tokens {tuple(hidden_states.shape)}, expected [B, {f * h * w}, D] "
                f"for the {f}x{h}x{w} token grid (context-parallel sharding is not supported)"
            )
        return f, h, w

    def attend(self, call: dict[str, Any], start: int, stop: int, tokens_per_frame: int) -> Any:
        """The stock attention on latent frames ``[start, stop)`` only: tokens, rotary tables and mask sliced.

        Joint attention keeps every text token and takes the rotary table of frames ``[0, stop - start)``
        (positions restarted at 0; see the module docstring); it returns ``(video_out, text_out)``.
        """
        hidden = call["hidden_states"]
        seq_len = hidden.shape[1]
        a, b = start * tokens_per_frame, stop * tokens_per_frame
        window_call = dict(call)
        window_call["hidden_states"] = hidden[:, a:b]
        if call.get(self._rope_arg) is not None:
            rope_start = 0 if self.joint else a
            window_call[self._rope_arg] = slice_rotary_embedding(
                call[self._rope_arg], seq_len, rope_start, rope_start + b - a
            )
        if call.get("attention_mask") is not None:
            mask = call["attention_mask"]
            if self.joint:
                num_text = call["encoder_hidden_states"].shape[1]
                window_call["attention_mask"] = _slice_joint_mask(
                    mask, seq_len, num_text, a, b, self.text_order
                )
            else:
                window_call["attention_mask"] = _slice_mask(mask, seq_len, a, b)
        return self.fn_ref.original_forward(**window_call)

    def windowed(self, call: dict[str, Any], grid: tuple[int, int, int], window: int, stride: int) -> Any:
        """FreeNoise window fusion of the attention over frame windows: ``[B, f*h*w, D']``; joint attention:
        ``(video [B, f*h*w, D'], text [B, L, D'])``, the text outputs averaged uniformly over the windows."""
        f, h, w = grid
        hw = h * w
        text: dict[str, Any] = {"sum": 0.0, "count": 0, "dtype": None}  # the windows' text outputs, summed

        def run(start: int) -> torch.Tensor:
            out = self.attend(call, start, start + window, hw)  # [B, W*h*w, D'] (joint: and [B, L, D'])
            if self.joint:
                out, text_out = out
                text["sum"] = text_out.float() + text["sum"]  # [B, L, D'] float32
                text["count"] += 1
                text["dtype"] = text_out.dtype
            return out.unflatten(1, (window, hw))  # [B, W, h*w, D']

        fused = fuse_window_outputs(run, f, window, stride).flatten(1, 2)  # [B, f*h*w, D']
        if not self.joint:
            return fused
        return fused, (text["sum"] / text["count"]).to(text["dtype"])  # [B, L, D']

    def is_windowed_call(self, call: dict[str, Any]) -> bool:
        """True for the calls windows apply to: self-attention over the video tokens (no
        ``encoder_hidden_states``), or joint attention over video and text (``encoder_hidden_states`` given)."""
        has_text = call.get("encoder_hidden_states") is not None
        return has_text if self.joint else not has_text


def register_dit_window_hooks(
    adapter: BackboneAdapter,
    grid_hook_name: str,
    hook_name: str,
    make_hook: Callable[[DiTAttentionSite], ModelHook],
) -> None:
    """Register ``make_hook(site)`` as ``hook_name`` on every video self-attention of the adapter's DiT(s).

    The adapter's ``before_hooks`` runs first (HunyuanVideo removes its per-frame-timestep hooks there).
    """
    spec = _spec(adapter)
    if spec.before_hooks is not None:
        spec.before_hooks()
    for site in dit_attention_sites(adapter, grid_hook_name):
        HookRegistry.check_if_exists_or_initialize(site.module).register_hook(make_hook(site), hook_name)
    for model in denoiser_models(adapter):
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
