"""Seam and drift metrics of chunked long videos: seam ratios, LV-Bench's VDE and STREAM-T.

- **Seam ratio** (a chunk-boundary discontinuity test): the frame-to-frame jump at each boundary where two
  generated chunks meet (or where the generated continuation starts after the input frames) divided by the
  median of the same jump over consecutive frames inside chunks. A clip without seams scores ~1 everywhere;
  a visible seam (a colour, exposure or content jump) scores well above. Four jumps are measured: mean
  absolute pixel difference, mean-luma jump, per-channel mean colour jump and 1 - SSIM of luma (SSIM: Wang
  et al. 2004).
- **VDE**, Video Drift Error (LV-Bench, ZIP Lab 2025, ``vde.py`` of the Hugging Face repo ZIPLABHuggingface/LVG-Bench): the clip
  cut into N equal chunks (remainder frames dropped), a metric m_i per chunk, and
  VDE = sum_{i>=2} (N - i + 1) |m_i - m_1| / m_1 (early drift weighs more); lower is better, 0 is no drift.
- **STREAM-T** (Kim et al. 2024, "STREAM: spatio-temporal evaluation and analysis metric for video generative
  models", pro2nit/STREAM ``stream/stream.py``): per window of frames, the temporal Fourier amplitude of each
  embedding dimension is fitted by a power law and summarised by its skewness statistic; STREAM-T is the
  squared Pearson correlation of the per-dimension histograms of that statistic between a reference set and
  the evaluated set (1 is best). Here, with no reference video set, the reference is the clip's own first half
  of windows and the evaluated set its second half: 1 means the temporal spectrum of the late clip matches
  that of the early clip. With the default embedding (16x16 grey pixels) it is a rough, weight-free proxy
  for the SwAV/DINOv2 features of the paper.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

from .metrics import MetricInfo, Series, as_frames, json_number, luma, ssim

JUMP_KINDS = ("pixel", "luma", "color", "ssim")
"""The jumps between consecutive frames that seam ratios compare (see :func:`frame_jumps`)."""

JUMP_FLOOR = {"pixel": 0.5, "luma": 0.5, "color": 0.5, "ssim": 1e-3}
"""Least within-chunk median a ratio divides by (grey levels of 255, or 1 - SSIM): a static clip's zero
median would make any seam infinite, and a clip whose mean colour stays put would divide by codec noise;
half a grey level is below what the eye sees as a jump."""

SEAM_METRICS: dict[str, MetricInfo] = {
    "seam_ratio": MetricInfo(False, "ratio", "jump at a chunk boundary / median within-chunk jump (~1 is seamless)"),
    "vde": MetricInfo(False, "weighted relative change", "LV-Bench video drift error of a per-chunk metric"),
    "stream_t": MetricInfo(True, "[0,1]", "STREAM-T of the clip's late windows against its early windows"),
    "brightness": MetricInfo(None, "[0,1]", "mean luma of a frame"),
    "contrast": MetricInfo(None, "[0,1]", "standard deviation of luma of a frame"),
    "colorfulness": MetricInfo(None, "grey levels", "Hasler and Suesstrunk (2003) colourfulness of a frame"),
}

VDE_SERIES = (
    "brightness",
    "contrast",
    "colorfulness",
    "sharpness",
    "spatial_hf_energy",
    "temporal_flicker",
    "ssim_prev",
    "psnr_prev",
    "warping_error",
    "motion_smoothness",
    "motion_magnitude",
)
"""Series whose per-chunk means VDE compares (those computed): per-frame statistics and the per-pair
metrics of :mod:`longgen.eval.metrics`; drifts measured from frame 0 (ssim_first, ...) are left out, their
first chunk is ~perfect by construction."""


# ----------------------------------------------------------------------------- seams


def frame_jumps(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Jumps between consecutive frames, entry ``t - 1`` for the pair (t - 1, t):

    ``pixel`` mean |f_t - f_{t-1}| over pixels and channels; ``luma`` |mean luma_t - mean luma_{t-1}|;
    ``color`` mean over R, G, B of |mean channel_t - mean channel_{t-1}| (all in grey levels of 255);
    ``ssim`` 1 - SSIM of the two lumas."""
    frames = as_frames(frames)
    out: dict[str, list[float]] = {k: [] for k in JUMP_KINDS}
    prev = frames[0]
    prev_luma = luma(prev)
    for t in range(1, frames.shape[0]):
        cur = frames[t]
        cur_luma = luma(cur)
        out["pixel"].append(float(np.abs(cur.astype(np.int16) - prev.astype(np.int16)).mean()))
        out["luma"].append(abs(float(cur_luma.mean() - prev_luma.mean())))
        delta = cur.reshape(-1, 3).mean(axis=0) - prev.reshape(-1, 3).mean(axis=0)
        out["color"].append(float(np.abs(delta).mean()))
        out["ssim"].append(1.0 - ssim(prev_luma, cur_luma))
        prev, prev_luma = cur, cur_luma
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def seam_boundaries(
    num_frames: int,
    *,
    seams: Sequence[int] | None = None,
    chunk_frames: int | None = None,
    input_frames: int | None = None,
) -> dict[int, str]:
    """Boundaries ``{b: kind}`` (b: first frame after the boundary, between frames b - 1 and b).

    ``seams`` lists them directly (kind ``"chunk"``); ``chunk_frames`` N adds one every N frames after the
    input; ``input_frames`` M adds the continuation boundary M (kind ``"input"``) and starts the chunks there
    (boundaries M + N, M + 2N, ...). Every boundary must lie in 1 .. num_frames - 1."""
    if chunk_frames is not None and chunk_frames < 1:
        raise ValueError(f"--chunk-frames must be >= 1, got {chunk_frames}")
    if input_frames is not None and not 0 < input_frames < num_frames:
        raise ValueError(
            f"--input-frames {input_frames} is outside the clip: it has {num_frames} frames, so the input/"
            f"continuation boundary must be 1 .. {num_frames - 1}"
        )
    start = input_frames or 0
    if chunk_frames is not None and chunk_frames >= num_frames - start:
        raise ValueError(
            f"--chunk-frames {chunk_frames} leaves no chunk boundary in a clip of {num_frames} frames"
            + (f" after {start} input frames" if start else "")
            + f"; pass a chunk length below {num_frames - start} (the frames one generated chunk decodes to)"
        )
    out: dict[int, str] = {}
    for b in seams or ():
        if not 0 < int(b) < num_frames:
            raise ValueError(
                f"--seams {b} is outside the clip: it has {num_frames} frames, so a seam (the first frame of a "
                f"new chunk) must be 1 .. {num_frames - 1}"
            )
        out[int(b)] = "chunk"
    if chunk_frames is not None:
        for b in range(start + chunk_frames, num_frames, chunk_frames):
            out.setdefault(b, "chunk")
    if input_frames:
        out[int(input_frames)] = "input"
    return dict(sorted(out.items()))


