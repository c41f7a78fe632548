"""Reading YAML config files (training recipes, ``longgen generate --config``): one loader, one message.

Torch-free, so the CLI can read a generate config before it imports the model stack. Both config systems
then hand the mapping to OmegaConf (typed merge, unknown keys by name).
"""

from __future__ import annotations

import os
from typing import Any


def read_yaml(path: str | os.PathLike, *, what: str = "config", error: type[Exception] = ValueError) -> dict[str, Any]:
    """A YAML file as a mapping (``{}`` when empty). A missing file is a ``FileNotFoundError``; a syntax
    error or a non-mapping is ``error`` naming the file, line and column."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise error(
                f"{path}{where}: not valid YAML: {problem}; fix the file (indent keys with spaces, one "
                "'key: value' per line)"
            ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} is a mapping of key: value, got {type(data).__name__}")
    return data
