"""Ablation of the demo's tiny teacher: what each training change does to its clips at the native length.

Every variant trains the demo's Wan transformer (``longgen.demo.train_tiny_model``) on the latents of one
trained demo VAE (``--vae-dir``, reused so that only the transformer changes; without it each variant trains its
own VAE first, as the variants that change the VAE need), then generates the native
length (1x, 9 frames) with each of ``--samplers`` (default ``full``) from the captions of the first ``--worlds`` training videos
(world 0 is the demo's prompt) at each ``--guidance`` scale, and scores every clip with the synthetic scorer
against its world. The VAE reconstruction of each world's ground truth (``gt_vae``) is the ceiling.
Training cost is the process CPU seconds (user + sys, ``resource.getrusage``) of the latent cache and the
transformer stages, beside their wall seconds (on a shared machine the wall time depends on the load).

    python -m benchmarks.demo_teacher --vae-dir outputs/demo/train/base_model/vae --out outputs/teacher \
        --variants default before css3k --worlds 4 --seeds 0 1 --guidance 1 --samplers full causal
"""

from __future__ import annotations

import argparse
import json
import os

from longgen.demo import DEMO_VAE
from longgen.files import write_json_atomic
from longgen.samplers import sampler_names

PREVIOUS: dict = {"text_length": 512, "train_steps": 1000, "lr": 1e-3, "caption_dropout": 0.0, "clip_share": 0.0,
                  "shift": 1.0, "weighting": "native", "num_videos": 24, "video_frames": 65,
                  "vae_kwargs": {**DEMO_VAE, "z_dim": 16}}
"""The demo's teacher before the third ablation (diffusion forcing only, 512-token prompts, lr 1e-3, 1000 steps,
the flow model's native loss; 24 videos of 65 frames, a VAE with 16 latent channels): the base of the first three
ablations' variants."""
CANDIDATE = {**PREVIOUS, "caption_dropout": 0.1, "guidance_scale": 3.0, "text_length": 64}
"""Caption dropout (trains the empty prompt) + guidance 3 + 64-token prompts: the candidate the first ablation varied."""
CSS = {**PREVIOUS, "text_length": 64, "train_steps": 2000, "lr": 2e-3, "caption_dropout": 0.1, "clip_share": 0.5,
       "shift": 3.0}
