"""Evaluate long videos: ``metrics.json`` and one PNG per metric over time, one line per video.

``evaluate_videos(["a.mp4", "b.mp4"], "report/")`` reads each video, computes every metric of
:mod:`longgen.eval.metrics` per window (and, given the synthetic world a clip shows, the scores of
:mod:`longgen.eval.synthetic_score`), writes ``report/metrics.json`` and ``report/plots/<metric>.png``
(plus ``report/plots/overview.png``), and returns the same dict. Two samplers' outputs evaluated together
land in the same pictures, so their drift can be compared at a glance.

Optional learned metrics, which need weights the user supplies as a local path (nothing is downloaded):
:func:`feature_consistency` (VBench subject / background consistency with DINO or CLIP features from a
local ``transformers`` folder) and :func:`fvd` (Frechet video distance with the I3D TorchScript file).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

from .metrics import Series, as_frames, compute_series, evaluate_frames, metric_info
from .seams import SEAM_METRICS, plot_drift, seam_boundaries, seam_report, stream_report, vde_report

REPORT_FILE = "metrics.json"
PLOTS_DIR = "plots"


# ----------------------------------------------------------------------------- reading


def read_clip(path: str | os.PathLike) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` uint8 of a video file; every failure is an error that names the file."""
    from longgen.io import read_video

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"video {path!r} is an empty file (0 bytes): it has no frames")
    try:
        frames = read_video(path)
    except ValueError as err:
        if _has_no_video_frames(path):
            raise ValueError(f"video {path!r} has no frames (no video stream or zero frames)") from err
        raise ValueError(f"cannot read video {path!r}: {err}") from err
    if frames.shape[0] == 0:
        raise ValueError(f"video {path!r} has no frames")
    return frames


def _has_no_video_frames(path: str) -> bool:
    """True when the container opens but holds no video frames (PyAV probe)."""
    try:
        import av

        with av.open(path) as container:
            if not container.streams.video:
                return True
            for _ in container.decode(video=0):
                return False
            return True
    except Exception:
        return False


def _labels(paths: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"got {len(labels)} labels for {len(paths)} videos; pass one label per video")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {list(labels)}")
        return list(labels)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    out = []
    for i, (p, stem) in enumerate(zip(paths, stems)):
        if stems.count(stem) > 1:  # same file name in different folders: add the folder, then an index
            stem = f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{stem}"
            if stem in out:
                stem = f"{stem}#{i}"
        out.append(stem)
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate_videos(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None,
    window: int = 16,
    *,
    stride: int | None = None,
    labels: Sequence[str] | None = None,
    worlds=None,
    plots: bool = True,
    show_progress: bool | None = False,
    seams: Sequence[int] | None = None,
    chunk_frames: int | None = None,
    input_frames: int | None = None,
    vde_chunks: int | None = None,
    stream_embedder: str | os.PathLike | None = None,
    stream_window: int = 16,
    **metric_kwargs,
) -> dict:
    """Evaluate videos, write ``metrics.json`` and plots to ``out_dir`` (if given), return the report.

    Args:
        paths: video files; all are checked to exist before any is evaluated.
        out_dir: output folder (created), or None to only return the dict.
        window: frames per window of the curves over time (``stride`` defaults to ``window``).
        labels: one unique name per video for the JSON keys and plot legends (default: file stems).
        worlds: the synthetic world (``longgen.data.synthetic.WorldSpec``) the clips show, or one per
            video (None entries skip), to add the synthetic scores under ``"synthetic"``.
        plots: write ``plots/<metric>.png`` and ``plots/overview.png``.
        show_progress: a progress bar over the videos on stderr (None: only when stderr is a terminal).
        seams, chunk_frames, input_frames: chunk boundaries for the seam ratios of
            :func:`longgen.eval.seams.seam_report` (see :func:`~longgen.eval.seams.seam_boundaries`); none given:
            no ``"seams"`` entry.
        vde_chunks: chunks of LV-Bench's VDE (:func:`~longgen.eval.seams.vde_report`); None: 10, and a clip
            shorter than 20 frames gets a caveat instead of VDE; a number: a clip too short is an error.
        stream_embedder: a local TorchScript embedder for STREAM-T (default: 16x16 grey pixels);
            stream_window: frames per STREAM window.
        metric_kwargs: passed to :func:`longgen.eval.metrics.compute_series` (``gaps``, ``flow_method``,
            ``flow_max_side``, ``groups``, ...).

    Returns ``{"window", "stride", "videos": {label: {"path", "fps", <evaluate_frames fields>,
    ["synthetic": <score_clip fields>]}}, "files": [written paths]}``. Every file is written under a
    temporary name and renamed when complete.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no videos to evaluate; pass one or more video paths")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"video {p!r} does not exist")
    names = _labels(paths, labels)
    if worlds is None or not isinstance(worlds, (list, tuple)):
        worlds = [worlds] * len(paths)
    if len(worlds) != len(paths):
        raise ValueError(
            f"got {len(worlds)} worlds for {len(paths)} videos; pass one per video or one for all"
        )

    if stream_embedder is not None and not os.path.isfile(stream_embedder):
        raise FileNotFoundError(
            f"--stream-embedder {os.fspath(stream_embedder)!r} is not a file; pass a local TorchScript embedder "
            "or leave it out for the weight-free pixel embedding. longgen never downloads weights."
        )
    drift = {
        "seams": seams, "chunk_frames": chunk_frames, "input_frames": input_frames, "vde_chunks": vde_chunks,
        "stream_embedder": stream_embedder, "stream_window": stream_window,
    }
    report: dict = {"window": int(window), "stride": int(window if stride is None else stride), "videos": {}}
    for path, name, world in zip(_progress(paths, show_progress), names, worlds):
        report["videos"][name] = _evaluate_one(path, world, window, stride, metric_kwargs, drift)

    files: list[str] = []
    if out_dir is not None:
        from ..files import make_output_dir, write_json_atomic

        out_dir = make_output_dir(out_dir, "--out")
        if plots:
            files.extend(plot_report(report, os.path.join(out_dir, PLOTS_DIR)))
        json_path = os.path.join(out_dir, REPORT_FILE)
        files.insert(0, json_path)
        report["files"] = files
        write_json_atomic(json_path, report, indent=1, allow_nan=False)
    else:
        report["files"] = files
    return report


def _progress(paths: list[str], show: bool | None):
    """Iterate the video paths with a tqdm bar on stderr (None: only when stderr is a terminal)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        paths, desc="eval", unit="video", disable=not sys.stderr.isatty() if show is None else not show
    )


