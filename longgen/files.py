"""Atomic output files and folders, with the permissions a plain ``open`` would give.

Everything longgen writes (clips, eval reports, latent caches, checkpoints, exported weights) goes
through these: written under a hidden temporary name in the same folder and renamed into place only
when complete, so a file under its final name is never partial (a killed run leaves only a hidden
``.<name>.*.tmp`` sibling). ``tempfile`` and safetensors create files ``0600``; the helpers give them
``0666`` / ``0777`` less the process umask, so a team sharing a folder can read them.

Torch-free: the CLI and any writer can import it cheaply.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_path",
    "chmod_umask",
    "default_file_mode",
    "remove_path",
    "replace_dir",
    "share_permissions",
    "temp_sibling",
    "write_json_atomic",
    "write_text_atomic",
]


def make_output_dir(path: str | os.PathLike, what: str = "output folder") -> str:
    """``os.makedirs(path, exist_ok=True)``, with a message that names the fix when ``path`` (or a parent) is an
    existing file instead of errno 17 / 20."""
    path = os.fspath(path)
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip(os.sep))
    if probe and not os.path.isdir(probe):
        raise ValueError(
            f"{what} {path!r}: {probe!r} is an existing file, not a folder; choose another path or move the file"
        )
    os.makedirs(path, exist_ok=True)
    return path


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (one call, no other thread
    # creates files between the two in this library).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open`` / ``os.mkdir`` would: 0666 / 0777 less the process umask.

    ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700, which a file renamed into place would
    otherwise keep (unreadable to the group that reads the outputs).
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def temp_sibling(final: str, directory: bool) -> str:
    parent = os.path.dirname(os.path.abspath(final)) or "."
    name = os.path.basename(final.rstrip(os.sep))
    stem, suffix = os.path.splitext(name)
    # Hidden, in the same folder (so os.replace is a rename on one file system), and with the same
    # suffix, so tools that pick a format from the name (FFmpeg, savers) see the right one.
    if directory:
        return tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=parent)
    os.close(fd)
    return tmp


def remove_path(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path beside ``final_path``; rename it into place when the block succeeds.

    On any exception (``KeyboardInterrupt`` too) the temporary file is removed and ``final_path`` is
    left as it was, so a file under its final name is never partial. The file gets the umask's mode
    (:func:`chmod_umask`). The parent folder is created. The yielded path exists (empty); writers may
    replace it::

        with atomic_path("out/metrics.json") as tmp:
            with open(tmp, "w") as f:
                json.dump(metrics, f)
    """
    final = os.fspath(final_path)
    if os.path.isdir(final):
        raise IsADirectoryError(f"{final!r} is a folder: name a file inside it")
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    tmp = temp_sibling(final, directory=False)
    try:
        yield tmp
        chmod_umask(tmp)
        os.replace(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary folder beside ``final_dir``; move it into place when the block succeeds.

    On any exception the temporary folder is removed and ``final_dir`` is untouched. An existing
    ``final_dir`` is replaced (``overwrite=True``: moved aside, then removed after the new one is in
    place) or is an error. The folder gets the umask's mode (files inside are the writer's business:
    use :func:`chmod_umask` or plain ``open``, which already follows the umask).
    """
    final = os.fspath(final_dir).rstrip(os.sep) or os.sep
    if os.path.exists(final) and not os.path.isdir(final):
        raise NotADirectoryError(f"{final!r} exists and is not a folder: remove it or pick another name")
    if os.path.isdir(final) and not overwrite:
        raise FileExistsError(f"{final!r} already exists: remove it or pick another name")
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    tmp = temp_sibling(final, directory=True)
    try:
        yield tmp
        chmod_umask(tmp)
        replace_dir(tmp, final)  # a folder cannot be os.replace'd over a non-empty one: swap via a second name
    except BaseException:
        remove_path(tmp)
        raise


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` creates a new file with."""
    return 0o666 & ~_umask()


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


def share_permissions(path: str | os.PathLike) -> None:
    """:func:`chmod_umask` on ``path`` and, for a folder, everything below it (links left alone).

    For folders written by other libraries before they are renamed into place: safetensors'
    ``save_file`` (so diffusers' ``save_pretrained`` and Accelerate's checkpoints) leaves 0600 files.
    """
    path = os.fspath(path)
    chmod_umask(path)
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    chmod_umask(full)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished folder ``tmp`` into place at ``final``, replacing an older one (renames only)."""
    tmp, final = os.fspath(tmp), os.fspath(final)
    if os.path.isdir(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    else:
        os.replace(tmp, final)
