"""Given frames end to end: pixel -> latent positions, continuation of a synthetic ground-truth clip through
LongVideoPipeline with an exact denoiser (scored by the synthetic scorer and the seam metrics), and
``longgen generate --video / --end-video / --frames-at / --mask`` on a tiny Wan (frames, fps, clear errors)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longgen.backbones import FAMILIES, build_tiny
from longgen.backbones.base import BackboneAdapter
from longgen.cli import main
from longgen.conditioning import (
    FrameConditioning,
    GivenFrames,
    OutputFraming,
    encode_given_frames,
    latent_index,
)
from longgen.data.synthetic import render_clip, sample_world
from longgen.eval.seams import seam_report
from longgen.eval.synthetic_score import score_clip
from longgen.io import VideoWriter, read_video, video_info
from longgen.pipeline import LongVideoPipeline


def _write(path, frames, fps=8.0):
    with VideoWriter(path, fps=fps) as writer:
        writer.write(frames)
    return str(path)


# --- pixel frames -> latent frames ----------------------------------------------------------------
class RecordingEncoder:
    """``encode_video`` stand-in for a causal (or per-frame) VAE: latent k = the mean of its pixel frames, and it
    records the pixel frames of every call (to check the fill and warm-up rules)."""

    def __init__(self, tc, causal):
        self.temporal_compression, self.causal_vae = tc, causal
        self.calls = []

    def num_pixel_frames(self, n):
        return self.temporal_compression * (n - 1) + 1 if self.causal_vae else self.temporal_compression * n

    def encode_video(self, frames):  # [1, T, H, W, 3] -> [1, 3, f, H/2, W/2]
        self.calls.append(frames[0, :, 0, 0, 0].tolist())
        tc, x = self.temporal_compression, frames[0].permute(3, 0, 1, 2)  # [3, T, H, W]
        groups = [x[:, :1]] + [x[:, i : i + tc] for i in range(1, x.shape[1], tc)] if self.causal_vae else [
            x[:, i : i + tc] for i in range(0, x.shape[1], tc)]
        z = torch.stack([g.mean(1) for g in groups], dim=1)
        return torch.nn.functional.avg_pool2d(z, 2)[None]


def test_pixel_positions_map_to_latent_frames_and_partial_frames_are_filled():
    assert [latent_index(p, 4, True) for p in (0, 1, 4, 5, 8, 80)] == [0, 1, 1, 2, 2, 20]
    assert [latent_index(p, 1, False) for p in (0, 3)] == [0, 3] and latent_index(7, 4, False) == 1
    enc = RecordingEncoder(4, True)
    frames = torch.arange(7.0)[:, None, None, None].expand(7, 4, 4, 3) / 10  # frame i has value i / 10
    # pixels 0..4 (latents 0, 1 fully), then a keyframe at pixel 10 (latent 3, pixels 9..12: only 10 given)
    given = GivenFrames(frames[[0, 1, 2, 3, 4, 5]], [0, 1, 2, 3, 4, 10])
    cond = encode_given_frames(enc, given, num_latent_frames=4)
    assert cond.positions == (0, 1, 3)
    # run 1: pixels 0..4; run 2 (not at latent 0): its first pixel frame repeated as the causal warm-up
    expected = [[0.0, 0.1, 0.2, 0.3, 0.4], [0.5] * 5]
    assert [[round(v, 3) for v in c] for c in enc.calls] == expected
    assert torch.allclose(cond.latents[0, 0, :, 0, 0], torch.tensor([0.0, 0.25, 0.5]))
    with pytest.raises(ValueError, match="outside the clip"):
        encode_given_frames(enc, given, num_latent_frames=3)
    # a repaint mask: latent cells are kept only where every pixel under them is kept (min-pool)
    repaint = torch.zeros(6, 4, 4)
    repaint[:, 0, 0] = 1.0
    keep = encode_given_frames(enc, GivenFrames(frames[:6], [0, 1, 2, 3, 4, 10], repaint)).keep
    assert keep.shape == (1, 1, 3, 2, 2) and keep[0, 0, :, 0, 0].eq(0).all() and keep[0, 0, :, 1, 1].eq(1).all()
    with pytest.raises(ValueError, match="one mask frame per given frame"):
        GivenFrames(frames[:2], [0, 1], torch.zeros(3, 4, 4))


# --- an exact denoiser on a synthetic world, through the pipeline ---------------------------------
class PixelOracle(BackboneAdapter):
    """Identity "VAE" (latents = 2 * pixels - 1) and the exact x0 of a uniform data set of whole clips; each
    window's frame offset comes through ``window_cond`` (the hook windowed samplers cut conds with)."""

    family = "pixel-oracle"
    temporal_compression, spatial_compression, patch_size = 1, 1, (1, 1, 1)
    causal_vae = False
    default_guidance_scale, default_num_steps = 1.0, 8

    def __init__(self, clips, window):
        super().__init__(SimpleNamespace(transformer=torch.nn.Linear(1, 1)), (window, *clips.shape[-2:]))
        self.clips = clips  # [K, 3, F, H, W] latents

    @classmethod
    def tiny_pipeline(cls, seed=0):
        raise NotImplementedError

    @property
    def latent_channels(self):
        return 3

    def encode_prompt(self, prompt, negative_prompt=None, image=None, **kwargs):
        return {}, None

    def window_cond(self, cond, frame_offset, num_latent_frames):
        return {"offset": frame_offset}

    def denoise(self, x, sigma, cond):
        idx = (torch.arange(x.shape[2]) + cond.get("offset", 0)).clamp(0, self.clips.shape[2] - 1)
        t = self.clips[:, None, :, idx]  # [K, 1, 3, n, H, W]
        s = sigma[None, :, None, :, None, None].clamp_min(1e-2)
        w = torch.softmax(-((x[None] - (1 - s) * t) ** 2 / (2 * s**2)).sum(dim=(2, 3, 4, 5)), dim=0)
        return torch.where((sigma == 0)[:, None, :, None, None], x, (w[:, :, None, None, None, None] * t).sum(0))

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)

    def encode_video(self, frames):
        return frames.permute(0, 4, 1, 2, 3) * 2 - 1


