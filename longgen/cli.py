"""The ``longgen`` command: ``generate``, ``make-tiny``, ``info``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

logger = logging.getLogger("longgen")


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each default shown once: appended only when the help text does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (0 used to mean "the default" silently)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value} (omit the flag for the default)")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` parse as floats and would sample garbage)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _float_type(kind):
    """The argparse type of a config field's type: floats must be finite."""
    return finite_float if kind is float else kind


def check_attention_backend(name: str) -> None:
    """Validate ``--attention-backend`` after parsing (listing diffusers' names needs diffusers)."""
    if name == "native":
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName if "hub" not in b.value]
    if name not in names:
        raise ValueError(f"unknown --attention-backend {name!r}; choose one of: {', '.join(names)}")


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """``--sampler`` and one ``--knob-name`` flag per knob of every registered sampler (the registry's help)."""
    from .samplers import all_knobs, get_sampler

    g = p.add_argument_group("sampler")
    names = sampler_names()
    g.add_argument(
        "--sampler",
        default="full",
        choices=names,
        help="; ".join(f"{n}: {get_sampler(n).description}" for n in names) + " (default: full)",
    )
    for knob in all_knobs():
        flag = "--" + knob.name.replace("_", "-")
        text = f"{knob.help} (samplers: {', '.join(knob.samplers)})"
        if knob.type is bool:
            g.add_argument(flag, dest=knob.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            g.add_argument(flag, dest=knob.name, type=_float_type(knob.type), choices=knob.choices, default=None,
                           help=text)


def sampler_options(args: argparse.Namespace) -> dict:
    """The knobs given on the command line or in ``--config`` (None = not given: the sampler's default)."""
    from .samplers import all_knobs

    return {k.name: getattr(args, k.name) for k in all_knobs() if getattr(args, k.name, None) is not None}


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """Every ``longgen generate`` flag: model, clip, the registry's sampler knobs, noise, extension, output."""
    from .dtypes import DTYPE_NAMES

    g = p.add_argument_group("model")
    g.add_argument(
        "--config",
        default=None,
        help="YAML file of these options (keys as the flags without '--', e.g. sampler: df, ar-step: 5 or "
        "ar_step: 5); flags given on the command line override it",
    )
    g.add_argument("--model", default=None, help="local diffusers pipeline folder (with model_index.json); required")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="weights and compute dtype (bf16 on GPU)")
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
        metavar="NAME",
        help="attention kernel through diffusers' dispatch: native = torch SDPA (default); flash / xformers / "
        "sage need their packages installed; any name of diffusers' AttentionBackendName",
    )
    g.add_argument(
        "--context-parallel",
        choices=("ulysses", "ring", "windows"),
        default=None,
        help="run one clip over the processes of `torchrun --nproc-per-node N -m longgen generate ...` (N >= 2; "
        "without torchrun this is an error): ulysses / ring split every model call's tokens over the N ranks "
        "through diffusers' ContextParallelConfig (families with a context-parallel plan: Wan, LTX-Video; "
        "ulysses needs N to divide the attention heads, both need N to divide each call's tokens, i.e. latent "
        "frames x token rows x columns; ring with the native backend runs longgen's own ring attention, with "
        "flash / _native_cudnn diffusers' ring); windows gives each rank a share of the independent windows "
        "of every step (--sampler sliding or fifo, any family). The clip equals a one-process run; rank 0 "
        "writes the mp4",
    )
    _add_finetune_args(p)
    _add_clip_args(p)
    _add_given_args(p)
    add_sampler_args(p)
    _add_noise_extension_output_args(p)


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tune")
    g.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="a diffusers-format LoRA to apply (train/train.py's final/pytorch_lora_weights.safetensors, its "
        "folder, or any diffusers LoRA for this model), at SCALE (default 1); repeat to combine LoRAs",
    )
    g.add_argument(
        "--transformer",
        default=None,
        metavar="DIR",
        help="a full fine-tune's model folder (or the trainer's final/ folder) replacing the pipeline's "
        "transformer / unet; an ExVideo run's final/ adds its trained weights",
    )
    g.add_argument(
        "--no-auto-extension",
        action="store_true",
        help="do not re-apply the extension recorded next to --lora / --transformer (final/longgen_extension.json: "
        "RIFLEx, ExVideo, ... the model was trained with); an explicit --extension always wins",
    )


