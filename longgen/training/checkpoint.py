"""Atomic, resumable training checkpoints on top of ``accelerator.save_state`` / ``load_state``.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``: Accelerate's state (optimizer, LR scheduler,
per-process RNG states, gradient-accumulation counter, custom objects such as the EMA and the
:class:`TrainingState`), the trained parameters, the resolved ``config.yaml`` and, written last,
``checkpoint.json``. Every process writes into ``.tmp-step_<N>`` first; the main process renames it
into place with one ``os.replace`` once everything is on disk. A run killed mid-save therefore leaves
only a ``.tmp-*`` folder, which resume ignores (and the next save removes), so ``--resume latest``
always finds the last complete checkpoint. Old checkpoints are pruned the same way (renamed out of
the ``step_*`` namespace, then deleted).

For plain (single-process / DDP) runs only the parameters that train are saved (LoRA weights, or the
selected subset of a full fine-tune), not the frozen base model; DeepSpeed and FSDP keep Accelerate's
own model and optimizer checkpointing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch

from ..files import share_permissions

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "checkpoint.json"
CONFIG_NAME = "config.yaml"
TRAINABLE_WEIGHTS = "trainable_{index}.safetensors"
_STEP_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")

__all__ = [
    "TrainingState",
    "checkpoint_root",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "register_trainable_state_hooks",
    "resolve_resume",
    "save_checkpoint",
]


@dataclass
class TrainingState:
    """Loop position saved with every checkpoint: optimizer steps done and the data position.

    ``batches_in_epoch`` counts the micro-batches this process has drawn in ``epoch``, so a resumed run
    skips exactly those (``accelerator.skip_first_batches``) and sees the same data as an uninterrupted one.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


def checkpoint_root(output_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(output_dir), CHECKPOINTS_DIR)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def is_complete(path: str) -> bool:
    """A checkpoint folder is complete when its marker (written last, before the rename) exists."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints ``[(step, path)]`` under ``root``, oldest first; half-written ones are left out."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if match is None or not os.path.isdir(path):
            continue
        if not is_complete(path):
            logger.warning("ignoring incomplete checkpoint %s (no %s)", path, COMPLETE_MARKER)
            continue
        found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """``None`` -> no resume; ``"latest"`` -> the newest complete checkpoint of the run (None when there is
    none yet, so a preemptible job can always pass ``--resume latest``); otherwise a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(checkpoint_root(output_dir))
        if path is None:
            logger.info("resume=latest: no complete checkpoint in %s yet; starting from scratch", output_dir)
        return path
    path = os.fspath(resume)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"train.resume={resume!r} is not a folder; pass 'latest' or a checkpoint folder such as "
            f"{os.path.join(checkpoint_root(output_dir), checkpoint_name(1000))}"
        )
    if not is_complete(path):
        raise ValueError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}: the save was interrupted); "
            "resume from an earlier one or use train.resume=latest"
        )
    return path


def load_checkpoint(accelerator, path: str) -> None:
    """``accelerator.load_state(path)``, safely and with a message that names the fix.

    Accelerate unpickles the custom objects' states (``custom_checkpoint_<i>.pkl``: the EMA, the step counter)
    with ``weights_only=False``, which runs whatever code a crafted file holds. Every such file is first read with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers; one that needs more was
    not written by this trainer and is refused unread. A damaged or foreign checkpoint is a ``ValueError`` naming
    the file and what to do instead of a traceback from deep inside the loader.
    """
    import pickle

    for name in sorted(os.listdir(path)):
        if re.fullmatch(r"custom_checkpoint_\d+\.pkl", name):
            try:
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any failure: the file is not a plain tensor state
                raise ValueError(
                    f"{os.path.join(path, name)} is not a plain tensor state (a weights-only load refused it: "
                    f"{_first_line(err)}); longgen does not unpickle it. Resume from a checkpoint this trainer wrote "
                    "(train.resume=latest picks the newest complete one) or start afresh in a new train.output_dir"
                ) from None
    try:
        accelerator.load_state(path)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"checkpoint {path} could not be read ({type(err).__name__}: {_first_line(err)}): it is damaged or "
            "was written by another run; resume from an earlier checkpoint of the run (train.resume=PATH) or "
            "start afresh in a new train.output_dir"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _remove_tree(path: str) -> None:
    """Delete a folder by first renaming it out of the checkpoint namespace (a kill mid-delete is harmless)."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f".del-{name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, config, extra: dict | None = None
) -> str:
    """Write a complete checkpoint for ``step`` atomically; call on every process. Returns its path."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, f".tmp-{checkpoint_name(step)}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a save or delete that was killed
            if name.startswith((".tmp-", ".del-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    if os.path.isdir(final) and is_complete(final):
        logger.info("checkpoint %s exists already", final)
        return final
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save(os.path.join(tmp, CONFIG_NAME))
        record = {
            "step": step,
            "time": time.time(),
            "num_processes": accelerator.num_processes,
            **(extra or {}),
        }
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as fh:
            json.dump(record, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        share_permissions(tmp)  # safetensors writes 0600 files; a team shares checkpoints by the umask
        if os.path.exists(final):  # an incomplete folder of the same step from an older layout
            _remove_tree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all); main process only."""
    if keep_last <= 0:
        return []
    removed = []
    for _, path in list_checkpoints(root)[:-keep_last]:
        _remove_tree(path)
        removed.append(path)
    return removed


def register_trainable_state_hooks(accelerator, is_trainable=None) -> None:
    """Save and load only the parameters that train (``requires_grad``) for plain / DDP runs.

    Accelerate would otherwise write the whole model, frozen base included, into every checkpoint. The
    hooks see only the models Accelerate saves itself (DeepSpeed and FSDP save through their engines).
    """
    from safetensors.torch import load_file, save_file

    def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            name: p.detach().to("cpu").contiguous()
            for name, p in model.named_parameters()
            if (p.requires_grad if is_trainable is None else is_trainable(name, p))
        }

    def save_hook(models, weights, output_dir):
        if not weights:
            return
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                save_file(
                    trainable(accelerator.unwrap_model(model)),
                    os.path.join(output_dir, TRAINABLE_WEIGHTS.format(index=index)),
                )
        weights.clear()  # Accelerate saves nothing else for these models

    def load_hook(models, input_dir):
        for index in range(len(models) - 1, -1, -1):
            path = os.path.join(input_dir, TRAINABLE_WEIGHTS.format(index=index))
            if not os.path.exists(path):
                continue  # a checkpoint with full model weights: Accelerate loads it
            model = accelerator.unwrap_model(models.pop(index))
            state = load_file(path)
            expected = trainable(model).keys()
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            if missing or unexpected:
                raise RuntimeError(
                    f"{path} does not match the model's trainable parameters (missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}): resume with the same lora / train.trainable_patterns settings"
                )
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
