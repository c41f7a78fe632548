"""Long-video metrics that need no downloaded weights, each as a series over time.

Every metric turns a clip of uint8 frames ``[N, H, W, 3]`` into a :class:`Series`: one value per frame,
per pair of frames or per temporal segment, each tagged with the frame position it belongs to. The
series is then averaged per window of frames (:func:`window_means`) to give a curve over time, and
summarised (:func:`summarize`) with the two drift measures long-video papers use: the contrast between
the first and the last 15% of the clip (FramePack's anti-drifting evaluation) and the least-squares
slope per 100 frames, plus the mean change of each window from the first window (LV-Bench's VDE idea).

Metrics (``METRICS`` holds their direction, unit and description):

- ``temporal_flicker``: VBench's (255 - mean|f_t - f_{t+1}|) / 255 between consecutive frames.
- ``temporal_hf_energy`` / ``temporal_hf_ratio``: FreeLong's diagnosis (Lu et al. 2024) that long clips
  gain temporal high frequencies; FFT over time of detrended, Hann-windowed luma segments.
- ``sharpness`` (variance of the Laplacian) and ``spatial_hf_energy``: FreeLong's other half, loss of
  spatial high frequencies.
- ``ssim_prev`` / ``psnr_prev`` / ``ssim_first`` / ``psnr_first``: SSIM (Wang et al. 2004, Gaussian
  window) and PSNR to the previous and to the first frame.
- ``color_hist_drift`` / ``luminance_drift``: colour-histogram distance and mean-luma change from the
  first frame.
- ``warping_error``: Lai et al. (2018) flow warping error with a forward-backward occlusion mask
  (Sundaram et al. 2010).
- ``motion_smoothness``: VBench's frame-interpolation protocol with classical flow instead of a learned
  interpolator; ``motion_magnitude`` / ``dynamic_degree``: VBench's dynamic degree with classical flow.
- ``coherence_gap{g}``: SSIM between frames ``g`` apart, for ``g`` in 2, 5, 10, 20, 50.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

PSNR_CAP_DB = 100.0
"""PSNR of identical frames (infinite) is reported as this value so that means and JSON stay finite."""

DEFAULT_GAPS: tuple[int, ...] = (2, 5, 10, 20, 50)
EDGE_FRACTION = 0.15

# VBench dynamic degree: mean of the top 5% flow magnitudes above 6 px at a 256-px short side.
DYNAMIC_TOP_FRACTION = 0.05
DYNAMIC_THRESHOLD_PX = 6.0
DYNAMIC_REFERENCE_SIDE = 256.0

# Forward-backward consistency constants of Sundaram et al. (2010), as used by Ruder et al. (2016).
OCCLUSION_ALPHA = 0.01
OCCLUSION_BETA = 0.5


@dataclass(frozen=True)
class MetricInfo:
    """How to read a metric: which direction is better, its unit and a one-line description."""

    higher_is_better: bool | None
    unit: str
    description: str


METRICS: dict[str, MetricInfo] = {
    "temporal_flicker": MetricInfo(True, "[0,1]", "VBench temporal flicker (255 - mean|f_t - f_t+1|)/255"),
    "temporal_hf_energy": MetricInfo(False, "[0,1] RMS", "RMS luma of temporal frequencies >= cutoff"),
    "temporal_hf_ratio": MetricInfo(
        False, "fraction", "share of temporal (non-trend) energy at high frequency"
    ),
    "sharpness": MetricInfo(True, "grey^2", "variance of the Laplacian of luma"),
    "spatial_hf_energy": MetricInfo(True, "[0,1] RMS", "RMS luma of spatial frequencies >= cutoff cycles/px"),
    "ssim_prev": MetricInfo(True, "[0,1]", "SSIM of luma to the previous frame"),
    "psnr_prev": MetricInfo(True, "dB", f"PSNR of RGB to the previous frame (capped at {PSNR_CAP_DB:g})"),
    "ssim_first": MetricInfo(True, "[0,1]", "SSIM of luma to the first frame"),
    "psnr_first": MetricInfo(True, "dB", f"PSNR of RGB to the first frame (capped at {PSNR_CAP_DB:g})"),
    "color_hist_drift": MetricInfo(False, "[0,1]", "per-channel histogram Wasserstein-1 distance to frame 0"),
    "luminance_drift": MetricInfo(None, "[-1,1]", "mean luma minus the first frame's (0 is ideal)"),
    "warping_error": MetricInfo(False, "MSE [0,1]", "flow warping error on non-occluded pixels"),
    "motion_smoothness": MetricInfo(
        True, "[0,1]", "VBench motion smoothness with classical-flow interpolation"
    ),
    "motion_magnitude": MetricInfo(None, "px/frame @256", "mean of the top 5% flow magnitudes"),
    "dynamic_degree": MetricInfo(
        None, "fraction", "share of frame pairs whose motion exceeds VBench's threshold"
    ),
}
for _gap in DEFAULT_GAPS:
    METRICS[f"coherence_gap{_gap}"] = MetricInfo(True, "[0,1]", f"SSIM of luma between frames {_gap} apart")


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of ``name`` (coherence at any gap included)."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith("coherence_gap") and name[len("coherence_gap") :].isdigit():
        gap = name[len("coherence_gap") :]
        return MetricInfo(True, "[0,1]", f"SSIM of luma between frames {gap} apart")
    raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}")


@dataclass
class Series:
    """Raw values of one metric along a clip.

    ``positions[i]`` is the frame index value ``i`` belongs to: the later frame of a pair, the frame
    itself, or the centre of a temporal segment (possibly fractional).
    """

    name: str
    positions: np.ndarray  # [M] float
    values: np.ndarray  # [M] float

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1)
        self.values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        if self.positions.shape != self.values.shape:
            raise ValueError(f"{self.name}: {self.positions.size} positions but {self.values.size} values")

    @property
    def info(self) -> MetricInfo:
        return metric_info(self.name)


# ----------------------------------------------------------------------------- input and basic ops


def as_frames(frames: np.ndarray) -> np.ndarray:
    """Check and return a clip as contiguous uint8 ``[N, H, W, 3]``; float input in [0, 1] is converted."""
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [N, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("the clip has no frames")
    if frames.dtype != np.uint8:
        if not np.issubdtype(frames.dtype, np.floating):
            raise ValueError(f"expected uint8 frames or floats in [0, 1], got dtype {frames.dtype}")
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(frames)


def luma(frame: np.ndarray) -> np.ndarray:
    """BT.601 luma of one RGB frame ``[H, W, 3]`` (uint8) as float64 ``[H, W]`` in [0, 255]."""
    f = frame.astype(np.float64)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def ssim(a: np.ndarray, b: np.ndarray, *, sigma: float = 1.5, data_range: float = 255.0) -> float:
    """Mean SSIM of two grey images (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03.

    As in the reference implementation, the mean is taken over the 'valid' part of the SSIM map (a
    border of 5 pixels is dropped) when the image is larger than the window.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim needs two grey images of one shape, got {a.shape} and {b.shape}")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    radius = int(3.5 * sigma + 0.5)  # 5 for sigma 1.5 -> 11 taps

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    if min(a.shape) > 2 * radius:
        ssim_map = ssim_map[radius:-radius, radius:-radius]
    return float(ssim_map.mean())


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 255.0) -> float:
    """PSNR in dB of two images of one shape; identical images give :data:`PSNR_CAP_DB`."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if mse <= data_range**2 * 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return 10.0 * math.log10(data_range**2 / mse)


# ----------------------------------------------------------------------------- pixel metrics


def temporal_flicker(frames: np.ndarray) -> Series:
    """VBench temporal flicker: (255 - mean|f_t - f_{t+1}|) / 255 per consecutive pair (1 = no change)."""
    frames = as_frames(frames)
    n = frames.shape[0]
    vals = [
        (255.0 - np.abs(frames[t].astype(np.int16) - frames[t + 1].astype(np.int16)).mean()) / 255.0
        for t in range(n - 1)
    ]
    return Series("temporal_flicker", np.arange(1, n), vals)


def temporal_high_frequency(
    frames: np.ndarray, *, segment: int = 16, cutoff: float = 0.25
) -> tuple[Series, Series]:
    """FreeLong's temporal high-frequency diagnosis (Lu et al. 2024) on luma, per temporal segment.

    Segments of ``segment`` frames (hop ``segment // 2``) are detrended per pixel (mean and linear
    trend removed, so steady motion or a slow fade is not counted), Hann-windowed and Fourier
    transformed over time. Returns ``temporal_hf_energy``, the RMS amplitude (in [0, 1] units) of the
    frequencies >= ``cutoff`` cycles/frame, and ``temporal_hf_ratio``, their share of the remaining
    temporal energy (0 where a segment has none). Clips shorter than 4 frames give empty series.
    Read the ratio with the energy: on a nearly static clip it is a share of almost nothing (8-bit
    rounding of a slow fade, for instance) and can be large while the energy is negligible.
    """
    frames = as_frames(frames)
    n = frames.shape[0]
    length = min(segment, n)
    if length < 4:
        empty = np.zeros(0)
        return Series("temporal_hf_energy", empty, empty), Series("temporal_hf_ratio", empty, empty)
    hop = max(1, length // 2)
    starts = list(range(0, n - length + 1, hop))
    if starts[-1] != n - length:
        starts.append(n - length)
    tc = np.arange(length, dtype=np.float64) - (length - 1) / 2.0  # centred time
    hann = np.hanning(length + 2)[1:-1]  # strictly positive taps
    freqs = np.fft.rfftfreq(length)
    # Full-spectrum weight of each rfft bin (the bins other than DC and Nyquist stand for two).
    weight = np.full(freqs.shape, 2.0)
    weight[0] = 1.0
    if length % 2 == 0:
        weight[-1] = 1.0
    high = freqs >= cutoff
    energy_vals, ratio_vals, positions = [], [], []
    for s in starts:
        x = np.stack([luma(f) for f in frames[s : s + length]]) / 255.0  # (L, H, W)
        x = x - x.mean(axis=0, keepdims=True)
        slope = np.tensordot(tc, x, axes=(0, 0)) / np.sum(tc * tc)  # (H, W)
        x = (x - tc[:, None, None] * slope[None]) * hann[:, None, None]
        power = np.abs(np.fft.rfft(x, axis=0)) ** 2 * weight[:, None, None]  # (L//2+1, H, W)
        # Parseval: sum_t y^2 = sum_k |Y_k|^2 / L; divide by sum(w^2) to get the signal's mean power.
        per_bin = power.reshape(power.shape[0], -1).mean(axis=1) / (length * np.sum(hann**2))
        high_power = float(per_bin[high].sum())
        total = float(per_bin[1:].sum())
        energy_vals.append(math.sqrt(high_power))
        ratio_vals.append(high_power / total if total > 1e-12 else 0.0)
        positions.append(s + (length - 1) / 2.0)
    return (
        Series("temporal_hf_energy", positions, energy_vals),
        Series("temporal_hf_ratio", positions, ratio_vals),
    )


def _radial_frequency(height: int, width: int) -> np.ndarray:
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    return np.sqrt(fx * fx + fy * fy)  # cycles per pixel, 0 .. 0.707


def spatial_sharpness(frames: np.ndarray, *, cutoff: float = 0.25) -> tuple[Series, Series]:
    """Per-frame spatial detail, FreeLong's spatial symptom (long clips lose high frequencies):
    ``sharpness``, the variance of the Laplacian of luma, and ``spatial_hf_energy``, the RMS amplitude
    (in [0, 1] units) of the Hann-windowed luma spectrum at radial frequency >= ``cutoff`` cycles/pixel.

    Both are absolute, so blur lowers them whatever the content (a high-frequency *share* would rise
    again on a heavily blurred frame, where 8-bit rounding noise is all that is left)."""
    frames = as_frames(frames)
    n, h, w = frames.shape[:3]
    window = np.outer(np.hanning(h + 2)[1:-1], np.hanning(w + 2)[1:-1])
    high = _radial_frequency(h, w) >= cutoff
    # Parseval with a window: mean power of the signal ~ sum |Y|^2 / (H W sum(w^2)).
    norm = h * w * float(np.sum(window**2))
    sharp, energy = [], []
    for f in frames:
        y = luma(f)
        sharp.append(float(cv2.Laplacian(y, cv2.CV_64F, ksize=1).var()))
        power = np.abs(np.fft.fft2((y - y.mean()) * window)) ** 2
        energy.append(math.sqrt(float(power[high].sum()) / norm) / 255.0)
    pos = np.arange(n)
    return Series("sharpness", pos, sharp), Series("spatial_hf_energy", pos, energy)


def similarity_to_previous_and_first(frames: np.ndarray) -> dict[str, Series]:
    """``ssim_prev``, ``psnr_prev``, ``ssim_first``, ``psnr_first`` for every frame after the first."""
    frames = as_frames(frames)
    n = frames.shape[0]
    first_luma = luma(frames[0])
    prev_luma = first_luma
    out: dict[str, list[float]] = {"ssim_prev": [], "psnr_prev": [], "ssim_first": [], "psnr_first": []}
    for t in range(1, n):
        cur = luma(frames[t])
        out["ssim_prev"].append(ssim(prev_luma, cur))
        out["psnr_prev"].append(psnr(frames[t - 1], frames[t]))
        out["ssim_first"].append(ssim(first_luma, cur))
        out["psnr_first"].append(psnr(frames[0], frames[t]))
        prev_luma = cur
    pos = np.arange(1, n)
    return {name: Series(name, pos, vals) for name, vals in out.items()}


def _channel_cdfs(frame: np.ndarray) -> np.ndarray:
    hist = np.stack([np.bincount(frame[..., c].reshape(-1), minlength=256) for c in range(3)])  # (3, 256)
    cdf = np.cumsum(hist, axis=1).astype(np.float64)
    return cdf / cdf[:, -1:]


def color_drift(frames: np.ndarray) -> tuple[Series, Series]:
    """Drift from the first frame: ``color_hist_drift``, the per-channel Wasserstein-1 distance between
    256-bin colour histograms (mean over R, G, B; a uniform shift of d grey levels gives d/255), and
    ``luminance_drift``, the signed change of mean luma (in [-1, 1])."""
    frames = as_frames(frames)
    n = frames.shape[0]
    cdf0 = _channel_cdfs(frames[0])
    luma0 = luma(frames[0]).mean()
    hist_d, lum_d = [], []
    for t in range(1, n):
        hist_d.append(float(np.abs(_channel_cdfs(frames[t]) - cdf0).sum(axis=1).mean() / 255.0))
        lum_d.append(float((luma(frames[t]).mean() - luma0) / 255.0))
    pos = np.arange(1, n)
    return Series("color_hist_drift", pos, hist_d), Series("luminance_drift", pos, lum_d)


def long_horizon_coherence(frames: np.ndarray, gaps: Iterable[int] = DEFAULT_GAPS) -> dict[str, Series]:
    """``coherence_gap{g}``: SSIM of luma between frames ``t`` and ``t + g`` (at position ``t + g``),
    for each gap shorter than the clip; longer gaps are left out."""
    frames = as_frames(frames)
    n = frames.shape[0]
    gaps = sorted(set(int(g) for g in gaps))
    if any(g <= 0 for g in gaps):
        raise ValueError(f"coherence gaps must be positive, got {gaps}")
    gaps = [g for g in gaps if g < n]
    vals: dict[int, list[float]] = {g: [] for g in gaps}
    # Keep only the last max(gaps) + 1 lumas: memory stays bounded however long the clip is.
    recent: deque[np.ndarray] = deque(maxlen=(max(gaps) + 1) if gaps else 1)
    for t in range(n):
        recent.append(luma(frames[t]).astype(np.float32))
        for g in gaps:
            if t >= g:
                vals[g].append(ssim(recent[-1 - g], recent[-1]))
    return {f"coherence_gap{g}": Series(f"coherence_gap{g}", np.arange(g, n), vals[g]) for g in gaps}


# ----------------------------------------------------------------------------- optical flow metrics


def optical_flow(a: np.ndarray, b: np.ndarray, method: str = "farneback") -> np.ndarray:
    """Dense flow ``[H, W, 2]`` (dx, dy) from grey uint8 image ``a`` to ``b``: ``a(p) ~ b(p + flow(p))``.

    ``method``: ``"farneback"`` (Farneback 2003) or ``"dis"`` (Kroeger et al. 2016, OpenCV preset medium).
    """
    if method == "farneback":
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(a, b, None)
    raise ValueError(f"unknown flow method {method!r}; pass 'farneback' or 'dis'")


def _sample(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image(p + flow(p))`` by bilinear sampling (border replicated)."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = gx + flow[..., 0].astype(np.float32)
    map_y = gy + flow[..., 1].astype(np.float32)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _inside(flow: np.ndarray) -> np.ndarray:
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w), np.arange(h))
    x = gx + flow[..., 0]
    y = gy + flow[..., 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def occlusion_mask(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels whose flow is trusted: forward-backward consistent and landing inside the frame.

    Sundaram et al. (2010) criterion: |F + B(p + F)|^2 <= alpha (|F|^2 + |B(p + F)|^2) + beta.
    """
    back_at = _sample(backward, forward)
    err = np.sum((forward + back_at) ** 2, axis=-1)
    bound = OCCLUSION_ALPHA * (np.sum(forward**2, axis=-1) + np.sum(back_at**2, axis=-1)) + OCCLUSION_BETA
    return (err <= bound) & _inside(forward)


