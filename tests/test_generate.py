"""`longgen generate` end to end on tiny saved pipelines of every family: mp4 with the requested frames."""

import pytest
import torch

from longgen.backbones import FAMILIES, load_adapter
from longgen.cli import build_parser, main
from longgen.io import read_video, video_info
from longgen.pipeline import GuidedDenoiser, LongVideoPipeline


def _image(tmp_path, size):
    from PIL import Image

    path = tmp_path / "cond.png"
    Image.new("RGB", (size, size), (200, 40, 40)).save(path)
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_writes_requested_frames(family, saved, tmp_path, capsys):
    model = saved(family)
    adapter = load_adapter(model)
    native_frames, height, width = adapter.native_video_size
    # twice the native length in latent frames, with the sliding sampler (the first long sampler)
    num_frames = adapter.num_pixel_frames(2 * adapter.num_latent_frames(native_frames))
    out = tmp_path / "clip.mp4"
    args = [
        "generate",
        "--model",
        model,
        "--num-frames",
        str(num_frames),
        "--steps",
        "2",
        "--sampler",
        "sliding",
        "--prompt",
        "a red ball",
        "--out",
        str(out),
        "--quiet",
    ]
    if adapter.requires_image_condition:
        args += ["--image", _image(tmp_path, width)]
    assert main(args) == 0
    assert f"{num_frames} frames" in capsys.readouterr().out
    info = video_info(out)
    assert (info["num_frames"], info["height"], info["width"]) == (num_frames, height, width)
    assert read_video(out).shape == (num_frames, height, width, 3)


def test_bad_frame_count_is_explained(saved, tmp_path, capsys):
    code = main(["generate", "--model", saved("wan"), "--num-frames", "12", "--out", str(tmp_path / "x.mp4")])
    assert code == 2
    assert "4k+1" in capsys.readouterr().err


def test_missing_model_folder_is_explained(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_sampler_option_is_rejected(saved):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    with pytest.raises(ValueError, match="takes no option"):
        pipe.generate("x", sampler="full", sampler_options={"window": 3}, num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate("x", sampler="magic", num_inference_steps=1)


def test_sliding_with_one_window_is_full_sampling(saved):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    full = pipe.generate("a ball", sampler="full", num_inference_steps=3, seed=1, show_progress=False)
    one_window = pipe.generate(
        "a ball", sampler="sliding", num_inference_steps=3, seed=1, show_progress=False
    )
    torch.testing.assert_close(one_window.latents, full.latents, rtol=0, atol=0)


def test_guidance_combines_cond_and_uncond(saved):
    adapter = load_adapter(saved("wan"))
    cond, uncond = adapter.encode_prompt(["a red ball"], [""])
    shape = adapter.latent_shape(*adapter.native_video_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full(shape[:1] + shape[2:3], 0.7)
    x0_c = adapter.denoise(x, sigma, cond)
    x0_u = adapter.denoise(x, sigma, uncond)
    guided = GuidedDenoiser(adapter, cond, uncond, guidance_scale=3.0)(x, sigma)
    torch.testing.assert_close(guided, x0_u + 3.0 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GuidedDenoiser(adapter, cond, uncond, 1.0)(x, sigma), x0_c)


def test_streamed_decode_matches_frame_count_and_whole_decode(saved):
    adapter = load_adapter(saved("wan"))
    latents = torch.randn(1, adapter.latent_channels, 7, 4, 4)
    whole = adapter.decode(latents)
    blocks = list(adapter.iter_decode(latents, chunk_latent_frames=7))
    assert len(blocks) == 1
    torch.testing.assert_close(blocks[0], whole)
    chunked = torch.cat(list(adapter.iter_decode(latents, chunk_latent_frames=2)), dim=1)
    assert chunked.shape == whole.shape == (1, adapter.num_pixel_frames(7), 32, 32, 3)


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for command in ("generate", "make-tiny", "info"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "usage: longgen " + command in text


def test_info_reports_the_adapter(saved, capsys):
    assert main(["info", "--model", saved("wan")]) == 0
    assert '"family": "wan"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["--sampler", "fifo", "--num-partitions", "2"],
        ["--sampler", "fifo", "--no-lookahead", "--window", "3", "--num-partitions", "1"],
        ["--sampler", "df", "--steps", "3"],
        ["--sampler", "df", "--steps", "3", "--ar-step", "3"],
        ["--sampler", "df", "--steps", "3", "--overlap-history", "1", "--addnoise-condition", "20"],
        ["--sampler", "sliding", "--steps", "2", "--noise", "freenoise"],
        [
            "--sampler",
            "sliding",
            "--steps",
            "2",
            "--prompt",
            "a red ball",
            "--prompt",
            "a blue square",
            "--prompt-frames",
            "0",
            "21",
            "--prompt-transition",
            "2",
        ],
    ],
    ids=[
        "fifo",
        "fifo-no-lookahead",
        "df-chunked",
        "df-rolling",
        "df-history-noise",
        "freenoise",
        "multi-prompt",
    ],
)
def test_long_samplers_from_the_cli(args, saved, tmp_path):
    out = tmp_path / "long.mp4"
    # tiny wan: 9 native frames = 3 latent; 45 frames = 12 latent (4x)
    assert (
        main(["generate", "--model", saved("wan"), "--num-frames", "45", "--out", str(out), "--quiet", *args])
        == 0
    )
    assert video_info(out)["num_frames"] == 45


def test_fifo_steps_must_match_its_queue(saved, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            saved("wan"),
            "--num-frames",
            "45",
            "--sampler",
            "fifo",
            "--steps",
            "5",
            "--out",
            str(tmp_path / "x.mp4"),
        ]
    )
    assert code == 2
    assert "num_partitions * window" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["fifo", "df"])
