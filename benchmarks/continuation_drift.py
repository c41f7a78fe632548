"""Anti-drift options for continuing a video, measured on the synthetic world (issue 15, item 5).

The demo's tiny model (trained here as `longgen demo` trains it, or loaded with --model) continues the first
--input-frames frames of a synthetic world's ground-truth video to --length-factor times its native clip with
the ``extend`` sampler (chunk by chunk, clean given context), one variant per anti-drift option:

* ``latent``: the previous chunk's latents are the next chunk's context (the baseline);
* ``pixel_roundtrip``: each chunk is decoded to 8-bit frames and re-encoded before it serves as context (what
  continuing from a written mp4 does);
* ``stats``: each new chunk's per-channel latent mean / std matched to its context's (--stats-anchor 1);
* ``anchored``: the input's first latent frames are context of every window (--anchor-frames);
* ``inverted``: FramePack's inverted anti-drifting order from that anchor (--order inverted).

Every variant uses the same noise per seed; the seeds also pick the world (video i of the data set). Scores
(medians over seeds; STREAM-T over 8-frame windows): the synthetic scorer's overall score (mean over windows and over the last 15% of the
clip), the pixel seam ratio at chunk boundaries (:mod:`longgen.eval.seams`), VDE of brightness and
colourfulness, STREAM-T, and the colour-histogram drift from the first frame (:mod:`longgen.eval.metrics`).

    python benchmarks/continuation_drift.py --out outputs/continuation_drift [--model DIR] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from types import SimpleNamespace

VARIANTS = {
    "latent": {},
    "pixel_roundtrip": {"roundtrip": True},
    "stats": {"stats_anchor": 1.0},
    "anchored": {"anchor_frames": 2},
    "inverted": {"anchor_frames": 2, "order": "inverted"},
}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/continuation_drift", help="output folder")
    p.add_argument("--model", help="a saved tiny demo model folder (default: train one into <out>/model)")
    p.add_argument("--data", help="the synthetic data set folder it was trained on (default: <out>/train/...)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="noise seeds; seed i uses world i")
    p.add_argument("--length-factor", type=int, default=4, help="clip length in native clips")
    p.add_argument("--input-frames", type=int, default=3, help="ground-truth frames given (latent = pixel here)")
    p.add_argument("--chunk-context", type=int, default=3, help="extend --chunk-context")
    p.add_argument("--steps", type=int, default=16, help="denoising steps per window")
    p.add_argument("--train-steps", type=int, default=None, help="transformer steps when training (demo default)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    return p.parse_args(argv)


def _model(args):
    """(adapter, data dir): loaded from --model, or trained as the demo trains it and saved in <out>/model."""
    from longgen.backbones import load_adapter

    model_dir = args.model or os.path.join(args.out, "model")
    data_dir = args.data or os.path.join(args.out, "train", "synthetic_data")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        from longgen.demo import DemoSettings, train_tiny_model

        settings = DemoSettings(out_dir=args.out)
        if args.train_steps:
            settings.train_steps = args.train_steps
        adapter, _, data_dir, _ = train_tiny_model(settings)
        # training from the latent cache freed the text encoder; the demo hands it back: register it to save it
        adapter.pipe.register_modules(text_encoder=adapter.pipe.text_encoder)
        adapter.save_pretrained(model_dir)
    return load_adapter(model_dir), data_dir


def _roundtrip(adapter):
    """Latents -> 8-bit frames -> latents: the context a continuation from a written video would see."""

    def transform(latents):
        frames = adapter.decode(latents)  # [B, T, H, W, 3] in [0, 1]
        frames = (frames * 255).round().clamp(0, 255) / 255.0
        return adapter.encode_video(frames.float()).to(latents)

    return transform


def _boundaries(known, num_frames, window, context, anchor, order) -> list[int]:
    """First frames of generated chunks that meet frames generated or given before them (seams)."""
    from longgen.samplers.extend import _plan

    plan = _plan(known, window, context, anchor, order)
    done = known.clone()
    if order == "inverted" and anchor and not bool(known[:anchor].any()):
        plan = _plan(known, window, context, 0, "forward")[:1] + plan
    seams = set()
    for _, new in plan:
        if new[0] > 0 and done[new[0] - 1]:
            seams.add(new[0])
        if new[-1] + 1 < num_frames and done[new[-1] + 1]:
            seams.add(new[-1] + 1)
        done[new] = True
    return sorted(seams)


def _clip(adapter, world, caption, seed, variant, args, out_dir) -> dict:
    """Generate and evaluate one continuation; returns its scores."""
    import numpy as np
    import torch

    from longgen.data.synthetic import render_clip
    from longgen.demo import synthetic_means
    from longgen.eval.report import evaluate_videos
    from longgen.io import write_video
    from longgen.samplers.extend import sample_extend

    num_native, height, width = adapter.native_video_size
    window = adapter.num_latent_frames(num_native)
    total = window * args.length_factor
    truth, _ = render_clip(world, total, height, width)
    given = adapter.encode_video(torch.from_numpy(truth[: args.input_frames]).float()[None] / 255.0)
    positions = tuple(range(given.shape[2]))
    cond, _ = adapter.encode_prompt([caption], do_classifier_free_guidance=False)
    shape = adapter.latent_shape(adapter.num_pixel_frames(total), height, width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    opts = VARIANTS[variant]

    # whole given frames at the clip's start (the duck type of longgen's FrameConditioning)
    conditioning = SimpleNamespace(latents=given, positions=positions, check=lambda *a: None,
                                   fully_given=lambda: [True] * len(positions))
    with torch.no_grad():
        latents = sample_extend(
            lambda x, s, offset=0: adapter.denoise(x, s, cond), noise, adapter.sigmas(args.steps),
            window=window, chunk_context=args.chunk_context, anchor_frames=opts.get("anchor_frames", 0),
            order=opts.get("order", "forward"), stats_anchor=opts.get("stats_anchor", 0.0),
            conditioning=conditioning, context_transform=_roundtrip(adapter) if opts.get("roundtrip") else None,
            disable=True,
        )
        frames = (adapter.decode(latents)[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    path = os.path.join(out_dir, f"{variant}_seed{seed}.mp4")
    write_video(path, iter([frames]), fps=16.0)
    known = torch.zeros(total, dtype=torch.bool)
    known[list(positions)] = True
    seams = _boundaries(known, total, window, args.chunk_context, opts.get("anchor_frames", 0),
                        opts.get("order", "forward"))
    report = evaluate_videos([path], None, window=8, labels=[variant], worlds=[world], plots=False,
                             seams=seams, input_frames=args.input_frames, stream_window=8)["videos"][variant]
    synth = report["synthetic"]["scores"]["overall"]["summary"]
    vde = report["vde"]["metrics"] if report.get("vde") else {}
    return {
        "synthetic_overall": synthetic_means(report)["overall"],
        "synthetic_end": synth.get("end"),
        "seam_ratio_pixel": report["seams"]["mean_ratio"]["pixel"],
        "vde_brightness": (vde.get("brightness") or {}).get("vde"),
        "vde_colorfulness": (vde.get("colorfulness") or {}).get("vde"),
        "stream_t": (report.get("stream") or {}).get("stream_t"),
        "color_hist_drift_end": report["metrics"]["color_hist_drift"]["summary"]["end"],
        "mean_abs_to_truth": float(np.abs(frames.astype(np.float64) - truth.astype(np.float64)).mean()),
    }


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(results: dict) -> str:
    """Markdown table of the medians over seeds, one row per variant."""
    cols = [
        ("synthetic_overall", "synthetic overall (higher better)"),
        ("synthetic_end", "synthetic, last 15% (higher)"),
        ("seam_ratio_pixel", "seam ratio, pixel (~1 best)"),
        ("vde_brightness", "VDE brightness (lower)"),
        ("vde_colorfulness", "VDE colourfulness (lower)"),
        ("stream_t", "STREAM-T (higher)"),
        ("color_hist_drift_end", "colour-hist drift at end (lower)"),
        ("mean_abs_to_truth", "mean abs error to the true continuation (lower)"),
    ]
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant, runs in results.items():
        cells = []
        for key, _ in cols:
            m = _median([r[key] for r in runs])
            cells.append("-" if m is None else f"{m:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    from longgen.data.synthetic import WorldSpec, load_manifest

    os.makedirs(args.out, exist_ok=True)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    adapter, data_dir = _model(args)
    records = load_manifest(os.path.join(data_dir, "manifest.jsonl"))
    clips_dir = os.path.join(args.out, "clips")
    os.makedirs(clips_dir, exist_ok=True)
    results: dict[str, list] = {v: [] for v in args.variants}
    for seed in args.seeds:
        record = records[seed % len(records)]
        world = record["world"] if isinstance(record["world"], WorldSpec) else WorldSpec.from_dict(record["world"])
        for variant in args.variants:
            results[variant].append(_clip(adapter, world, record["caption"], seed, variant, args, clips_dir))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    md = table(results)
    meta = {
        "seeds": args.seeds, "length_factor": args.length_factor, "input_frames": args.input_frames,
        "chunk_context": args.chunk_context, "steps": args.steps,
        "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1),
    }
    from longgen.files import write_json_atomic

    write_json_atomic(os.path.join(args.out, "results.json"), {"meta": meta, "runs": results, "table": md}, indent=1)
    print(md)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
