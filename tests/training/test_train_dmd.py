"""Self-Forcing DMD distillation (``objective.method=dmd``): the gradient, the rollout, the trainer, bad input.

- the DMD gradient against its closed form on Gaussians (real and fake scores are exact posterior means of
  two Gaussian data laws): ``g`` points from the real mean to the fake mean with the analytic scale, the
  loss's gradient in ``x`` is ``g / numel``, and descending it moves samples to the real law;
- the training rollout is the causal sampler when every chunk exits at the last step (no grad);
- gradient flows only through each chunk's exit call: earlier steps and the cache pass run without grad,
  the exit call's input carries no graph, the cached keys/values are detached;
- the trainer distils end to end and resumes exactly (student, critic, both optimizers), and bad input
  (no causal extension, chunk not dividing the clip, a teacher of another family or a UNet) fails naming
  the fix.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_runs import run_trainer, tiny_lora_config

from longgen.training.self_forcing import dmd_gradient, dmd_loss

DMD = [
    "objective.method=dmd",
    "extension.method=block-causal",
    "extension.options={chunk_size: 1}",
    "dmd.generator_every=2",
    "dmd.critic_lr=1e-2",
    "validation.every=0",
]


def _gauss_x0(mean: float, var: float, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mean, var I), x_t = (1 - t) x0 + t eps."""
    k = (1 - t) * var / ((1 - t) ** 2 * var + t**2)
    return mean + k * (x_t - (1 - t) * mean)


def test_dmd_gradient_matches_closed_form_on_gaussians():
    gen = torch.Generator().manual_seed(0)
    mu_real, mu_fake, var, t = 1.5, -0.5, 0.25, 0.6
    x = (mu_fake + var**0.5 * torch.randn(64, 2, 3, 4, 4, generator=gen)).requires_grad_(True)
    x_t = (1 - t) * x.detach() + t * torch.randn(x.shape, generator=gen)
    real, fake = _gauss_x0(mu_real, var, x_t, t), _gauss_x0(mu_fake, var, x_t, t)
    g = dmd_gradient(x, real, fake)
    scale = t**2 / ((1 - t) ** 2 * var + t**2)  # fake - real = scale * (mu_fake - mu_real) everywhere
    normalizer = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(g, (scale * (mu_fake - mu_real) / normalizer).expand_as(g))
    loss = dmd_loss(x, g)
    loss.backward()
    torch.testing.assert_close(x.grad, (g / x.numel()).float(), rtol=1e-5, atol=1e-9)
    # descending the loss moves the generated samples towards the real law
    y = x.detach().clone()
    for _ in range(20):
        y.requires_grad_(True)
        y_t = (1 - t) * y.detach() + t * torch.randn(y.shape, generator=gen)
        dmd_loss(y, dmd_gradient(y, _gauss_x0(mu_real, var, y_t, t), _gauss_x0(mu_fake, var, y_t, t))).backward()
        y = (y - 0.05 * y.numel() * y.grad).detach()
    assert abs(float(y.mean()) - mu_real) < abs(float(x.detach().mean()) - mu_real) - 0.5


@pytest.fixture(scope="module")
def causal_student():
    from longgen.backbones import build_tiny
    from longgen.extend.causal import BlockCausalConfig, apply_block_causal

    adapter = build_tiny("wan", seed=0)
    handle = apply_block_causal(adapter, BlockCausalConfig(chunk_size=1))
    cond = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False, num_frames=9, height=32, width=32)[0]
    yield adapter, handle.cache, cond
    handle.remove()


def _sigmas():
    from longgen.samplers.causal import warped_sigmas

    return warped_sigmas([1000, 750, 500, 250], shift=5.0)


