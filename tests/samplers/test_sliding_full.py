"""The plain sampler and sliding windows with fusion: reductions, window bookkeeping, bad inputs."""

import pytest
import torch

from longgen.samplers import fusion_weights, sample_full, sample_sliding, window_starts
from longgen.schedules import flow_sigmas


class ToyDenoiser:
    """A deterministic x0 that mixes frames (so window bugs change it) and depends on each frame's sigma."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, x, sigma, frame_offset=0):
        self.calls.append((x.shape[2], frame_offset))
        s = sigma[:, None, :, None, None]
        return torch.tanh(x) * (1 - 0.5 * s) + 0.3 * x.mean(dim=2, keepdim=True) + 0.01 * frame_offset


def _noise(frames, seed=0):
    return torch.randn(2, 3, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


SIGMAS = flow_sigmas(6, shift=3.0)


def test_sliding_with_one_window_equals_full():
    noise = _noise(8)
    full = sample_full(ToyDenoiser(), noise, SIGMAS, disable=True)
    # uniform weights: w * x0 / w is x0 bit for bit, so the runs are identical
    uniform = sample_sliding(
        ToyDenoiser(), noise, SIGMAS, window=8, stride=4, weighting="uniform", disable=True
    )
    assert torch.equal(uniform, full)
    # pyramid weights (1..4..1): (w * x0) / w rounds to within one ulp of x0, so equal to float error only
    pyramid = sample_sliding(ToyDenoiser(), noise, SIGMAS, window=8, stride=8, disable=True)
    torch.testing.assert_close(pyramid, full, atol=1e-6, rtol=0)


def test_sliding_windows_change_the_result_and_see_native_length():
    noise = _noise(10)
    denoiser = ToyDenoiser()
    out = sample_sliding(denoiser, noise, SIGMAS, window=4, stride=2, disable=True)
    assert out.shape == noise.shape
    assert {n for n, _ in denoiser.calls} == {4}
    # windows at 0, 2, 4, 6 (every stride) per step, offsets passed through
    assert [o for _, o in denoiser.calls[:4]] == [0, 2, 4, 6]
    assert len(denoiser.calls) == 4 * (len(SIGMAS) - 1)
    full = sample_full(ToyDenoiser(), noise, SIGMAS, disable=True)
    assert (out - full).abs().max() > 1e-3  # the toy mixes frames: windows see less context


def test_sliding_tail_window_covers_the_end():
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    denoiser = ToyDenoiser()
    out = sample_sliding(denoiser, _noise(11), SIGMAS, window=4, stride=3, disable=True)
    assert out.shape[2] == 11
    assert [o for _, o in denoiser.calls[:4]] == [0, 3, 6, 7]


def test_fusion_weights_are_pyramids():
    assert fusion_weights(4).tolist() == [1, 2, 2, 1]
    assert fusion_weights(5).tolist() == [1, 2, 3, 2, 1]
    assert fusion_weights(3, "uniform").tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="pyramid"):
        fusion_weights(3, "gaussian")


def test_full_with_an_oracle_returns_its_clean_video():
    target = _noise(5, seed=3)
    out = sample_full(lambda x, s, frame_offset=0: target, _noise(5), SIGMAS, disable=True)
    assert torch.equal(out, target)


def test_sliding_bad_inputs_name_the_fix():
    noise = _noise(6)
    with pytest.raises(ValueError, match="--window <= 6"):
        sample_sliding(ToyDenoiser(), noise, SIGMAS, window=8, stride=2, disable=True)
    with pytest.raises(ValueError, match="--stride <= 4"):
        sample_sliding(ToyDenoiser(), noise, SIGMAS, window=4, stride=5, disable=True)
    with pytest.raises(ValueError, match="must be >= 1"):
        sample_sliding(ToyDenoiser(), noise, SIGMAS, window=4, stride=0, disable=True)
