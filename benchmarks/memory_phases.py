"""Resident memory of one `longgen generate` per phase: where does per-frame memory go? (issue 16.6)

Runs ``longgen generate`` in this process on a tiny saved pipeline and samples the process's resident set
(``/proc/self/statm``) every few milliseconds from a thread, attributing each sample to the phase running then:
``load`` (start-up, model, prompt encoding), ``sample`` (the sampler: model calls), ``decode`` (VAE decode of one
chunk), ``write`` (frames to FFmpeg), ``finish`` (closing the mp4), ``other`` (the rest after start-up). Each phase's peak and its RSS when it last
ended are printed, with the glibc heap's in-use and free bytes (``mallinfo2``) at the end of each phase, so
allocator growth (freed memory the heap keeps) shows apart from live memory. ``LONGGEN_ALLOCATOR=default`` in
the environment runs the stock glibc policy (see :mod:`longgen.memory`).

    python -m benchmarks.memory_phases --factors 2 32 --sampler sliding --height 256 --width 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from longgen.files import write_json_atomic

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def heap_mib() -> dict[str, float]:
    """glibc's heap (:func:`longgen.memory.heap_info`) in MiB: ``in_use``, ``free`` (kept by malloc), ``mmapped``."""
    from longgen.memory import heap_info

    return {k: v / 2**20 for k, v in heap_info().items()}


class PhaseRecorder:
    """RSS samples per phase (a sampling thread) and phase context managers."""

    def __init__(self, interval: float = 0.005):
        self.phase = "load"
        self.peak: dict[str, float] = {}
        self.end: dict[str, dict] = {}
        self.start: dict[str, dict] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mib()
            self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), value)
            time.sleep(self.interval)

    @contextlib.contextmanager
    def __call__(self, name: str):
        outer, self.phase = self.phase, name
        self.start.setdefault(name, {"rss": rss_mib(), **heap_mib()})
        try:
            yield
        finally:
            value = rss_mib()
            self.peak[name] = max(self.peak.get(name, 0.0), value)
            self.end[name] = {"rss": value, **heap_mib()}
            self.phase = "other" if outer == "load" else outer  # after the first phase: not start-up any more

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _wrap(owner, name: str, record: PhaseRecorder, phase: str, static: bool = False) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with record(phase):
            return original(*args, **kwargs)

    setattr(owner, name, staticmethod(wrapped) if static else wrapped)


def run_child(model: str, num_frames: int, sampler: str, steps: int, out: str, extra: list[str]) -> dict:
    """One generate in this process with the phase probes on; the per-phase record."""
    from longgen.backbones.base import StreamingDecoder
    from longgen.cli import main
    from longgen.io import VideoWriter
    from longgen.pipeline import LongVideoPipeline

    record = PhaseRecorder()
    _wrap(LongVideoPipeline, "_run_sampler", record, "sample", static=True)
    _wrap(StreamingDecoder, "_decode", record, "decode")
    _wrap(VideoWriter, "write", record, "write")
    _wrap(VideoWriter, "close", record, "finish")
    with record:
        code = main(["generate", "--model", model, "--num-frames", str(num_frames), "--sampler", sampler,
                     "--out", out, "--quiet", "--steps", str(steps), *extra])
    if code != 0:
        raise RuntimeError(f"longgen generate exited {code}")
    return {"peak": record.peak, "start": record.start, "end": record.end, "final_rss": rss_mib()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="wan", help="tiny backbone family")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 32], help="clip lengths as multiples of native")
    p.add_argument("--sampler", default="sliding", help="sampler to probe")
    p.add_argument("--steps", type=int, default=2, help="denoising steps")
    p.add_argument("--height", type=int, default=256, help="frame height")
    p.add_argument("--width", type=int, default=256, help="frame width")
    p.add_argument("--json", default=None, help="also write the records to this JSON file")
    args, extra = p.parse_known_args(argv)

    from longgen.backbones import build_tiny

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        adapter = build_tiny(args.family)
        adapter.save_pretrained(model)
        native = adapter.num_latent_frames(adapter.native_video_size[0])
        for factor in args.factors:
            frames = adapter.num_pixel_frames(native * factor)
            cmd = [sys.executable, "-m", "benchmarks.memory_phases", "--_child", model, str(frames), args.sampler,
                   str(args.steps), os.path.join(tmp, "o.mp4"), "--height", str(args.height), "--width",
                   str(args.width), *extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append({"factor": factor, "num_frames": frames, **json.loads(out)})
            print(json.dumps(rows[-1]), flush=True)
    print()
    phases = ["load", "sample", "decode", "write", "finish", "other"]
    print("RSS MiB per phase: peak (at its first start -> at its last end; glibc heap free at the end)")
    print("| factor | frames | " + " | ".join(phases) + " |")
    print("|---|---|" + "---|" * len(phases))
    for r in rows:
        cells = []
        for ph in phases:
            end = r["end"].get(ph, {})
            start = r["start"].get(ph, {})
            cells.append(f"{r['peak'].get(ph, 0):.0f} ({start.get('rss', 0):.0f} -> {end.get('rss', 0):.0f}; "
                         f"{end.get('free', 0):.0f})")
        print(f"| {r['factor']}x | {r['num_frames']} | " + " | ".join(cells) + " |")
    if args.json:
        write_json_atomic(args.json, rows, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        model, frames, sampler, steps, out = sys.argv[2:7]
        print(json.dumps(run_child(model, int(frames), sampler, int(steps), out, sys.argv[7:])))
        sys.exit(0)
    sys.exit(main())
