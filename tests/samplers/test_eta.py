"""DDIM's eta knob (Song et al. 2021, Eq. 16) in flow sigmas: eta=0 is today's DDIM bit for bit."""

from __future__ import annotations

import pytest
import torch

from longgen.samplers import ddim_eta_step, sample_diffusion_forcing, sample_fifo, sample_full, sample_sliding
from longgen.schedules import ddim_step, flow_sigmas


def _denoise(x, sigma, frame_offset=0):
    return 0.7 * x + 0.01 * frame_offset


def test_eta_zero_is_ddim_bit_for_bit():
    x, x0 = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    torch.testing.assert_close(ddim_eta_step(x, x0, torch.tensor(0.6), torch.tensor(0.3)),
                               ddim_step(x, x0, torch.tensor(0.6), torch.tensor(0.3)), rtol=0, atol=0)
    sigmas = flow_sigmas(5, shift=3.0)
    noise = torch.randn(1, 2, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    x = noise * sigmas[0]
    for i in range(5):  # the pre-eta sample_full loop
        x = ddim_step(x, _denoise(x, None), sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(sample_full(_denoise, noise, sigmas, eta=0.0, disable=True), x, rtol=0, atol=0)


def test_eta_noise_scale_matches_ddim_definition():
    """From x = (1-s) x0 (eps_hat = 0), the step's spread is c = eta s' sqrt(1 - (r'/r)^2), r = s/(1-s)."""
    s, s_next, eta = torch.tensor(0.8), torch.tensor(0.5), 1.0
    x0 = torch.zeros(1, 1, 1, 200, 200)
    out = ddim_eta_step((1 - s) * x0, x0, s, s_next, eta, torch.Generator().manual_seed(0))
    r, r_next = s / (1 - s), s_next / (1 - s_next)
    c = eta * s_next * torch.sqrt(1 - (r_next / r) ** 2)
    assert abs(out.std().item() - c.item()) < 0.01
    # the DDPM posterior's variance (eta = 1): s'^2 - c^2 is the deterministic part's share of s'^2
    assert abs(out.mean().item()) < 0.01


@pytest.mark.parametrize("sampler", ["full", "sliding", "fifo"])
def test_eta_uses_the_generator(sampler):
    noise = torch.randn(1, 2, 8, 2, 2, generator=torch.Generator().manual_seed(0))

    def run(eta, seed):
        gen = torch.Generator().manual_seed(seed)
        if sampler == "fifo":
            return sample_fifo(_denoise, noise, flow_sigmas(8), window=2, num_partitions=4, eta=eta, generator=gen,
                               disable=True)
        if sampler == "sliding":
            return sample_sliding(_denoise, noise, flow_sigmas(4), window=4, stride=2, eta=eta, generator=gen,
                                  disable=True)
        return sample_full(_denoise, noise, flow_sigmas(4), eta=eta, generator=gen, disable=True)

    torch.testing.assert_close(run(1.0, 3), run(1.0, 3), rtol=0, atol=0)
    assert not torch.equal(run(1.0, 3), run(1.0, 4))
    assert not torch.equal(run(1.0, 3), run(0.0, 3))
    assert torch.isfinite(run(1.0, 3)).all()


def test_df_unipc_string_is_diffusers_unipc():
    from diffusers import UniPCMultistepScheduler

    from longgen.samplers import scheduler_sigmas

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    sigmas = scheduler_sigmas(scheduler, 6)
    noise = torch.randn(1, 2, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = sample_diffusion_forcing(_denoise, noise, sigmas, solver=scheduler, ar_step=1, disable=True)
    out = sample_diffusion_forcing(_denoise, noise, sigmas, solver="unipc", ar_step=1, disable=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ddim = sample_diffusion_forcing(_denoise, noise, sigmas, solver="ddim", ar_step=1, disable=True)
    assert not torch.equal(out, ddim)


def test_eta_and_solver_from_the_cli(saved, tmp_path):
    from longgen.cli import main
    from longgen.io import read_video

    outs = []
    for i, extra in enumerate((["--eta", "0"], ["--eta", "1"], ["--eta", "1"])):
        out = tmp_path / f"e{i}.mp4"
        assert main(["generate", "--model", saved("wan"), "--sampler", "sliding", "--steps", "2", "--num-frames", "21",
                     "--out", str(out), "--quiet", *extra]) == 0
        outs.append(read_video(out))
    assert not torch.equal(torch.as_tensor(outs[0]), torch.as_tensor(outs[1]))
    assert torch.equal(torch.as_tensor(outs[1]), torch.as_tensor(outs[2]))  # seeded
    out = tmp_path / "u.mp4"
    assert main(["generate", "--model", saved("wan"), "--sampler", "df", "--solver", "unipc", "--steps", "3",
                 "--num-frames", "21", "--out", str(out), "--quiet"]) == 0
