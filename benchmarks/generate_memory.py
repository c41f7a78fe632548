"""Peak memory and wall time of `longgen generate` vs clip length, for each sampler.

Each (sampler, length) runs `longgen generate` in a fresh process on a tiny saved pipeline, and the peak
resident memory of that process (ru_maxrss of the child) and its wall time are recorded; each setting is
repeated and the median taken. The baseline is the same command at the native length, in the same run,
so ratios are immune to the machine's speed.

    python -m benchmarks.generate_memory --family wan --factors 1 2 8 32 --samplers full sliding fifo df
    python -m benchmarks.generate_memory --samplers causal "causal --local-attn-size 6 --sink-size 3"

A ``--samplers`` entry is a sampler name, optionally followed by its knob flags in the same (quoted) argument;
the whole entry labels its rows.

``--allocators bounded default`` also runs every setting with the stock glibc allocator policy
(``LONGGEN_ALLOCATOR=default``; ``bounded`` is what `longgen generate` sets, :mod:`longgen.memory`), so the
before/after comparison comes from one run.

Every sampler gets the same step budget through the sampler registry (``options_for_steps``): fifo,
whose step count is num_partitions * window, gets the num_partitions that comes closest to it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from longgen.files import write_json_atomic


def step_flags(adapter, num_frames: int, sampler: str, steps: int) -> list[str]:
    """Flags giving ``sampler`` about ``steps`` model steps (fifo's count follows from its knobs)."""
    from longgen.samplers import SamplerContext, option_flags, options_for_steps

    num_latent = adapter.num_latent_frames(num_frames)
    native = adapter.num_latent_frames(adapter.native_video_size[0])
    options, fixed = options_for_steps(sampler, steps, SamplerContext(min(native, num_latent), num_latent))
    return option_flags(options) + (["--steps", str(fixed)] if fixed is not None else [])


def run_once(model: str, num_frames: int, sampler: str, steps: int, out: str, extra: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds user + sys) of one `longgen generate` child."""
    # `extra` carries the step flags (step_flags): the tiny model is loaded once, in the parent
    cmd = [sys.executable, "-m", "longgen.cli", "generate", "--model", model, "--num-frames", str(num_frames),
           "--sampler", sampler, "--out", out, "--quiet", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if usage.ru_maxrss < before.ru_maxrss:  # pragma: no cover
        raise RuntimeError("ru_maxrss went down")
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    return seconds, usage.ru_maxrss / 1024.0, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="wan", help="tiny backbone family")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 8], help="clip lengths as multiples of native")
    p.add_argument("--samplers", nargs="+", default=["full", "sliding"],
                   help="samplers to measure; an entry may carry knob flags: \"causal --local-attn-size 6\"")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting (median reported)")
    p.add_argument("--height", type=int, default=None, help="frame height (default: the tiny model's native)")
    p.add_argument("--width", type=int, default=None, help="frame width (default: the tiny model's native)")
    p.add_argument(
        "--whole-decode",
        action="store_true",
        help="also measure decoding the whole clip in one VAE call (no streaming) as the memory baseline",
    )
    p.add_argument(
        "--allocators",
        nargs="+",
        default=["bounded"],
        choices=["bounded", "default"],
        help="host allocator policies to measure: bounded (longgen generate's, longgen.memory) and/or default "
        "(glibc's stock policy, LONGGEN_ALLOCATOR=default)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    from longgen.backbones import build_tiny

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        adapter = build_tiny(args.family)
        adapter.save_pretrained(model)
        native_latent = adapter.num_latent_frames(adapter.native_video_size[0])
        # ru_maxrss of RUSAGE_CHILDREN is the max over all children so far: run in increasing memory order
        # per sampler is not guaranteed, so each measurement gets its own grandchild via a wrapper process.
        size = []
        if args.height:
            size += ["--height", str(args.height)]
        if args.width:
            size += ["--width", str(args.width)]
        variants = [(s, "streamed", a) for s in args.samplers for a in args.allocators]
        if args.whole_decode:
            variants += [(s, "whole", a) for s in args.samplers for a in args.allocators]
        for label, decode, allocator in variants:
            sampler, *knob_flags = shlex.split(label)
            env = {**os.environ, "LONGGEN_ALLOCATOR": "default" if allocator == "default" else "bounded"}
            for factor in args.factors:
                num_latent = native_latent * factor
                num_frames = adapter.num_pixel_frames(num_latent)
                extra = size + ["--decode-chunk", str(num_latent if decode == "whole" else 4)]
                extra += step_flags(adapter, num_frames, sampler, args.steps) + knob_flags
                secs, mems, cpus, loads = [], [], [], []
                for _ in range(args.repeats):
                    loads.append(os.getloadavg()[0])
                    out = subprocess.run(
                        [sys.executable, "-m", "benchmarks.generate_memory", "--_child", model, str(num_frames),
                         sampler, str(args.steps), os.path.join(tmp, "o.mp4"), *extra],
                        check=True, capture_output=True, text=True, env=env,
                    ).stdout.strip().splitlines()[-1]
                    s, m, c = map(float, out.split())
                    secs.append(s)
                    mems.append(m)
                    cpus.append(c)
                rows.append({"sampler": label, "decode": decode, "allocator": allocator, "factor": factor, "num_frames": num_frames,
                             "seconds": statistics.median(secs), "cpu_seconds": statistics.median(cpus),
                             "peak_rss_mib": statistics.median(mems), "runs_peak_rss_mib": mems, "runs_cpu_seconds": cpus,
                             "load_average_1min": loads})
                print(json.dumps(rows[-1]), flush=True)
    print()
    first = f"{args.factors[0]}x"
    print(f"| sampler | decode | allocator | length | frames | s/frame | CPU s | peak RSS MiB | RSS vs {first} | "
          f"time vs {first} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = ("sampler", "decode", "allocator")
        base = next(b for b in rows if all(b[k] == r[k] for k in key) and b["factor"] == args.factors[0])
        print(f"| {r['sampler']} | {r['decode']} | {r['allocator']} | {r['factor']}x | {r['num_frames']} | "
              f"{r['seconds'] / r['num_frames']:.3f} | {r['cpu_seconds']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} | "
              f"{r['seconds'] / base['seconds']:.2f} |")
    if args.json:
        write_json_atomic(args.json, rows, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        model, frames, sampler, steps, out = sys.argv[2:7]
        s, m, c = run_once(model, int(frames), sampler, int(steps), out, sys.argv[7:])
        print(f"{s} {m} {c}")
        sys.exit(0)
    sys.exit(main())
