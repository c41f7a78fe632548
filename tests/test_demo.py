"""`longgen demo --quick` end to end: synthetic data -> training -> long generation -> evaluation."""

import json

import numpy as np
import pytest
import torch

from longgen.backbones.wan import is_vae_per_frame, make_vae_per_frame
from longgen.cli import main
from longgen.demo import DEMO_SAMPLERS, DEMO_VAE, REFERENCES, build_latent_cache
from longgen.io import video_info


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["train"]["steps"] == 20
    # The VAE stage ran, improved the reconstruction, and its latent statistics reached the saved model.
    vae = summary["vae"]
    assert vae["steps"] == 10 and vae["psnr"] > vae["psnr_before"] + 3.0 and vae["per_frame"]
    assert vae["latent_cache"]["num_samples"] == 4 * 4  # 4 videos x windows 0, 8, 16, 24 of 33 frames
    vae_config = json.loads((out / "train" / "base_model" / "vae" / "config.json").read_text())
    assert vae_config["scale_factor_spatial"] == 4 and len(vae_config["latents_mean"]) == vae_config["z_dim"]
    assert vae_config["latents_std"] != [0.5 + 0.25 * i for i in range(vae_config["z_dim"])]
    assert set(summary["runs"]) == set(DEMO_SAMPLERS) >= {"full", "sliding", "fifo", "df"}
    # One latent frame per frame: 2 x the native 9 frames.
    for run in summary["runs"].values():
        assert video_info(run["path"])["num_frames"] == summary["num_frames"] == 18
    report = json.loads((out / "videos" / "eval" / "metrics.json").read_text())
    assert set(report["videos"]) == {*DEMO_SAMPLERS, "gt", "gt_vae"}
    for video in report["videos"].values():
        assert 0.0 <= video["synthetic"]["overall"] <= 1.0
        assert video["metrics"]["temporal_flicker"]["summary"]["mean"] is not None
    # The references: the ground truth scores near-perfectly; its VAE reconstruction is reported as the ceiling.
    assert summary["ground_truth"]["overall"] > 0.9
    assert summary["reconstructed_gt"]["overall"] == pytest.approx(
        report["videos"]["gt_vae"]["synthetic"]["overall"]
    )
    assert set(summary["stage_seconds"]) == {
        "data",
        "vae",
        "latent_cache",
        "transformer",
        "generate",
        "evaluate",
        "generate_1x",
        "evaluate_1x",
    }
    assert (out / "videos" / "eval" / "plots" / "temporal_flicker.png").exists()
    assert not (out / "train" / "latent_cache").exists()
    # The VAE stage ran on the training stack: a complete checkpoint of the project's format.
    assert vae["checkpoint"].endswith("step_00000010")
    assert (out / "train" / "vae" / "checkpoints" / "step_00000010" / "checkpoint.json").exists()
    printed = capsys.readouterr().out
    assert "| full" in printed and "| gt_vae" in printed and "summary.md" in printed
    assert (
        "temporal_flicker (higher is better)" in printed and "color_hist_drift (lower is better)" in printed
    )
    assert "reconstructed ground truth" in printed
    # Quick trains too little to show anything: it says so plainly, in its output and in demo.json.
    assert printed.count("only smoke-tests") == 2 and summary["note"].startswith("NOTE: --quick")
    _check_native_reference(out, summary, printed)
    _check_grid(out, summary, printed)
    _check_reload(out, summary)


def _check_reload(out, summary):
    """load_demo_model gives back the model as it sampled (weights, tokenizer, prompt length, guidance): the 1x
    full clip regenerated from the folder is the demo's, frame for frame."""
    from longgen.demo import DemoSettings, generate_and_evaluate, load_demo_model
    from longgen.io import read_video

    settings = summary["train"]["settings"]
    assert settings["guidance_scale"] == DemoSettings.quick("x").guidance_scale > 1 and settings["caption_dropout"] > 0
    assert settings["text_length"] == 64
    adapter, data_dir, loaded = load_demo_model(str(out))
    assert loaded == summary
    again = generate_and_evaluate(
        adapter, data_dir, str(out / "reload"), 1, ("full",), 4, guidance_scale=settings["guidance_scale"],
        references=False,
    )
    np.testing.assert_array_equal(
        read_video(again["runs"]["full"]["path"]), read_video(str(out / "videos" / "1x" / "full_9f.mp4"))
    )
    # The quality benchmark evaluates the demo's model instead of training one: same 1x score as the demo's.
    from benchmarks.long_video_quality import main as quality_main

    bench = out / "bench"
    assert quality_main(["--from-demo", str(out), "--out", str(bench), "--factors", "2", "--samplers", "full",
                         "--extensions", "riflex", "--steps", "4"]) == 0
    results = json.loads((bench / "results.json").read_text())
    assert not (bench / "train").exists()  # nothing trained
    assert results["1x"]["samplers"]["full"]["synthetic"]["overall"] == pytest.approx(
        summary["native"]["synthetic"]["full"]["overall"]
    )


