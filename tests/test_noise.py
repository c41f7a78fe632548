"""Initial noise: Gaussian, FreeNoise shuffle rescheduling, noise of frame ranges."""

import pytest
import torch

from longgen.noise import freenoise_noise, gaussian_noise, gaussian_source, noise_frames

SHAPE = (2, 3, 14, 2, 2)


def _source_index(noise, frame, candidates):
    """Index among ``candidates`` of the frame equal to ``noise[:, :, frame]`` (exactly one must match)."""
    hits = [c for c in candidates if torch.equal(noise[:, :, frame], noise[:, :, c])]
    assert len(hits) == 1, (frame, hits)
    return hits[0]


def test_gaussian_noise_is_seeded():
    a = gaussian_noise(SHAPE, torch.Generator().manual_seed(1))
    b = gaussian_noise(SHAPE, torch.Generator().manual_seed(1))
    c = gaussian_noise(SHAPE, torch.Generator().manual_seed(2))
    assert a.shape == SHAPE and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("window,stride", [(4, 2), (4, 4), (5, 3), (4, 1)])
def test_freenoise_frames_are_permutations_of_earlier_windows(window, stride):
    """Qiu et al. 2024, Sec. 3.2: frames [i, i+S) are a shuffle of frames [i-W, i-W+S)."""
    noise = freenoise_noise(SHAPE, window, stride, torch.Generator().manual_seed(0))
    plain = gaussian_noise(SHAPE, torch.Generator().manual_seed(0))
    assert torch.equal(noise[:, :, :window], plain[:, :, :window])  # the first window is left alone
    num_frames = SHAPE[2]
    for start in range(window, num_frames, stride):
        count = min(stride, num_frames - start)
        sources = list(range(start - window, start - window + stride))
        picked = [_source_index(noise, start + k, sources) for k in range(count)]
        assert len(set(picked)) == count  # a permutation (truncated for the last, shorter group)
    # so every frame is a copy of a frame of the first window; when S divides W, the windows the
    # sliding sampler uses (starts at multiples of S) hold W distinct noise frames
    for frame in range(window, num_frames):
        _source_index(noise, frame, range(window))
    if window % stride:
        return
    for start in range(0, num_frames - window + 1, stride):
        block = noise[:, :, start : start + window].transpose(0, 2).reshape(window, -1)  # [W, B*C*H*W]
        assert torch.unique(block, dim=0).shape[0] == window


def test_freenoise_is_seeded_and_shuffles():
    a = freenoise_noise(SHAPE, 4, 2, torch.Generator().manual_seed(0))
    b = freenoise_noise(SHAPE, 4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # over seeds the permutations differ (not always the identity copy)
    copies = [freenoise_noise(SHAPE, 4, 4, torch.Generator().manual_seed(s)) for s in range(6)]
    identity = [torch.equal(c[:, :, 4:8], c[:, :, 0:4]) for c in copies]
    assert not all(identity)


def test_freenoise_short_clip_and_bad_stride():
    short = freenoise_noise((1, 2, 4, 2, 2), 4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(short, gaussian_noise((1, 2, 4, 2, 2), torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="use stride <= 4"):
        freenoise_noise(SHAPE, 4, 5)
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        freenoise_noise((2, 14, 2, 2), 4, 2)


def test_noise_frames_pads_past_the_tensor_and_reads_sources():
    noise = gaussian_noise(SHAPE, torch.Generator().manual_seed(0))
    assert torch.equal(noise_frames(noise, 3, 7), noise[:, :, 3:7])
    g = torch.Generator().manual_seed(5)
    padded = noise_frames(noise, 12, 16, g)
    assert padded.shape == (2, 3, 4, 2, 2)
    assert torch.equal(padded[:, :, :2], noise[:, :, 12:])
    assert torch.equal(padded[:, :, 2:], gaussian_noise((2, 3, 2, 2, 2), torch.Generator().manual_seed(5)))
    split = gaussian_source((2, 3, 2, 2), torch.Generator().manual_seed(0))
    whole = gaussian_source((2, 3, 2, 2), torch.Generator().manual_seed(0))
    first, second = noise_frames(split, 0, 5), noise_frames(split, 5, 14)
    assert torch.equal(torch.cat([first, second], dim=2), noise_frames(whole, 0, 14))
    assert first.shape == (2, 3, 5, 2, 2)
