"""Score a clip against a synthetic bouncing-shapes world (``longgen.data.synthetic``) with no learned model.

Per frame, each of the world's objects is found by colour segmentation: every pixel takes the nearest of
the background and object colours (or none when all are far), and the largest connected component of an
object's colour is that object. From the detections over time come five scores in [0, 1], 1 being the
truth:

- ``count``: 1 - |detected - expected| / expected, counting every sizeable component of an object
  colour (so a vanished object and a duplicated one both cost);
- ``color``: per object, 1 - |mean core colour - true colour| / 100 (RGB units), 0 when missing;
- ``size``: per object, 1 - |log(area / true area)| / log 2, 0 when missing; left out while the object
  touches another (occlusion is part of the world, not an error);
- ``motion``: per object and inner frame, whether the centre at t+1 is within a tolerance of the
  constant-velocity prediction 2 c(t) - c(t-1), or of its mirror image in a wall the object reaches
  (an elastic bounce): the acceleration residual;
- ``speed_stability``: per window, min(s / s0, s0 / s) of the mean object speed against the first
  window's, so motion that dies out (or runs away) over a long clip shows.

``speed_vs_spec`` (the same ratio against the world's true speed) and ``motion_residual_px`` are reported
as well but left out of ``overall``, the mean of the five scores per window. Every score is a curve over
windows with the same summary as the pixel metrics (start vs end, slope per 100 frames), so drift shows.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from longgen.data.synthetic import WorldSpec

from .metrics import MetricInfo, Series, as_frames, json_number, summarize, window_means

UNKNOWN_COLOR_DIST = 110.0
"""A pixel farther than this (RGB Euclidean) from the background and every object colour is unlabelled."""
COLOR_TOLERANCE = 100.0
MIN_AREA_FRACTION = 0.25
"""A component smaller than this share of an object's true area is noise, not an object."""
CONTACT_PX = 2
SCORE_NAMES = ("count", "color", "size", "motion", "speed_stability")
SCORE_DESCRIPTIONS: dict[str, str] = {
    "overall": "mean of count, color, size, motion, speed_stability",
    "count": "objects found vs the world's (1 - |found - true| / true)",
    "color": "objects' colour vs the true colour (1 - RGB distance / 100)",
    "size": "objects' area vs the true area (1 - |log ratio| / log 2)",
    "motion": "share of steps consistent with constant velocity / bounces",
    "speed_stability": "mean object speed vs the first window's (min ratio)",
    "speed_vs_spec": "mean object speed vs the world's true speed (min ratio)",
    "motion_residual_px": "distance of centres from the constant-velocity prediction",
    "speed_px": "mean object speed",
}
"""What each synthetic score measures, against the world the prompt describes (plot titles, tables)."""
SCORE_UNITS: dict[str, str] = {"motion_residual_px": "px", "speed_px": "px/frame"}
"""Units of the diagnostics; every other score is in [0, 1], 1 = the world's truth (higher is better)."""


def score_info(name: str) -> MetricInfo:
    """The :class:`~longgen.eval.metrics.MetricInfo` (direction, unit, what it measures) of a synthetic score."""
    if name not in SCORE_DESCRIPTIONS:
        raise KeyError(f"unknown synthetic score {name!r}; known: {sorted(SCORE_DESCRIPTIONS)}")
    better = {"motion_residual_px": False, "speed_px": None}.get(name, True)
    unit = SCORE_UNITS.get(name, "[0,1], 1 = truth")
    return MetricInfo(better, unit, SCORE_DESCRIPTIONS[name])


@dataclass
class Detections:
    """Per-frame detections of a world's ``K`` objects in ``N`` frames."""

    found: np.ndarray  # [N, K] bool
    centers: np.ndarray  # [N, K, 2] (x, y) continuous pixel coordinates, NaN when missing
    areas: np.ndarray  # [N, K] pixels, 0 when missing
    colors: np.ndarray  # [N, K, 3] mean RGB of the object's core, NaN when missing
    contact: np.ndarray  # [N, K] bool: touches another object's colour (possible occlusion)
    count: np.ndarray  # [N] sizeable components of the world's colours