def test_rollout_at_the_last_exit_step_is_the_causal_sampler(causal_student):
    from longgen.samplers.causal import sample_causal
    from longgen.training.rollout import self_forcing_rollout

    adapter, cache, cond = causal_student
    noise = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = self_forcing_rollout(
            lambda x, s: adapter.denoise(x, s, cond), cache, noise, _sigmas(), [3, 3, 3],
            generator=torch.Generator().manual_seed(2),
        )
        want = sample_causal(
            lambda x, s, frame_offset=0: adapter.denoise(x, s, cond), noise, _sigmas(), cache=cache,
            generator=torch.Generator().manual_seed(2), disable=True,
        )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad_from, graded", [(0, (0, 1, 2)), (2, (2,))])
def test_gradient_flows_only_through_the_exit_step(causal_student, grad_from, graded):
    from longgen.training.rollout import self_forcing_rollout

    adapter, cache, cond = causal_student
    calls = []

    def record(module, args, kwargs):
        calls.append((torch.is_grad_enabled(), kwargs["hidden_states"].requires_grad))

    hook = adapter.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        adapter.model.zero_grad(set_to_none=True)
        noise = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
        out = self_forcing_rollout(
            lambda x, s: adapter.denoise(x, s, cond), cache, noise, _sigmas(), [1, 0, 3], grad_from=grad_from
        )
    finally:
        hook.remove()
    # per chunk: exit + 1 denoising calls, then the context pass; grad only at the exit call of graded chunks
    expected = []
    for j, exit_step in enumerate([1, 0, 3]):
        expected += [(i == exit_step and j in graded, False) for i in range(exit_step + 1)] + [(False, False)]
    assert calls == expected
    for layer in cache.layers.values():
        assert all(not k.requires_grad and not v.requires_grad for k, v in layer.values())
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    for j in range(3):  # a chunk's output moves the weights only when it was graded
        grads = torch.autograd.grad(out[:, :, j].sum(), params, retain_graph=True, allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads) == (j in graded), j


