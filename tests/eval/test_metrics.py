"""Long-video metrics: each moves the right way under a known, growing amount of damage, and is ideal
(or constant) on a static clean clip."""

import math

import cv2
import numpy as np
import pytest

from longgen.eval.metrics import (
    PSNR_CAP_DB,
    Series,
    color_drift,
    compute_series,
    evaluate_frames,
    psnr,
    spatial_sharpness,
    ssim,
    summarize,
    temporal_high_frequency,
    window_bounds,
    window_means,
)

N, SIDE, SPEED = 32, 40, 2
_rng = np.random.default_rng(0)
# Random textures with mid-range values (brightness changes never clip), wide enough to pan over: a
# smooth one, whose frames stay similar under a 2-px pan (flow and SSIM work), and a sharp one for blur.
_NOISE = _rng.integers(40, 216, (SIDE + 8, SIDE + SPEED * N + 8, 3)).astype(np.uint8)
TEXTURE = cv2.GaussianBlur(_NOISE, (0, 0), 2.0)
SHARP_TEXTURE = cv2.GaussianBlur(_NOISE, (0, 0), 0.8)


def crops(xs, texture=TEXTURE) -> np.ndarray:
    """Frames [len(xs), SIDE, SIDE, 3] cut from a texture at horizontal offsets ``xs`` (a pan)."""
    return np.stack([texture[4 : 4 + SIDE, x : x + SIDE] for x in xs])


STATIC = crops([0] * N)
MOVING = crops([SPEED * t for t in range(N)])
SHARP_MOVING = crops([SPEED * t for t in range(N)], SHARP_TEXTURE)


def add_flicker(clip, amount):
    offsets = amount * (-1) ** np.arange(len(clip))  # alternating brightness: pure temporal Nyquist
    return np.clip(clip.astype(np.int16) + offsets[:, None, None, None], 0, 255).astype(np.uint8)


def blur(clip, sigma):
    return clip.copy() if sigma == 0 else np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in clip])


def progressive_blur(clip, sigma_end):
    sig = sigma_end * np.arange(len(clip)) / (len(clip) - 1)
    return np.stack([f if s == 0 else cv2.GaussianBlur(f, (0, 0), s) for f, s in zip(clip, sig)])


def color_drift_clip(clip, level):
    """Red channel rising linearly to +30*level grey levels at the last frame."""
    out = clip.astype(np.int16)
    out[..., 0] += np.rint(30 * level * np.arange(len(clip)) / (len(clip) - 1)).astype(np.int16)[
        :, None, None
    ]
    return np.clip(out, 0, 255).astype(np.uint8)


def frozen_clip(num_frozen):
    """The pan with ``num_frozen`` isolated frames that do not advance (stop-and-go); nested in the level."""
    candidates = np.random.default_rng(1).permutation(np.arange(2, N - 1, 2))  # even frames: never adjacent
    frozen = set(candidates[:num_frozen].tolist())
    xs = [0]
    for t in range(1, N):
        xs.append(xs[-1] + (0 if t in frozen else SPEED))
    return crops(xs)


def shuffled_clip(clip, num_swaps):
    """Swap ``num_swaps`` disjoint pairs of frames 5 apart; each level's swaps include the previous ones."""
    starts = np.random.default_rng(2).permutation(np.arange(0, N - 5, 10))
    starts = np.concatenate([starts, np.random.default_rng(3).permutation(np.arange(2, N - 5, 10))])
    perm = np.arange(len(clip))
    for s in starts[:num_swaps]:
        perm[[s, s + 5]] = perm[[s + 5, s]]
    return clip[perm]


def summary(clip, groups, key="mean", window=8):
    series = compute_series(clip, groups=groups)
    out = {}
    for name, s in series.items():
        _, means = window_means(s, len(clip), window)
        out[name] = summarize(s, means)[key]
    return out


def assert_strictly(values, increasing, name):
    diffs = np.diff(np.asarray(values, dtype=np.float64))
    ok = (diffs > 0).all() if increasing else (diffs < 0).all()
    assert ok, f"{name} should {'rise' if increasing else 'fall'} with damage, got {values}"


def across_levels(make, levels, groups, key="mean"):
    per_level = [summary(make(level), groups, key) for level in levels]
    return {name: [s[name] for s in per_level] for name in per_level[0]}


