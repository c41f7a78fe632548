"""The embedded default: train a tiny video model on synthetic long videos, generate long, evaluate.

Runs on a CPU with no downloads. Steps:

1. write the synthetic moving-shapes data set (real mp4 files, captions, the worlds' ground truth);
2. train the tiny Wan VAE (``AutoencoderKLWan``, 4x space, no time compression) on frames of it as a
   beta-VAE (Kingma & Welling 2014: reconstruction + a small KL) with every causal convolution restricted
   to its current-frame tap, so it codes each frame on its own and is exact on clips of any length (time
   is left to the transformer); set the latent normalisation the adapter uses (``latents_mean`` /
   ``latents_std``) from the encoded data, and check its reconstruction PSNR;
3. encode every training video once into a latent cache (all windows of the native length) and train a
   small Wan transformer from scratch on it (its native length, diffusion forcing);
4. generate clips ``length_factor`` times longer than the native length with the naive baseline (the
   model run on the whole clip) and with longgen's long samplers, from the same noise and prompt;
5. evaluate each clip: long-video metrics over time and the synthetic scorer against the world the
   prompt describes (object count, colour, size and motion consistency), so drift shows as a curve; the
   prompted world's ground truth and its VAE reconstruction (the best any sampler can score) are
   evaluated alongside.
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

from .backbones.wan import is_vae_per_frame, make_vae_per_frame
from .samplers import options_for_steps, sampler_names

logger = logging.getLogger(__name__)

DEMO_SAMPLERS = sampler_names()


DEMO_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, False],
    "scale_factor_spatial": 4,
    "scale_factor_temporal": 1,
}
"""The demo's VAE: two levels, 4x space and no time compression (32x32 frames -> 8x8x16 latents, one latent
frame per frame), so a latent cell covers 4x4 pixels and the small shapes (radius 2-4 px) keep their colour.
Trained per frame (:func:`make_vae_per_frame`). A VAE that also compresses time 4x (the Wan default) trained in
the same few minutes returned only about half of the objects' pixels in their colour on 4x-long clips."""
DEMO_TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "ffn_dim": 256,
    "num_layers": 4,
}
"""The demo's Wan transformer: 4 blocks of width 96 (16 tokens per latent frame with the 2x2 patch, 144 tokens
for the native 9 frames)."""


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
    vae_steps: int = 600
    """Steps of the VAE stage (batch ``vae_batch_size`` clips); 0 keeps the random VAE."""
    vae_batch_size: int = 64
    vae_lr: float = 5e-3
    vae_num_frames: int = 1
    """Clip length of the VAE stage (``4k + 1``: the Wan encoder reads a first frame, then chunks of 4, and
    drops a remainder). With ``vae_per_frame`` the frames of a clip are coded independently, and single
    frames in batches of 64 cost least per frame on a CPU."""
    vae_per_frame: bool = True
    """Restrict the VAE's causal convolutions to the current frame (:func:`make_vae_per_frame`): exact on long
    clips, and its latents of any window are slices of one encode of the whole video (the latent cache)."""
    vae_recon_loss: str = "l1"
    vae_object_weight: float = 20.0
    vae_chroma_weight: float = 2.0
    vae_kl_weight: float = 1e-5
    latent_cache: bool = True
    """Train the transformer from a latent cache of every ``cache_stride``-th window of each video (needs a
    per-frame VAE); otherwise the trainer decodes and encodes one random window per video and step."""
    cache_stride: int = 2
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
            out_dir=out_dir,
            train_steps=20,
            num_videos=4,
            length_factor=2,
            num_inference_steps=4,
            vae_steps=10,
            vae_batch_size=4,
            batch_size=4,
            cache_stride=8,
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
    from .data.synthetic import ensure_synthetic_dataset

    folder = os.path.join(os.path.abspath(config.train.output_dir), "synthetic_data")
    ensure_synthetic_dataset(folder, config.data)
    return folder