"""The second ablation's best reader of its prompt: clip_share 0.5 at the sampling shift 3, 64-token prompts."""
X0W = {**CSS, "train_steps": 3000, "weighting": "none"}
"""The third ablation's winner (x0 loss, 3000 steps; the defaults until the fourth): the base of the fourth ablation."""
W96Z4 = {**X0W, "vae_kwargs": {**DEMO_VAE, "z_dim": 4}, "num_videos": 96, "video_frames": 33}
"""The fourth ablation's winner, today's defaults."""
VARIANTS: dict[str, dict] = {
    "default": {},
    "before": PREVIOUS,
    "text64": {**PREVIOUS, "text_length": 64},
    "clip64": {**PREVIOUS, "text_length": 64, "extra_overrides": ["objective.mode=clip"]},
    "text64_2k": {**PREVIOUS, "text_length": 64, "train_steps": 2000},
    "cfg": {**CANDIDATE, "text_length": 512},
    "cfg_text64": CANDIDATE,
    "ema": {**CANDIDATE, "ema_decay": 0.99},
    "shift3": {**CANDIDATE, "shift": 3.0},
    "stride1": {**CANDIDATE, "cache_stride": 1},
    "lr2e3": {**CANDIDATE, "lr": 2e-3},
    "b16": {**CANDIDATE, "batch_size": 16},
    "wide": {**CANDIDATE, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 384, "num_layers": 4}},
    "deep": {**CANDIDATE, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 24, "ffn_dim": 256, "num_layers": 6}},
    "small": {**CANDIDATE, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 192, "num_layers": 4}},
    "css": CSS,
    "css3k": {**CSS, "train_steps": 3000},
    "css4k": {**CSS, "train_steps": 4000},
    "hs3k": {**CSS, "train_steps": 3000, "caption_dropout": 0.0, "clip_share": 0.7, "shift": 5.0},
    "clip3k": {**CSS, "train_steps": 3000, "clip_share": 0.0, "extra_overrides": ["objective.mode=clip"]},
    "big2k": {**CSS, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512, "num_layers": 6}},
    "w96": {**CSS, "train_steps": 4000, "num_videos": 96, "video_frames": 33},
    "x0w": X0W,
    # fourth ablation (on x0w): the world, the VAE's channels, the captions, more and shorter videos
    "big12": {**X0W, "extra_overrides": ["data.synthetic.size_range=[0.12,0.18]"]},
    "one": {**X0W, "extra_overrides": ["data.synthetic.num_objects=[1,1]"]},
    "z8": {**X0W, "vae_kwargs": {**DEMO_VAE, "z_dim": 8}},
    "z4": {**X0W, "vae_kwargs": {**DEMO_VAE, "z_dim": 4}},
    "short32": {**X0W, "caption_style": "short", "text_length": 32},
    "hsx0": {**X0W, "clip_share": 0.7, "shift": 5.0},
    "z4_short32_hs": {**X0W, "vae_kwargs": {**DEMO_VAE, "z_dim": 4}, "caption_style": "short", "text_length": 32,
                      "clip_share": 0.7, "shift": 5.0},
    "z8_short32_hs": {**X0W, "vae_kwargs": {**DEMO_VAE, "z_dim": 8}, "caption_style": "short", "text_length": 32,
                      "clip_share": 0.7, "shift": 5.0},
    "w96z4": W96Z4,
    "hs_w96z4": {**W96Z4, "clip_share": 0.7, "shift": 5.0},
    "short32_w96z4": {**W96Z4, "caption_style": "short", "text_length": 32},
    # fifth ablation
    "w384": {**W96Z4, "num_videos": 384, "video_frames": 9},
    "pos384": {**W96Z4, "num_videos": 384, "video_frames": 9, "caption_style": "position"},
    "rgbw": {**W96Z4, "extra_overrides": ["data.synthetic.colors=[red,green,blue,white]"]},
    "rgbw_w384": {**W96Z4, "num_videos": 384, "video_frames": 9,
                  "extra_overrides": ["data.synthetic.colors=[red,green,blue,white]"]},
    "rgbw_w768": {**W96Z4, "num_videos": 768, "video_frames": 9,
                  "extra_overrides": ["data.synthetic.colors=[red,green,blue,white]"]},
    "ema_w96z4": {**W96Z4, "ema_decay": 0.999},
    "narrow6k_w96z4": {**W96Z4, "train_steps": 6000, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 160, "num_layers": 4}},
    "narrow5k_w96z4": {**W96Z4, "train_steps": 5000, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 160, "num_layers": 4}},
    "narrower6k_w96z4": {**W96Z4, "train_steps": 6000, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 12, "ffn_dim": 128, "num_layers": 4}},
    "narrow6k_rgbw_w384": {**W96Z4, "train_steps": 6000, "num_videos": 384, "video_frames": 9, "transformer_kwargs": {
        "num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 160, "num_layers": 4},
        "extra_overrides": ["data.synthetic.colors=[red,green,blue,white]"]},
    "hs_rgbw_w384": {**W96Z4, "num_videos": 384, "video_frames": 9, "clip_share": 0.7, "shift": 5.0,
                     "extra_overrides": ["data.synthetic.colors=[red,green,blue,white]"]},
}
"""Named changes to :class:`longgen.demo.DemoSettings`. ``default`` is today's defaults (the fourth ablation's
``w96z4``); every other variant spells out what it trains, so it means the same whatever the defaults are."""


def _score(adapter, data_dir: str, out: str, worlds: int, guidance: float, steps: int,
           seeds: tuple[int, ...] = (0,), samplers: tuple[str, ...] = ("full",)) -> dict:
    """1x clips of worlds 0..worlds-1 (one per sampling seed) with each sampler at one guidance scale: per world and
    seed overall / count and the ceiling; ``demo_*`` is world 0 (the demo's prompt) averaged over the seeds. The
    top-level scores are the first sampler's; ``by_sampler`` holds every sampler's means."""
    from longgen.demo import generate_and_evaluate, synthetic_means

    rows = []
    for w in range(worlds):
        for seed in seeds:
            res = generate_and_evaluate(adapter, data_dir, os.path.join(out, f"g{guidance:g}_w{w}_s{seed}"), 1,
                                        samplers, steps, seed=seed, guidance_scale=guidance, world_index=w)
            videos = res["report"]["videos"]
            rows.append({"world": w, "seed": seed, "gt_vae": synthetic_means(videos["gt_vae"]),
                         **{name: synthetic_means(videos[name]) for name in samplers}})
    demo = [r for r in rows if r["world"] == 0]

    def mean(key: str, score: str, of: list | None = None) -> float:
        of = rows if of is None else of
        return sum(r[key][score] or 0.0 for r in of) / len(of)

    def means(key: str) -> dict:
        return {
            "demo_overall": mean(key, "overall", demo),
            "demo_count": mean(key, "count", demo),
            "demo_ceiling": mean("gt_vae", "overall", demo),
            "mean_overall": mean(key, "overall"),
            "mean_count": mean(key, "count"),
            "mean_ceiling": mean("gt_vae", "overall"),
        }

    return {"worlds": rows, "seeds": list(seeds), **means(samplers[0]),
            "by_sampler": {name: means(name) for name in samplers}}


