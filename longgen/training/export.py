"""Exporting trained weights for use outside longgen (diffusers LoRA, a diffusers model folder, ExVideo).

Everything is written into a hidden temporary folder next to the target, given the umask's permissions
and renamed into place in one step, so ``final/`` is either the previous complete export or the new one.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from typing import Any

import torch

from ..files import replace_dir, share_permissions
from .build import AppliedExtension, sharded

logger = logging.getLogger(__name__)

EXTENSION_INFO = "longgen_extension.json"
EXVIDEO_WEIGHTS = "exvideo_weights.safetensors"

__all__ = ["EXTENSION_INFO", "EXVIDEO_WEIGHTS", "export_weights", "model_state_dict", "save_lora"]


def model_state_dict(accelerator, wrapped, adapter) -> dict[str, torch.Tensor]:
    """The trained network's full state dict (gathered under DeepSpeed / FSDP; all processes call)."""
    if sharded(accelerator):
        full = accelerator.get_state_dict(wrapped)
        if full is None:  # DeepSpeed ZeRO-3 gathers the 16-bit state dict on the main process only
            return {}
        return {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
    return adapter.model.state_dict()


def save_lora(folder: str, adapter, state_dict: dict[str, torch.Tensor]) -> None:
    """Diffusers LoRA format through the pipeline class's ``save_lora_weights`` (PEFT keys + config)."""
    from peft.utils import get_peft_model_state_dict

    model = adapter.model
    lora = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items()
    }
    peft_config = model.peft_config["default"].to_dict()
    pipe_cls = type(adapter.pipe)
    attr = adapter.model_attr
    save = getattr(pipe_cls, "save_lora_weights", None)
    params = inspect.signature(save).parameters if save is not None else {}
    if f"{attr}_lora_layers" in params:
        kwargs: dict[str, Any] = {f"{attr}_lora_layers": lora, "safe_serialization": True}
        if f"{attr}_lora_adapter_metadata" in params:
            kwargs[f"{attr}_lora_adapter_metadata"] = peft_config
        pipe_cls.save_lora_weights(folder, **kwargs)
        return
    # No LoRA loader on this pipeline (e.g. SVD): the model's own PEFT adapter file.
    logger.warning(
        "%s has no save_lora_weights; writing the LoRA with %s.save_lora_adapter (load it with "
        "model.load_lora_adapter)",
        pipe_cls.__name__,
        type(model).__name__,
    )
    model.save_lora_adapter(folder, safe_serialization=True)


def _save_full(folder: str, adapter, state_dict, is_sharded: bool) -> None:
    """A diffusers model folder (``save_pretrained``; from the gathered state dict when sharded)."""
    model = adapter.model
    if not is_sharded:
        model.save_pretrained(folder)
        return
    from safetensors.torch import save_file

    model.save_config(folder)
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(weights, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def export_weights(
    target: str,
    *,
    accelerator,
    wrapped,
    adapter,
    config,
    trainable_names: list[str],
    extension: AppliedExtension | None,
) -> str | None:
    """Write the trained weights to ``target`` (all processes call; the main one writes). Returns it."""
    accelerator.wait_for_everyone()
    state_dict = model_state_dict(accelerator, wrapped, adapter)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    parent, name = os.path.split(target)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if config.lora.enabled:
            save_lora(tmp, adapter, state_dict)
        elif extension is not None and extension.selects_parameters:
            from safetensors.torch import save_file

            trained = {n: state_dict[n].detach().cpu().contiguous() for n in trainable_names}
            save_file(trained, os.path.join(tmp, EXVIDEO_WEIGHTS))
        else:
            _save_full(os.path.join(tmp, adapter.model_attr), adapter, state_dict, sharded(accelerator))
        if extension is not None:
            with open(os.path.join(tmp, EXTENSION_INFO), "w") as fh:
                json.dump(extension.info, fh, indent=2)
        config.save(os.path.join(tmp, "config.yaml"))
        share_permissions(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported the trained weights to %s", target)
    accelerator.wait_for_everyone()
    return target