def _add_clip_args(p: argparse.ArgumentParser) -> None:
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
        type=finite_float,
        default=0.0,
        help="latent frames over which neighbouring prompts' conditioning is blended",
    )
    g.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    g.add_argument("--image", default=None, help="conditioning image path (image-to-video models, e.g. SVD)")
    g.add_argument(
        "--num-frames",
        type=positive_int,
        default=None,
        help="pixel frames to generate (default: the model's native length); must fit the VAE's temporal "
        "stride, e.g. 4k+1 for Wan",
    )
    g.add_argument("--height", type=positive_int, default=None, help="frame height in pixels (default: native)")
    g.add_argument("--width", type=positive_int, default=None, help="frame width in pixels (default: native)")
    g.add_argument(
        "--steps", type=positive_int, default=None,
        help="denoising steps (default: the model's; the fifo sampler takes num_partitions*window)",
    )
    g.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale; 1 disables it")
    g.add_argument("--shift", type=positive_float, default=None, help="flow timestep shift > 0 (default: the scheduler's)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    g.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="batch: one clip per line (blank lines and lines starting with '#' skipped); a line 'SEED<TAB>PROMPT' "
        "sets its seed, otherwise clip i (0-based) uses --seed + i; clip i is written to --out with _i "
        "before the extension (out_0.mp4, out_1.mp4, ...)",
    )


def _add_given_args(p: argparse.ArgumentParser) -> None:
    """Given frames (longgen.given_io): continue, bridge, keyframes, repaint; every sampler keeps them fixed."""
    g = p.add_argument_group(
        "given frames (continue, bridge, keyframes, repaint)",
        "Frames every sampler keeps fixed while it generates the rest (encoded once with the VAE; a latent frame "
        "is given when any of its pixel frames is, missing ones filled by the nearest given frame).",
    )
    g.add_argument("--video", default=None, metavar="MP4",
                   help="continue this clip: its last --context-frames frames start the output (--num-frames counts "
                   "them); with a mask flag, repaint it instead")
    g.add_argument("--end-video", default=None, metavar="MP4",
                   help="with --video: generate a transition (SEINE) from --video's last frames to this clip's first "
                   "--context-frames frames, which end the output")
    g.add_argument("--context-frames", type=positive_int, default=None, metavar="N",
                   help="pixel frames of --video (and --end-video) given as context (default: a quarter of the "
                   "model's native clip)")
    g.add_argument("--keep-input", action="store_true",
                   help="write the whole input, then the new frames (then the rest of --end-video) as one mp4 at the "
                   "input's fps")
    g.add_argument("--frames-at", nargs="+", default=None, metavar="FRAME:IMAGE",
                   help="keyframes at output pixel frames, e.g. --frames-at 0:first.png 80:last.png (interpolation)")
    g.add_argument("--mask", default=None, metavar="MP4",
                   help="with --video: repaint the white region of this mask video (same size and at least as many "
                   "frames as the video), keeping the rest; the output is as long as the video")
    g.add_argument("--mask-image", default=None, metavar="IMAGE",
                   help="with --video: one mask image (white = repaint, the video's size) for every frame")
    g.add_argument("--mask-box", default=None, metavar="X0,Y0,X1,Y1",
                   help="with --video: repaint this rectangle (output pixels) of every frame")
    g.add_argument("--outpaint", default=None, metavar="N|L,T,R,B",
                   help="with --video: shrink the video into the output with these pixel margins and generate the "
                   "margins (outpainting)")
    g.add_argument("--resample-steps", type=positive_int, default=1, metavar="U",
                   help="RePaint resampling for full/sliding: U model passes per step so the generated region "
                   "agrees with the given one (1 = none; U times the compute)")
    g.add_argument("--given-level", choices=["renoise", "clean"], default="renoise",
                   help="how samplers show fully given frames to the model (besides df/causal's clean history): "
                   "re-noised to the step's level (any model) or clean at sigma 0 (models trained with "
                   "conditioning frames)")


