"""Temporal-local sparse attention for long clips: sliding-tile attention over latent frames on the DiTs.

:func:`apply_sparse_attention` hooks every video self-attention layer of the adapter's DiT(s) (Wan 2.1 / 2.2,
SkyReels-V2, LTX-Video, CogVideoX 1.0, HunyuanVideo; the per-family parts come from
:mod:`longgen.backbones.causal_attention`, the hooks from :mod:`longgen.extend.dit_attention`, as block-causal
attention uses them). The query latent frames are cut into tiles of ``tile`` frames; the tile ``[a, b)`` attends
to the key frames ``[a - radius, b + radius)`` clipped to the clip (a sliding tile in time, all of each frame's
spatial tokens; the temporal version of Sliding Tile Attention, Zhang et al. 2025). Joint text-video attention
(CogVideoX, HunyuanVideo): video queries also attend to every text token; text queries attend to everything, as
in the stock model (a text row costs ``L * S``, small next to the video's ``S * S``).

Two ways a hooked layer runs:

* ``attention="blocks"`` (default): the layer's q/k/v are projected and rotated once (the call's own rotary
  tables, so a temporal RoPE extension applies); then one unmasked attention per query tile over its contiguous
  key frames only (flash-capable on GPU). Attention FLOPs fall to
  :meth:`~longgen.extend.configs.SparseAttentionConfig.attended_pairs` ``/ f^2`` of dense
  (:func:`longgen.flops.sparse_self_attention_fraction`), and so does wall time once attention dominates.
* ``attention="mask"``: the stock processor with a dense boolean ``[S, S]`` mask (combined with SkyReels-V2's or
  HunyuanVideo's own mask). Computes as much as dense attention; the tests use it as the reference.

When one tile's window covers the whole clip (``radius >= f - 1`` with ``tile = 1``; in general when the frame
mask is all True) the stock call runs unchanged, so the extension is exactly the dense model there. The default
radius, the native clip minus one latent frame, keeps every query-key distance the model was trained on and covers
any native-length clip (the sliding sampler's native windows are unaffected): the pattern only acts on full-clip or
long-window denoising.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..backbones.causal_attention import CausalAttentionSpec, causal_attention_spec, joint_dense_mask
from .configs import SparseAttentionConfig
from .dit_attention import DiTAttentionSite, DiTWindowHook, register_dit_window_hooks, remove_hooks

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "SPARSE_ATTENTION_HOOK",
    "SparseAttentionConfig",
    "SparseAttentionHandle",
    "apply_sparse_attention",
    "remove_sparse_attention",
    "sparse_frame_mask",
]

SPARSE_ATTENTION_HOOK = "longgen_sparse_attention"
_GRID_HOOK = "longgen_sparse_attention_grid"


def sparse_frame_mask(num_frames: int, config: SparseAttentionConfig, radius: int, device: Any = None) -> torch.Tensor:
    """Boolean ``[f, f]`` frame mask (True = query frame row attends to key frame column) of the tile pattern."""
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool, device=device)
    for a, b in config.tiles(num_frames):
        lo, hi = config.key_range(a, b, num_frames, radius)
        mask[a:b, lo:hi] = True
    return mask


class _SparseAttentionHook(DiTWindowHook):
    """Sliding-tile temporal attention on one video self-attention layer."""

    dense_shortcut = True
    """Run the stock call when the pattern covers the clip (the tests turn it off to check the tiled paths)."""

    def __init__(self, site: DiTAttentionSite, spec: CausalAttentionSpec, config: SparseAttentionConfig):
        super().__init__(site, "sparse attention")
        self.spec = spec
        self.config = config
        self.radius = int(config.radius)

    def new_forward(self, module, *args, **kwargs):
        call = self.bind(args, kwargs)
        if not self.is_windowed_call(call):  # a cross-attention call (video-only families): untouched
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = call["hidden_states"]
        f, h, w = self.token_grid(hidden)
        frame_mask = sparse_frame_mask(f, self.config, self.radius)
        if self.dense_shortcut and bool(frame_mask.all()):
            return self.fn_ref.original_forward(*args, **kwargs)  # the window covers the clip: dense, exactly
        if type(module.processor).__name__ not in self.spec.processors:
            raise RuntimeError(
                f"{self.name} runs {type(module.processor).__name__}; sparse attention knows "
                f"{', '.join(self.spec.processors)}: reset the attention processor or remove --extension sparse"
            )
        if self.config.attention == "mask":
            return self._masked(call, frame_mask, h * w)
        return self._blocks(module, call, (f, h, w))

    def _masked(self, call: dict[str, Any], frame_mask: torch.Tensor, hw: int):
        """The stock processor with the dense token mask (and the model's own mask, if it passed one)."""
        hidden = call["hidden_states"]
        mask = frame_mask.to(hidden.device).repeat_interleave(hw, 0).repeat_interleave(hw, 1)
        if self.joint:
            num_text = call["encoder_hidden_states"].shape[1]
            mask = joint_dense_mask(mask, num_text, self.text_order, text_sees_video=True)
            mask = mask[None, None] if self.spec.family == "hunyuan_video" else mask.expand(hidden.shape[0], -1, -1)
        else:
            mask = self.spec.dense_mask(mask, hidden.shape[0], 0)
        if call.get("attention_mask") is not None:
            mask = mask & call["attention_mask"].to(torch.bool)
        return self.fn_ref.original_forward(**{**call, "attention_mask": mask})

    def _blocks(self, module, call: dict[str, Any], grid: tuple[int, int, int]):
        """Per query tile, unmasked attention over its local key frames only (joint: plus the text tokens)."""
        spec, hidden, (f, h, w) = self.spec, call["hidden_states"], grid
        hw = h * w
        q, k, v = spec.project(module, hidden)  # [B, S, heads, head_dim]
        rope = call.get(self._rope_arg)
        q, k = spec.apply_rope(q, rope), spec.apply_rope(k, rope)
        own_mask = None if self.joint else call.get("attention_mask")  # SkyReels-V2's [.., S or 1, S] mask
        text = None
        if self.joint:
            tq, tk, tv = spec.project_text(module, call["encoder_hidden_states"])
            key_mask = spec.text_key_mask(call.get("attention_mask"), hidden.shape[1], tk.shape[1])
            text = (tk, tv, key_mask)
        outputs = []
        for a, b in self.config.tiles(f):
            lo, hi = self.config.key_range(a, b, f, self.radius)
            qa, ka, va = q[:, a * hw : b * hw], k[:, lo * hw : hi * hw], v[:, lo * hw : hi * hw]
            mask = None
            if own_mask is not None:
                rows = slice(a * hw, b * hw) if own_mask.shape[-2] > 1 else slice(None)
                mask = own_mask[..., rows, lo * hw : hi * hw].to(torch.bool)
            if text is not None:
                tk, tv, key_mask = text
                if key_mask is not None:  # every video key is valid, the padded text keys are not
                    mask = torch.cat([key_mask.new_ones(*key_mask.shape[:-1], ka.shape[1]), key_mask], dim=-1)
                ka, va = torch.cat([ka, tk], dim=1), torch.cat([va, tv], dim=1)
            outputs.append(spec.attend(module, qa, ka, va, mask))
        video = spec.output(module, torch.cat(outputs, dim=1))
        if text is None:
            return video
        tk, tv, key_mask = text
        text_mask = None if key_mask is None else torch.cat([key_mask.new_ones(*key_mask.shape[:-1], k.shape[1]),
                                                             key_mask], dim=-1)
        text_out = spec.attend(module, tq, torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1), text_mask)
        return video, spec.output_text(module, text_out)


