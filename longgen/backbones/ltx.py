"""LTX-Video (HaCohen et al. 2024, "LTX-Video: Realtime Video Latent Diffusion") behind longgen's contract.

The stock :class:`diffusers.LTXVideoTransformer3DModel` is a flow-matching DiT over *packed* latents
``[B, seq, C * p_t * p * p]`` that already accepts one timestep per token (``LTXImageToVideoPipeline``
and ``LTXConditionPipeline`` pass ``timestep`` of shape ``[B, seq]`` to hold conditioning frames at 0),
so per-frame noise levels need no hook: the adapter repeats each frame's ``sigma * 1000`` over the
frame's tokens. Its VAE (:class:`diffusers.AutoencoderKLLTXVideo`) compresses time by 8 causally
(``num_frames = 8k + 1``) and space by 32; latents are normalised per channel with the VAE's
``latents_mean`` / ``latents_std`` and ``scaling_factor`` exactly as ``LTXPipeline`` does.

Positions enter through fractional RoPE coordinates (``LTXVideoRotaryPosEmbed``). The temporal
coordinate of latent frame ``i`` is ``i * (8 / frame_rate) / 20`` (``LTXPipeline``; ``LTXConditionPipeline``
uses the pixel frame ``max(8i - 7, 0) / frame_rate / 20``), so the adapter's ``frame_rate`` is the
knob that a positional-interpolation extension turns: a higher ``frame_rate`` squeezes more latent frames
into the position range the model was trained on.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from einops import rearrange

from ..schedules import shift_sigma
from .base import BackboneAdapter, Cond, WindowAttentionSpec, per_frame_to_tokens
from .capabilities import ImageConditioning, TemporalRopeScale, WindowAttention

# Pipelines whose model (LTX-Video >= 0.9.5) takes pixel-space RoPE coordinates (``video_coords``) with
# the causal first-frame offset; the others pass a latent grid plus ``rope_interpolation_scale``.
_PIXEL_COORD_PIPELINES = ("LTXConditionPipeline",)
_IMAGE_TO_VIDEO_PIPELINES = ("LTXImageToVideoPipeline",)
IMAGE_LATENTS = "image_latents"
"""Cond key of LTX image-to-video: the encoded conditioning image ``[B, C, 1, h, w]`` pinned as latent frame 0."""
IMAGE_CLIP_FRAMES = "image_clip_latent_frames"
"""Cond key: latent frames of the clip whose first frame the image is (a window elsewhere is refused)."""


def _ltx_token_grid(model, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """LTX-Video's token grid: the ``num_frames``/``height``/``width`` arguments, else ``video_coords [B, 3, S]``."""
    names = ("num_frames", "height", "width")
    values = [kwargs.get(n, args[4 + i] if len(args) > 4 + i else None) for i, n in enumerate(names)]
    if all(v is not None for v in values):
        return tuple(int(v) for v in values)
    coords = kwargs.get("video_coords", args[8] if len(args) > 8 else None)
    if isinstance(coords, torch.Tensor):
        return tuple(int(torch.unique(coords[0, axis]).numel()) for axis in range(3))
    return None


