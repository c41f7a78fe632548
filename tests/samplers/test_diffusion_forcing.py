"""Diffusion-forcing sampler: reductions, plans followed, chunks with history, streaming, bad inputs."""

import pytest
import torch

from longgen.noise import gaussian_source
from longgen.plans import pyramid_plan
from longgen.samplers import sample_diffusion_forcing, sample_full, scheduler_sigmas
from longgen.schedules import flow_sigmas


class ToyDenoiser:
    """A deterministic x0 that mixes frames and depends on each frame's sigma; records every call."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, x, sigma, frame_offset=0):
        self.calls.append({"x": x.clone(), "sigma": sigma.clone(), "offset": frame_offset})
        s = sigma[:, None, :, None, None]
        return torch.tanh(x) * (1 - 0.5 * s) + 0.3 * x.mean(dim=2, keepdim=True) + 0.01 * frame_offset


def _noise(frames, seed=0):
    return torch.randn(1, 2, frames, 3, 3, generator=torch.Generator().manual_seed(seed))


SIGMAS = flow_sigmas(6, shift=3.0)


def test_ar_step_0_on_one_chunk_equals_full_sampling_exactly():
    noise = _noise(6)
    full = sample_full(ToyDenoiser(), noise, SIGMAS, disable=True)
    df = sample_diffusion_forcing(ToyDenoiser(), noise, SIGMAS, ar_step=0, causal_block_size=3, disable=True)
    assert torch.equal(df, full)
    df_base = sample_diffusion_forcing(ToyDenoiser(), noise, SIGMAS, base_num_latent_frames=6, disable=True)
    assert torch.equal(df_base, full)


def test_async_plan_is_followed():
    noise = _noise(6)
    denoiser = ToyDenoiser()
    out = sample_diffusion_forcing(denoiser, noise, SIGMAS, ar_step=2, causal_block_size=2, disable=True)
    plan = pyramid_plan(6, 6, ar_step=2, causal_block_size=2)
    assert len(denoiser.calls) == plan.shape[0]
    for call, row in zip(denoiser.calls, plan):
        assert torch.equal(call["sigma"][0], SIGMAS[row])
    assert out.shape == noise.shape
    assert (out - sample_full(ToyDenoiser(), noise, SIGMAS, disable=True)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "frames,base,overlap,ar_step,block",
    [
        (6, 6, None, 0, 1),
        (13, 6, 2, 0, 1),
        (14, 6, 2, 1, 2),
        (20, 6, 4, 3, 2),
        (17, 8, None, 3, 2),
        (9, 4, None, 6, 1),
    ],
)
def test_every_mode_returns_the_requested_frames_and_streams_them(frames, base, overlap, ar_step, block):
    streamed = []
    denoiser = ToyDenoiser()
    out = sample_diffusion_forcing(
        denoiser,
        _noise(frames),
        SIGMAS,
        base_num_latent_frames=base,
        overlap_history=overlap,
        ar_step=ar_step,
        causal_block_size=block,
        on_frames=lambda s, x: streamed.append((s, x)),
        disable=True,
    )
    assert out.shape[2] == frames
    assert max(call["x"].shape[2] for call in denoiser.calls) <= base
    starts = [s for s, _ in streamed]
    assert starts == sorted(starts) and starts[0] == 0
    assert torch.equal(torch.cat([x for _, x in streamed], dim=2), out)


def test_oracle_denoiser_gives_its_clean_video_in_every_mode():
    """With an x0 that knows the clean video (by absolute frame index), every frame ends exactly on it."""
    target = _noise(15, seed=7)

    def oracle(x, sigma, frame_offset=0):
        return target[:, :, frame_offset : frame_offset + x.shape[2]]

    for kwargs in [
        {},
        {"base_num_latent_frames": 6, "overlap_history": 2, "ar_step": 1},
        {"base_num_latent_frames": 6, "ar_step": 3, "causal_block_size": 2},
    ]:
        out = sample_diffusion_forcing(oracle, _noise(15), SIGMAS, disable=True, **kwargs)
        assert torch.equal(out, target), kwargs


def test_chunks_carry_clean_history_and_offsets():
    noise = _noise(10)
    denoiser = ToyDenoiser()
    out = sample_diffusion_forcing(
        denoiser, noise, SIGMAS, base_num_latent_frames=6, overlap_history=2, disable=True
    )
    first, second = denoiser.calls[:6], denoiser.calls[6:]
    assert [c["offset"] for c in first] == [0] * 6 and [c["offset"] for c in second] == [4] * 6
    for call in second:  # history frames 4, 5 shown clean at sigma 0 and never changed
        assert torch.equal(call["x"][:, :, :2], out[:, :, 4:6])
        assert (call["sigma"][:, :2] == 0).all()
    # the new frames of chunk 2 start from their own noise
    assert torch.equal(second[0]["x"][:, :, 2:], noise[:, :, 6:10] * SIGMAS[0])
    assert out.shape[2] == 10


def test_addnoise_condition_renoises_what_the_model_sees_only():
    noise = _noise(10)
    denoiser = ToyDenoiser()
    g = torch.Generator().manual_seed(3)
    out = sample_diffusion_forcing(
        denoiser,
        noise,
        SIGMAS,
        base_num_latent_frames=6,
        overlap_history=2,
        addnoise_condition=20,
        generator=g,
        disable=True,
    )
    eps_gen = torch.Generator().manual_seed(3)
    for call in denoiser.calls[6:]:
        eps = torch.randn(call["x"][:, :, :2].shape, generator=eps_gen)
        torch.testing.assert_close(call["x"][:, :, :2], out[:, :, 4:6] * 0.98 + 0.02 * eps, atol=1e-6, rtol=0)
        assert torch.allclose(call["sigma"][:, :2], torch.tensor(0.02))
    plain = sample_diffusion_forcing(
        ToyDenoiser(), noise, SIGMAS, base_num_latent_frames=6, overlap_history=2, disable=True
    )
    assert torch.equal(out[:, :, :6], plain[:, :, :6]) and not torch.equal(out[:, :, 6:], plain[:, :, 6:])


def test_noise_source_and_return_latents_false():
    shape = (1, 2, 3, 3)
    streamed = []
    got = sample_diffusion_forcing(
        ToyDenoiser(),
        gaussian_source(shape, torch.Generator().manual_seed(0)),
        SIGMAS,
        num_latent_frames=11,
        base_num_latent_frames=5,
        overlap_history=1,
        on_frames=lambda s, x: streamed.append(x),
        return_latents=False,
        disable=True,
    )
    assert got is None and sum(x.shape[2] for x in streamed) == 11
    again = sample_diffusion_forcing(
        ToyDenoiser(),
        gaussian_source(shape, torch.Generator().manual_seed(0)),
        SIGMAS,
        num_latent_frames=11,
        base_num_latent_frames=5,
        overlap_history=1,
        disable=True,
    )
    assert torch.equal(torch.cat(streamed, dim=2), again)


def test_per_frame_scheduler_synchronous_equals_one_scheduler_on_the_clip():
    """One deep-copied UniPC per frame stepped in lockstep is the stock loop with one UniPC for the clip."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    sigmas = scheduler_sigmas(scheduler, 5)
    noise = _noise(4)
    out = sample_diffusion_forcing(ToyDenoiser(), noise, sigmas, solver=scheduler, disable=True)
    ref_sched = UniPCMultistepScheduler.from_config(scheduler.config)
    ref_sched.set_timesteps(5)
    x = noise * sigmas[0]
    toy = ToyDenoiser()
    for k, t in enumerate(ref_sched.timesteps):
        x0 = toy(x, sigmas[k].expand(1, 4))
        x = ref_sched.step((x - x0) / sigmas[k], t, x, return_dict=False)[0]
    assert torch.equal(out, x)  # elementwise scheduler math: per-frame copies are bit-identical
    assert (out - sample_diffusion_forcing(ToyDenoiser(), noise, sigmas, disable=True)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="scheduler_sigmas"):
        sample_diffusion_forcing(ToyDenoiser(), noise, SIGMAS[:-1], solver=scheduler, disable=True)


