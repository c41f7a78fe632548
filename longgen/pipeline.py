"""LongVideoPipeline: a diffusers pipeline + backbone adapter + long sampler, streaming frames to mp4."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .backbones import BackboneAdapter, CausalBlockMask, Cond, cat_conds, load_adapter
from .backbones.base import StreamingDecoder
from .conditioning import prepare_conditioning
from .io import VideoWriter
from .noise import freenoise_noise
from .prompts import PromptSchedule
from .samplers import SamplerContext, SamplerSpec, get_sampler, sampler_names

logger = logging.getLogger(__name__)

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
    prompts = _strings(prompt, "prompt")
    if negative_prompt is None:
        return prompts, None
    n = 1 if multi_prompt else len(prompts)
    return prompts, [negative_prompt] * n if isinstance(negative_prompt, str) else _strings(negative_prompt,
                                                                                          "negative_prompt")


def _strings(value, name: str) -> list[str]:
    """A str or a non-empty list / tuple of str, as a list; anything else is a TypeError naming ``name``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    what = "an empty list" if isinstance(value, (list, tuple)) and not value else type(value).__name__
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {what}")


OUTPUT_TYPES = ("np", "pt", "pil", "latent")
"""``output_type`` values of :meth:`LongVideoPipeline.__call__` (diffusers' names)."""


@dataclass
class _Run:
    """One generation request as :meth:`LongVideoPipeline._sample` takes it (both entry points build one)."""

    prompts: list[str]
    negatives: list[str] | None
    image: Any
    num_frames: int | None
    height: int | None
    width: int | None
    steps: int | None
    guidance_scale: float | None
    shift: float | None
    sampler: str
    sampler_options: dict[str, Any] | None
    prompt_frames: list[int] | None
    prompt_transition: float
    output_path: str | os.PathLike | None
    fps: float
    decode_chunk: int
    show_progress: bool
    save_latents: bool
    sigmas: torch.Tensor | None = None
    conditioning: Any = None
    """Given frames (:class:`~longgen.conditioning.FrameConditioning` or ``GivenFrames``), or None."""
    framing: Any = None
    """:class:`~longgen.conditioning.OutputFraming` of the mp4 (input frames around the generated ones), or None."""

    def __post_init__(self) -> None:
        import math
        import numbers

        for name in ("num_frames", "height", "width", "steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                flag = "num_inference_steps" if name == "steps" else name
                raise TypeError(f"{flag} must be an integer, got {value!r}")
        for name, value, positive in (("guidance_scale", self.guidance_scale, False), ("shift", self.shift, True),
                                      ("fps", self.fps, True), ("prompt_transition", self.prompt_transition, False)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)) or (positive and float(value) <= 0):
                rule = "(a finite number) must be > 0" if positive else "must be a finite number"
                raise ValueError(f"{name} {rule}, got {value!r}")


def _check_sigmas(sigmas) -> torch.Tensor:
    """``sigmas`` of ``__call__``: a 1-D sequence of finite noise levels in [0, 1], strictly descending, with at
    least one level above 0 (the trailing 0 is added when missing)."""
    try:
        t = torch.as_tensor(sigmas, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"sigmas must be a 1-D sequence of numbers, got {type(sigmas).__name__} ({err})") from None
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1 + 1e-6:
        raise ValueError(f"sigmas must be finite noise levels in [0, 1], got {t.tolist()}")
    if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"sigmas must be strictly descending (from noise to clean), got {t.tolist()}")
    if float(t[0]) == 0.0:
        raise ValueError("sigmas hold no noise level above 0: nothing to denoise; e.g. sigmas=[1.0, 0.5, 0.0]")
    return t


