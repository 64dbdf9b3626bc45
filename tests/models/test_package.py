"""Model package integrity: what the daemon refuses to load, and that the messages say why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.package import (
    MANIFEST_NAME,
    Manifest,
    load_package,
    read_manifest,
    sha256_file,
    write_package,
)
from models.types import ModelPackageError


def _manifest(pkg: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pkg / MANIFEST_NAME).read_text())
    return data


def _write_manifest(pkg: Path, data: dict[str, Any], reseal: bool = True) -> None:
    """Rewrite the manifest and (by default) re-seal the package, so the check under test is
    reached instead of the digest refusing the edit first (that refusal has its own tests in
    test_package_integrity.py)."""
    (pkg / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    if reseal:
        from tests.models.conftest import _reseal

        _reseal(pkg)


def _fields(pkg: Path) -> dict[str, Any]:
    """Manifest fields of a package, as write_package takes them."""
    m = _manifest(pkg)
    for computed in ("format", "files", "model_file"):
        m.pop(computed)
    return m


def test_demo_package_loads_and_describes_itself(demo_package: Path) -> None:
    pkg = load_package(demo_package)
    m = pkg.manifest
    assert pkg.model_path.is_file() and pkg.model_path.suffix == ".onnx"
    assert m.format == 1 and m.task == "segment"
    assert 0 <= m.plc_model_id <= 65535
    assert pkg.model_sha256 == sha256_file(pkg.model_path)
    info = pkg.info("onnxruntime")
    assert info.classes == tuple(m.classes)
    assert info.input_size == tuple(m.input_size)
    assert set(info.thresholds) == set(m.classes)
    # The manifest file itself is accepted as the package path.
    assert load_package(demo_package / MANIFEST_NAME).root == pkg.root


def test_write_then_load_round_trip(package_copy: Path, tmp_path: Path) -> None:
    src = load_package(package_copy)
    note = tmp_path / "EVAL.md"
    note.write_text("evaluation report\n")
    fields = _fields(package_copy)
    fields["thresholds"] = {
        "default": 0.4,
        "per_class": {src.manifest.classes[0]: 0.6},
        "min_area_px": {src.manifest.classes[0]: 9},
    }
    out = write_package(tmp_path / "new", src.model_path, extra_files=[note], **fields)
    pkg = load_package(out)
    assert sorted(pkg.manifest.files) == sorted([src.manifest.model_file, "EVAL.md"])
    assert pkg.manifest.files["EVAL.md"].bytes == len("evaluation report\n")
    assert pkg.info("onnxruntime").thresholds[src.manifest.classes[0]] == 0.6
    assert pkg.file("EVAL.md").read_text() == "evaluation report\n"
    with pytest.raises(ModelPackageError, match="not listed"):
        pkg.file("nope.bin")


def test_tampered_model_is_refused(package_copy: Path) -> None:
    model = package_copy / _manifest(package_copy)["model_file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match=r"sha256 .* does not match the manifest") as e:
        load_package(package_copy)
    assert model.name in str(e.value) and "restore" in str(e.value)


def test_truncated_model_is_refused(package_copy: Path) -> None:
    model = package_copy / _manifest(package_copy)["model_file"]
    model.write_bytes(model.read_bytes()[:-100])
    with pytest.raises(ModelPackageError, match=r"size is \d+ bytes but the manifest says"):
        load_package(package_copy)


def test_wrong_hash_in_manifest_is_refused(package_copy: Path) -> None:
    m = _manifest(package_copy)
    m["files"][m["model_file"]]["sha256"] = "0" * 64
    _write_manifest(package_copy, m)
    with pytest.raises(ModelPackageError, match="does not match the manifest"):
        load_package(package_copy)


def test_missing_model_file_is_refused(package_copy: Path) -> None:
    m = _manifest(package_copy)
    (package_copy / m["model_file"]).unlink()
    with pytest.raises(ModelPackageError, match=rf"{m['model_file']}.* is missing"):
        load_package(package_copy)


def test_missing_manifest_is_refused(package_copy: Path) -> None:
    (package_copy / MANIFEST_NAME).unlink()
    with pytest.raises(ModelPackageError, match=r"manifest\.json not found"):
        load_package(package_copy)


def test_unlisted_file_is_refused(package_copy: Path) -> None:
    (package_copy / "other.onnx").write_bytes(b"not in the manifest")
    with pytest.raises(ModelPackageError, match=r"not listed .*other\.onnx"):
        load_package(package_copy)


def test_bare_model_file_is_refused(package_copy: Path) -> None:
    model = package_copy / _manifest(package_copy)["model_file"]
    with pytest.raises(ModelPackageError, match="bare model file"):
        load_package(model)


def test_nonexistent_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="does not exist"):
        load_package(tmp_path / "nowhere")


def test_wrong_class_count_is_refused(package_copy: Path) -> None:
    """A manifest whose class list disagrees with the network's output0 rows."""
    m = _manifest(package_copy)
    real = len(m["classes"])
    m["classes"] = [*m["classes"], "extra_class"]
    _write_manifest(package_copy, m)
    with pytest.raises(ModelPackageError, match=rf"lists {real + 1} classes .* predicts {real}"):
        load_package(package_copy)


