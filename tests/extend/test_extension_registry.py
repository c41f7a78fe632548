"""The extension registry: one spec per extension read by the pipeline, the CLI and checkpoint metadata."""

import ast
import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import longgen
from longgen.backbones import build_tiny
from longgen.cli import build_parser, extension_options_from_args
from longgen.extend import registry
from longgen.extend.registry import (
    ExtensionSpec,
    apply_extension,
    extension_from_metadata,
    extension_names,
    get_extension,
    register_extension,
)
from longgen.pipeline import LongVideoPipeline

ROOT = pathlib.Path(longgen.__file__).parent


def _denoise(adapter, cond, frames):
    h, w = (s // adapter.spatial_compression for s in adapter.native_video_size[1:])
    x = torch.randn(1, adapter.latent_channels, frames, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return adapter.denoise(x, torch.linspace(0.9, 0.4, frames)[None], cond)


def test_the_registry_imports_no_torch_until_an_extension_is_applied():
    code = (
        "import sys\nfrom longgen.extend.registry import extension_names, extension_option_fields\n"
        "assert extension_names()[0] == 'pi' and extension_option_fields('exvideo')\n"
        "bad = [m for m in ('torch', 'diffusers', 'peft') if m in sys.modules]\nassert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from longgen.extend.exvideo import exvideo_trainable_parameters
    from longgen.extend.rope import remove_rope_extension

    assert get_extension("exvideo").trainable_parameters.resolve() is exvideo_trainable_parameters
    assert get_extension("riflex").remove.resolve() is remove_rope_extension
    with pytest.raises(ValueError, match="'module:function'"):
        ExtensionSpec("bad", get_extension("pi").config_cls, "no_colon", "m:f", "bad")


def test_names_specs_and_unknown_names():
    assert extension_names() == ["pi", "ntk", "yarn", "riflex", "fusion", "spectral", "exvideo", "block-causal",
                                 "cache", "sparse"]
    for name in extension_names():
        spec = get_extension(name)
        assert dataclasses.is_dataclass(spec.config_cls) and spec.description
        assert spec.sets_window == spec.needs_target_frames  # the extensions that extend positions
    assert get_extension("exvideo").trainable_parameters is not None
    with pytest.raises(ValueError, match="unknown extension 'freeinit'; choose one of: pi, ntk, yarn, riflex"):
        get_extension("freeinit")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['beta_fast'\]"):
        apply_extension(build_tiny("wan"), "riflex", {"target_latent_frames": 9, "beta_fast": 2.0})
    with pytest.raises(ValueError, match=r"needs target_latent_frames \(--target-frames\)"):
        apply_extension(build_tiny("wan"), "pi")


def test_describe_is_json_and_metadata_rebuilds_the_same_extension():
    adapter = build_tiny("wan")
    cond, _ = adapter.encode_prompt(["a ball"], do_classifier_free_guidance=False)
    stock = _denoise(adapter, cond, 9)
    handle = apply_extension(adapter, "riflex", {"target_latent_frames": 9})
    meta = json.loads(json.dumps(handle.describe()))  # what longgen_extension.json stores
    assert meta["method"] == "riflex" and meta["options"]["target_latent_frames"] == 9
    assert meta["details"]["riflex_k"] == 1
    extended = _denoise(adapter, cond, 9)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(_denoise(adapter, cond, 9), stock)
    with extension_from_metadata(adapter, meta) as again:
        assert torch.equal(_denoise(adapter, cond, 9), extended) and again.describe() == meta
    # the trainer's metadata shape: lengths at the top level, method options under "options"
    trainer = {"method": "yarn", "train_latent_frames": 3, "target_latent_frames": 9, "options": {"beta_fast": 3.0}}
    with extension_from_metadata(adapter, trainer) as yarn:
        assert yarn.config.beta_fast == 3.0 and yarn.state.train_latent_frames == 3
    assert torch.equal(_denoise(adapter, cond, 9), stock)


def test_training_applies_the_trained_form_and_metadata_keeps_it():
    adapter = build_tiny("wan")  # tiny Wan: N_k = 6; a 6-frame target is stock RoPE training-free
    with apply_extension(adapter, "riflex", {"target_latent_frames": 6}) as free:
        assert free.config.finetune is False and torch.equal(free.state.frequencies, free.state.stock_frequencies)
    with apply_extension(adapter, "riflex", {"target_latent_frames": 6}, training=True) as trained:
        meta = json.loads(json.dumps(trained.describe()))
        assert meta["options"]["finetune"] is True
    with extension_from_metadata(adapter, meta) as again:  # inference of the trained checkpoint
        assert again.config.finetune is True and not torch.equal(again.state.frequencies, again.state.stock_frequencies)
    unet = build_tiny("animatediff")
    with apply_extension(unet, "exvideo", {"target_latent_frames": 32}, training=True) as ex:
        trainable = ex.trainable_parameters()
        assert trainable and all(p.requires_grad for p in trainable)
        assert sum(p.requires_grad for p in unet.model.parameters()) == len(trainable)
    assert all(p.requires_grad for p in unet.model.parameters())  # removal restores requires_grad


def test_a_new_extension_is_one_registration():
    """A toy extension registered once shows up in the pipeline and the CLI (flags from its config fields)."""

    @dataclasses.dataclass(frozen=True)
    class ScaleConfig:
        factor: float = dataclasses.field(default=2.0, metadata={"help": "output multiplier"})

    calls = []
    spec = ExtensionSpec(
        name="toyscale",
        config_cls=ScaleConfig,
        apply=lambda adapter, cfg: calls.append(("apply", cfg.factor)),
        remove=lambda adapter: calls.append(("remove",)),
        description="a toy",
    )
    register_extension(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_extension(dataclasses.replace(spec, description="another"))
        pipe = LongVideoPipeline(build_tiny("wan"))
        handle = pipe.apply_extension("toyscale", factor=3.0)
        assert pipe.window_latent_frames is None and handle.describe()["options"] == {"factor": 3.0}
        pipe.remove_extensions()
        assert calls == [("apply", 3.0), ("remove",)]
        args = build_parser().parse_args(
            ["generate", "--model", "m", "--extension", "toyscale", "--toyscale-factor", "4"]
        )
        assert extension_options_from_args(args) == {"factor": 4.0}
    finally:
        registry._REGISTRY.pop("toyscale")


def test_cli_flags_come_from_the_config_fields():
    parser = build_parser()
    args = parser.parse_args(
        ["generate", "--model", "m", "--extension", "riflex", "--riflex-k", "2", "--riflex-finetune"]
    )
    assert extension_options_from_args(args) == {"k": 2, "finetune": True}
    args = parser.parse_args(["generate", "--model", "m", "--extension", "riflex", "--fusion-window", "4"])
    with pytest.raises(ValueError, match="--fusion-window is an option of --extension fusion"):
        extension_options_from_args(args)
    args = parser.parse_args(["generate", "--model", "m", "--extension", "exvideo", "--no-exvideo-positional-conv"])
    assert extension_options_from_args(args) == {"positional_conv": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "m", "--exvideo-set-trainable"])  # training only


def _imports(path: pathlib.Path) -> set[str]:
    """Sibling modules of longgen/extend a module imports (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
    return out


def test_no_import_circle_in_extend():
    graph = {p.stem: _imports(p) for p in (ROOT / "extend").glob("*.py") if p.stem != "__init__"}

    def visit(node, stack):
        assert node not in stack, f"import circle: {' -> '.join([*stack, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])

    for module in graph:
        visit(module, [])


def test_no_adapter_probes_and_no_family_tables_outside_backbones():
    probe = re.compile(r"(hasattr|getattr)\((self\.)?adapter\b")
    tables = re.compile(r"\b(FRAME_ATTENTION_FAMILIES|DIT_WINDOW_FAMILIES|EXVIDEO_FAMILIES)\b")
    for path in [*(ROOT / "extend").glob("*.py"), ROOT / "pipeline.py", *(ROOT / "samplers").glob("*.py")]:
        text = path.read_text()
        assert not probe.search(text), f"{path}: probes the adapter; check a capability type instead"
        assert not tables.search(text), f"{path}: a family table; ask backbones.families_with"


def test_cli_extension_flag_reaches_the_model(saved, tmp_path, caplog, monkeypatch):
    """``--extension fusion --fusion-window 2`` applies fusion with that window (the logged description)."""
    from longgen.cli import main
    from longgen.io import video_info

    out = tmp_path / "f.mp4"
    argv = ["generate", "--model", saved("animatediff"), "--num-frames", "16", "--steps", "1", "--out", str(out),
            "--quiet", "--extension", "fusion", "--fusion-window", "2", "--fusion-stride", "1"]
    with caplog.at_level("INFO", logger="longgen"):
        assert main(argv) == 0
    described = next(json.loads(r.getMessage().split("extension ", 1)[1]) for r in caplog.records
                     if r.getMessage().startswith("extension "))
    assert described["options"] == {"window": 2, "stride": 1} and described["details"]["window"] == 2
    assert video_info(out)["num_frames"] == 16
    bad = [*argv[:-6], "--extension", "riflex", "--fusion-window", "2"]
    assert main(bad) == 2  # a flag of another extension: a clear error, no traceback


def test_pipeline_refuses_an_extension_twice_and_a_target_shorter_than_native():
    pipe = LongVideoPipeline(build_tiny("wan"))
    stock = {k: v.clone() for k, v in pipe.adapter.model.state_dict().items()}
    with pytest.raises(ValueError, match="shorter than the model's native 9 frames"):
        pipe.apply_extension("riflex", target_num_frames=5)
    pipe.apply_extension("riflex", target_num_frames=33)
    with pytest.raises(ValueError, match="'riflex' is already applied: call pipe.remove_extensions"):
        pipe.apply_extension("riflex", target_num_frames=33)
    with pytest.raises(ValueError, match=r"applied already: riflex; pipe.remove_extensions\(\) removes them"):
        pipe.apply_extension("pi", target_num_frames=33)
    pipe.remove_extensions()
    assert all(torch.equal(v, stock[k]) for k, v in pipe.adapter.model.state_dict().items())
    pipe.apply_extension("pi", target_num_frames=33).remove()
