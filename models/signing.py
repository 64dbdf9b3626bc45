"""Ed25519 keys and signatures for model packages.

What is signed is the package digest (see :mod:`models.package`: a hash over the exact bytes of
``manifest.json`` and every listed file), so one 64-byte signature covers the manifest and every
file, and verifying it costs one hash pass that loading does anyway. The signed message carries a
fixed context prefix, so a signature made for a package can never be replayed as a signature of
anything else the same key might sign:

    message = b"edge-inspect package digest v1\\n" + <digest as 64 lowercase hex ASCII bytes>

Keys are standard PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), so an
auditor can check a signature with OpenSSL alone (``openssl pkeyutl -verify -rawin``; the tests do
exactly that). A key is named by its *key id*: the first 16 hex digits of the sha256 of the raw
32-byte public key, short enough to read in a log line and stable across file formats.

Private keys are refused when group- or world-readable (like ssh does): a signing key that any
local user can read is not a signing key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.types import ModelPackageError

SIGN_CONTEXT = b"edge-inspect package digest v1\n"
ALGORITHM = "ed25519"
MAX_KEY_FILE_BYTES = 16 * 1024


class SigningKeyError(ModelPackageError):
    """A key file is missing, unreadable, of the wrong kind, or too open."""


def signed_message(digest: str) -> bytes:
    """The exact bytes an ed25519 signature of a package covers."""
    return SIGN_CONTEXT + digest.encode("ascii")


def key_id_of(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A trusted (or embedded) ed25519 public key."""

    raw: bytes
    source: str = ""
    """Where it came from (a file path), for messages."""

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    def verify(self, signature: bytes, digest: str) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, signed_message(digest))
        except (InvalidSignature, ValueError):
            return False
        return True


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SigningKeyError(
            f"{what} {path} does not exist (make a key pair with `edge model keygen --out DIR`)"
        ) from None
    except OSError as e:
        raise SigningKeyError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"{what} {path} is {len(data)}+ bytes: not a key file")
    return data


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """A PEM (or OpenSSH one-line) ed25519 public key; clear errors for anything else."""
    p = Path(path)
    data = _read_key_file(p, "public key")
    if b"PRIVATE KEY" in data:
        raise SigningKeyError(
            f"{p} is a PRIVATE key: list the public key (.pub) in model.trusted_keys and keep the "
            "private key on the packaging machine only"
        )
    try:
        key = (
            serialization.load_ssh_public_key(data)
            if data.startswith(b"ssh-")
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise SigningKeyError(f"{p}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{p}: a {type(key).__name__}, not an ed25519 public key")
    return PublicKey(_raw_public(key), str(p))


def load_trusted_keys(keys: Iterable[str | os.PathLike[str] | PublicKey]) -> list[PublicKey]:
    """Public keys from files (or already loaded); duplicates (same key id) collapse."""
    out: dict[str, PublicKey] = {}
    for k in keys:
        pk = k if isinstance(k, PublicKey) else load_public_key(k)
        out.setdefault(pk.key_id, pk)
    return list(out.values())


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise SigningKeyError(
            f"private key {p} does not exist (make one with `edge model keygen --out DIR`)"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(
            f"private key {p} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"`chmod 600 {p}` or it is not used"
        )
    data = _read_key_file(p, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(
            f"{p}: encrypted private keys are not supported; use an unencrypted "
            "PKCS#8 key kept at mode 0600"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SigningKeyError(f"{p}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{p}: a {type(key).__name__}, not an ed25519 private key")
    return key


def generate_keypair(
    out_dir: str | os.PathLike[str], name: str = "edge-model"
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0600, PKCS#8 PEM) and ``NAME.pub`` (PEM); never overwrites."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists() or p.is_symlink():
            raise SigningKeyError(
                f"{p} already exists; choose another --out or --name (keys are never "
                "overwritten: packages signed with the old key would become unverifiable)"
            )
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL + mode at creation: the private key is never readable by others, not even briefly.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub)
    return priv_path, pub_path


@dataclass(frozen=True, slots=True)
class Signature:
    """One entry of the ``signatures`` list in ``package.digest``."""

    public_key: PublicKey
    signature: bytes

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    def as_json(self) -> dict[str, str]:
        return {
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "public_key": base64.b64encode(self.public_key.raw).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_json(cls, entry: object, where: str) -> Signature:
        if not isinstance(entry, dict) or set(entry) != {
            "algorithm",
            "key_id",
            "public_key",
            "signature",
        }:
            raise ModelPackageError(
                f"{where}: a signature entry must be an object with algorithm, key_id, "
                "public_key and signature; re-sign the package"
            )
        if entry["algorithm"] != ALGORITHM:
            raise ModelPackageError(
                f"{where}: signature algorithm {entry['algorithm']!r} is not supported "
                f"(only {ALGORITHM})"
            )
        try:
            raw = base64.b64decode(str(entry["public_key"]), validate=True)
            sig = base64.b64decode(str(entry["signature"]), validate=True)
        except ValueError:
            raise ModelPackageError(f"{where}: signature entry is not valid base64") from None
        if len(raw) != 32 or len(sig) != 64:
            raise ModelPackageError(
                f"{where}: malformed ed25519 signature entry (key {len(raw)} bytes, "
                f"signature {len(sig)} bytes; expected 32 and 64)"
            )
        out = cls(PublicKey(raw, "embedded"), sig)
        if entry["key_id"] != out.key_id:
            raise ModelPackageError(
                f"{where}: signature entry names key {entry['key_id']!r} but carries key "
                f"{out.key_id}; the entry was edited - re-sign the package"
            )
        return out


def sign_digest(key: Ed25519PrivateKey, digest: str) -> Signature:
    return Signature(PublicKey(_raw_public(key.public_key())), key.sign(signed_message(digest)))
