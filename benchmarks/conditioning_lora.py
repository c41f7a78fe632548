"""Does a LoRA trained with given frames use them? (issue 15, item 3)

Two LoRAs on the same tiny model and latent cache, the same steps and seed: one with ``conditioning.tasks``
(continuation / bridge / backward), one without (plain denoising at one level per clip). Each is evaluated on
fixed cache clips, fixed noise, levels 0.3 / 0.6 / 0.9 and fixed masks (``past`` and ``past_future``): the loss on
the generated frames with the clip's own given frames ("true context") and with another clip's given frames
("wrong context"). A model that uses its given frames has wrong > true; training with given frames should widen
that gap and lower the true-context loss.

    python benchmarks/conditioning_lora.py --model DIR --cache DIR [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

TASKS = "{none: 0.1, past: 0.5, future: 0.1, past_future: 0.3}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def context_losses(trainer, batch) -> dict[str, float]:
    """Mean generated-frame loss with the true and with a shuffled (another clip's) context."""
    from longgen.training.objectives import sample_given_frames, training_loss

    latents, cond = trainer.method.encode(batch, _gen(0))
    b, f = latents.shape[0], latents.shape[2]
    out = {"true": 0.0, "wrong": 0.0}
    count = 0
    for task in ("past", "past_future"):
        given = sample_given_frames(b, f, {task: 1.0}, generator=_gen(7))
        g5 = given[:, None, :, None, None].expand_as(latents)
        wrong = torch.where(g5, latents.roll(1, 0), latents)
        for i, level in enumerate((0.3, 0.6, 0.9)):
            noise = torch.randn(latents.shape, generator=_gen(100 + i))
            sigma = torch.full((b, f), level)
            for name, x in (("true", latents), ("wrong", wrong)):
                loss, _ = training_loss(trainer.adapter, x, cond, sigma, noise, given=given,
                                        denoise=trainer.method.prepared)
                out[name] += float(loss)
            count += 1
    return {k: v / count for k, v in out.items()}


def run(model: str, cache: str, steps: int, tasks: str | None, out_dir: str) -> dict:
    from longgen.training.config import load_config
    from longgen.training.loop import Trainer

    overrides = [
        f"model.path={model}", f"data.cache_dir={cache}", "data.num_frames=9",
        "objective.mode=clip", "lora.rank=8", "lora.alpha=8", "optim.lr=1e-3", "optim.warmup_steps=5",
        f"train.steps={steps}", "train.batch_size=8", "train.checkpoint_every=0", "train.save_final=false",
        f"train.output_dir={out_dir}", "validation.every=0", "ema.enabled=false", "data.shuffle=false",
    ]
    if tasks:
        overrides.append(f"conditioning.tasks={tasks}")
    trainer = Trainer(load_config(None, overrides))
    try:
        batch = next(iter(trainer.loader))
        before = context_losses(trainer, batch)
        trainer.train()
        after = context_losses(trainer, batch)
    finally:
        trainer.close()
    return {"before": before, "after": after}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained tiny model folder (benchmarks/continuation_drift.py)")
    p.add_argument("--cache", required=True, help="its latent cache of 9-frame windows (longgen.demo)")
    p.add_argument("--steps", type=int, default=150, help="LoRA steps of each run")
    p.add_argument("--out", default="outputs/conditioning_lora", help="output folder")
    args = p.parse_args(argv)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    results = {
        "with given frames": run(args.model, args.cache, args.steps, TASKS, f"{args.out}/cond"),
        "without": run(args.model, args.cache, args.steps, None, f"{args.out}/plain"),
    }
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print("| LoRA | true-context loss before -> after | wrong-context loss before -> after | gap after |")
    print("|---|---|---|---|")
    for name, r in results.items():
        b, a = r["before"], r["after"]
        print(f"| {name} | {b['true']:.4f} -> {a['true']:.4f} | {b['wrong']:.4f} -> {a['wrong']:.4f} | "
              f"{a['wrong'] - a['true']:.4f} |")
    print(json.dumps({"steps": args.steps, "wall_s": round(time.perf_counter() - t0, 1),
                      "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1), **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
