"""The one map from dtype names (``fp32``, ``bf16``, ``fp16``) to torch dtypes.

Kept free of a top-level torch import so that argument parsers (``--dtype`` choices) can read the
names without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

DTYPE_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""Names accepted by every ``--dtype`` flag and ``model.dtype`` config key."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPE_NAMES`; a clear error naming the choices otherwise."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPE_NAMES)}")
    return table[name]
