"""benchmarks/long_video_quality.py runs end to end (quick settings) and writes its results."""

import json

from benchmarks.long_video_quality import main  # the repo root is on the path (pyproject: pythonpath)


def test_quality_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "bq"
    assert main(["--quick", "--out", str(out), "--factors", "2", "--samplers", "full", "df",
                 "--extensions", "riflex", "--steps", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["2x"]) == {"samplers", "references", "runs", "full+riflex"}
    assert set(results["2x"]["samplers"]) == {"full", "df"}
    assert set(results["2x"]["references"]) == {"gt", "gt_vae"}
    assert results["2x"]["references"]["gt"]["synthetic"]["overall"] > 0.9
    printed = capsys.readouterr().out
    assert "| full + riflex" in printed and "| gt_vae" in printed  # quick clips are static: rows starred
