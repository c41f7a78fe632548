"""DeepSpeed ZeRO-2/3 and FSDP2 through the trainer, on CPU processes talking over gloo.

Each run is a real two-process ``accelerate launch`` of the trainer with the project's accelerate
configs (``configs/accelerate/zero2.yaml``, ``zero3.yaml``, ``fsdp.yaml``, process count and precision
set for a CPU host). What is checked:

- the run really is sharded: DeepSpeed's engine with the requested ZeRO stage; under ZeRO-3 and FSDP each
  process holds only part of a weight;
- it trains the same LoRA as two-process DDP on the same clips (the three are the same maths: averaged
  gradients, global-norm clipping, AdamW; fp32 here);
- it resumes exactly: a new launch resuming from the step-2 checkpoint of a 4-step run ends with its
  losses and weights (optimizer state, scheduler, RNG and data position from the sharded checkpoint);
- context parallel (Ulysses) combined with FSDP gives the one-process losses and weights: the loss is
  scaled by the CP degree because FSDP's reduce-scatter averages over the group's partial gradients.

Accelerate 1.x offers DeepSpeed and FSDP only on accelerator devices, so two small shims in the worker
make it run them on CPU (DeepSpeed's own CPU accelerator, torch's FSDP2 over gloo): for DeepSpeed, the
process count and rank are read from the process group DeepSpeed initialised (accelerate counts one
process when it finds no accelerator); for FSDP, accelerate's backend choice is gloo with the FSDP code
path and device ``cpu``. Everything else is the stock DeepSpeed engine, torch ``fully_shard`` and the
trainer's own code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch
from cpu_launch import accelerate_exe, cpu_launch_config, with_fsdp_on_cpu

pytest.importorskip("deepspeed", reason="DeepSpeed tests need `pip install deepspeed` (in longgen[dev])")

WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType

backend = os.environ["LONGGEN_TEST_BACKEND"]
if backend == "fsdp":
    # CPU host: accelerate's FSDP code path with the gloo backend on device cpu.
    # <FSDP_ON_CPU>
    state = PartialState()
elif backend == "deepspeed":
    state = PartialState()  # DeepSpeed initialises the process group with gloo (its CPU accelerator)
    state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
    state.local_process_index = int(os.environ["LOCAL_RANK"])
# ddp: the trainer's Accelerator reads ACCELERATE_USE_CPU itself

from longgen.training.config import load_config
from longgen.training.loop import Trainer

out, name, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
trainer = Trainer(load_config(None, [*overrides, f"train.output_dir={out}/{name}"]))
acc = trainer.accelerator
info = {"distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes}
if acc.distributed_type == DistributedType.DEEPSPEED:
    info["zero_stage"] = trainer.wrapped.zero_optimization_stage()
# share of the largest trained weight held by this process (1.0 = whole weight)
param = max(trainer.params, key=lambda p: getattr(p, "ds_numel", p.numel()))
if hasattr(param, "ds_numel"):  # ZeRO-3 partition
    info["shard_fraction"] = param.ds_tensor.numel() / param.ds_numel
elif hasattr(param, "to_local"):  # FSDP2 DTensor
    info["shard_fraction"] = param.to_local().numel() / param.numel()
else:
    info["shard_fraction"] = 1.0
result = trainer.train()
trainer.close()
info["steps"] = sorted(result.losses)
info["losses"] = [result.losses[k] for k in info["steps"]]
json.dump(info, open(f"{out}/{name}_rank{acc.process_index}.json", "w"))
"""


def _overrides(clips: str) -> list[str]:
    return [
        f"data.source={clips}",
        "data.num_frames=9",
        "train.batch_size=1",
        "train.steps=4",
        "train.checkpoint_every=1",
        "train.keep_last=0",
        "lora.rank=4",
        "optim.lr=0.5",
        "optim.eps=1.0",  # Adam's update then scales with the gradient: a wrong reduction shows in weights
        "optim.warmup_steps=0",
        "optim.grad_clip=0.05",  # small enough to clip: DeepSpeed's own clipping must match
        "ema.enabled=false",
        "validation.every=0",
    ]


def _launch(out, clips, run: str, backend: str, launch_args: list[str], extra=()) -> None:
    """``accelerate launch`` the worker: run ``run`` writes ``out/<run>/`` and ``out/<run>_rank<i>.json``."""
    worker = out / "worker.py"
    worker.write_text(with_fsdp_on_cpu(WORKER))
    env = {
        **os.environ,
        "LONGGEN_TEST_BACKEND": backend,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        accelerate_exe(), "launch", *launch_args, "--main_process_port", "0",
        str(worker), str(out), run, *_overrides(clips), *extra,
    ]  # fmt: skip
    # own process group: a timeout kills the launcher and both workers (a stuck rank must not outlive the test)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=out,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{run} ({backend}) did not finish in 300 s:\n{stdout[-2000:]}{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]


