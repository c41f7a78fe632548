"""Host memory that does not grow with the clip (issue 16.6, longgen.memory): the allocator policy `longgen
generate` sets serves large buffers from their own mappings (so freed ones go back to the OS), and it changes no
output bit. Both run in one fresh subprocess: the policy is process-wide."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from longgen.memory import bound_heap_retention, heap_info

_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from longgen.cli import main
    from longgen.memory import heap_info

    model, out = sys.argv[1], sys.argv[2]
    assert main(["generate", "--model", model, "--num-frames", "21", "--height", "256", "--width", "256",
                 "--sampler", "sliding", "--steps", "1", "--seed", "3", "--quiet", "--save-latents", "--out", out]) == 0
    print(json.dumps(heap_info()))
    """
)


def _generate(saved, path, allocator: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["LONGGEN_ALLOCATOR"] = allocator
    out = subprocess.run([sys.executable, "-c", _CHILD, saved("wan"), str(path)], check=True, capture_output=True,
                         text=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)


def test_bad_threshold_and_opt_out(monkeypatch):
    with pytest.raises(ValueError, match="positive number of bytes"):
        bound_heap_retention(0)
    monkeypatch.setenv("LONGGEN_ALLOCATOR", "default")
    assert bound_heap_retention() is None  # the stock policy on request: nothing changed


@pytest.mark.slow
@pytest.mark.skipif(not heap_info(), reason="glibc >= 2.33 (mallinfo2) needed to observe the policy")
def test_generate_keeps_no_freed_heap_and_changes_no_output(saved, tmp_path):
    """The same generate with glibc's stock policy and with longgen's: the stock one ends holding freed
    activations in its heap, longgen's does not; latents and mp4 are the same bytes."""
    from safetensors.torch import load_file

    stock = _generate(saved, tmp_path / "stock.mp4", "default")
    bounded = _generate(saved, tmp_path / "bounded.mp4", "bounded")
    assert bounded["free"] < 0.3 * stock["free"]
    latents = [load_file(str(tmp_path / f"{n}.latents.safetensors"))["latents"] for n in ("stock", "bounded")]
    assert torch.equal(*latents)
    assert (tmp_path / "stock.mp4").read_bytes() == (tmp_path / "bounded.mp4").read_bytes()
