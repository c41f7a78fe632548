"""ExVideo (Duan et al. 2024): post-tuning extension of a video UNet's temporal modules to longer clips.

ExVideo (modelscope/DiffSynth-Studio, ``examples/ExVideo/ExVideo_svd_train.py`` and
``diffsynth/models/svd_unet.py``) lets Stable Video Diffusion generate 128 frames instead of 25 by

1. replacing the fixed temporal position embedding with a *trainable* table of ``N`` rows, initialised
   from the fixed embedding at *reflected* position ids: ``0 .. F-1`` and then back and forth inside the
   trained range (:func:`reflected_position_ids`), so every row starts from a position the model knows;
2. adding a ``Conv3d(C, C, 3)`` with reflect padding after the position embedding in every temporal
   block, initialised to the identity (centre tap = identity matrix, all other taps and the bias 0);
3. post-tuning only these and the temporal blocks; everything else stays frozen.

Identity initialisation makes the extended model reproduce the stock one exactly at the trained length.

Where the table and the convolution go is model-specific and declared by the backbone adapter through
``exvideo_sites()`` (a list of :class:`ExVideoSite`): for SVD the table replaces the sinusoid that each
``TransformerSpatioTemporalModel`` feeds into ``time_pos_embed`` and the convolution runs on the input of each
temporal transformer block; for AnimateDiff the table replaces each motion-module ``pos_embed`` buffer and the
convolution follows that embedding. The convolution works on ``[B, C, F, H, W]`` feature maps, so each site
records the feature-map size ``(H, W)`` from its temporal transformer's input ``[B*F, C, H, W]`` with a
pre-forward hook.

Everything is undone by :func:`remove_exvideo` (tables, convolutions, hooks, ``requires_grad`` flags), after
which the model is the stock model bit for bit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..backbones.capabilities import ExVideoSites
from .configs import ExVideoConfig
from .hooks import WINDOW_FUSION_HOOK, has_hook

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

__all__ = [
    "ExVideoConfig",
    "ExVideoSite",
    "ExVideoState",
    "IdentityConv3d",
    "apply_exvideo",
    "exvideo_state",
    "exvideo_trainable_parameters",
    "reflected_position_ids",
    "remove_exvideo",
]

_TABLE_HOOK = "longgen_exvideo_table"
_SIZE_HOOK = "longgen_exvideo_size"
_CONV_HOOK = "longgen_exvideo_conv"
TABLE_ATTR = "exvideo_table"
CONV_ATTR = "exvideo_conv"


@dataclass(frozen=True, eq=False)
class ExVideoSite:
    """Where ExVideo attaches in one temporal transformer; adapters return these from ``exvideo_sites()``."""

    name: str
    """The temporal transformer's module name (for messages)."""
    transformer: nn.Module
    """Called with hidden states ``[B*F, C, H, W]`` (first argument): its input gives the size the Conv3d needs."""
    position: nn.Module
    """The frame-position module the trainable table replaces."""
    position_kind: Literal["ids", "additive"]
    """``ids``: ``position(frame_ids [B*F]) -> [B*F, D]`` (SVD's sinusoidal ``time_proj``); the table is looked
    up by frame id. ``additive``: the module has a buffer ``pe`` ``[1, P, D]`` and returns ``x + pe[:, :F]`` for
    ``x`` ``[N, F, D]`` (AnimateDiff's ``SinusoidalPositionalEmbedding``); the table replaces ``pe`` and the Conv3d
    follows the module on its output ``[B*H*W, F, D]``."""
    conv_blocks: tuple[nn.Module, ...] = ()
    """``ids`` sites: the temporal blocks that get a Conv3d on their input ``[B*F, H*W, C]`` (they take
    ``num_frames`` as the second argument or keyword)."""
    trainable: tuple[nn.Module, ...] = ()
    """The temporal blocks ExVideo post-tunes together with the new table and convolutions."""


