"""One clip over N processes: ``--context-parallel ulysses|ring|windows`` vs one process (issue 16, item 4).

Launches ``torchrun --nproc-per-node N`` once; inside, every setting samples the same clip (same seed, no decode),
interleaved repeat by repeat so all see the same load:

* ``single``: rank 0 alone, the other ranks waiting at a barrier (the one-process baseline);
* ``windows``: each rank denoises its share of every step's windows (``sliding`` / ``fifo``);
* ``ulysses`` / ``ring``: every model call's tokens split over the ranks (diffusers' context parallel; ring on
  the native backend is longgen's own ring attention).

Per setting: the median wall time of rank 0 (after a barrier, so all ranks start together), the summed CPU time of
all ranks (user + sys), the ratio to ``single``, and the largest latent difference from ``single``.

    python -m benchmarks.parallel_generate --processes 2 --num-frames 45 --height 64 --width 64 --steps 4
    python -m benchmarks.parallel_generate --processes 4 --model ./Wan2.1-T2V-1.3B-Diffusers --device cuda --dtype bf16 \\
        --num-frames 81 --height 480 --width 832 --window 20 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load(args, device: str):
    from longgen.dtypes import torch_dtype
    from longgen.pipeline import LongVideoPipeline

    return LongVideoPipeline.from_pretrained(args.model, torch_dtype=torch_dtype(args.dtype), device=device)


def _sample(pipe, args, sampler: str):
    options = {"window": args.window} if args.window else {}
    if sampler == "sliding" and args.window:
        options["stride"] = max(1, args.window // 2)
    steps = None if sampler == "fifo" else args.steps
    return pipe.generate("a red ball bouncing", num_frames=args.num_frames, height=args.height, width=args.width,
                         num_inference_steps=steps, seed=0, sampler=sampler, sampler_options=options or None,
                         show_progress=False).latents


def _timed(run, group_cpu):
    """(rank-0 wall s, all ranks' CPU s, latents) of ``run()``, every rank starting after one barrier."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    latents = run()
    dist.barrier()
    wall, cpu = time.perf_counter() - wall, torch.tensor([_cpu_seconds() - cpu], dtype=torch.float64)
    dist.all_reduce(cpu)
    group_cpu.append(float(cpu))
    return wall, latents


def worker(args) -> None:
    """One rank: every setting, interleaved repeat by repeat; rank 0 prints one JSON line per setting."""
    import torch.distributed as dist

    from longgen.parallel import GenerationParallel, spread_windows

    par, device = GenerationParallel.from_environment("windows", args.device)
    base = _load(args, device)
    pipes = {"single": base, "windows": base}
    for mode in ("ulysses", "ring"):
        if mode in args.modes:
            pipes[mode] = _load(args, device)
            GenerationParallel(mode, par.rank, par.world_size).apply(pipes[mode], args.sampler)
    settings = ["single"] + [m for m in ("windows", "ulysses", "ring") if m in args.modes]
    walls = {s: [] for s in settings}
    cpus = {s: [] for s in settings}
    latents = {}
    for _ in range(args.repeats):
        for setting in settings:
            def run(setting=setting):
                if setting == "single":
                    return _sample(base, args, args.sampler) if par.rank == 0 else None
                if setting == "windows":
                    with spread_windows():
                        return _sample(base, args, args.sampler)
                return _sample(pipes[setting], args, args.sampler)

            wall, latents[setting] = _timed(run, cpus[setting])
            walls[setting].append(wall)
    if par.rank == 0:
        ref = latents["single"]
        for setting in settings:
            wall, cpu = statistics.median(walls[setting]), statistics.median(cpus[setting])
            row = {"setting": setting, "processes": 1 if setting == "single" else par.world_size,
                   "sampler": args.sampler, "wall_s": wall, "cpu_s": cpu,
                   "wall_vs_single": wall / statistics.median(walls["single"]),
                   "max_abs_diff": float((latents[setting] - ref).abs().max())}
            print(json.dumps(row), flush=True)
    dist.barrier()
    par.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2, help="processes (GPUs) to spread one clip over")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder (default: a tiny random Wan)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--sampler", default="sliding", choices=["sliding", "fifo", "full"])
    p.add_argument("--modes", nargs="+", default=["windows", "ulysses", "ring"])
    p.add_argument("--num-frames", type=int, default=45)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--window", type=int, default=None, help="latent frames per window (default: native)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from longgen.backbones import build_tiny

            args.model = os.path.join(tmp, "wan")
            build_tiny("wan").save_pretrained(args.model)
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
        if "--model" not in forwarded:
            forwarded += ["--model", args.model]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes),
               "-m", "benchmarks.parallel_generate", "--worker", *forwarded]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