def _check_native_reference(out, summary, printed):
    """Every sampler and reference also ran at the native length (1x); the table gives the ratio to it."""
    native = summary["native"]
    assert native["num_frames"] == 9 and set(native["synthetic"]) == {*DEMO_SAMPLERS, *REFERENCES}
    for label in DEMO_SAMPLERS:
        assert video_info(out / "videos" / "1x" / f"{label}_9f.mp4")["num_frames"] == 9
    ratio_head = "| clip | 1x overall | 2x overall | 2x / 1x |"
    assert ratio_head in printed and ratio_head in (out / "summary.md").read_text()
    gt_1x, gt_2x = native["synthetic"]["gt"]["overall"], summary["ground_truth"]["overall"]
    assert gt_1x > 0.9 and summary["ratio_to_1x"]["gt"] == pytest.approx(gt_2x / gt_1x)
    assert f"| gt | {gt_1x:.3f} | {gt_2x:.3f} | {gt_2x / gt_1x:.2f} |" in printed
    for label in DEMO_SAMPLERS:  # the untrained quick model scores 0 at 1x: no ratio, shown as "-"
        row = next(line for line in printed.splitlines() if line.startswith(f"| {label} | "))
        ratio = summary["ratio_to_1x"][label]
        assert row.endswith(" | - |" if ratio is None else f" | {ratio:.2f} |")


def _check_grid(out, summary, printed):
    """The comparison grid: its path is the first line of the results; rows gt, gt_vae, each sampler."""
    from PIL import Image

    from longgen.eval.grid import grid_layout

    lines = printed.splitlines()
    first = lines[next(i for i, line in enumerate(lines) if line.startswith("[3/3]")) + 1]
    png, mp4 = out / "comparison_grid.png", out / "comparison_grid.mp4"
    assert first == f"comparison grid: {png} ({mp4})"
    labels = [*REFERENCES, *DEMO_SAMPLERS]
    layout = grid_layout(labels, (32, 32), 8)
    assert layout["height"] > layout["header_h"] + len(labels) * layout["cell_h"]
    assert Image.open(png).size == (layout["width"], layout["height"])
    assert video_info(mp4)["num_frames"] == 18 and video_info(mp4)["height"] == layout["body_h"]
    assert summary["grid"]["frame_indices"] == [0, 2, 5, 7, 10, 12, 15, 17]


def _tiny_vae():
    from longgen.backbones.wan import _tiny_wan_vae

    torch.manual_seed(0)
    return _tiny_wan_vae(**DEMO_VAE).eval()


def test_per_frame_vae_codes_frames_independently():
    vae = _tiny_vae()
    assert not is_vae_per_frame(vae)  # random 3D convolutions mix neighbouring frames
    handles = make_vae_per_frame(vae)
    assert is_vae_per_frame(vae) and handles
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        whole = vae.decode(vae.encode(x).latent_dist.mode()).sample
        alone = torch.cat(
            [vae.decode(vae.encode(x[:, :, t : t + 1]).latent_dist.mode()).sample for t in range(9)], 2
        )
        mixed = vae.encode(x[:, :, :3]).latent_dist.mode()
        x2 = x.clone()
        x2[:, :, 0] = -x2[:, :, 0]  # change frame 0 only: frames 1, 2 must not move
        mixed2 = vae.encode(x2[:, :, :3]).latent_dist.mode()
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[:, :, 1:], mixed2[:, :, 1:], atol=1e-6, rtol=0)
    assert not torch.allclose(mixed[:, :, 0], mixed2[:, :, 0])
    # The past taps stay zero through an optimizer step (gradient hooks), then the hooks come off.
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    vae.decode(vae.encode(x).latent_dist.mode()).sample.square().mean().backward()
    opt.step()
    assert is_vae_per_frame(vae)
    for handle in handles:
        handle.remove()


