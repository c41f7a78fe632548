"""The backbone adapter contract: one denoiser form for every diffusers video model.

An adapter wraps a stock diffusers pipeline (never a fork of it) and exposes

    denoise(x[B, C, F, H, W], sigma[B, F], cond) -> x0

in longgen's flow-sigma convention (see :mod:`longgen.schedules`), with one noise level per latent
frame. Everything model-specific — the model's own parameterisation, how its timestep enters, how to
encode prompts, how the VAE compresses time, which layers extensions and LoRA touch — is declared or
implemented by the adapter, so samplers, extensions and training stay model-agnostic
(k-diffusion's ``external.py`` wrappers are the pattern).
"""

from __future__ import annotations

import json
import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..schedules import check_sigma, flow_sigmas

Cond = dict[str, Any]
"""Model inputs besides x and the noise level. Tensor values carry the batch on dim 0, so two conds
(prompt and negative prompt) concatenate into one batch for classifier-free guidance."""


def cat_conds(conds: list[Cond]) -> Cond:
    """Concatenate conds along the batch; non-tensor values must agree and are kept once."""
    out: Cond = {}
    for key in conds[0]:
        values = [c[key] for c in conds]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.cat(values, dim=0)
        elif values[0] is None or all(v is values[0] or v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise ValueError(f"cannot batch cond entry {key!r}: values differ and are not tensors")
    return out


def repeat_cond(cond: Cond, repeats: int) -> Cond:
    """Repeat every batched tensor of a cond ``repeats`` times along the batch (windows in one call)."""
    return {
        k: (v.repeat_interleave(repeats, dim=0) if isinstance(v, torch.Tensor) else v)
        for k, v in cond.items()
    }


@dataclass(frozen=True)
class FrameLayout:
    """How pixel frames map to latent frames for one VAE.

    A *causal* video VAE (Wan, HunyuanVideo, LTX, CogVideoX) encodes the first pixel frame alone and
    every following ``temporal_compression`` frames into one latent frame:
    ``num_frames = temporal_compression * (num_latent_frames - 1) + 1``. A per-frame image VAE
    (AnimateDiff, SVD) has ``temporal_compression == 1``.
    """

    temporal_compression: int
    causal: bool

    def num_latent_frames(self, num_frames: int, family: str = "this model") -> int:
        tc = self.temporal_compression
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        if self.causal and tc > 1:
            if (num_frames - 1) % tc != 0:
                lower = (num_frames - 1) // tc * tc + 1
                raise ValueError(
                    f"{family} needs num_frames = {tc}k+1 because its VAE compresses time by {tc} after the "
                    f"first frame; got {num_frames}. Use {lower} or {lower + tc}."
                )
            return (num_frames - 1) // tc + 1
        if num_frames % tc != 0:
            lower = num_frames // tc * tc
            raise ValueError(
                f"{family} needs num_frames divisible by {tc} (its VAE temporal stride); got {num_frames}. "
                f"Use {max(lower, tc)} or {lower + tc}."
            )
        return num_frames // tc

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        tc = self.temporal_compression
        return tc * (num_latent_frames - 1) + 1 if (self.causal and tc > 1) else tc * num_latent_frames


class BackboneAdapter(ABC):
    """Abstract base of the per-family adapters in ``longgen/backbones/<family>.py``.

    Subclasses set the class attributes below and implement ``tiny_pipeline``, ``encode_prompt``,
    ``denoise`` and ``decode``. They must not change the wrapped model's weights or classes. Optional
    capabilities (RoPE, window attention, ExVideo sites, experts, ...) are the mixins of
    :mod:`longgen.backbones.capabilities`, listed among the subclass's bases.
    """

    # Class attributes are the family's defaults; an adapter may override the compression, patch and
    # image-condition attributes per instance from the loaded configs (e.g. Wan 2.2's 16x VAE).
    family: ClassVar[str] = ""
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    """``_class_name`` values in ``model_index.json`` this adapter loads."""
    model_attr: ClassVar[str] = "transformer"
    """Pipeline attribute of the denoising network (``transformer`` or ``unet``)."""
    temporal_compression: int = 4
    spatial_compression: int = 8
    causal_vae: ClassVar[bool] = True
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Latent frames, rows, columns per token."""
    prediction: ClassVar[str] = "flow"
    """The model's own output: ``flow`` (velocity), ``eps``, ``v`` or ``edm_v``."""
    native_per_frame_timesteps: ClassVar[bool] = False
    """True when the stock model accepts per-token timesteps; otherwise the adapter adds them by a hook."""
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_num_steps: ClassVar[int] = 30
    default_guidance_scale: ClassVar[float] = 5.0
    default_height: ClassVar[int] = 480
    default_width: ClassVar[int] = 832
    default_num_frames: int = 81
    """The model's native (training) clip length in pixel frames."""
    tiny_video_size: ClassVar[tuple[int, int, int]] = (9, 32, 32)
    """(num_frames, height, width) of the native clip of ``tiny_pipeline`` (tests and the demo)."""
    supports_image_condition: bool = False
    """This checkpoint accepts a conditioning image (per instance: Wan I2V vs T2V)."""
    requires_image_condition: bool = False
    """This checkpoint needs a conditioning image (training caches encode one per clip)."""
    schedule: Any = None
    """The model's discrete VP schedule (:class:`longgen.schedules.VPSchedule`: eps/v models), else None."""
    sigma_data: ClassVar[float] = 1.0
    """EDM's data standard deviation for loss weighting (1: unit-variance latents)."""

    @property
    def unwrapped(self) -> BackboneAdapter:
        """The adapter itself (a training view, :class:`~longgen.training.denoiser.AdapterView`, returns the
        adapter it wraps): the key under which extensions record what they installed."""
        return self

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None):
        self.pipe = pipe
        if getattr(pipe, self.model_attr, None) is None:
            raise ValueError(f"{type(pipe).__name__} has no '{self.model_attr}' component")
        self.native_video_size = tuple(
            native_video_size or (self.default_num_frames, self.default_height, self.default_width)
        )
        """(num_frames, height, width) the model was trained on: the window of long samplers."""

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def pipeline_class(cls):
        """The diffusers pipeline class this adapter builds by default."""
        import diffusers

        return getattr(diffusers, cls.pipeline_class_names[0])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, **kwargs):
        """Load a local diffusers pipeline folder (no hub access) and wrap it."""
        path = os.fspath(path)
        index = read_model_index(path)
        import diffusers

        pipe_cls = getattr(diffusers, index["_class_name"], None) or cls.pipeline_class()
        pipe = pipe_cls.from_pretrained(path, dtype=torch_dtype, local_files_only=True, **kwargs)
        meta = read_longgen_meta(path)
        native = (meta["num_frames"], meta["height"], meta["width"]) if "num_frames" in meta else None
        return cls(pipe, native_video_size=native)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the wrapped pipeline plus ``longgen.json`` (family and native clip size)."""
        path = os.fspath(path)
        self.pipe.save_pretrained(path)
        num_frames, height, width = self.native_video_size
        meta = {"family": self.family, "num_frames": num_frames, "height": height, "width": width}
        with open(os.path.join(path, LONGGEN_META), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    @abstractmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny randomly initialised pipeline of this family (tests, demo); no downloads."""

    # --- shapes -------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.pipe, self.model_attr)

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.model)

    @property
    def frame_layout(self) -> FrameLayout:
        return FrameLayout(self.temporal_compression, self.causal_vae)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.in_channels)

    def num_latent_frames(self, num_frames: int) -> int:
        return self.frame_layout.num_latent_frames(num_frames, self.family)

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        return self.frame_layout.num_pixel_frames(num_latent_frames)

    def latent_shape(self, num_frames: int, height: int, width: int, batch_size: int = 1) -> tuple[int, ...]:
        """``(B, C, F_latent, H_latent, W_latent)``, validating the pixel sizes against VAE and patch."""
        mult = self.spatial_compression * self.patch_size[1]
        if height % mult or width % mult:
            raise ValueError(
                f"{self.family} needs height and width divisible by {mult} (VAE stride "
                f"{self.spatial_compression} x patch {self.patch_size[1]}); got {height}x{width}. "
                f"Use {height // mult * mult or mult}x{width // mult * mult or mult}."
            )
        f = self.num_latent_frames(num_frames)
        return (
            batch_size,
            self.latent_channels,
            f,
            height // self.spatial_compression,
            width // self.spatial_compression,
        )

    # --- noise levels -------------------------------------------------------------------------
    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The model's default descending flow sigmas ``[num_steps + 1]``, ending at 0."""
        return flow_sigmas(num_steps, shift=1.0 if shift is None else shift)

    # --- the contract -------------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(
        self,
        prompt: list[str],
        negative_prompt: list[str] | None = None,
        image=None,
        do_classifier_free_guidance: bool = True,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> tuple[Cond, Cond | None]:
        """Encode prompts (and an optional conditioning image) with the pipeline's own encoders."""

    @abstractmethod
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 prediction for ``x`` ``[B, C, F, H, W]`` at per-frame flow sigmas ``sigma`` ``[B, F]``."""

    @staticmethod
    def check_denoise_inputs(x: torch.Tensor, sigma: torch.Tensor) -> None:
        """Validate the contract's shapes: ``x`` ``[B, C, F, H, W]``, ``sigma`` ``[B, F]`` flow sigmas in [0, 1]."""
        if x.ndim != 5:
            raise ValueError(f"x must be latents [B, C, F, H, W], got shape {tuple(x.shape)}")
        batch, _, num_latent_frames = x.shape[:3]
        if tuple(sigma.shape) != (batch, num_latent_frames):
            raise ValueError(
                f"sigma must be [B, F] = [{batch}, {num_latent_frames}] (one flow sigma per latent frame), "
                f"got {tuple(sigma.shape)}"
            )
        check_sigma(sigma)

    def window_cond(self, cond: Cond, frame_offset: int, num_latent_frames: int) -> Cond:
        """The cond of the latent frames ``[frame_offset, frame_offset + num_latent_frames)`` of a clip whose cond
        was encoded for the whole clip (windowed and streaming samplers call the model on parts of it).

        The default returns ``cond`` (nothing in it is per frame). Families whose cond holds per-frame inputs
        (image-to-video: the conditioning image sits at latent frame 0 of the clip, not of every window) return
        the window's part. ``frame_offset`` may be negative (FIFO's warm-up frames: copies of frame 0)."""
        return cond

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents ``[B, C, f, h, w]`` to frames ``[B, num_pixel_frames(f), H, W, 3]`` in [0, 1]."""

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode frames ``[B, T, H, W, 3]`` in [0, 1] to model latents ``[B, C, f, h, w]`` (training, V2V)."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode videos yet")

    def iter_decode(
        self, latents: torch.Tensor, chunk_latent_frames: int = 8, context_latent_frames: int = 2
    ) -> Iterator[torch.Tensor]:
        """Decode in temporal chunks, yielding ``[B, n, H, W, 3]`` frame blocks in order (see
        :class:`StreamingDecoder`)."""
        decoder = StreamingDecoder(self, chunk_latent_frames, context_latent_frames)
        yield from decoder.push(latents)
        yield from decoder.flush()

    # --- what extensions and training need ----------------------------------------------------
    def temporal_attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of attention layers that mix information across frames."""
        return []

    def context_parallel_plan(self) -> dict | None:
        """The diffusers ``_cp_plan`` when the model supports context parallel, else None."""
        return getattr(self.model, "_cp_plan", None)


