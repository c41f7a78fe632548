"""CogVideoX (Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer").

The stock ``CogVideoXTransformer3DModel`` predicts ``v`` (Salimans & Ho 2022) on a variance-preserving
DDPM schedule (scaled-linear betas, CogVideoX's SNR shift, zero-terminal-SNR rescale) and takes *one*
timestep per sample. This module adapts it to longgen's contract:

* :class:`CogVideoXAdapter` — ``denoise(x, sigma[B, F], cond) -> x0`` in flow sigmas, via a
  :class:`~longgen.schedules.VPSchedule` built from the pipeline scheduler's own ``alphas_cumprod``.
* :func:`apply_per_frame_timesteps` — a removable diffusers hook (``HookRegistry`` / ``ModelHook``, the
  ``hooks/pyramid_attention_broadcast.py`` pattern) that gives the video tokens of latent frame ``f`` the
  adaptive-norm modulation of frame ``f``'s own timestep. It is inert unless a per-frame timestep is set
  for the call, so the uniform path is the stock model. The per-frame embeddings ride in ``temb``
  (``[B, T + 1, D]`` instead of ``[B, D]``), so gradient checkpointing recomputes blocks correctly.
* :class:`CogVideoXRotaryEmbedding` — the 3D RoPE that CogVideoX computes in the pipeline (not in the
  model), as a small module with the temporal inverse frequencies in a buffer, so RoPE extensions
  (PI, NTK, YaRN, RIFLEx) have one place to act.

Shapes: longgen latents are ``[B, C, F, H, W]``; the transformer consumes ``[B, F, C, H, W]`` and orders
its video tokens frames-outermost, ``(F / p_t) x (H / p) x (W / p)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..schedules import VPSchedule, shift_sigma
from .base import BackboneAdapter, Cond, WindowAttentionSpec, grid_from_hidden_states
from .capabilities import ImageConditioning, TemporalRopeFrequencies, WindowAttention
from .tiny import tiny_tokenizer

__all__ = [
    "PER_FRAME_TIMESTEP_HOOK",
    "CogVideoXAdapter",
    "CogVideoXRotaryEmbedding",
    "FrameAdaLayerNormHook",
    "FrameLayerNormZeroHook",
    "FrameOfsEmbeddingHook",
    "FrameTimeEmbeddingHook",
    "PerFrameTimestepModelHook",
    "PerFrameTimestepState",
    "apply_per_frame_timesteps",
    "per_frame_timesteps",
    "remove_per_frame_timesteps",
]

PER_FRAME_TIMESTEP_HOOK = "longgen_cogvideox_per_frame_timestep"
"""Name of the hooks :func:`apply_per_frame_timesteps` registers (on the model and its adaptive norms)."""

_TIMESTEP_SNAP_TOLERANCE = 1e-3
"""Continuous timesteps this close to an integer are rounded to it: a sigma that came from an integer
timestep (in float32) then reaches the model as exactly that timestep, as in the stock pipeline."""


_COGVIDEOX15_DEFAULT_SIZE = (768, 1360)
"""(height, width) recommended for CogVideoX 1.5 (THUDM/CogVideoX1.5-5B model card)."""


# ----------------------------------------------------------------------------------------------------
# Per-frame timestep embeddings through a removable hook
# ----------------------------------------------------------------------------------------------------
class PerFrameTimestepState:
    """Per-call state of the per-frame timestep hooks of one model.

    ``timesteps`` ``[B, F_latent]`` is set by :func:`per_frame_timesteps` for the calls inside its block;
    ``token_timesteps`` ``[B, T]`` (``T = F_latent / p_t`` token frames) lives only during one forward.
    The embeddings themselves do not live here: they travel through the model as ``temb`` of shape
    ``[B, T + 1, D]`` (T frame embeddings, then the text tokens' embedding), so that gradient
    checkpointing, which re-runs a block from its saved inputs after the forward has returned, re-runs
    it with the same per-frame modulation.
    """

    def __init__(self) -> None:
        self.timesteps: torch.Tensor | None = None
        self.token_timesteps: torch.Tensor | None = None

    def reset(self) -> None:
        self.timesteps = None
        self.token_timesteps = None


def _is_per_frame_temb(temb: torch.Tensor | None) -> bool:
    """The stock model's ``temb`` is ``[B, D]``; only :class:`FrameTimeEmbeddingHook` makes ``[B, T+1, D]``."""
    return temb is not None and temb.ndim == 3


def _expand_frames(values: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, int]:
    """``[B, T, D] -> [B, T, 1, D]`` for broadcasting over the ``num_tokens // T`` tokens of each frame."""
    num_frames = values.shape[1]
    if num_tokens % num_frames != 0:
        raise ValueError(
            f"{num_tokens} video tokens do not split into {num_frames} frames of equal size; the per-frame "
            "timesteps must have one entry per latent frame of the input"
        )
    return values[:, :, None, :], num_tokens // num_frames


class PerFrameTimestepModelHook(ModelHook):
    """On the transformer: turns the call's ``[B, F_latent]`` timesteps into token-frame timesteps and
    gives the stock forward their mean as its one timestep per sample.

    Why the mean *timestep* for the text tokens (it becomes the stock ``temb``, which the norm hooks use
    for text): the text stream has no frame of its own, it attends to and is attended by every frame,
    so one noise level summarising the clip is the natural choice; the embedding of the mean timestep is
    a real timestep embedding, a modulation the network saw in training (a mean of embeddings, pushed
    through the nonlinear time MLP, is not); and with uniform timesteps it is exactly the stock one.
    """

    def __init__(self, state: PerFrameTimestepState) -> None:
        super().__init__()
        self.state = state
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module):
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module, *args, **kwargs):
        timesteps = self.state.timesteps
        if timesteps is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        bound = self._signature.bind(module, *args, **kwargs)
        hidden_states = bound.arguments["hidden_states"]  # [B, F, C, H, W]
        batch_size, num_latent_frames = hidden_states.shape[:2]
        if timesteps.shape != (batch_size, num_latent_frames):
            raise ValueError(
                f"per-frame timesteps have shape {tuple(timesteps.shape)} but the model input has batch "
                f"{batch_size} and {num_latent_frames} latent frames; pass [B, F_latent] timesteps"
            )
        p_t = module.config.patch_size_t or 1
        if num_latent_frames % p_t:
            raise ValueError(
                f"{num_latent_frames} latent frames are not a multiple of patch_size_t={p_t}; pad the input"
            )
        timesteps = timesteps.to(device=hidden_states.device, dtype=torch.float32)
        # One token covers p_t latent frames: it gets their mean timestep.
        token_timesteps = timesteps.reshape(batch_size, num_latent_frames // p_t, p_t).mean(-1)  # [B, T]
        bound.arguments["timestep"] = token_timesteps.mean(dim=1)  # [B]: the text tokens' level, see above
        self.state.token_timesteps = token_timesteps
        try:
            return self.fn_ref.original_forward(*bound.args[1:], **bound.kwargs)
        finally:
            self.state.token_timesteps = None


class FrameTimeEmbeddingHook(ModelHook):
    """On ``time_embedding``: during a per-frame call, ``[B, D]`` becomes ``[B, T + 1, D]``.

    Rows ``0..T-1`` embed the token frames' timesteps, row ``T`` is the stock embedding of the mean
    timestep (the text tokens'). All rows go through the time MLP in one batch.
    """

    def __init__(self, state: PerFrameTimestepState, time_proj: nn.Module) -> None:
        super().__init__()
        self.state = state
        self.time_proj = time_proj

    def new_forward(self, module, sample, condition=None):
        token_timesteps = self.state.token_timesteps
        if token_timesteps is None:
            return self.fn_ref.original_forward(sample, condition)
        batch_size, num_token_frames = token_timesteps.shape
        frames = self.time_proj(token_timesteps.reshape(-1)).to(sample.dtype)  # [B*T, D_proj]
        rows = torch.cat([frames.view(batch_size, num_token_frames, -1), sample[:, None, :]], dim=1)
        if condition is not None:
            condition = condition.repeat_interleave(num_token_frames + 1, dim=0)
        emb = self.fn_ref.original_forward(rows.flatten(0, 1), condition)  # [B*(T+1), D]
        return emb.view(batch_size, num_token_frames + 1, -1)


class FrameOfsEmbeddingHook(ModelHook):
    """On ``ofs_embedding`` (CogVideoX 1.5 I2V): ``[B, D] -> [B, 1, D]`` so it adds to every row."""

    def __init__(self, state: PerFrameTimestepState) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        return output if self.state.token_timesteps is None else output[:, None, :]


class FrameLayerNormZeroHook(ModelHook):
    """``CogVideoXLayerNormZero`` with the shift/scale/gate of each video token taken from its frame."""

    def new_forward(self, module, hidden_states, encoder_hidden_states, temb):
        if not _is_per_frame_temb(temb):
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb)
        batch_size, num_tokens, dim = hidden_states.shape
        mod = module.linear(module.silu(temb))  # [B, T + 1, 6 * dim]
        shift, scale, gate, enc_shift, enc_scale, enc_gate = mod.chunk(6, dim=-1)
        scale, tokens_per_frame = _expand_frames(scale[:, :-1], num_tokens)  # [B, T, 1, dim]
        shift, _ = _expand_frames(shift[:, :-1], num_tokens)
        gate, _ = _expand_frames(gate[:, :-1], num_tokens)
        num_frames = scale.shape[1]
        normed = module.norm(hidden_states).view(batch_size, num_frames, tokens_per_frame, dim)
        hidden_states = (normed * (1 + scale) + shift).view(batch_size, num_tokens, dim)
        gate = gate.expand(-1, -1, tokens_per_frame, -1).reshape(batch_size, num_tokens, dim)
        enc_shift, enc_scale, enc_gate = enc_shift[:, -1], enc_scale[:, -1], enc_gate[:, -1]  # [B, dim]
        encoder_hidden_states = module.norm(encoder_hidden_states) * (1 + enc_scale)[:, None, :]
        encoder_hidden_states = encoder_hidden_states + enc_shift[:, None, :]
        return hidden_states, encoder_hidden_states, gate, enc_gate[:, None, :]