def _clip_batch(
    videos: list[torch.Tensor], num_frames: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
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
    vae,
    data_dir: str,
    steps: int,
    batch_size: int = 8,
    lr: float = 2e-3,
    num_frames: int = 9,
    kl_weight: float = 1e-3,
    object_weight: float = 4.0,
    seed: int = 0,
    recon_loss: str = "mse",
    chroma_weight: float = 0.0,
    per_frame: bool = False,
) -> dict[str, Any]:
    """Train the Wan VAE on clips of the synthetic data set (Kingma & Welling 2014, a beta-VAE).

    Loss: error of the reconstruction from a posterior sample (``recon_loss``: absolute or squared), plus
    ``chroma_weight`` times the same error of the chroma (per-channel error minus its channel mean, so a
    saturated shape that comes back greyish costs more), with pixels away from the background weighted
    ``1 + object_weight`` (the shapes cover a few percent of a frame and would otherwise be learnt last),
    plus ``kl_weight`` times the KL to N(0, 1) per input value. Adam with
    warm-up and cosine decay. ``per_frame`` first applies :func:`make_vae_per_frame` (and keeps it through
    training). Afterwards sets the VAE config's ``latents_mean`` / ``latents_std`` (what the
    Wan adapter normalises latents with) to the per-channel statistics of the encoded data, so the
    transformer sees unit-scale latents. Returns ``{"steps", "psnr_before", "psnr", "loss", "seconds"}``
    with PSNR of the posterior mode's reconstruction on fixed clips.
    """
    from .data.synthetic import load_manifest
    from .io import read_video

    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(
            f"the VAE stage needs clips of 4k+1 frames (the Wan encoder drops the rest), got {num_frames}: "
            f"use {max(1, (num_frames - 1) // 4 * 4 + 1)} or {(max(num_frames, 1) - 1) // 4 * 4 + 5}"
        )
    start = time.perf_counter()
    videos = [
        torch.from_numpy(read_video(r["video"]))
        for r in load_manifest(os.path.join(data_dir, "manifest.jsonl"))
    ]
    generator = torch.Generator().manual_seed(seed)
    probe = _clip_batch(videos, num_frames, 16, torch.Generator().manual_seed(seed + 1))
    background = (
        probe.flatten(2).mode(dim=2).values.mode(dim=0).values.view(1, 3, 1, 1, 1)
    )  # the commonest colour

    @torch.no_grad()
    def evaluate() -> float:
        vae.eval()
        recon = vae.decode(vae.encode(probe).latent_dist.mode()).sample.clamp(-1, 1)
        return _psnr(recon, probe)

    handles = make_vae_per_frame(vae) if per_frame else []
    psnr_before = evaluate()
    losses: list[float] = []
    if steps > 0:
        vae.train()
        vae.requires_grad_(True)
        optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
            optimizer,
            lambda i: (
                (i + 1) / warmup
                if i < warmup
                else 0.5 * (1 + math.cos(math.pi * (i - warmup) / (steps - warmup)))
            ),
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
    for handle in handles:
        handle.remove()
    vae.eval()
    psnr = evaluate()
    with torch.no_grad():  # per-channel latent statistics of the encoded data (posterior modes)
        stats_clips = _clip_batch(videos, num_frames, 32, torch.Generator().manual_seed(seed + 2))
        z = vae.encode(stats_clips).latent_dist.mode()  # (B, C, f, h, w)
        mean = z.mean(dim=(0, 2, 3, 4))
        std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    return {
        "steps": steps,
        "psnr_before": round(psnr_before, 2),
        "psnr": round(psnr, 2),
        "loss": [losses[0], losses[-1]] if losses else None,
        "per_frame": per_frame,
        "seconds": round(time.perf_counter() - start, 1),
    }