def test_current_frame_convolutions_compute_the_same_outputs_and_gradients():
    from longgen.backbones.wan import current_frame_convolutions

    vae = _tiny_vae()
    with pytest.raises(ValueError, match="make_vae_per_frame"):
        with current_frame_convolutions(vae):
            pass
    make_vae_per_frame(vae)
    x = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def run():  # the encoder's chunked path (feature caches) and the decoder, with gradients
        vae.zero_grad(set_to_none=True)
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    reference, grads = run()
    with current_frame_convolutions(vae) as switched:
        fast, fast_grads = run()
    assert switched > 0
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], atol=1e-5, rtol=1e-4)
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    assert not any("forward" in vars(m) for m in vae.modules() if isinstance(m, WanCausalConv3d))


def test_per_frame_refuses_temporal_downsampling():
    from longgen.backbones.wan import _tiny_wan_vae

    vae = _tiny_wan_vae(**{**DEMO_VAE, "temperal_downsample": [True, True], "scale_factor_temporal": 4})
    with pytest.raises(ValueError, match="temperal_downsample"):
        make_vae_per_frame(vae)
    assert not is_vae_per_frame(vae)


def test_latent_cache_windows_equal_window_encodings(tmp_path):
    from longgen.backbones.wan import WanAdapter
    from longgen.data.cache import LatentCacheDataset
    from longgen.data.synthetic import load_manifest, write_synthetic_dataset
    from longgen.io import read_video

    write_synthetic_dataset(tmp_path / "data", num_videos=2, num_frames=14, height=32, width=32, seed=3)
    pipe = WanAdapter.tiny_pipeline(seed=0, vae_kwargs=DEMO_VAE)
    adapter = WanAdapter(pipe, native_video_size=WanAdapter.tiny_video_size)
    with pytest.raises(ValueError, match="per-frame"):
        build_latent_cache(adapter, str(tmp_path / "data"), str(tmp_path / "cache0"), 9)
    make_vae_per_frame(pipe.vae)
    info = build_latent_cache(adapter, str(tmp_path / "data"), str(tmp_path / "cache"), 9, stride=2)
    assert info["num_samples"] == 2 * 3  # windows starting at 0, 2, 4 of 14 frames
    cache = LatentCacheDataset(tmp_path / "cache")
    video = read_video(load_manifest(tmp_path / "data" / "manifest.jsonl")[1]["video"])
    item = cache[3 + 2]  # second video, window starting at frame 4
    window = torch.from_numpy(np.ascontiguousarray(video[4:13])).float()[None] / 255.0
    torch.testing.assert_close(item["latents"], adapter.encode_video(window)[0], atol=1e-4, rtol=1e-4)
    cond, _ = adapter.encode_prompt([item["caption"]], do_classifier_free_guidance=False)
    torch.testing.assert_close(item["cond"]["encoder_hidden_states"], cond["encoder_hidden_states"][0])
    # One schema with `longgen precompute` (the same writer): family, frames, dtype, version, null cond.
    assert (cache.family, cache.num_frames, cache.dtype, cache.index["version"]) == ("wan", 9, "fp32", 2)
    assert cache.index["clip_shape"] == [9, 32, 32, 3] and cache.null_cond() is not None
    with pytest.raises(ValueError, match="'wan' model.*'cogvideox'"):
        LatentCacheDataset(tmp_path / "cache", family="cogvideox")


def test_vae_stage_needs_4k_plus_1_frames(tmp_path):
    from longgen.demo import train_vae

    with pytest.raises(ValueError, match="4k\\+1.*use 1 or 5"):
        train_vae(_tiny_vae(), str(tmp_path), steps=1, num_frames=4)


