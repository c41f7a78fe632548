"""Causal streaming sampler: chunk after chunk against a KV cache (CausVid, Self-Forcing, LongLive, Rolling Forcing).

Needs block-causal attention on the model (:func:`longgen.extend.causal.apply_block_causal`); the handle's
:class:`~longgen.extend.causal.KVCache` is passed to :func:`sample_causal`, which opens a streaming call on it around
every model call (the cache state travels with that object, never inferred from tensor shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..extend.causal import KVCache
from ..noise import NoiseSource, gaussian_noise, noise_frames
from ..schedules import ddim_step, shift_sigma
from .base import Denoiser, FrameConditioning

__all__ = ["SELF_FORCING_TIMESTEPS", "CausalSamplerConfig", "sample_causal", "warped_sigmas"]

FramesHook = Callable[[int, torch.Tensor], None]
"""``on_frames(start, latents[B, C, n, H, W])``: latent frames ``[start, start + n)`` are final."""

SELF_FORCING_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)
"""Self-Forcing's few-step schedule (``denoising_step_list``, before ``warp_denoising_step``)."""


def warped_sigmas(
    timesteps: Sequence[float], shift: float = 5.0, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Few-step distilled schedules (Self-Forcing ``warp_denoising_step``): timesteps ``t`` -> flow sigmas
    ``shift(t / 1000)``, descending, plus the final 0. ``[1000, 750, 500, 250]`` at shift 5 gives sigmas 1, 0.9375,
    0.8333, 0.625 (t = 1000, 937.5, 833.3, 625)."""
    t = torch.tensor([float(s) for s in timesteps], dtype=torch.float64) / num_train_timesteps
    if t.numel() < 1 or bool((t[1:] >= t[:-1]).any()) or bool((t <= 0).any()) or bool((t > 1).any()):
        raise ValueError(
            f"--denoising-steps must be strictly descending timesteps in (0, {num_train_timesteps}], got {list(timesteps)}"
        )
    return torch.cat([shift_sigma(t, shift), torch.zeros(1, dtype=torch.float64)]).float()


@dataclass
class CausalSamplerConfig:
    """Knobs of the causal sampler (CLI flags in the help texts). The chunk size is the extension's
    (:class:`~longgen.extend.causal.BlockCausalConfig`)."""

    context_noise: float = field(
        default=0.0,
        metadata={
            "help": "--context-noise: flow sigma of the clean context pass that fills the KV cache after a chunk "
            "finishes (Self-Forcing/CausVid: 0)"
        },
    )
    rolling_window: int = field(
        default=1,
        metadata={
            "help": "--rolling-window: chunks denoised together at rising noise levels (Rolling Forcing; 1 = one "
            "chunk at a time as Self-Forcing, else the number of steps)"
        },
    )
    step: str = field(
        default="renoise",
        metadata={
            "help": "--causal-step: 'renoise' (x_next = (1-s') x0 + s' * fresh noise; Self-Forcing's few-step "
            "sampler) or 'ddim' (deterministic Euler/DDIM step; full schedules)"
        },
    )
    recache: bool = field(
        default=True,
        metadata={
            "help": "--recache/--no-recache: at a prompt switch, recompute the cached keys/values under the new "
            "prompt (LongLive KV recache)"
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.context_noise) < 1.0:
            raise ValueError(f"--context-noise must be a flow sigma in [0, 1), got {self.context_noise}")
        if int(self.rolling_window) < 1:
            raise ValueError(f"--rolling-window must be >= 1 chunk, got {self.rolling_window}")
        if self.step not in ("renoise", "ddim"):
            raise ValueError(f"--causal-step must be 'renoise' or 'ddim', got {self.step!r}")


@dataclass
class _Run:
    """State of one causal rollout (what the helpers below share)."""

    denoise: Denoiser
    cache: KVCache | None
    config: CausalSamplerConfig
    sigmas: torch.Tensor
    chunk: int
    generator: torch.Generator | None
    context: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> context latent [B, C, 1, H, W]


def _check(noise, sigmas, cache: KVCache | None, chunk: int, config: CausalSamplerConfig, num_latent_frames):
    if isinstance(noise, torch.Tensor):
        if noise.ndim != 5:
            raise ValueError(f"noise must be [B, C, F, H, W], got shape {tuple(noise.shape)}")
        num_latent_frames = noise.shape[2] if num_latent_frames is None else num_latent_frames
    elif num_latent_frames is None:
        raise ValueError("with a NoiseSource, pass num_latent_frames (the length of the clip to generate)")
    if num_latent_frames % chunk:
        raise ValueError(
            f"--chunk-size {chunk} does not divide the clip's {num_latent_frames} latent frames: use a chunk size "
            f"that divides it, or {num_latent_frames // chunk * chunk or chunk} / "
            f"{(num_latent_frames // chunk + 1) * chunk} latent frames"
        )
    num_steps = len(sigmas) - 1
    if num_steps < 1 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must be a descending schedule ending at 0, got {sigmas.tolist()}")
    if config.rolling_window not in (1, num_steps):
        raise ValueError(
            f"--rolling-window {config.rolling_window}: Rolling Forcing holds one chunk per noise level, so the window "
            f"is 1 (no rolling) or the number of steps ({num_steps})"
        )
    if cache is not None and cache.config.chunk_size != chunk:
        raise ValueError(
            f"the KV cache was built for chunks of {cache.config.chunk_size} frames, not {chunk}"
        )
    return num_latent_frames


def _calls(num_chunks: int, num_steps: int, rolling: bool) -> list[list[tuple[int, int]]]:
    """Model calls as lists of (chunk, level), chunks ascending: one chunk through every level (Self-Forcing), or
    a window of one chunk per level, the head at the lowest noise (Rolling Forcing)."""
    if not rolling:
        return [[(j, i)] for j in range(num_chunks) for i in range(num_steps)]
    calls = []
    for t in range(num_chunks + num_steps - 1):
        lo, hi = max(0, t - num_steps + 1), min(t, num_chunks - 1)
        calls.append([(j, t - j) for j in range(lo, hi + 1)])
    return calls


def _denoise(run: _Run, x: torch.Tensor, sigma: torch.Tensor, start: int, prompt_at: int) -> torch.Tensor:
    """One model call on frames ``[start, start + n)``: streamed through the cache, or (no cache) the whole prefix
    re-run with the block-causal mask, the finished frames at their context level (the no-cache reference)."""
    if run.cache is not None:
        with run.cache.stream(start, x.shape[2]):
            return run.denoise(x, sigma, frame_offset=prompt_at)
    if start == 0:
        return run.denoise(x, sigma, frame_offset=0)
    prefix = torch.cat([run.context[f] for f in range(start)], dim=2)
    level = torch.full((x.shape[0], start), run.config.context_noise, device=sigma.device, dtype=sigma.dtype)
    x0 = run.denoise(torch.cat([prefix, x], dim=2), torch.cat([level, sigma], dim=1), frame_offset=0)
    return x0[:, :, start:]


def _finish(run: _Run, start: int, x0: torch.Tensor) -> None:
    """A chunk is final: noise it to the context level and (with a cache) run the clean context pass."""
    sigma_c = run.config.context_noise
    ctx = x0
    if sigma_c > 0:
        ctx = (1.0 - sigma_c) * x0 + sigma_c * gaussian_noise(x0.shape, run.generator, x0.device, x0.dtype)
    for i in range(x0.shape[2]):
        run.context[start + i] = ctx[:, :, i : i + 1]
    if run.cache is None:
        return
    level = torch.full((x0.shape[0], x0.shape[2]), sigma_c, device=x0.device)
    with run.cache.stream(start, x0.shape[2], write=True):
        run.denoise(ctx, level, frame_offset=start)
    kept = set(run.cache.frames)
    for frame in [f for f in run.context if f not in kept]:
        del run.context[frame]  # constant memory: only the frames a recache would need


def _recache(run: _Run, prompt_at: int) -> None:
    """LongLive's KV recache: rebuild the cached frames' keys/values under the prompt of frame ``prompt_at``."""
    frames = run.cache.frames
    run.cache.clear()
    chunk = run.chunk
    groups: list[list[int]] = []
    for f in frames:  # chunk-aligned contiguous runs of the cached frames, in order
        if groups and groups[-1][-1] == f - 1 and f // chunk == groups[-1][0] // chunk:
            groups[-1].append(f)
        else:
            groups.append([f])
    for group in groups:
        ctx = torch.cat([run.context[f] for f in group], dim=2)
        level = torch.full((ctx.shape[0], len(group)), run.config.context_noise, device=ctx.device)
        with run.cache.stream(group[0], len(group), write=True):
            run.denoise(ctx, level, frame_offset=prompt_at)


def _given_chunks(run: _Run, conditioning: FrameConditioning | None, noise, num_latent_frames: int,
                  on_frames: FramesHook | None, pieces: list[torch.Tensor] | None) -> int:
    """Leading fully given chunks as clean history: output and cached as given; returns how many."""
    if conditioning is None:
        return 0
    conditioning.check(num_latent_frames)
    num_given = conditioning.given_prefix(num_latent_frames) // run.chunk
    batch = noise_frames(noise, 0, 1, run.generator).shape[0]
    for j in range(num_given):
        x0 = conditioning.window(j * run.chunk, (j + 1) * run.chunk).known.float()
        x0 = x0.expand(batch, -1, -1, -1, -1).contiguous()
        if on_frames is not None:
            on_frames(j * run.chunk, x0)
        if pieces is not None:
            pieces.append(x0)
        _finish(run, j * run.chunk, x0)
    return num_given


def _impose_given(run: _Run, conditioning: FrameConditioning | None, working: dict, j: int, level: int) -> None:
    """Replace the given region of chunk ``j`` by the given latents at the chunk's current level."""
    given = conditioning.window(j * run.chunk, (j + 1) * run.chunk) if conditioning is not None else None
    if given is not None:
        working[j] = given.impose(working[j], run.sigmas[level], run.generator)


def sample_causal(
    denoise: Denoiser,
    noise: torch.Tensor | NoiseSource,
    sigmas: torch.Tensor,
    *,
    cache: KVCache | None,
    chunk_size: int | None = None,
    config: CausalSamplerConfig | None = None,
    num_latent_frames: int | None = None,
    prompt_switches: Sequence[int] = (),
    generator: torch.Generator | None = None,
    conditioning: FrameConditioning | None = None,
    on_frames: FramesHook | None = None,
    callback: Callable[[dict], None] | None = None,
    return_latents: bool = True,
    disable: bool | None = None,
) -> torch.Tensor | None:
    """Implements causal streaming generation (CausVid / Self-Forcing rollout; LongLive recache; Rolling Forcing).

    The clip is cut into chunks of ``chunk_size`` latent frames (default: the cache's). Each chunk runs the whole
    per-chunk schedule ``sigmas`` (any: few-step distilled, see :func:`warped_sigmas`, or full) attending to the KV
    cache of the chunks before it; when its last step gives x0 the chunk is streamed to ``on_frames(start, x0)``,
    noised to ``config.context_noise`` and run once more with ``write`` so its keys/values enter the cache. With
    ``config.rolling_window == len(sigmas) - 1`` one model call denoises a window of chunks at rising noise levels
    (head lowest; each call moves every chunk one level and the finished head enters the cache: Rolling Forcing).

    ``denoise`` is the sampler-facing denoiser (CFG and multi-prompt bound, e.g. ``GuidedDenoiser``); its
    ``frame_offset`` is each call's first frame, so multi-prompt conditioning picks each chunk's prompt.
    ``prompt_switches``: latent frames where the prompt changes (chunk starts); with ``config.recache`` the cache is
    rebuilt there under the new prompt before that chunk's first step (LongLive).

    ``cache=None`` is the reference without a cache: every call re-runs the whole prefix (finished frames at their
    context level) with the block-causal mask; with a cache the result is the same up to float error, single prompt.
    Memory with a rolling window (``local_attn_size``) is constant in the clip length unless ``return_latents``.
    ``renoise`` steps and ``context_noise > 0`` draw noise from ``generator``.

    ``conditioning`` (:class:`~longgen.conditioning.FrameConditioning`): given frames. Leading fully given chunks
    are clean history: output as given and written to the cache by the context pass, with no denoising steps.
    In later chunks the given region is replaced at the chunk's level before every model call and x0 is clamped
    to the given latents, so the output equals them where given.
    """
    config = config or CausalSamplerConfig()
    chunk = int(chunk_size or (cache.config.chunk_size if cache is not None else 0))
    if chunk < 1:
        raise ValueError("pass chunk_size= (latent frames per chunk) when sampling without a KV cache")
    sigmas = sigmas.float()
    num_latent_frames = _check(noise, sigmas, cache, chunk, config, num_latent_frames)
    if cache is None and len(set(prompt_switches)) > 0:
        raise ValueError(
            "the no-cache reference takes one prompt; pass the KV cache for multi-prompt streaming"
        )
    num_steps = len(sigmas) - 1
    num_chunks = num_latent_frames // chunk
    run = _Run(denoise, cache, config, sigmas, chunk, generator)
    if cache is not None:
        cache.clear()
    switches = {int(p) for p in prompt_switches}
    misplaced = sorted(p for p in switches if p % chunk or not 0 <= p < num_latent_frames)
    if misplaced:
        raise ValueError(
            f"prompt switches at latent frames {misplaced} are not chunk starts inside the clip: with --chunk-size "
            f"{chunk}, put every prompt boundary (--prompt-frames) on a multiple of {chunk} latent frames"
        )
    working: dict[int, torch.Tensor] = {}  # chunk -> current noisy latents
    pieces: list[torch.Tensor] = []
    progress = tqdm(total=num_chunks, disable=disable, desc="causal (chunks)", leave=False)
    first = _given_chunks(run, conditioning, noise, num_latent_frames, on_frames, pieces if return_latents else None)
    progress.update(first)
    for i, call in enumerate(_calls(num_chunks - first, num_steps, config.rolling_window > 1)):
        call = [(j + first, level) for j, level in call]
        for j, level in call:
            if level == 0:  # the chunk enters
                if cache is not None and config.recache and j * chunk in switches and j > 0:
                    _recache(run, j * chunk)
                working[j] = noise_frames(noise, j * chunk, (j + 1) * chunk, generator).float() * sigmas[0]
            _impose_given(run, conditioning, working, j, level)
        x = torch.cat([working[j] for j, _ in call], dim=2)
        device = x.device
        levels = torch.tensor([lv for _, lv in call], device=device).repeat_interleave(chunk)
        sigma = sigmas.to(device)[levels].expand(x.shape[0], -1)
        start = call[0][0] * chunk
        given = conditioning.window(start, start + x.shape[2]) if conditioning is not None else None
        x0 = _denoise(run, x, given.levels(sigma) if given is not None else sigma, start, start).float()
        x0 = given.clamp(x0) if given is not None else x0
        if callback is not None:
            callback({"i": i, "x": x, "x0": x0, "frame_offset": start, "levels": levels})
        for n, (j, level) in enumerate(call):
            x0_j, x_j = x0[:, :, n * chunk : (n + 1) * chunk], working[j]
            if level == num_steps - 1:
                del working[j]
                if on_frames is not None:
                    on_frames(j * chunk, x0_j)
                if return_latents:
                    pieces.append(x0_j)
                _finish(run, j * chunk, x0_j)
                progress.update(1)
                continue
            s, s_next = sigmas[level].to(device), sigmas[level + 1].to(device)
            if config.step == "ddim":
                working[j] = ddim_step(x_j, x0_j, s, s_next)
            else:
                eps = gaussian_noise(x0_j.shape, generator, device, x0_j.dtype)
                working[j] = (1.0 - s_next) * x0_j + s_next * eps
    progress.close()
    return torch.cat(pieces, dim=2) if return_latents else None


@contextmanager
def causal_hooks(adapter, knobs: dict) -> Iterator[dict]:
    """The model hooks the ``causal`` sampler runs under (its spec's ``hooks``): block-causal attention with a
    KV cache from the knobs, removed when sampling ends; yields the ``cache`` argument of the sampler."""
    from ..extend.causal import BlockCausalConfig, applied_block_causal, apply_block_causal

    config = BlockCausalConfig(
        chunk_size=knobs["chunk_size"], local_attn_size=knobs["local_attn_size"], sink_size=knobs["sink_size"],
        rope_positions=knobs["causal_rope"], attention=knobs["causal_attention"],
    )
    existing = applied_block_causal(adapter)
    if existing is not None:  # causal training keeps its mask on: its validation streams through those hooks
        _check_same_causal_layout(existing.config, config)
        try:
            yield {"cache": existing.cache}
        finally:
            existing.cache.clear()
        return
    handle = apply_block_causal(adapter, config)
    try:
        yield {"cache": handle.cache}
    finally:
        handle.remove()


def _check_same_causal_layout(applied, requested) -> None:
    """Sampling through block-causal hooks already on the model needs their chunk, window, sink and positions."""
    keys = ("chunk_size", "local_attn_size", "sink_size", "rope_positions")
    differ = [k for k in keys if getattr(applied, k) != getattr(requested, k)]
    if differ:
        got = ", ".join(f"{k}={getattr(applied, k)!r} (asked {getattr(requested, k)!r})" for k in differ)
        raise ValueError(
            f"the model already runs block-causal attention (causal training) with {got}: sample with the same "
            "settings (validation.sampler_options chunk_size, local_attn_size, sink_size, causal_rope; for longgen "
            "generate, which re-applies the mask recorded in final/longgen_extension.json: --chunk-size, "
            "--local-attn-size, --sink-size, --causal-rope), or pass --no-auto-extension to sample with other ones"
        )


def schedule_sigmas(sigmas: torch.Tensor, denoising_steps: str | None, warp: bool, shift: float) -> torch.Tensor:
    """The per-chunk schedule: ``--denoising-steps`` timesteps (warped through a shift table as Self-Forcing's
    ``warp_denoising_step``, or ``t / 1000`` as CausVid) when given, else the pipeline's sigmas."""
    if not denoising_steps:
        return sigmas
    timesteps = parse_timesteps(denoising_steps)
    if warp:
        return warped_sigmas(timesteps, shift=shift).to(sigmas.device)
    warped_sigmas(timesteps, shift=1.0)  # the same checks
    return torch.tensor([*[t / 1000.0 for t in timesteps], 0.0], device=sigmas.device)


def parse_timesteps(text: str) -> list[float]:
    """``"1000,750,500,250"`` -> [1000.0, 750.0, 500.0, 250.0] (a clear error naming the flag otherwise)."""
    try:
        return [float(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--denoising-steps takes comma-separated timesteps such as 1000,750,500,250; got {text!r}") from None


def sample_causal_streaming(
    denoise: Denoiser,
    noise: torch.Tensor | NoiseSource,
    sigmas: torch.Tensor,
    *,
    cache: KVCache,
    chunk_size: int,
    local_attn_size: int,
    sink_size: int,
    causal_rope: str,
    causal_attention: str,
    context_noise: float,
    rolling_window: int,
    causal_step: str,
    recache: bool,
    denoising_steps: str | None,
    warp_denoising_step: bool,
    timestep_shift: float,
    prompt_switches: Sequence[int] = (),
    generator: torch.Generator | None = None,
    conditioning: FrameConditioning | None = None,
    on_frames: FramesHook | None = None,
    return_latents: bool = True,
    disable: bool | None = None,
) -> torch.Tensor | None:
    """The registered ``causal`` sampler: :func:`sample_causal` with its knobs flat (one per CLI flag).

    ``local_attn_size``, ``sink_size``, ``causal_rope`` and ``causal_attention`` shape the KV cache that
    :func:`causal_hooks` installed (``cache``); the rest configure the rollout. ``causal_step="auto"`` is the
    ``renoise`` step when ``denoising_steps`` names a distilled model's few steps (Self-Forcing's sampler) and
    the deterministic ``ddim`` step on the model's own schedule otherwise (a teacher renoised at every one of
    16 steps loses its trajectory: the demo's teacher, guidance 1, scored 0.00 at 4x with renoise (blank
    frames), 0.22 with ddim)."""
    del local_attn_size, sink_size, causal_rope, causal_attention  # already in cache.config
    if causal_step == "auto":  # a distilled model names its few steps; a full schedule steps deterministically
        causal_step = "renoise" if denoising_steps else "ddim"
    config = CausalSamplerConfig(
        context_noise=context_noise, rolling_window=rolling_window, step=causal_step, recache=recache
    )
    return sample_causal(
        denoise, noise, schedule_sigmas(sigmas, denoising_steps, warp_denoising_step, timestep_shift),
        cache=cache, chunk_size=chunk_size, config=config, prompt_switches=prompt_switches,
        generator=generator, conditioning=conditioning, on_frames=on_frames, return_latents=return_latents,
        disable=disable,
    )
