"""Temporal RoPE extension (PI, NTK, YaRN, RIFLEx): the papers' equations, identity at scale 1, bit-exact
removal, and the extension reaching the model on every 3D-RoPE backbone."""

import json
import math

import pytest
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from longgen.backbones import build_tiny
from longgen.cli import build_parser
from longgen.extend import (
    apply_rope_extension,
    extension_from_args,
    get_rope_extension,
    remove_rope_extension,
    riflex_intrinsic_frequency,
    temporal_rope_info,
)
from longgen.extend.rope import (
    YARN_TEMPERATURE_HOOK,
    ntk_base,
    ntk_frequencies,
    pi_frequencies,
    riflex_frequencies,
    riflex_periods,
    rope_frequencies,
    yarn_attention_temperature,
    yarn_frequencies,
    yarn_ramp,
)
from longgen.pipeline import LongVideoPipeline

ROPE_FAMILIES = ("wan", "skyreels_v2", "hunyuan_video", "cogvideox", "ltx")
_CACHE: dict = {}


def tiny(family):
    """One tiny adapter per family for the whole module, with a cond and latents at 1x and 2x length."""
    if family not in _CACHE:
        adapter = build_tiny(family)
        cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)
        native = adapter.num_latent_frames(adapter.native_video_size[0])
        h, w = (s // adapter.spatial_compression for s in adapter.native_video_size[1:])
        gen = torch.Generator().manual_seed(0)
        xs = {
            n: torch.randn(1, adapter.latent_channels, n, h, w, generator=gen) for n in (native, 2 * native)
        }
        _CACHE[family] = (adapter, cond, native, xs)
    return _CACHE[family]


def denoise(adapter, cond, x):
    sigma = torch.linspace(0.9, 0.4, x.shape[2])[None]  # per-frame levels: the hooked per-frame paths too
    with torch.no_grad():
        return adapter.denoise(x, sigma, cond)


# --- the equations on hand-computed cases ----------------------------------------------------------
def test_pi_and_ntk_frequencies_equal_the_equations_and_diffusers():
    theta = rope_frequencies(4, 100.0)
    assert theta.tolist() == [1.0, 0.1]
    assert torch.allclose(
        pi_frequencies(theta, 2.0), torch.tensor([0.5, 0.05], dtype=torch.float64), rtol=1e-15
    )
    # NTK, d=4, s=2: b' = 100 * 2^(4/2) = 400, theta' = (1, 400^(-1/2)) = (1, 0.05)
    assert ntk_base(100.0, 2.0, 4) == 400.0
    assert torch.allclose(
        ntk_frequencies(theta, 2.0), torch.tensor([1.0, 0.05], dtype=torch.float64), rtol=1e-15
    )
    assert torch.allclose(
        ntk_frequencies(rope_frequencies(16, 256.0), 3.0), rope_frequencies(16, ntk_base(256, 3, 16))
    )
    # diffusers' linear_factor / ntk_factor tables (float64) from the same frequencies
    dim, base, s, positions = 16, 10000.0, 2.5, torch.arange(40, dtype=torch.float64)
    for ours, kwargs in (
        (pi_frequencies(rope_frequencies(dim, base), s), {"linear_factor": s}),
        (ntk_frequencies(rope_frequencies(dim, base), s), {"ntk_factor": s ** (dim / (dim - 2))}),
    ):
        ref_cos, ref_sin = get_1d_rotary_pos_embed(
            dim, positions, base, use_real=True, freqs_dtype=torch.float64, **kwargs
        )
        angles = torch.outer(positions, ours)
        torch.testing.assert_close(angles.cos().repeat_interleave(2, 1).float(), ref_cos, rtol=0, atol=1e-7)
        torch.testing.assert_close(angles.sin().repeat_interleave(2, 1).float(), ref_sin, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="more than 2 channels"):
        ntk_frequencies(torch.tensor([1.0]), 2.0)


def test_yarn_ramp_frequencies_and_temperature_equal_the_paper():
    theta = rope_frequencies(6, 1000.0)  # (1, 0.1, 0.01)
    # L = 10: r = 10 theta / 2pi = (1.59, 0.16, 0.016) turns; alpha = 1, beta = 2
    gamma0 = 10 / (2 * math.pi) - 1
    torch.testing.assert_close(yarn_ramp(theta, 10), torch.tensor([gamma0, 0.0, 0.0], dtype=torch.float64))
    expected = torch.tensor([(1 - gamma0) * 1 / 2 + gamma0 * 1, 0.1 / 2, 0.01 / 2], dtype=torch.float64)
    torch.testing.assert_close(yarn_frequencies(theta, 2.0, 10), expected, rtol=1e-14, atol=0)
    # L = 20: component 0 turned 3.2 times > beta: kept exactly (extrapolation)
    assert yarn_frequencies(theta, 2.0, 20)[0].item() == 1.0
    # with the paper's text betas (32, 1) the fastest component is only 7% of the way to extrapolation: ~PI
    gamma0 = (20 / (2 * math.pi) - 1) / 31
    expected = torch.tensor([(1 - gamma0) / 2 + gamma0, 0.1 / 2, 0.01 / 2], dtype=torch.float64)
    torch.testing.assert_close(
        yarn_frequencies(theta, 2.0, 20, beta_fast=32, beta_slow=1), expected, rtol=1e-14, atol=0
    )
    assert torch.equal(yarn_frequencies(theta, 1.0, 10), theta)
    assert yarn_attention_temperature(math.e) == pytest.approx(1.1**2, rel=1e-15)
    assert yarn_attention_temperature(1.0) == 1.0 and yarn_attention_temperature(0.5) == 1.0


def test_riflex_known_values():
    # HunyuanVideo: b=256, d=16 -> periods round(2 pi 2^(j-1)); repetition near latent frame 48 -> k=4, N_k=50
    assert riflex_periods(16, 256.0) == [6, 13, 25, 50, 101, 201, 402, 804]
    assert riflex_intrinsic_frequency(16, 256.0, repetition_frame=48) == (4, 50)
    assert riflex_intrinsic_frequency(16, 256.0, train_latent_frames=33) == (4, 50)
    # CogVideoX-5B: head 64 -> 16 temporal channels, b=10000, 13 latent frames -> k=2, N_k=20
    assert riflex_periods(16, 10000.0)[:3] == [6, 20, 63]
    assert riflex_intrinsic_frequency(16, 10000.0, train_latent_frames=13) == (2, 20)
    # k is 1-based: component k has theta = b^(-2(k-1)/d)
    assert 2 * math.pi / rope_frequencies(16, 256.0)[4 - 1].item() == pytest.approx(50.27, abs=0.01)
    theta = rope_frequencies(16, 256.0)
    new = riflex_frequencies(theta, 4, 66)
    assert new[3].item() == pytest.approx(0.9 * 2 * math.pi / 66, rel=1e-15)
    assert torch.equal(torch.cat([new[:3], new[4:]]), torch.cat([theta[:3], theta[4:]]))
    with pytest.raises(ValueError, match="1-based"):
        riflex_frequencies(theta, 0, 66)


# --- applied to every 3D-RoPE backbone --------------------------------------------------------------
def _rope_state(adapter):
    """Every tensor the extensions may touch, cloned."""
    state = {"position_scale": getattr(adapter, "temporal_position_scale", None)}
    rope = adapter.rope_module()
    for name, buf in rope.named_buffers():
        state[name] = buf.clone()
    registry = getattr(rope, "_diffusers_hook", None)
    state["rope_hooks"] = list(registry.hooks) if registry is not None else []
    return state


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_identity_at_scale_one_change_at_scale_two_and_exact_removal(family):
    adapter, cond, native, xs = tiny(family)
    state = _rope_state(adapter)
    stock = {n: denoise(adapter, cond, x) for n, x in xs.items()}
    for method in adapter.rope_extension_methods:
        with apply_rope_extension(adapter, method, native, native) as handle:
            assert get_rope_extension(adapter) is handle and handle.scale == 1.0
            assert torch.equal(denoise(adapter, cond, xs[native]), stock[native]), method
            assert torch.equal(denoise(adapter, cond, xs[2 * native]), stock[2 * native]), method
        assert get_rope_extension(adapter) is None
        # RIFLEx: 2x the tiny native clip fits the intrinsic period (training-free RIFLEx would keep the stock
        # RoPE, see test_riflex_training_free_keeps_rope_within_the_intrinsic_period); finetune changes it
        options = {"finetune": True} if method == "riflex" else {}
        handle = apply_rope_extension(adapter, method, None, 2 * native, **options)  # train: the native clip
        assert handle.train_latent_frames == native and handle.scale == 2.0
        extended = denoise(adapter, cond, xs[2 * native])
        assert (extended - stock[2 * native]).abs().max() > 1e-4, method
        assert remove_rope_extension(adapter) and not remove_rope_extension(adapter)
        _assert_same_state(_rope_state(adapter), state)
        assert torch.equal(denoise(adapter, cond, xs[2 * native]), stock[2 * native]), method


def test_installed_tables_equal_the_equations():
    # Wan: PI rewrites the precomputed temporal columns exactly as diffusers' linear_factor would
    adapter = tiny("wan")[0]
    rope = adapter.rope_module()
    with apply_rope_extension(adapter, "pi", 3, 6):
        ref_cos, ref_sin = get_1d_rotary_pos_embed(
            rope.t_dim,
            rope.freqs_cos.shape[0],
            10000.0,
            use_real=True,
            linear_factor=2.0,
            freqs_dtype=torch.float64,
        )
        assert torch.equal(rope.freqs_cos[:, : rope.t_dim], ref_cos)
        assert torch.equal(rope.freqs_sin[:, : rope.t_dim], ref_sin)
        assert torch.equal(
            rope.freqs_cos[:, rope.t_dim :], adapter.pipe.transformer.rope.freqs_cos[:, rope.t_dim :]
        )
    # HunyuanVideo: the RoPE module's temporal columns follow NTK's base, the spatial ones are untouched
    adapter = tiny("hunyuan_video")[0]
    rope, x = adapter.rope_module(), torch.zeros(1, 4, 10, 4, 4)
    stock_cos, _ = rope(x)
    d = rope.rope_dim[0]
    with apply_rope_extension(adapter, "ntk", 5, 10):
        cos, sin = rope(x)
    frames = torch.arange(10, dtype=torch.float32).repeat_interleave(2 * 2)  # frame of each (2x2-patch) token
    ref_cos, ref_sin = get_1d_rotary_pos_embed(
        d, frames, 256.0, use_real=True, ntk_factor=2.0 ** (d / (d - 2))
    )
    torch.testing.assert_close(cos[:, :d], ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, :d], ref_sin, rtol=0, atol=1e-6)
    assert torch.equal(cos[:, d:], stock_cos[:, d:])
    # CogVideoX: RIFLEx lowers component k of temporal_inv_freq to 0.9 * 2pi / L'
    adapter = tiny("cogvideox")[0]
    with apply_rope_extension(adapter, "riflex", 4, 8) as handle:
        assert handle.intrinsic_component == (1, 6)  # tiny: d=4, b=1e4: periods (6, 628), first >= 4 frames
        inv_freq = adapter.rope_module().temporal_inv_freq
        assert inv_freq[0].item() == pytest.approx(0.9 * 2 * math.pi / 8, rel=1e-7)
        assert inv_freq[1].item() == pytest.approx(0.01, rel=1e-6)


