"""Training: config (OmegaConf), build, methods (the step), callbacks (EMA, logging, checkpoints, validation,
export), the Accelerate loop, objectives (per-frame noise levels, native losses), checkpoints."""
