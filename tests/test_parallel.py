"""Parallel generation and ring attention (longgen.parallel), checked with two gloo processes on CPU.

One ``torchrun`` launch checks several things, each against a one-process computation:

* ``ring_attention`` (longgen's own ring: K/V blocks over point-to-point send/recv, online softmax) equals
  dense SDPA over the gathered sequence, forward and all three gradients;
* ring context parallel on the tiny Wan through ``enable_context_parallel`` (the trainer's
  ``train.ring_degree``): the same x0 as one process, and the ranks' gradients sum to the one-process ones;
* ``longgen generate --context-parallel ring|ulysses|windows`` (the CLI entry point, sliding and fifo): the
  clip's latents equal a one-process run's, only rank 0 writes (mp4 + latents, nothing else in the folder);
* a size that the processes cannot split is a clear error, on every rank, before any file is written;
* a two-step ``train.ring_degree=2`` LoRA run gives the one-process losses and weights.

Errors that need no second process (no torchrun, a family without a plan, heads, sampler) run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

WORKER = r"""
import contextlib, io, json, sys
import torch
import torch.distributed as dist
from longgen.cli import main
from longgen.parallel import enable_context_parallel, gathered_key_attention, ring_attention

out_dir, model, runs, train_overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
report = {}

# 1. the ring kernel against dense SDPA (the sequence split unevenly would not be a ring's job: 10 / 2)
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 10, 3, 8, generator=gen, requires_grad=True) for _ in range(3))
dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
grad_out = torch.randn(dense.shape, generator=gen)
dense.backward(grad_out)
share = slice(rank * 5, rank * 5 + 5)
local = [t.detach()[:, share].clone().requires_grad_(True) for t in (q, k, v)]
ring = ring_attention(*local, dist.group.WORLD)
ring.backward(grad_out[:, share])
report["kernel_forward"] = (ring - dense[:, share]).abs().max().item()
report["kernel_grads"] = max((a.grad - b.grad[:, share]).abs().max().item() for a, b in zip(local, (q, k, v)))

# 1b. masked calls (LTX's sharded text + padding mask): the all-gather fallback against dense masked SDPA
for t in (q, k, v):
    t.grad = None
mask = torch.zeros(2, 10)
mask[0, 7:] = -10000.0  # the second half of sample 0's keys is padding, as LTX's additive mask writes it
dense = torch.nn.functional.scaled_dot_product_attention(
    *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask[:, None, None, :]).transpose(1, 2)
dense.backward(grad_out)
local = [t.detach()[:, share].clone().requires_grad_(True) for t in (q, k, v)]
masked = gathered_key_attention(*local, mask[:, share], dist.group.WORLD)
masked.backward(grad_out[:, share])
report["masked_forward"] = (masked - dense[:, share]).abs().max().item()
report["masked_grads"] = max((a.grad - b.grad[:, share]).abs().max().item() for a, b in zip(local, (q, k, v)))

# 2. ring context parallel on the tiny Wan (the trainer's path): x0 and summed gradients
from longgen.backbones import build_tiny
adapter = build_tiny("wan", seed=0)
x = torch.randn(1, 4, 3, 4, 4, generator=gen)
sigma = torch.rand(1, 3, generator=gen) * 0.9 + 0.05
cond = {"encoder_hidden_states": torch.randn(1, 8, 32, generator=gen)}
ref = adapter.denoise(x, sigma, cond)
ref.pow(2).mean().backward()
ref_grads = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
adapter.model.zero_grad()
enable_context_parallel(adapter.model, ulysses_degree=1, ring_degree=2, device_type="cpu",
                        cp_plan=adapter.context_parallel_plan())
got = adapter.denoise(x, sigma, cond)
got.pow(2).mean().backward()
summed = 0.0
for name, p in adapter.model.named_parameters():
    if p.grad is not None:
        total = p.grad.clone()
        dist.all_reduce(total)
        summed = max(summed, (total - ref_grads[name]).abs().max().item())
