"""Training: objectives (per-frame noise levels, native losses), config, the Accelerate loop, checkpoints."""
