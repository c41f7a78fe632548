"""The embedded default: train a tiny video model on synthetic long videos, generate long, evaluate.

Runs on a CPU with no downloads. Steps:

1. write the synthetic moving-shapes data set (real mp4 files, captions, the worlds' ground truth);
2. train the tiny Wan VAE (``AutoencoderKLWan``, 4x space, no time compression) on frames of it as a
   beta-VAE (Kingma & Welling 2014: reconstruction + a small KL) with every causal convolution restricted
   to its current-frame tap, so it codes each frame on its own and is exact on clips of any length (time
   is left to the transformer); set the latent normalisation the adapter uses (``latents_mean`` /
   ``latents_std``) from the encoded data, and check its reconstruction PSNR;
3. encode every training video once into a latent cache (all windows of the native length) and train a
   small Wan transformer from scratch on it (its native length: diffusion forcing with half the clips at one
   noise level for every frame, x0 loss, 3000 steps);
4. generate clips ``length_factor`` times longer than the native length with the naive baseline (the
   model run on the whole clip) and with longgen's long samplers, from the same noise and prompt, and the
   same at the native length (1x, each method's reference); then again from more prompts and seeds
   (``eval_worlds`` x ``eval_seeds``) for a table of means, since one clip is one noise draw;
5. evaluate each clip: long-video metrics over time and the synthetic scorer against the world the
   prompt describes (object count, colour, size and motion consistency), so drift shows as a curve; the
   prompted world's ground truth and its VAE reconstruction (the best any sampler can score) are
   evaluated alongside.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbones.wan import is_vae_per_frame
from .samplers import options_for_steps, sampler_names
from .vae_training import train_vae

__all__ = [
    "DEMO_SAMPLERS",
    "DemoSettings",
    "build_latent_cache",
    "generate_and_evaluate",
    "mean_over_clips",
    "ratio_table",
    "run_demo",
    "summary_table",
    "train_tiny_model",
    "train_vae",
]

logger = logging.getLogger(__name__)

DEMO_SAMPLERS = sampler_names()


DEMO_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, False],
    "scale_factor_spatial": 4,
    "scale_factor_temporal": 1,
}
"""The demo's VAE: two levels, 4x space and no time compression (32x32 frames -> 8x8x4 latents, one latent
frame per frame), so a latent cell covers 4x4 pixels and the small shapes (radius 2-4 px) keep their colour.
Trained per frame (:func:`make_vae_per_frame`). A VAE that also compresses time 4x (the Wan default) trained in
the same few minutes returned only about half of the objects' pixels in their colour on 4x-long clips. 4 latent
channels (``z_dim``) instead of 16 reconstruct as well (ceiling 0.909 vs 0.906 over 16 clips), and the same
transformer trained on them scored higher with every sampler at 4x (+0.10 to +0.21; benchmarks/RESULTS.md, "Fourth
ablation")."""
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
    """Every knob of :func:`run_demo`. The transformer's defaults are the measured best of the teacher ablation
    within the 10-minute training budget on 2 CPU cores (benchmarks/RESULTS.md, "The demo's teacher")."""

    out_dir: str = "outputs/demo"
    train_steps: int = 3000
    num_videos: int = 96
    """Synthetic worlds (videos) of the training set, each with its own caption: 96 of 33 frames rather than 24 of 65
    (the same frames, 4x the captions) scored within the noise of 24 on the fourth ablation's 1x and 4x means, and
    are kept for the more distinct captions a binding of the caption's words needs (benchmarks/RESULTS.md)."""
    video_frames: int = 33
    """Frames per synthetic video (``data.synthetic.num_frames``); the training windows are the native 9."""
    length_factor: int = 4
    samplers: tuple[str, ...] = DEMO_SAMPLERS
    num_inference_steps: int = 16
    seed: int = 0
    eval_window: int = 8
    eval_worlds: int = 4
    """Training worlds whose captions prompt the mean-over-clips table (world 0, the demo's prompt, is the one
    in the grid and the metrics table): one clip is one noise draw of one prompt, too few to rank methods."""
    eval_seeds: tuple[int, ...] = (0, 1)
    """Sampling seeds per world of the mean-over-clips table (``eval_worlds`` x ``len(eval_seeds)`` clips per
    sampler and length; a single clip when both give one)."""
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
    lr: float = 2e-3
    """Peak transformer learning rate (warm-up, then cosine decay)."""
    batch_size: int = 8
    caption_dropout: float = 0.1
    """Share of training clips given the empty caption (``data.caption_dropout``): trains the unconditional
    model that classifier-free guidance (``guidance_scale`` > 1) needs. On (0.1) so that guidance can be
    tried on the demo's model; the default samples without it, which scored higher on this teacher
    (benchmarks/RESULTS.md, "Third ablation")."""
    guidance_scale: float = 1.0
    """Classifier-free guidance of every generated clip (1 = none; > 1 needs ``caption_dropout`` > 0)."""
    clip_share: float = 0.5
    """Share of training clips drawn with one noise level for all frames (``objective.clip_share``) beside
    diffusion forcing's per-frame levels: the equally-noisy clip that ``full`` / ``sliding`` / ``fifo`` start
    from. With only per-frame levels (0) the teacher neither read its prompt nor kept one layout over frames
    that are all very noisy (benchmarks/RESULTS.md, "Second ablation")."""
    shift: float = 3.0
    """Flow shift of the training noise levels (``objective.shift``; the tiny Wan samples with shift 3): more
    training at high noise, where only the prompt says what to draw."""
    weighting: str = "none"
    """Loss weighting (``objective.weighting``): ``none`` is the plain x0 squared error, which weighs the high-noise
    levels (where the prompt decides what is drawn) more than the flow model's native velocity loss (``native``:
    x0 error / sigma^2); measured better for both ``full`` and ``causal`` (benchmarks/RESULTS.md, "Third
    ablation")."""
    ema_decay: float = 0.0
    """Sample with an exponential moving average of the transformer's weights (``ema.decay``; 0 = off)."""
    text_length: int = 64
    """Padded prompt tokens (the tiny tokenizer's ``model_max_length``; Wan pads to 512): a caption is about
    25-40 tokens, so with 512 most of what cross-attention reads is padding, and a training step costs about 1.5x (6.2 vs 9.7
    steps/s on 2 idle cores)."""
    caption_style: str = "full"
    """Captions of the synthetic worlds (``data.synthetic.caption_style``): ``full`` sentences, or ``short`` (only
    the words that differ between worlds: ``2 shapes: medium green circle quickly and small blue square slowly``)."""
    vae_dir: str | None = None
    """A trained demo VAE (``<demo out>/train/base_model/vae``) to reuse instead of the VAE stage: the
    transformer ablations (``benchmarks/demo_teacher.py``) train on the same latents without its cost."""
    vae_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEMO_VAE))
    transformer_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEMO_TRANSFORMER))
    extra_overrides: list[str] = field(default_factory=list)
    smoke_test: bool = False
    """Say plainly in the output that the run only smoke-tests (:data:`QUICK_NOTE`); set by :meth:`quick`."""

    def __post_init__(self) -> None:
        flags = {"length_factor": " (--length-factor)", "train_steps": " (--train-steps)"}
        for name in ("length_factor", "train_steps", "num_inference_steps", "num_videos"):
            if getattr(self, name) < 1:  # these used to fail only after the data (or the whole training) stage
                raise ValueError(f"{name}{flags.get(name, '')} must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale != 1.0 and self.caption_dropout <= 0.0:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs a model trained on the empty prompt too: set "
                "caption_dropout > 0 (e.g. 0.1), or guidance_scale=1"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay is a decay in [0, 1) (0 = no EMA), got {self.ema_decay}")
        from .training.objectives import WEIGHTINGS

        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} is not a loss weighting; choose one of {list(WEIGHTINGS)}")
        from .data.synthetic import CAPTION_STYLES

        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style={self.caption_style!r} is not a caption style; choose one of {list(CAPTION_STYLES)}")
        if self.video_frames < 9:
            raise ValueError(f"video_frames={self.video_frames} is shorter than the native 9-frame training window")
        if self.caption_style == "position" and self.video_frames != 9:
            raise ValueError(
                f"caption_style='position' describes where the objects are at a video's first frame, so every "
                f"training window must start there: set video_frames=9 (one window per video; raise num_videos for "
                f"more frames), not {self.video_frames}"
            )
        if self.eval_worlds < 1 or not self.eval_seeds:
            raise ValueError(
                f"the mean-over-clips table needs eval_worlds >= 1 and at least one seed, got eval_worlds="
                f"{self.eval_worlds}, eval_seeds={self.eval_seeds}"
            )
        if self.eval_worlds > self.num_videos:
            raise ValueError(
                f"eval_worlds={self.eval_worlds} prompts more worlds than the data set's num_videos="
                f"{self.num_videos}: lower eval_worlds or raise num_videos"
            )
        if self.vae_dir and not os.path.isfile(os.path.join(self.vae_dir, "config.json")):
            raise FileNotFoundError(
                f"vae_dir={self.vae_dir!r} holds no VAE (config.json): give <demo out>/train/base_model/vae of "
                "a finished demo run, or leave it unset to train one"
            )

    @classmethod
    def quick(cls, out_dir: str) -> DemoSettings:
        """A reduced run (about a minute on 2 CPU cores): the same steps, far less training; it also samples
        with classifier-free guidance 3 so that the guided path runs."""
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
            guidance_scale=3.0,
            eval_worlds=1,
            eval_seeds=(0,),
            smoke_test=True,
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
        f"data.caption_dropout={settings.caption_dropout}",
        f"objective.clip_share={settings.clip_share}",
        f"objective.shift={settings.shift}",
        f"objective.weighting={settings.weighting}",
        *(["ema.enabled=true", f"ema.decay={settings.ema_decay}"] if settings.ema_decay > 0 else []),
        "data.num_frames=9",
        "data.height=32",
        "data.width=32",
        f"data.synthetic.num_videos={settings.num_videos}",
        f"data.synthetic.caption_style={settings.caption_style}",
        f"data.synthetic.num_frames={settings.video_frames}",
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


