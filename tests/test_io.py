"""longgen.io on real files the tests write: the streaming writer (atomic, checked, partial clips kept
under an honest name), the readers behind one interface, and the atomic file / folder helpers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat

import numpy as np
import pytest
import torch

import longgen.io as lio
from longgen.io import (
    VideoWriteError,
    VideoWriter,
    atomic_dir,
    atomic_path,
    available_backends,
    chmod_umask,
    probe_video,
    read_video,
    resolve_backend,
    video_info,
    write_video,
)

BACKENDS = [b for b in lio.VIDEO_BACKENDS if b != "auto"]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder) -> list[str]:
    """Hidden temporary files a writer may have left."""
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    error = lio.backend_error(request.param)
    if error is not None:
        # torchcodec's PyPI wheel is built against PyTorch's CUDA build; with torch's CPU build its
        # native library does not load (see the README's set-up).
        pytest.skip(f"{request.param} does not load in this environment: {error}")
    return request.param


def _grey_clip(path, fps=8):
    blocks = [torch.full((3, 32, 64, 3), v) for v in (0.1, 0.5, 0.9)]
    assert write_video(path, blocks, fps=fps) == 9


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def test_streaming_writer_round_trip(tmp_path, backend):
    path = tmp_path / "clip.mp4"
    _grey_clip(path)
    info = video_info(path, backend)
    assert (info["num_frames"], info["height"], info["width"], info["fps"]) == (9, 32, 64, 8.0)
    frames = read_video(path, backend=backend)
    assert frames.shape == (9, 32, 64, 3) and frames.dtype == np.uint8
    # grey levels survive lossy coding within a few steps of 255
    np.testing.assert_allclose(frames.reshape(3, -1).mean(1), [0.1 * 255, 0.5 * 255, 0.9 * 255], atol=4)
    assert leftovers(tmp_path) == []


def test_writer_rejects_size_change(tmp_path):
    with pytest.raises(ValueError, match="size changed"):
        with VideoWriter(tmp_path / "x.mp4") as w:
            w.write(np.zeros((1, 16, 16, 3), np.uint8))
            w.write(np.zeros((1, 32, 16, 3), np.uint8))
    assert os.listdir(tmp_path) == []  # the failed clip is not left under any name


@pytest.mark.parametrize("name", ["x.gif", "x.avi", "x.webm", "x"])
def test_unsupported_suffix_is_refused_up_front(tmp_path, name):
    with pytest.raises(ValueError, match=r"use \.mp4"):
        VideoWriter(tmp_path / name)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["a.mp4", "b.MOV", "c.mkv"])
def test_mp4_mov_mkv_are_written(tmp_path, name):
    write_video(tmp_path / name, [np.full((2, 16, 16, 3), 128, np.uint8)], fps=4)
    assert video_info(tmp_path / name)["num_frames"] == 2


def test_existing_folder_or_file_parent_is_refused(tmp_path):
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(ValueError, match=r"is a folder: name a file inside it"):
        VideoWriter(tmp_path / "out.mp4")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        VideoWriter(tmp_path / "plain" / "deeper" / "clip.mp4")


def test_final_name_appears_only_when_complete(tmp_path):
    final = tmp_path / "sub" / "clip.mp4"
    with umask(0o022):
        writer = VideoWriter(final, fps=8)
        writer.write(np.zeros((4, 16, 16, 3), np.uint8))
        assert not final.exists()
        temps = leftovers(final.parent)
        assert len(temps) == 1 and temps[0].startswith(".clip.") and temps[0].endswith(".mp4")
        writer.close()
    assert final.is_file() and final.stat().st_size > 0
    assert mode(final) == 0o644  # not mkstemp's 0600
    assert leftovers(final.parent) == []
    writer.close()  # a second close is a no-op


def _fake_ffmpeg(tmp_path, monkeypatch, script: str) -> None:
    exe = tmp_path / "fake-ffmpeg"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    import imageio_ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(exe))


def test_ffmpeg_failure_is_an_error_with_its_message(tmp_path, monkeypatch):
    script = 'cat >/dev/null; echo "Conversion failed: disk on fire" >&2; exit 3\n'
    _fake_ffmpeg(tmp_path, monkeypatch, script)
    out = tmp_path / "out" / "clip.mp4"
    writer = VideoWriter(out)
    writer.write(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(VideoWriteError, match=r"(?s)status 3.*disk on fire"):
        writer.close()
    assert os.listdir(out.parent) == []


def test_ffmpeg_writing_nothing_is_an_error(tmp_path, monkeypatch):
    _fake_ffmpeg(tmp_path, monkeypatch, "cat >/dev/null; exit 0\n")  # exit 0, empty output
    out = tmp_path / "out" / "clip.mp4"
    with pytest.raises(VideoWriteError, match="empty file"):
        write_video(out, [np.zeros((2, 16, 16, 3), np.uint8)])
    assert os.listdir(out.parent) == []


def test_ffmpeg_dying_mid_clip_is_an_error(tmp_path, monkeypatch):
    _fake_ffmpeg(tmp_path, monkeypatch, 'echo "Invalid argument" >&2; exit 1\n')  # reads nothing
    out = tmp_path / "out" / "clip.mp4"
    with pytest.raises(VideoWriteError, match=r"(?s)FFmpeg.*Invalid argument"):
        with VideoWriter(out) as writer:
            for _ in range(200):  # more than a pipe buffer, so the write itself fails
                writer.write(np.zeros((4, 64, 64, 3), np.uint8))
    assert os.listdir(out.parent) == []


def test_real_ffmpeg_rejecting_options_is_an_error(tmp_path):
    with pytest.raises(VideoWriteError, match="crf"):
        with VideoWriter(tmp_path / "clip.mp4", quality=-5) as writer:  # libx264 refuses a negative crf
            writer.write(np.zeros((2, 16, 16, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_no_frames_is_not_a_success(tmp_path):
    with pytest.raises(VideoWriteError, match="no frames"):
        write_video(tmp_path / "clip.mp4", [])
    assert os.listdir(tmp_path) == []


def test_abort_keeps_the_partial_clip_under_an_honest_name(tmp_path):
    final = tmp_path / "clip.mp4"
    writer = VideoWriter(final, fps=8)
    writer.write(np.full((5, 16, 16, 3), 100, np.uint8))
    kept = writer.abort(total_frames=20)
    assert kept == str(tmp_path / "clip.partial-5of20.mp4")
    assert not final.exists() and leftovers(tmp_path) == []
    assert video_info(kept)["num_frames"] == 5
    assert writer.abort() is None and writer.close() is None  # finished: both are no-ops now
    assert not final.exists()


def test_abort_without_frames_or_without_keeping_leaves_nothing(tmp_path):
    assert VideoWriter(tmp_path / "a.mp4").abort() is None
    writer = VideoWriter(tmp_path / "b.mp4")
    writer.write(np.zeros((3, 16, 16, 3), np.uint8))
    assert writer.abort(keep_partial=False) is None
    assert os.listdir(tmp_path) == []


def test_close_short_of_total_frames_keeps_a_partial_and_fails(tmp_path):
    writer = VideoWriter(tmp_path / "clip.mp4", total_frames=10)
    writer.write(np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(VideoWriteError, match=r"4 of 10 frames.*clip\.partial-4of10\.mp4"):
        writer.close()
    assert sorted(os.listdir(tmp_path)) == ["clip.partial-4of10.mp4"]


def test_keyboard_interrupt_inside_the_block_leaves_no_clip(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "clip.mp4") as writer:
            writer.write(np.zeros((3, 16, 16, 3), np.uint8))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_close_in_a_finally_block_while_an_error_propagates_publishes_nothing(tmp_path):
    writer = VideoWriter(tmp_path / "clip.mp4")
    with pytest.raises(LookupError):  # the original error, not a writer error
        try:
            writer.write(np.zeros((3, 16, 16, 3), np.uint8))
            raise LookupError("sampler failed")
        finally:
            writer.close()
    assert os.listdir(tmp_path) == []
    empty = VideoWriter(tmp_path / "empty.mp4")
    with pytest.raises(LookupError):
        try:
            raise LookupError("sampler failed before the first frame")
        finally:
            empty.close()
    assert os.listdir(tmp_path) == []


def test_interrupted_clip_kept_by_abort_after_ctrl_c(tmp_path):
    """The pipeline's pattern: on KeyboardInterrupt call abort(), report the partial clip."""
    writer = VideoWriter(tmp_path / "clip.mp4", total_frames=257)
    kept = None
    try:
        writer.write(np.zeros((45, 16, 16, 3), np.uint8))
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        kept = writer.abort()
    assert kept.endswith("clip.partial-45of257.mp4") and video_info(kept)["num_frames"] == 45
    assert not (tmp_path / "clip.mp4").exists()


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def test_unreadable_video_is_a_clear_error(tmp_path, backend):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(bad, backend=backend)
    with pytest.raises(ValueError, match="bad.mp4"):
        probe_video(bad, backend=backend)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4", backend=backend)


