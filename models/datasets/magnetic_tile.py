"""The magnetic-tile data set (Huang et al.): a preset of the mask-folder importer.

The same physical tile was photographed under six lighting settings with consecutive ``num``
values; a per-image split would put near-copies of test tiles into training. So images are
grouped by tile (``num_(\\d+)`` clustered: new group when the gap exceeds ``gap``) and whole groups
are split, separately for groups with and without defects so every split gets both. Equivalent
command line::

    edge model import-data SRC --out DIR --format masks --images-subdir Imgs \\
        --class-map MT_Blowhole=blowhole,MT_Break=break,MT_Crack=crack,MT_Fray=fray,\\
MT_Uneven=uneven,MT_Free= --group-regex 'num_(\\d+)' --group-gap 100 --stratify defect

The data has no licence: it is converted into a working directory, never into a package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.datasets.grouping import GroupRule, cluster_numbers
from models.datasets.importer import BarFactory, ImportOptions, import_data

FOLDERS: dict[str, str | None] = {
    "MT_Blowhole": "blowhole",
    "MT_Break": "break",
    "MT_Crack": "crack",
    "MT_Fray": "fray",
    "MT_Uneven": "uneven",
    "MT_Free": None,
}
CLASSES: tuple[str, ...] = ("blowhole", "break", "crack", "fray", "uneven")
GROUP_REGEX = r"num_(\d+)"
SOURCE_NOTE = {"source": "magnetic-tile (Huang et al. 2020); research use, not redistributed"}

tile_groups = cluster_numbers
"""Group index per num (kept under its old name: the tests and notes use it)."""


def options(
    *, seed: int = 0, gap: int = 100, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> ImportOptions:
    """The importer options that reproduce the original converter's split exactly."""
    return ImportOptions(
        format="masks",
        class_map=FOLDERS,
        images_subdir="Imgs",
        group=GroupRule(regex=GROUP_REGEX, gap=gap),
        stratify="defect",
        fractions=fractions,
        seed=seed,
        yaml_extra=SOURCE_NOTE,
    )


def convert(
    src: Path,
    out: Path,
    *,
    seed: int = 0,
    gap: int = 100,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: BarFactory | None = None,
) -> dict[str, Any]:
    """Write ``out`` (images, labels, data.yaml, split.json, import-report.json); the summary."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory; point --src at the magnetic-tile folder")
    done = import_data(src, out, options(seed=seed, gap=gap, fractions=fractions), progress)
    split = done.split
    empty = [
        f"{s['file'].split('/')[0]}/{s['file'].rsplit('/', 1)[-1]}"
        for s in done.report["skipped"]["files"]
        if s["reason"].startswith("empty mask")
    ]
    return {
        "source": split["source"],
        "seed": seed,
        "gap": gap,
        "groups": split["groups"],
        "defect_groups": sum(split["strata"].get("defect", {}).values()),
        "groups_per_split": split["groups_per_split"],
        "splits": split["splits"],
        "skipped_empty_masks": empty,
        "split_of_group": split["split_of_group"],
    }