def _add_noise_extension_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("noise")
    g.add_argument(
        "--noise",
        choices=["gaussian", "freenoise"],
        default="gaussian",
        help="initial noise: i.i.d. gaussian, or FreeNoise rescheduling (frames past the first window are "
        "shuffled copies of earlier windows' noise)",
    )
    g.add_argument("--noise-window", type=int, default=None, help="freenoise window in latent frames (default: native)")
    g.add_argument("--noise-stride", type=int, default=None, help="freenoise stride in latent frames (default: window/4)")
    add_extension_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="outputs/longgen.mp4", help="output mp4 path")
    g.add_argument("--fps", type=positive_float, default=None,
                   help="frames per second of the mp4 (default: --video's fps, else 16)")
    g.add_argument(
        "--decode-chunk",
        type=positive_int,
        default=4,
        help="latent frames decoded at a time; peak decode memory depends on this, not on clip length",
    )
    g.add_argument(
        "--save-latents",
        action="store_true",
        help="also write each clip's final latents next to its mp4 (clip.latents.safetensors, key 'latents')",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def load_generate_config(path: str, sub: argparse.ArgumentParser) -> dict:
    """A ``generate`` YAML config (OmegaConf) as ``{dest: value}``, every key and value checked by name.

    Keys are the flags without ``--`` (``ar-step`` or ``ar_step``); an unknown key is an error naming the
    closest valid one; a YAML syntax error names the file and line; values go through the flag's type
    and choices, so ``steps: 0`` is refused like ``--steps 0``.
    """
    import difflib

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .configfile import read_yaml

    try:  # OmegaConf resolves ${...} interpolations between keys, as in training recipes
        values = OmegaConf.to_container(OmegaConf.create(read_yaml(path, what="generate config")), resolve=True)
    except OmegaConfBaseException as err:
        raise ValueError(f"{path}: {err}") from None
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f"did you mean {close[0].replace('_', '-')!r}? " if close else ""
            raise ValueError(
                f"{path}: unknown option {key!r}; {hint}valid options: "
                + ", ".join(sorted(d.replace("_", "-") for d in actions))
            )
        defaults[dest] = _config_value(path, key, actions[dest], value)
    return defaults


def _config_value(path: str, key: str, action: argparse.Action, value):
    """A config value through its flag's type and choices (what argparse does for the command line)."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch (--flag, --flag/--no-flag): YAML 1.2 reads only true/false as booleans
        from .configfile import BOOL_WORDS

        value = BOOL_WORDS.get(value.lower(), value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise ValueError(f"{path}: {key}: a switch takes true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
        value = [value]  # a repeatable flag (--lora, --prompt) given one value in the YAML
    try:
        if action.type is not None and not isinstance(value, bool):
            value = [action.type(str(v)) for v in value] if isinstance(value, list) else action.type(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"{path}: {key}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def apply_generate_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``generate`` arguments with a ``--config`` YAML's values as defaults (unknown keys rejected)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    args = parser.parse_args(argv)
    if args.config:
        given = {dest: getattr(args, dest) for dest in ("lora", "prompt") if getattr(args, dest) is not None}
        sub.set_defaults(**load_generate_config(args.config, sub))
        args = parser.parse_args(argv)
        vars(args).update(given)  # repeatable flags on the command line replace the config's list (not append)
    if args.model is None:
        raise ValueError("--model is required (a local diffusers pipeline folder), on the command line or in --config")
    return args


def check_device(device: str) -> None:
    """A clear error for a device this torch build or machine cannot use (instead of torch's traceback)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device ({err}); use e.g. cpu, cuda, cuda:1") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(
            f"--device {device}: this torch {torch.__version__} {build}; use --device cpu, or install a CUDA "
            "build of torch on a machine with a GPU"
        )
    if kind == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")


def read_image(path: str):
    """The conditioning image as RGB; a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path!r} is not a readable image ({err}); pass a PNG or JPEG file") from None


def read_prompts_file(path: str, seed: int) -> list[tuple[int, str]]:
    """``--prompts-file``: (seed, prompt) per clip. One clip per line; blank lines and ``#`` comments skipped; a
    line ``SEED<TAB>PROMPT`` sets its seed, otherwise clip i (0-based, counting clips) gets ``seed + i``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts-file {path!r} does not exist")
    clips: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            clip_seed = seed + len(clips)
            if "\t" in text:
                head, text = text.split("\t", 1)
                try:
                    clip_seed = int(head)
                except ValueError:
                    raise ValueError(
                        f"{path}:{lineno}: the text before the tab ({head!r}) is not an integer seed; write "
                        "SEED<TAB>PROMPT, or the prompt alone (seed = --seed + clip index)"
                    ) from None
            clips.append((clip_seed, text.strip()))
    if not clips:
        raise ValueError(f"--prompts-file {path!r} holds no prompts (one per line)")
    return clips


def _generate_jobs(args: argparse.Namespace) -> list[tuple[int, Any, str]]:
    """(seed, prompt or prompts, mp4 path) of every clip to generate: one, or one per --prompts-file line."""
    from .pipeline import output_paths

    if args.prompts_file:
        if args.prompt or args.prompt_frames:
            raise ValueError("--prompts-file gives the prompts: drop --prompt / --prompt-frames")
        clips = read_prompts_file(args.prompts_file, args.seed)
        return [(s, p, out) for (s, p), out in zip(clips, output_paths(args.out, len(clips)))]
    prompts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt or [""])
    if len(prompts) > 1 and args.prompt_frames is None:
        raise ValueError("several --prompt values make a multi-prompt video: also pass --prompt-frames, one each")
    return [(args.seed, prompts if args.prompt_frames is not None else prompts[0], args.out)]


