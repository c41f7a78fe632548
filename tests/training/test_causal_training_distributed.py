"""Causal training under two-process DDP and FSDP2 (CPU, gloo): the block-causal mask is on in the wrapped model.

One launch per wrapper, each a real ``accelerate launch`` of the trainer (the CPU shims of
test_train_sharded.py: FSDP's code path over gloo). In each, before and after training, the loss of chunk k
taken through the *prepared* (DDP / FSDP-wrapped) denoiser has exactly zero gradient with respect to the inputs
of chunks > k, and a nonzero one for chunks <= k; removing the mask (the negative control) makes later chunks
leak in. DDP trains ``causal_forcing`` (teacher forcing, LoRA); FSDP trains ``ode_regression`` (full fine-tune)
on an ODE-pair cache, and both export their weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from cpu_launch import accelerate_exe, cpu_launch_config, with_fsdp_on_cpu

WORKER = r"""
import json, os, sys
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

if os.environ["LONGGEN_TEST_BACKEND"] == "fsdp":  # CPU host: accelerate's FSDP code path over gloo
    # <FSDP_ON_CPU>
    PartialState()

from longgen.training.config import load_config
from longgen.training.loop import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(None, [*overrides, f"train.output_dir={out}/run"]))
acc, adapter = trainer.accelerator, trainer.adapter
cond = {k: v[None] for k, v in trainer.dataset[0]["cond"].items()} if hasattr(trainer.dataset, "index") else (
    adapter.encode_prompt(["a red circle"], do_classifier_free_guidance=False)[0])


def chunk_gradients(chunk):
    # |d loss(chunk k) / d x| per latent frame, through the prepared (wrapped) denoiser, same input on every rank
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(adapter.latent_shape(9, 32, 32), generator=gen).requires_grad_(True)
    sigma = torch.rand(1, x.shape[2], generator=gen) * 0.8 + 0.1
    trainer.wrapped(x, sigma, cond)[:, :, chunk].pow(2).sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return x.grad.abs().sum(dim=(0, 1, 3, 4)).tolist()


info = {"distributed_type": str(acc.distributed_type), "before": [chunk_gradients(k) for k in range(2)]}
param = max(trainer.params, key=lambda p: p.numel())
info["shard_fraction"] = param.to_local().numel() / param.numel() if hasattr(param, "to_local") else 1.0
result = trainer.train()
info["losses"] = [result.losses[k] for k in sorted(result.losses)]
info["after"] = [chunk_gradients(k) for k in range(2)]
trainer.method.mask.remove()
info["unmasked"] = chunk_gradients(0)
trainer.close()
json.dump(info, open(f"{out}/rank{acc.process_index}.json", "w"))
"""


def _launch(out, launch_args: list[str], backend: str, overrides: list[str]) -> list[dict]:
    """``accelerate launch`` the worker on 2 CPU processes; the per-rank reports."""
    worker = out / "worker.py"
    worker.write_text(with_fsdp_on_cpu(WORKER))
    env = {**os.environ, "LONGGEN_TEST_BACKEND": backend, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [accelerate_exe(), "launch", *launch_args, "--main_process_port", "0", str(worker), str(out), *overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{backend} launch did not finish in 300 s:\n{stdout[-2000:]}{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return [json.load(open(out / f"rank{rank}.json")) for rank in (0, 1)]


def _assert_causal(info: dict) -> None:
    for grads in (info["before"], info["after"]):
        for chunk, grad in enumerate(grads):  # chunk size 1, 3 latent frames
            assert all(g == 0.0 for g in grad[chunk + 1 :]), (chunk, grad)
            assert all(g > 0.0 for g in grad[: chunk + 1]), (chunk, grad)
    assert all(g > 0.0 for g in info["unmasked"][1:]), info["unmasked"]  # the control: no mask, leaks


def _common(clips: str) -> list[str]:
    return [f"data.source={clips}", "data.num_frames=9", "train.batch_size=1", "train.steps=2",
            "extension.method=block-causal", "extension.options={chunk_size: 1}", "ema.enabled=false",
            "validation.every=0", "optim.lr=1e-3"]  # fmt: skip


@pytest.mark.slow
def test_causal_forcing_under_ddp_keeps_the_mask(tmp_path, clips):
    args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]  # fmt: skip
    overrides = [*_common(clips), "objective.method=causal_forcing", "causal.forcing=teacher", "objective.mode=clip",
                 "lora.rank=4"]  # fmt: skip
    for info in _launch(tmp_path, args, "ddp", overrides):
        assert info["distributed_type"].endswith("MULTI_CPU"), info["distributed_type"]
        _assert_causal(info)
        assert len(info["losses"]) == 2
    assert os.path.isfile(tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_ode_regression_under_fsdp_keeps_the_mask(tmp_path, clips):
    from longgen.training.config import load_config
    from longgen.training.ode_pairs import build_ode_pairs

    cache = tmp_path / "ode_cache"
    ode = [f"data.cache_dir={cache}", "ode.num_steps=4", "ode.keep_steps=[0,2]", "ode.num_samples=2",
           "ode.guidance_scale=1.0"]  # fmt: skip
    build_ode_pairs(load_config(None, [*_common(clips), *ode, f"train.output_dir={tmp_path / 'pairs'}"]))
    overrides = [*_common(clips), *ode, "objective.method=ode_regression", "lora.enabled=false"]
    for info in _launch(tmp_path, ["--config_file", cpu_launch_config("fsdp", tmp_path)], "fsdp", overrides):
        assert info["distributed_type"].endswith("FSDP") and info["shard_fraction"] <= 0.5, info
        _assert_causal(info)
        assert len(info["losses"]) == 2
    assert os.path.isfile(tmp_path / "run" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
