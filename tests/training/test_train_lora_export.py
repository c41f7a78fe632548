"""A LoRA trained by longgen loads into the stock diffusers WanPipeline with load_lora_weights."""

from __future__ import annotations

import json

import pytest
import torch

from longgen.training.config import load_config
from longgen.training.loop import Trainer


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    from longgen.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("clips"), num_videos=2, num_frames=9, height=32, width=32
    )


def test_lora_loads_into_the_stock_pipeline_and_matches_the_adapter(tmp_path, clips):
    from diffusers import WanPipeline
    from safetensors import safe_open

    from longgen.backbones.wan import WanAdapter

    # alpha != rank: the exported metadata must carry the scale, or the stock loader would assume alpha = rank
    config = load_config(
        None,
        [
            f"data.source={clips}",
            "data.num_frames=9",
            f"train.output_dir={tmp_path}",
            "train.steps=3",
            "train.batch_size=2",
            "lora.rank=4",
            "lora.alpha=12",
            "optim.lr=2e-2",
            "optim.warmup_steps=0",
        ],
    )
    trainer = Trainer(config)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    weights = f"{result.final_dir}/pytorch_lora_weights.safetensors"
    with safe_open(weights, framework="pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 12

    pipe = WanPipeline(**WanAdapter.tiny_pipeline(seed=0).components)  # the same base weights, stock class
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 3, 4, 4, generator=generator)
    text = torch.randn(1, 7, 32, generator=generator)
    timestep = torch.tensor([400.0])

    def run(model):
        with torch.no_grad():
            return model(
                hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]

    base = run(pipe.transformer)
    pipe.load_lora_weights(result.final_dir)
    stock = run(pipe.transformer)
    ours = run(trainer.adapter.model)
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=1e-5)
    assert (stock - base).abs().max() > 1e-3  # the LoRA really changes the output
