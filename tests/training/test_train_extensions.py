"""Extension-aware post-tuning: RoPE-extended LoRA on longer clips, and ExVideo's trainable subset."""

from __future__ import annotations

import json
import os

import pytest
import torch

from longgen.training.config import load_config
from longgen.training.loop import Trainer


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    from longgen.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("clips"), num_videos=2, num_frames=17, height=32, width=32
    )


def _run(config):
    trainer = Trainer(config)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return trainer, result


def test_riflex_lora_trains_on_clips_longer_than_the_native_length(tmp_path, clips):
    from longgen.extend import get_rope_extension

    config = load_config(
        None,
        [
            f"data.source={clips}",
            "data.num_frames=17",  # 5 latent frames; the tiny Wan's native clip is 3
            f"train.output_dir={tmp_path}",
            "train.steps=2",
            "train.batch_size=2",
            "lora.rank=4",
            "extension.method=riflex",
        ],
    )
    trainer, result = _run(config)
    handle = get_rope_extension(trainer.adapter)
    assert handle is not None and handle.method == "riflex"
    info = json.load(open(os.path.join(result.final_dir, "longgen_extension.json")))
    assert (info["method"], info["train_latent_frames"], info["target_latent_frames"]) == ("riflex", 3, 5)
    assert os.path.exists(os.path.join(result.final_dir, "pytorch_lora_weights.safetensors"))


def test_exvideo_trains_only_its_tables_convolutions_and_temporal_blocks(tmp_path, clips):
    from safetensors.torch import load_file

    from longgen.backbones import build_tiny
    from longgen.extend.exvideo import exvideo_trainable_parameters

    config = load_config(
        None,
        [
            "model.tiny=svd",
            f"data.source={clips}",
            "data.num_frames=8",  # the tiny SVD's native clip is 4 frames
            f"train.output_dir={tmp_path}",
            "train.steps=2",
            "train.batch_size=1",
            "lora.enabled=false",
            "optim.lr=1e-3",
            "objective.mode=clip",
            "extension.method=exvideo",
        ],
    )
    trainer, result = _run(config)
    model = trainer.adapter.model
    expected = {id(p) for p in exvideo_trainable_parameters(trainer.adapter)}
    trainable = {name for name, p in model.named_parameters() if id(p) in expected}
    assert set(trainer.trainable_names) == trainable
    base = dict(build_tiny("svd", seed=0).model.named_parameters())
    for name, param in model.named_parameters():
        if name in base and name not in trainable:
            assert torch.equal(param.detach(), base[name].detach()), f"frozen {name} changed"
    moved = [
        n for n in trainable if n in base and not torch.equal(dict(model.named_parameters())[n], base[n])
    ]
    assert moved, "the temporal blocks must train"
    weights = load_file(os.path.join(result.final_dir, "exvideo_weights.safetensors"))
    assert set(weights) == trainable
    assert json.load(open(os.path.join(result.final_dir, "longgen_extension.json")))["method"] == "exvideo"
