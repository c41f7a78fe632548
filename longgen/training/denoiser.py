"""Explicit objects the trainer hands around instead of patching the adapter.

* :class:`DenoiserModule`: ``adapter.denoise`` as an ``nn.Module`` owning the trained network, so
  Accelerate's wrappers (DDP's gradient hooks, FSDP's unsharding, DeepSpeed's engine, autocast) see the
  whole model call. Training methods call the prepared module directly.
* :class:`EncodedPrompts`: a prompt-embedding source for a fixed prompt, encoded once before the text
  encoder is freed (training from a latent cache).
* :class:`AdapterView`: the adapter as the pipeline sees it during validation, with ``denoise`` and
  ``encode_prompt`` taken from the objects above; the adapter itself is never modified.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AdapterView", "DenoiserModule", "EncodedPrompts"]


class DenoiserModule(torch.nn.Module):
    """``adapter.denoise`` as an ``nn.Module`` that owns the trained network (``self.model``).

    Accelerate prepares this module, so DDP / FSDP / DeepSpeed / autocast wrap the whole denoiser call,
    conversions and all, while the stock diffusers network inside stays unmodified.
    """

    def __init__(self, adapter):
        super().__init__()
        self.model = adapter.model
        object.__setattr__(self, "_adapter", adapter)  # a plain reference, not a submodule

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self._adapter.denoise(x, sigma, cond)


class EncodedPrompts:
    """``encode_prompt`` for a fixed prompt, encoded once (before the text encoder is freed)."""

    def __init__(self, encode, prompts: list[str], negative_prompt: str | None, guidance: bool):
        negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
        self.key = (tuple(prompts), None if negatives is None else tuple(negatives), guidance)
        self.value = encode(prompts, negatives, do_classifier_free_guidance=guidance)

    def __call__(self, prompt, negative_prompt=None, image=None, do_classifier_free_guidance=True, **_):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        key = (tuple(prompts), None if negatives is None else tuple(negatives), do_classifier_free_guidance)
        if image is not None or key != self.key:
            raise RuntimeError(
                "the text encoder was freed because training reads text embeddings from the latent cache "
                f"(data.cache_dir); only the validation prompt {self.key[0]!r} was encoded. Generate other "
                "prompts with the exported weights (longgen generate)"
            )
        return self.value


class AdapterView:
    """The adapter with ``denoise`` / ``encode_prompt`` replaced *in this view only* (validation).

    Every other attribute is the adapter's own; writes go to the adapter. The pipeline calls
    ``adapter.denoise`` and ``adapter.encode_prompt`` through the object it is given, so generating with
    a view routes them through the prepared denoiser and the prompt source without touching the adapter.
    """

    def __init__(self, adapter, denoise=None, encode_prompt=None):
        object.__setattr__(self, "_adapter", adapter)
        object.__setattr__(self, "_overrides", {})
        if denoise is not None:
            self._overrides["denoise"] = denoise
        if encode_prompt is not None:
            self._overrides["encode_prompt"] = encode_prompt

    @property
    def unwrapped(self):
        """The adapter this view wraps."""
        return object.__getattribute__(self, "_adapter")

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_adapter"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._adapter, name, value)
