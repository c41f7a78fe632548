"""Block-causal attention on stock DiTs (longgen.extend.causal): identity, bit-exact removal, the per-chunk path equal to
the stock processor with a dense mask and to SkyReels-V2's own causal block mask, causality, window RoPE positions,
bad input. Joint text-video attention (CogVideoX 1.0 with RoPE, CogVideoX-2b-style sin-cos positions, HunyuanVideo):
the text stream attends to the text only and sits at frame 0's noise level (never the identity)."""

import pytest
import torch
from tiny_causal import tiny_adapter

from longgen.backbones import build_tiny
from longgen.backbones.cogvideox import CogVideoXAdapter
from longgen.backbones.wan import WanAdapter
from longgen.extend.causal import (
    BLOCK_CAUSAL_HOOK,
    BlockCausalConfig,
    apply_block_causal,
    block_causal_mask,
)

FAMILIES = ["wan", "skyreels_v2", "ltx", "cogvideox", "cogvideox_2b", "hunyuan_video"]
JOINT = ("cogvideox", "cogvideox_2b", "hunyuan_video")
FRAMES = 6


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    torch.manual_seed(0)
    adapter = tiny_adapter(request.param)
    cond, _ = adapter.encode_prompt(["a red ball bouncing"], do_classifier_free_guidance=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, adapter.latent_channels, FRAMES, 4, 4, generator=gen)
    sigma = torch.tensor([[0.0, 0.0, 0.3, 0.3, 0.9, 0.9]])  # per-frame levels, as streaming produces
    return adapter, cond, x, sigma


def _run(adapter, cond, x, sigma, config=None):
    if config is None:
        return adapter.denoise(x, sigma, cond)
    handle = apply_block_causal(adapter, config)
    try:
        return adapter.denoise(x, sigma, cond)
    finally:
        handle.remove()


def test_mask_definition():
    """Chunks of 2, window of 4 with a 1-frame sink: frame rows see exactly the frames the definition says."""
    mask = block_causal_mask(6, 1, BlockCausalConfig(chunk_size=2, local_attn_size=4, sink_size=1))
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 1],  # chunk [4, 6): sink frame 0 and the newest 3 frames [3, 6)
            [1, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert block_causal_mask(2, 3, BlockCausalConfig(chunk_size=1)).shape == (6, 6)


@pytest.mark.parametrize("attention", ["chunked", "mask"])
def test_identity_when_one_chunk_covers_the_clip(setup, attention):
    adapter, cond, x, sigma = setup
    stock = _run(adapter, cond, x, sigma)
    out = _run(adapter, cond, x, sigma, BlockCausalConfig(chunk_size=FRAMES, attention=attention))
    if adapter.family in ("cogvideox", "hunyuan_video"):  # joint attention: the text stream departs from stock
        reference = _run(adapter, cond, x, sigma, BlockCausalConfig(chunk_size=FRAMES, attention="mask"))
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, stock, atol=1e-4)
    else:
        assert torch.equal(out, stock)


def _text_outputs(adapter, cond, x, sigma, config=None):
    """The text output of every joint attention layer in one model call (a forward hook on each layer)."""
    from longgen.extend.dit_attention import dit_self_attention_layers

    outputs, handles = [], []
    for _, module in dit_self_attention_layers(adapter, "test"):
        handles.append(module.register_forward_hook(lambda m, args, out: outputs.append(out[1].clone())))
    try:
        _run(adapter, cond, x, sigma, config)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("family", JOINT)
def test_joint_text_stream_depends_on_neither_the_video_nor_later_levels(family):
    """Text tokens attend to the text only and take frame 0's noise level: their attention outputs in every layer are
    the same for any video content and any level of the later frames (the stock model's text sees the video, and
    the adapters' per-frame mean level moves with every frame); a change of frame 0's level does change them."""
    adapter = tiny_adapter(family)
    cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)
    gen = torch.Generator().manual_seed(4)
    x, y = (torch.randn(1, adapter.latent_channels, FRAMES, 4, 4, generator=gen) for _ in range(2))
    sigma = torch.tensor([[0.0, 0.0, 0.3, 0.3, 0.9, 0.9]])
    later = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.2, 0.2]])
    config = BlockCausalConfig(chunk_size=2)
    base = _text_outputs(adapter, cond, x, sigma, config)
    for video, levels in ((y, sigma), (x, later)):
        for a, b in zip(base, _text_outputs(adapter, cond, video, levels, config), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    first = _text_outputs(adapter, cond, x, torch.tensor([[0.4, 0.4, 0.3, 0.3, 0.9, 0.9]]), config)
    assert not torch.allclose(base[-1], first[-1], atol=1e-5)
    stock_x, stock_y = _text_outputs(adapter, cond, x, sigma), _text_outputs(adapter, cond, y, sigma)
    assert not torch.allclose(stock_x[0], stock_y[0], atol=1e-5)


def test_remove_restores_the_stock_model_bit_exactly(setup):
    adapter, cond, x, sigma = setup
    stock = _run(adapter, cond, x, sigma)
    handle = apply_block_causal(adapter, BlockCausalConfig(chunk_size=2))
    causal = adapter.denoise(x, sigma, cond)
    assert handle.describe()["chunk_size"] == 2 and handle.describe()["method"] == "block_causal"
    handle.remove()
    handle.remove()  # idempotent
    assert not torch.allclose(causal, stock, atol=1e-4)  # the hooks did change the model
    assert torch.equal(adapter.denoise(x, sigma, cond), stock)
    hooked = [
        name
        for name, module in adapter.model.named_modules()
        if getattr(module, "_diffusers_hook", None) is not None
        and module._diffusers_hook.get_hook(BLOCK_CAUSAL_HOOK) is not None
    ]
    assert hooked == []


@pytest.mark.parametrize(
    "options",
    [
        dict(chunk_size=2),
        dict(chunk_size=1),
        dict(chunk_size=3),
        dict(chunk_size=2, local_attn_size=4),
        dict(chunk_size=1, local_attn_size=3, sink_size=1),
        dict(chunk_size=2, local_attn_size=4, sink_size=1),
    ],
)
def test_per_chunk_calls_equal_the_stock_processor_with_a_dense_mask(setup, options):
    adapter, cond, x, sigma = setup
    reference = _run(adapter, cond, x, sigma, BlockCausalConfig(attention="mask", **options))
    chunked = _run(adapter, cond, x, sigma, BlockCausalConfig(attention="chunked", **options))
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference, _run(adapter, cond, x, sigma), atol=1e-4)