def prompt_gap(adapter, data_dir: str, num_worlds: int = 8, sigmas=(0.5, 0.9)) -> dict:
    """Does the model read its prompt? The x0 error on the first 9 frames of the first ``num_worlds`` training
    videos, noised at each level (same noise), with their own caption, the next video's caption and the empty
    one: ``gap`` = (other - own) / own per level. A model that ignores the caption's words has gap ~0."""
    import torch

    from longgen.data.synthetic import load_manifest
    from longgen.io import read_video

    records = load_manifest(os.path.join(data_dir, "manifest.jsonl"))[:num_worlds]
    num_frames = adapter.native_video_size[0]
    errors = {s: {"own": 0.0, "other": 0.0, "empty": 0.0} for s in sigmas}
    with torch.no_grad():
        conds = {c: adapter.encode_prompt([c], do_classifier_free_guidance=False)[0]
                 for c in {r["caption"] for r in records} | {""}}
        for i, record in enumerate(records):
            video = torch.from_numpy(read_video(record["video"])).float()[None, :num_frames] / 255.0
            x0 = adapter.encode_video(video)
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
            captions = {"own": record["caption"], "other": records[(i + 1) % len(records)]["caption"], "empty": ""}
            for s in sigmas:
                x, level = (1 - s) * x0 + s * eps, torch.full((1, x0.shape[2]), s)
                for key, caption in captions.items():
                    out = adapter.denoise(x, level, conds[caption])
                    errors[s][key] += float(((out - x0) ** 2).mean()) / len(records)
    return {f"{s:g}": {**e, "gap": (e["other"] - e["own"]) / e["own"]} for s, e in errors.items()}


def run_variant(name: str, changes: dict, args) -> dict:
    """Train one variant on the reused VAE and score it; returns its ``results.json`` entry."""
    from longgen.demo import DemoSettings, train_tiny_model

    changes = {**changes, **({"train_steps": args.train_steps} if args.train_steps else {})}
    out = os.path.join(args.out, name)
    vae_dir = os.path.abspath(args.vae_dir) if args.vae_dir else None
    settings = DemoSettings(out_dir=out, vae_dir=vae_dir, **changes)
    adapter, result, data_dir, report = train_tiny_model(settings)
    losses = list(result.losses.values())
    entry = {
        "changes": changes,
        "steps": result.step,
        "transformer_params": sum(p.numel() for p in adapter.model.parameters()),
        "first_loss": losses[0],
        "last_loss": sum(losses[-50:]) / len(losses[-50:]),
        "wall_seconds": report["stage_seconds"],
        "cpu_seconds": report["stage_cpu_seconds"],
        "guidance": {},
        "prompt_gap": prompt_gap(adapter, data_dir),
    }
    for g in args.guidance:
        if g != 1.0 and not settings.caption_dropout:
            continue
        entry["guidance"][f"{g:g}"] = _score(adapter, data_dir, out, args.worlds, g, args.steps, tuple(args.seeds),
                                            tuple(args.samplers))
    return entry


def score_demo_run(demo_dir: str, args) -> dict:
    """Score a finished ``longgen demo`` run's model (:func:`longgen.demo.load_demo_model`) like a variant:
    the row of the demo as it was trained (its own VAE, tokenizer and transformer)."""
    from longgen.demo import load_demo_model

    adapter, data_dir, summary = load_demo_model(demo_dir)
    guidance = float(summary["train"].get("settings", {}).get("guidance_scale", 1.0))
    return {
        "changes": {"demo run": demo_dir},
        "steps": summary["train"]["steps"],
        "transformer_params": sum(p.numel() for p in adapter.model.parameters()),
        "first_loss": summary["train"]["first_loss"],
        "last_loss": summary["train"]["last_loss"],
        "wall_seconds": summary["stage_seconds"],
        "cpu_seconds": summary.get("stage_cpu_seconds", {}),
        "guidance": {
            f"{guidance:g}": _score(
                adapter, data_dir, os.path.join(args.out, "demo_run"), args.worlds, guidance, args.steps,
                tuple(args.seeds), tuple(args.samplers),
            )
        },
    }


