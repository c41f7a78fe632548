"""Keep host memory from growing with the clip: return freed large buffers to the OS (glibc's malloc).

Measured (``benchmarks/memory_phases.py``, tiny Wan at 256x256): the live heap of ``longgen generate`` stays
at ~140-180 MiB whatever the clip length, but peak RSS grew with it, because glibc's malloc kept the freed
activations and decoded frames of earlier windows and chunks as free heap memory (97 MiB of it at 2x the
native length, 212 MiB at 8x). glibc serves large requests from ``mmap`` (returned to the OS on ``free``)
only above a threshold that it raises each time such a block is freed, up to 32 MiB on 64-bit; after a few
model calls every activation of the tiny models comes from the heap, where the long-lived small objects
allocated in between (latent chunks, Python objects) pin it and fragment it. Fixing the threshold
(``mallopt(M_MMAP_THRESHOLD)``, which also stops the dynamic raise) makes every buffer above it an ``mmap``
again, so memory the sampler or decoder freed is the OS's again at once.

:func:`bound_heap_retention` is what ``longgen generate`` calls before the model loads. It is process-wide, so
the library does not call it by itself; a script can. It does nothing (returns None) off glibc, when the user
set ``MALLOC_MMAP_THRESHOLD_`` themselves, or with ``LONGGEN_ALLOCATOR=default`` (the stock policy: what the
before/after benchmark compares against). Results are unchanged (the allocator decides where buffers live,
not what is computed); tests/test_memory.py checks that and the policy itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["DEFAULT_MMAP_THRESHOLD", "bound_heap_retention", "heap_info"]

DEFAULT_MMAP_THRESHOLD = 1 << 20
"""Buffers of at least 1 MiB get their own mapping (a 256x256 frame in float32 is 0.75 MiB, its activations
more); smaller ones stay on the heap, where the per-mapping system calls would cost more than they save."""

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def bound_heap_retention(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> int | None:
    """Serve every allocation of ``mmap_threshold`` bytes or more from its own mapping (see the module
    docstring); the threshold set, or None when nothing was changed (not glibc, or opted out)."""
    if mmap_threshold < 1:
        raise ValueError(f"mmap_threshold must be a positive number of bytes, got {mmap_threshold}")
    if os.environ.get("LONGGEN_ALLOCATOR", "").lower() == "default" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    libc = _glibc()
    if libc is None or libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) != 1:
        return None
    return mmap_threshold


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_info() -> dict[str, int]:
    """glibc's ``mallinfo2`` over all arenas, in bytes: ``in_use`` (allocated from the heap), ``free`` (freed
    but kept by malloc), ``mmapped`` (live blocks with their own mapping); {} off glibc (< 2.33)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}