def test_wrong_input_size_is_refused(package_copy: Path) -> None:
    m = _manifest(package_copy)
    h, w = m["input_size"]
    m["input_size"] = [h + 32, w]
    _write_manifest(package_copy, m)
    with pytest.raises(ModelPackageError, match="input_size"):
        load_package(package_copy)


@pytest.mark.parametrize("fmt", [2, 0, None, "1"])
def test_unknown_format_version_is_refused(package_copy: Path, fmt: object) -> None:
    m = _manifest(package_copy)
    if fmt is None:
        del m["format"]
    else:
        m["format"] = fmt
    _write_manifest(package_copy, m)
    with pytest.raises(ModelPackageError, match=r"format .* is not supported"):
        load_package(package_copy)


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda m: m.update(plc_model_id=70000), "plc_model_id"),
        (lambda m: m.update(unexpected=1), "unexpected"),
        (lambda m: m.update(classes=["a", "a"]), "duplicate"),
        (lambda m: m.update(task="detect"), "task"),
        (lambda m: m["thresholds"].update(per_class={"no_such_class": 0.5}), "no_such_class"),
        (lambda m: m["thresholds"].update(default=1.5), "thresholds.default"),
        (lambda m: m.update(model_file="ghost.onnx"), "ghost.onnx"),
        (lambda m: m["files"].update({"../escape": {"sha256": "0" * 64, "bytes": 1}}), "escape"),
        (lambda m: m.update(input_size=[300, 300]), "multiples of 32"),
    ],
    ids=[
        "plc-id",
        "extra-key",
        "dup-classes",
        "task",
        "threshold-class",
        "threshold-range",
        "model-file",
        "path-escape",
        "input-size",
    ],
)
def test_invalid_manifest_fields_are_named(package_copy: Path, edit: Any, where: str) -> None:
    m = _manifest(package_copy)
    edit(m)
    _write_manifest(package_copy, m)
    with pytest.raises(ModelPackageError, match="invalid manifest") as e:
        load_package(package_copy)
    assert where in str(e.value)


def test_corrupt_manifest_json_is_refused(package_copy: Path) -> None:
    (package_copy / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(ModelPackageError, match="not readable JSON"):
        read_manifest(package_copy / MANIFEST_NAME)


def test_write_package_refuses_class_mismatch_and_leaves_no_manifest(
    package_copy: Path, tmp_path: Path
) -> None:
    src = load_package(package_copy)
    fields = _fields(package_copy)
    fields["classes"] = fields["classes"][:-1] or ["x", "y"]
    out = tmp_path / "bad"
    with pytest.raises(ModelPackageError, match="classes"):
        write_package(out, src.model_path, **fields)
    assert not (out / MANIFEST_NAME).exists()


def test_write_package_refuses_non_empty_dir_unless_overwrite(
    package_copy: Path, tmp_path: Path
) -> None:
    src = load_package(package_copy)
    out = tmp_path / "dst"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    fields = _fields(package_copy)
    with pytest.raises(ModelPackageError, match="not empty"):
        write_package(out, src.model_path, **fields)
    write_package(out, src.model_path, overwrite=True, **fields)
    assert not (out / "stale.txt").exists()
    assert load_package(out).model_sha256 == src.model_sha256


def test_write_package_rejects_computed_fields(package_copy: Path, tmp_path: Path) -> None:
    src = load_package(package_copy)
    with pytest.raises(ModelPackageError, match="computes 'files'"):
        write_package(tmp_path / "x", src.model_path, files={}, **_fields(package_copy))


def test_manifest_model_is_strict() -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        Manifest.model_validate(
            {
                "name": "n",
                "version": "1",
                "plc_model_id": 1,
                "classes": ["a"],
                "input_size": [320, 320],
                "model_file": "m.onnx",
                "files": {"m.onnx": {"sha256": "0" * 64, "bytes": 1}},
                "created_at": "2026-01-01T00:00:00Z",
                "colour": "red",
            }
        )


def test_copy_of_package_elsewhere_still_loads(demo_package: Path, tmp_path: Path) -> None:
    """Packages are relocatable: nothing in the manifest is an absolute path."""
    dst = tmp_path / "moved" / "pkg"
    shutil.copytree(demo_package, dst)
    assert load_package(dst).root == dst.resolve()


def test_an_unchanged_package_opens_onnxruntime_once(
    package_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP re-verifies the package: the same digest (same bytes) must not open a second
    session in the daemon (each left native heap behind); a changed package is checked again."""
    import models.package as mp

    opened: list[Path] = []
    real = mp._check_onnx_model

    def counting(manifest: Manifest, model_path: Path) -> None:
        opened.append(model_path)
        real(manifest, model_path)

    monkeypatch.setattr(mp, "_check_onnx_model", counting)
    monkeypatch.setattr(mp, "_ONNX_CHECKED", mp.OrderedDict())
    for _ in range(3):
        load_package(package_copy)
    assert len(opened) == 1
    m = _manifest(package_copy)
    m["classes"] = [*m["classes"], "extra_class"]  # a new digest: checked, and refused
    _write_manifest(package_copy, m)
    for _ in range(2):
        with pytest.raises(ModelPackageError, match="classes"):
            load_package(package_copy)
    assert len(opened) == 3
