"""`longgen demo --quick` end to end: synthetic data -> training -> long generation -> evaluation."""

import json

from longgen.cli import main
from longgen.io import video_info


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["train"]["steps"] == 20
    # The VAE stage ran, improved the reconstruction, and its latent statistics reached the saved model.
    vae = summary["vae"]
    assert vae["steps"] == 10 and vae["psnr"] > vae["psnr_before"] + 3.0
    vae_config = json.loads((out / "train" / "base_model" / "vae" / "config.json").read_text())
    assert vae_config["scale_factor_spatial"] == 4 and len(vae_config["latents_mean"]) == vae_config["z_dim"]
    assert vae_config["latents_std"] != [0.5 + 0.25 * i for i in range(vae_config["z_dim"])]
    assert set(summary["runs"]) == {"full", "sliding", "fifo", "df"}
    for run in summary["runs"].values():
        assert video_info(run["path"])["num_frames"] == summary["num_frames"] == 21
    report = json.loads((out / "videos" / "eval" / "metrics.json").read_text())
    for video in report["videos"].values():
        assert 0.0 <= video["synthetic"]["overall"] <= 1.0
        assert video["metrics"]["temporal_flicker"]["summary"]["mean"] is not None
    assert (out / "videos" / "eval" / "plots" / "temporal_flicker.png").exists()
    printed = capsys.readouterr().out
    assert "| full |" in printed and "summary.md" in printed
