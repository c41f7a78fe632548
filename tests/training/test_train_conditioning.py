"""Training with given (conditioning) frames: masks per task, clean given frames, no loss from them, recipe."""

from __future__ import annotations

import os

import pytest
import torch

from longgen.backbones import build_tiny
from longgen.training.objectives import CONDITIONING_TASKS, sample_given_frames, training_loss

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "configs", "tiny_conditioning.yaml")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _runs(row: torch.Tensor) -> tuple[int, int]:
    """(given frames at the start, given frames at the end) of one mask row."""
    values = row.tolist()
    head = next((i for i, v in enumerate(values) if not v), len(values))
    tail = next((i for i, v in enumerate(reversed(values)) if not v), len(values))
    return head, tail


def test_given_frame_masks_follow_each_task():
    num_latent_frames = 7
    for task in CONDITIONING_TASKS:
        given = sample_given_frames(400, num_latent_frames, {task: 1.0}, generator=_gen(1))
        assert given.shape == (400, num_latent_frames) and given.dtype == torch.bool
        assert (~given).any(dim=1).all(), task  # always something to generate
        heads, tails = zip(*(_runs(row) for row in given))
        assert int(given.sum()) == sum(heads) + sum(tails), task  # given frames only at the two ends
        if task == "none":
            assert not given.any()
        elif task == "past":
            assert set(heads) == set(range(1, 7)) and set(tails) == {0}  # 1..F-1 given frames, all drawn
        elif task == "future":
            assert set(tails) == set(range(1, 7)) and set(heads) == {0}
        elif task == "past_future":
            assert set(heads) == set(range(1, 4)) and set(tails) == set(range(1, 4))
        elif task == "first":
            assert set(heads) == {1} and set(tails) == {0}
        else:  # first_last
            assert set(heads) == {1} and set(tails) == {1}
    capped = sample_given_frames(300, 7, {"past_future": 1.0}, min_context=2, max_context=2, generator=_gen(2))
    assert {_runs(row) for row in capped} == {(2, 2)}

    # MCVD's independent past / future masking at p = 0.5: a quarter each
    mcvd = {"none": 0.25, "past": 0.25, "future": 0.25, "past_future": 0.25}
    given = sample_given_frames(4000, 6, mcvd, generator=_gen(3))
    past, future = given[:, 0], given[:, -1]
    assert abs(float(past.float().mean()) - 0.5) < 0.03 and abs(float(future.float().mean()) - 0.5) < 0.03
    assert abs(float((past & future).float().mean()) - 0.25) < 0.03
    assert torch.equal(given, sample_given_frames(4000, 6, mcvd, generator=_gen(3)))


def _recording_denoise(adapter, record: dict):
    def denoise(x, sigma, cond):
        record["x"], record["sigma"] = x.detach().clone(), sigma.detach().clone()
        out = adapter.denoise(x, sigma, cond)
        out.retain_grad()
        record["out"] = out
        return out

    return denoise


@pytest.mark.parametrize("given_sigma", [0.0, 0.05])
def test_given_frames_are_fed_clean_and_give_the_loss_no_gradient(given_sigma):
    torch.manual_seed(0)
    adapter = build_tiny("wan")
    cond, _ = adapter.encode_prompt(["a red ball", "a blue cat"], do_classifier_free_guidance=False)
    x0 = torch.randn(2, adapter.latent_channels, 4, 4, 4)
    eps = torch.randn_like(x0)
    sigma = torch.tensor([[0.3, 0.6, 0.8, 0.4], [0.5, 0.5, 0.5, 0.5]])
    given = torch.tensor([[True, True, False, False], [False, False, False, True]])
    record: dict = {}
    loss, info = training_loss(
        adapter, x0, cond, sigma, eps, given=given, given_sigma=given_sigma,
        denoise=_recording_denoise(adapter, record),
    )
    g5 = given[:, None, :, None, None].expand_as(x0)
    expected_x = (1 - given_sigma) * x0 + given_sigma * eps
    assert torch.equal(record["x"][g5], expected_x[g5])  # given frames: clean (exactly x0 at sigma 0)
    if given_sigma == 0.0:
        assert torch.equal(record["x"][g5], x0[g5])
    assert torch.equal(record["sigma"][given], torch.full((3,), given_sigma))
    assert torch.equal(record["sigma"][~given], sigma[~given])  # generated frames keep their levels
    s5 = sigma[:, None, :, None, None]
    assert torch.equal(record["x"][~g5], ((1 - s5) * x0 + s5 * eps)[~g5])

    out = record["out"].float()
    mse = (out - x0).pow(2).mean(dim=(1, 3, 4))
    expected = ((1 / sigma**2) * mse)[~given].mean()  # flow weight, generated frames only
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert torch.equal(info["given"], given) and bool((info["loss_per_frame"][given] == 0).all())

    loss.backward()
    grad = record["out"].grad
    assert torch.isfinite(grad).all()
    assert bool((grad[g5] == 0).all())  # the given frames' targets add nothing to the gradient
    assert bool((grad[~g5] != 0).all())
    assert adapter.model.proj_out.weight.grad.abs().sum() > 0

    none_given = torch.zeros_like(given)
    plain, _ = training_loss(adapter, x0, cond, sigma, eps)
    masked_none, _ = training_loss(adapter, x0, cond, sigma, eps, given=none_given)
    torch.testing.assert_close(masked_none, plain, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="every frame given"):
        training_loss(adapter, x0, cond, sigma, eps, given=torch.ones_like(given))
    with pytest.raises(ValueError, match="bool mask of shape"):
        training_loss(adapter, x0, cond, sigma, eps, given=given.float())


