"""Long-video evaluation: metrics over time that need no downloaded weights, reports with plots, and the
model-free scorer for the synthetic bouncing-shapes world."""

from .metrics import METRICS, Series, compute_series, evaluate_frames, summarize, window_means
from .report import evaluate_videos, read_clip
from .seams import seam_boundaries, seam_report, stream_report, stream_t, vde_report, video_drift_error
from .synthetic_score import score_clip, score_video

__all__ = [
    "METRICS",
    "Series",
    "compute_series",
    "evaluate_frames",
    "evaluate_videos",
    "read_clip",
    "score_clip",
    "score_video",
    "seam_boundaries",
    "seam_report",
    "stream_report",
    "stream_t",
    "summarize",
    "vde_report",
    "video_drift_error",
    "window_means",
]
