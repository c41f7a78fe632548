"""Shared tiny training fixtures: one small synthetic clip set per session, a LoRA recipe builder, a run helper."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> str:
    """Four 13-frame 32x32 synthetic videos with captions (a manifest path)."""
    from longgen.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("clips"), num_videos=4, num_frames=13, height=32, width=32
    )
