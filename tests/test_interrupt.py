"""Ctrl-C during generation: nothing under the final name, the partial clip kept under a name that says so."""

import os

import pytest

from longgen.backbones.wan import WanAdapter
from longgen.cli import main


def _interrupt_after(monkeypatch, calls: int | None) -> dict:
    """Count model calls; with ``calls``, press Ctrl-C (raise KeyboardInterrupt) at call ``calls + 1``."""
    original = WanAdapter.denoise
    count = {"n": 0}

    def denoise(self, x, sigma, cond):
        count["n"] += 1
        if calls is not None and count["n"] > calls:
            raise KeyboardInterrupt
        return original(self, x, sigma, cond)

    monkeypatch.setattr(WanAdapter, "denoise", denoise)
    return count


@pytest.mark.parametrize("sampler", ["df", "fifo"])
def test_ctrl_c_keeps_only_a_partial_clip_and_exits_130(saved, tmp_path, monkeypatch, capsys, sampler):
    out = tmp_path / "clip.mp4"
    args = ["generate", "--model", saved("wan"), "--num-frames", "33", "--steps", "4", "--quiet",
            "--sampler", sampler, "--out", str(out)]
    if sampler == "fifo":
        args = [a for a in args if a not in ("--steps", "4")]
    count = _interrupt_after(monkeypatch, None)
    assert main([*args[:-1], str(tmp_path / "full.mp4")]) == 0
    os.remove(tmp_path / "full.mp4")
    # let the sampler stream some frames first, then press Ctrl-C late in the run
    _interrupt_after(monkeypatch, count["n"] * 3 // 4)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 130
    assert not out.exists()
    assert "interrupted at frame" in err and "/33" in err
    partial = [f for f in os.listdir(tmp_path) if f.startswith("clip.partial-")]
    assert len(partial) == 1 and partial[0].endswith("of33.mp4"), os.listdir(tmp_path)
    written = int(partial[0].split("partial-")[1].split("of")[0])
    assert 0 < written < 33
    assert f"frame {written}/33" in err
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temporary files left behind"


def test_bad_device_and_image_are_messages(saved, tmp_path, capsys):
    import torch

    base = ["generate", "--model", saved("wan"), "--quiet", "--out", str(tmp_path / "a.mp4")]
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert main([*base, "--image", str(not_image)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*base[:-1], str(tmp_path / "file" / "clip.mp4")]) == 2
    assert capsys.readouterr().err.startswith("longgen generate: error:")