@pytest.mark.parametrize("sampler,options,resample", [
    ("full", {}, 1),
    ("sliding", {"window": 8, "stride": 4}, 4),  # windows past the context need RePaint resampling to agree
    ("df", {"base_num_latent_frames": 12, "overlap_history": 8}, 1),
])
def test_continuing_a_synthetic_clip_keeps_its_objects(sampler, options, resample, tmp_path):
    """Input = world A's first 16 frames; the data set holds A's continuation and another world B. Continuing
    from A's last 8 frames must give A (synthetic score at the seam as high as the input's, no seam jump),
    continuing from B's frames must not (so the check can fail); a colour jump injected at the seam is flagged."""
    worlds = [sample_world(5), sample_world(11)]
    a, _ = render_clip(worlds[0], 40, 48, 48)
    b, _ = render_clip(worlds[1], 40, 48, 48)
    to_latent = lambda v: torch.from_numpy(v).float().permute(3, 0, 1, 2) / 255 * 2 - 1  # noqa: E731
    data = torch.stack([to_latent(a[8:32]), to_latent(b[8:32])])  # output frame j = input frame 8 + j
    pipe = LongVideoPipeline(PixelOracle(data, window=12), device="cpu")
    scores = {}
    for name, source in (("a", a), ("b", b)):
        context = torch.from_numpy(source[8:16]).float() / 255
        out = pipe.generate(num_frames=24, sampler=sampler, sampler_options=options, show_progress=False,
                            conditioning=GivenFrames(context, range(8), resample=resample), output_path=tmp_path / f"{name}.mp4",
                            framing=OutputFraming(head=source[:16], skip=8), fps=8)
        kept = read_video(out.path)
        assert kept.shape[0] == 32  # 16 input frames + 16 new
        scores[name] = score_clip(kept[8:24], worlds[0], window=16)["overall"]
        if name == "a":
            seams = seam_report(kept, {16: "input"})
            jumped = kept.astype(np.int16)
            jumped[16:, ..., 0] += 40
            flagged = seam_report(np.clip(jumped, 0, 255).astype(np.uint8), {16: "input"})
    input_score = score_clip(a[:16], worlds[0], window=16)["overall"]
    assert scores["a"] >= input_score - 0.05, (scores, input_score)
    assert scores["b"] < input_score - 0.2, (scores, input_score)
    assert max(seams["boundaries"][0]["ratio"].values()) < 2.0, seams["boundaries"]
    assert flagged["boundaries"][0]["ratio"]["color"] > 3.0, flagged["boundaries"]