class SparseAttentionHandle:
    """Handle of applied sparse attention: ``.config`` (``radius`` resolved), ``.remove()``, ``.describe()``."""

    def __init__(self, adapter: BackboneAdapter, config: SparseAttentionConfig):
        self.adapter = adapter
        self.config = config
        self._removed = False

    def remove(self) -> None:
        if not self._removed:
            remove_hooks(self.adapter, SPARSE_ATTENTION_HOOK, _GRID_HOOK)
            if _APPLIED.get(self.adapter) is self:
                del _APPLIED[self.adapter]
            self._removed = True

    def describe(self) -> dict[str, Any]:
        return {"method": "sparse_attention", **dataclasses.asdict(self.config)}


_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""adapter -> its SparseAttentionHandle (the registry removes by adapter)."""


def remove_sparse_attention(adapter: BackboneAdapter) -> None:
    """Remove sparse attention from ``adapter`` (the extension registry's ``remove``); no-op if absent."""
    handle = _APPLIED.get(adapter)
    if handle is not None:
        handle.remove()


def apply_sparse_attention(adapter: BackboneAdapter, config: SparseAttentionConfig | None = None) -> SparseAttentionHandle:
    """Make every video self-attention of ``adapter``'s DiT temporal-local (sliding tiles; removable hooks)."""
    config = config or SparseAttentionConfig()
    if adapter in _APPLIED:
        raise ValueError("sparse attention is already applied to this model; remove it first (handle.remove())")
    try:
        spec = causal_attention_spec(adapter)
    except ValueError as error:
        raise ValueError(
            f"--extension sparse needs a DiT with per-frame attention support ({error}); for UNets use "
            "--extension fusion"
        ) from None
    if int(adapter.patch_size[0]) != 1:
        raise ValueError(
            f"sparse attention tiles count latent frames, but this {adapter.family!r} transformer groups "
            f"{adapter.patch_size[0]} latent frames per token; use --sampler sliding, fifo or df"
        )
    if config.radius is None:
        native = adapter.num_latent_frames(adapter.native_video_size[0])
        config = dataclasses.replace(config, radius=max(0, native - 1))
    register_dit_window_hooks(
        adapter, _GRID_HOOK, SPARSE_ATTENTION_HOOK, lambda site: _SparseAttentionHook(site, spec, config)
    )
    handle = SparseAttentionHandle(adapter, config)
    _APPLIED[adapter] = handle
    return handle