def _evaluate_one(
    path: str, world, window: int, stride: int | None, metric_kwargs: dict, drift: dict | None = None
) -> dict:
    frames = read_clip(path)
    entry = {"path": os.path.abspath(path), "fps": _fps(path)}
    series = compute_series(frames, **metric_kwargs)
    entry.update(evaluate_frames(frames, window=window, stride=stride, series=series))
    if drift is not None:
        try:
            entry.update(drift_entries(frames, series, **drift))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    if world is not None:
        from .synthetic_score import score_clip

        entry["synthetic"] = score_clip(frames, world, window=window, stride=stride)
    return entry


def drift_entries(
    frames: np.ndarray,
    series: dict[str, Series],
    *,
    seams: Sequence[int] | None = None,
    chunk_frames: int | None = None,
    input_frames: int | None = None,
    vde_chunks: int | None = None,
    stream_embedder: str | os.PathLike | None = None,
    stream_window: int = 16,
) -> dict:
    """``{"seams"?, "vde", "stream"}`` of one clip (:mod:`longgen.eval.seams`); a default VDE or STREAM-T that
    the clip is too short for is None with a caveat appended to the clip's caveats (``"drift_caveats"``)."""
    n = frames.shape[0]
    out: dict = {}
    caveats: list[str] = []
    if seams or chunk_frames is not None or input_frames is not None:
        bounds = seam_boundaries(n, seams=seams, chunk_frames=chunk_frames, input_frames=input_frames)
        out["seams"] = seam_report(frames, bounds)
        caveats += out["seams"]["caveats"]
    chunks = 10 if vde_chunks is None else vde_chunks
    if vde_chunks is None and n < 2 * chunks:
        out["vde"] = None
        caveats.append(f"no vde: the clip has {n} frames, fewer than 2 per chunk of the default 10 chunks")
    else:
        out["vde"] = vde_report(frames, series, chunks)
        caveats += out["vde"]["caveats"]
    if n < 8:
        out["stream"] = None
        caveats.append(f"no stream_t: the clip has {n} frames, it needs 8")
    else:
        out["stream"] = stream_report(frames, window=stream_window, embedder=stream_embedder)
        caveats += out["stream"]["caveats"]
        if stream_window > n // 2:
            caveats.append(f"stream window of {stream_window} frames cut to {n // 2}: STREAM-T needs at least two "
                           f"windows in the clip's {n} frames")
    out["drift_caveats"] = caveats
    return out


