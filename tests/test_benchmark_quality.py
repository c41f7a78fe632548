"""benchmarks/long_video_quality.py runs end to end (quick settings) and writes its results."""

import json

import pytest

from benchmarks.long_video_quality import main  # the repo root is on the path (pyproject: pythonpath)


def test_quality_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "bq"
    assert main(["--quick", "--out", str(out), "--factors", "2", "--samplers", "full", "df",
                 "--extensions", "riflex", "--steps", "2", "--seeds", "0", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"1x", "2x", "ratio_table", "clips", "overall_per_clip", "overall_mean"}
    assert set(results["2x"]) == {"samplers", "references", "runs", "full+riflex"}
    assert set(results["2x"]["samplers"]) == {"full", "df"}
    assert set(results["2x"]["references"]) == {"gt", "gt_vae"}
    assert results["2x"]["references"]["gt"]["synthetic"]["overall"] > 0.9
    printed = capsys.readouterr().out
    assert "| full + riflex" in printed and "| gt_vae" in printed  # quick clips are static: rows starred
    # the native-length reference of every sampler and the ratio to it; an extension is compared with full
    assert set(results["1x"]["samplers"]) == {"full", "df"}
    assert results["1x"]["runs"]["full"]["num_frames"] == 9
    gt_1x = results["1x"]["references"]["gt"]["synthetic"]["overall"]
    gt_2x = results["2x"]["references"]["gt"]["synthetic"]["overall"]
    table = results["ratio_table"]
    assert "| clip | 1x overall | 2x overall | 2x / 1x |" in table and table in printed
    assert "mean over 2 clips (worlds 0-0 x seeds [0, 1])" in printed
    # The ratio table averages the clips (world 0 at seeds 0 and 1); the detailed tables are the first clip's.
    assert results["clips"] == [[0, 0], [0, 1]]
    first, second = results["overall_per_clip"]
    assert first["2x"]["gt"] == gt_2x and first["1x"]["gt"] == gt_1x
    assert first["1x"]["full"] == results["1x"]["samplers"]["full"]["synthetic"]["overall"]
    mean = results["overall_mean"]
    for length in ("1x", "2x"):
        for label, value in mean[length].items():
            assert value == pytest.approx(((first[length][label] or 0.0) + (second[length][label] or 0.0)) / 2)
    assert second["2x"]["gt"] == gt_2x  # the ground truth does not depend on the noise seed
    assert f"| gt | {mean['1x']['gt']:.3f} | {mean['2x']['gt']:.3f} | " in table
    assert f"| full + riflex | {mean['1x']['full']:.3f} (full) | " in table
    assert (out / "clips" / "w0_s1" / "2x" / "riflex").is_dir()


def test_quality_benchmark_refuses_no_worlds_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path / "bq"), "--worlds", "0"])
    assert "--worlds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bq").exists()