def seam_report(frames: np.ndarray, boundaries: dict[int, str]) -> dict:
    """Seam ratios of a clip at ``boundaries`` (:func:`seam_boundaries`), JSON-ready::

        {"boundaries": [{"frame": b, "kind", "jump": {kind: d}, "ratio": {kind: d / median within}}],
         "within_median": {kind: m}, "max_ratio": {kind}, "mean_ratio": {kind}, "worst_frame": b,
         "pairs": {"positions": [1..N-1], kind: [jumps]}, "caveats": [...]}

    The denominator is the median jump over consecutive pairs inside chunks, floored at :data:`JUMP_FLOOR`.
    """
    frames = as_frames(frames)
    n = frames.shape[0]
    if n < 3:
        raise ValueError(f"seam ratios need at least 3 frames, the clip has {n}")
    jumps = frame_jumps(frames)
    at_seam = np.zeros(n - 1, dtype=bool)
    for b in boundaries:
        at_seam[b - 1] = True
    caveats = []
    if at_seam.all():
        raise ValueError("every frame pair is a boundary: no within-chunk frames to compare the seams with")
    medians, floored = {}, []
    for kind in JUMP_KINDS:
        m = float(np.median(jumps[kind][~at_seam]))
        if m < JUMP_FLOOR[kind]:
            floored.append(kind)
        medians[kind] = max(m, JUMP_FLOOR[kind])
    if "pixel" in floored:  # mean luma / colour medians below the floor are the usual case: not worth a note
        caveats.append(
            f"within-chunk frames barely change (median pixel jump below {JUMP_FLOOR['pixel']} grey levels); the "
            "ratios divide by that floor, so they show the seam's size against near-static content"
        )
    rows = []
    for b, kind_of in boundaries.items():
        jump = {k: float(jumps[k][b - 1]) for k in JUMP_KINDS}
        rows.append(
            {"frame": int(b), "kind": kind_of, "jump": jump, "ratio": {k: jump[k] / medians[k] for k in JUMP_KINDS}}
        )
    ratios = {k: [r["ratio"][k] for r in rows] for k in JUMP_KINDS}
    worst = max(rows, key=lambda r: max(r["ratio"].values()))["frame"] if rows else None
    return {
        "boundaries": rows,
        "within_median": medians,
        "max_ratio": {k: (max(v) if v else None) for k, v in ratios.items()},
        "mean_ratio": {k: (float(np.mean(v)) if v else None) for k, v in ratios.items()},
        "worst_frame": worst,
        "pairs": {"positions": list(range(1, n)), **{k: [float(x) for x in jumps[k]] for k in JUMP_KINDS}},
        "caveats": caveats,
    }