def test_vae_stage_resumes_exactly_from_its_checkpoint(tmp_path):
    """The VAE stage checkpoints like the trainer: a 4-step run killed after its step-2 checkpoint and resumed
    (``resume="latest"``) ends with the weights of an uninterrupted run."""
    import shutil

    from longgen.data.synthetic import write_synthetic_dataset
    from longgen.demo import train_vae

    write_synthetic_dataset(tmp_path / "data", num_videos=2, num_frames=6, height=32, width=32, seed=3)
    common = dict(batch_size=2, num_frames=1, per_frame=True, lr=1e-2, recon_loss="l1", checkpoint_every=2)
    straight = _tiny_vae()
    train_vae(straight, str(tmp_path / "data"), 4, output_dir=str(tmp_path / "a"), **common)
    first = train_vae(_tiny_vae(), str(tmp_path / "data"), 4, output_dir=str(tmp_path / "b"), **common)
    assert first["checkpoint"].endswith("step_00000004")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")  # "killed" before its last save
    again = _tiny_vae()  # a fresh process starts from the random VAE and loads the step-2 checkpoint
    report = train_vae(
        again, str(tmp_path / "data"), 4, output_dir=str(tmp_path / "b"), resume="latest", **common
    )
    assert report["checkpoint"].endswith("step_00000004") and report["loss"] is not None
    for (name, want), got in zip(straight.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
    assert straight.config.latents_mean == pytest.approx(again.config.latents_mean, abs=1e-5)


def test_tiny_tokenizer_knows_every_word_that_describes_a_world():
    """The captions' count, colours, sizes, shapes and paces are tokens of the tiny tokenizer (not <unk>), so the
    demo's prompt can tell the model which world to draw."""
    import re

    from longgen.backbones.tiny import tiny_tokenizer
    from longgen.data.synthetic import CAPTION_STYLES, sample_world

    tok = tiny_tokenizer(model_max_length=64, vocab_size=64)
    vocab = tok.get_vocab()
    for seed in range(40):
        for style in CAPTION_STYLES:
            caption = sample_world(seed, num_objects=(1, 3)).caption(style)
            description = caption.split(".")[0]  # before the boilerplate
            words = re.findall(r"\w+", description)
            assert words and all(w in vocab for w in words), (description, [w for w in words if w not in vocab])
            assert len(tok(caption).input_ids) <= 64, caption  # the demo's 64-token prompts hold it whole


def test_demo_settings_refuse_guidance_without_an_unconditional_model(tmp_path, capsys):
    from longgen.demo import DemoSettings, load_demo_model

    with pytest.raises(ValueError, match="caption_dropout > 0"):
        DemoSettings(caption_dropout=0.0, guidance_scale=3.0)
    with pytest.raises(ValueError, match="ema_decay"):
        DemoSettings(ema_decay=1.0)
    with pytest.raises(ValueError, match="weighting='x0' is not a loss weighting; choose one of"):
        DemoSettings(weighting="x0")
    with pytest.raises(ValueError, match=r"length_factor \(--length-factor\) must be >= 1, got 0"):
        DemoSettings(length_factor=0)  # used to fail only after the whole training stage
    with pytest.raises(ValueError, match=r"train_steps \(--train-steps\) must be >= 1"):
        DemoSettings(train_steps=0)
    (tmp_path / "a_file").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "a_file")]) != 0
    assert "is an existing file, not a folder; choose another path" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="longgen demo --out"):
        load_demo_model(str(tmp_path))
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--vae-dir", str(tmp_path)]) != 0
    assert "holds no VAE (config.json): give <demo out>/train/base_model/vae" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # refused before writing anything
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--eval-worlds", "5"]) != 0
    assert "eval_worlds=5 prompts more worlds than the data set's num_videos=4" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_prompt_length_follows_the_tokenizer():
    """The demo's tiny tokenizer holds 64 tokens: prompts are padded to 64 (Wan's 512 otherwise) in the adapter's
    encode_prompt, so training (the latent cache) and sampling read the same text length."""
    from longgen.backbones.wan import WanAdapter

    short = WanAdapter(WanAdapter.tiny_pipeline(seed=0, text_length=64), native_video_size=(9, 32, 32))
    cond, uncond = short.encode_prompt(["2 shapes: a small red circle"], do_classifier_free_guidance=True)
    assert cond["encoder_hidden_states"].shape == uncond["encoder_hidden_states"].shape == (1, 64, 32)
    stock = WanAdapter(WanAdapter.tiny_pipeline(seed=0), native_video_size=(9, 32, 32))
    assert stock.encode_prompt(["a red circle"])[0]["encoder_hidden_states"].shape == (1, 512, 32)


