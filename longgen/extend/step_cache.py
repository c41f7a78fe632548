"""Step caching with diffusers' cache hooks (First Block Cache, TaylorSeer), one cache state per window.

First Block Cache (ParaAttention, Cheng 2024): run the first transformer block; if its residual changed by
less than ``threshold`` (relative absmean) since this state's previous call, reuse the cached residual of the
other blocks. TaylorSeer (Liu et al. 2025, arXiv 2503.06923): full computations every ``interval`` steps,
Taylor-extrapolated block outputs in between. Both keep state between calls, and diffusers keys that state by
the name of the ``cache_context``. A clip-level state is wrong for windowed samplers: consecutive calls belong to
different windows (fifo, df: at different per-frame noise levels), so the cache would compare window 2 to window
1. Here every call runs in the context named by the window it denoises (:func:`longgen.samplers.base.window_scope`,
set by ``sliding`` and ``fifo``: window index, or the window group of a batched call) plus the input shape, so
each window is compared with its own previous step. Calls outside a window scope (``full``, ``df``) share one
state per input shape. A state whose noise level rises (a new sampling run, or a new chunk) is dropped first,
so no run reuses another run's residuals or step counts; ``df`` denoises one window per call, chunk after
chunk, so its state is per chunk (``describe()["contexts"][name]["fresh_starts"]`` counts the drops). Decisions of a batched call cover all its windows
(diffusers' hooks decide once per call).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any

import torch

from ..samplers.base import current_window_key
from .configs import StepCacheConfig

__all__ = ["StepCacheConfig", "StepCacheState", "apply_step_cache", "remove_step_cache"]

_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""adapter -> its applied :class:`StepCacheState`."""
_ATTENTION_PATTERN = r"^(blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)\.\d+\.attn\d*$"


class StepCacheState:
    """The applied cache: per context name, model calls and full computations (``describe()``)."""

    def __init__(self, model: torch.nn.Module, config: StepCacheConfig, original_denoise: Any):
        self.model, self.config, self.original_denoise = model, config, original_denoise
        self.calls: dict[str, int] = defaultdict(int)
        self.full: dict[str, int] = defaultdict(int)
        self._level: dict[str, float] = {}
        self.fresh_starts: dict[str, int] = defaultdict(int)
        self._managers = self._find_state_managers()  # the hooks are fixed once installed: look them up once

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """The adapter's denoise inside this window's cache context."""
        name = f"{current_window_key() or 'clip'}|{'x'.join(map(str, x.shape))}"
        level = float(sigma.max())
        if name in self._level and level > self._level[name] + 1e-6:
            self._drop(name)  # the noise went up: a new run (or chunk) starts in this slot
            self.fresh_starts[name] += 1
        self._level[name] = level
        with self.model.cache_context(name):
            out = self.original_denoise(x, sigma, cond)
        self.calls[name] += 1
        self.full[name] += int(self._computed(name))
        return out

    def _find_state_managers(self) -> list[Any]:
        from diffusers.hooks.hooks import StateManager

        managers = []
        for module in self.model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook in getattr(registry, "hooks", {}).values():
                managers += [v for v in vars(hook).values() if isinstance(v, StateManager) and v not in managers]
        return managers

    def _drop(self, name: str) -> None:
        for manager in self._managers:
            manager._state_cache.pop(name, None)  # diffusers keeps per-context states in this dict

    def _computed(self, name: str) -> bool:
        """Whether the last call in ``name`` ran all blocks (read back from the hooks' state)."""
        from diffusers.hooks.first_block_cache import FBCSharedBlockState
        from diffusers.hooks.taylorseer_cache import TaylorSeerState

        cfg = self.config
        for manager in self._managers[:1]:  # FBC: one shared state; TaylorSeer: every hook on the same schedule
            state = manager._state_cache.get(name)
            if isinstance(state, FBCSharedBlockState):
                return bool(state.should_compute)
            if isinstance(state, TaylorSeerState):
                step = state.current_step
                return step < cfg.warmup_steps or (step - cfg.warmup_steps - 1) % cfg.interval == 0
        return True

    def describe(self) -> dict[str, Any]:
        """Per context: ``{"calls", "full"}``; totals, and the share of calls that skipped computation."""
        calls, full = sum(self.calls.values()), sum(self.full.values())
        return {
            "kind": self.config.kind,
            "calls": calls,
            "full": full,
            "skipped_fraction": 0.0 if not calls else 1.0 - full / calls,
            "contexts": {
                k: {"calls": self.calls[k], "full": self.full[k], "fresh_starts": self.fresh_starts[k]} for k in self.calls
            },
        }

    def reset(self) -> None:
        """Forget every context (counts and cached tensors)."""
        for name in list(self._level):
            self._drop(name)
        self._level.clear()
        self.calls.clear()
        self.full.clear()
        self.fresh_starts.clear()


def _diffusers_config(config: StepCacheConfig) -> Any:
    if config.kind == "fbc":
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=config.threshold)
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(
        cache_interval=config.interval,
        disable_cache_before_step=config.warmup_steps,
        max_order=config.order,
        taylor_factors_dtype=torch.float32,  # fp32 factors: bf16 would add its own drift on top of the cache's
        # diffusers' default patterns ("^blocks.*attn", fullmatch) miss numbered attentions (Wan's attn1/attn2)
        cache_identifiers=[_ATTENTION_PATTERN],
    )


def apply_step_cache(adapter: Any, config: StepCacheConfig | None = None) -> StepCacheState:
    """Install diffusers' ``config.kind`` cache hook on the adapter's transformer, with per-window states."""
    config = config or StepCacheConfig()
    model = adapter.model
    if adapter in _APPLIED:
        raise ValueError("a step cache is already applied to this model; remove it first (handle.remove())")
    if not hasattr(model, "enable_cache") or not hasattr(model, "cache_context"):
        raise ValueError(
            f"--extension cache needs a diffusers transformer with cache hooks; {type(model).__name__} has none "
            "(UNet backbones: AnimateDiff, SVD). Use a DiT backbone (Wan, LTX, CogVideoX, HunyuanVideo) or drop "
            "--extension cache"
        )
    try:
        model.enable_cache(_diffusers_config(config))
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise ValueError(
            f"diffusers' {config.kind} cache does not support {type(model).__name__} ({error}); try "
            f"--cache-kind {'taylorseer' if config.kind == 'fbc' else 'fbc'} or drop --extension cache"
        ) from error
    state = StepCacheState(model, config, adapter.denoise)
    if not state._managers:
        model.disable_cache()
        raise ValueError(
            f"diffusers' {config.kind} cache found no block to hook in {type(model).__name__}; drop --extension cache"
        )
    adapter.denoise = state.denoise  # instance attribute over the class method; removed by remove_step_cache
    _APPLIED[adapter] = state
    return state


def remove_step_cache(adapter: Any) -> None:
    """Remove the cache hooks and the wrapper, restoring the stock model and ``adapter.denoise``."""
    state = _APPLIED.pop(adapter, None)
    if state is None:
        return
    state.reset()
    adapter.model.disable_cache()
    if adapter.__dict__.get("denoise") == state.denoise:
        del adapter.denoise