@torch.no_grad()
def build_latent_cache(
    adapter, data_dir: str, out_dir: str, num_frames: int, stride: int = 1
) -> dict[str, Any]:
    """Write a ``longgen-latent-cache`` (:mod:`longgen.data.cache`, the ``longgen precompute`` format and
    writer) of every ``stride``-th ``num_frames``-frame window of each video of the data set, for the trainer's
    ``data.cache_dir``.

    Needs a per-frame VAE (:func:`is_vae_per_frame`): each video is encoded once and its windows are slices of
    that encoding, which then equal the encodings of the windows themselves (``longgen precompute`` encodes
    one window per video). The caption's text embedding is stored with every window. Returns ``{"dir",
    "num_samples", "seconds"}``.
    """
    from .data.cache import CacheWriter, encode_conds
    from .data.synthetic import load_manifest
    from .io import read_video

    if not is_vae_per_frame(adapter.vae):
        raise ValueError(
            "build_latent_cache slices one encoding per video, which is exact only for a per-frame VAE "
            "(make_vae_per_frame); train without the cache (latent_cache=False) or use longgen precompute"
        )
    start = time.perf_counter()
    num_latent = adapter.num_latent_frames(num_frames)  # one latent frame per frame (checked above)
    writer = CacheWriter(out_dir, family=adapter.family, shard_size=256)
    clip_shape: list[int] = []
    for record in load_manifest(os.path.join(data_dir, "manifest.jsonl")):
        video = torch.from_numpy(read_video(record["video"])).float()[None] / 255.0  # (1, N, H, W, 3)
        latents = adapter.encode_video(video)[0]  # (C, N, h, w)
        conds = encode_conds(adapter, [record["caption"]], video[:, :1])
        cond = {k: v[0] for k, v in conds.items() if isinstance(v, torch.Tensor)}
        for first in range(0, latents.shape[1] - num_latent + 1, stride):
            window = latents[:, first : first + num_latent]
            writer.add(window, cond, record["caption"], f"{record['video']}#{first}")
        clip_shape = [num_frames, *(int(v) for v in video.shape[2:])]
    if not writer.samples:
        raise ValueError(f"the videos in {data_dir} are shorter than {num_frames} frames: no window to cache")
    writer.write_null_cond(adapter, set())
    writer.finish(clip_shape, source=data_dir)
    return {
        "dir": out_dir,
        "num_samples": len(writer.samples),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _vae_stage(settings: DemoSettings, pipe, train_dir: str, data_dir: str) -> dict[str, Any]:
    """Train the pipeline's VAE (:func:`longgen.vae_training.train_vae`, Accelerate + the project's atomic
    checkpoints under ``<train_dir>/vae``)."""
    return train_vae(
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
        output_dir=os.path.join(os.path.abspath(train_dir), "vae"),
    )


def _reused_vae_kwargs(vae_dir: str) -> dict[str, Any]:
    """The demo-VAE settings (:data:`DEMO_VAE` keys) of the VAE saved in ``vae_dir``: the pipeline is built with
    them, so that its transformer reads and writes that VAE's latent channels (``z_dim``), whatever
    ``DemoSettings.vae_kwargs`` says."""
    import json

    with open(os.path.join(vae_dir, "config.json")) as fh:
        config = json.load(fh)
    return {key: config[key] for key in DEMO_VAE if key in config}


def _reuse_vae(pipe, vae_dir: str) -> dict[str, Any]:
    """Put the trained VAE saved in ``vae_dir`` into ``pipe`` (instead of the VAE stage); its report."""
    from diffusers import AutoencoderKLWan

    pipe.vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()
    return {"reused": vae_dir, "steps": 0, "psnr_before": None, "psnr": None, "seconds": 0.0,
            "per_frame": is_vae_per_frame(pipe.vae)}


def _train_transformer(
    settings: DemoSettings, model_dir: str, overrides: list[str], cache_dir: str | None, pipe
):
    """Full fine-tune of the random transformer saved in ``model_dir`` with the project's Trainer."""
    from .training.config import load_config
    from .training.loop import Trainer

    cache = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    trainer = Trainer(load_config(None, [f"model.path={model_dir}", *overrides, *cache]))
    try:
        result = trainer.train()
        if trainer.ema_callback is not None:  # sample with the averaged weights (also in final_ema/)
            trainer.ema_callback.model.copy_to(trainer.ema_callback.params)
    finally:
        trainer.close()
    trained = trainer.adapter
    # Training from the cache frees the trainer's text encoder; the demo still prompts the model, so hand it
    # back the (frozen, identical) one of the pipeline the trainer was loaded from.
    if getattr(trained.pipe, "text_encoder", None) is None:
        trained.pipe.text_encoder = pipe.text_encoder
    return trained, result


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (``resource.getrusage``): the
    demo's training cost on a shared machine, where wall time depends on the other load."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_tiny_model(settings: DemoSettings):
    """Train the tiny model from scratch: the VAE stage, then a full fine-tune of a random tiny Wan transformer
    on its latents (from a latent cache when ``settings.latent_cache``). Returns (adapter, trainer result,
    data dir, VAE report); the report's ``stage_seconds`` times the data, VAE, cache and transformer stages."""
    import shutil

    from .backbones.wan import WanAdapter
    from .training.config import load_config

    stage_seconds: dict[str, float] = {}
    stage_cpu: dict[str, float] = {}
    clock = [time.perf_counter(), process_cpu_seconds()]

    def lap(name: str) -> None:
        now, cpu = time.perf_counter(), process_cpu_seconds()
        stage_seconds[name], stage_cpu[name] = round(now - clock[0], 1), round(cpu - clock[1], 1)
        clock[:] = [now, cpu]

    train_dir = os.path.join(settings.out_dir, "train")
    model_dir = os.path.join(os.path.abspath(train_dir), "base_model")
    overrides = _train_overrides(settings, train_dir)
    data_dir = write_demo_data(load_config(None, ["model.tiny=wan", *overrides]))
    lap("data")
    pipe = WanAdapter.tiny_pipeline(
        seed=settings.seed,
        vae_kwargs=_reused_vae_kwargs(settings.vae_dir) if settings.vae_dir else settings.vae_kwargs,
        transformer_kwargs=settings.transformer_kwargs,
        text_length=settings.text_length,
    )
    # a reused VAE goes in before the adapter reads the VAE's compression from it
    vae_report = _reuse_vae(pipe, settings.vae_dir) if settings.vae_dir else None
    adapter = WanAdapter(pipe, native_video_size=WanAdapter.tiny_video_size)
    if vae_report is None:
        vae_report = _vae_stage(settings, pipe, train_dir, data_dir)
    adapter.save_pretrained(model_dir)  # the trainer loads this folder: trained VAE + random transformer
    lap("vae")
    cache_dir = None
    if settings.latent_cache and settings.vae_per_frame:
        cache_dir = os.path.join(os.path.abspath(train_dir), "latent_cache")
        vae_report["latent_cache"] = build_latent_cache(
            adapter, data_dir, cache_dir, adapter.native_video_size[0], stride=settings.cache_stride
        )
        lap("latent_cache")
    trained, result = _train_transformer(settings, model_dir, overrides, cache_dir, pipe)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)  # rebuilt in seconds; not worth keeping in the output
    lap("transformer")
    vae_report["stage_seconds"] = stage_seconds
    vae_report["stage_cpu_seconds"] = stage_cpu
    return trained, result, data_dir, vae_report


