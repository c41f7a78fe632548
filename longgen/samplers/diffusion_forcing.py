"""Diffusion-forcing long generation: per-frame noise levels, causal blocks, chunks with history."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..noise import NoiseSource, gaussian_noise, noise_frames
from ..plans import min_ar_step, plan_windows, pyramid_plan, update_mask
from ..schedules import ddim_step
from .base import Denoiser, FrameConditioning

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

FramesHook = Callable[[int, torch.Tensor], None]
"""``on_frames(start, latents[B, C, n, H, W])``: latent frames ``[start, start + n)`` are final."""


def sample_diffusion_forcing(
    denoise: Denoiser,
    noise: torch.Tensor | NoiseSource,
    sigmas: torch.Tensor,
    *,
    num_latent_frames: int | None = None,
    base_num_latent_frames: int | None = None,
    ar_step: int = 0,
    causal_block_size: int = 1,
    overlap_history: int | None = None,
    addnoise_condition: float = 0.0,
    solver: str | SchedulerMixin = "ddim",
    generator: torch.Generator | None = None,
    conditioning: FrameConditioning | None = None,
    on_frames: FramesHook | None = None,
    callback: Callable[[dict], None] | None = None,
    return_latents: bool = True,
    disable: bool | None = None,
) -> torch.Tensor | None:
    """Implements diffusion-forcing sampling (Chen et al. 2024) as SkyReels-V2 runs it (SkyReels Team 2025).

    Latent frames carry their own noise levels along a :func:`~longgen.plans.pyramid_plan`: blocks of
    ``causal_block_size`` frames, each ``ar_step`` steps behind the one before (``ar_step=0``:
    synchronous). The model sees at most ``base_num_latent_frames`` frames (its native length) at once.
    Clips longer than that are made in one of two ways:

    * ``overlap_history=k`` (SkyReels-V2's long-video mode): chunks of ``base_num_latent_frames`` frames,
      each starting with the last ``k`` clean latent frames of the clip so far as history (kept in
      latent space, as diffusers does; the official code decodes and re-encodes them). With
      ``addnoise_condition=a`` (SkyReels units, 0..1000; 20 is their recommendation) the model sees that
      history re-noised to flow sigma ``a / 1000`` with fresh noise at every iteration,
      ``x (1 - a/1000) + a/1000 * eps``, labelled with that level, while the history itself stays clean.
      Working memory is one chunk, whatever the clip length.
    * ``overlap_history=None``: one pyramid over the whole clip with the model window sliding forward as
      blocks finish (SkyReels-V2's ``valid_interval``); needs ``ar_step >=
      ceil(num_steps / (base_num_latent_frames / causal_block_size))`` so every block being denoised
      fits in the window. Model activations are those of one window; the clip's latents are held.

    ``noise`` is standard-normal ``[B, C, F, H, W]`` (or a :data:`~longgen.noise.NoiseSource` with
    ``num_latent_frames``); frame ``j`` starts at ``sigmas[0] * noise[:, :, j]``. ``sigmas`` is a
    descending ``[S + 1]`` schedule ending at 0. ``solver`` is ``"ddim"`` (:func:`~longgen.schedules.ddim_step`,
    the Euler step of flow models), ``"unipc"`` (diffusers' UniPC multistep solver, the one its SkyReels-V2
    pipeline uses, stepping through these ``sigmas``) or a diffusers multistep scheduler whose ``sigmas`` after
    ``set_timesteps(S)`` equal ``sigmas`` (use :func:`scheduler_sigmas`): every latent frame then gets its
    own deep copy, stepped only when the frame is, exactly as diffusers' SkyReels-V2 pipeline does with
    ``UniPCMultistepScheduler``. ``generator`` draws the history re-noising (the global RNG when None,
    as diffusers uses). Finished frames go to ``on_frames(start, latents)`` as soon as they are final;
    the whole clip ``[B, C, F, H, W]`` is returned unless ``return_latents=False``.

    ``conditioning`` (:class:`~longgen.conditioning.FrameConditioning`): given frames. A fully given prefix
    (whole causal blocks, shorter than the model window in chunked mode) is clean history: its frames sit at
    sigma 0 (``num_ready``) from the first iteration on and are output as given. Every other given frame is
    replaced at its own current level before each model call and its x0 clamped to the given latents, so the
    output equals them where given.

    Differences from diffusers' ``SkyReelsV2DiffusionForcingPipeline``: a history length that is not a
    multiple of ``causal_block_size`` is an error here (diffusers silently drops frames of it and
    regenerates them); a chunk whose length is not a multiple of ``causal_block_size`` ends in a shorter
    block here (diffusers never denoises those trailing frames and returns them as noise).
    """
    sigmas = sigmas.float()
    num_steps = len(sigmas) - 1
    if isinstance(noise, torch.Tensor):
        if noise.ndim != 5:
            raise ValueError(f"noise must be [B, C, F, H, W], got shape {tuple(noise.shape)}")
        if num_latent_frames is None:
            num_latent_frames = noise.shape[2]
        elif num_latent_frames > noise.shape[2]:
            raise ValueError(
                f"num_latent_frames={num_latent_frames} but noise has {noise.shape[2]} frames: "
                "pass noise for every frame or a NoiseSource"
            )
    elif num_latent_frames is None:
        raise ValueError("with a NoiseSource, pass num_latent_frames (the length of the clip to generate)")
    total = num_latent_frames
    base = min(base_num_latent_frames or total, total)
    _check_knobs(total, base, num_steps, ar_step, causal_block_size, overlap_history, addnoise_condition)
    frame_solver = _FrameSolver(solver, sigmas)
    add_sigma = addnoise_condition / 1000.0

    pieces: list[torch.Tensor] = []

    def emit(start: int, latents: torch.Tensor) -> None:
        if on_frames is not None:
            on_frames(start, latents)
        if return_latents:
            pieces.append(latents)
        progress.update(latents.shape[2])

    progress = tqdm(total=total, disable=disable, desc="diffusion forcing (latent frames)", leave=False)
    chunked = overlap_history is not None and total > base
    prefix = _given_history(conditioning, total, base, causal_block_size, chunked)
    history = None
    if prefix:
        first = noise_frames(noise, 0, 1, generator)
        conditioning = conditioning.to(first.device)
        history = conditioning.window(0, prefix).known.expand(first.shape[0], -1, -1, -1, -1).to(first.dtype)
        emit(0, history.clone())
    if not chunked:
        first = noise_frames(noise, 0, total, generator)
        sigmas = sigmas.to(first.device)
        x = first * sigmas[0]
        if history is not None:
            x[:, :, :prefix] = history
        plan = pyramid_plan(total, num_steps, ar_step=ar_step, causal_block_size=causal_block_size, num_ready=prefix)
        windows = plan_windows(plan, num_steps, base)
        _run_plan(
            denoise,
            x,
            plan,
            windows,
            sigmas,
            frame_solver,
            frame_offset=0,
            num_ready=prefix,
            add_sigma=0.0,
            generator=generator,
            emit=emit,
            callback=callback,
            conditioning=conditioning,
        )
    else:
        _run_chunks(denoise, noise, sigmas, frame_solver, total=total, base=base, ar_step=ar_step,
                    causal_block_size=causal_block_size, overlap_history=overlap_history, add_sigma=add_sigma,
                    generator=generator, emit=emit, callback=callback, history=history, conditioning=conditioning)
    progress.close()
    return torch.cat(pieces, dim=2) if return_latents else None


def _given_history(
    conditioning: FrameConditioning | None, total: int, base: int, causal_block_size: int, chunked: bool
) -> int:
    """Leading fully given latent frames used as clean history: whole causal blocks, fewer than the clip (and, in
    chunked mode, than one chunk) so there is something to generate."""
    if conditioning is None:
        return 0
    conditioning.check(total)
    limit = (base if chunked else total) - 1
    prefix = conditioning.given_prefix(limit)
    return prefix // causal_block_size * causal_block_size


def _run_chunks(
    denoise: Denoiser,
    noise: torch.Tensor | NoiseSource,
    sigmas: torch.Tensor,
    frame_solver: _FrameSolver,
    *,
    total: int,
    base: int,
    ar_step: int,
    causal_block_size: int,
    overlap_history: int,
    add_sigma: float,
    generator: torch.Generator | None,
    emit: Callable[[int, torch.Tensor], None],
    callback: Callable[[dict], None] | None,
    history: torch.Tensor | None = None,
    conditioning: FrameConditioning | None = None,
) -> None:
    """SkyReels-V2's long-video mode: chunks of ``base`` frames, each starting with ``overlap_history``
    clean frames of the clip so far (constant memory in the clip length); the first chunk starts with
    ``history`` (given frames, already emitted) when there is one."""
    num_steps = len(sigmas) - 1
    chunk_start = 0
    while True:
        num_ready = 0 if history is None else history.shape[2]
        length = min(base, total - chunk_start)
        new = noise_frames(noise, chunk_start + num_ready, chunk_start + length, generator)
        sigmas = sigmas.to(new.device)
        x = new * sigmas[0]
        if history is not None:
            x = torch.cat([history, x], dim=2)
        plan = pyramid_plan(
            length, num_steps, ar_step=ar_step, causal_block_size=causal_block_size, num_ready=num_ready
        )
        x = _run_plan(
            denoise,
            x,
            plan,
            [(0, length)] * plan.shape[0],
            sigmas,
            frame_solver,
            frame_offset=chunk_start,
            num_ready=num_ready,
            add_sigma=add_sigma,
            generator=generator,
            emit=emit,
            callback=callback,
            conditioning=conditioning,
        )
        if chunk_start + length >= total:
            break
        history = x[:, :, length - overlap_history :]
        chunk_start += length - overlap_history


def scheduler_sigmas(scheduler, num_steps: int) -> torch.Tensor:
    """The ``[S + 1]`` flow sigmas a diffusers scheduler steps through for ``num_steps`` steps.

    Pass them as ``sigmas`` together with ``solver=scheduler`` (the scheduler itself is not changed).
    """
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_steps)
    return torch.as_tensor(probe.sigmas, dtype=torch.float32).clone()


def _unipc_following(sigmas: torch.Tensor):
    """diffusers' ``UniPCMultistepScheduler`` (flow prediction, its default order-2 bh2 solver) stepping
    through exactly ``sigmas`` (the solver of diffusers' SkyReels-V2 diffusion-forcing pipeline)."""
    from diffusers import UniPCMultistepScheduler

    num_steps = len(sigmas) - 1
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000
    )
    scheduler.set_timesteps(num_steps)
    scheduler.sigmas = sigmas.detach().float().cpu().clone()
    scheduler.timesteps = scheduler.sigmas[:-1] * scheduler.config.num_train_timesteps
    return scheduler


def _check_knobs(
    total: int,
    base: int,
    num_steps: int,
    ar_step: int,
    causal_block_size: int,
    overlap_history: int | None,
    addnoise_condition: float,
) -> None:
    if total < 1 or base < 1:
        raise ValueError(f"need at least one latent frame, got num_latent_frames={total}, base={base}")
    if causal_block_size < 1:
        raise ValueError(f"causal_block_size must be >= 1, got {causal_block_size}")
    if ar_step < 0:
        raise ValueError(f"ar_step must be >= 0 (0 = synchronous), got {ar_step}")
    if not 0 <= addnoise_condition < 1000:
        raise ValueError(
            f"addnoise_condition is a SkyReels-V2 timestep in [0, 1000) (20 is typical), got {addnoise_condition}"
        )
    if total <= base:
        return
    if overlap_history is None:
        if base % causal_block_size:
            raise ValueError(
                f"base_num_latent_frames={base} is not a multiple of causal_block_size={causal_block_size}: the "
                f"sliding model window must hold whole blocks; use base_num_latent_frames="
                f"{base // causal_block_size * causal_block_size or causal_block_size}"
            )
        needed = min_ar_step(num_steps, base, causal_block_size)
        if ar_step < needed:
            raise ValueError(
                f"ar_step={ar_step} is too small for {total} latent frames in a window of {base} "
                f"({base // causal_block_size} blocks of {causal_block_size}) with {num_steps} steps: more blocks "
                f"would be denoised at once than fit in the window. Use ar_step >= {needed}, or set "
                "overlap_history to generate in chunks"
            )
        return
    if not 0 < overlap_history < base:
        raise ValueError(
            f"overlap_history={overlap_history} must be in [1, {base - 1}] (less than the chunk of "
            f"base_num_latent_frames={base}) so every chunk adds new frames: use a smaller overlap_history"
        )
    if overlap_history % causal_block_size:
        lower = overlap_history // causal_block_size * causal_block_size
        hint = f"{lower} or {lower + causal_block_size}" if lower else f"{causal_block_size}"
        raise ValueError(
            f"overlap_history={overlap_history} is not a multiple of causal_block_size={causal_block_size}: the "
            f"history must be whole causal blocks; use overlap_history={hint}"
        )


def _run_plan(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: torch.Tensor,
    windows: list[tuple[int, int]],
    sigmas: torch.Tensor,
    frame_solver: _FrameSolver,
    *,
    frame_offset: int,
    num_ready: int,
    add_sigma: float,
    generator: torch.Generator | None,
    emit: Callable[[int, torch.Tensor], None],
    callback: Callable[[dict], None] | None,
    conditioning: FrameConditioning | None = None,
) -> torch.Tensor:
    """Run one plan over ``x`` ``[B, C, F, H, W]`` (frames ``< num_ready`` are clean history).

    Emits frames ``>= num_ready`` (absolute index ``frame_offset + f``) in order as they become clean
    and returns the final ``x``. Given frames (``conditioning``, absolute positions) are replaced at their
    level before every model call and their x0 clamped.
    """
    num_steps = len(sigmas) - 1
    batch = x.shape[0]
    mask = update_mask(plan, num_steps).to(x.device)
    plan = plan.to(x.device)
    done_after = torch.cat([plan[1:], torch.full_like(plan[:1], num_steps)], dim=0) == num_steps  # [I, F]
    next_emit = num_ready
    for i in range(plan.shape[0]):
        start, end = windows[i]
        levels = plan[i, start:end]  # [n]
        sigma = sigmas[levels]  # [n]
        given = conditioning.window(frame_offset + start, frame_offset + end) if conditioning is not None else None
        if given is not None:
            x[:, :, start:end] = given.impose(x[:, :, start:end], sigma, generator)
        x_in = x[:, :, start:end]
        if add_sigma > 0 and start < num_ready:
            # SkyReels-V2 addnoise_condition: the model sees the history slightly noised, the history stays clean
            h = num_ready - start
            eps = (
                gaussian_noise(x_in[:, :, :h].shape, generator, x.device)
                if generator is not None
                else torch.randn_like(x_in[:, :, :h])
            )
            x_in = torch.cat([x_in[:, :, :h] * (1.0 - add_sigma) + eps * add_sigma, x_in[:, :, h:]], dim=2)
            sigma = torch.cat([sigma.new_full((h,), add_sigma), sigma[h:]])
        sigma = sigma.expand(batch, end - start)
        x0 = denoise(x_in, given.levels(sigma) if given is not None else sigma, frame_offset=frame_offset + start)
        if given is not None:
            x0 = given.clamp(x0)
        upd = mask[i, start:end]
        x_win = x[:, :, start:end]
        x[:, :, start:end] = frame_solver.step(x_win, x0, levels, upd, frame_offset + start)
        if callback is not None:
            callback(
                {
                    "i": i,
                    "x": x,
                    "x0": x0,
                    "window": (start, end),
                    "levels": plan[i],
                    "frame_offset": frame_offset,
                }
            )
        finished = int(done_after[i].long().cumprod(0).sum())  # leading clean frames
        if finished > next_emit:
            emit(frame_offset + next_emit, x[:, :, next_emit:finished].clone())
            frame_solver.forget(frame_offset + next_emit, frame_offset + finished)
            next_emit = finished
    return x


class _FrameSolver:
    """Steps a subset of frames one level down the schedule: DDIM, or one diffusers scheduler per frame."""

    def __init__(self, solver: str | SchedulerMixin, sigmas: torch.Tensor):
        self.sigmas = sigmas
        self.num_steps = len(sigmas) - 1
        self.per_frame: dict[int, object] = {}
        if isinstance(solver, str):
            if solver not in ("ddim", "unipc"):
                raise ValueError(
                    f"solver must be 'ddim', 'unipc' or a diffusers scheduler instance, got {solver!r}"
                )
            self.prototype = _unipc_following(sigmas) if solver == "unipc" else None
            self.prediction = "flow_prediction"
            return
        if not hasattr(solver, "step") or not hasattr(solver, "set_timesteps"):
            raise ValueError(
                f"solver must be 'ddim' or a diffusers scheduler instance, got {type(solver).__name__}"
            )
        prediction = getattr(solver.config, "prediction_type", None)
        if prediction not in ("flow_prediction", "sample"):
            raise ValueError(
                f"a per-frame scheduler must predict in flow sigmas ('flow_prediction' or 'sample'), got "
                f"prediction_type={prediction!r}; configure it with use_flow_sigmas=True, "
                "prediction_type='flow_prediction'"
            )
        self.prediction = prediction
        self.prototype = copy.deepcopy(solver)
        self.prototype.set_timesteps(self.num_steps)
        own = torch.as_tensor(self.prototype.sigmas, dtype=torch.float32)
        if own.shape != sigmas.shape or not torch.allclose(own, sigmas.cpu(), atol=1e-6, rtol=0):
            raise ValueError(
                "the scheduler steps through different sigmas than the ones passed: use "
                "sigmas=scheduler_sigmas(scheduler, num_steps)"
            )

    def step(
        self, x: torch.Tensor, x0: torch.Tensor, levels: torch.Tensor, upd: torch.Tensor, frame_offset: int
    ) -> torch.Tensor:
        """New ``x`` ``[B, C, n, H, W]``: frames with ``upd`` stepped from ``sigmas[levels]`` to the next level."""
        sigmas = self.sigmas.to(x.device)
        if self.prototype is None:
            view = (1, 1, -1, 1, 1)
            sigma = sigmas[levels].view(view)
            sigma_next = sigmas[(levels + 1).clamp_max(self.num_steps)].view(view)
            return torch.where(upd.view(view), ddim_step(x, x0, sigma, sigma_next), x)
        out = x.clone()
        for f in torch.nonzero(upd).flatten().tolist():
            key = frame_offset + f
            if key not in self.per_frame:
                sched = copy.deepcopy(self.prototype)  # fresh multistep history for a new frame
                self.per_frame[key] = sched
            sched = self.per_frame[key]
            k = int(levels[f])
            sigma = sigmas[k]
            sample = x[:, :, f].clone()  # the scheduler keeps it (last_sample) while x is updated in place
            model_output = (
                (sample - x0[:, :, f]) / sigma if self.prediction == "flow_prediction" else x0[:, :, f]
            )
            out[:, :, f] = sched.step(model_output, sched.timesteps[k], sample, return_dict=False)[0]
        return out

    def forget(self, start: int, stop: int) -> None:
        """Drop the scheduler state of finished frames (constant memory)."""
        for key in range(start, stop):
            self.per_frame.pop(key, None)
