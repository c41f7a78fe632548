"""Multi-prompt conditioning: prompts on frame ranges, blended per window."""

import pytest
import torch

from longgen.prompts import cond_for_window, multi_prompt_denoiser, prompt_weights

RANGES = [(0, 8), (8, 16), (16, 20)]
CONDS = [
    {"prompt_embeds": torch.full((1, 3, 2), float(i)), "mask": torch.tensor([[1, 1, i]]), "fps": 16}
    for i in range(3)
]


def test_window_inside_a_range_gets_that_prompt_unchanged():
    for offset, expected in [(0, 0), (4, 0), (8, 1), (12, 1), (16, 2), (30, 2), (-3, 0)]:
        cond = cond_for_window(CONDS, RANGES, offset, 4)
        assert torch.equal(cond["prompt_embeds"], CONDS[expected]["prompt_embeds"])
        assert torch.equal(cond["mask"], CONDS[expected]["mask"])


def test_window_across_a_boundary_blends_by_coverage():
    weights = prompt_weights(RANGES, 6, 4)  # frames 6, 7 | 8, 9
    assert weights.tolist() == [0.5, 0.5, 0.0]
    cond = cond_for_window(CONDS, RANGES, 6, 4)
    torch.testing.assert_close(cond["prompt_embeds"], torch.full((1, 3, 2), 0.5))
    assert torch.equal(cond["mask"], CONDS[0]["mask"])  # non-float entries from the main prompt (ties: first)
    assert cond["fps"] == 16


def test_transition_ramps_linearly_and_weights_sum_to_one():
    # one-frame windows: per-frame weights ramp over 4 frames centred on the boundary at 8
    second = [float(prompt_weights(RANGES, t, 1, transition=4)[1]) for t in range(5, 12)]
    assert second == pytest.approx([0.0, 0.125, 0.375, 0.625, 0.875, 1.0, 1.0])
    for offset in range(-2, 22):
        w = prompt_weights(RANGES, offset, 5, transition=6)
        assert w.min() >= 0 and float(w.sum()) == pytest.approx(1.0)


def test_multi_prompt_denoiser_passes_the_window_cond():
    seen = []

    def denoise(x, sigma, cond):
        seen.append(float(cond["prompt_embeds"].mean()))
        return x

    bound = multi_prompt_denoiser(denoise, CONDS, RANGES)
    x = torch.zeros(1, 2, 4, 2, 2)
    bound(x, torch.ones(1, 4), frame_offset=0)
    bound(x, torch.ones(1, 4), frame_offset=16)
    assert seen == [0.0, 2.0]


def test_bad_ranges_name_the_fix():
    with pytest.raises(ValueError, match="contiguous"):
        prompt_weights([(0, 8), (9, 12)], 0, 4)
    with pytest.raises(ValueError, match="one cond per range"):
        cond_for_window(CONDS[:2], RANGES, 0, 4)
    bad = [dict(CONDS[0]), {**CONDS[1], "prompt_embeds": torch.zeros(1, 5, 2)}]
    with pytest.raises(ValueError, match="max_sequence_length"):
        cond_for_window(bad, [(0, 8), (8, 16)], 6, 4)
