"""Block-causal attention and a KV cache on a stock DiT (CausVid, Yin et al. 2025; Self-Forcing, Huang et al. 2025).

:func:`apply_block_causal` hooks every video self-attention layer of the adapter's transformer(s) so tokens of latent
chunk ``k`` (``chunk_size`` latent frames; 1 = frame-causal) attend only to chunks ``<= k``, optionally restricted to
a rolling window of the newest ``local_attn_size`` latent frames, of which the first ``sink_size`` frames of the clip
are kept forever (attention sink; LongLive: sink 3 + window 12). The handle's ``remove()`` restores the stock model.
The per-family parts (q/k/v, RoPE tables, where text sits) are in :mod:`longgen.backbones.causal_attention`; with
joint text-video attention (CogVideoX, HunyuanVideo) the video of each chunk also attends to every text token and the
text tokens attend to the text only (see that module).

Two ways a hooked layer runs:

* **Full sequence** (no streaming call open): the adapter denoises a whole clip. ``attention="chunked"`` (default)
  runs one unmasked attention per chunk, the chunk's queries against the keys of the frames it may see (its sink
  and window are at most two contiguous runs, concatenated); ``attention="mask"`` passes a dense boolean
  ``[1, 1, S, S]`` mask to the stock processor (combined with SkyReels-V2's own causal mask). Per-chunk calls are
  the default because a dense mask rules out the flash kernels of ``torch.nn.functional.scaled_dot_product_attention``
  on GPU (only the memory-efficient / math kernels take an arbitrary mask), and the mask costs ``S^2`` memory; the
  mask path is the stock processor untouched, so the tests use it as the reference. When one chunk and the window
  cover the clip the stock call runs unchanged (identity).
* **Streaming** (inside ``cache.stream(start, num_frames, write)``, what :func:`longgen.samplers.causal.sample_causal`
  opens around each model call): the input is only the frames ``[start, start + num_frames)`` of the video; each of
  their chunks attends to the cached keys/values of earlier frames plus this call's frames up to its own end, one
  unmasked attention per chunk (flash-capable). A ``write`` call (the clean context pass at ``context_noise``, as
  Self-Forcing / CausVid do after a chunk's last step) stores this call's keys/values per frame and evicts frames no
  later chunk can see, so a rolling window keeps memory constant in the clip length.

RoPE: keys are cached **un-rotated** with their frame index and rotated at attention time. ``rope_positions=
"absolute"`` rotates every token at its absolute latent frame (what the public Self-Forcing, CausVid and LongLive
v1.0 checkpoints use: K stored post-RoPE at the absolute frame index; identical scores); ``"window"`` re-indexes the
frames a chunk sees to ``0 .. n-1`` (sink first, then the window; Rolling Forcing's re-roped sink, LongLive 2's
KV-relative RoPE), so positions never leave the trained range however long the stream. The dense-mask path is
absolute only.

The cache is batch-agnostic: it stores what the denoiser's calls pass (classifier-free guidance: the ``[uncond;
cond]`` batch), so every call of one stream must use the same batch layout. Wan 2.2 A14B's two experts would each
need their own cache (the context pass runs the low-noise expert only), so streaming refuses two-expert models;
the full-sequence mask works there.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..backbones.causal_attention import CausalAttentionSpec, causal_attention_spec
from .configs import BlockCausalConfig
from .dit_attention import (
    DiTAttentionSite,
    DiTWindowHook,
    denoiser_models,
    register_dit_window_hooks,
    remove_hooks,
)

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "BLOCK_CAUSAL_HOOK",
    "BlockCausalConfig",
    "BlockCausalHandle",
    "KVCache",
    "apply_block_causal",
    "applied_block_causal",
    "block_causal_mask",
]

BLOCK_CAUSAL_HOOK = "longgen_block_causal"
_GRID_HOOK = "longgen_block_causal_grid"


def block_causal_mask(
    num_frames: int, tokens_per_frame: int, config: BlockCausalConfig, device: Any = None
) -> torch.Tensor:
    """Dense boolean ``[S, S]`` mask (True = attend) of block-causal attention over ``num_frames`` latent frames."""
    frames = torch.arange(num_frames, device=device)
    ends = (frames // config.chunk_size + 1) * config.chunk_size  # [F] end of each query frame's chunk
    seen = frames[None, :] < ends[:, None]
    if config.recent_frames is not None:
        seen &= (frames[None, :] < config.sink_size) | (
            frames[None, :] >= ends[:, None] - config.recent_frames
        )
    return seen.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


@dataclass
class _StreamCall:
    start: int
    num_frames: int
    write: bool


class KVCache:
    """Keys/values of finished latent frames per self-attention layer (un-rotated, ``[B, h*w, heads, head_dim]``
    per frame), and the streaming call currently open. Owned by a :class:`BlockCausalHandle`."""

    def __init__(self, config: BlockCausalConfig):
        self.config = config
        self.layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.active: _StreamCall | None = None
        self.num_models = 1
        self.attached = True
        """False once the handle's hooks are removed: streaming through a detached cache is an error."""
        """Denoising networks sharing this cache; streaming needs exactly one (see the module docstring)."""
        self._rope_memo: dict[tuple, Any] = {}

    @contextmanager
    def stream(self, start: int, num_frames: int, write: bool = False) -> Iterator[None]:
        """Model calls inside see only latent frames ``[start, start + num_frames)`` plus the cache; with
        ``write`` they store those frames' keys/values (the clean context pass)."""
        if self.active is not None:
            raise RuntimeError("a streaming call is already open on this KV cache")
        if not self.attached:
            raise RuntimeError(
                "the block-causal hooks of this KV cache were removed: call apply_block_causal again and stream "
                "through the new handle's cache"
            )
        if self.num_models != 1:
            raise ValueError(
                "KV-cache streaming on a two-expert model (Wan 2.2 A14B) is not supported: each expert would need "
                "its own cache; use a single-transformer model, or the full-clip block-causal mask with another sampler"
            )
        if start < 0 or num_frames < 1:
            raise ValueError(f"stream needs start >= 0 and num_frames >= 1, got {start}, {num_frames}")
        self.active = _StreamCall(int(start), int(num_frames), bool(write))
        self._rope_memo.clear()
        try:
            yield
        finally:
            self.active = None
            self._rope_memo.clear()
        if write and not self.layers:
            raise RuntimeError(
                "a KV-cache write call ran no block-causal attention layer: the model called is not the one "
                "apply_block_causal hooked"
            )

    def rope_table(self, spec: CausalAttentionSpec, model, positions: torch.Tensor, h: int, w: int) -> Any:
        """The family's rotary table of ``positions``; shared by every layer of one streaming call (the
        tables are read again per call, so a RoPE extension that rewrites them in between applies)."""
        if self.active is None:
            return spec.rope_table(model, positions, h, w)
        key = (id(model), tuple(positions.tolist()), h, w)
        if key not in self._rope_memo:
            self._rope_memo[key] = spec.rope_table(model, positions, h, w)
        return self._rope_memo[key]

    def clear(self) -> None:
        """Forget every cached frame (a new video, or before LongLive's KV recache)."""
        self.layers.clear()

    @property
    def frames(self) -> list[int]:
        """Latent frames currently cached (the same in every layer), ascending."""
        first = next(iter(self.layers.values()), {})
        return sorted(first)

    def num_bytes(self) -> int:
        """Memory held by the cached keys and values."""
        return sum(
            k.numel() * k.element_size() * 2 for layer in self.layers.values() for k, _ in layer.values()
        )

    def store(
        self, name: str, first_frame: int, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int
    ) -> None:
        """Cache the frames of one write call of layer ``name`` and evict what no later chunk can see."""
        layer = self.layers.setdefault(name, {})
        for i in range(k.shape[1] // tokens_per_frame):
            sl = slice(i * tokens_per_frame, (i + 1) * tokens_per_frame)
            layer[first_frame + i] = (k[:, sl].clone(), v[:, sl].clone())
        end = first_frame + k.shape[1] // tokens_per_frame
        keep_from = self.config.first_needed(self.config.chunk_end(end - 1) + self.config.chunk_size)
        for frame in [f for f in layer if self.config.sink_size <= f < keep_from]:
            del layer[frame]


class _BlockCausalHook(DiTWindowHook):
    """Block-causal (and streaming KV-cache) attention on one video self-attention layer."""

    def __init__(
        self, site: DiTAttentionSite, model: torch.nn.Module, spec: CausalAttentionSpec, cache: KVCache
    ):
        super().__init__(site, "block-causal attention")
        self.model = model
        self.spec = spec
        self.cache = cache
        self.config = cache.config

    def new_forward(self, module, *args, **kwargs):
        call = self.bind(args, kwargs)
        text = call.get("encoder_hidden_states")
        if (text is not None) != self.joint:  # a cross-attention call (video-only families): untouched
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = call["hidden_states"]
        f, h, w = self.token_grid(hidden)
        stream = self.cache.active
        if type(module.processor).__name__ not in self.spec.processors:
            raise RuntimeError(
                f"{self.name} runs {type(module.processor).__name__}; block-causal attention knows "
                f"{', '.join(self.spec.processors)}: reset the attention processor or remove the causal extension"
            )
        if stream is None:
            if not self.joint and bool(block_causal_mask(f, 1, self.config).all()):
                return self.fn_ref.original_forward(*args, **kwargs)  # one chunk covers the clip: identity
            # (joint attention is never the identity: its text tokens attend to the text only)
            if self.config.attention == "mask":
                mask = block_causal_mask(f, h * w, self.config, hidden.device)
                mask = self.spec.dense_mask(mask, hidden.shape[0], 0 if text is None else text.shape[1])
                if call.get("attention_mask") is not None:
                    mask = mask & call["attention_mask"].to(torch.bool)
                return self.fn_ref.original_forward(**{**call, "attention_mask": mask})
            start, cached, write = 0, {}, False
        else:
            if stream.num_frames != f:
                raise RuntimeError(
                    f"{self.name}: the streaming call was opened for {stream.num_frames} latent frames but the model "
                    f"got {f}"
                )
            start, cached, write = stream.start, self.cache.layers.get(self.name, {}), stream.write
        if text is not None:
            return self._attend_joint(module, hidden, text, call.get("attention_mask"), start, (f, h, w), cached, write)
        if call.get("attention_mask") is not None:
            raise ValueError(
                "block-causal attention supplies the causal structure, but the model passed its own attention mask "
                "(SkyReels-V2 causal_block_size > 1): set the adapter's causal block size to 1 "
                "(adapter.set_causal_block_size(1)) or use --causal-attention mask without streaming"
            )
        out = self._attend_chunks(module, hidden, start, f, h, w, cached, write)
        return self.spec.output(module, out)

    def _attend_joint(self, module, hidden, text, attention_mask, start, grid, cached, write):
        """Joint text-video attention (CogVideoX, HunyuanVideo): the video of each chunk attends to every text token
        and to the video it may see; the text tokens attend to the text only. Returns ``(video, text)``."""
        spec = self.spec
        tq, tk, tv = spec.project_text(module, text)  # [B, L, heads, head_dim], no rotation
        key_mask = spec.text_key_mask(attention_mask, hidden.shape[1], text.shape[1])  # [B, 1, 1, L] or None
        video = self._attend_chunks(module, hidden, start, *grid, cached, write, text_kv=(tk, tv, key_mask))
        text_out = spec.attend(module, tq, tk, tv, key_mask)
        return spec.output(module, video), spec.output_text(module, text_out)

    def _attend_chunks(self, module, hidden, start, f, h, w, cached, write, text_kv=None) -> torch.Tensor:
        """Each chunk of frames ``[start, start + f)``: queries against the cached and this call's visible keys
        (joint attention: and ``text_kv = (keys, values, key mask or None)`` of the text tokens)."""
        spec, config, hw = self.spec, self.config, h * w
        q, k, v = spec.project(module, hidden)  # [B, f*h*w, heads, head_dim], un-rotated
        # cached frames before this call (its own frames, if cached too, come from this call)
        cached_frames = torch.tensor(sorted(f for f in cached if f < start), dtype=torch.long)
        outputs = []
        a = start
        while a < start + f:
            b = min(config.chunk_end(a), start + f)
            own = torch.arange(start, b)
            key_frames = torch.cat(
                [cached_frames[config.visible(cached_frames, b)], own[config.visible(own, b)]]
            )
            keys, values = [], []
            for frame in key_frames.tolist():
                if frame < start:
                    keys.append(cached[frame][0])
                    values.append(cached[frame][1])
            runs = _runs([fr - start for fr in key_frames.tolist() if fr >= start])
            keys += [k[:, i * hw : j * hw] for i, j in runs]
            values += [v[:, i * hw : j * hw] for i, j in runs]
            if config.rope_positions == "absolute":
                key_pos, query_pos = key_frames, torch.arange(a, b)
            else:
                key_pos = torch.arange(key_frames.numel())
                query_pos = key_pos[key_pos.numel() - (b - a) :]
            rope = self.cache.rope_table
            qa = spec.apply_rope(
                q[:, (a - start) * hw : (b - start) * hw], rope(spec, self.model, query_pos, h, w)
            )
            ka = spec.apply_rope(torch.cat(keys, dim=1), rope(spec, self.model, key_pos, h, w))
            va, mask = torch.cat(values, dim=1), None
            if text_kv is not None:
                tk, tv, text_mask = text_kv
                if text_mask is not None:  # every video key is valid, the padded text keys are not
                    mask = torch.cat([text_mask.new_ones(*text_mask.shape[:-1], ka.shape[1]), text_mask], dim=-1)
                ka, va = torch.cat([ka, tk], dim=1), torch.cat([va, tv], dim=1)
            outputs.append(spec.attend(module, qa, ka, va, mask))
            a = b
        if write:
            self.cache.store(self.name, start, k, v, hw)
        return torch.cat(outputs, dim=1)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[(i, j), ...]`` of ascending integers."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class BlockCausalHandle:
    """Handle of applied block-causal attention: ``.cache`` (the :class:`KVCache` samplers stream through),
    ``.config``, ``.remove()`` (stock model back) and ``.describe()``."""

    def __init__(
        self,
        adapter: BackboneAdapter,
        config: BlockCausalConfig,
        cache: KVCache,
        removers: list | None = None,
    ):
        self.adapter = adapter
        self._removers = list(removers or [])
        self.config = config
        self.cache = cache
        self._removed = False

    def remove(self) -> None:
        if not self._removed:
            remove_hooks(self.adapter, BLOCK_CAUSAL_HOOK, _GRID_HOOK)
            for remove in self._removers:
                remove()
            self.cache.clear()
            self.cache.attached = False
            self._removed = True

    def describe(self) -> dict[str, Any]:
        return {"method": "block_causal", **asdict(self.config)}


_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""adapter -> its BlockCausalHandle (the registry removes by adapter)."""


def applied_block_causal(adapter: BackboneAdapter) -> BlockCausalHandle | None:
    """The handle of block-causal attention already on ``adapter`` (or on the adapter a training view wraps,
    :class:`~longgen.training.denoiser.AdapterView`), else None: causal training keeps its mask on, and its
    validation samples through the same hooks."""
    handle = _APPLIED.get(adapter.unwrapped)
    return None if handle is None or handle._removed else handle


def remove_block_causal(adapter: BackboneAdapter) -> None:
    """Remove block-causal attention from ``adapter`` (the extension registry's ``remove``); no-op if absent."""
    handle = _APPLIED.pop(adapter, None)
    if handle is not None:
        handle.remove()


def apply_block_causal(
    adapter: BackboneAdapter, config: BlockCausalConfig | None = None
) -> BlockCausalHandle:
    """Make every video self-attention of ``adapter``'s DiT block-causal over latent chunks (removable hooks)."""
    config = config or BlockCausalConfig()
    spec = causal_attention_spec(adapter)  # clear errors for UNets and families without a spec
    if int(adapter.patch_size[0]) != 1:
        raise ValueError(
            f"block-causal chunks count latent frames, but this {adapter.family!r} transformer groups "
            f"{adapter.patch_size[0]} latent frames per token; use --sampler sliding, fifo or df"
        )
    cache = KVCache(config)
    models = denoiser_models(adapter)
    cache.num_models = len(models)

    def make_hook(site: DiTAttentionSite) -> _BlockCausalHook:
        model = models[1] if site.name.startswith("transformer_2.") else models[0]
        return _BlockCausalHook(site, model, spec, cache)

    register_dit_window_hooks(adapter, _GRID_HOOK, BLOCK_CAUSAL_HOOK, make_hook)
    removers = [spec.install(model, cache) for model in models] if spec.install is not None else []
    handle = BlockCausalHandle(adapter, config, cache, removers)
    _APPLIED[adapter] = handle
    return handle