def frames_as(frames: torch.Tensor, output_type: str):
    """Decoded ``[B, F, H, W, 3]`` frames in [0, 1] as diffusers' ``video_processor.postprocess_video`` returns
    them: ``np`` float32 ``[B, F, H, W, 3]``, ``pt`` ``[B, F, 3, H, W]``, ``pil`` lists of PIL images."""
    if output_type == "np":
        return frames.float().numpy()
    if output_type == "pt":
        return frames.permute(0, 1, 4, 2, 3).contiguous()
    if output_type == "pil":
        from PIL import Image

        array = (frames.float().numpy() * 255).round().astype("uint8")  # diffusers' numpy_to_pil
        return [[Image.fromarray(frame) for frame in video] for video in array]
    raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def _generator_seed(generator) -> int:
    """A seed for the samplers' re-noising (eta > 0) derived from the caller's generator (0 without one)."""
    first = generator[0] if isinstance(generator, list) and generator else generator
    return int(first.initial_seed()) % (2**62) if isinstance(first, torch.Generator) else 0


def latents_path(video_path: str | os.PathLike) -> str:
    """Where ``--save-latents`` puts a clip's latents: ``clip.mp4`` -> ``clip.latents.safetensors``."""
    stem, _ = os.path.splitext(os.fspath(video_path))
    return f"{stem}.latents.safetensors"


def save_latents_file(video_path: str | os.PathLike, latents: torch.Tensor, adapter: BackboneAdapter) -> str:
    """Write one sample's final latents ``[1, C, f, h, w]`` next to its mp4 (safetensors, atomic)."""
    from safetensors.torch import save_file

    from .files import atomic_path

    path = latents_path(video_path)
    metadata = {"family": adapter.family, "num_frames": str(adapter.num_pixel_frames(latents.shape[2]))}
    with atomic_path(path) as tmp:
        save_file({"latents": latents.detach().cpu().contiguous()}, tmp, metadata=metadata)
    return path


def _fine_tuned_model(path: str, transformer: str, dtype: torch.dtype) -> dict[str, Any]:
    """``{model_attr: model}`` of a full fine-tune to load the pipeline with ({} for an ExVideo-only export)."""
    from .backbones import adapter_class_for_pipeline, read_model_index
    from .finetune import find_exvideo_weights, load_transformer, transformer_folder

    index = read_model_index(path)
    attr = adapter_class_for_pipeline(index.get("_class_name", "<missing _class_name>")).model_attr
    if os.path.isdir(transformer) and find_exvideo_weights(transformer) and not (
        os.path.isfile(os.path.join(transformer, "config.json")) or os.path.isdir(os.path.join(transformer, attr))
    ):
        return {}  # final/ of an ExVideo run: the base model plus its extra weights (reapply_recorded_extension)
    transformer_folder(transformer, attr)
    return {attr: load_transformer(transformer, index, attr, dtype, base_folder=path)}


