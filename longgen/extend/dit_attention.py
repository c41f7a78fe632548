"""Frame windows of a DiT's 3D self-attention (FreeNoise window fusion and FreeLong SpectralBlend on DiTs).

Shared plumbing of :mod:`longgen.extend.fusion` and :mod:`longgen.extend.spectral` for the DiTs whose
self-attention runs over the video tokens only and takes its rotary embedding as an argument:

* Wan (``WanTransformer3DModel``; every expert of Wan 2.2 MoE) and SkyReels-V2
  (``SkyReelsV2Transformer3DModel``): ``blocks[i].attn1(hidden_states, None, attention_mask, rotary_emb)``,
  ``rotary_emb = (cos, sin)`` of shape ``[1, S, 1, head_dim]``; SkyReels-V2's block-causal diffusion-forcing
  mask ``[1, 1, S, S]`` is the only attention mask;
* LTX-Video (``LTXVideoTransformer3DModel``): ``transformer_blocks[i].attn1(..., image_rotary_emb=(cos, sin))``
  of shape ``[B, S, inner_dim]``.

Token layout: all three flatten the patchified latent ``[B, C, f, h, w]`` frame-major, token
``t = (i_f * h + i_h) * w + i_w`` (Wan: ``patch_embedding(x).flatten(2).transpose(1, 2)``; LTX: the
pipelines' ``_pack_latents``, ``b (f h w) c``), so latent frame ``i`` owns the contiguous token slice
``[i*h*w, (i+1)*h*w)`` and a frame window ``[s, s + W)`` is the slice ``[s*h*w, (s+W)*h*w)``. The grid
``(f, h, w)`` is not visible inside the attention call; a pre-forward hook on each transformer records it from
the model input (Wan/SkyReels: ``hidden_states [B, C, F, H, W]`` and ``config.patch_size``; LTX: the
``num_frames``/``height``/``width`` arguments, or the distinct values of ``video_coords`` per axis).

Windowed attention: the stock attention (processor, kernels and all) runs on each window's tokens with the
rotary tables sliced to the same tokens (and a mask sliced to the window's rows and columns). RoPE makes a
query-key score depend on positions only through their difference (``R(p_q)^T R(p_k) = R(p_k - p_q)``), so
the sliced global table gives the same attention as positions restarted at 0 in every window, which is
what FreeNoise does with AnimateDiff's position table; it also keeps each token's true coordinates where the
grid is not uniform (LTX's pixel ``video_coords``, whose first latent frame is squeezed by the causal VAE).
Frames covered by several windows are fused with FreeNoise's pyramid weights
(:func:`longgen.extend.fusion.fuse_window_outputs`). Cross-attention (``attn2``) and text tokens are never
touched. The hooks assume the whole sequence is on this process (no context-parallel sharding).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "DIT_WINDOW_FAMILIES",
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

DIT_WINDOW_FAMILIES = ("wan", "skyreels_v2", "ltx")
"""DiTs whose self-attention sees only video tokens, frame-major, with RoPE passed to the attention call."""

_ROPE_ARGS = ("rotary_emb", "image_rotary_emb")


@dataclass(eq=False)
class TokenGrid:
    """Token grid ``(f, h, w)`` of a transformer's latest input (post-patch), recorded by a pre-forward hook."""

    grid: tuple[int, int, int] | None = None


