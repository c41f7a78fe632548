"""Public causal Wan2.1 checkpoints (Self-Forcing, CausVid, LongLive) to diffusers ``WanTransformer3DModel`` folders.

The releases keep the original Wan layout (``wan/modules/model.py`` key names, ``model.``-prefixed by
their ``WanDiffusionWrapper``) inside a ``{generator, critic, generator_ema}`` pickle, and LongLive adds a
PEFT LoRA (``lora.pt``) in the same naming. This module renames keys into the diffusers layout, checks them
strictly against the diffusers model, writes a ``save_pretrained`` folder atomically plus
``longgen_causal.json`` (the causal sampling settings of the source method), and converts or merges the LoRA.

Files are only ever read with safetensors or ``torch.load(weights_only=True)``: a pickle that needs full
unpickling is refused, never executed. torch is imported inside functions so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dtypes import DTYPE_NAMES

if TYPE_CHECKING:  # pragma: no cover
    import torch

CAUSAL_CONFIG_NAME = "longgen_causal.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# Causal sampling settings of each public release (METHODS-CAUSAL.md sections 1-3 and the repos' configs).
PRESETS: dict[str, dict[str, Any]] = {
    "self_forcing": {
        "method": "self_forcing",
        "source": "guandeh17/Self-Forcing configs/self_forcing_dmd.yaml + default_config.yaml",
        "entry": "generator_ema",  # the README's inference command passes --use_ema
        "chunk_size": 3,  # num_frame_per_block, latent frames
        "denoising_steps": [1000, 750, 500, 250],
        "warp_denoising_step": True,  # steps index a 1000-entry shift-5 table: 1000, 937.5, 833.3, 625
        "timestep_shift": 5.0,
        "sink_size": 0,
        "local_attn_size": -1,  # -1: attend to the whole cache (no rolling)
        "context_noise": 0,  # t of the clean-cache pass after each chunk
        "max_latent_frames": 21,  # the trained span (cache size 21 latents = 81 frames)
        "guidance_scale": 1.0,  # DMD-distilled: no classifier-free guidance at inference
    },
    "causvid": {
        "method": "causvid",
        "source": "tianweiy/CausVid causvid/models/wan (asymmetric DMD config)",
        "entry": "generator",  # CausVid's inference reads ['generator']
        "chunk_size": 3,
        "denoising_steps": [1000, 757, 522],
        "warp_denoising_step": False,  # the t values are used as given (ODE states 0/36/44 at shift 8)
        "timestep_shift": 8.0,
        "sink_size": 0,
        "local_attn_size": -1,
        "context_noise": 0,
        "max_latent_frames": 21,  # long videos restart every 21 latents from the last 3
        "guidance_scale": 1.0,
    },
    "longlive": {
        "method": "longlive",
        "source": "NVlabs/LongLive (v1.0) configs/longlive_inference.yaml",
        "entry": "generator",  # LongLive's inference config sets use_ema: false
        "chunk_size": 3,
        "denoising_steps": [1000, 750, 500, 250],
        "warp_denoising_step": True,
        "timestep_shift": 5.0,
        "sink_size": 3,  # frame sink: the first chunk
        "local_attn_size": 12,  # sink 3 + newest 9 latents
        "context_noise": 0,
        "global_sink": True,
        "max_latent_frames": None,  # rolls indefinitely
        "guidance_scale": 1.0,
        "lora_rank": 256,
        "lora_alpha": 256,
    },
}

# Original Wan module path -> diffusers module path (the parameter name, weight/bias, is kept).
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    # image-to-video CLIP projection (MLPProj: LayerNorm, Linear, GELU, Linear, LayerNorm)
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
# Whole parameters (nn.Parameter attributes, not modules).
_TOP_PARAMS = {
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
_BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    # Wan applies norm1 (self-attn), norm3 (cross-attn, affine), norm2 (ffn); diffusers numbers them in
    # call order, so the affine cross-attention norm is diffusers' norm2. The other two have no parameters.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_WRAPPER_PREFIXES = ("base_model.model.", "model.", "diffusion_model.", "module.")
_DIFFUSERS_MARKERS = ("condition_embedder.", ".attn1.", ".attn2.", "proj_out.")


def original_module_to_diffusers(module: str) -> str | None:
    """The diffusers module path of an original-Wan module path (``blocks.3.self_attn.q``), None if unknown."""
    if module in _TOP_MODULES:
        return _TOP_MODULES[module]
    m = _BLOCK_RE.match(module)
    if m and m.group(2) in _BLOCK_MODULES:
        return f"blocks.{m.group(1)}.{_BLOCK_MODULES[m.group(2)]}"
    return None


def original_key_to_diffusers(key: str) -> str | None:
    """The diffusers state-dict key of an original-Wan key (no wrapper prefix), None if the key is unknown."""
    if key in _TOP_PARAMS:
        return _TOP_PARAMS[key]
    m = _BLOCK_RE.match(key)
    if m and m.group(2) in _BLOCK_PARAMS:
        return f"blocks.{m.group(1)}.{_BLOCK_PARAMS[m.group(2)]}"
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    target = original_module_to_diffusers(module)
    return None if target is None else f"{target}.{param}"


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a prefix every key shares (``model.`` of the causal releases' WanDiffusionWrapper, ...)."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an original-layout Wan state dict (wrapper prefix allowed) to diffusers keys; unknown keys raise."""
    sd = strip_wrapper_prefix(state_dict)
    if not sd:
        raise ValueError("the checkpoint holds no tensors")
    if any(any(mark in k or k.startswith(mark) for mark in _DIFFUSERS_MARKERS) for k in sd):
        raise ValueError(
            "the checkpoint is already in the diffusers layout (keys like condition_embedder./attn1.); "
            "load it with WanTransformer3DModel.from_pretrained or save it with save_pretrained instead"
        )
    out, unknown = {}, []
    for key, value in sd.items():
        new = original_key_to_diffusers(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"unknown keys for the original Wan layout: {_preview(sorted(unknown))}; this converter maps "
            "Wan2.1 WanModel / CausalWanModel weights (wan/modules/model.py) only"
        )
    return out


