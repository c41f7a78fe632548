"""Stable Video Diffusion (Blattmann et al. 2023) image-to-video adapter: diffusers ``StableVideoDiffusionPipeline``.

SVD's ``UNetSpatioTemporalConditionModel`` is an EDM denoiser (Karras et al. 2022) trained with
v-prediction: for the EDM noise level ``s`` and ``x_edm = x0 + s * eps`` it sees
``c_in * x_edm`` and ``c_noise = 0.25 * ln(s)`` and its output ``F`` gives
``x0 = c_skip * x_edm + c_out * F`` (``c_skip = 1 / (s^2 + 1)``, ``c_out = -s / sqrt(s^2 + 1)``,
``c_in = 1 / sqrt(s^2 + 1)``), exactly what diffusers' ``EulerDiscreteScheduler`` does with
``prediction_type="v_prediction"`` and ``timestep_type="continuous"``. In longgen's flow convention
``s = sigma / (1 - sigma)`` and ``x_edm = x / (1 - sigma)`` (:mod:`longgen.schedules`).

Conditioning follows the pipeline: the CLIP image embedding of the conditioning image is the UNet's
``encoder_hidden_states``; its VAE latent (after noise augmentation) is concatenated on channels to
every frame; ``added_time_ids`` carry (fps - 1, motion bucket, noise augmentation strength). The
unconditional branch of classifier-free guidance zeroes the embedding and the image latent.

The stock UNet takes one timestep per sample and repeats its embedding over the frames it folds into
the batch (``emb.repeat_interleave(num_frames, dim=0)``). Per-frame noise levels (diffusion forcing,
FIFO, ...) are supplied by a removable diffusers hook (:func:`apply_svd_per_frame_timesteps`) that
computes one embedding per (sample, frame) with the UNet's own ``time_proj``/``time_embedding`` and
hands it, in the same ``b * F + f`` order, to the down, mid and up blocks. It is inert unless the
adapter sets per-frame timesteps, so uniform noise levels run the stock model bit for bit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils.weak import WeakIdKeyDictionary

from ..schedules import edm_sigma_to_flow, flow_sigma_to_edm, shift_sigma
from .base import BackboneAdapter, Cond, encode_per_frame
from .capabilities import ExVideoSites, FrameAttention, ImageConditioning

if TYPE_CHECKING:
    from ..extend.exvideo import ExVideoSite

logger = logging.getLogger(__name__)

_PER_FRAME_TIMESTEP_HOOK = "longgen_svd_per_frame_timesteps"
_IMAGE_REQUIRED = (
    "SVD is image-to-video: pass --image PATH (or image=PIL.Image / a [B, 3, H, W] tensor in [0, 1] to "
    "encode_prompt); it has no text encoder."
)


# ------------------------------------------------------------------------------------------------
# per-frame timestep embeddings as a removable hook
# ------------------------------------------------------------------------------------------------
@dataclass
class SVDFrameTimestepState:
    """Shared state of the per-frame timestep hooks of one UNet.

    ``timesteps`` ``[B, F]`` (the UNet's ``c_noise`` per frame) switches the hooks on; ``None`` leaves the
    UNet stock. ``emb`` ``[B * F, C]`` is the per-frame embedding of the current forward pass.
    """

    timesteps: torch.Tensor | None = None
    emb: torch.Tensor | None = None
    replacements: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    """Stock ``temb`` -> its per-frame embedding, keyed by tensor identity: a block re-run by activation
    checkpointing (after ``emb`` was cleared) gets the same embedding as its first run."""


class _FrameEmbeddingSource(ModelHook):
    """On ``unet.add_embedding``: builds the per-frame embedding from the stock pieces each forward.

    The stock forward computes ``emb = time_embedding(time_proj(t)) + add_embedding(...)`` per sample and
    repeats it over frames. Given ``timesteps[B, F]`` this hook computes the same sum per (sample, frame),
    reusing the sample's ``aug_emb`` (the output it observes), rows ordered ``b * F + f`` as
    ``repeat_interleave`` orders them.
    """

    def __init__(
        self, state: SVDFrameTimestepState, time_proj: torch.nn.Module, time_embedding: torch.nn.Module
    ):
        super().__init__()
        self.state = state
        # plain references (not submodules): the hook must not own the UNet's modules
        self._time_proj = [time_proj]
        self._time_embedding = [time_embedding]

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.timesteps is None:
            state.emb = None
            return output
        batch_size, num_frames = state.timesteps.shape
        if output.shape[0] != batch_size:
            raise RuntimeError(
                f"per-frame timesteps are set for batch {batch_size} but the UNet runs batch {output.shape[0]}; "
                "set them through SVDAdapter.denoise (or clear state.timesteps before calling the UNet)"
            )
        t_emb = self._time_proj[0](state.timesteps.reshape(-1).to(output.device))  # [B * F, C0]
        # the stock forward casts t_emb to the sample dtype, which is the embedding's dtype here
        frame_emb = self._time_embedding[0](t_emb.to(dtype=output.dtype))  # [B * F, C]
        state.emb = frame_emb + output.repeat_interleave(num_frames, dim=0)  # [B * F, C], b-major
        return output


class _FrameEmbeddingSink(ModelHook):
    """On each down / mid / up block: replaces the repeated ``temb`` by the per-frame embedding."""

    def __init__(self, state: SVDFrameTimestepState):
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        temb = kwargs.get("temb")
        if temb is not None and temb in self.state.replacements:
            kwargs["temb"] = self.state.replacements[temb]
            return args, kwargs
        emb = self.state.emb
        if emb is None:
            return args, kwargs
        if temb is None:
            raise RuntimeError(
                f"{type(module).__name__} was called without temb=...; cannot set per-frame embeddings"
            )
        if temb.shape != emb.shape:
            raise RuntimeError(
                f"per-frame embedding has shape {tuple(emb.shape)} but the UNet built temb {tuple(temb.shape)}: "
                "the per-frame timesteps must be [batch, num_frames] of the sample passed to the UNet"
            )
        emb = emb.to(temb.dtype)
        self.state.replacements[temb] = emb
        kwargs["temb"] = emb
        return args, kwargs


def _temb_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def apply_svd_per_frame_timesteps(unet: torch.nn.Module) -> SVDFrameTimestepState:
    """Install the per-frame timestep hooks on a ``UNetSpatioTemporalConditionModel`` (idempotent).

    Returns the shared state; set ``state.timesteps = c_noise[B, F]`` before a forward pass to give each
    frame its own noise-level embedding and ``None`` afterwards. Remove with
    :func:`remove_svd_per_frame_timesteps`.
    """
    existing = HookRegistry.check_if_exists_or_initialize(unet.add_embedding).get_hook(
        _PER_FRAME_TIMESTEP_HOOK
    )
    if existing is not None:
        return existing.state
    state = SVDFrameTimestepState()
    source = _FrameEmbeddingSource(state, unet.time_proj, unet.time_embedding)
    HookRegistry.check_if_exists_or_initialize(unet.add_embedding).register_hook(
        source, _PER_FRAME_TIMESTEP_HOOK
    )
    for block in _temb_blocks(unet):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.register_hook(_FrameEmbeddingSink(state), _PER_FRAME_TIMESTEP_HOOK)
    return state


def remove_svd_per_frame_timesteps(unet: torch.nn.Module) -> None:
    """Remove the hooks of :func:`apply_svd_per_frame_timesteps`; the UNet is stock again."""
    for module in [unet.add_embedding, *_temb_blocks(unet)]:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(_PER_FRAME_TIMESTEP_HOOK, recurse=False)


def has_svd_per_frame_timesteps(unet: torch.nn.Module) -> bool:
    registry = getattr(unet.add_embedding, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(_PER_FRAME_TIMESTEP_HOOK) is not None


# ------------------------------------------------------------------------------------------------
# the adapter
# ------------------------------------------------------------------------------------------------
class SVDAdapter(BackboneAdapter, FrameAttention, ExVideoSites, ImageConditioning):
    """Stable Video Diffusion / SVD-XT (image-to-video, EDM v-prediction UNet, per-frame image VAE).

    Conditioning knobs of the pipeline are attributes (``fps``, ``motion_bucket_id``,
    ``noise_aug_strength``, ``min_guidance_scale``, ``decode_chunk_size``) and keyword arguments of
    :meth:`encode_prompt`. SVD's guidance grows linearly over the clip from ``min_guidance_scale`` on the
    first frame to the guidance scale on the last (:meth:`guidance_scale_per_frame`);
    ``default_guidance_scale`` is that maximum.
    """

    family: ClassVar[str] = "svd"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableVideoDiffusionPipeline",)
    model_attr: ClassVar[str] = "unet"
    temporal_compression: ClassVar[int] = 1
    spatial_compression: ClassVar[int] = 8
    causal_vae: ClassVar[bool] = False
    patch_size: ClassVar[tuple[int, int, int]] = (1, 1, 1)
    prediction: ClassVar[str] = "edm_v"
    native_per_frame_timesteps: ClassVar[bool] = False
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_num_steps: ClassVar[int] = 25
    default_guidance_scale: ClassVar[float] = 3.0
    default_height: ClassVar[int] = 576
    default_width: ClassVar[int] = 1024
    default_num_frames: ClassVar[int] = 14
    """14 for SVD, 25 for SVD-XT: an instance reads it from ``unet.config.num_frames``."""
    tiny_video_size: ClassVar[tuple[int, int, int]] = (4, 32, 32)
    supports_image_condition: ClassVar[bool] = True
    requires_image_condition: ClassVar[bool] = True

    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    decode_chunk_size: int | None = None
    """Frames per temporal-decoder call in :meth:`decode`; None decodes all given frames at once."""

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None):
        unet = getattr(pipe, self.model_attr, None)
        num_frames = getattr(getattr(unet, "config", None), "num_frames", None)
        if num_frames:
            # SVD and SVD-XT share the class; the UNet config knows its clip length (14 or 25)
            self.default_num_frames = int(num_frames)
        super().__init__(pipe, native_video_size=native_video_size)
        from diffusers import EulerDiscreteScheduler

        # the sampling schedule comes from SVD's own scheduler config, whatever scheduler the folder holds
        self._scheduler_config = dict(pipe.scheduler.config)
        prediction_type = self._scheduler_config.get("prediction_type", "v_prediction")
        if prediction_type != "v_prediction":
            logger.warning(
                "the folder's scheduler says prediction_type=%r; SVD UNets predict v and longgen treats them so",
                prediction_type,
            )
        sched = EulerDiscreteScheduler.from_config(self._scheduler_config)
        ac = sched.alphas_cumprod.double()
        train_s = ((1 - ac) / ac).sqrt()
        s_min = self._scheduler_config.get("sigma_min")
        s_max = self._scheduler_config.get("sigma_max")
        self.edm_sigma_min = float(s_min) if s_min is not None else float(train_s.min())
        self.edm_sigma_max = float(s_max) if s_max is not None else float(train_s.max())
        self.force_per_frame_timesteps = False
        """Route every denoise call through the per-frame hook, even with uniform noise levels (tests)."""
        self._frame_state = apply_svd_per_frame_timesteps(self.model)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny random ``StableVideoDiffusionPipeline`` (32x32 pixels, 4x4 latents); no downloads.

        The scheduler is configured as SVD ships it (EDM Karras sigmas in [0.002, 700], v-prediction,
        continuous timesteps); the VAE has four blocks so its spatial stride is 8 like the real one.
        """
        from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
        from transformers import CLIPImageProcessor

        num_frames, height, width = cls.tiny_video_size
        with torch.random.fork_rng(devices=[]):  # seeded construction without touching the global RNG
            torch.manual_seed(seed)
            unet, vae, image_encoder = cls._tiny_models(num_frames, height, seed)
        feature_extractor = CLIPImageProcessor(crop_size=32, size=32)
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            interpolation_type="linear",
            num_train_timesteps=1000,
            prediction_type="v_prediction",
            sigma_max=700.0,
            sigma_min=0.002,
            steps_offset=1,
            timestep_spacing="leading",
            timestep_type="continuous",
            trained_betas=None,
            use_karras_sigmas=True,
        )
        return StableVideoDiffusionPipeline(
            vae=vae.eval(),
            image_encoder=image_encoder.eval(),
            unet=unet.eval(),
            scheduler=scheduler,
            feature_extractor=feature_extractor,
        )

    @staticmethod
    def _tiny_models(num_frames: int, height: int, seed: int):
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        unet = UNetSpatioTemporalConditionModel(
            sample_size=height // 8,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64),
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,  # 3 added time ids x addition_time_embed_dim
            layers_per_block=1,
            cross_attention_dim=32,
            num_attention_heads=(2, 4),
            num_frames=num_frames,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(32, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            sample_size=height,
        )
        torch.manual_seed(seed + 2)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                image_size=32,
                patch_size=8,
            )
        )
        return unet, vae, image_encoder

    # --- shapes -------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        # the UNet's in_channels also count the concatenated image latent
        return int(self.model.config.out_channels)

    # --- noise levels -------------------------------------------------------------------------
    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """SVD's Karras sigmas from its ``EulerDiscreteScheduler`` as flow sigmas ``[num_steps + 1]``, ending at 0.

        ``shift`` (SD3 timestep shift, applied in flow sigmas) is off by default; SVD was not trained
        with it.
        """
        from diffusers import EulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sched = EulerDiscreteScheduler.from_config(self._scheduler_config)
        sched.set_timesteps(num_steps)
        flow = edm_sigma_to_flow(sched.sigmas.double())
        if shift is not None and shift != 1.0:
            flow = shift_sigma(flow, shift)
        flow[-1] = 0.0
        return flow.float()

    def edm_coefficients(self, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
        """EDM preconditioning (Karras et al. 2022, Table 1, v-prediction form) at flow sigmas.

        Returns float64 tensors shaped like ``sigma``: ``s`` (EDM level, clamped to the scheduler's
        [sigma_min, sigma_max]), ``x_scale`` (x_edm = x_scale * x), ``c_in``, ``c_noise``, ``c_skip``,
        ``c_out``. Clean frames (sigma == 0) are seen at the smallest trained level.
        """
        sigma = sigma.double()
        s = flow_sigma_to_edm(sigma).clamp(self.edm_sigma_min, self.edm_sigma_max)
        # x / (1 - sigma) blows up at sigma = 1: beyond sigma_max the sample is treated as at sigma_max
        sigma_top = float(edm_sigma_to_flow(torch.tensor(self.edm_sigma_max, dtype=torch.float64)))
        x_scale = 1.0 / (1.0 - sigma.clamp(max=sigma_top))
        var = s * s + 1.0
        return {
            "s": s,
            "x_scale": x_scale,
            "c_in": var.rsqrt(),
            "c_noise": 0.25 * s.log(),
            "c_skip": 1.0 / var,
            "c_out": -s * var.rsqrt(),
        }

    def guidance_scale_per_frame(
        self,
        num_frames: int,
        max_guidance_scale: float | None = None,
        min_guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """SVD's per-frame guidance ``[num_frames]``: linear from ``min_guidance_scale`` to the maximum.

        As in diffusers' ``StableVideoDiffusionPipeline`` (``torch.linspace(min, max, num_frames)``);
        broadcast it as ``[1, 1, F, 1, 1]`` against x0 ``[B, C, F, H, W]``.
        """
        lo = self.min_guidance_scale if min_guidance_scale is None else min_guidance_scale
        hi = self.default_guidance_scale if max_guidance_scale is None else max_guidance_scale
        return torch.linspace(lo, hi, num_frames)

    # --- the contract -------------------------------------------------------------------------
    def _image_tensor(self, image) -> tuple[Any, torch.Tensor]:
        """``(image as the pipeline takes it, [B, 3, H, W] float in [0, 1])``; paths are opened with PIL."""
        import PIL.Image

        if isinstance(image, (str, os.PathLike)):
            image = PIL.Image.open(image).convert("RGB")
        elif isinstance(image, (list, tuple)) and image and isinstance(image[0], (str, os.PathLike)):
            image = [PIL.Image.open(p).convert("RGB") for p in image]
        processor = self.pipe.video_processor
        if isinstance(image, torch.Tensor):
            pixels = image[None] if image.ndim == 3 else image
            if pixels.ndim != 4 or pixels.shape[1] != 3:
                raise ValueError(
                    f"image tensors must be [3, H, W] or [B, 3, H, W] in [0, 1], got {tuple(image.shape)}"
                )
            if pixels.min() < 0 or pixels.max() > 1:
                raise ValueError("image tensors must hold values in [0, 1] (longgen's pixel convention)")
            return pixels, pixels.float()
        if isinstance(image, PIL.Image.Image) or (
            isinstance(image, list) and isinstance(image[0], PIL.Image.Image)
        ):
            return image, processor.numpy_to_pt(processor.pil_to_numpy(image))
        raise TypeError(
            f"image must be a PIL image, a list of them, a path or a tensor; got {type(image).__name__}"
        )

    def _clip_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings ``[B, 1, D]`` as the pipeline's ``_encode_image`` computes them.

        The pipeline resizes PIL images to 224 (the CLIP input size of the real encoder) with
        anti-aliasing in [-1, 1]; here the size is the encoder's own ``image_size``, so tiny encoders
        work too. Tensors already at that size are used as they are, as in the pipeline.
        """
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        encoder = self.pipe.image_encoder
        size = int(encoder.config.image_size)
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = (_resize_with_antialiasing(pixels * 2.0 - 1.0, (size, size)) + 1.0) / 2.0
        inputs = self.pipe.feature_extractor(
            images=pixels,
            do_normalize=True,
            do_center_crop=False,
            do_resize=False,
            do_rescale=False,
            return_tensors="pt",
        ).pixel_values
        param = next(encoder.parameters())
        embeds = encoder(inputs.to(device=param.device, dtype=param.dtype)).image_embeds
        return embeds.unsqueeze(1)  # [B, 1, D]

    # Over ~80 lines: it mirrors StableVideoDiffusionPipeline's conditioning steps in order, so it can be
    # compared with diffusers line by line (splitting it was left for a later pass).
    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: list[str],
        negative_prompt: list[str] | None = None,
        image=None,
        do_classifier_free_guidance: bool = True,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        *,
        fps: int | None = None,
        motion_bucket_id: int | None = None,
        noise_aug_strength: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Cond, Cond | None]:
        """Encode the conditioning image as ``StableVideoDiffusionPipeline`` does; text is ignored.

        ``image``: a PIL image (or a list), a path, or a ``[B, 3, H, W]`` / ``[3, H, W]`` tensor in [0, 1].
        The batch is ``len(prompt)`` when prompts are given (one image is repeated), else the number of
        images. ``num_frames`` is not needed: the image latent is repeated over whatever frames
        :meth:`denoise` gets. ``generator`` draws the noise augmentation of the image (default: seed 0,
        so encoding is reproducible).

        Cond keys: ``encoder_hidden_states`` ``[B, 1, D]`` (CLIP image embedding), ``image_latents``
        ``[B, C, h, w]`` (unscaled VAE latent of the noise-augmented image, as the pipeline uses it),
        ``added_time_ids`` ``[B, 3]``. The uncond zeroes the embedding and the latent.
        """
        if image is None:
            raise ValueError(_IMAGE_REQUIRED)
        prompts = list(prompt or [])
        if any(p for p in prompts) or any(p for p in (negative_prompt or [])):
            logger.warning("SVD has no text encoder: the prompt and negative prompt are ignored")
        height = height or self.default_height
        width = width or self.default_width
        fps = self.fps if fps is None else fps
        motion_bucket_id = self.motion_bucket_id if motion_bucket_id is None else motion_bucket_id
        noise_aug_strength = self.noise_aug_strength if noise_aug_strength is None else noise_aug_strength
        mult = self.spatial_compression
        if height % mult or width % mult:
            raise ValueError(f"SVD needs height and width divisible by {mult}; got {height}x{width}")

        pipe_image, pixels = self._image_tensor(image)
        num_images = pixels.shape[0]
        batch_size = len(prompts) if prompts else num_images
        if num_images not in (1, batch_size):
            raise ValueError(
                f"got {num_images} images for {batch_size} prompts; pass one image or one per prompt"
            )

        device = self.device
        embeds = self._clip_embeddings(pixels).to(device)  # [n, 1, D]

        # VAE branch: resize to the video size, noise-augment, encode (pipeline steps 4-5)
        vae_in = self.pipe.video_processor.preprocess(pipe_image, height=height, width=width).to(
            device
        )  # [n, 3, H, W]
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(0)
        noise = torch.randn(vae_in.shape, generator=generator, dtype=vae_in.dtype).to(device)
        vae_in = vae_in + noise_aug_strength * noise
        vae = self.pipe.vae
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            vae.to(dtype=torch.float32)
        try:
            image_latents = self.pipe._encode_vae_image(vae_in, device, 1, False)  # [n, C, h, w]
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)
        image_latents = image_latents.to(embeds.dtype)

        # fps - 1: SVD was micro-conditioned on fps - 1 (as the pipeline notes)
        added_time_ids = self.pipe._get_add_time_ids(
            fps - 1, motion_bucket_id, noise_aug_strength, embeds.dtype, 1, 1, False
        ).to(device)  # [1, 3]

        if num_images != batch_size:
            embeds = embeds.expand(batch_size, -1, -1)
            image_latents = image_latents.expand(batch_size, -1, -1, -1)
        cond: Cond = {
            "encoder_hidden_states": embeds.contiguous(),
            "image_latents": image_latents.contiguous(),
            "added_time_ids": added_time_ids.expand(batch_size, -1).contiguous(),
        }
        if not do_classifier_free_guidance:
            return cond, None
        uncond: Cond = {
            "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
            "image_latents": torch.zeros_like(cond["image_latents"]),
            "added_time_ids": cond["added_time_ids"].clone(),
        }
        return cond, uncond

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 for ``x`` ``[B, C, F, H, W]`` at per-frame flow sigmas ``[B, F]`` (EDM v-prediction)."""
        self.check_denoise_inputs(x, sigma)
        batch_size, _, num_frames, h, w = x.shape
        image_latents = cond["image_latents"]
        if image_latents.shape[0] != batch_size or tuple(image_latents.shape[-2:]) != (h, w):
            raise ValueError(
                f"cond image latents are {tuple(image_latents.shape)} but x is {tuple(x.shape)}: encode the image "
                "with the same height/width and batch as the latents"
            )
        device, dtype = self.device, self.dtype
        coef = {
            k: v.to(device=device, dtype=torch.float32)
            for k, v in self.edm_coefficients(sigma.to(device)).items()
        }

        def per_frame(c: torch.Tensor) -> torch.Tensor:
            return c[:, None, :, None, None]  # [B, 1, F, 1, 1]

        x_edm = x.to(device=device, dtype=torch.float32) * per_frame(coef["x_scale"])
        model_in = (x_edm * per_frame(coef["c_in"])).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
        cond_in = image_latents.to(device)[:, None].expand(-1, num_frames, -1, -1, -1)  # [B, F, C, H, W]
        sample = torch.cat([model_in, cond_in.to(model_in.dtype)], dim=2).to(dtype)  # [B, F, 2C, H, W]

        c_noise = coef["c_noise"]
        per_frame_levels = self.force_per_frame_timesteps or not bool((c_noise == c_noise[:, :1]).all())
        if per_frame_levels and not has_svd_per_frame_timesteps(self.model):
            self._frame_state = apply_svd_per_frame_timesteps(self.model)
        if per_frame_levels:
            self._frame_state.timesteps = c_noise
        try:
            out = self.model(
                sample,
                c_noise[:, 0],  # per sample; replaced by the per-frame embeddings when those are set
                encoder_hidden_states=cond["encoder_hidden_states"].to(device=device, dtype=dtype),
                added_time_ids=cond["added_time_ids"].to(device=device, dtype=dtype),
                return_dict=False,
            )[0]
        finally:
            self._frame_state.timesteps = None
            self._frame_state.emb = None
        out = out.float().permute(0, 2, 1, 3, 4)  # [B, C, F, H, W]
        return per_frame(coef["c_skip"]) * x_edm + per_frame(coef["c_out"]) * out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, f, H, W, 3]`` in [0, 1] with the temporal decoder (``decode_chunk_size`` frames a call)."""
        vae = self.pipe.vae
        param = next(vae.parameters())
        num_frames = latents.shape[2]
        chunk = self.decode_chunk_size or num_frames
        videos = []
        for video in latents:  # [C, f, h, w]
            z = video.permute(1, 0, 2, 3).to(device=param.device, dtype=param.dtype)  # [f, C, h, w]
            z = z / vae.config.scaling_factor
            frames = [
                vae.decode(z[i : i + chunk], num_frames=z[i : i + chunk].shape[0]).sample
                for i in range(0, num_frames, chunk)
            ]
            videos.append(torch.cat(frames).permute(0, 2, 3, 1))  # [f, H, W, 3]
        return (torch.stack(videos).float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_video(
        self, frames: torch.Tensor, sample: bool = False, generator=None, encode_chunk_size: int = 16
    ) -> torch.Tensor:
        """Per-frame VAE encode: frames ``[B, T, H, W, 3]`` in [0, 1] -> latents ``[B, C, T, H/8, W/8]`` (float32).

        The posterior's mode (``sample=True`` draws from it with ``generator``) times ``scaling_factor``:
        the space the UNet denoises in, the inverse of :meth:`decode`. ``encode_chunk_size`` frames per call.
        """
        return encode_per_frame(self.vae, frames, sample, generator, encode_chunk_size)

    # --- what extensions and training need ----------------------------------------------------
    def temporal_attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Self-attention over frames (``attn1``) of every ``TemporalBasicTransformerBlock``.

        Their ``attn2`` attends to the image embedding, not across frames, so it is not listed.
        """
        from diffusers.models.attention import TemporalBasicTransformerBlock

        return [
            (f"{name}.attn1", module.attn1)
            for name, module in self.model.named_modules()
            if isinstance(module, TemporalBasicTransformerBlock)
        ]

    def temporal_position_embeddings(self) -> list[tuple[str, torch.nn.Module]]:
        """The learned temporal position embeddings: ``time_pos_embed`` of each ``TransformerSpatioTemporalModel``.

        Each is a ``TimestepEmbedding`` fed by its parent's sinusoidal ``time_proj`` of the frame indices
        ``arange(F)`` repeated over the batch (rows ``b * F + f``); its output is added to the hidden
        states before the temporal blocks. ExVideo (Duan et al. 2024) replaces this table for longer clips.
        """
        from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

        return [
            (f"{name}.time_pos_embed", module.time_pos_embed)
            for name, module in self.model.named_modules()
            if isinstance(module, TransformerSpatioTemporalModel)
        ]

    def exvideo_sites(self) -> list[ExVideoSite]:
        """Where ExVideo (Duan et al. 2024) extends SVD: each ``TransformerSpatioTemporalModel``.

        Its ``time_proj`` turns the frame ids ``arange(F)`` (repeated over the batch) into sinusoids that
        ``time_pos_embed`` projects and adds before every temporal block; ExVideo's trainable table replaces those
        sinusoids (DiffSynth's ``TrainableTemporalTimesteps``) and its Conv3d runs on each temporal block's input
        ``[B*F, H*W, C]``. Post-tuned with them: ``time_pos_embed`` and the temporal transformer blocks (DiffSynth's
        ``TemporalAttentionBlock``); the spatial blocks and the time mixer stay frozen.
        """
        from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

        from ..extend.exvideo import ExVideoSite

        return [
            ExVideoSite(
                name=name,
                transformer=module,
                position=module.time_proj,
                position_kind="ids",
                conv_blocks=tuple(module.temporal_transformer_blocks),
                trainable=(module.time_pos_embed, *module.temporal_transformer_blocks),
            )
            for name, module in self.model.named_modules()
            if isinstance(module, TransformerSpatioTemporalModel)
        ]

    def remove_per_frame_hook(self) -> None:
        """Detach the per-frame timestep hooks (the next per-frame denoise call installs them again)."""
        remove_svd_per_frame_timesteps(self.model)