class FrameAdaLayerNormHook(ModelHook):
    """The final ``AdaLayerNorm`` (``norm_out``, shift-then-scale chunks) modulated per frame."""

    def new_forward(self, module, x, timestep=None, temb=None):
        if not _is_per_frame_temb(temb):
            return self.fn_ref.original_forward(x, timestep=timestep, temb=temb)
        batch_size, num_tokens, dim = x.shape
        shift, scale = module.linear(module.silu(temb[:, :-1])).chunk(2, dim=-1)  # [B, T, dim] each
        scale, tokens_per_frame = _expand_frames(scale, num_tokens)
        shift, _ = _expand_frames(shift, num_tokens)
        normed = module.norm(x).view(batch_size, scale.shape[1], tokens_per_frame, dim)
        return (normed * (1 + scale) + shift).view(batch_size, num_tokens, dim)


def apply_per_frame_timesteps(model: nn.Module) -> PerFrameTimestepState:
    """Let a stock ``CogVideoXTransformer3DModel`` take one timestep per latent frame (removable hooks).

    Diffusion Forcing (Chen et al. 2024) and FIFO-Diffusion (Kim et al. 2024) need a noise level per
    frame; CogVideoX embeds one per sample and feeds it to every ``CogVideoXLayerNormZero`` (shift, scale
    and gate for video and text tokens) and to ``norm_out``. The hooks make the video tokens of frame
    ``f`` use the embedding of frame ``f``'s timestep in all of them; text tokens use the embedding of the
    mean timestep (see :class:`PerFrameTimestepModelHook`). Idempotent; returns the shared state. Use
    :func:`per_frame_timesteps` to set timesteps for a call; without them the model is the stock model.
    """
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero

    if not isinstance(model, CogVideoXTransformer3DModel):
        raise TypeError(
            f"apply_per_frame_timesteps expects a CogVideoXTransformer3DModel, got {type(model).__name__}"
        )
    registry = HookRegistry.check_if_exists_or_initialize(model)
    existing = registry.get_hook(PER_FRAME_TIMESTEP_HOOK)
    if existing is not None:
        return existing.state
    if not (
        isinstance(model.norm_out, AdaLayerNorm)
        and model.norm_out.chunk_dim == 1
        and model.norm_out.emb is None
    ):
        raise ValueError("norm_out is not the CogVideoX AdaLayerNorm (chunk_dim=1, no embedding table)")
    state = PerFrameTimestepState()
    registry.register_hook(PerFrameTimestepModelHook(state), PER_FRAME_TIMESTEP_HOOK)
    hooks: list[tuple[nn.Module, ModelHook]] = [
        (model.time_embedding, FrameTimeEmbeddingHook(state, model.time_proj)),
        (model.norm_out, FrameAdaLayerNormHook()),
    ]
    if model.ofs_embedding is not None:
        hooks.append((model.ofs_embedding, FrameOfsEmbeddingHook(state)))
    hooks += [(m, FrameLayerNormZeroHook()) for m in model.modules() if isinstance(m, CogVideoXLayerNormZero)]
    for module, hook in hooks:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, PER_FRAME_TIMESTEP_HOOK)
    registry.invalidate_child_registries_cache()
    return state