@torch.no_grad()
def build_latent_cache(
    adapter, data_dir: str, out_dir: str, num_frames: int, stride: int = 1
) -> dict[str, Any]:
    """Write a ``longgen-latent-cache`` (:mod:`longgen.data.cache`) of every ``stride``-th ``num_frames``-frame
    window of each video of the data set, for the trainer's ``data.cache_dir``.

    Needs a per-frame VAE (:func:`is_vae_per_frame`): each video is encoded once and its windows are slices of
    that encoding, which then equal the encodings of the windows themselves (``longgen precompute`` encodes
    one window per video). The caption's text embedding is stored with every window. Returns ``{"dir",
    "num_samples", "seconds"}``.
    """
    from safetensors.torch import save_file

    from .data.cache import CACHE_FORMAT, CACHE_VERSION, INDEX_NAME, encode_conds
    from .data.synthetic import load_manifest
    from .io import read_video

    if not is_vae_per_frame(adapter.vae):
        raise ValueError(
            "build_latent_cache slices one encoding per video, which is exact only for a per-frame VAE "
            "(make_vae_per_frame); train without the cache (latent_cache=False) or use longgen precompute"
        )
    start = time.perf_counter()
    num_latent = adapter.num_latent_frames(num_frames)  # one latent frame per frame (checked above)
    os.makedirs(out_dir, exist_ok=True)
    stale = os.path.join(out_dir, INDEX_NAME)
    if os.path.exists(stale):
        os.remove(stale)  # unfinished until the new index is written
    samples: list[dict[str, Any]] = []
    shards: list[str] = []
    pending: dict[str, torch.Tensor] = {}
    cond_keys: list[str] = []

    def flush() -> None:
        nonlocal pending
        if pending:
            name = f"shard_{len(shards):05d}.safetensors"
            save_file(pending, os.path.join(out_dir, name))
            shards.append(name)
            pending = {}

    for record in load_manifest(os.path.join(data_dir, "manifest.jsonl")):
        video = torch.from_numpy(read_video(record["video"])).float()[None] / 255.0  # (1, N, H, W, 3)
        latents = adapter.encode_video(video)[0]  # (C, N, h, w)
        cond = {
            k: v
            for k, v in encode_conds(adapter, [record["caption"]], video[:, :1]).items()
            if isinstance(v, torch.Tensor)
        }
        cond_keys = sorted(cond)
        for first in range(0, latents.shape[1] - num_latent + 1, stride):
            i = len(samples)
            pending[f"{i}/latents"] = latents[:, first : first + num_latent].contiguous().clone()
            for key, value in cond.items():
                pending[f"{i}/cond/{key}"] = value[0].contiguous().clone()
            samples.append(
                {"shard": len(shards), "caption": record["caption"], "path": f"{record['video']}#{first}"}
            )
            if len(samples) % 256 == 0:
                flush()
    flush()
    if not samples:
        raise ValueError(f"the videos in {data_dir} are shorter than {num_frames} frames: no window to cache")
    channels, _, height, width = (int(v) for v in latents.shape)
    latent_shape = [channels, num_latent, height, width]
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "family": adapter.family,
        "num_samples": len(samples),
        "clip_shape": [num_frames, *(int(v) for v in video.shape[2:])],
        "latent_shape": latent_shape,
        "cond_keys": cond_keys,
        "dropped_cond_keys": [],
        "null_cond": None,
        "shards": shards,
        "samples": samples,
        "source": data_dir,
        "skipped": {},
    }
    with open(os.path.join(out_dir, INDEX_NAME + ".tmp"), "w") as f:
        json.dump(index, f)
    os.replace(os.path.join(out_dir, INDEX_NAME + ".tmp"), os.path.join(out_dir, INDEX_NAME))
    return {"dir": out_dir, "num_samples": len(samples), "seconds": round(time.perf_counter() - start, 1)}


def train_tiny_model(settings: DemoSettings):
    """Train the tiny model from scratch: the VAE stage, then a full fine-tune of a random tiny Wan transformer
    on its latents (from a latent cache when ``settings.latent_cache``). Returns (adapter, trainer result,
    data dir, VAE report); the report's ``stage_seconds`` times the data, VAE, cache and transformer stages."""
    import shutil

    from .backbones.wan import WanAdapter
    from .training.config import load_config
    from .training.loop import Trainer

    stage_seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stage_seconds[name] = round(now - clock, 1)
        clock = now

    train_dir = os.path.join(settings.out_dir, "train")
    model_dir = os.path.join(os.path.abspath(train_dir), "base_model")
    overrides = _train_overrides(settings, train_dir)
    data_dir = write_demo_data(load_config(None, ["model.tiny=wan", *overrides]))
    lap("data")
    pipe = WanAdapter.tiny_pipeline(
        seed=settings.seed, vae_kwargs=settings.vae_kwargs, transformer_kwargs=settings.transformer_kwargs
    )
    adapter = WanAdapter(pipe, native_video_size=WanAdapter.tiny_video_size)
    vae_report = train_vae(
        pipe.vae,
        data_dir,
        settings.vae_steps,
        batch_size=settings.vae_batch_size,
        lr=settings.vae_lr,
        num_frames=settings.vae_num_frames,
        kl_weight=settings.vae_kl_weight,
        object_weight=settings.vae_object_weight,
        seed=settings.seed,
        recon_loss=settings.vae_recon_loss,
        chroma_weight=settings.vae_chroma_weight,
        per_frame=settings.vae_per_frame,
    )
    adapter.save_pretrained(model_dir)  # the trainer loads this folder: trained VAE + random transformer
    lap("vae")
    cache_dir = None
    if settings.latent_cache and settings.vae_per_frame:
        cache_dir = os.path.join(os.path.abspath(train_dir), "latent_cache")
        vae_report["latent_cache"] = build_latent_cache(
            adapter, data_dir, cache_dir, adapter.native_video_size[0], stride=settings.cache_stride
        )
        lap("latent_cache")
    cache = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    trainer = Trainer(load_config(None, [f"model.path={model_dir}", *overrides, *cache]))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    trained = trainer.adapter
    # Training from the cache frees the trainer's text encoder; the demo still prompts the model, so hand it
    # back the (frozen, identical) one of the pipeline the trainer was loaded from.
    if getattr(trained.pipe, "text_encoder", None) is None:
        trained.pipe.text_encoder = pipe.text_encoder
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)  # rebuilt in seconds; not worth keeping in the output
    lap("transformer")
    vae_report["stage_seconds"] = stage_seconds
    return trained, result, data_dir, vae_report


