"""Trainer overhead vs a bare hand-written loop, and max trainable latent frames per memory budget.

Part 1 (overhead). For each workload, a saved Wan pipeline (the tiny one, or the tiny one with a wider
transformer) and a latent cache of synthetic clips are built once. One process then alternates blocks of
``--steps`` steps between ``longgen.training.loop.Trainer`` (a fresh ``Trainer(config).train()`` per block:
LoRA, AdamW, grad clipping, diffusion-forcing per-frame noise; EMA, checkpoints, validation off) and a
bare loop over the same transformer, the same LoRA, the same cached batches, the same AdamW and the same
loss, written with plain PyTorch (no Accelerate, no adapter, no DataLoader). Both loops see the same
machine load that way. Step boundaries of the trainer are taken where it logs each step; both wall and
process CPU time are recorded (CPU time is the robust clock on a shared CPU; on CUDA wall time is the
one that counts). Each block drops its first ``--warmup`` steps and keeps its median; the reported ratio
is the median over blocks of trainer / bare. Peak memory comes from one fresh process per loop: on CUDA
``torch.cuda.max_memory_allocated`` over the steps; on CPU the peak RSS during the steps (``VmHWM``,
reset with ``/proc/self/clear_refs`` before the steps) and the peak RSS of the whole process.

Part 2 (memory vs length). The bare training step (same kind of model, LoRA or full fine-tune) on random
latents of increasing length, each in a fresh process, with and without gradient checkpointing
(``model.enable_gradient_checkpointing()``, what ``train.gradient_checkpointing=true`` calls). On CPU the
measure is the training memory (peak RSS during two steps above the RSS after building the model and
optimizer); on CUDA the peak allocated memory. A least-squares fit ``a + b F + c F^2`` (``c >= 0``) in the
number of latent frames ``F`` gives the longest clip that fits each budget (flagged when it extrapolates
beyond the measured lengths, capped at 8x the longest).

    python -m benchmarks.trainer_overhead [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from longgen.files import write_json_atomic

# --- workloads -------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A transformer size and a clip size. ``heads * head_dim`` is the width; head_dim 12/24/32 suits RoPE."""

    name: str
    heads: int = 2
    head_dim: int = 12
    layers: int = 2
    ffn: int = 48
    num_frames: int = 9
    height: int = 32
    width: int = 32
    batch_size: int = 2
    lora_rank: int = 8
    num_videos: int = 4


TINY = Workload("tiny recipe (2 blocks, d=24, 9x32x32 px, 12 tokens)")
SMALL = Workload(
    "small DiT (4 blocks, d=128, 17x96x96 px, 180 tokens)",
    heads=4,
    head_dim=32,
    layers=4,
    ffn=512,
    num_frames=17,
    height=96,
    width=96,
)
MEMORY = Workload(
    "memory DiT (8 blocks, d=128, 128x128 px: 256 tokens per latent frame, batch 1)",
    heads=4,
    head_dim=32,
    layers=8,
    ffn=512,
    height=128,
    width=128,
    batch_size=1,
)
"""The workload of the max-trainable-frames-per-memory-budget measurement."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def build_model_folder(path: str, workload: Workload, seed: int = 0) -> str:
    """Save the tiny Wan pipeline with a transformer of the workload's size (random weights) to ``path``."""
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel

    from longgen.backbones.wan import WanAdapter

    pipe = WanAdapter.tiny_pipeline(seed=seed)
    stock = pipe.transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        transformer = WanTransformer3DModel(
            patch_size=tuple(stock.patch_size),
            num_attention_heads=workload.heads,
            attention_head_dim=workload.head_dim,
            in_channels=stock.in_channels,
            out_channels=stock.out_channels,
            text_dim=stock.text_dim,
            freq_dim=stock.freq_dim,
            ffn_dim=workload.ffn,
            num_layers=workload.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=stock.rope_max_seq_len,
        ).eval()
    components = {
        k: v for k, v in pipe.components.items() if k in ("tokenizer", "text_encoder", "vae", "scheduler")
    }
    pipe = WanPipeline(transformer=transformer, **components)
    adapter = WanAdapter(pipe, native_video_size=(workload.num_frames, workload.height, workload.width))
    adapter.save_pretrained(path)
    return path