def test_ltx_pi_is_its_frame_rate_and_other_methods_are_refused():
    adapter, cond, native, xs = tiny("ltx")
    x = xs[2 * native]
    with apply_rope_extension(adapter, "pi", native, 2 * native):
        extended = denoise(adapter, cond, x)
    assert torch.equal(extended, denoise(adapter, {**cond, "frame_rate": 2 * adapter.frame_rate}, x))
    for method in ("ntk", "yarn", "riflex"):
        with pytest.raises(ValueError, match="not supported for ltx.*use method='pi'"):
            apply_rope_extension(adapter, method, native, 2 * native)
    assert adapter.temporal_position_scale == 1.0


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_yarn_temperature_scales_every_query_path(family):
    adapter, cond, native, xs = tiny(family)
    attns = (
        [attn for _, attn in adapter.rope_attention_modules()]
        if family == "wan"
        else [attn for _, attn in adapter.temporal_attention_modules()]
    )
    expected = [attn.norm_q for attn in attns] + [
        attn.norm_added_q for attn in attns if getattr(attn, "add_q_proj", None) is not None
    ]
    if family == "hunyuan_video":
        assert any(
            getattr(attn, "add_q_proj", None) is not None for attn in attns
        )  # joint attention: text queries too
    probe = torch.randn(1, 7, expected[0].weight.shape[0])
    stock = expected[0](probe)
    with apply_rope_extension(adapter, "yarn", native, 3 * native) as handle:
        tau = (0.1 * math.log(3) + 1) ** 2
        assert handle.attention_temperature == pytest.approx(tau, rel=1e-15)
        assert sorted(map(id, handle._hooked_modules)) == sorted(map(id, expected))
        torch.testing.assert_close(expected[0](probe), stock * tau, rtol=0, atol=0)
    assert all(YARN_TEMPERATURE_HOOK not in m._diffusers_hook.hooks for m in expected)
    assert torch.equal(expected[0](probe), stock)
    # temperature 1 (frequencies only) installs no attention hook
    with apply_rope_extension(adapter, "yarn", native, 3 * native, attention_temperature=1.0) as handle:
        assert handle._hooked_modules == []