def _lora(folder: str, export: str = "final") -> dict[str, torch.Tensor]:
    """The LoRA a run exported into ``folder/<export>/`` (``final``, or ``final_ema`` for the EMA)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, export, "pytorch_lora_weights.safetensors"))


def _assert_same_lora(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    from longgen.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("sharded_clips")
    return write_synthetic_dataset(root / "clips", num_videos=4, num_frames=9, height=32, width=32)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, clips) -> str:
    out = tmp_path_factory.mktemp("ddp_reference")
    ddp_args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    _launch(out, clips, "straight", "ddp", ddp_args)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, backend, stage, sharded",
    [("zero2", "deepspeed", 2, False), ("zero3", "deepspeed", 3, True), ("fsdp", "fsdp", None, True)],
)
def test_sharded_training_matches_ddp_and_resumes_exactly(
    tmp_path, clips, ddp_reference, config, backend, stage, sharded
):
    launch = ["--config_file", cpu_launch_config(config, tmp_path)]
    out = str(tmp_path)
    validation = ["validation.every=4", "validation.steps=2", "validation.num_frames=17"]
    _launch(tmp_path, clips, "straight", backend, launch, extra=validation)
    # a new run resumes from the straight run's step-2 checkpoint (a new process, as after a kill)
    step2 = os.path.join(out, "straight", "checkpoints", "step_00000002")
    _launch(tmp_path, clips, "resumed", backend, launch, extra=[f"train.resume={step2}"])

    for rank in (0, 1):
        info = json.load(open(os.path.join(out, f"straight_rank{rank}.json")))
        assert info["num_processes"] == 2
        if backend == "deepspeed":
            assert info["distributed_type"].endswith("DEEPSPEED") and info["zero_stage"] == stage, info
        else:
            assert info["distributed_type"].endswith("FSDP"), info
        if sharded:
            assert info["shard_fraction"] <= 0.5 + 1e-9, info  # each process holds half a weight
        else:
            assert info["shard_fraction"] == 1.0, info

    ddp = json.load(open(os.path.join(ddp_reference, "straight_rank0.json")))
    straight = json.load(open(os.path.join(out, "straight_rank0.json")))
    assert len(straight["losses"]) == 4
    assert straight["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    _assert_same_lora(
        _lora(os.path.join(out, "straight")), _lora(os.path.join(ddp_reference, "straight")), atol=2e-5
    )

    # validation generated with the sharded weights (every process takes part, the main one writes)
    from longgen.io import read_video

    video = os.path.join(out, "straight", "validation", "step_00000004.mp4")
    assert read_video(video).shape[0] == 17

    # resumed from the sharded step-2 checkpoint: the same curve and weights
    resumed = json.load(open(os.path.join(out, "resumed_rank0.json")))
    assert resumed["steps"] == [3, 4], resumed
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
    _assert_same_lora(_lora(os.path.join(out, "resumed")), _lora(os.path.join(out, "straight")), atol=1e-6)


@pytest.mark.slow
def test_context_parallel_with_fsdp_matches_one_process(tmp_path, clips):
    """Ulysses degree 2 inside FSDP2 on 2 processes == one process on the same clips (loss x CP degree)."""
    from longgen.training.config import load_config
    from longgen.training.loop import Trainer

    launch = ["--config_file", cpu_launch_config("fsdp", tmp_path)]
    out = str(tmp_path)
    _launch(
        tmp_path, clips, "straight", "fsdp", launch, extra=["train.ulysses_degree=2", "optim.grad_clip=0"]
    )
    info = json.load(open(os.path.join(out, "straight_rank0.json")))
    assert info["distributed_type"].endswith("FSDP") and info["shard_fraction"] <= 0.5 + 1e-9, info

    single_dir = tmp_path / "single"
    trainer = Trainer(load_config(None, [
        *_overrides(clips), f"train.output_dir={single_dir}", "optim.grad_clip=0",
    ]))  # fmt: skip
    try:
        single = trainer.train()
    finally:
        trainer.close()
    assert info["losses"] == pytest.approx([single.losses[k] for k in sorted(single.losses)], abs=1e-5)
    # Adam with eps=1 moves weights in proportion to the gradient: a missing CP scale would show here
    _assert_same_lora(_lora(os.path.join(out, "straight")), _lora(str(single_dir)), atol=1e-5)


def _full_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "final", "transformer", "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_sharded_full_fine_tune_exports_the_ddp_model_folder(tmp_path, clips):
    """Full fine-tune under ZeRO-3 and FSDP2: the gathered export is the diffusers folder DDP writes."""
    from diffusers import WanTransformer3DModel

    full = ["lora.enabled=false", "train.steps=2", "train.checkpoint_every=0", "optim.lr=0.01"]
    ddp_args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    (tmp_path / "ddp").mkdir()
    _launch(tmp_path / "ddp", clips, "full", "ddp", ddp_args, extra=full)
    want = _full_weights(str(tmp_path / "ddp" / "full"))
    for config, backend in (("zero3", "deepspeed"), ("fsdp", "fsdp")):
        out = tmp_path / config
        out.mkdir()
        _launch(
            out, clips, "full", backend, ["--config_file", cpu_launch_config(config, tmp_path)], extra=full
        )
        info = json.load(open(out / "full_rank0.json"))
        assert info["shard_fraction"] <= 0.5 + 1e-9, info
        got = _full_weights(str(out / "full"))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{config}: {key}")
        model = WanTransformer3DModel.from_pretrained(out / "full" / "final" / "transformer")
        assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in want.values())