def test_every_sampler_on_every_family_gives_requested_frames(family, sampler, saved, tmp_path):
    pipe = LongVideoPipeline.from_pretrained(saved(family))
    adapter = pipe.adapter
    native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
    num_frames = adapter.num_pixel_frames(2 * native_latent)
    image = None
    if adapter.requires_image_condition:
        from PIL import Image

        image = Image.new("RGB", (adapter.native_video_size[2],) * 2, (10, 200, 10))
    options = {"num_partitions": 1} if sampler == "fifo" else {}
    steps = None if sampler == "fifo" else 2
    result = pipe.generate(
        "a ball",
        image=image,
        num_frames=num_frames,
        num_inference_steps=steps,
        sampler=sampler,
        sampler_options=options,
        show_progress=False,
        output_path=tmp_path / "o.mp4",
    )
    assert result.latents.shape[2] == 2 * native_latent
    assert torch.isfinite(result.latents).all()
    assert video_info(tmp_path / "o.mp4")["num_frames"] == num_frames


def test_extension_from_the_cli_widens_windows_and_changes_the_clip(saved, tmp_path):
    model = saved("wan")
    pipe = LongVideoPipeline.from_pretrained(model)
    plain = pipe.generate(
        "a ball", num_frames=21, sampler="sliding", num_inference_steps=2, show_progress=False
    )
    handle = pipe.apply_extension("riflex", target_num_frames=21)
    assert pipe.default_window() == 6  # windows now span the target (21 frames = 6 latent), not the native 3
    extended = pipe.generate(
        "a ball", num_frames=21, sampler="sliding", num_inference_steps=2, show_progress=False
    )
    assert handle.describe()["method"] == "riflex"
    assert not torch.allclose(plain.latents, extended.latents)
    pipe.remove_extensions()
    assert pipe.default_window() == 3
    out = tmp_path / "ext.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                model,
                "--num-frames",
                "21",
                "--extension",
                "riflex",
                "--steps",
                "2",
                "--sampler",
                "sliding",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert video_info(out)["num_frames"] == 21


def test_rope_extension_on_a_unet_is_a_clear_error(saved, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            saved("animatediff"),
            "--extension",
            "riflex",
            "--num-frames",
            "16",
            "--out",
            str(tmp_path / "x.mp4"),
        ]
    )
    assert code == 2
    assert "wan" in capsys.readouterr().err


