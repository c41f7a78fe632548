"""The embedded default: train a tiny video model on synthetic long videos, generate long, evaluate.

Runs on a CPU with no downloads. Steps:

1. write the synthetic moving-shapes data set (real mp4 files, captions, the worlds' ground truth);
2. train the tiny Wan VAE (``AutoencoderKLWan``, 4x space / 4x time) on clips of it as a beta-VAE
   (Kingma & Welling 2014: reconstruction + a small KL), set the latent normalisation the adapter uses
   (``latents_mean`` / ``latents_std``) from the encoded data, and check its reconstruction PSNR;
3. train a small Wan transformer from scratch on the VAE's latents of short clips (its native length);
4. generate clips ``length_factor`` times longer than the native length with the naive baseline (the
   model run on the whole clip) and with longgen's long samplers, from the same noise and prompt;
5. evaluate each clip: long-video metrics over time and the synthetic scorer against the world the
   prompt describes (object count, colour, size and motion consistency), so drift shows as a curve.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEMO_SAMPLERS = ("full", "sliding", "fifo", "df")


DEMO_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 8,
    "dim_mult": [1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [True, True],
    "scale_factor_spatial": 4,
    "scale_factor_temporal": 4,
}
"""The demo's VAE: two levels, 4x space and 4x time (32x32 frames -> 8x8 latents, 9 frames -> 3), so a
latent cell covers 4x4 pixels and the small shapes (radius 2-4 px) stay representable."""
DEMO_TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "ffn_dim": 256,
    "num_layers": 4,
}
"""The demo's Wan transformer: 4 blocks of width 96 (16 tokens per latent frame with the 2x2 patch)."""


@dataclass
class DemoSettings:
    out_dir: str = "outputs/demo"
    train_steps: int = 1000
    num_videos: int = 24
    length_factor: int = 4
    samplers: tuple[str, ...] = DEMO_SAMPLERS
    num_inference_steps: int = 16
    seed: int = 0
    eval_window: int = 8
    vae_steps: int = 400
    """Steps of the VAE stage (batch ``vae_batch_size`` clips); 0 keeps the random VAE."""
    vae_batch_size: int = 4
    vae_lr: float = 2e-3
    vae_num_frames: int = 17
    """Clip length of the VAE stage: the causal VAE's temporal receptive field spans tens of frames and a
    decoder trained only on native 9-frame clips breaks down on longer ones (frames past the trained length
    lose colour, then structure). 17 frames x 4 clips costs what 9 x 8 did; 45 x 2 stays stable over a
    whole 4x clip but learns colour too slowly in 400 steps."""
    vae_recon_loss: str = "l1"
    vae_object_weight: float = 20.0
    vae_chroma_weight: float = 2.0
    vae_kl_weight: float = 1e-5
    lr: float = 1e-3
    """Peak transformer learning rate (warm-up, then cosine decay)."""
    batch_size: int = 8
    vae_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEMO_VAE))
    transformer_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEMO_TRANSFORMER))
    extra_overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, out_dir: str) -> DemoSettings:
        """A reduced run (about a minute on 2 CPU cores): the same steps, far less training."""
        return cls(
            out_dir=out_dir, train_steps=20, num_videos=4, length_factor=2, num_inference_steps=4,
            vae_steps=10, vae_batch_size=4, vae_num_frames=9, batch_size=4,
        )