def reflected_position_ids(
    num_positions: int, num_trained: int, repeat_length: int | None = None
) -> torch.Tensor:
    """ExVideo's position ids (DiffSynth ``PositionalID``): ``0 .. M-1``, then back and forth inside the trained range.

    Frame ``f < M`` (``M = num_trained``) keeps id ``f``. Later frames bounce between ``M - 1`` and
    ``M - 1 - repeat_length``: with ``p = (f - M) mod 2R``, id ``= M - 2 - p`` for ``p < R`` and
    ``M - 2R + p`` otherwise. The default ``R = M - 1`` reflects over the whole trained range
    (``0..M-1, M-2..0, 1..M-1, ...``); DiffSynth's SVD-XT release uses ``M = 25, R = 20``.
    """
    if num_trained < 1 or num_positions < 1:
        raise ValueError(f"need positive sizes, got num_positions={num_positions}, num_trained={num_trained}")
    repeat = num_trained - 1 if repeat_length is None else repeat_length
    if num_positions > num_trained and not 1 <= repeat <= num_trained - 1:
        raise ValueError(
            f"repeat_length must be in [1, num_trained - 1] = [1, {num_trained - 1}] to reflect inside the trained "
            f"positions, got {repeat}"
        )
    ids = []
    for f in range(num_positions):
        if f < num_trained:
            ids.append(f)
            continue
        p = (f - num_trained) % (2 * repeat)
        ids.append(num_trained - 2 - p if p < repeat else num_trained - 2 * repeat + p)
    return torch.tensor(ids, dtype=torch.long)


class IdentityConv3d(nn.Conv3d):
    """ExVideo's positional ``Conv3d(C, C, 3)`` with reflect padding, initialised to the identity map.

    The centre tap is the identity matrix and every other tap and the bias are zero, so the output equals the
    input exactly until training moves it. Padding is reflect (as DiffSynth's ``padding_mode="reflect"``) on
    every axis longer than 1 and replicate on axes of length 1 (one frame, a 1-pixel feature map), where a
    reflection does not exist.
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__(channels, channels, kernel_size=3, padding=0, device=device, dtype=dtype)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :, 1, 1, 1].copy_(torch.eye(channels, device=device, dtype=dtype))
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, F, H, W]
        for dim in (2, 3, 4):  # pad one axis at a time: reflect where possible
            pad = [0] * 6
            pad[2 * (4 - dim) : 2 * (4 - dim) + 2] = [1, 1]  # F.pad lists the last axis first
            x = F.pad(x, pad, mode="reflect" if x.shape[dim] > 1 else "replicate")
        return super().forward(x)


@dataclass(eq=False)
class _SizeRecord:
    """(H, W) of a temporal transformer's current input; set by its size hook on every call."""

    name: str
    size: tuple[int, int] | None = None


@dataclass(eq=False)
class _SiteState:
    site: ExVideoSite
    record: _SizeRecord
    original_pe: torch.Tensor | None = None


@dataclass(eq=False)
class ExVideoState:
    """What :func:`apply_exvideo` changed, so that :func:`remove_exvideo` can undo it exactly."""

    num_positions: int
    num_trained: int
    position_ids: torch.Tensor
    sites: list[_SiteState] = field(default_factory=list)
    new_parameters: list[nn.Parameter] = field(default_factory=list)
    trainable_modules: list[nn.Module] = field(default_factory=list)
    requires_grad_before: dict[str, bool] = field(default_factory=dict)

    def describe(self) -> dict:
        """JSON summary (the registry handle's ``details``)."""
        return {
            "num_positions": self.num_positions,
            "num_trained": self.num_trained,
            "sites": [s.site.name for s in self.sites],
            "num_new_parameters": sum(p.numel() for p in self.new_parameters),
        }


_STATES: weakref.WeakKeyDictionary[nn.Module, ExVideoState] = weakref.WeakKeyDictionary()


def exvideo_state(adapter: BackboneAdapter) -> ExVideoState | None:
    """The ExVideo state of the adapter's model, or None if ExVideo is not applied."""
    return _STATES.get(adapter.model)


# ------------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------------
class _SizeHook(ModelHook):
    """Records ``(H, W)`` of the temporal transformer's input ``[B*F, C, H, W]``."""

    def __init__(self, record: _SizeRecord):
        super().__init__()
        self.record = record

    def pre_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 4:
            raise RuntimeError(
                f"ExVideo expected {self.record.name} to take hidden states [B*F, C, H, W]; got "
                f"{None if hidden is None else tuple(hidden.shape)}"
            )
        self.record.size = (int(hidden.shape[-2]), int(hidden.shape[-1]))
        return args, kwargs


