"""Loading a fine-tune back for inference: LoRA files, full transformer folders, the trainer's extension record.

``train/train.py`` exports into ``final/``: a diffusers LoRA (``pytorch_lora_weights.safetensors``), or a model
folder (``final/transformer/``), or ExVideo's extra weights, plus ``longgen_extension.json`` when it trained with
an extension (RIFLEx, ExVideo, ...). Inference re-applies that extension (:func:`find_extension_record`) so the
model runs in the form it was trained in.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch

# The file names the trainer's export writes: the extension record and ExVideo's trained extra parameters.
from .training.export import EXTENSION_INFO, EXVIDEO_WEIGHTS

logger = logging.getLogger(__name__)

__all__ = [
    "EXTENSION_INFO",
    "EXVIDEO_WEIGHTS",
    "find_extension_record",
    "find_exvideo_weights",
    "load_exvideo_weights",
    "load_lora",
    "load_transformer",
    "parse_lora_spec",
]


def parse_lora_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); the scale defaults to 1.0 and must be a number."""
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or os.sep in tail or os.path.exists(text):
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(
            f"--lora {text!r}: the scale after ':' ({tail!r}) is not a number; write PATH:SCALE, e.g. "
            f"{path}:0.8, or PATH alone for scale 1"
        ) from None
    if not path:
        raise ValueError(f"--lora {text!r} names no file; write PATH[:SCALE]")
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text!r}: the scale {tail!r} is not a finite number; write e.g. {path}:0.8")
    return path, scale


def lora_location(path: str) -> tuple[str, str | None]:
    """(folder, weight file name or None) of a LoRA file or a folder holding one; clear errors otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--lora {path!r} does not exist; pass the .safetensors file train/train.py exported "
            "(<output_dir>/final/pytorch_lora_weights.safetensors) or its folder"
        )
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"--lora {path!r} is not a .safetensors file (pickled weights are not loaded)")
        return os.path.dirname(path) or ".", os.path.basename(path)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != EXVIDEO_WEIGHTS)
    if not files:
        raise FileNotFoundError(f"--lora {path!r}: the folder holds no LoRA .safetensors file")
    if "pytorch_lora_weights.safetensors" in files or len(files) == 1:
        return path, "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files else files[0]
    raise ValueError(f"--lora {path!r}: several .safetensors files ({', '.join(files)}); name the one to load")


def load_lora(adapter, path: str, adapter_name: str, loaded: dict[str, float]) -> None:
    """Load a diffusers-format LoRA into the adapter's pipeline (PEFT backend) and set every loaded adapter's
    weight (``loaded``: name -> scale, this one included), as ``load_lora_weights`` + ``set_adapters`` do."""
    pipe = adapter.pipe
    folder, weight_name = lora_location(path)
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(
            f"{type(pipe).__name__} has no LoRA loader in diffusers (load_lora_weights), so --lora cannot "
            "apply to this model; merge the LoRA into the weights and pass the folder with --transformer"
        )
    model = adapter.model
    try:
        from safetensors import safe_open

        with safe_open(os.path.join(folder, weight_name), framework="pt"):
            pass
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        raise ValueError(f"--lora {path!r} is not a readable safetensors file ({err}); re-export it") from None
    try:
        pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, OSError) as err:
        raise ValueError(
            f"--lora {path!r} does not fit this {adapter.family} model ({type(model).__name__}): "
            f"{str(err).splitlines()[0][:300].rstrip('. ')}. Pass a LoRA trained on this base model"
        ) from None
    if adapter_name not in (getattr(model, "peft_config", None) or {}):
        raise ValueError(
            f"--lora {path!r}: none of its weights match this {adapter.family} model ({type(model).__name__}); "
            "it is a LoRA for another model. Pass a LoRA trained on this base model"
        )
    pipe.set_adapters(list(loaded), list(loaded.values()))
    logger.info("loaded LoRA %s as %r at scale %g", path, adapter_name, loaded[adapter_name])


def _model_component(index: dict[str, Any], model_attr: str) -> str:
    entry = index.get(model_attr)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        raise ValueError(f"the pipeline's model_index.json lists no {model_attr!r} component")
    return entry[1]


def transformer_folder(path: str, model_attr: str) -> str:
    """The model folder of ``--transformer``: a diffusers model folder, or a trainer's ``final/`` holding one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--transformer {path!r} is not a folder; pass a diffusers model folder (config.json + "
            f"*.safetensors) or the trainer's final/ folder with {model_attr}/ inside"
        )
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, model_attr)):
        path = os.path.join(path, model_attr)
    if not os.path.isfile(os.path.join(path, "config.json")):
        if any(f.endswith(".safetensors") and "lora" in f for f in os.listdir(path)):
            raise FileNotFoundError(
                f"--transformer {path!r} holds LoRA weights, not a full model: load them with --lora {path}"
            )
        raise FileNotFoundError(f"--transformer {path!r} has no config.json: not a diffusers model folder")
    return path