def table(results: dict) -> str:
    """Markdown: per variant and guidance, the demo prompt's overall / count, the mean over worlds, the
    ceiling, and the training cost."""
    lines = [
        "| variant | sampler | guidance | demo overall | demo count | demo / ceiling | worlds overall | worlds count "
        "| worlds / ceiling | prompt gap at 0.9 | final loss | transformer CPU s | wall s |",
        "|" + "---|" * 13,
    ]
    for name, e in results.items():
        cpu = e["cpu_seconds"].get("transformer", 0) + e["cpu_seconds"].get("latent_cache", 0)
        wall = e["wall_seconds"].get("transformer", 0) + e["wall_seconds"].get("latent_cache", 0)
        gap = e.get("prompt_gap", {}).get("0.9", {}).get("gap")
        gap_cell = "-" if gap is None else f"{gap:+.3f}"
        for g, scored in e["guidance"].items():
            for sampler, m in scored.get("by_sampler", {"full": scored}).items():
                lines.append(
                    f"| {name} | {sampler} | {g} | {m['demo_overall']:.3f} | {m['demo_count']:.3f} | "
                    f"{m['demo_overall'] / m['demo_ceiling']:.2f} | {m['mean_overall']:.3f} | {m['mean_count']:.3f} | "
                    f"{m['mean_overall'] / m['mean_ceiling']:.2f} | {gap_cell} | {e['last_loss']:.3f} | {cpu:.0f} | "
                    f"{wall:.0f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae-dir", help="a finished demo's train/base_model/vae, reused by every variant so that only the "
                   "transformer changes; without it each variant trains its own VAE first (~2.5 min; needed by the "
                   "variants that change the VAE: z8, z4, ...)")
    p.add_argument("--out", default="outputs/demo_teacher", help="output folder")
    p.add_argument("--variants", nargs="*", default=["default", "before"], choices=sorted(VARIANTS),
                   help="variants to train (see VARIANTS)")
    p.add_argument("--custom", action="append", default=[], metavar="NAME=JSON",
                   help='a variant of your own: its DemoSettings changes as JSON, e.g. '
                        'fast=\'{"text_length": 64, "lr": 0.002}\' (repeatable)')
    p.add_argument("--train-steps", type=int, default=0, help="transformer steps (0: the demo's)")
    p.add_argument("--worlds", type=int, default=4, help="training worlds whose captions are prompted")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales")
    p.add_argument("--steps", type=int, default=16, help="denoising steps")
    p.add_argument("--samplers", nargs="+", default=["full"], choices=sampler_names(),
                   help="samplers of the 1x clips (e.g. full causal; one table row each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds per world (scores averaged)")
    p.add_argument("--score-demo", default=None, help="also score this finished demo run's model (row 'demo_run')")
    args = p.parse_args(argv)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if args.score_demo:
        results["demo_run"] = score_demo_run(args.score_demo, args)
        write_json_atomic(path, results, indent=2)
        print(table({"demo_run": results["demo_run"]}), flush=True)
    from dataclasses import fields

    from longgen.demo import DemoSettings

    known = {f.name for f in fields(DemoSettings)} - {"out_dir", "vae_dir"}
    custom = {}
    for spec in args.custom:
        name, sep, changes = spec.partition("=")
        try:
            custom[name] = json.loads(changes)
        except json.JSONDecodeError as exc:
            p.error(f"--custom {spec!r}: give NAME=JSON, e.g. fast='{{\"lr\": 0.002}}' ({exc})")
        if not sep or not isinstance(custom[name], dict):
            p.error(f"--custom {spec!r}: give NAME=JSON with a JSON object of DemoSettings fields")
        unknown = sorted(set(custom[name]) - known)
        if unknown:  # refused before any variant trains, not after the others have run
            p.error(f"--custom {name}: unknown DemoSettings fields {unknown}; known: {sorted(known)}")
    chosen = [*((n, VARIANTS[n]) for n in args.variants), *custom.items()]
    if args.vae_dir:  # a variant whose VAE differs from the reused one would be trained on the wrong latents
        from longgen.demo import _reused_vae_kwargs

        if not os.path.isfile(os.path.join(args.vae_dir, "config.json")):
            p.error(f"--vae-dir {args.vae_dir} holds no VAE (config.json): give <demo out>/train/base_model/vae")
        reused = _reused_vae_kwargs(args.vae_dir)
        other = [n for n, changes in chosen
                 if any(changes.get("vae_kwargs", DEMO_VAE).get(k) != v for k, v in reused.items())]
        if other:
            p.error(f"variants {other} use another VAE than --vae-dir's ({reused}): run them without --vae-dir, so "
                    "that each trains its own VAE, or reuse a VAE trained with their vae_kwargs")
    for name, changes in chosen:
        key = name + (f"@{args.train_steps}" if args.train_steps else "")
        results[key] = run_variant(name, changes, args)
        write_json_atomic(path, results, indent=2)
        print(table({key: results[key]}), flush=True)
    print("\n" + table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
