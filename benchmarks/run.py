"""All of longgen's performance benchmarks in one command, summarised in one markdown table.

    python -m benchmarks.run            # a few minutes on a CPU
    python -m benchmarks.run --quick    # about two minutes: fewer lengths, samplers and repeats

Runs, on this machine:

1. the analytic FLOPs check: ``longgen.flops.wan_transformer_flops`` against ``torch.utils.flop_counter``
   on a tiny ``WanTransformer3DModel`` (several shapes), and the model FLOPs of Wan2.1-1.3B at 480x832;
2. ``benchmarks.generate_memory``: sampler wall time per output frame and peak RSS vs clip length;
3. ``benchmarks.trainer_overhead``: longgen's trainer vs a bare loop (step time, peak memory) and the
   longest trainable clip per memory budget with and without gradient checkpointing;
4. on a CUDA machine, ``benchmarks.gpu_wan`` (Wan2.1-1.3B training MFU and denoiser speed; skip with
   ``--no-gpu``).

The combined table comes first, the detailed tables of each benchmark after it. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any

from longgen.files import write_json_atomic
from longgen.samplers import sampler_names

Row = tuple[str, str, str]  # (benchmark, setting, result)


def _log(message: str) -> None:
    print(f"[benchmarks.run] {message}", file=sys.stderr, flush=True)


# --- 1. FLOPs ------------------------------------------------------------------------------------


def flops_check(quick: bool) -> tuple[list[Row], str, dict[str, Any]]:
    """Formula vs ``FlopCounterMode`` (math SDPA backend, so attention is counted as two bmm's)."""
    import torch
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.gpu_wan import WAN21_1_3B
    from longgen.flops import wan_flops_per_token, wan_num_tokens, wan_transformer_flops

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
    ).eval()
    shapes = [(1, 3, 4, 4, 16), (2, 5, 8, 8, 64)] + ([] if quick else [(1, 9, 16, 16, 512)])
    rows: list[Row] = []
    results = []
    for batch, frames, height, width, text_len in shapes:
        x = torch.randn(batch, 4, frames, height, width)
        timestep = torch.full((batch,), 500.0)
        text = torch.randn(batch, text_len, 32)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, timestep, text, return_dict=False)
        counted = counter.get_total_flops()
        analytic = wan_transformer_flops(
            model.config, frames, height, width, text_len=text_len, batch_size=batch
        )
        error = abs(analytic - counted) / counted
        results.append(
            {"shape": [batch, frames, height, width, text_len], "analytic": analytic, "counted": counted}
        )
        rows.append(
            (
                "FLOPs formula vs torch flop_counter",
                f"tiny Wan, B={batch}, latent {frames}x{height}x{width}, {text_len} text tokens",
                f"{analytic:,} vs {counted:,} ({100 * error:.2f}% off)",
            )
        )
    detail = [
        "| pixel frames (480x832) | tokens | forward TFLOP | training step TFLOP | GFLOP/token | self-attn share |",
        "|---|---|---|---|---|---|",
    ]
    for num_frames in (81, 161):
        latent = 1 + (num_frames - 1) // 4
        forward = wan_transformer_flops(WAN21_1_3B, latent, 60, 104)
        training = wan_transformer_flops(WAN21_1_3B, latent, 60, 104, training=True, per_token_timesteps=True)
        summary = wan_flops_per_token(WAN21_1_3B, latent, 60, 104)
        tokens = wan_num_tokens(WAN21_1_3B, latent, 60, 104)
        rows.append(
            (
                "Wan2.1-1.3B model FLOPs (analytic)",
                f"{num_frames} frames 480x832, {tokens} tokens",
                f"forward {forward / 1e12:.0f} TFLOP, training step {training / 1e12:.0f} TFLOP, "
                f"self-attention {100 * summary['self_attn_share']:.0f}%",
            )
        )
        detail.append(
            f"| {num_frames} | {tokens} | {forward / 1e12:.1f} | {training / 1e12:.1f} | "
            f"{summary['flops_per_token'] / 1e9:.2f} | {100 * summary['self_attn_share']:.1f}% |"
        )
    return rows, "\n".join(detail), {"tiny_checks": results}


# --- 2. sampler time and memory vs length ---------------------------------------------------------


def generate_memory(quick: bool, tmp: str) -> tuple[list[Row], str, Any]:
    from benchmarks import generate_memory as gm

    path = os.path.join(tmp, "generate_memory.json")
    argv = ["--family", "wan", "--steps", "4", "--json", path]
    if quick:
        argv += ["--factors", "1", "4", "--samplers", "full", "sliding", "--repeats", "1"]
    else:
        argv += ["--factors", "1", "4", "16", "--samplers", *sampler_names(), "--repeats", "2"]
    captured = tempfile.TemporaryFile(mode="w+")
    with contextlib.redirect_stdout(captured):
        gm.main(argv)
    captured.seek(0)
    table = captured.read().strip().split("\n\n")[-1]
    with open(path) as fh:
        data = json.load(fh)
    rows: list[Row] = []
    for r in data:
        base = next(b for b in data if b["sampler"] == r["sampler"] and b["decode"] == r["decode"])
        rows.append(
            (
                "sampler time per output frame, peak RSS",
                f"{r['sampler']}, {r['factor']}x native ({r['num_frames']} frames), tiny Wan, 4 steps",
                f"{r['seconds'] / r['num_frames']:.3f} s/frame (whole process), {r['peak_rss_mib']:.0f} MiB "
                f"({r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x of {base['factor']}x)",
            )
        )
    return rows, table, data


