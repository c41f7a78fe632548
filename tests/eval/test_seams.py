"""Seam ratios, LV-Bench VDE and STREAM-T (longgen.eval.seams) on real mp4 files, and `longgen eval` with them."""

import json
import math
import warnings

import numpy as np
import pytest

from longgen.cli import main
from longgen.data.synthetic import render_clip, sample_world
from longgen.eval.report import evaluate_videos, read_clip
from longgen.eval.seams import (
    seam_boundaries,
    seam_report,
    stream_report,
    stream_skewness,
    stream_t,
    vde_report,
    video_drift_error,
)
from longgen.io import VideoWriter

WORLD = sample_world(5)
N = 32


def _write(path, frames):
    with VideoWriter(path, fps=8) as writer:
        for s in range(0, len(frames), 8):  # chunk by chunk, as a generator writes
            writer.write(frames[s : s + 8])
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("seams")
    clean, _ = render_clip(WORLD, N, 48, 48)
    jumped = clean.astype(np.int16)
    jumped[16:, ..., 0] += 40  # chunk 3 of 4 comes out redder: a colour seam at frame 16
    jumped = np.clip(jumped, 0, 255).astype(np.uint8)
    ramp = np.clip(clean * np.linspace(0.6, 1.4, N)[:, None, None, None], 0, 255).astype(np.uint8)
    return {
        "clean": _write(root / "clean.mp4", clean),
        "jump": _write(root / "jump.mp4", jumped),
        "ramp": _write(root / "ramp.mp4", ramp),
    }


def test_injected_colour_jump_is_flagged_at_its_boundary_and_a_clean_clip_is_not(clips):
    for name in ("clean", "jump"):
        frames = read_clip(clips[name])
        report = seam_report(frames, seam_boundaries(len(frames), chunk_frames=8))
        assert [b["frame"] for b in report["boundaries"]] == [8, 16, 24]
        ratios = {b["frame"]: max(b["ratio"].values()) for b in report["boundaries"]}
        if name == "clean":
            assert max(ratios.values()) < 2.0, ratios
        else:
            assert ratios[16] > 3.0 and report["boundaries"][1]["ratio"]["color"] > 3.0, ratios
            assert ratios[8] < 2.0 and ratios[24] < 2.0, ratios
            assert report["worst_frame"] == 16
            assert report["max_ratio"]["color"] == pytest.approx(report["boundaries"][1]["ratio"]["color"])


def test_boundaries_from_seams_chunks_and_input_and_bad_ones_are_clear_errors():
    assert seam_boundaries(40, seams=[21, 7]) == {7: "chunk", 21: "chunk"}
    assert seam_boundaries(40, chunk_frames=10, input_frames=5) == {5: "input", 15: "chunk", 25: "chunk", 35: "chunk"}
    with pytest.raises(ValueError, match=r"--seams 40 is outside the clip: it has 40 frames"):
        seam_boundaries(40, seams=[40])
    with pytest.raises(ValueError, match="--chunk-frames 40 leaves no chunk boundary"):
        seam_boundaries(40, chunk_frames=40)
    with pytest.raises(ValueError, match="--input-frames 0 is outside"):
        seam_boundaries(40, input_frames=0)


def test_vde_is_zero_without_drift_and_positive_with_a_brightness_ramp(clips):
    frames, _ = render_clip(WORLD, 1, 48, 48)
    const = np.repeat(frames, N, axis=0)
    flat = vde_report(const, {}, 4)
    assert flat["chunk_frames"] == 8 and set(flat["metrics"]) == {"brightness", "contrast", "colorfulness"}
    assert all(m["vde"] == 0.0 for m in flat["metrics"].values())
    ramp = vde_report(read_clip(clips["ramp"]), {}, 4)["metrics"]["brightness"]
    m = ramp["chunk_values"]
    expected = sum((4 - i + 1) * abs(m[i - 1] - m[0]) / m[0] for i in range(2, 5))
    assert ramp["vde"] == pytest.approx(expected) and ramp["vde"] > 1.0  # brightness +~80% over the clip
    assert video_drift_error([1.0, 2.0, 1.0]) == pytest.approx(2 * 1.0 + 1 * 0.0)
    assert math.isinf(video_drift_error([0.0, 1.0]))
    black = vde_report(np.zeros((20, 16, 16, 3), np.uint8), {}, 2)
    assert black["metrics"]["brightness"]["vde"] is None and any("first chunk is 0" in c for c in black["caveats"])
    with pytest.raises(ValueError, match="pass a smaller --vde-chunks"):
        vde_report(const[:10], {}, 10)


