"""Group keys and the stratified group split.

Near-duplicates (one part photographed under several lights, consecutive video frames) must never
straddle train and test, or the test score measures memory. So images are grouped first (by a
regex over the relative path, optionally clustering numeric keys, or by a CSV column) and whole
groups are assigned to splits, per stratum, so every split gets every class where there are
enough groups.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models.datasets.yolo import SPLITS, assign_splits, split_counts

Stratify = Literal["class", "defect", "none"]
OWN = "file:"
"""Prefix of the key of a file that fell back to its own group."""


@dataclass(frozen=True, slots=True)
class GroupRule:
    """How group keys are made; nothing set: each image is its own group."""

    regex: str | None = None
    gap: int | None = None
    csv: Path | None = None
    column: str = "group"

    def describe(self) -> str:
        if self.csv is not None:
            how = f"column {self.column!r} of {self.csv}"
        elif self.regex is not None:
            how = f"regex '{self.regex}'"
        else:
            return "each image its own group"
        return how + (
            f", numeric keys clustered with gap {self.gap}" if self.gap is not None else ""
        )


@dataclass(slots=True)
class Groups:
    key_of: dict[str, str]
    """relative path -> group key"""
    fallback: dict[str, list[str]] = field(default_factory=dict)
    """why -> files that became their own group"""


def cluster_numbers(nums: Sequence[int], gap: int) -> list[int]:
    """Cluster index per number (in the given order): sort, new cluster when the gap exceeds
    ``gap`` (the magnetic-tile rule: consecutive ``num`` values are shots of one tile)."""
    order = sorted(range(len(nums)), key=lambda i: nums[i])
    group = [0] * len(nums)
    g, prev = 0, None
    for i in order:
        if prev is not None and nums[i] - prev > gap:
            g += 1
        group[i] = g
        prev = nums[i]
    return group


def _csv_keys(rule: GroupRule, rels: Sequence[str]) -> dict[str, str]:
    """CSV rows (``file`` + the group column) matched by relative path, else by unique file name."""
    assert rule.csv is not None
    by_name: dict[str, list[str]] = {}
    for r in rels:
        by_name.setdefault(Path(r).name, []).append(r)
    out: dict[str, str] = {}
    with rule.csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "file" not in cols or rule.column not in cols:
            raise ValueError(f"{rule.csv}: needs columns 'file' and {rule.column!r} (has {cols})")
        relset = set(rels)
        for row in reader:
            f = (row["file"] or "").strip().replace("\\", "/")
            key = (row[rule.column] or "").strip()
            targets = [f] if f in relset else by_name.get(Path(f).name, [])
            if len(targets) == 1 and key:
                out[targets[0]] = key
    return out


def group_keys(rels: Sequence[str], rule: GroupRule) -> Groups:
    """Group key of every relative path; files no rule covers become their own group."""
    if rule.regex is not None and rule.csv is not None:
        raise ValueError("--group-regex and --group-csv exclude each other")
    if rule.gap is not None and rule.regex is None and rule.csv is None:
        raise ValueError("--group-gap clusters the keys of --group-regex or --group-csv: give one")
    if rule.gap is not None and rule.gap < 0:
        raise ValueError("--group-gap must be >= 0")
    groups = Groups({})
    raw: dict[str, str] = {}
    if rule.csv is not None:
        raw = _csv_keys(rule, rels)
        missing = [r for r in rels if r not in raw]
        if missing:
            groups.fallback["not in the group CSV"] = missing
    elif rule.regex is not None:
        try:
            rx = re.compile(rule.regex)
        except re.error as e:
            raise ValueError(f"--group-regex {rule.regex!r}: {e}") from e
        for r in rels:
            m = rx.search(r)
            key = (m.group(1) if rx.groups else m.group(0)) if m else None
            if not key:
                groups.fallback.setdefault("group regex did not match", []).append(r)
            else:
                raw[r] = key
    if rule.gap is not None:
        numeric = {r: int(k) for r, k in raw.items() if k.strip().lstrip("-").isdigit()}
        bad = [r for r in raw if r not in numeric]
        if bad:
            groups.fallback["group key not a whole number (needed by --group-gap)"] = bad
        files = sorted(numeric)
        idx = cluster_numbers([numeric[r] for r in files], rule.gap)
        lo: dict[int, int] = {}
        hi: dict[int, int] = {}
        for r, g in zip(files, idx, strict=True):
            lo[g] = min(lo.get(g, numeric[r]), numeric[r])
            hi[g] = max(hi.get(g, numeric[r]), numeric[r])
        raw = {
            r: (f"{lo[g]}" if lo[g] == hi[g] else f"{lo[g]}..{hi[g]}")
            for r, g in zip(files, idx, strict=True)
        }
    for r in rels:
        groups.key_of[r] = raw.get(r, OWN + r)
    return groups


def natural_key(key: str) -> tuple[object, ...]:
    """Sort '9' before '10' (cluster keys are numbers; a stable, human order for the rest)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