# --- 3. trainer overhead and max frames ---------------------------------------------------------


def trainer_overhead(quick: bool, device: str) -> tuple[list[Row], str, Any]:
    from benchmarks import trainer_overhead as to

    workloads = [to.TINY] if quick else [to.TINY, to.SMALL]
    overhead = [
        to.measure_overhead(w, device, steps=8 if quick else 12, warmup=2, repeats=4 if quick else 6)
        for w in workloads
    ]
    memory_workload = to.MEMORY
    frames = [2, 6, 12] if quick else [2, 6, 12, 20, 28]
    budgets = [1024, 4096, 16384] if device == "cuda" else [128, 512, 2048]
    memory = to.measure_max_frames(memory_workload, device, frames, budgets, lora=True, text_len=32)
    rows: list[Row] = []
    for s in overhead:
        clock = s["primary_clock"]
        rows.append(
            (
                "trainer overhead vs bare loop",
                f"{s['workload']['name']}, LoRA, {device}, {clock} time",
                f"{s['trainer'][f'{clock}_step_s'] * 1e3:.1f} vs {s['bare'][f'{clock}_step_s'] * 1e3:.1f} ms/step: "
                f"{s['time_ratio']:.3f}x (target <= 1.05); memory {s['trainer']['memory_mib']:.0f} vs "
                f"{s['bare']['memory_mib']:.0f} MiB ({s['memory_ratio']:.3f}x)",
            )
        )
    unit = "peak CUDA MiB" if device == "cuda" else "MiB of training memory"
    for budget in memory["max"]["no checkpointing"]:
        cells = []
        for label in ("no checkpointing", "checkpointing"):
            entry = memory["max"][label][budget]
            if entry["capped"]:
                cells.append(f"{label}: >= {entry['latent_frames']} (fit capped at 8x the longest measured)")
            else:
                mark = " (extrapolated)" if entry["extrapolated"] else ""
                cells.append(f"{label}: {entry['latent_frames']}{mark}")
        rows.append(
            ("max trainable latent frames", f"{float(budget):.0f} {unit}, memory DiT, LoRA", "; ".join(cells))
        )
    return rows, to.markdown(overhead, memory), {"overhead": overhead, "memory": memory}


# --- 4. GPU --------------------------------------------------------------------------------------


def gpu_wan(quick: bool, tmp: str) -> tuple[list[Row], str, Any]:
    from benchmarks import gpu_wan as gw

    path = os.path.join(tmp, "gpu_wan.json")
    argv = ["--json", path] + (["--frames", "81", "--repeats", "2"] if quick else [])
    captured = tempfile.TemporaryFile(mode="w+")
    with contextlib.redirect_stdout(captured):
        gw.main(argv)
    captured.seek(0)
    with open(path) as fh:
        data = json.load(fh)
    rows: list[Row] = []
    for r in data["rows"]:
        setting = f"{r['mode']}, {r['num_frames']} frames {r['size']}, {data['device']}"
        if "error" in r:
            rows.append(("Wan2.1-1.3B on GPU", setting, r["error"]))
            continue
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        rows.append(
            (
                "Wan2.1-1.3B on GPU",
                setting,
                f"{r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, {r['frames_per_s']:.2f} frames/s"
                f"{mfu}, peak {r['peak_gib']:.1f} GiB",
            )
        )
    return rows, captured.read().strip(), data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about two minutes on a CPU")
    p.add_argument("--no-gpu", action="store_true", help="skip benchmarks.gpu_wan even on a CUDA machine")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["flops", "generate", "trainer", "gpu"],
        default=None,
        help="run a subset",
    )
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    wanted = set(args.only or ["flops", "generate", "trainer", "gpu"])
    if args.no_gpu or not cuda:
        wanted.discard("gpu")
    rows: list[Row] = []
    details: list[tuple[str, str]] = []
    results: dict[str, Any] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        steps = [
            ("flops", "Model FLOPs", lambda: flops_check(args.quick)),
            ("generate", "Sampler time and peak memory vs length", lambda: generate_memory(args.quick, tmp)),
            (
                "trainer",
                "Trainer overhead and max trainable frames",
                lambda: trainer_overhead(args.quick, "cuda" if cuda else "cpu"),
            ),
            ("gpu", "Wan2.1-1.3B on GPU", lambda: gpu_wan(args.quick, tmp)),
        ]
        for key, title, fn in steps:
            if key not in wanted:
                continue
            _log(f"{title} ...")
            t0 = time.perf_counter()
            new_rows, table, data = fn()
            _log(f"{title}: {time.perf_counter() - t0:.0f} s")
            rows += new_rows
            details.append((title, table))
            results[key] = data
    if "gpu" not in wanted and not args.no_gpu and (args.only is None or "gpu" in args.only):
        rows.append(
            ("Wan2.1-1.3B on GPU", "no CUDA GPU on this machine", "not run (python -m benchmarks.gpu_wan)")
        )

    cpu = f"{os.cpu_count()} CPU cores" + (f", {torch.cuda.get_device_name()}" if cuda else "")
    print(
        f"## longgen benchmarks ({'quick, ' if args.quick else ''}{cpu}, {time.perf_counter() - start:.0f} s)\n"
    )
    print("| benchmark | setting | result |")
    print("|---|---|---|")
    for benchmark, setting, result in rows:
        print(f"| {benchmark} | {setting} | {result} |")
    for title, table in details:
        print(f"\n### {title}\n\n{table}")
    if args.json:
        write_json_atomic(args.json, results, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
