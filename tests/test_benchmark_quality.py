"""benchmarks/long_video_quality.py runs end to end (quick settings) and writes its results."""

import json

from benchmarks.long_video_quality import main


def test_quality_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "bq"
    assert main(["--quick", "--out", str(out), "--factors", "2", "--samplers", "full", "df",
                 "--extensions", "riflex", "--steps", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["2x"]) == {"samplers", "runs", "full+riflex"}
    assert set(results["2x"]["samplers"]) == {"full", "df"}
    assert "| full + riflex |" in capsys.readouterr().out
