"""Analytic model FLOPs of a Wan-style video DiT (``WanTransformer3DModel``) and MFU helpers.

Counts follow the usual "model FLOPs" convention (Kaplan et al. 2020; Chowdhery et al. 2022, PaLM,
Appendix B, for MFU): every matrix multiply ``[m, k] @ [k, n]`` costs ``2 * m * n * k`` FLOPs, and
everything else (norms, RoPE, activations, modulation adds, biases, softmax) is left out because it is
a vanishing share of the total and is not executed on the matrix units. A training step counts as 3x the
forward (the backward computes gradients for the activations and the weights, each about the forward's
cost); recomputation by gradient checkpointing is *not* counted, as MFU (unlike HFU) asks.

Per block and per video token, with ``d`` the model width, ``d_ff`` the FFN width, ``N`` the number of
video tokens and ``N_txt`` the number of text tokens, this gives
``12 d^2 + 4 d d_ff + 4 N d + 4 N_txt d`` plus ``4 N_txt d^2`` per sample for the text keys/values.

``tests/test_flops.py`` checks :func:`wan_transformer_flops` against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "PEAK_BF16_FLOPS",
    "mfu",
    "peak_bf16_flops",
    "sparse_self_attention_fraction",
    "wan_flops_breakdown",
    "wan_flops_per_token",
    "wan_num_tokens",
    "wan_transformer_flops",
]

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}

_CONFIG_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
)


def _config_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a ``WanTransformer3DModel`` config, a model, or a mapping of its ``__init__`` args."""
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config  # a model
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a WanTransformer3DModel config (a mapping, e.g. model.config) or the model; "
            f"got {type(config).__name__}"
        )
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"the Wan transformer config lacks {missing}; pass model.config or all of {_CONFIG_KEYS}"
        )
    return dict(config)