def _check_finetune_args(args: argparse.Namespace) -> list[tuple[str, float]]:
    """``--lora`` as (path, scale) pairs and ``--transformer`` checked before the model loads."""
    from .finetune import lora_location, parse_lora_spec

    loras = [parse_lora_spec(text) for text in args.lora or []]
    for path, _ in loras:
        lora_location(path)
    if args.transformer is not None and not os.path.isdir(args.transformer):
        raise FileNotFoundError(
            f"--transformer {args.transformer!r} is not a folder; pass a diffusers model folder (config.json + "
            "*.safetensors) or the trainer's final/ folder"
        )
    return loras


def load_finetuned_pipeline(args: argparse.Namespace, loras: list[tuple[str, float]]):
    """The pipeline with ``--transformer``, ``--extension`` (the user's wins), the extension recorded next to the
    fine-tune (unless ``--no-auto-extension``) and every ``--lora``."""
    from .dtypes import torch_dtype
    from .finetune import find_extension_record
    from .pipeline import LongVideoPipeline

    pipe = LongVideoPipeline.from_pretrained(
        args.model,
        torch_dtype=torch_dtype(args.dtype),
        device=args.device,
        offload=args.offload,
        attention_backend=args.attention_backend,
        transformer=args.transformer,
        auto_extension=False,
    )
    apply_extension_args(pipe, args)
    sources = ([args.transformer] if args.transformer else []) + [path for path, _ in loras]
    for source in sources:
        if not args.no_auto_extension:
            pipe.reapply_recorded_extension(source)
        elif (found := find_extension_record(source)) is not None:
            logger.warning("--no-auto-extension: not re-applying %s recorded in %s", found[1]["method"], found[0])
    for path, scale in loras:
        pipe.load_lora(path, scale=scale, auto_extension=False)
    return pipe