def test_static_clean_clip_is_ideal():
    report = evaluate_frames(STATIC, window=8)
    m = {name: v["summary"] for name, v in report["metrics"].items()}
    exact = {
        "temporal_flicker": 1.0,
        "temporal_hf_energy": 0.0,
        "temporal_hf_ratio": 0.0,
        "ssim_prev": 1.0,
        "ssim_first": 1.0,
        "psnr_prev": PSNR_CAP_DB,
        "psnr_first": PSNR_CAP_DB,
        "color_hist_drift": 0.0,
        "luminance_drift": 0.0,
        "dynamic_degree": 0.0,
        "coherence_gap2": 1.0,
        "coherence_gap5": 1.0,
        "coherence_gap10": 1.0,
        "coherence_gap20": 1.0,
    }
    for name, ideal in exact.items():
        assert m[name]["mean"] == pytest.approx(ideal, abs=1e-9), name
    assert m["warping_error"]["mean"] < 1e-6  # flow on identical frames is ~0, not exactly 0
    assert m["motion_smoothness"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["motion_magnitude"]["mean"] < 0.5  # px at a 256-px side: flow noise, far below VBench's 6
    assert "coherence_gap50" not in m  # longer than the clip
    # Per-frame metrics are constant over time: no drift at all.
    for name in ("sharpness", "spatial_hf_energy", "temporal_flicker", "ssim_first", "color_hist_drift"):
        assert m[name]["end_minus_start"] == 0.0, name
        assert m[name]["slope_per_100_frames"] == pytest.approx(0.0, abs=1e-9), name
        assert m[name]["window_drift"] == pytest.approx(0.0, abs=1e-9), name


def test_added_flicker():
    levels = (0, 4, 8, 16)
    for clip in (STATIC, MOVING):
        got = across_levels(
            lambda a, c=clip: add_flicker(c, a), levels, ("flicker", "temporal_hf", "similarity", "flow")
        )
        assert_strictly(got["temporal_flicker"], False, "temporal_flicker")
        assert_strictly(got["temporal_hf_energy"], True, "temporal_hf_energy")
        assert_strictly(got["psnr_prev"], False, "psnr_prev")
        assert_strictly(got["ssim_prev"], False, "ssim_prev")
        assert_strictly(got["warping_error"], True, "warping_error")
        assert_strictly(got["motion_smoothness"], False, "motion_smoothness")
    got = across_levels(lambda a: add_flicker(MOVING, a), levels, ("temporal_hf",))
    assert_strictly(got["temporal_hf_ratio"], True, "temporal_hf_ratio")


def test_pure_temporal_nyquist_flicker_is_all_high_frequency():
    energy, ratio = temporal_high_frequency(add_flicker(STATIC, 10))
    assert np.all(ratio.values > 0.99)
    # RMS of a +-10 grey-level square wave is 10/255; the Hann taper loses a little at the segment ends.
    np.testing.assert_allclose(energy.values, 10 / 255, rtol=0.05)


def test_blur():
    levels = (0, 0.7, 1.5, 3.0)
    got = across_levels(lambda s: blur(SHARP_MOVING, s), levels, ("spatial",))
    assert_strictly(got["sharpness"], False, "sharpness")
    assert_strictly(got["spatial_hf_energy"], False, "spatial_hf_energy")
    # Blur that grows over the clip is drift: the end is blurrier the stronger it is, below the start,
    # and the slope is negative.
    for key in ("end", "end_minus_start", "slope_per_100_frames"):
        got = across_levels(lambda s: progressive_blur(SHARP_MOVING, s), levels, ("spatial",), key)
        for name in ("sharpness", "spatial_hf_energy"):
            if key == "end":
                assert_strictly(got[name], False, f"{name} {key}")
            else:
                # without blur only the pan changes the content: a small fraction of the mildest drift
                assert abs(got[name][0]) < 0.1 * abs(got[name][1]), f"{name} {key} without blur: {got[name]}"
                assert all(v < 0 for v in got[name][1:]), f"{name} {key} should be negative: {got[name]}"


def test_color_drift():
    levels = (0, 1, 2, 3)
    for key in ("end", "end_minus_start", "slope_per_100_frames"):
        got = across_levels(lambda lv: color_drift_clip(STATIC, lv), levels, ("color",), key)
        assert_strictly(got["color_hist_drift"], True, f"color_hist_drift {key}")
        assert_strictly(got["luminance_drift"], True, f"luminance_drift {key}")
    got = across_levels(lambda lv: color_drift_clip(STATIC, lv), levels, ("similarity", "coherence"), "end")
    assert_strictly(got["psnr_first"], False, "psnr_first")
    assert_strictly(got["ssim_first"], False, "ssim_first")
    assert_strictly(got["coherence_gap20"], False, "coherence_gap20")
    got = across_levels(lambda lv: color_drift_clip(MOVING, lv), levels, ("color",), "end")
    assert_strictly(got["color_hist_drift"], True, "color_hist_drift on a moving clip")


def test_frozen_frames():
    got = across_levels(frozen_clip, (0, 3, 6, 9), ("flicker", "similarity", "flow"))
    assert_strictly(got["dynamic_degree"], False, "dynamic_degree")
    assert_strictly(got["motion_magnitude"], False, "motion_magnitude")
    assert_strictly(got["motion_smoothness"], False, "motion_smoothness")  # stop-and-go is not smooth
    assert_strictly(got["temporal_flicker"], True, "temporal_flicker")  # a frozen pair does not change
    assert_strictly(got["psnr_prev"], True, "psnr_prev")
    assert got["dynamic_degree"][0] == 1.0


def test_shuffled_frames():
    got = across_levels(
        lambda k: shuffled_clip(MOVING, k), (0, 1, 2, 4), ("flicker", "temporal_hf", "similarity", "flow")
    )
    assert_strictly(got["temporal_flicker"], False, "temporal_flicker")
    assert_strictly(got["temporal_hf_energy"], True, "temporal_hf_energy")
    assert_strictly(got["temporal_hf_ratio"], True, "temporal_hf_ratio")
    assert_strictly(got["ssim_prev"], False, "ssim_prev")
    assert_strictly(got["warping_error"], True, "warping_error")
    assert_strictly(got["motion_smoothness"], False, "motion_smoothness")


def test_ssim_matches_the_direct_formula():
    rng = np.random.default_rng(5)
    a = rng.uniform(0, 255, (16, 16))
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    # Direct evaluation on every fully inside 11x11 window (the 'valid' SSIM map), Gaussian sigma 1.5.
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(16 - 10):
        for j in range(16 - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va, vb = (win * pa * pa).sum() - ma**2, (win * pb * pb).sum() - mb**2
            cov = (win * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert ssim(a, b) == pytest.approx(np.mean(vals), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)


def test_psnr_and_colour_drift_values():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a + 5) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)
    assert psnr(a, a) == PSNR_CAP_DB
    clip = np.stack([STATIC[0], np.clip(STATIC[0].astype(int) + 10, 0, 255).astype(np.uint8)])
    hist, lum = color_drift(clip)
    # Every channel shifted by 10 grey levels: Wasserstein-1 distance 10/255, luma up by 10/255.
    assert hist.values[0] == pytest.approx(10 / 255, abs=1e-9)
    assert lum.values[0] == pytest.approx(10 / 255, abs=1e-9)


def test_summary_contrast_slope_and_window_drift():
    pos = np.arange(100)
    s = Series("ssim_first", pos, 0.5 + 0.002 * pos)  # rises 0.2 per 100 frames
    centres, means = window_means(s, 100, 20)
    np.testing.assert_allclose(centres, [9.5, 29.5, 49.5, 69.5, 89.5])
    np.testing.assert_allclose(means, 0.5 + 0.002 * centres)
    out = summarize(s, means)
    assert out["slope_per_100_frames"] == pytest.approx(0.2, abs=1e-12)
    assert out["start"] == pytest.approx(0.5 + 0.002 * 7, abs=1e-12)  # first 15 values: mean index 7
    assert out["end"] == pytest.approx(0.5 + 0.002 * 92, abs=1e-12)
    assert out["end_minus_start"] == pytest.approx(0.002 * 85, abs=1e-12)
    assert out["window_drift"] == pytest.approx(np.mean([0.04, 0.08, 0.12, 0.16]), abs=1e-12)
    assert summarize(Series("x", [], []))["mean"] is None


def test_window_bounds():
    assert window_bounds(40, 16) == [(0, 16), (16, 32), (24, 40)]
    assert window_bounds(32, 16) == [(0, 16), (16, 32)]
    assert window_bounds(10, 16) == [(0, 10)]
    assert window_bounds(20, 8, stride=4) == [(0, 8), (4, 12), (8, 16), (12, 20)]
    with pytest.raises(ValueError, match="window"):
        window_bounds(10, 0)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        evaluate_frames(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        evaluate_frames(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown metric groups"):
        compute_series(STATIC, groups=("flikcer",))
    # float frames in [0, 1] are accepted and equal their uint8 rounding
    a = spatial_sharpness(STATIC[:2].astype(np.float32) / 255.0)[0].values
    b = spatial_sharpness(STATIC[:2])[0].values
    np.testing.assert_allclose(a, b)