def test_conditioning_config_errors_name_the_fix(monkeypatch):
    from longgen.training import methods
    from longgen.training.config import ConfigError, load_config

    cases = {
        "conditioning.tasks={pst: 1.0}": "unknown conditioning task 'pst'; did you mean 'past'",
        "conditioning.tasks={past: 0.5, none: 0.3}": "must sum to 1, got 0.8 .add none: 0.2",
        "conditioning.tasks={past: 1.5, none: -0.5}": "'past' has probability 1.5; it must be in \\[0, 1\\]",
        "conditioning.context_sigma=1.0": "context_sigma must be in \\[0, 1\\)",
        "conditioning.min_context_latent_frames=0": "min_context_latent_frames must be >= 1",
        "conditioning.max_context_latent_frames=1": "max_context_latent_frames \\(1\\) must be >= min",
    }
    for override, message in cases.items():
        extra = ["conditioning.min_context_latent_frames=2"] if "max_context" in override else []
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["conditioning.tasks={past: 1.0}", *extra, override])
    monkeypatch.setitem(methods._METHODS, "other", methods.DenoisingMethod)
    with pytest.raises(ConfigError, match="objective.method=denoising"):
        load_config(None, ["objective.method=other", "conditioning.tasks={past: 1.0}"])

    # too short a clip for a task: refused when the method is built, before any training step
    config = load_config(None, ["data.num_frames=5", "conditioning.tasks={past: 0.5, past_future: 0.5}"])
    context = methods.MethodContext(config, build_tiny("wan"), None, 0, None)  # 5 frames = 2 latent frames
    with pytest.raises(ConfigError, match="'past_future' needs clips of >= 3 latent frames.*have 2"):
        methods.get_method("denoising", context)
    recipe = load_config(RECIPE)
    assert sum(recipe.conditioning.tasks.values()) == pytest.approx(1.0) and recipe.objective.mode == "clip"


@torch.no_grad()
def _masked_frame_loss(trainer, batch) -> float:
    """Loss on the generated frames of a fixed batch: fixed noise, levels and masks (past and bridge)."""
    latents, cond = trainer.method.encode(batch, _gen(0))
    batch_size, num_latent_frames = latents.shape[0], latents.shape[2]
    masks = []
    for task in ("past", "past_future"):
        masks.append(sample_given_frames(batch_size, num_latent_frames, {task: 1.0}, generator=_gen(7)))
    total = []
    for i, level in enumerate((0.3, 0.6, 0.9)):
        noise = torch.randn(latents.shape, generator=_gen(100 + i))
        sigma = torch.full((batch_size, num_latent_frames), level)
        for given in masks:
            loss, _ = training_loss(
                trainer.adapter, latents, cond, sigma, noise, given=given, denoise=trainer.method.prepared
            )
            total.append(float(loss))
    return sum(total) / len(total)


@pytest.mark.slow
def test_conditioning_recipe_lora_lowers_the_masked_frame_loss(tmp_path, clips):
    from longgen.training.config import load_config
    from longgen.training.loop import Trainer

    config = load_config(
        RECIPE,
        [
            f"data.source={clips}",
            "data.num_frames=13",  # the fixture's clips: 4 latent frames
            "data.random_start=false",
            f"train.output_dir={tmp_path}",
            "train.steps=40",
            "train.checkpoint_every=0",
        ],
    )
    trainer = Trainer(config)
    try:
        batch = next(iter(trainer.loader))
        before = _masked_frame_loss(trainer, batch)
        result = trainer.train()
        after = _masked_frame_loss(trainer, batch)
    finally:
        trainer.close()
    assert len(result.losses) == 40
    assert after < 0.9 * before, (before, after)
    assert os.path.exists(os.path.join(tmp_path, "final", "pytorch_lora_weights.safetensors"))
    saved = load_config(os.path.join(tmp_path, "config.yaml"))
    assert saved.conditioning.tasks == config.conditioning.tasks
