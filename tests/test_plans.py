"""Per-frame plans equal the papers' definitions (hand-written matrices) and diffusers' SkyReels-V2 matrix."""

import itertools

import pytest
import torch

from longgen.plans import (
    fifo_plan,
    min_ar_step,
    plan_sigmas,
    plan_windows,
    pyramid_plan,
    sample_independent_timesteps,
    sample_nondecreasing_timesteps,
    synchronous_plan,
    update_mask,
    validate_plan,
)

T, F_ = True, False


def test_synchronous_plan_by_hand():
    assert synchronous_plan(3, 2).tolist() == [[0, 0, 0], [1, 1, 1]]
    assert update_mask(synchronous_plan(3, 2), 2).all()


def test_pyramid_plan_ar_step_1_by_hand():
    # Each frame one step behind the one before it (AR-Diffusion / SkyReels-V2 "denoising wave").
    plan = pyramid_plan(3, 3, ar_step=1)
    assert plan.tolist() == [[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 2, 1], [3, 3, 2]]
    assert update_mask(plan, 3).tolist() == [[T, F_, F_], [T, T, F_], [T, T, T], [F_, T, T], [F_, F_, T]]


def test_pyramid_plan_causal_blocks_by_hand():
    # Two blocks of two frames, block 1 one step behind block 0.
    assert pyramid_plan(4, 2, ar_step=1, causal_block_size=2).tolist() == [
        [0, 0, 0, 0],
        [1, 1, 0, 0],
        [2, 2, 1, 1],
    ]
    # ar_step 2 with 3 steps: block 1 starts when block 0 is at index 2.
    assert pyramid_plan(4, 3, ar_step=2, causal_block_size=2).tolist() == [
        [0, 0, 0, 0],
        [1, 1, 0, 0],
        [2, 2, 0, 0],
        [3, 3, 1, 1],
        [3, 3, 2, 2],
    ]
    # A partial last block (3 frames, blocks of 2) is one shorter block.
    assert pyramid_plan(3, 1, ar_step=1, causal_block_size=2).tolist() == [[0, 0, 0], [1, 1, 0]]


def test_pyramid_plan_ready_frames_and_large_ar_step_by_hand():
    # One clean history frame (never updated), then the pyramid.
    plan = pyramid_plan(3, 2, ar_step=1, num_ready=1)
    assert plan.tolist() == [[2, 0, 0], [2, 1, 0], [2, 2, 1]]
    assert not update_mask(plan, 2)[:, 0].any()
    # ar_step larger than the number of steps: a block never waits once the previous one is clean.
    assert pyramid_plan(2, 2, ar_step=5).tolist() == [[0, 0], [1, 0], [2, 0], [2, 1]]


def test_pyramid_ar_step_0_is_synchronous():
    for frames, steps, block in [(5, 4, 1), (6, 3, 2), (7, 2, 3)]:
        assert torch.equal(
            pyramid_plan(frames, steps, ar_step=0, causal_block_size=block), synchronous_plan(frames, steps)
        )


