"""The registered `causal` sampler end to end: pipeline and CLI, equal to the hand-wired rollout."""

import pytest
import torch

from longgen.cli import main
from longgen.io import video_info
from longgen.pipeline import GuidedDenoiser, LongVideoPipeline


def _manual(pipe, prompt, num_frames, chunk, seed=0):
    """apply_block_causal + sample_causal by hand, with the pipeline's own noise and conditioning."""
    from longgen.extend.causal import BlockCausalConfig, apply_block_causal
    from longgen.samplers.causal import CausalSamplerConfig, sample_causal, warped_sigmas

    adapter = pipe.adapter
    shape = adapter.latent_shape(num_frames, *adapter.native_video_size[1:])
    noise = pipe.make_noise(shape, seed)
    cond, uncond = adapter.encode_prompt([prompt], [""], do_classifier_free_guidance=True)
    handle = apply_block_causal(adapter, BlockCausalConfig(chunk_size=chunk))
    try:
        return sample_causal(
            GuidedDenoiser(adapter, cond, uncond, 3.0), noise, warped_sigmas([1000, 750, 500, 250], shift=5.0),
            cache=handle.cache, config=CausalSamplerConfig(), generator=torch.Generator("cpu").manual_seed(seed + 1),
        )
    finally:
        handle.remove()


def test_pipeline_causal_equals_the_hand_wired_rollout_and_removes_its_hooks(saved):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    options = {"chunk_size": 1, "denoising_steps": "1000,750,500,250", "warp_denoising_step": True}
    result = pipe.generate("a red ball", num_frames=17, guidance_scale=3.0, sampler="causal",
                           sampler_options=options, show_progress=False)
    expected = _manual(pipe, "a red ball", 17, 1)
    torch.testing.assert_close(result.latents, expected, rtol=0, atol=1e-6)
    assert result.stats["model_calls"] == 5 * (4 + 1)  # 4 steps + the cache pass per one-frame chunk
    # the hooks were removed after the run: plain full sampling equals a fresh pipeline's
    fresh = LongVideoPipeline.from_pretrained(saved("wan"))
    a = pipe.generate("a red ball", num_frames=9, num_inference_steps=2, show_progress=False).latents
    b = fresh.generate("a red ball", num_frames=9, num_inference_steps=2, show_progress=False).latents
    assert torch.equal(a, b)


def test_causal_step_auto_is_ddim_on_the_schedule_and_renoise_with_distilled_steps(saved):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))

    def run(**options):
        steps = None if "denoising_steps" in options else 3
        return pipe.generate("a red ball", num_frames=9, num_inference_steps=steps, sampler="causal", seed=0,
                             sampler_options={"chunk_size": 1, **options}, show_progress=False).latents

    auto, ddim, renoise = run(), run(causal_step="ddim"), run(causal_step="renoise")
    assert torch.equal(auto, ddim) and not torch.allclose(auto, renoise, atol=1e-4)
    few = {"denoising_steps": "1000,500"}
    assert torch.equal(run(**few), run(causal_step="renoise", **few))
    assert not torch.allclose(run(**few), run(causal_step="ddim", **few), atol=1e-4)


def test_multi_prompt_streaming_recaches_at_the_switch(saved):
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))

    def run(recache):
        return pipe.generate(["a red ball", "a blue cube"], prompt_frames=[0, 9], num_frames=17, sampler="causal",
                             sampler_options={"chunk_size": 1, "recache": recache}, num_inference_steps=2,
                             guidance_scale=1.0, show_progress=False).latents

    with_recache, without = run(True), run(False)
    assert torch.equal(with_recache[:, :, :3], without[:, :, :3])  # before the switch: identical
    assert not torch.allclose(with_recache[:, :, 3:], without[:, :, 3:])  # the rebuilt cache changes the rest


def test_causal_from_the_cli_streams_the_clip(saved, tmp_path):
    out = tmp_path / "causal.mp4"
    rc = main(["generate", "--model", saved("wan"), "--sampler", "causal", "--chunk-size", "1",
               "--local-attn-size", "3", "--sink-size", "1", "--denoising-steps", "1000,750,500,250",
               "--warp-denoising-step", "--num-frames", "33", "--quiet", "--out", str(out)])
    assert rc == 0 and video_info(out)["num_frames"] == 33


@pytest.mark.parametrize(
    "family, args, message",
    [
        ("wan", ["--chunk-size", "3", "--num-frames", "17"], "--chunk-size 3 does not divide"),
        ("wan", ["--chunk-size", "2", "--local-attn-size", "2", "--sink-size", "1"], "--local-attn-size"),
        ("wan", ["--denoising-steps", "250,500"], "--denoising-steps"),
        ("animatediff", ["--chunk-size", "1"], "not supported for UNet motion modules"),
    ],
)
def test_bad_causal_input_is_a_message(saved, tmp_path, capsys, family, args, message):
    rc = main(["generate", "--model", saved(family), "--sampler", "causal", "--steps", "2", "--quiet",
               "--out", str(tmp_path / "x.mp4"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_block_causal_extension_from_the_registry(saved):
    """`--extension block-causal`: identity when one chunk covers the clip, causal (different) otherwise."""
    base = LongVideoPipeline.from_pretrained(saved("wan"))
    plain = base.generate("a red ball", num_frames=17, num_inference_steps=2, show_progress=False).latents
    for chunk, same in ((5, True), (1, False)):
        pipe = LongVideoPipeline.from_pretrained(saved("wan"))
        handle = pipe.apply_extension("block-causal", chunk_size=chunk)
        assert handle.describe()["method"] == "block-causal"
        out = pipe.generate("a red ball", num_frames=17, num_inference_steps=2, show_progress=False).latents
        assert torch.allclose(out, plain, atol=1e-6) is same
        pipe.remove_extensions()
        again = pipe.generate("a red ball", num_frames=17, num_inference_steps=2, show_progress=False).latents
        assert torch.equal(again, plain)


def test_schedule_flags_that_would_be_ignored_are_refused(saved):
    """--warp-denoising-step without --denoising-steps, and sigmas= with denoising_steps, each did nothing."""
    from longgen.pipeline import LongVideoPipeline
    from longgen.samplers.registry import get_sampler

    with pytest.raises(ValueError, match="--warp-denoising-step maps the --denoising-steps"):
        get_sampler("causal").make_knobs({"warp_denoising_step": True})
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))
    with pytest.raises(ValueError, match="sigmas and denoising_steps .* both set the schedule"):
        pipe("a", sampler="causal", num_frames=21, sigmas=[1.0, 0.3, 0.0], show_progress=False,
             sampler_options={"denoising_steps": "1000,500", "chunk_size": 2})