def load_demo_model(demo_dir: str):
    """The tiny model a finished ``longgen demo`` run trained, as it sampled: ``(adapter, data_dir,
    demo.json)``. ``<demo_dir>/train/base_model`` (trained VAE, tokenizer, text encoder) with the transformer
    of ``demo.json``'s ``train.teacher_dir`` (``final_ema`` when the run kept an EMA, else ``final``), and
    the synthetic data set it trained on (``<demo_dir>/train/synthetic_data``, whose first caption is the
    prompt). Distillation and the quality benchmark start from it instead of training again."""
    import json

    from diffusers import WanTransformer3DModel

    from .backbones import load_adapter

    path = os.path.join(demo_dir, "demo.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run `longgen demo --out {demo_dir}` to the end first")
    with open(path) as fh:
        summary = json.load(fh)
    train = summary["train"]
    teacher = train.get("teacher_dir") or train["final_dir"]
    if not os.path.isabs(teacher) and not os.path.isdir(teacher):
        teacher = os.path.join(demo_dir, "train", os.path.basename(teacher))
    adapter = load_adapter(os.path.join(demo_dir, "train", "base_model"))
    adapter.pipe.transformer = WanTransformer3DModel.from_pretrained(os.path.join(teacher, "transformer")).eval()
    return adapter, os.path.join(demo_dir, "train", "synthetic_data"), summary


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


