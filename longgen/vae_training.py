"""Train a video VAE as a beta-VAE (Kingma & Welling 2014) on a synthetic data set, on the training stack.

The demo's first stage: the tiny Wan VAE learns to code frames of the moving-shapes world before a transformer
is trained on its latents. The loop runs on ``accelerate.Accelerator`` (device placement, ``backward``,
gradient clipping) and checkpoints with :mod:`longgen.training.checkpoint` (atomic ``step_<N>`` folders,
``resume="latest"``), the same as :class:`longgen.training.loop.Trainer`.

Loss: error of the reconstruction from a posterior sample (``recon_loss``: absolute or squared), plus
``chroma_weight`` times the same error of the chroma (per-channel error minus its channel mean, so a saturated
shape that comes back greyish costs more), with pixels away from the background weighted ``1 + object_weight``
(the shapes cover a few percent of a frame and would otherwise be learnt last), plus ``kl_weight`` times the
KL to N(0, 1) per input value. Adam with linear warm-up and cosine decay.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["VAEStageConfig", "clip_batch", "reconstruction_psnr", "set_latent_statistics", "train_vae"]


@dataclass
class VAEStageConfig:
    """Settings of :func:`train_vae` (saved as ``config.yaml`` in every checkpoint)."""

    steps: int = 600
    batch_size: int = 8
    lr: float = 2e-3
    num_frames: int = 9
    """Clip length, ``4k + 1``: the Wan encoder reads a first frame, then chunks of 4, and drops a remainder."""
    kl_weight: float = 1e-3
    object_weight: float = 4.0
    seed: int = 0
    recon_loss: str = "mse"
    chroma_weight: float = 0.0
    per_frame: bool = False
    """Apply :func:`longgen.backbones.wan.make_vae_per_frame` first and keep it through training."""
    output_dir: str | None = None
    """Checkpoints go to ``<output_dir>/checkpoints/step_<N>`` (None: no checkpoints)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end, when ``output_dir`` is set)."""
    resume: str | None = None
    """``"latest"`` or a checkpoint folder (:func:`longgen.training.checkpoint.resolve_resume`)."""

    def validate(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            n = self.num_frames
            raise ValueError(
                f"the VAE stage needs clips of 4k+1 frames (the Wan encoder drops the rest), got {n}: "
                f"use {max(1, (n - 1) // 4 * 4 + 1)} or {(max(n, 1) - 1) // 4 * 4 + 5}"
            )
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"need steps >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")

    def save(self, path: str) -> None:
        """Write the settings (JSON, a YAML subset) where :func:`save_checkpoint` puts a run's config."""
        from .files import write_json_atomic

        write_json_atomic(path, asdict(self), indent=2)


