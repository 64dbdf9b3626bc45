"""`edge swap-model`: a verified package goes into the YAML (comments kept), a bad one never."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.core.conftest import ROOT

EDGE = [sys.executable, "-m", "edge"]


def test_swap_model_updates_yaml_keeping_comments_and_refuses_tampered(
    tmp_path: Path, demo_package: Path
) -> None:
    config = tmp_path / "line.yaml"
    text = (ROOT / "configs" / "demo.yaml").read_text()
    text = text.replace("../models/demo/samples", str(ROOT / "models/demo/samples"))
    config.write_text(text)
    good = tmp_path / "pkg-good"
    shutil.copytree(demo_package, good)
    bad = tmp_path / "pkg-bad"
    shutil.copytree(demo_package, bad)
    with (bad / "model.onnx").open("r+b") as f:  # flip one byte of the weights
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))

    r = subprocess.run(
        [*EDGE, "swap-model", str(bad), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "refused" in r.stderr and "sha256" in r.stderr.lower(), r.stderr
    assert config.read_text() == text, "a refused package must leave the YAML untouched"

    r = subprocess.run(
        [*EDGE, "swap-model", str(good), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    after = config.read_text()
    assert f"package: {good}" in after
    assert "# The demo line: runs anywhere" in after  # comments survive the edit
    assert after.replace(f"package: {good}", "package: ../models/demo/package") == text
