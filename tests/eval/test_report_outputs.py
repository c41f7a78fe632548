"""Eval outputs a reader can trust: directions in every table header, caveats for clips that score perfectly
by construction, atomic files, progress bars, a readable overview and plots that say what they measure."""

import json
import os
import re

import numpy as np
import pytest

from longgen.data.synthetic import render_clip, sample_world
from longgen.eval import report as report_mod
from longgen.eval.metrics import clip_caveats
from longgen.eval.report import OVERVIEW, direction, evaluate_videos, headline_table
from longgen.files import atomic_path, default_file_mode, write_json_atomic
from longgen.io import write_video

WORLD = sample_world(5)
GROUPS = ("flicker", "similarity", "color")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("v")
    frames, _ = render_clip(WORLD, 16, 32, 32)
    moving, blank = root / "moving.mp4", root / "blank.mp4"
    write_video(moving, [frames], fps=8)
    write_video(blank, [np.full((16, 32, 32, 3), 90, np.uint8)], fps=8)
    return moving, blank


def test_caveats_name_blank_and_static_clips_only():
    frames, _ = render_clip(WORLD, 8, 32, 32)
    assert clip_caveats(frames) == []
    blank = clip_caveats(np.zeros((8, 16, 16, 3), np.uint8))
    assert len(blank) == 1 and blank[0].startswith("blank clip") and "temporal_flicker" in blank[0]
    still = clip_caveats(np.repeat(frames[:1], 8, axis=0))
    assert len(still) == 1 and still[0].startswith("static clip")


def test_table_headers_say_which_direction_is_better_and_blank_gets_a_caveat(videos, tmp_path):
    report = evaluate_videos(list(videos), None, window=8, worlds=WORLD, groups=GROUPS)
    columns = ("synthetic_overall", "temporal_flicker", "color_hist_drift", "luminance_drift")
    table = headline_table(report, columns)
    header = table.splitlines()[0]
    assert "synthetic_overall (higher is better)" in header
    assert "temporal_flicker (higher is better)" in header
    assert "color_hist_drift (lower is better)" in header
    assert "luminance_drift (no better direction)" in header
    assert "| moving |" in table and "| blank * |" in table  # perfect flicker of a blank clip is flagged
    assert re.search(r"^\* blank: blank clip", table, re.M)
    assert report["videos"]["blank"]["metrics"]["temporal_flicker"]["summary"]["mean"] == pytest.approx(1.0)
    assert report["videos"]["moving"]["caveats"] == []
    for name in (*columns, "synthetic_motion_residual_px", "ssim_first", "coherence_gap2"):
        assert direction(name), name


def test_outputs_are_atomic_with_the_umask_mode(videos, tmp_path, capsys):
    out = tmp_path / "report"
    report = evaluate_videos(list(videos), out, window=8, worlds=WORLD, groups=GROUPS, show_progress=True)
    assert "eval" in capsys.readouterr().err  # the progress bar
    written = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]
    assert sorted(written) == sorted(report["files"])  # nothing else, no temporary leftovers
    for path in written:
        assert os.stat(path).st_mode & 0o777 == default_file_mode()
    # A failed write keeps the previous complete file and leaves no temporary file behind.
    before = (out / "metrics.json").read_text()
    with pytest.raises(ValueError):
        write_json_atomic(out / "metrics.json", {"x": float("nan")}, allow_nan=False)
    assert (out / "metrics.json").read_text() == before and json.loads(before)
    with pytest.raises(RuntimeError), atomic_path(out / "new.png") as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(out)) == ["metrics.json", "plots"]


def test_overview_has_few_labelled_panels_and_plots_say_what_they_measure(videos, tmp_path, monkeypatch):
    figures = {}

    def record(fig, path):
        axes = [ax for ax in fig.axes if ax.axison]
        figures[os.path.basename(path)] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in axes]

    monkeypatch.setattr(report_mod, "_savefig", record)
    evaluate_videos(list(videos), tmp_path, window=8, worlds=WORLD, groups=GROUPS)
    panels = figures["overview.png"]
    present = [n for n in OVERVIEW if f"{n}.png" in figures]
    assert 1 < len(panels) == len(present) <= 6
    for title, xlabel, ylabel in panels:
        assert "better" in title and xlabel == "frame (window centre)" and ylabel
    ((count_title, _, _),) = figures["synthetic_count.png"]
    assert "synthetic score vs the prompted world" in count_title and "objects found" in count_title
    assert "higher is better" in count_title


def test_readme_eval_example_names_files_the_demo_writes():
    from longgen.demo import DemoSettings

    settings = DemoSettings()
    num_frames = 9 * settings.length_factor  # the demo VAE keeps one latent frame per frame
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    example = re.search(r"^longgen eval (.+)$", readme, re.M).group(1).split()
    videos = [a for a in example if a.endswith(".mp4")]
    assert videos
    written = {os.path.join(settings.out_dir, "videos", f"{s}_{num_frames}f.mp4") for s in settings.samplers}
    assert set(videos) <= written, (videos, sorted(written))
