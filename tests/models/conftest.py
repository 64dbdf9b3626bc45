"""Shared fixtures for the models tests (runtime + training helpers add fixtures here; never edit
another's)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_PACKAGE = Path(os.environ.get("EDGE_TEST_MODEL_PACKAGE", REPO / "models" / "demo" / "package"))
"""The package the runtime tests run on; EDGE_TEST_MODEL_PACKAGE points them at another one."""


# ---- models-runtime fixtures ----


@pytest.fixture(scope="session")
def ultralytics_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Environment in which ultralytics imports and predicts with no network.

    Set before ultralytics is first imported: it reads YOLO_CONFIG_DIR at import. Its font check
    ignores YOLO_OFFLINE, so a TTF (matplotlib's DejaVuSans) is put where it looks.
    """
    cfg = tmp_path_factory.mktemp("yolo-config")
    fonts = cfg / "Ultralytics"
    fonts.mkdir()
    import matplotlib

    ttf = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copyfile(ttf, fonts / name)
    env = {
        "YOLO_CONFIG_DIR": str(cfg),
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "false",
        "YOLO_VERBOSE": "false",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from ultralytics import settings

    settings.update({"sync": False})
    yield cfg
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def demo_package() -> Path:
    """The committed demo model package (models/demo/package)."""
    if not (DEMO_PACKAGE / "manifest.json").is_file():
        pytest.fail(
            f"{DEMO_PACKAGE} has no manifest.json: the bundled demo model package is missing "
            "(it is committed; see models/README or `edge model export`)"
        )
    return DEMO_PACKAGE


@pytest.fixture()
def package_copy(demo_package: Path, tmp_path: Path) -> Path:
    """A private copy of the demo package that a test may tamper with."""
    dst = tmp_path / "pkg"
    shutil.copytree(demo_package, dst)
    return dst


@pytest.fixture(scope="session")
def synthetic_images() -> Callable[[list[tuple[int, int]], int], list[np.ndarray]]:
    """Factory: synthetic defect images (the demo model's own generator) at the given shapes.

    BGR copies of the generator's grayscale renders, so the mono and the BGR paths can both be
    exercised from the same pixels.
    """
    import cv2

    from models.synth.generator import SynthConfig, generate_sample

    def make(shapes: list[tuple[int, int]], seed: int = 7) -> list[np.ndarray]:
        out = []
        for i, (h, w) in enumerate(shapes):
            cfg = SynthConfig.model_validate({"width": w, "height": h, "defect_fraction": 1.0})
            s = generate_sample(seed, i, cfg)
            out.append(cv2.cvtColor(s.image, cv2.COLOR_GRAY2BGR))
        return out

    return make


# ---- package-integrity fixtures ----


def _reseal(pkg: Path) -> str:
    """Recompute ``package.digest`` for the package exactly as it is now, bypassing every check.

    Makes a *consistently sealed* bad package (what a buggy packager, or someone who edits the
    manifest and recomputes the digest, would produce), so a test reaches the check that stands
    behind the digest (class count, input size, ...). Returns the new digest.
    """
    import hashlib
    import json as _json

    from models.package import MANIFEST_NAME, SEAL_NAME, Seal, package_digest

    raw = (pkg / MANIFEST_NAME).read_bytes()
    try:
        listed = _json.loads(raw).get("files", {})
    except (ValueError, AttributeError, RecursionError):
        listed = {}
    hashes: dict[str, tuple[str, int]] = {}
    for name in listed if isinstance(listed, dict) else {}:
        p = pkg / name
        if p.is_file():
            data = p.read_bytes()
            hashes[name] = (hashlib.sha256(data).hexdigest(), len(data))
    digest = package_digest(raw, hashes)
    seal = Seal(hashlib.sha256(raw).hexdigest(), digest)
    (pkg / SEAL_NAME).write_bytes(seal.to_bytes())
    return digest


@pytest.fixture(scope="session")
def reseal() -> Callable[[Path], str]:
    """``reseal(pkg)``: re-seal a tampered package so the check behind the digest is reached."""
    return _reseal
