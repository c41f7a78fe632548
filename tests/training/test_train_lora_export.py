"""A LoRA trained by longgen loads into the stock diffusers WanPipeline with load_lora_weights."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import run_trainer

from longgen.training.config import load_config


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
    trainer, result = run_trainer(config)
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


@pytest.mark.parametrize("family", ["skyreels_v2", "ltx", "cogvideox", "hunyuan_video", "animatediff"])
def test_lora_of_every_family_loads_into_its_stock_pipeline(family, tmp_path, clips):
    """The exported file is what each stock pipeline's ``load_lora_weights`` expects (its component name and
    key layout): the stock pipeline with the LoRA loaded denoises like longgen's trained adapter."""
    from longgen.backbones import build_tiny

    config = load_config(
        None,
        [
            f"model.tiny={family}",
            f"data.source={clips}",
            "data.num_frames=9",
            f"train.output_dir={tmp_path}",
            "train.steps=2",
            "train.batch_size=1",
            "lora.rank=4",
            "optim.lr=2e-2",
            "optim.warmup_steps=0",
        ],
    )
    trainer, result = run_trainer(config)
    trained = trainer.adapter
    stock = build_tiny(family, seed=0)  # the same base weights as the trainer's model.tiny_seed=0
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(trained.latent_shape(9, 32, 32), generator=generator)
    sigma = torch.full((1, x.shape[2]), 0.6)
    cond, _ = stock.encode_prompt(
        ["a red ball"], do_classifier_free_guidance=False, num_frames=9, height=32, width=32
    )
    with torch.no_grad():
        base = stock.denoise(x, sigma, cond)
        stock.pipe.load_lora_weights(result.final_dir)
        loaded = stock.denoise(x, sigma, cond)
        ours = trained.denoise(x, sigma, cond)
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-5)
    assert (loaded - base).abs().max() > 1e-4  # the LoRA really changes the output