@dataclass(frozen=True)
class WindowAttentionSpec:
    """Where and how frame-window extensions (FreeNoise window fusion, FreeLong SpectralBlend on DiTs, see
    :mod:`longgen.extend.dit_attention`) reach a DiT's video attention. Declared by the adapter, so the
    extensions hold no model-specific code.

    * ``layer_pattern``: regex matched (``re.search``) against module names inside the transformer: the
      attention layers over the video tokens (frame-major order, one latent frame per temporal patch);
    * ``token_grid(model, args, kwargs)``: the post-patch token grid ``(f, h, w)`` of a transformer call,
      read from its arguments (None when they do not say);
    * ``text_order``: None for video-only self-attention, else ``"text_first"`` / ``"text_last"``: where
      the attention processor concatenates the text tokens in a joint text-video attention;
    * ``rope_arg``: the name of the attention call's rotary-embedding argument;
    * ``before_hooks``: called before window hooks are registered (an adapter whose own hooks must stay
      outside them removes those here; they are re-added, outermost, on the next call).
    """

    layer_pattern: str
    token_grid: Callable[[Any, tuple, dict], tuple[int, int, int] | None]
    text_order: str | None = None
    rope_arg: str = "image_rotary_emb"
    before_hooks: Callable[[], None] | None = None