def test_stream_t_follows_the_reference_formula_and_is_finite_and_deterministic(clips):
    t = np.arange(16, dtype=np.float64)
    pure = np.stack([np.cos(2 * np.pi * 3 * t / 16), np.cos(2 * np.pi * 5 * t / 16)], axis=1)
    s = stream_skewness(pure)
    assert s.shape == (2,) and np.all(np.isfinite(s))
    # The statistic only depends on the fitted exponent B: by hand for one dimension.
    k = np.arange(1, 9, dtype=np.float64)
    amp = 2 * np.abs(np.fft.fft(pure[:, 0])[1:9]) / 9 + 1e-6
    b, loga = np.polyfit(np.log(k), np.log(amp), 1)
    a_norm = math.exp(loga) / np.sum(math.exp(loga) * k**b)
    assert s[0] == pytest.approx(np.sum(k ** (b + 3)) / (math.sqrt(a_norm) * math.sqrt(np.sum(k ** (b + 2)))))
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 3))
    assert stream_t(ref, ref) == pytest.approx(1.0)
    assert stream_t(ref + 20.0, ref) < 0.1  # shifted statistics: the histograms no longer overlap
    frames = read_clip(clips["jump"])
    one, two = stream_report(frames), stream_report(frames)
    assert one == two and 0.0 <= one["stream_t"] <= 1.0 and one["window"] == 16 and len(one["positions"]) == 2
    with pytest.raises(FileNotFoundError, match="never downloads"):
        stream_report(frames, embedder="/nonexistent/embedder.pt")


def test_stream_with_a_torchscript_embedder(clips, tmp_path):
    torch = pytest.importorskip("torch")

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    path = tmp_path / "embedder.pt"
    with warnings.catch_warnings():  # torch marks TorchScript deprecated; users may still bring one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(MeanColour()).save(str(path))
    report = stream_report(read_clip(clips["ramp"]), window=8, embedder=path)
    assert report["embedder"] == str(path) and report["stream_t"] is not None and report["window"] == 8
    bad = tmp_path / "not_ts.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a TorchScript file"):
        stream_report(read_clip(clips["ramp"]), embedder=bad)


def test_cli_eval_writes_seams_vde_stream_and_their_plots(clips, tmp_path, capsys):
    out = tmp_path / "d"
    rc = main(["eval", str(clips["jump"]), "--chunk-frames", "8", "--vde-chunks", "4", "--out", str(out)])
    assert rc == 0
    saved = json.loads((out / "metrics.json").read_text())
    video = saved["videos"]["jump"]
    assert video["seams"]["worst_frame"] == 16 and video["seams"]["max_ratio"]["color"] > 3.0
    assert video["vde"]["num_chunks"] == 4 and "sharpness" in video["vde"]["metrics"]
    assert "temporal_flicker" in video["vde"]["metrics"] and video["stream"]["stream_t"] is not None
    assert (out / "plots" / "seams.png").stat().st_size > 0 and (out / "plots" / "vde.png").stat().st_size > 0
    assert str(out / "plots" / "seams.png") in saved["files"]
    printed = capsys.readouterr().out
    assert "seam ratio max" in printed and "frame 16" in printed and "STREAM-T" in printed


def test_cli_eval_bad_seams_are_clear_errors(clips, tmp_path, capsys):
    for flags, message in (
        (["--seams", "40"], "--seams 40 is outside the clip: it has 32 frames"),
        (["--chunk-frames", "64"], "--chunk-frames 64 leaves no chunk boundary"),
        (["--vde-chunks", "20"], "pass a smaller --vde-chunks"),
        (["--stream-embedder", str(tmp_path / "none.pt")], "is not a file"),
        (["--stream-window", "2"], "--stream-window must be >= 4"),
        (["--input-frames", "32"], "--input-frames 32 is outside the clip"),
    ):
        rc = main(["eval", str(clips["clean"]), *flags, "--out", str(tmp_path / "e"), "--no-plots"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (flags, err)
        assert not (tmp_path / "e" / "metrics.json").exists()


def test_default_report_has_vde_and_stream_and_no_seams(clips):
    report = evaluate_videos([clips["clean"]], None, window=8, groups=("flicker",))
    video = report["videos"]["clean"]
    assert "seams" not in video and video["vde"]["num_chunks"] == 10 and video["stream"]["window"] == 16
    assert video["caveats"] == []  # the pixel-proxy note is a drift caveat, not a clip one
    assert any("rough proxy" in c for c in video["drift_caveats"])