def wan_num_tokens(config: Any, num_latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Video tokens per sample after 3-D patchification: ``(F / p_t) * (H / p_h) * (W / p_w)``."""
    cfg = _config_dict(config)
    p_t, p_h, p_w = cfg["patch_size"]
    for name, size, patch in (
        ("num_latent_frames", num_latent_frames, p_t),
        ("latent_height", latent_height, p_h),
        ("latent_width", latent_width, p_w),
    ):
        if size <= 0 or size % patch:
            raise ValueError(f"{name}={size} must be a positive multiple of the patch size {patch}")
    return (num_latent_frames // p_t) * (latent_height // p_h) * (latent_width // p_w)


def wan_flops_breakdown(
    config: Any,
    num_latent_frames: int,
    latent_height: int,
    latent_width: int,
    text_len: int = 512,
    batch_size: int = 1,
    per_token_timesteps: bool = False,
    image_len: int = 257,
    sparse_radius: int | None = None,
    sparse_tile: int = 1,
) -> dict[str, int]:
    """Forward matmul FLOPs of ``WanTransformer3DModel`` by component (all blocks summed), batch included.

    Components: ``patch_embedding`` (the strided Conv3d is a matmul over ``C_in * p_t * p_h * p_w``),
    ``condition_embedder`` (timestep MLP + the 6-way modulation projection ``time_proj``, once per sample or,
    with ``per_token_timesteps`` as diffusion forcing uses, once per token; text projection per text token;
    image projection for I2V), ``self_attn_proj`` (q, k, v, out), ``self_attn_matmul`` (``Q K^T`` and
    ``A V``), ``cross_attn_proj`` (q and out per video token; k and v per text token), ``cross_attn_matmul``,
    ``ffn``, ``proj_out``. An I2V model (``added_kv_proj_dim`` set) also attends to ``image_len`` image
    tokens in every cross-attention.
    """
    cfg = _config_dict(config)
    tokens = wan_num_tokens(cfg, num_latent_frames, latent_height, latent_width)
    if text_len <= 0 or batch_size <= 0:
        raise ValueError(f"text_len ({text_len}) and batch_size ({batch_size}) must be positive")
    b, n, t = batch_size, tokens, text_len
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    d_ff = cfg["ffn_dim"]
    layers = cfg["num_layers"]
    patch = math.prod(cfg["patch_size"])
    c_in = cfg["in_channels"]
    c_out = cfg["out_channels"] or c_in
    freq = cfg["freq_dim"]
    image_dim = cfg.get("image_dim")
    added_kv = cfg.get("added_kv_proj_dim")
    n_img = image_len if added_kv is not None else 0

    def mm(m: int, k: int, n_out: int) -> int:
        return 2 * m * k * n_out

    timesteps = b * n if per_token_timesteps else b
    cond = mm(timesteps, freq, d) + mm(timesteps, d, d) + mm(timesteps, d, 6 * d)  # time MLP + modulation
    cond += mm(b * t, cfg["text_dim"], d) + mm(b * t, d, d)  # PixArt-style text projection
    if image_dim is not None and n_img:
        cond += mm(b * n_img, image_dim, image_dim) + mm(b * n_img, image_dim, d)  # WanImageEmbedding FFN

    cross_kv_dim = added_kv if added_kv is not None else d
    breakdown = {
        "patch_embedding": mm(b * n, c_in * patch, d),
        "condition_embedder": cond,
        "self_attn_proj": layers * 4 * mm(b * n, d, d),
        # Q K^T: (n, d_h) @ (d_h, n) per head -> 2 n^2 d over heads; A V the same.
        "self_attn_matmul": layers * 2 * (2 * b * _self_attention_pairs(n, num_latent_frames // cfg["patch_size"][0],
                                                                          sparse_radius, sparse_tile) * d),
        "cross_attn_proj": layers
        * (2 * mm(b * n, d, d) + 2 * mm(b * t, d, d) + 2 * mm(b * n_img, cross_kv_dim, d)),
        "cross_attn_matmul": layers * 2 * (2 * b * n * (t + n_img) * d),
        "ffn": layers * (mm(b * n, d, d_ff) + mm(b * n, d_ff, d)),
        "proj_out": mm(b * n, d, c_out * patch),
    }
    return breakdown


def sparse_self_attention_fraction(num_frames: int, radius: int, tile: int = 1) -> float:
    """Share of dense self-attention's ``Q K^T`` / ``A V`` FLOPs that sliding-tile sparse attention computes over a
    ``num_frames`` (latent, token) clip: query tiles of ``tile`` frames, keys ``radius`` frames on each side."""
    from .extend.configs import SparseAttentionConfig

    config = SparseAttentionConfig(radius=radius, tile=tile)
    return config.attended_pairs(num_frames, radius) / num_frames**2


def _self_attention_pairs(tokens: int, frames: int, radius: int | None, tile: int) -> int:
    """(query token, key token) pairs of the video self-attention: ``tokens ** 2``, or the sparse share of it."""
    if radius is None:
        return tokens * tokens
    from .extend.configs import SparseAttentionConfig

    per_frame = tokens // frames
    return SparseAttentionConfig(radius=radius, tile=tile).attended_pairs(frames, radius) * per_frame**2


def wan_transformer_flops(
    config: Any,
    num_latent_frames: int,
    latent_height: int,
    latent_width: int,
    text_len: int = 512,
    batch_size: int = 1,
    training: bool = False,
    per_token_timesteps: bool = False,
    image_len: int = 257,
    sparse_radius: int | None = None,
    sparse_tile: int = 1,
) -> int:
    """Model FLOPs of one ``WanTransformer3DModel`` forward (or, with ``training``, forward + backward = 3x).

    ``config`` is ``model.config`` (or the model, or a dict of its ``__init__`` arguments); the sizes are
    the latent sizes the transformer consumes (before patchification). See :func:`wan_flops_breakdown`.
    """
    forward = sum(
        wan_flops_breakdown(
            config,
            num_latent_frames,
            latent_height,
            latent_width,
            text_len=text_len,
            batch_size=batch_size,
            per_token_timesteps=per_token_timesteps,
            image_len=image_len,
            sparse_radius=sparse_radius,
            sparse_tile=sparse_tile,
        ).values()
    )
    return 3 * forward if training else forward


def wan_flops_per_token(
    config: Any,
    num_latent_frames: int,
    latent_height: int,
    latent_width: int,
    text_len: int = 512,
    training: bool = False,
) -> dict[str, float]:
    """Per-video-token summary: tokens, FLOPs per token (total and per component) and the attention share.

    Useful to see where the cost of long clips goes: the ``self_attn_matmul`` share grows linearly with the
    number of tokens while everything else is constant per token.
    """
    breakdown = wan_flops_breakdown(config, num_latent_frames, latent_height, latent_width, text_len=text_len)
    tokens = wan_num_tokens(config, num_latent_frames, latent_height, latent_width)
    scale = 3 if training else 1
    total = sum(breakdown.values())
    summary: dict[str, float] = {"tokens": float(tokens), "flops_per_token": scale * total / tokens}
    summary.update({f"{k}_per_token": scale * v / tokens for k, v in breakdown.items()})
    summary["self_attn_share"] = breakdown["self_attn_matmul"] / total
    return summary


def peak_bf16_flops(device_name: str) -> float:
    """Dense bf16 peak FLOP/s of a GPU from its name (e.g. ``torch.cuda.get_device_name()``).

    An ``H100`` without ``PCIe`` in its name is taken as the SXM part. Unknown devices raise a ``KeyError``
    that says to pass the peak explicitly.
    """
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "H100" in name:
        if "NVL" in name:
            raise KeyError(f"no bf16 peak on file for {device_name!r} (H100 NVL); pass the peak explicitly")
        return PEAK_BF16_FLOPS["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    for key in ("A100", "L40S"):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    raise KeyError(
        f"no bf16 peak on file for {device_name!r} (known: {sorted(PEAK_BF16_FLOPS)}); pass the peak "
        "explicitly (e.g. --peak-tflops in benchmarks.gpu_wan)"
    )


def mfu(flops_per_step: float, seconds_per_step: float, peak: float) -> float:
    """Model FLOPs utilisation (PaLM, Appendix B): achieved model FLOP/s over the hardware's peak FLOP/s."""
    if seconds_per_step <= 0 or peak <= 0:
        raise ValueError(f"seconds_per_step ({seconds_per_step}) and peak ({peak}) must be positive")
    return flops_per_step / seconds_per_step / peak