REFERENCES = ("gt", "gt_vae")
"""Labels of the reference clips evaluated next to the samplers: the prompted world's ground truth, and the
same clip passed through the VAE (encode, decode), the best any sampler of this model can score."""


@torch.no_grad()
def write_reference_clips(adapter, world, num_frames: int, out_dir: str) -> dict[str, str]:
    """Render ``num_frames`` frames of ``world``'s ground truth at the model's native size and reconstruct them
    with the model's VAE (``adapter.encode_video``, posterior mode, then ``adapter.decode``, as a generated
    clip is decoded). Writes ``gt_<N>f.mp4`` and ``gt_vae_<N>f.mp4``; returns ``{label: path}``."""
    from .data.synthetic import render_clip
    from .io import write_video

    _, height, width = adapter.native_video_size
    # The Wan encoder reads a first frame and then chunks of 4, dropping a remainder, so encode 4k+1 frames
    # (the clip and the next few of the same world) and keep the first num_frames (causal: exact).
    padded = num_frames + (-(num_frames - 1)) % 4
    truth, _ = render_clip(world, padded, height, width)  # (N', H, W, 3) uint8
    latents = adapter.encode_video(torch.from_numpy(truth).float()[None] / 255.0)  # (1, C, f, h, w)
    recon = adapter.decode(latents)[0][:num_frames]  # (N, H, W, 3) in [0, 1]
    recon = (recon * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    truth = truth[:num_frames]
    if recon.shape != truth.shape:
        raise RuntimeError(
            f"the VAE returned {recon.shape} for ground truth {truth.shape}: it changed the clip"
        )
    paths = {}
    for label, frames in zip(REFERENCES, (truth, recon)):
        paths[label] = os.path.join(out_dir, f"{label}_{num_frames}f.mp4")
        write_video(paths[label], iter([frames]), fps=16.0)
    return paths


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
    references: bool = True,
) -> dict[str, Any]:
    """Generate one long clip per sampler from the first synthetic world's caption and evaluate them all.

    With ``references``, the world's ground truth and its VAE reconstruction (:func:`write_reference_clips`,
    labels :data:`REFERENCES`) are evaluated with them: the reconstruction is the ceiling of every sampler.
    Returns ``{"caption", "num_frames", "length_factor", "runs", "references": {label: path}, "report",
    "seconds": {"generate", "evaluate"}}``.
    """
    from .data.synthetic import WorldSpec, load_manifest
    from .eval.report import evaluate_videos
    from .pipeline import LongVideoPipeline

    record = load_manifest(os.path.join(data_dir, "manifest.jsonl"))[0]
    world = (
        record["world"] if isinstance(record["world"], WorldSpec) else WorldSpec.from_dict(record["world"])
    )
    caption = record["caption"]
    pipe = LongVideoPipeline(adapter)
    native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
    num_frames = adapter.num_pixel_frames(native_latent * length_factor)
    os.makedirs(out_dir, exist_ok=True)
    videos, runs = [], {}
    gen_start = time.perf_counter()
    for sampler in samplers:
        handle = None
        if extension is not None:
            handle = pipe.apply_extension(extension, num_frames)
        path = os.path.join(out_dir, f"{sampler}{'_' + extension if extension else ''}_{num_frames}f.mp4")
        # the same step budget for every sampler (fifo's step count follows from its knobs)
        ctx = pipe.sampler_context(native_latent * length_factor)
        options, steps = options_for_steps(sampler, num_inference_steps, ctx)
        start = time.perf_counter()
        result = pipe.generate(
            caption,
            negative_prompt=None,
            num_frames=num_frames,
            guidance_scale=1.0,
            sampler=sampler,
            num_inference_steps=steps,
            sampler_options=options,
            seed=seed,
            output_path=path,
            show_progress=False,
        )
        if handle is not None:
            pipe.remove_extensions()
        runs[sampler] = {
            "path": path,
            "seconds": round(time.perf_counter() - start, 2),
            "model_calls": result.stats["model_calls"],
            "num_frames": result.num_frames,
        }
        videos.append(path)
        logger.info(
            "%s: %d frames in %.1f s -> %s", sampler, result.num_frames, runs[sampler]["seconds"], path
        )
    reference_paths = write_reference_clips(adapter, world, num_frames, out_dir) if references else {}
    labels = [*samplers, *reference_paths]
    videos += list(reference_paths.values())
    eval_start = time.perf_counter()
    report = evaluate_videos(
        videos, os.path.join(out_dir, "eval"), window=eval_window, labels=labels, worlds=[world] * len(videos)
    )
    return {
        "caption": caption,
        "num_frames": num_frames,
        "length_factor": length_factor,
        "runs": runs,
        "references": reference_paths,
        "report": report,
        "seconds": {
            "generate": round(eval_start - gen_start, 1),
            "evaluate": round(time.perf_counter() - eval_start, 1),
        },
    }


