"""Exact resume: N steps straight == N/2 steps, stop, --resume latest, N/2 more; torn checkpoints are ignored."""

from __future__ import annotations

import os

import pytest
import torch

from longgen.training.checkpoint import (
    COMPLETE_MARKER,
    checkpoint_root,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
)
from longgen.training.config import load_config
from longgen.training.loop import Trainer

STEPS = 6


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    from longgen.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("clips"), num_videos=4, num_frames=17, height=32, width=32
    )


def _config(out, clips, *overrides):
    # 4 clips, batch 2: an epoch is 2 steps, so the run crosses epochs and the stop lands mid-epoch.
    # Random clip starts, a warm-up + cosine schedule, EMA and diffusion-forcing levels all have state.
    return load_config(
        None,
        [
            f"data.source={clips}",
            "data.num_frames=9",
            "data.random_start=true",
            "data.caption_dropout=0.3",
            f"train.output_dir={out}",
            f"train.steps={STEPS}",
            "train.batch_size=2",
            "train.checkpoint_every=100",
            "lora.rank=4",
            "optim.lr=5e-3",
            "optim.schedule=cosine",
            "optim.warmup_steps=2",
            "ema.enabled=true",
            "ema.decay=0.8",
            "objective.mode=diffusion_forcing",
            *overrides,
        ],
    )


def _run(config):
    trainer = Trainer(config)
    try:
        result = trainer.train()
        state = {
            n: p.detach().clone() for n, p in trainer.adapter.model.named_parameters() if p.requires_grad
        }
        ema = [p.clone() for p in trainer.ema.shadow_params]
        lr = trainer.scheduler.get_last_lr()[0]
    finally:
        trainer.close()
    return result, state, ema, lr


def test_resume_continues_the_same_run_exactly(tmp_path, clips):
    straight, weights_a, ema_a, lr_a = _run(_config(tmp_path / "a", clips))

    half = STEPS // 2 + 1  # step 4: mid-way through the third epoch
    first, _, _, _ = _run(_config(tmp_path / "b", clips, f"train.stop_after_steps={half}"))
    assert first.step == half and first.final_dir is None  # stopped, not finished: no export
    root = checkpoint_root(tmp_path / "b")
    assert [s for s, _ in list_checkpoints(root)] == [half]
    # A save killed midway leaves a temp folder; a folder without the marker is torn too. Both are ignored.
    os.makedirs(os.path.join(root, ".tmp-step_00000005"))
    open(os.path.join(root, ".tmp-step_00000005", "optimizer.bin"), "w").write("garbage")
    os.makedirs(os.path.join(root, "step_00000005"))
    assert latest_checkpoint(root).endswith(f"step_{half:08d}")

    _foreign_checkpoints_are_refused_unread(tmp_path, clips, latest_checkpoint(root))

    second, weights_b, ema_b, lr_b = _run(_config(tmp_path / "b", clips, "train.resume=latest"))
    assert second.step == STEPS
    assert sorted(second.losses) == list(range(half + 1, STEPS + 1))
    for step in second.losses:
        assert second.losses[step] == pytest.approx(straight.losses[step], abs=1e-6), step
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=1e-6, rtol=0, msg=name)
    for a, b in zip(ema_a, ema_b):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert lr_b == pytest.approx(lr_a, abs=1e-12)
    assert not os.path.exists(os.path.join(root, ".tmp-step_00000005"))  # the next save cleaned it up
    # the same data in the same order on both runs (each step's clips and random starts)
    assert os.path.exists(tmp_path / "b" / "final" / "pytorch_lora_weights.safetensors")


def test_resume_resolution_rules(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: fresh start
    root = checkpoint_root(tmp_path)
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = os.path.join(root, f"step_{step:08d}")
        os.makedirs(folder)
        if complete:
            open(os.path.join(folder, COMPLETE_MARKER), "w").write("{}")
    assert [s for s, _ in list_checkpoints(root)] == [2, 4]
    assert resolve_resume("latest", tmp_path).endswith("step_00000004")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(os.path.join(root, "step_00000006"), tmp_path)
    with pytest.raises(FileNotFoundError, match="pass 'latest' or a checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


class _Evil:
    """A pickle that creates a file when unpickled (what a crafted checkpoint could run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _foreign_checkpoints_are_refused_unread(tmp_path, clips, checkpoint):
    """Accelerate unpickles custom states with weights_only=False: a crafted one is refused before it runs, and
    a damaged optimizer state is a message naming the checkpoint, not a traceback."""
    import pickle
    import shutil

    evil, marker = tmp_path / "evil_ckpt", tmp_path / "PWNED"
    shutil.copytree(checkpoint, evil)
    with open(evil / "custom_checkpoint_0.pkl", "wb") as fh:
        pickle.dump(_Evil(str(marker)), fh)
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl is not a plain tensor state"):
        _run(_config(tmp_path / "c", clips, f"train.resume={evil}"))
    assert not marker.exists()
    damaged = tmp_path / "damaged_ckpt"
    shutil.copytree(checkpoint, damaged)
    data = (damaged / "optimizer.bin").read_bytes()
    (damaged / "optimizer.bin").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"checkpoint .*damaged_ckpt could not be read .*resume from an earlier"):
        _run(_config(tmp_path / "d", clips, f"train.resume={damaged}"))
