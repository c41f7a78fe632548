"""Two-process DDP on CPU (gloo) through ``accelerate launch`` runs train/train.py on the tiny recipe.

``accelerate launch --cpu --num_processes 2`` starts one process; ``--multi_gpu`` with
``ACCELERATE_USE_CPU=true`` gives two real processes talking over gloo.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_cpu_processes_train_on_different_clips(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which(
        "accelerate"
    )
    if accelerate is None:
        pytest.fail("the accelerate CLI is not installed next to this Python; pip install accelerate")
    from longgen.data.synthetic import write_synthetic_dataset

    manifest = write_synthetic_dataset(tmp_path / "clips", num_videos=4, num_frames=9, height=32, width=32)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        os.path.join(REPO, "train", "train.py"),
        "--config", os.path.join(REPO, "configs", "tiny_synthetic.yaml"),
        f"data.source={manifest}",
        f"train.output_dir={out}",
        "train.steps=2",
        "train.batch_size=1",
        "train.checkpoint_every=0",
        "train.log_data_paths=true",
        "ema.enabled=false",
        "validation.every=0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    seen = {}
    for rank in (0, 1):
        path = out / "data_paths" / f"rank{rank}.txt"
        assert path.exists(), f"rank {rank} did not train"
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        assert [int(r[0]) for r in rows] == [0, 1], rows  # one clip per step, two steps
        seen[rank] = [r[2] for r in rows]
    # 4 clips, 2 ranks x 1 clip x 2 steps: one epoch, each clip exactly once across the ranks
    assert not set(seen[0]) & set(seen[1]), seen
    counts = collections.Counter(seen[0] + seen[1])
    assert sorted(counts) == sorted(str(tmp_path / "clips" / f"video_{i:05d}.mp4") for i in range(4))
    assert os.path.exists(out / "final" / "pytorch_lora_weights.safetensors")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the main process alone logs
