"""Causal streaming benchmarks (issue 12): KV-cache rollout vs recompute, peak memory vs length, sampler speed.

All in one run, ratios against baselines measured in the same run, on a small random Wan transformer (4 blocks,
4 heads x 24, 8x8 tokens per latent frame; no downloads) on CPU, or CUDA when available:

1. **KV cache vs recompute**: ``sample_causal`` with the KV cache against the no-cache reference (every model call
   re-runs the whole prefix, block-causal per-chunk attention), same schedule (Self-Forcing's 4 warped steps),
   chunk 3, full cache, at several lengths; the speed-up is expected to grow about linearly with the chunk count.
2. **Peak memory** at 2x / 8x / 32x the native length (6 latent frames here) with a rolling window (sink 3 +
   ``local_attn_size`` 9) and ``return_latents=False`` (frames leave through ``on_frames``): each length runs in a
   fresh process; reported: peak KV-cache bytes, and the process's peak memory above what it held after loading the
   model and one warm-up chunk (CPU: ru_maxrss; CUDA: ``max_memory_allocated``); goal <= 1.1x from 2x to 32x.

Times are medians of ``--repeats`` runs: CUDA wall time, or on CPU the process's CPU time with one thread (robust
to other processes on a shared machine).
3. **Frames per second** of ``causal`` vs ``df`` (``sample_diffusion_forcing``, SkyReels long mode: native chunks,
   history 3) and ``sliding`` (native windows, stride 3) at the same 4 steps and length.

    python -m benchmarks.causal                   # a few minutes on a CPU
    python -m benchmarks.causal --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from longgen.files import write_json_atomic

NATIVE = 6  # latent frames of the "native" clip of the benchmark model
CHUNK = 3


def build(device: str):
    """A small random Wan adapter and its text conds (cond only: the causal checkpoints are distilled, no CFG)."""
    import torch

    from longgen.backbones.wan import WanAdapter

    pipe = WanAdapter.tiny_pipeline(
        transformer_kwargs=dict(num_layers=4, num_attention_heads=4, attention_head_dim=24, ffn_dim=192)
    )
    adapter = WanAdapter(pipe.to(device), native_video_size=WanAdapter.tiny_video_size)
    cond, _ = adapter.encode_prompt(["a red ball bouncing"], do_classifier_free_guidance=False)
    torch.manual_seed(0)
    return adapter, cond


def _noise(adapter, frames: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, adapter.latent_channels, frames, 16, 16, generator=gen).to(device)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn``: CUDA wall time, or on CPU this process's CPU time (one thread), which other
    processes sharing the machine do not inflate."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def causal_run(adapter, cond, noise, use_cache: bool, block=None, return_latents=True):
    from longgen.extend.causal import BlockCausalConfig, apply_block_causal
    from longgen.pipeline import GuidedDenoiser
    from longgen.samplers.causal import sample_causal, warped_sigmas

    block = block or BlockCausalConfig(chunk_size=CHUNK)
    handle = apply_block_causal(adapter, block)
    try:
        out = sample_causal(
            GuidedDenoiser(adapter, cond),
            noise,
            warped_sigmas([1000, 750, 500, 250]),
            cache=handle.cache if use_cache else None,
            chunk_size=block.chunk_size,
            disable=True,
            return_latents=return_latents,
            on_frames=lambda start, x: None,
        )
        return out, handle.cache.num_bytes()
    finally:
        handle.remove()


def bench_cache(adapter, cond, device: str, lengths: list[int], repeats: int) -> list[dict]:
    import torch

    rows = []
    with torch.no_grad():
        causal_run(adapter, cond, _noise(adapter, 2 * CHUNK, device), True)  # warm-up
        for frames in lengths:
            noise = _noise(adapter, frames, device)
            cached = _timed(lambda n=noise: causal_run(adapter, cond, n, True), device, repeats)
            recompute = _timed(lambda n=noise: causal_run(adapter, cond, n, False), device, repeats)
            rows.append(
                dict(
                    latent_frames=frames,
                    chunks=frames // CHUNK,
                    cache_s=cached,
                    recompute_s=recompute,
                    speedup=recompute / cached,
                )
            )
            print(f"[causal] cache vs recompute {frames} frames: {recompute / cached:.2f}x", file=sys.stderr)
    return rows


def _memory_child(frames: int, device: str) -> None:
    """One length in this process: prints JSON {cache_bytes, base_mb, peak_mb}."""
    import resource

    import torch

    from longgen.extend.causal import BlockCausalConfig

    adapter, cond = build(device)
    block = BlockCausalConfig(chunk_size=CHUNK, local_attn_size=9, sink_size=3)
    with torch.no_grad():
        causal_run(
            adapter, cond, _noise(adapter, CHUNK, device), True, block, return_latents=False
        )  # warm-up
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        from longgen.extend.causal import apply_block_causal
        from longgen.pipeline import GuidedDenoiser
        from longgen.samplers.causal import sample_causal, warped_sigmas

        handle = apply_block_causal(adapter, block)
        sizes = []
        noise_source = _source(adapter, device)
        sample_causal(
            GuidedDenoiser(adapter, cond),
            noise_source,
            warped_sigmas([1000, 750, 500, 250]),
            cache=handle.cache,
            num_latent_frames=frames,
            disable=True,
            return_latents=False,
            on_frames=lambda start, x: None,
            callback=lambda info: sizes.append(handle.cache.num_bytes()),
        )
        handle.remove()
        peak_cache = max(sizes)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(cache_bytes=peak_cache, base_mb=base, peak_mb=peak)))


def _source(adapter, device: str):
    """Noise frames drawn on demand (constant memory: no clip-long noise tensor)."""
    import torch

    def source(start: int, stop: int):
        gen = torch.Generator().manual_seed(start)
        return torch.randn(1, adapter.latent_channels, stop - start, 16, 16, generator=gen).to(device)

    return source


def bench_memory(device: str, factors: list[int]) -> list[dict]:
    rows = []
    for factor in factors:
        frames = NATIVE * factor
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.causal",
            "--memory-child",
            str(frames),
            "--device",
            device,
            "--threads",
            "1",
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row = dict(factor=factor, latent_frames=frames, **json.loads(out))
        row["growth_mb"] = row["peak_mb"] - row["base_mb"]
        rows.append(row)
        print(f"[causal] memory {factor}x: {row}", file=sys.stderr)
    first = rows[0]
    for row in rows:
        row["peak_ratio_vs_first"] = row["peak_mb"] / first["peak_mb"]
        row["cache_ratio_vs_first"] = row["cache_bytes"] / first["cache_bytes"]
    return rows


def bench_fps(adapter, cond, device: str, frames: int, repeats: int) -> list[dict]:
    import torch

    from longgen.pipeline import GuidedDenoiser
    from longgen.samplers.causal import warped_sigmas
    from longgen.samplers.diffusion_forcing import sample_diffusion_forcing
    from longgen.samplers.sliding import sample_sliding

    sigmas = warped_sigmas([1000, 750, 500, 250])
    noise = _noise(adapter, frames, device)
    denoise = GuidedDenoiser(adapter, cond)
    runs = {
        "causal (KV cache, chunk 3)": lambda: causal_run(adapter, cond, noise, True),
        "df (native chunks, history 3)": lambda: sample_diffusion_forcing(
            denoise, noise, sigmas, base_num_latent_frames=NATIVE, overlap_history=CHUNK, disable=True
        ),
        "sliding (native window, stride 3)": lambda: sample_sliding(
            denoise, noise, sigmas, window=NATIVE, stride=CHUNK, disable=True
        ),
    }
    rows = []
    with torch.no_grad():
        for name, fn in runs.items():
            fn()  # warm-up
            seconds = _timed(fn, device, repeats)
            rows.append(
                dict(sampler=name, latent_frames=frames, seconds=seconds, latent_fps=frames / seconds)
            )
            print(f"[causal] {name}: {frames / seconds:.2f} latent frames/s", file=sys.stderr)
    base = rows[0]["latent_fps"]
    for row in rows:
        row["fps_vs_causal"] = row["latent_fps"] / base
    return rows


def table(title: str, rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable timings)")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)  # a shared CPU: oversubscribed threads make timings meaningless
    if args.memory_child is not None:
        _memory_child(args.memory_child, device)
        return 0
    adapter, cond = build(device)
    repeats = 1 if args.quick else 3
    lengths = [12, 24] if args.quick else [12, 24, 48, 96]
    results = {
        "device": device,
        "cache_vs_recompute": bench_cache(adapter, cond, device, lengths, repeats),
        "memory": bench_memory(device, [2, 8] if args.quick else [2, 8, 32]),
        "fps": bench_fps(adapter, cond, device, 24 if args.quick else 96, repeats),
    }
    print(f"device: {device}\n")
    print(
        table("KV-cache rollout vs recompute without cache (4 steps, chunk 3)", results["cache_vs_recompute"])
    )
    print(
        table("Peak memory with a rolling window (sink 3 + local 9), return_latents=False", results["memory"])
    )
    print(table("Sampler speed at 4 steps", results["fps"]))
    if args.json:
        write_json_atomic(args.json, results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
