"""FreeNoise window fusion and FreeLong SpectralBlend on DiTs (Wan, SkyReels-V2, LTX-Video: frame windows of the
video self-attention with sliced RoPE; CogVideoX, HunyuanVideo: windows of the joint text-video attention, video
tokens fused, text tokens averaged): identity, hand fusion, RoPE relativity, all-pass/all-stop, CLI."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.free_init_utils import FreeInitMixin

from longgen.backbones import build_tiny
from longgen.backbones.cogvideox import CogVideoXAdapter
from longgen.backbones.wan import WanAdapter
from longgen.cli import main
from longgen.extend.fusion import (
    WINDOW_FUSION_HOOK,
    apply_window_fusion,
    has_window_fusion,
    remove_window_fusion,
)
from longgen.extend.spectral import (
    SPECTRAL_BLEND_HOOK,
    apply_spectral_blend,
    has_spectral_blend,
    remove_spectral_blend,
)
from longgen.io import video_info
from longgen.pipeline import LongVideoPipeline

VIDEO_ONLY = ["wan", "skyreels_v2", "ltx"]  # self-attention over video tokens only
JOINT = ["cogvideox", "hunyuan_video"]  # attention over text and video tokens jointly
DITS = VIDEO_ONLY + JOINT
INF = float("inf")
FRAMES = 7  # latent frames: windows of 4 every 2 are [0, 4), [2, 6) and the tail [3, 7)
LTX_SCALE = (8 / 25, 32, 32)  # LTXPipeline's rope_interpolation_scale at 25 fps
OUR_HOOKS = {
    WINDOW_FUSION_HOOK,
    SPECTRAL_BLEND_HOOK,
    "longgen_window_fusion_grid",
    "longgen_spectral_blend_grid",
}


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(family):
        if family not in cache:
            adapter = build_tiny(family, seed=0)
            with torch.no_grad():
                cond = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)[0]
            cache[family] = (adapter, cond)
        return cache[family]

    return get


def _denoise(adapter, cond, num_latent_frames=FRAMES):
    _, height, width = adapter.native_video_size
    shape = adapter.latent_shape(adapter.num_pixel_frames(num_latent_frames), height, width)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.4, 0.8, num_latent_frames)[None]  # per-frame levels: per-token timesteps
    with torch.no_grad():
        return adapter.denoise(x, sigma, cond)


def _no_hooks(adapter):
    return not any(
        getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks.keys() & OUR_HOOKS
        for m in adapter.model.modules()
    )


def _layer(adapter, frames=FRAMES):
    """The first block's self-attention, tokens x [2, f*h*w, D] of the tiny grid, and its full rotary tables."""
    model = adapter.model
    _, height, width = adapter.native_video_size
    _, channels, _, lh, lw = adapter.latent_shape(adapter.num_pixel_frames(1), height, width)
    _, ph, pw = adapter.patch_size
    grid = (frames, lh // ph, lw // pw)
    attn = next(module for name, module in model.named_modules() if name.endswith("attn1"))
    dim = attn.to_q.in_features
    x = torch.randn(2, frames * grid[1] * grid[2], dim, generator=torch.Generator().manual_seed(2))
    return attn, x, grid, _rope(adapter, x, grid, channels)


def _rope(adapter, x, grid, channels):
    """The model's own rotary tables for a token grid starting at position 0."""
    f, h, w = grid
    with torch.no_grad():
        if adapter.family == "ltx":
            return adapter.model.rope(x, f, h, w, LTX_SCALE)  # ([B, S, D], [B, S, D])
        _, ph, pw = adapter.patch_size
        return adapter.model.rope(torch.zeros(1, channels, f, h * ph, w * pw))  # ([1, S, 1, d], [1, S, 1, d])


def _call(adapter, attn, x, rope, mask=None):
    """The attention called as the stock block calls it."""
    with torch.no_grad():
        if adapter.family == "ltx":
            return attn(hidden_states=x, encoder_hidden_states=None, image_rotary_emb=rope)
        return attn(x, None, mask, rope)


def _block_causal_mask(frames, tokens_per_frame):
    """SkyReels-V2's diffusion-forcing mask for causal blocks of one frame: [1, 1, S, S] bool."""
    frame = torch.arange(frames).repeat_interleave(tokens_per_frame)
    return (frame[None, :] <= frame[:, None])[None, None]


@pytest.mark.parametrize("family", DITS)
def test_one_window_is_the_stock_model_and_removal_restores_it(family, adapters):
    adapter, cond = adapters(family)
    stock = _denoise(adapter, cond)
    for apply, remove in (
        (lambda: apply_window_fusion(adapter, window=FRAMES, stride=2), remove_window_fusion),
        (lambda: apply_spectral_blend(adapter, local_window=FRAMES + 3), remove_spectral_blend),
    ):
        apply()
        try:
            assert torch.equal(
                _denoise(adapter, cond), stock
            )  # one window / local = global: stock, bit for bit
        finally:
            remove(adapter)
    config = apply_window_fusion(adapter, window=4, stride=2)
    try:
        assert (config.window, config.stride) == (4, 2) and has_window_fusion(adapter)
        fused = _denoise(adapter, cond)
        with pytest.raises(RuntimeError, match="already applied"):
            apply_window_fusion(adapter)
        with pytest.raises(RuntimeError, match="remove_window_fusion"):
            apply_spectral_blend(adapter)
    finally:
        remove_window_fusion(adapter)
    assert torch.isfinite(fused).all() and not torch.allclose(fused, stock, atol=1e-3)
    # the native clip is the default window: the tiny model's 3 latent frames
    native = adapter.num_latent_frames(adapter.native_video_size[0])
    assert apply_window_fusion(adapter).window == native
    remove_window_fusion(adapter)
    assert torch.equal(_denoise(adapter, cond), stock)
    assert not has_window_fusion(adapter) and _no_hooks(adapter)


@pytest.mark.parametrize("family", VIDEO_ONLY)
def test_hooked_attention_equals_hand_fusion(family, adapters):
    """Stock attention on each window's tokens with the sliced rotary tables, pyramid-fused by hand."""
    adapter, _ = adapters(family)
    attn, x, grid, rope = _layer(adapter)
    hw = grid[1] * grid[2]
    mask = _block_causal_mask(FRAMES, hw) if family == "skyreels_v2" else None  # its block-causal DF mask
    full = _call(adapter, attn, x, rope, mask)
    outs = {}
    for start in (0, 2, 3):
        a, b = start * hw, (start + 4) * hw
        window_rope = tuple(t[:, a:b] for t in rope)
        window_mask = mask[..., a:b, a:b] if mask is not None else None
        outs[start] = _call(adapter, attn, x[:, a:b], window_rope, window_mask).unflatten(1, (4, hw))
    weights = torch.tensor([1.0, 2.0, 2.0, 1.0])
    acc = torch.zeros(2, FRAMES, hw, full.shape[-1])
    total = torch.zeros(FRAMES)
    for start, out in outs.items():
        acc[:, start : start + 4] += weights[None, :, None, None] * out
        total[start : start + 4] += weights
    expected = (acc / total[None, :, None, None]).flatten(1, 2)

    apply_window_fusion(adapter, window=4, stride=2)
    try:
        hook = attn._diffusers_hook.get_hook(WINDOW_FUSION_HOOK)
        hook.grid_record.grid = grid  # as the transformer's pre-forward hook records it
        fused = _call(adapter, attn, x, rope, mask)
        with pytest.raises(RuntimeError, match="expected"):  # tokens that are not the recorded grid
            _call(adapter, attn, x[:, :-1], tuple(t[:, :-1] for t in rope))
    finally:
        remove_window_fusion(adapter)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(fused, full, atol=1e-3)
    assert torch.equal(_call(adapter, attn, x, rope, mask), full)  # removed: the stock layer again


@pytest.mark.parametrize("family", VIDEO_ONLY)
def test_sliced_rotary_table_equals_positions_restarted_at_zero(family, adapters):
    """RoPE is relative: attention with the global table sliced to a window equals positions 0..W-1."""
    adapter, _ = adapters(family)
    attn, x, grid, rope = _layer(adapter)
    hw = grid[1] * grid[2]
    start, window = 3, 4
    xw = x[:, start * hw : (start + window) * hw]
    sliced = tuple(t[:, start * hw : (start + window) * hw] for t in rope)
    _, height, width = adapter.native_video_size
    channels = adapter.latent_shape(adapter.num_pixel_frames(1), height, width)[1]
    restarted = _rope(adapter, xw, (window, grid[1], grid[2]), channels)
    assert not torch.allclose(sliced[0], restarted[0], atol=1e-2)  # different absolute positions
    # Wan / SkyReels-V2 build their tables in float64; LTX builds angles of up to ~3e3 rad in float32
    # (frequencies up to theta * pi / 2), so its tables carry ~3e-4 rad of rounding at these positions.
    atol = 5e-4 if family == "ltx" else 2e-6
    out_sliced, out_restarted = _call(adapter, attn, xw, sliced), _call(adapter, attn, xw, restarted)
    torch.testing.assert_close(out_sliced, out_restarted, atol=atol, rtol=0)
    # not a shift (frames in reverse order): the attention changes, so the check above can fail
    reversed_ = tuple(t.unflatten(1, (window, hw)).flip(1).flatten(1, 2) for t in restarted)
    assert not torch.allclose(_call(adapter, attn, xw, reversed_), out_sliced, atol=1e-3)


@pytest.mark.parametrize("family", DITS)
def test_spectral_all_pass_is_global_all_stop_is_local(family, adapters):
    adapter, cond = adapters(family)
    stock = _denoise(adapter, cond)
    apply_window_fusion(adapter, window=4, stride=2)
    try:
        fused = _denoise(adapter, cond)
    finally:
        remove_window_fusion(adapter)
    results = {}
    for key, d in (("pass", INF), ("stop", 0.0), ("paper", 0.25)):
        config = apply_spectral_blend(
            adapter, local_window=4, spatial_stop_frequency=d, temporal_stop_frequency=d, local_stride=2
        )
        try:
            assert config.local_stride == 2 and has_spectral_blend(adapter)
            results[key] = _denoise(adapter, cond)
        finally:
            remove_spectral_blend(adapter)
    torch.testing.assert_close(results["pass"], stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(results["stop"], fused, atol=1e-5, rtol=0)
    paper = results["paper"]
    assert torch.isfinite(paper).all()
    assert not torch.allclose(paper, stock, atol=1e-4) and not torch.allclose(paper, fused, atol=1e-4)
    assert torch.equal(_denoise(adapter, cond), stock) and _no_hooks(adapter)


def test_spectral_blend_at_the_layer_matches_numpy(adapters):
    """The paper's filter on the [B, D, f, h, w] volume of frame-major tokens, blended by hand with numpy."""
    adapter, _ = adapters("wan")
    attn, x, grid, rope = _layer(adapter)
    f, h, w = grid
    global_ref = _call(adapter, attn, x, rope)
    results = {}
    for method, apply, remove, hook_name in (
        (
            "local",
            lambda: apply_window_fusion(adapter, window=4, stride=2),
            remove_window_fusion,
            WINDOW_FUSION_HOOK,
        ),
        (
            "blend",
            lambda: apply_spectral_blend(adapter, local_window=4, local_stride=2),
            remove_spectral_blend,
            SPECTRAL_BLEND_HOOK,
        ),
    ):
        apply()
        try:
            attn._diffusers_hook.get_hook(hook_name).grid_record.grid = grid
            results[method] = _call(adapter, attn, x, rope)
        finally:
            remove(adapter)

    def volume(t):  # [B, f*h*w, D] -> [B, D, f, h, w]
        return t.reshape(2, f, h, w, -1).permute(0, 4, 1, 2, 3).double().numpy()

    axes = (-3, -2, -1)
    lpf = (
        FreeInitMixin._get_free_init_freq_filter(None, (f, h, w), "cpu", "gaussian", 4, 0.25, 0.25)
        .double()
        .numpy()
    )
    spec = lpf * np.fft.fftshift(np.fft.fftn(volume(global_ref), axes=axes), axes=axes) + (
        1 - lpf
    ) * np.fft.fftshift(np.fft.fftn(volume(results["local"]), axes=axes), axes=axes)
    blended = np.fft.ifftn(np.fft.ifftshift(spec, axes=axes), axes=axes).real  # [B, D, f, h, w]
    expected = torch.from_numpy(blended).permute(0, 2, 3, 4, 1).reshape(x.shape).float()
    torch.testing.assert_close(results["blend"], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(results["blend"], global_ref, atol=1e-3)


def test_every_wan22_expert_is_hooked():
    adapter = WanAdapter(
        WanAdapter.tiny_pipeline(two_experts=True), native_video_size=WanAdapter.tiny_video_size
    )
    experts = adapter.experts()
    assert len(experts) == 2
    for apply, remove, name in (
        (apply_window_fusion, remove_window_fusion, WINDOW_FUSION_HOOK),
        (apply_spectral_blend, remove_spectral_blend, SPECTRAL_BLEND_HOOK),
    ):
        apply(adapter)
        for model in experts:
            assert all(block.attn1._diffusers_hook.get_hook(name) is not None for block in model.blocks)
            assert all(
                getattr(block.attn2, "_diffusers_hook", None) is None
                or block.attn2._diffusers_hook.get_hook(name) is None
                for block in model.blocks
            )  # cross-attention untouched
        remove(adapter)
        for model in experts:
            assert not any(
                getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks.keys() & OUR_HOOKS
                for m in model.modules()
            )


def test_unsupported_backbone_is_a_clear_error():
    """Every registered family is supported now; a backbone of another family gets the list of supported ones."""
    adapter = SimpleNamespace(family="mochi")  # only the family is consulted before the error
    supported = r"animatediff, svd, wan, skyreels_v2, ltx, cogvideox, hunyuan_video"
    with pytest.raises(ValueError, match=rf"window fusion is not available for the 'mochi'.*{supported}"):
        apply_window_fusion(adapter)
    with pytest.raises(ValueError, match=rf"SpectralBlend is not available for the 'mochi'.*{supported}"):
        apply_spectral_blend(adapter)


def test_cogvideox15_temporal_patch_is_refused():
    """CogVideoX 1.5 puts 2 latent frames in one token: latent-frame windows do not apply (clear error)."""
    adapter = CogVideoXAdapter(
        CogVideoXAdapter.tiny_pipeline(patch_size_t=2), native_video_size=CogVideoXAdapter.tiny_video_size
    )
    for apply in (apply_window_fusion, apply_spectral_blend):
        with pytest.raises(ValueError, match=r"groups 2 latent frames per token \(patch_size_t\)"):
            apply(adapter)
    assert _no_hooks(adapter)


def _joint_layer(adapter, name, frames=FRAMES):
    """A joint text-video attention of the tiny model, video tokens [2, f*h*w, D], text tokens [2, L, D] (and
    HunyuanVideo's key mask [2, 1, 1, S + L] with 2 padded text tokens in sample 1), the full rotary tables."""
    if hasattr(adapter, "remove_per_frame_hook"):
        adapter.remove_per_frame_hook()  # HunyuanVideo: its per-frame gate hook would act on bare layer calls
    attn = adapter.model.get_submodule(name)
    _, height, width = adapter.native_video_size
    _, channels, _, lh, lw = adapter.latent_shape(adapter.num_pixel_frames(1), height, width)
    _, ph, pw = adapter.patch_size
    grid = (frames, lh // ph, lw // pw)
    dim = attn.to_q.in_features
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, frames * grid[1] * grid[2], dim, generator=gen)
    text = torch.randn(2, 5, dim, generator=gen)
    mask = None
    if adapter.family == "hunyuan_video":
        mask = torch.ones(2, 1, 1, x.shape[1] + text.shape[1], dtype=torch.bool)
        mask[1, ..., -2:] = False  # padded text keys, as the model builds them from encoder_attention_mask
    return attn, x, text, mask, grid, _joint_rope(adapter, frames, lh, lw, channels)


def _joint_rope(adapter, frames, lh, lw, channels):
    """The model's own rotary tables ([S, head_dim] each) for ``frames`` latent frames from position 0."""
    with torch.no_grad():
        if adapter.family == "cogvideox":
            return adapter.rotary_embeddings(frames, lh, lw)
        return adapter.model.rope(torch.zeros(1, channels, frames, lh, lw))


def _joint_call(attn, x, text, rope, mask=None):
    """The joint attention called as the stock blocks call it: (video_out, text_out)."""
    with torch.no_grad():
        return attn(hidden_states=x, encoder_hidden_states=text, attention_mask=mask, image_rotary_emb=rope)


JOINT_LAYERS = [
    ("cogvideox", "transformer_blocks.0.attn1"),
    ("hunyuan_video", "transformer_blocks.0.attn"),  # dual-stream: separate text projections
    ("hunyuan_video", "single_transformer_blocks.0.attn"),  # single-stream: one sequence [video; text]
]


@pytest.mark.parametrize(("family", "name"), JOINT_LAYERS)
def test_joint_attention_equals_hand_fusion(family, name, adapters):
    """Each window: the stock attention on its video tokens + all text tokens with the model's own table of a
    4-frame clip (positions restarted at 0) and the mask cut alike; video pyramid-fused, text averaged."""
    adapter, _ = adapters(family)
    attn, x, text, mask, grid, rope = _joint_layer(adapter, name)
    f, h, w = grid
    hw, num_text = h * w, text.shape[1]
    full_video, full_text = _joint_call(attn, x, text, rope, mask)
    _, _, _, lh, lw = adapter.latent_shape(adapter.num_pixel_frames(1), *adapter.native_video_size[1:])
    channels = adapter.latent_channels
    rope4 = _joint_rope(adapter, 4, lh, lw, channels)
    for table, table4 in zip(rope, rope4):  # restarted positions: the first 4 frames of the full table
        assert torch.equal(table[: 4 * hw], table4)
    videos, texts = {}, []
    for start in (0, 2, 3):
        a, b = start * hw, (start + 4) * hw
        window_mask = None
        if mask is not None:  # [video; text] keys: the window's video columns and every text column
            window_mask = torch.cat([mask[..., a:b], mask[..., f * hw :]], dim=-1)
        video, text_out = _joint_call(attn, x[:, a:b], text, rope4, window_mask)
        videos[start] = video.unflatten(1, (4, hw))
        texts.append(text_out)
        if (
            start == 3
        ):  # text tokens carry no rotation: the sliced table is not the same as restarted positions
            sliced = tuple(t[a:b] for t in rope)
            assert not torch.allclose(
                _joint_call(attn, x[:, a:b], text, sliced, window_mask)[0], video, atol=1e-4
            )
    weights = torch.tensor([1.0, 2.0, 2.0, 1.0])
    acc = torch.zeros(2, f, hw, full_video.shape[-1])
    total = torch.zeros(f)
    for start, out in videos.items():
        acc[:, start : start + 4] += weights[None, :, None, None] * out
        total[start : start + 4] += weights
    expected_video = (acc / total[None, :, None, None]).flatten(1, 2)
    expected_text = (texts[0] + texts[1] + texts[2]) / 3

    apply_window_fusion(adapter, window=4, stride=2)
    try:
        hook = attn._diffusers_hook.get_hook(WINDOW_FUSION_HOOK)
        hook.grid_record.grid = grid  # as the transformer's pre-forward hook records it
        video, text_out = _joint_call(attn, x, text, rope, mask)
        with pytest.raises(RuntimeError, match="expected"):  # tokens that are not the recorded grid
            _joint_call(attn, x[:, :-hw], text, tuple(t[:-hw] for t in rope))
    finally:
        remove_window_fusion(adapter)
    torch.testing.assert_close(video, expected_video, atol=1e-6, rtol=0)
    torch.testing.assert_close(text_out, expected_text, atol=1e-6, rtol=0)
    assert text_out.shape == (2, num_text, full_text.shape[-1])
    assert not torch.allclose(video, full_video, atol=1e-3) and not torch.allclose(
        text_out, full_text, atol=1e-4
    )
    restored = _joint_call(attn, x, text, rope, mask)  # removed: the stock layer again
    assert torch.equal(restored[0], full_video) and torch.equal(restored[1], full_text)


@pytest.mark.parametrize(("family", "name"), [JOINT_LAYERS[0], JOINT_LAYERS[2]])
def test_joint_spectral_blend_at_the_layer(family, name, adapters):
    """Video blended in 3D frequency; text by the filter's zero-frequency gain: all-pass = global, all-stop =
    the fused windows, the paper's filter (gain < 1 at the odd sizes' DC bin) a mix of the two."""
    adapter, _ = adapters(family)
    attn, x, text, mask, grid, rope = _joint_layer(adapter, name)
    global_ = _joint_call(attn, x, text, rope, mask)
    apply_window_fusion(adapter, window=4, stride=2)
    try:
        attn._diffusers_hook.get_hook(WINDOW_FUSION_HOOK).grid_record.grid = grid
        local = _joint_call(attn, x, text, rope, mask)
    finally:
        remove_window_fusion(adapter)
    results = {}
    for key, d in (("pass", INF), ("stop", 0.0), ("paper", 0.25)):
        apply_spectral_blend(
            adapter, local_window=4, spatial_stop_frequency=d, temporal_stop_frequency=d, local_stride=2
        )
        try:
            attn._diffusers_hook.get_hook(SPECTRAL_BLEND_HOOK).grid_record.grid = grid
            results[key] = _joint_call(attn, x, text, rope, mask)
        finally:
            remove_spectral_blend(adapter)
    for i in (0, 1):  # video, text
        torch.testing.assert_close(results["pass"][i], global_[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(results["stop"][i], local[i], atol=1e-5, rtol=0)
    f, h, w = grid
    lpf = FreeInitMixin._get_free_init_freq_filter(None, (f, h, w), "cpu", "gaussian", 4, 0.25, 0.25)
    dc = lpf[f // 2, h // 2, w // 2]  # the DC bin of the fftshift-ed spectrum
    assert 0 < dc < 1
    torch.testing.assert_close(results["paper"][1], dc * global_[1] + (1 - dc) * local[1], atol=1e-6, rtol=0)


def test_hunyuan_per_frame_hook_wraps_the_window_hook(adapters):
    """HunyuanVideo's per-frame gate hook on the dual-stream ``attn`` must see the fused output: registering the
    windows takes it off and the next per-frame call puts it back outside."""
    from longgen.backbones.hunyuan_video import PER_FRAME_HOOK, has_per_frame_timesteps

    adapter, cond = adapters("hunyuan_video")
    _denoise(adapter, cond)  # per-frame sigmas: the per-frame hooks are on
    assert has_per_frame_timesteps(adapter.model)
    apply_window_fusion(adapter, window=4, stride=2)
    try:
        assert not has_per_frame_timesteps(adapter.model)
        fused = _denoise(adapter, cond)
        order = adapter.model.transformer_blocks[0].attn._diffusers_hook._hook_order
        assert order.index(WINDOW_FUSION_HOOK) < order.index(PER_FRAME_HOOK)  # later = outer
    finally:
        remove_window_fusion(adapter)
    assert torch.isfinite(fused).all()


@pytest.mark.parametrize(
    ("family", "extension"),
    [("wan", "fusion"), ("wan", "spectral"), ("cogvideox", "fusion"), ("hunyuan_video", "fusion")],
)
def test_generate_on_a_saved_model_from_the_cli(family, extension, saved, tmp_path):
    path = saved(family)
    pipe = LongVideoPipeline.from_pretrained(path)
    # 25 frames: 7 latent frames; native: 3 (Wan), 4 (CogVideoX), 5 (HunyuanVideo)
    kwargs = dict(num_frames=25, num_inference_steps=2, show_progress=False, seed=3)
    stock = pipe.generate("a ball", **kwargs).latents
    handle = pipe.apply_extension(extension)
    extended = pipe.generate("a ball", **kwargs).latents
    assert handle.describe()["method"] == extension
    pipe.remove_extensions()
    assert not torch.allclose(stock, extended, atol=1e-4)
    assert torch.equal(pipe.generate("a ball", **kwargs).latents, stock)
    out = tmp_path / "long.mp4"
    args = ["generate", "--model", path, "--num-frames", "25", "--target-frames", "25"]
    args += ["--extension", extension, "--steps", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert video_info(out)["num_frames"] == 25


def test_ltx_pixel_coordinates_give_the_token_grid(adapters):
    """LTXConditionPipeline-style ``video_coords`` (no grid arguments): the grid comes from the coordinates."""
    adapter, cond = adapters("ltx")
    adapter.pixel_rope_coords = True
    try:
        stock = _denoise(adapter, cond)
        apply_window_fusion(adapter, window=4, stride=2)
        try:
            fused = _denoise(adapter, cond)
            attn = adapter.temporal_attention_modules()[0][1]
            assert attn._diffusers_hook.get_hook(WINDOW_FUSION_HOOK).grid_record.grid == (FRAMES, 2, 2)
        finally:
            remove_window_fusion(adapter)
    finally:
        adapter.pixel_rope_coords = False
    assert torch.isfinite(fused).all() and not torch.allclose(fused, stock, atol=1e-3)
