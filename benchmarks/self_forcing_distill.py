"""Embedded proof of Self-Forcing: the demo's tiny bidirectional model distilled into a 4-step causal streamer.

Loads what ``longgen demo --out DEMO`` trained (``DEMO/train/base_model``: the trained VAE and the text encoder;
``DEMO/train/final/transformer``: the trained bidirectional transformer, the **teacher**), and runs the project's trainer with
``objective.method=dmd`` (Self-Forcing DMD): the student starts from the teacher's weights with block-causal
attention over chunks of ``--chunk`` latent frames, rolls out with its KV cache, and is pulled towards the
teacher's distribution by a critic. No ODE initialisation here (the student starts from the teacher directly),
prompts are the demo's synthetic captions, no CFG (the demo's teacher is run without guidance).

Then every method generates from the demo's prompt (the first synthetic world) at 1x (the native length, the
reference row), 4x and 16x: the **student** with the causal sampler (its 4 steps, one chunk at a time; a rolling
window of the native length with a sink of one chunk once the clip outgrows the native length), the teacher with
``sliding`` and ``df`` at the demo's step budget, and the naive baseline ``full`` (the teacher on the whole clip).
Each clip is scored by the synthetic scorer against the prompted world (1 = perfect): the mean over windows and
the end-minus-start change (drift). Speed: frames per second of generation (wall and process CPU time) and the
student's ratio to the teacher's ``sliding``, medians of ``--repeats`` runs on this machine.

    python -m benchmarks.self_forcing_distill --demo outputs/demo --out outputs/bench_self_forcing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

FACTORS = (1, 4, 16)
TEACHER_SAMPLERS = ("sliding", "df", "full")


def build_teacher(demo_dir: str, out_dir: str) -> str:
    """The demo's trained pipeline as one folder (base_model with the trained transformer); returns its path."""
    from diffusers import WanTransformer3DModel

    from longgen.backbones import load_adapter

    base = os.path.join(demo_dir, "train", "base_model")
    final = os.path.join(demo_dir, "train", "final", "transformer")
    if not (os.path.isdir(base) and os.path.isfile(os.path.join(final, "config.json"))):
        raise FileNotFoundError(
            f"{demo_dir} has no trained demo model (train/base_model and train/final/transformer): run "
            f"`longgen demo --out {demo_dir}` first"
        )
    adapter = load_adapter(base)
    adapter.pipe.transformer = WanTransformer3DModel.from_pretrained(final)
    folder = os.path.join(out_dir, "teacher")
    adapter.save_pretrained(folder)
    return folder


def train_demo_teacher(args) -> dict:
    """``longgen.demo.train_tiny_model`` into ``args.demo`` at a reduced budget (VAE batch 32, 12 videos)."""
    from longgen.demo import DemoSettings, train_tiny_model

    settings = DemoSettings(out_dir=args.demo, train_steps=args.teacher_train_steps, vae_steps=args.teacher_vae_steps,
                            vae_batch_size=32, num_videos=12)
    start, cpu = time.perf_counter(), time.process_time()
    _, result, _, vae = train_tiny_model(settings)
    info = {"vae_psnr": vae.get("psnr"), "steps": result.step, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(time.process_time() - cpu, 1)}
    print(f"teacher: {info}", flush=True)
    return info


def distill(teacher: str, data_dir: str, out_dir: str, args, student: str | None = None, name: str = "student",
            extra: tuple[str, ...] = (), steps: int | None = None) -> tuple[str, dict]:
    """Run the trainer's DMD method (from ``student``'s pipeline folder, default the teacher); returns (student
    final/ folder, {steps, seconds, critic loss first/last})."""
    from longgen.training.config import load_config
    from longgen.training.loop import Trainer

    overrides = [
        f"model.path={student or teacher}", f"dmd.teacher={teacher}",
        f"data.source={os.path.join(data_dir, 'manifest.jsonl')}",
        "data.num_frames=9", "data.height=32", "data.width=32",
        "lora.enabled=false", "objective.method=dmd",
        "extension.method=block-causal", f"extension.options={{chunk_size: {args.chunk}}}",
        f"dmd.generator_every={args.generator_every}", "dmd.guidance_scale=1.0",
        f"dmd.warp_denoising_step={str(args.warp).lower()}",
        f"optim.lr={args.lr}", f"dmd.critic_lr={args.critic_lr}", "optim.warmup_steps=0", "optim.schedule=constant",
        "optim.betas=[0.0, 0.999]", "optim.weight_decay=0.01", "optim.grad_clip=10.0",
        f"train.steps={steps or args.train_steps}", f"train.batch_size={args.batch_size}", "train.checkpoint_every=0",
        f"train.output_dir={os.path.join(out_dir, name)}", "validation.every=0", "ema.enabled=false", *extra,
    ]  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    trainer = Trainer(load_config(None, overrides))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    info = {"steps": result.step, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
            "critic_loss_first_last": [result.losses[min(result.losses)], result.losses[max(result.losses)]]}
    return result.final_dir, info


