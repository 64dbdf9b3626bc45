"""Edit values in a line's YAML without destroying its comments or layout (ruamel round-trip).

Used by `edge calibrate` (exposure, ROI) and `edge swap-model` (model package): a technician's
comments in the line's YAML are documentation of why a value is what it is.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def update_yaml(path: Path, updates: Sequence[tuple[Sequence[str | int], Any]]) -> None:
    """Set values in a YAML file, keeping its comments and layout (ruamel round-trip).

    Missing mappings on the way are created. The result is validated as a line config before it
    replaces the file (atomically), so a calibration can never leave a line unable to start.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    from edge.config import ConfigError, load_config

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # the project's style: "  - id: cam0"
    yaml.width = 4096  # never re-wrap a long value (paths) the author wrote on one line
    doc = yaml.load(path.read_text(encoding="utf-8"))
    for keys, value in updates:
        node, i = doc, 0
        while i < len(keys) - 1 and _has(node, keys[i]):
            node, i = node[keys[i]], i + 1
        new = CommentedMap(value) if isinstance(value, dict) else value
        for key in reversed(keys[i + 1 :]):  # build what is missing, then insert it once
            new = CommentedMap({key: new})
        _append(node, keys[i], new)
    st = path.stat()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".yaml")
    try:
        # mkstemp makes the file 0600 and ours: keep the line YAML's mode and owner, or the
        # service user may no longer read it at the next restart (exit 2).
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(PermissionError):
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            load_config(Path(tmp))
        except ConfigError as exc:
            problems = "\n".join(exc.problems)
            raise ValueError(f"the updated config would not validate:\n{problems}") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, list):
        return isinstance(key, int) and key < len(node)
    return isinstance(node, dict) and key in node and node[key] is not None


def _deepest(node: Any, key: Any) -> tuple[Any, Any]:
    """The mapping and key of the last scalar under ``node[key]`` (where ruamel hangs the
    comments and blank lines that follow a block)."""
    from ruamel.yaml.comments import CommentedMap

    while isinstance(node[key], CommentedMap) and len(node[key]):
        node, key = node[key], list(node[key].keys())[-1]
    return node, key


def _append(node: Any, key: str | int, value: Any) -> None:
    """Set ``node[key]``; a NEW key goes last, and the blank lines that separated the mapping
    from the next section move below it (ruamel keeps them on the previous last key, which
    would otherwise put the new key after the gap, visually inside the next section)."""
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.tokens import CommentToken

    if not isinstance(node, CommentedMap):
        node[key] = value
        return
    if key in node:  # replacing: a gap below the old block stays below the new one
        old_map, old_key = _deepest(node, key)
        entry = old_map.ca.items.get(old_key)
        node[key] = value
        if entry and isinstance(value, CommentedMap) and len(value):
            new_map, new_key = _deepest(node, key)
            new_map.ca.items[new_key] = entry
        return
    keys = list(node.keys())
    node[key] = value
    if not keys:
        return
    prev_map, prev_key = _deepest(node, keys[-1])
    entry = prev_map.ca.items.get(prev_key)
    tok = entry[2] if entry and len(entry) > 2 else None
    if tok is None or "\n" not in tok.value:
        return
    nl = tok.value.index("\n")
    head, tail = tok.value[: nl + 1], tok.value[nl + 1 :]
    if not tail or tail.strip("\n"):
        return  # nothing but the line end, or a real comment follows: leave it in place
    tok.value = head
    new_map, new_key = _deepest(node, key)
    new_map.ca.items[new_key] = [None, None, CommentToken("\n" + tail, tok.start_mark, None), None]