def cmd_generate(args: argparse.Namespace) -> int:
    """``longgen generate``; with ``--context-parallel`` this process first joins torchrun's process group."""
    parallel = None
    if args.context_parallel:  # each rank on its own device (cuda -> cuda:LOCAL_RANK)
        from .parallel import GenerationParallel

        parallel, args.device = GenerationParallel.from_environment(args.context_parallel, args.device)
    try:
        return _generate(args, parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _generate(args: argparse.Namespace, parallel) -> int:
    """The clips of ``longgen generate``; under ``--context-parallel`` every rank samples, rank 0 writes."""
    import torch

    from .given_io import plan_given_frames
    from .io import check_video_path
    from .memory import bound_heap_retention

    bound_heap_retention()  # freed activations and frames go back to the OS: memory flat in the clip length
    check_attention_backend(args.attention_backend)
    check_video_path(args.out)  # before the model loads: a bad --out fails at once
    check_device(args.device)
    loras = _check_finetune_args(args)
    jobs = _generate_jobs(args)
    image = read_image(args.image) if args.image else None
    given_inputs = _given_inputs(args)
    _check_given_files(given_inputs)
    start = time.perf_counter()
    pipe = load_finetuned_pipeline(args, loras)
    if parallel is not None:
        parallel.apply(pipe, args.sampler)
    writes = parallel is None or parallel.is_writer  # every rank samples the same clip; only rank 0 writes it
    plan = plan_given_frames(given_inputs, pipe.adapter, args.num_frames, args.height, args.width)
    fps = args.fps or plan.fps or 16.0
    for seed, prompt, out in jobs:
        result = pipe.generate(
            prompt=prompt,
            prompt_frames=args.prompt_frames,
            prompt_transition=args.prompt_transition,
            noise=args.noise,
            noise_window=args.noise_window,
            noise_stride=args.noise_stride,
            negative_prompt=args.negative_prompt,
            image=image,
            num_frames=plan.num_frames,
            height=plan.height if plan.given is not None else args.height,
            width=plan.width if plan.given is not None else args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            shift=args.shift,
            seed=seed,
            sampler=args.sampler,
            sampler_options=sampler_options(args),
            output_path=out if writes else None,
            fps=fps,
            decode_chunk_latent_frames=args.decode_chunk,
            show_progress=not args.quiet and writes,
            save_latents=args.save_latents and writes,
            conditioning=plan.given,
            framing=plan.framing,
        )
        if not writes:
            continue
        elapsed = time.perf_counter() - start
        peak = ""
        if torch.cuda.is_available() and str(args.device).startswith("cuda"):
            peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        saved = f" (latents: {result.latents_paths[0]})" if result.latents_paths else ""
        ranks = f" over {parallel.world_size} processes ({parallel.mode})" if parallel is not None else ""
        kept = ""
        if plan.framing is not None:
            kept = f" ({plan.framing.total(result.num_frames)} with the input kept)"
        print(f"wrote {result.path}: {result.num_frames} frames{kept} in {elapsed:.1f} s{ranks}{peak}{saved}")
    return 0


def _given_inputs(args: argparse.Namespace):
    from .given_io import GivenInputs

    return GivenInputs(
        video=args.video, end_video=args.end_video, frames_at=args.frames_at or (), mask=args.mask,
        mask_image=args.mask_image, mask_box=args.mask_box, outpaint=args.outpaint, context_frames=args.context_frames,
        keep_input=args.keep_input, resample=args.resample_steps, given_level=args.given_level,
    )


def _check_given_files(inputs) -> None:
    """Missing given-frame files fail before the model loads."""
    for flag, path in (("--video", inputs.video), ("--end-video", inputs.end_video), ("--mask", inputs.mask),
                       ("--mask-image", inputs.mask_image)):
        if path is not None and not os.path.isfile(path):
            from .given_io import missing_file

            raise missing_file(flag, path)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .backbones import FAMILIES, build_tiny

    if args.family not in FAMILIES:
        raise ValueError(f"unknown --family {args.family!r}; choose one of: {', '.join(FAMILIES)}")
    if args.i2v:
        import inspect

        from .backbones import get_adapter_class

        cls = get_adapter_class(args.family)
        if "image_to_video" not in inspect.signature(cls.tiny_pipeline).parameters:
            have = [f for f in FAMILIES if "image_to_video" in inspect.signature(
                get_adapter_class(f).tiny_pipeline).parameters]
            raise ValueError(f"--i2v: no tiny image-to-video {args.family} pipeline; families with one: {', '.join(have)}")
        adapter = cls(cls.tiny_pipeline(seed=args.seed, image_to_video=True), native_video_size=cls.tiny_video_size)
    else:
        adapter = build_tiny(args.family, seed=args.seed)
    from .files import atomic_dir, make_output_dir

    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already holds files: pass --overwrite to replace them, or another folder")
    make_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    if os.path.isfile(args.out):
        make_output_dir(args.out, "--out")  # the message for an existing file
    with atomic_dir(args.out, overwrite=True) as tmp:  # a failed save leaves no half-written model folder
        adapter.save_pretrained(tmp)
    n, h, w = adapter.native_video_size
    kind = f"{type(adapter.pipe).__name__} ({args.family})"
    print(f"wrote a tiny random {kind} pipeline to {args.out} (native clip {n} frames at {h}x{w})")
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
    from .eval.report import drift_lines, evaluate_videos, headline_table

    report = evaluate_videos(
        args.videos,
        args.out,
        window=args.window,
        stride=args.stride,
        labels=args.labels,
        plots=not args.no_plots,
        show_progress=None,
        seams=args.seams,
        chunk_frames=args.chunk_frames,
        input_frames=args.input_frames,
        vde_chunks=args.vde_chunks,
        stream_embedder=args.stream_embedder,
        stream_window=args.stream_window,
    )
    print(headline_table(report, _EVAL_HEADLINE))
    print(drift_lines(report))
    print(f"wrote {os.path.join(args.out, 'metrics.json')}" + ("" if args.no_plots else f" and plots in {args.out}/plots"))
    return 0


def sampler_names() -> tuple[str, ...]:
    from .samplers import sampler_names as names

    return names()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings.quick(args.out) if args.quick else DemoSettings(out_dir=args.out)
    if args.train_steps is not None:
        settings.train_steps = args.train_steps
    if args.length_factor is not None:
        settings.length_factor = args.length_factor
    if args.samplers:
        settings.samplers = tuple(args.samplers)
    if args.vae_dir:
        settings = dataclasses.replace(settings, vae_dir=args.vae_dir)  # checked again
    if args.eval_worlds is not None:
        settings = dataclasses.replace(settings, eval_worlds=args.eval_worlds)
    if args.eval_seeds:
        settings = dataclasses.replace(settings, eval_seeds=tuple(args.eval_seeds))
    run_demo(settings)
    return 0


_EVAL_HEADLINE = ("temporal_flicker", "ssim_prev", "ssim_first", "color_hist_drift", "warping_error")


_TORCH_COMMANDS = {
    # command -> (module, parser adder, one-line help): their modules import torch, so the parser only
    # imports them when that command runs; `longgen --help` shows the help line alone.
    "precompute": (
        "longgen.data.cache", "add_precompute_parser",
        "encode a video data set into a latent + text-embedding cache (safetensors shards) for training",
    ),
    "inspect-rope": (
        "longgen.cli", "add_inspect_rope_parser",
        "print each RoPE axis's frequencies and periods of a model folder (and RIFLEx's k)",
    ),
}


def _command_of(argv: list[str] | None) -> str | None:
    """The subcommand in ``argv`` (top-level options take no values), or None when argv is None."""
    return None if argv is None else next((a for a in argv if not a.startswith("-")), "")


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """``longgen generate``: every flag from :func:`add_generate_args`."""
    p = sub.add_parser(
        "generate",
        help="generate a (long) clip from a local diffusers pipeline folder and write an mp4",
        description="Generate a clip, possibly many times longer than the model's native length, and "
        "stream it to an mp4 (frames are decoded in chunks as they finish).",
        formatter_class=HelpFormatter,
    )
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)


