"""HunyuanVideo (Kong et al. 2024, "HunyuanVideo: A Systematic Framework for Large Video Generative Models").

The stock :class:`diffusers.HunyuanVideoTransformer3DModel` is a flow-matching MM-DiT: dual-stream
blocks (video and text tokens with their own weights, joint attention) followed by single-stream blocks
(one token sequence), with full 3D attention and 3D RoPE. It takes **one** timestep per sample:
``time_text_embed(timestep, pooled CLIP text, guidance)`` gives one conditioning vector ``temb`` that
modulates every token through adaLN-Zero. Per-frame noise levels therefore come from a removable hook
(:func:`apply_per_frame_timesteps`) that gives the video tokens of latent frame ``f`` the conditioning
vector of frame ``f``'s timestep; without a per-frame request the hook is inert and the model is the
stock one bit for bit.

Noise levels: ``timestep = sigma * 1000`` (``FlowMatchEulerDiscreteScheduler``'s timesteps), velocity
output ``v = eps - x0``, so ``x0 = x - sigma * v``. HunyuanVideo is guidance-distilled: the guidance
scale enters the model as an embedding (``guidance = 1000 * embedded_guidance_scale``, 6.0 in
``HunyuanVideoPipeline``), and true classifier-free guidance is off by default (scale 1).

Text: a Llama encoder reads the prompt inside a system prompt template, and the template's tokens are
cropped off (``crop_start``); CLIP-L gives the pooled vector. :func:`resolve_prompt_template` keeps the
shipped ``crop_start`` for the tokenizer the template was written for and counts it for any other (the
tiny test tokenizer).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from einops import rearrange

from ..schedules import flow_sigmas
from .base import BackboneAdapter, Cond, WindowAttentionSpec, grid_from_hidden_states
from .capabilities import TemporalRopeFrequencies, WindowAttention

__all__ = [
    "HunyuanVideoAdapter",
    "apply_per_frame_timesteps",
    "has_per_frame_timesteps",
    "per_frame_timesteps",
    "remove_per_frame_timesteps",
    "resolve_prompt_template",
    "text_timestep",
]

PER_FRAME_HOOK = "longgen_hunyuan_per_frame_timesteps"
"""Name under which every per-frame-timestep hook is registered (one name: removal by name removes all)."""


# ------------------------------------------------------------------------------------------------------
# Prompt template
# ------------------------------------------------------------------------------------------------------
def resolve_prompt_template(tokenizer, template: dict[str, Any]) -> dict[str, Any]:
    """The Llama prompt template with a ``crop_start`` that is right for ``tokenizer``.

    ``HunyuanVideoPipeline`` encodes ``template.format(prompt)`` and drops the first ``crop_start``
    hidden states (the system prompt), keeping the prompt's own tokens. The shipped template's 95 counts
    Llama-3 tokens; it is kept when the tokenizer has the template's ``<|...|>`` markers as single tokens
    (the tokenizer it was written for, so the stock pipeline is matched exactly). For any other
    tokenizer ``crop_start`` is counted: the length of the common prefix of the token ids of the template
    filled with two different one-word prompts, i.e. the number of tokens before the prompt.
    """
    text = template["template"]
    if text.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' for the prompt, got {text!r}")
    markers = set(re.findall(r"<\|[^|]+\|>", text))
    vocab = tokenizer.get_vocab()
    if template.get("crop_start") is not None and markers and all(m in vocab for m in markers):
        return dict(template)
    ids_a = tokenizer(text.format("red"))["input_ids"]
    ids_b = tokenizer(text.format("blue"))["input_ids"]
    crop_start = 0
    while crop_start < min(len(ids_a), len(ids_b)) and ids_a[crop_start] == ids_b[crop_start]:
        crop_start += 1
    if crop_start == min(len(ids_a), len(ids_b)):
        raise ValueError(
            "cannot locate the prompt inside the prompt template with this tokenizer (two different prompts "
            "tokenize identically); pass a prompt_template with an explicit crop_start"
        )
    return {"template": text, "crop_start": crop_start}


# ------------------------------------------------------------------------------------------------------
# Per-frame timesteps: a removable hook on the stock transformer
# ------------------------------------------------------------------------------------------------------
def text_timestep(timesteps: torch.Tensor) -> torch.Tensor:
    """``[B, F] -> [B]``: the timestep that conditions the text tokens under per-frame noise levels.

    Text tokens belong to no frame: they attend to, and are attended by, every frame alike, so their
    conditioning should describe the clip as a whole. longgen uses the mean timestep: the single level
    closest (in squared error) to all frames' levels, and, unlike an average of embeddings, a level
    whose embedding the model saw in training. Rows with one level give that level exactly, so a
    uniform per-frame call conditions the text exactly as the stock model does.
    """
    uniform = (timesteps == timesteps[:, :1]).all(dim=1)
    return torch.where(uniform, timesteps[:, 0], timesteps.mean(dim=1))


@dataclass
class _CallState:
    """Per-frame conditioning of the current model call."""

    temb: torch.Tensor
    """``[B, f, D]``: ``time_text_embed`` of each (post-patch) frame's timestep."""
    num_frames: int
    tokens_per_frame: int

    @property
    def num_video_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    def check(self, tokens: torch.Tensor, where: str) -> None:
        if tokens.shape[1] != self.num_video_tokens:
            raise RuntimeError(
                f"per-frame timesteps: {where} got {tokens.shape[1]} video tokens, expected "
                f"{self.num_frames} frames x {self.tokens_per_frame} = {self.num_video_tokens}. Something "
                "changed the token sequence (context-parallel sharding or another hook); per-frame noise "
                "levels need the whole sequence in frame-major order on one device."
            )

    def modulate(self, tokens: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """adaLN ``x * (1 + scale_f) + shift_f`` with each frame's own scale and shift ``[B, f, D]``."""
        x = rearrange(tokens, "b (f t) d -> b f t d", f=self.num_frames)
        x = x * (1 + scale[:, :, None]) + shift[:, :, None]
        return rearrange(x, "b f t d -> b (f t) d")

    def gate(self, tokens: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """adaLN-Zero gate ``x * gate_f`` with each frame's own gate ``[B, f, D]``."""
        x = rearrange(tokens, "b (f t) d -> b f t d", f=self.num_frames) * gate[:, :, None]
        return rearrange(x, "b f t d -> b (f t) d")


@dataclass
class _PerFrameState:
    request: torch.Tensor | None = None
    """``[B, F]`` model timesteps for the next model call (set by :func:`per_frame_timesteps`)."""
    call: _CallState | None = None
    """The current call's per-frame conditioning; kept after the call (gradient checkpointing recomputes
    blocks during backward) and replaced when the next call starts."""


@dataclass
class _BlockStash:
    """Modulations one block's norm hook computes for the hooks on the same block's later layers."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)


class _ModelTimestepHook(ModelHook):
    """On the transformer: turns a per-frame request into per-frame ``temb`` and the text timestep."""

    def __init__(self, state: _PerFrameState, sync) -> None:
        super().__init__()
        self.state = state
        self.sync = sync

    def initialize_hook(self, module):
        self.signature = inspect.signature(type(module).forward)
        return module

    def pre_forward(self, module, *args, **kwargs):
        request = self.state.request
        if request is None:
            self.state.call = None
            return args, kwargs
        self.sync()
        bound = self.signature.bind(module, *args, **kwargs)
        arguments = bound.arguments
        hidden_states = arguments["hidden_states"]
        batch, _, num_latent_frames, height, width = hidden_states.shape
        if request.shape != (batch, num_latent_frames):
            raise ValueError(
                f"per-frame timesteps must be [B, F] = [{batch}, {num_latent_frames}], got {tuple(request.shape)}"
            )
        cfg = module.config
        p, p_t = int(cfg.patch_size), int(cfg.patch_size_t)
        grouped = request.reshape(batch, num_latent_frames // p_t, p_t)  # (B, f, p_t)
        if p_t > 1 and not torch.all(grouped == grouped[..., :1]):
            raise ValueError(f"latent frames inside one temporal patch of {p_t} frames must share a timestep")
        frame_t = grouped[..., 0]  # (B, f)
        num_frames = frame_t.shape[1]
        pooled = arguments["pooled_projections"]
        guidance = arguments.get("guidance")
        temb, _ = module.time_text_embed(
            frame_t.reshape(-1),
            pooled.repeat_interleave(num_frames, dim=0),
            None if guidance is None else guidance.repeat_interleave(num_frames, dim=0),
        )
        self.state.call = _CallState(
            temb=temb.reshape(batch, num_frames, -1),
            num_frames=num_frames,
            tokens_per_frame=(height // p) * (width // p),
        )
        # The stock path computes the per-sample temb from this: it conditions the text tokens
        # (token refiner, text stream, text part of single-stream blocks).
        # Written back where the caller put it: ``apply_lora_scale`` reads ``attention_kwargs`` by keyword.
        new_timestep = text_timestep(request).to(request.dtype)
        index = list(self.signature.parameters).index("timestep") - 1  # without ``self``
        if len(args) > index:
            args = (*args[:index], new_timestep, *args[index + 1 :])
        else:
            kwargs = {**kwargs, "timestep": new_timestep}
        return args, kwargs


class _DualNormHook(ModelHook):
    """``AdaLayerNormZero`` of a dual-stream block's video stream, per frame.

    Returns the per-frame modulated tokens and neutral modulations (gate 1, shift 0, scale 0) for the
    block's own arithmetic; the per-frame gate and MLP modulations are stashed for the attention and
    feed-forward hooks of the same block. ``x * 1``, ``x * (1 + 0) + 0`` are exact, so the block computes
    exactly what it would with per-token modulations.
    """

    def __init__(self, state: _PerFrameState, stash: _BlockStash) -> None:
        super().__init__()
        self.state, self.stash = state, stash

    def new_forward(self, module, *args, **kwargs):
        call = self.state.call
        if call is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if getattr(module, "emb", None) is not None:
            raise NotImplementedError(
                "per-frame timesteps do not support AdaLayerNormZero with its own embedding"
            )
        x = args[0] if args else kwargs["x"]
        call.check(x, "AdaLayerNormZero")
        mods = module.linear(module.silu(call.temb))  # (B, f, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=-1)
        self.stash.values.update(
            gate_msa=gate_msa, shift_mlp=shift_mlp, scale_mlp=scale_mlp, gate_mlp=gate_mlp
        )
        x = call.modulate(module.norm(x), scale_msa, shift_msa)
        one = x.new_ones(x.shape[0], x.shape[-1])
        zero = x.new_zeros(x.shape[0], x.shape[-1])
        return x, one, zero, zero, one


class _DualAttnGateHook(ModelHook):
    """Multiplies the video output of a dual-stream block's joint attention by the per-frame gate."""

    def __init__(self, state: _PerFrameState, stash: _BlockStash) -> None:
        super().__init__()
        self.state, self.stash = state, stash

    def post_forward(self, module, output):
        call = self.state.call
        if call is None:
            return output
        video, text = output
        call.check(video, "joint attention")
        return call.gate(video, self.stash.values.pop("gate_msa")), text


class _DualFeedForwardHook(ModelHook):
    """Per-frame MLP shift/scale on a dual-stream block's video feed-forward input, gate on its output."""

    def __init__(self, state: _PerFrameState, stash: _BlockStash) -> None:
        super().__init__()
        self.state, self.stash = state, stash

    def pre_forward(self, module, *args, **kwargs):
        call = self.state.call
        if call is None:
            return args, kwargs
        v = self.stash.values
        if args:
            call.check(args[0], "feed-forward")
            args = (call.modulate(args[0], v.pop("scale_mlp"), v.pop("shift_mlp")), *args[1:])
        else:
            call.check(kwargs["hidden_states"], "feed-forward")
            kwargs["hidden_states"] = call.modulate(
                kwargs["hidden_states"], v.pop("scale_mlp"), v.pop("shift_mlp")
            )
        return args, kwargs

    def post_forward(self, module, output):
        call = self.state.call
        if call is None:
            return output
        return call.gate(output, self.stash.values.pop("gate_mlp"))


class _SingleNormHook(ModelHook):
    """``AdaLayerNormZeroSingle`` over ``[video; text]``: video tokens per frame, text per sample."""

    def __init__(self, state: _PerFrameState, stash: _BlockStash) -> None:
        super().__init__()
        self.state, self.stash = state, stash

    def new_forward(self, module, *args, **kwargs):
        call = self.state.call
        if call is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        emb = args[1] if len(args) > 1 else kwargs["emb"]
        n = call.num_video_tokens
        call.check(x[:, :n], "AdaLayerNormZeroSingle")
        shift_f, scale_f, gate_f = module.linear(module.silu(call.temb)).chunk(3, dim=-1)  # (B, f, D) each
        shift_s, scale_s, gate_s = module.linear(module.silu(emb)).chunk(3, dim=1)  # (B, D) each
        normed = module.norm(x)
        video = call.modulate(normed[:, :n], scale_f, shift_f)
        text = normed[:, n:] * (1 + scale_s[:, None]) + shift_s[:, None]
        self.stash.values.update(gate_f=gate_f, gate_s=gate_s)
        return torch.cat([video, text], dim=1), x.new_ones(x.shape[0], x.shape[-1])


class _SingleProjOutGateHook(ModelHook):
    """Gates a single-stream block's ``proj_out`` output: video per frame, text per sample."""

    def __init__(self, state: _PerFrameState, stash: _BlockStash) -> None:
        super().__init__()
        self.state, self.stash = state, stash

    def post_forward(self, module, output):
        call = self.state.call
        if call is None:
            return output
        n = call.num_video_tokens
        gate_f, gate_s = self.stash.values.pop("gate_f"), self.stash.values.pop("gate_s")
        return torch.cat([call.gate(output[:, :n], gate_f), output[:, n:] * gate_s[:, None]], dim=1)


class _OutNormHook(ModelHook):
    """The final ``AdaLayerNormContinuous`` (video tokens only), per frame."""

    def __init__(self, state: _PerFrameState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        call = self.state.call
        if call is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        call.check(x, "norm_out")
        mods = module.linear(module.silu(call.temb).to(x.dtype))  # (B, f, 2D)
        scale, shift = mods.chunk(2, dim=-1)
        return call.modulate(module.norm(x), scale, shift)


@dataclass
class _Site:
    """One hooked submodule, found again by (parent, attribute) so a replaced module is re-hooked."""

    parent: torch.nn.Module
    attr: str
    make_hook: Any
    module: torch.nn.Module | None = None


def _register(site: _Site) -> None:
    module = getattr(site.parent, site.attr)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(site.make_hook(), PER_FRAME_HOOK)
    site.module = module


def _sync_sites(sites: list[_Site]) -> None:
    """Move hooks whose module was replaced (e.g. PEFT wrapping ``proj_out`` in a LoRA layer)."""
    for site in sites:
        current = getattr(site.parent, site.attr)
        if current is site.module:
            continue
        old = getattr(site.module, "_diffusers_hook", None)
        if old is not None:
            old.remove_hook(PER_FRAME_HOOK, recurse=False)
        _register(site)


def apply_per_frame_timesteps(model: torch.nn.Module) -> None:
    """Hook a ``HunyuanVideoTransformer3DModel`` so video tokens of frame f get frame f's timestep.

    How ``temb`` flows in the stock model, and what the hooks change:

    * ``time_text_embed(timestep, pooled, guidance) -> temb [B, D]``: the model hook computes it for
      each frame's timestep (``[B, f, D]``) and passes the text timestep (:func:`text_timestep`) to the
      stock forward, whose per-sample ``temb`` then conditions everything that is text;
    * the token refiner (``context_embedder``) sees only text: it keeps the per-sample text timestep;
    * dual-stream blocks: ``norm1`` (video) is replaced per frame, with the gate after joint attention
      and the MLP shift/scale/gate moved onto ``attn`` and ``ff``; ``norm1_context`` (text) is stock;
    * single-stream blocks: ``norm`` modulates video tokens per frame and text tokens per sample, and
      the gate moves onto ``proj_out``;
    * ``norm_out`` (video only) is per frame.

    The hooks are inert until :func:`per_frame_timesteps` sets a request for a call. Idempotent. The
    image-to-video ``token_replace`` variant (other block classes) is not supported.
    """
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.models.transformers.transformer_hunyuan_video import (
        HunyuanVideoSingleTransformerBlock,
        HunyuanVideoTransformerBlock,
    )

    if not isinstance(model, HunyuanVideoTransformer3DModel):
        raise TypeError(
            f"per-frame timesteps hook a HunyuanVideoTransformer3DModel, got {type(model).__name__}"
        )
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(PER_FRAME_HOOK) is not None:
        return
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        if not isinstance(block, (HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock)):
            raise NotImplementedError(
                f"per-frame timesteps support HunyuanVideo's text-to-video blocks, not {type(block).__name__} "
                "(image_condition_type='token_replace'); use a text-to-video or latent_concat checkpoint"
            )
    state = _PerFrameState()
    sites: list[_Site] = []
    for block in model.transformer_blocks:
        stash = _BlockStash()
        sites.append(_Site(block, "norm1", lambda s=stash: _DualNormHook(state, s)))
        sites.append(_Site(block, "attn", lambda s=stash: _DualAttnGateHook(state, s)))
        sites.append(_Site(block, "ff", lambda s=stash: _DualFeedForwardHook(state, s)))
    for block in model.single_transformer_blocks:
        stash = _BlockStash()
        sites.append(_Site(block, "norm", lambda s=stash: _SingleNormHook(state, s)))
        sites.append(_Site(block, "proj_out", lambda s=stash: _SingleProjOutGateHook(state, s)))
    sites.append(_Site(model, "norm_out", lambda: _OutNormHook(state)))
    for site in sites:
        _register(site)
    registry.register_hook(_ModelTimestepHook(state, lambda: _sync_sites(sites)), PER_FRAME_HOOK)
    registry.invalidate_child_registries_cache()


def remove_per_frame_timesteps(model: torch.nn.Module) -> None:
    """Remove every hook :func:`apply_per_frame_timesteps` registered; the model is stock again."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(PER_FRAME_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def has_per_frame_timesteps(model: torch.nn.Module) -> bool:
    """Whether :func:`apply_per_frame_timesteps` hooks are on ``model``."""
    registry = getattr(model, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(PER_FRAME_HOOK) is not None


@contextmanager
def per_frame_timesteps(model: torch.nn.Module, timesteps: torch.Tensor) -> Iterator[None]:
    """Within the block, model calls use per-frame timesteps ``[B, F]`` (F latent frames).

    The model's own ``timestep`` argument is then replaced by :func:`text_timestep` of ``timesteps``.
    Needs :func:`apply_per_frame_timesteps` first.
    """
    registry = getattr(model, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(PER_FRAME_HOOK)
    if hook is None:
        raise RuntimeError(
            "call apply_per_frame_timesteps(model) before using per_frame_timesteps(model, ...)"
        )
    if timesteps.ndim != 2:
        raise ValueError(f"per-frame timesteps must be [B, F], got shape {tuple(timesteps.shape)}")
    hook.state.request = timesteps
    try:
        yield
    finally:
        hook.state.request = None


# ------------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------------
TEMPORAL_ROPE_HOOK = "longgen_hunyuan_video_temporal_rope"
"""Name of the hook :meth:`HunyuanVideoAdapter.set_temporal_rope_frequencies` puts on the RoPE module."""


class _TemporalRopeHook(ModelHook):
    """Replaces the temporal columns of ``HunyuanVideoRotaryPosEmbed``'s (cos, sin) with other frequencies.

    The stock module computes each axis's table from integer positions in float32
    (``get_1d_rotary_pos_embed``); this hook recomputes the first ``rope_dim[0]`` columns the same way
    from ``frequencies`` (float32), so the stock frequencies reproduce the stock output bit for bit.
    """

    def __init__(self, frequencies: torch.Tensor) -> None:
        super().__init__()
        self.frequencies = frequencies  # (rope_dim[0] / 2,) float32

    def new_forward(self, module, hidden_states, *args, **kwargs):
        cos, sin = self.fn_ref.original_forward(hidden_states, *args, **kwargs)  # (f*h*w, head_dim) each
        _, _, num_frames, height, width = hidden_states.shape
        num_positions = num_frames // module.patch_size_t
        tokens_per_frame = (height // module.patch_size) * (width // module.patch_size)
        t_dim = int(module.rope_dim[0])
        positions = torch.arange(num_positions, device=cos.device, dtype=torch.float32)
        angles = torch.outer(positions, self.frequencies.to(cos.device))  # (f, t_dim / 2)
        # frames outermost: token n sits at frame n // (h * w), as in the module's meshgrid
        t_cos = angles.cos().repeat_interleave(2, dim=1).float().repeat_interleave(tokens_per_frame, dim=0)
        t_sin = angles.sin().repeat_interleave(2, dim=1).float().repeat_interleave(tokens_per_frame, dim=0)
        cos, sin = cos.clone(), sin.clone()
        cos[:, :t_dim] = t_cos
        sin[:, :t_dim] = t_sin
        return cos, sin


class HunyuanVideoAdapter(BackboneAdapter, TemporalRopeFrequencies, WindowAttention):
    """HunyuanVideo adapter: flow prediction, one timestep per sample made per frame by a hook.

    Settings (instance attributes): ``embedded_guidance_scale`` (the distilled guidance the model
    embeds, 6.0 as ``HunyuanVideoPipeline``; a cond's ``guidance`` entry carries ``1000 *`` it),
    ``max_sequence_length`` (Llama prompt tokens after the template crop, 256), ``prompt_template``
    (diffusers' template with ``crop_start`` resolved for the loaded tokenizer) and
    ``force_per_frame_timesteps`` (run the per-frame hook even for uniform noise levels; tests).
    """

    family: ClassVar[str] = "hunyuan_video"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("HunyuanVideoPipeline",)
    model_attr: ClassVar[str] = "transformer"
    temporal_compression: ClassVar[int] = 4
    spatial_compression: ClassVar[int] = 8
    causal_vae: ClassVar[bool] = True
    patch_size: ClassVar[tuple[int, int, int]] = (1, 2, 2)
    prediction: ClassVar[str] = "flow"
    native_per_frame_timesteps: ClassVar[bool] = False
    lora_target_modules: ClassVar[tuple[str, ...]] = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )
    """Both streams' attention projections (single-stream blocks have no ``to_out``: their output goes
    through ``proj_out`` together with the MLP)."""
    default_num_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 1.0
    """True CFG scale: 1 (off), as ``HunyuanVideoPipeline(true_cfg_scale=1.0)``; the distilled guidance
    is ``embedded_guidance_scale``."""
    default_embedded_guidance_scale: ClassVar[float] = 6.0
    default_max_sequence_length: ClassVar[int] = 256
    default_height: ClassVar[int] = 720
    default_width: ClassVar[int] = 1280
    default_num_frames: ClassVar[int] = 129
    """``HunyuanVideoPipeline``'s defaults: 129 frames (33 latent frames) at 1280x720, 50 steps."""
    default_shift: ClassVar[float] = 7.0
    """HunyuanVideo's flow shift (``--flow-shift 7.0``; the shipped scheduler's ``shift``)."""
    train_latent_frames: ClassVar[int] = 33
    tiny_video_size: ClassVar[tuple[int, int, int]] = (17, 32, 32)

    def __init__(self, pipe, native_video_size: tuple[int, int, int] | None = None):
        super().__init__(pipe, native_video_size)
        cfg = self.model.config
        # Read from the loaded components: a variant with other strides or patches stays consistent.
        self.patch_size = (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))
        if getattr(pipe, "vae", None) is not None:
            self.temporal_compression = int(pipe.vae.temporal_compression_ratio)
            self.spatial_compression = int(pipe.vae.spatial_compression_ratio)
        self.embedded_guidance_scale: float = self.default_embedded_guidance_scale
        self.max_sequence_length: int = self.default_max_sequence_length
        self.force_per_frame_timesteps: bool = False
        self.prompt_template: dict[str, Any] | None = None
        if getattr(pipe, "tokenizer", None) is not None:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

            self.prompt_template = resolve_prompt_template(pipe.tokenizer, DEFAULT_PROMPT_TEMPLATE)

    # --- construction -------------------------------------------------------------------------
    # Over ~80 lines on purpose: one flat literal config per tiny component, read top to bottom.
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny random ``HunyuanVideoPipeline``: 2 dual + 2 single blocks, tiny causal VAE, Llama + CLIP.

        The Llama encoder has 3 layers because the pipeline reads the hidden state 2 layers before the
        last: with 2 layers that would be the bare token embeddings.
        """
        from diffusers import (
            AutoencoderKLHunyuanVideo,
            FlowMatchEulerDiscreteScheduler,
            HunyuanVideoPipeline,
            HunyuanVideoTransformer3DModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        from .tiny import tiny_tokenizer

        latent_channels, text_dim, vocab = 4, 32, 64
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=text_dim,
            pooled_projection_dim=text_dim,
            rope_theta=256.0,
            rope_axes_dim=(4, 6, 6),  # sums to the head dim 16, like (16, 56, 56) for 128
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        )
        torch.manual_seed(seed + 2)
        # Llama-3 tokenizers add BOS and no EOS; CLIP's add both and pool at the first EOS.
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=text_dim,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=3,
            )
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=text_dim,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=text_dim,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=3,
            )
        )
        return HunyuanVideoPipeline(
            text_encoder=text_encoder,
            tokenizer=tiny_tokenizer(model_max_length=1024, vocab_size=vocab, bos=True, eos=False),
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=cls.default_shift),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tiny_tokenizer(model_max_length=77, vocab_size=vocab, bos=True, eos=True),
        )

    # --- noise levels -------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        scheduler = getattr(self.pipe, "scheduler", None)
        return int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000))

    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """``HunyuanVideoPipeline``'s sigmas: ``linspace(1, 0, N+1)[:-1]`` shifted by the scheduler's shift, then 0."""
        if shift is None:
            scheduler = getattr(self.pipe, "scheduler", None)
            shift = float(getattr(getattr(scheduler, "config", None), "shift", self.default_shift))
        return flow_sigmas(num_steps, shift=shift)

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
        """Llama (template-cropped) and CLIP-pooled embeddings via ``HunyuanVideoPipeline.encode_prompt``.

        Returns conds ``{"encoder_hidden_states": [B, L, D], "encoder_attention_mask": [B, L],
        "pooled_projections": [B, P], "guidance": [B] or None}``; the negative prompt defaults to "".
        """
        if image is not None:
            raise ValueError(
                "longgen's HunyuanVideo adapter is text-to-video (HunyuanVideoPipeline); pass image=None"
            )
        if self.prompt_template is None:
            raise ValueError(
                "this pipeline has no Llama tokenizer; load it with its text encoders to encode prompts"
            )
        if isinstance(prompt, str):
            prompt = [prompt]
        cond = self._encode(prompt)
        uncond = None
        if do_classifier_free_guidance:
            if negative_prompt is None:
                negative_prompt = [""] * len(prompt)
            elif isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(prompt)
            if len(negative_prompt) != len(prompt):
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompt)} prompts")
            uncond = self._encode(negative_prompt)
        return cond, uncond

    def _encode(self, prompt: list[str]) -> Cond:
        embeds, pooled, mask = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_template=self.prompt_template,
            num_videos_per_prompt=1,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        dtype = self.dtype
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full(
                (len(prompt),), float(self.embedded_guidance_scale), device=self.device, dtype=dtype
            )
            guidance = guidance * 1000.0
        return {
            "encoder_hidden_states": embeds.to(dtype),
            "encoder_attention_mask": mask.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "guidance": guidance,
        }

    def predict_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The model's own output ``v = eps - x0`` (float32) for ``x`` ``[B, C, F, H, W]`` at sigmas ``[B, F]``.

        Uniform rows call the stock model with ``timestep = sigma * 1000`` exactly as
        ``HunyuanVideoPipeline`` does; otherwise (or with ``force_per_frame_timesteps``) the per-frame hook
        runs, installed on first use and inert between calls.
        """
        self.check_denoise_inputs(x, sigma)
        batch, _, num_latent_frames, height, width = x.shape
        pt, p, _ = self.patch_size
        if num_latent_frames % pt or height % p or width % p:
            raise ValueError(
                f"latent size {num_latent_frames}x{height}x{width} is not divisible by the transformer patch "
                f"{self.patch_size}; pick pixel sizes with adapter.latent_shape()"
            )
        model = self.model
        # The pipeline's timesteps: the scheduler's float32 sigmas times num_train_timesteps.
        timesteps = sigma.to(x.device, torch.float32) * float(self.num_train_timesteps)
        guidance = cond.get("guidance")
        inputs = dict(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            pooled_projections=cond["pooled_projections"],
            guidance=guidance,
            attention_kwargs=cond.get("attention_kwargs"),
            return_dict=False,
        )
        uniform = bool((timesteps == timesteps[:, :1]).all())
        if uniform and not self.force_per_frame_timesteps:
            return model(timestep=timesteps[:, 0], **inputs)[0].float()
        apply_per_frame_timesteps(model)
        with per_frame_timesteps(model, timesteps):
            return model(timestep=text_timestep(timesteps), **inputs)[0].float()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 for latents ``x`` ``[B, C, F, H, W]`` at per-frame flow sigmas ``[B, F]``: ``x - sigma * v``."""
        velocity = self.predict_velocity(x, sigma, cond)
        return x.float() - sigma.to(x.device, torch.float32)[:, None, :, None, None] * velocity

    def remove_per_frame_hook(self) -> None:
        """Take the per-frame-timestep hooks off the model (they are re-added on the next per-frame call)."""
        remove_per_frame_timesteps(self.model)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, H, W, 3]`` in [0, 1] (T = 4k+1) -> model latents ``[B, C, k+1, H/8, W/8]`` (posterior mode)."""
        self.num_latent_frames(frames.shape[1])
        pixels = rearrange(frames, "b t h w c -> b c t h w").to(self.vae.device, self.vae.dtype) * 2.0 - 1.0
        latents = self.vae.encode(pixels).latent_dist.mode()
        return latents.float() * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode model latents ``[B, C, f, h, w]`` to frames ``[B, 4(f-1)+1, 8h, 8w, 3]`` in [0, 1].

        As ``HunyuanVideoPipeline``: divide by the VAE's ``scaling_factor``, decode, map [-1, 1] to [0, 1].
        """
        vae = self.vae
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        video = vae.decode(z, return_dict=False)[0]  # (B, 3, T, H, W) in [-1, 1]
        return rearrange((video.float() / 2.0 + 0.5).clamp(0.0, 1.0), "b c t h w -> b t h w c")

    # --- what extensions and training need ----------------------------------------------------
    def rope_module(self) -> torch.nn.Module:
        """``HunyuanVideoRotaryPosEmbed``: integer (frame, row, column) positions, axes dims ``rope_dim``."""
        return self.model.rope

    def rope_config(self) -> dict[str, Any]:
        """The temporal RoPE axis: its dims (16 of head 128), base (256) and native latent frames (33)."""
        rope = self.model.rope
        return dict(
            temporal_dim=int(rope.rope_dim[0]),
            base=float(rope.theta),
            train_latent_frames=self.train_latent_frames,
        )

    rope_extension_methods: ClassVar[tuple[str, ...]] = ("pi", "ntk", "yarn", "riflex")
    """Temporal RoPE extensions :func:`longgen.extend.apply_rope_extension` can apply to this family."""

    def rope_axes(self) -> list[dict[str, Any]]:
        """Each RoPE axis (t, h, w): channels per head (``rope_dim``), base (``theta``, 256) and frequencies
        ``theta^(-2j / dim)`` (rad per token step, float64), computed in float32 as the stock module does."""
        rope = self.model.rope
        pt, p, _ = self.patch_size
        units = (
            "latent frame" if pt == 1 else f"token frame ({pt} latent frames)",
            f"token row ({p} latent rows)",
            f"token column ({p} latent columns)",
        )
        axes = []
        for axis, dim, unit in zip(("t", "h", "w"), rope.rope_dim, units):
            dim = int(dim)
            exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=self.device) / dim
            freqs = (1.0 / (rope.theta**exponents)).double().cpu()  # (dim / 2,)
            axes.append(
                {"axis": axis, "dim": dim, "base": float(rope.theta), "frequencies": freqs, "unit": unit}
            )
        return axes

    def temporal_rope_frequencies(self) -> torch.Tensor:
        """Stock temporal frequencies ``256^(-2j / rope_dim[0])`` (rad per latent frame): the module's
        float32 values, held in float64."""
        return self.rope_axes()[0]["frequencies"]

    def set_temporal_rope_frequencies(self, frequencies: torch.Tensor | None) -> None:
        """Make the RoPE module use ``frequencies`` ``[rope_dim[0] / 2]`` on the temporal axis (a removable
        hook, :data:`TEMPORAL_ROPE_HOOK`); ``None`` removes the hook, restoring the stock module."""
        rope = self.model.rope
        registry = HookRegistry.check_if_exists_or_initialize(rope)
        registry.remove_hook(TEMPORAL_ROPE_HOOK, recurse=False)
        if frequencies is None:
            return
        t_dim = int(rope.rope_dim[0])
        if frequencies.shape != (t_dim // 2,):
            raise ValueError(
                f"expected {t_dim // 2} temporal frequencies, got shape {tuple(frequencies.shape)}"
            )
        hook = _TemporalRopeHook(frequencies.detach().float().to(self.device))
        registry.register_hook(hook, TEMPORAL_ROPE_HOOK)

    def window_attention_spec(self) -> WindowAttentionSpec:
        """The joint ``attn`` of the dual- and single-stream blocks (``[video; text]``, RoPE on the video part;
        the text-only token refiner is left out). The per-frame-timestep hooks gate the dual-stream attention
        output per frame on the same module, so they are removed before window hooks and re-added outermost on
        the next per-frame call."""
        cfg = self.model.config
        patch = (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))
        return WindowAttentionSpec(
            layer_pattern=r"(^|\.)(single_)?transformer_blocks\.\d+\.attn$",
            token_grid=lambda model, args, kwargs: grid_from_hidden_states(model, args, kwargs, patch),
            text_order="text_last",
            before_hooks=self.remove_per_frame_hook,
        )

    def temporal_attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Every dual- and single-stream block's ``attn``: full 3D attention over all frames (the token
        refiner's attention sees only text)."""
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn", name)
        ]
