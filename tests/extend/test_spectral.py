"""FreeLong SpectralBlend: filter parity with FreeInit, local windows, all-pass/all-stop branches, removal, end to end."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.free_init_utils import FreeInitMixin

from longgen.backbones import build_tiny
from longgen.extend.fusion import apply_window_fusion
from longgen.extend.spectral import (
    SPECTRAL_BLEND_HOOK,
    apply_spectral_blend,
    gaussian_low_pass_filter,
    has_spectral_blend,
    local_attention_mask,
    local_window_starts,
    remove_spectral_blend,
)
from longgen.pipeline import LongVideoPipeline

INF = float("inf")


@pytest.fixture(scope="module")
def animatediff():
    return build_tiny("animatediff", seed=0)


@pytest.fixture(scope="module")
def svd():
    return build_tiny("svd", seed=0)


def _cond(adapter):
    with torch.no_grad():
        if adapter.family == "svd":
            image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            return adapter.encode_prompt(
                [""], image=image, do_classifier_free_guidance=False, height=32, width=32
            )[0]
        return adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)[0]


def _denoise(adapter, cond, num_frames, seed=0):
    _, height, width = adapter.native_video_size
    x = torch.randn(
        adapter.latent_shape(num_frames, height, width), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return adapter.denoise(x, torch.full((1, num_frames), 0.6), cond)


def test_low_pass_filter_matches_freeinit():
    for d_s, d_t in ((0.25, 0.25), (0.25, 0.5), (0.4, 0.2)):
        ours = gaussian_low_pass_filter(5, 6, 4, d_s, d_t)
        ref = FreeInitMixin._get_free_init_freq_filter(None, (1, 1, 5, 6, 4), "cpu", "gaussian", 4, d_s, d_t)[
            0, 0
        ]
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-6)
    lpf = gaussian_low_pass_filter(4, 4, 4)
    assert lpf[2, 2, 2] == 1.0  # the centre (zero frequency after fftshift)
    torch.testing.assert_close(lpf[0, 0, 0], torch.tensor(np.exp(-0.5 * 3 * 16), dtype=torch.float32))
    assert torch.equal(gaussian_low_pass_filter(3, 4, 4, INF, INF), torch.ones(3, 4, 4))
    assert torch.equal(gaussian_low_pass_filter(3, 4, 4, 0.0, 0.25), torch.zeros(3, 4, 4))


def test_local_windows_are_shifted_at_the_edges():
    assert local_window_starts(10, 4).tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert local_window_starts(3, 4).tolist() == [0, 0, 0]
    mask = local_attention_mask(10, 4)
    assert ((mask == 0).sum(dim=1) == 4).all()  # every frame sees exactly 4 frames, itself included
    assert all(mask[i, i] == 0 for i in range(10))
    assert mask[0, 4] == -INF and mask[9, 5] == -INF and mask[9, 6] == 0


def _hooked(adapter, size):
    """The first temporal attention layer with its feature size given as the enclosing module would record it."""
    name, attn = adapter.temporal_attention_modules()[0]
    hook = attn._diffusers_hook.get_hook(SPECTRAL_BLEND_HOOK)
    hook.ancestors[0].size = size
    return attn


def _local_reference(attn, x, window):
    """Frame i attends to frames [s_i, s_i + L) only: the stock layer on each frame's window."""
    starts = local_window_starts(x.shape[1], window).tolist()
    with torch.no_grad():
        return torch.stack([attn(x[:, s : s + window])[:, i - s] for i, s in enumerate(starts)], dim=1)


