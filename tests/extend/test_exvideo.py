"""ExVideo: reflected ids, identity Conv3d, stock parity at the trained length, longer clips, trainable set, removal."""

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from longgen.backbones import build_tiny
from longgen.backbones.wan import WanAdapter
from longgen.extend.exvideo import (
    IdentityConv3d,
    apply_exvideo,
    exvideo_trainable_parameters,
    reflected_position_ids,
    remove_exvideo,
)
from longgen.extend.fusion import apply_window_fusion, remove_window_fusion
from longgen.pipeline import LongVideoPipeline


@pytest.fixture(scope="module")
def adapters():
    return {"animatediff": build_tiny("animatediff", seed=0), "svd": build_tiny("svd", seed=0)}


@pytest.fixture(scope="module")
def conds(adapters):
    with torch.no_grad():
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return {
            "animatediff": adapters["animatediff"].encode_prompt(
                ["a red ball"], do_classifier_free_guidance=False
            )[0],
            "svd": adapters["svd"].encode_prompt(
                [""], image=image, do_classifier_free_guidance=False, height=32, width=32
            )[0],
        }


def _denoise(adapter, cond, num_frames, seed=0):
    _, height, width = adapter.native_video_size
    x = torch.randn(
        adapter.latent_shape(num_frames, height, width), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return adapter.denoise(x, torch.full((1, num_frames), 0.6), cond)


def _native(adapter):
    return adapter.num_latent_frames(adapter.native_video_size[0])


def test_reflected_position_ids():
    # the whole trained range, back and forth
    assert reflected_position_ids(12, 4).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert reflected_position_ids(3, 4).tolist() == [0, 1, 2]
    # DiffSynth's SVD-XT setting (max_id 25, repeat_length 20): 0..24, 23 down to 4, 5 up to 24, 23, ...
    ids = reflected_position_ids(128, 25, repeat_length=20).tolist()
    assert ids[:25] == list(range(25))
    assert ids[25:45] == list(range(23, 3, -1)) and ids[45:65] == list(range(5, 25)) and ids[65] == 23
    assert min(ids) == 0 and max(ids) == 24
    with pytest.raises(ValueError, match="repeat_length"):
        reflected_position_ids(30, 25, repeat_length=25)


def test_identity_conv3d_is_exact_and_reflect_padded():
    x = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    conv = IdentityConv3d(3)
    with torch.no_grad():
        assert torch.equal(conv(x), x)
        assert torch.equal(conv(x[:, :, :1, :1]), x[:, :, :1, :1])  # length-1 axes (replicate) still work
        # move the identity to the previous-frame tap: out[f] = x[f - 1], and at f = 0 the reflection x[1]
        conv.weight.zero_()
        conv.weight[:, :, 0, 1, 1] = torch.eye(3)
        out = conv(x)
    assert torch.equal(out[:, :, 1:], x[:, :, :-1]) and torch.equal(out[:, :, 0], x[:, :, 1])


@pytest.mark.parametrize("family", ["animatediff", "svd"])
def test_trained_length_is_stock_and_longer_clips_work(family, adapters, conds):
    adapter, cond = adapters[family], conds[family]
    native = _native(adapter)
    extended = 3 * native
    stock_native = _denoise(adapter, cond, native)
    stock_long = _denoise(adapter, cond, 2 * native)
    state = apply_exvideo(adapter, extended)
    try:
        assert torch.equal(_denoise(adapter, cond, native), stock_native)  # identity initialisation
        long = _denoise(adapter, cond, 2 * native)
        longest = _denoise(adapter, cond, extended)
        ids = reflected_position_ids(extended, native)
        assert torch.equal(state.position_ids, ids)
        site = state.sites[0]
        if family == "animatediff":
            table = site.site.position.pe  # the trainable table replaces the frame-position buffer
            assert isinstance(table, torch.nn.Parameter) and table.shape[1] == extended
            assert torch.equal(table[0], site.original_pe[0, ids])
            assert adapter.max_num_frames() == extended
            with pytest.raises(ValueError, match=f"at most {extended} latent frames"):
                _denoise(adapter, cond, extended + 1)
        else:
            # the Timesteps module whose sinusoid of the frame ids the table replaces
            proj = site.site.position
            sinusoid = get_timestep_embedding(
                ids, proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale
            )
            torch.testing.assert_close(proj.exvideo_table, sinusoid, atol=0, rtol=0)
            with pytest.raises(ValueError, match=f"covers {extended} frames"):
                _denoise(adapter, cond, extended + 1)
    finally:
        remove_exvideo(adapter)
    assert torch.isfinite(long).all() and torch.isfinite(longest).all() and longest.shape[2] == extended
    # frames past the trained length see reflected positions
    assert not torch.allclose(long, stock_long, atol=1e-4)
    assert torch.equal(_denoise(adapter, cond, 2 * native), stock_long)  # removed: the stock model
    assert torch.equal(_denoise(adapter, cond, native), stock_native)


def _expected_trainable(family, name):
    if family == "animatediff":
        return ".motion_modules." in name  # the motion modules, their position tables and convolutions
    return (
        ".temporal_transformer_blocks." in name
        or ".time_pos_embed." in name
        or "time_proj.exvideo_table" in name
    )


@pytest.mark.parametrize("family", ["animatediff", "svd"])
def test_only_the_intended_parameters_train(family, adapters, conds):
    adapter, cond = adapters[family], conds[family]
    model = adapter.model
    names_before = set(model.state_dict())
    native = _native(adapter)
    apply_exvideo(adapter, 2 * native)
    try:
        named = dict(model.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        assert trainable == {n for n in named if _expected_trainable(family, n)}
        assert {id(p) for p in exvideo_trainable_parameters(adapter)} == {id(named[n]) for n in trainable}
        convs = [n for n in named if n.endswith("exvideo_conv.weight")]
        assert convs and all(n in trainable for n in convs)
        if family == "svd":  # one Conv3d per temporal block, one table per spatio-temporal transformer
            assert len(convs) == len(adapter.temporal_attention_modules())
            assert sum(n.endswith("exvideo_table") for n in trainable) == len(
                adapter.temporal_position_embeddings()
            )
        else:  # one table and one Conv3d per motion-module transformer block
            assert len(convs) == len(adapter.temporal_position_embeddings())
        # gradients reach the new layers at 2x the native length, and nothing frozen gets one
        _, height, width = adapter.native_video_size
        x = torch.randn(
            adapter.latent_shape(2 * native, height, width), generator=torch.Generator().manual_seed(2)
        )
        adapter.denoise(x, torch.full((1, 2 * native), 0.6), cond).square().mean().backward()
        assert all(named[n].grad is not None for n in convs)
        assert all(p.grad is None for n, p in named.items() if n not in trainable)
    finally:
        model.zero_grad(set_to_none=True)
        remove_exvideo(adapter)
    assert set(model.state_dict()) == names_before
    assert all(p.requires_grad for p in model.parameters())


def test_window_fusion_on_top_of_exvideo(adapters, conds):
    adapter, cond = adapters["animatediff"], conds["animatediff"]
    apply_window_fusion(adapter)
    try:
        with pytest.raises(RuntimeError, match="remove_window_fusion"):
            apply_exvideo(adapter, 16)
    finally:
        remove_window_fusion(adapter)
    apply_exvideo(adapter, 16)
    try:
        apply_window_fusion(adapter, window=8, stride=4)
        try:
            with pytest.raises(RuntimeError, match="remove_window_fusion"):
                remove_exvideo(adapter)
            out = _denoise(adapter, cond, 16)
        finally:
            remove_window_fusion(adapter)
    finally:
        remove_exvideo(adapter)
    assert torch.isfinite(out).all()


def test_unsupported_backbone_is_a_clear_error():
    wan = WanAdapter.__new__(WanAdapter)
    with pytest.raises(
        ValueError, match=r"ExVideo is not available for the 'wan' backbone.*supported: animatediff, svd\."
    ):
        apply_exvideo(wan, 64)


@pytest.mark.parametrize("sampler", ["full", "sliding"])
def test_generate_end_to_end(adapters, sampler):
    adapter = adapters["animatediff"]
    pipe = LongVideoPipeline(adapter)
    kwargs = dict(num_frames=16, num_inference_steps=2, sampler=sampler, seed=7, show_progress=False)
    stock = pipe.generate("a red ball", **kwargs).latents
    apply_exvideo(adapter, 16)
    try:
        extended = pipe.generate("a red ball", **kwargs).latents
    finally:
        remove_exvideo(adapter)
    assert extended.shape == stock.shape == (1, 4, 16, 4, 4) and torch.isfinite(extended).all()
    if sampler == "full":  # the full clip reaches the reflected positions
        assert not torch.allclose(extended, stock, atol=1e-4)
    else:  # native-length windows only use the trained positions: identical to stock
        assert torch.equal(extended, stock)
    assert torch.equal(pipe.generate("a red ball", **kwargs).latents, stock)
