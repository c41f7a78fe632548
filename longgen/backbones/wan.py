"""Wan 2.1 / 2.2 (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models") adapter.

Wraps diffusers' stock ``WanPipeline`` / ``WanImageToVideoPipeline`` / ``WanVideoToVideoPipeline`` and
their ``WanTransformer3DModel``. Wan is a rectified-flow model (it predicts the velocity
``v = eps - x0`` at timestep ``sigma * 1000``), so longgen's flow sigma is the model's own and
``x0 = x - sigma * v``. The stock transformer already accepts one timestep per token
(``timestep`` of shape ``(B, seq_len)``, the Wan 2.2 TI2V path), so per-frame noise levels need no hook:
each latent frame's level is repeated over that frame's tokens.

Latents in longgen are the transformer's space: the VAE latents normalised per channel with the VAE
config's ``latents_mean`` / ``latents_std``, exactly as ``WanPipeline`` does before decoding.

Wan 2.2 A14B (two experts, ``transformer_2`` + ``boundary_ratio``) picks the expert per sample from the
sample's highest noise level, the pipeline's rule ``t >= boundary`` applied to per-frame levels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from ..schedules import flow_sigmas
from .base import (
    BackboneAdapter,
    Cond,
    WindowAttentionSpec,
    compute_dtype,
    grid_from_hidden_states,
    per_frame_to_tokens,
)
from .capabilities import ImageConditioning, MixtureOfExperts, TemporalRopeFrequencies, WindowAttention

# cond keys the adapter understands; everything else is an error that names these.
_TRANSFORMER_COND_KEYS = ("encoder_hidden_states", "encoder_hidden_states_image", "attention_kwargs")
CONDITION_LATENTS = "condition_latents"
"""Cond key of the image-to-video channels (first-frame mask + VAE latents of [image, zeros...]),
``[B, temporal_compression + C, f, h, w]``, concatenated to ``x`` along channels (Wan 2.1 I2V)."""


def make_vae_per_frame(vae) -> list:
    """Make a causal Wan VAE code each frame on its own: zero the past taps of every temporal convolution.

    ``WanCausalConv3d`` pads time on the left only, so the last of its ``k_t`` temporal taps reads the
    current frame and the others the frames before it (through the feature cache on long clips). With those
    zeroed, and kept at zero by gradient hooks (Adam then leaves them at zero too), every output frame is a
    function of its own input frame: a 2D autoencoder in the 3D model's clothes, exact on clips of any
    length, whose encoding of a window is the slice of the encoding of the whole video. The saved model is a
    stock ``AutoencoderKLWan`` (the zeros are ordinary weights). Needs ``temperal_downsample`` all False
    (downsampling in time mixes frames). Returns the hook handles (``handle.remove()`` after training).
    """
    flags = list(vae.config.get("temperal_downsample") or [])
    if any(flags):
        raise ValueError(
            f"a per-frame VAE cannot compress time; got temperal_downsample={flags}: set them all to False "
            "(and scale_factor_temporal=1), or do not make it per-frame"
        )
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    def keep_current_tap(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, :, :-1] = 0  # (out, in, k_t, k_h, k_w): the past taps get no update
        return grad

    handles = []
    for module in vae.modules():
        if isinstance(module, WanCausalConv3d) and module.weight.shape[2] > 1:
            with torch.no_grad():
                module.weight[:, :, :-1] = 0
            handles.append(module.weight.register_hook(keep_current_tap))
    return handles


def _current_tap_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """``WanCausalConv3d.forward`` of a per-frame convolution: only the current-frame tap, no time padding.
    ``cache_x`` (the frames before) meets only the zeroed past taps, so it is left out."""
    import torch.nn.functional as F

    pad = self._padding  # (w, w, h, h, 2 * t_pad, 0): the spatial padding only
    x = F.pad(x, (pad[0], pad[1], pad[2], pad[3], 0, 0))
    return F.conv3d(x, self.weight[:, :, -1:], self.bias, self.stride, 0, self.dilation, self.groups)


@contextlib.contextmanager
def current_frame_convolutions(vae) -> Iterator[int]:
    """Run a per-frame Wan VAE (:func:`make_vae_per_frame`) as the 2D network it is: inside the block every
    temporal convolution with past taps convolves with its current-frame tap alone and pads no time, which
    computes the same outputs and gradients (the past taps are zero and get no gradient) at about half the
    cost of a training step of the demo's VAE (``tests/test_demo.py`` checks the equality). Yields the number
    of convolutions switched; refuses a VAE that is not per-frame (its past taps matter)."""
    import types

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    if not is_vae_per_frame(vae):
        raise ValueError(
            "current_frame_convolutions needs a per-frame VAE (its past temporal taps zero): call "
            "make_vae_per_frame(vae) first, or run the VAE as it is"
        )
    switched = [m for m in vae.modules() if isinstance(m, WanCausalConv3d) and m.weight.shape[2] > 1]
    for module in switched:
        module.forward = types.MethodType(_current_tap_forward, module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward  # back to the class's forward


def is_vae_per_frame(vae) -> bool:
    """True when every temporal convolution of the Wan VAE reads only the current frame (and none downsamples
    time), i.e. :func:`make_vae_per_frame` holds."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    if any(vae.config.get("temperal_downsample") or []):
        return False
    return all(
        not bool(m.weight[:, :, :-1].any())
        for m in vae.modules()
        if isinstance(m, WanCausalConv3d) and m.weight.shape[2] > 1
    )


