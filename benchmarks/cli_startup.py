"""Wall time of `longgen --help` and `longgen generate --help` (the parser imports no torch).

    python -m benchmarks.cli_startup --repeats 5

Each command runs in a fresh interpreter; the median is reported, with the time of a bare
``python -c pass`` for reference (interpreter start-up is part of what a user waits for).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "longgen --help": [sys.executable, "-m", "longgen.cli", "--help"],
    "longgen generate --help": [sys.executable, "-m", "longgen.cli", "generate", "--help"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per command (median reported)")
    args = p.parse_args(argv)
    print("| command | median s | min s |")
    print("|---|---|---|")
    for label, cmd in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        print(f"| {label} | {statistics.median(times):.2f} | {min(times):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
