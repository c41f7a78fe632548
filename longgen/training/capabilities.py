"""Adapter capability probes of the trainer, one named helper each.

The trainer asks the backbone adapter a few questions (is it a two-expert model, does it need an image,
which noise schedule / parameterisation does it train with). Each question is answered here and
nowhere else, so a move to typed adapter capabilities changes this module only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["expert_count", "prediction", "requires_image_condition", "sigma_data", "vp_schedule"]


def expert_count(adapter: Any) -> int:
    """Denoising networks of the model (2 for Wan 2.2 A14B's high/low-noise experts, else 1)."""
    experts = getattr(adapter, "experts", None)
    return 1 if experts is None else len(experts())


def requires_image_condition(adapter: Any) -> bool:
    """True for image-to-video models, whose cond needs a conditioning image besides the prompt."""
    return bool(getattr(adapter, "requires_image_condition", False))


def vp_schedule(adapter: Any):
    """The adapter's discrete variance-preserving schedule (AnimateDiff, CogVideoX), or None for flow models."""
    from ..schedules import VPSchedule

    schedule = getattr(adapter, "schedule", None)
    return schedule if isinstance(schedule, VPSchedule) else None


def prediction(adapter: Any) -> str:
    """The model's native parameterisation (flow, eps, v, edm_v): what its native loss weights."""
    return getattr(adapter, "prediction", "flow")


def sigma_data(adapter: Any) -> float:
    """EDM's sigma_data of the model's preconditioning (1 when it has none)."""
    return float(getattr(adapter, "sigma_data", 1.0))