@pytest.mark.parametrize("family", ["animatediff", "svd"])
def test_branches_and_blend_at_the_layer(family, animatediff, svd):
    adapter = animatediff if family == "animatediff" else svd
    _, attn = adapter.temporal_attention_modules()[0]
    batch, height, width, num_frames, window = 2, 3, 2, 10, 4  # non-square map: a transposed fold would fail
    x = torch.randn(
        batch * height * width, num_frames, attn.query_dim, generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        global_ref = attn(x)
    local_ref = _local_reference(attn, x, window)

    results = {}
    for key, d in (("pass", INF), ("stop", 0.0), ("paper", 0.25)):
        apply_spectral_blend(
            adapter, local_window=window, spatial_stop_frequency=d, temporal_stop_frequency=d
        )
        try:
            with torch.no_grad():
                results[key] = _hooked(adapter, (height, width))(x)
        finally:
            remove_spectral_blend(adapter)
    torch.testing.assert_close(results["pass"], global_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(results["stop"], local_ref, atol=1e-5, rtol=0)

    # the paper's filter, blended by hand with numpy's FFT on the [B, C, F, H, W] volume of (b, h, w)-major rows
    def volume(t):
        return t.reshape(batch, height, width, num_frames, -1).permute(0, 4, 3, 1, 2).double().numpy()

    axes = (-3, -2, -1)
    lpf = FreeInitMixin._get_free_init_freq_filter(
        None, (num_frames, height, width), "cpu", "gaussian", 4, 0.25, 0.25
    )
    lpf = lpf.double().numpy()
    spec = lpf * np.fft.fftshift(np.fft.fftn(volume(global_ref), axes=axes), axes=axes) + (
        1 - lpf
    ) * np.fft.fftshift(np.fft.fftn(volume(local_ref), axes=axes), axes=axes)
    blended = np.fft.ifftn(np.fft.ifftshift(spec, axes=axes), axes=axes).real  # [B, C, F, H, W]
    expected = torch.from_numpy(blended).permute(0, 3, 4, 2, 1).reshape(x.shape[0], num_frames, -1).float()
    torch.testing.assert_close(results["paper"], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(results["paper"], global_ref, atol=1e-3)


@pytest.mark.parametrize("family", ["animatediff", "svd"])
def test_model_level_identity_removal_and_all_pass(family, animatediff, svd):
    """Native length: bit-identical; all-pass at 2x: the stock model (the feature size is found in the model)."""
    adapter = animatediff if family == "animatediff" else svd
    cond = _cond(adapter)
    native = adapter.num_latent_frames(adapter.native_video_size[0])
    stock_native = _denoise(adapter, cond, native)
    stock_long = _denoise(adapter, cond, 2 * native)

    apply_spectral_blend(adapter)
    try:
        assert has_spectral_blend(adapter)
        assert torch.equal(_denoise(adapter, cond, native), stock_native)
        blended = _denoise(adapter, cond, 2 * native)
        with pytest.raises(RuntimeError, match="remove_spectral_blend"):
            apply_window_fusion(adapter)
    finally:
        remove_spectral_blend(adapter)
    assert torch.isfinite(blended).all() and not torch.allclose(blended, stock_long, atol=1e-4)
    assert torch.equal(_denoise(adapter, cond, 2 * native), stock_long)
    assert not has_spectral_blend(adapter)
    assert not any(
        getattr(m, "_diffusers_hook", None) is not None
        and m._diffusers_hook.hooks.keys() & {SPECTRAL_BLEND_HOOK, "longgen_spectral_blend_size"}
        for m in adapter.model.modules()
    )

    apply_spectral_blend(adapter, local_window=2, spatial_stop_frequency=INF, temporal_stop_frequency=INF)
    try:
        torch.testing.assert_close(_denoise(adapter, cond, 2 * native), stock_long, atol=1e-4, rtol=0)
    finally:
        remove_spectral_blend(adapter)


def test_unsupported_backbone_is_a_clear_error():
    # every registered family is supported; a backbone of any other family gets the supported list
    other = SimpleNamespace(family="mochi")  # only the family is consulted before the error
    with pytest.raises(
        ValueError,
        match=r"SpectralBlend is not available for the 'mochi' backbone.*animatediff, svd, wan",
    ):
        apply_spectral_blend(other)


def test_generate_end_to_end(animatediff):
    pipe = LongVideoPipeline(animatediff)
    kwargs = dict(
        num_frames=16, num_inference_steps=2, sampler="full", noise="freenoise", seed=5, show_progress=False
    )
    stock = pipe.generate("a red ball", **kwargs).latents
    apply_spectral_blend(animatediff)
    try:
        blended = pipe.generate("a red ball", **kwargs).latents
    finally:
        remove_spectral_blend(animatediff)
    assert blended.shape == stock.shape == (1, 4, 16, 4, 4) and torch.isfinite(blended).all()
    assert not torch.allclose(blended, stock, atol=1e-4)
    assert torch.equal(pipe.generate("a red ball", **kwargs).latents, stock)
