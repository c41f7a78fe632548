"""longgen convert: original-layout (Self-Forcing / CausVid / LongLive) Wan checkpoints -> diffusers folders.

The original layout is produced here by an inverse mapping written independently of longgen/convert.py
(hand-listed from Wan2.1's wan/modules/model.py), so a wrong rename in either direction changes the outputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from diffusers import WanTransformer3DModel

from longgen.convert import (
    CAUSAL_CONFIG_NAME,
    LORA_WEIGHT_NAME,
    PRESETS,
    add_convert_arguments,
    convert_wan_checkpoint,
    run_convert,
)

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=12,
    freq_dim=16,
    ffn_dim=24,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
)

# diffusers module -> original Wan module (WanModel / CausalWanModel attribute names).
TOP = {
    "scale_shift_table": "head.modulation",
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
}
BLOCK = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # Wan's affine cross-attention norm
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
LINEARS = [
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
]


class NotATensor:
    """A custom object: a file holding one needs full unpickling."""


def to_original(key: str) -> str:
    """Hand-written inverse of the diffusers naming."""
    if key.startswith("blocks."):
        _, idx, rest = key.split(".", 2)
        for new, orig in BLOCK.items():
            if rest == new or rest.startswith(new + "."):
                return f"blocks.{idx}.{orig}{rest[len(new) :]}"
    for new, orig in TOP.items():
        if key == new or key.startswith(new + "."):
            return orig + key[len(new) :]
    raise AssertionError(f"test table lacks {key}")


def to_diffusers_module(orig: str) -> str:
    idx, rest = orig.split(".", 2)[1:]
    return f"blocks.{idx}." + {v: k for k, v in BLOCK.items()}[rest]


def tiny_model(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # every parameter random: norms left at ones/zeros would hide a swapped rename
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def original_layout(model, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {prefix + to_original(k): v.clone() for k, v in model.state_dict().items()}


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 12, generator=g),
    )


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v.to(model.dtype) for k, v in inputs().items()}, return_dict=False)[0]


def release(tmp_path, ema, gen, name="release.pt"):
    path = tmp_path / name
    torch.save(
        {
            "generator": original_layout(gen),
            "critic": original_layout(tiny_model(9)),
            "generator_ema": original_layout(ema),
        },
        path,
    )
    return path


def test_release_entries_convert_exactly(tmp_path):
    ema, gen = tiny_model(1), tiny_model(2)
    src = release(tmp_path, ema, gen)
    out = convert_wan_checkpoint(src, tmp_path / "sf", head_dim=8)
    loaded = WanTransformer3DModel.from_pretrained(out)
    assert torch.equal(run(loaded), run(ema))
    assert not torch.equal(run(loaded), run(gen))
    for key in ("num_layers", "ffn_dim", "text_dim", "freq_dim", "num_attention_heads", "in_channels"):
        assert loaded.config[key] == TINY[key], key
    causal = json.loads((out / CAUSAL_CONFIG_NAME).read_text())
    assert causal["chunk_size"] == 3 and causal["denoising_steps"] == [1000, 750, 500, 250]
    assert causal["entry"] == "generator_ema" and causal["sink_size"] == 0 and causal["local_attn_size"] == -1

    out2 = convert_wan_checkpoint(src, tmp_path / "gen", entry="generator", preset="longlive", head_dim=8)
    assert torch.equal(run(WanTransformer3DModel.from_pretrained(out2)), run(gen))
    causal = json.loads((out2 / CAUSAL_CONFIG_NAME).read_text())
    assert (causal["sink_size"], causal["local_attn_size"], causal["method"]) == (3, 12, "longlive")


def test_plain_state_dicts_safetensors_and_raw_wan(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(3)
    raw = tmp_path / "raw.safetensors"  # raw Wan original checkpoint: no "model." prefix
    save_file(original_layout(model, prefix=""), str(raw))
    assert torch.equal(
        run(WanTransformer3DModel.from_pretrained(convert_wan_checkpoint(raw, tmp_path / "a", head_dim=8))),
        run(model),
    )
    plain = tmp_path / "plain.pt"  # a plain wrapper state dict, no entries
    torch.save(original_layout(model), plain)
    assert torch.equal(
        run(WanTransformer3DModel.from_pretrained(convert_wan_checkpoint(plain, tmp_path / "b", head_dim=8))),
        run(model),
    )


def test_base_config_folder_and_mismatch(tmp_path):
    model = tiny_model(4)
    model.save_pretrained(tmp_path / "base")
    src = release(tmp_path, model, model)
    out = convert_wan_checkpoint(src, tmp_path / "c", base_config=tmp_path / "base")  # head_dim from config
    assert torch.equal(run(WanTransformer3DModel.from_pretrained(out)), run(model))
    with pytest.raises(ValueError, match=r"num_layers: base config 3, checkpoint 2"):
        convert_wan_checkpoint(src, tmp_path / "d", base_config={**TINY, "num_layers": 3})
    with pytest.raises(ValueError, match="--head-dim"):
        convert_wan_checkpoint(src, tmp_path / "e", head_dim=128)  # dim 16 is not a multiple of 128
    with pytest.raises(FileNotFoundError, match="no transformer config"):
        convert_wan_checkpoint(src, tmp_path / "f", base_config=tmp_path / "nowhere")


def test_file_needing_full_unpickling_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"generator_ema": original_layout(tiny_model(5)), "meta": NotATensor()}, path)
    with pytest.raises(ValueError, match="needs full unpickling"):
        convert_wan_checkpoint(path, tmp_path / "out", head_dim=8)
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "notes.txt").write_text("hi\n")  # torch's loader raised a bare KeyError on this
    torch.save({"generator_ema": original_layout(tiny_model(5))}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])  # a truncated download
    for junk in ("junk.pt", "junk.safetensors", "notes.txt", "cut.pt"):
        with pytest.raises(ValueError, match="not a readable"):
            convert_wan_checkpoint(tmp_path / junk, tmp_path / "out", head_dim=8)
    assert not (tmp_path / "out").exists()


def test_unknown_missing_keys_and_entries_are_named(tmp_path):
    sd = original_layout(tiny_model(6))
    extra = dict(sd, **{"model.blocks.0.lookahead.weight": torch.zeros(2)})
    torch.save({"generator_ema": extra}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unknown keys .*blocks\.0\.lookahead\.weight"):
        convert_wan_checkpoint(tmp_path / "extra.pt", tmp_path / "o1", head_dim=8)
    short = {k: v for k, v in sd.items() if k != "model.blocks.1.ffn.2.bias"}
    torch.save({"generator_ema": short}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"missing keys \(original names\): blocks\.1\.ffn\.2\.bias"):
        convert_wan_checkpoint(tmp_path / "short.pt", tmp_path / "o2", head_dim=8)
    torch.save({"generator": sd, "critic": sd}, tmp_path / "noema.pt")
    with pytest.raises(ValueError, match=r"no entry 'generator_ema'; entries: critic, generator.*--entry"):
        convert_wan_checkpoint(tmp_path / "noema.pt", tmp_path / "o3", head_dim=8)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        convert_wan_checkpoint(tmp_path / "absent.pt", tmp_path / "o4", head_dim=8)
    diffusers_sd = tiny_model(6).state_dict()
    torch.save(diffusers_sd, tmp_path / "diffusers.pt")
    with pytest.raises(ValueError, match="already in the diffusers layout"):
        convert_wan_checkpoint(tmp_path / "diffusers.pt", tmp_path / "o5", head_dim=8)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.is_dir())


def make_lora(rank: int = 4, seed: int = 7) -> dict[str, torch.Tensor]:
    """PEFT get_peft_model_state_dict keys of a CausalWanModel LoRA (LongLive: every block Linear)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(TINY["num_layers"]):
        for name in LINEARS:
            out_f, in_f = {"ffn.0": (24, 16), "ffn.2": (16, 24)}.get(name, (16, 16))
            sd[f"base_model.model.blocks.{i}.{name}.lora_A.weight"] = (
                torch.randn(rank, in_f, generator=g) * 0.2
            )
            sd[f"base_model.model.blocks.{i}.{name}.lora_B.weight"] = (
                torch.randn(out_f, rank, generator=g) * 0.2
            )
    return sd