class WanAdapter(BackboneAdapter, TemporalRopeFrequencies, WindowAttention, MixtureOfExperts, ImageConditioning):
    """Backbone adapter of Wan 2.1 / 2.2 (T2V, Wan 2.1-style I2V, V2V; Wan 2.2 two-expert MoE)."""

    family: ClassVar[str] = "wan"
    pipeline_class_names: ClassVar[tuple[str, ...]] = (
        "WanPipeline",
        "WanImageToVideoPipeline",
        "WanVideoToVideoPipeline",
    )
    image_to_video_pipeline_class_names: ClassVar[tuple[str, ...]] = ("WanImageToVideoPipeline",)
    model_attr: ClassVar[str] = "transformer"
    temporal_compression: ClassVar[int] = 4
    spatial_compression: ClassVar[int] = 8
    causal_vae: ClassVar[bool] = True
    patch_size: ClassVar[tuple[int, int, int]] = (1, 2, 2)
    prediction: ClassVar[str] = "flow"
    native_per_frame_timesteps: ClassVar[bool] = True
    # Self- and cross-attention projections of every block (suffix match in PEFT) and the block MLP.
    lora_target_modules: ClassVar[tuple[str, ...]] = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
    )
    default_num_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 5.0
    default_height: ClassVar[int] = 480
    default_width: ClassVar[int] = 832
    default_num_frames: ClassVar[int] = 81
    tiny_video_size: ClassVar[tuple[int, int, int]] = (9, 32, 32)
    max_sequence_length: ClassVar[int] = 512
    """Text tokens per prompt: the pipelines' ``__call__`` default (Wan's I2V attention assumes 512)."""
    rope_theta: ClassVar[float] = 10000.0
    """RoPE base: ``WanTransformer3DModel`` builds ``WanRotaryPosEmbed`` with its default theta."""
    rope_extension_methods: ClassVar[tuple[str, ...]] = ("pi", "ntk", "yarn", "riflex")
    """Temporal RoPE extensions :func:`longgen.extend.apply_rope_extension` can apply to this family."""

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None):
        super().__init__(pipe, native_video_size)
        vae_config = pipe.vae.config
        downsample = list(getattr(vae_config, "temperal_downsample", [False, True, True]))
        # Instance values shadow the class defaults: Wan 2.2's TI2V VAE compresses space by 16.
        self.temporal_compression = int(
            getattr(vae_config, "scale_factor_temporal", None) or 2 ** sum(downsample)
        )
        self.spatial_compression = int(
            getattr(vae_config, "scale_factor_spatial", None) or 2 ** len(downsample)
        )
        self.patch_size = tuple(int(p) for p in self.model.config.patch_size)
        if self.patch_size[0] != 1:
            raise ValueError(
                f"{type(self).__name__} expects a temporal patch of 1 (one token row per latent frame); "
                f"the transformer has patch_size {self.patch_size}"
            )
        is_i2v = type(pipe).__name__ in self.image_to_video_pipeline_class_names
        self.supports_image_condition = is_i2v
        self.requires_image_condition = is_i2v
        self.force_per_frame_timesteps = False
        """Always give the model per-frame levels, even when every frame of a sample shares one (the
        default then passes the scalar timestep, as the stock pipeline does; both agree to float error)."""
        self.timestep_table: tuple[torch.Tensor, torch.Tensor] | None = None
        """Optional (sigmas, timesteps) a scheduler feeds the model; see :meth:`match_scheduler_timesteps`."""
        self._stock_temporal_rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """expert index -> stock temporal columns (cos, sin) of its RoPE tables while they are replaced."""

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(
        cls,
        seed: int = 0,
        image_to_video: bool = False,
        two_experts: bool = False,
        vae_kwargs: dict[str, Any] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
        text_length: int = 512,
    ):
        """A tiny random ``WanPipeline`` (or ``WanImageToVideoPipeline``): 2-layer DiT, small VAE, UMT5.

        ``text_length``: the tokenizer's ``model_max_length``, which caps the padded prompt length of the
        adapter's ``encode_prompt`` (512 = Wan's; the demo's short captions need far fewer).

        ``two_experts`` adds a ``transformer_2`` with ``boundary_ratio=0.5`` (Wan 2.2 A14B layout).
        ``vae_kwargs`` / ``transformer_kwargs`` override ``AutoencoderKLWan`` / ``WanTransformer3DModel``
        config values of the tiny defaults (e.g. ``{"z_dim": 8, "dim_mult": [1, 1, 1]}`` or
        ``{"num_layers": 4, "num_attention_heads": 4}``); ``None`` keeps the defaults.
        """
        from diffusers import (
            UniPCMultistepScheduler,
            WanImageToVideoPipeline,
            WanPipeline,
            WanTransformer3DModel,
        )

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = _tiny_wan_vae(**(vae_kwargs or {}))
            text_encoder, tokenizer = _tiny_umt5(model_max_length=text_length)
            z_dim = vae.config.z_dim
            image_kwargs: dict[str, Any] = dict(transformer_kwargs or {})
            if image_to_video:
                image_encoder, image_processor = _tiny_clip_vision()
                # I2V input = noisy latents + first-frame mask (one channel per compressed frame) + image latents.
                temporal = int(vae.config.get("scale_factor_temporal") or 4)
                image_kwargs.update(
                    in_channels=2 * z_dim + temporal, image_dim=image_encoder.config.hidden_size
                )
            transformer = _tiny_transformer(WanTransformer3DModel, z_dim, **image_kwargs)
            transformer_2 = (
                _tiny_transformer(WanTransformer3DModel, z_dim, **image_kwargs) if two_experts else None
            )
            scheduler = UniPCMultistepScheduler(
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=3.0,
                num_train_timesteps=1000,
            )
            common = dict(
                tokenizer=tokenizer,
                text_encoder=text_encoder,
                vae=vae,
                scheduler=scheduler,
                transformer=transformer,
                transformer_2=transformer_2,
                boundary_ratio=0.5 if two_experts else None,
            )
            if image_to_video:
                return WanImageToVideoPipeline(
                    image_encoder=image_encoder, image_processor=image_processor, **common
                )
            return WanPipeline(**common)

    # --- shapes and noise levels --------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the denoised latents (the VAE's z_dim; I2V models take more input channels)."""
        return int(self.model.config.out_channels or self.vae.config.z_dim)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))

    @property
    def default_shift(self) -> float:
        """The flow shift the pipeline's scheduler is configured with (``flow_shift`` or ``shift``)."""
        config = self.pipe.scheduler.config
        for key in ("flow_shift", "shift"):
            if config.get(key) is not None:
                return float(config[key])
        return 1.0

    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """Descending flow sigmas shifted by the scheduler's flow shift (SD3 shift), ending at 0."""
        return flow_sigmas(num_steps, shift=self.default_shift if shift is None else shift)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Flow sigma -> the transformer's timestep, ``sigma * num_train_timesteps`` (float32).

        With a :attr:`timestep_table`, sigmas found in the table (within 1e-6) map to the table's
        timesteps instead: diffusers' UniPC scheduler feeds the model ``int64`` timesteps, so exact
        parity with a stock pipeline needs its table.
        """
        t = sigma.float() * self.num_train_timesteps
        if self.timestep_table is not None:
            table_sigmas, table_timesteps = (v.to(sigma.device) for v in self.timestep_table)
            dist, idx = (sigma.float()[..., None] - table_sigmas).abs().min(dim=-1)
            t = torch.where(dist <= 1e-6, table_timesteps[idx], t)
        return t

    def match_scheduler_timesteps(self, scheduler) -> None:
        """Feed the model ``scheduler.timesteps`` at ``scheduler.sigmas`` (call after ``set_timesteps``).

        Only for bit-parity with a stock diffusers pipeline; ``None`` (``self.timestep_table = None``)
        restores the continuous ``sigma * 1000``.
        """
        timesteps = torch.as_tensor(scheduler.timesteps).float().cpu()
        sigmas = torch.as_tensor(scheduler.sigmas).float().cpu()[: timesteps.numel()]
        self.timestep_table = (sigmas, timesteps)

    # --- the contract -------------------------------------------------------------------------
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
    ) -> tuple[Cond, Cond | None]:
        """UMT5 embeddings through the pipeline's own ``encode_prompt`` (negative prompt "" by default).

        An image-to-video pipeline also needs ``image``: it adds the CLIP image tokens
        (``encoder_hidden_states_image``, when the model has ``image_dim``) and the first-frame
        condition channels (:data:`CONDITION_LATENTS`) for a clip of ``num_frames`` x ``height`` x ``width``
        (default: the native clip), shared by the conditional and unconditional branch.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None
        if do_classifier_free_guidance:
            negatives = [""] * len(prompts) if negative_prompt is None else negative_prompt
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        device = self.pipe._execution_device
        # A tokenizer that says it holds fewer tokens (the demo's tiny one) sets the padded text length; the
        # released tokenizers hold at least 512 (as the LTX adapter does).
        tokenizer = getattr(self.pipe, "tokenizer", None)
        max_len = min(
            self.max_sequence_length, int(getattr(tokenizer, "model_max_length", self.max_sequence_length))
        )
        embeds, negative_embeds = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=negatives,
            do_classifier_free_guidance=do_classifier_free_guidance,
            max_sequence_length=max_len,
            device=device,
            dtype=self.dtype,
        )
        cond: Cond = {"encoder_hidden_states": embeds}
        uncond: Cond | None = (
            {"encoder_hidden_states": negative_embeds} if do_classifier_free_guidance else None
        )
        image_cond = self._image_condition(image, len(prompts), num_frames, height, width, device)
        cond.update(image_cond)
        if uncond is not None:
            uncond.update(image_cond)
        return cond, uncond

    def _image_condition(self, image, batch_size: int, num_frames, height, width, device) -> Cond:
        """Wan 2.1 I2V conditioning through the pipeline's ``encode_image`` and ``prepare_latents``."""
        pipe = self.pipe
        if image is None:
            if self.requires_image_condition:
                raise ValueError(
                    f"{type(pipe).__name__} is an image-to-video pipeline: pass image=<PIL image or tensor>"
                )
            return {}
        if not self.supports_image_condition:
            raise ValueError(
                f"{type(pipe).__name__} takes no image. Load an image-to-video pipeline folder "
                f"({', '.join(self.image_to_video_pipeline_class_names)}) or drop the image (--image, image=)."
            )
        if getattr(pipe.config, "expand_timesteps", False):
            raise NotImplementedError(
                "Wan 2.2 TI2V image conditioning (expand_timesteps) is a clean first latent frame: encode the "
                "image with encode_video and hold it as sigma-0 context in the sampler instead of image=."
            )
        num_frames = num_frames or self.native_video_size[0]
        height = height or self.native_video_size[1]
        width = width or self.native_video_size[2]
        cond: Cond = {}
        if self.model.config.image_dim is not None:
            image_embeds = pipe.encode_image(image, device)  # (1, image tokens, image_dim)
            cond["encoder_hidden_states_image"] = image_embeds.repeat(batch_size, 1, 1).to(self.dtype)
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        shape = self.latent_shape(num_frames, height, width, batch_size=batch_size)
        # Passing zero latents keeps prepare_latents from drawing noise we would throw away.
        _, condition = pipe.prepare_latents(
            pixels,
            batch_size,
            shape[1],
            height,
            width,
            num_frames,
            torch.float32,
            device,
            None,
            torch.zeros(shape, device=device),
        )
        cond[CONDITION_LATENTS] = condition.to(self.dtype)  # (B, tc + C, f, h, w)
        return cond

    def window_cond(self, cond: Cond, frame_offset: int, num_latent_frames: int) -> Cond:
        """Image-to-video on a window: the clip's first-frame mask and image latents for the window's frames (the
        image's mask is only set in the window holding frame 0; warm-up frames before 0 copy frame 0)."""
        condition = cond.get(CONDITION_LATENTS)
        if condition is None or (frame_offset == 0 and condition.shape[2] == num_latent_frames):
            return cond
        index = (torch.arange(num_latent_frames) + frame_offset).clamp(0, condition.shape[2] - 1)
        return {**cond, CONDITION_LATENTS: condition[:, :, index.to(condition.device)]}

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 from the velocity: ``x0 = x - sigma * v``, the model seeing ``t = sigma * 1000`` per frame."""
        self.check_denoise_inputs(x, sigma)
        batch, _, num_latent_frames, height, width = x.shape
        if height % self.patch_size[1] or width % self.patch_size[2]:
            raise ValueError(
                f"latent height/width {height}x{width} must be divisible by the patch {self.patch_size[1:]}"
            )
        max_positions = getattr(self.model.config, "rope_max_seq_len", None)
        if max_positions is not None and num_latent_frames // self.patch_size[0] > max_positions:
            raise ValueError(
                f"{num_latent_frames} latent frames exceed this model's RoPE table ({max_positions} positions): "
                "use a windowed sampler (--sampler sliding, fifo or df) instead of running the whole clip at once"
            )
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        timestep = self.model_timestep(sigma)  # (B, F)
        kwargs = self._model_kwargs(cond, num_latent_frames)
        hidden_states = x
        if CONDITION_LATENTS in cond:
            hidden_states = torch.cat([x, cond[CONDITION_LATENTS].to(x)], dim=1)  # (B, C + tc + C, F, H, W)

        experts = self._experts(timestep)
        if len(experts) == 1:
            velocity = self._run_model(
                experts[0][0], hidden_states.to(compute_dtype(experts[0][0])), timestep, kwargs
            ).float()
        else:
            velocity = torch.empty_like(x, dtype=torch.float32)
            for model, rows in experts:
                sub_kwargs = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
                velocity[rows] = self._run_model(
                    model, hidden_states[rows].to(compute_dtype(model)), timestep[rows], sub_kwargs
                ).float()
        return x.float() - sigma[:, None, :, None, None] * velocity

    def _model_kwargs(self, cond: Cond, num_latent_frames: int) -> dict[str, Any]:
        unknown = sorted(set(cond) - set(_TRANSFORMER_COND_KEYS) - {CONDITION_LATENTS})
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.denoise got unknown cond keys {unknown}; it takes "
                f"{sorted((*_TRANSFORMER_COND_KEYS, CONDITION_LATENTS))} (build conds with encode_prompt)"
            )
        if "encoder_hidden_states" not in cond:
            raise ValueError("cond needs 'encoder_hidden_states' (the text embeddings from encode_prompt)")
        if CONDITION_LATENTS in cond and cond[CONDITION_LATENTS].shape[2] != num_latent_frames:
            raise ValueError(
                f"the image condition covers {cond[CONDITION_LATENTS].shape[2]} latent frames but x has "
                f"{num_latent_frames}: Wan I2V conditions one whole clip, so encode the prompt for the clip "
                "length you denoise (num_frames=) and denoise it in one piece"
            )
        if self.model.config.in_channels != self.latent_channels and CONDITION_LATENTS not in cond:
            raise ValueError(
                f"this transformer takes {self.model.config.in_channels} input channels: an image-to-video "
                "model needs the image condition; call encode_prompt(..., image=...)"
            )
        dtype = self.dtype
        return {
            k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in cond.items()
            if k in _TRANSFORMER_COND_KEYS and v is not None
        }

    def _experts(self, timestep: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor | None]]:
        """(model, batch rows or None for all) pairs: Wan 2.2 MoE sends a sample to ``transformer`` while its highest
        level is at or above ``boundary_ratio * num_train_timesteps`` and to ``transformer_2`` after."""
        boundary_ratio = getattr(self.pipe.config, "boundary_ratio", None)
        second = getattr(self.pipe, "transformer_2", None)
        if boundary_ratio is None or second is None:
            return [(self.model, None)]
        high = timestep.max(dim=1).values >= boundary_ratio * self.num_train_timesteps
        if bool(high.all()) or not bool(high.any()):
            return [(self.model if bool(high.all()) else second, None)]
        rows = torch.arange(timestep.shape[0], device=timestep.device)
        return [(self.model, rows[high]), (second, rows[~high])]

    def _run_model(
        self,
        model: torch.nn.Module,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """One forward of the stock transformer with per-frame timesteps ``(B, F)`` spread over tokens."""
        _, _, num_latent_frames, height, width = hidden_states.shape
        if not self.force_per_frame_timesteps and bool((timestep == timestep[:, :1]).all()):
            model_timestep = timestep[:, 0]  # (B,): the stock pipelines' path
        else:
            # The transformer flattens patch tokens frame-major, (F, H/ph, W/pw), after patch_embedding.
            tokens_per_frame = (height // self.patch_size[1]) * (width // self.patch_size[2])
            model_timestep = per_frame_to_tokens(timestep, tokens_per_frame)  # (B, F * h * w)
        return model(hidden_states=hidden_states, timestep=model_timestep, return_dict=False, **kwargs)[0]

    # --- VAE ----------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, 1 / std) of the VAE latents, ``[1, C, 1, 1, 1]``, computed as the pipelines do
        (``WanPipeline`` divides by ``1 / std`` when decoding; bit-identical inputs to the VAE)."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        inv_std = (1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)).to(like.device, like.dtype)
        return mean, inv_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalise (``z * std + mean``), decode with the causal Wan VAE, return ``[B, F, H, W, 3]``."""
        vae = self.vae
        vae_param = next(vae.parameters())
        z = latents.to(vae_param.device, vae_param.dtype)
        mean, inv_std = self._latent_stats(z)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).contiguous()

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Frames ``[B, F, H, W, 3]`` in [0, 1] -> normalised latents ``[B, C, f, h, w]`` (float32).

        The distribution's mode by default (what the I2V pipelines use); ``sample=True`` draws from it.
        """
        num_latent = self.num_latent_frames(frames.shape[1])  # validates 4k+1 with a message that names the fix
        pad = (-(frames.shape[1] - 1)) % 4
        if pad:
            # AutoencoderKLWan encodes frame 0, then chunks of 4, and drops a remainder, whatever its time
            # compression; a VAE without time compression takes any count: repeat the last frame, crop after.
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        vae = self.vae
        vae_param = next(vae.parameters())
        video = frames.permute(0, 4, 1, 2, 3).to(vae_param.device, vae_param.dtype) * 2 - 1  # (B, 3, F, H, W)
        dist = vae.encode(video).latent_dist
        z = (dist.sample(generator) if sample else dist.mode()).float()[:, :, :num_latent]
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    # --- what extensions and training need ----------------------------------------------------
    def rope_module(self) -> torch.nn.Module | None:
        """``WanRotaryPosEmbed``: t/h/w rotary tables (t gets head_dim - 4 * (head_dim // 6) dims)."""
        return self.model.rope

    def window_attention_spec(self) -> WindowAttentionSpec:
        """Every block's ``attn1``: self-attention over the video tokens (``attn2`` is the text cross-attention),
        RoPE passed as ``rotary_emb``; the grid is ``hidden_states [B, C, F, H, W]`` over ``config.patch_size``
        (every expert of Wan 2.2 reads its own config)."""
        return WindowAttentionSpec(
            layer_pattern=r"attn1$",
            token_grid=lambda model, args, kwargs: grid_from_hidden_states(model, args, kwargs, model.config.patch_size),
            rope_arg="rotary_emb",
        )

    def temporal_attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Each block's full 3D self-attention (``blocks.N.attn1``): the layers that mix frames."""
        return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(self.model.blocks)]

    # --- temporal RoPE (longgen.extend.rope) --------------------------------------------------
    @staticmethod
    def _rope_freqs_dtype() -> torch.dtype:
        """The dtype ``WanRotaryPosEmbed`` builds its tables in (float64; float32 where MPS exists)."""
        return torch.float32 if torch.backends.mps.is_available() else torch.float64

    def rope_axes(self) -> list[dict[str, Any]]:
        """Each RoPE axis (t, h, w): channels per head, base and frequencies (rad per token step, float64).

        Wan splits a head as t = d - 4(d // 6), h = w = 2(d // 6); every axis uses base 10000.
        """
        rope = self.rope_module()
        axes = []
        for axis, dim, unit in (
            ("t", rope.t_dim, "latent frame"),
            ("h", rope.h_dim, f"token row ({self.patch_size[1]} latent rows)"),
            ("w", rope.w_dim, f"token column ({self.patch_size[2]} latent columns)"),
        ):
            exponents = torch.arange(0, dim, 2, dtype=self._rope_freqs_dtype()) / dim
            freqs = (1.0 / (self.rope_theta**exponents)).double()  # (dim / 2,)
            axes.append(
                {"axis": axis, "dim": int(dim), "base": self.rope_theta, "frequencies": freqs, "unit": unit}
            )
        return axes

    def temporal_rope_frequencies(self) -> torch.Tensor:
        """Stock temporal frequencies ``theta_j = 10000^(-2j / t_dim)`` (rad per latent frame), float64,
        computed as ``WanRotaryPosEmbed`` computes them."""
        return self.rope_axes()[0]["frequencies"]

    def set_temporal_rope_frequencies(self, frequencies: torch.Tensor | None) -> None:
        """Rewrite the temporal columns of every expert's RoPE tables for ``frequencies`` ``[t_dim / 2]``.

        The tables are rebuilt as the stock module builds them (positions 0..max_seq_len-1 times the
        frequencies, cos/sin, each value repeated for its channel pair), so the stock frequencies give the
        stock tables bit for bit. ``None`` copies the saved stock columns back (bit-exact removal).
        """
        for index, model in enumerate(self.experts()):
            rope = model.rope
            t_dim = rope.t_dim
            if frequencies is None:
                stock = self._stock_temporal_rope.pop(index, None)
                if stock is not None:
                    rope.freqs_cos[:, :t_dim].copy_(stock[0])
                    rope.freqs_sin[:, :t_dim].copy_(stock[1])
                continue
            if frequencies.shape != (t_dim // 2,):
                raise ValueError(
                    f"expected {t_dim // 2} temporal frequencies, got shape {tuple(frequencies.shape)}"
                )
            if index not in self._stock_temporal_rope:
                self._stock_temporal_rope[index] = (
                    rope.freqs_cos[:, :t_dim].clone(),
                    rope.freqs_sin[:, :t_dim].clone(),
                )
            dtype = self._rope_freqs_dtype()
            positions = torch.arange(rope.freqs_cos.shape[0], dtype=dtype)
            angles = torch.outer(positions, frequencies.detach().cpu().to(dtype))  # (max_seq_len, t_dim / 2)
            rope.freqs_cos[:, :t_dim].copy_(angles.cos().repeat_interleave(2, dim=1).float())
            rope.freqs_sin[:, :t_dim].copy_(angles.sin().repeat_interleave(2, dim=1).float())

    def rope_attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The attention layers whose query-key products carry the 3D RoPE: ``attn1`` of every expert."""
        experts = self.experts()
        return [
            (f"{'transformer' if e == 0 else 'transformer_2'}.blocks.{i}.attn1", block.attn1)
            for e, model in enumerate(experts)
            for i, block in enumerate(model.blocks)
        ]

    def experts(self) -> list[torch.nn.Module]:
        """The denoising networks: ``[transformer]``, or ``[transformer, transformer_2]`` for Wan 2.2 MoE."""
        second = getattr(self.pipe, "transformer_2", None)
        return [self.model] if second is None else [self.model, second]


# --- tiny components (tests, the demo): built offline, no hub ----------------------------------
def _tiny_wan_vae(z_dim: int = 4, **overrides):
    """A 3-level causal Wan VAE (8x space, 4x time) with a few channels and non-trivial latent stats.

    ``overrides`` replace ``AutoencoderKLWan`` config values; with fewer levels (``dim_mult`` of
    ``n + 1`` entries) set ``temperal_downsample`` to ``n`` flags and ``scale_factor_spatial=2**n``,
    ``scale_factor_temporal=2**sum(flags)`` to match.
    """
    from diffusers import AutoencoderKLWan

    config: dict[str, Any] = dict(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    config.update(overrides)
    z = int(config["z_dim"])
    config.setdefault("latents_mean", [0.1 * (i - z / 2) for i in range(z)])
    config.setdefault("latents_std", [0.5 + 0.25 * i for i in range(z)])
    return AutoencoderKLWan(**config)


def _tiny_umt5(d_model: int = 32, model_max_length: int = 512):
    """A 1-layer UMT5 encoder over ``tiny_tokenizer``'s 64-word vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(model_max_length=model_max_length, vocab_size=64)
    config = UMT5Config(
        vocab_size=64,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval(), tokenizer


def _tiny_clip_vision():
    """A 2-layer CLIP vision tower (its penultimate hidden states are Wan's image tokens) and processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    return CLIPVisionModel(config).eval(), processor


def _tiny_transformer(
    model_cls, z_dim: int, in_channels: int | None = None, image_dim: int | None = None, **extra
):
    """2 blocks, 2 heads of 12 dims: Wan's RoPE splits a head as t = d - 4(d//6), h = w = 2(d//6) (4/4/4)."""
    config: dict[str, Any] = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels or z_dim,
        out_channels=z_dim,
        text_dim=32,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        rope_max_seq_len=1024,  # as the real models: positions for long naive runs
    )
    config.update(extra)  # e.g. a bigger model for the demo: num_layers, num_attention_heads, ffn_dim
    if image_dim is not None:
        config.setdefault("added_kv_proj_dim", config["num_attention_heads"] * config["attention_head_dim"])
    return model_cls(**config).eval()
