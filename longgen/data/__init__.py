"""Video data: the synthetic long-video world (``longgen.data.synthetic``)."""

from .synthetic import (
    PALETTE,
    ShapeSpec,
    WorldSpec,
    load_manifest,
    render_clip,
    sample_world,
    trajectories,
    write_synthetic_dataset,
)

__all__ = [
    "PALETTE",
    "ShapeSpec",
    "WorldSpec",
    "load_manifest",
    "render_clip",
    "sample_world",
    "trajectories",
    "write_synthetic_dataset",
]
