"""The analytic Wan FLOPs formula against torch.utils.flop_counter on tiny WanTransformer3DModels.

FlopCounterMode counts matmul-like aten ops (mm/addmm/bmm/convolution: 2*m*n*k) and nothing elementwise,
which is exactly the convention of longgen.flops, so parity is exact, not approximate. One caveat: on CPU,
``F.scaled_dot_product_attention`` dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which torch's counter has no formula for (it would count 0 FLOPs for every attention). The tests therefore
either force the math SDPA backend (attention becomes two counted bmm's) or register a formula for that op.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from longgen.flops import (
    mfu,
    peak_bf16_flops,
    wan_flops_breakdown,
    wan_flops_per_token,
    wan_num_tokens,
    wan_transformer_flops,
)

TEXT_DIM, FREQ_DIM, C = 32, 32, 4


def _model(image: bool = False, layers: int = 2, heads: int = 2, head_dim: int = 12, ffn: int = 48):
    torch.manual_seed(0)
    extra = {"image_dim": 16, "added_kv_proj_dim": heads * head_dim} if image else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=C,
        out_channels=C,
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        ffn_dim=ffn,
        num_layers=layers,
        **extra,
    ).eval()


def _inputs(batch, frames, height, width, text_len, per_token, image_len=0):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, frames, height, width, generator=gen)
    tokens = frames * (height // 2) * (width // 2)
    timestep = torch.full((batch, tokens) if per_token else (batch,), 500.0)
    text = torch.randn(batch, text_len, TEXT_DIM, generator=gen)
    kwargs = (
        {"encoder_hidden_states_image": torch.randn(batch, image_len, 16, generator=gen)} if image_len else {}
    )
    return x, timestep, text, kwargs


def _count(model, inputs, backward: bool = False, mapping=None, math_sdpa: bool = True) -> FlopCounterMode:
    x, timestep, text, kwargs = inputs
    ctx = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with (
        ctx,
        torch.set_grad_enabled(backward),
        FlopCounterMode(display=False, custom_mapping=mapping) as counter,
    ):
        out = model(x, timestep, text, return_dict=False, **kwargs)[0]
        if backward:
            out.sum().backward()
    return counter


SHAPES = [
    # batch, latent frames, latent h, latent w, text tokens, per-token timesteps
    (1, 3, 4, 6, 7, False),
    (2, 5, 8, 8, 20, False),
    (2, 4, 4, 4, 9, True),
    (1, 1, 2, 2, 3, False),
]


@pytest.mark.parametrize("batch,frames,height,width,text_len,per_token", SHAPES)
def test_forward_flops_equal_flop_counter(batch, frames, height, width, text_len, per_token):
    model = _model()
    counted = _count(model, _inputs(batch, frames, height, width, text_len, per_token)).get_total_flops()
    predicted = wan_transformer_flops(
        model.config,
        frames,
        height,
        width,
        text_len=text_len,
        batch_size=batch,
        per_token_timesteps=per_token,
    )
    assert counted > 0
    assert abs(predicted - counted) <= 0.02 * counted  # the brief's tolerance; in fact exact:
    assert predicted == counted


def test_wider_model_and_image_to_video_flops_equal_flop_counter():
    """Other widths (d != d_ff != text_dim) and the I2V layout (image tokens, added K/V, image embedder)."""
    model = _model(image=True, layers=3, heads=3, head_dim=8, ffn=40)
    # Wan's attention processor takes the last 512 context tokens as text, the rest as image tokens.
    inputs = _inputs(2, 2, 4, 6, 512, False, image_len=5)
    counted = _count(model, inputs).get_total_flops()
    predicted = wan_transformer_flops(model, 2, 4, 6, text_len=512, batch_size=2, image_len=5)
    assert predicted == counted


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and A V of the CPU flash-attention op: shapes (B, heads, L, E) and (B, heads, S, E_v)."""
    b, h, length, e = query
    source, e_v = key[-2], value[-1]
    return 2 * b * h * length * source * e + 2 * b * h * length * source * e_v


def test_default_cpu_attention_kernel_with_a_registered_formula():
    """The stock CPU path (fused SDPA op) with a formula for it: attention FLOPs land on that op only."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    model = _model()
    counter = _count(model, _inputs(2, 3, 4, 4, 11, False), mapping={op: _cpu_sdpa_flops}, math_sdpa=False)
    breakdown = wan_flops_breakdown(model.config, 3, 4, 4, text_len=11, batch_size=2)
    assert counter.get_flop_counts()["Global"][op] == (
        breakdown["self_attn_matmul"] + breakdown["cross_attn_matmul"]
    )
    assert counter.get_total_flops() == sum(breakdown.values())


def test_training_flops_are_three_forwards_less_the_unneeded_input_grads():
    """fwd + bwd = 3x fwd, except that autograd skips d(input) of layers fed by non-trainable inputs.

    Those are the patch embedding (latents), the first text-projection linear (text embeddings) and the first
    timestep-MLP linear (sinusoidal features): exactly one matmul each fewer than 3x.
    """
    model = _model().train()
    batch, frames, height, width, text_len = 1, 3, 4, 6, 7
    counted = _count(
        model, _inputs(batch, frames, height, width, text_len, False), backward=True
    ).get_total_flops()
    tokens = wan_num_tokens(model.config, frames, height, width)
    d = 2 * 12
    skipped = 2 * tokens * (C * 4) * d + 2 * text_len * TEXT_DIM * d + 2 * batch * FREQ_DIM * d
    predicted = wan_transformer_flops(model.config, frames, height, width, text_len=text_len, training=True)
    assert predicted - skipped == counted
    assert abs(predicted - counted) <= 0.05 * counted


def test_per_token_summary_matches_the_block_formula_for_wan_1_3b():
    """METHODS.md: per block and token 12 d^2 + 4 d d_ff + 4 N d + 4 N_txt d (+ 4 N_txt d^2 per sample)."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
    )
    frames, height, width, text_len = 21, 60, 104, 512  # 81 frames at 480x832
    summary = wan_flops_per_token(config, frames, height, width, text_len=text_len)
    n, d, d_ff = frames * 30 * 52, 1536, 8960
    assert summary["tokens"] == n == 32760
    block = 12 * d * d + 4 * d * d_ff + 4 * n * d + 4 * text_len * d + 4 * text_len * d * d / n
    blocks = 30 * block
    assert summary["flops_per_token"] > blocks
    assert summary["flops_per_token"] == pytest.approx(blocks, rel=0.01)  # embeddings + head are < 1%
    assert 0.0 < summary["self_attn_share"] < 1.0
    training = wan_flops_per_token(config, frames, height, width, text_len=text_len, training=True)
    assert training["flops_per_token"] == pytest.approx(3 * summary["flops_per_token"])


def test_bad_sizes_and_configs_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="latent_height=5"):
        wan_transformer_flops(model.config, 2, 5, 4)
    with pytest.raises(ValueError, match="lacks"):
        wan_transformer_flops({"num_layers": 2}, 2, 4, 4)
    with pytest.raises(TypeError, match="WanTransformer3DModel config"):
        wan_transformer_flops(3, 2, 4, 4)


def test_peak_table_and_mfu():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    with pytest.raises(KeyError, match="pass the peak explicitly"):
        peak_bf16_flops("Some GPU")
    assert mfu(989e12 * 0.5, 2.0, 989e12) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 989e12)
