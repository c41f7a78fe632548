"""LongVideoPipeline: a diffusers pipeline + backbone adapter + long sampler, streaming frames to mp4."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .backbones import BackboneAdapter, Cond, cat_conds, load_adapter
from .io import VideoWriter
from .samplers import sample_full, sample_sliding

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sampler_registry() -> dict[str, Callable[..., torch.Tensor]]:
    """Name -> sampler function. Every sampler has the signature ``f(denoise, noise, sigmas, **knobs)``."""
    registry: dict[str, Callable[..., torch.Tensor]] = {"full": sample_full, "sliding": sample_sliding}
    from . import samplers

    for name, attr in (("fifo", "sample_fifo"), ("df", "sample_diffusion_forcing")):
        if hasattr(samplers, attr):
            registry[name] = getattr(samplers, attr)
    return registry


class GuidedDenoiser:
    """Binds conditioning and classifier-free guidance to an adapter: ``denoise(x, sigma, frame_offset)``.

    Guidance is applied to the x0 prediction, x0 = x0_u + g (x0_c - x0_u), which for a fixed x and
    noise level equals guidance on eps, v or velocity (all are affine in x0). The conditional and
    unconditional passes run as one batch.
    """

    def __init__(
        self,
        adapter: BackboneAdapter,
        cond: Cond | Callable[[int, int], Cond],
        uncond: Cond | None = None,
        guidance_scale: float = 1.0,
    ):
        self.adapter = adapter
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.num_calls = 0

    def cond_for(self, frame_offset: int, num_latent_frames: int) -> Cond:
        """The cond of a window (a callable cond gives multi-prompt conditioning per frame range)."""
        return self.cond(frame_offset, num_latent_frames) if callable(self.cond) else self.cond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, frame_offset: int = 0) -> torch.Tensor:
        self.num_calls += 1
        cond = self.cond_for(frame_offset, x.shape[2])
        if self.uncond is None or self.guidance_scale == 1.0:
            return self.adapter.denoise(x, sigma, cond)
        x0_uncond, x0_cond = self.adapter.denoise(
            torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds([self.uncond, cond])
        ).chunk(2)
        return x0_uncond + self.guidance_scale * (x0_cond - x0_uncond)


@dataclass
class GenerationResult:
    latents: torch.Tensor
    num_frames: int
    path: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class LongVideoPipeline:
    """Generate clips longer than a model's native length from a stock diffusers video pipeline.

    >>> pipe = LongVideoPipeline.from_pretrained("path/to/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    >>> pipe.generate("a red ball bouncing", num_frames=321, sampler="sliding", output_path="ball.mp4")
    """

    def __init__(self, adapter: BackboneAdapter, device: str | torch.device | None = None):
        self.adapter = adapter
        self.device = torch.device(device) if device is not None else adapter.device

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        offload: str = "none",
        attention_backend: str | None = None,
    ) -> LongVideoPipeline:
        """Load a local diffusers pipeline folder; ``offload`` is ``none``, ``model`` or ``group``."""
        adapter = load_adapter(path, torch_dtype=torch_dtype)
        device = torch.device(device)
        if offload == "model":
            adapter.pipe.enable_model_cpu_offload(device=device)
        elif offload == "group":
            adapter.pipe.enable_group_offload(
                onload_device=device, offload_type="leaf_level", use_stream=device.type == "cuda"
            )
        elif offload == "none":
            adapter.pipe.to(device)
        else:
            raise ValueError(f"offload must be 'none', 'model' or 'group', got {offload!r}")
        if attention_backend and attention_backend != "native":
            adapter.model.set_attention_backend(attention_backend)
        return cls(adapter, device=device)

    # -----------------------------------------------------------------------------------------
    def default_window(self) -> int:
        """The model's native clip length in latent frames: the window of windowed samplers."""
        return self.adapter.num_latent_frames(self.adapter.native_video_size[0])

    def sampler_kwargs(self, sampler: str, num_latent_frames: int, knobs: dict[str, Any]) -> dict[str, Any]:
        """Fill a sampler's knobs with defaults derived from the model (window = native length)."""
        fn = sampler_registry()[sampler]
        params = inspect.signature(fn).parameters
        knobs = {k: v for k, v in knobs.items() if v is not None}
        unknown = sorted(set(knobs) - set(params))
        if unknown:
            raise ValueError(f"sampler {sampler!r} takes no option(s) {unknown}; it takes {sorted(params)[3:]}")
        window = min(self.default_window(), num_latent_frames)
        defaults = {"window": window, "stride": max(1, window // 2)}
        for key, value in defaults.items():
            if key in params and key not in knobs:
                knobs[key] = value
        return knobs

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = "",
        image=None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int = 0,
        sampler: str = "full",
        sampler_options: dict[str, Any] | None = None,
        output_path: str | os.PathLike | None = None,
        fps: float = 16.0,
        decode_chunk_latent_frames: int = 4,
        show_progress: bool = True,
    ) -> GenerationResult:
        """Generate one clip; with ``output_path`` frames are decoded in chunks and streamed to mp4."""
        adapter = self.adapter
        registry = sampler_registry()
        if sampler not in registry:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(registry)}")
        native_frames, native_h, native_w = adapter.native_video_size
        num_frames = num_frames or native_frames
        height, width = height or native_h, width or native_w
        steps = num_inference_steps or adapter.default_num_steps
        guidance = adapter.default_guidance_scale if guidance_scale is None else guidance_scale
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)

        shape = adapter.latent_shape(num_frames, height, width, batch_size=len(prompts))
        knobs = self.sampler_kwargs(sampler, shape[2], dict(sampler_options or {}))
        cond, uncond = adapter.encode_prompt(
            prompts,
            negatives,
            image=image,
            do_classifier_free_guidance=guidance != 1.0,
            num_frames=num_frames,
            height=height,
            width=width,
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator).to(self.device)
        sigmas = adapter.sigmas(steps, shift=shift)
        denoiser = GuidedDenoiser(adapter, cond, uncond, guidance)
        logger.info(
            "sampling %d frames (%d latent) at %dx%d with %s sampler, %d steps, options %s",
            num_frames, shape[2], height, width, sampler, steps, knobs,
        )
        latents = registry[sampler](denoiser, noise, sigmas, disable=not show_progress, **knobs)
        result = GenerationResult(latents=latents, num_frames=adapter.num_pixel_frames(latents.shape[2]))
        result.stats["model_calls"] = denoiser.num_calls
        if output_path is not None:
            result.path = self.write_video(latents, output_path, fps, decode_chunk_latent_frames, show_progress)
        return result

    def write_video(
        self,
        latents: torch.Tensor,
        output_path: str | os.PathLike,
        fps: float = 16.0,
        chunk_latent_frames: int = 4,
        show_progress: bool = True,
    ) -> str:
        """Decode latents in temporal chunks and append each chunk's frames to an mp4 (first sample)."""
        total = self.adapter.num_pixel_frames(latents.shape[2])
        with VideoWriter(output_path, fps=fps) as writer, tqdm(
            total=total, desc="decoding", unit="frame", disable=not show_progress, leave=False
        ) as bar:
            for block in self.adapter.iter_decode(latents[:1], chunk_latent_frames=chunk_latent_frames):
                writer.write(block[0])
                bar.update(block.shape[1])
        if writer.num_frames != total:
            raise RuntimeError(f"decoded {writer.num_frames} frames, expected {total}")
        return os.fspath(output_path)