def test_pyramid_plan_matches_diffusers_skyreels_v2_matrix():
    """diffusers' generate_timestep_matrix: its step_index minus one (clamped) is our plan; same update mask
    and (clipped to the clip) the same model windows."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    generate = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix
    checked = 0
    for frames, steps, ar_step, block, ready, base in itertools.product(
        [2, 4, 6, 12], [1, 3, 5], [0, 1, 2, 7], [1, 2], [0, 2], [None, 4]
    ):
        base = frames if base is None else base
        if frames % block or ready % block or ready >= frames:
            continue
        template = torch.arange(steps * 100, 0, -100)
        try:
            _, step_index, mask, intervals = generate(None, frames, template, base, ar_step, ready, block)
        except ValueError:
            continue  # diffusers' conservative ar_step check; ours is tested below
        plan = pyramid_plan(frames, steps, ar_step=ar_step, causal_block_size=block, num_ready=ready)
        assert torch.equal((step_index - 1).clamp(0, steps), plan), (frames, steps, ar_step, block, ready)
        assert torch.equal(mask, update_mask(plan, steps))
        clipped = [(min(s, frames - min(base, frames)), min(e, frames)) for s, e in intervals]
        assert plan_windows(plan, steps, base) == clipped
        checked += 1
    assert checked > 40


def test_fifo_plan_by_hand_and_as_shifted_pyramid():
    # 3 output frames, window 2, 2 partitions: S = L = 4 steps, 3 + 4 - 2 = 5 iterations.
    plan = fifo_plan(3, window=2, num_partitions=2)
    assert plan.tolist() == [[1, 0, 0], [2, 1, 0], [3, 2, 1], [4, 3, 2], [4, 4, 3]]
    validate_plan(plan, 4)
    for frames, window, parts in [(5, 2, 3), (8, 4, 2), (4, 4, 1)]:
        fifo = fifo_plan(frames, window, parts)
        assert torch.equal(fifo, pyramid_plan(frames, window * parts, ar_step=1)[window - 1 :])
    with pytest.raises(ValueError, match="window <= 3"):
        fifo_plan(3, window=4, num_partitions=1)


def test_update_mask_sigmas_and_validation():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    plan = pyramid_plan(2, 2, ar_step=1)
    assert plan_sigmas(plan, sigmas).tolist() == [[1.0, 1.0], [0.5, 1.0], [0.0, 0.5]]
    for p, s in [
        (plan, 2),
        (synchronous_plan(4, 3), 3),
        (fifo_plan(6, 2, 2), 4),
        (pyramid_plan(9, 4, ar_step=3, causal_block_size=2), 4),
    ]:
        validate_plan(p, s)
        # every frame is updated exactly S times, minus the steps it started with
        assert torch.equal(update_mask(p, s).sum(0), s - p[0])
    with pytest.raises(ValueError, match="grow by 0 or 1"):
        validate_plan(torch.tensor([[0, 0], [2, 2]]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        validate_plan(torch.tensor([[0, 3]]), 2)


def test_plan_windows_by_hand_and_ar_step_error():
    plan = pyramid_plan(4, 2, ar_step=1)
    assert plan_windows(plan, 2, 2) == [(0, 2), (0, 2), (1, 3), (2, 4), (2, 4)]
    assert min_ar_step(2, 2) == 1
    assert min_ar_step(30, 20, causal_block_size=5) == 8
    with pytest.raises(ValueError, match="raise ar_step"):
        plan_windows(pyramid_plan(4, 4, ar_step=1), 4, 2)
    plan_windows(pyramid_plan(6, 4, ar_step=min_ar_step(4, 2)), 4, 2)  # the minimum fits
    with pytest.raises(ValueError, match="causal_block_size <= 2"):
        min_ar_step(4, 2, causal_block_size=3)


def test_plan_bad_inputs():
    with pytest.raises(ValueError, match="ar_step must be >= 0"):
        pyramid_plan(4, 2, ar_step=-1)
    with pytest.raises(ValueError, match="num_ready < 4"):
        pyramid_plan(4, 2, num_ready=4)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        synchronous_plan(4, 0)


def test_nondecreasing_timesteps_are_monotone_and_uniform():
    g = torch.Generator().manual_seed(0)
    t = sample_nondecreasing_timesteps(4000, 2, 3, generator=g)
    assert t.shape == (4000, 2) and t.dtype == torch.long
    assert t.min() >= 0 and t.max() <= 2
    assert (t[:, 1:] >= t[:, :-1]).all()
    # The 6 non-decreasing sequences over {0,1,2} are equally likely.
    codes = t[:, 0] * 3 + t[:, 1]
    counts = torch.bincount(codes, minlength=9).float() / len(codes)
    allowed = [0, 1, 2, 4, 5, 8]
    assert counts[[1 + 2, 2 + 4, 2 + 5]].sum() == 0  # (1,0), (2,0), (2,1) never appear
    assert torch.allclose(counts[allowed], torch.full((6,), 1 / 6), atol=0.03)
    again = sample_nondecreasing_timesteps(4000, 2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    long = sample_nondecreasing_timesteps(64, 21, 1000, generator=g)
    assert (long.diff(dim=1) >= 0).all() and long.max() < 1000 and long.float().std() > 100


def test_independent_timesteps_share_levels_within_blocks():
    g = torch.Generator().manual_seed(0)
    t = sample_independent_timesteps(256, 7, 1000, causal_block_size=3, generator=g)
    assert t.shape == (256, 7) and t.min() >= 0 and t.max() < 1000
    assert (t[:, 0] == t[:, 1]).all() and (t[:, 1] == t[:, 2]).all() and (t[:, 3] == t[:, 5]).all()
    assert (t[:, 2] != t[:, 3]).any() and (t[:, 5] != t[:, 6]).any()  # the last, shorter block is its own
    per_frame = sample_independent_timesteps(256, 4, 10, generator=g)
    assert (per_frame[:, 0] != per_frame[:, 1]).float().mean() > 0.8
