"""Self-Forcing DMD under two-process DDP, FSDP2 and DeepSpeed ZeRO-2 on CPU (gloo), through the sharded tests' worker.

Student and critic are two prepared modules with two optimizers (under DeepSpeed: two engines, each stepping
itself). FSDP2 and ZeRO-2 must train the same student as DDP (averaged gradients, global-norm clipping, AdamW:
the same maths in fp32), and a new launch resuming from the step-2 checkpoint must end with the same losses and
weights (both networks, both optimizers, the schedules and the RNG). ZeRO-3 is refused (test_train_dmd.py).
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

from longgen.training.callbacks import FINAL_EMA_DIR

DMD = [
    "objective.method=dmd",
    "extension.method=block-causal",
    "extension.options={chunk_size: 1}",
    "dmd.generator_every=2",
    "dmd.critic_lr=1e-2",
]


@pytest.fixture(scope="module")
def dmd_ddp(tmp_path_factory, clips) -> str:  # noqa: F811
    """The two-process DDP DMD run every engine is compared with (one launch for the module)."""
    out = tmp_path_factory.mktemp("dmd_ddp")
    ddp_args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    _launch(out, clips, "straight", "ddp", ddp_args, extra=[*DMD, *EMA])
    return str(out)


EMA = ["ema.enabled=true", "ema.decay=0.5"]
"""The student's EMA (whole weights only: DDP and ZeRO-2, not FSDP2); decay 0.5 so it differs from the weights."""


@pytest.mark.slow
@pytest.mark.parametrize("config, backend", [("fsdp", "fsdp"), ("zero2", "deepspeed")])
def test_dmd_sharded_matches_ddp_and_resumes_exactly(tmp_path, clips, dmd_ddp, config, backend):  # noqa: F811
    launch = ["--config_file", cpu_launch_config(config, tmp_path)]
    extra = [*DMD, *(EMA if backend == "deepspeed" else [])]
    _launch(tmp_path, clips, "straight", backend, launch, extra=extra)
    step2 = os.path.join(tmp_path, "straight", "checkpoints", "step_00000002")
    _launch(tmp_path, clips, "resumed", backend, launch, extra=[*extra, f"train.resume={step2}"])

    ddp = json.load(open(os.path.join(dmd_ddp, "straight_rank0.json")))
    straight = json.load(open(tmp_path / "straight_rank0.json"))
    if backend == "fsdp":
        assert straight["distributed_type"].endswith("FSDP") and straight["shard_fraction"] <= 0.5 + 1e-9, straight
    else:  # ZeRO-2: the student's engine (weights whole, optimizer states and gradients partitioned)
        assert straight["distributed_type"].endswith("DEEPSPEED") and straight["zero_stage"] == 2, straight
        assert sorted(os.listdir(step2)).count("pytorch_model_1") == 1  # the critic's engine checkpoint
    assert len(straight["losses"]) == 4
    assert straight["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    # ZeRO-2 keeps whole fp32 weights and all-reduces gradients as DDP does (measured: 1e-11 apart); FSDP2's
    # reduce-scatter of sharded parameters sums in another order (the sharded tests' 2e-5)
    atol = 1e-8 if backend == "deepspeed" else 2e-5
    _assert_same_lora(_lora(str(tmp_path / "straight")), _lora(os.path.join(dmd_ddp, "straight")), atol=atol)

    resumed = json.load(open(tmp_path / "resumed_rank0.json"))
    assert resumed["steps"] == [3, 4], resumed
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
    _assert_same_lora(_lora(str(tmp_path / "resumed")), _lora(str(tmp_path / "straight")), atol=1e-6)
    if backend == "deepspeed":  # the student's EMA: the same as DDP's, and resumed exactly
        ema = _lora(str(tmp_path / "straight"), FINAL_EMA_DIR)
        _assert_same_lora(ema, _lora(os.path.join(dmd_ddp, "straight"), FINAL_EMA_DIR), atol=atol)
        _assert_same_lora(_lora(str(tmp_path / "resumed"), FINAL_EMA_DIR), ema, atol=1e-6)
        final = _lora(str(tmp_path / "straight"))
        # the EMA is not the weights (measured 4e-6 apart: two small student steps), by far more than atol
        assert max((ema[k] - final[k]).abs().max().item() for k in final) > 100 * atol