def detect_objects(frames: np.ndarray, world: WorldSpec) -> Detections:
    """Find each object of ``world`` in every frame by nearest-colour labelling and connected components."""
    frames = as_frames(frames)
    n, h, w = frames.shape[:3]
    k_obj = len(world.shapes)
    palette = np.array([world.background] + [s.rgb for s in world.shapes], dtype=np.float32)  # (K+1, 3)
    min_areas = [max(2.0, MIN_AREA_FRACTION * s.area_px(h, w)) for s in world.shapes]
    found = np.zeros((n, k_obj), bool)
    centers = np.full((n, k_obj, 2), np.nan)
    areas = np.zeros((n, k_obj))
    colors = np.full((n, k_obj, 3), np.nan)
    contact = np.zeros((n, k_obj), bool)
    count = np.zeros(n, int)
    kernel = np.ones((3, 3), np.uint8)
    for t in range(n):
        f = frames[t].astype(np.float32)
        dist2 = ((f[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # (H, W, K+1)
        label = dist2.argmin(-1)
        label[dist2.min(-1) > UNKNOWN_COLOR_DIST**2] = -1
        for k in range(k_obj):
            mask = (label == k + 1).astype(np.uint8)
            num, comp, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
            sizes = stats[1:, cv2.CC_STAT_AREA]
            big = np.nonzero(sizes >= min_areas[k])[0]
            count[t] += big.size
            if big.size == 0:
                continue
            best = 1 + big[np.argmax(sizes[big])]
            obj = (comp == best).astype(np.uint8)
            found[t, k] = True
            # Sub-pixel area and centre from soft membership: each pixel near the component that is
            # not another object's counts by how far its colour lies from the background towards the
            # object's (anti-aliased and blurred edges count by their covered fraction).
            near = cv2.dilate(obj, kernel).astype(bool) & ((label == 0) | (label == k + 1) | (label == -1))
            direction = palette[k + 1] - palette[0]
            alpha = np.clip((f[near] - palette[0]) @ direction / float(direction @ direction), 0.0, 1.0)
            ys, xs = np.nonzero(near)
            areas[t, k] = float(alpha.sum())
            centers[t, k] = (
                float((alpha * (xs + 0.5)).sum() / alpha.sum()),
                float((alpha * (ys + 0.5)).sum() / alpha.sum()),
            )
            core = cv2.erode(obj, kernel)
            sel = core.astype(bool) if core.any() else obj.astype(bool)
            colors[t, k] = frames[t][sel].mean(axis=0)
            grown = cv2.dilate(obj, kernel, iterations=CONTACT_PX).astype(bool)
            others = (label >= 1) & (label != k + 1)
            contact[t, k] = bool((grown & others).any())
    return Detections(found, centers, areas, colors, contact, count)


def _bounce_candidates(p: np.ndarray, lo: np.ndarray, hi: np.ndarray, tol: float) -> list[np.ndarray]:
    """The constant-velocity prediction ``p`` and its mirror images in the walls it reaches."""
    per_axis = []
    for a in range(2):
        opts = [p[a]]
        if p[a] < lo[a] + tol:
            opts.append(2 * lo[a] - p[a])
        if p[a] > hi[a] - tol:
            opts.append(2 * hi[a] - p[a])
        per_axis.append(opts)
    return [np.array([x, y]) for x in per_axis[0] for y in per_axis[1]]


def motion_tolerance_px(height: int, width: int) -> float:
    """Largest acceleration residual still counted as plausible: 1 px, or 2% of the short side."""
    return max(1.0, 0.02 * min(height, width))


def score_detections(det: Detections, world: WorldSpec, height: int, width: int) -> dict[str, Series]:
    """Raw per-frame score series (see the module docstring) from :func:`detect_objects` output."""
    n, k_obj = det.found.shape
    pos = np.arange(n)
    count = np.clip(1.0 - np.abs(det.count - k_obj) / k_obj, 0.0, 1.0)

    true_rgb = np.array([s.rgb for s in world.shapes], dtype=np.float64)  # (K, 3)
    col_err = np.linalg.norm(det.colors - true_rgb[None], axis=-1)  # (N, K), NaN when missing
    color_k = np.where(det.found, np.clip(1.0 - np.nan_to_num(col_err) / COLOR_TOLERANCE, 0.0, 1.0), 0.0)
    color = color_k.mean(axis=1)

    true_area = np.array([s.area_px(height, width) for s in world.shapes])
    with np.errstate(divide="ignore"):
        log_ratio = np.abs(np.log(np.maximum(det.areas, 1e-9) / true_area[None]))
    size_k = np.where(det.found, np.clip(1.0 - log_ratio / math.log(2.0), 0.0, 1.0), 0.0)
    size_k[det.found & det.contact] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a frame where every object is in contact: NaN
        size = np.nanmean(size_k, axis=1)

    tol = motion_tolerance_px(height, width)
    clean = det.found & ~det.contact  # (N, K)
    motion_pos, motion_vals, residual_vals = [], [], []
    for t in range(1, n - 1):
        ok, res = [], []
        for k, s in enumerate(world.shapes):
            if not (clean[t - 1, k] and clean[t, k] and clean[t + 1, k]):
                continue
            r = s.radius_px(height, width)
            lo = np.array([r, r])
            hi = np.array([width - r, height - r])
            pred = 2 * det.centers[t, k] - det.centers[t - 1, k]
            resid = min(
                np.linalg.norm(det.centers[t + 1, k] - c) for c in _bounce_candidates(pred, lo, hi, tol)
            )
            res.append(resid)
            ok.append(1.0 if resid <= tol else 0.0)
        if ok:
            motion_pos.append(t)
            motion_vals.append(float(np.mean(ok)))
            residual_vals.append(float(np.mean(res)))

    return {
        "count": Series("count", pos, count),
        "color": Series("color", pos, color),
        "size": Series("size", pos, size),
        "motion": Series("motion", motion_pos, motion_vals),
        "motion_residual_px": Series("motion_residual_px", motion_pos, residual_vals),
    }


def object_speeds(det: Detections) -> np.ndarray:
    """Per-object speed ``[N, K]`` in px/frame, |c(t) - c(t-1)|, NaN where either frame is not a clean
    detection (missing or touching another object) and in frame 0."""
    clean = det.found & ~det.contact
    speeds = np.full(clean.shape, np.nan)
    step = np.linalg.norm(det.centers[1:] - det.centers[:-1], axis=-1)  # (N-1, K)
    ok = clean[1:] & clean[:-1]
    speeds[1:][ok] = step[ok]
    return speeds


def _ratio_score(measured: np.ndarray, reference: np.ndarray | float) -> np.ndarray:
    """min(m / r, r / m) in [0, 1] (1 when equal, 0 when either is 0); NaN stays NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.minimum(measured / reference, reference / measured)
    both_zero = (np.asarray(measured) == 0) & (np.asarray(reference) == 0)
    out = np.where(both_zero, 1.0, out)
    return np.where(np.isnan(measured) | np.isnan(reference), np.nan, np.nan_to_num(out, nan=0.0, posinf=0.0))


def score_clip(frames: np.ndarray, world: WorldSpec, *, window: int = 16, stride: int | None = None) -> dict:
    """Score a clip against ``world``: per-window curves and summaries of every score, and ``overall``.

    Returns a JSON-ready dict::

        {"num_frames", "height", "width", "num_objects", "window", "stride", "overall": float,
         "scores": {name: {"positions": [window centres], "values": [...], "summary": {...}}}}

    with names ``count``, ``color``, ``size``, ``motion``, ``speed_stability``, ``overall`` (the mean of
    the five per window) and the diagnostics ``speed_vs_spec``, ``motion_residual_px``, ``speed_px``.
    """
    frames = as_frames(frames)
    n, h, w = frames.shape[:3]
    det = detect_objects(frames, world)
    raw = score_detections(det, world, h, w)
    windows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in raw:
        windows[name] = window_means(raw[name], n, window, stride)
    centres = windows["count"][0]
    # Speed per object and window, compared per object (objects differ in speed, and which of them is
    # cleanly tracked changes from window to window).
    speeds = object_speeds(det)  # (N, K)
    per_obj = np.stack(
        [
            window_means(Series("speed", np.arange(n), speeds[:, k]), n, window, stride)[1]
            for k in range(speeds.shape[1])
        ],
        axis=1,
    )  # (num_windows, K)
    first = np.array([col[np.isfinite(col)][0] if np.isfinite(col).any() else np.nan for col in per_obj.T])
    true_speed = np.array([s.speed_px(h, w) for s in world.shapes])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # windows with no clean track give NaN
        windows["speed_stability"] = (centres, np.nanmean(_ratio_score(per_obj, first[None]), axis=1))
        windows["speed_vs_spec"] = (centres, np.nanmean(_ratio_score(per_obj, true_speed[None]), axis=1))
        windows["speed_px"] = (centres, np.nanmean(per_obj, axis=1))
    stacked = np.stack([windows[name][1] for name in SCORE_NAMES])  # (5, num_windows)
    # A score is undefined in a window without a clean object track (occlusion, or nothing found, which
    # count, color and size already punish); the overall mean skips it there, and is 0 if all are.
    defined = np.isfinite(stacked)
    overall = np.where(defined, stacked, 0.0).sum(axis=0) / np.maximum(defined.sum(axis=0), 1)
    windows["overall"] = (centres, overall)

    scores = {}
    for name in (*SCORE_NAMES, "overall", "speed_vs_spec", "motion_residual_px", "speed_px"):
        c, v = windows[name]
        if name in raw:
            summary = summarize(raw[name], v)
        else:  # window-level scores: summarise the window curve itself
            summary = summarize(Series(name, c, v), v)
        scores[name] = {
            "positions": [float(x) for x in c],
            "values": [json_number(x) for x in v],
            "summary": summary,
        }
    overall = scores["overall"]["summary"]["mean"]
    return {
        "num_frames": int(n),
        "height": int(h),
        "width": int(w),
        "num_objects": len(world.shapes),
        "window": int(window),
        "stride": int(window if stride is None else stride),
        "overall": overall,
        "scores": scores,
    }


def score_video(
    path: str | os.PathLike, world: WorldSpec, *, window: int = 16, stride: int | None = None
) -> dict:
    """:func:`score_clip` on a video file (read with ``longgen.io.read_video``), with ``path`` added."""
    from longgen.io import read_video

    result = score_clip(read_video(path), world, window=window, stride=stride)
    result["path"] = os.fspath(path)
    return result
