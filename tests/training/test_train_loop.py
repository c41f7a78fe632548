"""The Accelerate training loop on a tiny Wan: overfitting, outputs, gradient checkpointing, full fine-tune."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_runs import run_trainer as _run
from tiny_runs import tiny_lora_config

from longgen.training.loop import Trainer


def _config(tmp_path, clips, *overrides):
    return tiny_lora_config(tmp_path, clips, "optim.warmup_steps=0", *overrides)


def test_loss_decreases_on_a_fixed_batch(tmp_path, clips):
    """Overfit: the same clips, noise levels and noise every step; LoRA must drive the loss down."""
    trainer = Trainer(_config(tmp_path, clips, "optim.lr=3e-2", "train.steps=30", "objective.mode=clip"))
    try:
        acc = trainer.accelerator
        batch = next(iter(trainer.loader))
        generator = torch.Generator().manual_seed(0)
        latents, cond = trainer._encode(batch, generator)
        sigma = torch.full(latents.shape[:1] + latents.shape[2:3], 0.5)
        noise = torch.randn(latents.shape, generator=generator)
        from longgen.training.objectives import training_loss

        losses = []
        for _ in range(30):
            loss, _ = training_loss(trainer.adapter, latents, cond, sigma, noise)
            acc.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        trainer.close()
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))


def test_run_writes_checkpoints_validation_metrics_and_exports(tmp_path, clips):
    config = _config(
        tmp_path,
        clips,
        "train.steps=3",
        "train.checkpoint_every=2",
        "train.keep_last=1",
        "ema.enabled=true",
        "ema.decay=0.9",
        "validation.every=2",
        "validation.steps=2",
        "validation.num_frames=17",
        "validation.guidance_scale=1.0",
    )
    trainer, result = _run(config)
    assert result.step == 3 and sorted(result.losses) == [1, 2, 3]
    # checkpoint at step 2 was pruned by keep_last=1 after the final one at step 3
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert ckpts == ["step_00000003"], ckpts
    assert os.path.exists(tmp_path / "checkpoints" / "step_00000003" / "config.yaml")
    assert os.path.exists(tmp_path / "checkpoints" / "step_00000003" / "trainable_0.safetensors")
    # validation clip: 17 frames (5 latent frames: longer than the 3-frame native clip)
    from longgen.io import read_video

    assert result.validation_videos == [str(tmp_path / "validation" / "step_00000002.mp4")]
    assert read_video(result.validation_videos[0]).shape == (17, 32, 32, 3)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == pytest.approx([result.losses[s] for s in (1, 2, 3)])
    assert os.path.exists(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    assert os.path.exists(tmp_path / "final_ema" / "pytorch_lora_weights.safetensors")
    # EMA weights differ from the trained ones (decay 0.9 over 3 steps), both exported
    from safetensors.torch import load_file

    raw = load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    ema = load_file(tmp_path / "final_ema" / "pytorch_lora_weights.safetensors")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    # after close() the adapter's denoise is the stock method again
    assert "denoise" not in trainer.adapter.__dict__

    # the validation clip goes to the configured tracker (tensorboard: a strip of frames, NHWC)
    class FakeTensorBoard:
        name = "tensorboard"

        def __init__(self):
            self.calls = []

        def log_images(self, values, step, **kwargs):
            self.calls.append((values, step, kwargs))

    tracker = FakeTensorBoard()
    trainer.accelerator.trackers = [tracker]
    trainer._log_video(result.validation_videos[0], 2)
    ((values, step, kwargs),) = tracker.calls
    assert step == 2 and kwargs == {"dataformats": "NHWC"}
    assert values["validation/frames"].shape == (8, 32, 32, 3)


def test_gradient_checkpointing_and_accumulation_keep_the_math(tmp_path, clips):
    """Checkpointing recomputes activations and must not change a single weight; with accumulation one
    optimizer step consumes grad_accumulation micro-batches."""
    plain, res_plain = _run(_config(tmp_path / "plain", clips))
    ckpt, res_ckpt = _run(_config(tmp_path / "ckpt", clips, "train.gradient_checkpointing=true"))
    assert ckpt.adapter.model.is_gradient_checkpointing
    assert res_plain.losses == pytest.approx(res_ckpt.losses, abs=1e-6)
    for (name, a), (_, b) in zip(
        plain.adapter.model.named_parameters(), ckpt.adapter.model.named_parameters()
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    accum, res_accum = _run(
        _config(tmp_path / "accum", clips, "train.batch_size=1", "train.grad_accumulation=2")
    )
    assert sorted(res_accum.losses) == [1, 2]
    # each optimizer step consumed two micro-batches of one clip: 4 clips in 2 steps, and Adam stepped twice
    assert accum.state.epoch == 0 and accum.state.batches_in_epoch == 4
    adam_steps = {int(s["step"]) for s in accum.optimizer.optimizer.state.values()}
    assert adam_steps == {2}
    changed = [n for n, p in accum.adapter.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed, "LoRA B matrices start at zero and must have moved"


def test_full_fine_tune_of_a_parameter_subset_exports_a_diffusers_model_folder(tmp_path, clips):
    from diffusers import WanTransformer3DModel

    from longgen.backbones import build_tiny

    config = _config(
        tmp_path, clips, "lora.enabled=false", "train.trainable_patterns=[^blocks\\.1\\.ffn]", "optim.lr=1e-3"
    )
    trainer, _ = _run(config)
    base = build_tiny("wan", seed=0).model
    trained = dict(trainer.adapter.model.named_parameters())
    for name, param in base.named_parameters():
        moved = not torch.equal(param, trained[name].detach())
        assert moved == name.startswith("blocks.1.ffn"), name
    folder = tmp_path / "final" / "transformer"
    loaded = WanTransformer3DModel.from_pretrained(folder)
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param, trained[name].detach(), atol=0, rtol=0, msg=name)
