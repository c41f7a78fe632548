"""benchmarks/long_video_quality.py runs end to end (quick settings) and writes its results."""

import json

from benchmarks.long_video_quality import main  # the repo root is on the path (pyproject: pythonpath)


def test_quality_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "bq"
    assert main(["--quick", "--out", str(out), "--factors", "2", "--samplers", "full", "df",
                 "--extensions", "riflex", "--steps", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"1x", "2x", "ratio_table"}
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
    assert f"| gt | {gt_1x:.3f} | {gt_2x:.3f} | {gt_2x / gt_1x:.2f} |" in table
    full_1x = results["1x"]["samplers"]["full"]["synthetic"]["overall"]
    assert f"| full + riflex | {full_1x:.3f} (full) | " in table