def grid_from_hidden_states(
    model: Any, args: tuple, kwargs: dict, patch: tuple[int, int, int], frames_first: bool = False
) -> tuple[int, int, int] | None:
    """Token grid of a transformer whose ``hidden_states`` is ``[B, C, F, H, W]`` (``[B, F, C, H, W]`` with
    ``frames_first``), divided by the ``(t, h, w)`` patch sizes."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 5:
        return None
    frames = hidden.shape[1] if frames_first else hidden.shape[2]
    pt, ph, pw = (int(p) for p in patch)
    return frames // pt, hidden.shape[3] // ph, hidden.shape[4] // pw


LONGGEN_META = "longgen.json"


_DTYPE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a model computes in: its low-precision parameters' dtype if it has any, else float32.

    diffusers keeps some modules in fp32 inside a bf16 model (``_keep_in_fp32_modules``), so the first
    parameter's dtype can be wrong; ``ModelMixin.dtype`` gets it right but walks every submodule's name,
    which costs about a millisecond per call. The scan runs once per model; the answer is kept with the
    first, middle and last parameter as probes and scanned again when a probe's dtype changes (``.to()``
    converts parameters in place, so a cast shows in the probes).
    """
    cached = _DTYPE_CACHE.get(module)
    if cached is not None:
        probes, dtypes, result = cached
        if tuple(p.dtype for p in probes) == dtypes:
            return result
    params = list(module.parameters())
    result = next(
        (p.dtype for p in params if p.is_floating_point() and p.dtype != torch.float32), torch.float32
    )
    if params:
        probes = (params[0], params[len(params) // 2], params[-1])
        _DTYPE_CACHE[module] = (probes, tuple(p.dtype for p in probes), result)
    return result


def encode_per_frame(
    vae, frames: torch.Tensor, sample: bool = False, generator=None, chunk_size: int = 16
) -> torch.Tensor:
    """Per-frame image-VAE encode (AnimateDiff, SVD): frames ``[B, T, H, W, 3]`` in [0, 1] -> latents
    ``[B, C, T, h, w]`` (float32): the posterior's mode (or a sample with ``generator``) times
    ``scaling_factor``, ``chunk_size`` frames per VAE call."""
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [B, T, H, W, 3] in [0, 1], got shape {tuple(frames.shape)}")
    batch, num_frames = frames.shape[:2]
    param = next(vae.parameters())
    pixels = frames.permute(0, 1, 4, 2, 3).flatten(0, 1)  # [B*T, 3, H, W]
    pixels = pixels.to(device=param.device, dtype=param.dtype) * 2.0 - 1.0
    latents = []
    for i in range(0, pixels.shape[0], chunk_size):
        dist = vae.encode(pixels[i : i + chunk_size]).latent_dist
        latents.append(dist.sample(generator) if sample else dist.mode())
    z = torch.cat(latents).float() * vae.config.scaling_factor  # [B*T, C, h, w]
    return z.unflatten(0, (batch, num_frames)).permute(0, 2, 1, 3, 4).contiguous()  # [B, C, T, h, w]


class StreamingDecoder:
    """Decode latent frames as they arrive, ``chunk_latent_frames`` at a time, in constant memory.

    Peak decode memory depends on the chunk, not the clip. A causal video VAE gets the last
    ``context_latent_frames`` of the previous chunk decoded again in front of each chunk, and their
    frames are dropped, so each chunk starts from warm causal state instead of a "first frame". With a
    chunk covering the clip this is exactly ``adapter.decode``. Long samplers push finished frames
    while they run, so frames reach the mp4 during sampling.
    """

    def __init__(
        self, adapter: BackboneAdapter, chunk_latent_frames: int = 8, context_latent_frames: int = 2
    ):
        if chunk_latent_frames < 1:
            raise ValueError(f"decode chunk must be >= 1 latent frame, got {chunk_latent_frames}")
        self.adapter = adapter
        self.chunk = chunk_latent_frames
        self.context = context_latent_frames if adapter.causal_vae and adapter.temporal_compression > 1 else 0
        self._buffer: torch.Tensor | None = None  # [B, C, n, h, w]: context frames then pending frames
        self._num_context = 0  # leading frames of the buffer that were decoded already
        self.num_latent_frames = 0  # latent frames pushed so far

    def push(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Add finished latent frames ``[B, C, n, h, w]``; yields frame blocks whenever a chunk is full."""
        self._buffer = latents if self._buffer is None else torch.cat([self._buffer, latents], dim=2)
        self.num_latent_frames += latents.shape[2]
        while self._buffer.shape[2] - self._num_context >= self.chunk:
            yield self._decode(self._num_context + self.chunk)

    def flush(self) -> Iterator[torch.Tensor]:
        """Decode what is left."""
        if self._buffer is not None and self._buffer.shape[2] > self._num_context:
            yield self._decode(self._buffer.shape[2])

    def _decode(self, end: int) -> torch.Tensor:
        window = self._buffer[:, :, :end]
        frames = self.adapter.decode(window)
        if self._num_context:
            frames = frames[:, self.adapter.num_pixel_frames(self._num_context) :]
        keep = min(self.context, end)
        self._buffer = self._buffer[:, :, end - keep :]
        self._num_context = keep
        return frames


def read_longgen_meta(path: str) -> dict:
    """longgen's own metadata next to ``model_index.json`` (written by ``save_pretrained``), or {}."""
    meta_path = os.path.join(path, LONGGEN_META)
    if not os.path.exists(meta_path):
        return {}
    with open(meta_path) as f:
        return json.load(f)


def read_model_index(path: str) -> dict:
    """Read a diffusers folder's ``model_index.json`` with errors that say what is wrong."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model folder {path!r} does not exist. Pass a local diffusers pipeline folder "
            "(one with model_index.json); longgen does not download from a hub."
        )
    if not os.path.isdir(path):
        raise NotADirectoryError(
            f"{path!r} is a file; pass the diffusers pipeline folder that holds model_index.json"
        )
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(
            f"{path!r} has no model_index.json: it is not a diffusers pipeline folder. Save one with "
            "`pipe.save_pretrained(path)` or `longgen make-tiny`."
        )
    with open(index_path) as f:
        return json.load(f)


def per_frame_to_tokens(values: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """``[B, F] -> [B, F * tokens_per_frame]``: one value per token, frames outermost (F, H, W order)."""
    return values.repeat_interleave(tokens_per_frame, dim=1)