class LTXAdapter(BackboneAdapter, TemporalRopeScale, WindowAttention, ImageConditioning):
    """LTX-Video adapter: flow prediction, native per-token timesteps, packed-token transformer.

    Noise levels: ``timestep = sigma * 1000`` (``FlowMatchEulerDiscreteScheduler``'s timesteps, passed
    to the model as they are), velocity output ``v = eps - x0``, so ``x0 = x - sigma * v``.
    """

    family: ClassVar[str] = "ltx"
    pipeline_class_names: ClassVar[tuple[str, ...]] = (
        "LTXPipeline",
        "LTXImageToVideoPipeline",
        "LTXConditionPipeline",
    )
    model_attr: ClassVar[str] = "transformer"
    temporal_compression: ClassVar[int] = 8
    spatial_compression: ClassVar[int] = 32
    causal_vae: ClassVar[bool] = True
    patch_size: ClassVar[tuple[int, int, int]] = (1, 1, 1)
    prediction: ClassVar[str] = "flow"
    native_per_frame_timesteps: ClassVar[bool] = True
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_num_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 3.0
    default_height: ClassVar[int] = 512
    default_width: ClassVar[int] = 704
    default_num_frames: ClassVar[int] = 161
    """``LTXPipeline.__call__``'s defaults: 161 frames (21 latent frames) at 704x512, 50 steps, guidance 3,
    frame_rate 25 (its docstring example uses 704x480)."""
    tiny_video_size: ClassVar[tuple[int, int, int]] = (17, 64, 64)
    default_frame_rate: ClassVar[float] = 25.0
    max_sequence_length: ClassVar[int] = 128
    """T5 prompt length ``LTXPipeline`` pads to (capped by the tokenizer's ``model_max_length``)."""

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None):
        super().__init__(pipe, native_video_size)
        cfg = self.model.config
        # Read from the loaded components: a variant with other strides or patches stays consistent.
        self.patch_size = (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))
        if getattr(pipe, "vae", None) is not None:
            self.temporal_compression = int(pipe.vae.temporal_compression_ratio)
            self.spatial_compression = int(pipe.vae.spatial_compression_ratio)
        self.frame_rate: float = self.default_frame_rate
        """Frames per second the RoPE temporal coordinates assume (``LTXPipeline(frame_rate=25)``). A
        ``cond["frame_rate"]`` entry, when present and not None, overrides it for that call."""
        self.temporal_position_scale: float = 1.0
        """Positional interpolation (PI) factor ``s``: temporal RoPE coordinates are divided by it, i.e. the
        model sees ``frame_rate * s`` (set by ``longgen.extend.apply_rope_extension(method="pi")``)."""
        is_i2v = type(pipe).__name__ in _IMAGE_TO_VIDEO_PIPELINES
        self.supports_image_condition = is_i2v
        self.requires_image_condition = is_i2v
        self.pixel_rope_coords: bool = type(pipe).__name__ in _PIXEL_COORD_PIPELINES
        """True: RoPE coordinates as ``LTXConditionPipeline`` builds them (``video_coords``); False: as
        ``LTXPipeline`` / ``LTXImageToVideoPipeline`` (latent grid and ``rope_interpolation_scale``)."""
        self.decode_timestep: float = 0.0
        """VAE decode timestep (``LTXPipeline(decode_timestep=0.0)``; LTX-Video 0.9.1+ suggests 0.05)."""
        self.decode_noise_scale: float | None = None
        """Noise mixed into latents before a timestep-conditioned decode; None means ``decode_timestep``."""

    # --- construction -------------------------------------------------------------------------
    # Over ~80 lines on purpose: one flat literal config per tiny component, read top to bottom.
    @classmethod
    def tiny_pipeline(cls, seed: int = 0, image_to_video: bool = False):
        """A tiny random ``LTXPipeline`` (``LTXImageToVideoPipeline`` with ``image_to_video``): 1-layer DiT,
        8-channel VAE with LTX's 8x / 32x strides, tiny T5 (the same weights either way)."""
        from diffusers import (
            AutoencoderKLLTXVideo,
            FlowMatchEulerDiscreteScheduler,
            LTXImageToVideoPipeline,
            LTXPipeline,
            LTXVideoTransformer3DModel,
        )
        from transformers import T5Config, T5EncoderModel

        from .tiny import tiny_tokenizer

        latent_channels, text_dim = 8, 32
        torch.manual_seed(seed)
        transformer = LTXVideoTransformer3DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=1,
            caption_channels=text_dim,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLLTXVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            # Three spatio-temporal halvings after a 4x4 patch: 8x in time, 32x in space, as LTX-Video.
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False),
            patch_size=4,
            patch_size_t=1,
            timestep_conditioning=True,
            encoder_causal=True,
            decoder_causal=False,
        )
        # Non-trivial latent statistics so normalisation is exercised.
        gen = torch.Generator().manual_seed(seed + 2)
        vae.latents_mean.copy_(0.1 * torch.randn(latent_channels, generator=gen))
        vae.latents_std.copy_(1.0 + 0.1 * torch.rand(latent_channels, generator=gen))
        torch.manual_seed(seed + 3)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=64,
                d_model=text_dim,
                d_kv=8,
                d_ff=37,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
        # LTX-Video's scheduler settings: resolution-dependent exponential shift, terminal sigma 0.1.
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=True,
            base_shift=0.95,
            max_shift=2.05,
            base_image_seq_len=1024,
            max_image_seq_len=4096,
            shift_terminal=0.1,
        )
        return (LTXImageToVideoPipeline if image_to_video else LTXPipeline)(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tiny_tokenizer(model_max_length=32, vocab_size=64),
            transformer=transformer,
        )

    # --- noise levels -------------------------------------------------------------------------
    def sigmas(
        self, num_steps: int, shift: float | None = None, video_size: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        """LTX's descending flow sigmas ``[num_steps + 1]`` ending at 0, from the pipeline's own scheduler.

        ``LTXPipeline``: ``linspace(1, 1/N, N)`` through the scheduler's ``set_timesteps`` with
        ``mu = calculate_shift(latent_frames * latent_h * latent_w)`` when the scheduler shifts
        dynamically (then ``shift_terminal`` stretches the tail). The sequence length is that of
        ``video_size`` (pixel ``(num_frames, height, width)``), by default the native clip, which is the
        window long samplers feed the model. An explicit ``shift`` replaces the resolution-dependent one:
        ``mu = log(shift)`` (exponential shifting is then exactly SD3's shift), or the scheduler's fixed
        ``shift`` for a non-dynamic scheduler; the terminal stretch still applies.
        ``LTXConditionPipeline``: its linear-quadratic schedule (SD3-shifted by ``shift`` if given).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None:
            return super().sigmas(num_steps, shift)
        if self.pixel_rope_coords:
            from diffusers.pipelines.ltx.pipeline_ltx_condition import linear_quadratic_schedule

            base = linear_quadratic_schedule(num_steps).to(torch.float64)
            if shift is not None:
                base = shift_sigma(base, shift)
            return torch.cat([base, base.new_zeros(1)]).float()

        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        # A private copy, so the pipeline's own scheduler state is untouched.
        scheduler = type(scheduler).from_config(scheduler.config)
        cfg = scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            if shift is not None:
                exponential = cfg.get("time_shift_type", "exponential") == "exponential"
                mu = math.log(shift) if exponential else float(shift)
            else:
                num_frames, height, width = video_size or self.native_video_size
                _, _, f, h, w = self.latent_shape(num_frames, height, width)
                mu = calculate_shift(
                    f * h * w,
                    cfg.get("base_image_seq_len", 256),
                    cfg.get("max_image_seq_len", 4096),
                    cfg.get("base_shift", 0.5),
                    cfg.get("max_shift", 1.15),
                )
        elif shift is not None:
            scheduler = type(scheduler).from_config(cfg, shift=shift)
        if num_steps == 1 and cfg.get("shift_terminal"):
            # the terminal stretch divides by (1 - last sigma) = 0 for one step: NaN (the stock pipeline fails too)
            raise ValueError(f"this LTX scheduler (shift_terminal={cfg['shift_terminal']}) needs at least 2 steps (--steps 2)")
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    # --- the contract -------------------------------------------------------------------------
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
        """T5 prompt embeddings and attention masks via ``LTXPipeline.encode_prompt`` (negative "" by default).

        Returns conds ``{"prompt_embeds": [B, L, D], "prompt_attention_mask": [B, L]}``. An
        ``LTXImageToVideoPipeline`` also needs ``image``: its VAE latents (:data:`IMAGE_LATENTS`) are pinned as
        the first latent frame of the clip of ``num_frames`` x ``height`` x ``width`` (default: native).
        """
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        max_len = min(
            self.max_sequence_length, int(getattr(tokenizer, "model_max_length", self.max_sequence_length))
        )
        embeds, mask, neg_embeds, neg_mask = self.pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            num_videos_per_prompt=1,
            max_sequence_length=max_len,
            device=self.device,
            dtype=self.dtype,
        )
        cond: Cond = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        uncond = (
            {"prompt_embeds": neg_embeds, "prompt_attention_mask": neg_mask}
            if do_classifier_free_guidance
            else None
        )
        image_cond = self._image_condition(image, len(prompt), num_frames, height, width)
        cond.update(image_cond)
        if uncond is not None:
            uncond.update(image_cond)
        return cond, uncond

    @torch.no_grad()
    def _image_condition(self, image, batch_size: int, num_frames, height, width) -> Cond:
        """``LTXImageToVideoPipeline.prepare_latents``' first frame: the image's normalised VAE latents (the
        distribution's mode: deterministic; the stock pipeline samples it with the generator)."""
        name = type(self.pipe).__name__
        if image is None:
            if self.requires_image_condition:
                raise ValueError(f"{name} is an image-to-video pipeline: pass image=<PIL image> (--image)")
            return {}
        if not self.supports_image_condition:
            raise ValueError(
                f"{name} takes no image: load an LTXImageToVideoPipeline folder (e.g. "
                "`longgen make-tiny --family ltx --i2v`, or a diffusers LTX I2V export) or drop --image"
            )
        native_frames, native_h, native_w = self.native_video_size
        height, width = height or native_h, width or native_w
        pixels = self.pipe.video_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(self.vae.device, self.vae.dtype).unsqueeze(2)  # (1, 3, 1, H, W)
        raw = self.vae.encode(pixels).latent_dist.mode().float()
        # prepare_latents normalises the image without the VAE's scaling_factor (its default 1.0)
        latents = self.pipe._normalize_latents(raw, self.vae.latents_mean, self.vae.latents_std)
        return {
            IMAGE_LATENTS: latents.repeat(batch_size, 1, 1, 1, 1),
            IMAGE_CLIP_FRAMES: self.num_latent_frames(num_frames or native_frames),
        }

    def _rope_kwargs(
        self, batch: int, grid: tuple[int, int, int], frame_rate: float, device
    ) -> dict[str, Any]:
        """RoPE inputs for a token grid ``(f, h, w)`` (post-patch), built as the stock pipelines build them."""
        f, h, w = grid
        pt, p, _ = self.patch_size
        tc, sc = self.temporal_compression, self.spatial_compression
        if not self.pixel_rope_coords:
            # LTXPipeline: latent grid index * (8 / frame_rate, 32, 32) inside the rotary module.
            return {
                "num_frames": f,
                "height": h,
                "width": w,
                "rope_interpolation_scale": (tc / frame_rate, sc, sc),
            }
        # LTXConditionPipeline: pixel coordinates of each token's first latent position, the time axis
        # shifted by the causal first frame (latent frame i covers pixel frames 8i-7 .. 8i), in seconds.
        idx = torch.meshgrid(
            torch.arange(0, f * pt, pt, device=device),
            torch.arange(0, h * p, p, device=device),
            torch.arange(0, w * p, p, device=device),
            indexing="ij",
        )
        coords = torch.stack(idx, dim=0).flatten(1).float()  # (3, f*h*w)
        coords = coords * torch.tensor([tc, sc, sc], device=device, dtype=torch.float32)[:, None]
        coords[0] = (coords[0] + 1 - tc).clamp(min=0) / frame_rate
        return {"video_coords": coords.unsqueeze(0).expand(batch, -1, -1)}  # (B, 3, seq)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W] -> [B, seq, C*p_t*p*p]``, tokens in (frame, row, column) order (``LTXPipeline._pack_latents``)."""
        pt, p, q = self.patch_size
        return rearrange(x, "b c (f pt) (h p) (w q) -> b (f h w) (c pt p q)", pt=pt, p=p, q=q)

    def unpack(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Inverse of :meth:`pack` for a post-patch token grid ``grid = (f, h, w)``."""
        pt, p, q = self.patch_size
        f, h, w = grid
        return rearrange(
            tokens, "b (f h w) (c pt p q) -> b c (f pt) (h p) (w q)", f=f, h=h, w=w, pt=pt, p=p, q=q
        )

    def window_cond(self, cond: Cond, frame_offset: int, num_latent_frames: int) -> Cond:
        """Image-to-video on a window: the image is pinned as latent frame 0 of the clip, so only a window starting
        there pins it (as the first frame of a window of its length); other windows get no image."""
        if IMAGE_LATENTS not in cond or (frame_offset == 0 and cond[IMAGE_CLIP_FRAMES] == num_latent_frames):
            return cond
        if frame_offset == 0:
            return {**cond, IMAGE_CLIP_FRAMES: num_latent_frames}
        return {k: v for k, v in cond.items() if k not in (IMAGE_LATENTS, IMAGE_CLIP_FRAMES)}

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 for latents ``x`` ``[B, C, F, H, W]`` at per-frame flow sigmas ``[B, F]``, via per-token timesteps."""
        self.check_denoise_inputs(x, sigma)
        if IMAGE_LATENTS in cond:
            x, sigma = self._pin_first_frame(x, sigma, cond)
        batch, _, num_latent_frames, height, width = x.shape
        pt, p, _ = self.patch_size
        if num_latent_frames % pt or height % p or width % p:
            raise ValueError(
                f"latent size {num_latent_frames}x{height}x{width} is not divisible by the transformer patch "
                f"{self.patch_size}; pick pixel sizes with adapter.latent_shape()"
            )
        grid = (num_latent_frames // pt, height // p, width // p)
        token_sigma = sigma.float().reshape(batch, grid[0], pt)
        if pt > 1 and not torch.all(token_sigma == token_sigma[..., :1]):
            raise ValueError(f"frames inside one temporal patch of {pt} latent frames must share a sigma")
        # (B, f) -> (B, f*h*w): one timestep per token, the scheduler's sigma * num_train_timesteps.
        timestep = per_frame_to_tokens(token_sigma[..., 0] * 1000.0, grid[1] * grid[2])
        # PI divides the temporal coordinates (frame index / frame_rate) by temporal_position_scale.
        frame_rate = float(cond.get("frame_rate") or self.frame_rate) * self.temporal_position_scale
        model = self.model
        velocity = model(
            hidden_states=self.pack(x).to(self.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(self.dtype),
            timestep=timestep,
            encoder_attention_mask=cond["prompt_attention_mask"],
            attention_kwargs=cond.get("attention_kwargs"),
            return_dict=False,
            **self._rope_kwargs(batch, grid, float(frame_rate), x.device),
        )[0]
        velocity = self.unpack(velocity.float(), grid)  # (B, C, F, H, W)
        return x.float() - sigma.float()[:, None, :, None, None] * velocity

    @staticmethod
    def _pin_first_frame(x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-video: latent frame 0 is the clean image (timestep 0), as ``LTXImageToVideoPipeline`` holds
        it (``timestep * (1 - conditioning_mask)``); its x0 is then the image itself."""
        if x.shape[2] != cond[IMAGE_CLIP_FRAMES]:
            raise ValueError(
                f"the image condition is the first frame of a {cond[IMAGE_CLIP_FRAMES]}-latent-frame clip but x has "
                f"{x.shape[2]} latent frames: LTX image-to-video conditions one whole clip, so use --sampler full "
                "(or windows as long as the clip)"
            )
        image = cond[IMAGE_LATENTS].to(x.device, x.dtype)
        if image.shape[0] != x.shape[0]:
            image = image.repeat_interleave(x.shape[0] // image.shape[0], dim=0)
        sigma = sigma.clone()
        sigma[:, 0] = 0.0
        return torch.cat([image, x[:, :, 1:]], dim=2), sigma

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> model latents, per channel (``LTXPipeline._normalize_latents``)."""
        return self.pipe._normalize_latents(
            latents, self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        )

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents -> raw VAE latents (``LTXPipeline._denormalize_latents``)."""
        return self.pipe._denormalize_latents(
            latents, self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        )

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, H, W, 3]`` in [0, 1] (T = 8k+1) -> normalised model latents ``[B, C, k+1, H/32, W/32]``."""
        self.num_latent_frames(frames.shape[1])
        pixels = rearrange(frames, "b t h w c -> b c t h w").to(self.vae.device, self.vae.dtype) * 2.0 - 1.0
        latents = self.vae.encode(pixels).latent_dist.mode()
        return self.normalize_latents(latents.float())

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode model latents ``[B, C, f, h, w]`` to frames ``[B, 8(f-1)+1, 32h, 32w, 3]`` in [0, 1].

        Follows ``LTXPipeline``: denormalise; a timestep-conditioned VAE (LTX-Video 0.9.1+) decodes at
        ``decode_timestep`` after mixing in ``decode_noise_scale`` of Gaussian noise.
        """
        vae = self.vae
        z = self.denormalize_latents(latents.float()).to(vae.dtype)
        timestep = None
        if vae.config.timestep_conditioning:
            batch = z.shape[0]
            noise_scale = self.decode_timestep if self.decode_noise_scale is None else self.decode_noise_scale
            timestep = torch.full((batch,), float(self.decode_timestep), device=z.device, dtype=z.dtype)
            if noise_scale:
                from diffusers.utils.torch_utils import randn_tensor

                noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = (1.0 - noise_scale) * z + noise_scale * noise
        video = vae.decode(z, timestep, return_dict=False)[0]  # (B, 3, T, H, W) in [-1, 1]
        return rearrange((video.float() / 2.0 + 0.5).clamp(0.0, 1.0), "b c t h w -> b t h w c")

    # --- what extensions and training need ----------------------------------------------------
    def rope_module(self) -> torch.nn.Module:
        """``LTXVideoRotaryPosEmbed``: fractional (frame, row, column) coordinates, scaled by ``frame_rate``."""
        return self.model.rope

    rope_extension_methods: ClassVar[tuple[str, ...]] = ("pi",)
    """LTX's RoPE takes fractional coordinates, not integer positions with a base: only positional
    interpolation applies, through the coordinate scale (:attr:`temporal_position_scale`)."""

    def set_temporal_position_scale(self, scale: float) -> None:
        """Positional interpolation: temporal RoPE coordinates divided by ``scale`` (1 is the stock model)."""
        if not scale > 0:
            raise ValueError(f"temporal position scale must be positive, got {scale}")
        self.temporal_position_scale = float(scale)

    def rope_axes(self) -> list[dict[str, Any]]:
        """Each RoPE axis (t, h, w) as rad per token step at the current ``frame_rate`` (float64).

        ``LTXVideoRotaryPosEmbed`` gives every axis ``dim // 6`` frequencies ``w_j = theta^(j / (n - 1))``
        (1 .. theta) on coordinates ``c`` in units of ``base_num_frames`` / ``base_height`` / ``base_width``,
        as the angle ``w_j * pi / 2 * (2c - 1)``; latent frame ``i`` has ``c = i * tc / frame_rate / base``,
        so one latent frame turns ``w_j * pi * tc / (frame_rate * base_num_frames)`` radians. Channel
        pairs are interleaved across the axes (t, h, w, t, h, w, ...) after ``dim % 6`` padding channels.
        """
        rope = self.rope_module()
        n = rope.dim // 6
        omega = (rope.theta ** torch.linspace(0.0, 1.0, n, dtype=torch.float64)) * math.pi  # d angle / d (2c)
        pt, p, _ = self.patch_size
        tc, sc = self.temporal_compression, self.spatial_compression
        frame_rate = self.frame_rate * self.temporal_position_scale
        steps = (
            ("t", tc * pt / frame_rate / rope.base_num_frames, "latent frame"),
            ("h", sc * p / rope.base_height, f"token row ({p} latent rows)"),
            ("w", sc * p / rope.base_width, f"token column ({p} latent columns)"),
        )
        return [
            {"axis": axis, "dim": 2 * n, "base": float(rope.theta), "frequencies": omega * step, "unit": unit}
            for axis, step, unit in steps
        ]

    def window_attention_spec(self) -> WindowAttentionSpec:
        """Every block's ``attn1`` over the packed video tokens (``b (f h w) c``), RoPE as ``image_rotary_emb``;
        the grid from the ``num_frames``/``height``/``width`` arguments (post-patch), else the distinct values of
        ``video_coords`` per axis."""
        return WindowAttentionSpec(layer_pattern=r"attn1$", token_grid=_ltx_token_grid)

    def temporal_attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Each block's ``attn1``: full spatio-temporal self-attention over all tokens (``attn2`` is text)."""
        return [(name, module) for name, module in self.model.named_modules() if name.endswith("attn1")]

    def context_parallel_plan(self) -> dict | None:
        """The stock ``_cp_plan`` plus a split of per-token ``timestep`` ``[B, seq]`` along the sequence.

        The stock plan shards ``hidden_states`` and the RoPE tables over the sequence but leaves
        ``timestep`` whole (``LTXPipeline`` passes one per sample); per-frame noise levels make it
        ``[B, seq]``, which must be sharded the same way (Wan's plan does this too).
        """
        plan = getattr(self.model, "_cp_plan", None)
        if plan is None:
            return None
        from diffusers.models._modeling_parallel import ContextParallelInput

        plan = dict(plan)
        plan[""] = {
            **plan.get("", {}),
            "timestep": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False),
        }
        return plan