def strata_of(
    group_classes: Mapping[str, set[int]], classes: Sequence[str], stratify: Stratify
) -> dict[str, list[str]]:
    """Stratum -> group keys (naturally sorted), strata in a fixed order.

    ``class``: a group's stratum is the rarest class in it (fewest groups), so rare classes are
    spread over the splits first; ``ok`` for defect-free groups. ``defect``: defect vs ok groups
    (the magnetic-tile rule). ``none``: one stratum. The order (and so each stratum's seed) depends
    only on the class list, not on which strata happen to be present.
    """
    names: list[str]
    if stratify == "class":
        names = [*classes, "ok"]
        n_groups = Counter(c for cs in group_classes.values() for c in cs)
    elif stratify == "defect":
        names = ["defect", "ok"]
    elif stratify == "none":
        names = ["all"]
    else:
        raise ValueError(f"--stratify {stratify!r}: want class, defect or none")
    out: dict[str, list[str]] = {n: [] for n in names}
    for key, cs in group_classes.items():
        if stratify == "none":
            name = "all"
        elif not cs:
            name = "ok"
        elif stratify == "defect":
            name = "defect"
        else:
            name = classes[min(cs, key=lambda c: (n_groups[c], c))]
        out[name].append(key)
    return {n: sorted(keys, key=natural_key) for n, keys in out.items()}


def _small_stratum(
    keys: Sequence[str], fractions: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Too few groups to fill every split: train first, then the larger held-out share (test on a
    tie: a class seen once in test is at least measured)."""
    order = list(keys)
    np.random.default_rng(seed).shuffle(order)
    held = sorted(
        (s for s in ("test", "val") if fractions[SPLITS.index(s)] > 0),
        key=lambda s: -fractions[SPLITS.index(s)],
    )
    seq = (["train"] if fractions[0] > 0 else []) + held
    return {k: seq[i] if i < len(seq) else seq[0] for i, k in enumerate(order)}


def split_groups(
    strata: Mapping[str, Sequence[str]], fractions: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Group key -> split; each stratum split on its own, reproducibly (seed * 1000 + position)."""
    out: dict[str, str] = {}
    for pos, keys in enumerate(strata.values(), start=1):
        if not keys:
            continue
        salt = seed * 1000 + pos
        try:
            split_counts(len(keys), fractions)
        except ValueError:
            out.update(_small_stratum(keys, fractions, salt))
        else:
            out.update(assign_splits(list(keys), fractions, salt))
    return out


def cover_train(
    split_of: dict[str, str], group_classes: Mapping[str, set[int]], n_classes: int
) -> list[str]:
    """Move one group into train for each class that has >= 3 groups but none in train (strata by
    rarest class cannot promise it when classes share groups); returns the moved keys."""
    moved: list[str] = []
    for c in range(n_classes):
        keys = sorted((k for k, cs in group_classes.items() if c in cs), key=natural_key)
        if len(keys) < 3 or any(split_of[k] == "train" for k in keys):
            continue
        per = Counter(split_of[k] for k in keys)
        donor = max(("val", "test"), key=lambda s: (per[s], s == "val"))
        key = next(k for k in keys if split_of[k] == donor)
        split_of[key] = "train"
        moved.append(key)
    return moved