def _read_config(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "config.json")) as fh:
        return json.load(fh)


def load_transformer(
    path: str, index: dict[str, Any], model_attr: str, dtype: torch.dtype, base_folder: str | None = None
) -> torch.nn.Module:
    """A full fine-tune's model folder, checked against the base pipeline's architecture: the class, and the
    config values it shares with ``base_folder/<model_attr>/config.json`` (sizes, layers, heads)."""
    import diffusers

    folder = transformer_folder(path, model_attr)
    expected = _model_component(index, model_attr)
    config = _read_config(folder)
    found = config.get("_class_name")
    if found != expected:
        raise ValueError(
            f"--transformer {path!r} is a {found} but this pipeline's {model_attr} is a {expected}: pass a "
            f"fine-tune of this base model"
        )
    base = os.path.join(base_folder, model_attr) if base_folder else None
    if base and os.path.isfile(os.path.join(base, "config.json")):
        stock = _read_config(base)
        differ = sorted(k for k in config if not k.startswith("_") and k in stock and config[k] != stock[k])
        if differ:
            shown = ", ".join(f"{k}: {config[k]!r} vs {stock[k]!r}" for k in differ[:4])
            raise ValueError(
                f"--transformer {path!r} is another {expected} than this pipeline's ({shown}): pass a fine-tune "
                "of this base model"
            )
    cls = getattr(diffusers, expected)
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except (ValueError, RuntimeError, OSError) as err:
        raise ValueError(
            f"--transformer {path!r} does not load as this pipeline's {expected}: {str(err).splitlines()[0][:300]}"
        ) from None


def _neighbour_folders(path: str) -> list[str]:
    """Where a fine-tune's side files sit: its folder (a LoRA file's folder), and ``final/`` above a model folder."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isfile(os.path.join(folder, "config.json")):  # final/transformer: the record sits in final/
        return [folder, os.path.dirname(os.path.abspath(folder))]
    return [folder]


def find_extension_record(path: str) -> tuple[str, dict[str, Any]] | None:
    """(json path, record) of ``longgen_extension.json`` next to a LoRA file, in a LoRA / ``final/`` folder or
    above a ``final/transformer`` folder; None when there is none."""
    for candidate in _neighbour_folders(path):
        file = os.path.join(candidate, EXTENSION_INFO)
        if os.path.isfile(file):
            try:
                with open(file) as fh:
                    record = json.load(fh)
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{file} is not readable JSON ({err}); pass --no-auto-extension to skip it") from None
            if not isinstance(record, dict) or "method" not in record:
                raise ValueError(f"{file} names no extension 'method'; pass --no-auto-extension to skip it")
            return file, record
    return None


def find_exvideo_weights(path: str) -> str | None:
    """ExVideo's exported extra weights next to a fine-tune (see :data:`EXVIDEO_WEIGHTS`), or None."""
    for candidate in _neighbour_folders(path):
        file = os.path.join(candidate, EXVIDEO_WEIGHTS)
        if os.path.isfile(file):
            return file
    return None


def load_exvideo_weights(adapter, file: str) -> int:
    """Load ExVideo's trained parameters (names of the model's state dict) into the extended model."""
    from safetensors.torch import load_file

    model = adapter.model
    weights = load_file(file)
    params = dict(model.named_parameters())
    missing = sorted(k for k in weights if k not in params)
    if missing:
        raise ValueError(
            f"{file}: {len(missing)} weight(s) have no parameter in the model (e.g. {missing[0]!r}); ExVideo "
            "must be applied with the settings it was trained with (do not override --extension)"
        )
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{file}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    logger.info("loaded %d ExVideo weights from %s", len(weights), file)
    return len(weights)
