"""VideoClipDataset: metadata layouts, frame sampling, crops, determinism, bad files, buckets.

Every test that decodes runs once per reader (torchcodec, decord, PyAV): the data set must behave the
same whichever backend decodes, malformed files included.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os

import numpy as np
import pytest
import torch

from longgen.data.video import (
    BucketSampler,
    VideoClipDataset,
    clip_frame_indices,
    collate_clips,
    resize_center_crop,
)
from longgen.io import VIDEO_BACKENDS, backend_error, write_video

SIZE = 32


def _value(k: int) -> int:
    return 8 + 4 * k  # frame index -> flat grey level (H.264 keeps flat frames exact)


def _write_indexed(path, num_frames: int, fps: float, height: int = SIZE, width: int = SIZE) -> None:
    levels = np.array([_value(k) for k in range(num_frames)], dtype=np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3))
    write_video(path, [np.ascontiguousarray(frames)], fps=fps)


def _indices(video: torch.Tensor) -> list[int]:
    """Frame indices encoded in a clip [T, H, W, 3] in [0, 1]."""
    levels = (video * 255).mean(dim=(1, 2, 3))
    return [round((float(v) - 8) / 4) for v in levels]


@pytest.fixture(params=[b for b in VIDEO_BACKENDS if b != "auto"])
def backend(request) -> str:
    error = backend_error(request.param)
    if error is not None:
        # torchcodec's PyPI wheel is built against PyTorch's CUDA build: with the CPU build of torch its
        # native library does not load. The README's set-up says how to get one that does.
        pytest.skip(f"{request.param} does not load in this environment: {error}")
    return request.param


@pytest.fixture
def make_dataset(backend):
    """VideoClipDataset with the parametrised reader."""
    return functools.partial(VideoClipDataset, video_backend=backend)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    _write_indexed(root / "long.mp4", 50, fps=24)
    _write_indexed(root / "fps30.mp4", 40, fps=30)
    _write_indexed(root / "short.mp4", 3, fps=24)
    (root / "bad.mp4").write_bytes(b"\x00not a video" * 100)
    for name in ("long", "fps30", "short", "bad"):
        (root / f"{name}.txt").write_text(f"caption of {name}\n")
    return root


def _by_name(dataset: VideoClipDataset) -> dict[str, int]:
    return {os.path.basename(r.path): i for i, r in enumerate(dataset.records)}


def test_folder_skips_and_counts_bad_files(make_dataset, folder, caplog):
    with caplog.at_level(logging.WARNING, logger="longgen.data.video"):
        dataset = make_dataset(str(folder), num_frames=5, height=SIZE, width=SIZE, random_start=False)
    assert sorted(_by_name(dataset)) == ["fps30.mp4", "long.mp4"]
    assert dataset.skipped == {"unreadable": 1, "too_short": 1}
    # logged once each, with the path
    assert sum(str(folder / "bad.mp4") in r.getMessage() for r in caplog.records) == 1
    assert sum(str(folder / "short.mp4") in r.getMessage() for r in caplog.records) == 1
    item = dataset[_by_name(dataset)["long.mp4"]]
    assert item["caption"] == "caption of long"
    assert item["path"].endswith("long.mp4")
    assert item["video"].dtype == torch.float32 and item["video"].shape == (5, SIZE, SIZE, 3)


def test_frame_stride_reads_the_right_frames(make_dataset, folder):
    dataset = make_dataset(
        str(folder), num_frames=6, height=SIZE, width=SIZE, frame_stride=3, random_start=False
    )
    i = _by_name(dataset)["long.mp4"]
    assert _indices(dataset[i]["video"]) == [0, 3, 6, 9, 12, 15]


def test_target_fps_derives_the_stride_from_each_file(make_dataset, folder):
    dataset = make_dataset(
        str(folder), num_frames=5, height=SIZE, width=SIZE, target_fps=8, random_start=False
    )
    names = _by_name(dataset)
    assert _indices(dataset[names["long.mp4"]]["video"]) == [0, 3, 6, 9, 12]  # 24 fps -> step 3
    assert _indices(dataset[names["fps30.mp4"]]["video"]) == [0, 3, 7, 11, 15]  # 30 fps -> step 3.75
    assert clip_frame_indices(2, 5, 2.5) == [2, 4, 7, 9, 12]


def test_random_start_is_deterministic_in_seed_and_epoch(make_dataset, folder):
    def starts(seed: int, epoch: int) -> list[int]:
        ds = make_dataset(str(folder), num_frames=4, height=SIZE, width=SIZE, frame_stride=2, seed=seed)
        ds.set_epoch(epoch)
        i = _by_name(ds)["long.mp4"]
        return [ds.clip_indices(i)[0]] + [ds.clip_indices(j)[0] for j in range(len(ds))]

    assert starts(0, 0) == starts(0, 0)
    assert starts(0, 0) != starts(0, 1) or starts(0, 0) != starts(1, 0)
    ds = make_dataset(str(folder), num_frames=4, height=SIZE, width=SIZE, frame_stride=2, seed=3)
    i = _by_name(ds)["long.mp4"]
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        idx = ds.clip_indices(i)
        assert idx == list(range(idx[0], idx[0] + 8, 2)) and 0 <= idx[0] <= 50 - 7
        seen.add(idx[0])
    assert len(seen) > 3  # the start really moves
    ds.set_epoch(5)
    assert _indices(ds[i]["video"]) == ds.clip_indices(i)  # the decoded frames are the drawn ones


def test_resize_and_center_crop():
    # scale 1 along the fitting side: the crop is exact, columns 2..5 of 8
    frames = torch.arange(8.0).view(1, 1, 8, 1).expand(2, 4, 8, 3) / 10
    out = resize_center_crop(frames, 4, 4)
    assert out.shape == (2, 4, 4, 3)
    assert torch.equal(out[0, 0, :, 0], torch.tensor([0.2, 0.3, 0.4, 0.5]))
    # a tall target from a wide frame: the height is scaled to fit, the width cropped
    wide = torch.rand(3, 20, 40, 3)
    assert resize_center_crop(wide, 24, 16).shape == (3, 24, 16, 3)


def test_clip_size_from_a_different_aspect(make_dataset, tmp_path):
    _write_indexed(tmp_path / "wide.mp4", 9, fps=16, height=32, width=64)
    (tmp_path / "wide.txt").write_text("wide")
    dataset = make_dataset(str(tmp_path), num_frames=9, height=16, width=24)
    video = dataset[0]["video"]
    assert video.shape == (9, 16, 24, 3)
    assert 0.0 <= float(video.min()) and float(video.max()) <= 1.0
    assert _indices(video) == list(range(9))


def test_csv_and_jsonl_manifests_with_start_and_end(make_dataset, folder, tmp_path):
    rows = [
        {"path": str(folder / "long.mp4"), "caption": "abs path", "start": "10", "end": "20"},
        {
            "path": os.path.relpath(folder / "fps30.mp4", tmp_path),
            "caption": "relative",
            "start": "",
            "end": "",
        },
        {"path": str(folder / "long.mp4"), "caption": "span too short", "start": "45", "end": ""},
    ]
    csv_path = tmp_path / "meta.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "start", "end"])
        writer.writeheader()
        writer.writerows(rows)
    jsonl_path = tmp_path / "meta.jsonl"
    with open(jsonl_path, "w") as f:
        for row in rows:
            row = dict(
                row,
                start=int(row["start"]) if row["start"] else None,
                end=int(row["end"]) if row["end"] else None,
            )
            f.write(json.dumps(row) + "\n")
    for source in (csv_path, jsonl_path):
        ds = make_dataset(str(source), num_frames=5, height=SIZE, width=SIZE, frame_stride=2)
        assert [r.caption for r in ds.records] == ["abs path", "relative"]
        assert ds.skipped == {"too_short": 1}
        assert (ds.records[0].start, ds.records[0].end) == (10, 20)
        for epoch in range(6):
            ds.set_epoch(epoch)
            idx = _indices(ds[0]["video"])
            assert idx[0] >= 10 and idx[-1] < 20 and np.all(np.diff(idx) == 2)
        assert _indices(ds[1]["video"])[-1] < 40


def test_synthetic_manifest_and_collate(make_dataset, tmp_path):
    from longgen.data.synthetic import write_synthetic_dataset

    manifest = write_synthetic_dataset(tmp_path / "syn", num_videos=2, num_frames=9, height=32, width=32)
    ds = make_dataset(manifest, num_frames=9, height=32, width=32)
    batch = collate_clips([ds[0], ds[1]])
    assert batch["video"].shape == (2, 9, 32, 32, 3)
    assert len(batch["caption"]) == 2 and all(batch["caption"])


def test_no_usable_video_names_source_and_reasons(make_dataset, folder):
    with pytest.raises(ValueError, match=r"no usable videos.*too_short: 3.*unreadable: 1"):
        make_dataset(str(folder), num_frames=200, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="not both"):
        make_dataset(str(folder), num_frames=5, height=SIZE, width=SIZE, frame_stride=2, target_fps=8)


def test_bucket_sampler_groups_by_size(make_dataset, folder):
    ds = make_dataset(str(folder), num_frames=5, height=SIZE, width=SIZE, frame_stride=1)
    # long.mp4 (50 frames) fits 45, fps30.mp4 (40 frames) only 9
    buckets = [(9, 16, 16), (45, 16, 16), (9, 16, 32)]
    sampler = BucketSampler(ds, batch_size=1, buckets=buckets, seed=0)
    names = _by_name(ds)
    assert sampler.assignment[(45, 16, 16)] == [names["long.mp4"]]
    assert sampler.assignment[(9, 16, 16)] == [names["fps30.mp4"]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_clips)
    shapes = sorted(tuple(b["video"].shape) for b in loader)
    assert shapes == [(1, 9, 16, 16, 3), (1, 45, 16, 16, 3)]
    ranks = [list(BucketSampler(ds, 1, buckets, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1 and ranks[0] != ranks[1]


def test_file_failing_after_probe_is_replaced_and_counted(make_dataset, tmp_path, caplog):
    for name in ("a", "b"):
        _write_indexed(tmp_path / f"{name}.mp4", 12, fps=16)
        (tmp_path / f"{name}.txt").write_text(name)
    dataset = make_dataset(str(tmp_path), num_frames=4, height=SIZE, width=SIZE)
    (tmp_path / "a.mp4").write_bytes(b"gone")
    with caplog.at_level(logging.WARNING, logger="longgen.data.video"):
        item = dataset[0]
        again = dataset[0]
    assert item["caption"] == again["caption"] == "b"
    assert dataset.skipped == {"decode_error": 1}
    assert sum(str(tmp_path / "a.mp4") in r.getMessage() for r in caplog.records) == 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_clips)
    assert next(iter(loader))["video"].shape == (2, 4, SIZE, SIZE, 3)


def _malformed_corpus(root) -> dict[str, str]:
    """A folder of broken files next to good ones; name -> what is wrong with it."""
    _write_indexed(root / "good.mp4", 12, fps=16)
    good = (root / "good.mp4").read_bytes()
    corpus = {
        "empty.mp4": b"",
        "text.mp4": b"this is a caption, not a video\n" * 20,
        "header_only.mp4": good[:64],  # ftyp box, no moov: no index, no frames
        "truncated.mp4": good[: len(good) // 2],  # the moov box (written last) is cut off
        "random.mkv": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }
    for name, data in corpus.items():
        (root / name).write_bytes(data)
    # An mp4 whose frame data is overwritten with noise: the index is intact, the pictures are not.
    damaged = bytearray(good)
    mdat = damaged.find(b"mdat")
    noise = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes()
    damaged[mdat + 64 : mdat + 64 + 512] = noise
    (root / "damaged.mp4").write_bytes(bytes(damaged))
    # A directory and a dangling link with a video name
    (root / "folder.mp4").mkdir()
    os.symlink(root / "nowhere.mp4", root / "dangling.mp4")
    for name in [*corpus, "good.mp4", "damaged.mp4", "folder.mp4", "dangling.mp4"]:
        (root / f"{os.path.splitext(name)[0]}.txt").write_text(f"caption of {name}")
    return corpus


def test_malformed_corpus_is_skipped_and_counted_never_fatal(make_dataset, tmp_path, caplog):
    corpus = _malformed_corpus(tmp_path)
    with caplog.at_level(logging.WARNING, logger="longgen.data.video"):
        dataset = make_dataset(str(tmp_path), num_frames=4, height=SIZE, width=SIZE, random_start=False)
        names = set(_by_name(dataset))
        # every file with no decodable index is left out at probe time, with its path in one warning
        assert names.isdisjoint(corpus) and {"good.mp4"} <= names <= {"good.mp4", "damaged.mp4"}
        assert dataset.skipped["unreadable"] == len(corpus) + 2  # + the folder and the dangling link
        for name in [*corpus, "folder.mp4", "dangling.mp4"]:
            assert sum(str(tmp_path / name) in r.getMessage() for r in caplog.records) == 1, name
        # reading every clip returns a well-formed clip: a damaged file decodes or is replaced
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["video"].shape == (4, SIZE, SIZE, 3)
            assert 0.0 <= float(item["video"].min()) and float(item["video"].max()) <= 1.0
    total = len(dataset.records) + sum(dataset.skipped.values())
    assert total == len(corpus) + 4 + dataset.skipped.get("decode_error", 0)
    assert _indices(dataset[_by_name(dataset)["good.mp4"]]["video"]) == [0, 1, 2, 3]


def test_unknown_video_backend_is_a_clear_error(folder):
    with pytest.raises(ValueError, match="unknown video backend 'opencv'"):
        VideoClipDataset(str(folder), num_frames=5, height=SIZE, width=SIZE, video_backend="opencv")
