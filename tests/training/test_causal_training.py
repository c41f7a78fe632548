"""Causal training (longgen.training.causal_methods, ode_pairs): the mask is on in training, ODE regression learns,
the ODE-pair cache resumes, bad inputs get errors that name the fix. The two-process DDP / FSDP checks of the same
properties are in test_causal_training_distributed.py."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from tiny_causal import tiny_adapter
from tiny_runs import tiny_lora_config

from longgen.backbones.causal_attention import CAUSAL_FAMILIES
from longgen.training.config import ConfigError, load_config
from longgen.training.methods import MethodContext, get_method

CAUSAL = ["extension.method=block-causal", "extension.options={chunk_size: 1}"]
"""The block-causal mask of every causal method: the extension, as for objective.method=dmd."""


def _method(adapter, *overrides):
    """A causal training method built on ``adapter`` as the trainer builds it: the extension applied through the
    registry (:func:`longgen.training.build.apply_extension`), then the method (before Accelerate wraps it)."""
    from longgen.training.build import apply_extension

    frames, height, width = adapter.native_video_size
    config = load_config(None, [
        f"model.tiny={adapter.family}", f"data.num_frames={frames}", f"data.height={height}", f"data.width={width}",
        "objective.method=causal_forcing", *CAUSAL, "objective.causal_block_size=1", *overrides,
    ])  # fmt: skip
    cpu = types.SimpleNamespace(device=torch.device("cpu"))  # what the methods read of the accelerator
    extension = apply_extension(adapter, config, adapter.latent_shape(frames, height, width)[2])
    return get_method(config.objective.method, MethodContext(config, adapter, cpu, 0, None, extension=extension))


def chunk_input_gradients(denoise, adapter, chunk: int) -> torch.Tensor:
    """``|d loss(chunk) / d x|`` summed per latent frame ``[F]``: the loss of the output frames of ``chunk``
    (chunk size 1) against the inputs of every frame, at random per-frame noise levels."""
    frames, height, width = adapter.native_video_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(adapter.latent_shape(frames, height, width), generator=generator).requires_grad_(True)
    sigma = torch.rand(1, x.shape[2], generator=generator) * 0.8 + 0.1
    cond = adapter.encode_prompt(["a red circle"], do_classifier_free_guidance=False)[0]
    out = denoise(x, sigma, cond)
    out[:, :, chunk].pow(2).sum().backward()
    return x.grad.abs().sum(dim=(0, 1, 3, 4))


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_the_loss_of_a_chunk_has_no_gradient_from_later_chunks(family):
    """Through the method's denoiser (what Accelerate wraps): chunk k's loss is blind to the inputs of chunks > k
    and sees chunks <= k; with the mask removed (the FastVideo #1307 bug) later chunks leak into it."""
    adapter = tiny_adapter(family)
    method = _method(adapter)
    num_latent_frames = method.num_latent_frames
    assert num_latent_frames >= 2, family
    for chunk in range(num_latent_frames - 1):
        grad = chunk_input_gradients(method.denoiser, adapter, chunk)
        assert torch.all(grad[chunk + 1 :] == 0), (family, chunk, grad)
        assert torch.all(grad[: chunk + 1] > 0), (family, chunk, grad)
    method.mask.remove()  # the negative control: the same check fails without the mask
    grad = chunk_input_gradients(method.denoiser, adapter, 0)
    assert torch.all(grad[1:] > 0), (family, grad)


def test_the_dense_mask_path_is_causal_in_training_too():
    adapter = tiny_adapter("wan")
    method = _method(adapter, "extension.options={chunk_size: 1, attention: mask}")
    grad = chunk_input_gradients(method.denoiser, adapter, 0)
    assert torch.all(grad[1:] == 0) and grad[0] > 0, grad


def test_a_checkpoint_written_before_the_causal_sections_still_resumes(tmp_path):
    """Checkpoint configs without the causal / ode sections (older runs) resume: missing keys had the defaults;
    so do those of the short-lived ``causal.chunk_size`` form, read as the block-causal extension they were."""
    import yaml

    from longgen.training.build import check_resume_config

    config = load_config(None, [f"train.output_dir={tmp_path}"])
    old = config.to_dict()
    del old["causal"], old["ode"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume_config(str(tmp_path), config)
    causal = [f"train.output_dir={tmp_path}", "objective.method=causal_forcing", "objective.causal_block_size=3",
              "extension.method=block-causal"]  # fmt: skip
    with pytest.raises(ConfigError, match="extension.method: None -> 'block-causal'"):
        check_resume_config(str(tmp_path), load_config(None, causal))
    # a checkpoint of the earlier causal.* keys (chunk 3, default window) = the extension with those options
    moved = {"chunk_size": 3, "local_attn_size": -1, "sink_size": 0, "rope_positions": "absolute", "attention": "chunked"}
    earlier = load_config(None, causal).to_dict()
    earlier["causal"].update(moved)
    earlier["extension"] = {**earlier["extension"], "method": None, "options": {}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(earlier))
    check_resume_config(str(tmp_path), load_config(None, causal))  # defaults left out or spelled out: the same
    check_resume_config(str(tmp_path), load_config(None, [*causal, "extension.options={chunk_size: 3}"]))
    with pytest.raises(ConfigError, match="extension.options"):
        check_resume_config(str(tmp_path), load_config(None, [*causal, "extension.options={sink_size: 3}"]))


def test_teacher_forcing_loss_is_on_the_current_chunk_with_clean_context(clips, tmp_path, monkeypatch):
    """Teacher forcing feeds the clean context chunks (sigma exactly causal.context_noise) and the current chunk
    at its level, nothing after it, and weights only the current chunk."""
    from longgen.training import causal_methods

    adapter = tiny_adapter("wan")
    method = _method(adapter, "causal.forcing=teacher", "causal.context_noise=0.0", "objective.mode=clip")
    seen = []

    def spy(x, sigma, cond):
        seen.append(sigma.clone())
        return method.denoiser(x, sigma, cond)

    method.prepared = spy
    latents = torch.randn(adapter.latent_shape(9, 32, 32, batch_size=2))
    cond = adapter.encode_prompt(["a", "b"], do_classifier_free_guidance=False)[0]
    monkeypatch.setattr(method, "encode", lambda batch, generator: (latents, cond))
    chunks = set()
    for step in range(12):
        loss = method.loss({}, step)
        assert torch.isfinite(loss)
        sigma = seen[-1]
        current = sigma.shape[1] - 1  # chunk size 1: the last frame fed is the current chunk
        chunks.add(current)
        assert torch.all(sigma[:, :current] == 0.0) and torch.all(sigma[:, current] > 0)
    assert chunks == {0, 1, 2}  # every chunk gets to be the current one
    # the context frames carry no loss: spoiling their prediction leaves the loss as it was
    method.prepared = method.denoiser
    clean = [method.loss({}, step) for step in range(4)]

    def spoil_context(x, sigma, cond):
        out = method.denoiser(x, sigma, cond).clone()
        out[:, :, : sigma.shape[1] - 1] += 100.0
        return out

    method.prepared = spoil_context
    assert [method.loss({}, step) for step in range(4)] == clean
    got = causal_methods.teacher_forcing_sigmas(1, 3, 1, 0.25, torch.tensor([0.5]), 2)
    assert got.tolist() == [[0.25, 0.25, 0.5]]


def _ode_config(tmp_path, clips, cache, *overrides):
    return tiny_lora_config(
        tmp_path, clips, "objective.method=ode_regression", *CAUSAL, f"data.cache_dir={cache}",
        "ode.num_steps=6", "ode.keep_steps=[0,3,4]", "ode.shift=3.0", "ode.num_samples=4", "ode.shard_size=2",
        "ode.guidance_scale=2.0", *overrides,
    )


@pytest.fixture(scope="module")
def ode_cache(tmp_path_factory, clips):
    """An ODE-pair cache of the tiny Wan, built through the CLI (``longgen ode-pairs``) with an interruption."""
    from longgen.cli import main

    root = tmp_path_factory.mktemp("ode")
    recipe = root / "recipe.yaml"
    config = _ode_config(root / "run", clips, root / "cache")
    config.save(recipe)
    assert main(["ode-pairs", "--config", str(recipe), "--max-shards", "1", "--no-progress"]) == 0
    assert sorted(os.listdir(root / "cache")) == ["ode_pairs.json", "shard_00000.safetensors"]  # no index yet
    first = (root / "cache" / "shard_00000.safetensors").stat().st_mtime_ns
    assert main(["ode-pairs", "--config", str(recipe), "--no-progress"]) == 0  # continues
    assert (root / "cache" / "shard_00000.safetensors").stat().st_mtime_ns == first  # not redone
    return root, recipe, root / "cache"


def test_ode_pairs_resume_to_the_uninterrupted_cache(ode_cache, clips, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from longgen.training import ode_pairs

    root, recipe, cache = ode_cache
    index = json.loads((cache / "index.json").read_text())
    assert index["num_samples"] == 4 and index["sample_keys"] == ["ode_states"] and index["family"] == "wan"
    assert index["ode"]["sigmas"][0] == pytest.approx(1.0) and len(index["ode"]["sigmas"]) == 3
    # one uninterrupted build, killed once mid-shard (KeyboardInterrupt): no partial file, then the same cache
    straight = load_config(str(recipe), [f"data.cache_dir={tmp_path / 'straight'}"])
    calls = {"n": 0}
    real = ode_pairs._shard

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ode_pairs, "_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ode_pairs.build_ode_pairs(straight)
    assert sorted(os.listdir(tmp_path / "straight")) == ["ode_pairs.json", "shard_00000.safetensors"]
    build = ode_pairs.build_ode_pairs(straight)
    assert build.written == ["shard_00001.safetensors"] and build.skipped == ["shard_00000.safetensors"]
    for name in ("shard_00000.safetensors", "shard_00001.safetensors"):
        got, want = load_file(tmp_path / "straight" / name), load_file(cache / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    # two workers share one build (every 2nd shard each); the last to finish writes the index: the same cache
    shared = load_config(str(recipe), [f"data.cache_dir={tmp_path / 'shared'}"])
    first = ode_pairs.build_ode_pairs(shared, worker=(1, 2))
    assert first.written == ["shard_00001.safetensors"] and first.index is None
    second = ode_pairs.build_ode_pairs(shared, worker=(0, 2))
    assert second.written == ["shard_00000.safetensors"] and second.index is not None
    assert json.loads((tmp_path / "shared" / "index.json").read_text()) == index
    for name in ("shard_00000.safetensors", "shard_00001.safetensors"):
        got, want = load_file(tmp_path / "shared" / name), load_file(cache / name)
        assert all(torch.equal(got[key], want[key]) for key in want) and got.keys() == want.keys()
    # a rerun with other settings is refused, by name
    with pytest.raises(ValueError, match=r"other settings \(.*num_steps.*new folder"):
        ode_pairs.build_ode_pairs(load_config(str(recipe), [f"data.cache_dir={cache}", "ode.num_steps=8"]))


def test_ode_trajectory_is_euler_and_keeps_the_states():
    """ode_trajectory = the plain Euler loop; its kept states are the loop's states at those steps."""
    from longgen.schedules import flow_sigmas
    from longgen.training.ode_pairs import ode_trajectory

    sigmas = flow_sigmas(5, shift=3.0)
    target = torch.randn(1, 2, 3, 4, 4)

    def denoise(x, s):
        return 0.5 * x + target  # any affine x0 predictor

    states, end = ode_trajectory(denoise, torch.ones(1, 2, 3, 4, 4), sigmas, [0, 2])
    x = torch.ones(1, 2, 3, 4, 4)
    ref = []
    for i in range(5):
        ref.append(x)
        x0 = denoise(x, None)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - x0) / sigmas[i]  # Euler on the flow velocity
    torch.testing.assert_close(states[:, 0], ref[0])
    torch.testing.assert_close(states[:, 1], ref[2])
    torch.testing.assert_close(end, x)


def _eval_regression(method, dataset) -> float:
    """The ODE regression loss over every (sample, kept level), every chunk at that level (no randomness)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for item in dataset:
            states, clean = item["ode_states"][None].float(), item["latents"][None].float()
            cond = {k: v[None] for k, v in item["cond"].items()}
            for level, s in enumerate(method.level_sigmas):
                sigma = s.expand(1, clean.shape[2])
                total += float((method.denoiser(states[:, level], sigma, cond) - clean).pow(2).mean())
                count += 1
    return total / count


@pytest.mark.slow
def test_ode_regression_lowers_the_regression_loss(ode_cache, clips, tmp_path):
    from longgen.data.cache import LatentCacheDataset
    from longgen.training.loop import Trainer

    _, recipe, cache = ode_cache
    config = load_config(str(recipe), [
        f"train.output_dir={tmp_path}", "train.steps=30", "optim.lr=3e-3", "lora.rank=8",
        "validation.at_end=true", "validation.sampler=causal", "validation.num_frames=13",
        "validation.sampler_options={chunk_size: 1, denoising_steps: '1000,600,400'}",
    ])  # fmt: skip
    trainer = Trainer(config)
    try:
        dataset = LatentCacheDataset(cache)
        before = _eval_regression(trainer.method, dataset)
        result = trainer.train()
        after = _eval_regression(trainer.method, dataset)
    finally:
        trainer.close()
    assert after < 0.8 * before, (before, after, result.losses)
    assert os.path.isfile(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    # validation streamed the causal sampler through the training mask's hooks (not a second set of them)
    from longgen.io import read_video

    assert read_video(result.validation_videos[0]).shape[0] == 13


# --- bad inputs -------------------------------------------------------------------------------------------------
def test_causal_training_refuses_a_unet():
    for family in ("animatediff", "svd"):
        with pytest.raises(ConfigError, match="UNet motion-module.*use a DiT backbone"):
            load_config(None, [f"model.tiny={family}", "objective.method=causal_forcing", *CAUSAL,
                               "objective.causal_block_size=1"])  # fmt: skip


def test_causal_training_refuses_a_chunk_that_does_not_divide_the_clip():
    adapter = tiny_adapter("wan")  # 9 frames -> 3 latent frames
    with pytest.raises(ValueError, match=r"chunk_size=2 does not divide .* 3 latent frames.*data.num_frames to one of \[5, 13\]"):
        _method(adapter, "extension.options={chunk_size: 2}", "objective.causal_block_size=2")
    with pytest.raises(ConfigError, match="objective.causal_block_size=3"):
        load_config(None, ["objective.method=causal_forcing", "extension.method=block-causal"])  # chunk 3 default
    cf = ["objective.method=causal_forcing", "objective.causal_block_size=3", "extension.method=block-causal"]
    with pytest.raises(ConfigError, match=r"use extension.options.local_attn_size >= 3"):  # the window's rule, by key
        load_config(None, [*cf, "extension.options={local_attn_size: 2}"])
    with pytest.raises(ConfigError, match=r"unknown block-causal option 'extension.options.chunk_sise'; did you mean "
                       r"'extension.options.chunk_size'"):
        load_config(None, [*cf, "extension.options={chunk_sise: 3}"])


@pytest.mark.parametrize("method", ["causal_forcing", "ode_regression", "dmd"])
def test_every_causal_method_names_the_block_causal_extension(method, tmp_path):
    """One place for the mask: a causal method without extension.method=block-causal is refused naming it, and a
    recipe with the earlier causal.chunk_size / ... keys is told where they moved."""
    base = [f"objective.method={method}", f"data.cache_dir={tmp_path}", "objective.causal_block_size=3"]
    with pytest.raises(ConfigError, match=f"objective.method={method} trains a causal streaming student: set "
                       "extension.method=block-causal"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="objective.method=.*trains with block-causal attention.*use a DiT"):
        load_config(None, [*base, "model.tiny=animatediff", "extension.method=block-causal"])
    load_config(None, [*base, "extension.method=block-causal"])
    for key in ("chunk_size", "local_attn_size", "sink_size", "rope_positions", "attention"):
        with pytest.raises(ConfigError, match=rf"unknown config key 'causal.{key}': it moved to "
                           rf"'extension.options.{key}'"):
            load_config(None, [*base, "extension.method=block-causal", f"causal.{key}=1"])


def test_ode_regression_refuses_a_missing_or_wrong_cache(tmp_path, clips, ode_cache):
    from longgen.training.loop import Trainer

    with pytest.raises(ConfigError, match="set data.cache_dir to the folder `longgen ode-pairs"):
        tiny_lora_config(tmp_path, clips, "objective.method=ode_regression", *CAUSAL)
    with pytest.raises(ValueError, match=r"longgen ode-pairs --config CONFIG` builds into data.cache_dir; run it"):
        Trainer(_ode_config(tmp_path / "run", clips, tmp_path / "missing"))
    _, recipe, cache = ode_cache
    # a student of another family than the cache's teacher
    with pytest.raises(ValueError, match=r"encoded with a 'wan' model.*'ltx'.*longgen ode-pairs"):
        Trainer(load_config(str(recipe), ["model.tiny=ltx", f"train.output_dir={tmp_path / 'ltx'}"]))
    # a student of the teacher's family in another latent space
    from longgen.training.causal_methods import check_ode_cache

    adapter = tiny_adapter("wan")
    index = json.loads((cache / "index.json").read_text())
    check_ode_cache(index, adapter, load_config(str(recipe)))
    index["latent_shape"][0] += 32
    with pytest.raises(ValueError, match="needs a teacher of the student's family and latent space"):
        check_ode_cache(index, adapter, load_config(str(recipe)))


def test_ode_pairs_refuses_a_teacher_of_another_family(tmp_path, clips):
    from longgen.backbones import build_tiny
    from longgen.training.ode_pairs import build_ode_pairs

    teacher = tmp_path / "ltx"
    build_tiny("ltx").save_pretrained(teacher)
    config = _ode_config(tmp_path / "run", clips, tmp_path / "cache", f"ode.teacher_path={teacher}")
    with pytest.raises(ValueError, match="teacher .* is a 'ltx' model but the student .* is 'wan'"):
        build_ode_pairs(config)


def test_causal_methods_train_a_joint_attention_family(tmp_path, clips):
    """CogVideoX (joint text-video attention, v-prediction): teacher forcing with LoRA and ODE regression as a
    full fine-tune run end to end and export (the other DiTs: the DDP / FSDP tests and the gradient test)."""
    from tiny_runs import run_trainer

    from longgen.training.ode_pairs import build_ode_pairs

    base = ["model.tiny=cogvideox", "data.num_frames=13", "data.height=32", "data.width=48", *CAUSAL]
    _, teacher = run_trainer(tiny_lora_config(
        tmp_path / "tf", clips, *base, "objective.method=causal_forcing", "causal.forcing=teacher", "objective.mode=clip",
    ))  # fmt: skip
    config = tiny_lora_config(
        tmp_path / "ode", clips, *base, "objective.method=ode_regression", f"data.cache_dir={tmp_path / 'cache'}",
        "ode.num_steps=3", "ode.keep_steps=[0,1]", "ode.num_samples=2", "lora.enabled=false", "optim.lr=1e-4",
    )  # fmt: skip
    build_ode_pairs(config)
    _, ode = run_trainer(config)
    for result in (teacher, ode):
        assert len(result.losses) == 2 and all(map(torch.isfinite, map(torch.tensor, result.losses.values())))
    assert os.path.isfile(tmp_path / "tf" / "final" / "pytorch_lora_weights.safetensors")
    assert os.path.isdir(tmp_path / "ode" / "final" / "transformer")


def test_the_ode_pairs_parser_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom longgen.cli import build_parser\nbuild_parser(['ode-pairs', '--help'])\n"
        "bad = [m for m in ('torch', 'diffusers', 'peft') if m in sys.modules]\nassert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ode_pairs_names_where_a_moved_key_went(tmp_path):
    """``longgen ode-pairs`` in a fresh process (the import order of a real run) on a recipe of the earlier
    ``causal.chunk_size`` form: refused, naming ``extension.options.chunk_size``."""
    import subprocess
    import sys

    recipe = tmp_path / "old.yaml"
    recipe.write_text("objective:\n  method: ode_regression\ncausal:\n  chunk_size: 3\n")
    proc = subprocess.run([sys.executable, "-m", "longgen", "ode-pairs", "--config", str(recipe)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0
    assert "unknown config key 'causal.chunk_size': it moved to 'extension.options.chunk_size'" in proc.stderr, (
        proc.stderr[-2000:]
    )


def test_longgen_generate_reapplies_the_recorded_mask(saved, clips, tmp_path, capsys):
    """End to end: a causal_forcing LoRA records its block-causal extension (final/longgen_extension.json), and
    ``longgen generate --lora final --sampler causal`` streams through the re-applied mask: the clip equals the one
    the sampler's own hooks give (``--no-auto-extension``); another window is refused naming the fix."""
    from safetensors.torch import load_file
    from tiny_runs import run_trainer

    from longgen.cli import main

    _, result = run_trainer(tiny_lora_config(
        tmp_path / "run", clips, "objective.method=causal_forcing", *CAUSAL, "causal.forcing=teacher",
        "objective.mode=clip",
    ))  # fmt: skip
    record = json.loads((tmp_path / "run" / "final" / "longgen_extension.json").read_text())
    assert record["method"] == "block-causal" and record["options"]["chunk_size"] == 1, record

    def generate(name, *extra):
        out = tmp_path / f"{name}.mp4"
        code = main(["generate", "--model", saved("wan"), "--lora", str(result.final_dir), "--prompt", "a red ball",
                     "--sampler", "causal", "--chunk-size", "1", "--steps", "2", "--seed", "3", "--num-frames", "17",
                     "--save-latents", "--quiet", "--out", str(out), *extra])  # fmt: skip
        return code, out

    (code, auto), (code_own, own) = generate("auto"), generate("own", "--no-auto-extension")
    assert code == 0 and code_own == 0
    latents = [load_file(str(o).removesuffix(".mp4") + ".latents.safetensors")["latents"] for o in (auto, own)]
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=0)
    capsys.readouterr()
    code, _ = generate("window", "--local-attn-size", "2")
    assert code != 0 and "--no-auto-extension" in capsys.readouterr().err
    assert generate("window2", "--local-attn-size", "2", "--no-auto-extension")[0] == 0


def test_ode_pairs_and_precompute_refuse_each_others_cache(ode_cache, clips, tmp_path, capsys):
    """Either command into the other's folder used to mix the two caches (and ode-pairs then crashed)."""
    import shutil

    from longgen.backbones import build_tiny
    from longgen.cli import main
    from longgen.data.cache import precompute_cache
    from longgen.data.video import VideoClipDataset

    root, recipe, cache = ode_cache
    ode_copy = tmp_path / "ode_copy"
    shutil.copytree(cache, ode_copy)
    before = sorted(os.listdir(ode_copy))
    dataset = VideoClipDataset(clips, num_frames=9, height=32, width=32, random_start=False)
    with pytest.raises(ValueError, match="holds ODE pairs .* choose another folder"):
        precompute_cache(build_tiny("wan"), dataset, ode_copy)
    assert sorted(os.listdir(ode_copy)) == before
    latent = tmp_path / "latent"
    precompute_cache(build_tiny("wan"), dataset, latent)
    before = sorted(os.listdir(latent))
    capsys.readouterr()
    assert main(["ode-pairs", "--config", str(recipe), f"data.cache_dir={latent}", "--no-progress"]) == 2
    assert "holds a latent cache of `longgen precompute`" in capsys.readouterr().err
    assert sorted(os.listdir(latent)) == before
