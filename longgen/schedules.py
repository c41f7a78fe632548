"""Noise levels in one convention, and the conversions to each model family's own.

longgen's single noise convention (used by every sampler and every adapter's ``denoise``):

    x = (1 - sigma) * x0 + sigma * eps,      sigma in [0, 1]   (rectified-flow / "flow" sigma)

Every diffusion parameterisation is a rescaling of the variance-exploding form ``x0 + s * eps``
(Karras et al. 2022, Table 1), so each converts exactly:

* flow matching (Wan, SkyReels-V2, LTX, HunyuanVideo):  identical; model timestep = sigma * 1000.
* variance preserving DDPM / DDIM (AnimateDiff eps, CogVideoX v):  with s = sigma / (1 - sigma),
  alpha_bar = 1 / (1 + s^2) and x_vp = sqrt(alpha_bar) * x / (1 - sigma).
* EDM (Stable Video Diffusion):  the EDM noise level *is* s, and x_edm = x / (1 - sigma).

Samplers step in this convention with the DDIM / Euler update in x0 form (:func:`ddim_step`), which is
the same update whatever the model's own parameterisation, because the conversions are linear in x.
"""

from __future__ import annotations

import torch

__all__ = [
    "VPSchedule",
    "ddim_step",
    "edm_sigma_to_flow",
    "flow_sigma_to_edm",
    "flow_sigmas",
    "shift_sigma",
    "vp_coefficients",
    "check_sigma",
]


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift of SD3 (Esser et al. 2024, Eq. 23): sigma' = shift*sigma / (1 + (shift-1)*sigma)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_sigmas(num_steps: int, shift: float = 1.0, sigma_max: float = 1.0, sigma_min: float = 0.0) -> torch.Tensor:
    """Descending flow sigmas ``[num_steps + 1]`` from ``sigma_max`` to 0, evenly spaced then shifted.

    The last entry is always exactly 0 (the clean sample), so ``num_steps`` model calls produce x0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(sigma_max, sigma_min, num_steps + 1, dtype=torch.float64)
    sigmas = shift_sigma(t, shift)
    sigmas[-1] = 0.0
    return sigmas.float()


def flow_sigma_to_edm(sigma: torch.Tensor) -> torch.Tensor:
    """Flow sigma -> variance-exploding (EDM) noise level s = sigma / (1 - sigma)."""
    return sigma / (1.0 - sigma).clamp_min(1e-12)


def edm_sigma_to_flow(s: torch.Tensor) -> torch.Tensor:
    """EDM noise level s -> flow sigma = s / (1 + s)."""
    return s / (1.0 + s)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step (Song et al. 2021, Eq. 12 with eta=0) written in flow sigmas.

    ``x`` at level ``sigma`` and the model's ``x0`` give eps = (x - (1-sigma) x0) / sigma; the result is
    (1 - sigma_next) x0 + sigma_next eps. For flow models this is exactly the Euler step. ``sigma`` and
    ``sigma_next`` broadcast against ``x`` (per-frame levels are ``[B, 1, F, 1, 1]``). Frames already at
    sigma == 0 stay where they are.
    """
    safe = sigma.clamp_min(1e-12)
    eps = (x - (1.0 - sigma) * x0) / safe
    out = (1.0 - sigma_next) * x0 + sigma_next * eps
    return torch.where(sigma > 0, out, x)


class VPSchedule:
    """A discrete variance-preserving schedule (alpha_bar table) seen in flow sigmas.

    Built from a diffusers scheduler's ``alphas_cumprod`` so longgen reuses the scheduler's own math
    (zero-SNR rescaling, CogVideoX's SNR shift, ...). Conversions interpolate linearly in
    log(s) = log(sqrt((1 - alpha_bar) / alpha_bar)) between integer timesteps, so at integer
    timesteps they are exact.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        self.alphas_cumprod = ac
        self.num_train_timesteps = ac.numel()
        self.log_s = 0.5 * torch.log((1.0 - ac) / ac)  # increasing in t

    @property
    def sigma_min(self) -> float:
        return float(edm_sigma_to_flow(self.log_s[0].exp()))

    @property
    def sigma_max(self) -> float:
        return float(edm_sigma_to_flow(self.log_s[-1].exp()))

    def timestep_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp_max(self.num_train_timesteps - 1)
        w = t - lo
        log_s = (1 - w) * self.log_s[lo] + w * self.log_s[hi]
        return edm_sigma_to_flow(log_s.exp())

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep of a flow sigma (clamped into the table's range)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(self.sigma_min, self.sigma_max)
        log_s = torch.log(flow_sigma_to_edm(sigma))
        idx = torch.searchsorted(self.log_s, log_s.reshape(-1).contiguous()).reshape(log_s.shape)
        hi = idx.clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        w = (log_s - self.log_s[lo]) / (self.log_s[hi] - self.log_s[lo])
        return lo.double() + w.clamp(0, 1)

    def alpha_bar(self, sigma: torch.Tensor) -> torch.Tensor:
        """alpha_bar of a flow sigma: 1 / (1 + s^2)."""
        s = flow_sigma_to_edm(sigma)
        return 1.0 / (1.0 + s * s)

    def sigmas(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """DDIM-spaced flow sigmas ``[num_steps + 1]`` ending at 0 (``spacing`` as in diffusers' DDIM)."""
        n = self.num_train_timesteps
        if spacing == "trailing":
            ts = torch.arange(n, 0, -n / num_steps, dtype=torch.float64).round() - 1
        elif spacing == "leading":
            ratio = n // num_steps
            ts = (torch.arange(0, num_steps, dtype=torch.float64) * ratio).flip(0)
        elif spacing == "linspace":
            ts = torch.linspace(0, n - 1, num_steps, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(f"spacing must be 'trailing', 'leading' or 'linspace', got {spacing!r}")
        sig = self.timestep_to_sigma(ts)
        return torch.cat([sig, sig.new_zeros(1)]).float()


def vp_coefficients(schedule: VPSchedule, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar), scale) with x_vp = scale * x_flow, for a flow sigma."""
    ab = schedule.alpha_bar(sigma.double())
    a, r = ab.sqrt(), (1 - ab).sqrt()
    scale = a / (1.0 - sigma.double()).clamp_min(1e-12)
    return a.float(), r.float(), scale.float()


def check_sigma(sigma: torch.Tensor) -> None:
    """Raise a clear error for noise levels outside longgen's flow convention."""
    if sigma.min() < 0 or sigma.max() > 1:
        raise ValueError(f"flow sigmas must lie in [0, 1], got range [{sigma.min():.4g}, {sigma.max():.4g}]")

