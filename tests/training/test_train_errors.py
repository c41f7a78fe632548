"""User errors of a training run are messages that name the fix; finished runs stay extendable; files are
shared by the umask; the trainer's parts (config library, methods, no patched adapter) keep their promises."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
from tiny_runs import run_trainer as _run
from tiny_runs import tiny_lora_config

from longgen.training.config import ConfigError, load_config
from longgen.training.loop import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "longgen_train_entry", os.path.join(REPO, "train", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(tmp_path, clips, *overrides):
    return tiny_lora_config(tmp_path, clips, *overrides)


def test_yaml_syntax_error_is_a_message_with_the_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  steps: 3\n lora: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: not valid YAML"):
        load_config(recipe)
    assert _train_main().main(["--config", str(recipe)], clean_errors=True) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err


def test_unknown_key_suggests_the_closest_and_literal_choices_are_checked():
    with pytest.raises(ConfigError, match=r"'train\.stepz'; did you mean 'train\.steps'\?"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim'"):
        load_config(None, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"objective\.method must be one of \['denoising', .*'ode_regression', 'dmd'"):
        load_config(None, ["objective.method=distill"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be finite"):
        load_config(None, ["optim.lr=.inf"])


def test_help_has_no_rst_markup(capsys):
    with pytest.raises(SystemExit):
        _train_main().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "accelerate launch" in out and "section.key=value" in out
    assert "``" not in out and ":mod:" not in out and ":class:" not in out


def test_finished_run_is_extendable_files_follow_umask_and_resume_refuses_other_settings(
    tmp_path, clips, caplog
):
    """checkpoint_every=0 still checkpoints at the end; --resume latest with more steps continues it; a
    changed lora.rank is refused by name; checkpoints and exports are 0644/0755 under umask 022."""
    old_mask = os.umask(0o022)
    try:
        common = ("train.checkpoint_every=0", "validation.steps=2", "validation.num_frames=9")
        with caplog.at_level(logging.INFO, logger="longgen.training"):
            _, first = _run(_config(tmp_path, clips, *common, "validation.at_end=true"))
        assert first.last_checkpoint and first.last_checkpoint.endswith("step_00000002")
        assert any(
            str(tmp_path / "validation" / "step_00000002.mp4") in r.getMessage() for r in caplog.records
        )
        for root, dirs, files in os.walk(tmp_path / "checkpoints"):
            for name in dirs:
                assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o755, name
            for name in files:
                assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o644, name
        for root, _, files in os.walk(tmp_path / "final"):
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
            for name in files:
                assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o644, name
        assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # exports are renamed into place

        with pytest.raises(ConfigError, match=r"lora\.rank: 4 -> 8"):
            Trainer(_config(tmp_path, clips, *common, "lora.rank=8", "train.steps=3", "train.resume=latest"))
        # train.steps and validation settings may change on resume: the run goes on from step 2
        trainer, more = _run(_config(tmp_path, clips, *common, "train.steps=3", "train.resume=latest"))
        assert trainer.resumed_from.endswith("step_00000002") and sorted(more.losses) == [3]
        assert more.last_checkpoint.endswith("step_00000003")
    finally:
        os.umask(old_mask)


def test_latent_cache_problems_are_errors_before_the_model_loads(tmp_path, clips, monkeypatch):
    import longgen.backbones as backbones

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the cache was checked")

    monkeypatch.setattr(backbones, "build_tiny", forbidden)
    with pytest.raises(ValueError, match="does not exist: build it with longgen precompute"):
        Trainer(_config(tmp_path / "a", clips, f"data.cache_dir={tmp_path / 'nowhere'}"))
    empty = tmp_path / "unfinished"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no finished cache"):
        Trainer(_config(tmp_path / "b", clips, f"data.cache_dir={empty}"))
    cache = tmp_path / "cache17"
    cache.mkdir()
    (cache / "index.json").write_text(json.dumps({"clip_shape": [17, 32, 32, 3], "num_samples": 0}))
    with pytest.raises(
        ValueError, match=r"clips of 17 frames but data\.num_frames=9; set data\.num_frames=17"
    ):
        Trainer(_config(tmp_path / "c", clips, f"data.cache_dir={cache}"))


def test_multi_process_launch_without_a_process_group_is_refused():
    from longgen.training.build import check_launch

    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=true"):
        check_launch(1, {"WORLD_SIZE": "2"})
    check_launch(2, {"WORLD_SIZE": "2"})
    check_launch(1, {})


def test_failed_export_leaves_no_partial_folder(tmp_path, clips, monkeypatch):
    import longgen.training.export as export

    trainer = Trainer(_config(tmp_path, clips, "train.steps=1", "train.save_final=false"))
    try:
        trainer.train()

        def broken(folder, adapter, state_dict):
            open(os.path.join(folder, "pytorch_lora_weights.safetensors"), "wb").write(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(export, "save_lora", broken)
        with pytest.raises(OSError, match="disk full"):
            trainer.export()
    finally:
        trainer.close()
    assert not os.path.exists(tmp_path / "final")
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_the_step_gets_the_prepared_denoiser_and_the_adapter_is_never_patched(tmp_path, clips):
    from longgen.training.methods import DenoisingMethod

    trainer = Trainer(_config(tmp_path, clips, "train.steps=1", "validation.every=1", "validation.steps=1",
                              "validation.num_frames=9"))  # fmt: skip
    try:
        assert isinstance(trainer.method, DenoisingMethod)
        assert trainer.method.prepared is trainer.wrapped
        result = trainer.train()
        assert len(result.validation_videos) == 1
        assert "denoise" not in trainer.adapter.__dict__ and "encode_prompt" not in trainer.adapter.__dict__
    finally:
        trainer.close()


@pytest.mark.slow
def test_ddp_config_on_a_cpu_machine_stops_with_the_fix(tmp_path):
    """``accelerate launch --config_file configs/accelerate/ddp.yaml`` with 2 processes and no GPU: each
    process would train alone into one folder; the run stops, names ACCELERATE_USE_CPU, writes nothing."""
    import shutil
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine forms a real process group with the DDP config")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("the accelerate CLI is not installed next to this Python; pip install accelerate")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "run"
    cmd = [
        accelerate, "launch", "--config_file", os.path.join(REPO, "configs", "accelerate", "ddp.yaml"),
        "--num_processes", "2", "--main_process_port", "0", os.path.join(REPO, "train", "train.py"),
        "train.steps=1", f"train.output_dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode != 0
    assert "ACCELERATE_USE_CPU=true" in proc.stderr and "WORLD_SIZE=2" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["validation.num_frames=10"], r"wan needs num_frames = 4k\+1"),
        (["validation.height=40"], "wan needs height and width divisible by 16"),
        (["validation.sampler=sliding", "validation.sampler_options={window: 100}"], "window of 100 latent frames"),
        (["validation.sampler=sliding", "validation.sampler_options={window: 2, stride: 3}"], "stride 3 > window 2"),
    ],
    ids=["frames", "height", "window", "stride"],
)
def test_validation_settings_are_checked_before_step_one(overrides, message, tmp_path, clips):
    """They were read only at step validation.every: a bad one killed the run after that many steps."""
    config = _config(tmp_path, clips, "validation.every=100", "train.steps=200", *overrides)
    with pytest.raises(ValueError, match="the validation clip cannot be generated: " + message):
        Trainer(config)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_output_dir_that_is_a_file_is_a_message(tmp_path, clips):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="train.output_dir .* is an existing file, not a folder; choose another path"):
        Trainer(_config(tmp_path / "a_file", clips))
    assert (tmp_path / "a_file").read_text() == "x"
