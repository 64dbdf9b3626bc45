"""Signed packages (issue 12): ed25519 over the package digest, enforced when trusted keys are
given; OpenSSL (a peer this project did not write) verifies the same signature."""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from models.config import ModelSettings
from models.loader import load_detector
from models.package import (
    MANIFEST_NAME,
    SEAL_NAME,
    load_package,
    sign_package,
    verify_package,
    write_package,
)
from models.signing import (
    SIGN_CONTEXT,
    SigningKeyError,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from models.types import ModelPackageError


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys", "release")


@pytest.fixture()
def other_keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys", "intruder")


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    assert load_public_key(pub).key_id == load_public_key(pub).key_id
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(priv.parent, "release")


def test_open_or_wrong_key_files_are_refused(keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, _pub = keys
    priv.chmod(0o644)
    with pytest.raises(SigningKeyError, match="readable by other users"):
        load_private_key(priv)
    priv.chmod(0o600)
    with pytest.raises(SigningKeyError, match="is a PRIVATE key"):
        load_public_key(priv)
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_public_key(junk)
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_public_key(tmp_path / "nope.pub")


def test_signed_package_verifies_with_the_trusted_key_and_openssl(
    package_copy: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    priv, pub = keys
    before = load_package(package_copy).digest
    pkg = sign_package(package_copy, priv)
    assert pkg.digest == before  # signing does not change what the package is
    assert pkg.signed_by == (load_public_key(pub).key_id,)
    assert verify_package(package_copy, [pub]).signed_by == pkg.signed_by

    # Independent check: OpenSSL verifies the raw ed25519 signature over the documented message.
    entry = json.loads((package_copy / SEAL_NAME).read_text())["signatures"][0]
    msg = tmp_path / "msg"
    msg.write_bytes(SIGN_CONTEXT + pkg.digest.encode())
    sig = tmp_path / "sig"
    sig.write_bytes(base64.b64decode(entry["signature"]))
    ok = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            str(pub),
            "-rawin",
            "-in",
            str(msg),
            "-sigfile",
            str(sig),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stderr
    msg.write_bytes(SIGN_CONTEXT + ("0" * 64).encode())  # another digest: OpenSSL refuses too
    bad = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            str(pub),
            "-rawin",
            "-in",
            str(msg),
            "-sigfile",
            str(sig),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


def test_unsigned_package_is_refused_when_keys_are_trusted(
    package_copy: Path, keys: tuple[Path, Path]
) -> None:
    _, pub = keys
    load_package(package_copy)  # fine without trusted keys
    with pytest.raises(ModelPackageError, match=r"not signed.*edge model sign"):
        verify_package(package_copy, [pub])
    # ... and by the loader every runtime path goes through (daemon, worker processes).
    with pytest.raises(ModelPackageError, match="not signed"):
        load_detector(ModelSettings(package=package_copy, trusted_keys=[pub], warmup_runs=0))


def test_package_signed_by_an_untrusted_key_is_refused(
    package_copy: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path]
) -> None:
    sign_package(package_copy, other_keys[0])
    with pytest.raises(ModelPackageError, match="none of which is trusted"):
        verify_package(package_copy, [keys[1]])
    sign_package(package_copy, keys[0])  # a second signature by the trusted key: accepted
    assert len(verify_package(package_copy, [keys[1]]).signed_by) == 2


def test_edit_after_signing_is_refused_even_when_resealed(
    package_copy: Path, keys: tuple[Path, Path], reseal: object
) -> None:
    """An editor who recomputes the digest cannot recompute the signature."""
    priv, _pub = keys
    sign_package(package_copy, priv)
    seal = json.loads((package_copy / SEAL_NAME).read_text())
    doc = json.loads((package_copy / MANIFEST_NAME).read_text())
    doc["thresholds"]["default"] = 0.99
    (package_copy / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    digest = reseal(package_copy)  # type: ignore[operator]
    resealed = json.loads((package_copy / SEAL_NAME).read_text())
    resealed["signatures"] = seal["signatures"]  # keep the old signature
    (package_copy / SEAL_NAME).write_text(json.dumps(resealed))
    assert digest != seal["digest"]
    with pytest.raises(ModelPackageError, match=r"signature by key \w+ does not verify"):
        load_package(package_copy)  # a broken signature is refused even with no trusted keys


def test_damaged_signature_entries_are_refused(package_copy: Path, keys: tuple[Path, Path]) -> None:
    sign_package(package_copy, keys[0])
    good = (package_copy / SEAL_NAME).read_text()
    for edit, message in [
        (lambda e: e.update(key_id="0" * 16), "entry was edited"),
        (lambda e: e.update(signature="!!"), "not valid base64"),
        (lambda e: e.update(algorithm="rsa"), "not supported"),
        (lambda e: e.pop("public_key"), "must be an object"),
    ]:
        seal = json.loads(good)
        edit(seal["signatures"][0])
        (package_copy / SEAL_NAME).write_text(json.dumps(seal))
        with pytest.raises(ModelPackageError, match=message):
            load_package(package_copy)


def test_write_package_signs_with_a_key_file(
    package_copy: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    src = load_package(package_copy)
    fields = json.loads((package_copy / MANIFEST_NAME).read_text())
    for k in ("format", "files", "model_file"):
        fields.pop(k)
    out = write_package(tmp_path / "signed", src.model_path, sign_with=keys[0], **fields)
    assert verify_package(out, [keys[1]]).digest == src.digest  # same manifest bytes and files
    # A copy keeps its signature valid (nothing in it depends on where it lives).
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert verify_package(moved, [keys[1]]).signed_by == load_package(out).signed_by
