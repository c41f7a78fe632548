"""The adapter contract, run over every family: a new backbone is tested by adding it to ``FAMILIES``.

What every adapter must do (encode, denoise per frame, decode, save/load) and, for each optional capability
it declares (:mod:`longgen.backbones.capabilities`), that the capability's methods run and do what they say.
Parity with each family's stock diffusers call stays in the per-family files (it needs the family's own
timestep convention); what repeated across them (shapes, bad sigma shapes, save/load round trip) is here.
"""

import inspect

import pytest
import torch

from longgen.backbones import (
    CAPABILITIES,
    FAMILIES,
    BackboneAdapter,
    CausalBlockMask,
    ExVideoSites,
    FrameAttention,
    ImageConditioning,
    MixtureOfExperts,
    TemporalRope,
    TemporalRopeFrequencies,
    TemporalRopeScale,
    WindowAttention,
    build_tiny,
    denoiser_models,
    families_with,
    get_adapter_class,
    load_adapter,
)
from longgen.backbones.base import WindowAttentionSpec

_CACHE: dict = {}


def tiny(family):
    """(adapter, cond, latents at the native clip), built once per family for the module."""
    if family not in _CACHE:
        adapter = build_tiny(family)
        num_frames, height, width = adapter.native_video_size
        image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        cond, _ = adapter.encode_prompt(
            ["a red ball"],
            image=image if adapter.requires_image_condition else None,
            do_classifier_free_guidance=False,
            num_frames=num_frames,
            height=height,
            width=width,
        )
        shape = adapter.latent_shape(num_frames, height, width)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        _CACHE[family] = (adapter, cond, x)
    return _CACHE[family]


def denoise(adapter, cond, x, sigma=None):
    sigma = torch.linspace(0.9, 0.3, x.shape[2])[None] if sigma is None else sigma
    with torch.no_grad():
        return adapter.denoise(x, sigma, cond)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_class_implements_the_contract(family):
    cls = get_adapter_class(family)
    assert issubclass(cls, BackboneAdapter) and not inspect.isabstract(cls), cls.__abstractmethods__
    assert cls.family == family and cls.pipeline_class_names
    assert cls.prediction in ("flow", "eps", "v", "edm_v")
    for name in ("tiny_pipeline", "encode_prompt", "denoise", "decode"):
        assert getattr(cls, name) is not getattr(BackboneAdapter, name), name


@pytest.mark.parametrize("family", FAMILIES)
def test_denoise_is_per_frame_and_keeps_shape_and_dtype(family):
    adapter, cond, x = tiny(family)
    out = denoise(adapter, cond, x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    frames = x.shape[2]
    other = torch.linspace(0.9, 0.3, frames)[None].clone()
    other[0, -1] = 0.6  # one frame's noise level changes: the prediction changes
    assert not torch.equal(denoise(adapter, cond, x, other), out)
    with pytest.raises(ValueError, match=r"sigma must be \[B, F\]"):
        denoise(adapter, cond, x, torch.full((1, frames + 1), 0.5))
    with pytest.raises(ValueError, match=r"x must be latents \[B, C, F, H, W\]"):
        denoise(adapter, cond, x[:, :, 0], torch.full((1, frames), 0.5))


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_and_encode_shapes(family):
    adapter, _, x = tiny(family)
    num_frames, height, width = adapter.native_video_size
    with torch.no_grad():
        frames = adapter.decode(x)
        assert frames.shape == (1, adapter.num_pixel_frames(x.shape[2]), height, width, 3)
        assert frames.min() >= 0 and frames.max() <= 1
        assert adapter.encode_video(frames).shape == x.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, saved):
    adapter, cond, x = tiny(family)
    loaded = load_adapter(saved(family))
    assert type(loaded) is type(adapter) and loaded.native_video_size == adapter.native_video_size
    # same weights; the UNet families' loaded models pick other kernels (float32 round-off, ~1e-6)
    torch.testing.assert_close(denoise(loaded, cond, x), denoise(build_tiny(family), cond, x), rtol=1e-4, atol=1e-5)


def _check_window_attention(adapter):
    spec = adapter.window_attention_spec()
    assert isinstance(spec, WindowAttentionSpec)
    import re

    for model in denoiser_models(adapter):
        assert any(re.search(spec.layer_pattern, name) for name, _ in model.named_modules() if name)


def _check_frame_attention(adapter):
    modules = adapter.temporal_attention_modules()
    assert modules
    assert set(adapter.temporal_attention_positions()) <= {name for name, _ in modules}
    assert adapter.position_window is None


