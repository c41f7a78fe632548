"""benchmarks/self_forcing_distill.py: a folder without the demo's trained model fails naming the command to run."""

from __future__ import annotations

import pytest


def test_missing_demo_model_names_the_demo_command(tmp_path):
    from benchmarks.self_forcing_distill import main

    with pytest.raises(FileNotFoundError, match="longgen demo --out"):
        main(["--demo", str(tmp_path / "no_demo"), "--out", str(tmp_path / "out")])
