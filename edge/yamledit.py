"""Edit one value in a line's YAML without destroying its comments (ruamel round-trip)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML


def set_yaml_value(path: Path, keys: Sequence[str | int], value: Any) -> None:
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(path.read_text(encoding="utf-8"))
    node = doc
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