def long_tune(teacher_dir: str, student_dir: str, data_dir: str, args) -> tuple[str, dict]:
    """Streaming long tuning (LongLive-style) of the DMD student: rollouts ``--long-factor`` x the native length
    through a rolling window of the native length with a one-chunk sink, DMD on the last native window."""
    folder = os.path.join(args.out, "student_pipeline")
    student_adapter(teacher_dir, student_dir).save_pretrained(folder)
    native = 9  # the demo's native clip: 9 frames = 9 latent frames (no temporal compression)
    extra = (f"extension.options={{chunk_size: {args.chunk}, local_attn_size: {native}, sink_size: {args.chunk}, "
             "rope_positions: window}", f"dmd.rollout_latent_frames={native * args.long_factor}",
             f"dmd.window_latent_frames={native}", f"dmd.grad_latent_frames={native}")
    return distill(teacher_dir, data_dir, args.out, args, student=folder, name="long_tuned", extra=extra,
                   steps=args.long_tuning_steps)


def student_adapter(teacher: str, student_dir: str):
    from diffusers import WanTransformer3DModel

    from longgen.backbones import load_adapter

    adapter = load_adapter(teacher)
    adapter.pipe.transformer = WanTransformer3DModel.from_pretrained(os.path.join(student_dir, "transformer"))
    return adapter


def _generate(adapter, caption, path, num_frames, sampler, options, steps, repeats) -> dict:
    """Generate ``repeats`` times (the same seed); the clip of the last run stays at ``path``."""
    from longgen.pipeline import LongVideoPipeline

    pipe = LongVideoPipeline(adapter)
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        pipe.generate(caption, negative_prompt=None, num_frames=num_frames, guidance_scale=1.0, sampler=sampler,
                      num_inference_steps=steps, sampler_options=options, seed=0, output_path=path,
                      show_progress=False)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return {"path": path, "fps_wall": num_frames / statistics.median(walls),
            "fps_cpu": num_frames / statistics.median(cpus)}


def run_factor(teacher, student, data_dir, out_dir, factor, args) -> dict:
    """Every method at ``factor`` x the native length, scored against the prompted world."""
    from longgen.demo import _prompted_world, write_reference_clips
    from longgen.eval.report import evaluate_videos
    from longgen.samplers import options_for_steps

    caption, world = _prompted_world(data_dir)
    native = teacher.num_latent_frames(teacher.native_video_size[0])
    latent = native * factor
    num_frames = teacher.num_pixel_frames(latent)
    folder = os.path.join(out_dir, f"{factor}x")
    os.makedirs(folder, exist_ok=True)
    runs = {}
    window = {} if factor == 1 else {"local_attn_size": native, "sink_size": args.chunk}
    options = {"chunk_size": args.chunk, "denoising_steps": "1000,750,500,250", "causal_rope": "window",
               "warp_denoising_step": args.warp, **window}
    runs["student (causal, 4 steps)"] = _generate(student, caption, os.path.join(folder, "student.mp4"), num_frames,
                                                  "causal", options, 4, args.repeats)
    if getattr(args, "long_student", None) is not None:
        runs["student + long tuning"] = _generate(args.long_student, caption, os.path.join(folder, "long.mp4"),
                                                  num_frames, "causal", options, 4, args.repeats)
    # the student before DMD: the teacher's weights run the same causal 4-step streaming
    runs["teacher causal 4 steps (student init)"] = _generate(
        teacher, caption, os.path.join(folder, "teacher_causal.mp4"), num_frames, "causal", options, 4, args.repeats)
    ctx = LongVideoPipelineContext(teacher, latent)
    for sampler in TEACHER_SAMPLERS:
        opts, steps = options_for_steps(sampler, args.teacher_steps, ctx)
        runs[f"teacher {sampler}"] = _generate(teacher, caption, os.path.join(folder, f"{sampler}.mp4"), num_frames,
                                               sampler, opts, steps, args.repeats)
    refs = write_reference_clips(teacher, world, num_frames, folder)
    labels = [*runs, *refs]
    paths = [r["path"] for r in runs.values()] + list(refs.values())
    report = evaluate_videos(paths, os.path.join(folder, "eval"), window=8, labels=labels,
                             worlds=[world] * len(paths), plots=False)
    for label in labels:
        summary = report["videos"][label].get("synthetic", {}).get("scores", {}).get("overall", {}).get("summary", {})
        runs.setdefault(label, {}).update(overall=summary.get("mean"), drift=summary.get("end_minus_start"))
    return {"num_frames": num_frames, "runs": runs}


