"""Wan2.1-1.3B architecture on a CUDA GPU: training s/step, tokens/s, MFU and peak memory; denoiser speed.

Random weights (no download), bf16, 480x832, 81 and 161 pixel frames (21 and 41 latent frames: 32,760
and 63,960 tokens):

* training step, LoRA (bf16 base, fp32 LoRA weights, rank ``--lora-rank`` on the adapter's targets) and
  full fine-tune (fp32 master weights), both under bf16 autocast, AdamW, gradient checkpointing on,
  diffusion-forcing per-frame noise levels (per-token timesteps, as longgen's trainer feeds Wan), random
  512-token text embeddings;
* inference: one denoiser forward (bf16 weights, no grad) per clip length, as pixel frames per second of
  one denoising step.

MFU = model FLOPs per step (``longgen.flops.wan_transformer_flops``: matmuls only, training = 3x forward,
gradient-checkpointing recomputation not counted) / step time / the GPU's dense bf16 peak. LoRA steps are
counted with the same 3x convention, although a LoRA backward skips the frozen weights' gradients
(about a third of the matmul work), so its MFU understates the hardware's utilisation.

    python -m benchmarks.gpu_wan                      # on a CUDA machine; prints a markdown table
    python -m benchmarks.gpu_wan --tiny --device cpu  # exercises every code path on a tiny config
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from longgen.files import write_json_atomic

WAN21_1_3B: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
"""``WanTransformer3DModel`` arguments of Wan2.1-T2V-1.3B (its ``transformer/config.json``)."""

TINY: dict[str, Any] = {
    **WAN21_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 48,
    "num_layers": 2,
}

VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # Wan VAE: 4x in time (causal: 1 + 4k frames), 8x in space


@dataclass
class Case:
    """One measured setting."""

    mode: str  # "lora", "full" or "inference"
    num_frames: int  # pixel frames
    height: int
    width: int

    @property
    def latent_size(self) -> tuple[int, int, int]:
        return (
            1 + (self.num_frames - 1) // VAE_TEMPORAL,
            self.height // VAE_SPATIAL,
            self.width // VAE_SPATIAL,
        )


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _to_bf16(model) -> None:
    """Cast to bf16 as ``from_pretrained(torch_dtype=torch.bfloat16)`` does: the model's
    ``_keep_in_fp32_modules`` (RoPE, time embedder, modulation tables, norms) stay in fp32."""
    import torch

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            fp32 = any(part in keep for part in name.split("."))
            tensor.data = tensor.data.to(torch.float32 if fp32 else torch.bfloat16)


def _build_model(config: dict[str, Any], device: str, mode: str, lora_rank: int, seed: int = 0):
    """Random-weight transformer on ``device``: bf16 for inference and LoRA bases, fp32 for a full fine-tune."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise the weights on the GPU directly
        model = WanTransformer3DModel(**config)
    if mode == "full":
        model.float().requires_grad_(True)
    else:
        _to_bf16(model)
        model.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig

        from longgen.backbones.wan import WanAdapter

        model.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                target_modules=list(WanAdapter.lora_target_modules),
                init_lora_weights=True,
            )
        )
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # LoRA weights train in fp32 on the bf16 base
    if mode != "inference":
        model.enable_gradient_checkpointing()
        model.train()
    else:
        model.eval()
    return model