def test_bad_inputs_name_the_fix():
    noise = _noise(20)
    with pytest.raises(ValueError, match="Use ar_step >= 2"):
        sample_diffusion_forcing(
            ToyDenoiser(), noise, SIGMAS, base_num_latent_frames=8, ar_step=1, causal_block_size=2
        )
    with pytest.raises(ValueError, match="smaller overlap_history"):
        sample_diffusion_forcing(ToyDenoiser(), noise, SIGMAS, base_num_latent_frames=8, overlap_history=8)
    with pytest.raises(ValueError, match="overlap_history=4 or 6"):
        sample_diffusion_forcing(
            ToyDenoiser(), noise, SIGMAS, base_num_latent_frames=8, overlap_history=5, causal_block_size=2
        )
    with pytest.raises(ValueError, match="base_num_latent_frames=6"):
        sample_diffusion_forcing(
            ToyDenoiser(), noise, SIGMAS, base_num_latent_frames=7, ar_step=6, causal_block_size=2
        )
    with pytest.raises(ValueError, match="addnoise_condition"):
        sample_diffusion_forcing(ToyDenoiser(), noise, SIGMAS, addnoise_condition=1000)
    with pytest.raises(ValueError, match="solver must be"):
        sample_diffusion_forcing(ToyDenoiser(), noise, SIGMAS, solver="euler")
    with pytest.raises(ValueError, match="num_latent_frames"):
        sample_diffusion_forcing(ToyDenoiser(), gaussian_source((1, 2, 3, 3)), SIGMAS)
