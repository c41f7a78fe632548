"""longgen's diffusion forcing vs diffusers' SkyReelsV2DiffusionForcingPipeline: wall time, same run.

Same tiny random SkyReels-V2 model, same frames, steps, ar_step, causal blocks, overlap history and
per-frame UniPC solver; guidance 1 (one model pass per step for both). Each side runs `--repeats` times
alternately after a warm-up; the medians and their ratio are printed (ratio < 1: longgen is faster).

    python -m benchmarks.df_vs_diffusers --height 64 --width 64 --num-frames 97 --base-frames 33
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=64, help="frame height")
    p.add_argument("--width", type=int, default=64, help="frame width")
    p.add_argument("--num-frames", type=int, default=97, help="pixel frames to generate (4k+1)")
    p.add_argument("--base-frames", type=int, default=33, help="pixel frames per chunk (4k+1)")
    p.add_argument("--overlap-frames", type=int, default=17, help="pixel frames of history (4k+1)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--ar-step", type=int, default=2, help="asynchronous step lag between blocks")
    p.add_argument("--causal-block-size", type=int, default=1, help="latent frames per causal block")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UniPCMultistepScheduler

    from longgen.backbones.skyreels_v2 import SkyReelsV2Adapter
    from longgen.samplers import sample_diffusion_forcing, scheduler_sigmas

    adapter = SkyReelsV2Adapter(SkyReelsV2Adapter.tiny_pipeline(seed=0))
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0, num_train_timesteps=1000
    )
    pipe.scheduler = scheduler
    cond, _ = adapter.encode_prompt(["a red ball"], do_classifier_free_guidance=False)
    to_latent = adapter.num_latent_frames
    kwargs = dict(ar_step=args.ar_step, causal_block_size=args.causal_block_size)

    def run_diffusers():
        pipe(prompt=None, prompt_embeds=cond["encoder_hidden_states"], height=args.height, width=args.width,
             num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="latent", overlap_history=args.overlap_frames,
             base_num_frames=args.base_frames, addnoise_condition=20, **kwargs)

    def run_longgen():
        sigmas = scheduler_sigmas(scheduler, args.steps)
        scheduler.set_timesteps(args.steps)
        adapter.set_causal_block_size(args.causal_block_size)
        adapter.match_scheduler_timesteps(scheduler)
        shape = adapter.latent_shape(args.num_frames, args.height, args.width)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        sample_diffusion_forcing(
            lambda x, s, frame_offset=0: adapter.denoise(x, s, cond), noise, sigmas,
            base_num_latent_frames=to_latent(args.base_frames), overlap_history=to_latent(args.overlap_frames),
            addnoise_condition=20, solver=scheduler, disable=True, **kwargs,
        )
        adapter.timestep_table = None

    with torch.no_grad():
        run_diffusers()
        run_longgen()  # warm-up
        times = {"diffusers": [], "longgen": []}
        for _ in range(args.repeats):
            for name, fn in (("diffusers", run_diffusers), ("longgen", run_longgen)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny SkyReels-V2, {args.num_frames} frames at {args.height}x{args.width}, {args.steps} steps, "
          f"ar_step {args.ar_step}, block {args.causal_block_size}, threads {torch.get_num_threads()}")
    print("| implementation | median s | runs |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {', '.join(f'{t:.2f}' for t in times[k])} |")
    print(f"ratio longgen / diffusers: {med['longgen'] / med['diffusers']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
