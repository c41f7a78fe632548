"""benchmarks/demo_teacher.py: its named variants are valid demo settings and bad --custom input is refused
before anything trains (the ablation itself trains models for minutes; it is run by hand, RESULTS.md)."""

import pytest

from benchmarks.demo_teacher import PREVIOUS, VARIANTS, main, table
from longgen.demo import DemoSettings


def test_every_variant_is_a_valid_demo_setting_and_spells_out_what_it_trains():
    for name, changes in VARIANTS.items():
        settings = DemoSettings(**changes)  # unknown fields or bad values raise here
        if name != "default":  # independent of today's defaults: the old base is explicit in each
            assert set(PREVIOUS) <= set(changes), name
        assert settings.train_steps > 0
    assert VARIANTS["default"] == {}
    # the fourth ablation's winner is today's default teacher
    assert DemoSettings(**VARIANTS["w96z4"]) == DemoSettings()


def test_custom_variants_are_refused_before_training(tmp_path, capsys):
    for spec, message in [
        ('fast={"lr": 0.002, "bogus": 1}', "unknown DemoSettings fields ['bogus']"),
        ("fast=[1]", "JSON object of DemoSettings fields"),
        ("fast={not json", "give NAME=JSON"),
    ]:
        with pytest.raises(SystemExit):
            main(["--vae-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--variants", "--custom", spec])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_table_has_one_row_per_sampler():
    scored = {"demo_overall": 0.5, "demo_count": 0.5, "demo_ceiling": 1.0, "mean_overall": 0.4, "mean_count": 0.3,
              "mean_ceiling": 0.8}
    entry = {"cpu_seconds": {"transformer": 10}, "wall_seconds": {"transformer": 5}, "last_loss": 0.1,
             "guidance": {"1": {**scored, "by_sampler": {"full": scored, "causal": {**scored, "mean_overall": 0.6}}}}}
    rows = [line for line in table({"v": entry}).splitlines() if line.startswith("| v |")]
    assert [r.split(" | ")[1] for r in rows] == ["full", "causal"]
    assert "| 0.600 |" in rows[1] and "| 0.75 |" in rows[1]  # 0.6 / 0.8 of the ceiling


def test_variants_of_another_vae_are_refused_with_a_reused_vae(tmp_path, capsys):
    import json

    from longgen.demo import DEMO_VAE

    with pytest.raises(SystemExit):  # no VAE there
        main(["--vae-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--variants", "default"])
    assert "holds no VAE" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({**DEMO_VAE, "z_dim": 16, "latents_mean": [0.0] * 16}))
    for variant in ("z4", "default"):  # today's default VAE has 4 channels
        with pytest.raises(SystemExit):
            main(["--vae-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--variants", variant])
        err = capsys.readouterr().err
        assert f"variants ['{variant}'] use another VAE" in err and "without --vae-dir" in err
    assert not (tmp_path / "out" / "results.json").exists()
    assert DemoSettings(**VARIANTS["z4"]).vae_kwargs["z_dim"] == 4 == DemoSettings().vae_kwargs["z_dim"]
    assert DemoSettings(**VARIANTS["big12"]).vae_kwargs["z_dim"] == 16  # spelled out: measured on that VAE
