#!/usr/bin/env python
"""longgen's embedded default on a fresh CPU machine, no downloads.

Builds a tiny random Wan pipeline, then generates a clip 4x its native length twice with the same noise:
with the naive baseline (the model run at the long length) and with the sliding-window sampler (the
model only ever sees its native length). Prints where the mp4s went. The evaluation issue replaces this
with `longgen demo` (train the tiny model on synthetic data, generate, evaluate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--family", default="wan", help="tiny backbone family to build")
    parser.add_argument("--length-factor", type=int, default=4, help="clip length as a multiple of the native one")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    args = parser.parse_args(argv)

    from longgen.backbones import build_tiny
    from longgen.io import video_info
    from longgen.pipeline import LongVideoPipeline

    torch.manual_seed(0)
    model_dir = os.path.join(args.out, f"tiny-{args.family}")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        build_tiny(args.family).save_pretrained(model_dir)
    pipe = LongVideoPipeline.from_pretrained(model_dir)
    adapter = pipe.adapter
    native_frames, height, width = adapter.native_video_size
    native_latent = adapter.num_latent_frames(native_frames)
    num_frames = adapter.num_pixel_frames(native_latent * args.length_factor)
    print(f"tiny {args.family}: native clip {native_frames} frames; generating {num_frames} frames "
          f"({args.length_factor}x) at {height}x{width}")
    report = {}
    for sampler in ("full", "sliding"):
        path = os.path.join(args.out, f"{sampler}_{num_frames}f.mp4")
        start = time.perf_counter()
        result = pipe.generate(
            "a red ball bouncing", num_frames=num_frames, num_inference_steps=args.steps, sampler=sampler,
            seed=0, output_path=path,
        )
        seconds = time.perf_counter() - start
        info = video_info(path)
        report[sampler] = {"path": path, "frames": info["num_frames"], "seconds": round(seconds, 2),
                           "model_calls": result.stats["model_calls"]}
        print(f"  {sampler:8s} -> {path} ({info['num_frames']} frames, {seconds:.1f} s)")
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'demo.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