class _TableLookupHook(ModelHook):
    """Replaces a frame-id -> embedding module (SVD ``time_proj``) by a lookup in the trainable table."""

    def __init__(self, table: nn.Parameter, name: str):
        super().__init__()
        self.table = table
        self.name = name

    def new_forward(self, module, timesteps: torch.Tensor, *args, **kwargs):
        ids = timesteps.long()
        if int(ids.max()) >= self.table.shape[0] or int(ids.min()) < 0:
            raise ValueError(
                f"ExVideo's position table of {self.name} covers {self.table.shape[0]} frames but frame id "
                f"{int(ids.max())} was requested; apply_exvideo with num_latent_frames >= the clip's latent frames"
            )
        return self.table[ids]  # [B*F, D]


def _conv_frames_major(
    conv: nn.Module, x: torch.Tensor, num_frames: int, size: tuple[int, int]
) -> torch.Tensor:
    """Conv3d on tokens ``[B*F, H*W, C]`` (frames folded in the batch, SVD's temporal-block input)."""
    height, width = size
    batch_frames, seq, channels = x.shape
    if seq != height * width or batch_frames % num_frames:
        raise RuntimeError(
            f"cannot fold tokens {tuple(x.shape)} into {num_frames} frames of {height}x{width}"
        )
    video = x.reshape(batch_frames // num_frames, num_frames, height, width, channels)  # [B, F, H, W, C]
    video = conv(video.permute(0, 4, 1, 2, 3))  # [B, C, F, H, W]
    return video.permute(0, 2, 3, 4, 1).reshape(batch_frames, seq, channels)


def _conv_pixels_major(conv: nn.Module, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Conv3d on tokens ``[B*H*W, F, C]`` (pixels folded in the batch, a motion module's attention input)."""
    height, width = size
    rows, num_frames, channels = x.shape
    if rows % (height * width):
        raise RuntimeError(f"cannot fold tokens {tuple(x.shape)} into {height}x{width} feature maps")
    video = x.reshape(rows // (height * width), height, width, num_frames, channels)  # [B, H, W, F, C]
    video = conv(video.permute(0, 4, 3, 1, 2))  # [B, C, F, H, W]
    return video.permute(0, 3, 4, 2, 1).reshape(rows, num_frames, channels)


class _ConvBeforeBlockHook(ModelHook):
    """ExVideo's Conv3d on a temporal block's input ``[B*F, H*W, C]`` (after the position embedding was added)."""

    def __init__(self, conv: nn.Module, state: _SiteState):
        super().__init__()
        self.conv = conv
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        if "num_frames" in kwargs:
            num_frames = kwargs["num_frames"]
        elif len(args) > 1:
            num_frames = args[1]
        else:
            raise RuntimeError(
                f"ExVideo: a temporal block of {self.state.site.name} was called without num_frames"
            )
        if args:
            args = (
                _conv_frames_major(self.conv, args[0], int(num_frames), self.state.record.size),
                *args[1:],
            )
        else:
            kwargs["hidden_states"] = _conv_frames_major(
                self.conv, kwargs["hidden_states"], int(num_frames), self.state.record.size
            )
        return args, kwargs


class _ConvAfterPositionHook(ModelHook):
    """ExVideo's Conv3d on the output ``[B*H*W, F, C]`` of an additive position embedding."""

    def __init__(self, conv: nn.Module, state: _SiteState):
        super().__init__()
        self.conv = conv
        self.state = state

    def post_forward(self, module, output: torch.Tensor) -> torch.Tensor:
        return _conv_pixels_major(self.conv, output, self.state.record.size)


# ------------------------------------------------------------------------------------------------
# apply / remove
# ------------------------------------------------------------------------------------------------
def _sites(adapter: BackboneAdapter) -> list[ExVideoSite]:
    if not isinstance(adapter, ExVideoSites):
        from ..backbones import families_with

        raise ValueError(
            f"ExVideo is not available for the {adapter.family!r} backbone: it extends the temporal position "
            f"tables of UNet video models, supported: {', '.join(families_with(ExVideoSites))}. For 3D-RoPE DiTs "
            "use apply_rope_extension (pi, ntk, yarn, riflex) instead."
        )
    sites = adapter.exvideo_sites()
    if not sites:
        raise ValueError(
            f"the {adapter.family!r} model has no temporal position embeddings for ExVideo to extend"
        )
    return sites


def _model_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def _install_site(
    site_state: _SiteState,
    state: ExVideoState,
    ids: torch.Tensor,
    positional_conv: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Give one site its trainable position table (and Conv3d layers), recording what changed in ``state``."""
    site = site_state.site
    position = site.position
    if site.position_kind == "ids":
        with torch.no_grad():
            table = position(ids.to(device)).detach().clone()  # [N, D], the module's own sinusoid
        table = nn.Parameter(table)
        position.register_parameter(TABLE_ATTR, table)
        state.new_parameters.append(table)
        HookRegistry.check_if_exists_or_initialize(position).register_hook(
            _TableLookupHook(table, site.name), _TABLE_HOOK
        )
        if positional_conv:
            for block in site.conv_blocks:
                channels = _block_channels(block)
                conv = IdentityConv3d(channels, device=device, dtype=dtype)
                block.add_module(CONV_ATTR, conv)
                state.new_parameters.extend(conv.parameters())
                HookRegistry.check_if_exists_or_initialize(block).register_hook(
                    _ConvBeforeBlockHook(conv, site_state), _CONV_HOOK
                )
    elif site.position_kind == "additive":
        pe = position.pe  # [1, P, D] buffer
        site_state.original_pe = pe
        table = nn.Parameter(pe[:, ids.to(pe.device)].detach().clone())  # [1, N, D]
        del position._buffers["pe"]
        position.register_parameter("pe", table)
        state.new_parameters.append(table)
        if positional_conv:
            conv = IdentityConv3d(pe.shape[-1], device=device, dtype=dtype)
            position.add_module(CONV_ATTR, conv)
            state.new_parameters.extend(conv.parameters())
            HookRegistry.check_if_exists_or_initialize(position).register_hook(
                _ConvAfterPositionHook(conv, site_state), _CONV_HOOK
            )
    else:
        raise ValueError(f"unknown ExVideo position kind {site.position_kind!r} at {site.name}")


def apply_exvideo(
    adapter: BackboneAdapter,
    num_latent_frames: int,
    *,
    train_latent_frames: int | None = None,
    repeat_length: int | None = None,
    positional_conv: bool = True,
    set_trainable: bool = True,
) -> ExVideoState:
    """Apply ExVideo (Duan et al. 2024, Sec. 3): extend the temporal position embeddings to ``num_latent_frames``.

    ``num_latent_frames``: frames the trainable table covers (ExVideo-SVD: 128). ``train_latent_frames``: the
    trained length whose positions are reflected (default: the adapter's native clip in latent frames).
    ``repeat_length``: see :func:`reflected_position_ids`. ``positional_conv`` adds the identity-initialised
    Conv3d after the embedding in every temporal block. ``set_trainable`` freezes the model and marks exactly the
    tables, the convolutions and the temporal blocks as trainable (see :func:`exvideo_trainable_parameters`).

    At ``F <= train_latent_frames`` frames the extended model computes exactly what the stock model computes.
    Apply ExVideo before window fusion (:func:`longgen.extend.fusion.apply_window_fusion`), which then windows the
    extended embedding. Undo with :func:`remove_exvideo`.
    """
    sites = _sites(adapter)
    model = adapter.model
    if model in _STATES:
        raise RuntimeError("ExVideo is already applied to this model; call remove_exvideo(adapter) first")
    if has_hook(adapter, WINDOW_FUSION_HOOK):
        raise RuntimeError(
            "window fusion is applied to this model: remove_window_fusion(adapter), apply ExVideo, then apply window "
            "fusion again (it windows the extended position embedding)"
        )
    num_trained = train_latent_frames or adapter.num_latent_frames(adapter.native_video_size[0])
    if num_latent_frames < num_trained:
        raise ValueError(
            f"ExVideo extends positions beyond the trained {num_trained} latent frames; got "
            f"num_latent_frames={num_latent_frames}"
        )
    ids = reflected_position_ids(num_latent_frames, num_trained, repeat_length)
    state = ExVideoState(num_positions=num_latent_frames, num_trained=num_trained, position_ids=ids)
    device, dtype = _model_dtype(model)

    records: dict[int, _SizeRecord] = {}
    try:
        for site in sites:
            record = records.get(id(site.transformer))
            if record is None:  # one size hook per transformer, shared by its sites
                record = records[id(site.transformer)] = _SizeRecord(site.name)
                HookRegistry.check_if_exists_or_initialize(site.transformer).register_hook(
                    _SizeHook(record), _SIZE_HOOK
                )
            site_state = _SiteState(site, record)
            state.sites.append(site_state)
            _install_site(site_state, state, ids, positional_conv, device, dtype)
            for module in site.trainable:
                if not any(module is m for m in state.trainable_modules):
                    state.trainable_modules.append(module)
    except Exception:
        _STATES[model] = state
        remove_exvideo(adapter)
        raise
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    _STATES[model] = state
    if set_trainable:
        state.requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        for param in exvideo_trainable_parameters(adapter):
            param.requires_grad_(True)
    return state


def _block_channels(block: nn.Module) -> int:
    """Channels of a temporal block's tokens: the width of its first LayerNorm or Linear."""
    for module in block.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[0])
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    raise ValueError(f"cannot tell the channel count of {type(block).__name__} for ExVideo's Conv3d")


def exvideo_trainable_parameters(adapter: BackboneAdapter) -> list[nn.Parameter]:
    """What ExVideo post-tunes: the position tables, the Conv3d layers and the temporal blocks' parameters.

    In the model's ``named_parameters`` order, each once; pass them to the optimiser (AdamW, lr 1e-5 in the paper).
    """
    state = _STATES.get(adapter.model)
    if state is None:
        raise RuntimeError(
            "ExVideo is not applied to this model; call apply_exvideo(adapter, num_latent_frames) first"
        )
    wanted = {id(p) for p in state.new_parameters}
    for module in state.trainable_modules:
        wanted.update(id(p) for p in module.parameters())
    return [p for _, p in adapter.model.named_parameters() if id(p) in wanted]


def remove_exvideo(adapter: BackboneAdapter) -> None:
    """Undo :func:`apply_exvideo`: drop the tables, convolutions and hooks and restore ``requires_grad``."""
    model = adapter.model
    if model not in _STATES:
        return
    if has_hook(adapter, WINDOW_FUSION_HOOK):
        raise RuntimeError(
            "window fusion wraps ExVideo's position embeddings: call remove_window_fusion(adapter) before remove_exvideo"
        )
    state = _STATES.pop(model)
    for site_state in state.sites:
        site = site_state.site
        position = site.position
        for module in (site.transformer, position, *site.conv_blocks):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                for name in (_SIZE_HOOK, _TABLE_HOOK, _CONV_HOOK):
                    if registry.get_hook(name) is not None:
                        registry.remove_hook(name, recurse=False)
        for module in (position, *site.conv_blocks):
            if CONV_ATTR in module._modules:
                del module._modules[CONV_ATTR]
        if TABLE_ATTR in position._parameters:
            del position._parameters[TABLE_ATTR]
        if site_state.original_pe is not None:
            original = site_state.original_pe
            if "pe" in position._parameters:  # follow the model if it moved since apply_exvideo
                original = original.to(position._parameters["pe"].device)
                del position._parameters["pe"]
            position.register_buffer("pe", original)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    for name, param in model.named_parameters():
        if name in state.requires_grad_before:
            param.requires_grad_(state.requires_grad_before[name])


def _apply_from_config(adapter: BackboneAdapter, config: ExVideoConfig) -> ExVideoState:
    return apply_exvideo(
        adapter,
        config.target_latent_frames,
        train_latent_frames=config.train_latent_frames,
        repeat_length=config.repeat_length,
        positional_conv=config.positional_conv,
        set_trainable=config.set_trainable,
    )
