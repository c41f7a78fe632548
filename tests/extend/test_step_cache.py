"""Step caching (issue 16.2): diffusers' cache hooks from ``--extension cache``, one cache state per window."""

import pytest
import torch

from longgen.backbones import build_tiny
from longgen.cli import main
from longgen.extend.configs import StepCacheConfig
from longgen.io import video_info
from longgen.pipeline import LongVideoPipeline
from longgen.samplers.base import window_scope


@pytest.fixture(scope="module")
def pipe():
    return LongVideoPipeline(build_tiny("wan"))


def _sliding(pipe, **options):
    return pipe.generate("a ball", num_frames=33, sampler="sliding", num_inference_steps=6, seed=0,
                         show_progress=False, sampler_options=options or None)


def test_threshold_zero_is_plain_sampling_and_remove_restores_the_model(pipe):
    plain = _sliding(pipe)
    with pipe.apply_extension("cache", kind="fbc", threshold=0.0) as handle:
        cached = _sliding(pipe)
        details = handle.describe()["details"]
    pipe.extensions.clear()
    torch.testing.assert_close(cached.latents, plain.latents, atol=1e-6, rtol=1e-6)
    assert details["calls"] == details["full"] > 0  # nothing skipped at threshold 0
    assert "denoise" not in vars(pipe.adapter)
    torch.testing.assert_close(_sliding(pipe).latents, plain.latents, rtol=0, atol=0)


@pytest.mark.parametrize("window_batch", [1, 3])
def test_fbc_skips_per_window_and_drifts_little(pipe, window_batch):
    plain = _sliding(pipe, window_batch=window_batch)
    with pipe.apply_extension("cache", kind="fbc", threshold=0.2) as handle:
        cached = _sliding(pipe, window_batch=window_batch)
        details = handle.describe()["details"]
    pipe.extensions.clear()
    # one context per window (batched: per window group), each called once per step
    groups = 7 if window_batch == 1 else 3  # 9 latent frames, window 3, stride 1: windows at 0..6
    assert len(details["contexts"]) == groups
    assert all(c["calls"] == 6 for c in details["contexts"].values())
    assert 0 < details["full"] < details["calls"]
    assert 0 < (cached.latents - plain.latents).abs().max() < 0.5 * plain.latents.abs().max()


def test_cache_decision_is_per_window_not_per_clip(pipe):
    """Two windows of very different content called alternately: with one state per window each repeat is
    recognised (skipped); sharing one clip-level state compares window B with window A and never skips."""
    adapter = pipe.adapter
    cond, _ = adapter.encode_prompt(["a ball"], None)
    a = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    b = 4.0 * torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((1, 3), 0.5)
    for keyed in (True, False):
        with pipe.apply_extension("cache", kind="fbc", threshold=0.05) as handle:
            for _ in range(3):
                for key, x in (("0", a), ("1", b)):
                    with window_scope(key if keyed else None):
                        adapter.denoise(x, sigma, cond)
            details = handle.describe()["details"]
        pipe.extensions.clear()
        if keyed:
            assert {k: v["full"] for k, v in details["contexts"].items()} == {"0|1x4x3x4x4": 1, "1|1x4x3x4x4": 1}
        else:
            assert details["contexts"] == {"clip|1x4x3x4x4": {"calls": 6, "full": 6, "fresh_starts": 0}}


def test_a_rising_noise_level_starts_a_fresh_state(pipe):
    adapter = pipe.adapter
    cond, _ = adapter.encode_prompt(["a ball"], None)
    x = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pipe.apply_extension("cache", kind="fbc", threshold=0.05) as handle:
        with window_scope("0"):
            for level in (0.5, 0.5, 0.9):  # same input; the 0.9 call is a new run in this window
                adapter.denoise(x, torch.full((1, 3), level), cond)
        assert handle.state.full["0|1x4x3x4x4"] == 2
    pipe.extensions.clear()