def LongVideoPipelineContext(adapter, latent_frames: int):  # noqa: N802  (a factory of the pipeline's context)
    from longgen.pipeline import LongVideoPipeline

    return LongVideoPipeline(adapter).sampler_context(latent_frames)


def table(results: dict) -> str:
    """Markdown: per length and method, synthetic overall (mean, end - start) and speed vs teacher sliding."""
    lines = ["| length | method | overall (1 best) | end - start | frames/s (wall) | frames/s (CPU) | "
             "speed vs teacher sliding (CPU) |", "|---|---|---|---|---|---|---|"]
    for factor, res in results.items():
        base = res["runs"]["teacher sliding"]["fps_cpu"]
        for label, run in res["runs"].items():
            fmt = (lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}")  # noqa: E731
            speed = f"{run['fps_cpu'] / base:.2f}x" if "fps_cpu" in run else ""
            lines.append(f"| {factor} ({res['num_frames']} f) | {label} | {fmt(run.get('overall'))} | "
                         f"{fmt(run.get('drift'))} | {fmt(run.get('fps_wall'), 1)} | {fmt(run.get('fps_cpu'), 1)} | "
                         f"{speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="outputs/demo", help="folder `longgen demo --out` wrote (the teacher)")
    p.add_argument("--out", default="outputs/bench_self_forcing", help="output folder")
    p.add_argument("--train-steps", type=int, default=200, help="DMD iterations (critic steps)")
    p.add_argument("--generator-every", type=int, default=2, help="student update every N critic steps")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per DMD iteration")
    p.add_argument("--lr", type=float, default=1e-4, help="student learning rate")
    p.add_argument("--critic-lr", type=float, default=1e-4, help="critic learning rate")
    p.add_argument("--warp", action=argparse.BooleanOptionalAction, default=True,
                   help="warp the student's 4 steps 1000/750/500/250 through the shift-5 table (Self-Forcing; sigmas "
                        "1/.94/.83/.63) or use t/1000 (CausVid; sigmas 1/.75/.5/.25)")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per causal chunk")
    p.add_argument("--teacher-steps", type=int, default=16, help="denoising steps of the teacher's samplers")
    p.add_argument("--factors", type=int, nargs="+", default=list(FACTORS), help="clip length / native length")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per method (median)")
    p.add_argument("--long-tuning-steps", type=int, default=0,
                   help="then streaming long tuning of the student for this many DMD steps (0: none)")
    p.add_argument("--long-factor", type=int, default=3, help="long tuning rollout / native length")
    p.add_argument("--student", default=None,
                   help="a trained student's final/ folder (an earlier run's <out>/student/final): skip distillation")
    p.add_argument("--train-teacher", action="store_true",
                   help="first train the demo's model into --demo with the demo's own code, at the reduced budget "
                        "below (when `longgen demo` at its defaults does not fit the machine)")
    p.add_argument("--teacher-train-steps", type=int, default=300, help="with --train-teacher: transformer steps")
    p.add_argument("--teacher-vae-steps", type=int, default=200, help="with --train-teacher: VAE steps")
    args = p.parse_args(argv)

    from longgen.backbones import load_adapter
    from longgen.files import write_json_atomic, write_text_atomic

    os.makedirs(args.out, exist_ok=True)
    if args.train_teacher:
        train_demo_teacher(args)
    teacher_dir = build_teacher(args.demo, args.out)
    data_dir = os.path.join(args.demo, "train", "synthetic_data")
    if args.student:
        student_dir, train_info = args.student, {"student": args.student, "note": "trained in an earlier run"}
    else:
        student_dir, train_info = distill(teacher_dir, data_dir, args.out, args)
    print(f"DMD: {train_info}", flush=True)
    long_dir = None
    if args.long_tuning_steps:
        long_dir, train_info["long_tuning"] = long_tune(teacher_dir, student_dir, data_dir, args)
        print(f"long tuning: {train_info['long_tuning']}", flush=True)
    teacher, student = load_adapter(teacher_dir), student_adapter(teacher_dir, student_dir)
    args.long_student = None if long_dir is None else student_adapter(teacher_dir, long_dir)
    results = {}
    for factor in args.factors:
        results[factor] = run_factor(teacher, student, data_dir, args.out, factor, args)
        print(f"{factor}x done", flush=True)
    text = table(results)
    print(text)
    args.long_student = None
    write_json_atomic(os.path.join(args.out, "results.json"), {"train": train_info, "args": vars(args),
                                                              "results": results})
    write_text_atomic(os.path.join(args.out, "table.md"), text + "\n")
    print(json.dumps(train_info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
