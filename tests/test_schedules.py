"""longgen.schedules against the definitions it cites."""

import pytest
import torch
from diffusers import DDIMScheduler

from longgen.schedules import (
    VPSchedule,
    ddim_step,
    edm_sigma_to_flow,
    flow_sigma_to_edm,
    flow_sigmas,
    shift_sigma,
    vp_coefficients,
)


def test_flow_sigmas_match_sd3_shift_equation():
    sig = flow_sigmas(4, shift=3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    expected = 3.0 * t / (1 + 2.0 * t)  # Esser et al. 2024, Eq. 23
    torch.testing.assert_close(sig[:-1], expected)
    assert sig[-1] == 0 and sig[0] == 1
    assert torch.all(sig[1:] < sig[:-1])


def test_shift_one_is_identity():
    t = torch.rand(10)
    torch.testing.assert_close(shift_sigma(t, 1.0), t)


def test_edm_flow_round_trip():
    sigma = torch.tensor([0.01, 0.3, 0.5, 0.99])
    torch.testing.assert_close(edm_sigma_to_flow(flow_sigma_to_edm(sigma)), sigma)
    torch.testing.assert_close(flow_sigma_to_edm(torch.tensor(0.5)), torch.tensor(1.0))


def test_ddim_step_recovers_forward_process():
    """With the true x0, a DDIM step lands exactly on (1 - s') x0 + s' eps for the same eps."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    s, s_next = torch.tensor(0.8), torch.tensor(0.3)
    x = (1 - s) * x0 + s * eps
    torch.testing.assert_close(ddim_step(x, x0, s, s_next), (1 - s_next) * x0 + s_next * eps)
    torch.testing.assert_close(ddim_step(x, x0, s, torch.tensor(0.0)), x0)


def test_ddim_step_keeps_clean_frames_and_broadcasts_per_frame():
    x, x0 = torch.randn(1, 2, 3, 1, 1), torch.randn(1, 2, 3, 1, 1)
    sigma = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1, 1)
    out = ddim_step(x, x0, sigma, sigma * 0.5)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])
    assert not torch.allclose(out[:, :, 1], x[:, :, 1])


@pytest.fixture(scope="module")
def ddpm():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return sched, VPSchedule(sched.alphas_cumprod)


def test_vp_schedule_is_exact_at_integer_timesteps(ddpm):
    sched, vp = ddpm
    t = torch.tensor([0, 1, 250, 999])
    sigma = vp.timestep_to_sigma(t)
    ab = sched.alphas_cumprod[t].double()
    # flow sigma of a VP level: s = sqrt((1 - ab) / ab), sigma = s / (1 + s)
    s = ((1 - ab) / ab).sqrt()
    torch.testing.assert_close(sigma, s / (1 + s))
    torch.testing.assert_close(vp.sigma_to_timestep(sigma), t.double(), atol=1e-6, rtol=0)


def test_vp_coefficients_map_flow_sample_to_vp_sample(ddpm):
    _, vp = ddpm
    t = torch.tensor([10.0, 500.0, 990.0])
    sigma = vp.timestep_to_sigma(t).float()
    a, r, scale = vp_coefficients(vp, sigma)
    x0, eps = torch.randn(3), torch.randn(3)
    x_flow = (1 - sigma) * x0 + sigma * eps
    torch.testing.assert_close(scale * x_flow, a * x0 + r * eps)


def test_vp_sigmas_follow_ddim_trailing_spacing(ddpm):
    sched, vp = ddpm
    sched.register_to_config(timestep_spacing="trailing")
    sched.set_timesteps(10)
    sig = vp.sigmas(10, spacing="trailing")
    torch.testing.assert_close(sig[:-1].double(), vp.timestep_to_sigma(sched.timesteps), atol=1e-7, rtol=0)
    assert sig[-1] == 0
    with pytest.raises(ValueError, match="spacing"):
        vp.sigmas(10, spacing="bogus")
