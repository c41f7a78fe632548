"""Tiny adapters for the causal-attention tests (``from tiny_causal import tiny_adapter``: tests/ is on sys.path
through tests/conftest.py)."""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel

from longgen.backbones import build_tiny
from longgen.backbones.cogvideox import CogVideoXAdapter


def tiny_adapter(family: str):
    """The family's tiny adapter. LTX's tiny DiT has one block, so it gets two (causality through depth; the
    self-attention keys/values of block 2 depend on the prompt through block 1's cross-attention: what a recache
    changes). ``cogvideox_2b``: the tiny CogVideoX without RoPE, with the sin-cos positions of its patch
    embedding (as CogVideoX-2b)."""
    if family == "cogvideox_2b":
        pipe = CogVideoXAdapter.tiny_pipeline()
        config = {**pipe.transformer.config, "use_rotary_positional_embeddings": False}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe.transformer = CogVideoXTransformer3DModel.from_config(config).eval()
        adapter = CogVideoXAdapter(pipe, native_video_size=CogVideoXAdapter.tiny_video_size)
        assert adapter.rope_module() is None and adapter.model.patch_embed.use_positional_embeddings
        return adapter
    adapter = build_tiny(family)
    if family == "ltx":
        model = adapter.pipe.transformer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            adapter.pipe.transformer = type(model).from_config({**model.config, "num_layers": 2}).eval()
    return adapter
