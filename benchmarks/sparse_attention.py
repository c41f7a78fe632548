"""Sparse (temporal sliding-tile) attention vs dense on full-clip denoising (issue 16.3).

One process, one tiny random Wan, settings interleaved repeat by repeat so the ratios (median wall time of a
setting / median of dense) are measured under the same load:

* ``dense``: the stock model on the whole clip (what ``--sampler full`` calls every step);
* ``blocks``: ``--extension sparse`` computing only each query tile's local key frames;
* ``mask``: ``--extension sparse --sparse-attention mask``, the same pattern as a dense boolean mask through the
  stock processor (computes everything; the reference path).

Each setting is one model forward on the clip (``adapter.denoise``), plus the analytic FLOPs of that forward
(:func:`longgen.flops.wan_flops_breakdown` with and without ``sparse_radius``), the self-attention share, and
the largest output difference of ``blocks`` vs ``mask`` (float tolerance) and vs dense. Process CPU time
(user + sys) is printed beside the wall time (the machine may be shared).

    python -m benchmarks.sparse_attention --latent-frames 12 48 --height 128 --width 128 --radius 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from longgen.files import write_json_atomic


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - wall, _cpu_seconds() - cpu, out


def bench(adapter, frames: int, args) -> dict:
    """Median wall / CPU seconds of one forward per setting on a ``frames``-latent-frame clip."""
    from longgen.extend.sparse_attention import SparseAttentionConfig, apply_sparse_attention
    from longgen.flops import sparse_self_attention_fraction, wan_flops_breakdown

    cond, _ = adapter.encode_prompt(["a red ball bouncing"], do_classifier_free_guidance=False)
    lh, lw = args.height // adapter.spatial_compression, args.width // adapter.spatial_compression
    x = torch.randn(1, adapter.latent_channels, frames, lh, lw, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((1, frames), 0.5)
    settings = {"dense": None, "blocks": "blocks", "mask": "mask"}
    walls: dict[str, list[float]] = {k: [] for k in settings}
    cpus: dict[str, list[float]] = {k: [] for k in settings}
    outs = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for label, attention in settings.items():
            handle = None
            if attention is not None:
                config = SparseAttentionConfig(radius=args.radius, tile=args.tile, attention=attention)
                handle = apply_sparse_attention(adapter, config)
            try:
                wall, cpu, outs[label] = _timed(lambda: adapter.denoise(x, sigma, cond))
            finally:
                if handle is not None:
                    handle.remove()
            if repeat:
                walls[label].append(wall)
                cpus[label].append(cpu)
    text = cond["encoder_hidden_states"].shape[1]
    dense = wan_flops_breakdown(adapter.model.config, frames, lh, lw, text_len=text)
    sparse = wan_flops_breakdown(adapter.model.config, frames, lh, lw, text_len=text,
                                 sparse_radius=args.radius, sparse_tile=args.tile)
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {
        "latent_frames": frames,
        "tokens": frames * (lh // 2) * (lw // 2),
        "attention_fraction": sparse_self_attention_fraction(frames, args.radius, args.tile),
        "self_attn_share_dense": dense["self_attn_matmul"] / sum(dense.values()),
        "flops_saved": 1 - sum(sparse.values()) / sum(dense.values()),
        "wall_s": med,
        "cpu_s": {k: statistics.median(v) for k, v in cpus.items()},
        "wall_blocks_vs_dense": med["blocks"] / med["dense"],
        "wall_mask_vs_dense": med["mask"] / med["dense"],
        "max_diff_blocks_vs_mask": float((outs["blocks"] - outs["mask"]).abs().max()),
        "max_diff_blocks_vs_dense": float((outs["blocks"] - outs["dense"]).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent-frames", type=int, nargs="+", default=[12, 48], help="clip lengths (latent frames)")
    p.add_argument("--height", type=int, default=128, help="frame height in pixels")
    p.add_argument("--width", type=int, default=128, help="frame width in pixels")
    p.add_argument("--radius", type=int, default=2, help="--sparse-radius (latent frames each side)")
    p.add_argument("--tile", type=int, default=1, help="--sparse-tile (latent frames per query tile)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per setting (median), after a warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from longgen.backbones import build_tiny

    torch.manual_seed(0)
    adapter = build_tiny("wan")
    rows = []
    for frames in args.latent_frames:
        rows.append(bench(adapter, frames, args))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| latent frames | tokens | attention pairs kept | self-attn share of FLOPs (dense) | FLOPs saved | "
          "dense s | blocks s | mask s | blocks / dense | mask / dense | CPU time blocks / dense | CPU time mask / dense | "
          "max diff blocks vs mask |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w, c = r["wall_s"], r["cpu_s"]
        print(f"| {r['latent_frames']} | {r['tokens']} | {r['attention_fraction']:.3f} | "
              f"{r['self_attn_share_dense']:.3f} | {r['flops_saved']:.3f} | {w['dense']:.3f} | {w['blocks']:.3f} | "
              f"{w['mask']:.3f} | {r['wall_blocks_vs_dense']:.2f} | {r['wall_mask_vs_dense']:.2f} | "
              f"{c['blocks'] / c['dense']:.2f} | {c['mask'] / c['dense']:.2f} | {r['max_diff_blocks_vs_mask']:.1e} |")
    if args.json:
        write_json_atomic(args.json, rows, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
