"""Files the trainer writes: shared permissions (the umask, not 0600) and atomic folder replacement.

safetensors' ``save_file`` (and so diffusers' ``save_pretrained`` and Accelerate's checkpoints) creates
its files through a temporary file, which leaves them mode 0600 whatever the umask: a team sharing an
output folder could not read each other's weights. :func:`share_permissions` sets the modes a plain
``open`` would have given (``0666 & ~umask`` for files, ``0777 & ~umask`` for folders) on a finished
folder before it is renamed into place.
"""

from __future__ import annotations

import os
import shutil

__all__ = ["current_umask", "replace_dir", "share_permissions"]


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything below it) the modes the umask asks for."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


def replace_dir(tmp: str, final: str) -> None:
    """Move a finished output folder into place (one rename), replacing an older one."""
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