def test_chunked_equals_skyreels_own_causal_block_mask():
    """SkyReels-V2's stock ``num_frame_per_block`` mask is block-causal attention: an independent reference."""
    adapter = build_tiny("skyreels_v2")
    cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)
    x = torch.randn(1, adapter.latent_channels, FRAMES, 4, 4, generator=torch.Generator().manual_seed(3))
    sigma = torch.full((1, FRAMES), 0.6)
    adapter.set_causal_block_size(2)
    stock_causal = adapter.denoise(x, sigma, cond)
    # the extension refuses to stream on top of the model's own mask, but the dense path combines them
    combined = _run(adapter, cond, x, sigma, BlockCausalConfig(chunk_size=2, attention="mask"))
    with pytest.raises(ValueError, match="set_causal_block_size"):
        _run(adapter, cond, x, sigma, BlockCausalConfig(chunk_size=2))
    adapter.set_causal_block_size(1)
    ours = _run(adapter, cond, x, sigma, BlockCausalConfig(chunk_size=2))
    torch.testing.assert_close(ours, stock_causal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(combined, stock_causal, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["chunked", "mask"])
def test_earlier_chunks_do_not_see_later_frames(setup, attention):
    adapter, cond, x, sigma = setup
    config = BlockCausalConfig(chunk_size=2, attention=attention)
    later = x.clone()
    later[:, :, 4:] = torch.randn_like(later[:, :, 4:])
    a = _run(adapter, cond, x, sigma, config)
    b = _run(adapter, cond, later, sigma, config)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:], atol=1e-5)
    stock_a, stock_b = _run(adapter, cond, x, sigma), _run(adapter, cond, later, sigma)
    assert not torch.allclose(stock_a[:, :, :4], stock_b[:, :, :4], atol=1e-4)  # bidirectional without hooks


def test_window_rope_positions_make_a_chunk_independent_of_where_it_sits():
    """Sink frame 0 + window [3, 6): with positions re-indexed within what a chunk sees, chunk [4, 6) gives the same
    output as the clip of frames (0, 3, 4, 5) alone, where its last chunk sees everything; with absolute positions
    the gap (0 -> 3) differs and so does the output (a uniform shift would not tell them apart: RoPE is relative).
    One transformer block, so the frames a chunk sees carry the same hidden states in both clips."""
    pipe = WanAdapter.tiny_pipeline(transformer_kwargs={"num_layers": 1})
    adapter = WanAdapter(pipe, native_video_size=WanAdapter.tiny_video_size)
    cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)
    x = torch.randn(1, adapter.latent_channels, FRAMES, 4, 4, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((1, FRAMES), 0.5)
    for rope, same in (("window", True), ("absolute", False)):
        config = BlockCausalConfig(chunk_size=2, local_attn_size=4, sink_size=1, rope_positions=rope)
        whole = _run(adapter, cond, x, sigma, config)[:, :, 4:6]
        seen = x[:, :, [0, 3, 4, 5]]
        shifted = _run(adapter, cond, seen, sigma[:, :4], config)[:, :, 2:4]
        assert torch.allclose(whole, shifted, atol=1e-5) == same, rope


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(chunk_size=0), "--chunk-size"),
        (dict(chunk_size=3, local_attn_size=2), "--local-attn-size"),
        (dict(chunk_size=2, local_attn_size=4, sink_size=3), "--local-attn-size"),
        (dict(sink_size=1), "--sink-size"),
        (dict(rope_positions="relative"), "--causal-rope"),
        (dict(attention="flex"), "--causal-attention"),
        (dict(attention="mask", rope_positions="window"), "--causal-attention chunked"),
    ],
)
def test_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        BlockCausalConfig(**options)


def test_joint_families_refuse_what_they_cannot_stream():
    """CogVideoX image-to-video (the image latent sits at every call's first frame), CogVideoX 1.5 (two latent
    frames per token) and window positions without RoPE (CogVideoX-2b's sin-cos positions are absolute)."""
    i2v = CogVideoXAdapter(CogVideoXAdapter.tiny_pipeline(image_to_video=True))
    with pytest.raises(ValueError, match="image-to-video"):
        apply_block_causal(i2v)
    v15 = CogVideoXAdapter(CogVideoXAdapter.tiny_pipeline(patch_size_t=2))
    with pytest.raises(ValueError, match="groups 2 latent frames"):
        apply_block_causal(v15)
    adapter = tiny_adapter("cogvideox_2b")
    cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)
    x = torch.randn(1, adapter.latent_channels, 4, 4, 4)
    with pytest.raises(ValueError, match="--causal-rope absolute"):
        _run(adapter, cond, x, torch.full((1, 4), 0.5), BlockCausalConfig(chunk_size=2, rope_positions="window"))


def test_unet_models_are_refused_with_the_alternative():
    adapter = build_tiny("animatediff")
    with pytest.raises(ValueError, match="not supported for UNet motion modules.*sliding or fifo"):
        apply_block_causal(adapter)