# ----------------------------------------------------------------------------- VDE


def frame_statistics(frames: np.ndarray) -> dict[str, Series]:
    """Per-frame ``brightness`` (mean luma / 255), ``contrast`` (luma std / 255) and ``colorfulness``
    (Hasler and Suesstrunk 2003: sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2), rg = R - G,
    yb = (R + G) / 2 - B) for VDE."""
    frames = as_frames(frames)
    bright, contrast, colorful = [], [], []
    for f in frames:
        y = luma(f) / 255.0
        bright.append(float(y.mean()))
        contrast.append(float(y.std()))
        r, g, b = (f[..., c].astype(np.float64) for c in range(3))
        rg, yb = r - g, 0.5 * (r + g) - b
        colorful.append(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))
    pos = np.arange(frames.shape[0])
    return {
        "brightness": Series("brightness", pos, bright),
        "contrast": Series("contrast", pos, contrast),
        "colorfulness": Series("colorfulness", pos, colorful),
    }


def video_drift_error(chunk_values: Sequence[float]) -> float:
    """LV-Bench VDE of per-chunk values m_1..m_N: sum_{i>=2} (N - i + 1) |m_i - m_1| / m_1 (inf if m_1 = 0)."""
    m = np.asarray(chunk_values, dtype=np.float64)
    if m.size < 2:
        raise ValueError(f"VDE needs at least 2 chunks, got {m.size}")
    if m[0] == 0:
        return math.inf
    n = m.size
    weights = n - np.arange(2, n + 1) + 1  # chunk i (1-based) weighs N - i + 1
    return float(np.sum(weights * np.abs(m[1:] - m[0]) / abs(m[0])))


