"""Long-video samplers: pure functions ``sample_<name>(denoise, noise, schedule, **knobs)``."""

from .base import Denoiser, fusion_weights, window_starts
from .diffusion_forcing import sample_diffusion_forcing, scheduler_sigmas
from .fifo import sample_fifo
from .full import sample_full
from .sliding import sample_sliding

__all__ = [
    "Denoiser",
    "fusion_weights",
    "sample_diffusion_forcing",
    "sample_fifo",
    "sample_full",
    "sample_sliding",
    "scheduler_sigmas",
    "window_starts",
]
