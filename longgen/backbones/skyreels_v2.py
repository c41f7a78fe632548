"""SkyReels-V2 (SkyReels Team 2025, "SkyReels-V2: Infinite-length Film Generative Model") adapter.

SkyReels-V2 is Wan 2.1 fine-tuned (same VAE, UMT5 text encoder, flow objective, 3D RoPE DiT); its
diffusion-forcing (DF) checkpoints are trained with an independent noise level per latent frame
(Chen et al. 2024, "Diffusion Forcing"). The stock ``SkyReelsV2Transformer3DModel`` takes those levels
natively: ``timestep`` of shape ``(B, F)`` together with ``enable_diffusion_forcing=True`` (what
``SkyReelsV2DiffusionForcingPipeline`` passes), so this adapter only changes how the timestep enters;
prompt encoding, latents normalisation, decoding and the flow parameterisation are Wan's
(:class:`~longgen.backbones.wan.WanAdapter`).

Two model settings matter for per-frame sampling:

* ``num_frame_per_block`` (the DF pipeline's ``causal_block_size``): > 1 makes self-attention
  block-causal over latent frames; the frame count must then be a multiple of it
  (:meth:`SkyReelsV2Adapter.set_causal_block_size`).
* ``inject_sample_info``: adds an fps embedding (index 0 for 16 fps, 1 otherwise, as the pipelines do);
  :attr:`SkyReelsV2Adapter.fps` sets it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .capabilities import CausalBlockMask
from .wan import WanAdapter, _tiny_clip_vision, _tiny_transformer, _tiny_umt5, _tiny_wan_vae


class SkyReelsV2Adapter(WanAdapter, CausalBlockMask):
    """Backbone adapter of SkyReels-V2 (diffusion forcing T2V and V2V, plain T2V and I2V)."""

    family: ClassVar[str] = "skyreels_v2"
    pipeline_class_names: ClassVar[tuple[str, ...]] = (
        "SkyReelsV2DiffusionForcingPipeline",
        "SkyReelsV2Pipeline",
        "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
        "SkyReelsV2ImageToVideoPipeline",
    )
    image_to_video_pipeline_class_names: ClassVar[tuple[str, ...]] = ("SkyReelsV2ImageToVideoPipeline",)
    default_num_steps: ClassVar[int] = 30
    default_guidance_scale: ClassVar[float] = 6.0
    default_height: ClassVar[int] = 544
    default_width: ClassVar[int] = 960
    default_num_frames: ClassVar[int] = 97
    tiny_video_size: ClassVar[tuple[int, int, int]] = (9, 32, 32)

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None):
        super().__init__(pipe, native_video_size)
        self.fps: int = 24
        """Frame rate told to models with ``inject_sample_info`` (the pipelines' ``fps`` argument)."""

    @classmethod
    def tiny_pipeline(cls, seed: int = 0, image_to_video: bool = False, diffusion_forcing: bool = True):
        """A tiny random ``SkyReelsV2DiffusionForcingPipeline`` (or the plain T2V / I2V pipeline).

        The transformer has ``inject_sample_info`` on, so the fps embedding path is exercised too.
        """
        import diffusers
        from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = _tiny_wan_vae()
            text_encoder, tokenizer = _tiny_umt5()
            z_dim = vae.config.z_dim
            components: dict[str, Any] = {}
            model_kwargs: dict[str, Any] = {"inject_sample_info": True}
            if image_to_video:
                image_encoder, image_processor = _tiny_clip_vision()
                components = {"image_encoder": image_encoder, "image_processor": image_processor}
                model_kwargs.update(in_channels=2 * z_dim + 4, image_dim=image_encoder.config.hidden_size)
            transformer = _tiny_transformer(SkyReelsV2Transformer3DModel, z_dim, **model_kwargs)
            # SkyReels-V2 ships UniPC in flow mode with shift 8 (its DF pipeline deep-copies it per frame).
            scheduler = UniPCMultistepScheduler(
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=8.0,
                num_train_timesteps=1000,
            )
            if image_to_video:
                name = "SkyReelsV2ImageToVideoPipeline"
            else:
                name = "SkyReelsV2DiffusionForcingPipeline" if diffusion_forcing else "SkyReelsV2Pipeline"
            return getattr(diffusers, name)(
                tokenizer=tokenizer,
                text_encoder=text_encoder,
                transformer=transformer,
                vae=vae,
                scheduler=scheduler,
                **components,
            )

    # --- diffusion-forcing settings -----------------------------------------------------------
    @property
    def causal_block_size(self) -> int:
        """Latent frames per causal attention block (1: full bidirectional attention)."""
        return int(self.model.config.num_frame_per_block)

    def set_causal_block_size(self, causal_block_size: int) -> None:
        """Block-causal attention over latent frames, as the DF pipeline's ``causal_block_size`` sets it."""
        if causal_block_size < 1:
            raise ValueError(f"causal_block_size must be >= 1, got {causal_block_size}")
        self.model._set_ar_attention(causal_block_size)

    @property
    def fps_index(self) -> int:
        """The fps embedding row the pipelines use: 0 for 16 fps, 1 for anything else (24 fps)."""
        return 0 if self.fps == 16 else 1

    # --- the model call -----------------------------------------------------------------------
    def _run_model(
        self,
        model: torch.nn.Module,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Stock forward: ``(B,)`` timesteps when each sample has one level, else ``(B, F)`` with
        ``enable_diffusion_forcing=True`` (per-frame time embeddings, the DF pipeline's call)."""
        num_latent_frames = hidden_states.shape[2]
        block = int(model.config.num_frame_per_block)
        if block > 1 and num_latent_frames % block:
            lower = num_latent_frames // block * block
            raise ValueError(
                f"block-causal attention needs a multiple of causal_block_size={block} latent frames; got "
                f"{num_latent_frames}. Use {lower or block} or {lower + block} latent frames, or "
                "set_causal_block_size(1)."
            )
        if model.config.inject_sample_info:
            # One fps entry for the whole batch: the stock DF path repeats the fps term F times along a
            # batch-major axis, which only broadcasts correctly when that axis has length 1.
            kwargs = {**kwargs, "fps": [self.fps_index]}
        per_frame = self.force_per_frame_timesteps or not bool((timestep == timestep[:, :1]).all())
        model_timestep = timestep if per_frame else timestep[:, 0]  # (B, F) or (B,)
        return model(
            hidden_states=hidden_states,
            timestep=model_timestep,
            enable_diffusion_forcing=per_frame,
            return_dict=False,
            **kwargs,
        )[0]

    # --- what extensions and training need ----------------------------------------------------
    def rope_module(self) -> torch.nn.Module | None:
        """``SkyReelsV2RotaryPosEmbed`` (Wan's t/h/w split)."""
        return self.model.rope


__all__ = ["SkyReelsV2Adapter"]
