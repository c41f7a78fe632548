"""The extend sampler: plain sampling in the trivial setting, given frames kept, the chunk orders, anchoring."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from longgen.samplers.extend import _plan, match_statistics, sample_extend
from longgen.samplers.full import sample_full


def _mixing_denoise(calls: list | None = None):
    """A toy x0 predictor that mixes frames (so context matters) and records (x, sigma) per call."""

    def denoise(x, sigma, frame_offset=0):
        if calls is not None:
            calls.append((x.clone(), sigma.clone(), frame_offset))
        mean = x.mean(dim=2, keepdim=True)
        return 0.6 * mean + 0.3 * x.roll(1, dims=2) + 0.1 * x

    return denoise


def _given(latents: torch.Tensor, positions):
    """A whole-frame FrameConditioning stand-in (the duck type sample_extend reads)."""
    return SimpleNamespace(
        latents=latents, positions=tuple(positions), check=lambda *a: None,
        fully_given=lambda: [True] * len(positions),
    )


def test_one_window_without_given_frames_is_the_full_sampler():
    noise = torch.randn(2, 3, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1, 0, 7)
    out = sample_extend(_mixing_denoise(), noise, sigmas, window=6, chunk_context=2)
    assert torch.equal(out, sample_full(_mixing_denoise(), noise, sigmas))


def test_forward_chunks_continue_from_the_previous_chunk_at_sigma_0():
    noise = torch.randn(1, 2, 10, 2, 2, generator=torch.Generator().manual_seed(1))
    prefix = torch.randn(1, 2, 2, 2, 2)
    calls: list = []
    out = sample_extend(_mixing_denoise(calls), noise, torch.linspace(1, 0, 4), window=5, chunk_context=2,
                        conditioning=_given(prefix, [0, 1]))
    assert torch.equal(out[:, :, :2], prefix)  # given frames returned exactly
    plan = _plan(torch.tensor([True, True] + [False] * 8), 5, 2, 0, "forward")
    assert plan[0] == ([0, 1], [2, 3, 4]) and plan[1] == ([3, 4], [5, 6, 7])
    assert len(calls) == 3 * len(plan)  # 3 steps per window
    for k, (given, new) in enumerate(plan):
        positions = sorted(given + new)
        for x, sigma, offset in calls[3 * k: 3 * k + 3]:
            is_given = torch.tensor([p in given for p in positions])
            assert offset == positions[0]
            assert bool((sigma[:, is_given] == 0).all()) and bool((sigma[:, ~is_given] > 0).all())
            assert torch.equal(x[:, :, is_given], out[:, :, given])  # the latents of the chunk before, clean
    with pytest.raises(ValueError, match="leaves no frame to generate"):
        _plan(torch.zeros(8, dtype=torch.bool), 3, 2, 1, "forward")


def test_anchor_and_inverted_order_follow_framepack():
    known = torch.tensor([True] + [False] * 11)
    anchored = _plan(known, 5, 2, 1, "forward")
    assert all(0 in given for given, _ in anchored)  # the first frame is context of every window
    inverted = _plan(known, 5, 2, 1, "inverted")
    assert inverted[0] == ([0], [8, 9, 10, 11])  # the last chunk first, from the anchor alone
    assert inverted[1] == ([0, 8, 9], [6, 7])  # then backward: anchor + the start of the chunk after
    news = [n for _, n in inverted]
    assert sorted(p for n in news for p in n) == list(range(1, 12))  # every frame generated exactly once
    assert all(a[0] > b[0] for a, b in zip(news, news[1:]))  # right to left
    noise = torch.randn(1, 2, 12, 2, 2, generator=torch.Generator().manual_seed(2))
    calls: list = []
    out = sample_extend(_mixing_denoise(calls), noise, torch.linspace(1, 0, 3), window=5, chunk_context=2,
                        anchor_frames=1, order="inverted")
    assert torch.isfinite(out).all() and len(calls) == 2 * (1 + len(_plan(
        torch.tensor([True] * 5 + [False] * 7), 5, 2, 1, "inverted")))  # a first forward window, then inverted


def test_stats_anchor_matches_the_context_statistics():
    x = torch.randn(2, 3, 4, 5, 5) * 3 + 1
    ref = torch.randn(2, 3, 2, 5, 5) * 0.5 - 2
    matched = match_statistics(x, ref, 1.0)
    torch.testing.assert_close(matched.mean(dim=(2, 3, 4)), ref.mean(dim=(2, 3, 4)), atol=1e-5, rtol=0)
    torch.testing.assert_close(matched.std(dim=(2, 3, 4)), ref.std(dim=(2, 3, 4)), atol=1e-5, rtol=1e-5)
    assert torch.equal(match_statistics(x, ref, 0.0), x)
    half = match_statistics(x, ref, 0.5)
    torch.testing.assert_close(half, 0.5 * (x + matched))


def test_extend_knobs_reach_the_cli_and_refuse_bad_values(capsys):
    from longgen.cli import main
    from longgen.samplers.builtin import ExtendKnobs

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "extend: chunk-by-chunk continuation" in text
    for flag in ("--chunk-context", "--anchor-frames", "--order", "--stats-anchor"):
        assert flag in text
    with pytest.raises(ValueError, match="needs --anchor-frames|set --anchor-frames"):
        ExtendKnobs(order="inverted")
    with pytest.raises(ValueError, match="--stats-anchor must be in"):
        ExtendKnobs(stats_anchor=1.5)
    with pytest.raises(ValueError, match="--anchor-frames must be >= 0"):
        ExtendKnobs(anchor_frames=-1)


class _TwoClipPosterior:
    """Exact x0 of ``x = (1 - s) x0 + s eps`` for a uniform two-clip data set, on any window (``frame_offset``).

    Frames at sigma 0 weigh in through a floor on sigma (a given frame pins the clip)."""

    def __init__(self, clips: torch.Tensor):
        self.clips = clips  # [2, B, C, F, H, W]

    def __call__(self, x, sigma, frame_offset=0):
        templates = self.clips[:, :, :, frame_offset: frame_offset + x.shape[2]]
        s = sigma.clamp_min(1e-3)[None, :, None, :, None, None]  # [1, B, 1, n, 1, 1]
        err = ((x[None] - (1 - s) * templates) ** 2 / (2 * s**2)).sum(dim=(2, 3, 4, 5))  # [2, B]
        w = torch.softmax(-err, dim=0)[:, :, None, None, None, None]
        return (w * templates).sum(dim=0)


@pytest.mark.parametrize("options", [{}, {"anchor_frames": 1}, {"anchor_frames": 1, "order": "inverted"}])
def test_given_frames_steer_every_chunk_to_their_clip(options):
    clips = torch.randn(2, 1, 2, 12, 3, 3, generator=torch.Generator().manual_seed(4))
    if options:  # an anchor sits beside frames far from it in one window (as in FramePack): the model sees
        clips = clips[:, :, :, :1].expand_as(clips).contiguous()  # window positions, so use still clips
    posterior = _TwoClipPosterior(clips)
    noise = torch.randn(1, 2, 12, 3, 3, generator=torch.Generator().manual_seed(5))
    sigmas = torch.linspace(1, 0, 9)
    for k in (0, 1):  # given frames of clip k at the start: every later chunk lands on clip k
        out = sample_extend(posterior, noise, sigmas, window=5, chunk_context=2,
                            conditioning=_given(clips[k][:, :, :2], [0, 1]), **options)
        torch.testing.assert_close(out, clips[k], atol=1e-4, rtol=0)
    # nothing given: the first chunk picks a clip and the context carries it through the others
    out = sample_extend(posterior, noise, sigmas, window=5, chunk_context=2, **options)
    errors = [float((out - clips[k]).abs().max()) for k in (0, 1)]
    assert min(errors) < 1e-4, errors


def test_pipeline_continues_given_frames_with_the_extend_sampler(tmp_path):
    from longgen.backbones import build_tiny
    from longgen.conditioning import FrameConditioning
    from longgen.pipeline import LongVideoPipeline

    adapter = build_tiny("wan")
    pipe = LongVideoPipeline(adapter)
    given = torch.randn(1, adapter.latent_channels, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    result = pipe.generate(
        "a red ball", num_frames=adapter.num_pixel_frames(7), height=32, width=32, num_inference_steps=2,
        sampler="extend", sampler_options={"window": 3, "chunk_context": 1, "anchor_frames": 1},
        conditioning=FrameConditioning(given, (0, 1)), output_path=tmp_path / "c.mp4", show_progress=False,
        guidance_scale=1.0,
    )
    assert torch.equal(result.latents[:, :, :2].cpu(), given) and result.latents.shape[2] == 7
    assert os.path.getsize(tmp_path / "c.mp4") > 0
    with pytest.raises(ValueError, match="leave no frame of the 3-frame window"):
        pipe.generate("a red ball", num_frames=adapter.num_pixel_frames(7), height=32, width=32,
                      sampler="extend", sampler_options={"window": 3, "chunk_context": 2, "anchor_frames": 1},
                      show_progress=False, guidance_scale=1.0)