def test_indices_read_the_right_frames_and_past_the_end_is_an_error(tmp_path, backend):
    levels = np.arange(12, dtype=np.uint8) * 16 + 8
    frames = np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (12, 16, 48, 3)))
    write_video(tmp_path / "v.mp4", [frames], fps=12)  # 48 px wide: decord 0.6 mis-sizes this width
    got = read_video(tmp_path / "v.mp4", [0, 5, 5, 11, 2], backend=backend)
    assert got.shape == (5, 16, 48, 3)
    np.testing.assert_allclose(got.reshape(5, -1).mean(1), levels[[0, 5, 5, 11, 2]], atol=2)
    with pytest.raises(ValueError, match=r"v\.mp4.*past the last frame"):
        read_video(tmp_path / "v.mp4", [3, 12], backend=backend)
    with pytest.raises(ValueError, match=">= 0"):
        read_video(tmp_path / "v.mp4", [-1], backend=backend)


def test_backends_decode_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    write_video(tmp_path / "r.mp4", [rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)], fps=8)
    loaded = available_backends()
    assert "decord" in loaded and "pyav" in loaded  # both are plain dependencies
    decoded = {b: read_video(tmp_path / "r.mp4", [1, 4], backend=b).astype(int) for b in loaded}
    for b in loaded:
        assert np.abs(decoded[b] - decoded["decord"]).max() <= 2, b


