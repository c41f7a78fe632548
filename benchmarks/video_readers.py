"""Training-clip decode speed of each video reader (torchcodec, decord, PyAV) behind ``read_video``.

The workload is what :class:`longgen.data.video.VideoClipDataset` asks of a reader: open a file, decode
the ``--clip-frames`` frames of one clip (``--stride`` apart, from a random start) and return them as
uint8 ``[T, H, W, 3]``. The corpus is written by this script: ``--videos`` rendered synthetic worlds
(``longgen.data.synthetic``: moving, occluding objects, so H.264 behaves as on real footage) of
``--frames`` frames at ``--size`` px, 16 fps, encoded by :class:`longgen.io.VideoWriter`.

Each repeat reads the same ``--clips`` clips (fixed seed) with every reader, in an order that rotates
between repeats so machine load falls on all of them alike; a warm-up pass first reads every clip once
(the page cache then holds the files, as it does in a training epoch after the first). Reported: the
median clips/s over ``--repeats`` repeats, its ratio to decord's median from the same run, and the
median of the per-repeat ratios (each pairs two readers under the same machine load); and the same
from process CPU time (clips per CPU-second), the robust clock on a shared CPU. Readers
that do not load here are listed with the reason. One decoding thread per reader (what each DataLoader
worker uses).

    python -m benchmarks.video_readers [--repeats 5] [--clips 24] [--json out.json] [--stub-cuda-runtime]

torchcodec's PyPI wheel links PyTorch's CUDA libraries (libcudart.so.13, libnvrtc.so.13, libc10_cuda.so,
libtorch_cuda.so), so with torch's CPU build it does not load. ``--stub-cuda-runtime`` (a measurement aid
for such machines, needs gcc) builds empty stand-ins for those libraries in a temporary folder and runs
the benchmark again with them on ``LD_LIBRARY_PATH``: the CPU decoding path never calls CUDA, so the
numbers are torchcodec's real CPU decoder. Nothing in longgen itself does this.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from longgen.files import write_json_atomic
from longgen.io import VIDEO_BACKENDS, backend_error, read_video

READERS = [b for b in VIDEO_BACKENDS if b != "auto"]


def write_corpus(out_dir: str, videos: int, frames: int, size: int) -> list[str]:
    """``videos`` synthetic mp4 files; their paths."""
    from longgen.data.synthetic import load_manifest, write_synthetic_dataset

    manifest = write_synthetic_dataset(out_dir, num_videos=videos, num_frames=frames, height=size, width=size)
    return [r["video"] for r in load_manifest(manifest)]  # absolute paths


def clip_plan(paths: list[str], frames: int, clips: int, clip_frames: int, stride: int, seed: int = 0):
    """``clips`` (path, indices) pairs with random starts."""
    rng = np.random.default_rng(seed)
    span = (clip_frames - 1) * stride + 1
    plan = []
    for k in range(clips):
        start = int(rng.integers(0, frames - span + 1))
        plan.append((paths[k % len(paths)], list(range(start, start + span, stride))))
    return plan


def time_reader(backend: str, plan) -> tuple[float, float]:
    """Clips per wall-clock second and per CPU second (this process, all threads) reading ``plan`` once."""
    t0, c0 = time.perf_counter(), time.process_time()
    for path, indices in plan:
        frames = read_video(path, indices, backend=backend)
        assert frames.shape[0] == len(indices)
    return len(plan) / (time.perf_counter() - t0), len(plan) / (time.process_time() - c0)


def run(args) -> dict:
    usable = [b for b in READERS if backend_error(b) is None]
    skipped = {b: backend_error(b) for b in READERS if b not in usable}
    if "decord" not in usable:
        sys.exit(f"decord does not load here ({skipped['decord']}); the ratios are against decord")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_corpus(tmp, args.videos, args.frames, args.size)
        print(f"wrote {len(paths)} videos in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        plan = clip_plan(paths, args.frames, args.clips, args.clip_frames, args.stride)
        reference = {b: read_video(plan[0][0], plan[0][1], backend=b).astype(int) for b in usable}
        agree = {b: int(np.abs(reference[b] - reference["decord"]).max()) for b in usable}
        for b in usable:  # warm-up: page cache, libraries, codecs
            time_reader(b, plan)
        speeds: dict[str, list[float]] = {b: [] for b in usable}
        cpu: dict[str, list[float]] = {b: [] for b in usable}
        for r in range(args.repeats):
            order = usable[r % len(usable) :] + usable[: r % len(usable)]
            for b in order:
                wall, per_cpu = time_reader(b, plan)
                speeds[b].append(wall)
                cpu[b].append(per_cpu)
                print(f"repeat {r}: {b} {wall:.1f} clips/s, {per_cpu:.1f} clips/CPU-s", file=sys.stderr)
    median = {b: statistics.median(v) for b, v in speeds.items()}
    median_cpu = {b: statistics.median(v) for b, v in cpu.items()}
    return {
        "settings": vars(args),
        "torchcodec_with_cuda_stand_ins": "cuda-stubs-" in os.environ.get("LD_LIBRARY_PATH", ""),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "median_clips_per_s": median,
        "ratio_vs_decord": {b: median[b] / median["decord"] for b in usable},
        # paired within each repeat (the same load on both readers): robust on a shared machine
        "median_paired_ratio_vs_decord": {
            b: statistics.median(x / d for x, d in zip(speeds[b], speeds["decord"])) for b in usable
        },
        "runs": speeds,
        # CPU time is the robust clock on a shared CPU (every reader decodes on one thread)
        "median_clips_per_cpu_s": median_cpu,
        "cpu_ratio_vs_decord": {b: median_cpu[b] / median_cpu["decord"] for b in usable},
        "cpu_runs": cpu,
        "max_pixel_difference_vs_decord": agree,
        "not_loaded": skipped,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"{s['clips']} clips of {s['clip_frames']} frames (stride {s['stride']}) from {s['videos']} videos "
        f"of {s['frames']} frames at {s['size']}x{s['size']}; median of {s['repeats']} repeats; load average "
        + ", ".join(f"{v:.1f}" for v in result["machine"]["load_average"]),
        "",
        "| reader | clips/s (median) | vs decord | vs decord, paired per repeat | clips per CPU-s "
        "| vs decord (CPU) | runs (clips/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, v in result["median_clips_per_s"].items():
        runs = ", ".join(f"{x:.1f}" for x in result["runs"][b])
        paired = result["median_paired_ratio_vs_decord"][b]
        c, cr = result["median_clips_per_cpu_s"][b], result["cpu_ratio_vs_decord"][b]
        ratio = result["ratio_vs_decord"][b]
        lines.append(f"| {b} | {v:.1f} | {ratio:.2f} | {paired:.2f} | {c:.1f} | {cr:.2f} | {runs} |")
    for b, why in result["not_loaded"].items():
        lines.append(f"| {b} | not loaded: {why} | | | | | |")
    if result["torchcodec_with_cuda_stand_ins"]:
        lines += ["", "torchcodec ran against empty CUDA stand-ins (`--stub-cuda-runtime`), on the CPU."]
    return "\n".join(lines)


_CUDART_STUB = """
static void *handle[64];
void **__cudaRegisterFatBinary(void *f) { return handle; }
void __cudaRegisterFatBinaryEnd(void **h) {}
void __cudaUnregisterFatBinary(void **h) {}
void __cudaRegisterFunction(void) {}
void __cudaRegisterVar(void) {}
const char *cudaGetErrorString(int e) { return "CUDA stand-in: no CUDA on this machine"; }
void *aoti_torch_get_current_cuda_stream(void) { return 0; }
"""
# every other CUDA runtime entry point torchcodec links returns an error (1: cudaErrorInvalidValue)
_CUDART_FAILING = [
    "__cudaPushCallConfiguration", "__cudaPopCallConfiguration", "__cudaLaunchKernel", "__cudaGetKernel",
    "cudaEventCreateWithFlags", "cudaEventDestroy", "cudaEventRecord", "cudaEventSynchronize", "cudaFree",
    "cudaGetDevice", "cudaMemcpy2DAsync", "cudaMemcpyAsync", "cudaSetDevice", "cudaStreamSynchronize",
    "cudaStreamWaitEvent",
]  # fmt: skip


def _rerun_with_cuda_stubs(argv: list[str]) -> int:
    """Build stand-ins for the CUDA libraries torchcodec's wheel links, then run again with them."""
    stub_dir = tempfile.mkdtemp(prefix="cuda-stubs-")
    src = os.path.join(stub_dir, "cudart.c")
    with open(src, "w") as f:
        f.write(_CUDART_STUB + "".join(f"int {name}(void) {{ return 1; }}\n" for name in _CUDART_FAILING))
    with open(os.path.join(stub_dir, "cudart.map"), "w") as f:
        f.write("libcudart.so.13 { global: *; };\n")  # torchcodec binds versioned cudart symbols
    cc = ["gcc", "-shared", "-fPIC", "-o"]
    link = [f"-Wl,--version-script={stub_dir}/cudart.map", "-Wl,-soname,libcudart.so.13"]
    subprocess.run([*cc, os.path.join(stub_dir, "libcudart.so.13"), src, *link], check=True)
    empty = os.path.join(stub_dir, "empty.c")
    with open(empty, "w") as f:
        f.write("void longgen_cuda_stand_in(void) {}\n")
    for name in ("libnvrtc.so.13", "libc10_cuda.so", "libtorch_cuda.so"):
        subprocess.run([*cc, os.path.join(stub_dir, name), empty], check=True)
    paths = [stub_dir, os.environ.get("LD_LIBRARY_PATH", "")]
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(p for p in paths if p))
    args = [a for a in argv if a != "--stub-cuda-runtime"]
    return subprocess.run([sys.executable, "-m", "benchmarks.video_readers", *args], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--frames", type=int, default=160, help="frames per video")
    p.add_argument("--size", type=int, default=256, help="frame height and width")
    p.add_argument("--clips", type=int, default=24, help="clips read per repeat")
    p.add_argument("--clip-frames", type=int, default=17)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the result here")
    p.add_argument(
        "--stub-cuda-runtime",
        action="store_true",
        help="torchcodec with torch's CPU build: load it against empty CUDA stand-ins (see the module doc)",
    )
    args = p.parse_args(argv)
    if args.stub_cuda_runtime and backend_error("torchcodec"):
        return _rerun_with_cuda_stubs(sys.argv[1:] if argv is None else list(argv))
    result = run(args)
    if args.json:
        write_json_atomic(args.json, result, indent=2)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