def vde_report(frames: np.ndarray, series: dict[str, Series], num_chunks: int = 10) -> dict:
    """VDE of every :data:`VDE_SERIES` present (``series`` plus :func:`frame_statistics`), JSON-ready::

        {"num_chunks": N, "chunk_frames": L, "bounds": [[s, e], ...],
         "metrics": {name: {"chunk_values": [m_i], "vde": x or None}}, "caveats": [...]}

    Chunks are ``L = num_frames // N`` frames; the remainder frames at the end are dropped (as LV-Bench). A
    value belongs to the chunk holding its frame position (the later frame of a pair)."""
    frames = as_frames(frames)
    n = frames.shape[0]
    if num_chunks < 2:
        raise ValueError(f"--vde-chunks must be >= 2 (VDE compares later chunks with the first), got {num_chunks}")
    if n < num_chunks * 2:
        raise ValueError(
            f"VDE with {num_chunks} chunks needs at least {2 * num_chunks} frames (2 per chunk); the clip has {n}: "
            "pass a smaller --vde-chunks"
        )
    length = n // num_chunks
    bounds = [(i * length, (i + 1) * length) for i in range(num_chunks)]
    pool = {**frame_statistics(frames), **series}
    metrics, caveats = {}, []
    for name in VDE_SERIES:
        s = pool.get(name)
        if s is None:
            continue
        ok = np.isfinite(s.values)
        values = []
        for lo, hi in bounds:
            sel = ok & (s.positions >= lo) & (s.positions < hi)
            values.append(float(s.values[sel].mean()) if sel.any() else math.nan)
        if not np.all(np.isfinite(values)):
            vde = None
            caveats.append(f"vde of {name} is null: a chunk has no finite value")
        else:
            vde = json_number(video_drift_error(values))
            if vde is None:
                caveats.append(f"vde of {name} is null: its first chunk is 0, so the relative change is infinite")
        metrics[name] = {"chunk_values": [json_number(v) for v in values], "vde": vde}
    if n % num_chunks:
        caveats.append(f"vde drops the last {n % num_chunks} frames ({n} frames in {num_chunks} chunks of {length})")
    return {
        "num_chunks": int(num_chunks),
        "chunk_frames": int(length),
        "bounds": [[int(a), int(b)] for a, b in bounds],
        "metrics": metrics,
        "caveats": caveats,
    }


# ----------------------------------------------------------------------------- STREAM-T


def pixel_embeddings(frames: np.ndarray, size: int = 16) -> np.ndarray:
    """The weight-free default embedding: each frame's luma area-downsampled to ``size`` x ``size``, in
    [0, 1], flattened to ``[N, size * size]``."""
    import cv2

    frames = as_frames(frames)
    return np.stack(
        [cv2.resize(luma(f), (size, size), interpolation=cv2.INTER_AREA).reshape(-1) / 255.0 for f in frames]
    )