def test_bad_inputs_are_explained():
    animatediff = build_tiny("animatediff")
    with pytest.raises(ValueError, match=r"animatediff \(UNetMotionModel\) has none") as err:
        apply_rope_extension(animatediff, "riflex", 16, 32)
    supported = str(err.value).split("Backbones that support it: ")[1].split(". ")[0].split(", ")
    assert sorted(supported) == ["cogvideox", "hunyuan_video", "ltx (pi only)", "skyreels_v2", "wan"]
    with pytest.raises(ValueError, match="Backbones that support it"):
        temporal_rope_info(animatediff)
    assert remove_rope_extension(animatediff) is False
    adapter, _, native, _ = tiny("wan")
    with pytest.raises(ValueError, match="unknown RoPE extension method 'rope'"):
        apply_rope_extension(adapter, "rope", native, 2 * native)
    with pytest.raises(
        ValueError, match=r"takes no option\(s\) \['beta_fast'\]; it takes: k, repetition_frame"
    ):
        apply_rope_extension(adapter, "riflex", native, 2 * native, beta_fast=3)
    with pytest.raises(ValueError, match="1-based"):
        apply_rope_extension(adapter, "riflex", native, 2 * native, k=5)
    with pytest.raises(ValueError, match="positive"):
        apply_rope_extension(adapter, "pi", native, 0)
    with apply_rope_extension(adapter, "pi", native, 2 * native):
        with pytest.raises(ValueError, match="already applied"):
            apply_rope_extension(adapter, "ntk", native, 2 * native)
    assert get_rope_extension(adapter) is None
    assert extension_from_args(adapter, "none", 2 * native) is None