def _check_rope_frequencies(adapter, cond, x):
    stock = adapter.temporal_rope_frequencies()
    out = denoise(adapter, cond, x)
    assert stock.dtype == torch.float64 and stock.ndim == 1
    adapter.set_temporal_rope_frequencies(stock * 0.5)
    try:
        assert not torch.equal(denoise(adapter, cond, x), out)
    finally:
        adapter.set_temporal_rope_frequencies(None)
    assert torch.equal(denoise(adapter, cond, x), out)


def _check_rope_scale(adapter, cond, x):
    out, before = denoise(adapter, cond, x), adapter.temporal_position_scale
    adapter.set_temporal_position_scale(2.0 * before)
    try:
        assert not torch.equal(denoise(adapter, cond, x), out)
    finally:
        adapter.set_temporal_position_scale(before)
    with pytest.raises(ValueError, match="positive"):
        adapter.set_temporal_position_scale(0.0)


def _check_causal_block_mask(adapter):
    before = adapter.causal_block_size
    adapter.set_causal_block_size(2)
    assert adapter.causal_block_size == 2
    adapter.set_causal_block_size(before)
    with pytest.raises(ValueError, match=">= 1"):
        adapter.set_causal_block_size(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_capabilities_are_usable(family):
    adapter, cond, x = tiny(family)
    declared = [c.__name__ for c in CAPABILITIES if isinstance(adapter, c)]
    assert declared, f"{family} declares no capability"
    if isinstance(adapter, WindowAttention):
        _check_window_attention(adapter)
    if isinstance(adapter, FrameAttention):
        _check_frame_attention(adapter)
    if isinstance(adapter, ExVideoSites):
        assert adapter.exvideo_sites()
    if isinstance(adapter, MixtureOfExperts):
        assert adapter.experts()[0] is adapter.model
    if isinstance(adapter, CausalBlockMask):
        _check_causal_block_mask(adapter)
    if isinstance(adapter, TemporalRope):
        from longgen.extend import ROPE_METHODS

        assert adapter.rope_module() is not None and adapter.rope_axes()[0]["axis"] == "t"
        assert adapter.rope_extension_methods and set(adapter.rope_extension_methods) <= set(ROPE_METHODS)
        assert isinstance(adapter, (TemporalRopeFrequencies, TemporalRopeScale))
    if isinstance(adapter, TemporalRopeFrequencies):
        _check_rope_frequencies(adapter, cond, x)
    if isinstance(adapter, TemporalRopeScale):
        _check_rope_scale(adapter, cond, x)
    if isinstance(adapter, ImageConditioning):
        assert isinstance(adapter.supports_image_condition, bool)
    else:
        assert not adapter.supports_image_condition and not adapter.requires_image_condition


@pytest.mark.parametrize("family", FAMILIES)
def test_undeclared_capabilities_give_errors_that_list_the_supporting_families(family):
    from longgen.extend import apply_exvideo, apply_rope_extension, apply_window_fusion

    adapter, _, _ = tiny(family)
    if not isinstance(adapter, ExVideoSites):
        with pytest.raises(ValueError, match=", ".join(families_with(ExVideoSites))):
            apply_exvideo(adapter, 8)
    if not isinstance(adapter, TemporalRope):
        with pytest.raises(ValueError, match="Backbones that support it: wan"):
            apply_rope_extension(adapter, "pi", None, 8)
    if not isinstance(adapter, (WindowAttention, FrameAttention)):  # every family has one of them today
        with pytest.raises(ValueError, match="supported: animatediff"):
            apply_window_fusion(adapter)


def test_families_with_reads_the_adapter_classes():
    # the released families' capabilities (a new backbone may add itself to any of these)
    expected = {
        FrameAttention: {"animatediff", "svd"},
        ExVideoSites: {"animatediff", "svd"},
        WindowAttention: {"wan", "skyreels_v2", "ltx", "cogvideox", "hunyuan_video"},
        TemporalRope: {"wan", "skyreels_v2", "ltx", "cogvideox", "hunyuan_video"},
        TemporalRopeScale: {"ltx"},
        CausalBlockMask: {"skyreels_v2"},
        MixtureOfExperts: {"wan", "skyreels_v2"},
        ImageConditioning: {"wan", "skyreels_v2", "cogvideox", "svd"},
    }
    for capability, families in expected.items():
        assert families <= set(families_with(capability)), capability.__name__
    assert "wan" not in families_with(FrameAttention) and "svd" not in families_with(TemporalRope)
    for capability in CAPABILITIES:  # every capability, in FAMILIES order
        assert families_with(capability) == [f for f in FAMILIES if issubclass(get_adapter_class(f), capability)]
