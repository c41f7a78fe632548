"""Batched windows (issue 16.1): the windows of one sliding / fifo step as one model call, same output."""

import warnings

import pytest
import torch

from longgen.cli import main
from longgen.pipeline import GuidedDenoiser, LongVideoPipeline
from longgen.samplers import get_sampler
from longgen.samplers.base import WindowBatcher, current_window_key, windows_that_fit
from longgen.samplers.fifo import sample_fifo
from longgen.samplers.sliding import sample_sliding


def _multi_prompt_denoiser(pipe: LongVideoPipeline, num_latent_frames: int, guidance: float) -> GuidedDenoiser:
    """Two prompts over the clip (windows get different conds) with classifier-free guidance."""
    cond, uncond = pipe._conditioning(
        ["a red ball", "a blue cube"], [""], [0, 21], num_latent_frames, 2.0, do_classifier_free_guidance=True
    )
    return GuidedDenoiser(pipe.adapter, cond, uncond, guidance)


@pytest.fixture(scope="module")
def pipe(saved):
    return LongVideoPipeline.from_pretrained(saved("wan"))


@pytest.mark.parametrize("window_batch", [2, 3, 100])
def test_sliding_batched_equals_sequential_with_per_window_conds(pipe, window_batch):
    noise = torch.randn(1, 4, 12, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = pipe.adapter.sigmas(3)
    runs = {}
    for batch in (1, window_batch):
        denoiser = _multi_prompt_denoiser(pipe, 12, guidance=3.0)
        runs[batch] = sample_sliding(denoiser, noise, sigmas, window=3, stride=2, window_batch=batch, disable=True)
        runs[batch, "calls"] = denoiser.num_calls
    torch.testing.assert_close(runs[window_batch], runs[1], atol=1e-5, rtol=1e-5)
    num_windows = 6  # starts 0, 2, 4, 6, 8 and the tail window at 9
    assert runs[1, "calls"] == 3 * num_windows
    assert runs[window_batch, "calls"] == 3 * -(-num_windows // window_batch)
    # the prompts really differ per window: one cond for the whole clip gives another clip
    single = sample_sliding(GuidedDenoiser(pipe.adapter, *pipe.adapter.encode_prompt(["a red ball"], [""]), 3.0),
                            noise, sigmas, window=3, stride=2, window_batch=window_batch, disable=True)
    assert (single - runs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("lookahead", [True, False])
def test_fifo_batched_equals_sequential(pipe, lookahead):
    noise = torch.randn(1, 4, 10, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = pipe.adapter.sigmas(2 * 2)
    runs = {}
    for batch in (1, 4):
        denoiser = _multi_prompt_denoiser(pipe, 10, guidance=2.0)
        runs[batch] = sample_fifo(
            denoiser, noise, sigmas, window=2, num_partitions=2, lookahead=lookahead, window_batch=batch,
            eta=0.5, generator=torch.Generator().manual_seed(2), disable=True,
        )
        runs[batch, "calls"] = denoiser.num_calls
    torch.testing.assert_close(runs[4], runs[1], atol=1e-5, rtol=1e-5)
    assert runs[4, "calls"] < runs[1, "calls"]


class _LimitedMemory:
    """A toy denoiser whose batched call 'runs out of memory' above ``limit`` windows; records group sizes."""

    def __init__(self, limit: int, error: type[BaseException] = torch.OutOfMemoryError):
        self.limit, self.error, self.groups, self.keys = limit, error, [], []

    def __call__(self, x, sigma, frame_offset=0):
        self.groups.append(1)
        self.keys.append(current_window_key())
        return x * (1 - sigma[:, None, :, None, None]) + frame_offset

    def denoise_windows(self, xs, sigmas, frame_offsets):
        if len(xs) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 80.00 GiB")
        self.groups.append(len(xs))
        self.keys.append(current_window_key())
        return [x * (1 - s[:, None, :, None, None]) + o for x, s, o in zip(xs, sigmas, frame_offsets)]


def test_too_large_a_batch_falls_back_with_a_warning():
    xs = [torch.full((1, 1, 2, 1, 1), float(i)) for i in range(8)]
    sigmas = [torch.full((1, 2), 0.5)] * 8
    denoiser = _LimitedMemory(limit=2)
    batcher = WindowBatcher(denoiser, window_batch=8)
    with pytest.warns(RuntimeWarning, match="ran out of memory; retrying with --window-batch [42]"):
        out = batcher(xs, sigmas, list(range(8)))
    expected = [x * 0.5 + i for i, x in enumerate(xs)]
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
    assert batcher.cap == 2 and batcher.fallbacks == 2  # 8 -> 4 -> 2
    assert denoiser.groups == [2, 2, 2, 2]
    assert denoiser.keys == ["0-1", "2-3", "4-5", "6-7"]  # step caches keep one state per window group
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cap persists: no more fallbacks in later steps
        batcher(xs, sigmas, list(range(8)))


def test_cpu_allocator_failure_counts_as_out_of_memory_but_other_errors_raise():
    xs, sigmas = [torch.zeros(1, 1, 2, 1, 1)] * 3, [torch.full((1, 2), 0.5)] * 3
    cpu_oom = _LimitedMemory(limit=1, error=RuntimeError)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        WindowBatcher(cpu_oom, 3)(xs, sigmas, [0, 1, 2])

    class Broken(_LimitedMemory):
        def denoise_windows(self, xs, sigmas, frame_offsets):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        WindowBatcher(Broken(limit=3), 3)(xs, sigmas, [0, 1, 2])


def test_denoiser_without_batched_call_runs_window_by_window():
    calls = []

    def plain(x, sigma, frame_offset=0):
        calls.append(frame_offset)
        return x

    xs, sigmas = [torch.zeros(1, 1, 2, 1, 1)] * 3, [torch.full((1, 2), 0.5)] * 3
    WindowBatcher(plain, 3)(xs, sigmas, [0, 4, 8])
    assert calls == [0, 4, 8]


@pytest.mark.parametrize("sampler", ["sliding", "fifo"])
def test_window_batch_knob_is_validated_and_reaches_the_sampler(pipe, sampler):
    with pytest.raises(ValueError, match="--window-batch must be >= 1"):
        get_sampler(sampler).make_knobs({"window_batch": 0})
    kwargs = dict(num_frames=33, seed=3, show_progress=False, sampler=sampler)
    if sampler == "sliding":
        kwargs["num_inference_steps"] = 2
    seq = pipe.generate("a ball", sampler_options={"window_batch": 1}, **kwargs)
    bat = pipe.generate("a ball", sampler_options={"window_batch": 8}, **kwargs)
    torch.testing.assert_close(bat.latents, seq.latents, atol=1e-5, rtol=1e-5)
    assert bat.stats["model_calls"] < seq.stats["model_calls"]


def test_window_batch_flag_from_the_cli(saved, tmp_path, capsys):
    out = tmp_path / "b.mp4"
    args = ["generate", "--model", saved("wan"), "--num-frames", "33", "--sampler", "sliding", "--steps", "2",
            "--quiet", "--out", str(out)]
    assert main([*args, "--window-batch", "4"]) == 0 and out.exists()
    assert main([*args, "--window-batch", "0"]) == 2
    assert "--window-batch must be >= 1" in capsys.readouterr().err


def test_auto_cap_fits_free_memory():
    gib = 2**30
    assert windows_that_fit(2 * gib, 100 * gib, num_windows=64) == 40  # 80% of 100 GiB / 2 GiB
    assert windows_that_fit(2 * gib, 100 * gib, num_windows=8) == 8
    assert windows_that_fit(50 * gib, 10 * gib, num_windows=8) == 1  # never below one window
    assert windows_that_fit(0, gib, num_windows=5) == 5


def test_cpu_default_is_sequential(pipe):
    batcher = WindowBatcher(GuidedDenoiser(pipe.adapter, *pipe.adapter.encode_prompt(["x"], None)), None)
    xs, sigmas = [torch.zeros(1, 4, 3, 4, 4)] * 3, [torch.full((1, 3), 0.5)] * 3
    batcher(xs, sigmas, [0, 1, 2])
    assert batcher.cap == 1 and batcher.num_calls == 3