def test_riflex_training_free_keeps_rope_within_the_intrinsic_period():
    """thu-ml/RIFLEx (hunyuanvideo.py) swaps in its RoPE only ``if L_test > N_k or finetune``: a target within the
    intrinsic period never wraps component k, so the stock model runs; beyond it (or fine-tuned) k is lowered."""
    adapter, cond, native, xs = tiny("wan")  # tiny Wan: native 3 latent frames, k=1, N_k=6
    stock = denoise(adapter, cond, xs[2 * native])
    stock_freqs = adapter.temporal_rope_frequencies()
    with apply_rope_extension(adapter, "riflex", native, 6) as handle:  # L' = 6 <= N_k = 6
        assert handle.intrinsic_component == (1, 6) and handle.options["finetune"] is False
        assert torch.equal(handle.frequencies, stock_freqs)
        assert torch.equal(denoise(adapter, cond, xs[2 * native]), stock)
    with apply_rope_extension(adapter, "riflex", native, 7) as handle:  # L' = 7 > N_k: Eq. 8
        assert handle.frequencies[0].item() == pytest.approx(0.9 * 2 * math.pi / 7)
        assert (denoise(adapter, cond, xs[2 * native]) - stock).abs().max() > 1e-4
    with apply_rope_extension(adapter, "riflex", native, 6, finetune=True) as handle:  # fine-tuned: always
        assert handle.frequencies[0].item() == pytest.approx(0.9 * 2 * math.pi / 6)
        assert handle.describe()["finetune"] is True
    assert torch.equal(denoise(adapter, cond, xs[2 * native]), stock)