def read_tensor_file(path: str | os.PathLike) -> Any:
    """Load a ``.safetensors`` file or a tensors-only pickle (``torch.load(weights_only=True)``, never full)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; pass a .pt/.pth/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ValueError(
                f"{path}: not a readable safetensors file ({err}); re-download or re-save it"
            ) from None
    try:
        try:  # mmap keeps a 10 GB three-model release off the heap; legacy (non-zip) files cannot map
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        globals_ = re.findall(r"Unsupported global: GLOBAL (\S+)", text)
        if not globals_:  # torch wraps every unpickler error the same way: junk is not a pickle of objects
            raise ValueError(
                f"{path}: not a readable torch checkpoint; pass a .pt/.safetensors file"
            ) from None
        first = ", ".join(sorted(set(globals_)))
        raise ValueError(
            f"{path}: this file needs full unpickling (it holds objects other than tensors and plain "
            f"containers, e.g. {first}). longgen never unpickles checkpoints (it could run arbitrary code). "
            "Fix: in an environment you trust, re-save just the tensors, e.g. "
            "torch.save({k: v for k, v in sd.items()}, 'weights.pt'), or convert it to .safetensors"
        ) from None
    except (KeyError, EOFError, ValueError, RuntimeError, OSError) as err:  # a truncated zip, not a torch file
        raise ValueError(
            f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err}); pass a .pt/.pth/.safetensors "
            "file saved by torch.save or safetensors"
        ) from None


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_entry(
    obj: Any, entry: str | None, what: str = "checkpoint", flag: str = "--entry"
) -> dict[str, torch.Tensor]:
    """The tensor state dict in ``obj``: the object itself if it is one, else its ``entry`` (a sub-dict)."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"the {what} is a {type(obj).__name__}, not a state dict (a mapping of name: tensor)"
        )
    if _is_tensor_dict(obj):
        return dict(obj)
    entries = sorted(str(k) for k, v in obj.items() if isinstance(v, Mapping))
    if entry is None or entry not in obj:
        asked = "no entry was given" if entry is None else f"it has no entry {entry!r}"
        raise ValueError(
            f"the {what} holds several state dicts and {asked}; entries: {', '.join(entries) or '(none)'}. "
            f"Fix: pass {flag} NAME (one of those)"
        )
    sd = obj[entry]
    if not _is_tensor_dict(sd):
        raise ValueError(f"entry {entry!r} of the {what} is not a mapping of name: tensor")
    return dict(sd)


