"""Package integrity (issue 9.6): every way a package can be corrupt or tampered is refused by
name, the digest is reproducible with coreutils alone, and a hand edit of the manifest (the
thresholds 0.15 -> 0.99 edit that turned every defect into OK) no longer loads.

The corpus below is one table: (what was done to a copy of the demo package, what the refusal
must say). "resealed" cases recompute package.digest after the damage, as a buggy packager or a
deliberate editor would, so the check standing behind the digest is the one exercised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.config import ModelSettings
from models.loader import load_detector
from models.package import (
    MANIFEST_NAME,
    SEAL_NAME,
    load_package,
    package_digest,
    repackage,
    verify_package,
)
from models.types import ModelPackageError

Reseal = Callable[[Path], str]


def _m(pkg: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((pkg / MANIFEST_NAME).read_text())
    return doc


def _put(pkg: Path, doc: object) -> None:
    (pkg / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))


def _edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(pkg: Path) -> None:
        doc = _m(pkg)
        fn(doc)
        _put(pkg, doc)

    return apply


def _flip_model_byte(pkg: Path) -> None:
    model = pkg / _m(pkg)["model_file"]
    with model.open("r+b") as f:
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate_model(pkg: Path) -> None:
    model = pkg / _m(pkg)["model_file"]
    model.write_bytes(model.read_bytes()[:-100])


def _garbage_model_relisted(pkg: Path) -> None:
    """The model replaced by non-ONNX bytes, with the manifest's hash updated to match."""
    doc = _m(pkg)
    data = b"this is not an onnx model\n" * 100
    (pkg / doc["model_file"]).write_bytes(data)
    doc["files"][doc["model_file"]] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    _put(pkg, doc)