def _prompted_world(data_dir: str, index: int = 0):
    """(caption, :class:`~longgen.data.synthetic.WorldSpec`) of the data set's ``index``-th video (the first
    one is the demo's prompt)."""
    from .data.synthetic import WorldSpec, load_manifest

    records = load_manifest(os.path.join(data_dir, "manifest.jsonl"))
    if not 0 <= index < len(records):
        raise ValueError(f"world index {index} is outside the data set's {len(records)} videos in {data_dir}")
    record = records[index]
    world = record["world"]
    return record["caption"], world if isinstance(world, WorldSpec) else WorldSpec.from_dict(world)


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
    guidance_scale: float = 1.0,
    world_index: int = 0,
) -> dict[str, Any]:
    """Generate one long clip per sampler from the first synthetic world's caption and evaluate them all.

    With ``references``, the world's ground truth and its VAE reconstruction (:func:`write_reference_clips`,
    labels :data:`REFERENCES`) are evaluated with them: the reconstruction is the ceiling of every sampler.
    ``guidance_scale`` > 1 is classifier-free guidance against the empty prompt; ``world_index`` picks the
    data set's video whose caption is the prompt (0, the demo's).
    Returns ``{"caption", "num_frames", "length_factor", "runs", "references": {label: path}, "report",
    "seconds": {"generate", "evaluate"}}``.
    """
    from .pipeline import LongVideoPipeline

    caption, world = _prompted_world(data_dir, world_index)
    pipe = LongVideoPipeline(adapter)
    native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
    num_frames = adapter.num_pixel_frames(native_latent * length_factor)
    from .files import make_output_dir

    make_output_dir(out_dir, "demo clip folder")
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
            negative_prompt=None if guidance_scale == 1.0 else "",
            num_frames=num_frames,
            guidance_scale=guidance_scale,
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
    eval_start = time.perf_counter()
    report = _evaluate_clips(videos, samplers, reference_paths, world, out_dir, eval_window)
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


