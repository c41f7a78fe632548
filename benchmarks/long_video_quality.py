"""Synthetic long-video benchmark: quality over time of each sampler and extension vs the naive baseline.

Trains the tiny model on short clips of the synthetic moving-shapes world (as `longgen demo` does), then
generates clips 4x, 8x and 16x its native length from the same prompt and noise with every sampler, and
with each RoPE extension applied to the naive baseline (the model run on the whole clip), and tabulates
the synthetic scores against the prompted world (object count, colour, size, motion; 1 = perfect) and
the pixel metrics, each as mean and end-minus-start change (drift). Each table also scores the prompted
world's ground truth (``gt``) and its VAE reconstruction (``gt_vae``): the ceiling of every sampler.
Every sampler is also run at the native length (``1x``, where each is essentially the full-clip model): the
last table gives the synthetic overall score at 1x and at each factor with the ratio to 1x ("keeps X of its
1x quality at 16x"); an extension's row is compared with ``full`` at 1x (each extension is set up for the
clip length, so at 1x it has nothing to extend).

    python -m benchmarks.long_video_quality --out outputs/bench_quality --train-steps 800 --factors 4 8 16

With ``--from-demo <demo out>`` the model of a finished ``longgen demo`` run is evaluated as it sampled there
(:func:`longgen.demo.load_demo_model`: its weights, prompt and guidance) instead of training one here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from longgen.files import write_json_atomic
from longgen.samplers import sampler_names

FULL_ROW = re.compile(r"^\| full( \*)? \|")  # the demo table's row of the naive baseline (star: a caveat)


def main(argv: list[str] | None = None) -> int:
    from longgen.demo import (
        DemoSettings,
        generate_and_evaluate,
        load_demo_model,
        overall_by_label,
        ratio_table,
        summary_table,
        train_tiny_model,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_quality", help="output folder")
    p.add_argument("--train-steps", type=int, default=DemoSettings.train_steps,
                   help="transformer training steps of the tiny model (default: the demo's)")
    p.add_argument("--num-videos", type=int, default=24, help="synthetic training videos")
    p.add_argument("--factors", type=int, nargs="+", default=[4, 8, 16], help="clip length / native length")
    p.add_argument("--samplers", nargs="+", default=list(sampler_names()), choices=sampler_names(),
                   help="samplers (default: every registered one)")
    p.add_argument("--extensions", nargs="+", default=["pi", "ntk", "yarn", "riflex", "fusion", "spectral"],
                   help="extensions applied to the naive full-clip baseline (RoPE scaling to the clip length; "
                   "fusion / spectral with native-length windows)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps")
    p.add_argument("--quick", action="store_true", help="the demo's quick settings (smoke test, ~1 min)")
    p.add_argument("--from-demo", default=None,
                   help="evaluate the model of this finished `longgen demo --out` folder instead of training one")
    args = p.parse_args(argv)

    start = time.perf_counter()
    if args.from_demo:
        adapter, data_dir, summary = load_demo_model(args.from_demo)
        guidance = float(summary["train"].get("settings", {}).get("guidance_scale", 1.0))
        print(f"tiny model of {args.from_demo}: {summary['train']['steps']} steps, guidance {guidance}", flush=True)
    else:
        settings = (DemoSettings.quick(args.out) if args.quick else
                    DemoSettings(out_dir=args.out, train_steps=args.train_steps, num_videos=args.num_videos))
        guidance = settings.guidance_scale
        adapter, train_result, data_dir, vae_report = train_tiny_model(settings)
        print(f"tiny VAE: PSNR {vae_report['psnr_before']} -> {vae_report['psnr']} dB", flush=True)
        print(f"stage seconds: {vae_report.get('stage_seconds')}", flush=True)
        losses = list(train_result.losses.values())
        print(f"tiny model: {train_result.step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    native = generate_and_evaluate(adapter, data_dir, os.path.join(args.out, "1x"), 1, tuple(args.samplers),
                                   args.steps, guidance_scale=guidance)
    print(f"\n### 1x native length ({native['num_frames']} frames): samplers\n\n{summary_table(native)}",
          flush=True)
    results = {"1x": _result_entry(native)}
    overall = {}
    for factor in args.factors:
        folder = os.path.join(args.out, f"{factor}x")
        res = generate_and_evaluate(adapter, data_dir, folder, factor, tuple(args.samplers), args.steps,
                                    guidance_scale=guidance)
        print(f"\n### {factor}x native length ({res['num_frames']} frames): samplers\n\n{summary_table(res)}",
              flush=True)
        results[f"{factor}x"] = _result_entry(res)
        overall[factor] = overall_by_label(res)
        for extension in args.extensions:
            ext = generate_and_evaluate(adapter, data_dir, os.path.join(folder, extension), factor, ("full",),
                                        args.steps, extension=extension, references=False,
                                        guidance_scale=guidance)
            # the row label may carry the demo's caveat star ("| full * |" for a static clip)
            row = next(line for line in summary_table(ext).splitlines() if FULL_ROW.match(line))
            table = FULL_ROW.sub(f"| full + {extension}\\1 |", row)
            print(table, flush=True)
            results[f"{factor}x"][f"full+{extension}"] = ext["report"]["videos"]["full"]
            overall[factor][f"full + {extension}"] = overall_by_label(ext)["full"]
    ratios = ratio_table(overall_by_label(native), overall,
                         native_of={f"full + {e}": "full" for e in args.extensions})
    print(f"\n### synthetic overall at 1x and each length; Nx / 1x = the share of its 1x quality kept\n\n{ratios}",
          flush=True)
    results["ratio_table"] = ratios
    write_json_atomic(os.path.join(args.out, "results.json"), results)
    for factor in args.factors:
        path = plot_overall(os.path.join(args.out, f"{factor}x"))
        print(f"{factor}x: synthetic overall score over time, every method: {path}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; per-video metrics and plots under {args.out}/<factor>x/")
    return 0


def _result_entry(res: dict) -> dict:
    """The ``results.json`` entry of one length: per-sampler and reference reports, and the runs."""
    videos = res["report"]["videos"]
    return {
        "samplers": {label: videos[label] for label in res["runs"]},
        "references": {label: videos[label] for label in res["references"]},
        "runs": res["runs"],
    }


def plot_overall(folder: str, score: str = "overall") -> str:
    """One picture per length: the synthetic ``score`` per window over time for every sampler, extension
    and reference clip under ``folder`` (read back from each ``eval/metrics.json``). Returns the PNG path."""
    import glob

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for metrics_path in sorted(glob.glob(os.path.join(folder, "**", "eval", "metrics.json"), recursive=True)):
        extension = os.path.basename(os.path.dirname(os.path.dirname(metrics_path)))
        with open(metrics_path) as f:
            videos = json.load(f)["videos"]
        for label, video in videos.items():
            curve = (video.get("synthetic") or {}).get("scores", {}).get(score)
            if not curve:
                continue
            name = f"{label} + {extension}" if os.path.dirname(os.path.dirname(metrics_path)) != folder else label
            style = ":" if label.startswith("gt") else ("--" if "+" in name else "-")
            ax.plot(curve["positions"], curve["values"], style, label=name, linewidth=1.5)
    ax.set_xlabel("frame (window centre)")
    ax.set_ylabel(f"synthetic {score} (1 = ground truth)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{os.path.basename(folder)} native length: synthetic {score} over time")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path = os.path.join(folder, f"synthetic_{score}_all_methods.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
