"""Per-frame denoising plans as data, and per-frame noise-level samplers for training.

A *plan* is a ``LongTensor [iterations, F]``: ``plan[i, f]`` is the step index ``k`` (``0..S``) into a
descending sigma schedule ``sigmas[S + 1]`` at which latent frame ``f`` is shown to the model in
iteration ``i``. ``k = 0`` is pure noise, ``k = S`` the clean frame. After the last iteration every frame
is at ``S``. A frame is *updated* in iteration ``i`` (stepped from ``sigmas[k]`` to ``sigmas[k + 1]``)
exactly when its index grows in the next row (:func:`update_mask`), so one matrix says both what the
model sees and what the solver changes; ``sigmas[plan]`` is the matching ``[iterations, F]`` matrix of
noise levels. Synchronous, FIFO diagonal and diffusion-forcing pyramid plans all share this form
(compare ``generate_timestep_matrix`` of the SkyReels-V2 diffusion-forcing pipeline, which keeps three
parallel structures instead).

The training samplers at the end return *timesteps*: noise levels where larger means noisier
(``0 .. num_timesteps - 1``), the convention of training code.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "fifo_plan",
    "min_ar_step",
    "plan_sigmas",
    "plan_windows",
    "pyramid_plan",
    "sample_independent_timesteps",
    "sample_nondecreasing_timesteps",
    "synchronous_plan",
    "update_mask",
    "validate_plan",
]


def synchronous_plan(num_latent_frames: int, num_steps: int) -> torch.Tensor:
    """All frames at the same level: ``plan[i, f] = i`` for ``S`` iterations (plain sampling)."""
    _check_positive(num_latent_frames=num_latent_frames, num_steps=num_steps)
    return torch.arange(num_steps).unsqueeze(1).expand(num_steps, num_latent_frames).clone()


def pyramid_plan(
    num_latent_frames: int,
    num_steps: int,
    *,
    ar_step: int = 0,
    causal_block_size: int = 1,
    num_ready: int = 0,
) -> torch.Tensor:
    """The diffusion-forcing pyramid plan of SkyReels-V2 / AR-Diffusion (``ar_step``, causal blocks).

    The first ``num_ready`` frames are clean context (index ``S`` throughout, never updated). The rest
    form blocks of ``causal_block_size`` frames (the last block may be shorter); block ``b`` starts
    ``b * lag`` iterations after block 0, with ``lag = min(ar_step, S)``, and then advances one step per
    iteration:

        plan[i, frame in block b] = clamp(i - b * lag, 0, S),   i = 0 .. (n_blocks - 1) * lag + S - 1

    (a block never waits once the block before it is clean, hence the ``min``).

    This is the matrix of ``generate_timestep_matrix`` in SkyReels-V2 (its ``step_index`` minus one,
    clamped to ``[0, S]``): each block lags the previous one by ``ar_step`` steps, a "denoising wave"
    (AR-Diffusion, Sun et al. 2025; Diffusion Forcing, Chen et al. 2024, ``u = ar_step``). ``ar_step=0``
    is the synchronous plan.
    """
    _check_positive(
        num_latent_frames=num_latent_frames, num_steps=num_steps, causal_block_size=causal_block_size
    )
    if ar_step < 0:
        raise ValueError(f"ar_step must be >= 0 (0 = synchronous), got {ar_step}")
    if not 0 <= num_ready < num_latent_frames:
        raise ValueError(
            f"num_ready={num_ready} clean context frames must leave frames to generate out of "
            f"{num_latent_frames}: use 0 <= num_ready < {num_latent_frames}"
        )
    num_new = num_latent_frames - num_ready
    num_blocks = math.ceil(num_new / causal_block_size)
    block_of_frame = torch.arange(num_new) // causal_block_size  # [F_new]
    lag = min(ar_step, num_steps)
    num_iterations = (num_blocks - 1) * lag + num_steps
    rows = torch.arange(num_iterations).unsqueeze(1)  # [I, 1]
    new = (rows - block_of_frame.unsqueeze(0) * lag).clamp(0, num_steps)  # [I, F_new]
    ready = torch.full((num_iterations, num_ready), num_steps, dtype=torch.long)
    return torch.cat([ready, new], dim=1)


def fifo_plan(num_latent_frames: int, window: int, num_partitions: int) -> torch.Tensor:
    """The diagonal-denoising plan of FIFO-Diffusion (Kim et al. 2024) over the output frames.

    The queue holds ``L = num_partitions * window`` frames, one per step of an ``S = L`` step schedule.
    It starts from a ``window``-frame clip re-noised so that output frame ``j < window`` sits at index
    ``window - 1 - j``; every iteration moves every frame in the queue one step, pops the clean head and
    pushes fresh noise at the tail. Over the output frames this is

        plan[i, j] = clamp(i - j + window - 1, 0, S),   i = 0 .. F + L - window - 1,

    the ``ar_step=1`` pyramid entered at row ``window - 1``. (Queue slots holding warm-up frames that
    come before output frame 0 are not output and not shown here.)
    """
    _check_positive(num_latent_frames=num_latent_frames, window=window, num_partitions=num_partitions)
    if window > num_latent_frames:
        raise ValueError(
            f"FIFO window of {window} latent frames is longer than the clip ({num_latent_frames}): "
            f"use window <= {num_latent_frames} or generate more frames"
        )
    num_steps = window * num_partitions
    num_iterations = num_latent_frames + num_steps - window
    rows = torch.arange(num_iterations).unsqueeze(1)  # [I, 1]
    frames = torch.arange(num_latent_frames).unsqueeze(0)  # [1, F]
    return (rows - frames + window - 1).clamp(0, num_steps)


def update_mask(plan: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``[iterations, F]`` bool: frames stepped from ``sigmas[k]`` to ``sigmas[k + 1]`` in each iteration."""
    final = torch.full_like(plan[:1], num_steps)
    return torch.cat([plan[1:], final], dim=0) > plan