def _inputs(config: dict[str, Any], case: Case, device: str, text_len: int, per_frame: bool, generator):
    """Random latents, noise, per-frame flow sigmas, per-token (or per-sample) timesteps and text states."""
    import torch

    frames, h, w = case.latent_size
    x0 = torch.randn(1, config["in_channels"], frames, h, w, generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    if per_frame:
        sigma = torch.rand(1, frames, generator=generator).clamp(1e-3, 1 - 1e-4).to(device)  # (B, F)
        tokens_per_frame = (h // config["patch_size"][1]) * (w // config["patch_size"][2])
        timestep = (sigma * 1000).repeat_interleave(tokens_per_frame, dim=1)  # (B, F * h * w), frame-major
    else:
        sigma = torch.rand(1, 1, generator=generator).clamp(1e-3, 1 - 1e-4).expand(1, frames).to(device)
        timestep = sigma[:, 0] * 1000  # (B,)
    text = torch.randn(1, text_len, config["text_dim"], generator=generator).to(device)
    return x0, noise, sigma, timestep, text


def _timed(fn, device: str, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def measure(
    config: dict[str, Any],
    case: Case,
    device: str,
    *,
    lora_rank: int,
    text_len: int,
    per_frame: bool,
    warmup: int,
    repeats: int,
    peak_flops: float | None,
) -> dict[str, Any]:
    """Time one case; returns a row of the table (``error`` set instead when it runs out of memory)."""
    import torch

    from longgen.flops import mfu, wan_num_tokens, wan_transformer_flops

    frames, h, w = case.latent_size
    tokens = wan_num_tokens(config, frames, h, w)
    row: dict[str, Any] = {
        "mode": case.mode,
        "num_frames": case.num_frames,
        "size": f"{case.height}x{case.width}",
        "latent_frames": frames,
        "tokens": tokens,
    }
    training = case.mode != "inference"
    row["model_flops"] = wan_transformer_flops(
        config,
        frames,
        h,
        w,
        text_len=text_len,
        training=training,
        per_token_timesteps=per_frame and training,
    )
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row.update(_run_case(config, case, device, lora_rank, text_len, per_frame, warmup, repeats))
        step_s = row["step_s"]
        row.update(
            tokens_per_s=tokens / step_s,
            frames_per_s=case.num_frames / step_s,
            mfu=mfu(row["model_flops"], step_s, peak_flops) if peak_flops else None,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        )
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory ({str(err).splitlines()[0][:80]})"
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _run_case(
    config: dict[str, Any],
    case: Case,
    device: str,
    lora_rank: int,
    text_len: int,
    per_frame: bool,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Build the model (and optimizer), time ``repeats`` steps after ``warmup``; everything is freed on return."""
    import torch

    training = case.mode != "inference"
    generator = torch.Generator().manual_seed(0)
    model = _build_model(config, device, case.mode, lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    x0, noise, sigma, timestep, text = _inputs(
        config, case, device, text_len, per_frame and training, generator
    )
    s5 = sigma[:, None, :, None, None]  # (B, 1, F, 1, 1)
    if training:
        optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
        dtype = torch.float32 if case.mode == "full" else torch.bfloat16
        x = ((1 - s5) * x0 + s5 * noise).to(dtype)
        text = text.to(dtype)
        target = noise - x0

        def fn() -> None:
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                velocity = model(x, timestep, text, return_dict=False)[0]
            loss = (velocity.float() - target).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        x = ((1 - s5) * x0 + s5 * noise).bfloat16()
        text = text.bfloat16()

        @torch.inference_mode()
        def fn() -> None:
            model(x, timestep, text, return_dict=False)

    seconds = _timed(fn, device, warmup, repeats)
    if training and any(p not in optimizer.state for p in params):
        raise RuntimeError(
            f"{case.mode}: some trainable parameters got no gradient (checkpointing/LoRA wiring)"
        )
    return {
        "step_s": statistics.median(seconds),
        "step_s_all": seconds,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
    }


def markdown(rows: list[dict[str, Any]], device_name: str, peak_flops: float | None) -> str:
    peak = f"{peak_flops / 1e12:.0f} TFLOP/s bf16 dense" if peak_flops else "unknown peak (MFU n/a)"
    lines = [
        f"Wan2.1-1.3B architecture, random weights, bf16 on {device_name} ({peak}).",
        "",
        "| mode | pixel frames | size | tokens | s/step | tokens/s | pixel frames/s | model TFLOP/step | MFU | "
        "peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"lora": "train LoRA", "full": "train full", "inference": "denoiser forward"}
    for r in rows:
        head = f"| {names[r['mode']]} | {r['num_frames']} | {r['size']} | {r['tokens']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | {r['model_flops'] / 1e12:.3g} | | |")
            continue
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak_text = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        lines.append(
            f"{head} {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['frames_per_s']:.2f} | "
            f"{r['model_flops'] / 1e12:.3g} | {mfu_text} | {peak_text} |"
        )
    lines += [
        "",
        "Training: AdamW, gradient checkpointing, bf16 autocast (LoRA: bf16 base + fp32 LoRA; full: fp32 master "
        "weights), per-frame noise levels. Model FLOPs = matmuls, training 3x forward, recomputation not counted. "
        "Denoiser forward: one step of the model; a 50-step sampler with CFG takes about 100x as long.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (only with --tiny)")
    p.add_argument(
        "--tiny", action="store_true", help="a tiny config at a small size: a dry run of the code paths"
    )
    p.add_argument("--frames", type=int, nargs="+", default=None, help="pixel frames (default 81 161)")
    p.add_argument("--height", type=int, default=None, help="default 480 (tiny: 32)")
    p.add_argument("--width", type=int, default=None, help="default 832 (tiny: 48)")
    p.add_argument(
        "--modes", nargs="+", default=["lora", "full", "inference"], choices=["lora", "full", "inference"]
    )
    p.add_argument("--lora-rank", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (Wan pads prompts to 512)")
    p.add_argument("--per-sample-timesteps", action="store_true", help="train with one noise level per clip")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table"
    )
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu_wan: --device cuda, but no CUDA GPU is available", file=sys.stderr)
        return 2
    if device != "cuda" and not args.tiny:
        print(
            "benchmarks.gpu_wan: no CUDA GPU here; this benchmark needs one (the 1.3B model at 480x832 is far too "
            "slow on a CPU). Nothing measured. Use --tiny --device cpu for a dry run of the code paths."
        )
        return 0

    config = TINY if args.tiny else WAN21_1_3B
    frames = args.frames or ([9, 17] if args.tiny else [81, 161])
    height = args.height or (32 if args.tiny else 480)
    width = args.width or (48 if args.tiny else 832)
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be >= 1")
    bad = [n for n in frames if n < 1 or (n - 1) % VAE_TEMPORAL]
    if bad:
        p.error(f"--frames {bad}: Wan's causal VAE takes 4k + 1 pixel frames (e.g. 81, 161)")
    multiple = VAE_SPATIAL * config["patch_size"][1]
    if height % multiple or width % multiple:
        p.error(f"--height/--width {height}x{width} must be multiples of {multiple} (VAE 8x, patch 2)")
    if device == "cuda":
        device_name = torch.cuda.get_device_name()
        peak = args.peak_tflops * 1e12 if args.peak_tflops else None
        if peak is None:
            from longgen.flops import peak_bf16_flops

            try:
                peak = peak_bf16_flops(device_name)
            except KeyError as err:
                print(f"benchmarks.gpu_wan: {err.args[0]}; MFU left out", file=sys.stderr)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device_name, peak = "CPU", (args.peak_tflops * 1e12 if args.peak_tflops else None)

    rows = []
    for num_frames in frames:
        for mode in args.modes:
            case = Case(mode, num_frames, height, width)
            row = measure(
                config,
                case,
                device,
                lora_rank=args.lora_rank or (4 if args.tiny else 32),
                text_len=args.text_len,
                per_frame=not args.per_sample_timesteps,
                warmup=args.warmup,
                repeats=args.repeats,
                peak_flops=peak,
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(markdown(rows, device_name, peak))
    if args.json:
        meta = {
            "device": device_name,
            "peak_flops": peak,
            "config": {**config, "patch_size": list(config["patch_size"])},
        }
        write_json_atomic(args.json, {**meta, "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