def test_dmd_trains_and_resumes_exactly(tmp_path, clips):
    from safetensors.torch import load_file

    from longgen.backbones import build_tiny

    common = [*DMD, "train.steps=4", "train.checkpoint_every=2", "train.keep_last=0", "ema.enabled=true"]
    trainer, straight = run_trainer(tiny_lora_config(tmp_path / "a", clips, *common))
    assert sorted(straight.losses) == [1, 2, 3, 4]
    teacher = trainer.method.teacher.model.state_dict()
    fresh = build_tiny("wan", seed=0).model.state_dict()
    assert all(torch.equal(teacher[k], fresh[k]) for k in fresh)  # the real score stays frozen
    critic = trainer.method.critic.model.state_dict()
    assert any(not torch.equal(critic[k], fresh[k]) for k in fresh)  # the fake score trains
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    _, resumed = run_trainer(tiny_lora_config(tmp_path / "b", clips, *common, f"train.resume={step2}"))
    assert sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[k] for k in (3, 4)] == pytest.approx([straight.losses[k] for k in (3, 4)], abs=1e-6)
    for name in ("trainable_0.safetensors", "trainable_1.safetensors"):  # student LoRA, critic
        a = load_file(tmp_path / "a" / "checkpoints" / "step_00000004" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step_00000004" / name)
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    lora = load_file(os.path.join(straight.final_dir, "pytorch_lora_weights.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)  # the student moved


@pytest.fixture(scope="module")
def other_family_folders(tmp_path_factory):
    from longgen.backbones import build_tiny

    root = tmp_path_factory.mktemp("teachers")
    folders = {}
    for family in ("ltx", "animatediff"):
        build_tiny(family, seed=0).save_pretrained(root / family)
        folders[family] = str(root / family)
    return folders


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.method=dmd"], "set extension.method=block-causal"),
        ([*DMD, "extension.options={chunk_size: 2}"],
         "extension.options.chunk_size=2 does not divide the training clip's 3 latent frames"),
        ([*DMD, "extension.options={chunk_size: 2}", "dmd.rollout_latent_frames=5"],
         "chunk_size=2 does not divide the 5 latent frames of the training rollout"),
        ([*DMD, "dmd.window_latent_frames=3", "dmd.grad_latent_frames=4"], "dmd.grad_latent_frames"),
        ([*DMD, "teacher:ltx"], "must share the family"),
        ([*DMD, "teacher:animatediff"], "is a UNet"),
    ],
)
def test_bad_dmd_input_names_the_fix(tmp_path, clips, other_family_folders, overrides, message):
    from longgen.training.loop import Trainer

    overrides = [f"dmd.teacher={other_family_folders[o.split(':')[1]]}" if o.startswith("teacher:") else o
                 for o in overrides]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Trainer(tiny_lora_config(tmp_path, clips, *overrides))


def test_dmd_under_zero3_names_the_fix(tmp_path, clips, monkeypatch):
    """ZeRO-1/2 train DMD (test_train_dmd_distributed.py); ZeRO-3 is refused with the configs that work."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from longgen.training.loop import Trainer

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    zero3 = SimpleNamespace(zero_stage=3, enable_msamp=False)
    monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", property(lambda self: zero3))
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO-3.*zero2.yaml.*fsdp.yaml"):
        Trainer(tiny_lora_config(tmp_path, clips, *DMD, "ema.enabled=false"))


def test_streaming_long_tuning_rolls_past_the_native_length(tmp_path, clips):
    """LongLive-style: a 3x rollout through a rolling window + sink, DMD on its last native window."""
    overrides = [
        *DMD, "extension.options={chunk_size: 1, local_attn_size: 3, sink_size: 1}", "train.steps=2",
        "dmd.rollout_latent_frames=9", "dmd.window_latent_frames=3", "dmd.grad_latent_frames=2",
    ]  # fmt: skip
    trainer, result = run_trainer(tiny_lora_config(tmp_path, clips, *overrides))
    assert sorted(result.losses) == [1, 2] and all(v == v for v in result.losses.values())
    assert trainer.method.cache.frames == [0, 8]  # the sink and the newest frame: the window rolled (sink 1 + 2 recent, own chunk included)


def test_validation_streams_a_long_clip_and_logs_drift(tmp_path, clips):
    """In-loop validation: the student streams a long clip through its cache, scored for drift (and by the
    synthetic scorer against the prompted world), logged to tensorboard and written beside the clip."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from longgen.data.synthetic import load_manifest
    from longgen.io import read_video

    caption = load_manifest(clips)[0]["caption"]
    overrides = [*DMD, "train.steps=2", "validation.every=2", "validation.drift_metrics=true",
                 "validation.report_to=tensorboard", "validation.num_frames=25", f'validation.prompt="{caption}"']
    trainer, _ = run_trainer(tiny_lora_config(tmp_path, clips, *overrides))
    assert trainer.method.cache.frames == list(range(7))  # streamed through the student's cache, not resampled
    clip = tmp_path / "validation" / "step_00000002.mp4"
    assert read_video(str(clip)).shape[0] == 25  # 7 latent frames: over twice the native 3
    scores = json.loads((tmp_path / "validation" / "step_00000002.json").read_text())
    for key in ("synthetic/overall/mean", "synthetic/overall/end_minus_start", "drift/ssim_first/end_minus_start"):
        assert isinstance(scores[key], float), scores
    events = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "logs") for f in fs if "tfevents" in f]
    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"validation/synthetic/overall/mean", "dmd/generator_loss", "dmd/critic_loss"} <= set(tags), tags


def test_dmd_on_a_second_family(tmp_path, clips):
    """LTX-Video (joint text-video attention off, its own RoPE) distils through the same method, CFG on."""
    trainer, result = run_trainer(tiny_lora_config(
        tmp_path, clips, *DMD, "model.tiny=ltx", "train.steps=1", "dmd.generator_every=1", "dmd.guidance_scale=3",
    ))  # fmt: skip
    assert trainer.adapter.family == "ltx" and result.step == 1
    assert trainer.method.metrics["dmd/generator_loss"] > 0 and trainer.method.cache.frames