def remove_per_frame_timesteps(model: nn.Module) -> None:
    """Remove the hooks of :func:`apply_per_frame_timesteps` (no-op when absent): the stock model again."""
    if not hasattr(model, "_diffusers_hook"):
        return
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(PER_FRAME_TIMESTEP_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def _per_frame_state(model: nn.Module) -> PerFrameTimestepState | None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(PER_FRAME_TIMESTEP_HOOK) if registry is not None else None
    return None if hook is None else hook.state


@contextmanager
def per_frame_timesteps(model: nn.Module, timesteps: torch.Tensor) -> Iterator[None]:
    """Within the block, model calls use ``timesteps`` ``[B, F_latent]`` (one per latent frame).

    The per-frame path runs even when all entries are equal (that is how tests force it). Requires
    :func:`apply_per_frame_timesteps` first.
    """
    state = _per_frame_state(model)
    if state is None:
        raise RuntimeError(
            "the per-frame timestep hook is not applied; call apply_per_frame_timesteps(model) first"
        )
    if timesteps.ndim != 2:
        raise ValueError(f"per-frame timesteps must be [B, F_latent], got shape {tuple(timesteps.shape)}")
    state.timesteps = timesteps
    try:
        yield
    finally:
        state.reset()


# ----------------------------------------------------------------------------------------------------
# Rotary embeddings
# ----------------------------------------------------------------------------------------------------
class CogVideoXRotaryEmbedding(nn.Module):
    """3D RoPE of CogVideoX (Su et al. 2021 rotary embeddings on (t, h, w)), computed outside the model.

    The head dimension splits into ``head/4`` temporal and ``3*head/8`` + ``3*head/8`` spatial channels,
    base 10000. Spatial parts come from diffusers' ``get_3d_rotary_pos_embed`` with the pipeline's grid
    (CogVideoX 1.0: the resize-crop region of the training grid; 1.5: "slice" grid); the temporal part
    is rebuilt from the ``temporal_inv_freq`` buffer at integer positions, which is what RoPE extensions
    change (PI: divide by the scale; NTK: recompute with a larger base; RIFLEx: lower one frequency).
    With the buffer untouched the output equals the pipeline's ``_prepare_rotary_positional_embeddings``.
    """

    temporal_inv_freq: torch.Tensor

    def __init__(
        self,
        attention_head_dim: int,
        patch_size: int,
        patch_size_t: int | None,
        sample_height: int,
        sample_width: int,
        train_latent_frames: int,
        base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.attention_head_dim = attention_head_dim
        self.temporal_dim = attention_head_dim // 4
        self.patch_size = patch_size
        self.patch_size_t = patch_size_t
        self.base_grid_height = sample_height // patch_size
        self.base_grid_width = sample_width // patch_size
        self.train_latent_frames = train_latent_frames
        self.base = base
        exponents = torch.arange(0, self.temporal_dim, 2, dtype=torch.float32) / self.temporal_dim
        self.register_buffer("temporal_inv_freq", 1.0 / (base**exponents), persistent=False)

    @property
    def train_positions(self) -> int:
        """Temporal RoPE positions the model was trained with (token frames: latent frames / p_t)."""
        p_t = self.patch_size_t or 1
        return -(-self.train_latent_frames // p_t)

    def forward(
        self, num_positions: int, grid_height: int, grid_width: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each ``[num_positions * grid_height * grid_width, attention_head_dim]``."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        if self.patch_size_t is None:
            crops = get_resize_crop_region_for_grid(
                (grid_height, grid_width), self.base_grid_width, self.base_grid_height
            )
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=self.attention_head_dim,
                crops_coords=crops,
                grid_size=(grid_height, grid_width),
                temporal_size=num_positions,
                theta=self.base,
                device=device,
            )
        else:
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=self.attention_head_dim,
                crops_coords=None,
                grid_size=(grid_height, grid_width),
                temporal_size=num_positions,
                theta=self.base,
                grid_type="slice",
                max_size=(self.base_grid_height, self.base_grid_width),
                device=device,
            )
        positions = torch.arange(num_positions, dtype=torch.float32, device=cos.device)
        angles = torch.outer(positions, self.temporal_inv_freq.to(device=cos.device, dtype=torch.float32))
        t_cos = angles.cos().repeat_interleave(2, dim=1)  # [T, temporal_dim], pairs as in diffusers
        t_sin = angles.sin().repeat_interleave(2, dim=1)
        grid = grid_height * grid_width
        cos = cos.view(num_positions, grid, -1).clone()  # (T, h*w, head_dim)
        sin = sin.view(num_positions, grid, -1).clone()
        cos[:, :, : self.temporal_dim] = t_cos[:, None, :]
        sin[:, :, : self.temporal_dim] = t_sin[:, None, :]
        return cos.view(num_positions * grid, -1), sin.view(num_positions * grid, -1)


# ----------------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------------
class CogVideoXAdapter(BackboneAdapter, TemporalRopeFrequencies, WindowAttention, ImageConditioning):
    """CogVideoX / CogVideoX 1.5, text-to-video and image-to-video, as a longgen denoiser.

    v-prediction on a VP schedule (Salimans & Ho 2022): with flow sigma ``s`` and
    ``n = sqrt((1 - s)^2 + s^2)``, the model input is ``x_vp = x / n`` (``sqrt(ab) / (1 - s)`` written
    so it stays finite at ``s = 1``), its timestep ``VPSchedule.sigma_to_timestep(s)`` and
    ``x0 = sqrt(ab) * x_vp - sqrt(1 - ab) * v`` with ``sqrt(ab) = (1 - s) / n``, ``sqrt(1 - ab) = s / n``.
    x0 is the same clean latent in both conventions.

    Per-frame sigmas that differ within a sample go through :func:`apply_per_frame_timesteps` (applied on
    first use); set ``force_per_frame_timesteps = True`` to take that path for uniform sigmas too.
    CogVideoX 1.5 (``patch_size_t = 2``): a window with an odd number of latent frames gets a copy of its
    first frame (and of that frame's sigma and image condition) in front — the pipeline also pads in
    front, with fresh noise — whose output is dropped; the two latent frames of one token share the mean
    of their timesteps.
    """

    family: ClassVar[str] = "cogvideox"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")
    model_attr: ClassVar[str] = "transformer"
    temporal_compression: ClassVar[int] = 4
    spatial_compression: ClassVar[int] = 8
    causal_vae: ClassVar[bool] = True
    patch_size: ClassVar[tuple[int, int, int]] = (1, 2, 2)
    prediction: ClassVar[str] = "v"
    native_per_frame_timesteps: ClassVar[bool] = False
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_num_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 6.0
    default_height: ClassVar[int] = 480
    default_width: ClassVar[int] = 720
    default_num_frames: ClassVar[int] = 49
    tiny_video_size: ClassVar[tuple[int, int, int]] = (13, 32, 48)
    supports_image_condition: ClassVar[bool] = False
    requires_image_condition: ClassVar[bool] = False

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None) -> None:
        super().__init__(pipe, native_video_size=native_video_size)
        cfg = self.model.config
        scheduler = pipe.scheduler
        if getattr(scheduler.config, "prediction_type", None) != "v_prediction":
            raise ValueError(
                f"CogVideoXAdapter expects a scheduler with prediction_type='v_prediction' (as every CogVideoX "
                f"release uses); got {getattr(scheduler.config, 'prediction_type', None)!r}. Fix the scheduler "
                "config in the model folder."
            )
        self.schedule = VPSchedule(scheduler.alphas_cumprod)
        self.force_per_frame_timesteps = False
        # Instance values from the loaded configs shadow the class defaults (CogVideoX 1.5 differs).
        vae_cfg = self.vae.config
        self.temporal_compression = int(vae_cfg.temporal_compression_ratio)
        self.spatial_compression = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.patch_size = (cfg.patch_size_t or 1, cfg.patch_size, cfg.patch_size)
        if cfg.patch_size_t is None:  # CogVideoX 1.0: the training size, as the pipeline's default
            self.default_height = cfg.sample_height * self.spatial_compression
            self.default_width = cfg.sample_width * self.spatial_compression
        else:  # 1.5: sample_height/width (300) are the RoPE grid bounds; the model card's size is 768x1360
            self.default_height, self.default_width = _COGVIDEOX15_DEFAULT_SIZE
        self.default_num_frames = cfg.sample_frames
        if native_video_size is None:
            self.native_video_size = (self.default_num_frames, self.default_height, self.default_width)
        self.image_to_video = cfg.in_channels == 2 * cfg.out_channels
        self.supports_image_condition = self.image_to_video
        self.requires_image_condition = self.image_to_video
        self._rope: CogVideoXRotaryEmbedding | None = None
        self._stock_temporal_inv_freq: torch.Tensor | None = None
        """The stock ``temporal_inv_freq`` while :meth:`set_temporal_rope_frequencies` has replaced it."""
        if cfg.use_rotary_positional_embeddings:
            train_latent_frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            self._rope = CogVideoXRotaryEmbedding(
                attention_head_dim=cfg.attention_head_dim,
                patch_size=cfg.patch_size,
                patch_size_t=cfg.patch_size_t,
                sample_height=cfg.sample_height,
                sample_width=cfg.sample_width,
                train_latent_frames=train_latent_frames,
            )

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0, image_to_video: bool = False, patch_size_t: int | None = None):
        """A tiny random CogVideoX pipeline (T5 d_model 32, 2 blocks, 4 latent channels); no downloads.

        ``image_to_video`` builds ``CogVideoXImageToVideoPipeline`` (transformer input doubles its channels
        for the image latents); ``patch_size_t=2`` gives a CogVideoX-1.5-style temporal patch, and both
        together the 1.5 I2V model's ``ofs`` embedding.
        """
        from diffusers import (
            AutoencoderKLCogVideoX,
            CogVideoXDDIMScheduler,
            CogVideoXImageToVideoPipeline,
            CogVideoXPipeline,
            CogVideoXTransformer3DModel,
        )
        from transformers import T5Config, T5EncoderModel

        num_frames, height, width = cls.tiny_video_size
        latent_channels, text_len = 4, 16
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=2 * latent_channels if image_to_video else latent_channels,
            out_channels=latent_channels,
            time_embed_dim=16,
            ofs_embed_dim=16 if (image_to_video and patch_size_t) else None,
            text_embed_dim=32,
            num_layers=2,
            sample_width=width // 8,
            sample_height=height // 8,
            sample_frames=num_frames,
            patch_size=2,
            patch_size_t=patch_size_t,
            temporal_compression_ratio=4,
            max_text_seq_length=text_len,
            use_rotary_positional_embeddings=True,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=latent_channels,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            sample_height=height,
            sample_width=width,
        )
        torch.manual_seed(seed + 2)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=64,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
            )
        )
        # The CogVideoX 2B scheduler config (5B differs only in snr_shift_scale=1.0).
        scheduler = CogVideoXDDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            snr_shift_scale=3.0,
            steps_offset=0,
            timestep_spacing="trailing",
        )
        pipe_cls = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
        return pipe_cls(
            tokenizer=tiny_tokenizer(model_max_length=text_len),
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )

    # --- shapes -------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.model.config.out_channels)

    # --- noise levels -------------------------------------------------------------------------
    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """DDIM-spaced flow sigmas of the scheduler's own table and ``timestep_spacing``, ending at 0.

        CogVideoX's SNR shift is already in the table; ``shift`` (SD3's, Esser et al. 2024) comes on top.
        """
        spacing = getattr(self.pipe.scheduler.config, "timestep_spacing", "trailing")
        sigmas = self.schedule.sigmas(num_steps, spacing=spacing)
        if shift is not None and shift != 1.0:
            sigmas = shift_sigma(sigmas.double(), shift).float()
        return sigmas

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timestep (float64) of flow sigmas, clamped to the table and snapped to near integers."""
        sigma = sigma.detach().double().cpu()
        t = self.schedule.sigma_to_timestep(sigma)
        rounded = t.round()
        t = torch.where((t - rounded).abs() < _TIMESTEP_SNAP_TOLERANCE, rounded, t)
        # Zero terminal SNR puts sigma_max within float32 rounding of 1 (1 - 1e-6); anything that rounds
        # to it is the last timestep (the table's huge last log-SNR step would otherwise leave t = 998.99).
        top = float(torch.tensor(self.schedule.sigma_max, dtype=torch.float32))
        return torch.where(sigma >= top, torch.full_like(t, self.schedule.num_train_timesteps - 1), t)

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
        """T5 prompt embeddings (the pipeline's own ``encode_prompt``) and, for I2V, the image latent.

        cond: ``prompt_embeds`` ``[B, L, D]``; I2V adds ``image_latents`` ``[B, C, 1, h, w]`` (scaled as
        the pipeline scales them; the negative cond carries the same image, as in the pipeline).
        """
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        if self.requires_image_condition and image is None:
            raise ValueError("this is an image-to-video CogVideoX model: pass `image` (the first frame)")
        if image is not None and not self.supports_image_condition:
            raise ValueError(
                "this CogVideoX model is text-to-video; `image` needs a CogVideoXImageToVideoPipeline folder"
            )
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            max_sequence_length=int(self.model.config.max_text_seq_length),
            device=self.device,
            dtype=self.dtype,
        )
        cond: Cond = {"prompt_embeds": prompt_embeds}
        uncond: Cond | None = {"prompt_embeds": negative_embeds} if do_classifier_free_guidance else None
        if image is not None:
            image_latents = self._encode_image(image, len(prompt), height, width)
            cond["image_latents"] = image_latents
            if uncond is not None:
                uncond["image_latents"] = image_latents
        return cond, uncond

    def _encode_image(self, image, batch_size: int, height: int | None, width: int | None) -> torch.Tensor:
        """First-frame latent ``[B, C, 1, h, w]``: VAE posterior mode, scaled as the I2V pipeline does."""
        height = height or self.native_video_size[1]
        width = width or self.native_video_size[2]
        pixels = self.pipe.video_processor.preprocess(image, height=height, width=width)  # [b, 3, H, W]
        pixels = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()  # [b, C, 1, h, w]
        factor = self.vae.config.scaling_factor
        latents = latents / factor if self.vae.config.invert_scale_latents else latents * factor
        if latents.shape[0] == 1 and batch_size > 1:
            latents = latents.expand(batch_size, -1, -1, -1, -1)
        if latents.shape[0] != batch_size:
            raise ValueError(
                f"got {latents.shape[0]} images for {batch_size} prompts; pass one image or one per prompt"
            )
        return latents.to(self.dtype)

    def rotary_embeddings(
        self, num_latent_frames: int, height: int, width: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE (cos, sin) for a latent window of ``num_latent_frames x height x width`` (None without RoPE)."""
        if self._rope is None:
            return None
        p_t, p, _ = self.patch_size
        return self._rope(-(-num_latent_frames // p_t), height // p, width // p, device=device)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 ``[B, C, F, H, W]`` (float32) for latents ``x`` at per-frame flow sigmas ``sigma`` ``[B, F]``."""
        self.check_denoise_inputs(x, sigma)
        batch_size, channels, num_latent_frames, height, width = x.shape
        if channels != self.latent_channels:
            raise ValueError(
                f"x has {channels} channels; this CogVideoX model's latents have {self.latent_channels}"
            )
        model, device, dtype = self.model, self.device, self.dtype

        s = sigma.to(device=device, dtype=torch.float64)
        norm = ((1.0 - s) ** 2 + s**2).sqrt()
        c_in = (1.0 / norm).float()[:, None, :, None, None]  # x_vp = c_in * x, [B, 1, F, 1, 1]
        c_x = ((1.0 - s) / norm**2).float()[:, None, :, None, None]  # sqrt(ab) * c_in
        c_v = (s / norm).float()[:, None, :, None, None]  # sqrt(1 - ab)
        timesteps = self.sigma_to_timestep(sigma).to(device)  # [B, F] float64

        x_vp = c_in * x.to(device=device, dtype=torch.float32)
        model_input = x_vp
        image_latents = cond.get("image_latents")
        if self.image_to_video:
            if image_latents is None:
                raise ValueError(
                    "image-to-video CogVideoX needs cond['image_latents'] (from encode_prompt(image=...))"
                )
            if image_latents.shape[-2:] != (height, width):
                raise ValueError(
                    f"cond['image_latents'] is {tuple(image_latents.shape[-2:])} latent pixels but x is "
                    f"{(height, width)}; encode the image with the height and width of the video"
                )
            # The image latent at frame 0 and zeros after it, as the pipeline builds it.
            image_video = x_vp.new_zeros(x_vp.shape)
            image_video[:, :, :1] = self._batched(image_latents, batch_size, "image_latents").to(image_video)
            model_input = torch.cat([x_vp, image_video], dim=1)  # [B, 2C, F, H, W]

        # CogVideoX 1.5 patches p_t latent frames per token: pad in front with copies of frame 0.
        p_t = self.patch_size[0]
        num_pad = (-num_latent_frames) % p_t
        if num_pad:
            model_input = torch.cat(
                [model_input[:, :, :1].expand(-1, -1, num_pad, -1, -1), model_input], dim=2
            )
            timesteps = torch.cat([timesteps[:, :1].expand(-1, num_pad), timesteps], dim=1)

        prompt_embeds = self._batched(cond["prompt_embeds"], batch_size, "prompt_embeds").to(device, dtype)
        kwargs: dict[str, Any] = {
            "hidden_states": model_input.to(dtype).permute(0, 2, 1, 3, 4),  # [B, F, C', H, W]
            "encoder_hidden_states": prompt_embeds,
            "image_rotary_emb": self.rotary_embeddings(model_input.shape[2], height, width, device=device),
            "return_dict": False,
        }
        if model.ofs_embedding is not None:  # CogVideoX 1.5 I2V: the pipeline's constant offset 2.0
            kwargs["ofs"] = x.new_full((batch_size,), 2.0, device=device, dtype=dtype)

        uniform = bool((timesteps == timesteps[:, :1]).all())
        with model.cache_context("cond_uncond"):
            if uniform and not self.force_per_frame_timesteps:
                v = model(timestep=timesteps[:, 0].float(), **kwargs)[0]
            else:
                apply_per_frame_timesteps(model)
                with per_frame_timesteps(model, timesteps.float()):
                    v = model(timestep=timesteps[:, 0].float(), **kwargs)[0]
        v = v.permute(0, 2, 1, 3, 4)[:, :, num_pad:].float()  # [B, C, F, H, W]
        return c_x * x.to(device=device, dtype=torch.float32) - c_v * v

    @staticmethod
    def _batched(value: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
        if value.shape[0] == batch_size:
            return value
        if value.shape[0] == 1:
            return value.expand(batch_size, *value.shape[1:])
        raise ValueError(f"cond[{name!r}] has batch {value.shape[0]} but x has batch {batch_size}")

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, H, W, 3]`` in [0, 1] (``T = 4k + 1``) -> model latents ``[B, C, k + 1, H/8, W/8]``.

        The posterior mode times ``scaling_factor``: the space the transformer was trained in.
        """
        self.num_latent_frames(frames.shape[1])
        pixels = (
            frames.permute(0, 4, 1, 2, 3).to(self.vae.device, self.vae.dtype) * 2.0 - 1.0
        )  # [B, 3, T, H, W]
        latents = self.vae.encode(pixels).latent_dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, 4(f-1)+1, H, W, 3]`` in [0, 1] from latents ``[B, C, f, h, w]``.

        CogVideoX's VAE decodes an odd number of latent frames as ``1 + 4k`` frames but an even number
        as ``4f`` (its causal first frame is only split off odd inputs). An even ``f`` therefore gets a
        copy of its last latent appended and that copy's 4 frames dropped; the causal convolutions keep
        the kept frames independent of the copy (only group-norm statistics of the last chunk see it).
        """
        num_latent_frames = latents.shape[2]
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.vae.config.scaling_factor
        if num_latent_frames % 2 == 0:
            z = torch.cat([z, z[:, :, -1:]], dim=2)
        video = self.vae.decode(z).sample  # [B, 3, F_pixel, H, W] in [-1, 1]
        video = video[:, :, : self.num_pixel_frames(num_latent_frames)]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)

    # --- what extensions and training need ----------------------------------------------------
    def rope_module(self) -> CogVideoXRotaryEmbedding | None:
        """The adapter-side RoPE helper (CogVideoX computes RoPE in the pipeline, not the model)."""
        return self._rope

    def rope_config(self) -> dict[str, Any] | None:
        """Temporal RoPE facts for extensions: channels, base and native length (None without RoPE).

        ``train_latent_frames`` counts latent frames; ``train_positions`` counts temporal RoPE positions
        (``ceil(train_latent_frames / patch_size_t)``, the two differ for CogVideoX 1.5).
        """
        if self._rope is None:
            return None
        return {
            "temporal_dim": self._rope.temporal_dim,
            "base": self._rope.base,
            "train_latent_frames": self._rope.train_latent_frames,
            "train_positions": self._rope.train_positions,
            "patch_size_t": self.patch_size[0],
            "attention_head_dim": self._rope.attention_head_dim,
        }

    rope_extension_methods: ClassVar[tuple[str, ...]] = ("pi", "ntk", "yarn", "riflex")
    """Temporal RoPE extensions :func:`longgen.extend.apply_rope_extension` can apply (models with RoPE)."""

    def require_rope(self) -> None:
        """A ValueError naming the fix for a checkpoint without RoPE (CogVideoX-2b)."""
        self._require_rope()

    def _require_rope(self) -> CogVideoXRotaryEmbedding:
        if self._rope is None:
            raise ValueError(
                "this CogVideoX model has no rotary position embeddings (use_rotary_positional_embeddings is "
                "off, as in CogVideoX-2b, which learns absolute positions); RoPE extension needs "
                "CogVideoX-5b, CogVideoX1.5 or another model with RoPE"
            )
        return self._rope

    def rope_axes(self) -> list[dict[str, Any]]:
        """Each RoPE axis (t, h, w): channels per head (head/4, 3head/8, 3head/8), base 10000 and frequencies
        (rad per token step, float64); the temporal ones are the module's ``temporal_inv_freq``."""
        rope = self._require_rope()
        head = rope.attention_head_dim
        pt, p, _ = self.patch_size
        axes = [{
            "axis": "t",
            "dim": rope.temporal_dim,
            "base": float(rope.base),
            "frequencies": self.temporal_rope_frequencies(),
            "unit": "latent frame" if pt == 1 else f"token frame ({pt} latent frames)",
        }]
        spatial_units = (("h", f"token row ({p} latent rows)"), ("w", f"token column ({p} latent columns)"))
        for axis, unit in spatial_units:
            dim = head // 8 * 3
            exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
            freqs = (1.0 / (rope.base**exponents)).double()
            axes.append(
                {"axis": axis, "dim": dim, "base": float(rope.base), "frequencies": freqs, "unit": unit}
            )
        return axes

    def temporal_rope_frequencies(self) -> torch.Tensor:
        """Stock temporal frequencies ``10000^(-2j / (head/4))`` (rad per temporal position), float64."""
        rope = self._require_rope()
        stock = self._stock_temporal_inv_freq
        return (rope.temporal_inv_freq if stock is None else stock).detach().double().cpu()

    def set_temporal_rope_frequencies(self, frequencies: torch.Tensor | None) -> None:
        """Write ``frequencies`` ``[temporal_dim / 2]`` into the RoPE module's ``temporal_inv_freq``
        (float32); ``None`` copies the stock values back (bit-exact removal)."""
        rope = self._require_rope()
        if frequencies is None:
            if self._stock_temporal_inv_freq is not None:
                rope.temporal_inv_freq.copy_(self._stock_temporal_inv_freq)
                self._stock_temporal_inv_freq = None
            return
        if frequencies.shape != rope.temporal_inv_freq.shape:
            raise ValueError(
                f"expected {rope.temporal_inv_freq.numel()} temporal frequencies, "
                f"got shape {tuple(frequencies.shape)}"
            )
        if self._stock_temporal_inv_freq is None:
            self._stock_temporal_inv_freq = rope.temporal_inv_freq.clone()
        rope.temporal_inv_freq.copy_(frequencies.detach().to(rope.temporal_inv_freq))

    def window_attention_spec(self) -> WindowAttentionSpec:
        """Every block's joint ``attn1`` (the processor concatenates ``[text; video]``, RoPE on the video part as
        ``image_rotary_emb``); the grid is ``hidden_states [B, F, C, H, W]`` over the patch sizes."""
        cfg = self.model.config
        patch = (int(cfg.patch_size_t or 1), int(cfg.patch_size), int(cfg.patch_size))
        return WindowAttentionSpec(
            layer_pattern=r"(^|\.)transformer_blocks\.\d+\.attn1$",
            token_grid=lambda model, args, kwargs: grid_from_hidden_states(model, args, kwargs, patch, frames_first=True),
            text_order="text_first",
        )

    def temporal_attention_modules(self) -> list[tuple[str, nn.Module]]:
        """Every block's ``attn1``: full 3D attention over text + all video tokens mixes frames."""
        return [
            (f"transformer_blocks.{i}.attn1", block.attn1)
            for i, block in enumerate(self.model.transformer_blocks)
        ]