def _wan_grid(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """Wan / SkyReels-V2: ``hidden_states [B, C, F, H, W]`` divided by ``config.patch_size``."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 5:
        return None
    pt, ph, pw = (int(p) for p in model.config.patch_size)
    _, _, frames, height, width = hidden.shape
    return frames // pt, height // ph, width // pw


def _ltx_grid(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """LTX-Video: the ``num_frames``/``height``/``width`` arguments (post-patch grid), else ``video_coords``."""
    names = ("num_frames", "height", "width")
    values = [kwargs.get(n, args[4 + i] if len(args) > 4 + i else None) for i, n in enumerate(names)]
    if all(v is not None for v in values):
        return tuple(int(v) for v in values)
    coords = kwargs.get("video_coords", args[8] if len(args) > 8 else None)  # [B, 3, S]
    if isinstance(coords, torch.Tensor):
        return tuple(int(torch.unique(coords[0, axis]).numel()) for axis in range(3))
    return None


_GRID_READERS: dict[str, Callable[[nn.Module, tuple, dict], tuple[int, int, int] | None]] = {
    "wan": _wan_grid,
    "skyreels_v2": _wan_grid,
    "ltx": _ltx_grid,
}


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
    """One self-attention layer of a DiT with the token-grid record of the transformer it belongs to."""

    name: str
    module: nn.Module
    grid: TokenGrid


def denoiser_models(adapter: BackboneAdapter) -> list[nn.Module]:
    """The adapter's denoising networks: every expert of Wan 2.2 MoE, else ``[adapter.model]``."""
    return list(adapter.experts()) if hasattr(adapter, "experts") else [adapter.model]


def _models(adapter: BackboneAdapter) -> list[tuple[str, nn.Module]]:
    """(name prefix, transformer) pairs, the prefix ``transformer_2.`` for Wan 2.2's second expert."""
    return [("" if i == 0 else "transformer_2.", model) for i, model in enumerate(denoiser_models(adapter))]


def _self_attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The video self-attention of every block: ``attn1`` (``attn2`` is the text cross-attention)."""
    return [(name, module) for name, module in model.named_modules() if name.endswith("attn1")]


def dit_self_attention_layers(adapter: BackboneAdapter, method: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of the video self-attention layers of every transformer of a DiT adapter.

    Windows count latent frames, so the transformer must patch time by 1 (every released Wan, SkyReels-V2 and
    LTX-Video model does); otherwise a ValueError.
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
        for name, module in _self_attention_layers(model)
    ]


def dit_attention_sites(adapter: BackboneAdapter, grid_hook_name: str) -> list[DiTAttentionSite]:
    """Register a token-grid hook named ``grid_hook_name`` on each transformer of ``adapter`` and return its
    self-attention layers. Remove the grid hooks with ``registry.remove_hook(grid_hook_name, recurse=True)``."""
    reader = _GRID_READERS[adapter.family]
    sites = []
    for prefix, model in _models(adapter):
        record = TokenGrid()
        HookRegistry.check_if_exists_or_initialize(model).register_hook(
            _GridHook(record, reader), grid_hook_name
        )
        layers = _self_attention_layers(model)
        if not layers:
            raise ValueError(f"the {adapter.family!r} model has no self-attention layers named '*attn1'")
        sites.extend(DiTAttentionSite(prefix + name, module, record) for name, module in layers)
    return sites


def slice_rotary_embedding(rotary: Any, seq_len: int, start: int, stop: int) -> Any:
    """Tokens ``[start, stop)`` of a rotary embedding: a tensor or tuple of tensors whose token axis has
    ``seq_len`` entries (axis 1: Wan ``[1, S, 1, D]``, LTX ``[B, S, D]``; else axis 0: ``[S, D]``)."""
    if rotary is None:
        return None
    if isinstance(rotary, (tuple, list)):
        return type(rotary)(slice_rotary_embedding(t, seq_len, start, stop) for t in rotary)
    if rotary.ndim >= 2 and rotary.shape[1] == seq_len:
        return rotary[:, start:stop]
    if rotary.shape[0] == seq_len:
        return rotary[start:stop]
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


class DiTWindowHook(ModelHook):
    """Base of the DiT self-attention hooks: binds the attention call and runs it on frame windows."""

    def __init__(self, name: str, grid: TokenGrid, method: str):
        super().__init__()
        self.name = name
        self.grid_record = grid
        self.method = method
        self._names: list[str] | None = None
        self._rope_arg = "rotary_emb"

    def initialize_hook(self, module):
        params = inspect.signature(module.forward).parameters
        self._names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._rope_arg = next((n for n in _ROPE_ARGS if n in params), "rotary_emb")
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

    def attend(self, call: dict[str, Any], start: int, stop: int, tokens_per_frame: int) -> torch.Tensor:
        """The stock attention on latent frames ``[start, stop)`` only: tokens, rotary tables and mask sliced."""
        hidden = call["hidden_states"]
        seq_len = hidden.shape[1]
        a, b = start * tokens_per_frame, stop * tokens_per_frame
        window_call = dict(call)
        window_call["hidden_states"] = hidden[:, a:b]
        if call.get(self._rope_arg) is not None:
            window_call[self._rope_arg] = slice_rotary_embedding(call[self._rope_arg], seq_len, a, b)
        if call.get("attention_mask") is not None:
            window_call["attention_mask"] = _slice_mask(call["attention_mask"], seq_len, a, b)
        return self.fn_ref.original_forward(**window_call)

    def windowed(
        self, call: dict[str, Any], grid: tuple[int, int, int], window: int, stride: int
    ) -> torch.Tensor:
        """FreeNoise window fusion of the attention over frame windows: ``[B, f*h*w, D']``."""
        from .fusion import fuse_window_outputs  # fusion imports this module

        f, h, w = grid
        hw = h * w

        def run(start: int) -> torch.Tensor:
            out = self.attend(call, start, start + window, hw)  # [B, W*h*w, D']
            return out.unflatten(1, (window, hw))  # [B, W, h*w, D']

        fused = fuse_window_outputs(run, f, window, stride)  # [B, f, h*w, D']
        return fused.flatten(1, 2)  # [B, f*h*w, D']

    def is_video_self_attention(self, call: dict[str, Any]) -> bool:
        """True for self-attention over the video tokens (no ``encoder_hidden_states``)."""
        return call.get("encoder_hidden_states") is None


def register_dit_window_hooks(
    adapter: BackboneAdapter,
    grid_hook_name: str,
    hook_name: str,
    make_hook: Callable[[DiTAttentionSite], ModelHook],
) -> None:
    """Register ``make_hook(site)`` as ``hook_name`` on every video self-attention of the adapter's DiT(s)."""
    for site in dit_attention_sites(adapter, grid_hook_name):
        HookRegistry.check_if_exists_or_initialize(site.module).register_hook(make_hook(site), hook_name)
    for model in denoiser_models(adapter):
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def remove_hooks(adapter: BackboneAdapter, *hook_names: str) -> None:
    """Remove the named hooks from every denoiser model of the adapter and its submodules."""
    for model in denoiser_models(adapter):
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
