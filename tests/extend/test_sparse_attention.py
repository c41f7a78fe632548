"""Temporal sliding-tile sparse attention (issue 16.3, longgen.extend.sparse_attention) on the five DiT families:
the frame pattern's definition, exactly dense when the window covers the clip (both the stock shortcut and the tiled
paths), the per-tile key blocks equal to the stock processor with a dense mask and different from dense attention
when the window does not cover, bit-exact removal, FLOPs (the analytic count = torch's flop counter on the tiled
path), the CLI, bad input."""

import pytest
import torch
from safetensors.torch import load_file
from tiny_causal import tiny_adapter
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from longgen.backbones import build_tiny
from longgen.cli import main
from longgen.extend.configs import SparseAttentionConfig
from longgen.extend.sparse_attention import (
    SPARSE_ATTENTION_HOOK,
    _SparseAttentionHook,
    apply_sparse_attention,
    sparse_frame_mask,
)
from longgen.flops import sparse_self_attention_fraction, wan_flops_breakdown

FAMILIES = ["wan", "skyreels_v2", "ltx", "cogvideox", "cogvideox_2b", "hunyuan_video"]
FRAMES = 6


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    torch.manual_seed(0)
    adapter = tiny_adapter(request.param)
    cond, _ = adapter.encode_prompt(["a red ball bouncing"], do_classifier_free_guidance=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, adapter.latent_channels, FRAMES, 4, 4, generator=gen)
    sigma = torch.tensor([[0.2, 0.3, 0.5, 0.5, 0.7, 0.9]])
    return adapter, cond, x, sigma


def _run(adapter, cond, x, sigma, config=None):
    if config is None:
        return adapter.denoise(x, sigma, cond)
    handle = apply_sparse_attention(adapter, config)
    try:
        return adapter.denoise(x, sigma, cond)
    finally:
        handle.remove()


def test_frame_pattern_definition():
    """Tiles of 2 frames, radius 1: tile [2, 4) sees frames [1, 5); the pair count is the mask's."""
    config = SparseAttentionConfig(radius=1, tile=2)
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(sparse_frame_mask(6, config, 1), expected)
    assert config.attended_pairs(6, 1) == int(expected.sum()) == 20
    assert sparse_self_attention_fraction(6, 1, 2) == 20 / 36
    assert sparse_frame_mask(5, SparseAttentionConfig(radius=4, tile=1), 4).all()  # covers: dense


def test_dense_when_the_window_covers_the_clip(setup, monkeypatch):
    adapter, cond, x, sigma = setup
    stock = _run(adapter, cond, x, sigma)
    covering = SparseAttentionConfig(radius=FRAMES - 1, tile=1)
    assert torch.equal(_run(adapter, cond, x, sigma, covering), stock)  # the stock call itself
    monkeypatch.setattr(_SparseAttentionHook, "dense_shortcut", False)  # the tiled computations themselves
    for attention in ("blocks", "mask"):
        out = _run(adapter, cond, x, sigma, SparseAttentionConfig(radius=FRAMES, tile=2, attention=attention))
        torch.testing.assert_close(out, stock, atol=2e-5, rtol=1e-5)


def test_key_blocks_equal_the_masked_reference_and_differ_from_dense(setup):
    adapter, cond, x, sigma = setup
    stock = _run(adapter, cond, x, sigma)
    for tile, radius in ((2, 1), (1, 0)):
        blocks = _run(adapter, cond, x, sigma, SparseAttentionConfig(radius=radius, tile=tile))
        masked = _run(adapter, cond, x, sigma, SparseAttentionConfig(radius=radius, tile=tile, attention="mask"))
        torch.testing.assert_close(blocks, masked, atol=2e-5, rtol=1e-5)
        assert (blocks - stock).abs().max() > 1e-3
    after = _run(adapter, cond, x, sigma)
    assert torch.equal(after, stock)  # removal restores the stock model bit-exactly
    assert not any(
        m._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK) is not None
        for m in adapter.model.modules()
        if getattr(m, "_diffusers_hook", None) is not None
    )


def test_tiled_path_computes_the_analytic_flops():
    """torch's flop counter on the tiled path (math SDPA: attention as counted bmm's) = the analytic formula."""
    adapter = build_tiny("wan")
    model, frames = adapter.model, 7
    cond, _ = adapter.encode_prompt(["a ball"], do_classifier_free_guidance=False)
    x = torch.randn(1, adapter.latent_channels, frames, 4, 4)
    sigma = torch.full((1, frames), 0.5)
    counts = {}
    for radius in (None, 1):
        handle = None if radius is None else apply_sparse_attention(adapter, SparseAttentionConfig(radius, tile=2))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            adapter.denoise(x, sigma, cond)
        counts[radius] = counter.get_total_flops()
        if handle is not None:
            handle.remove()
    dense = wan_flops_breakdown(model.config, frames, 4, 4)  # only the self-attention term differs below
    sparse = wan_flops_breakdown(model.config, frames, 4, 4, sparse_radius=1, sparse_tile=2)
    saved = dense["self_attn_matmul"] - sparse["self_attn_matmul"]
    assert saved > 0 and counts[1] < counts[None]
    assert counts[None] - counts[1] == saved


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="--sparse-tile must be >= 1"):
        SparseAttentionConfig(tile=0)
    with pytest.raises(ValueError, match="--sparse-radius must be >= 0"):
        SparseAttentionConfig(radius=-1)
    with pytest.raises(ValueError, match="--sparse-attention must be one of blocks, mask"):
        SparseAttentionConfig(attention="dense")
    with pytest.raises(ValueError, match="--extension fusion"):
        apply_sparse_attention(build_tiny("animatediff"))


@pytest.mark.slow
def test_sparse_from_the_cli(saved, tmp_path, capsys):
    """``longgen generate --extension sparse``: the default radius (native clip - 1 = 2 latent frames here)
    leaves a native-length clip exactly dense and changes a longer full-clip sample; a radius covering the clip
    reproduces the dense latents exactly; bad flags exit 2 with the fix."""
    base = ["generate", "--model", saved("wan"), "--num-frames", "33", "--sampler", "full", "--steps", "2",
            "--seed", "0", "--quiet", "--save-latents"]

    def latents(name, *extra):
        out = tmp_path / f"{name}.mp4"
        assert main([*base, "--out", str(out), *extra]) == 0
        return load_file(str(tmp_path / f"{name}.latents.safetensors"))["latents"]

    dense = latents("dense")
    assert torch.equal(latents("cover", "--extension", "sparse", "--sparse-radius", "9"), dense)
    sparse = latents("sparse", "--extension", "sparse", "--sparse-tile", "2")
    assert (sparse - dense).abs().max() > 1e-4
    native = ["--num-frames", "9"]  # the tiny Wan's native clip: 3 latent frames, covered by the default radius
    assert torch.equal(latents("native_sparse", *native, "--extension", "sparse"), latents("native_dense", *native))
    assert main([*base, "--out", str(tmp_path / "x.mp4"), "--extension", "sparse", "--sparse-tile", "0"]) == 2
    assert "--sparse-tile must be >= 1" in capsys.readouterr().err