report["model_forward"] = (got - ref).abs().max().item()
report["model_grads"] = summed
report["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())

# 3. the CLI, as torchrun runs it, once per case (the process group is already up, so main() joins it)
from longgen.pipeline import GuidedDenoiser
calls = [0]
stock_call = GuidedDenoiser.__call__
def counted(self, *args, **kwargs):
    calls[0] += 1
    return stock_call(self, *args, **kwargs)
GuidedDenoiser.__call__ = counted
for name, flags in runs.items():
    calls[0] = 0
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["generate", "--model", model, "--out", f"{out_dir}/{name}/clip.mp4", "--quiet", *flags])
    report[name] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "calls": calls[0]}
    dist.barrier()

# 3b. every expert of a Wan 2.2 MoE is split, not only the first
from longgen.parallel import GenerationParallel
from longgen.pipeline import LongVideoPipeline
moe = LongVideoPipeline.from_pretrained(runs["moe_ring"][runs["moe_ring"].index("--model") + 1])
GenerationParallel("ring", rank, world).apply(moe, "full")
report["moe_experts_split"] = [e._parallel_config is not None for e in moe.adapter.experts()]

# 4. the trainer with train.ring_degree=2 (Accelerate joins the same process group)
from longgen.training.config import load_config
from longgen.training.loop import Trainer
trainer = Trainer(load_config(None, train_overrides + ["train.ring_degree=2"]))
report["train_losses"] = {str(k): v for k, v in trainer.train().losses.items()}
with open(f"{out_dir}/rank{rank}.json", "w") as fh:
    json.dump(report, fh)
dist.barrier()
trainer.close()
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _train_overrides(clips, out) -> list[str]:
    """Two LoRA steps on the tiny Wan; Adam's eps = 1 makes the update scale with the gradient, so a wrong
    ring gradient changes the second loss and the weights."""
    return [f"data.source={clips}", "data.num_frames=9", f"train.output_dir={out}", "train.steps=2",
            "train.batch_size=1", "lora.rank=4", "optim.lr=0.5", "optim.eps=1.0", "optim.warmup_steps=0"]

BASE = ["--prompt", "a red ball", "--seed", "3", "--save-latents"]
RUNS = {  # name -> flags; each also run in one process (without --context-parallel) for reference
    "ring_sliding": ["--sampler", "sliding", "--steps", "3", "--num-frames", "21", "--window", "4", "--stride", "2",
                     "--context-parallel", "ring"],
    "ulysses_fifo": ["--sampler", "fifo", "--num-frames", "17", "--window", "2", "--num-partitions", "2",
                     "--context-parallel", "ulysses"],
    "windows_fifo": ["--sampler", "fifo", "--num-frames", "17", "--window", "2", "--num-partitions", "3",
                     "--context-parallel", "windows"],
    # LTX-Video's plan also shards the text and its padding mask (cross-attention under context parallel)
    "ltx_ring": ["--model", "{ltx}", "--sampler", "sliding", "--steps", "2", "--num-frames", "33", "--window", "2",
                 "--stride", "1", "--context-parallel", "ring"],
    "ltx_ulysses": ["--model", "{ltx}", "--sampler", "full", "--steps", "2", "--num-frames", "17",
                    "--context-parallel", "ulysses"],
    # Wan 2.2 MoE: both experts are split (the high-noise one serves the first steps, the low-noise one the rest)
    "moe_ring": ["--model", "{moe}", "--sampler", "full", "--steps", "4", "--num-frames", "9",
                 "--context-parallel", "ring"],
    "windows_sliding": ["--sampler", "sliding", "--steps", "3", "--num-frames", "21", "--window", "3", "--stride", "1",
                        "--context-parallel", "windows"],
}
BAD = {  # 16x16 pixels -> 1x1 token per latent frame: 3-frame windows do not split over 2 processes
    "bad_frames": ["--sampler", "sliding", "--steps", "3", "--num-frames", "21", "--height", "16", "--width", "16",
                   "--window", "3", "--context-parallel", "ring"],
}


