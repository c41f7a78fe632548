"""Context parallel (Ulysses) on CPU: two processes split one clip's tokens.

Checked at two levels: (1) the tiny Wan's forward output is the same as one process and the ranks'
gradients sum to the one-process gradients; (2) a two-process ``ulysses_degree=2`` training run gives
the losses and LoRA weights of a one-process run. Adam's ``eps`` is set to 1 so that its update scales
with the gradient: a missing CP-degree loss scale (DDP averages the group's partial gradients) would
change the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
from longgen.backbones import build_tiny
from longgen.training.config import load_config
from longgen.training.loop import Trainer, enable_context_parallel

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(None, overrides))
trainer.train()
rank = trainer.accelerator.process_index

# model level: a fresh tiny Wan, per-frame noise levels through the adapter
adapter = build_tiny("wan", seed=0)
model = adapter.model
gen = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 3, 4, 4, generator=gen)
sigma = torch.rand(2, 3, generator=gen) * 0.9 + 0.05
cond = {"encoder_hidden_states": torch.randn(2, 8, 32, generator=gen)}
ref = adapter.denoise(x, sigma, cond)
ref.pow(2).mean().backward()
ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
model.zero_grad()
enable_context_parallel(model, ulysses_degree=2, device_type="cpu")
got = adapter.denoise(x, sigma, cond)
got.pow(2).mean().backward()
summed, alone = 0.0, 0.0
for name, p in model.named_parameters():
    if p.grad is None:
        continue
    total = p.grad.clone()
    dist.all_reduce(total)
    summed = max(summed, (total - ref_grads[name]).abs().max().item())
    alone = max(alone, (p.grad - ref_grads[name]).abs().max().item())
result = {"forward": (got - ref).abs().max().item(), "grad_summed": summed, "grad_one_rank": alone,
          "grad_scale": max(g.abs().max().item() for g in ref_grads.values())}
with open(f"{out}/cp_rank{rank}.json", "w") as fh:
    json.dump(result, fh)
dist.barrier()  # both ranks done with the model-level mesh before the process group goes away
trainer.close()
"""


def _overrides(clips: str, out) -> list[str]:
    return [
        f"data.source={clips}",
        "data.num_frames=9",
        f"train.output_dir={out}",
        "train.steps=3",
        "train.batch_size=1",
        "train.log_data_paths=true",
        "lora.rank=4",
        "optim.lr=0.5",
        "optim.eps=1.0",
        "optim.warmup_steps=0",
    ]


def test_ulysses_matches_one_process_in_forward_gradients_and_training(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which(
        "accelerate"
    )
    if accelerate is None:
        pytest.fail("the accelerate CLI is not installed next to this Python; pip install accelerate")
    from longgen.data.synthetic import write_synthetic_dataset
    from longgen.training.config import load_config
    from longgen.training.loop import Trainer

    clips = write_synthetic_dataset(tmp_path / "clips", num_videos=3, num_frames=9, height=32, width=32)
    worker = tmp_path / "cp_worker.py"
    worker.write_text(WORKER)
    cp_out = tmp_path / "cp"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(worker), str(cp_out), *_overrides(clips, cp_out), "train.ulysses_degree=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for rank in (0, 1):
        check = json.load(open(cp_out / f"cp_rank{rank}.json"))
        assert check["forward"] < 1e-6, check
        assert check["grad_summed"] < 1e-6 * max(1.0, check["grad_scale"]), check
        assert check["grad_one_rank"] > 1e-4, check  # each rank alone holds only part of the gradient

    # both ranks of the group trained on the same clips
    ranks = [(cp_out / "data_paths" / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0].splitlines()) == 3

    single_out = tmp_path / "single"
    trainer = Trainer(load_config(None, _overrides(clips, single_out)))
    try:
        single = trainer.train()
    finally:
        trainer.close()
    cp_losses = {r["step"]: r["loss"] for r in map(json.loads, open(cp_out / "metrics.jsonl"))}
    assert cp_losses == pytest.approx(single.losses, abs=1e-5)
    from safetensors.torch import load_file

    got = load_file(cp_out / "final" / "pytorch_lora_weights.safetensors")
    want = load_file(single_out / "final" / "pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
