"""Atomic output files: written under a temporary name in the same folder, renamed when complete.

A reader (or a user listing the folder) never sees a partial file under its final name: a run killed mid-write
leaves only a ``.<name>.tmp-<pid>`` file. Files end with the permissions a plain ``open(path, "w")`` would give
(``0o666`` minus the umask) even when the writer creates them ``0600`` (safetensors does).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_path", "default_file_mode", "write_json_atomic", "write_text_atomic"]


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` creates a new file with."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success chmod it to :func:`default_file_mode` and rename
    it to ``path`` (one ``os.replace``); on an exception remove it and re-raise."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`). Returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> str:
    """``json.dump(obj)`` to ``path`` atomically (:func:`atomic_path`). Returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, **dump_kwargs)
    return os.fspath(path)