def build_latent_cache(model_dir: str, workdir: str, workload: Workload) -> str:
    """Synthetic moving-shapes clips at the workload's size, encoded once into a longgen latent cache."""
    from longgen.backbones import load_adapter
    from longgen.data.cache import precompute_cache
    from longgen.data.synthetic import write_synthetic_dataset
    from longgen.data.video import VideoClipDataset

    videos = os.path.join(workdir, "videos")
    manifest = write_synthetic_dataset(
        videos, workload.num_videos, workload.num_frames, workload.height, workload.width, seed=0
    )
    dataset = VideoClipDataset(
        manifest, workload.num_frames, workload.height, workload.width, random_start=False
    )
    cache = os.path.join(workdir, "cache")
    precompute_cache(load_adapter(model_dir), dataset, cache)
    return cache


# --- the two loops (child processes) -------------------------------------------------------------


def _mixed_precision(device: str) -> str:
    import torch

    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"


def _trainer_config(spec: dict[str, Any], output_dir: str, steps: int):
    """The longgen training config of a workload: LoRA, AdamW, clipping; EMA, checkpoints, validation off."""
    from longgen.training.config import Config

    w = Workload(**spec["workload"])
    return Config.from_dict(
        {
            "model": {"path": spec["model_dir"], "dtype": "fp32"},
            "data": {
                "cache_dir": spec["cache_dir"],
                "num_frames": w.num_frames,
                "height": w.height,
                "width": w.width,
                "shuffle": False,  # the bare loop walks the cache in order
            },
            "objective": {"mode": "diffusion_forcing", "shift": 1.0},
            "lora": {"enabled": True, "rank": w.lora_rank, "alpha": w.lora_rank},
            "optim": {"lr": 1e-4, "schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0},
            "train": {
                "steps": steps,
                "batch_size": w.batch_size,
                "mixed_precision": _mixed_precision(spec["device"]),
                "gradient_checkpointing": spec["gradient_checkpointing"],
                "seed": 0,
                "checkpoint_every": 0,
                "save_final": False,
                "output_dir": output_dir,
                "log_every": 1,
            },
            "ema": {"enabled": False},
            "validation": {"every": 0, "at_end": False},
        }
    )


def _clock() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time is the robust measure on a shared CPU: preemption by other
    processes does not count; on CUDA only wall time means anything (the GPU does the work)."""
    return time.perf_counter(), time.process_time()


def _durations(stamps: list[tuple[float, float]]) -> dict[str, list[float]]:
    return {
        "wall": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])],
        "cpu": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])],
    }


def _trainer_steps(
    spec: dict[str, Any], output_dir: str, steps: int, before_train=None
) -> dict[str, list[float]]:
    """Build a ``Trainer`` and ``train()`` it for ``steps`` steps; per-step wall and CPU seconds.

    The step boundaries are taken where the trainer logs each step (``accelerator.log``, called once per
    step with ``train.log_every=1``, where it also timestamps ``metrics.jsonl``); the hook only appends a
    timestamp.
    """
    import logging

    from longgen.training.loop import Trainer

    logging.disable(logging.WARNING)
    trainer = Trainer(_trainer_config(spec, output_dir, steps))
    stamps: list[tuple[float, float]] = []
    log = trainer.accelerator.log

    def timed_log(*args, **kwargs):
        stamps.append(_clock())
        return log(*args, **kwargs)

    trainer.accelerator.log = timed_log
    if before_train is not None:
        before_train()
    stamps.append(_clock())
    try:
        trainer.train()
    finally:
        trainer.close()
    if len(stamps) != steps + 1:
        raise RuntimeError(f"expected {steps} logged steps from the trainer, saw {len(stamps) - 1}")
    return _durations(stamps)


def child_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory of ``Trainer(config).train()`` over ``steps`` steps, in this fresh process."""
    import torch

    state: dict[str, Any] = {}

    def before_train() -> None:
        if spec["device"] == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        state["rss_before"] = _status_kib("VmRSS")
        state["reset"] = _reset_peak_rss()

    seconds = _trainer_steps(spec, spec["output_dir"], spec["steps"], before_train)
    return _memory_result(spec["device"], state["rss_before"], state["reset"]) | {
        "step_seconds": seconds["wall"]
    }


def _memory_result(device: str, rss_before_kib: int, reset: bool) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {"process_peak_rss_mib": None, "steps_peak_rss_mib": None, "cuda_peak_mib": None}
    if device == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    peak = _status_kib("VmHWM")
    result["steps_peak_rss_mib"] = peak / 1024 if reset else None
    result["steps_extra_rss_mib"] = (peak - rss_before_kib) / 1024 if reset else None
    import resource

    result["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _bare_model(model_dir: str | None, workload: Workload, device: str, lora: bool, checkpointing: bool):
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from longgen.backbones.wan import WanAdapter

    if model_dir is not None:
        model = WanTransformer3DModel.from_pretrained(os.path.join(model_dir, "transformer"))
    else:
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=workload.heads,
            attention_head_dim=workload.head_dim,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=workload.ffn,
            num_layers=workload.layers,
        )
    model.to(device)
    if lora:
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=workload.lora_rank,
                lora_alpha=workload.lora_rank,
                target_modules=list(WanAdapter.lora_target_modules),
                init_lora_weights=True,
            )
        )
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return model, params, optimizer