@pytest.mark.parametrize("extension", ["fusion", "spectral", "exvideo"])
def test_unet_extensions_from_the_cli_and_removal(extension, saved, tmp_path):
    model = saved("animatediff")
    pipe = LongVideoPipeline.from_pretrained(model)
    kwargs = dict(num_frames=16, num_inference_steps=2, show_progress=False, seed=3)
    stock = pipe.generate("a ball", **kwargs).latents
    handle = pipe.apply_extension(extension, None if extension != "exvideo" else 16)
    extended = pipe.generate("a ball", **kwargs).latents
    if (
        extension != "exvideo"
    ):  # ExVideo is the identity at initialisation; fusion and spectral change attention
        assert not torch.allclose(stock, extended)
    assert handle.describe()["method"] == extension
    pipe.remove_extensions()
    torch.testing.assert_close(pipe.generate("a ball", **kwargs).latents, stock, rtol=0, atol=0)
    out = tmp_path / "x.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                model,
                "--num-frames",
                "16",
                "--extension",
                extension,
                "--steps",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert video_info(out)["num_frames"] == 16


def test_generate_config_file_with_cli_override(saved, tmp_path, capsys):
    cfg = tmp_path / "gen.yaml"
    out = tmp_path / "cfg.mp4"
    cfg.write_text(
        f"model: {saved('wan')}\nprompt: a red ball\nsampler: df\nnum-frames: 45\nsteps: 2\nout: {out}\nquiet: true\n"
    )
    assert main(["generate", "--config", str(cfg), "--num-frames", "21"]) == 0  # the flag wins
    assert video_info(out)["num_frames"] == 21
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {saved('wan')}\nsamplr: df\n")
    assert main(["generate", "--config", str(bad)]) == 2
    assert "unknown option 'samplr'" in capsys.readouterr().err


def test_generate_recipes_parse():
    import pathlib

    import yaml

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    dests = {a.dest for a in sub._actions}
    for path in sorted(pathlib.Path(__file__).parents[1].glob("configs/generate/*.yaml")):
        for key in yaml.safe_load(path.read_text()):
            assert key.replace("-", "_") in dests, f"{path.name}: {key}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_generation_runs_on_every_family(family, saved, tmp_path):
    """bf16 weights with diffusers' fp32-kept modules: inputs must be cast to the compute dtype."""
    import torch as _torch

    pipe = LongVideoPipeline.from_pretrained(saved(family), torch_dtype=_torch.bfloat16)
    image = None
    if pipe.adapter.requires_image_condition:
        from PIL import Image

        image = Image.new("RGB", (pipe.adapter.native_video_size[2],) * 2, (200, 40, 40))
    assert pipe.adapter.dtype == _torch.bfloat16
    result = pipe.generate(
        "a ball", image=image, num_inference_steps=2, show_progress=False, output_path=tmp_path / "bf16.mp4"
    )
    assert torch.isfinite(result.latents).all()
    assert video_info(tmp_path / "bf16.mp4")["num_frames"] == result.num_frames


