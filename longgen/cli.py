"""The ``longgen`` command: ``generate``, ``make-tiny``, ``info``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

logger = logging.getLogger("longgen")


def _attention_backends() -> list[str]:
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName

        return [b.value for b in AttentionBackendName if "hub" not in b.value]
    except ImportError:  # pragma: no cover - older diffusers
        return ["native"]


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from .pipeline import DTYPES

    g = p.add_argument_group("model")
    g.add_argument(
        "--config",
        default=None,
        help="YAML file of these options (keys as the flags without '--', e.g. sampler: df, ar-step: 5 or "
        "ar_step: 5); flags given on the command line override it",
    )
    g.add_argument("--model", default=None, help="local diffusers pipeline folder (with model_index.json); required")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute dtype (bf16 on GPU)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    g.add_argument(
        "--offload",
        choices=["none", "model", "group"],
        default="none",
        help="diffusers offloading for large models on small GPUs: 'model' moves whole components to the "
        "device when used, 'group' streams layers (slower, least memory)",
    )
    g.add_argument(
        "--attention-backend",
        default="native",
        choices=_attention_backends(),
        metavar="NAME",
        help="attention kernel through diffusers' dispatch: native = torch SDPA (default); flash / xformers / "
        "sage need their packages installed; any of: " + ", ".join(_attention_backends()),
    )
    g = p.add_argument_group("clip")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text prompt; repeat it with --prompt-frames for a multi-prompt video",
    )
    g.add_argument(
        "--prompt-frames",
        type=int,
        nargs="+",
        default=None,
        help="pixel frame where each --prompt starts (first must be 0), e.g. --prompt-frames 0 81 161",
    )
    g.add_argument(
        "--prompt-transition",
        type=float,
        default=0.0,
        help="latent frames over which neighbouring prompts' conditioning is blended",
    )
    g.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    g.add_argument("--image", default=None, help="conditioning image path (image-to-video models, e.g. SVD)")
    g.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="pixel frames to generate (default: the model's native length); must fit the VAE's temporal "
        "stride, e.g. 4k+1 for Wan",
    )
    g.add_argument("--height", type=int, default=None, help="frame height in pixels (default: native)")
    g.add_argument("--width", type=int, default=None, help="frame width in pixels (default: native)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; 1 disables it")
    g.add_argument("--shift", type=float, default=None, help="flow timestep shift (default: the scheduler's)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    g = p.add_argument_group("sampler")
    g.add_argument(
        "--sampler",
        default="full",
        choices=["full", "sliding", "fifo", "df"],
        help="full: the whole clip at once (naive baseline); sliding: overlapping windows of the native "
        "length fused every step; fifo: FIFO-Diffusion queue (diagonal denoising, constant memory); df: "
        "diffusion forcing, chunk after chunk with per-frame noise levels (constant memory with "
        "--overlap-history)",
    )
    g.add_argument("--window", type=int, default=None, help="window in latent frames (default: native length)")
    g.add_argument("--stride", type=int, default=None, help="sliding window stride in latent frames (default: window/2)")
    g.add_argument(
        "--num-partitions",
        type=int,
        default=None,
        help="fifo: latent partitions n; the queue holds n*window frames and sampling takes n*window steps "
        "(default 4)",
    )
    g.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fifo: lookahead denoising (windows at half stride, only the noisier half written back; "
        "twice the model calls; default on, needs an even window)",
    )
    g.add_argument(
        "--base-num-latent-frames",
        type=int,
        default=None,
        help="df: latent frames per chunk (default: native length)",
    )
    g.add_argument(
        "--ar-step",
        type=int,
        default=None,
        help="df: steps block i+1 lags block i (0 = synchronous; SkyReels-V2 asynchronous uses 5)",
    )
    g.add_argument(
        "--causal-block-size",
        type=int,
        default=None,
        help="df: latent frames that share one noise level (SkyReels-V2 uses 5 with ar_step 5)",
    )
    g.add_argument(
        "--overlap-history",
        type=int,
        default=None,
        help="df: latent frames of the previous chunk kept as context for the next (chunked generation "
        "in constant memory); unset = one rolling pyramid",
    )
    g.add_argument(
        "--addnoise-condition",
        type=float,
        default=None,
        help="df: re-noise history frames to this level (0-1000, SkyReels-V2 uses 20) to reduce drift",
    )
    g.add_argument(
        "--noise",
        choices=["gaussian", "freenoise"],
        default="gaussian",
        help="initial noise: i.i.d. gaussian, or FreeNoise rescheduling (frames past the first window are "
        "shuffled copies of earlier windows' noise)",
    )
    g.add_argument("--noise-window", type=int, default=None, help="freenoise window in latent frames (default: native)")
    g.add_argument("--noise-stride", type=int, default=None, help="freenoise stride in latent frames (default: window/4)")
    g.add_argument(
        "--weighting",
        choices=["pyramid", "uniform"],
        default=None,
        help="how overlapping windows are blended (sliding sampler; default pyramid)",
    )
    g = p.add_argument_group("extension")
    g.add_argument(
        "--extension",
        default="none",
        choices=["none", "pi", "ntk", "yarn", "riflex", "fusion", "spectral", "exvideo"],
        help="pi / ntk / yarn / riflex: temporal RoPE extension so 3D-RoPE DiTs (Wan, SkyReels-V2, "
        "HunyuanVideo, CogVideoX; LTX: pi) see --target-frames per window (RIFLEx: ~2x length training-free); "
        "fusion: FreeNoise window fusion of temporal attention; spectral: FreeLong SpectralBlend of global "
        "and local temporal attention (fusion, spectral: AnimateDiff, SVD, Wan, SkyReels-V2, LTX-Video, "
        "CogVideoX, HunyuanVideo; windows of the native length); exvideo: ExVideo positional extension to "
        "--target-frames (AnimateDiff, SVD)",
    )
    g.add_argument(
        "--target-frames",
        type=int,
        default=None,
        help="pixel frames the extended model sees at once (default: --num-frames); windowed samplers "
        "default to windows of this length",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default="outputs/longgen.mp4", help="output mp4 path")
    g.add_argument("--fps", type=float, default=16.0, help="frames per second of the mp4")
    g.add_argument(
        "--decode-chunk",
        type=int,
        default=4,
        help="latent frames decoded at a time; peak decode memory depends on this, not on clip length",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def apply_generate_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``generate`` arguments with a ``--config`` YAML's values as defaults (unknown keys rejected)."""
    import yaml

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    args = parser.parse_args(argv)
    if args.config:
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: a generate config is a mapping of option: value")
        dests = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
        defaults = {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in dests:
                raise ValueError(
                    f"{args.config}: unknown option {key!r}; valid options: {', '.join(sorted(dests))}"
                )
            defaults[dest] = value
        sub.set_defaults(**defaults)
        args = parser.parse_args(argv)
    if args.model is None:
        raise ValueError("--model is required (a local diffusers pipeline folder), on the command line or in --config")
    return args


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import DTYPES, LongVideoPipeline

    image = None
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    start = time.perf_counter()
    pipe = LongVideoPipeline.from_pretrained(
        args.model,
        torch_dtype=DTYPES[args.dtype],
        device=args.device,
        offload=args.offload,
        attention_backend=args.attention_backend,
    )
    if args.extension != "none":
        target = args.target_frames or args.num_frames or pipe.adapter.native_video_size[0]
        handle = pipe.apply_extension(args.extension, None if args.extension in ("fusion", "spectral") else target)
        logger.info("extension %s", json.dumps(handle.describe()))
    options = {
        "window": args.window,
        "stride": args.stride,
        "weighting": args.weighting,
        "num_partitions": args.num_partitions,
        "lookahead": args.lookahead,
        "base_num_latent_frames": args.base_num_latent_frames,
        "ar_step": args.ar_step,
        "causal_block_size": args.causal_block_size,
        "overlap_history": args.overlap_history,
        "addnoise_condition": args.addnoise_condition,
    }
    prompts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt or [""])
    if len(prompts) > 1 and args.prompt_frames is None:
        raise ValueError("several --prompt values make a multi-prompt video: also pass --prompt-frames, one each")
    result = pipe.generate(
        prompt=prompts if args.prompt_frames is not None else prompts[0],
        prompt_frames=args.prompt_frames,
        prompt_transition=args.prompt_transition,
        noise=args.noise,
        noise_window=args.noise_window,
        noise_stride=args.noise_stride,
        negative_prompt=args.negative_prompt,
        image=image,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        seed=args.seed,
        sampler=args.sampler,
        sampler_options=options,
        output_path=args.out,
        fps=args.fps,
        decode_chunk_latent_frames=args.decode_chunk,
        show_progress=not args.quiet,
    )
    elapsed = time.perf_counter() - start
    peak = ""
    if torch.cuda.is_available() and str(args.device).startswith("cuda"):
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(f"wrote {result.path}: {result.num_frames} frames in {elapsed:.1f} s{peak}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .backbones import build_tiny

    adapter = build_tiny(args.family, seed=args.seed)
    adapter.save_pretrained(args.out)
    n, h, w = adapter.native_video_size
    print(f"wrote a tiny random {args.family} pipeline to {args.out} (native clip {n} frames at {h}x{w})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .backbones import load_adapter

    adapter = load_adapter(args.model)
    n, h, w = adapter.native_video_size
    info = {
        "family": adapter.family,
        "pipeline": type(adapter.pipe).__name__,
        "model": type(adapter.model).__name__,
        "parameters": sum(p.numel() for p in adapter.model.parameters()),
        "prediction": adapter.prediction,
        "native_per_frame_timesteps": adapter.native_per_frame_timesteps,
        "vae_temporal_compression": adapter.temporal_compression,
        "vae_spatial_compression": adapter.spatial_compression,
        "patch_size": adapter.patch_size,
        "native_clip": {"num_frames": n, "height": h, "width": w, "latent_frames": adapter.num_latent_frames(n)},
        "lora_target_modules": list(adapter.lora_target_modules),
        "temporal_attention_layers": len(adapter.temporal_attention_modules()),
        "context_parallel": adapter.context_parallel_plan() is not None,
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.report import evaluate_videos, headline_table

    report = evaluate_videos(
        args.videos,
        args.out,
        window=args.window,
        stride=args.stride,
        labels=args.labels,
        plots=not args.no_plots,
        show_progress=None,
    )
    print(headline_table(report, _EVAL_HEADLINE))
    print(f"wrote {os.path.join(args.out, 'metrics.json')}" + ("" if args.no_plots else f" and plots in {args.out}/plots"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings.quick(args.out) if args.quick else DemoSettings(out_dir=args.out)
    if args.train_steps is not None:
        settings.train_steps = args.train_steps
    if args.length_factor is not None:
        settings.length_factor = args.length_factor
    if args.samplers:
        settings.samplers = tuple(args.samplers)
    run_demo(settings)
    return 0


_EVAL_HEADLINE = ("temporal_flicker", "ssim_prev", "ssim_first", "color_hist_drift", "warping_error")


def build_parser() -> argparse.ArgumentParser:
    from .backbones import FAMILIES

    parser = argparse.ArgumentParser(
        prog="longgen",
        description="Long videos from short-clip diffusers video models: training-free long samplers, "
        "extensions and fine-tuning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="generate a (long) clip from a local diffusers pipeline folder and write an mp4",
        description="Generate a clip, possibly many times longer than the model's native length, and "
        "stream it to an mp4 (frames are decoded in chunks as they finish).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "make-tiny",
        help="write a tiny randomly initialised pipeline of a family (tests, demos; no downloads)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--family", choices=FAMILIES, default="wan", help="backbone family")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser(
        "demo",
        help="the embedded default: train a tiny model on synthetic long videos, generate long, evaluate",
        description="On a CPU with no downloads: write the synthetic moving-shapes data set, train a tiny model "
        "on short clips of it, generate clips several times longer with the naive baseline and longgen's "
        "long samplers, and evaluate them (metrics over time + ground-truth synthetic scores).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute): little training")
    p.add_argument("--train-steps", type=int, default=None, help="transformer training steps (default 1000; quick 20)")
    p.add_argument("--length-factor", type=int, default=None, help="clip length / native length (default 4)")
    p.add_argument("--samplers", nargs="+", default=None, choices=["full", "sliding", "fifo", "df"],
                   help="samplers to compare (default: all; full is the naive baseline)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "eval",
        help="long-video quality over time (flicker, drift, flow warping error, coherence): metrics.json + plots",
        description="Evaluate one or more videos with metrics that need no downloaded weights, per window over "
        "time, with start-vs-end contrast and drift slope; one line per video in each plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("videos", nargs="+", help="video files (mp4, ...)")
    p.add_argument("--out", default="outputs/eval", help="output folder for metrics.json and plots/")
    p.add_argument("--window", type=int, default=16, help="frames per window of the curves over time")
    p.add_argument("--stride", type=int, default=None, help="window stride in frames (default: window)")
    p.add_argument("--labels", nargs="+", default=None, help="one name per video (default: file names)")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json only")
    p.set_defaults(func=cmd_eval)

    from .data.cache import add_precompute_parser
    from .extend.rope import add_inspect_rope_parser

    add_precompute_parser(sub)
    add_inspect_rope_parser(sub)

    p = sub.add_parser("info", help="print what longgen knows about a model folder (adapter, shapes, layers)")
    p.add_argument("--model", required=True, help="local diffusers pipeline folder")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        if args.command == "generate":
            args = apply_generate_config(parser, argv)
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"longgen {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