def _count_model_calls(monkeypatch) -> list[int]:
    """Count the pipeline's denoiser calls (one per window on CPU) in this process."""
    from longgen.pipeline import GuidedDenoiser

    calls = [0]
    stock_call = GuidedDenoiser.__call__

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return stock_call(self, *args, **kwargs)

    monkeypatch.setattr(GuidedDenoiser, "__call__", counted)
    return calls


def _single_flags(flags: list[str]) -> list[str]:
    i = flags.index("--context-parallel")
    return flags[:i] + flags[i + 2 :]


@pytest.mark.slow
def test_two_processes_give_the_one_process_clip(saved, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from longgen.backbones.wan import WanAdapter
    from longgen.cli import main

    model = saved("wan")
    moe = tmp_path / "wan_moe"
    WanAdapter(WanAdapter.tiny_pipeline(seed=0, two_experts=True), WanAdapter.tiny_video_size).save_pretrained(moe)
    models = {"ltx": saved("ltx"), "moe": str(moe)}
    runs = {name: BASE + [f.format(**models) for f in flags] for name, flags in {**RUNS, **BAD}.items()}
    worker = tmp_path / "parallel_worker.py"
    worker.write_text(WORKER)
    from longgen.data.synthetic import write_synthetic_dataset

    clips = write_synthetic_dataset(tmp_path / "clips", num_videos=2, num_frames=9, height=32, width=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(tmp_path / "cp"), model, json.dumps(runs),
           *_train_overrides(clips, tmp_path / "cp" / "train")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.load(open(tmp_path / "cp" / f"rank{r}.json")) for r in (0, 1)]

    for report in reports:
        assert report["kernel_forward"] < 1e-5 and report["kernel_grads"] < 1e-5, report
        assert report["masked_forward"] < 1e-5 and report["masked_grads"] < 1e-5, report
        assert report["model_forward"] < 1e-5, report
        assert report["model_grads"] < 1e-5 * max(1.0, report["grad_scale"]), report

    calls = _count_model_calls(monkeypatch)
    assert all(report["moe_experts_split"] == [True, True] for report in reports), reports
    for name, flags in RUNS.items():
        first, second = reports[0][name], reports[1][name]
        assert first["code"] == 0 and second["code"] == 0, (name, first, second)
        mode = flags[flags.index("--context-parallel") + 1]
        assert f"over 2 processes ({mode})" in first["stdout"], first
        assert "wrote" not in second["stdout"], second  # only rank 0 reports (and writes) the clip
        folder = tmp_path / "cp" / name
        assert sorted(os.listdir(folder)) == ["clip.latents.safetensors", "clip.mp4"], name
        single = tmp_path / "single" / name / "clip.mp4"
        calls[0] = 0
        single_flags = [f.format(**models) for f in _single_flags(flags)]
        assert main(["generate", "--model", model, "--out", str(single), "--quiet", *BASE, *single_flags]) == 0
        if mode == "windows":  # each rank denoised its share of the windows (plus fifo's initial clip, on both)
            assert first["calls"] < calls[0] and second["calls"] < calls[0], (name, first, second, calls)
            assert first["calls"] + second["calls"] >= calls[0], (name, first, second, calls)
        else:  # context parallel: every rank takes part in every model call
            assert first["calls"] == second["calls"] == calls[0], (name, first, second, calls)
        got = load_file(folder / "clip.latents.safetensors")["latents"]
        want = load_file(single.with_name("clip.latents.safetensors"))["latents"]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=name)

    for report in reports:  # every rank stops with the same explanation; rank 0 wrote nothing
        bad = report["bad_frames"]
        assert bad["code"] == 2 and "does not divide the 3 latent frames" in bad["stderr"], bad
        assert "multiple of 2" in bad["stderr"], bad
    assert not (tmp_path / "cp" / "bad_frames").exists() or not os.listdir(tmp_path / "cp" / "bad_frames")

    from tiny_runs import run_trainer

    from longgen.training.config import load_config

    _, single_run = run_trainer(load_config(None, _train_overrides(clips, tmp_path / "train_single")))
    for report in reports:
        assert {int(k): v for k, v in report["train_losses"].items()} == pytest.approx(single_run.losses, abs=1e-5)
    got = load_file(tmp_path / "cp" / "train" / "final" / "pytorch_lora_weights.safetensors")
    want = load_file(tmp_path / "train_single" / "final" / "pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)


def test_context_parallel_without_torchrun_is_explained(saved, tmp_path, capsys, monkeypatch):
    from longgen.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "x.mp4"
    assert main(["generate", "--model", saved("wan"), "--out", str(out), "--context-parallel", "ring"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node N -m longgen generate" in err and "WORLD_SIZE" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert main(["generate", "--model", saved("wan"), "--out", str(out), "--context-parallel", "ulysses"]) == 2
    assert "launch 2 or more processes" in capsys.readouterr().err
    assert not out.exists()

    from longgen.parallel import rank_device

    assert rank_device("cuda", 3) == "cuda:3" and rank_device("cpu", 3) == "cpu"  # one GPU per rank
    with pytest.raises(ValueError, match="pass --device cuda"):
        rank_device("cuda:0", 1)


def test_unsupported_family_heads_and_sampler_are_explained(saved):
    """Checked before any collective runs, so one process (rank 0 of a pretend two) shows each error."""
    from longgen.parallel import GenerationParallel, check_heads, check_token_split
    from longgen.pipeline import LongVideoPipeline

    cogvideox = LongVideoPipeline.from_pretrained(saved("cogvideox"))
    with pytest.raises(ValueError, match="no context-parallel plan.*--context-parallel windows"):
        GenerationParallel("ulysses", 0, 2).apply(cogvideox, "sliding")
    wan = LongVideoPipeline.from_pretrained(saved("wan"))  # 2 attention heads
    with pytest.raises(ValueError, match=r"ulysses over 3 processes: 3 does not divide the 2 attention heads"):
        GenerationParallel("ulysses", 0, 3).apply(wan, "full")
    with pytest.raises(ValueError, match="--sampler df has none"):
        GenerationParallel("windows", 0, 2).apply(wan, "df")
    with pytest.raises(ValueError, match="does not combine with --sampler causal"):
        GenerationParallel("ring", 0, 2).apply(wan, "causal")
    check_heads(wan.adapter.model, 2)  # divides: no error
    check_token_split((1, 4, 3, 2, 2), (1, 2, 2), 3)  # 3 frames x 1 token over 3 processes: fine
    with pytest.raises(ValueError, match=r"2 does not divide the 3 latent frames of a model call \(3 x 1 x 1 = 3 tokens"):
        check_token_split((1, 4, 3, 2, 2), (1, 2, 2), 2)

    # inputs the plan shards at the model's root (LTX-Video: the text and its mask) are checked before diffusers
    from longgen.parallel import check_sharded_inputs

    ltx = LongVideoPipeline.from_pretrained(saved("ltx")).adapter
    handle = check_sharded_inputs(ltx.model, ltx.context_parallel_plan(), 3, "--context-parallel ring over")
    text = torch.zeros(1, 7, ltx.model.config.caption_channels)
    with pytest.raises(ValueError, match=r"ring over 3 does not divide the model input encoder_hidden_states along "
                       r"dimension 1 \(size 7.*max sequence length"):
        ltx.model(hidden_states=torch.zeros(1, 6, 128), encoder_hidden_states=text, timestep=torch.zeros(1))
    handle.remove()


def test_help_explains_the_flag(capsys):
    from longgen.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("--context-parallel", "torchrun", "ulysses", "ring", "windows", "rank 0"):
        assert word in text, word