def _downscale(frame: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = frame.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return frame
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def flow_metrics(
    frames: np.ndarray, *, method: str = "farneback", max_side: int | None = 256
) -> dict[str, Series]:
    """Classical-flow metrics on frames scaled so the longer side is at most ``max_side``.

    - ``warping_error`` per pair (Lai et al. 2018): mean over non-occluded pixels of the squared RGB
      difference (in [0, 1] units) between frame t and frame t+1 warped back by the forward flow.
    - ``motion_magnitude`` and ``dynamic_degree`` per pair (VBench): the mean of the top 5% forward flow
      magnitudes, rescaled to a 256-pixel short side, and whether it exceeds 6 pixels.
    - ``motion_smoothness`` per inner frame (VBench's protocol, classical flow): frame t is interpolated
      from frames t-1 and t+1 with Super SloMo's intermediate-flow approximation (Jiang et al. 2018),
      F_{t->0} = -F_{0->1}/4 + F_{1->0}/4, and scored (255 - mean|interpolated - real|) / 255.
    """
    frames = as_frames(frames)
    small = [_downscale(f, max_side) for f in frames]
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in small]
    n = len(small)
    h, w = grey[0].shape
    side_scale = DYNAMIC_REFERENCE_SIDE / min(h, w)
    warp_err, magnitude, dynamic = [], [], []
    for t in range(n - 1):
        fwd = optical_flow(grey[t], grey[t + 1], method)
        bwd = optical_flow(grey[t + 1], grey[t], method)
        valid = occlusion_mask(fwd, bwd)
        warped = _sample(small[t + 1].astype(np.float32) / 255.0, fwd)
        sq = np.mean((small[t].astype(np.float32) / 255.0 - warped) ** 2, axis=-1)
        warp_err.append(float(sq[valid].mean()) if valid.any() else float("nan"))
        mag = np.sqrt(np.sum(fwd**2, axis=-1)).reshape(-1) * side_scale
        k = max(1, int(round(DYNAMIC_TOP_FRACTION * mag.size)))
        top = float(np.partition(mag, mag.size - k)[-k:].mean())
        magnitude.append(top)
        dynamic.append(1.0 if top > DYNAMIC_THRESHOLD_PX else 0.0)
    smooth = []
    for t in range(1, n - 1):
        f01 = optical_flow(grey[t - 1], grey[t + 1], method)
        f10 = optical_flow(grey[t + 1], grey[t - 1], method)
        ft0 = -0.25 * f01 + 0.25 * f10
        ft1 = 0.25 * f01 - 0.25 * f10
        interp = 0.5 * (
            _sample(small[t - 1].astype(np.float32), ft0) + _sample(small[t + 1].astype(np.float32), ft1)
        )
        smooth.append(float((255.0 - np.abs(interp - small[t].astype(np.float32)).mean()) / 255.0))
    pairs = np.arange(1, n)
    return {
        "warping_error": Series("warping_error", pairs, warp_err),
        "motion_magnitude": Series("motion_magnitude", pairs, magnitude),
        "dynamic_degree": Series("dynamic_degree", pairs, dynamic),
        "motion_smoothness": Series("motion_smoothness", np.arange(1, n - 1), smooth),
    }


