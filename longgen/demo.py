"""The embedded default: train a tiny video model on synthetic long videos, generate long, evaluate.

Runs on a CPU with no downloads. Steps:

1. write the synthetic moving-shapes data set (real mp4 files, captions, the worlds' ground truth);
2. train a tiny Wan-architecture model from scratch on short clips of it (its native length);
3. generate clips ``length_factor`` times longer than the native length with the naive baseline (the
   model run on the whole clip) and with longgen's long samplers, from the same noise and prompt;
4. evaluate each clip: long-video metrics over time and the synthetic scorer against the world the
   prompt describes (object count, colour, size and motion consistency), so drift shows as a curve.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEMO_SAMPLERS = ("full", "sliding", "fifo", "df")


@dataclass
class DemoSettings:
    out_dir: str = "outputs/demo"
    train_steps: int = 800
    num_videos: int = 24
    length_factor: int = 4
    samplers: tuple[str, ...] = DEMO_SAMPLERS
    num_inference_steps: int = 16
    seed: int = 0
    eval_window: int = 8
    extra_overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, out_dir: str) -> DemoSettings:
        """A reduced run (about a minute on 2 CPU cores): the same steps, far less training."""
        return cls(out_dir=out_dir, train_steps=20, num_videos=4, length_factor=2, num_inference_steps=4)


def train_tiny_model(settings: DemoSettings):
    """Train the tiny model from scratch (full fine-tune of a random tiny Wan); returns (adapter, result, data dir)."""
    from .training.config import load_config
    from .training.loop import Trainer

    train_dir = os.path.join(settings.out_dir, "train")
    overrides = [
        "model.tiny=wan",
        "lora.enabled=false",
        "objective.mode=diffusion_forcing",
        "optim.lr=1e-3",
        "optim.schedule=constant_with_warmup",
        "optim.warmup_steps=10",
        "train.batch_size=4",
        f"train.steps={settings.train_steps}",
        f"train.checkpoint_every={settings.train_steps}",
        f"train.output_dir={train_dir}",
        f"train.seed={settings.seed}",
        "data.num_frames=9",
        "data.height=32",
        "data.width=32",
        f"data.synthetic.num_videos={settings.num_videos}",
        "data.synthetic.num_frames=65",
        "validation.every=0",
        *settings.extra_overrides,
    ]
    trainer = Trainer(load_config(None, overrides))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return trainer.adapter, result, os.path.join(train_dir, "synthetic_data")


def generate_and_evaluate(
    adapter,
    data_dir: str,
    out_dir: str,
    length_factor: int,
    samplers: tuple[str, ...],
    num_inference_steps: int,
    seed: int = 0,
    eval_window: int = 8,
    extension: str | None = None,
) -> dict[str, Any]:
    """Generate one long clip per sampler from the first synthetic world's caption and evaluate them all."""
    from .data.synthetic import WorldSpec, load_manifest
    from .eval.report import evaluate_videos
    from .pipeline import LongVideoPipeline

    record = load_manifest(os.path.join(data_dir, "manifest.jsonl"))[0]
    world = record["world"] if isinstance(record["world"], WorldSpec) else WorldSpec.from_dict(record["world"])
    caption = record["caption"]
    pipe = LongVideoPipeline(adapter)
    native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
    num_frames = adapter.num_pixel_frames(native_latent * length_factor)
    os.makedirs(out_dir, exist_ok=True)
    videos, runs = [], {}
    for sampler in samplers:
        handle = None
        if extension is not None:
            handle = pipe.apply_extension(extension, num_frames)
        path = os.path.join(out_dir, f"{sampler}{'_' + extension if extension else ''}_{num_frames}f.mp4")
        options = {"num_partitions": max(1, num_inference_steps // 2)} if sampler == "fifo" else {}
        start = time.perf_counter()
        result = pipe.generate(
            caption, negative_prompt=None, num_frames=num_frames, guidance_scale=1.0, sampler=sampler,
            num_inference_steps=None if sampler == "fifo" else num_inference_steps, sampler_options=options,
            seed=seed, output_path=path, show_progress=False,
        )
        if handle is not None:
            pipe.remove_extensions()
        runs[sampler] = {"path": path, "seconds": round(time.perf_counter() - start, 2),
                         "model_calls": result.stats["model_calls"], "num_frames": result.num_frames}
        videos.append(path)
        logger.info("%s: %d frames in %.1f s -> %s", sampler, result.num_frames, runs[sampler]["seconds"], path)
    report = evaluate_videos(
        videos, os.path.join(out_dir, "eval"), window=eval_window, labels=list(samplers), worlds=[world] * len(videos)
    )
    return {"caption": caption, "num_frames": num_frames, "length_factor": length_factor, "runs": runs,
            "report": report}


HEADLINE = (
    ("synthetic", "overall"),
    ("synthetic", "count"),
    ("synthetic", "color"),
    ("metrics", "temporal_flicker"),
    ("metrics", "ssim_first"),
    ("metrics", "color_hist_drift"),
)


def summary_table(result: dict[str, Any]) -> str:
    """Markdown table: per sampler, each headline metric's mean and its end-minus-start change."""
    head = "| sampler | " + " | ".join(f"{name} (mean / end-start)" for _, name in HEADLINE) + " |"
    lines = [head, "|" + "---|" * (len(HEADLINE) + 1)]
    for label, video in result["report"]["videos"].items():
        cells = []
        for group, name in HEADLINE:
            block = video.get(group, {})
            entry = block.get("scores", {}).get(name) if group == "synthetic" else block.get(name)
            s = (entry or {}).get("summary") or {}
            if s.get("mean") is None or s.get("end_minus_start") is None:
                cells.append("-")
            else:
                cells.append(f"{s['mean']:.3f} / {s['end_minus_start']:+.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """The whole loop; writes ``demo.json`` and ``summary.md`` into ``settings.out_dir``."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    print(f"[1/3] training a tiny model on synthetic long videos ({settings.train_steps} steps) ...", flush=True)
    adapter, train_result, data_dir = train_tiny_model(settings)
    losses = list(train_result.losses.values())
    print(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f}; weights in {train_result.final_dir}", flush=True)
    print(f"[2/3] generating {settings.length_factor}x-long clips with: {', '.join(settings.samplers)} ...", flush=True)
    result = generate_and_evaluate(
        adapter, data_dir, os.path.join(settings.out_dir, "videos"), settings.length_factor, settings.samplers,
        settings.num_inference_steps, settings.seed, settings.eval_window,
    )
    print("[3/3] evaluated (synthetic scorer against the prompted world + metrics over time)", flush=True)
    table = summary_table(result)
    summary = {
        "train": {"steps": train_result.step, "first_loss": losses[0], "last_loss": losses[-1],
                  "final_dir": train_result.final_dir},
        "caption": result["caption"],
        "num_frames": result["num_frames"],
        "runs": result["runs"],
        "metrics_json": os.path.join(settings.out_dir, "videos", "eval", "metrics.json"),
        "plots": os.path.join(settings.out_dir, "videos", "eval", "plots"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(settings.out_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(settings.out_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print()
    for sampler, run in result["runs"].items():
        print(f"  {sampler:8s} {run['path']}  ({run['num_frames']} frames, {run['seconds']} s)")
    print(f"  metrics: {summary['metrics_json']}\n  plots:   {summary['plots']}/\n  summary: "
          f"{os.path.join(settings.out_dir, 'summary.md')}  (total {summary['seconds']} s)")
    return summary
