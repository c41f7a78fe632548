"""Synthetic bouncing-shapes world: exact rendering, the data set writer, and the model-free scorer
(near-perfect on ground truth read back from mp4, low on shuffled or corrupted clips)."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from longgen.data.synthetic import (
    PALETTE,
    ShapeSpec,
    WorldSpec,
    load_manifest,
    render_clip,
    sample_world,
    trajectories,
    write_synthetic_dataset,
)
from longgen.eval.synthetic_score import detect_objects, score_clip
from longgen.io import read_video, write_video

NUM_FRAMES, HEIGHT, WIDTH = 48, 48, 64
WORLD = sample_world(7)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """Ground-truth clip, its centres, and the same clip after an mp4 round trip."""
    frames, centres = render_clip(WORLD, NUM_FRAMES, HEIGHT, WIDTH)
    path = tmp_path_factory.mktemp("truth") / "truth.mp4"
    write_video(path, [frames], fps=8)
    return frames, centres, read_video(path)


def means(result):
    return {name: s["summary"]["mean"] for name, s in result["scores"].items()}


def test_sample_world_is_deterministic_and_valid():
    assert sample_world(3) == sample_world(3)
    assert sample_world(3) != sample_world(4)
    world = sample_world(11, num_objects=4)
    assert len(world.shapes) == 4
    assert len({s.color for s in world.shapes}) == 4
    assert [s.size for s in world.shapes] == sorted((s.size for s in world.shapes), reverse=True)
    assert WorldSpec.from_dict(json.loads(json.dumps(world.to_dict()))) == world


def test_world_validation_names_the_fix():
    shape = ShapeSpec("circle", "red", 0.1, (0.5, 0.5), (0.01, 0.0))
    with pytest.raises(ValueError, match="colours must differ"):
        WorldSpec((shape, shape))
    with pytest.raises(ValueError, match="unknown colour"):
        dataclasses.replace(shape, color="mauve")
    with pytest.raises(ValueError, match="unknown shape"):
        dataclasses.replace(shape, shape="hexagon")
    with pytest.raises(ValueError, match="unknown world keys"):
        WorldSpec.from_dict({"shapes": [], "objects": []})


def test_render_is_exact_constant_velocity_with_elastic_bounces():
    frames, centres = render_clip(WORLD, NUM_FRAMES, HEIGHT, WIDTH)
    again, _ = render_clip(WORLD, NUM_FRAMES, HEIGHT, WIDTH)
    np.testing.assert_array_equal(frames, again)
    assert frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    # A window of a longer clip is that slice of it, exactly.
    window, window_centres = render_clip(WORLD, 8, HEIGHT, WIDTH, first_frame=20)
    np.testing.assert_array_equal(window, frames[20:28])
    np.testing.assert_allclose(window_centres, centres[20:28])
    for k, s in enumerate(WORLD.shapes):
        r = s.radius_px(HEIGHT, WIDTH)
        x, y = centres[:, k, 0], centres[:, k, 1]
        assert x.min() >= r - 1e-9 and x.max() <= WIDTH - r + 1e-9
        assert y.min() >= r - 1e-9 and y.max() <= HEIGHT - r + 1e-9
    # The top-most object (drawn last) shows its pure colour at its centre pixel.
    cx, cy = centres[0, -1]
    np.testing.assert_array_equal(frames[0, int(cy), int(cx)], PALETTE[WORLD.shapes[-1].color])
    # One object bouncing off the right wall: u = 0.9, 0.95, 1.0, 0.95, 0.9 of its travel range.
    one = WorldSpec((ShapeSpec("square", "green", 0.1, (0.9, 0.5), (0.05, 0.0)),))
    track = trajectories(one, 5, 40, 40)[:, 0, 0]
    r = 4.0
    np.testing.assert_allclose((track - r) / (40 - 2 * r), [0.9, 0.95, 1.0, 0.95, 0.9], atol=1e-12)


def test_ground_truth_mp4_scores_near_perfect(truth):
    frames, centres, decoded = truth
    raw = means(score_clip(frames, WORLD, window=16))
    for name in ("count", "color", "size", "motion", "speed_stability", "speed_vs_spec"):
        assert raw[name] > 0.97, (name, raw)
    result = score_clip(decoded, WORLD, window=16)
    got = means(result)
    assert got["count"] > 0.98, got
    assert got["motion"] > 0.95, got
    assert got["speed_stability"] > 0.95 and got["speed_vs_spec"] > 0.95, got
    assert got["color"] > 0.9 and got["size"] > 0.9, got
    assert result["overall"] > 0.95
    assert got["motion_residual_px"] < 0.5
    # No drift in the truth: every window of the overall score is high.
    assert min(result["scores"]["overall"]["values"]) > 0.9
    # Detected centres are the drawn ones to sub-pixel accuracy where objects are apart.
    det = detect_objects(decoded, WORLD)
    clean = det.found & ~det.contact
    assert clean.mean() > 0.5
    err = np.linalg.norm(det.centers - centres, axis=-1)[clean]
    assert err.max() < 0.6 and err.mean() < 0.25


def test_shuffled_clip_scores_low(truth):
    _, _, decoded = truth
    good = score_clip(decoded, WORLD, window=16)
    perm = np.random.default_rng(0).permutation(NUM_FRAMES)
    bad = score_clip(decoded[perm], WORLD, window=16)
    assert means(bad)["motion"] < 0.3
    assert means(bad)["motion_residual_px"] > 5 * means(good)["motion_residual_px"]
    assert bad["overall"] < good["overall"] - 0.15
    # The objects themselves are intact: shuffling only breaks the motion.
    assert means(bad)["count"] > 0.98


def test_corrupted_clips_score_low_and_the_drift_shows(truth):
    frames, _, _ = truth
    half = NUM_FRAMES // 2
    good = means(score_clip(frames, WORLD, window=8))

    # An object vanishes half-way: count, colour and size fall at the end, not at the start.
    vanished_world = WorldSpec(WORLD.shapes[1:], WORLD.background)
    vanished = frames.copy()
    vanished[half:] = render_clip(vanished_world, NUM_FRAMES - half, HEIGHT, WIDTH, first_frame=half)[0]
    res = score_clip(vanished, WORLD, window=8)
    for name in ("count", "color", "size"):
        s = res["scores"][name]["summary"]
        assert s["start"] > 0.95 and s["end"] < 0.8, (name, s)
        assert s["end_minus_start"] < -0.15 and s["slope_per_100_frames"] < 0, (name, s)

    # Colours drift: every pixel's blue channel rises by up to 120 grey levels.
    drift = frames.astype(np.int16)
    drift[..., 2] += np.linspace(0, 120, NUM_FRAMES).astype(np.int16)[:, None, None]
    res = score_clip(np.clip(drift, 0, 255).astype(np.uint8), WORLD, window=8)
    s = res["scores"]["color"]["summary"]
    assert s["start"] > 0.85 and s["end"] < 0.3, s
    assert res["overall"] < good["overall"] - 0.1

    # Objects shrink to 40% of their radius: size falls over time.
    shrunk = np.stack(
        [
            render_clip(
                WorldSpec(
                    tuple(
                        dataclasses.replace(o, size=o.size * (1 - 0.6 * t / (NUM_FRAMES - 1)))
                        for o in WORLD.shapes
                    )
                ),
                1,
                HEIGHT,
                WIDTH,
                first_frame=t,
            )[0][0]
            for t in range(NUM_FRAMES)
        ]
    )
    s = score_clip(shrunk, WORLD, window=8)["scores"]["size"]["summary"]
    assert s["start"] > 0.8 and s["end"] < 0.2 and s["slope_per_100_frames"] < -1.0, s

    # Motion dies out half-way (the last frame repeats): speed stability falls to 0 at the end.
    frozen = frames.copy()
    frozen[half:] = frames[half]
    s = score_clip(frozen, WORLD, window=8)["scores"]["speed_stability"]["summary"]
    assert s["start"] > 0.9 and s["end"] < 0.1, s

    # A duplicated object (a copy of the clip's objects, shifted) breaks the count.
    doubled = np.maximum(frames, np.roll(frames, WIDTH // 2, axis=2))
    assert means(score_clip(doubled, WORLD, window=8))["count"] < 0.7


def test_dataset_writer_writes_readable_mp4s_captions_and_manifest(tmp_path, monkeypatch):
    import longgen.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "RENDER_CHUNK", 5)  # 12 frames in chunks of 5, 5 and 2
    manifest = write_synthetic_dataset(
        tmp_path / "data", num_videos=2, num_frames=12, height=32, width=32, fps=8, seed=3
    )
    assert os.path.basename(manifest) == "manifest.jsonl"
    lines = open(manifest).read().splitlines()
    assert len(lines) == 2
    records = load_manifest(manifest)
    for rec in records:
        frames = read_video(rec["video"])
        assert frames.shape == (12, 32, 32, 3)
        caption = open(rec["caption_file"]).read().strip()
        assert caption == rec["caption"] == rec["world"].caption()
        assert rec["world"] == sample_world(rec["world_seed"])
        for shape in rec["world"].shapes:
            assert f"{shape.color} {shape.shape}" in caption
        # The stored clip is the world's rendering (up to H.264 loss).
        truth, _ = render_clip(rec["world"], 12, 32, 32)
        assert np.abs(frames.astype(int) - truth).mean() < 4.0
        assert score_clip(frames, rec["world"], window=6)["overall"] > 0.85
    # Deterministic in the seed.
    again = write_synthetic_dataset(
        tmp_path / "again", num_videos=2, num_frames=12, height=32, width=32, fps=8, seed=3
    )
    assert open(again).read() == open(manifest).read()


def test_short_captions_keep_every_world_word_and_drop_the_boilerplate(tmp_path):
    from longgen.data.synthetic import ensure_synthetic_dataset
    from longgen.training.config import ConfigError, load_config

    world = sample_world(1, num_objects=3)
    full, short = world.caption(), world.caption("short")
    assert short.startswith("3 shapes: ") and "bounces" not in short and "background" not in short
    for s in world.shapes:
        assert f"{s.size_word()} {s.color} {s.shape}" in short and f"{s.color} {s.shape}" in full
    assert sample_world(2, num_objects=1).caption("short").startswith("1 shape: ")
    with pytest.raises(ValueError, match="caption style"):
        world.caption("long")
    # The data set writes the configured style, and a folder written in the other style is rewritten.
    config = load_config(None, ["data.synthetic.num_videos=2", "data.synthetic.num_frames=3"])
    folder = tmp_path / "data"
    ensure_synthetic_dataset(folder, config.data)
    assert load_manifest(folder / "manifest.jsonl")[0]["caption"].endswith("edges.")
    short_config = load_config(None, ["data.synthetic.num_videos=2", "data.synthetic.num_frames=3",
                                      "data.synthetic.caption_style=short"])
    ensure_synthetic_dataset(folder, short_config.data)
    records = load_manifest(folder / "manifest.jsonl")
    assert [r["caption"] for r in records] == [r["world"].caption("short") for r in records]
    assert open(records[0]["caption_file"]).read().strip() == records[0]["caption"]
    with pytest.raises(ConfigError, match="caption_style"):
        load_config(None, ["data.synthetic.caption_style=long"])
    with pytest.raises(ConfigError, match="set data.synthetic.num_frames=9"):
        load_config(None, ["data.synthetic.caption_style=position", "data.synthetic.num_frames=33"])
    assert load_config(None, ["data.synthetic.caption_style=position", "data.synthetic.num_frames=9"])


def test_position_captions_say_where_each_object_is_and_heads_at_frame_0():
    """The words of a ``position`` caption agree with the rendered first frames: the object's centre lies in the
    named third of the frame, and it moves within 45 degrees of the named direction."""
    import re

    checked = 0
    for seed in range(30):
        world = sample_world(seed, num_objects=(1, 3))
        caption = world.caption("position")
        assert caption.startswith(f"{len(world.shapes)} shape")
        _, centres = render_clip(world, 2, 48, 48)
        for k, s in enumerate(world.shapes):
            m = re.search(rf"{s.color} {s.shape} at ([a-z ]+?) moving ([a-z ]+?) (quickly|slowly)", caption)
            assert m, caption
            place, heading = m.group(1).split(), m.group(2).split()
            r = s.radius_px(48, 48)
            u = (centres[0, k] - r) / (48 - 2 * r)  # travel-range coordinates of frame 0
            for word, axis, low in (("left", 0, True), ("right", 0, False), ("top", 1, True), ("bottom", 1, False)):
                if word in place:
                    assert (u[axis] < 1 / 3) if low else (u[axis] > 2 / 3), (caption, word, u)
            if place == ["middle"]:
                assert np.all(np.abs(u - 0.5) <= 1 / 6 + 1e-9), (caption, u)
            step = centres[1, k] - centres[0, k]
            if np.allclose(u, world.shapes[k].position) and np.all((u > 0.05) & (u < 0.95)):  # no bounce
                want = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
                direction = np.sum([want[w] for w in heading], axis=0, dtype=float)
                cos = step @ direction / (np.linalg.norm(step) * np.linalg.norm(direction))
                assert cos >= math.cos(math.radians(45)) - 1e-9, (caption, step, heading)
                checked += 1
    assert checked > 30


def test_world_knobs_of_the_data_config_reach_the_worlds(tmp_path):
    from longgen.data.synthetic import ensure_synthetic_dataset
    from longgen.training.config import ConfigError, load_config

    config = load_config(None, ["data.synthetic.num_videos=3", "data.synthetic.num_frames=2",
                                "data.synthetic.size_range=[0.13,0.14]", "data.synthetic.num_objects=[1,1]"])
    ensure_synthetic_dataset(tmp_path, config.data)
    for rec in load_manifest(tmp_path / "manifest.jsonl"):
        assert len(rec["world"].shapes) == 1 and 0.13 <= rec["world"].shapes[0].size <= 0.14
    with pytest.raises(ConfigError, match="size_range"):
        load_config(None, ["data.synthetic.size_range=[0.2,0.1]"])
    with pytest.raises(ConfigError, match="num_objects"):
        load_config(None, ["data.synthetic.num_objects=[0,8]"])
    # A smaller palette: every world's colours come from it, and a changed palette rewrites the data set.
    rgbw = load_config(None, ["data.synthetic.num_videos=6", "data.synthetic.num_frames=2",
                              "data.synthetic.colors=[red,green,blue,white]"])
    ensure_synthetic_dataset(tmp_path, rgbw.data)
    records = load_manifest(tmp_path / "manifest.jsonl")
    assert len(records) == 6 and {s.color for r in records for s in r["world"].shapes} <= {"red", "green", "blue", "white"}
    # The default palette draws the worlds it drew before `colors` existed (read off the code of 8e685d7).
    assert [(x.color, x.shape) for x in sample_world(5).shapes] == [("magenta", "square"), ("cyan", "circle"),
                                                                    ("green", "circle")]
    assert sample_world(0).shapes[0].position == pytest.approx((0.9337689099568427, 0.684050448075033))
    with pytest.raises(ConfigError, match="add colours or lower num_objects"):
        load_config(None, ["data.synthetic.colors=[red,green]"])
    with pytest.raises(ConfigError, match="distinct palette colours"):
        load_config(None, ["data.synthetic.colors=[red,pink,blue]"])
    with pytest.raises(ValueError, match="distinct palette colours"):
        sample_world(0, colors=["red", "red", "blue"])