def test_riflex_with_long_video_pipeline_at_three_times_the_length():
    adapter = build_tiny("wan", seed=1)
    pipe = LongVideoPipeline(adapter)
    # 3x: 9 latent frames, beyond the intrinsic period N_k = 6 (at 2x training-free RIFLEx is the stock model)
    num_frames = adapter.num_pixel_frames(3 * adapter.num_latent_frames(adapter.native_video_size[0]))
    kwargs = dict(prompt="a ball", num_frames=num_frames, num_inference_steps=2, seed=3, show_progress=False)
    stock = pipe.generate(**kwargs).latents
    handle = extension_from_args(adapter, "riflex", target_latent_frames=stock.shape[2])
    assert handle.method == "riflex" and handle.intrinsic_component == (1, 6)
    extended = pipe.generate(**kwargs).latents
    assert extended.shape == stock.shape and (extended - stock).abs().max() > 1e-4
    handle.remove()
    assert torch.equal(pipe.generate(**kwargs).latents, stock)


def test_temporal_rope_info_and_inspect_rope_cli(tmp_path, capsys):
    adapter = tiny("hunyuan_video")[0]
    info = temporal_rope_info(adapter)
    assert [(a["axis"], a["dim"], a["base"]) for a in info["axes"]] == [
        ("t", 4, 256.0),
        ("h", 6, 256.0),
        ("w", 6, 256.0),
    ]
    t = info["axes"][0]
    assert t["frequencies"] == [1.0, 1 / 16] and t["periods"] == pytest.approx([2 * math.pi, 32 * math.pi])
    assert (
        info["riflex"] == {"k": 1, "N_k": 6}
        and info["native_latent_frames"] == 5
        and info["extension"] is None
    )
    with apply_rope_extension(adapter, "riflex", 5, 10):
        assert temporal_rope_info(adapter)["extension"]["frequencies"][0] == pytest.approx(
            0.9 * 2 * math.pi / 10
        )

    build_tiny("wan").save_pretrained(tmp_path / "wan")
    parser = build_parser()  # inspect-rope's argparse lives in the CLI
    args = parser.parse_args(["inspect-rope", "--model", str(tmp_path / "wan")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "axis t: 4 channels per head (2 frequencies), base 10000" in out and "axis w:" in out
    assert "6.283" in out and "628.319" in out and "k=1 (N_k=6" in out
    args = parser.parse_args(["inspect-rope", "--model", str(tmp_path / "wan"), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["axes"][0]["periods_rounded"] == [6, 628]
