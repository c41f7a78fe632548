"""Streaming mp4 writer and decord reader on real files the test writes."""

import numpy as np
import pytest
import torch

from longgen.io import VideoWriter, read_video, video_info, write_video


def test_streaming_writer_round_trip(tmp_path):
    path = tmp_path / "clip.mp4"
    blocks = [torch.full((3, 32, 64, 3), v) for v in (0.1, 0.5, 0.9)]
    assert write_video(path, blocks, fps=8) == 9
    info = video_info(path)
    assert (info["num_frames"], info["height"], info["width"], info["fps"]) == (9, 32, 64, 8.0)
    frames = read_video(path)
    assert frames.shape == (9, 32, 64, 3)
    # grey levels survive lossy coding within a few steps of 255
    np.testing.assert_allclose(frames.reshape(3, -1).mean(1), [0.1 * 255, 0.5 * 255, 0.9 * 255], atol=4)


def test_writer_rejects_size_change(tmp_path):
    with VideoWriter(tmp_path / "x.mp4") as w:
        w.write(np.zeros((1, 16, 16, 3), np.uint8))
        with pytest.raises(ValueError, match="size changed"):
            w.write(np.zeros((1, 32, 16, 3), np.uint8))


def test_unreadable_video_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(bad)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