def test_unknown_or_unloadable_backend_is_explained(monkeypatch):
    with pytest.raises(ValueError, match="choose one of auto, torchcodec, decord, pyav"):
        resolve_backend("opencv")
    monkeypatch.setattr(lio, "backend_error", lambda name: "no libs" if name == "torchcodec" else None)
    with pytest.raises(ValueError, match=r"'torchcodec' is not usable: no libs; backends that load"):
        resolve_backend("torchcodec")


def test_auto_prefers_torchcodec_and_falls_back_to_decord_with_one_warning(monkeypatch, caplog):
    lio._auto_backend.cache_clear()
    monkeypatch.setattr(lio, "backend_error", lambda name: None)
    assert resolve_backend("auto") == "torchcodec"
    lio._auto_backend.cache_clear()
    broken = {"torchcodec": "torchcodec cannot load: x"}
    monkeypatch.setattr(lio, "backend_error", broken.get)
    with caplog.at_level(logging.WARNING, logger="longgen.io"):
        assert [resolve_backend("auto") for _ in range(3)] == ["decord"] * 3
    warnings = [r for r in caplog.records if "torchcodec cannot load" in r.getMessage()]
    assert len(warnings) == 1 and "using decord" in warnings[0].getMessage()
    lio._auto_backend.cache_clear()