def headline_table(report: dict, columns: Sequence[str], *, label: str = "video") -> str:
    """Markdown table of ``report`` (:func:`evaluate_videos`): per video, each column's mean and end-minus-start
    change; every header says whether higher is better. Columns: metric names, or ``synthetic_<score>``.
    Videos with caveats (:func:`~longgen.eval.metrics.clip_caveats`, e.g. a blank clip's perfect flicker) get a
    ``*`` and the caveat below the table."""
    head = [f"{name} ({direction(name) or '?'}): mean / end-start" for name in columns]
    lines = [f"| {label} | " + " | ".join(head) + " |", "|" + "---|" * (len(columns) + 1)]
    notes = []
    for name, video in report["videos"].items():
        cells = []
        for column in columns:
            if column.startswith("synthetic_"):
                entry = video.get("synthetic", {}).get("scores", {}).get(column[len("synthetic_") :])
            else:
                entry = video.get("metrics", {}).get(column)
            s = (entry or {}).get("summary") or {}
            ok = s.get("mean") is not None and s.get("end_minus_start") is not None
            cells.append(f"{s['mean']:.3f} / {s['end_minus_start']:+.3f}" if ok else "-")
        caveats = video.get("caveats") or []
        notes += [f"* {name}: {c}" for c in caveats]
        lines.append(f"| {name}{' *' if caveats else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def _fps(path: str) -> float | None:
    try:
        from longgen.io import video_info

        return float(video_info(path)["fps"])
    except Exception:  # the frames were readable; a missing rate is not worth failing the report for
        return None


# ----------------------------------------------------------------------------- plots


def _curves(report: dict) -> dict[str, dict[str, tuple[list, list]]]:
    """``{plot name: {video label: (positions, values)}}`` over every metric and synthetic score."""
    curves: dict[str, dict[str, tuple[list, list]]] = {}
    for label, video in report["videos"].items():
        for name, m in video.get("metrics", {}).items():
            curves.setdefault(name, {})[label] = (m["positions"], m["values"])
        for name, m in video.get("synthetic", {}).get("scores", {}).items():
            curves.setdefault(f"synthetic_{name}", {})[label] = (m["positions"], m["values"])
    return curves


def column_info(name: str):
    """The :class:`~longgen.eval.metrics.MetricInfo` of a metric or of a ``synthetic_<score>`` (KeyError if
    neither)."""
    if name.startswith("synthetic_"):
        from .synthetic_score import score_info

        return score_info(name[len("synthetic_") :])
    if name in SEAM_METRICS:
        return SEAM_METRICS[name]
    return metric_info(name)


def direction(name: str) -> str:
    """``"higher is better"``, ``"lower is better"`` or ``"no better direction"`` for a metric or synthetic
    score (``""`` for an unknown name)."""
    try:
        better = column_info(name).higher_is_better
    except KeyError:
        return ""
    return {True: "higher is better", False: "lower is better", None: "no better direction"}[better]


def _title(name: str) -> tuple[str, str]:
    try:
        info = column_info(name)
    except KeyError:
        return name, ""
    what = ", synthetic score vs the prompted world" if name.startswith("synthetic_") else ""
    return f"{name} ({direction(name)}){what}\n{info.description}", info.unit


OVERVIEW = (
    "synthetic_overall",
    "temporal_flicker",
    "ssim_first",
    "color_hist_drift",
    "warping_error",
    "sharpness",
)
"""Panels of ``overview.png`` (those present): the headline drift measures, one readable panel each; every
metric has its own PNG as well."""


def _savefig(fig, path: str) -> None:
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _label_axes(ax, name: str, fontsize: int) -> None:
    title, unit = _title(name)
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("frame (window centre)", fontsize=fontsize - 1)
    ax.set_ylabel(unit or name, fontsize=fontsize - 1)


def _plot_overview(plt, curves: dict, path: str) -> str:
    names = [n for n in OVERVIEW if n in curves] or list(curves)[: len(OVERVIEW)]
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.9 * rows), dpi=80, squeeze=False)
    try:
        for ax, name in zip(axes.flat, names):
            _draw(ax, curves[name])
            _label_axes(ax, name, 10)
            ax.tick_params(labelsize=8)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # 0.4 in for the legend
        _savefig(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_report(report: dict, plot_dir: str | os.PathLike, *, overview: bool = True) -> list[str]:
    """One PNG per metric and synthetic score (x: frame, y: window value, one line per video; the title says
    what it measures and which direction is better), and ``overview.png`` with the :data:`OVERVIEW` panels
    when ``overview``. Every PNG is written under a temporary name and renamed when complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = os.fspath(plot_dir)
    os.makedirs(plot_dir, exist_ok=True)
    curves = _curves(report)
    written = []
    # One figure redrawn for every metric, with fixed margins: layout passes dominate matplotlib's cost.
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.84, bottom=0.14)
    try:
        for name, per_video in curves.items():
            ax.clear()
            _draw(ax, per_video)
            _label_axes(ax, name, 9)
            ax.legend(fontsize=7)
            path = os.path.join(plot_dir, f"{name}.png")
            _savefig(fig, path)
            written.append(path)
    finally:
        plt.close(fig)
    if overview and curves:
        written.append(_plot_overview(plt, curves, os.path.join(plot_dir, "overview.png")))
    written.extend(plot_drift(plt, report, plot_dir, _savefig))
    return written


def _draw(ax, per_video: dict[str, tuple[list, list]]) -> None:
    for label, (pos, vals) in per_video.items():
        y = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        ax.plot(pos, y, marker="o", markersize=2.5, linewidth=1.2, label=label)
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------- optional learned metrics


def _require_path(path: str | os.PathLike | None, what: str, kind: str = "dir") -> str:
    ok = path is not None and (os.path.isdir(path) if kind == "dir" else os.path.isfile(path))
    if not ok:
        raise FileNotFoundError(
            f"{what}; got {None if path is None else os.fspath(path)!r}. longgen never downloads weights."
        )
    return os.fspath(path)


FEATURE_WEIGHTS_HINT = (
    "feature_consistency needs weights_path=<a local folder with a transformers image model and its image "
    "processor (save_pretrained)>: a DINO ViT such as facebook/dino-vitb16 for VBench's subject consistency, "
    "or a CLIP model such as openai/clip-vit-base-patch32 for background consistency"
)


def feature_consistency(
    frames: np.ndarray, weights_path: str | os.PathLike | None, *, batch_size: int = 16, device: str = "cpu"
) -> dict[str, Series]:
    """VBench subject / background consistency with features from user-supplied weights.

    Per frame t >= 1: ``feature_sim_prev`` = cos(f_{t-1}, f_t), ``feature_sim_first`` = cos(f_0, f_t) and
    ``feature_consistency`` = (max(0, sim_prev) + max(0, sim_first)) / 2, VBench's formula. Features are
    the image embedding of a CLIP model, or the CLS token of any other ``transformers`` vision model
    (DINO, DINOv2). Raises FileNotFoundError saying what to pass when ``weights_path`` is missing.
    """
    path = _require_path(weights_path, FEATURE_WEIGHTS_HINT)
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    frames = as_frames(frames)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            batch = processor(images=list(frames[i : i + batch_size]), return_tensors="pt")
            pixels = batch["pixel_values"].to(device)
            if config.model_type == "clip":
                out = model.get_image_features(pixel_values=pixels)
                emb = out if isinstance(out, torch.Tensor) else out.pooler_output
            elif config.model_type == "clip_vision_model":
                emb = model(pixel_values=pixels).pooler_output
            else:
                emb = model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token
            feats.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
    f = np.concatenate(feats)  # (N, D), unit norm
    sim_prev = np.sum(f[1:] * f[:-1], axis=1)
    sim_first = f[1:] @ f[0]
    pos = np.arange(1, len(f))
    return {
        "feature_sim_prev": Series("feature_sim_prev", pos, sim_prev),
        "feature_sim_first": Series("feature_sim_first", pos, sim_first),
        "feature_consistency": Series(
            "feature_consistency", pos, 0.5 * (np.maximum(sim_prev, 0) + np.maximum(sim_first, 0))
        ),
    }


I3D_WEIGHTS_HINT = (
    "fvd needs i3d_path=<local path to i3d_torchscript.pt>, the TorchScript port of the TF-Hub I3D "
    "(Kinetics-400) used by the original FVD, as released with StyleGAN-V"
)


def i3d_features(
    clips: Sequence[np.ndarray],
    i3d_path: str | os.PathLike | None,
    *,
    batch_size: int = 4,
    device: str = "cpu",
) -> np.ndarray:
    """I3D logit-layer features ``[num_clips, D]`` of uint8 clips ``[T, H, W, 3]`` (same T for all).

    As in StyleGAN-V's FVD: the short side is resized to 224 (bilinear), the centre is cropped to
    224x224, values go to [-1, 1], and the TorchScript model is called with ``rescale=False,
    resize=False, return_features=True``. The detector is a TorchScript program and runs as code: pass
    only a file you trust (the published ``i3d_torchscript.pt``).
    """
    path = _require_path(i3d_path, I3D_WEIGHTS_HINT, kind="file")
    import torch
    import torch.nn.functional as F

    with warnings.catch_warnings():
        # The published I3D for FVD exists only as TorchScript, whose loader torch now marks deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        detector = torch.jit.load(path, map_location=device).eval()
    lengths = {len(c) for c in clips}
    if len(lengths) != 1:
        raise ValueError(f"all clips need the same number of frames for I3D, got lengths {sorted(lengths)}")

    def prep(clip: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(as_frames(clip)).float().div(255.0).permute(0, 3, 1, 2)  # (T, 3, H, W)
        h, w = x.shape[-2:]
        scale = 224 / min(h, w)
        x = F.interpolate(
            x,
            size=(max(224, math.ceil(h * scale)), max(224, math.ceil(w * scale))),
            mode="bilinear",
            align_corners=False,
        )
        top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
        x = x[..., top : top + 224, left : left + 224]
        return (x * 2.0 - 1.0).permute(1, 0, 2, 3)  # (3, T, 224, 224)

    feats = []
    with torch.no_grad():
        for i in range(0, len(clips), batch_size):
            x = torch.stack([prep(c) for c in clips[i : i + batch_size]]).to(device)  # (B, 3, T, 224, 224)
            feats.append(detector(x, rescale=False, resize=False, return_features=True).float().cpu().numpy())
    return np.concatenate(feats)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace of the root taken through the
    symmetric form S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two feature matrices [n, D] of one D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least 2 feature vectors per set (FVD uses hundreds)")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_root = float(np.sqrt(np.clip(middle, 0.0, None)).sum())
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_root)


def fvd(
    real_clips: Sequence[np.ndarray],
    generated_clips: Sequence[np.ndarray],
    i3d_path: str | os.PathLike | None,
    *,
    device: str = "cpu",
) -> float:
    """Frechet video distance (Unterthiner et al. 2018) between two sets of clips, I3D from ``i3d_path``.

    Meaningful with hundreds of clips per set; for a long video, cut it into windows of 16 frames.
    """
    _require_path(i3d_path, I3D_WEIGHTS_HINT, kind="file")
    return frechet_distance(
        i3d_features(real_clips, i3d_path, device=device),
        i3d_features(generated_clips, i3d_path, device=device),
    )


def drift_lines(report: dict) -> str:
    """One line per video: the worst seam ratio (lower is better), the largest VDE (lower is better) and
    STREAM-T (higher is better), each where computed."""
    lines = []
    for name, video in report["videos"].items():
        parts = []
        seams = video.get("seams")
        if seams and seams["boundaries"]:
            worst = max(seams["max_ratio"].items(), key=lambda kv: kv[1])
            parts.append(f"seam ratio max {worst[1]:.2f} ({worst[0]}, frame {seams['worst_frame']}; lower is better)")
        vde = video.get("vde")
        if vde:
            vals = {k: m["vde"] for k, m in vde["metrics"].items() if m["vde"] is not None}
            if vals:
                k = max(vals, key=vals.get)
                parts.append(f"VDE max {vals[k]:.3g} ({k}; lower is better)")
        stream = video.get("stream")
        if stream and stream["stream_t"] is not None:
            parts.append(f"STREAM-T {stream['stream_t']:.3f} (late vs early windows; higher is better)")
        if parts:
            lines.append(f"{name}: " + "; ".join(parts))
    return "\n".join(lines)
