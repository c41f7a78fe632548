"""Self-Forcing DMD under two-process DDP and FSDP2 on CPU (gloo), through the sharded tests' worker.

Student and critic are two prepared modules with two optimizers: FSDP2 shards both and must train the same
student as DDP (averaged gradients, global-norm clipping, AdamW: the same maths), and a new launch resuming
from the sharded step-2 checkpoint must end with the same losses and weights (both networks, both
optimizers, the schedules and the RNG). Under DeepSpeed the method refuses with a message naming the fix.
"""

from __future__ import annotations

import json
import os

import pytest
from cpu_launch import cpu_launch_config
from test_train_sharded import (
    _assert_same_lora,
    _launch,
    _lora,
    clips,  # noqa: F401  (the module-scoped clip fixture)
)

DMD = [
    "objective.method=dmd",
    "extension.method=block-causal",
    "extension.options={chunk_size: 1}",
    "dmd.generator_every=2",
    "dmd.critic_lr=1e-2",
]


@pytest.mark.slow
def test_dmd_fsdp2_matches_ddp_and_resumes_exactly(tmp_path, clips):  # noqa: F811
    ddp_args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    (tmp_path / "ddp").mkdir()
    _launch(tmp_path / "ddp", clips, "straight", "ddp", ddp_args, extra=DMD)
    fsdp = ["--config_file", cpu_launch_config("fsdp", tmp_path)]
    _launch(tmp_path, clips, "straight", "fsdp", fsdp, extra=DMD)
    step2 = os.path.join(tmp_path, "straight", "checkpoints", "step_00000002")
    _launch(tmp_path, clips, "resumed", "fsdp", fsdp, extra=[*DMD, f"train.resume={step2}"])

    ddp = json.load(open(tmp_path / "ddp" / "straight_rank0.json"))
    straight = json.load(open(tmp_path / "straight_rank0.json"))
    assert straight["distributed_type"].endswith("FSDP") and straight["shard_fraction"] <= 0.5 + 1e-9, straight
    assert len(straight["losses"]) == 4
    assert straight["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    _assert_same_lora(_lora(str(tmp_path / "straight")), _lora(str(tmp_path / "ddp" / "straight")), atol=2e-5)

    resumed = json.load(open(tmp_path / "resumed_rank0.json"))
    assert resumed["steps"] == [3, 4], resumed
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
    _assert_same_lora(_lora(str(tmp_path / "resumed")), _lora(str(tmp_path / "straight")), atol=1e-6)
