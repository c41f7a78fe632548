"""LongVideoPipeline: a diffusers pipeline + backbone adapter + long sampler, streaming frames to mp4."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .backbones import BackboneAdapter, CausalBlockMask, Cond, cat_conds, load_adapter
from .backbones.base import StreamingDecoder
from .io import VideoWriter
from .noise import freenoise_noise
from .prompts import PromptSchedule
from .samplers import SamplerContext, SamplerSpec, get_sampler, sampler_names

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Kept for old imports; new code uses :mod:`longgen.dtypes` (``DTYPE_NAMES``, ``torch_dtype``)."""


def sampler_registry() -> dict[str, Callable[..., torch.Tensor]]:
    """Name -> sampler function of every registered sampler (see :mod:`longgen.samplers.registry`)."""
    return {name: get_sampler(name).function() for name in sampler_names()}


def _check_positive(**values: float | None) -> None:
    """Reject zero or negative sizes by name (they used to fall back to defaults silently)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            flag = {"num_inference_steps": "steps", "decode_chunk_latent_frames": "decode-chunk"}.get(name, name)
            raise ValueError(f"{name} (--{flag.replace('_', '-')}) must be > 0, got {value}; omit it for the default")


def output_paths(output_path: str | os.PathLike, batch: int) -> list[str]:
    """One mp4 per sample: ``out.mp4`` for one sample, ``out_0.mp4``, ``out_1.mp4``, ... for a batch."""
    path = os.fspath(output_path)
    if batch == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}_{i}{ext or '.mp4'}" for i in range(batch)]


def _prompt_lists(prompt, negative_prompt, multi_prompt: bool) -> tuple[list[str], list[str] | None]:
    """Prompts as a list (a batch, or one multi-prompt video) and negatives to match (None: no negatives)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if negative_prompt is None:
        return prompts, None
    n = 1 if multi_prompt else len(prompts)
    return prompts, [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)


