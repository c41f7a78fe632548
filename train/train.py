"""Post-tune a diffusers video model for long clips: ``accelerate launch train/train.py --config RECIPE``.

    accelerate launch [--config_file configs/accelerate/<ddp|zero2|zero3|fsdp>.yaml] train/train.py \\
        --config configs/wan2.1_1.3b_df_lora.yaml [section.key=value ...] [--resume latest]

Without ``--config`` the embedded tiny recipe runs (a tiny Wan on the synthetic data set, CPU, minutes).
Parse -> build -> train -> close; everything else lives in :mod:`longgen.training`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from longgen.training.config import load_config
from longgen.training.loop import Trainer

DESCRIPTION = """Post-tune a diffusers video model for long clips (LoRA or full fine-tune, Accelerate).

  accelerate launch [--config_file configs/accelerate/<ddp|zero2|zero3|fsdp>.yaml] train/train.py \\
      --config configs/wan2.1_1.3b_df_lora.yaml [section.key=value ...] [--resume latest]

Without --config the tiny synthetic recipe runs (a tiny Wan on synthetic clips, CPU, minutes).
Several CPU processes: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ..."""
EPILOG = """Overrides are dotted keys, e.g. train.steps=1000 lora.rank=32 data.source=/data/clips.
Outputs in train.output_dir: checkpoints/, validation/ clips, metrics.jsonl, final/ weights."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); default: the tiny synthetic recipe")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (same as train.resume=...)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


DEFAULT_RECIPE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "tiny_synthetic.yaml"
)


SETUP_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ImportError)
"""Errors of the set-up (config, model folder, data, clip size) whose message names the fix."""


def main(argv: list[str] | None = None, clean_errors: bool = False) -> int:
    """Train; with ``clean_errors`` a set-up error prints its message (no traceback) and returns 2."""
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    recipe = args.config or (DEFAULT_RECIPE if os.path.exists(DEFAULT_RECIPE) else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        config = load_config(recipe, overrides)  # fails on a wrong key before any model loads
        trainer = Trainer(config)
    except SETUP_ERRORS as err:
        if not clean_errors or os.environ.get("LONGGEN_DEBUG"):
            raise
        print(f"train.py: error: {err}\n(set LONGGEN_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if result.final_dir:
        logging.getLogger("train").info("trained weights: %s", result.final_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(clean_errors=True))
