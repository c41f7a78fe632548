"""FIFO-Diffusion: diagonal plan followed, queue bookkeeping, reductions, constant memory, bad inputs."""

import pytest
import torch

from longgen.noise import gaussian_source
from longgen.plans import fifo_plan
from longgen.samplers import sample_fifo, sample_full
from longgen.schedules import flow_sigmas


class ToyDenoiser:
    """A deterministic x0 that mixes frames and depends on each frame's sigma; records every call."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, x, sigma, frame_offset=0):
        self.calls.append((x.shape[2], frame_offset))
        s = sigma[:, None, :, None, None]
        return torch.tanh(x) * (1 - 0.5 * s) + 0.3 * x.mean(dim=2, keepdim=True) + 0.01 * frame_offset


def _noise(frames, seed=0):
    return torch.randn(1, 2, frames, 3, 3, generator=torch.Generator().manual_seed(seed))


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "frames,window,parts,lookahead", [(4, 4, 1, False), (9, 4, 2, False), (9, 4, 2, True), (7, 2, 3, True)]
)
def test_oracle_denoiser_gives_its_clean_video(frames, window, parts, lookahead):
    """An x0 that knows the clean video by absolute frame index ends every frame exactly on it, so the queue
    pops the right frame at the right output index (warm-up / padding frames map to the nearest frame)."""
    target = _noise(frames, seed=9)

    def oracle(x, sigma, frame_offset=0):
        idx = (torch.arange(x.shape[2]) + frame_offset).clamp(0, frames - 1)
        return target[:, :, idx]

    out = sample_fifo(
        oracle,
        _noise(frames),
        flow_sigmas(window * parts),
        window=window,
        num_partitions=parts,
        lookahead=lookahead,
        generator=_gen(),
        disable=True,
    )
    assert torch.equal(out, target)


def test_lookahead_writes_back_only_the_noisier_half():
    """Lookahead (Kim et al. 2024): each window's cleaner half is context only. A model whose x0 is 1 on the
    noisier half of every window and 1000 on the cleaner half must give a clip of ones."""
    window = 4

    def halves(x, sigma, frame_offset=0):
        x0 = torch.full_like(x, 1000.0)
        x0[:, :, window // 2 :] = 1.0
        return x0

    out = sample_fifo(
        halves,
        _noise(9),
        flow_sigmas(2 * window),
        window=window,
        num_partitions=2,
        init_clip=torch.ones(1, 2, window, 3, 3),
        generator=_gen(),
        disable=True,
    )
    assert torch.equal(out, torch.ones_like(out))


@pytest.mark.parametrize("lookahead", [False, True])
def test_queue_follows_the_diagonal_plan(lookahead):
    frames, window, parts = 7, 2, 2
    seen = []
    denoiser = ToyDenoiser()
    sample_fifo(
        denoiser,
        _noise(frames),
        flow_sigmas(window * parts),
        window=window,
        num_partitions=parts,
        lookahead=lookahead,
        generator=_gen(),
        callback=seen.append,
        disable=True,
    )
    plan = fifo_plan(frames, window, parts)
    assert len(seen) == plan.shape[0]
    context = window // 2 if lookahead else 0
    for row, info in zip(plan, seen):
        assert info["x"].shape[2] == context + window * parts  # constant memory: the queue never grows
        for slot in range(context, info["x"].shape[2]):
            j = info["frame_offset"] + slot
            if 0 <= j < frames:
                assert info["levels"][slot] == row[j]
    # every model call sees exactly one window; 2 windows per partition with lookahead
    windows_per_iter = parts * (2 if lookahead else 1)
    init_calls = window * parts  # the first clip, made by plain sampling with the same schedule
    assert {n for n, _ in denoiser.calls} == {window}
    assert len(denoiser.calls) == init_calls + windows_per_iter * plan.shape[0]


def test_one_window_clip_vs_plain_sampling():
    """FIFO on a clip of one window (n=1, no lookahead) starts from plain sampling of that clip, then
    re-noises it along the diagonal (frame j at level window-1-j) and denoises it again with mixed per-frame
    levels. The first clip is plain sampling exactly; the output is not, unless the model's x0 ignores its
    input (the oracle test above): a frame-mixing model sees different neighbours at different levels."""
    window = 4
    sigmas = flow_sigmas(window)
    noise = _noise(window)
    plain = sample_full(ToyDenoiser(), noise, sigmas, disable=True)
    default = sample_fifo(
        ToyDenoiser(),
        noise,
        sigmas,
        window=window,
        num_partitions=1,
        lookahead=False,
        generator=_gen(),
        disable=True,
    )
    given = sample_fifo(
        ToyDenoiser(),
        noise,
        sigmas,
        window=window,
        num_partitions=1,
        lookahead=False,
        init_clip=plain,
        generator=_gen(),
        disable=True,
    )
    assert torch.equal(default, given)  # the default first clip is exactly plain sampling
    assert default.shape == plain.shape
    assert (default - plain).abs().max() > 1e-3


def test_streaming_noise_source_and_return_latents_false():
    streamed = []
    sigmas = flow_sigmas(4)
    got = sample_fifo(
        ToyDenoiser(),
        gaussian_source((1, 2, 3, 3), _gen(0)),
        sigmas,
        window=2,
        num_partitions=2,
        num_latent_frames=9,
        generator=_gen(),
        return_latents=False,
        on_frames=lambda j, x: streamed.append((j, x)),
        disable=True,
    )
    assert got is None
    assert [j for j, _ in streamed] == list(range(9))
    assert all(x.shape == (1, 2, 1, 3, 3) for _, x in streamed)
    again = sample_fifo(
        ToyDenoiser(),
        gaussian_source((1, 2, 3, 3), _gen(0)),
        sigmas,
        window=2,
        num_partitions=2,
        num_latent_frames=9,
        generator=_gen(),
        disable=True,
    )
    assert torch.equal(torch.cat([x for _, x in streamed], dim=2), again)


def test_new_frames_start_from_their_noise():
    """Output frame j >= window enters the queue tail as sigmas[0] * noise[:, :, j]."""
    frames, window = 6, 2
    sigmas = flow_sigmas(window * 2)
    noise = _noise(frames)
    entered = []

    def spy(x, sigma, frame_offset=0):
        entered.append((frame_offset, x[:, :, -1].clone()))
        return ToyDenoiser()(x, sigma, frame_offset)

    sample_fifo(
        spy,
        noise,
        sigmas,
        window=window,
        num_partitions=2,
        lookahead=False,
        init_clip=torch.zeros(1, 2, 2, 3, 3),
        generator=_gen(),
        disable=True,
    )
    tails = {}
    for off, x in entered:  # the first time frame j is a window's last slot, it has just entered the queue
        tails.setdefault(off + window - 1, x)
    for j in range(window, frames):
        assert torch.equal(tails[j], noise[:, :, j] * sigmas[0])


def test_bad_inputs_name_the_fix():
    noise = _noise(8)
    with pytest.raises(ValueError, match="num_steps=8"):
        sample_fifo(ToyDenoiser(), noise, flow_sigmas(6), window=4, num_partitions=2)
    with pytest.raises(ValueError, match="window <= 8"):
        sample_fifo(ToyDenoiser(), noise, flow_sigmas(10), window=10, num_partitions=1)
    with pytest.raises(ValueError, match="window=4 or lookahead=False"):
        sample_fifo(ToyDenoiser(), noise, flow_sigmas(6), window=3, num_partitions=2, lookahead=True)
    with pytest.raises(ValueError, match="num_latent_frames"):
        sample_fifo(ToyDenoiser(), gaussian_source((1, 2, 3, 3)), flow_sigmas(4), window=2, num_partitions=2)