def _add_make_tiny_parser(sub: argparse._SubParsersAction, load_choices: bool) -> None:
    """``longgen make-tiny``."""
    p = sub.add_parser(
        "make-tiny",
        help="write a tiny randomly initialised pipeline of a family (tests, demos; no downloads)",
        formatter_class=HelpFormatter,
    )
    families = None
    if load_choices:  # the family names import the backbones (torch): only when make-tiny runs
        from .backbones import FAMILIES as families
    p.add_argument("--family", choices=families, default="wan", help="backbone family")
    p.add_argument("--out", required=True, help="output folder (refused if it holds files, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--i2v", action="store_true",
                   help="the family's image-to-video pipeline (wan, skyreels_v2, ltx, cogvideox; svd is one "
                   "already); generate from it with --image")
    p.set_defaults(func=cmd_make_tiny)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """``longgen demo``."""
    p = sub.add_parser(
        "demo",
        help="the embedded default: train a tiny model on synthetic long videos, generate long, evaluate",
        description="On a CPU with no downloads: write the synthetic moving-shapes data set, train a tiny model "
        "on short clips of it, generate clips several times longer with the naive baseline and longgen's "
        "long samplers, and evaluate them (metrics over time + ground-truth synthetic scores).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute): little training")
    p.add_argument("--train-steps", type=positive_int, default=None, help="transformer training steps (default 3000; quick 20)")
    p.add_argument("--length-factor", type=positive_int, default=None, help="clip length / native length (default 4)")
    p.add_argument("--samplers", nargs="+", default=None, choices=sampler_names(),
                   help="samplers to compare (default: all; full is the naive baseline)")
    p.add_argument("--vae-dir", default=None,
                   help="reuse the trained VAE of an earlier run (<its --out>/train/base_model/vae) instead of "
                   "training one (the VAE stage is deterministic and the slowest; the transformer is still trained)")
    p.add_argument("--eval-worlds", type=int, default=None,
                   help="prompts of the mean-over-clips table: the captions of training worlds 0..N-1 (default 4; "
                   "quick 1); the grid and the first tables show world 0, the demo's prompt")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=None,
                   help="sampling seeds per prompt of the mean-over-clips table (default 0 1; quick 0); one world "
                   "and one seed skip the table")
    p.set_defaults(func=cmd_demo)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """``longgen eval``."""
    p = sub.add_parser(
        "eval",
        help="long-video quality over time (flicker, drift, flow warping error, coherence): metrics.json + plots",
        description="Evaluate one or more videos with metrics that need no downloaded weights, per window over "
        "time, with start-vs-end contrast and drift slope; one line per video in each plot.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("videos", nargs="+", help="video files (mp4, ...)")
    p.add_argument("--out", default="outputs/eval", help="output folder for metrics.json and plots/")
    p.add_argument("--window", type=int, default=16, help="frames per window of the curves over time")
    p.add_argument("--stride", type=int, default=None, help="window stride in frames (default: window)")
    p.add_argument("--labels", nargs="+", default=None, help="one name per video (default: file names)")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json only")
    g = p.add_argument_group("seams and drift (longgen.eval.seams)")
    g.add_argument(
        "--seams", type=_frame_list, default=None, metavar="B,B,...",
        help="pixel frames where generated chunks meet (the first frame of each new chunk): seam ratios there",
    )
    g.add_argument(
        "--chunk-frames", type=int, default=None, metavar="N",
        help="regular chunks of N frames (after --input-frames): a seam every N frames",
    )
    g.add_argument(
        "--input-frames", type=int, default=None, metavar="M",
        help="the clip starts with M input frames: the input/continuation boundary at frame M is a seam too",
    )
    g.add_argument(
        "--vde-chunks", type=int, default=None, metavar="N",
        help="chunks of LV-Bench's video drift error (default 10; clips under 20 frames then get no VDE)",
    )
    g.add_argument(
        "--stream-embedder", default=None, metavar="PATH",
        help="local TorchScript per-frame embedder for STREAM-T (float [B,3,H,W] in [0,1] -> [B,D]); default: "
        "16x16 grey pixels, a rough weight-free proxy. Never downloads.",
    )
    g.add_argument("--stream-window", type=int, default=16, help="frames per STREAM-T window")
    p.set_defaults(func=cmd_eval)


def _frame_list(text: str) -> list[int]:
    """``21,42`` -> [21, 42] for ``--seams``."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected frame numbers separated by commas (e.g. 21,42), got {text!r}"
        ) from None


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    """``longgen convert`` (flags from :mod:`longgen.convert`, torch-free until it runs)."""
    from .convert import add_convert_arguments, run_convert  # torch-free until it runs

    p = sub.add_parser(
        "convert",
        help="convert a causal Wan checkpoint in the original layout (Self-Forcing, CausVid, LongLive) to diffusers",
        description="Map an original-layout Wan state dict (.pt read tensors-only, or .safetensors; entries "
        "generator / generator_ema / critic) to a diffusers WanTransformer3DModel folder plus longgen_causal.json "
        "with the causal settings of its preset; optionally a LoRA (converted or merged).",
        formatter_class=HelpFormatter,
    )
    add_convert_arguments(p)
    p.set_defaults(func=run_convert)


def _add_ode_pairs_parser(sub: argparse._SubParsersAction) -> None:
    """``longgen ode-pairs --config RECIPE [key=value ...]`` (torch-free until it runs)."""
    p = sub.add_parser(
        "ode-pairs",
        help="sample a bidirectional teacher's ODE trajectories into a cache for causal ODE regression (CausVid)",
        description="Run the teacher (ode.teacher_path, else model.*) for ode.num_steps Euler steps per prompt and "
        "keep the states at ode.keep_steps plus the clean end, as safetensors shards in data.cache_dir; then train "
        "the causal student with objective.method=ode_regression on the same recipe. Resumable: rerun the same "
        "command after an interruption and it continues from the finished shards.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", required=True, help="training recipe YAML (its ode, model and data sections)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. ode.num_samples=64")
    p.add_argument("--max-shards", type=positive_int, default=None,
                   help="stop after writing this many new shards (time-sliced jobs; rerun to continue)")
    p.add_argument("--worker", type=_worker, default=None, metavar="K/N",
                   help="this process builds every N-th shard from K (N processes share the folder; default: "
                   "RANK/WORLD_SIZE under torchrun or accelerate launch, else 0/1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ode_pairs)


def _worker(text: str) -> tuple[int, int]:
    """``--worker 1/4`` -> (1, 4)."""
    try:
        rank, world = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/4, got {text!r}") from None
    if not 0 <= rank < world:
        raise argparse.ArgumentTypeError(f"need 0 <= K < N, got {text!r}")
    return rank, world


def cmd_ode_pairs(args: argparse.Namespace) -> int:
    from .training.config import load_config
    from .training.ode_pairs import build_ode_pairs

    config = load_config(args.config, args.overrides)
    worker = args.worker or (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    build = build_ode_pairs(config, max_shards=args.max_shards, worker=worker,
                            show_progress=False if args.no_progress else None)  # fmt: skip
    if build.index is None:
        print(f"ode-pairs: worker {worker[0]}/{worker[1]} wrote {len(build.written)} shards "
              f"({len(build.skipped)} were there) of {build.num_shards} in {build.out_dir}; the index is written once "
              "every shard is there: rerun the same command (and any other workers) to continue")
        return 0
    with open(build.index) as fh:
        ode = json.load(fh)["ode"]
    steps = ",".join(f"{t:g}" for t in ode["timesteps"])
    print(f"ode-pairs: {ode['num_samples']} trajectories in {build.num_shards} shards at {build.out_dir} "
          f"({len(build.written)} written now, {len(build.skipped)} already there); student levels: timesteps "
          f"{steps} (longgen generate --sampler causal --denoising-steps {steps})")
    return 0


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    """``longgen info``."""
    p = sub.add_parser("info", help="print what longgen knows about a model folder (adapter, shapes, layers)")
    p.add_argument("--model", required=True, help="local diffusers pipeline folder")
    p.set_defaults(func=cmd_info)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``longgen`` parser. With ``argv`` only the command it names imports torch-dependent modules
    (``longgen --help`` and ``longgen generate --help`` import no torch); without, every command is built."""
    import importlib

    command = _command_of(argv)
    parser = argparse.ArgumentParser(
        prog="longgen",
        description="Long videos from short-clip diffusers video models: training-free long samplers, "
        "extensions and fine-tuning.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate_parser(sub)
    _add_make_tiny_parser(sub, load_choices=command in (None, "make-tiny"))
    _add_demo_parser(sub)
    _add_eval_parser(sub)
    for name, (module, adder, text) in _TORCH_COMMANDS.items():
        if command in (None, name):
            getattr(importlib.import_module(module), adder)(sub)
        else:
            sub.add_parser(name, help=text)
    _add_convert_parser(sub)
    _add_ode_pairs_parser(sub)
    _add_info_parser(sub)
    return parser


# --- extensions: flags from the registry --------------------------------------------------------
def _extension_flag(name: str, field_name: str) -> tuple[str, str]:
    """(``--riflex-k``, ``riflex_k``): the flag and dest (also the ``--config`` YAML key) of one config field."""
    return f"--{name}-{field_name.replace('_', '-')}", f"{name.replace('-', '_')}_{field_name}"


def _option_type(annotation: str):
    kind = str(annotation)
    return bool if "bool" in kind else int if "int" in kind else float if "float" in kind else str


def add_extension_args(p: argparse.ArgumentParser) -> None:
    """The ``extension`` group of ``longgen generate``: ``--extension`` and ``--target-frames``, plus one flag per
    option of every registered extension (``--<name>-<field>``, help from the config field's metadata)."""
    from .extend.registry import extension_names, extension_option_fields, get_extension

    names = extension_names()
    g = p.add_argument_group("extension")
    g.add_argument(
        "--extension",
        default="none",
        choices=["none", *names],
        help="; ".join(f"{n}: {get_extension(n).description}" for n in names),
    )
    g.add_argument(
        "--target-frames",
        type=int,
        default=None,
        help="pixel frames the extended model sees at once (default: --num-frames); windowed samplers "
        "default to windows of this length (extensions that extend positions: "
        + ", ".join(n for n in names if get_extension(n).needs_target_frames)
        + ")",
    )
    for name in names:
        for f in extension_option_fields(name):
            if not f.metadata.get("cli", True):
                continue
            flag, dest = _extension_flag(name, f.name)
            kind = _option_type(f.type)
            extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": _float_type(kind)}
            text = f"{name}: {f.metadata.get('help', f.name)}"
            if f.default is not None and f.default is not dataclasses.MISSING and "default" not in text:
                text += f" (default: {f.default})"
            # SUPPRESS: an unset flag leaves the config's default (shown in the help text instead)
            g.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=text, **extra)


def extension_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``--extension`` given by its flags; a flag of another extension is a ValueError."""
    from .extend.registry import extension_names, extension_option_fields

    options = {}
    for name in extension_names():
        for f in extension_option_fields(name):
            flag, dest = _extension_flag(name, f.name)
            value = getattr(args, dest, None)
            if value is None:
                continue
            if name != args.extension:
                raise ValueError(f"{flag} is an option of --extension {name}, not of --extension {args.extension}")
            options[f.name] = value
    return options


def apply_extension_args(pipe, args: argparse.Namespace):
    """Apply ``--extension`` with its flags to a pipeline (None for ``none``); logs the handle's description."""
    options = extension_options_from_args(args)
    if args.extension == "none":
        return None
    if args.target_frames:
        try:
            pipe.adapter.num_latent_frames(args.target_frames)
        except ValueError as err:  # the adapter's message says num_frames; the flag here is --target-frames
            raise ValueError(f"--target-frames {args.target_frames}: {err}") from None
    target = args.target_frames or args.num_frames or pipe.adapter.native_video_size[0]
    handle = pipe.apply_extension(args.extension, target, **options)
    logger.info("extension %s", json.dumps(handle.describe()))
    return handle


# --- inspect-rope --------------------------------------------------------------------------------
def cmd_inspect_rope(args: argparse.Namespace) -> int:
    from .backbones import load_adapter
    from .extend.rope import print_rope_info, temporal_rope_info

    info = temporal_rope_info(load_adapter(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_rope_info(info)
    return 0


def add_inspect_rope_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``longgen inspect-rope --model PATH [--json]``."""
    p = sub.add_parser(
        "inspect-rope",
        help="print each RoPE axis's frequencies and periods of a model folder (and RIFLEx's k)",
        description="Print the rotary position embedding of a 3D-RoPE video DiT: per axis (t, h, w) the "
        "channels, base, frequencies and periods 2*pi/theta_j, and RIFLEx's intrinsic temporal component.",
    )
    p.add_argument("--model", required=True, help="local diffusers pipeline folder")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.set_defaults(func=cmd_inspect_rope)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        if args.command == "generate":
            args = apply_generate_config(parser, argv)
        return args.func(args)
    except KeyboardInterrupt as err:
        # GenerationInterrupted says how far it got and where the partial clip is; no traceback
        text = str(err) or "interrupted"
        print(f"longgen {args.command}: {text}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as err:
        print(f"longgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .io import VideoWriteError

        if not isinstance(err, VideoWriteError):
            raise
        print(f"longgen {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