def infer_transformer_config(state_dict: Mapping[str, Any], head_dim: int = 128) -> dict[str, Any]:
    """WanTransformer3DModel config read off original-layout shapes (prefix-free keys); heads = dim / head_dim."""
    sd = state_dict
    for need in (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "head.head.weight",
    ):
        if need not in sd:
            raise ValueError(f"missing key {need!r}: not a complete Wan2.1 transformer checkpoint")
    patch_w = sd["patch_embedding.weight"]
    dim, in_channels = int(patch_w.shape[0]), int(patch_w.shape[1])
    patch = tuple(int(s) for s in patch_w.shape[2:])
    layers = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))})
    if not layers:
        raise ValueError("missing keys blocks.N.*: the checkpoint has no transformer blocks")
    if layers != list(range(len(layers))):
        gaps = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise ValueError(f"missing blocks {gaps}: block indices must run 0..{layers[-1]}")
    if dim % head_dim:
        raise ValueError(f"hidden size {dim} is not a multiple of head_dim {head_dim}; pass --head-dim")
    config: dict[str, Any] = {
        "patch_size": list(patch),
        "num_attention_heads": dim // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": int(sd["head.head.weight"].shape[0]) // math.prod(patch),
        "text_dim": int(sd["text_embedding.0.weight"].shape[1]),
        "freq_dim": int(sd["time_embedding.0.weight"].shape[1]),
        "ffn_dim": int(sd["blocks.0.ffn.0.weight"].shape[0]) if "blocks.0.ffn.0.weight" in sd else None,
        "num_layers": len(layers),
        "cross_attn_norm": "blocks.0.norm3.weight" in sd,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in sd else None,
        "eps": 1e-6,
        "image_dim": int(sd["img_emb.proj.0.weight"].shape[0]) if "img_emb.proj.0.weight" in sd else None,
        "added_kv_proj_dim": dim if "blocks.0.cross_attn.k_img.weight" in sd else None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": int(sd["img_emb.emb_pos"].shape[1]) if "img_emb.emb_pos" in sd else None,
    }
    if config["ffn_dim"] is None:
        raise ValueError("missing key 'blocks.0.ffn.0.weight': not a complete Wan2.1 transformer checkpoint")
    return config


