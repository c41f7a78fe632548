"""LongVideoPipeline: a diffusers pipeline + backbone adapter + long sampler, streaming frames to mp4."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from .backbones import BackboneAdapter, CausalBlockMask, Cond, cat_conds, load_adapter
from .backbones.base import StreamingDecoder
from .io import VideoWriter
from .noise import freenoise_noise
from .prompts import cond_for_window, validate_ranges
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
        self.window_latent_frames: int | None = None
        """Window of windowed samplers; None = the native length. An extension sets its target here."""
        self.extensions: list[Any] = []

    def apply_extension(self, method: str, target_num_frames: int | None = None, **options) -> Any:
        """Apply a registered extension by name (:func:`longgen.extend.extension_names`); returns its
        :class:`~longgen.extend.ExtensionHandle`, whose ``.remove()`` restores the stock model.

        ``target_num_frames`` (pixel frames) is the length RoPE extensions (``pi``, ``ntk``, ``yarn``,
        ``riflex``) and ``exvideo`` extend the model to; windowed samplers then default to windows of that
        length. ``fusion`` (FreeNoise) and ``spectral`` (FreeLong) window temporal attention at the native
        length and ignore it. ``options`` are the extension's config fields (e.g. ``k=`` for RIFLEx,
        ``window=`` for fusion); see each ``ExtensionSpec.config_cls``.
        """
        from .extend.registry import apply_extension, get_extension

        spec = get_extension(method)
        adapter = self.adapter
        target_latent = None
        if spec.needs_target_frames:
            if not target_num_frames:
                raise ValueError(f"extension {method!r} needs target_num_frames (--target-frames)")
            target_latent = adapter.num_latent_frames(target_num_frames)
            options = {"target_latent_frames": target_latent, **options}
        handle = apply_extension(adapter, method, options)
        if spec.sets_window:
            self.window_latent_frames = target_latent
        self.extensions.append(handle)
        return handle

    def remove_extensions(self) -> None:
        """Remove every extension applied through :meth:`apply_extension`, restoring the stock model."""
        for handle in reversed(self.extensions):
            handle.remove()
        self.extensions.clear()
        self.window_latent_frames = None

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
        """The window of windowed samplers in latent frames: the native length, or an extension's target."""
        if self.window_latent_frames is not None:
            return self.window_latent_frames
        return self.adapter.num_latent_frames(self.adapter.native_video_size[0])

    def sampler_kwargs(self, sampler: str, num_latent_frames: int, knobs: dict[str, Any]) -> dict[str, Any]:
        """Check a sampler's knobs by name and fill defaults derived from the model.

        Windows default to the native length (``window``, ``base_num_latent_frames``), the sliding stride
        to half a window; FIFO's lookahead needs an even window, so its default window is rounded down.
        """
        fn = sampler_registry()[sampler]
        params = inspect.signature(fn).parameters
        knobs = {k: v for k, v in knobs.items() if v is not None}
        internal = {"denoise", "noise", "sigmas", "callback", "disable", "on_frames", "return_latents",
                    "generator", "num_latent_frames", "init_clip", "solver"}
        unknown = sorted(set(knobs) - (set(params) - internal))
        if unknown:
            accepted = sorted(set(params) - internal)
            raise ValueError(f"sampler {sampler!r} takes no option(s) {unknown}; it takes {accepted}")
        window = min(self.default_window(), num_latent_frames)
        if sampler == "fifo" and knobs.get("lookahead", True) and "window" not in knobs:
            window = max(2, window - window % 2)
        defaults = {"window": window, "stride": max(1, window // 2), "base_num_latent_frames": window}
        for key, value in defaults.items():
            if key in params and key not in knobs:
                knobs[key] = value
        if (
            sampler == "df"
            and num_latent_frames > knobs["base_num_latent_frames"]
            and "overlap_history" not in knobs
            and "ar_step" not in knobs  # an explicit ar_step without history asks for one rolling pyramid
        ):
            # Longer than one chunk: chunked generation with ~1/5 of a chunk as history (SkyReels-V2 uses
            # 17 of 97 pixel frames), a multiple of the causal block; constant memory in clip length.
            block = knobs.get("causal_block_size", 1)
            base = knobs["base_num_latent_frames"]
            knobs["overlap_history"] = min(max(block, base // 5 // block * block), base - block)
        return knobs

    def _num_steps(self, sampler: str, knobs: dict[str, Any], requested: int | None) -> int:
        if sampler == "fifo":
            # FIFO-Diffusion has one denoising step per queue slot: S = num_partitions * window.
            needed = knobs.get("num_partitions", 4) * knobs["window"]
            if requested is not None and requested != needed:
                raise ValueError(
                    f"the fifo sampler takes num_partitions * window = {needed} steps (one per queue slot); got "
                    f"--steps {requested}. Omit --steps, or change --num-partitions / --window."
                )
            return needed
        return requested or self.adapter.default_num_steps

    def make_noise(
        self, shape: tuple[int, ...], seed: int, noise: str = "gaussian", window: int | None = None,
        stride: int | None = None,
    ) -> torch.Tensor:
        """Initial noise: ``gaussian`` or FreeNoise's ``freenoise`` rescheduling (window/stride in latent frames)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        if noise == "gaussian":
            return torch.randn(shape, generator=generator).to(self.device)
        if noise == "freenoise":
            window = window or min(self.default_window(), shape[2])
            stride = stride or max(1, window // 4)
            return freenoise_noise(shape, window, stride, generator=generator).to(self.device)
        raise ValueError(f"noise must be 'gaussian' or 'freenoise', got {noise!r}")

    def _conditioning(self, prompts, negatives, prompt_frames, num_latent_frames, transition, **encode_kwargs):
        """(cond or per-window cond function, uncond). ``prompt_frames`` makes ``prompts`` one
        multi-prompt video: prompt i starts at pixel frame ``prompt_frames[i]``."""
        adapter = self.adapter
        if prompt_frames is None:
            return adapter.encode_prompt(prompts, negatives, **encode_kwargs)
        if len(prompt_frames) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_frames)} prompt start frames: give one each")
        if sorted(prompt_frames) != list(prompt_frames) or prompt_frames[0] != 0:
            raise ValueError(f"prompt start frames must increase from 0, got {list(prompt_frames)}")
        tc = adapter.temporal_compression
        starts = [-(-f // tc) if (adapter.causal_vae and tc > 1) else f // tc for f in prompt_frames]
        if starts[-1] >= num_latent_frames:
            raise ValueError(f"prompt start frame {prompt_frames[-1]} is past the clip's end")
        ranges = list(zip(starts, starts[1:] + [num_latent_frames]))
        conds, uncond = [], None
        for text in prompts:
            c, u = adapter.encode_prompt([text], negatives[:1] if negatives else None, **encode_kwargs)
            conds.append(c)
            uncond = uncond or u
        validate_ranges(ranges)
        return partial(cond_for_window, conds, ranges, transition=transition), uncond

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
        noise: str = "gaussian",
        noise_window: int | None = None,
        noise_stride: int | None = None,
        prompt_frames: list[int] | None = None,
        prompt_transition: float = 0.0,
        output_path: str | os.PathLike | None = None,
        fps: float = 16.0,
        decode_chunk_latent_frames: int = 4,
        show_progress: bool = True,
    ) -> GenerationResult:
        """Generate one clip; with ``output_path`` frames are decoded in chunks and streamed to an mp4.

        Samplers that finish frames while they run (``fifo``, ``df``) stream them to the mp4 during
        sampling and keep only their working set, so memory stays flat in the clip length. With
        ``prompt_frames`` the prompts are one multi-prompt video: prompt i starts at pixel frame
        ``prompt_frames[i]``, blended over ``prompt_transition`` latent frames.
        """
        adapter = self.adapter
        registry = sampler_registry()
        if sampler not in registry:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(registry)}")
        native_frames, native_h, native_w = adapter.native_video_size
        num_frames = num_frames or native_frames
        height, width = height or native_h, width or native_w
        guidance = adapter.default_guidance_scale if guidance_scale is None else guidance_scale
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None
        if negative_prompt is not None:
            n = 1 if prompt_frames is not None else len(prompts)
            negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)

        batch = 1 if prompt_frames is not None else len(prompts)
        shape = adapter.latent_shape(num_frames, height, width, batch_size=batch)
        knobs = self.sampler_kwargs(sampler, shape[2], dict(sampler_options or {}))
        steps = self._num_steps(sampler, knobs, num_inference_steps)
        if "causal_block_size" in knobs and isinstance(adapter, CausalBlockMask):
            adapter.set_causal_block_size(knobs["causal_block_size"])
        cond, uncond = self._conditioning(
            prompts, negatives, prompt_frames, shape[2], prompt_transition, image=image,
            do_classifier_free_guidance=guidance != 1.0, num_frames=num_frames, height=height, width=width,
        )
        x_noise = self.make_noise(shape, seed, noise, noise_window, noise_stride)
        sigmas = adapter.sigmas(steps, shift=shift)
        denoiser = GuidedDenoiser(adapter, cond, uncond, guidance)
        logger.info(
            "sampling %d frames (%d latent) at %dx%d: %s sampler, %d steps, %s noise, options %s",
            num_frames, shape[2], height, width, sampler, steps, noise, knobs,
        )
        streams = "on_frames" in inspect.signature(registry[sampler]).parameters
        total = adapter.num_pixel_frames(shape[2])
        writer = VideoWriter(output_path, fps=fps) if output_path is not None else None
        decoder = StreamingDecoder(adapter, decode_chunk_latent_frames)
        bar = tqdm(total=total, desc=f"{sampler}: frames", unit="frame", disable=not show_progress or writer is None)
        kept: list[torch.Tensor] = []

        def consume(start: int, latents: torch.Tensor) -> None:
            kept.append(latents.cpu())
            if writer is not None:
                for block in decoder.push(latents[:1]):
                    writer.write(block[0])
                    bar.update(block.shape[1])

        try:
            if streams:
                knobs.setdefault("generator", torch.Generator("cpu").manual_seed(seed + 1))
                registry[sampler](denoiser, x_noise, sigmas, on_frames=consume, return_latents=False,
                                  disable=True if writer is not None else not show_progress, **knobs)
            else:
                consume(0, registry[sampler](denoiser, x_noise, sigmas, disable=not show_progress, **knobs))
            if writer is not None:
                for block in decoder.flush():
                    writer.write(block[0])
                    bar.update(block.shape[1])
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        latents = torch.cat(kept, dim=2)
        result = GenerationResult(latents=latents, num_frames=adapter.num_pixel_frames(latents.shape[2]))
        result.stats["model_calls"] = denoiser.num_calls
        if writer is not None:
            if writer.num_frames != total:
                raise RuntimeError(f"wrote {writer.num_frames} frames, expected {total}")
            result.path = os.fspath(output_path)
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
