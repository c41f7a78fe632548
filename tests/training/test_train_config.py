"""Typed training config: unknown keys by name, dotted overrides, validation messages, YAML round trip."""

from __future__ import annotations

import glob
import os

import pytest

from longgen.training.config import Config, ConfigError, apply_overrides, load_config, parse_override

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "longgen_train_entry", os.path.join(REPO, "train", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wrong_key_fails_by_name_before_any_model_loads(monkeypatch, tmp_path):
    import longgen.backbones as backbones
    import longgen.training.loop as loop

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(backbones, "build_tiny", forbidden)
    monkeypatch.setattr(backbones, "load_adapter", forbidden)
    monkeypatch.setattr(loop.Trainer, "__init__", forbidden)
    entry = _train_main()
    with pytest.raises(ConfigError) as err:
        entry.main(["train.stepz=3", f"train.output_dir={tmp_path}"])
    message = str(err.value)
    assert "'train.stepz'" in message
    assert "steps" in message and "batch_size" in message  # the valid keys are listed
    # A wrong key inside a YAML file, and a wrong section, fail the same way.
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lora:\n  rnak: 4\n")
    with pytest.raises(ConfigError, match=r"'lora\.rnak'.*rank, alpha"):
        entry.main(["--config", str(recipe)])
    with pytest.raises(ConfigError, match=r"'optimizer'.*valid keys in the top level: model, data"):
        load_config(None, ["optimizer.lr=1"])


def test_overrides_parse_yaml_values_and_reach_nested_sections(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "train:\n  steps: 10\n  batch_size: 2\noptim:\n  lr: 1e-4\n"
    )  # YAML 1.1 reads 1e-4 as a string
    config = load_config(
        recipe,
        [
            "train.steps=4",
            "lora.target_modules=[to_q, to_k]",
            "lora.alpha=null",
            "data.synthetic.num_videos=3",
            "validation.sampler_options={window: 3, stride: 1}",
            "objective.shift=3",
        ],
    )
    assert config.train.steps == 4 and config.train.batch_size == 2
    assert config.optim.lr == pytest.approx(1e-4) and isinstance(config.optim.lr, float)
    assert config.lora.target_modules == ["to_q", "to_k"] and config.lora.alpha is None
    assert config.data.synthetic.num_videos == 3
    assert config.validation.sampler_options == {"window": 3, "stride": 1}
    assert config.objective.shift == 3.0 and isinstance(config.objective.shift, float)
    assert parse_override("train.resume=latest") == (["train", "resume"], "latest")
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.steps=0", r"train\.steps must be >= 1"),
        ("train.steps=two", r"train\.steps must be an integer"),
        ("optim.schedule=cosinus", r"optim\.schedule must be one of .*cosine"),
        ("objective.mode=forcing", r"objective\.mode must be one of .*diffusion_forcing"),
        ("train.mixed_precision=fp8", r"train\.mixed_precision must be one of"),
        ("lora.target_modules=[]", r"lora\.target_modules is empty"),
        (
            "validation.report_to=mlflow",
            r"validation\.report_to must be one of \['none', 'tensorboard', 'wandb'\]",
        ),
        ("extension.method=yarm", r"extension\.method must be one of"),
        ("model.tiny=wam", r"model\.tiny must be one of"),
        ("lora.enabled=maybe", r"lora\.enabled must be true or false"),
        ("train.trainable_patterns=['blocks[']", r"not a valid regex"),
    ],
)
def test_values_are_validated_with_messages_that_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_cross_field_rules_name_the_fix():
    with pytest.raises(ConfigError, match="set model.dtype=fp32"):
        load_config(None, ["lora.enabled=false", "model.dtype=bf16"])
    with pytest.raises(ConfigError, match="set data.target_fps .* or data.frame_stride"):
        load_config(None, ["data.target_fps=8", "data.frame_stride=2"])
    with pytest.raises(ConfigError, match="lora.enabled=false"):
        load_config(None, ["extension.method=exvideo"])
    with pytest.raises(ConfigError, match="causal_block_size=1 for mode clip"):
        load_config(None, ["objective.mode=clip", "objective.causal_block_size=3"])


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["train.steps=7", "lora.target_modules=[to_q]", "optim.betas=[0.8, 0.95]"])
    path = tmp_path / "config.yaml"
    config.save(path)
    again = load_config(path)
    assert again == config
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "recipe", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))), ids=os.path.basename
)
def test_recipes_load_and_have_a_comment_header(recipe):
    config = load_config(recipe)
    with open(recipe) as fh:
        header = fh.read().split("\n", 1)[0]
    assert header.startswith("#"), f"{recipe} needs a comment header (what it trains, data layout, GPUs)"
    assert config.train.steps >= 1


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_accelerate_configs_parse_and_leave_accumulation_to_the_recipe(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(REPO, "configs", "accelerate", f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}[name]
    assert str(config.distributed_type).endswith(expected)
    if config.deepspeed_config:
        # train.grad_accumulation / optim.grad_clip fill these; a value here would silently win
        assert "gradient_accumulation_steps" not in config.deepspeed_config
        assert "gradient_clipping" not in config.deepspeed_config


def test_entry_point_parses_resume_flag_and_defaults_to_the_tiny_recipe(monkeypatch, tmp_path):
    import longgen.training.loop as loop

    seen = {}

    class FakeTrainer:
        def __init__(self, config):
            seen["config"] = config

        def train(self):
            seen["trained"] = True
            return loop.TrainResult(step=0)

        def close(self):
            seen["closed"] = True

    entry = _train_main()
    monkeypatch.setattr(entry, "Trainer", FakeTrainer)
    assert entry.main(["--resume", "latest", "train.steps=5", f"train.output_dir={tmp_path}"]) == 0
    config = seen["config"]
    assert config.train.resume == "latest" and config.train.steps == 5
    assert config == load_config(
        os.path.join(REPO, "configs", "tiny_synthetic.yaml"),
        ["train.steps=5", f"train.output_dir={tmp_path}", "train.resume=latest"],
    )
    assert seen["trained"] and seen["closed"]


def test_train_script_prints_setup_errors_without_a_traceback(tmp_path):
    """From the shell a wrong key or a frame count off the VAE stride is one message naming the fix, exit 2."""
    import subprocess
    import sys

    script = os.path.join(REPO, "train", "train.py")
    for override, expected in (
        ("data.nm_frames=9", "unknown config key 'data.nm_frames'"),
        ("data.num_frames=10", "4k+1"),
    ):
        proc = subprocess.run(
            [sys.executable, script, override, f"train.output_dir={tmp_path}"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_no_and_off_are_words_in_recipes_and_overrides_booleans_still_read_them(tmp_path):
    """YAML 1.1 reads ``no`` as False, which turned accelerate's ``mixed_precision=no`` into an error; configs
    are read as YAML 1.2 (only true/false are booleans) and a bool field still takes yes/no/on/off."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n  gradient_checkpointing: yes\n")
    config = load_config(recipe)
    assert config.train.mixed_precision == "no" and config.train.gradient_checkpointing is True
    config = load_config(None, ["train.mixed_precision=no", "train.gradient_checkpointing=off"])
    assert config.train.mixed_precision == "no" and config.train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["train.mixed_precision=maybe"])
