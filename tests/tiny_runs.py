"""Helpers of the training tests (``from tiny_runs import ...``: tests/conftest.py puts tests/ on sys.path)."""

from __future__ import annotations


def tiny_lora_config(tmp_path, clips, *overrides):
    """A 2-step LoRA run of the tiny Wan on ``clips`` (the ``clips`` fixture), with dotted overrides."""
    from longgen.training.config import load_config

    return load_config(
        None,
        [
            f"data.source={clips}",
            "data.num_frames=9",
            f"train.output_dir={tmp_path}",
            "train.batch_size=2",
            "train.steps=2",
            "lora.rank=4",
            "optim.lr=1e-2",
            *overrides,
        ],
    )


def run_trainer(config):
    """Train ``config``; returns ``(trainer, result)``, the trainer always closed."""
    from longgen.training.loop import Trainer

    trainer = Trainer(config)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()
