"""Throughput of long sampling: batched windows vs sequential, and step caching vs none (issue 16).

Everything runs in one process on one tiny random pipeline, settings interleaved repeat by repeat, so the
ratios (median wall time of a setting / median of its baseline) are measured under the same load:

* ``sliding`` and ``fifo`` with ``window_batch=1`` (sequential) vs all windows of a step in one call;
  the largest latent difference between the two is printed too (float tolerance);
* ``--extension cache`` (First Block Cache, TaylorSeer) vs no cache on the same seed, for sliding, fifo and
  df: speed-up, the share of model calls that skipped computation, the latent difference, and the change of
  the drift metrics of :func:`longgen.eval.metrics.evaluate_frames` on the decoded clip.

    python -m benchmarks.throughput --family wan --num-frames 45 --height 64 --width 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from longgen.files import write_json_atomic


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def _generate(pipe, args, sampler: str, **options):
    kwargs = dict(num_frames=args.num_frames, height=args.height, width=args.width, seed=args.seed,
                  sampler=sampler, show_progress=False, sampler_options=options or None)
    if sampler != "fifo":
        kwargs["num_inference_steps"] = args.steps
    return pipe.generate("a red ball bouncing", **kwargs)


def _drift(pipe, latents: torch.Tensor) -> dict[str, float]:
    """Summary means of the drift metrics on the decoded clip (first sample)."""
    from longgen.eval.metrics import evaluate_frames

    frames = pipe.adapter.decode(latents[:1].to(pipe.device))[0].clamp(0, 1)
    report = evaluate_frames((frames.cpu().numpy() * 255).round().astype(np.uint8), window=8)
    means = {name: m["summary"].get("mean") for name, m in report["metrics"].items()}
    return {name: float(v) for name, v in means.items() if v is not None}


def bench_batching(pipe, args) -> list[dict]:
    rows = []
    for sampler in ("sliding", "fifo"):
        times: dict[str, list[float]] = {"seq": [], "batched": []}
        outs = {}
        for _ in range(args.repeats):
            for label, wb in (("seq", 1), ("batched", 64)):
                t, res = _timed(_generate, pipe, args, sampler, window_batch=wb)
                times[label].append(t)
                outs[label] = res
        seq, bat = statistics.median(times["seq"]), statistics.median(times["batched"])
        rows.append({
            "sampler": sampler, "seq_s": seq, "batched_s": bat, "ratio": bat / seq,
            "calls_seq": outs["seq"].stats["model_calls"], "calls_batched": outs["batched"].stats["model_calls"],
            "max_abs_diff": float((outs["seq"].latents - outs["batched"].latents).abs().max()),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


CACHES = {"fbc": {"kind": "fbc", "threshold": 0.1}, "taylorseer": {"kind": "taylorseer", "interval": 2,
                                                                   "warmup_steps": 2}}


def bench_cache(pipe, args) -> list[dict]:
    rows = []
    for sampler in ("sliding", "fifo", "df"):
        times: dict[str, list[float]] = {"none": [], **{k: [] for k in CACHES}}
        outs, skipped = {}, {}
        for _ in range(args.repeats):
            t, outs["none"] = _timed(_generate, pipe, args, sampler)
            times["none"].append(t)
            for name, options in CACHES.items():
                handle = pipe.apply_extension("cache", **options)
                t, outs[name] = _timed(_generate, pipe, args, sampler)
                skipped[name] = handle.describe()["details"]["skipped_fraction"]
                pipe.remove_extensions()
                times[name].append(t)
        base_drift = _drift(pipe, outs["none"].latents)
        for name in CACHES:
            drift = _drift(pipe, outs[name].latents)
            change = {k: drift[k] - base_drift[k] for k in base_drift if k in drift}
            rows.append({
                "sampler": sampler, "cache": name, "none_s": statistics.median(times["none"]),
                "cache_s": statistics.median(times[name]),
                "speedup": statistics.median(times["none"]) / statistics.median(times[name]),
                "skipped_fraction": skipped[name],
                "latent_max_abs_diff": float((outs[name].latents - outs["none"].latents).abs().max()),
                "latent_abs_max": float(outs["none"].latents.abs().max()),
                "drift_none": base_drift, "drift_change": change,
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _tiny(family: str, layers: int | None):
    """The family's tiny random adapter, with ``layers`` transformer blocks if given."""
    import inspect

    from longgen.backbones import build_tiny, get_adapter_class

    if layers is None:
        return build_tiny(family)
    cls = get_adapter_class(family)
    if "transformer_kwargs" not in inspect.signature(cls.tiny_pipeline).parameters:
        raise SystemExit(f"--layers: the tiny {family} pipeline takes no transformer_kwargs; omit --layers")
    return cls(cls.tiny_pipeline(transformer_kwargs={"num_layers": layers}), native_video_size=cls.tiny_video_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="wan")
    p.add_argument("--num-frames", type=int, default=45)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=None,
                   help="transformer blocks of the tiny model (default: its 2; caches skip blocks, so more show more)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared machine: 1)")
    p.add_argument("--only", choices=["batching", "cache"], default=None)
    p.add_argument("--json", default=None, help="write all rows here")
    args = p.parse_args(argv)
    from longgen.pipeline import LongVideoPipeline

    torch.set_num_threads(args.threads)
    pipe = LongVideoPipeline(_tiny(args.family, args.layers))
    rows = {}
    if args.only in (None, "batching"):
        rows["batching"] = bench_batching(pipe, args)
    if args.only in (None, "cache"):
        rows["cache"] = bench_cache(pipe, args)
    if args.json:
        write_json_atomic(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