class _GeneratorState:
    """The batch sampler's RNG as a checkpointed object, so a resumed run draws the same clips."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def clip_batch(
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


@torch.no_grad()
def reconstruction_psnr(vae, clips: torch.Tensor) -> float:
    """PSNR (:func:`longgen.eval.metrics.psnr`, peak-to-peak 2) of the posterior mode's reconstruction of
    clips in [-1, 1]."""
    from .eval.metrics import psnr

    vae.eval()
    recon = vae.decode(vae.encode(clips).latent_dist.mode()).sample.clamp(-1, 1)
    return psnr(recon.float().cpu().numpy(), clips.float().cpu().numpy(), data_range=2.0)


@torch.no_grad()
def set_latent_statistics(vae, clips: torch.Tensor) -> None:
    """Set the VAE config's ``latents_mean`` / ``latents_std`` (what the Wan adapter normalises latents with)
    to the per-channel statistics of the posterior modes of ``clips``, so the transformer sees unit-scale
    latents."""
    z = vae.encode(clips).latent_dist.mode()  # (B, C, f, h, w)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])


def _warmup_cosine(steps: int):
    warmup = max(1, steps // 10)
    return lambda i: (
        (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / (steps - warmup)))
    )


def _loss(vae, x: torch.Tensor, background: torch.Tensor, generator, cfg: VAEStageConfig) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    weight = 1.0 + cfg.object_weight * ((x - background).abs().amax(dim=1, keepdim=True) > 0.2).float()
    kl = posterior.kl().sum() / x.numel()
    err = recon - x  # (B, 3, F, H, W)
    # Chroma error: the per-channel error minus its channel mean (a hue/saturation shift, which a grey-ish blur
    # of a small saturated shape costs little in plain RGB error).
    chroma = err - err.mean(dim=1, keepdim=True)
    if cfg.recon_loss == "l1":
        per_pixel = err.abs() + cfg.chroma_weight * chroma.abs()
    else:
        per_pixel = err**2 + cfg.chroma_weight * chroma**2
    return (weight * per_pixel).mean() + cfg.kl_weight * kl


def _load_videos(data_dir: str) -> list[torch.Tensor]:
    from .data.synthetic import load_manifest
    from .io import read_video

    return [
        torch.from_numpy(read_video(r["video"]))
        for r in load_manifest(os.path.join(data_dir, "manifest.jsonl"))
    ]


def _accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate's process-wide state refuses new settings; start clean as the Trainer does (same reason).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator()


def _optimize(vae, videos, background, cfg: VAEStageConfig) -> tuple[list[float], int, str | None]:
    """The training loop proper; returns (losses of the steps run here, first step, last checkpoint)."""
    from tqdm.auto import tqdm

    from .backbones.wan import current_frame_convolutions
    from .training.checkpoint import (
        TrainingState,
        load_checkpoint,
        register_trainable_state_hooks,
        resolve_resume,
        save_checkpoint,
    )

    accelerator = _accelerator()
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.steps))
    model, optimizer, schedule = accelerator.prepare(vae, optimizer, schedule)
    state, generator = TrainingState(), torch.Generator().manual_seed(cfg.seed)
    register_trainable_state_hooks(accelerator)
    accelerator.register_for_checkpointing(state, _GeneratorState(generator))
    resume = resolve_resume(cfg.resume, cfg.output_dir) if cfg.output_dir else None
    if resume:
        load_checkpoint(accelerator, resume)
    first, losses, saved = state.step, [], resume
    every = cfg.checkpoint_every if cfg.checkpoint_every > 0 else cfg.steps
    model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc="vae", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    # a per-frame VAE trains as the 2D network it is: the same steps, about twice as fast
    with bar, current_frame_convolutions(vae) if cfg.per_frame else contextlib.nullcontext():
        while state.step < cfg.steps:
            x = clip_batch(videos, cfg.num_frames, cfg.batch_size, generator).to(accelerator.device)
            loss = _loss(model, x, background.to(x.device), generator, cfg)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if cfg.output_dir and (state.step % every == 0 or state.step == cfg.steps):
                saved = save_checkpoint(accelerator, cfg.output_dir, state.step, cfg, {"stage": "vae"})
    accelerator.unwrap_model(model)
    accelerator.free_memory()
    return losses, first, saved


def train_vae(vae, data_dir: str, steps: int, **settings: Any) -> dict[str, Any]:
    """Train the Wan VAE on clips of the synthetic data set in ``data_dir`` (see the module docstring).

    ``settings``: the fields of :class:`VAEStageConfig` (``batch_size``, ``lr``, ``num_frames``, ``kl_weight``,
    ``object_weight``, ``seed``, ``recon_loss``, ``chroma_weight``, ``per_frame``, ``output_dir``,
    ``checkpoint_every``, ``resume``). Afterwards sets the latent normalisation (:func:`set_latent_statistics`).
    Returns ``{"steps", "psnr_before", "psnr", "loss", "per_frame", "seconds", "checkpoint"}`` with the PSNR of
    the posterior mode's reconstruction on fixed clips; ``loss`` is the first and last loss of this run.
    """
    from .backbones.wan import make_vae_per_frame

    cfg = VAEStageConfig(steps=steps, **settings)
    cfg.validate()
    start = time.perf_counter()
    videos = _load_videos(data_dir)
    probe = clip_batch(videos, cfg.num_frames, 16, torch.Generator().manual_seed(cfg.seed + 1))
    background = (
        probe.flatten(2).mode(dim=2).values.mode(dim=0).values.view(1, 3, 1, 1, 1)
    )  # commonest colour
    device = next(vae.parameters()).device
    handles = make_vae_per_frame(vae) if cfg.per_frame else []
    psnr_before = reconstruction_psnr(vae, probe.to(device))
    losses, checkpoint = [], None
    if steps > 0:
        vae.requires_grad_(True)
        try:
            losses, _, checkpoint = _optimize(vae, videos, background, cfg)
        finally:
            vae.requires_grad_(False)
    for handle in handles:
        handle.remove()
    device = next(vae.parameters()).device
    psnr = reconstruction_psnr(vae, probe.to(device))
    stats = clip_batch(videos, cfg.num_frames, 32, torch.Generator().manual_seed(cfg.seed + 2))
    set_latent_statistics(vae, stats.to(device))
    return {
        "steps": steps,
        "psnr_before": round(psnr_before, 2),
        "psnr": round(psnr, 2),
        "loss": [losses[0], losses[-1]] if losses else None,
        "per_frame": cfg.per_frame,
        "seconds": round(time.perf_counter() - start, 1),
        "checkpoint": checkpoint,
    }
