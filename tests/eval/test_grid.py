"""longgen.eval.grid: the labelled side-by-side comparison (PNG of sampled frames, mp4 of the rows playing)."""

import os

import numpy as np
import pytest
from PIL import Image

from longgen.eval.grid import GRID_BACKGROUND, write_comparison_grid
from longgen.io import read_video, video_info, write_video


def _clip(num_frames: int, colour_of) -> np.ndarray:
    """A 16x16 clip whose frame t is one flat colour ``colour_of(t)``: each sampled cell is identifiable."""
    frames = np.zeros((num_frames, 16, 16, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = colour_of(t)
    return frames


def _cell(png: np.ndarray, layout: dict, row: int, col: int, top0: int) -> np.ndarray:
    top = top0 + layout["pad"] + row * (layout["cell_h"] + layout["pad"])
    left = layout["label_w"] + col * (layout["cell_w"] + layout["pad"])
    return png[top : top + layout["cell_h"], left : left + layout["cell_w"]]


def test_grid_png_and_mp4_have_one_row_per_clip_and_sampled_columns(tmp_path):
    path = str(tmp_path / "gt.mp4")
    write_video(path, iter([_clip(20, lambda t: (0, 0, 200))]), fps=16.0)  # a row given as a video file
    rows = {
        "gt": path,
        "ramp": _clip(20, lambda t: (10 * t, 0, 0)),
        "short": _clip(10, lambda t: (0, 20 * t, 0)),  # shorter: holds its last frame
    }
    info = write_comparison_grid(rows, tmp_path / "g.png", tmp_path / "g.mp4", num_samples=5)
    layout = info["layout"]
    assert info["labels"] == ["gt", "ramp", "short"] and info["num_frames"] == 20
    assert info["frame_indices"] == [0, 5, 10, 14, 19]  # evenly over the longest clip, both ends included
    png = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    # rows x sample columns of upscaled frames, a label column and a frame-number header
    assert layout["cell_h"] == 16 * layout["scale"] and layout["scale"] == 6
    assert png.shape == (layout["height"], layout["width"], 3)
    assert layout["height"] >= layout["header_h"] + 3 * (layout["cell_h"] + layout["pad"])
    assert layout["width"] >= layout["label_w"] + 5 * (layout["cell_w"] + layout["pad"])
    top0 = layout["header_h"]
    for c, t in enumerate(info["frame_indices"]):
        np.testing.assert_array_equal(_cell(png, layout, 1, c, top0), np.broadcast_to((10 * t, 0, 0), (96, 96, 3)))
        want = (0, 20 * min(t, 9), 0)
        np.testing.assert_array_equal(_cell(png, layout, 2, c, top0), np.broadcast_to(want, (96, 96, 3)))
        assert np.abs(_cell(png, layout, 0, c, top0).astype(int) - (0, 0, 200)).max() < 12  # H.264 round trip
    # each row carries its label: dark text pixels in the label column beside it, none between rows
    labels = png[:, : layout["label_w"]]
    for r in range(3):
        top = top0 + layout["pad"] + r * (layout["cell_h"] + layout["pad"])
        strip = labels[top : top + layout["cell_h"]]
        assert (strip.sum(-1) < 200).sum() > 10, f"row {r} has no label"
    gap = top0 + layout["pad"] + layout["cell_h"]  # the background between rows 0 and 1
    assert (png[gap : gap + layout["pad"], layout["label_w"] :] == GRID_BACKGROUND).all()
    header = png[: layout["header_h"], layout["label_w"] :]
    assert (header.sum(-1) < 200).any()  # the frame numbers
    # the mp4: every frame of the longest clip, the rows stacked at the same size and labelled
    meta = video_info(tmp_path / "g.mp4")
    assert meta["num_frames"] == 20
    assert (meta["height"], meta["width"]) == (layout["body_h"], layout["label_w"] + layout["cell_w"] + layout["pad"])
    video = read_video(str(tmp_path / "g.mp4"))
    last = video[19].astype(int)
    assert np.abs(_cell(last, layout, 1, 0, 0) - (190, 0, 0)).mean() < 8
    assert np.abs(_cell(last, layout, 2, 0, 0) - (0, 180, 0)).mean() < 8  # the short row held its last frame
    assert (video[0][:, : layout["label_w"]].sum(-1) < 200).sum() > 30  # labels drawn in the video too
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary sibling left


def test_grid_is_written_atomically_and_bad_input_names_the_fix(tmp_path, monkeypatch):
    out = tmp_path / "g.png"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match="different frame sizes.*resize"):
        write_comparison_grid({"a": np.zeros((4, 16, 16, 3)), "b": np.zeros((4, 8, 8, 3))}, out)
    with pytest.raises(ValueError, match="no video at"):
        write_comparison_grid({"a": str(tmp_path / "missing.mp4")}, out)
    with pytest.raises(ValueError, match="use .mp4"):
        write_comparison_grid({"a": np.zeros((4, 16, 16, 3))}, out, tmp_path / "g.gif")
    with pytest.raises(ValueError, match="at least one row"):
        write_comparison_grid({}, out)
    # a failure while saving leaves the old file, and no partial one, under the final name
    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_comparison_grid({"a": np.zeros((4, 16, 16, 3))}, out)
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["g.png"]