def test_mean_over_clips_averages_every_prompt_and_seed_and_reuses_the_demo_clips(tmp_path):
    """The mean-over-clips table: eval_worlds prompts x eval_seeds, at 1x and at the length factor; world 0 at the
    demo's seed is the clip already made (not sampled again), every other clip is generate_and_evaluate's own."""
    from longgen.backbones.wan import WanAdapter
    from longgen.data.synthetic import write_synthetic_dataset
    from longgen.demo import DemoSettings, generate_and_evaluate, mean_over_clips, overall_by_label

    data = tmp_path / "data"
    write_synthetic_dataset(data, num_videos=2, num_frames=9, height=32, width=32)
    pipe = WanAdapter.tiny_pipeline(seed=0, vae_kwargs=DEMO_VAE, text_length=64)
    adapter = WanAdapter(pipe, native_video_size=WanAdapter.tiny_video_size)
    settings = DemoSettings(out_dir=str(tmp_path / "out"), num_videos=2, length_factor=2, samplers=("full",),
                            num_inference_steps=2, eval_worlds=2, eval_seeds=(0,))

    def scored(value):
        return {"synthetic": {"scores": {"overall": {"summary": {"mean": value}}}}}

    done = {f: {"report": {"videos": {label: scored(m) for label in ("full", *REFERENCES)}}}
            for f, m in ((1, 0.25), (2, 0.5))}  # stand-ins for the demo's own world-0 / seed-0 results
    means = mean_over_clips(adapter, str(data), settings, done)
    assert means["clips"] == [[0, 0], [1, 0]]
    assert means["per_clip"][1][0] == dict.fromkeys(("full", *REFERENCES), 0.25)
    assert means["per_clip"][2][0] == dict.fromkeys(("full", *REFERENCES), 0.5)
    for factor in (1, 2):
        rows = means["per_clip"][factor]
        assert len(rows) == 2 and all(set(r) == {"full", *REFERENCES} for r in rows)
        for label in rows[1]:
            assert means["means"][factor][label] == pytest.approx((rows[0][label] + rows[1][label]) / 2)
    again = generate_and_evaluate(adapter, str(data), str(tmp_path / "again"), 2, ("full",), 2, seed=0, world_index=1)
    assert means["per_clip"][2][1] == {k: v or 0.0 for k, v in overall_by_label(again).items()}
    with pytest.raises(ValueError, match="eval_worlds=3 prompts more worlds"):
        DemoSettings(num_videos=2, eval_worlds=3)


def test_a_reused_vae_sets_the_transformers_latent_channels(tmp_path):
    from longgen.backbones.wan import _tiny_wan_vae, make_vae_per_frame
    from longgen.demo import DEMO_VAE, DemoSettings, train_tiny_model

    vae = _tiny_wan_vae(**{**DEMO_VAE, "z_dim": 8})
    make_vae_per_frame(vae)
    vae.save_pretrained(tmp_path / "vae")
    settings = DemoSettings(out_dir=str(tmp_path / "run"), vae_dir=str(tmp_path / "vae"), train_steps=2, num_videos=2,
                            eval_worlds=1, batch_size=2, cache_stride=16)
    assert settings.vae_kwargs["z_dim"] == 4  # the settings' own VAE; the reused one wins
    adapter, result, _, report = train_tiny_model(settings)
    assert result.step == 2 and report["reused"]
    assert adapter.model.config.in_channels == adapter.model.config.out_channels == adapter.vae.config.z_dim == 8


def test_demo_settings_refuse_an_unknown_caption_style_and_videos_shorter_than_a_window():
    from longgen.demo import DemoSettings

    with pytest.raises(ValueError, match="caption_style='long' is not a caption style"):
        DemoSettings(caption_style="long")
    with pytest.raises(ValueError, match="video_frames=8 is shorter than the native 9-frame"):
        DemoSettings(video_frames=8)
    assert DemoSettings(caption_style="short", video_frames=9).video_frames == 9
    with pytest.raises(ValueError, match="set video_frames=9"):
        DemoSettings(caption_style="position", video_frames=33)
    assert DemoSettings(caption_style="position", video_frames=9).caption_style == "position"