class _FrameSink:
    """Receives finished latent frames: keeps them, and decodes + streams every sample to its own mp4."""

    def __init__(self, adapter: BackboneAdapter, paths: list[str] | None, fps: float, decode_chunk: int,
                 total: int, show_progress: bool, keep_frames: bool = False, framing: Any = None):
        self.kept: list[torch.Tensor] = []
        self.frames: list[torch.Tensor] | None = [] if keep_frames else None
        """Decoded ``[B, n, H, W, 3]`` blocks in order when the caller wants the frames in memory."""
        self.framing = framing  # OutputFraming: input frames written around the generated ones (mp4s only)
        self.to_skip = framing.skip if framing is not None else 0
        file_total = framing.total(total) if framing is not None else total
        self.writers = [VideoWriter(p, fps=fps, total_frames=file_total) for p in paths] if paths else []
        if framing is not None and framing.head is not None:
            for writer in self.writers:
                writer.write(framing.head)
        self.decoder = StreamingDecoder(adapter, decode_chunk)
        self.total, self.show_progress = total, show_progress
        self.bar = None

    def open_bar(self, desc: str) -> None:
        if self.bar is None:
            disable = not self.show_progress or not self.writers
            self.bar = tqdm(total=self.total, desc=desc, unit="frame", disable=disable)

    @property
    def decodes(self) -> bool:
        return bool(self.writers) or self.frames is not None

    def __call__(self, start: int, latents: torch.Tensor) -> None:
        self.kept.append(latents.cpu())
        if self.decodes:
            self._write(self.decoder.push(latents))

    def _write(self, blocks) -> None:
        for block in blocks:
            if self.frames is not None:
                self.frames.append(block.cpu())
            drop = min(self.to_skip, block.shape[1])
            self.to_skip -= drop
            for writer, frames in zip(self.writers, block):
                if frames.shape[0] > drop:
                    writer.write(frames[drop:])
            self.bar.update(block.shape[1])
            # written: let the block go before the decoder makes the next one (the loop variables would
            # otherwise keep it alive through the next decode: two blocks at the decode peak)
            block = frames = None  # noqa: F841

    def finish(self) -> None:
        if self.decodes:
            self.open_bar("decoding")
            self._write(self.decoder.flush())
        if self.framing is not None and self.framing.tail is not None:
            for writer in self.writers:
                writer.write(self.framing.tail)

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
        """The cond of a window (a callable cond gives multi-prompt conditioning per frame range; per-frame inputs
        such as an image-to-video first frame are cut to the window by ``adapter.window_cond``)."""
        cond = self.cond(frame_offset, num_latent_frames) if callable(self.cond) else self.cond
        return self.adapter.window_cond(cond, frame_offset, num_latent_frames)

    def uncond_for(self, frame_offset: int, num_latent_frames: int) -> Cond:
        """The negative cond of a window (see :meth:`cond_for`)."""
        return self.adapter.window_cond(self.uncond, frame_offset, num_latent_frames)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, frame_offset: int = 0) -> torch.Tensor:
        self.num_calls += 1
        cond = self.cond_for(frame_offset, x.shape[2])
        if self.uncond is None or self.guidance_scale == 1.0:
            return self.adapter.denoise(x, sigma, cond)
        uncond = self.uncond_for(frame_offset, x.shape[2])
        x0_uncond, x0_cond = self.adapter.denoise(
            torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds([uncond, cond])
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
        unconds = [self.uncond_for(offset, x.shape[2]) for offset, x in zip(frame_offsets, xs)]
        x0_uncond, x0_cond = self.adapter.denoise(
            torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds(unconds + conds)
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
    latents_paths: list[str] = field(default_factory=list)
    """``save_latents``: each sample's ``.latents.safetensors`` next to its mp4."""


@dataclass
class LongVideoPipelineOutput(BaseOutput):
    """What :meth:`LongVideoPipeline.__call__` returns, as diffusers' ``WanPipelineOutput`` (``.frames``).

    ``frames`` per ``output_type``; ``latents`` the final latents; ``path`` / ``paths`` the mp4s written with
    ``output_path``; ``latents_paths`` the ``save_latents`` files.
    """

    frames: Any
    latents: torch.Tensor | None = None
    path: str | None = None
    paths: list[str] | None = None
    latents_paths: list[str] | None = None


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
        self.loras: dict[str, float] = {}
        """Loaded LoRA adapter name -> scale (:meth:`load_lora`)."""

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
            native = adapter.native_video_size[0]
            if spec.sets_window and target_latent < adapter.num_latent_frames(native):
                raise ValueError(
                    f"target_num_frames (--target-frames) {target_num_frames} is shorter than the model's native "
                    f"{native} frames: {method} extends the model to a longer clip; give the length to generate"
                )
            options = {"target_latent_frames": target_latent, **options}
        applied = [h.describe().get("method") for h in self.extensions]
        if method in applied:
            raise ValueError(f"extension {method!r} is already applied: call pipe.remove_extensions() first")
        try:
            handle = apply_extension(adapter, method, options)
        except (ValueError, RuntimeError) as err:
            if not applied:
                raise
            raise type(err)(f"{err} (applied already: {', '.join(map(str, applied))}; pipe.remove_extensions() "
                            "removes them)") from err
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
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        offload: str = "none",
        attention_backend: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        transformer: str | os.PathLike | None = None,
        auto_extension: bool = True,
    ) -> LongVideoPipeline:
        """Load a local diffusers pipeline folder; ``offload`` is ``none``, ``model`` or ``group``.

        ``dtype`` (diffusers' current name) or ``torch_dtype``; default float32. ``transformer``: a full
        fine-tune's model folder (or the trainer's ``final/`` holding ``transformer/``), checked against the base
        model's architecture; with ``auto_extension`` the extension recorded next to it
        (``longgen_extension.json``) is re-applied (:meth:`reapply_recorded_extension`).
        """
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: pass one (dtype)")
        dtype = dtype or torch_dtype or torch.float32
        components: dict[str, Any] = {}
        if transformer is not None:
            components = _fine_tuned_model(os.fspath(path), os.fspath(transformer), dtype)
        adapter = load_adapter(path, torch_dtype=dtype, **components)
        pipe = cls(adapter, device=device)
        pipe._place(torch.device(device), offload)
        if attention_backend and attention_backend != "native":
            adapter.model.set_attention_backend(attention_backend)
        if transformer is not None and auto_extension:
            pipe.reapply_recorded_extension(os.fspath(transformer))
        return pipe

    def _place(self, device: torch.device, offload: str) -> None:
        pipe = self.adapter.pipe
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "group":
            pipe.enable_group_offload(onload_device=device, offload_type="leaf_level", use_stream=device.type == "cuda")
        elif offload == "none":
            pipe.to(device)
        else:
            raise ValueError(f"offload must be 'none', 'model' or 'group', got {offload!r}")
        self.device = device

    def to(self, *args, **kwargs) -> LongVideoPipeline:
        """Move the wrapped diffusers pipeline (``DiffusionPipeline.to``: a device and/or dtype); returns self."""
        self.adapter.pipe.to(*args, **kwargs)
        self.device = self.adapter.device
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """Diffusers' model CPU offload of the wrapped pipeline; generation then runs on ``device``."""
        self.adapter.pipe.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self.device = self.adapter.pipe._execution_device

    # --- fine-tunes ---------------------------------------------------------------------------
    def load_lora(
        self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None, auto_extension: bool = True
    ) -> str:
        """Load a diffusers-format LoRA (``train/train.py``'s ``final/pytorch_lora_weights.safetensors``, a folder
        holding one, or any diffusers LoRA) at ``scale``, via the pipeline's ``load_lora_weights`` +
        ``set_adapters``; several LoRAs combine. With ``auto_extension`` the extension recorded next to it is
        re-applied first (:meth:`reapply_recorded_extension`). Returns the adapter name."""
        from .finetune import load_lora

        path = os.fspath(path)
        name = adapter_name or f"lora_{len(self.loras)}"
        if name in self.loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded; pass another adapter_name")
        if auto_extension:
            self.reapply_recorded_extension(path)
        self.loras[name] = float(scale)
        try:
            load_lora(self.adapter, path, name, self.loras)
        except BaseException:
            del self.loras[name]
            raise
        return name

    def apply_extension_record(self, record: dict[str, Any]) -> Any:
        """Apply an extension from its ``ExtensionHandle.describe()`` / ``longgen_extension.json`` record."""
        from .extend.registry import extension_from_metadata, get_extension

        handle = extension_from_metadata(self.adapter, record)
        if get_extension(record["method"]).sets_window:
            self.window_latent_frames = getattr(handle.config, "target_latent_frames", None)
        self.extensions.append(handle)
        return handle

    def reapply_recorded_extension(self, source: str | os.PathLike) -> Any:
        """Re-apply the extension a fine-tune was trained with (``longgen_extension.json`` next to ``source``) and
        load ExVideo's exported weights; returns the handle, or None (no record, or the caller already applied
        an extension: theirs wins, with a warning)."""
        from .finetune import (
            EXTENSION_INFO,
            find_extension_record,
            find_exvideo_weights,
            load_exvideo_weights,
        )

        source = os.fspath(source)
        found, weights = find_extension_record(source), find_exvideo_weights(source)
        if found is None:
            if weights is not None:
                raise ValueError(f"{weights} has no {EXTENSION_INFO} beside it: the ExVideo settings are unknown")
            return None
        file, record = found
        if self.extensions:
            applied = [h.name for h in self.extensions]
            if record["method"] not in applied or weights is not None:
                logger.warning(
                    "%s records the %s extension this fine-tune was trained with; using the extension(s) given "
                    "instead (%s)%s", file, record["method"], ", ".join(applied),
                    f"; {weights} is not loaded" if weights else "",
                )
            return None
        handle = self.apply_extension_record(record)
        logger.info("re-applied extension %s from %s: %s", handle.name, file, json.dumps(handle.describe()))
        if weights is not None:
            load_exvideo_weights(self.adapter, weights)
        return handle

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
            for name, value in (("noise_window", window), ("noise_stride", stride)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1 (or None for "
                                     f"the default), got {value!r}")
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
        for i in range(1, len(starts)):
            if starts[i] <= starts[i - 1]:  # both start in one latent frame: the earlier prompt would get none
                raise ValueError(
                    f"prompt start frames {prompt_frames[i - 1]} and {prompt_frames[i]} fall in the same latent frame "
                    f"(a latent frame holds {tc} pixel frames): space prompt starts at least {tc} frames apart"
                )
        if negatives is not None and len(negatives) > 1:
            raise ValueError(
                f"{len(negatives)} negative prompts for one multi-prompt video (prompt_frames): give one negative "
                "prompt, which applies to every segment"
            )
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
        save_latents: bool = False,
        conditioning: Any = None,
        framing: Any = None,
    ) -> GenerationResult:
        """Generate clips; with ``output_path`` frames are decoded in chunks and streamed to mp4s.

        Streaming samplers (``fifo``, ``df``: ``SamplerSpec.streams``) hand frames to the mp4 during
        sampling and keep only their working set, so memory stays flat in the clip length. A list of
        prompts without ``prompt_frames`` is a batch: one mp4 per sample (:func:`output_paths`,
        ``out_0.mp4``, ``out_1.mp4``, ...). With ``prompt_frames`` the prompts are one multi-prompt
        video: prompt i starts at pixel frame ``prompt_frames[i]``, blended over ``prompt_transition``
        latent frames. ``save_latents`` also writes each sample's final latents next to its mp4
        (:func:`latents_path`). For frames in memory (diffusers-style), call the pipeline itself.

        ``conditioning``: given frames every sampler keeps fixed (continuation, transitions, keyframes, repainting):
        a :class:`~longgen.conditioning.FrameConditioning` of latents, or pixel
        :class:`~longgen.conditioning.GivenFrames` encoded once here (see :mod:`longgen.conditioning`).
        ``framing``: an :class:`~longgen.conditioning.OutputFraming` putting input frames around the generated ones
        in the mp4 (``--keep-input``); the returned latents and ``num_frames`` are the generated clip's.
        """
        prompts, negatives = _prompt_lists(prompt, negative_prompt, multi_prompt=prompt_frames is not None)
        run = _Run(
            prompts, negatives, image, num_frames, height, width, num_inference_steps, guidance_scale, shift,
            sampler, sampler_options, prompt_frames, prompt_transition, output_path, fps,
            decode_chunk_latent_frames, show_progress, save_latents, conditioning=conditioning, framing=framing,
        )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        noise_fn = partial(self.make_noise, seed=seed, noise=noise, window=noise_window, stride=noise_stride)
        result, _ = self._sample(run, noise_fn, renoise_seed=seed + 1, noise_name=noise)
        return result

    def _sample(self, run: _Run, noise_fn: Callable[[tuple[int, ...]], torch.Tensor], renoise_seed: int,
                noise_name: str = "gaussian", keep_frames: bool = False) -> tuple[GenerationResult, torch.Tensor | None]:
        """Plan, condition, sample and decode one request; (result, decoded frames or None)."""
        adapter = self.adapter
        get_sampler(run.sampler)  # an unknown name fails before any work
        _check_positive(num_frames=run.num_frames, height=run.height, width=run.width,
                        num_inference_steps=run.steps, fps=run.fps, decode_chunk_latent_frames=run.decode_chunk)
        if run.save_latents and run.output_path is None:
            raise ValueError("save_latents (--save-latents) writes next to the mp4: also give output_path (--out)")
        native_frames, native_h, native_w = adapter.native_video_size
        num_frames = run.num_frames if run.num_frames is not None else native_frames
        height = run.height if run.height is not None else native_h
        width = run.width if run.width is not None else native_w
        guidance = adapter.default_guidance_scale if run.guidance_scale is None else run.guidance_scale
        batch = 1 if run.prompt_frames is not None else len(run.prompts)
        shape = adapter.latent_shape(num_frames, height, width, batch_size=batch)
        spec, knob_values, steps = self.plan_sampler(run.sampler, shape[2], run.sampler_options, run.steps)
        knobs = dataclasses.asdict(knob_values)
        if "causal_block_size" in knobs and isinstance(adapter, CausalBlockMask):
            adapter.set_causal_block_size(knobs["causal_block_size"])
        cond, uncond = self._conditioning(
            run.prompts, run.negatives, run.prompt_frames, shape[2], run.prompt_transition, image=run.image,
            do_classifier_free_guidance=guidance != 1.0, num_frames=num_frames, height=height, width=width,
        )
        given = prepare_conditioning(adapter, run.conditioning, shape, spec.function(), spec.name)
        if given and int(given["conditioning"].resample) > 1 and not spec.resamples:
            able = [n for n in sampler_names() if get_sampler(n).resamples]
            raise ValueError(
                f"--resample-steps (resample={given['conditioning'].resample}) is RePaint's resampling, which the "
                f"{spec.name!r} sampler does not run: use --sampler {' or '.join(able)}, or drop it"
            )
        x_noise = noise_fn(shape)
        if run.sigmas is not None and knobs.get("denoising_steps"):
            raise ValueError("sigmas and denoising_steps (--denoising-steps) both set the schedule: pass one")
        sigmas = run.sigmas if run.sigmas is not None else adapter.sigmas(steps, shift=run.shift)
        denoiser = GuidedDenoiser(adapter, cond, uncond, guidance)
        logger.info(
            "sampling %d frames (%d latent) at %dx%d: %s sampler, %d steps, %s noise, options %s",
            num_frames, shape[2], height, width, run.sampler, len(sigmas) - 1, noise_name, knobs,
        )
        total = adapter.num_pixel_frames(shape[2])
        paths = output_paths(run.output_path, batch) if run.output_path is not None else None
        sink = _FrameSink(adapter, paths, run.fps, run.decode_chunk, total, run.show_progress, keep_frames,
                          run.framing)
        try:
            with spec.model_hooks(adapter, knobs) as hook_arguments:  # e.g. the causal sampler's KV cache
                self._run_sampler(spec, denoiser, x_noise, sigmas, {**knobs, **hook_arguments, **given}, sink,
                                  renoise_seed, run.show_progress)
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
        expected = run.framing.total(total) if run.framing is not None else total
        for writer in sink.writers:
            if writer.num_frames != expected:
                raise RuntimeError(f"wrote {writer.num_frames} frames, expected {expected}")
        if paths:
            result.path, result.paths = paths[0], paths
        if run.save_latents:
            result.latents_paths = [save_latents_file(p, latents[i : i + 1], adapter) for i, p in enumerate(paths)]
        frames = torch.cat(sink.frames, dim=1) if sink.frames is not None else None
        return result, frames

    # --- the diffusers-style call ------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        sampler: str = "full",
        sampler_options: dict[str, Any] | None = None,
        shift: float | None = None,
        output_path: str | os.PathLike | None = None,
        fps: float = 16.0,
        decode_chunk_latent_frames: int = 4,
        show_progress: bool = True,
        save_latents: bool = False,
        conditioning: Any = None,
    ) -> LongVideoPipelineOutput | tuple:
        """Generate like a diffusers video pipeline (``WanPipeline.__call__``), with a long sampler.

        ``prompt`` a string or a batch (list); ``num_videos_per_prompt`` repeats each prompt with its own noise
        (samples ordered p0, p0, p1, p1, ...). ``generator`` a ``torch.Generator`` or one per sample; initial
        noise is ``diffusers.utils.torch_utils.randn_tensor`` in float32, as the stock pipelines draw it, so the
        same generator gives the same noise. ``output_type``: ``np`` (``[B, F, H, W, 3]`` float in [0, 1]),
        ``pt`` (``[B, F, 3, H, W]``), ``pil`` (a list of lists of PIL images) or ``latent`` (the latents).
        ``sigmas`` overrides the noise levels (descending, ending at 0). With ``output_path`` every sample is
        also streamed to an mp4 (``output.paths``). ``conditioning``: given frames, as in :meth:`generate`. Returns :class:`LongVideoPipelineOutput`, or the tuple
        ``(frames,)`` with ``return_dict=False``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be an integer >= 1, got {num_videos_per_prompt!r}")
        prompts, negatives = _prompt_lists("" if prompt is None else prompt,
                                           "" if negative_prompt is None else negative_prompt, multi_prompt=False)
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one each, or one")
        n = num_videos_per_prompt
        prompts = [p for p in prompts for _ in range(n)]
        negatives = [p for p in negatives for _ in range(n)] if negatives is not None else None
        if sigmas is not None:
            sigmas = _check_sigmas(sigmas)
            sigmas = sigmas if float(sigmas[-1]) == 0.0 else torch.cat([sigmas, sigmas.new_zeros(1)])
        run = _Run(
            prompts, negatives, image, num_frames, height, width, num_inference_steps, guidance_scale, shift,
            sampler, sampler_options, None, 0.0, output_path, fps, decode_chunk_latent_frames, show_progress,
            save_latents, sigmas, conditioning=conditioning,
        )
        noise_fn = partial(self._call_noise, generator=generator, latents=latents)
        result, frames = self._sample(run, noise_fn, renoise_seed=_generator_seed(generator) + 1,
                                      keep_frames=output_type != "latent")
        frames = result.latents if output_type == "latent" else frames_as(frames, output_type)
        if not return_dict:
            return (frames,)
        return LongVideoPipelineOutput(
            frames=frames, latents=result.latents, path=result.path, paths=result.paths or None,
            latents_paths=result.latents_paths or None,
        )

    def _call_noise(self, shape: tuple[int, ...], generator, latents: torch.Tensor | None) -> torch.Tensor:
        """The stock pipelines' initial noise (``randn_tensor``, float32), or the caller's ``latents``."""
        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__} (torch.from_numpy(a))")
            if not torch.isfinite(latents).all():
                raise ValueError("latents hold NaN or inf values: pass finite noise (e.g. torch.randn(shape))")
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents have shape {tuple(latents.shape)}, this clip needs {tuple(shape)}")
            return latents.to(self.device, torch.float32)
        gens = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
            raise TypeError(
                f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}: e.g. "
                "generator=torch.Generator().manual_seed(0)"
            )
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(
                f"{len(generator)} generators for {shape[0]} videos (prompts x num_videos_per_prompt): give one "
                "per video, or a single generator"
            )
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)


    @staticmethod
    def _run_sampler(spec: SamplerSpec, denoiser, x_noise, sigmas, knobs: dict[str, Any], sink: _FrameSink,
                     renoise_seed: int, show_progress: bool) -> None:
        """Call a spec's function: streaming ones push frames to ``sink`` as they finish, others at the end.

        A streaming sampler's own bar is off while the frame bar runs; a non-streaming one shows its
        denoising steps, and the frame bar only starts when decoding does.
        """
        fn = spec.function()
        params = inspect.signature(fn).parameters
        extra: dict[str, Any] = {}
        if "generator" in params:  # re-noising, eta > 0: seeded, independent of the initial noise
            extra["generator"] = torch.Generator("cpu").manual_seed(renoise_seed)
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