def synthetic_means(video_report: dict[str, Any]) -> dict[str, float | None]:
    """``{"overall", "count", "color", "size", "motion", "speed_stability"}``: the mean over windows of each
    synthetic score of one evaluated video (its ``"synthetic"`` block)."""
    scores = video_report.get("synthetic", {}).get("scores", {})
    names = ("overall", "count", "color", "size", "motion", "speed_stability")
    return {n: (scores.get(n, {}).get("summary") or {}).get("mean") for n in names}


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
    """The whole loop; writes ``demo.json`` and ``summary.md`` into ``settings.out_dir``.

    ``demo.json`` holds the VAE report, the training losses, the runs, ``reconstructed_gt`` /
    ``ground_truth`` (the synthetic scores of the prompted world's ground truth through the VAE, and of the
    ground truth itself: the ceiling of every sampler and of the scorer), ``synthetic`` (per sampler) and
    ``stage_seconds`` (wall time of data, VAE, latent cache, transformer, generation and evaluation).
    """
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    print(
        f"[1/3] training a tiny model on synthetic long videos (VAE {settings.vae_steps} steps, transformer "
        f"{settings.train_steps} steps) ...",
        flush=True,
    )
    adapter, train_result, data_dir, vae_report = train_tiny_model(settings)
    losses = list(train_result.losses.values())
    print(
        f"      VAE reconstruction PSNR {vae_report['psnr_before']:.1f} -> {vae_report['psnr']:.1f} dB "
        f"({vae_report['seconds']} s)",
        flush=True,
    )
    print(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f}; weights in {train_result.final_dir}", flush=True)
    print(
        f"[2/3] generating {settings.length_factor}x-long clips with: {', '.join(settings.samplers)} ...",
        flush=True,
    )
    result = generate_and_evaluate(
        adapter,
        data_dir,
        os.path.join(settings.out_dir, "videos"),
        settings.length_factor,
        settings.samplers,
        settings.num_inference_steps,
        settings.seed,
        settings.eval_window,
    )
    print("[3/3] evaluated (synthetic scorer against the prompted world + metrics over time)", flush=True)
    table = summary_table(result)
    videos = result["report"]["videos"]
    stage_seconds = {**vae_report.pop("stage_seconds", {}), **result["seconds"]}
    summary = {
        "vae": vae_report,
        "train": {
            "steps": train_result.step,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "final_dir": train_result.final_dir,
        },
        "caption": result["caption"],
        "num_frames": result["num_frames"],
        "runs": result["runs"],
        "reconstructed_gt": synthetic_means(videos["gt_vae"]),
        "ground_truth": synthetic_means(videos["gt"]),
        "synthetic": {label: synthetic_means(videos[label]) for label in result["runs"]},
        "references": result["references"],
        "metrics_json": os.path.join(settings.out_dir, "videos", "eval", "metrics.json"),
        "plots": os.path.join(settings.out_dir, "videos", "eval", "plots"),
        "stage_seconds": stage_seconds,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(settings.out_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(settings.out_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print()
    ceiling, truth = summary["reconstructed_gt"]["overall"], summary["ground_truth"]["overall"]
    print(
        f"  reconstructed ground truth (the VAE's ceiling for every sampler): overall {ceiling:.3f}; "
        f"ground truth itself {truth:.3f}"
    )
    for sampler, run in result["runs"].items():
        print(f"  {sampler:8s} {run['path']}  ({run['num_frames']} frames, {run['seconds']} s)")
    for label, path in result["references"].items():
        print(f"  {label:8s} {path}")
    print(
        f"  metrics: {summary['metrics_json']}\n  plots:   {summary['plots']}/\n  summary: "
        f"{os.path.join(settings.out_dir, 'summary.md')}"
    )
    print(
        "  seconds: "
        + ", ".join(f"{k} {v}" for k, v in stage_seconds.items())
        + f"; total {summary['seconds']}"
    )
    return summary
