"""Reports: metrics.json and one PNG per metric for several videos; clear errors that name a bad file;
optional learned metrics that load user-supplied weights from a local path only."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from longgen.data.synthetic import render_clip, sample_world
from longgen.eval.metrics import evaluate_frames
from longgen.eval.report import evaluate_videos, feature_consistency, frechet_distance, fvd, i3d_features
from longgen.io import read_video, write_video

GROUPS = ("flicker", "color")  # few metrics: each PNG costs ~0.25 s on a shared CPU
WORLD = sample_world(5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
    """The same synthetic world rendered in order and shuffled, written as mp4 files."""
    root = tmp_path_factory.mktemp("videos")
    frames, _ = render_clip(WORLD, 24, 32, 48)
    good, bad = root / "ordered.mp4", root / "shuffled.mp4"
    write_video(good, [frames], fps=8)
    write_video(bad, [frames[np.random.default_rng(0).permutation(24)]], fps=8)
    return good, bad


def test_metrics_json_and_plots_for_two_videos(two_videos, tmp_path):
    good, bad = two_videos
    out = tmp_path / "report"
    report = evaluate_videos([good, bad], out, window=8, worlds=WORLD, groups=GROUPS)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["videos"]) == {"ordered", "shuffled"}
    metric_names = set(evaluate_frames(read_video(good)[:4], window=8, groups=GROUPS)["metrics"])
    for label, path in (("ordered", good), ("shuffled", bad)):
        video = saved["videos"][label]
        assert video["path"] == os.path.abspath(path)
        assert (video["num_frames"], video["height"], video["width"], video["fps"]) == (24, 32, 48, 8.0)
        assert set(video["metrics"]) == metric_names
        # The report holds exactly what evaluate_frames computes on the decoded frames.
        direct = evaluate_frames(read_video(path), window=8, groups=GROUPS)["metrics"]
        for name, m in video["metrics"].items():
            assert m["positions"] == [3.5, 11.5, 19.5]
            np.testing.assert_allclose(
                np.array(m["values"], dtype=float), np.array(direct[name]["values"], dtype=float), rtol=1e-12
            )
            assert set(m["summary"]) >= {
                "mean",
                "start",
                "end",
                "end_minus_start",
                "slope_per_100_frames",
                "window_drift",
            }
    # Shuffling shows in both the pixel metrics and the synthetic scores.
    o, s = saved["videos"]["ordered"], saved["videos"]["shuffled"]
    assert (
        s["metrics"]["temporal_flicker"]["summary"]["mean"]
        < o["metrics"]["temporal_flicker"]["summary"]["mean"]
    )
    assert (
        s["synthetic"]["scores"]["motion"]["summary"]["mean"]
        < 0.5
        < o["synthetic"]["scores"]["motion"]["summary"]["mean"]
    )

    plots = out / "plots"
    expected = {f"{m}.png" for m in metric_names} | {f"synthetic_{m}.png" for m in o["synthetic"]["scores"]}
    expected |= {"overview.png", "vde.png"}  # the clips have >= 20 frames: LV-Bench VDE per chunk (eval.seams)
    assert set(os.listdir(plots)) == expected
    for name in expected:
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    assert sorted(saved["files"]) == sorted([str(out / "metrics.json")] + [str(plots / n) for n in expected])


def test_labels_keep_same_named_files_apart(two_videos, tmp_path):
    good, _ = two_videos
    twin = tmp_path / "other" / "ordered.mp4"
    twin.parent.mkdir()
    twin.write_bytes(good.read_bytes())
    report = evaluate_videos([good, twin], None, window=8, groups=("flicker",))
    assert len(report["videos"]) == 2 and report["files"] == []
    report = evaluate_videos([good, twin], None, window=8, groups=("flicker",), labels=["full", "sliding"])
    assert list(report["videos"]) == ["full", "sliding"]
    with pytest.raises(ValueError, match="one label per video"):
        evaluate_videos([good, twin], None, labels=["only-one"], groups=("flicker",))


def test_bad_videos_are_clear_errors_naming_the_file(two_videos, tmp_path):
    good, _ = two_videos
    out = tmp_path / "report"
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="garbage.mp4"):
        evaluate_videos([good, garbage], out, groups=("flicker",))
    assert not (out / "metrics.json").exists()  # nothing half-written

    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        evaluate_videos([good, tmp_path / "missing.mp4"], out, groups=("flicker",))

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.mp4.*no frames"):
        evaluate_videos([empty], out, groups=("flicker",))

    # A real mp4 container with zero frames, written by ffmpeg itself.
    import imageio_ffmpeg

    zero = tmp_path / "zero_frames.mp4"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "color=c=black:s=32x32:r=8",
            "-frames:v",
            "0",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            str(zero),
        ],
        check=True,
    )
    assert zero.stat().st_size > 0
    with pytest.raises(ValueError, match=r"zero_frames\.mp4.*no frames"):
        evaluate_videos([zero], out, groups=("flicker",))
    with pytest.raises(ValueError, match="no videos"):
        evaluate_videos([], out)


def test_learned_metrics_say_what_to_pass_when_weights_are_missing(tmp_path):
    clip = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="weights_path=.*DINO.*CLIP"):
        feature_consistency(clip, None)
    with pytest.raises(FileNotFoundError, match="weights_path="):
        feature_consistency(clip, tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="i3d_path=.*i3d_torchscript.pt"):
        fvd([clip, clip], [clip, clip], tmp_path / "i3d_torchscript.pt")


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (4000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(1.0, 1.0, (4000, 3)) * [2.0, 2.0, 1.0]
    # Independent axes: |mu_a - mu_b|^2 + sum (s_a + s_b - 2 sqrt(s_a s_b)) over the sample variances.
    va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
    closed = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(va + vb - 2 * np.sqrt(va * vb))
    # Off-diagonal sample covariances are tiny but not zero: agreement to their order.
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


class StubI3D(torch.nn.Module):
    """Stands in for the I3D TorchScript file: checks the call convention, returns simple statistics."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("expected rescale=False, resize=False, return_features=True")
        if x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("expected [B, 3, T, 224, 224]")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("expected values in [-1, 1]")
        return torch.stack(
            [x.mean(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4)), x[:, 0].mean(dim=(1, 2, 3))], dim=1
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fvd_with_a_local_torchscript_detector(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(StubI3D()).save(str(path))
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 200, (6, 24, 40, 3)).astype(np.uint8) for _ in range(5)]
    feats = i3d_features(real, path)
    assert feats.shape == (5, 3)
    assert fvd(real, real, path) == pytest.approx(0.0, abs=1e-9)
    near = fvd(real, [c + 10 for c in real], path)
    far = fvd(real, [c + 40 for c in real], path)
    assert 0 < near < far
    with pytest.raises(ValueError, match="same number of frames"):
        i3d_features([real[0], real[1][:3]], path)


def test_feature_consistency_with_local_tiny_models(tmp_path):
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    torch.manual_seed(0)
    small = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    Dinov2Model(Dinov2Config(**small)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(**sizes).save_pretrained(tmp_path / "dino")
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=small, projection_dim=8)).save_pretrained(
        tmp_path / "clip"
    )
    CLIPImageProcessor(**sizes).save_pretrained(tmp_path / "clip")

    frames, _ = render_clip(WORLD, 6, 32, 32)
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 255, (6, 32, 32, 3)).astype(np.uint8)
    for model in ("dino", "clip"):
        static = feature_consistency(np.repeat(frames[:1], 4, axis=0), tmp_path / model)
        np.testing.assert_allclose(static["feature_consistency"].values, 1.0, atol=1e-5)
        moving = feature_consistency(noise, tmp_path / model)
        assert moving["feature_consistency"].values.shape == (5,)
        assert moving["feature_consistency"].values.max() < 1.0 - 1e-4, model
        np.testing.assert_allclose(
            moving["feature_sim_first"].values[0], moving["feature_sim_prev"].values[0]
        )
