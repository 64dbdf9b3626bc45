"""The model store (issue 12): verified packages by name and version, atomic imports that leave
the store unchanged on refusal, immutable versions, and the daemon's state file."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from models.package import MANIFEST_NAME, load_package
from models.signing import generate_keypair
from models.store import STATE_NAME, ModelStore, StoreError, StoreState, default_store_root
from models.types import ModelPackageError

REPO = Path(__file__).resolve().parents[2]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file in the store (lock file aside) and its hash: 'nothing changed' made checkable."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _variant(src: Path, dst_root: Path, reseal: Callable[[Path], str], **edit: object) -> Path:
    """A copy of ``src`` with manifest fields changed and a valid digest (a real new package)."""
    import shutil

    dst = dst_root / "variant"
    shutil.copytree(src, dst)
    doc = json.loads((dst / MANIFEST_NAME).read_text())
    doc.update(edit)
    (dst / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    reseal(dst)
    load_package(dst)
    return dst


def test_import_verifies_copies_and_is_idempotent(demo_package: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    src = load_package(demo_package)
    pkg = store.import_package(demo_package)
    assert pkg.root == (tmp_path / "store" / "synth-demo" / "1.0.0").resolve()
    assert pkg.digest == src.digest and pkg.ref == "synth-demo:1.0.0"
    before = _snapshot(store.root)
    again = store.import_package(demo_package)
    assert again.digest == pkg.digest and _snapshot(store.root) == before
    assert not list(store.root.glob(".tmp-*"))
    [entry] = store.list()
    assert (entry.ref, entry.digest, entry.plc_model_id, entry.error) == (
        "synth-demo:1.0.0",
        src.digest,
        1,
        None,
    )
    assert store.get("synth-demo:1.0.0").digest == src.digest
    assert store.resolve("synth-demo:1.0.0").digest == src.digest
    assert store.resolve(demo_package).root == pkg.root  # a path is imported (here: already)


def test_a_different_package_under_an_existing_version_is_refused(
    demo_package: Path, tmp_path: Path, reseal: Callable[[Path], str]
) -> None:
    store = ModelStore(tmp_path / "store")
    store.import_package(demo_package)
    before = _snapshot(store.root)
    other = _variant(demo_package, tmp_path, reseal, plc_model_id=9)
    with pytest.raises(StoreError, match=r"already holds synth-demo:1\.0\.0 .* new version"):
        store.import_package(other)
    assert _snapshot(store.root) == before
    newer = _variant(demo_package, tmp_path / "n", reseal, version="1.0.2")
    assert store.import_package(newer).ref == "synth-demo:1.0.2"
    assert [e.ref for e in store.list()] == ["synth-demo:1.0.0", "synth-demo:1.0.2"]


def test_a_bad_package_is_refused_and_the_store_does_not_change(
    package_copy: Path, demo_package: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "store")
    store.import_package(demo_package)
    before = _snapshot(store.root)
    doc = json.loads((package_copy / MANIFEST_NAME).read_text())
    doc["version"] = "6.6.6"
    doc["thresholds"]["default"] = 0.99
    (package_copy / MANIFEST_NAME).write_text(json.dumps(doc))  # hand edit, not resealed
    with pytest.raises(ModelPackageError, match="changed after the package was sealed"):
        store.import_package(package_copy)
    assert _snapshot(store.root) == before
    assert not (store.root / "synth-demo" / "6.6.6").exists()


def test_trusted_keys_gate_the_import(package_copy: Path, tmp_path: Path) -> None:
    from models.package import sign_package

    priv, pub = generate_keypair(tmp_path / "k")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelPackageError, match="not signed"):
        store.import_package(package_copy, [pub])
    assert store.list() == []
    store.import_package(package_copy)  # first imported unsigned (no keys required then)
    with pytest.raises(ModelPackageError, match="not signed"):
        store.get("synth-demo:1.0.0", [pub])
    sign_package(package_copy, priv)
    pkg = store.import_package(package_copy, [pub])  # same bytes, now signed: seal updated
    assert pkg.signed_by and store.get(pkg.ref, [pub]).signed_by == pkg.signed_by
    assert pkg.digest == load_package(package_copy).digest


def test_a_failed_copy_leaves_nothing_behind(
    demo_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.store as store_mod

    calls = {"n": 0}
    real = store_mod._copy_synced

    def flaky(src: Path, dst: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(store_mod, "_copy_synced", flaky)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(OSError, match="No space"):
        store.import_package(demo_package)
    assert store.list() == [] and not list(store.root.glob(".tmp-*"))
    monkeypatch.setattr(store_mod, "_copy_synced", real)
    assert store.import_package(demo_package).ref == "synth-demo:1.0.0"


def test_damage_inside_the_store_is_caught(demo_package: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    pkg = store.import_package(demo_package)
    with (pkg.root / "model.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ModelPackageError, match="does not match the manifest"):
        store.get(pkg.ref)
    [entry] = store.list(verify=True)
    assert entry.error and "does not match" in entry.error
    with pytest.raises(StoreError, match="damaged package"):
        store.import_package(demo_package)  # never silently replaced


def test_refs_are_checked(demo_package: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.import_package(demo_package)
    with pytest.raises(StoreError, match="not a model reference"):
        store.get("synth-demo")
    with pytest.raises(StoreError, match=r"synth-demo:9 is not in the model store .*1\.0\.0"):
        store.get("synth-demo:9")
    with pytest.raises(StoreError, match="neither a package directory nor NAME:VERSION"):
        store.resolve(str(tmp_path / "no such dir"))


def test_state_is_persisted_atomically_and_shown_in_the_list(
    demo_package: Path, tmp_path: Path, reseal: Callable[[Path], str]
) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.read_state() == StoreState()
    store.import_package(demo_package)
    store.import_package(_variant(demo_package, tmp_path, reseal, version="1.0.1"))
    written = store.write_state(active="synth-demo:1.0.1", previous="synth-demo:1.0.0")
    assert written.updated_at
    assert ModelStore(store.root).read_state() == written  # another process reads the same
    roles = {e.ref: e.roles for e in store.list()}
    assert roles == {"synth-demo:1.0.0": ("previous",), "synth-demo:1.0.1": ("active",)}
    with pytest.raises(StoreError, match="not in the model store"):
        store.write_state(active="synth-demo:2.0.0")
    assert store.read_state() == written  # refused write changed nothing
    assert not list(store.root.glob(f".{STATE_NAME}.*"))  # no temp file left


@pytest.mark.parametrize(
    "text",
    ["{oops", '{"active": 5}', '{"active": "x:1", "colour": "red"}', "[]", "\xff\xfe"],
    ids=["json", "type", "extra-key", "array", "binary"],
)
def test_a_bad_state_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    store = ModelStore(tmp_path / "store")
    store.root.mkdir()
    (store.root / STATE_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(StoreError, match=STATE_NAME):
        store.read_state()
    assert store.list() == []  # listing still works


def test_two_processes_importing_at_once_end_with_one_copy(
    demo_package: Path, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    code = (
        "import sys; from models.store import ModelStore; "
        "print(ModelStore(sys.argv[1]).import_package(sys.argv[2]).digest)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root), str(demo_package)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o[0].strip() for o in outs}) == 1
    assert [e.ref for e in ModelStore(root).list()] == ["synth-demo:1.0.0"]
    assert not list(root.glob(".tmp-*"))


def test_default_store_root_is_next_to_the_spool(tmp_path: Path) -> None:
    assert default_store_root(None, tmp_path / "var" / "uplink") == tmp_path / "var" / "models"
    assert default_store_root(Path("/var/lib/edge/models"), tmp_path) == Path(
        "/var/lib/edge/models"
    )