def _evaluate_clips(videos, samplers, reference_paths: dict, world, out_dir: str, window: int) -> dict:
    """:func:`longgen.eval.report.evaluate_videos` of the samplers' clips and the references into
    ``<out_dir>/eval``, scored against the prompted ``world``."""
    from .eval.report import evaluate_videos

    paths = [*videos, *reference_paths.values()]
    return evaluate_videos(
        paths,
        os.path.join(out_dir, "eval"),
        window=window,
        labels=[*samplers, *reference_paths],
        worlds=[world] * len(paths),
        show_progress=None,
    )


def synthetic_means(video_report: dict[str, Any]) -> dict[str, float | None]:
    """``{"overall", "count", "color", "size", "motion", "speed_stability"}``: the mean over windows of each
    synthetic score of one evaluated video (its ``"synthetic"`` block)."""
    scores = video_report.get("synthetic", {}).get("scores", {})
    names = ("overall", "count", "color", "size", "motion", "speed_stability")
    return {n: (scores.get(n, {}).get("summary") or {}).get("mean") for n in names}


HEADLINE = (
    "synthetic_overall",
    "synthetic_count",
    "synthetic_color",
    "temporal_flicker",
    "ssim_first",
    "color_hist_drift",
)
"""Columns of the demo's table (:func:`longgen.eval.report.headline_table` names)."""


