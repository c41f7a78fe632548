"""``LongVideoPipeline.__call__`` feels like a diffusers pipeline: parity with the stock ``WanPipeline`` (same
prompt, generator, steps -> the same frames for every ``output_type``), batches, ``num_videos_per_prompt``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from longgen.pipeline import LongVideoPipeline, LongVideoPipelineOutput

PROMPT = "a red ball bouncing on the sea"


@pytest.fixture(scope="module")
def pipes(saved):
    """(ours, the stock WanPipeline over the same components) with flow-match Euler, the scheduler whose
    steps a flow sampler reproduces exactly (tests/backbones/test_wan.py)."""
    ours = LongVideoPipeline.from_pretrained(saved("wan"))
    ours.adapter.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock = WanPipeline(**ours.adapter.pipe.components)
    stock.set_progress_bar_config(disable=True)
    return ours, stock


def _sigmas(stock, steps=3):
    stock.scheduler.set_timesteps(steps)
    return stock.scheduler.sigmas.clone()


def _both(pipes, output_type, seeds=(7,), **kwargs):
    ours, stock = pipes
    common = dict(num_inference_steps=3, guidance_scale=5.0, output_type=output_type, **kwargs)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds] if len(seeds) > 1 else (  # noqa: E731
        torch.Generator().manual_seed(seeds[0]))
    with torch.no_grad():
        expected = stock(num_frames=9, height=32, width=32, generator=gens(), **common).frames
    got = ours(generator=gens(), sigmas=_sigmas(stock), show_progress=False, **common)
    assert isinstance(got, LongVideoPipelineOutput)
    return got, expected


def test_np_frames_equal_the_stock_wan_pipeline(pipes):
    got, expected = _both(pipes, "np", prompt=PROMPT)
    assert isinstance(got.frames, np.ndarray) and got.frames.shape == expected.shape == (1, 9, 32, 32, 3)
    np.testing.assert_allclose(got.frames, expected, atol=1e-4, rtol=0)
    assert got.frames.std() > 0.01  # a real clip, not a constant


def test_pt_latent_and_pil_follow_the_stock_layouts(pipes):
    got, expected = _both(pipes, "pt", prompt=PROMPT)
    assert got.frames.shape == expected.shape == (1, 9, 3, 32, 32)
    torch.testing.assert_close(got.frames, expected, atol=1e-4, rtol=0)
    got, expected = _both(pipes, "latent", prompt=PROMPT)
    torch.testing.assert_close(got.frames, expected, atol=1e-5, rtol=0)
    got, expected = _both(pipes, "pil", prompt=PROMPT)
    assert len(got.frames) == len(expected) == 1 and len(got.frames[0]) == len(expected[0]) == 9
    ours, theirs = np.asarray(got.frames[0][4], dtype=int), np.asarray(expected[0][4], dtype=int)
    assert got.frames[0][4].size == expected[0][4].size == (32, 32) and np.abs(ours - theirs).max() <= 1


def test_batch_with_num_videos_per_prompt_equals_stock(pipes):
    prompts = [PROMPT, "a blue square moving left"]
    got, expected = _both(pipes, "np", seeds=(1, 2, 3, 4), prompt=prompts, num_videos_per_prompt=2)
    assert got.frames.shape == expected.shape == (4, 9, 32, 32, 3)
    np.testing.assert_allclose(got.frames, expected, atol=1e-4, rtol=0)
    assert np.abs(got.frames[0] - got.frames[1]).max() > 1e-3  # same prompt, different noise


def test_return_dict_false_and_a_long_sampler_with_mp4s(pipes, tmp_path):
    ours, _ = pipes
    (frames,) = ours(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), return_dict=False,
                     show_progress=False)
    assert frames.shape == (1, 9, 32, 32, 3)
    out = ours([PROMPT, PROMPT], num_frames=17, num_inference_steps=2, sampler="sliding",
               generator=torch.Generator().manual_seed(0), output_path=tmp_path / "c.mp4", save_latents=True,
               show_progress=False)
    assert out.frames.shape == (2, 17, 32, 32, 3)
    assert out.paths == [str(tmp_path / "c_0.mp4"), str(tmp_path / "c_1.mp4")] and out.path == out.paths[0]
    from longgen.io import read_video

    video = read_video(out.paths[1])
    assert video.shape == (17, 32, 32, 3)
    assert np.abs(video / 255.0 - out.frames[1]).mean() < 0.05  # the mp4 holds these frames (lossy codec)
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(out.latents_paths[1])["latents"], out.latents[1:2])


def test_bad_arguments_are_explained(pipes):
    ours, _ = pipes
    with pytest.raises(ValueError, match="output_type must be one of np, pt, pil, latent"):
        ours(PROMPT, output_type="mp4")
    with pytest.raises(ValueError, match="2 generators for 1 videos"):
        ours(PROMPT, num_inference_steps=1, generator=[torch.Generator(), torch.Generator()], show_progress=False)
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        ours(PROMPT, num_videos_per_prompt=0)
    with pytest.raises(ValueError, match="disagree"):
        LongVideoPipeline.from_pretrained("unused", dtype=torch.float16, torch_dtype=torch.float32)


def test_from_pretrained_dtype_to_and_offload_passthrough(saved, monkeypatch):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"), dtype=torch.bfloat16)
    assert pipe.adapter.dtype == torch.bfloat16
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    calls = []
    monkeypatch.setattr(pipe.adapter.pipe, "enable_model_cpu_offload", lambda **kw: calls.append(kw))
    pipe.enable_model_cpu_offload(device="cpu")
    assert calls == [{"gpu_id": None, "device": "cpu"}]


def _gradient_image(size: int):
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 90, np.uint8)], -1)
    return Image.fromarray(rgb)


def test_ltx_image_to_video_equals_the_stock_pipeline(tmp_path, monkeypatch):
    """LTX I2V: the image's latents pinned as the clean first latent frame, as ``LTXImageToVideoPipeline``
    does. The stock pipeline samples the image latent with the generator, longgen takes the distribution's
    mode (deterministic): the stock encoder is switched to the mode here, so the same generator then draws
    the same noise."""
    import diffusers.pipelines.ltx.pipeline_ltx_image2video as stock_module
    from diffusers import LTXImageToVideoPipeline

    from longgen.backbones.ltx import IMAGE_LATENTS, LTXAdapter

    LTXAdapter(LTXAdapter.tiny_pipeline(seed=0, image_to_video=True), native_video_size=(17, 64, 64)).save_pretrained(
        tmp_path
    )  # loaded back: modules in eval mode (the tiny T5 has dropout)
    ours = LongVideoPipeline.from_pretrained(tmp_path)
    adapter = ours.adapter
    assert type(adapter.pipe).__name__ == "LTXImageToVideoPipeline" and adapter.requires_image_condition
    monkeypatch.setattr(stock_module, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode())
    stock = LTXImageToVideoPipeline(**adapter.pipe.components)
    stock.set_progress_bar_config(disable=True)
    image = _gradient_image(64)
    common = dict(prompt=PROMPT, image=image, num_frames=17, height=64, width=64, num_inference_steps=3,
                  guidance_scale=3.0)
    text = dict(max_sequence_length=32)  # the tiny tokenizer's length, which the adapter pads to
    with torch.no_grad():
        packed = stock(generator=torch.Generator().manual_seed(5), output_type="latent", **text, **common).frames
        frames = stock(generator=torch.Generator().manual_seed(5), output_type="np", **text, **common).frames
    expected = stock._unpack_latents(packed, 3, 2, 2, 1, 1)
    got = ours(generator=torch.Generator().manual_seed(5), output_type="latent", show_progress=False, **common).frames
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    first = adapter._image_condition(image, 1, 17, 64, 64)[IMAGE_LATENTS]
    torch.testing.assert_close(got[:, :, :1], first)  # the first frame is the image
    np.testing.assert_allclose(
        ours(generator=torch.Generator().manual_seed(5), show_progress=False, **common).frames, frames, atol=1e-4
    )
    with pytest.raises(ValueError, match="image-to-video pipeline: pass image"):
        ours(PROMPT, num_inference_steps=1, show_progress=False)
    # long clips: windowed samplers pin the image in the window holding frame 0 only (adapter.window_cond)
    long = ours(PROMPT, image=image, num_frames=33, sampler="sliding", num_inference_steps=2, show_progress=False,
                output_type="latent").frames
    assert long.shape[2] == 5
    torch.testing.assert_close(long[:, :, :1], adapter._image_condition(image, 1, 33, 64, 64)[IMAGE_LATENTS],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{"guidance_scale": float("nan")}, {"shift": 0.0}, {"shift": float("inf")},
                                    {"fps": float("nan")}])
def test_non_finite_numbers_are_refused(pipes, kwargs):
    ours, _ = pipes
    with pytest.raises(ValueError, match="finite number"):
        ours.generate("a cat", num_frames=9, num_inference_steps=2, show_progress=False, **kwargs)


@pytest.mark.parametrize(
    "sigmas, message",
    [([0.2, 0.5, 1.0], "strictly descending"), ([1.0, float("nan"), 0.0], r"finite noise levels in \[0, 1\]"),
     ([0.0], "no noise level above 0"), ([], "non-empty 1-D"), ([[1.0, 0.5]], "non-empty 1-D"),
     ([1.5, 0.5], r"in \[0, 1\]"), ("fast", "1-D sequence of numbers")],
    ids=["ascending", "nan", "only-zero", "empty", "2d", "above-one", "text"],
)
def test_bad_sigmas_are_refused(pipes, sigmas, message):
    """The docstring promised 'descending, ending at 0'; ascending or NaN levels used to run (NaN frames)."""
    ours, _ = pipes
    with pytest.raises(ValueError, match=message):
        ours("a cat", num_frames=9, sigmas=sigmas, show_progress=False)


def test_wrong_types_are_named(pipes):
    """Each of these used to fail deep inside torch or the tokenizer (or, a dict prompt, run with its keys)."""
    import numpy as np

    ours, _ = pipes
    cases = [
        (dict(prompt=[]), TypeError, "prompt must be a str or a non-empty list of str, got an empty list"),
        (dict(prompt=5), TypeError, "got int"),
        (dict(prompt={"a": 1}), TypeError, "got dict"),
        (dict(prompt="a", num_frames=9.0), TypeError, "num_frames must be an integer, got 9.0"),
        (dict(prompt="a", num_inference_steps=2.5), TypeError, "num_inference_steps must be an integer"),
        (dict(prompt="a", guidance_scale="5"), TypeError, "guidance_scale must be a number, got '5'"),
        (dict(prompt="a", generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(prompt="a", latents=np.zeros((1, 4, 3, 4, 4))), TypeError, "latents must be a torch.Tensor"),
        (dict(prompt="a", latents=torch.full((1, 4, 3, 4, 4), float("nan"))), ValueError, "NaN or inf"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ours(num_inference_steps=kwargs.pop("num_inference_steps", 2), show_progress=False, **kwargs)
    for seed in ("1", -1, 2**70):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            ours.generate("a", num_frames=9, num_inference_steps=2, seed=seed, show_progress=False)


def test_multi_prompt_starts_in_one_latent_frame_and_several_negatives_are_refused(pipes):
    ours, _ = pipes
    for starts in ([0, 8, 8], [0, 5, 7]):  # the tiny Wan's latent frame 2 holds pixel frames 5-8
        with pytest.raises(ValueError, match="fall in the same latent frame .* at least 4 frames apart"):
            ours.generate(["a", "b", "c"], num_frames=17, num_inference_steps=2, prompt_frames=starts,
                          show_progress=False)
    with pytest.raises(ValueError, match="2 negative prompts for one multi-prompt video"):
        ours.generate(["a", "b"], negative_prompt=["x", "y"], num_frames=17, num_inference_steps=2,
                      prompt_frames=[0, 8], show_progress=False)


def test_freenoise_zero_window_is_refused(pipes):
    ours, _ = pipes
    with pytest.raises(ValueError, match=r"noise_window \(--noise-window\) must be an integer >= 1"):
        ours.generate("a", num_frames=17, num_inference_steps=2, noise="freenoise", noise_window=0,
                      show_progress=False)