def read_base_config(base_config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A transformer config from a dict, a config.json, or a diffusers transformer / pipeline folder."""
    if isinstance(base_config, Mapping):
        cfg = dict(base_config)
    else:
        path = Path(base_config)
        candidates = (
            [path] if path.is_file() else [path / "config.json", path / "transformer" / "config.json"]
        )
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"{path}: no transformer config (looked for {', '.join(str(c) for c in candidates)}); "
                "pass a diffusers WanTransformer3DModel folder, a Wan pipeline folder or its config.json"
            )
        cfg = json.loads(found.read_text())
        if cfg.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
            raise ValueError(f"{found}: a {cfg['_class_name']} config, not a WanTransformer3DModel one")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _compare_configs(base: dict[str, Any], inferred: dict[str, Any]) -> None:
    bad = []
    for key, value in inferred.items():
        if key in ("eps", "rope_max_seq_len") or key not in base:
            continue  # not readable from shapes
        theirs = list(base[key]) if isinstance(base[key], (list, tuple)) else base[key]
        if theirs != value:
            bad.append(f"{key}: base config {theirs!r}, checkpoint {value!r}")
    if bad:
        raise ValueError(
            "the base config does not match the checkpoint: "
            + "; ".join(bad)
            + ". Fix: pass the --base-config "
            "of the model the checkpoint was trained from, or leave it out to infer the config"
        )


def diffusers_key_to_original(key: str) -> str:
    """The original-Wan name of a diffusers key (for error messages); the key itself if it has none."""
    for table in (_TOP_PARAMS, _TOP_MODULES):
        for orig, new in table.items():
            if key == new or key.startswith(new + "."):
                return orig + key[len(new) :]
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if m:
        for table in (_BLOCK_PARAMS, _BLOCK_MODULES):
            for orig, new in table.items():
                rest = m.group(2)
                if rest == new or rest.startswith(new + "."):
                    return f"blocks.{m.group(1)}.{orig}{rest[len(new) :]}"
    return key


def _check_against_model(model: Any, sd: Mapping[str, Any]) -> None:
    expected = model.state_dict()
    missing = sorted(diffusers_key_to_original(k) for k in set(expected) - set(sd))
    unexpected = sorted(diffusers_key_to_original(k) for k in set(sd) - set(expected))
    shapes = [
        f"{k}: model {tuple(expected[k].shape)}, checkpoint {tuple(sd[k].shape)}"
        for k in sorted(set(expected) & set(sd))
        if tuple(expected[k].shape) != tuple(sd[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys (original names): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (original names): {_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_preview(shapes, 4)}")
    if problems:
        raise ValueError("the checkpoint does not fit WanTransformer3DModel: " + "; ".join(problems))


def build_transformer(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> Any:
    """A WanTransformer3DModel holding ``state_dict`` (diffusers keys), checked strictly; no weight copy."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(dict(config))
    _check_against_model(model, state_dict)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    # The RoPE tables are non-persistent buffers, left on meta: rebuild them so the model also runs in memory.
    rope = model.rope
    model.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    return model


def convert_lora_state_dict(
    lora: Mapping[str, Any], alpha: float | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT LoRA in original Wan naming -> ``transformer.``-prefixed diffusers keys (``load_lora_weights`` format).

    ``alpha/rank`` is folded into ``lora_B`` so the output loads with diffusers' default alpha (= rank).
    Per-module ``<module>.alpha`` tensors override ``alpha``; without either, alpha = rank (LongLive's r=alpha).
    """
    pattern = re.compile(
        r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$"
    )
    sd = strip_wrapper_prefix(lora)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in sd.items():
        m = pattern.match(key)
        if m and m.group("adapter") not in (None, "default"):
            raise ValueError(
                f"LoRA key {key!r} belongs to adapter {m.group('adapter')!r}; one adapter is supported"
            )
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("kind")] = value
        elif key.endswith(".alpha") and value.numel() == 1:
            alphas[key[: -len(".alpha")]] = float(value)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unknown LoRA keys: {_preview(sorted(unknown))}; expected PEFT lora_A/lora_B weights "
            "(DoRA magnitude vectors and LoRA biases are not supported)"
        )
    if not pairs:
        raise ValueError("the LoRA file holds no lora_A/lora_B weights")
    out: dict[str, torch.Tensor] = {}
    ranks = set()
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA module {module!r} lacks {({'lora_A', 'lora_B'} - set(ab)).pop()}")
        target = original_module_to_diffusers(module)
        if target is None:
            raise ValueError(f"LoRA module {module!r} has no diffusers counterpart in the Wan layout")
        a, b = ab["lora_A"], ab["lora_B"]
        rank = int(a.shape[0])
        ranks.add(rank)
        scale = alphas.get(module, alpha if alpha is not None else rank) / rank
        b = b if scale == 1 else (b.float() * scale).to(b.dtype)
        out[f"transformer.{target}.lora_A.weight"] = a.contiguous()
        out[f"transformer.{target}.lora_B.weight"] = b.contiguous()
    info = {"lora_rank": sorted(ranks), "lora_alpha_folded": alpha, "lora_modules": len(pairs)}
    return out, info


def merge_lora_into(
    state_dict: dict[str, torch.Tensor], lora: Mapping[str, torch.Tensor], scale: float
) -> None:
    """W += scale * B @ A for each converted LoRA pair (diffusers keys; alpha already folded into B)."""
    for key in sorted(k for k in lora if k.endswith(".lora_A.weight")):
        module = key[len("transformer.") : -len(".lora_A.weight")]
        weight_key = f"{module}.weight"
        if weight_key not in state_dict:
            raise ValueError(f"LoRA targets {module!r}, which the base checkpoint does not have")
        w = state_dict[weight_key]
        delta = lora[f"transformer.{module}.lora_B.weight"].float() @ lora[key].float()
        if delta.shape != w.shape:
            raise ValueError(
                f"LoRA for {module!r} has shape {tuple(delta.shape)}, the weight {tuple(w.shape)}"
            )
        state_dict[weight_key] = (w.float() + scale * delta).to(w.dtype)


def _write_atomically(out_dir: Path, overwrite: bool, write) -> None:
    """Run ``write(tmp_dir)`` and move the finished folder to ``out_dir``: never a partial final folder."""
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_pipeline_folder(pipeline: Path) -> None:
    index = pipeline / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{pipeline}: no model_index.json; --pipeline takes a Wan2.1 diffusers pipeline folder"
        )
    classes = json.loads(index.read_text())
    transformer = classes.get("transformer") or [None, None]
    if transformer[1] != "WanTransformer3DModel":
        raise ValueError(
            f"{pipeline}: its transformer is {transformer[1]!r}, not WanTransformer3DModel; "
            "pass a Wan2.1 pipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers)"
        )


def _write_transformer(folder: Path, model: Any, causal: dict[str, Any], lora_sd: dict | None) -> None:
    """The transformer (if any), its causal settings and an unmerged LoRA into ``folder``."""
    if model is not None:
        model.save_pretrained(folder, safe_serialization=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CAUSAL_CONFIG_NAME).write_text(json.dumps(causal, indent=2) + "\n")
    if lora_sd is not None:
        from safetensors.torch import save_file

        save_file(lora_sd, str(folder / LORA_WEIGHT_NAME), metadata={"format": "pt"})


def convert_wan_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    entry: str | None = "generator_ema",
    base_config: str | os.PathLike | Mapping[str, Any] | None = None,
    lora: str | os.PathLike | None = None,
    lora_entry: str | None = "generator_lora",
    lora_alpha: float | None = None,
    merge_lora: bool = False,
    lora_scale: float = 1.0,
    preset: str = "self_forcing",
    head_dim: int = 128,
    dtype: str | None = None,
    pipeline: str | os.PathLike | None = None,
    copy_components: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert a Self-Forcing / CausVid / LongLive (original Wan layout) checkpoint to a diffusers folder.

    Writes ``out_dir`` with ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (``save_pretrained``),
    ``longgen_causal.json`` (``PRESETS[preset]`` plus provenance), and, given an unmerged ``lora``,
    ``pytorch_lora_weights.safetensors`` in the format ``WanPipeline.load_lora_weights`` reads. ``entry``
    picks the state dict of a ``{generator, critic, generator_ema}`` file (ignored for a plain state dict).
    With ``pipeline`` (a Wan2.1 diffusers pipeline folder) ``out_dir`` is instead that pipeline with the
    converted ``transformer/`` (other components symlinked, or copied with ``copy_components``), ready for
    ``longgen generate --model``; the base config then defaults to the pipeline's transformer config.
    """
    from .dtypes import torch_dtype

    if pipeline is not None:
        pipeline = Path(pipeline)
        _check_pipeline_folder(pipeline)
        base_config = base_config if base_config is not None else pipeline / "transformer"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if merge_lora and lora is None:
        raise ValueError("--merge-lora needs --lora FILE")
    src, out_dir = Path(src), Path(out_dir)
    original = strip_wrapper_prefix(select_entry(read_tensor_file(src), entry))
    diffusers_sd = convert_state_dict(original)
    base = read_base_config(base_config) if base_config is not None else None
    # A base config fixes the head size; otherwise --head-dim does (Wan2.1: 128 for 1.3B and 14B).
    inferred = infer_transformer_config(
        original, head_dim=int(base.get("attention_head_dim", head_dim)) if base else head_dim
    )
    config = inferred
    if base is not None:
        _compare_configs(base, inferred)
        config = {**inferred, **base}
    lora_sd, lora_info = None, {}
    if lora is not None:
        lora_alpha = lora_alpha if lora_alpha is not None else PRESETS[preset].get("lora_alpha")
        raw = select_entry(read_tensor_file(lora), lora_entry, what="LoRA file", flag="--lora-entry")
        lora_sd, lora_info = convert_lora_state_dict(raw, alpha=lora_alpha)
        if merge_lora:
            merge_lora_into(diffusers_sd, lora_sd, lora_scale)
    if dtype is not None:
        target = torch_dtype(dtype)
        diffusers_sd = {k: v.to(target) for k, v in diffusers_sd.items()}
    model = build_transformer(config, diffusers_sd)
    causal = {
        **PRESETS[preset],
        "converted_from": str(src),
        "entry": entry if entry is not None else PRESETS[preset]["entry"],
        **lora_info,
    }
    if lora is not None:
        causal.update(
            lora_file=str(lora), lora_merged=merge_lora, lora_scale=lora_scale if merge_lora else None
        )

    def write(tmp: Path) -> None:
        lora_out = None if lora_sd is None or merge_lora else lora_sd
        if pipeline is None:
            _write_transformer(tmp, model, causal, lora_out)
            return
        for item in sorted(pipeline.iterdir()):
            if item.name in ("transformer", CAUSAL_CONFIG_NAME, LORA_WEIGHT_NAME) or item.name.startswith(
                "."
            ):
                continue
            if item.is_dir() and not copy_components:  # the 1.3B pipeline's text encoder alone is 11 GB
                os.symlink(item.resolve(), tmp / item.name, target_is_directory=True)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name, symlinks=False)
            else:
                shutil.copy2(item, tmp / item.name)
        _write_transformer(tmp / "transformer", model, causal, None)
        _write_transformer(
            tmp, None, causal, lora_out
        )  # pipeline-level LoRA: WanPipeline.load_lora_weights(out)

    _write_atomically(out_dir, overwrite, write)
    return out_dir


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``longgen convert`` (original-layout causal Wan checkpoint -> diffusers folder)."""
    parser.add_argument(
        "src", help="checkpoint file: .pt/.pth (tensors only) or .safetensors, original Wan layout"
    )
    parser.add_argument(
        "--out", required=True, help="output folder: a diffusers WanTransformer3DModel folder (a pipeline with --pipeline)"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="self_forcing",
        help="source method: its causal settings go to longgen_causal.json and pick the default --entry",
    )
    parser.add_argument(
        "--entry",
        default=None,
        help="state dict to take from a {generator, critic, generator_ema} file (default: the preset's, "
        "generator_ema for self_forcing, generator for causvid/longlive); ignored for a plain state dict",
    )
    parser.add_argument(
        "--base-config",
        default=None,
        help="diffusers transformer folder, Wan pipeline folder or config.json to take the config from "
        "(default: inferred from the weights' shapes)",
    )
    parser.add_argument(
        "--head-dim", type=int, default=128, help="attention head size when inferring the config"
    )
    parser.add_argument("--lora", default=None, help="LoRA file in original naming (LongLive's lora.pt)")
    parser.add_argument(
        "--lora-entry", default="generator_lora", help="entry of the LoRA file holding the generator's LoRA"
    )
    parser.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="LoRA alpha (scale alpha/rank); default: the preset's (LongLive 256) or the rank",
    )
    parser.add_argument("--merge-lora", action="store_true", help="merge the LoRA into the weights")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="scale of a merged LoRA")
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None, help="cast the weights (default: keep the checkpoint's)"
    )
    parser.add_argument(
        "--pipeline",
        default=None,
        help="Wan2.1 diffusers pipeline folder: write --out as that pipeline with the converted transformer "
        "(for longgen generate --model); its transformer config is the default --base-config",
    )
    parser.add_argument(
        "--copy-components",
        action="store_true",
        help="with --pipeline: copy the other components (text encoder, VAE, ...) instead of symlinking them",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _under_symlink(path: Path, root: Path) -> bool:
    return any(
        parent.is_symlink() for parent in [path, *path.parents] if parent != root and root in parent.parents
    )


def run_convert(args: argparse.Namespace) -> int:
    """Run ``longgen convert``; prints what it wrote. Errors are ValueError/FileNotFoundError naming the fix."""
    entry = args.entry if args.entry is not None else PRESETS[args.preset]["entry"]
    out = convert_wan_checkpoint(
        args.src,
        args.out,
        entry=entry,
        base_config=args.base_config,
        lora=args.lora,
        lora_entry=args.lora_entry,
        lora_alpha=args.lora_alpha,
        merge_lora=args.merge_lora,
        lora_scale=args.lora_scale,
        preset=args.preset,
        head_dim=args.head_dim,
        dtype=args.dtype,
        pipeline=args.pipeline,
        copy_components=args.copy_components,
        overwrite=args.overwrite,
    )
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not _under_symlink(p, out)):
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    for path in sorted(p for p in out.iterdir() if p.is_symlink()):
        print(f"linked {path} -> {os.readlink(path)}")
    return 0
