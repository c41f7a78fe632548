#!/usr/bin/env python
"""Generate a long clip from a local diffusers pipeline folder (same flags as `longgen generate`).

    python scripts/generate_long.py --model ./Wan2.1-T2V-1.3B-Diffusers --prompt "a red ball bouncing" \
        --num-frames 321 --sampler sliding --dtype bf16 --device cuda --out ball.mp4
"""

import sys

from longgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
