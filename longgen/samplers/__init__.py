"""Long-video samplers: pure functions ``sample_<name>(denoise, noise, schedule, **knobs)``."""

from .base import Denoiser, fusion_weights, window_starts
from .full import sample_full
from .sliding import sample_sliding

__all__ = ["Denoiser", "fusion_weights", "sample_full", "sample_sliding", "window_starts"]