def _train_overrides(settings: DemoSettings, train_dir: str) -> list[str]:
    return [
        "lora.enabled=false",
        "objective.mode=diffusion_forcing",
        f"optim.lr={settings.lr}",
        "optim.schedule=cosine",
        f"optim.warmup_steps={max(1, settings.train_steps // 20)}",
        f"train.batch_size={settings.batch_size}",
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


def write_demo_data(config) -> str:
    """Write the synthetic data set where the trainer looks for it (``<output_dir>/synthetic_data``), with
    the spec file it compares, so the VAE stage and the trainer read the same videos. Returns the folder."""
    from .data.synthetic import write_synthetic_dataset

    data, syn = config.data, config.data.synthetic
    folder = os.path.join(os.path.abspath(config.train.output_dir), "synthetic_data")
    spec = {"num_videos": syn.num_videos, "num_frames": syn.num_frames, "height": syn.height or data.height,
            "width": syn.width or data.width, "fps": syn.fps, "seed": syn.seed}
    spec_path = os.path.join(folder, "synthetic_spec.json")
    if os.path.exists(spec_path):
        with open(spec_path) as fh:
            if json.load(fh) == spec and os.path.exists(os.path.join(folder, "manifest.jsonl")):
                return folder
    write_synthetic_dataset(folder, **spec)
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    return folder


def _clip_batch(videos: list[torch.Tensor], num_frames: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random ``num_frames``-frame windows of the videos ``[N, H, W, 3]`` (uint8) ->
    ``[B, 3, F, H, W]`` in [-1, 1], the VAE's input."""
    clips = []
    for _ in range(batch):
        video = videos[int(torch.randint(len(videos), (1,), generator=generator))]
        start = int(torch.randint(video.shape[0] - num_frames + 1, (1,), generator=generator))
        clips.append(video[start : start + num_frames])
    x = torch.stack(clips).float() / 127.5 - 1.0  # (B, F, H, W, 3)
    return x.permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, F, H, W)


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def train_vae(
    vae, data_dir: str, steps: int, batch_size: int = 8, lr: float = 2e-3, num_frames: int = 9,
    kl_weight: float = 1e-3, object_weight: float = 4.0, seed: int = 0, recon_loss: str = "mse",
    chroma_weight: float = 0.0,
) -> dict[str, Any]:
    """Train the Wan VAE on clips of the synthetic data set (Kingma & Welling 2014, a beta-VAE).

    Loss: error of the reconstruction from a posterior sample (``recon_loss``: absolute or squared), plus
    ``chroma_weight`` times the same error of the chroma (per-channel error minus its channel mean, so a
    saturated shape that comes back greyish costs more), with pixels away from the background weighted
    ``1 + object_weight`` (the shapes cover a few percent of a frame and would otherwise be learnt last),
    plus ``kl_weight`` times the KL to N(0, 1) per input value. Adam with
    warm-up and cosine decay. Afterwards sets the VAE config's ``latents_mean`` / ``latents_std`` (what the
    Wan adapter normalises latents with) to the per-channel statistics of the encoded data, so the
    transformer sees unit-scale latents. Returns ``{"steps", "psnr_before", "psnr", "loss", "seconds"}``
    with PSNR of the posterior mode's reconstruction on fixed clips.
    """
    from .data.synthetic import load_manifest
    from .io import read_video

    start = time.perf_counter()
    videos = [torch.from_numpy(read_video(r["video"])) for r in load_manifest(os.path.join(data_dir, "manifest.jsonl"))]
    generator = torch.Generator().manual_seed(seed)
    probe = _clip_batch(videos, num_frames, 16, torch.Generator().manual_seed(seed + 1))
    background = probe.flatten(2).mode(dim=2).values.mode(dim=0).values.view(1, 3, 1, 1, 1)  # the commonest colour

    @torch.no_grad()
    def evaluate() -> float:
        vae.eval()
        recon = vae.decode(vae.encode(probe).latent_dist.mode()).sample.clamp(-1, 1)
        return _psnr(recon, probe)

    psnr_before = evaluate()
    losses: list[float] = []
    if steps > 0:
        vae.train()
        vae.requires_grad_(True)
        optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
            optimizer,
            lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / (steps - warmup))),
        )
        for _ in range(steps):
            x = _clip_batch(videos, num_frames, batch_size, generator)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator)).sample
            weight = 1.0 + object_weight * ((x - background).abs().amax(dim=1, keepdim=True) > 0.2).float()
            kl = posterior.kl().sum() / x.numel()
            err = recon - x  # (B, 3, F, H, W)
            # Chroma error: the per-channel error minus its channel mean (a hue/saturation shift, which a
            # grey-ish blur of a small saturated shape costs little in plain RGB error).
            chroma = err - err.mean(dim=1, keepdim=True)
            if recon_loss == "l1":
                per_pixel = err.abs() + chroma_weight * chroma.abs()
            elif recon_loss == "mse":
                per_pixel = err**2 + chroma_weight * chroma**2
            else:
                raise ValueError(f"recon_loss must be 'l1' or 'mse', got {recon_loss!r}")
            loss = (weight * per_pixel).mean() + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        vae.requires_grad_(False)
    vae.eval()
    psnr = evaluate()
    with torch.no_grad():  # per-channel latent statistics of the encoded data (posterior modes)
        stats_clips = _clip_batch(videos, num_frames, 32, torch.Generator().manual_seed(seed + 2))
        z = vae.encode(stats_clips).latent_dist.mode()  # (B, C, f, h, w)
        mean = z.mean(dim=(0, 2, 3, 4))
        std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    return {"steps": steps, "psnr_before": round(psnr_before, 2), "psnr": round(psnr, 2),
            "loss": [losses[0], losses[-1]] if losses else None, "seconds": round(time.perf_counter() - start, 1)}


