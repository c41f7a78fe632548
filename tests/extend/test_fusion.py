"""FreeNoise window fusion: window bookkeeping, hand-computed fusion, identity in one window, removal, end to end."""

from types import SimpleNamespace

import pytest
import torch

from longgen.backbones import build_tiny
from longgen.extend.fusion import (
    WINDOW_FUSION_HOOK,
    WindowFusionConfig,
    apply_window_fusion,
    fuse_windows,
    has_window_fusion,
    pyramid_weights,
    remove_window_fusion,
    window_starts,
)
from longgen.pipeline import LongVideoPipeline


@pytest.fixture(scope="module")
def animatediff():
    return build_tiny("animatediff", seed=0)


@pytest.fixture(scope="module")
def svd():
    return build_tiny("svd", seed=0)


@pytest.fixture(scope="module")
def ad_cond(animatediff):
    with torch.no_grad():
        return animatediff.encode_prompt(["a red ball"], do_classifier_free_guidance=False)[0]


def _denoise(adapter, cond, num_frames, seed=0):
    _, height, width = adapter.native_video_size
    x = torch.randn(
        adapter.latent_shape(num_frames, height, width), generator=torch.Generator().manual_seed(seed)
    )
    # distinct per-frame levels exercise the per-frame timestep hooks too
    sigma = torch.linspace(0.3, 0.9, num_frames)[None]
    with torch.no_grad():
        return adapter.denoise(x, sigma, cond)


def _no_fusion_hooks(adapter):
    return not has_window_fusion(adapter) and not any(
        getattr(m, "_diffusers_hook", None) is not None
        and m._diffusers_hook.hooks.keys() & {WINDOW_FUSION_HOOK, "longgen_window_fusion_positions"}
        for m in adapter.model.modules()
    )


def test_pyramid_weights_and_windows():
    assert pyramid_weights(4).tolist() == [1, 2, 2, 1]
    assert pyramid_weights(5).tolist() == [1, 2, 3, 2, 1]
    assert pyramid_weights(16).tolist() == list(range(1, 9)) + list(range(8, 0, -1))
    assert window_starts(6, 4, 2) == [0, 2]
    assert window_starts(7, 4, 2) == [0, 2, 3]  # tail window [3, 7)
    # one implementation with the sliding sampler's (longgen.windows): a window longer than the clip is an
    # error there; the fusion hooks run the stock layer on clips of at most one window and never ask
    with pytest.raises(ValueError, match="longer than the clip"):
        window_starts(4, 8, 2)
    assert window_starts(16, 8, 2) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="stride"):
        WindowFusionConfig(window=4, stride=5)