def _bare_step(model, params, optimizer, x0, text, generator, device: str, autocast: bool) -> float:
    """One hand-written flow-matching step with diffusion-forcing per-frame levels; returns the loss."""
    import torch

    batch, _, frames, height, width = x0.shape
    tokens_per_frame = (height // 2) * (width // 2)
    t = torch.randint(0, 1000, (batch, frames), generator=generator)
    sigma = ((t.double() + 1.0) / 1000).float().clamp(1e-3, 1.0 - 1e-4).to(device)  # (B, F)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    s5 = sigma[:, None, :, None, None]
    x = (1.0 - s5) * x0 + s5 * noise
    timestep = (sigma * 1000).repeat_interleave(tokens_per_frame, dim=1)  # (B, F * h * w): frame-major tokens
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
        velocity = model(x, timestep, text, return_dict=False)[0]
    loss = (velocity.float() - (noise - x0)).pow(2).mean()  # = the x0 MSE weighted by 1 / sigma^2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class BareLoop:
    """The hand-written loop: the transformer, PEFT LoRA, AdamW, the cached batches held in memory."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from safetensors.torch import load_file

        self.workload = w = Workload(**spec["workload"])
        self.device = spec["device"]
        cache = spec["cache_dir"]
        with open(os.path.join(cache, "index.json")) as fh:
            index = json.load(fh)
        shards = [load_file(os.path.join(cache, name)) for name in index["shards"]]
        self.samples = [
            (shards[s["shard"]][f"{i}/latents"], shards[s["shard"]][f"{i}/cond/encoder_hidden_states"])
            for i, s in enumerate(index["samples"])
        ]
        self.model, self.params, self.optimizer = _bare_model(
            spec["model_dir"], w, self.device, True, spec["gradient_checkpointing"]
        )
        self.autocast = _mixed_precision(self.device) == "bf16"
        self.generator = torch.Generator().manual_seed(0)
        self.step = 0

    def run(self, steps: int) -> dict[str, list[float]]:
        import torch

        stamps = [_clock()]
        batch_size = self.workload.batch_size
        per_epoch = len(self.samples) // batch_size
        for _ in range(steps):
            first = (self.step % per_epoch) * batch_size
            rows = self.samples[first : first + batch_size]
            x0 = torch.stack([r[0] for r in rows]).to(self.device)  # (B, C, F, h, w)
            text = torch.stack([r[1] for r in rows]).to(self.device)  # (B, T, text_dim)
            _bare_step(
                self.model, self.params, self.optimizer, x0, text, self.generator, self.device, self.autocast
            )
            stamps.append(_clock())  # loss.item() in the step synchronises CUDA
            self.step += 1
        return _durations(stamps)


def child_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory of the bare loop over ``steps`` steps, in this fresh process."""
    import torch

    loop = BareLoop(spec)
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    seconds = loop.run(spec["steps"])
    return _memory_result(spec["device"], rss_before, reset) | {"step_seconds": seconds["wall"]}


def child_timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Alternate blocks of ``steps`` trainer steps (a fresh ``Trainer`` per block) and bare steps, in one process.

    Alternating short blocks in one process exposes both loops to the same machine load; each block's
    first ``warmup`` steps are dropped and its median kept.
    """
    import statistics as stats

    loop = BareLoop(spec)
    loop.run(spec["warmup"])  # first-call allocations of the bare model
    blocks: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in ("trainer", "bare")}
    for repeat in range(spec["repeats"]):
        order = ("trainer", "bare") if repeat % 2 == 0 else ("bare", "trainer")
        for kind in order:
            if kind == "trainer":
                out = os.path.join(spec["output_dir"], f"trainer_{repeat}")
                seconds = _trainer_steps(spec, out, spec["steps"])
            else:
                seconds = loop.run(spec["steps"])
            for clock in ("wall", "cpu"):
                blocks[kind][clock].append(stats.median(seconds[clock][spec["warmup"] :]))
    return blocks


def child_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Two bare training steps on random latents of ``latent_frames`` frames; peak memory of the steps."""
    import torch

    w = Workload(**spec["workload"])
    device = spec["device"]
    lf, h, wd = spec["latent_frames"], w.height // 8, w.width // 8
    model, params, optimizer = _bare_model(None, w, device, spec["lora"], spec["gradient_checkpointing"])
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(w.batch_size, 4, lf, h, wd, generator=generator).to(device)
    text = torch.randn(w.batch_size, spec["text_len"], 32, generator=generator).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    for _ in range(2):
        _bare_step(model, params, optimizer, x0, text, generator, device, _mixed_precision(device) == "bf16")
    return _memory_result(device, rss_before, reset) | {"seconds": (time.perf_counter() - start) / 2}


CHILDREN = {"trainer": child_trainer, "bare": child_bare, "memory": child_memory, "timing": child_timing}


THREADS = 1
"""CPU threads of every child (``--threads``; 0 = torch's default). One thread keeps timings stable on a
shared machine, where idle OpenMP workers of a second thread wait on busy cores."""


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (clean peak memory, no warm caches shared between loops)."""
    spec = {**spec, "threads": THREADS}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.trainer_overhead", "--_child", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the benchmark ---------------------------------------------------------------------------------


def _memory_of(result: dict[str, Any]) -> float:
    """The steps' memory: CUDA peak allocated, else the peak RSS during the steps."""
    if result["cuda_peak_mib"] is not None:
        return result["cuda_peak_mib"]
    if result["steps_peak_rss_mib"] is not None:
        return result["steps_peak_rss_mib"]
    return result["process_peak_rss_mib"]


def measure_overhead(
    workload: Workload,
    device: str,
    steps: int,
    warmup: int,
    repeats: int,
    checkpointing: bool = False,
    memory_steps: int = 4,
) -> dict[str, Any]:
    """Step time: ``repeats`` alternated blocks in one process. Memory: one fresh process per loop."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_folder(os.path.join(tmp, "model"), workload)
        cache = build_latent_cache(model_dir, tmp, workload)
        base = {
            "workload": asdict(workload),
            "device": device,
            "model_dir": model_dir,
            "cache_dir": cache,
            "gradient_checkpointing": checkpointing,
        }
        blocks = run_child(
            "timing",
            base
            | {"steps": steps, "warmup": warmup, "repeats": repeats, "output_dir": os.path.join(tmp, "t")},
        )
        memory = {
            kind: run_child(
                kind, base | {"steps": memory_steps, "output_dir": os.path.join(tmp, f"m_{kind}")}
            )
            for kind in ("trainer", "bare")
        }
    # CPU time is the primary clock on CPU (robust to other processes); on CUDA only wall time is meaningful.
    primary = "wall" if device == "cuda" else "cpu"
    summary: dict[str, Any] = {
        "workload": asdict(workload),
        "device": device,
        "steps_per_block": steps,
        "warmup": warmup,
        "blocks": blocks,
        "primary_clock": primary,
    }
    for clock in ("wall", "cpu"):
        paired = [t / b for t, b in zip(blocks["trainer"][clock], blocks["bare"][clock])]
        summary[f"{clock}_paired_ratios"] = paired
        summary[f"{clock}_ratio"] = statistics.median(paired)
    summary["time_ratio"] = summary[f"{primary}_ratio"]
    for kind in ("trainer", "bare"):
        summary[kind] = {
            "step_s": statistics.median(blocks[kind][primary]),
            "wall_step_s": statistics.median(blocks[kind]["wall"]),
            "cpu_step_s": statistics.median(blocks[kind]["cpu"]),
            "memory_mib": _memory_of(memory[kind]),
            "process_peak_rss_mib": memory[kind]["process_peak_rss_mib"],
            "cuda_peak_mib": memory[kind]["cuda_peak_mib"],
        }
    summary["memory_ratio"] = summary["trainer"]["memory_mib"] / summary["bare"]["memory_mib"]
    for clock in ("cpu", "wall"):
        print(
            f"  [{workload.name}] trainer/bare {clock} time per block: "
            + ", ".join(f"{r:.3f}" for r in summary[f"{clock}_paired_ratios"]),
            file=sys.stderr,
            flush=True,
        )
    return summary


def _fit_memory(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x + c x^2`` with ``c >= 0`` (linear when the quadratic term comes out
    negative or with fewer than three points): activations grow at least linearly in the clip length."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) >= 3:
        c, b, a = np.polyfit(x, y, 2)
        if c >= 0:
            return float(a), float(b), float(c)
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b), 0.0


def _max_frames(fit: tuple[float, float, float], budget: float, cap: int) -> int:
    """Largest whole number of latent frames whose fitted memory is within ``budget`` (at most ``cap``)."""
    a, b, c = fit
    frames = 0
    while frames < cap and a + b * (frames + 1) + c * (frames + 1) ** 2 <= budget:
        frames += 1
    return frames


def measure_max_frames(
    workload: Workload,
    device: str,
    latent_frames: list[int],
    budgets_mib: list[float],
    lora: bool,
    text_len: int,
) -> dict[str, Any]:
    """Memory of two training steps vs latent frames, with and without gradient checkpointing."""
    rows: dict[str, Any] = {
        "workload": asdict(workload),
        "device": device,
        "lora": lora,
        "points": {},
        "max": {},
    }
    key = "cuda_peak_mib" if device == "cuda" else "steps_extra_rss_mib"
    for checkpointing in (False, True):
        label = "checkpointing" if checkpointing else "no checkpointing"
        points = []
        for lf in latent_frames:
            spec = {
                "workload": asdict(workload),
                "device": device,
                "latent_frames": lf,
                "gradient_checkpointing": checkpointing,
                "lora": lora,
                "text_len": text_len,
            }
            result = run_child("memory", spec)
            mem = result[key] if result[key] is not None else result["process_peak_rss_mib"]
            points.append((lf, mem, result["seconds"]))
            print(
                f"  [memory] {label}: {lf} latent frames -> {mem:.0f} MiB, {result['seconds']:.2f} s/step",
                file=sys.stderr,
                flush=True,
            )
        fit = _fit_memory([p[0] for p in points], [p[1] for p in points])
        cap = 8 * max(latent_frames)  # no further than 8x the longest measured clip
        rows["points"][label] = points
        rows["max"][label] = {
            str(budget): {
                "latent_frames": (n := _max_frames(fit, budget, cap)),
                "extrapolated": n > max(latent_frames),
                "capped": n >= cap,
            }
            for budget in budgets_mib
        }
        rows.setdefault("fits", {})[label] = fit
    rows["measure"] = key
    return rows


def markdown(overhead: list[dict[str, Any]], memory: dict[str, Any] | None) -> str:
    lines = [
        "| workload | device | clock | bare ms/step | trainer ms/step | time ratio, paired (min-max) | "
        "ratio of medians | bare peak MiB | trainer peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in overhead:
        clocks = ["wall"] if s["device"] == "cuda" else ["cpu", "wall"]
        for clock in clocks:
            ratios = s[f"{clock}_paired_ratios"]
            lines.append(
                f"| {s['workload']['name']} | {s['device']} | {clock} | "
                f"{s['bare'][f'{clock}_step_s'] * 1e3:.1f} | {s['trainer'][f'{clock}_step_s'] * 1e3:.1f} | "
                f"{s[f'{clock}_ratio']:.3f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{s['trainer'][f'{clock}_step_s'] / s['bare'][f'{clock}_step_s']:.3f} | "
                f"{s['bare']['memory_mib']:.0f} | {s['trainer']['memory_mib']:.0f} | {s['memory_ratio']:.3f} |"
            )
    if overhead:
        peak = (
            "peak CUDA allocated"
            if overhead[0]["device"] == "cuda"
            else "peak RSS of the process during the steps"
        )
        lines += [
            "",
            "Paired time ratio: median over alternated blocks of (trainer / bare) median step time (robust to "
            "load that drifts between blocks); ms/step: median over blocks. cpu = process CPU time (robust to "
            f"other processes on a shared CPU), wall = wall clock; memory: {peak}.",
        ]
    if memory is not None:
        what = (
            "peak CUDA allocated"
            if memory["device"] == "cuda"
            else "training memory (peak RSS above model + optimizer)"
        )
        lines += [
            "",
            f"Max trainable latent frames ({memory['workload']['name']}, {'LoRA' if memory['lora'] else 'full'};"
            f" memory = {what}):",
            "",
        ]
        lines += [
            "| latent frames | " + " | ".join(f"{k} MiB" for k in memory["points"]) + " |",
            "|---|" + "---|" * len(memory["points"]),
        ]
        labels = list(memory["points"])
        for i, (lf, _, _) in enumerate(memory["points"][labels[0]]):
            lines.append(f"| {lf} | " + " | ".join(f"{memory['points'][k][i][1]:.0f}" for k in labels) + " |")
        lines += [
            "",
            "| budget MiB | " + " | ".join(f"max frames, {k}" for k in labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for budget in next(iter(memory["max"].values())):
            cells = []
            for k in labels:
                entry = memory["max"][k][budget]
                n = entry["latent_frames"]
                text = f">= {n} (fit capped at 8x the longest measured)" if entry.get("capped") else str(n)
                cells.append(
                    text + (" (extrapolated)" if entry["extrapolated"] and not entry.get("capped") else "")
                )
            lines.append(f"| {float(budget):.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="fewer steps, repeats and lengths (about two minutes)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default 12, quick 8)")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each block left out of its median")
    p.add_argument(
        "--repeats", type=int, default=None, help="alternated trainer/bare blocks (default 6, quick 4)"
    )
    p.add_argument(
        "--workloads", nargs="+", default=None, choices=["tiny", "small"], help="default: tiny small"
    )
    p.add_argument("--latent-frames", type=int, nargs="+", default=None, help="lengths for the memory fit")
    p.add_argument("--budgets-mib", type=float, nargs="+", default=None, help="memory budgets for max frames")
    p.add_argument("--full", action="store_true", help="memory part: full fine-tune instead of LoRA")
    p.add_argument("--no-memory", action="store_true", help="skip the memory-vs-length part")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    global THREADS
    THREADS = args.threads

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (8 if args.quick else 12)
    repeats = args.repeats or (4 if args.quick else 6)
    names = args.workloads or (["tiny"] if args.quick else ["tiny", "small"])
    overhead = [
        measure_overhead({"tiny": TINY, "small": SMALL}[n], device, steps, args.warmup, repeats)
        for n in names
    ]
    memory = None
    if not args.no_memory:
        mem_workload = MEMORY
        frames = args.latent_frames or ([2, 6, 12] if args.quick else [2, 6, 12, 20, 28])
        budgets = args.budgets_mib or ([1024, 4096, 16384] if device == "cuda" else [128, 512, 2048])
        memory = measure_max_frames(mem_workload, device, frames, budgets, not args.full, text_len=32)
    print(markdown(overhead, memory))
    if args.json:
        write_json_atomic(args.json, {"overhead": overhead, "memory": memory}, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_spec = json.loads(sys.argv[3])
        if child_spec.get("threads"):
            import torch

            torch.set_num_threads(child_spec["threads"])
        print(json.dumps(CHILDREN[sys.argv[2]](child_spec)))
        sys.exit(0)
    sys.exit(main())