class _FrameSink:
    """Receives finished latent frames: keeps them, and decodes + streams every sample to its own mp4."""

    def __init__(self, adapter: BackboneAdapter, paths: list[str] | None, fps: float, decode_chunk: int,
                 total: int, show_progress: bool):
        self.kept: list[torch.Tensor] = []
        self.writers = [VideoWriter(p, fps=fps, total_frames=total) for p in paths] if paths else []
        self.decoder = StreamingDecoder(adapter, decode_chunk)
        self.total, self.show_progress = total, show_progress
        self.bar = None

    def open_bar(self, desc: str) -> None:
        if self.bar is None:
            disable = not self.show_progress or not self.writers
            self.bar = tqdm(total=self.total, desc=desc, unit="frame", disable=disable)

    def __call__(self, start: int, latents: torch.Tensor) -> None:
        self.kept.append(latents.cpu())
        if self.writers:
            self._write(self.decoder.push(latents))

    def _write(self, blocks) -> None:
        for block in blocks:
            for writer, frames in zip(self.writers, block):
                writer.write(frames)
            self.bar.update(block.shape[1])

    def finish(self) -> None:
        if self.writers:
            self.open_bar("decoding")
            self._write(self.decoder.flush())

    def close(self) -> None:
        """Publish every clip under its final name (each writer checks FFmpeg and the frame count)."""
        if self.bar is not None:
            self.bar.close()
        for writer in self.writers:
            writer.close()

    def abort(self) -> list[str]:
        """Stop on an interruption: keep what was written only as ``<name>.partial-NofM.mp4`` files."""
        if self.bar is not None:
            self.bar.close()
        kept = [writer.abort(total_frames=self.total) for writer in self.writers]
        return [path for path in kept if path]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`LongVideoPipeline.generate`: how far it got and where the partial clips are.

    A ``KeyboardInterrupt`` (so callers that catch that keep working); no clip is left under its final name.
    """

    def __init__(self, frames_written: int, total_frames: int, partial_paths: list[str]):
        self.frames_written, self.total_frames, self.partial_paths = frames_written, total_frames, partial_paths
        where = f"; partial clip kept at {', '.join(partial_paths)}" if partial_paths else "; no frames were written"
        super().__init__(f"interrupted at frame {frames_written}/{total_frames}{where}")


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

    @property
    def prompt_switches(self) -> list[int]:
        """Latent frames where a later prompt of a multi-prompt video starts (none for one prompt)."""
        return self.cond.switches if isinstance(self.cond, PromptSchedule) else []

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

    def denoise_windows(
        self, xs: list[torch.Tensor], sigmas: list[torch.Tensor], frame_offsets: list[int]
    ) -> list[torch.Tensor]:
        """Windows of one step as one batched model call, each with its own cond (see ``BatchedDenoiser``)."""
        self.num_calls += 1
        n = len(xs)
        conds = [self.cond_for(offset, x.shape[2]) for offset, x in zip(frame_offsets, xs)]
        x, sigma, cond = torch.cat(xs), torch.cat(sigmas), cat_conds(conds)
        if self.uncond is None or self.guidance_scale == 1.0:
            return list(self.adapter.denoise(x, sigma, cond).chunk(n))
        x0_uncond, x0_cond = self.adapter.denoise(
            torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds([self.uncond] * n + conds)
        ).chunk(2)
        return list((x0_uncond + self.guidance_scale * (x0_cond - x0_uncond)).chunk(n))


@dataclass
class GenerationResult:
    latents: torch.Tensor
    num_frames: int
    path: str | None = None
    """The first sample's mp4 (see ``paths`` for a batch)."""
    paths: list[str] = field(default_factory=list)
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

    def sampler_context(self, num_latent_frames: int, requested_steps: int | None = None) -> SamplerContext:
        """What a sampler spec's hooks see of this pipeline (windows, steps, the model's causal blocks)."""
        adapter = self.adapter
        return SamplerContext(
            default_window=min(self.default_window(), num_latent_frames),
            num_latent_frames=num_latent_frames,
            requested_steps=requested_steps,
            default_steps=adapter.default_num_steps,
            fixed_causal_blocks=isinstance(adapter, CausalBlockMask),
            num_pixel_frames=adapter.num_pixel_frames,
        )

    def plan_sampler(
        self, sampler: str, num_latent_frames: int, options: dict[str, Any] | None, requested_steps: int | None = None
    ) -> tuple[SamplerSpec, Any, int]:
        """(spec, resolved knob dataclass, model steps) of a registered sampler; bad knobs are named errors."""
        spec = get_sampler(sampler)
        ctx = self.sampler_context(num_latent_frames, requested_steps)
        knobs = spec.resolve(spec.make_knobs(options), ctx)
        return spec, knobs, spec.num_steps(knobs, ctx)

    def sampler_kwargs(self, sampler: str, num_latent_frames: int, knobs: dict[str, Any]) -> dict[str, Any]:
        """A sampler's knobs by name with the model-derived defaults filled (its spec's ``resolve``)."""
        _, resolved, _ = self.plan_sampler(sampler, num_latent_frames, knobs)
        return dataclasses.asdict(resolved)

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
        return PromptSchedule(conds, ranges, transition), uncond

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
        """Generate clips; with ``output_path`` frames are decoded in chunks and streamed to mp4s.

        Streaming samplers (``fifo``, ``df``: ``SamplerSpec.streams``) hand frames to the mp4 during
        sampling and keep only their working set, so memory stays flat in the clip length. A list of
        prompts without ``prompt_frames`` is a batch: one mp4 per sample (:func:`output_paths`,
        ``out_0.mp4``, ``out_1.mp4``, ...). With ``prompt_frames`` the prompts are one multi-prompt
        video: prompt i starts at pixel frame ``prompt_frames[i]``, blended over ``prompt_transition``
        latent frames.
        """
        adapter = self.adapter
        get_sampler(sampler)  # an unknown name fails before any work
        _check_positive(num_frames=num_frames, height=height, width=width, num_inference_steps=num_inference_steps,
                        fps=fps, decode_chunk_latent_frames=decode_chunk_latent_frames)
        native_frames, native_h, native_w = adapter.native_video_size
        num_frames = num_frames if num_frames is not None else native_frames
        height = height if height is not None else native_h
        width = width if width is not None else native_w
        guidance = adapter.default_guidance_scale if guidance_scale is None else guidance_scale
        prompts, negatives = _prompt_lists(prompt, negative_prompt, multi_prompt=prompt_frames is not None)
        batch = 1 if prompt_frames is not None else len(prompts)
        shape = adapter.latent_shape(num_frames, height, width, batch_size=batch)
        spec, knob_values, steps = self.plan_sampler(sampler, shape[2], sampler_options, num_inference_steps)
        knobs = dataclasses.asdict(knob_values)
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
        total = adapter.num_pixel_frames(shape[2])
        paths = output_paths(output_path, batch) if output_path is not None else None
        sink = _FrameSink(adapter, paths, fps, decode_chunk_latent_frames, total, show_progress)
        try:
            with spec.model_hooks(adapter, knobs) as hook_arguments:  # e.g. the causal sampler's KV cache
                self._run_sampler(spec, denoiser, x_noise, sigmas, {**knobs, **hook_arguments}, sink, seed,
                                  show_progress)
            sink.finish()
        except KeyboardInterrupt:
            written = sink.writers[0].num_frames if sink.writers else 0
            raise GenerationInterrupted(written, total, sink.abort()) from None
        except BaseException:
            sink.abort()  # an error: nothing under a final name, partial clips kept under names that say so
            raise
        sink.close()
        latents = torch.cat(sink.kept, dim=2)
        result = GenerationResult(latents=latents, num_frames=adapter.num_pixel_frames(latents.shape[2]))
        result.stats["model_calls"] = denoiser.num_calls
        for writer in sink.writers:
            if writer.num_frames != total:
                raise RuntimeError(f"wrote {writer.num_frames} frames, expected {total}")
        if paths:
            result.path, result.paths = paths[0], paths
        return result

    @staticmethod
    def _run_sampler(spec: SamplerSpec, denoiser, x_noise, sigmas, knobs: dict[str, Any], sink: _FrameSink,
                     seed: int, show_progress: bool) -> None:
        """Call a spec's function: streaming ones push frames to ``sink`` as they finish, others at the end.

        A streaming sampler's own bar is off while the frame bar runs; a non-streaming one shows its
        denoising steps, and the frame bar only starts when decoding does.
        """
        fn = spec.function()
        params = inspect.signature(fn).parameters
        extra: dict[str, Any] = {}
        if "generator" in params:  # re-noising, eta > 0: seeded, independent of the initial noise
            extra["generator"] = torch.Generator("cpu").manual_seed(seed + 1)
        if "prompt_switches" in params:  # samplers with a cache of past frames rebuild it at a prompt switch
            extra["prompt_switches"] = denoiser.prompt_switches
        takes_disable = "disable" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if spec.streams:
            sink.open_bar(f"{spec.name}: frames")
            if takes_disable:
                extra["disable"] = True if sink.writers else not show_progress
            fn(denoiser, x_noise, sigmas, on_frames=sink, return_latents=False, **extra, **knobs)
        else:
            if takes_disable:
                extra["disable"] = not show_progress
            latents = fn(denoiser, x_noise, sigmas, **extra, **knobs)
            sink.open_bar("decoding")
            sink(0, latents)

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
