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

One clip is one noise draw of one prompt, and on the tiny model two draws of the same method can differ by
more than two methods do: ``--worlds N --seeds S ...`` runs every method on the captions of training worlds
0..N-1 at each seed, and the ratio table averages all those clips (the per-length tables stay the first
clip's: world 0, the first seed).

    python -m benchmarks.long_video_quality --from-demo outputs/demo --out outputs/bench_quality \
        --factors 4 8 16 --worlds 2 --seeds 0 1
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
    from longgen.demo import DemoSettings, load_demo_model, ratio_table, train_tiny_model

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
    p.add_argument("--worlds", type=int, default=1,
                   help="prompts: the captions of training worlds 0..N-1 (world 0 = the demo's prompt; its tables are "
                   "printed, the ratio table averages every clip)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="noise seeds per prompt (one clip per world and seed; one clip is one noise draw, too few "
                   "to rank methods)")
    p.add_argument("--quick", action="store_true", help="the demo's quick settings (smoke test, ~1 min)")
    p.add_argument("--from-demo", default=None,
                   help="evaluate the model of this finished `longgen demo --out` folder instead of training one")
    args = p.parse_args(argv)
    if args.worlds < 1:
        p.error(f"--worlds must be >= 1, got {args.worlds}")

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
    from longgen.data.synthetic import load_manifest

    num_worlds = len(load_manifest(os.path.join(data_dir, "manifest.jsonl")))
    if args.worlds > num_worlds:
        p.error(f"--worlds {args.worlds}: the model's data set has {num_worlds} worlds; give --worlds <= {num_worlds}")
    clips = [(w, seed) for w in range(args.worlds) for seed in args.seeds]
    native, results, overall = _run_clip(adapter, data_dir, args, args.out, guidance, *clips[0], verbose=True)
    per_clip = [overall]
    for world, seed in clips[1:]:
        print(f"\nclip: world {world}, seed {seed} (for the mean over {len(clips)} clips)", flush=True)
        per_clip.append(_run_clip(adapter, data_dir, args, os.path.join(args.out, "clips", f"w{world}_s{seed}"),
                                  guidance, world, seed)[2])
    means = {key: {label: sum(c[key].get(label) or 0.0 for c in per_clip) / len(per_clip) for label in per_clip[0][key]}
             for key in per_clip[0]}
    ratios = ratio_table(means["1x"], {f: means[f"{f}x"] for f in args.factors},
                         native_of={f"full + {e}": "full" for e in args.extensions})
    which = (f"mean over {len(clips)} clips (worlds 0-{args.worlds - 1} x seeds {args.seeds})" if len(clips) > 1
             else f"world 0, seed {args.seeds[0]}")
    print(f"\n### synthetic overall at 1x and each length, {which}; Nx / 1x = the share of its 1x quality "
          f"kept\n\n{ratios}", flush=True)
    results["ratio_table"] = ratios
    results["clips"] = [list(c) for c in clips]
    results["overall_per_clip"] = per_clip
    results["overall_mean"] = means
    write_json_atomic(os.path.join(args.out, "results.json"), results)
    for factor in args.factors:
        path = plot_overall(os.path.join(args.out, f"{factor}x"))
        print(f"{factor}x: synthetic overall score over time, every method: {path}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; per-video metrics and plots under {args.out}/<factor>x/")
    return 0


def _run_clip(adapter, data_dir: str, args, out: str, guidance: float, world: int, seed: int, verbose: bool = False):
    """Every sampler at 1x and at each factor, and ``full`` + each extension, from world ``world``'s caption at
    noise seed ``seed``. Returns (the 1x result, the ``results.json`` entries, ``{"1x" | "<f>x": {label:
    overall}}``); with ``verbose`` the per-length tables are printed."""
    from longgen.demo import generate_and_evaluate, overall_by_label, summary_table

    common = dict(guidance_scale=guidance, seed=seed, world_index=world)
    native = generate_and_evaluate(adapter, data_dir, os.path.join(out, "1x"), 1, tuple(args.samplers), args.steps,
                                   **common)
    if verbose:
        print(f"\n### 1x native length ({native['num_frames']} frames): samplers\n\n{summary_table(native)}",
              flush=True)
    results, overall = {"1x": _result_entry(native)}, {"1x": overall_by_label(native)}
    for factor in args.factors:
        folder = os.path.join(out, f"{factor}x")
        res = generate_and_evaluate(adapter, data_dir, folder, factor, tuple(args.samplers), args.steps, **common)
        if verbose:
            print(f"\n### {factor}x native length ({res['num_frames']} frames): samplers\n\n{summary_table(res)}",
                  flush=True)
        results[f"{factor}x"] = _result_entry(res)
        overall[f"{factor}x"] = overall_by_label(res)
        for extension in args.extensions:
            ext = generate_and_evaluate(adapter, data_dir, os.path.join(folder, extension), factor, ("full",),
                                        args.steps, extension=extension, references=False, **common)
            if verbose:  # the row label may carry the demo's caveat star ("| full * |" for a static clip)
                row = next(line for line in summary_table(ext).splitlines() if FULL_ROW.match(line))
                print(FULL_ROW.sub(f"| full + {extension}\\1 |", row), flush=True)
            results[f"{factor}x"][f"full+{extension}"] = ext["report"]["videos"]["full"]
            overall[f"{factor}x"][f"full + {extension}"] = overall_by_label(ext)["full"]
    return native, results, overall


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