def torchscript_embeddings(frames: np.ndarray, path: str | os.PathLike, batch_size: int = 16) -> np.ndarray:
    """Embeddings ``[N, D]`` from a local TorchScript file called on float ``[B, 3, H, W]`` in [0, 1]. A
    TorchScript program runs as code: pass only a file you trust. Nothing is downloaded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--stream-embedder {path!r} is not a file; pass a local TorchScript embedder (.pt) or leave it out "
            "for the weight-free pixel embedding. longgen never downloads weights."
        )
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            model = torch.jit.load(path, map_location="cpu").eval()
        except Exception as err:  # not a TorchScript archive: say what is expected
            raise ValueError(
                f"--stream-embedder {path!r} is not a TorchScript file ({err.__class__.__name__}); export the "
                "embedder with torch.jit.script/trace and save it"
            ) from err
    frames = as_frames(frames)
    feats = []
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            x = torch.from_numpy(frames[i : i + batch_size]).float().div(255.0).permute(0, 3, 1, 2)
            out = model(x)
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"--stream-embedder {path!r} returned {type(out).__name__}, expected a tensor [B, D]")
            feats.append(out.reshape(out.shape[0], -1).float().numpy())
    return np.concatenate(feats).astype(np.float64)


def stream_skewness(embeds: np.ndarray) -> np.ndarray:
    """STREAM's per-dimension temporal statistic of one video's embeddings ``[f, D]`` (Kim et al. 2024).

    Amplitudes 2|X_k| / (1 + f/2) of the FFT over time for bins k = 1..f/2 (+1e-6), a least-squares fit
    log amp = B log k + log A per dimension, A_n = A / sum_k A k^B, and the statistic
    sum_k k^(B+3) / (sqrt(A_n) sqrt(sum_k k^(B+2))). Returns ``[D]``."""
    x = np.asarray(embeds, dtype=np.float64)
    f = x.shape[0]
    half = f // 2
    if half < 2:
        raise ValueError(f"STREAM needs at least 4 frames per window to fit a power law, got {f}")
    spectrum = np.fft.fft(x, axis=0)[: half + 1]
    amp = 2.0 * np.abs(spectrum[1:]) / (half + 1) + 1e-6  # (f/2, D)
    k = np.arange(1, half + 1, dtype=np.float64)
    design = np.stack([np.log(k), np.ones_like(k)], axis=1)  # (f/2, 2)
    coef, *_ = np.linalg.lstsq(design, np.log(amp), rcond=None)  # (2, D)
    b, a = coef[0], np.exp(coef[1])
    powers = k[:, None] ** b[None, :]  # (f/2, D)
    a_norm = a / (a * powers).sum(axis=0)
    cm3 = (k[:, None] ** (b + 3.0)[None, :]).sum(axis=0)
    cm2 = (k[:, None] ** (b + 2.0)[None, :]).sum(axis=0)
    return cm3 / (np.sqrt(a_norm) * np.sqrt(cm2))


def stream_t(evaluated: np.ndarray, reference: np.ndarray, bins: int = 50) -> float:
    """STREAM-T between two sets of per-video statistics ``[n, D]`` (:func:`stream_skewness` rows): per
    dimension, 50-bin histograms over [floor(min) - 1, floor(max) + 1] of both sets, each divided by the
    evaluated set's count, and their squared Pearson correlation; the mean over dimensions (1 is best)."""
    ev = np.asarray(evaluated, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if ev.ndim != 2 or ref.ndim != 2 or ev.shape[1] != ref.shape[1]:
        raise ValueError(f"STREAM-T needs two [n, D] sets of one D, got {ev.shape} and {ref.shape}")
    scores = []
    for d in range(ev.shape[1]):
        lo = int(min(ev[:, d].min(), ref[:, d].min())) - 1
        hi = int(max(ev[:, d].max(), ref[:, d].max())) + 1
        h_ev = np.histogram(ev[:, d], bins=bins, range=(lo, hi))[0] / len(ev)
        h_ref = np.histogram(ref[:, d], bins=bins, range=(lo, hi))[0] / len(ev)
        u, v = h_ev - h_ev.mean(), h_ref - h_ref.mean()
        r = np.sum(u * v) / (math.sqrt(np.sum(u * u)) * math.sqrt(np.sum(v * v)) + 1e-12)
        scores.append(r * r)
    return float(np.mean(scores))


def stream_report(frames: np.ndarray, *, window: int = 16, embedder: str | os.PathLike | None = None) -> dict:
    """STREAM-T of a clip against itself: the statistic of :func:`stream_skewness` per window of ``window``
    frames (non-overlapping; shortened to half the clip when longer), then :func:`stream_t` of the second
    half of the windows against the first half. JSON-ready::

        {"embedder": "pixels16" or path, "window", "positions": [window centres],
         "skewness_median": [per window, median over dims], "stream_t": x, "caveats": [...]}"""
    frames = as_frames(frames)
    n = frames.shape[0]
    if window < 4:
        raise ValueError(f"--stream-window must be >= 4 frames (a power law over >= 2 frequencies), got {window}")
    window = min(int(window), n // 2)
    window -= window % 2
    if window < 4:
        raise ValueError(f"STREAM-T needs at least 8 frames (two windows of 4), the clip has {n}")
    emb = pixel_embeddings(frames) if embedder is None else torchscript_embeddings(frames, embedder)
    starts = list(range(0, n - window + 1, window))
    stats = np.stack([stream_skewness(emb[s : s + window]) for s in starts])  # (W, D)
    half = len(starts) // 2
    caveats = ["stream_t uses 16x16 grey pixels as embeddings: a rough proxy for the paper's SwAV/DINOv2 features"]
    if embedder is not None:
        caveats = []
    if half < 5:
        caveats.append(f"stream_t compares only {half} vs {len(starts) - half} windows: a coarse histogram score")
    return {
        "embedder": "pixels16" if embedder is None else os.path.abspath(os.fspath(embedder)),
        "window": int(window),
        "positions": [s + (window - 1) / 2.0 for s in starts],
        "skewness_median": [json_number(float(np.median(row))) for row in stats],
        "stream_t": json_number(stream_t(stats[half:], stats[:half])),
        "caveats": caveats,
    }


# ----------------------------------------------------------------------------- plots


def plot_drift(plt, report: dict, plot_dir: str, savefig) -> list[str]:
    """``seams.png`` (per video: the pixel and 1-SSIM jumps between consecutive frames, boundaries marked,
    each labelled with its ratio) when any video has seams, and ``vde.png`` (per video: each metric's chunk
    value relative to the first chunk, m_i / m_1, with its VDE in the legend) when any has VDE. ``savefig(fig,
    path)`` writes atomically."""
    videos = report["videos"]
    written = []
    with_seams = {k: v["seams"] for k, v in videos.items() if v.get("seams")}
    if with_seams:
        path = os.path.join(plot_dir, "seams.png")
        fig, axes = plt.subplots(len(with_seams), 1, figsize=(7.2, 3.0 * len(with_seams)), dpi=80, squeeze=False)
        try:
            for ax, (label, s) in zip(axes[:, 0], with_seams.items()):
                pos = s["pairs"]["positions"]
                ax.plot(pos, s["pairs"]["pixel"], linewidth=1.2, label="mean |f_t - f_t-1| (grey levels)")
                ax.plot(pos, np.asarray(s["pairs"]["ssim"]) * 255.0, linewidth=1.0, label="(1 - SSIM) x 255")
                for row in s["boundaries"]:
                    colour = "tab:red" if row["kind"] == "input" else "tab:grey"
                    ax.axvline(row["frame"], color=colour, linestyle="--", linewidth=0.9)
                    ax.annotate(f"{row['ratio']['pixel']:.1f}x", (row["frame"], ax.get_ylim()[1]), fontsize=7,
                                ha="center", va="top")
                ax.set_title(f"{label}: jumps between consecutive frames; dashed: chunk seams (red: input end)\n"
                             "label: pixel seam ratio (lower is better, ~1 is seamless)", fontsize=8)
                ax.set_xlabel("frame (later of the pair)", fontsize=8)
                ax.legend(fontsize=7)
                ax.grid(alpha=0.3)
            fig.tight_layout()
            savefig(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    with_vde = {k: v["vde"] for k, v in videos.items() if v.get("vde")}
    if with_vde:
        path = os.path.join(plot_dir, "vde.png")
        fig, axes = plt.subplots(len(with_vde), 1, figsize=(7.2, 3.4 * len(with_vde)), dpi=80, squeeze=False)
        try:
            for ax, (label, v) in zip(axes[:, 0], with_vde.items()):
                chunks = np.arange(1, v["num_chunks"] + 1)
                for name, m in v["metrics"].items():
                    vals = np.array([np.nan if x is None else x for x in m["chunk_values"]], dtype=np.float64)
                    if not np.isfinite(vals[0]) or vals[0] == 0:
                        continue
                    vde = "null" if m["vde"] is None else f"{m['vde']:.3g}"
                    ax.plot(chunks, vals / vals[0], marker="o", markersize=2.5, label=f"{name} (VDE {vde})")
                ax.axhline(1.0, color="black", linewidth=0.6)
                ax.set_title(f"{label}: per-chunk metric / first chunk (LV-Bench VDE, lower is better)", fontsize=8)
                ax.set_xlabel(f"chunk ({v['chunk_frames']} frames each)", fontsize=8)
                ax.legend(fontsize=6, ncol=2)
                ax.grid(alpha=0.3)
            fig.tight_layout()
            savefig(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    return written
