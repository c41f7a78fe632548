"""Reading YAML config files (training recipes, ``longgen generate --config``): one loader, one message.

Torch-free, so the CLI can read a generate config before it imports the model stack. Both config systems
then hand the mapping to OmegaConf (typed merge, unknown keys by name).
"""

from __future__ import annotations

import os
from typing import Any

BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
"""The words a boolean setting takes as a string (YAML 1.2 keeps ``yes`` / ``no`` / ``on`` / ``off`` as strings)."""


def yaml_load(stream: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans: only ``true`` / ``false`` are booleans, so ``no``, ``off``,
    ``yes`` and ``on`` stay strings (accelerate's ``mixed_precision: no``; a bool field still takes them, as
    OmegaConf reads those words as booleans)."""
    import yaml

    return yaml.load(stream, Loader=_yaml12_loader())


_LOADER: list[Any] = []


def _yaml12_loader() -> Any:
    if not _LOADER:
        import re

        import yaml

        bool_tag = "tag:yaml.org,2002:bool"

        class Loader(yaml.SafeLoader):
            pass

        Loader.yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }
        Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
        _LOADER.append(Loader)
    return _LOADER[0]


def read_yaml(path: str | os.PathLike, *, what: str = "config", error: type[Exception] = ValueError) -> dict[str, Any]:
    """A YAML file as a mapping (``{}`` when empty). A missing file is a ``FileNotFoundError``; a syntax
    error or a non-mapping is ``error`` naming the file, line and column."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    with open(path) as fh:
        try:
            data = yaml_load(fh)
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