def test_pipeline_refuses_bad_given_frames():
    data = torch.zeros(2, 3, 8, 8, 8)
    pipe = LongVideoPipeline(PixelOracle(data, window=8), device="cpu")
    given = FrameConditioning(torch.rand(1, 3, 2, 8, 8), (0, 5))  # the diffusers-style call takes them too
    latents = pipe(num_frames=8, conditioning=given, output_type="latent", show_progress=False).frames
    assert torch.equal(latents[:, :, [0, 5]], given.latents)
    with pytest.raises(ValueError, match="outside the clip"):
        pipe.generate(num_frames=8, conditioning=FrameConditioning(torch.zeros(1, 3, 1, 8, 8), (8,)),
                      show_progress=False)
    with pytest.raises(ValueError, match="resize them"):
        pipe.generate(num_frames=8, conditioning=GivenFrames(torch.zeros(1, 4, 4, 3), [0]), show_progress=False)
    with pytest.raises(ValueError, match="do not fit"):
        pipe.generate(num_frames=8, conditioning=FrameConditioning(torch.zeros(1, 4, 1, 8, 8), (0,)),
                      show_progress=False)


def test_given_frames_take_uint8_refuse_other_ranges_and_a_clip_with_nothing_left(saved):
    """uint8 frames (what video readers return) used to reach the VAE unscaled (values up to 509), and a bridge
    whose frames fixed every latent frame generated nothing and succeeded."""
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    given = GivenFrames(frames, [0, 1])
    assert given.frames.dtype == torch.float32 and float(given.frames.max()) <= 1.0
    torch.testing.assert_close(given.frames * 255, frames.float())
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got values in \[0, 255\] \(0..255 floats"):
        GivenFrames(frames.float(), [0, 1])
    with pytest.raises(ValueError, match=r"\[-1, 1\] input: \(frames \+ 1\) / 2"):
        GivenFrames(frames.float() / 127.5 - 1, [0, 1])
    with pytest.raises(TypeError, match="torch.from_numpy"):
        GivenFrames(frames.numpy(), [0, 1])
    pipe = LongVideoPipeline.from_pretrained(saved("wan"))  # 9 frames = 3 latent frames: 0 | 1-4 | 5-8
    with pytest.raises(ValueError, match="fill every one of the clip's 3 latent frames.*at least 13"):
        pipe.generate("a", num_frames=9, num_inference_steps=2, show_progress=False,
                      conditioning=GivenFrames(torch.rand(3, 32, 32, 3), [0, 1, 8]))


# --- longgen generate on a tiny Wan ---------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("given")
    world = sample_world(5)
    clip, _ = render_clip(world, 21, 32, 32)
    mask = np.zeros_like(clip)
    mask[:, :, 16:] = 255  # repaint the right half
    from PIL import Image

    Image.fromarray(clip[0]).save(root / "first.png")
    Image.fromarray(mask[0]).save(root / "mask.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "small.png")
    (root / "broken.mp4").write_bytes(b"not a video")
    return {"video": _write(root / "in.mp4", clip, fps=10), "mask": _write(root / "mask.mp4", mask),
            "first": str(root / "first.png"), "mask_png": str(root / "mask.png"), "small": str(root / "small.png"),
            "broken": str(root / "broken.mp4"), "root": root}


def _generate(model, out, *flags):
    return main(["generate", "--model", model, "--steps", "2", "--prompt", "shapes", "--out", str(out), "--quiet",
                 *flags])


@pytest.mark.slow
def test_cli_continue_bridge_keyframes_and_repaint(saved, inputs, capsys):
    """Continue with --keep-input (one mp4: input + new frames at the input's fps), a transition, keyframes with
    the causal sampler, and a repaint whose kept half stays within the tiny VAE's reconstruction error."""
    from longgen.backbones import load_adapter

    model, root = saved("wan"), inputs["root"]
    out = root / "cont.mp4"
    assert _generate(model, out, "--video", inputs["video"], "--context-frames", "5", "--num-frames", "17",
                     "--keep-input", "--sampler", "fifo", "--steps", "8", "--window", "2", "--num-partitions", "4") == 0
    assert "17 frames (33 with the input kept)" in capsys.readouterr().out
    info = video_info(out)
    assert info["num_frames"] == 21 + 12 and info["fps"] == pytest.approx(10, abs=0.01)
    assert _generate(model, root / "bridge.mp4", "--video", inputs["video"], "--end-video", inputs["video"],
                     "--context-frames", "5", "--num-frames", "17", "--sampler", "df", "--overlap-history", "1") == 0
    assert _generate(model, root / "keys.mp4", "--frames-at", f"0:{inputs['first']}", f"16:{inputs['first']}",
                     "--num-frames", "17", "--sampler", "causal", "--chunk-size", "1") == 0
    assert video_info(root / "keys.mp4")["num_frames"] == 17
    rep = root / "repaint.mp4"
    assert _generate(model, rep, "--video", inputs["video"], "--mask", inputs["mask"], "--sampler", "sliding",
                     "--save-latents") == 0
    original = read_video(inputs["video"]).astype(np.float32)
    repainted = read_video(rep).astype(np.float32)
    assert repainted.shape == original.shape  # as long as the input (21 = 4k + 1)
    adapter = load_adapter(model)
    with torch.no_grad():
        latents = adapter.encode_video(torch.from_numpy(original / 255)[None])
        recon = adapter.decode(latents)[0].numpy() * 255
    kept = (slice(None), slice(None), slice(0, 12))  # the kept half, away from the latent cells on the border
    err_kept = np.abs(repainted[kept] - original[kept]).mean()
    err_vae = np.abs(recon[kept] - original[kept]).mean()
    assert err_kept <= err_vae + 4.0, (err_kept, err_vae)  # uint8 units; mp4 coding adds a little
    # in latent space the kept cells are the input's encoding exactly (the pixel error above is then the VAE's)
    from safetensors.torch import load_file

    from longgen.given_io import GivenInputs, plan_given_frames

    saved_latents = load_file(str(root / "repaint.latents.safetensors"))["latents"]
    plan = plan_given_frames(GivenInputs(video=inputs["video"], mask=inputs["mask"]), adapter, None, None, None)
    with torch.no_grad():
        given = encode_given_frames(adapter, plan.given)
    keep = given.keep.expand_as(saved_latents) > 0
    assert keep[..., :2].all() and not keep[..., 2:].any()  # latent columns under the kept / repainted half
    assert torch.equal(saved_latents[keep], given.latents[keep])
    assert (saved_latents[~keep] - given.latents[~keep]).abs().mean() > 0.1


@pytest.mark.slow
def test_cli_given_frames_bad_inputs_are_clear_errors(saved, inputs, capsys):
    model, root = saved("wan"), inputs["root"]
    out = root / "bad.mp4"
    cases = [
        (["--video", inputs["broken"]], "not a readable video"),
        (["--video", str(root / "missing.mp4")], "does not exist"),
        (["--video", inputs["video"], "--context-frames", "30"], "fewer than the 30 context frames"),
        (["--video", inputs["video"], "--mask-image", inputs["small"]], "must have the video's size"),
        (["--video", inputs["video"], "--mask", inputs["mask"], "--num-frames", "25"], "longer than --video"),
        (["--frames-at", f"40:{inputs['first']}", "--num-frames", "17"], "outside the clip"),
        (["--frames-at", "first.png"], "FRAME:IMAGE"),
        (["--keep-input"], "give it with --video"),
        (["--end-video", inputs["video"]], "also give its start with --video"),
        (["--video", inputs["video"], "--mask-box", "0,0,99,8"], "inside the 32x32 output"),
        (["--video", inputs["video"], "--context-frames", "5", "--num-frames", "5"], "leaves none to generate"),
        (["--video", str(root)], "is a folder: pass a file inside it"),
        (["--context-frames", "5"], "--context-frames sets how many frames of --video start the clip"),
        (["--video", inputs["video"], "--mask", inputs["mask"], "--context-frames", "5"], "drop --context-frames"),
        (["--resample-steps", "4"], "--resample-steps re-noises around given frames"),
        (["--video", inputs["video"], "--num-frames", "21", "--sampler", "df", "--resample-steps", "4"],
         "which the 'df' sampler does not run: use --sampler full or sliding"),
        (["--video", inputs["video"], "--end-video", inputs["video"], "--context-frames", "5", "--num-frames", "13"],
         "nothing is left to generate"),
    ]
    for flags, message in cases:
        assert _generate(model, out, *flags) == 2, flags
        assert message in capsys.readouterr().err, (flags, message)
    assert not out.exists()


def test_generate_help_explains_the_given_frame_flags(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--video", "--end-video", "--context-frames", "--keep-input", "--frames-at", "--mask",
                 "--mask-image", "--mask-box", "--outpaint", "--resample-steps", "--given-level"):
        assert flag in text, flag


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_backbone_keeps_given_pixel_frames(family):
    """Each family's VAE encodes the given frames once and its denoiser runs with them: the output latents at the
    given positions are those encodings exactly (two steps of the plain sampler, the model's native clip)."""
    adapter = build_tiny(family)
    pipe = LongVideoPipeline(adapter, device="cpu")
    n, h, w = adapter.native_video_size
    frames = torch.rand(2, h, w, 3, generator=torch.Generator().manual_seed(0))
    given = GivenFrames(frames, [0, n - 1])
    image = None
    if adapter.requires_image_condition:
        from PIL import Image

        image = Image.new("RGB", (w, h), (200, 40, 40))
    out = pipe.generate("a ball", image=image, num_inference_steps=2, conditioning=given, show_progress=False)
    with torch.no_grad():
        expected = encode_given_frames(adapter, given)
    assert expected.positions == (0, adapter.num_latent_frames(n) - 1)
    torch.testing.assert_close(out.latents[:, :, list(expected.positions)], expected.latents, atol=0, rtol=0)


def test_image_to_video_windows_pin_the_image_in_the_first_window_only():
    """Wan I2V on long clips: the clip's first-frame mask and image latents, cut to each window."""
    from longgen.backbones.wan import CONDITION_LATENTS, WanAdapter

    adapter = WanAdapter(WanAdapter.tiny_pipeline(image_to_video=True), native_video_size=(9, 32, 32))
    from PIL import Image

    cond, _ = adapter.encode_prompt(["a ball"], None, image=Image.new("RGB", (32, 32), (200, 40, 40)),
                                    do_classifier_free_guidance=False, num_frames=17, height=32, width=32)
    full = cond[CONDITION_LATENTS]  # [B, tc + C, 5, h, w]: frame 0's mask channels set
    tc = adapter.temporal_compression
    first, later = adapter.window_cond(cond, 0, 3), adapter.window_cond(cond, 2, 3)
    assert torch.equal(first[CONDITION_LATENTS], full[:, :, 0:3]) and torch.equal(later[CONDITION_LATENTS], full[:, :, 2:5])
    assert first[CONDITION_LATENTS][:, :tc, 0].eq(1).all() and later[CONDITION_LATENTS][:, :tc].eq(0).all()
    assert adapter.window_cond(cond, 0, 5) is cond
    pipe = LongVideoPipeline(adapter, device="cpu")  # a long clip with windows runs (it used to be refused)
    out = pipe.generate("a ball", image=Image.new("RGB", (32, 32), (200, 40, 40)), num_frames=17, sampler="sliding",
                        num_inference_steps=1, show_progress=False)
    assert out.latents.shape[2] == 5


def test_an_end_video_at_another_frame_rate_is_warned_about(saved, inputs, caplog):
    import logging

    out = inputs["root"] / "bridge.mp4"
    with caplog.at_level(logging.WARNING, logger="longgen.given_io"):
        assert _generate(saved("wan"), out, "--video", inputs["video"], "--end-video", inputs["mask"],
                         "--context-frames", "5", "--num-frames", "21") == 0
    assert "--end-video runs at 8 fps and --video at 10" in caplog.text
    assert out.exists()
