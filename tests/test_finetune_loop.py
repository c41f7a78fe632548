"""The fine-tune comes back for inference: a LoRA / full / ExVideo export of the real trainer, loaded by
``longgen generate`` (``--lora PATH:SCALE``, ``--transformer``), with the trained extension re-applied."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import run_trainer

from longgen.cli import main
from longgen.pipeline import LongVideoPipeline
from longgen.training.config import load_config

PROMPT = "a red ball"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    from longgen.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("clips"), num_videos=2, num_frames=17, height=32, width=32
    )


def _train(output_dir, clips, *overrides):
    config = load_config(
        None,
        [
            f"data.source={clips}",
            "data.num_frames=9",
            f"train.output_dir={output_dir}",
            "train.steps=3",
            "train.batch_size=1",
            "lora.rank=4",
            "lora.alpha=8",
            "optim.lr=2e-2",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )
    trainer, result = run_trainer(config)
    return trainer, result.final_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, clips):
    """A tiny LoRA of the tiny Wan (model.tiny=wan, seed 0: the weights of the ``saved("wan")`` folder)."""
    return _train(tmp_path_factory.mktemp("lora_run"), clips)[1]


@pytest.fixture(scope="module")
def riflex_run(tmp_path_factory, clips):
    return _train(tmp_path_factory.mktemp("riflex_run"), clips, "data.num_frames=17", "extension.method=riflex")[1]


def _generate_args(model, out, *extra):
    return ["generate", "--model", model, "--prompt", PROMPT, "--steps", "2", "--seed", "3", "--out", str(out),
            "--save-latents", "--quiet", *extra]


def _latents(out) -> torch.Tensor:
    return load_file(str(out).removesuffix(".mp4") + ".latents.safetensors")["latents"]


def test_lora_from_the_cli_equals_loading_it_by_hand(saved, lora_run, tmp_path):
    base = saved("wan")
    weights = f"{lora_run}/pytorch_lora_weights.safetensors"
    out = tmp_path / "lora.mp4"
    assert main(_generate_args(base, out, "--lora", f"{weights}:0.5")) == 0
    assert os.path.isfile(out)
    ours = _latents(out)

    plain = LongVideoPipeline.from_pretrained(base)
    stock = plain.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents
    by_hand = LongVideoPipeline.from_pretrained(base)
    by_hand.adapter.pipe.load_lora_weights(lora_run, adapter_name="trained")
    by_hand.adapter.pipe.set_adapters(["trained"], [0.5])
    expected = by_hand.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - stock).abs().max() > 1e-3  # the LoRA really changes the clip
    # scale 1 (no ':SCALE') and the folder form load the same file at full strength
    full = LongVideoPipeline.from_pretrained(base)
    full.load_lora(lora_run)
    at_one = full.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents
    assert (at_one - ours).abs().max() > 1e-4


def test_two_loras_combine_with_their_scales(saved, lora_run):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    pipe.load_lora(lora_run, scale=0.25)
    pipe.load_lora(lora_run, scale=0.25)
    two = pipe.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents
    one = LongVideoPipeline.from_pretrained(saved("wan"))
    one.load_lora(lora_run, scale=0.5)
    torch.testing.assert_close(two, one.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents,
                               atol=1e-5, rtol=1e-5)
    assert pipe.loras == {"lora_0": 0.25, "lora_1": 0.25}


def test_riflex_trained_lora_reapplies_riflex(saved, riflex_run, tmp_path, caplog):
    base = saved("wan")
    record = json.load(open(os.path.join(riflex_run, "longgen_extension.json")))
    assert record["method"] == "riflex"
    pipe = LongVideoPipeline.from_pretrained(base)
    pipe.load_lora(riflex_run)
    assert [h.name for h in pipe.extensions] == ["riflex"]
    assert pipe.extensions[0].describe()["options"]["target_latent_frames"] == record["target_latent_frames"]

    with caplog.at_level(logging.INFO):
        assert main(_generate_args(base, tmp_path / "r.mp4", "--lora", riflex_run, "--num-frames", "17")) == 0
    assert "re-applied extension riflex" in caplog.text
    auto = _latents(tmp_path / "r.mp4")

    caplog.clear()
    with caplog.at_level(logging.INFO):
        args = _generate_args(base, tmp_path / "n.mp4", "--lora", riflex_run, "--num-frames", "17",
                              "--no-auto-extension")
        assert main(args) == 0
    assert "re-applied extension" not in caplog.text and "--no-auto-extension" in caplog.text
    # the CLI's clip is the API's with riflex re-applied (on the tiny model RIFLEx's k-th period already
    # covers 5 latent frames, so the clip equals the plain one; the handle above shows what was applied)
    torch.testing.assert_close(auto, pipe.generate(PROMPT, num_frames=17, num_inference_steps=2, seed=3,
                                                   show_progress=False).latents, atol=1e-5, rtol=1e-5)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        args = _generate_args(base, tmp_path / "u.mp4", "--lora", riflex_run, "--num-frames", "17",
                              "--extension", "ntk", "--target-frames", "17")
        assert main(args) == 0
    assert "records the riflex extension" in caplog.text and "re-applied extension" not in caplog.text


def test_full_fine_tune_loads_with_transformer(saved, clips, tmp_path):
    trainer, final = _train(tmp_path / "run", clips, "lora.enabled=false", "train.steps=2", "optim.lr=1e-3")
    assert os.path.isdir(os.path.join(final, "transformer"))
    out = tmp_path / "full.mp4"
    assert main(_generate_args(saved("wan"), out, "--transformer", final)) == 0
    pipe = LongVideoPipeline.from_pretrained(saved("wan"), transformer=os.path.join(final, "transformer"))
    for name, param in trainer.adapter.model.state_dict().items():
        torch.testing.assert_close(pipe.adapter.model.state_dict()[name], param)
    stock = LongVideoPipeline.from_pretrained(saved("wan"))
    trained = pipe.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents
    torch.testing.assert_close(_latents(out), trained, atol=1e-5, rtol=1e-5)
    assert (trained - stock.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents).abs().max() > 0


def test_exvideo_export_reapplies_exvideo_and_loads_its_weights(saved, clips, tmp_path, caplog):
    trainer, final = _train(
        tmp_path / "run", clips, "model.tiny=svd", "data.num_frames=8", "lora.enabled=false", "train.steps=2",
        "optim.lr=1e-3", "objective.mode=clip", "extension.method=exvideo",
    )
    pipe = LongVideoPipeline.from_pretrained(saved("svd"), transformer=final)
    assert [h.name for h in pipe.extensions] == ["exvideo"]
    trained = dict(trainer.adapter.model.named_parameters())
    loaded = dict(pipe.adapter.model.named_parameters())
    for name in load_file(os.path.join(final, "exvideo_weights.safetensors")):
        torch.testing.assert_close(loaded[name], trained[name])
    from PIL import Image

    image = tmp_path / "cond.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    with caplog.at_level(logging.INFO):
        code = main(_generate_args(saved("svd"), tmp_path / "e.mp4", "--transformer", final, "--image", str(image),
                                   "--num-frames", "8"))
    assert code == 0 and "re-applied extension exvideo" in caplog.text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "/nowhere/lora.safetensors"], "does not exist"),
        (["--lora", "{lora}/pytorch_lora_weights.safetensors:abc"], "is not a number"),
        (["--transformer", "/nowhere"], "is not a folder"),
    ],
)
def test_bad_finetune_flags_are_explained(saved, lora_run, tmp_path, capsys, extra, message):
    extra = [e.format(lora=lora_run) for e in extra]
    assert main(_generate_args(saved("wan"), tmp_path / "x.mp4", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.mp4")


def test_lora_of_another_model_is_explained(saved, lora_run, tmp_path, capsys):
    assert main(_generate_args(saved("ltx"), tmp_path / "x.mp4", "--lora", lora_run)) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err or "another model" in err


def test_foreign_or_broken_lora_files_are_explained(saved, tmp_path, capsys):
    """A LoRA whose keys name another model (peft would load nothing), a kohya-style file of other modules,
    and a file that is not safetensors: each a message, no traceback, no clip."""
    from safetensors.torch import save_file

    files = {
        "sd.safetensors": {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
                           "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)},
        "kohya.safetensors": {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)},
    }
    for name, tensors in files.items():
        save_file(tensors, tmp_path / name)
    (tmp_path / "broken.safetensors").write_text("not a safetensors file")
    for name, message in [("sd", "another model"), ("kohya", "does not fit"), ("broken", "not a readable")]:
        out = tmp_path / f"{name}.mp4"
        assert main(_generate_args(saved("wan"), out, "--lora", str(tmp_path / f"{name}.safetensors"))) == 2
        assert message in capsys.readouterr().err, name
        assert not out.exists()


def test_transformer_of_another_architecture_is_explained(saved, tmp_path, capsys):
    assert main(_generate_args(saved("wan"), tmp_path / "x.mp4", "--transformer", os.path.join(saved("ltx"),
                                                                                              "transformer"))) == 2
    assert "LTXVideoTransformer3DModel" in capsys.readouterr().err
    from longgen.backbones.wan import WanAdapter

    other = tmp_path / "wider"  # the same class with other sizes
    WanAdapter.tiny_pipeline(seed=0, transformer_kwargs={"num_layers": 3}).transformer.save_pretrained(other)
    assert main(_generate_args(saved("wan"), tmp_path / "x.mp4", "--transformer", str(other))) == 2
    assert "num_layers: 3 vs 2" in capsys.readouterr().err


def test_svd_lora_is_a_clear_error(saved, lora_run, tmp_path, capsys):
    assert main(_generate_args(saved("svd"), tmp_path / "x.mp4", "--lora", lora_run)) == 2
    assert "no LoRA loader" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["skyreels_v2", "ltx", "cogvideox", "hunyuan_video", "animatediff"])
def test_lora_of_every_family_from_the_cli(family, saved, clips, tmp_path):
    """``--lora`` on each family with a LoRA loader: the CLI's clip equals loading it by hand at the scale."""
    _, final = _train(tmp_path / "run", clips, f"model.tiny={family}", "train.steps=2")
    out = tmp_path / "clip.mp4"
    base = saved(family)
    assert main(_generate_args(base, out, "--lora", f"{final}:0.7")) == 0
    by_hand = LongVideoPipeline.from_pretrained(base)
    by_hand.adapter.pipe.load_lora_weights(final, adapter_name="trained")
    by_hand.adapter.pipe.set_adapters(["trained"], [0.7])
    expected = by_hand.generate(PROMPT, num_inference_steps=2, seed=3, show_progress=False).latents
    torch.testing.assert_close(_latents(out), expected, atol=1e-5, rtol=1e-5)
    plain = LongVideoPipeline.from_pretrained(base).generate(PROMPT, num_inference_steps=2, seed=3,
                                                            show_progress=False).latents
    assert (expected - plain).abs().max() > 1e-6


def test_tiny_inference_recipe_runs_with_a_trained_lora(saved, lora_run, tmp_path):
    """configs/generate/tiny_synthetic.yaml end to end, its model and LoRA pointed at this test's run."""
    import pathlib

    recipe = pathlib.Path(__file__).parents[1] / "configs" / "generate" / "tiny_synthetic.yaml"
    out = tmp_path / "tiny.mp4"
    args = ["generate", "--config", str(recipe), "--model", saved("wan"), "--lora", lora_run, "--steps", "2",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    from longgen.io import read_video

    assert read_video(out).shape == (21, 32, 32, 3)
