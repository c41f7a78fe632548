"""Drift scores of a validation clip (``validation.drift_metrics``): error accumulation over training steps.

A streaming student's failure mode is drift: quality that decays along a long rollout. Every validation clip
is scored with the project's drift metrics (:func:`longgen.eval.metrics.evaluate_frames`: per-window means
and the end-minus-start change) and, when the validation prompt is a caption of the synthetic world the run
trains on, with the synthetic scorer (:func:`longgen.eval.synthetic_score.score_clip`: object count, colour,
size, motion against the prompted world; 1 = perfect). The scalars go to the trackers (tensorboard/wandb)
and to ``validation/step_<N>.json`` beside the clip.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DRIFT_METRICS", "drift_scalars", "synthetic_world"]

DRIFT_METRICS = ("temporal_flicker", "ssim_first", "color_hist_drift", "luminance_drift", "sharpness")
"""Pixel metrics logged per validation clip (mean and end-minus-start each)."""


def synthetic_world(config, output_dir: str, prompt: str):
    """The synthetic :class:`~longgen.data.synthetic.WorldSpec` whose caption is ``prompt`` in the run's data
    (``data.source``, or the synthetic set written under the output folder), or None."""
    from ..data.synthetic import WorldSpec, load_manifest

    source = config.data.source or os.path.join(output_dir, "synthetic_data")
    manifest = source if source.endswith(".jsonl") else os.path.join(source, "manifest.jsonl")
    if not os.path.isfile(manifest):
        return None
    for record in load_manifest(manifest):
        world = record.get("world")
        if world is not None and record.get("caption") == prompt:
            return world if isinstance(world, WorldSpec) else WorldSpec.from_dict(world)
    return None


def drift_scalars(path: str, world=None, window: int = 8) -> dict[str, float]:
    """``{"drift/<metric>/mean": ..., "drift/<metric>/end_minus_start": ...}`` of the clip at ``path`` (and
    ``synthetic/<score>/...`` against ``world``); undefined values are left out."""
    from ..eval.metrics import evaluate_frames
    from ..io import read_video

    frames = read_video(path)
    window = max(2, min(window, len(frames) // 2))
    report = evaluate_frames(frames, window=window)
    out: dict[str, float] = {}
    for name in DRIFT_METRICS:
        _add(out, f"drift/{name}", report["metrics"].get(name, {}).get("summary", {}))
    if world is not None:
        from ..eval.synthetic_score import score_clip

        scores = score_clip(frames, world, window=window)["scores"]
        for name in ("overall", "count", "color", "size", "motion"):
            _add(out, f"synthetic/{name}", scores.get(name, {}).get("summary", {}))
    return out


def _add(out: dict[str, Any], prefix: str, summary: dict) -> None:
    for key in ("mean", "end_minus_start"):
        value = summary.get(key)
        if value is not None:
            out[f"{prefix}/{key}"] = float(value)