def test_taylorseer_follows_its_schedule_per_window_on_fifo(pipe):
    plain = pipe.generate("a ball", num_frames=21, sampler="fifo", seed=0, show_progress=False)
    with pipe.apply_extension("cache", kind="taylorseer", interval=2, warmup_steps=2) as handle:
        cached = pipe.generate("a ball", num_frames=21, sampler="fifo", seed=0, show_progress=False)
        details = handle.describe()["details"]
    pipe.extensions.clear()
    windows = {k: v for k, v in details["contexts"].items() if not k.startswith("clip")}
    assert len(windows) == 8  # fifo lookahead: 2 * num_partitions windows, one state each
    for counts in windows.values():  # steps 0, 1 warm-up, then full every 2nd step: 0 1 . 3 . 5 ...
        n = counts["calls"]
        assert counts["full"] == sum(1 for s in range(n) if s < 2 or (s - 3) % 2 == 0)
    assert 0 < (cached.latents - plain.latents).abs().max() < plain.latents.abs().max()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="--cache-kind must be one of fbc, taylorseer"):
        StepCacheConfig(kind="magic")
    with pytest.raises(ValueError, match="--cache-interval must be >= 1"):
        StepCacheConfig(kind="taylorseer", interval=0)


def test_cache_from_the_cli(saved, tmp_path, capsys):
    out = tmp_path / "c.mp4"
    base = ["generate", "--model", saved("wan"), "--num-frames", "33", "--quiet", "--out", str(out)]
    assert main([*base, "--sampler", "df", "--extension", "cache", "--cache-threshold", "0.1"]) == 0
    assert video_info(out)["num_frames"] == 33
    assert main([*base, "--extension", "cache", "--cache-kind", "magic"]) == 2
    assert "--cache-kind must be one of" in capsys.readouterr().err
    unet = ["generate", "--model", saved("animatediff"), "--quiet", "--out", str(tmp_path / "u.mp4")]
    assert main([*unet, "--extension", "cache"]) == 2
    err = capsys.readouterr().err
    assert "cache" in err and "Traceback" not in err


def test_cache_stacks_on_another_extension_through_the_api(pipe):
    """The CLI takes one --extension; the Python API stacks them: RoPE NTK + cache at threshold 0 = NTK alone."""
    ntk = pipe.apply_extension("ntk", 21)
    extended = _sliding(pipe)
    cache = pipe.apply_extension("cache", threshold=0.0)
    both = _sliding(pipe)
    assert cache.describe()["details"]["calls"] > 0
    pipe.remove_extensions()
    assert ntk.removed and cache.removed
    torch.testing.assert_close(both.latents, extended.latents, atol=1e-6, rtol=1e-6)


def test_applying_twice_is_a_clear_error(pipe):
    with pipe.apply_extension("cache"):
        with pytest.raises(ValueError, match="already applied"):
            pipe.apply_extension("cache")
    pipe.extensions.clear()


def test_df_chunks_each_start_a_fresh_state(pipe):
    """df denoises one window per call, chunk after chunk: the state is per chunk (a new chunk's fresh noise
    raises the level, so the previous chunk's residuals are dropped and its first step computes in full)."""
    from longgen.samplers.builtin import df_model_call_lengths

    with pipe.apply_extension("cache", kind="fbc", threshold=10.0) as handle:  # skip whenever allowed
        pipe.generate("a ball", num_frames=33, sampler="df", num_inference_steps=4, seed=0, show_progress=False)
        contexts = handle.describe()["details"]["contexts"]
    pipe.extensions.clear()
    knobs = pipe.sampler_kwargs("df", 9, {})
    chunks = len(df_model_call_lengths(9, knobs["base_num_latent_frames"], knobs["overlap_history"]))
    assert chunks > 1
    (counts,) = contexts.values()
    assert counts == {"calls": 4 * chunks, "full": chunks, "fresh_starts": chunks - 1}