def _detect_only_model(pkg: Path) -> None:
    """A one-output network (a detection export, not segmentation), listed and sealed."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 256, 256])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 256, 256])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["output0"])], "g", [inp], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    doc = _m(pkg)
    (pkg / doc["model_file"]).write_bytes(data)
    doc["files"][doc["model_file"]] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    _put(pkg, doc)


def _symlinked_model(pkg: Path) -> None:
    """model.onnx replaced by a link to an identical copy outside the package."""
    doc = _m(pkg)
    outside = pkg.parent / "outside.onnx"
    shutil.copyfile(pkg / doc["model_file"], outside)
    (pkg / doc["model_file"]).unlink()
    (pkg / doc["model_file"]).symlink_to(outside)


def _symlinked_dir(pkg: Path) -> None:
    """A directory link: its files used to slip past the unlisted-file check."""
    target = pkg.parent / "elsewhere"
    target.mkdir()
    (target / "payload.bin").write_bytes(b"unverified")
    (pkg / "extras").symlink_to(target, target_is_directory=True)


def _symlinked_manifest(pkg: Path) -> None:
    real = pkg.parent / "real-manifest.json"
    shutil.move(pkg / MANIFEST_NAME, real)
    (pkg / MANIFEST_NAME).symlink_to(real)


def _dangling_symlink(pkg: Path) -> None:
    (pkg / "ghost").symlink_to(pkg.parent / "does-not-exist")


def _fifo(pkg: Path) -> None:
    os.mkfifo(pkg / "pipe")


def _unlisted_in_subdir(pkg: Path) -> None:
    (pkg / "sub").mkdir()
    (pkg / "sub" / "weights.bin").write_bytes(b"x")


def _nested_json(pkg: Path) -> None:
    text = (pkg / MANIFEST_NAME).read_text()
    deep = "[" * 100_000 + "]" * 100_000
    (pkg / MANIFEST_NAME).write_text(
        text.replace('"training": {', f'"deep": {deep}, "training": {{', 1)
    )


def _duplicate_key(pkg: Path) -> None:
    text = (pkg / MANIFEST_NAME).read_text()
    (pkg / MANIFEST_NAME).write_text(
        text.replace('"format": 1,', '"format": 1,\n  "name": "other",', 1)
    )


def _nan_threshold(pkg: Path) -> None:
    text = (pkg / MANIFEST_NAME).read_text()
    doc = _m(pkg)
    old = json.dumps(doc["thresholds"]["default"])
    (pkg / MANIFEST_NAME).write_text(text.replace(f'"default": {old}', '"default": NaN', 1))


def _seal_digest_edited(pkg: Path) -> None:
    seal = json.loads((pkg / SEAL_NAME).read_text())
    seal["digest"] = "0" * 64
    (pkg / SEAL_NAME).write_text(json.dumps(seal))


def _seal_extra_key(pkg: Path) -> None:
    seal = json.loads((pkg / SEAL_NAME).read_text())
    seal["note"] = "hi"
    (pkg / SEAL_NAME).write_text(json.dumps(seal))


# (id, damage, reseal afterwards, regex the refusal must match)
CORPUS: list[tuple[str, Callable[[Path], None], bool, str]] = [
    ("model-byte-flipped", _flip_model_byte, False, r"sha256 .* does not match the manifest"),
    ("model-truncated", _truncate_model, False, r"size is \d+ bytes but the manifest says"),
    ("model-not-onnx", _garbage_model_relisted, True, r"onnxruntime cannot load this model"),
    ("model-detect-only", _detect_only_model, True, r"model has 1 outputs.*task=segment"),
    ("model-missing", lambda p: (p / "model.onnx").unlink(), False, r"'model.onnx' .* is missing"),
    (
        "manifest-missing",
        lambda p: (p / MANIFEST_NAME).unlink(),
        False,
        r"manifest\.json not found",
    ),
    (
        "manifest-is-dir",
        lambda p: ((p / MANIFEST_NAME).unlink(), (p / MANIFEST_NAME).mkdir()),
        False,
        r"not a regular file",
    ),
    (
        "thresholds-hand-edit",
        _edit(
            lambda m: m["thresholds"].update(
                default=0.99, per_class={c: 0.99 for c in m["classes"]}
            )
        ),
        False,
        r"manifest\.json was changed after the package was sealed",
    ),
    (
        "plc-id-hand-edit",
        _edit(lambda m: m.update(plc_model_id=7)),
        False,
        r"changed after the package was sealed",
    ),
    (
        "manifest-whitespace-edit",
        lambda p: (p / MANIFEST_NAME).write_bytes((p / MANIFEST_NAME).read_bytes() + b" "),
        False,
        r"changed after the package was sealed",
    ),
    (
        "listed-hash-edited",
        _edit(lambda m: m["files"][m["model_file"]].update(sha256="0" * 64)),
        True,
        r"does not match the manifest",
    ),
    (
        "seal-missing",
        lambda p: (p / SEAL_NAME).unlink(),
        False,
        r"no package\.digest.*edge model repackage",
    ),
    ("seal-digest-edited", _seal_digest_edited, False, r"digest file was edited or damaged"),
    (
        "seal-not-json",
        lambda p: (p / SEAL_NAME).write_text("{oops"),
        False,
        r"package\.digest is not readable JSON",
    ),
    ("seal-extra-key", _seal_extra_key, False, r"not a package digest file"),
    (
        "unlisted-file",
        lambda p: (p / "other.onnx").write_bytes(b"x"),
        False,
        r"not listed .*other\.onnx",
    ),
    ("unlisted-in-subdir", _unlisted_in_subdir, False, r"not listed .*sub/weights\.bin"),
    ("symlinked-model", _symlinked_model, False, r"'model\.onnx' is a symlink"),
    ("symlinked-dir", _symlinked_dir, False, r"'extras' is a symlink"),
    ("symlinked-manifest", _symlinked_manifest, False, r"'manifest\.json' is a symlink"),
    ("dangling-symlink", _dangling_symlink, False, r"'ghost' is a symlink"),
    ("fifo-inside", _fifo, False, r"'pipe' is not a regular file"),
    (
        "manifest-bad-json",
        lambda p: (p / MANIFEST_NAME).write_text("{ not json"),
        True,
        r"not readable JSON",
    ),
    ("manifest-empty", lambda p: (p / MANIFEST_NAME).write_bytes(b""), True, r"not readable JSON"),
    (
        "manifest-latin1",
        lambda p: (p / MANIFEST_NAME).write_bytes(
            (p / MANIFEST_NAME).read_text().replace("scratch", "kratzer-\u00e4").encode("latin-1")
        ),
        True,
        r"manifest is not UTF-8",
    ),
    (
        "manifest-utf16",
        lambda p: (p / MANIFEST_NAME).write_bytes((p / MANIFEST_NAME).read_text().encode("utf-16")),
        True,
        r"byte-order mark",
    ),
    (
        "manifest-huge",
        lambda p: (p / MANIFEST_NAME).write_text('{"format": 1, "pad": "' + "x" * (2 << 20) + '"}'),
        True,
        r"larger than 1024 KiB",
    ),
    ("manifest-nested", _nested_json, True, r"nested too deeply"),
    ("manifest-duplicate-key", _duplicate_key, True, r"duplicate key 'name'"),
    ("manifest-nan", _nan_threshold, True, r"non-finite number NaN"),
    ("manifest-array", lambda p: _put(p, [1, 2]), True, r"must hold a JSON object, found list"),
    ("format-2", _edit(lambda m: m.update(format=2)), True, r"format 2 is not supported.*upgrade"),
    (
        "wrong-class-count",
        _edit(lambda m: m.update(classes=[*m["classes"], "dent"])),
        True,
        r"lists 5 classes .* predicts 4",
    ),
    (
        "wrong-input-size",
        _edit(lambda m: m.update(input_size=[320, 320])),
        True,
        r"model input is 256x256 but manifest input_size is 320x320",
    ),
    (
        "input-size-not-stride",
        _edit(lambda m: m.update(input_size=[250, 256])),
        True,
        r"input_size: .*multiples of 32",
    ),
    (
        "threshold-out-of-range",
        _edit(lambda m: m["thresholds"].update(default=1.5)),
        True,
        r"thresholds\.default",
    ),
    (
        "threshold-unknown-class",
        _edit(lambda m: m["thresholds"].update(per_class={"dent": 0.5})),
        True,
        r"unknown classes \['dent'\]",
    ),
    ("plc-id-out-of-range", _edit(lambda m: m.update(plc_model_id=70000)), True, r"plc_model_id"),
    (
        "duplicate-classes",
        _edit(lambda m: m.update(classes=["pit", "pit", "crack", "stain"])),
        True,
        r"duplicate class names \['pit'\]",
    ),
    ("unknown-manifest-key", _edit(lambda m: m.update(colour="red")), True, r"colour"),
    (
        "path-escape",
        _edit(lambda m: m["files"].update({"../escape": {"sha256": "0" * 64, "bytes": 1}})),
        True,
        r"'\.\./escape' must be a plain relative path",
    ),
    (
        "name-with-newline",
        _edit(lambda m: m["files"].update({"a\nb": {"sha256": "0" * 64, "bytes": 1}})),
        True,
        r"must be a plain relative path",
    ),
    (
        "model-file-unlisted",
        _edit(lambda m: m.update(model_file="ghost.onnx")),
        True,
        r"model_file 'ghost\.onnx' is not listed",
    ),
    ("task-detect", _edit(lambda m: m.update(task="detect")), True, r"task"),
]


def test_corpus_has_at_least_the_26_kinds_the_verifier_tried() -> None:
    assert len(CORPUS) >= 26
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(
    ("damage", "resealed", "message"),
    [c[1:] for c in CORPUS],
    ids=[c[0] for c in CORPUS],
)
def test_every_corrupt_or_tampered_package_is_refused_by_name(
    package_copy: Path,
    reseal: Reseal,
    damage: Callable[[Path], None],
    resealed: bool,
    message: str,
) -> None:
    load_package(package_copy)  # the copy is good before the damage
    damage(package_copy)
    if resealed:
        reseal(package_copy)
    with pytest.raises(ModelPackageError, match=message):
        verify_package(package_copy)
    # The daemon's loader path (no model check up front) refuses it too, and never by crashing.
    with pytest.raises(ModelPackageError):
        load_detector(ModelSettings(package=package_copy, warmup_runs=0))


def test_the_threshold_edit_of_the_incident_is_refused_and_a_resealed_edit_changes_the_id(
    package_copy: Path, reseal: Reseal
) -> None:
    """Issue 9.6: thresholds 0.15 -> 0.99 turned every defect into OK under the same model id."""
    before = load_package(package_copy)
    doc = _m(package_copy)
    doc["thresholds"]["default"] = 0.99
    doc["thresholds"]["per_class"] = {c: 0.99 for c in doc["classes"]}
    _put(package_copy, doc)
    with pytest.raises(ModelPackageError, match="Hand edits of a package"):
        load_package(package_copy)
    # Someone who ALSO recomputes the digest gets a package that loads - under another id.
    reseal(package_copy)
    after = load_package(package_copy)
    assert after.digest != before.digest
    assert after.info("onnxruntime").digest == after.digest != before.info("onnxruntime").digest
    assert after.manifest.name == before.manifest.name  # same name:version, different digest


def test_digest_is_reproducible_with_coreutils(demo_package: Path) -> None:
    """An auditor recomputes the digest with sha256sum/stat (module docstring), no Python."""
    pkg = load_package(demo_package)
    names = " ".join(sorted(pkg.manifest.files))
    script = (
        'set -e; cd "$1"; { echo "edge-inspect package v1"; '
        f'for f in manifest.json $(printf "%s\\n" {names} | LC_ALL=C sort); do '
        'echo "$f $(sha256sum < "$f" | cut -d" " -f1) $(stat -c %s "$f")"; done; } '
        '| sha256sum | cut -d" " -f1'
    )
    out = subprocess.run(
        ["bash", "-c", script, "_", str(demo_package)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == pkg.digest
    seal = json.loads((demo_package / SEAL_NAME).read_text())
    assert seal["digest"] == pkg.digest and seal["signatures"] == []


def test_digest_covers_every_file(package_copy: Path, tmp_path: Path) -> None:
    raw = (package_copy / MANIFEST_NAME).read_bytes()
    files = {"model.onnx": ("a" * 64, 10)}
    base = package_digest(raw, files)
    assert package_digest(raw, {"model.onnx": ("b" * 64, 10)}) != base
    assert package_digest(raw, {"model.onnx": ("a" * 64, 11)}) != base
    assert package_digest(raw, {**files, "x.json": ("a" * 64, 1)}) != base
    assert package_digest(raw + b" ", files) != base


def test_demo_package_is_sealed_and_its_manifest_unchanged(demo_package: Path) -> None:
    """Re-packaging the demo kept the manifest bytes (same weights, same content)."""
    pkg = load_package(demo_package)
    assert pkg.manifest.version == "1.0.0"
    assert pkg.model_sha256 == "cfd848579a49a2e1b8a21663240fb6758b831b64d9831003070ecbcc9f8e8dc7"
    assert sorted(p.name for p in demo_package.iterdir()) == [
        MANIFEST_NAME,
        "model.onnx",
        SEAL_NAME,
    ]


def test_repackage_seals_an_old_package_without_touching_its_manifest(
    package_copy: Path, tmp_path: Path
) -> None:
    good = load_package(package_copy)
    manifest_before = (package_copy / MANIFEST_NAME).read_bytes()
    (package_copy / SEAL_NAME).unlink()  # what a package from before digests looks like
    with pytest.raises(ModelPackageError, match="repackage"):
        load_package(package_copy)
    copy = repackage(package_copy, tmp_path / "sealed-copy")
    assert copy.digest == good.digest
    assert not (package_copy / SEAL_NAME).exists()  # --out leaves the source alone
    again = repackage(package_copy)
    assert again.digest == good.digest
    assert (package_copy / MANIFEST_NAME).read_bytes() == manifest_before


def test_repackage_refuses_a_corrupt_old_package(package_copy: Path) -> None:
    (package_copy / SEAL_NAME).unlink()
    _flip_model_byte(package_copy)
    with pytest.raises(ModelPackageError, match="does not match the manifest"):
        repackage(package_copy)
    assert not (package_copy / SEAL_NAME).exists()


def test_package_reached_through_a_link_is_fine(demo_package: Path, tmp_path: Path) -> None:
    """Only what is inside a package must be plain files; a `current -> pkg` link is normal."""
    link = tmp_path / "current"
    link.symlink_to(demo_package, target_is_directory=True)
    assert load_package(link).digest == load_package(demo_package).digest