# ------------------------------------------------------------------------------------------------
# atomic files and folders
# ------------------------------------------------------------------------------------------------
def test_atomic_path_renames_on_success_with_the_umask_mode(tmp_path):
    final = tmp_path / "deep" / "metrics.json"
    with umask(0o022), atomic_path(final) as tmp:
        assert os.path.dirname(tmp) == str(final.parent) and os.path.basename(tmp).startswith(".")
        assert tmp.endswith(".json")
        with open(tmp, "w") as f:
            f.write("{}")
        assert not final.exists()
    assert final.read_text() == "{}" and mode(final) == 0o644
    with umask(0o077), atomic_path(final) as tmp:
        open(tmp, "w").close()
    assert mode(final) == 0o600


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_leaves_no_file_on_error(tmp_path, error):
    with pytest.raises(error), atomic_path(tmp_path / "new.txt") as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise error
    assert os.listdir(tmp_path) == []
    (tmp_path / "old.txt").write_text("kept")
    with pytest.raises(error), atomic_path(tmp_path / "old.txt") as tmp:
        open(tmp, "w").write("half")
        raise error
    assert os.listdir(tmp_path) == ["old.txt"] and (tmp_path / "old.txt").read_text() == "kept"


def test_atomic_dir_moves_into_place_and_replaces(tmp_path):
    final = tmp_path / "model"
    with umask(0o022), atomic_dir(final) as tmp:
        assert os.path.basename(tmp).startswith(".") and os.path.dirname(tmp) == str(tmp_path)
        with open(os.path.join(tmp, "weights.safetensors"), "w") as f:
            f.write("v1")
        assert not final.exists()
    assert mode(final) == 0o755 and (final / "weights.safetensors").read_text() == "v1"
    assert mode(final / "weights.safetensors") == 0o644
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "other"), "w").close()
    assert sorted(os.listdir(final)) == ["other"] and os.listdir(tmp_path) == ["model"]
    with pytest.raises(FileExistsError, match="already exists"), atomic_dir(final, overwrite=False):
        pass


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_leaves_the_old_folder_on_error(tmp_path, error):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("kept")
    with pytest.raises(error), atomic_dir(final) as tmp:
        open(os.path.join(tmp, "half"), "w").close()
        raise error
    assert os.listdir(tmp_path) == ["model"] and os.listdir(final) == ["old"]
    with pytest.raises(error), atomic_dir(tmp_path / "fresh"):
        raise error
    assert os.listdir(tmp_path) == ["model"]


def test_chmod_umask_fixes_mkstemp_and_mkdtemp_modes(tmp_path):
    import tempfile

    fd, f = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    d = tempfile.mkdtemp(dir=tmp_path)
    assert (mode(f), mode(d)) == (0o600, 0o700)
    with umask(0o022):
        chmod_umask(f)
        chmod_umask(d)
    assert (mode(f), mode(d)) == (0o644, 0o755)


# ------------------------------------------------------------------------------------------------
# from the user's entry point
# ------------------------------------------------------------------------------------------------
def test_generate_refuses_outputs_it_cannot_write_and_publishes_only_complete_clips(saved, tmp_path, capsys):
    from longgen.cli import main

    model = saved("wan")
    base = ["generate", "--model", model, "--steps", "1", "--prompt", "x", "--quiet"]
    (tmp_path / "folder").mkdir()
    for out, message in [("x.gif", r"use \.mp4"), ("folder", "is a folder: name a file inside it")]:
        assert main([*base, "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "wrote" not in err
    assert sorted(os.listdir(tmp_path)) == ["folder"] and os.listdir(tmp_path / "folder") == []
    with umask(0o022):
        assert main([*base, "--out", str(tmp_path / "clip.mp4")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "folder"] and mode(tmp_path / "clip.mp4") == 0o644
    assert video_info(tmp_path / "clip.mp4")["num_frames"] > 0


def test_reader_benchmark_runs_and_reports_every_reader(tmp_path, capsys):
    from benchmarks.video_readers import main as bench

    out = tmp_path / "r.json"
    args = ["--videos", "2", "--frames", "24", "--size", "32", "--clips", "3", "--clip-frames", "5"]
    assert bench([*args, "--repeats", "2", "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    assert set(result["median_clips_per_s"]) | set(result["not_loaded"]) == set(BACKENDS)
    assert {"decord", "pyav"} <= set(result["median_clips_per_s"])
    assert result["ratio_vs_decord"]["decord"] == 1
    assert all(len(v) == 2 and min(v) > 0 for v in result["runs"].values())
    assert all(d <= 2 for d in result["max_pixel_difference_vs_decord"].values())  # they agree on pixels
    assert "| decord |" in capsys.readouterr().out