def train_tiny_model(settings: DemoSettings):
    """Train the tiny model from scratch: the VAE stage, then a full fine-tune of a random tiny Wan transformer
    on its latents. Returns (adapter, trainer result, data dir, VAE report)."""
    from .backbones.wan import WanAdapter
    from .training.config import load_config
    from .training.loop import Trainer

    train_dir = os.path.join(settings.out_dir, "train")
    model_dir = os.path.join(os.path.abspath(train_dir), "base_model")
    overrides = _train_overrides(settings, train_dir)
    data_dir = write_demo_data(load_config(None, ["model.tiny=wan", *overrides]))
    pipe = WanAdapter.tiny_pipeline(
        seed=settings.seed, vae_kwargs=settings.vae_kwargs, transformer_kwargs=settings.transformer_kwargs
    )
    adapter = WanAdapter(pipe, native_video_size=WanAdapter.tiny_video_size)
    vae_report = train_vae(
        pipe.vae, data_dir, settings.vae_steps, batch_size=settings.vae_batch_size, lr=settings.vae_lr,
        num_frames=settings.vae_num_frames, kl_weight=settings.vae_kl_weight,
        object_weight=settings.vae_object_weight, seed=settings.seed, recon_loss=settings.vae_recon_loss,
        chroma_weight=settings.vae_chroma_weight,
    )
    adapter.save_pretrained(model_dir)  # the trainer loads this folder: trained VAE + random transformer
    trainer = Trainer(load_config(None, [f"model.path={model_dir}", *overrides]))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return trainer.adapter, result, data_dir, vae_report


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
    print(f"[1/3] training a tiny model on synthetic long videos (VAE {settings.vae_steps} steps, transformer "
          f"{settings.train_steps} steps) ...", flush=True)
    adapter, train_result, data_dir, vae_report = train_tiny_model(settings)
    losses = list(train_result.losses.values())
    print(f"      VAE reconstruction PSNR {vae_report['psnr_before']:.1f} -> {vae_report['psnr']:.1f} dB "
          f"({vae_report['seconds']} s)", flush=True)
    print(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f}; weights in {train_result.final_dir}", flush=True)
    print(f"[2/3] generating {settings.length_factor}x-long clips with: {', '.join(settings.samplers)} ...", flush=True)
    result = generate_and_evaluate(
        adapter, data_dir, os.path.join(settings.out_dir, "videos"), settings.length_factor, settings.samplers,
        settings.num_inference_steps, settings.seed, settings.eval_window,
    )
    print("[3/3] evaluated (synthetic scorer against the prompted world + metrics over time)", flush=True)
    table = summary_table(result)
    summary = {
        "vae": vae_report,
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
