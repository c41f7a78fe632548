"""`longgen eval` from the command line on real mp4s the test writes."""

import json

import numpy as np

from longgen.cli import main
from longgen.io import write_video


def _clip(seed, flicker):
    rng = np.random.default_rng(seed)
    base = np.zeros((24, 32, 32, 3), np.uint8)
    base[:, 8:24, 8:24] = 200
    noise = rng.integers(0, flicker + 1, size=(24, 1, 1, 1)).astype(np.uint8)
    return np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)


def test_eval_writes_metrics_and_plots_and_ranks_flicker(tmp_path, capsys):
    steady, flickery = tmp_path / "steady.mp4", tmp_path / "flickery.mp4"
    write_video(steady, [_clip(0, 0)], fps=8)
    write_video(flickery, [_clip(0, 60)], fps=8)
    out = tmp_path / "report"
    assert main(["eval", str(steady), str(flickery), "--out", str(out), "--window", "8"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    flicker = {k: v["metrics"]["temporal_flicker"]["summary"]["mean"] for k, v in report["videos"].items()}
    assert flicker["steady"] > flicker["flickery"]
    assert (out / "plots" / "temporal_flicker.png").stat().st_size > 0
    assert "steady" in capsys.readouterr().out


def test_eval_names_an_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    assert main(["eval", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "broken.mp4" in capsys.readouterr().err


def test_eval_says_when_a_clip_is_too_short_for_what_was_asked(tmp_path):
    """A one-frame clip reported every metric empty without a word; windows past the clip were cut silently."""
    one, short = tmp_path / "one.mp4", tmp_path / "short.mp4"
    write_video(one, [_clip(0, 30)[:1]], fps=8)
    write_video(short, [_clip(0, 30)[:13]], fps=8)
    out = tmp_path / "r"
    assert main(["eval", str(one), str(short), "--out", str(out), "--window", "50", "--stream-window", "50"]) == 0
    videos = json.loads((out / "metrics.json").read_text())["videos"]
    assert any("has 1 frame: no metric over time" in c for c in videos["one"]["caveats"])
    assert any("window of 50 frames is longer than the clip's 13" in c for c in videos["short"]["caveats"])
    assert any("stream window of 50 frames cut to 6" in c for c in videos["short"]["drift_caveats"])