def merged_by_hand(model, lora, scale: float):
    merged = tiny_model(0)
    merged.load_state_dict(model.state_dict())
    sd = merged.state_dict()
    for key in (k for k in lora if k.endswith("lora_A.weight")):
        orig = key[len("base_model.model.") : -len(".lora_A.weight")]
        w = f"{to_diffusers_module(orig)}.weight"
        sd[w] = sd[w] + scale * lora[key.replace("lora_A", "lora_B")] @ lora[key]
    merged.load_state_dict(sd)
    return merged


def test_lora_converts_for_diffusers_and_merges(tmp_path):
    from diffusers.loaders import WanLoraLoaderMixin

    base, lora = tiny_model(8), make_lora(rank=4)
    src = release(tmp_path, base, base)
    torch.save({"generator_lora": lora, "critic_lora": make_lora(rank=4, seed=1)}, tmp_path / "lora.pt")
    expected = run(merged_by_hand(base, lora, scale=8 / 4))
    assert not torch.allclose(expected, run(base), atol=1e-3)

    with pytest.raises(ValueError, match="no entry 'nope'.*Fix: pass --lora-entry NAME"):
        convert_wan_checkpoint(src, tmp_path / "bad", entry="generator", preset="longlive", head_dim=8,
                               lora=tmp_path / "lora.pt", lora_entry="nope", lora_alpha=8)
    out = convert_wan_checkpoint(
        src,
        tmp_path / "ll",
        entry="generator",
        preset="longlive",
        head_dim=8,
        lora=tmp_path / "lora.pt",
        lora_alpha=8,
    )
    transformer = WanTransformer3DModel.from_pretrained(out)
    state = WanLoraLoaderMixin.lora_state_dict(str(out / LORA_WEIGHT_NAME))
    assert all(k.startswith("transformer.") for k in state) and len(state) == 2 * 2 * len(LINEARS)
    transformer.load_lora_adapter(state, prefix="transformer")
    torch.testing.assert_close(run(transformer), expected, atol=1e-5, rtol=1e-5)

    merged = convert_wan_checkpoint(
        src,
        tmp_path / "m",
        entry="generator",
        preset="longlive",
        head_dim=8,
        lora=tmp_path / "lora.pt",
        lora_alpha=8,
        merge_lora=True,
    )
    assert not (merged / LORA_WEIGHT_NAME).exists()
    torch.testing.assert_close(
        run(WanTransformer3DModel.from_pretrained(merged)), expected, atol=1e-5, rtol=1e-5
    )
    causal = json.loads((merged / CAUSAL_CONFIG_NAME).read_text())
    assert causal["lora_merged"] is True and causal["lora_rank"] == [4]

    bad = dict(lora, **{"base_model.model.blocks.0.norm1.lora_A.weight": torch.zeros(4, 16)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"norm1"):
        convert_wan_checkpoint(src, tmp_path / "x", entry="generator", head_dim=8, lora=tmp_path / "bad.pt")


def test_atomic_write_and_overwrite(tmp_path, monkeypatch):
    model = tiny_model(10)
    src = release(tmp_path, model, model)
    out = convert_wan_checkpoint(src, tmp_path / "out", head_dim=8)
    with pytest.raises(ValueError, match="--overwrite"):
        convert_wan_checkpoint(src, out, head_dim=8)

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(WanTransformer3DModel, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_wan_checkpoint(src, tmp_path / "partial", head_dim=8)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_wan_checkpoint(src, out, head_dim=8, overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "release.pt"]  # no temp folders left
    assert torch.equal(run(WanTransformer3DModel.from_pretrained(out)), run(model))  # old folder intact
    convert_wan_checkpoint(src, out, head_dim=8, overwrite=True, preset="causvid")
    assert json.loads((out / CAUSAL_CONFIG_NAME).read_text())["denoising_steps"] == [1000, 757, 522]


def test_cli_functions(tmp_path, capsys):
    model = tiny_model(11)
    src = release(tmp_path, model, model)
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    args = parser.parse_args(
        [
            str(src),
            "--out",
            str(tmp_path / "cli"),
            "--head-dim",
            "8",
            "--preset",
            "causvid",
            "--entry",
            "generator_ema",
            "--dtype",
            "bf16",
        ]
    )
    assert run_convert(args) == 0
    printed = capsys.readouterr().out
    assert "config.json" in printed and CAUSAL_CONFIG_NAME in printed
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "cli" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    assert all(torch.equal(stored[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "cli" / CAUSAL_CONFIG_NAME).read_text())["method"] == "causvid"
    # the preset picks the default entry: causvid reads 'generator', which this file has
    args = parser.parse_args(
        [str(src), "--out", str(tmp_path / "cli2"), "--head-dim", "8", "--preset", "causvid"]
    )
    assert run_convert(args) == 0
    assert PRESETS["causvid"]["entry"] == "generator"


def test_module_imports_without_torch():
    code = "import sys, longgen.convert; assert 'torch' not in sys.modules, 'torch imported at top level'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pipeline_output_loads_as_a_wan_pipeline(tmp_path, saved):
    from diffusers import DiffusionPipeline

    base = saved("wan")
    config = WanTransformer3DModel.load_config(f"{base}/transformer")
    torch.manual_seed(12)
    model = WanTransformer3DModel.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = {"model." + to_original(k): v for k, v in model.state_dict().items()}
    torch.save({"generator_ema": sd, "generator": sd}, tmp_path / "sf.pt")
    out = convert_wan_checkpoint(
        tmp_path / "sf.pt", tmp_path / "pipe", pipeline=base
    )  # head_dim from its config
    assert (out / "vae").is_symlink() and not (out / "transformer").is_symlink()
    assert json.loads((out / CAUSAL_CONFIG_NAME).read_text())["chunk_size"] == 3
    assert (out / "transformer" / CAUSAL_CONFIG_NAME).is_file()
    pipe = DiffusionPipeline.from_pretrained(out)
    # reference: diffusers' own save/load of the model (a freshly built one differs by ~2e-6 at this size)
    model.save_pretrained(tmp_path / "ref")
    model = WanTransformer3DModel.from_pretrained(tmp_path / "ref").eval()
    shape = dict(
        hidden_states=torch.randn(1, config["in_channels"], 2, 4, 4),
        timestep=torch.tensor([300.0]),
        encoder_hidden_states=torch.randn(1, 5, config["text_dim"]),
    )
    with torch.no_grad():
        assert torch.equal(
            pipe.transformer(**shape, return_dict=False)[0], model(**shape, return_dict=False)[0]
        )
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        convert_wan_checkpoint(tmp_path / "sf.pt", tmp_path / "p2", pipeline=tmp_path)


def test_inferred_config_of_wan21_1_3b_shapes():
    """The real release shapes (meta tensors, no memory): inference gives diffusers' Wan2.1-T2V-1.3B config."""
    from longgen.convert import infer_transformer_config, strip_wrapper_prefix

    wan_1_3b = dict(
        patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
        rope_max_seq_len=1024, pos_embed_seq_len=None,
    )  # fmt: skip
    with torch.device("meta"):
        model = WanTransformer3DModel(**wan_1_3b)
    original = strip_wrapper_prefix({"model." + to_original(k): v for k, v in model.state_dict().items()})
    assert infer_transformer_config(original) == wan_1_3b


def test_recipes_match_presets():
    import pathlib

    import yaml

    folder = pathlib.Path(__file__).parents[1] / "configs" / "generate"
    for name, preset in PRESETS.items():
        recipe = yaml.safe_load((folder / f"{name}.yaml").read_text())
        steps = [int(s) for s in str(recipe["denoising-steps"]).split(",")]
        assert steps == preset["denoising_steps"] and recipe["steps"] == len(steps), name
        assert recipe["chunk-size"] == preset["chunk_size"], name
        assert recipe["warp-denoising-step"] == preset["warp_denoising_step"], name
        assert recipe["timestep-shift"] == preset["timestep_shift"], name
        assert recipe["sink-size"] == preset["sink_size"], name
        assert recipe["local-attn-size"] == preset["local_attn_size"], name
        assert recipe["context-noise"] == preset["context_noise"], name
        assert recipe["guidance"] == preset["guidance_scale"], name
        assert recipe["sampler"] == "causal", name


def test_i2v_and_flf2v_keys_roundtrip():
    """Every key of an image-to-video (CLIP projection, k_img/v_img, FLF position embedding) model maps back."""
    from longgen.convert import diffusers_key_to_original, original_key_to_diffusers

    cfg = dict(TINY, image_dim=20, added_kv_proj_dim=16, pos_embed_seq_len=6)
    with torch.device("meta"):
        keys = list(WanTransformer3DModel(**cfg).state_dict())
    originals = [diffusers_key_to_original(k) for k in keys]
    assert "blocks.0.cross_attn.k_img.weight" in originals and "img_emb.emb_pos" in originals
    assert "img_emb.proj.4.bias" in originals
    assert [original_key_to_diffusers(k) for k in originals] == keys


def test_longgen_convert_command(tmp_path, capsys):
    """`longgen convert` end to end from the CLI entry point; a bad file is a message, not a traceback."""
    from longgen.cli import main

    model = tiny_model(12)
    src = release(tmp_path, model, model)
    out = tmp_path / "from_cli"
    assert main(["convert", str(src), "--out", str(out), "--head-dim", "8", "--preset", "longlive"]) == 0
    assert (out / "config.json").exists() and (out / CAUSAL_CONFIG_NAME).exists()
    assert json.loads((out / CAUSAL_CONFIG_NAME).read_text())["sink_size"] == 3
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["convert", str(junk), "--out", str(tmp_path / "x")]) == 2
    assert "longgen convert: error:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
