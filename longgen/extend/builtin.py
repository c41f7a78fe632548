"""The built-in extensions' registrations (torch-free: their functions are imported on first use).

Registration order is the order ``--extension`` lists them: pi, ntk, yarn, riflex, fusion, spectral, exvideo, block-causal, cache, sparse.
The option dataclasses live in :mod:`longgen.extend.configs`; ``apply`` / ``remove`` /
``trainable_parameters`` are ``"module:function"`` strings resolved by :class:`~longgen.extend.registry.ExtensionSpec`.
"""

from __future__ import annotations

from .configs import (
    ROPE_METHODS,
    BlockCausalConfig,
    ExVideoConfig,
    RiflexConfig,
    RopeExtensionConfig,
    SparseAttentionConfig,
    SpectralBlendOptions,
    StepCacheConfig,
    WindowFusionOptions,
    YarnConfig,
)
from .registry import ExtensionSpec, register_extension

_ROPE = "longgen.extend.rope"
_FUSION = "longgen.extend.fusion"
_SPECTRAL = "longgen.extend.spectral"
_EXVIDEO = "longgen.extend.exvideo"
_STEP_CACHE = "longgen.extend.step_cache"


def _register_rope() -> None:
    configs = {"pi": RopeExtensionConfig, "ntk": RopeExtensionConfig, "yarn": YarnConfig, "riflex": RiflexConfig}
    descriptions = {
        "pi": "positional interpolation of the temporal RoPE to --target-frames (3D-RoPE DiTs; LTX: only pi)",
        "ntk": "NTK-aware temporal RoPE base scaling to --target-frames (3D-RoPE DiTs)",
        "yarn": "YaRN temporal RoPE extension to --target-frames (3D-RoPE DiTs)",
        "riflex": "RIFLEx: lower the intrinsic temporal frequency, ~2x length training-free (3D-RoPE DiTs)",
    }
    for method in ROPE_METHODS:
        register_extension(
            ExtensionSpec(
                name=method,
                config_cls=configs[method],
                apply=f"{_ROPE}:_apply_{method}",
                remove=f"{_ROPE}:remove_rope_extension",
                description=descriptions[method],
                needs_target_frames=True,
                sets_window=True,
                # a model post-tuned with RIFLEx learned the lowered frequency at every length
                training_options=(("finetune", True),) if method == "riflex" else (),
            )
        )


def _register_builtins() -> None:
    _register_rope()
    register_extension(
        ExtensionSpec(
            name="fusion",
            config_cls=WindowFusionOptions,
            apply=f"{_FUSION}:_apply_from_options",
            remove=f"{_FUSION}:remove_window_fusion",
            description="FreeNoise window fusion: temporal attention in windows of the native length, the whole "
            "clip at once (AnimateDiff, SVD; DiTs: video self-attention windowed per latent frame)",
        )
    )
    register_extension(
        ExtensionSpec(
            name="spectral",
            config_cls=SpectralBlendOptions,
            apply=f"{_SPECTRAL}:_apply_from_options",
            remove=f"{_SPECTRAL}:remove_spectral_blend",
            description="FreeLong SpectralBlend: global and windowed temporal attention blended in frequency "
            "(AnimateDiff, SVD; DiTs: video self-attention)",
        )
    )
    register_extension(
        ExtensionSpec(
            name="exvideo",
            config_cls=ExVideoConfig,
            apply=f"{_EXVIDEO}:_apply_from_config",
            remove=f"{_EXVIDEO}:remove_exvideo",
            description="ExVideo positional extension to --target-frames (UNets: AnimateDiff, SVD)",
            needs_target_frames=True,
            sets_window=True,
            trainable_parameters=f"{_EXVIDEO}:exvideo_trainable_parameters",
            training_options=(("set_trainable", True),),
        )
    )
    register_extension(
        ExtensionSpec(
            name="block-causal",
            config_cls=BlockCausalConfig,
            apply="longgen.extend.causal:apply_block_causal",
            remove="longgen.extend.causal:remove_block_causal",
            description="block-causal video self-attention over latent chunks with a KV cache (rolling window, "
            "sink); what --sampler causal applies for its run (DiTs: Wan, SkyReels-V2, LTX-Video, CogVideoX 1.0, "
            "HunyuanVideo)",
        )
    )

    register_extension(
        ExtensionSpec(
            name="cache",
            config_cls=StepCacheConfig,
            apply=f"{_STEP_CACHE}:apply_step_cache",
            remove=f"{_STEP_CACHE}:remove_step_cache",
            description="step caching with diffusers' hooks (First Block Cache or TaylorSeer), one cache state "
            "per window of sliding/fifo; works with every sampler (DiT backbones)",
        )
    )
    register_extension(
        ExtensionSpec(
            name="sparse",
            config_cls=SparseAttentionConfig,
            apply="longgen.extend.sparse_attention:apply_sparse_attention",
            remove="longgen.extend.sparse_attention:remove_sparse_attention",
            description="temporal sliding-tile sparse attention: each tile of --sparse-tile latent frames attends to "
            "--sparse-radius frames on each side, computing only those key blocks; dense when the window covers "
            "the clip (DiTs: Wan, SkyReels-V2, LTX-Video, CogVideoX 1.0, HunyuanVideo)",
        )
    )


_register_builtins()
