"""Two-process ``accelerate launch`` on a CPU host: the pieces the distributed training tests share.

``FSDP_ON_CPU`` is the worker lines that run accelerate's FSDP code path over gloo on device ``cpu``
(Accelerate 1.x offers FSDP only on accelerator devices; the worker has imported ``PartialState`` and
``DistributedType``), put into a worker's text by :func:`with_fsdp_on_cpu`; :func:`cpu_launch_config` writes the project's
accelerate config with 2 processes, fp32 and no GPU; :func:`accelerate_exe` finds the launcher next to this
Python.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FSDP_ON_CPU = r"""
PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
    "gloo", DistributedType.MULTI_GPU)
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
"""


def accelerate_exe() -> str:
    """The ``accelerate`` CLI installed beside this Python (a clear failure when it is missing)."""
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.fail("the accelerate CLI is not installed next to this Python; pip install accelerate")
    return exe


def cpu_launch_config(name: str, tmp_path) -> str:
    """The project's accelerate config ``configs/accelerate/<name>.yaml`` with 2 processes, fp32 and no GPU."""
    with open(os.path.join(REPO, "configs", "accelerate", f"{name}.yaml")) as fh:
        config = yaml.safe_load(fh)
    config.update(num_processes=2, mixed_precision="no", use_cpu=False)
    path = tmp_path / f"{name}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def with_fsdp_on_cpu(worker: str) -> str:
    """``worker`` (a script's text) with its ``# <FSDP_ON_CPU>`` line replaced by :data:`FSDP_ON_CPU`, indented alike."""
    lines = []
    for line in worker.splitlines(keepends=True):
        if line.strip() == "# <FSDP_ON_CPU>":
            indent = line[: len(line) - len(line.lstrip())]
            lines += [indent + shim + "\n" for shim in FSDP_ON_CPU.strip("\n").splitlines()]
        else:
            lines.append(line)
    return "".join(lines)