def summary_table(result: dict[str, Any]) -> str:
    """Markdown table: per sampler, each headline metric's mean and its end-minus-start change, with its
    direction (higher / lower is better) in the header and any caveat (a blank clip) below."""
    from .eval.report import headline_table

    return headline_table(result["report"], HEADLINE, label="sampler")


def overall_by_label(result: dict[str, Any], score: str = "overall") -> dict[str, float | None]:
    """``{label: mean synthetic score}`` of every clip of a :func:`generate_and_evaluate` result (samplers,
    then references)."""
    return {label: synthetic_means(video)[score] for label, video in result["report"]["videos"].items()}


def ratio_table(
    native: dict[str, float | None],
    long: dict[int, dict[str, float | None]],
    score: str = "overall",
    native_of: dict[str, str] | None = None,
) -> str:
    """Markdown table of a synthetic ``score`` per clip at the native length (``native``: ``{label: score}``
    at 1x) and at each long factor (``long``: ``{factor: {label: score}}``), with the ratio to 1x: "keeps X
    of its 1x quality at Nx" reads off the ``Nx / 1x`` column. ``native_of`` maps a long-only row (e.g.
    ``full + riflex``) to the 1x clip it is compared with (named in its 1x cell)."""
    native_of = native_of or {}
    factors = sorted(long)
    labels = list(dict.fromkeys(label for f in factors for label in long[f]))
    head = [f"1x {score}"] + [c for f in factors for c in (f"{f}x {score}", f"{f}x / 1x")]
    lines = ["| clip | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for label in labels:
        ref_label = native_of.get(label, label)
        ref = native.get(ref_label)
        cells = [fmt(ref, ".3f") + ("" if ref_label == label or ref is None else f" ({ref_label})")]
        for f in factors:
            value = long[f].get(label)
            ratio = value / ref if value is not None and ref else None  # a 0 at 1x has no ratio
            cells += [fmt(value, ".3f"), fmt(ratio, ".2f")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUICK_NOTE = (
    "NOTE: --quick only smoke-tests the pipeline (every stage runs, on a few seconds of training each): the "
    "model has learnt next to nothing, so near-zero synthetic scores and near-uniform frames are expected. "
    "Run `longgen demo` without --quick for meaningful numbers."
)
"""Printed before and after a quick run's table, and stored in its ``demo.json`` (``"note"``)."""


def _summary(settings: DemoSettings, train_result, vae_report: dict, result: dict, start: float) -> dict:
    """The ``demo.json`` record (see :func:`run_demo`)."""
    losses = list(train_result.losses.values())
    videos = result["report"]["videos"]
    eval_dir = os.path.join(settings.out_dir, "videos", "eval")
    return {
        "note": QUICK_NOTE if settings.smoke_test else None,
        "vae": vae_report,
        "train": {
            "steps": train_result.step,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "final_dir": train_result.final_dir,
            "teacher_dir": train_result.ema_dir or train_result.final_dir,
            "settings": {
                "caption_dropout": settings.caption_dropout,
                "guidance_scale": settings.guidance_scale,
                "ema_decay": settings.ema_decay,
                "text_length": settings.text_length,
                "clip_share": settings.clip_share,
                "shift": settings.shift,
                "weighting": settings.weighting,
                "transformer": settings.transformer_kwargs,
            },
        },
        "caption": result["caption"],
        "num_frames": result["num_frames"],
        "length_factor": result["length_factor"],
        "runs": result["runs"],
        "reconstructed_gt": synthetic_means(videos["gt_vae"]),
        "ground_truth": synthetic_means(videos["gt"]),
        "synthetic": {label: synthetic_means(videos[label]) for label in result["runs"]},
        "references": result["references"],
        "metrics_json": os.path.join(eval_dir, "metrics.json"),
        "plots": os.path.join(eval_dir, "plots"),
        "stage_seconds": {**vae_report.pop("stage_seconds", {}), **result["seconds"]},
        "stage_cpu_seconds": vae_report.pop("stage_cpu_seconds", {}),
        "seconds": round(time.perf_counter() - start, 1),
    }


def mean_over_clips(
    adapter, data_dir: str, settings: DemoSettings, done: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The synthetic overall score of every sampler and reference, averaged over ``settings.eval_worlds``
    prompts x ``settings.eval_seeds`` noise draws, at 1x and at ``settings.length_factor``. ``done`` holds the
    :func:`generate_and_evaluate` results already made for world 0 at ``settings.seed`` (``{factor: result}``),
    reused instead of sampled again. Returns ``{"clips": [[world, seed], ...], "means": {factor: {label:
    mean}}, "per_clip": {factor: [{label: score}, ...]}, "seconds"}``; a clip with no score counts 0."""
    start = time.perf_counter()
    clips = [(w, seed) for w in range(settings.eval_worlds) for seed in settings.eval_seeds]
    factors = (1, settings.length_factor)
    per_clip: dict[int, list[dict[str, float]]] = {f: [] for f in factors}
    for world, seed in clips:
        for factor in factors:
            if (world, seed) == (0, settings.seed) and factor in done:
                result = done[factor]
            else:
                out = os.path.join(settings.out_dir, "videos", "clips", f"w{world}_s{seed}", f"{factor}x")
                result = generate_and_evaluate(
                    adapter, data_dir, out, factor, settings.samplers, settings.num_inference_steps, seed,
                    settings.eval_window, guidance_scale=settings.guidance_scale, world_index=world,
                )
            per_clip[factor].append({k: v or 0.0 for k, v in overall_by_label(result).items()})
    means = {}
    for factor, rows in per_clip.items():
        labels = dict.fromkeys(label for row in rows for label in row)
        means[factor] = {
            label: sum(row[label] for row in rows if label in row) / sum(label in row for row in rows)
            for label in labels
        }
    return {
        "clips": [list(c) for c in clips],
        "means": means,
        "per_clip": per_clip,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _ratios(native: dict, long: dict) -> dict[str, float | None]:
    """``{label: long score / 1x score}`` of the synthetic overall score (None where 1x scored 0)."""
    base, scores = overall_by_label(native), overall_by_label(long)
    return {
        label: (value / base[label] if value is not None and base.get(label) else None)
        for label, value in scores.items()
    }


GRID_NAME = "comparison_grid"
"""Stem of the demo's side-by-side grid (``<out_dir>/comparison_grid.png`` and ``.mp4``)."""


def write_demo_grid(result: dict[str, Any], out_dir: str, num_samples: int = 8) -> dict[str, Any]:
    """:func:`longgen.eval.grid.write_comparison_grid` of one :func:`generate_and_evaluate` result: rows
    ``gt``, ``gt_vae`` (the ceiling), then each sampler's clip; ``num_samples`` frames over time."""
    from .eval.grid import write_comparison_grid

    rows = {**result["references"], **{label: run["path"] for label, run in result["runs"].items()}}
    stem = os.path.join(out_dir, GRID_NAME)
    return write_comparison_grid(rows, stem + ".png", stem + ".mp4", num_samples=num_samples)


def _print_summary(settings: DemoSettings, summary: dict, table: str, ratios: str, mean_table: str = "") -> None:
    print(f"comparison grid: {summary['grid']['png']} ({summary['grid']['mp4']})")
    print()
    print(table)
    print()
    factor = summary["length_factor"]
    print(
        f"synthetic overall of the clips above (the demo's prompt, seed {settings.seed}) at the native length (1x) "
        f"and at {factor}x; {factor}x / 1x = quality kept:\n"
    )
    print(ratios)
    print()
    if mean_table:
        print(mean_table)
        print()
    ceiling, truth = summary["reconstructed_gt"]["overall"], summary["ground_truth"]["overall"]
    print(
        f"  reconstructed ground truth (the VAE's ceiling for every sampler): overall {ceiling:.3f}; "
        f"ground truth itself {truth:.3f}"
    )
    for sampler, run in summary["runs"].items():
        print(f"  {sampler:8s} {run['path']}  ({run['num_frames']} frames, {run['seconds']} s)")
    for label, path in summary["references"].items():
        print(f"  {label:8s} {path}")
    print(
        f"  metrics: {summary['metrics_json']}\n  plots:   {summary['plots']}/\n  summary: "
        f"{os.path.join(settings.out_dir, 'summary.md')}"
    )
    seconds = summary["stage_seconds"]
    print("  seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) + f"; total {summary['seconds']}")
    if settings.smoke_test:
        print("\n" + QUICK_NOTE)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """The whole loop; writes ``demo.json`` and ``summary.md`` into ``settings.out_dir``.

    ``demo.json`` holds the VAE report, the training losses, the runs, ``reconstructed_gt`` /
    ``ground_truth`` (the synthetic scores of the prompted world's ground truth through the VAE, and of the
    ground truth itself: the ceiling of every sampler and of the scorer), ``synthetic`` (per sampler),
    ``stage_seconds`` (wall time of data, VAE, latent cache, transformer, generation and evaluation),
    ``mean_over_clips`` (:func:`mean_over_clips`, when the settings ask for more than one clip) and
    ``note`` (:data:`QUICK_NOTE` for a smoke test, else None).
    """
    from .files import make_output_dir, write_json_atomic, write_text_atomic

    make_output_dir(settings.out_dir, "--out")

    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    if settings.smoke_test:
        print(QUICK_NOTE, flush=True)
    print(
        f"[1/3] training a tiny model on synthetic long videos (VAE {settings.vae_steps} steps, transformer "
        f"{settings.train_steps} steps) ...",
        flush=True,
    )
    adapter, train_result, data_dir, vae_report = train_tiny_model(settings)
    losses = list(train_result.losses.values())
    if vae_report.get("reused"):
        print(f"      VAE reused from {vae_report['reused']}", flush=True)
    else:
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
        guidance_scale=settings.guidance_scale,
    )
    print(
        f"      and {', '.join(settings.samplers)} at the native length (1x: the reference of each method) ...",
        flush=True,
    )
    native = generate_and_evaluate(
        adapter,
        data_dir,
        os.path.join(settings.out_dir, "videos", "1x"),
        1,
        settings.samplers,
        settings.num_inference_steps,
        settings.seed,
        settings.eval_window,
        guidance_scale=settings.guidance_scale,
    )
    means, num_clips = None, settings.eval_worlds * len(settings.eval_seeds)
    if num_clips > 1:
        print(
            f"      and over {num_clips} clips ({settings.eval_worlds} prompts x seeds {list(settings.eval_seeds)}) "
            "for the mean-over-clips table ...",
            flush=True,
        )
        means = mean_over_clips(adapter, data_dir, settings, {1: native, settings.length_factor: result})
    print("[3/3] evaluated (synthetic scorer against the prompted world + metrics over time)", flush=True)
    grid = write_demo_grid(result, settings.out_dir)
    table = summary_table(result)
    ratios = ratio_table(overall_by_label(native), {settings.length_factor: overall_by_label(result)})
    summary = _summary(settings, train_result, vae_report, result, start)
    summary["native"] = {
        "num_frames": native["num_frames"],
        "synthetic": {label: synthetic_means(v) for label, v in native["report"]["videos"].items()},
        "metrics_json": os.path.join(settings.out_dir, "videos", "1x", "eval", "metrics.json"),
    }
    summary["ratio_to_1x"] = _ratios(native, result)
    summary["grid"] = {"png": grid["png"], "mp4": grid["mp4"], "frame_indices": grid["frame_indices"]}
    summary["stage_seconds"]["generate_1x"] = native["seconds"]["generate"]
    summary["stage_seconds"]["evaluate_1x"] = native["seconds"]["evaluate"]
    mean_table = ""
    if means is not None:
        summary["mean_over_clips"] = means
        summary["stage_seconds"]["clips"] = means["seconds"]
        mean_table = (
            f"synthetic overall, mean over {num_clips} clips (prompts of worlds 0-{settings.eval_worlds - 1} x "
            f"seeds {list(settings.eval_seeds)}):\n\n"
            + ratio_table(means["means"][1], {settings.length_factor: means["means"][settings.length_factor]})
        )
    write_json_atomic(os.path.join(settings.out_dir, "demo.json"), summary, indent=2)
    write_text_atomic(
        os.path.join(settings.out_dir, "summary.md"), f"{table}\n\n{ratios}\n" + (f"\n{mean_table}\n" if mean_table else "")
    )
    _print_summary(settings, summary, table, ratios, mean_table)
    return summary