@pytest.mark.parametrize(
    "kwargs",
    [{"offload": "model"}, {"offload": "group"}, {"attention_backend": "_native_math"}],
    ids=["offload-model", "offload-group", "attention-native-math"],
)
def test_offload_and_attention_backend_keep_the_clip(kwargs, saved):
    """``--offload`` and ``--attention-backend`` change where and how the model runs, not what it makes."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    plain = LongVideoPipeline.from_pretrained(saved("wan"))
    want = plain.generate(
        "a ball", sampler="df", num_frames=17, num_inference_steps=3, seed=2, show_progress=False
    )
    active = (
        _AttentionBackendRegistry._active_backend
    )  # set_attention_backend also sets diffusers' global default
    try:
        pipe = LongVideoPipeline.from_pretrained(saved("wan"), **kwargs)
        got = pipe.generate(
            "a ball", sampler="df", num_frames=17, num_inference_steps=3, seed=2, show_progress=False
        )
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-5, atol=1e-5)
    model = pipe.adapter.model
    if "offload" in kwargs:  # diffusers' offload hooks sit on the transformer
        assert getattr(model, "_diffusers_hook", None) is not None or hasattr(model, "_hf_hook")
    else:
        backends = {str(m.processor._attention_backend) for m in model.modules() if hasattr(m, "processor")}
        assert backends == {"AttentionBackendName._NATIVE_MATH"}, backends


def test_unknown_offload_mode_is_rejected(saved):
    with pytest.raises(ValueError, match="'none', 'model' or 'group'"):
        LongVideoPipeline.from_pretrained(saved("wan"), offload="disk")


@pytest.mark.parametrize("family", ["wan", "ltx", "cogvideox", "skyreels_v2"])
def test_make_tiny_i2v_then_generate_with_image(family, tmp_path, capsys):
    """``make-tiny --i2v`` writes the family's image-to-video folder; ``generate --image`` runs it end to end and
    ``--image`` is required there."""
    folder = tmp_path / "i2v"
    assert main(["make-tiny", "--family", family, "--i2v", "--out", str(folder)]) == 0
    assert "ImageToVideoPipeline" in capsys.readouterr().out
    adapter = load_adapter(folder)
    assert adapter.requires_image_condition
    n, h, w = adapter.native_video_size
    out = tmp_path / "clip.mp4"
    args = ["generate", "--model", str(folder), "--steps", "2", "--prompt", "a red ball", "--out", str(out), "--quiet"]
    assert main(args) == 2
    assert "image-to-video" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--image", _image(tmp_path, w)]) == 0
    assert read_video(out).shape == (n, h, w, 3)


def test_make_tiny_i2v_of_a_family_without_one_is_explained(tmp_path, capsys):
    assert main(["make-tiny", "--family", "hunyuan_video", "--i2v", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--i2v" in err and "wan" in err and "ltx" in err


def test_image_on_a_text_to_video_ltx_names_the_fix(saved, tmp_path, capsys):
    args = ["generate", "--model", saved("ltx"), "--steps", "1", "--out", str(tmp_path / "x.mp4"),
            "--image", _image(tmp_path, 64)]
    assert main(args) == 2
    assert "LTXImageToVideoPipeline" in capsys.readouterr().err


def test_prompts_file_one_clip_per_line_with_seeds_and_latents(saved, tmp_path, capsys):
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red ball\n\n11\ta blue square\na red ball\n")
    out = tmp_path / "batch.mp4"
    args = ["generate", "--model", saved("wan"), "--steps", "2", "--seed", "5", "--prompts-file", str(prompts),
            "--out", str(out), "--save-latents", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    names = [tmp_path / f"batch_{i}.mp4" for i in range(3)]
    assert all(p.exists() and str(p) in printed for p in names)
    latents = [load_file(str(p).removesuffix(".mp4") + ".latents.safetensors")["latents"] for p in names]
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    # clip i without a seed uses --seed + i; 'SEED<TAB>PROMPT' sets its own
    for clip, (seed, prompt) in zip(latents, [(5, "a red ball"), (11, "a blue square"), (7, "a red ball")]):
        expected = pipe.generate(prompt, num_inference_steps=2, seed=seed, show_progress=False).latents
        torch.testing.assert_close(clip, expected, atol=1e-5, rtol=1e-5)
    assert (latents[0] - latents[2]).abs().max() > 1e-3  # same prompt, other seed


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "holds no prompts"), ("x\ta ball\n", "not an integer seed")],
)
def test_bad_prompts_file_is_explained(saved, tmp_path, capsys, text, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text(text)
    args = ["generate", "--model", saved("wan"), "--prompts-file", str(prompts), "--out", str(tmp_path / "o.mp4")]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "none.txt"), *args[5:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--prompt", "x"]) == 2
    assert "drop --prompt" in capsys.readouterr().err


def test_every_training_recipe_has_an_inference_recipe_loading_its_export():
    """configs/generate/<name>.yaml for each configs/<name>.yaml, loading that run's final/ export."""
    import pathlib

    from omegaconf import OmegaConf

    from longgen.cli import load_generate_config

    root = pathlib.Path(__file__).parents[1] / "configs"
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    for train in sorted(root.glob("*.yaml")):
        recipe = root / "generate" / train.name
        assert recipe.exists(), f"no inference recipe for {train.name}"
        values = load_generate_config(str(recipe), sub)
        final = OmegaConf.load(train).train.output_dir + "/final"
        sources = list(values.get("lora") or []) + ([values["transformer"]] if values.get("transformer") else [])
        assert sources and all(s.startswith(final) for s in sources), (recipe.name, sources, final)