def test_fuse_windows_matches_hand_computation():
    x = torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(1))

    def fn(t):  # depends on the whole window: a window bug changes the result
        return t.cumsum(dim=1)

    out = fuse_windows(fn, x, window=4, stride=2)  # windows [0,4), [2,6) and the tail [3,7); weights 1,2,2,1
    o0, o1, o2 = fn(x[:, 0:4]), fn(x[:, 2:6]), fn(x[:, 3:7])
    expected = torch.stack(
        [
            o0[:, 0],
            o0[:, 1],
            (2 * o0[:, 2] + 1 * o1[:, 0]) / 3,
            (1 * o0[:, 3] + 2 * o1[:, 1] + 1 * o2[:, 0]) / 4,
            (2 * o1[:, 2] + 2 * o2[:, 1]) / 4,
            (1 * o1[:, 3] + 2 * o2[:, 2]) / 3,
            o2[:, 3],
        ],
        dim=1,
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert torch.equal(fuse_windows(fn, x, window=7, stride=2), fn(x))  # one window: fn itself


@pytest.mark.parametrize("family", ["animatediff", "svd"])
def test_hooked_attention_equals_hand_fusion(family, animatediff, svd):
    """The hooked layer fuses the stock layer's window outputs; AnimateDiff's positions restart per window."""
    adapter = animatediff if family == "animatediff" else svd
    name, attn = adapter.temporal_attention_modules()[0]
    position = adapter.temporal_attention_positions().get(name) if family == "animatediff" else None
    assert (position is not None) == (family == "animatediff")
    x = torch.randn(5, 7, attn.query_dim, generator=torch.Generator().manual_seed(2))  # [B*H*W, F, C]

    def stock(t):
        with torch.no_grad():
            return attn(position(t) if position is not None else t)

    o0, o1, o2 = stock(x[:, 0:4]), stock(x[:, 2:6]), stock(x[:, 3:7])
    full = stock(x)
    apply_window_fusion(adapter, window=4, stride=2)
    try:
        with torch.no_grad():
            fused = attn(x)
            if position is not None:
                assert torch.equal(position(x), x)  # the block's own position call is bypassed
    finally:
        remove_window_fusion(adapter)
    w = torch.tensor([1.0, 2.0, 2.0, 1.0])
    acc = torch.zeros_like(full)
    tot = torch.zeros(7)
    for start, out in ((0, o0), (2, o1), (3, o2)):
        acc[:, start : start + 4] += w[None, :, None] * out
        tot[start : start + 4] += w
    torch.testing.assert_close(fused, acc / tot[None, :, None], atol=1e-6, rtol=0)
    assert not torch.allclose(fused, full, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(stock(x), full)  # removed: the stock layer again


def test_one_window_is_the_stock_model(animatediff, ad_cond):
    native = animatediff.num_latent_frames(animatediff.native_video_size[0])
    stock = _denoise(animatediff, ad_cond, native)
    config = apply_window_fusion(animatediff)  # default window: the native clip
    try:
        assert (config.window, config.stride) == (native, native // 4)
        assert torch.equal(_denoise(animatediff, ad_cond, native), stock)
    finally:
        remove_window_fusion(animatediff)
    apply_window_fusion(animatediff, window=3 * native, stride=2)  # window longer than the clip
    try:
        assert torch.equal(_denoise(animatediff, ad_cond, native), stock)
    finally:
        remove_window_fusion(animatediff)


def test_removal_restores_stock_and_long_clips(animatediff, ad_cond):
    stock = _denoise(animatediff, ad_cond, 16)
    apply_window_fusion(animatediff, window=8, stride=2)
    try:
        fused = _denoise(animatediff, ad_cond, 16)
        # positions restart per window, so clips longer than the 32-frame position table work
        long = _denoise(animatediff, ad_cond, 40)
        with pytest.raises(RuntimeError, match="already applied"):
            apply_window_fusion(animatediff)
    finally:
        remove_window_fusion(animatediff)
    assert torch.isfinite(fused).all() and torch.isfinite(long).all() and long.shape[2] == 40
    assert not torch.allclose(fused, stock, atol=1e-3)
    assert torch.equal(_denoise(animatediff, ad_cond, 16), stock)
    assert _no_fusion_hooks(animatediff) and animatediff.position_window is None
    with pytest.raises(ValueError, match="at most 32 latent frames"):
        _denoise(animatediff, ad_cond, 40)


def test_unsupported_backbone_is_a_clear_error():
    # every registered family is supported; a backbone of any other family gets the supported list
    other = SimpleNamespace(family="mochi")  # only the family is consulted before the error
    with pytest.raises(
        ValueError,
        match=r"window fusion is not available for the 'mochi' backbone.*animatediff, svd, wan",
    ):
        apply_window_fusion(other)


@pytest.mark.parametrize("sampler", ["full", "sliding"])
def test_generate_end_to_end(animatediff, sampler):
    pipe = LongVideoPipeline(animatediff)
    kwargs = dict(num_frames=16, num_inference_steps=2, sampler=sampler, seed=3, show_progress=False)
    stock = pipe.generate("a red ball", **kwargs).latents
    apply_window_fusion(animatediff)
    try:
        fused = pipe.generate("a red ball", **kwargs).latents
    finally:
        remove_window_fusion(animatediff)
    assert fused.shape == stock.shape == (1, 4, 16, 4, 4) and torch.isfinite(fused).all()
    if sampler == "full":  # sliding windows are native-length: fusion has one window there
        assert not torch.allclose(fused, stock, atol=1e-4)
    else:
        assert torch.equal(fused, stock)
    assert torch.equal(pipe.generate("a red ball", **kwargs).latents, stock)