# ----------------------------------------------------------------------------- windows and summaries


def window_bounds(num_frames: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of the windows: every ``stride`` frames (default ``window``), the
    last one aligned to the clip's end; a clip shorter than ``window`` is one window."""
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    stride = window if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1 frame, got {stride}")
    if num_frames <= window:
        return [(0, num_frames)]
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return [(s, s + window) for s in starts]


def window_means(
    series: Series, num_frames: int, window: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Window centres (frame index) and the mean of the values whose position falls in each window
    (NaN for a window with none, e.g. coherence at a gap longer than the window's start)."""
    bounds = window_bounds(num_frames, window, stride)
    centres = np.array([(s + e - 1) / 2.0 for s, e in bounds])
    means = np.full(len(bounds), np.nan)
    finite = np.isfinite(series.values)
    for i, (s, e) in enumerate(bounds):
        sel = finite & (series.positions >= s) & (series.positions < e)
        if sel.any():
            means[i] = series.values[sel].mean()
    return centres, means


def json_number(x: float) -> float | None:
    """``x`` as a float, or None when it is NaN or infinite (JSON has no NaN)."""
    return float(x) if np.isfinite(x) else None


def summarize(series: Series, window_values: np.ndarray | None = None) -> dict[str, float | int | None]:
    """Summary of one metric along a clip.

    - ``mean`` of all values;
    - ``start`` / ``end``: means over the first and the last 15% of the values in time order (at least
      one each) and ``end_minus_start`` (FramePack's start-vs-end contrast);
    - ``slope_per_100_frames``: least-squares slope of value against frame position, times 100;
    - ``window_drift`` (when ``window_values`` is given): mean |window_k - window_0| over later windows,
      the per-chunk change from the first chunk (LV-Bench's VDE idea).
    Undefined entries are ``None``.
    """
    finite = np.isfinite(series.values)
    pos = series.positions[finite]
    val = series.values[finite]
    out: dict[str, float | int | None] = {"count": int(val.size)}
    if val.size == 0:
        out.update(mean=None, start=None, end=None, end_minus_start=None, slope_per_100_frames=None)
    else:
        order = np.argsort(pos, kind="stable")
        pos, val = pos[order], val[order]
        k = max(1, int(math.ceil(EDGE_FRACTION * val.size)))
        start, end = float(val[:k].mean()), float(val[-k:].mean())
        if np.ptp(pos) > 0:
            pc = pos - pos.mean()
            slope = float(np.sum(pc * (val - val.mean())) / np.sum(pc * pc)) * 100.0
        else:
            slope = None
        out.update(
            mean=float(val.mean()),
            start=start,
            end=end,
            end_minus_start=end - start,
            slope_per_100_frames=slope,
        )
    if window_values is not None:
        wv = np.asarray(window_values, dtype=np.float64)
        wv = wv[np.isfinite(wv)]
        out["window_drift"] = float(np.abs(wv[1:] - wv[0]).mean()) if wv.size > 1 else None
    return out


ALL_GROUPS = ("flicker", "temporal_hf", "spatial", "similarity", "color", "flow", "coherence")


def compute_series(
    frames: np.ndarray,
    *,
    groups: Sequence[str] = ALL_GROUPS,
    gaps: Iterable[int] = DEFAULT_GAPS,
    flow_method: str = "farneback",
    flow_max_side: int | None = 256,
    hf_segment: int = 16,
    temporal_cutoff: float = 0.25,
    spatial_cutoff: float = 0.25,
) -> dict[str, Series]:
    """All raw metric series of a clip (``groups`` picks a subset of :data:`ALL_GROUPS`)."""
    frames = as_frames(frames)
    unknown = set(groups) - set(ALL_GROUPS)
    if unknown:
        raise ValueError(f"unknown metric groups {sorted(unknown)}; choose from {ALL_GROUPS}")
    steps: dict[str, Callable[[], Iterable[Series]]] = {
        "flicker": lambda: [temporal_flicker(frames)],
        "temporal_hf": lambda: temporal_high_frequency(frames, segment=hf_segment, cutoff=temporal_cutoff),
        "spatial": lambda: spatial_sharpness(frames, cutoff=spatial_cutoff),
        "similarity": lambda: similarity_to_previous_and_first(frames).values(),
        "color": lambda: color_drift(frames),
        "flow": lambda: flow_metrics(frames, method=flow_method, max_side=flow_max_side).values(),
        "coherence": lambda: long_horizon_coherence(frames, gaps).values(),
    }
    out: dict[str, Series] = {}
    for group in ALL_GROUPS:
        if group in groups:
            for s in steps[group]():
                out[s.name] = s
    return out


BLANK_STD = 2.0
"""A frame whose luma standard deviation is below this (grey levels of 255) is uniform: blank."""
STATIC_DIFF = 0.5
"""Consecutive frames whose mean absolute difference is below this (of 255) do not change: static."""
TEMPORAL_BY_CONSTRUCTION = "temporal_flicker, ssim_prev, psnr_prev, warping_error, motion_smoothness and stream_t"


def clip_caveats(frames: np.ndarray) -> list[str]:
    """Warnings for clips on which metrics score well by construction: a blank clip (uniform frames) and a
    static one (frames that never change) score a perfect flicker, SSIM and warping error without being a good
    video. Empty for an ordinary clip."""
    frames = as_frames(frames)
    caveats = []
    stds = np.array([luma(f).std() for f in frames])
    if (stds < BLANK_STD).all():
        caveats.append(
            f"blank clip: every frame is uniform (luma std < {BLANK_STD:g} of 255), so {TEMPORAL_BY_CONSTRUCTION}, "
            "SSIM to the first frame and coherence are (near-)perfect by construction, not by quality"
        )
    elif frames.shape[0] > 1:
        diffs = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
        if (diffs < STATIC_DIFF).all():
            caveats.append(
                f"static clip: no frame differs from the previous one (mean |diff| < {STATIC_DIFF:g} of 255), "
                f"so {TEMPORAL_BY_CONSTRUCTION} are (near-)perfect by construction"
            )
    return caveats


def evaluate_frames(
    frames: np.ndarray,
    *,
    window: int = 16,
    stride: int | None = None,
    series: dict[str, Series] | None = None,
    **kwargs,
) -> dict:
    """Every metric of a clip per window, with its summary, as a JSON-ready dict::

        {"num_frames": N, "height": H, "width": W, "window": window, "stride": stride,
         "caveats": [clip_caveats strings],
         "metrics": {name: {"higher_is_better", "unit", "description",
                            "positions": [window centres], "values": [window means],
                            "summary": {...see summarize...}}}}

    ``kwargs`` go to :func:`compute_series` (``series``: already computed series, then no ``kwargs``). Missing
    values are ``None``.
    """
    frames = as_frames(frames)
    n, h, w = frames.shape[:3]
    if series is None:
        series = compute_series(frames, **kwargs)
    elif kwargs:
        raise ValueError(f"pass either series or compute_series options, not both (got {sorted(kwargs)})")
    metrics = {}
    for name, s in series.items():
        centres, means = window_means(s, n, window, stride)
        info = s.info
        metrics[name] = {
            "higher_is_better": info.higher_is_better,
            "unit": info.unit,
            "description": info.description,
            "positions": [float(c) for c in centres],
            "values": [json_number(v) for v in means],
            "summary": summarize(s, means),
        }
    return {
        "num_frames": int(n),
        "height": int(h),
        "width": int(w),
        "window": int(window),
        "stride": int(window if stride is None else stride),
        "caveats": clip_caveats(frames) + _window_caveats(int(n), int(window)),
        "metrics": metrics,
    }


def _window_caveats(num_frames: int, window: int) -> list[str]:
    """A clip too short for what was asked: one frame has no metric over time; a window past its end is cut."""
    if num_frames < 2:
        return [f"the clip has {num_frames} frame: no metric over time (every one needs 2 frames or more) is reported"]
    if window > num_frames:
        return [f"window of {window} frames is longer than the clip's {num_frames}: one window of the whole clip"]
    return []
