"""The recipes' precision setting on CPU: frozen base in bf16, LoRA in fp32, bf16 autocast
(``model.dtype=bf16 train.mixed_precision=bf16``), for the families the recipes train."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("family", ["wan", "ltx", "cogvideox"])
def test_bf16_base_with_fp32_lora_trains(family, tmp_path, clips):
    trainer = Trainer(
        load_config(
            None,
            [
                f"model.tiny={family}",
                "model.dtype=bf16",
                "train.mixed_precision=bf16",
                f"data.source={clips}",
                "data.num_frames=9",
                f"train.output_dir={tmp_path}",
                "train.steps=4",
                "train.batch_size=2",
                "lora.rank=4",
                "optim.lr=2e-2",
                "optim.warmup_steps=0",
            ],
        )
    )
    try:
        assert trainer.accelerator.mixed_precision == "bf16"
        model = trainer.adapter.model
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert lora and all(p.dtype == torch.float32 for p in lora.values())  # fp32 master weights
        assert any(p.dtype == torch.bfloat16 for p in frozen)
        before = {n: p.detach().clone() for n, p in lora.items()}
        result = trainer.train()
    finally:
        trainer.close()
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses.values())
    assert any(not torch.equal(before[n], p) for n, p in lora.items())  # the fp32 LoRA moved
    assert all(p.dtype == torch.float32 for p in lora.values())