def plan_sigmas(plan: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The ``[iterations, F]`` matrix of flow sigmas a plan shows the model: ``sigmas[plan]``."""
    return sigmas[plan.to(sigmas.device)]


def validate_plan(plan: torch.Tensor, num_steps: int) -> None:
    """Raise ``ValueError`` unless ``plan`` is a well-formed plan for an ``S = num_steps`` schedule.

    Indices lie in ``[0, S]``, never decrease, grow by at most one per iteration, and every frame is
    at ``S`` after the last iteration (its last row is ``S`` or ``S - 1``).
    """
    if plan.ndim != 2 or plan.dtype != torch.long:
        raise ValueError(
            f"a plan is a LongTensor [iterations, frames], got {plan.dtype} of shape {tuple(plan.shape)}"
        )
    if plan.min() < 0 or plan.max() > num_steps:
        raise ValueError(f"plan indices must lie in [0, {num_steps}], got [{plan.min()}, {plan.max()}]")
    full = torch.cat([plan, torch.full_like(plan[:1], num_steps)], dim=0)
    diff = full[1:] - full[:-1]
    if diff.min() < 0 or diff.max() > 1:
        raise ValueError("plan indices must grow by 0 or 1 per iteration and end at num_steps")


def plan_windows(plan: torch.Tensor, num_steps: int, window: int) -> list[tuple[int, int]]:
    """Per iteration, the frames ``[start, start + window)`` the model sees to update a plan's row.

    The window ends just after the newest frame being updated (never before ``window``), so it holds
    every updated frame plus the cleanest frames before them as context — the ``valid_interval`` of
    SkyReels-V2's diffusion forcing. Raises ``ValueError`` when the frames updated in one iteration
    span more than ``window`` frames (for a pyramid plan: ``ar_step`` too small, see
    :func:`min_ar_step`).
    """
    num_latent_frames = plan.shape[1]
    if window > num_latent_frames:
        window = num_latent_frames
    mask = update_mask(plan, num_steps)
    frame_idx = torch.arange(num_latent_frames)
    windows = []
    for i in range(plan.shape[0]):
        active = frame_idx[mask[i]]
        if active.numel() == 0:
            windows.append((num_latent_frames - window, num_latent_frames))
            continue
        end = max(int(active[-1]) + 1, window)
        if int(active[0]) < end - window:
            raise ValueError(
                f"iteration {i} updates frames {int(active[0])}..{int(active[-1])}, more than the model window of "
                f"{window} latent frames: advance fewer frames at once (for a pyramid plan raise ar_step)"
            )
        windows.append((end - window, end))
    return windows


def min_ar_step(num_steps: int, window: int, causal_block_size: int = 1) -> int:
    """Smallest ``ar_step`` whose pyramid fits a model window of ``window`` frames (SkyReels-V2's rule).

    Block ``b`` is active in iterations ``[b * ar_step, b * ar_step + S)``, so about ``S / ar_step``
    blocks are active at once; they fit in ``window // causal_block_size`` blocks when
    ``ar_step >= S / (window // causal_block_size)``.
    """
    window_blocks = window // causal_block_size
    if window_blocks < 1:
        raise ValueError(
            f"causal_block_size {causal_block_size} is larger than the model window of {window} latent frames: "
            f"use causal_block_size <= {window}"
        )
    return math.ceil(num_steps / window_blocks)


def sample_nondecreasing_timesteps(
    batch_size: int,
    num_latent_frames: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """AR-Diffusion's training levels (Sun et al., CVPR 2025): ``t_1 <= t_2 <= ... <= t_F``, uniform.

    Draws ``[B, F]`` integer timesteps in ``[0, num_timesteps)`` (larger = noisier), uniformly over all
    non-decreasing sequences, so earlier frames are never noisier than later ones. Sampling is exact
    and vectorised by stars and bars: non-decreasing sequences of ``F`` values in ``[0, T)`` are in
    one-to-one correspondence with ``F``-subsets ``c_1 < ... < c_F`` of ``[0, T + F - 1)`` through
    ``t_i = c_i - (i - 1)``, and a uniform subset is the sorted first ``F`` entries of a random
    permutation. (The official code walks the same distribution frame by frame with path counts.)
    """
    _check_positive(batch_size=batch_size, num_latent_frames=num_latent_frames, num_timesteps=num_timesteps)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pool = num_timesteps + num_latent_frames - 1
    keys = torch.rand(batch_size, pool, generator=generator, device=gen_device)
    subset = keys.argsort(dim=1)[:, :num_latent_frames].sort(dim=1).values  # [B, F], strictly increasing
    t = subset - torch.arange(num_latent_frames, device=gen_device)
    return t.to(device or gen_device)


def sample_independent_timesteps(
    batch_size: int,
    num_latent_frames: int,
    num_timesteps: int,
    causal_block_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Diffusion Forcing's training levels (Chen et al. 2024): one independent noise level per block.

    Returns ``[B, F]`` integer timesteps uniform in ``[0, num_timesteps)`` (larger = noisier), shared by
    the frames of each causal block of ``causal_block_size`` frames (SkyReels-V2 trains this way with
    blocks; the last block may be shorter).
    """
    _check_positive(
        batch_size=batch_size,
        num_latent_frames=num_latent_frames,
        num_timesteps=num_timesteps,
        causal_block_size=causal_block_size,
    )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    num_blocks = math.ceil(num_latent_frames / causal_block_size)
    t = torch.randint(0, num_timesteps, (batch_size, num_blocks), generator=generator, device=gen_device)
    t = t.repeat_interleave(causal_block_size, dim=1)[:, :num_latent_frames]  # [B, F]
    return t.to(device or gen_device)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
