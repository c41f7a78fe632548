"""Validation clips and losses reach real trackers: TensorBoard event files and an offline wandb run
(``WANDB_MODE=offline``: no network, no login)."""

from __future__ import annotations

import glob
import os

import pytest

from longgen.training.config import load_config
from longgen.training.loop import Trainer


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    from longgen.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("clips"), num_videos=2, num_frames=9, height=32, width=32
    )


def _train(out, clips, report_to: str):
    trainer = Trainer(
        load_config(
            None,
            [
                f"data.source={clips}",
                "data.num_frames=9",
                f"train.output_dir={out}",
                "train.batch_size=1",
                "train.steps=2",
                "train.checkpoint_every=0",
                "lora.rank=4",
                "validation.every=2",
                "validation.steps=2",
                "validation.num_frames=9",
                f"validation.report_to={report_to}",
            ],
        )
    )
    try:
        return trainer.train()
    finally:
        trainer.close()


def test_tensorboard_gets_losses_and_validation_frames(tmp_path, clips):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _train(tmp_path, clips, "tensorboard")
    events = glob.glob(str(tmp_path / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events, os.listdir(tmp_path / "logs")
    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([result.losses[1], result.losses[2]], rel=1e-6)
    images = acc.Images("validation/frames")
    assert [im.step for im in images] == [2]
    assert (images[0].width, images[0].height) == (8 * 32, 32)  # a strip of 8 frames of the step-2 clip


def test_wandb_offline_run_holds_the_validation_video(tmp_path, clips, monkeypatch):
    pytest.importorskip("wandb", reason="report_to=wandb needs `pip install wandb` (in longgen[dev])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _train(tmp_path, clips, "wandb")
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    videos = glob.glob(os.path.join(runs[0], "files", "media", "videos", "**", "*.mp4"), recursive=True)
    assert len(videos) == 1, videos
    from longgen.io import read_video

    assert read_video(videos[0]).shape == (9, 32, 32, 3)
    assert glob.glob(os.path.join(runs[0], "*.wandb"))  # the run's offline record, for `wandb sync`
