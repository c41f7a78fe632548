"""The sampler registry drives the pipeline, `longgen generate` flags / --help and configs (issue 10, item 1)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from longgen.cli import build_parser, main
from longgen.io import video_info
from longgen.pipeline import LongVideoPipeline
from longgen.samplers import (
    SamplerContext,
    SamplerSpec,
    get_sampler,
    register_sampler,
    sampler_names,
    unregister_sampler,
)
from longgen.samplers.builtin import df_model_call_lengths

CALLS: list[dict] = []


# --- a throwaway sampler: one function, one knob dataclass, one register call ---------------------------
def sample_halving(denoise, noise, sigmas, *, strength: float, disable=None):
    """Plain Euler steps whose x0 is scaled by ``strength`` (a test sampler)."""
    CALLS.append({"strength": strength, "steps": len(sigmas) - 1})
    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        x0 = strength * denoise(x, sigmas[i].expand(x.shape[0], x.shape[2]))
        x = x0 + (x - x0) * (sigmas[i + 1] / sigmas[i])
    return x


@dataclasses.dataclass(frozen=True)
class HalvingKnobs:
    strength: float = dataclasses.field(default=1.0, metadata={"help": "halving: x0 scale"})

    def __post_init__(self):
        if self.strength <= 0:
            raise ValueError(f"--strength must be > 0, got {self.strength}")


@pytest.fixture
def halving():
    register_sampler(SamplerSpec("halving", sample_halving, HalvingKnobs, description="a throwaway test sampler"))
    CALLS.clear()
    yield
    unregister_sampler("halving")


def test_a_registered_sampler_runs_from_the_cli_with_its_knob(halving, saved, tmp_path):
    out = tmp_path / "h.mp4"
    argv = ["generate", "--model", saved("wan"), "--sampler", "halving", "--strength", "0.5", "--steps", "2",
            "--num-frames", "13", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert CALLS == [{"strength": 0.5, "steps": 2}]
    assert video_info(out)["num_frames"] == 13


def test_registry_drives_help_and_choices(halving, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help text wraps at the terminal width
    assert "halving: a throwaway test sampler" in text
    assert "--strength" in text and "(samplers: halving)" in text
    assert "(samplers: sliding, fifo)" in text  # a knob shared by name is one flag
    assert text.count("(default: full)") == 1
    assert "(default: fifo)" not in text
    for name in sampler_names():
        assert name in text


def test_a_knob_of_another_sampler_is_rejected_by_name(halving, saved, tmp_path, capsys):
    argv = ["generate", "--model", saved("wan"), "--sampler", "full", "--strength", "2", "--out", str(tmp_path / "x.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sampler 'full' takes no option(s) ['strength']" in err and "--eta" in err
    assert main([*argv[:4], "halving", "--strength", "-1", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "--strength must be > 0" in capsys.readouterr().err


def test_duplicate_and_unknown_names_are_clear_errors(halving):
    with pytest.raises(ValueError, match="already registered"):
        register_sampler(SamplerSpec("halving", sample_halving, HalvingKnobs))
    with pytest.raises(ValueError, match=r"did you mean 'sliding'\?.*choose one of: full, sliding"):
        get_sampler("slidng")
    with pytest.raises(TypeError, match="dataclass"):
        SamplerSpec("bad", sample_halving, dict)


def test_knob_with_clashing_type_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        window: str = "x"

    with pytest.raises(ValueError, match="different type"):
        register_sampler(SamplerSpec("clash", sample_halving, Clash))
    assert "clash" not in sampler_names()


def test_building_the_parser_imports_no_torch():
    code = (
        "import sys\nfrom longgen.cli import build_parser\nbuild_parser(['generate', '--help'])\n"
        "bad = [m for m in ('torch', 'diffusers', 'peft') if m in sys.modules]\nassert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_defaults_come_from_the_specs():
    ctx = SamplerContext(default_window=3, num_latent_frames=12, requested_steps=None, default_steps=7)
    fifo = get_sampler("fifo")
    knobs = fifo.resolve(fifo.make_knobs({}), ctx)
    assert knobs.window == 2 and fifo.num_steps(knobs, ctx) == 8  # even window, 4 partitions * 2
    with pytest.raises(ValueError, match="num_partitions \\* window = 8"):
        fifo.num_steps(knobs, dataclasses.replace(ctx, requested_steps=5))
    sliding = get_sampler("sliding")
    assert sliding.resolve(sliding.make_knobs({}), ctx).stride == 1
    assert get_sampler("full").num_steps(get_sampler("full").make_knobs({}), ctx) == 7
    df = get_sampler("df")
    assert df.resolve(df.make_knobs({}), ctx).overlap_history == 1
    assert df.resolve(df.make_knobs({"ar_step": 2}), ctx).overlap_history is None  # one rolling pyramid


def test_df_chunk_lengths_mirror_the_sampler():
    import longgen.samplers.diffusion_forcing as dfm

    seen = []

    def denoise(x, sigma, frame_offset=0):
        seen.append((frame_offset, x.shape[2]))
        return torch.zeros_like(x)

    dfm.sample_diffusion_forcing(denoise, torch.randn(1, 1, 11, 1, 1), torch.linspace(1, 0, 3),
                                 base_num_latent_frames=5, overlap_history=2, disable=True)
    assert sorted({n for _, n in seen}) == sorted(set(df_model_call_lengths(11, 5, 2)))


def test_df_with_a_block_causal_model_refuses_partial_blocks_before_any_model_call(saved):
    pipe = LongVideoPipeline.from_pretrained(saved("skyreels_v2"))
    calls = []
    denoise = pipe.adapter.denoise
    pipe.adapter.denoise = lambda *a, **k: calls.append(1) or denoise(*a, **k)
    options = {"causal_block_size": 2, "base_num_latent_frames": 4, "overlap_history": 2}
    latent = pipe.adapter.num_latent_frames
    bad = pipe.adapter.num_pixel_frames(7)  # chunks of 4, then 4 - 2 + 3 = a chunk of 3 + ...
    with pytest.raises(ValueError, match="--num-frames") as err:
        pipe.generate("x", sampler="df", num_frames=bad, sampler_options=options, num_inference_steps=2,
                      show_progress=False)
    assert calls == []
    suggested = int(str(err.value).split("--num-frames ")[2].split()[0])
    assert latent(suggested) != 7
    result = pipe.generate("x", sampler="df", num_frames=suggested, sampler_options=options,
                           num_inference_steps=2, show_progress=False)
    assert result.num_frames == suggested


@pytest.mark.parametrize("flag", ["--steps", "--num-frames", "--height", "--width", "--fps", "--decode-chunk"])
def test_non_positive_sizes_are_refused_by_name(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "m", flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be > 0" in capsys.readouterr().err


def test_api_refuses_zero_sizes(saved):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    for key in ("num_frames", "height", "width", "num_inference_steps", "fps"):
        with pytest.raises(ValueError, match=f"{key} .* must be > 0"):
            pipe.generate("x", **{key: 0})


def test_a_prompt_list_writes_one_clip_per_sample(saved, tmp_path):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    result = pipe.generate(["a red ball", "a blue cube"], num_inference_steps=2, output_path=tmp_path / "b.mp4",
                           show_progress=False)
    assert result.paths == [str(tmp_path / "b_0.mp4"), str(tmp_path / "b_1.mp4")]
    assert not (tmp_path / "b.mp4").exists()
    for path in result.paths:
        assert video_info(path)["num_frames"] == result.num_frames
    assert result.latents.shape[0] == 2


def test_config_errors_name_file_line_and_closest_key(saved, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {saved('wan')}\nsampler: [df\n")
    assert main(["generate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "not valid YAML" in err and "Traceback" not in err
    bad.write_text(f"model: {saved('wan')}\nar_stepp: 2\n")
    assert main(["generate", "--config", str(bad)]) == 2
    assert "did you mean 'ar-step'?" in capsys.readouterr().err
    bad.write_text(f"model: {saved('wan')}\nsteps: 0\n")
    assert main(["generate", "--config", str(bad)]) == 2
    assert "steps: must be > 0" in capsys.readouterr().err
    bad.write_text(f"model: {saved('wan')}\nsampler: magic\n")
    assert main(["generate", "--config", str(bad)]) == 2
    assert "'magic' is not one of full, sliding" in capsys.readouterr().err


def test_every_subcommand_help_is_reachable(capsys):
    for command in ("precompute", "inspect-rope"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser(["--help"]).parse_args(["--help"])
    assert "precompute" in capsys.readouterr().out


def test_non_streaming_progress_shows_steps_then_decoding(saved, tmp_path, capsys):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    capsys.readouterr()
    pipe.generate("x", sampler="sliding", num_frames=21, num_inference_steps=2, output_path=tmp_path / "p.mp4")
    err = capsys.readouterr().err
    assert "denoising (sliding)" in err  # (its last step may not be drawn: tqdm throttles redraws)
    assert err.index("denoising (sliding)") < err.index("decoding")  # no frame bar waiting at 0 while sampling
    assert "sliding: frames" not in err


def test_knob_values_are_checked_and_converted_by_type():
    """A bool knob used to run any string as True ('no' too, which YAML 1.2 configs now keep as a string), and a
    wrong type failed deep inside the sampler."""
    from longgen.samplers.registry import get_sampler

    assert get_sampler("fifo").make_knobs({"lookahead": "no"}).lookahead is False
    assert get_sampler("causal").make_knobs({"recache": "yes"}).recache is True
    assert get_sampler("sliding").make_knobs({"window": "2", "eta": "0.5"}).window == 2
    assert get_sampler("sliding").make_knobs({"window": 2.0}).window == 2
    for sampler, options, message in [
        ("fifo", {"lookahead": "maybe"}, "lookahead is true or false, got 'maybe'"),
        ("sliding", {"window": 2.5}, "window is an integer, got 2.5"),
        ("sliding", {"window": True}, "window is an integer, got True"),
        ("causal", {"chunk_size": "three"}, "chunk_size is an integer"),
        ("sliding", {"eta": float("nan")}, "eta must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=f"sampler '{sampler}': {message}"):
            get_sampler(sampler).make_knobs(options)