def test_command_line_lora_replaces_the_configs(saved, tmp_path):
    import yaml

    from longgen.cli import apply_generate_config

    config = tmp_path / "g.yaml"
    config.write_text(yaml.safe_dump({"model": saved("wan"), "lora": "from/config.safetensors:0.5"}))
    parser = build_parser()
    args = apply_generate_config(parser, ["generate", "--config", str(config)])
    assert args.lora == ["from/config.safetensors:0.5"]
    args = apply_generate_config(build_parser(), ["generate", "--config", str(config), "--lora", "mine.safetensors"])
    assert args.lora == ["mine.safetensors"]


def test_generate_config_switches_take_true_false_yes_no(tmp_path):
    from longgen.cli import load_generate_config

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("quiet: yes\nlookahead: no\nrecache: true\n")
    assert load_generate_config(str(cfg), sub) == {"quiet": True, "lookahead": False, "recache": True}
    cfg.write_text("quiet: sometimes\n")
    with pytest.raises(ValueError, match="quiet: a switch takes true or false, got 'sometimes'"):
        load_generate_config(str(cfg), sub)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance", "nan"], "--guidance: must be a finite number, got 'nan'"),
        (["--guidance", "inf"], "--guidance: must be a finite number, got 'inf'"),
        (["--shift", "0"], "--shift: must be > 0, got 0.0"),
        (["--shift", "-1"], "--shift: must be > 0"),
        (["--shift", "nan"], "--shift: must be a finite number"),
        (["--fps", "inf"], "--fps: must be a finite number"),
        (["--eta", "nan"], "--eta: must be a finite number"),
        (["--lora", "some/dir:nan"], "is not a finite number"),
    ],
    ids=["guidance-nan", "guidance-inf", "shift-0", "shift-negative", "shift-nan", "fps-inf", "eta-nan", "lora-nan"],
)
def test_non_finite_numbers_are_refused_before_sampling(flags, message, saved, tmp_path, capsys):
    """nan / inf parse as floats; they used to sample garbage and report success (--guidance nan, --shift 0)."""
    out = tmp_path / "x.mp4"
    argv = ["generate", "--model", saved("wan"), "--prompt", "a cat", "--num-frames", "9", "--steps", "2",
            "--out", str(out), *flags]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusal of a flag's value
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("rm:vae", "is incomplete: vae/ is missing (listed in model_index.json)"),
        ("rm:transformer/config.json", "is incomplete: transformer/config.json is missing"),
        ("cut:transformer/diffusion_pytorch_model.safetensors", "could not be loaded (Unable to load weights"),
    ],
    ids=["no-vae", "no-config", "truncated-weights"],
)
def test_a_damaged_model_folder_is_explained(damage, message, saved, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(saved("wan"), model)
    action, name = damage.split(":")
    target = model / name
    if action == "rm":
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:1000])
    for argv in (["info", "--model", str(model)],
                 ["generate", "--model", str(model), "--prompt", "x", "--num-frames", "9", "--steps", "2",
                  "--out", str(tmp_path / "x.mp4")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_target_frames_and_a_lora_folder_as_transformer_name_their_flags(saved, tmp_path, capsys):
    base = ["generate", "--model", saved("wan"), "--prompt", "x", "--num-frames", "9", "--steps", "2",
            "--out", str(tmp_path / "x.mp4")]
    assert main([*base, "--extension", "pi", "--target-frames", "10"]) == 2
    assert "--target-frames 10: wan needs num_frames = 4k+1" in capsys.readouterr().err
    lora_run = tmp_path / "final"
    lora_run.mkdir()
    (lora_run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert main([*base, "--transformer", str(lora_run)]) == 2
    assert f"holds LoRA weights, not a full model: load them with --lora {lora_run}" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_make_tiny_refuses_to_overwrite_a_folder_with_files(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "my_weights.safetensors").write_bytes(b"keep me")
    assert main(["make-tiny", "--out", str(folder)]) == 2
    assert "already holds files: pass --overwrite" in capsys.readouterr().err
    assert (folder / "my_weights.safetensors").read_bytes() == b"keep me"
    assert main(["make-tiny", "--out", str(folder), "--overwrite"]) == 0
    assert (folder / "model_index.json").is_file() and not (folder / "my_weights.safetensors").exists()
