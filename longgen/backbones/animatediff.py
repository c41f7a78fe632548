"""AnimateDiff (Guo et al., ICLR 2024) behind longgen's denoiser contract, with per-frame noise levels.

AnimateDiff inserts motion modules (temporal transformers) into a Stable Diffusion image UNet; diffusers
holds the result as ``UNetMotionModel`` (``AnimateDiffPipeline`` builds it from a ``UNet2DConditionModel``
and a ``MotionAdapter`` and saves it as one ``UNetMotionModel``). The model

* consumes ``[B, C, F, H, W]`` latents of a per-frame SD VAE (no temporal compression),
* predicts eps (or v) on a discrete DDPM schedule (``DDIMScheduler``, linear betas),
* runs every spatial layer on frames folded into the batch ``(B*F, C, H, W)``, sample-major,
* takes one timestep per sample and repeats its embedding over frames.

The adapter converts flow sigmas to the VP schedule (:class:`longgen.schedules.VPSchedule`) and gives each
frame its own timestep through removable diffusers hooks (:func:`apply_frame_timesteps`): the time
embedding is computed once per ``(sample, frame)`` and handed to every ResNet block in the folded order.
Without a per-frame timestep set for the call the hooks pass everything through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils.weak import WeakIdKeyDictionary

from ..schedules import VPSchedule
from .base import BackboneAdapter, Cond, encode_per_frame
from .capabilities import ExVideoSites, FrameAttention

if TYPE_CHECKING:
    from ..extend.exvideo import ExVideoSite

__all__ = [
    "AnimateDiffAdapter",
    "FrameTimestepState",
    "apply_frame_timesteps",
    "remove_frame_timesteps",
]

_FRAME_TIMESTEP_HOOK = "longgen_frame_timesteps"

# Timesteps this close to an integer are snapped to it: float32 flow sigmas of the DDIM grid then reach the
# model as exactly the integer timesteps it was trained on (the round trip sigma -> t is off by ~1e-4 at t~1000).
_TIMESTEP_SNAP = 1e-3


# --------------------------------------------------------------------------------------------------------
# Per-frame timesteps for UNetMotionModel, as removable hooks
# --------------------------------------------------------------------------------------------------------
class FrameTimestepState:
    """State shared by the per-frame timestep hooks of one ``UNetMotionModel``.

    ``frame_timesteps`` (``[B*F]``, sample-major like the UNet's fold) is set for one call by
    :meth:`use`; the time-embedding hook turns it into ``frame_emb`` (``[B*F, D]``), which stays until the
    next forward so that gradient checkpointing recomputes the ResNet blocks with the same embedding.
    """

    def __init__(self) -> None:
        self.frame_timesteps: torch.Tensor | None = None
        self.frame_emb: torch.Tensor | None = None
        self.sample_emb: torch.Tensor | None = None
        # The repeated per-sample embedding a forward hands to its ResNet blocks -> the per-frame embedding
        # that replaces it. Keyed by tensor identity so a checkpoint recompute of an older forward finds its
        # own embedding even after later forwards.
        self.replacements: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @contextlib.contextmanager
    def use(self, frame_timesteps: torch.Tensor) -> Iterator[None]:
        """Give the next UNet forwards one timestep per ``(sample, frame)``, ``[B*F]`` sample-major."""
        if frame_timesteps.ndim != 1:
            raise ValueError(f"frame_timesteps must be flat [B*F], got shape {tuple(frame_timesteps.shape)}")
        self.frame_timesteps = frame_timesteps
        try:
            yield
        finally:
            self.frame_timesteps = None


class _TimeEmbeddingHook(ModelHook):
    """On ``unet.time_embedding``: also embed the per-frame timesteps; return the stock per-sample output."""

    def __init__(self, state: FrameTimestepState, time_proj: torch.nn.Module):
        super().__init__()
        self.state = state
        self.time_proj = time_proj

    def new_forward(self, module: torch.nn.Module, sample: torch.Tensor, condition=None, *args, **kwargs):
        emb = self.fn_ref.original_forward(sample, condition, *args, **kwargs)  # [B, D]
        state = self.state
        if state.frame_timesteps is None:
            state.frame_emb = state.sample_emb = None
            return emb
        frame_t = state.frame_timesteps.to(emb.device)
        batch = emb.shape[0]
        if frame_t.numel() % batch:
            raise ValueError(
                f"{frame_t.numel()} per-frame timesteps do not split into the UNet batch of {batch} samples; "
                "pass one timestep per (sample, frame)"
            )
        frame_t = frame_t.view(batch, frame_t.numel() // batch)  # [B, F]
        # Embed frame by frame, each a [B] batch exactly as the stock forward embeds its per-sample
        # timesteps, so frames sharing the call's timestep get bit-identical embeddings.
        frame_embs = [
            self.fn_ref.original_forward(
                self.time_proj(frame_t[:, f]).to(sample.dtype), condition, *args, **kwargs
            )
            for f in range(frame_t.shape[1])
        ]
        state.frame_emb = torch.stack(frame_embs, dim=1).flatten(0, 1)  # [B, F, D] -> [B*F, D], sample-major
        state.sample_emb = emb
        return emb


class _ResnetTembHook(ModelHook):
    """On each ``ResnetBlock2D``: swap the frame-repeated per-sample ``temb`` for the per-frame one."""

    def __init__(self, state: FrameTimestepState, has_added_embedding: bool):
        super().__init__()
        self.state = state
        self.has_added_embedding = has_added_embedding

    def _replacement(self, temb: torch.Tensor) -> torch.Tensor | None:
        state = self.state
        if temb in state.replacements:
            return state.replacements[temb]
        if state.frame_emb is None:
            return None
        frame_emb, sample_emb = state.frame_emb, state.sample_emb
        if temb.shape[0] != frame_emb.shape[0]:
            raise RuntimeError(
                f"ResNet block got a time embedding for {temb.shape[0]} folded frames but {frame_emb.shape[0]} "
                "per-frame timesteps were set; the per-frame timesteps must cover every (sample, frame) of the call"
            )
        out = frame_emb
        if self.has_added_embedding:
            # temb = (time + added) embedding repeated over frames: keep what was added to the time part
            # (SDXL's text_time embedding), exactly as the UNet summed it.
            num_frames = frame_emb.shape[0] // sample_emb.shape[0]
            out = frame_emb + (temb - sample_emb.repeat_interleave(num_frames, dim=0))  # [B*F, D]
        state.replacements[temb] = out
        return out

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        temb = kwargs["temb"] if "temb" in kwargs else (args[1] if len(args) > 1 else None)
        if temb is None:
            return args, kwargs
        new = self._replacement(temb)
        if new is None:
            return args, kwargs
        if "temb" in kwargs:
            kwargs["temb"] = new
        else:
            args = (args[0], new, *args[2:])
        return args, kwargs


def apply_frame_timesteps(unet: torch.nn.Module) -> FrameTimestepState:
    """Hook a ``UNetMotionModel`` so that each (sample, frame) can have its own timestep.

    A hook on ``time_embedding`` embeds the per-frame timesteps set through the returned state's
    :meth:`FrameTimestepState.use`; hooks on every ``ResnetBlock2D`` with a time projection replace the
    per-sample embedding the UNet repeats over frames (``emb.repeat_interleave(F)``) by that per-frame
    embedding in the same sample-major fold. Only ResNet blocks read the time embedding in this UNet.
    Idempotent: a UNet hooked already returns its existing state. Undo with :func:`remove_frame_timesteps`.
    """
    from diffusers.models.resnet import ResnetBlock2D

    time_embedding = getattr(unet, "time_embedding", None)
    if time_embedding is None or not hasattr(unet, "time_proj"):
        raise TypeError(f"{type(unet).__name__} has no time_proj/time_embedding; expected a UNetMotionModel")
    existing = HookRegistry.check_if_exists_or_initialize(time_embedding).get_hook(_FRAME_TIMESTEP_HOOK)
    if existing is not None:
        return existing.state
    state = FrameTimestepState()
    has_added_embedding = getattr(unet.config, "addition_embed_type", None) is not None
    HookRegistry.check_if_exists_or_initialize(time_embedding).register_hook(
        _TimeEmbeddingHook(state, unet.time_proj), _FRAME_TIMESTEP_HOOK
    )
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D) and getattr(module, "time_emb_proj", None) is not None:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                _ResnetTembHook(state, has_added_embedding), _FRAME_TIMESTEP_HOOK
            )
    HookRegistry.check_if_exists_or_initialize(unet).invalidate_child_registries_cache()
    return state


def remove_frame_timesteps(unet: torch.nn.Module) -> None:
    """Remove the hooks of :func:`apply_frame_timesteps`; the UNet is the stock model again."""
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.remove_hook(_FRAME_TIMESTEP_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


# --------------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------------
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


class AnimateDiffAdapter(BackboneAdapter, FrameAttention, ExVideoSites):
    """AnimateDiff (Guo et al., ICLR 2024): SD UNet + motion modules, eps/v on a DDPM schedule, per-frame VAE."""

    family: ClassVar[str] = "animatediff"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("AnimateDiffPipeline",)
    model_attr: ClassVar[str] = "unet"
    temporal_compression: ClassVar[int] = 1
    spatial_compression: ClassVar[int] = 8
    causal_vae: ClassVar[bool] = False
    patch_size: ClassVar[tuple[int, int, int]] = (1, 1, 1)
    prediction: ClassVar[str] = "eps"
    native_per_frame_timesteps: ClassVar[bool] = False
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_num_steps: ClassVar[int] = 25
    default_guidance_scale: ClassVar[float] = 7.5
    default_height: ClassVar[int] = 512
    default_width: ClassVar[int] = 512
    default_num_frames: ClassVar[int] = 16
    tiny_video_size: ClassVar[tuple[int, int, int]] = (8, 32, 32)

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None):
        super().__init__(pipe, native_video_size=native_video_size)
        scheduler = pipe.scheduler
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"AnimateDiff needs a DDPM-family scheduler with alphas_cumprod (DDIMScheduler as shipped); "
                f"got {type(scheduler).__name__}. Set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)."
            )
        pred = scheduler.config.get("prediction_type", "epsilon")
        if pred not in _PREDICTIONS:
            raise ValueError(
                f"scheduler prediction_type {pred!r} is not supported for AnimateDiff; use 'epsilon' or 'v_prediction'"
            )
        # The checkpoint's parameterisation (read from its scheduler) overrides the class default.
        self.prediction = _PREDICTIONS[pred]  # type: ignore[misc]
        self.schedule = VPSchedule(scheduler.alphas_cumprod)
        self.force_per_frame_timesteps = False
        """Tests: route every call through the per-frame hooks, even when all frames share a timestep."""
        self._pos_embed_names: list[str] | None = None
        self.position_window: int | None = None
        """Frames one temporal attention call sees, with positions restarting per window; set by window fusion
        (:mod:`longgen.extend.fusion`). Clips longer than the position tables are then fine."""

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny random ``AnimateDiffPipeline``: SD-style UNet + MotionAdapter, 8x VAE, CLIP text encoder."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls._build_tiny_pipeline()

    @staticmethod
    def _build_tiny_pipeline():
        from diffusers import (
            AnimateDiffPipeline,
            AutoencoderKL,
            DDIMScheduler,
            MotionAdapter,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel

        from .tiny import tiny_tokenizer

        channels = (16, 32)
        unet = UNet2DConditionModel(
            block_out_channels=channels,
            layers_per_block=1,
            sample_size=4,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            attention_head_dim=8,
        )
        motion_adapter = MotionAdapter(
            block_out_channels=channels,
            motion_layers_per_block=1,
            motion_transformer_layers_per_block=1,
            motion_num_attention_heads=2,
            motion_norm_num_groups=8,
            motion_max_seq_length=32,
            use_motion_mid_block=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        tokenizer = tiny_tokenizer(model_max_length=32, vocab_size=64)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=64,
                max_position_embeddings=32,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=3,
            )
        )
        # As AnimateDiff ships it: SD's linear betas, DDIM without sample clipping.
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="linear",
            steps_offset=1,
            clip_sample=False,
            timestep_spacing="linspace",
        )
        # The pipeline turns UNet2DConditionModel + MotionAdapter into one UNetMotionModel.
        return AnimateDiffPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            motion_adapter=motion_adapter,
            scheduler=scheduler,
            feature_extractor=None,
            image_encoder=None,
        )

    # --- noise levels -------------------------------------------------------------------------
    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The scheduler's own inference timesteps (its spacing and offset) as flow sigmas, then 0.

        longgen's DDIM steps from each listed timestep to the next. diffusers' ``DDIMScheduler`` instead
        steps to ``t - 1000 // num_steps``, which is the next listed timestep only for ``leading`` and
        ``trailing`` spacing, not for the ``linspace`` spacing AnimateDiff's examples use.
        """
        if shift not in (None, 1.0):
            raise ValueError(
                f"AnimateDiff is a DDPM (VP) model: a flow timestep shift does not apply (got shift={shift}); "
                "leave shift unset or pick sigmas with longgen.schedules.VPSchedule"
            )
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        # A fresh copy, so the pipeline's own scheduler state is left alone.
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps)
        sig = self.schedule.timestep_to_sigma(scheduler.timesteps.double())
        return torch.cat([sig, sig.new_zeros(1)]).float()

    def model_timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timesteps (float64) of flow sigmas; clamped to the table, near-integers snapped."""
        t = self.schedule.sigma_to_timestep(sigma)
        rounded = t.round()
        return torch.where((t - rounded).abs() < _TIMESTEP_SNAP, rounded, t)

    def _vp_coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, r, k) in float64: the model sees x_vp = k * x and predicts around x_vp = a * x0 + r * eps.

        Inside the table's range k = a / (1 - sigma) = r / sigma exactly. Below it (clean context frames)
        a, r come from the true sigma, so a frame at sigma = 0 returns x0 = x exactly; above it (sigma -> 1)
        a, r are those of ``sigma_max`` and k = r / sigma keeps the noise at the level the model expects.
        """
        sigma = sigma.double()
        hi = self.schedule.sigma_max
        sig_c = sigma.clamp(max=hi)
        ab = self.schedule.alpha_bar(sig_c)
        a, r = ab.sqrt(), (1.0 - ab).sqrt()
        k = torch.where(sigma > hi, r / sigma.clamp_min(1e-12), a / (1.0 - sig_c))
        return a, r, k

    # --- per-frame timesteps ------------------------------------------------------------------
    def frame_timestep_state(self) -> FrameTimestepState:
        """Install (once; idempotent) and return the per-frame timestep hooks of the UNet."""
        return apply_frame_timesteps(self.model)

    def remove_frame_timestep_hooks(self) -> None:
        """Remove the per-frame timestep hooks; the UNet is the stock model again."""
        remove_frame_timesteps(self.model)

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
        """CLIP text embeddings ``[B, L, D]`` through the pipeline's own ``encode_prompt``."""
        if image is not None:
            raise ValueError(
                "AnimateDiffPipeline is text-to-video and takes no conditioning image; pass image=None "
                "(for image-to-video use an SVD or Wan-I2V model)"
            )
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        device = getattr(self.pipe, "_execution_device", None) or self.device  # right under CPU offload
        pos, neg = self.pipe.encode_prompt(
            prompt, device, 1, do_classifier_free_guidance, negative_prompt=negative_prompt
        )
        cond = {"encoder_hidden_states": pos}
        uncond = {"encoder_hidden_states": neg} if do_classifier_free_guidance else None
        return cond, uncond

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 for flow latents ``x`` ``[B, C, F, H, W]`` at per-frame flow sigmas ``[B, F]``.

        Flow -> VP (Karras et al. 2022, Table 1): s = sigma / (1 - sigma), alpha_bar = 1 / (1 + s^2),
        x_vp = sqrt(alpha_bar) x / (1 - sigma); the UNet's eps (or v) then gives
        x0 = (x_vp - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)  (v: x0 = sqrt(ab) x_vp - sqrt(1 - ab) v).
        """
        self.check_denoise_inputs(x, sigma)
        batch, _, num_frames = x.shape[:3]
        self._check_num_frames(num_frames)
        ehs = cond["encoder_hidden_states"]
        if ehs.shape[0] != batch:
            raise ValueError(
                f"cond has batch {ehs.shape[0]} but x has batch {batch}; for CFG batch x and the conds together "
                "(longgen.backbones.cat_conds)"
            )
        # [B, F] float64; computed on the CPU where the schedule's tables live, then moved to x's device
        sigma = sigma.detach().to("cpu", torch.float64)
        a, r, k = (c.to(x.device) for c in self._vp_coefficients(sigma))
        t = self.model_timesteps(sigma).to(x.device)
        bcast = (batch, 1, num_frames, 1, 1)
        x_vp = (x.double() * k.view(bcast)).to(self.dtype)
        # The UNet folds frames into the batch, so the text embedding is repeated per frame, sample-major.
        ehs = ehs.to(x.device, self.dtype).repeat_interleave(num_frames, dim=0)  # [B*F, L, D]
        per_frame = self.force_per_frame_timesteps or not bool((t == t[:, :1]).all())
        sample_t = t[:, 0].float()  # [B]; with per-frame timesteps only the hooks' embedding is used
        if per_frame:
            state = self.frame_timestep_state()
            with state.use(t.reshape(-1).float()):  # [B*F] sample-major, the UNet's fold order
                out = self.model(x_vp, sample_t, encoder_hidden_states=ehs, return_dict=False)[0]
        else:
            out = self.model(x_vp, sample_t, encoder_hidden_states=ehs, return_dict=False)[0]
        out = out.double()
        a5, r5 = a.view(bcast), r.view(bcast)
        x_vp = x_vp.double()
        if self.prediction == "eps":
            x0 = (x_vp - r5 * out) / a5
        else:  # v = a * eps - r * x0  =>  x0 = a * x_vp - r * v
            x0 = a5 * x_vp - r5 * out
        return x0.float()

    def decode(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """Per-frame SD VAE decode: latents ``[B, C, f, h, w]`` -> frames ``[B, f, H, W, 3]`` in [0, 1]."""
        batch, _, num_frames = latents.shape[:3]
        vae = self.vae
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        z = z.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*f, C, h, w]
        images = torch.cat(
            [vae.decode(z[i : i + decode_chunk_size]).sample for i in range(0, z.shape[0], decode_chunk_size)]
        )
        images = images.float().unflatten(0, (batch, num_frames))  # [B, f, 3, H, W]
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 1, 3, 4, 2)  # [B, f, H, W, 3]

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
        """(name, Attention) of the motion modules' temporal self-attention layers (attn1 and attn2)."""
        from diffusers.models.attention_processor import Attention

        return [
            (name, module)
            for name, module in self.model.named_modules()
            if ".motion_modules." in name and isinstance(module, Attention)
        ]

    def motion_lora_target_modules(self) -> list[str]:
        """Full names of the motion modules' attention projections: PEFT ``target_modules`` for a LoRA on
        the temporal layers only (MotionLoRA, Guo et al. 2024, Sec. 4.3); ``lora_target_modules`` covers
        spatial and temporal attention alike."""
        suffixes = tuple(f".{name}" for name in self.lora_target_modules)
        return [
            name
            for name, _ in self.model.named_modules()
            if ".motion_modules." in name and name.endswith(suffixes)
        ]

    def temporal_position_embeddings(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of the motion modules' sinusoidal frame-position embeddings (``pos_embed``).

        Each is a ``SinusoidalPositionalEmbedding`` with a ``pe`` buffer ``[1, max_frames, C]``, added to
        the temporal tokens before attention; ExVideo replaces them with longer trainable tables.
        """
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if ".motion_modules." in name and name.endswith(".pos_embed") and module is not None
        ]

    def max_num_frames(self) -> int | None:
        """Frames the motion modules' position tables cover (``motion_max_seq_length``), or None if unknown."""
        if self._pos_embed_names is None:
            self._pos_embed_names = [name for name, _ in self.temporal_position_embeddings()]
        lengths = []
        for name in self._pos_embed_names:
            pe = getattr(self.model.get_submodule(name), "pe", None)
            if isinstance(pe, torch.Tensor) and pe.ndim == 3:
                lengths.append(pe.shape[1])
        return min(lengths) if lengths else None

    def temporal_attention_positions(self) -> dict[str, torch.nn.Module]:
        """Attention name -> the additive frame-position embedding its block adds to that attention's input.

        A motion module's ``BasicTransformerBlock`` adds ``pos_embed`` (``x + pe[:, :F]``) to the normalised
        tokens right before ``attn1`` and again before ``attn2``. Window fusion restarts these positions in every
        window (as FreeNoise does) by running the embedding per window.
        """
        out = {}
        for name, _ in self.temporal_attention_modules():
            parent = self.model.get_submodule(name.rsplit(".", 1)[0])
            pos = getattr(parent, "pos_embed", None)
            if pos is not None:
                out[name] = pos
        return out

    def exvideo_sites(self) -> list[ExVideoSite]:
        """Where ExVideo (Duan et al. 2024) extends AnimateDiff: every motion module's position table.

        The trainable table replaces each ``BasicTransformerBlock.pos_embed`` buffer ``pe`` and its Conv3d
        follows that embedding (it runs before ``attn1`` and before ``attn2`` on ``[B*H*W, F, C]``); the feature
        size comes from the motion module's input ``[B*F, C, H, W]``. The whole motion modules
        (``AnimateDiffTransformer3D``: norm, projections, transformer blocks) are post-tuned.
        """
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        from ..extend.exvideo import ExVideoSite

        sites = []
        for name, module in self.model.named_modules():
            if not isinstance(module, AnimateDiffTransformer3D):
                continue
            for i, block in enumerate(module.transformer_blocks):
                if getattr(block, "pos_embed", None) is None:
                    continue
                sites.append(
                    ExVideoSite(
                        name=f"{name}.transformer_blocks.{i}",
                        transformer=module,
                        position=block.pos_embed,
                        position_kind="additive",
                        trainable=(module,),
                    )
                )
        return sites

    def _check_num_frames(self, num_frames: int) -> None:
        limit = self.max_num_frames()
        if limit is not None and self.position_window is not None and self.position_window <= limit:
            return  # window fusion: every attention call sees at most position_window frames
        if limit is not None and num_frames > limit:
            raise ValueError(
                f"AnimateDiff's motion modules have frame positions for at most {limit} latent frames; got "
                f"{num_frames}. Use a sliding-window or FIFO sampler with windows of <= {limit} frames "
                f"(native: {self.default_num_frames}), or extend the position tables (ExVideo)."
            )
