"""The model store: verified packages by name and version, and which one the line runs.

Layout (``model.store``; the demo default is ``<uplink.spool_dir>/../models``, a line uses
``/var/lib/edge/models``)::

    <root>/<name>/<version>/      one package (manifest.json, package.digest, model files)
    <root>/state.json             {"active", "previous", "shadow"}: NAME:VERSION refs or null
    <root>/.lock                  flock: one writer at a time (the daemon, the CLI)
    <root>/.tmp-*                 an import in progress (removed on failure, or at next import)

Why a store at all: the daemon must be able to switch between models it has verified *before*
the switch (activate / roll back between batches), keep the previous one for a rollback, and
name each one the same way on every line (``NAME:VERSION``, with the package digest telling
the same-named-but-different apart). An import is all-or-nothing: the package is verified, copied
into a temp directory inside the store, verified again there (the source could change while it
is copied), and renamed into place, which is atomic on one file system. A different package under
an existing ``NAME:VERSION`` is refused (versions are immutable, or a rollback would not go back
to what ran); importing the identical package again is a no-op. Nothing in the store changes on a
refusal.

``state.json`` is owned by the daemon (it persists its choice so a restart keeps it); it is
written atomically (temp + fsync + rename) and only ever names packages present in the store.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.package import (
    MANIFEST_NAME,
    SEAL_NAME,
    ModelPackage,
    atomic_write,
    fsync_dir,
    load_package,
    read_manifest,
    read_seal,
)
from models.signing import PublicKey, load_trusted_keys
from models.types import ModelPackageError

STATE_NAME = "state.json"
LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63}):(?P<version>[A-Za-z0-9][A-Za-z0-9.+_-]{0,63})$"
)
"""NAME:VERSION with the manifest's own name and version rules."""
STATE_ROLES = ("active", "previous", "shadow")

TrustedKeys = Iterable[str | os.PathLike[str] | PublicKey]


class StoreError(ModelPackageError):
    """The store refused an operation (conflicting version, unknown ref, bad state file)."""


def default_store_root(configured: Path | None, spool_dir: Path) -> Path:
    """``model.store`` when set, else ``<uplink.spool_dir>/../models`` (the demo's default)."""
    return configured if configured is not None else Path(spool_dir).parent / "models"


def parse_ref(ref: str) -> tuple[str, str]:
    m = _REF.match(ref)
    if not m:
        raise StoreError(
            f"{ref!r} is not a model reference: use NAME:VERSION (e.g. synth-demo:1.0.1), or a "
            "package directory"
        )
    return m["name"], m["version"]


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """One package in the store, as `edge model list` shows it."""

    ref: str
    name: str
    version: str
    path: Path
    digest: str
    plc_model_id: int | None
    created_at: str | None
    signed_by: tuple[str, ...]
    roles: tuple[str, ...]
    """Which of active/previous/shadow name it."""
    error: str | None = None
    """Why the entry is unusable (damaged in the store), or None."""

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["signed_by"] = list(self.signed_by)
        d["roles"] = list(self.roles)
        return d


@dataclass(frozen=True, slots=True)
class StoreState:
    active: str | None = None
    previous: str | None = None
    shadow: str | None = None
    updated_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ---- paths and locking ----

    def path_of(self, ref: str) -> Path:
        name, version = parse_ref(ref)
        return self.root / name / version

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time across processes (the daemon and a CLI import may race)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(
                f"model store {self.root} is not writable ({e.strerror or e}); check model.store "
                "and the service user's rights"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _sweep_temps(self) -> None:
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    # ---- import ----

    def import_package(
        self, src: str | os.PathLike[str], trusted_keys: TrustedKeys = ()
    ) -> ModelPackage:
        """Verify ``src`` and copy it in as ``<name>/<version>``; returns the stored package.

        Refused (StoreError/ModelPackageError, store unchanged) when ``src`` fails verification
        (digest, files, model tensors; a trusted signature when ``trusted_keys`` is given) or when
        a different package already holds its NAME:VERSION. Idempotent for the identical package.
        """
        keys = load_trusted_keys(trusted_keys)
        pkg = load_package(src, check_model=True, trusted_keys=keys)
        dest = self.root / pkg.manifest.name / pkg.manifest.version
        with self._locked():
            if dest.exists() and pkg.root == dest.resolve():
                return pkg  # importing a package from the store itself
            existing = self._existing_digest(dest)
            if existing is not None:
                return self._same_or_refuse(pkg, dest, existing, keys)
            self._sweep_temps()
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            try:
                os.chmod(tmp, 0o755)
                for name in (*pkg.manifest.files, MANIFEST_NAME, SEAL_NAME):
                    dst = tmp / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    _copy_synced(pkg.root / name, dst)
                copied = load_package(tmp, check_model=False, trusted_keys=keys)
                if copied.digest != pkg.digest:
                    raise StoreError(
                        f"{src} changed while it was being imported (digest {pkg.digest[:16]}... "
                        f"then {copied.digest[:16]}...); import it again once it is complete"
                    )
                fsync_dir(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(dest.parent)
            fsync_dir(self.root)
        return load_package(dest, check_model=False, trusted_keys=keys)

    def _existing_digest(self, dest: Path) -> str | None:
        if not dest.exists() and not dest.is_symlink():
            return None
        try:
            return read_seal(dest).digest
        except ModelPackageError:
            return ""  # something is there but unreadable: never overwrite it silently

    def _same_or_refuse(
        self, pkg: ModelPackage, dest: Path, existing: str, keys: builtins.list[PublicKey]
    ) -> ModelPackage:
        ref = pkg.ref
        if existing != pkg.digest:
            what = f"digest {existing[:16]}..." if existing else "a damaged package"
            raise StoreError(
                f"the store already holds {ref} with {what}; this package ({pkg.digest[:16]}...) "
                f"is different. Versions are immutable (a rollback must return to what ran): "
                f"package it under a new version"
                + ("" if existing else f", or remove {dest} after checking it")
            )
        try:
            stored = load_package(dest, check_model=False)  # re-verify in place
        except ModelPackageError as e:
            raise StoreError(
                f"the store's copy of {ref} is a damaged package ({e}); it is never replaced "
                f"silently: check and remove {dest}, then import again"
            ) from e
        if set(pkg.signed_by) - set(stored.signed_by):
            # Same bytes, more signatures (e.g. signed after a first, unsigned import): the
            # signatures sit outside the digest, so taking the newer seal changes nothing else.
            atomic_write(dest / SEAL_NAME, (pkg.root / SEAL_NAME).read_bytes())
        return load_package(dest, check_model=False, trusted_keys=keys)

    # ---- reading ----

    def get(
        self, ref: str, trusted_keys: TrustedKeys = (), *, check_model: bool = True
    ) -> ModelPackage:
        """The verified package named ``NAME:VERSION``; refused when absent or damaged."""
        dest = self.path_of(ref)
        if not dest.is_dir():
            known = [e.ref for e in self.list()]
            raise StoreError(
                f"{ref} is not in the model store {self.root} (it holds {known or 'nothing'}); "
                "import it with `edge model import PKG`"
            )
        return load_package(dest, check_model=check_model, trusted_keys=trusted_keys)

    def resolve(
        self, ref_or_path: str | os.PathLike[str], trusted_keys: TrustedKeys = ()
    ) -> ModelPackage:
        """A package directory (imported first) or a ``NAME:VERSION`` already in the store."""
        p = Path(ref_or_path)
        if p.exists() or p.is_symlink():
            return self.import_package(p, trusted_keys)
        text = str(ref_or_path)
        if _REF.match(text):
            return self.get(text, trusted_keys)
        raise StoreError(
            f"{text!r} is neither a package directory nor NAME:VERSION of a stored package"
        )

    def list(self, *, verify: bool = False) -> builtins.list[StoreEntry]:
        """Every package in the store, sorted by name then version, with its roles.

        Reads manifests and digests only (fast); ``verify`` re-hashes every file, so damage in
        the store shows up as an entry's ``error``.
        """
        if not self.root.is_dir():
            return []
        try:
            state = self.read_state()
        except StoreError:
            state = StoreState()
        roles: dict[str, list[str]] = {}
        for role in STATE_ROLES:
            r = getattr(state, role)
            if r:
                roles.setdefault(r, []).append(role)
        out: list[StoreEntry] = []
        for name_dir in sorted(self.root.iterdir()):
            if name_dir.name.startswith(".") or not name_dir.is_dir() or name_dir.is_symlink():
                continue
            for ver_dir in sorted(name_dir.iterdir()):
                if not ver_dir.is_dir():
                    continue
                ref = f"{name_dir.name}:{ver_dir.name}"
                out.append(self._entry(ref, ver_dir, tuple(roles.get(ref, ())), verify))
        return out

    def _entry(self, ref: str, path: Path, roles: tuple[str, ...], verify: bool) -> StoreEntry:
        name, _, version = ref.partition(":")
        try:
            if verify:
                pkg = load_package(path, check_model=False)
                m, digest, signed = pkg.manifest, pkg.digest, pkg.signed_by
            else:
                m = read_manifest(path / MANIFEST_NAME)
                seal = read_seal(path)
                digest, signed = seal.digest, tuple(s.key_id for s in seal.signatures)
            if (m.name, m.version) != (name, version):
                raise StoreError(f"holds {m.name}:{m.version}, not {ref}")
            return StoreEntry(
                ref,
                name,
                version,
                path,
                digest,
                m.plc_model_id,
                m.created_at.isoformat(),
                signed,
                roles,
            )
        except ModelPackageError as e:
            return StoreEntry(ref, name, version, path, "", None, None, (), roles, str(e))

    # ---- state ----

    def read_state(self) -> StoreState:
        """The persisted active/previous/shadow refs (all None when never written)."""
        path = self.root / STATE_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return StoreState()
        except OSError as e:
            raise StoreError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise StoreError(
                f"{path}: not a readable state file ({e}); the daemon falls back to "
                "model.package - fix or delete the file"
            ) from None
        if not isinstance(doc, dict) or not set(doc) <= {*STATE_ROLES, "updated_at"}:
            raise StoreError(f"{path}: expected an object with {list(STATE_ROLES)}")
        for role in STATE_ROLES:
            v = doc.get(role)
            if v is not None and (not isinstance(v, str) or not _REF.match(v)):
                raise StoreError(f"{path}: {role} is {v!r}; expected NAME:VERSION or null")
        updated = doc.get("updated_at")
        return StoreState(
            doc.get("active"),
            doc.get("previous"),
            doc.get("shadow"),
            updated if isinstance(updated, str) else None,
        )

    def write_state(
        self,
        state: StoreState | None = None,
        *,
        active: str | None = None,
        previous: str | None = None,
        shadow: str | None = None,
    ) -> StoreState:
        """Persist the refs atomically; every ref must name a package in the store.

        Pass a StoreState, or the three refs as keywords (None = that role is empty).
        """
        if state is None:
            state = StoreState(active, previous, shadow)
        for role in STATE_ROLES:
            ref = getattr(state, role)
            if ref is None:
                continue
            dest = self.path_of(ref)
            if not (dest / SEAL_NAME).is_file():
                raise StoreError(
                    f"state.{role} = {ref}: not in the model store {self.root}; import it first"
                )
        stamped = StoreState(
            state.active,
            state.previous,
            state.shadow,
            datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self._locked():
            data = (json.dumps(stamped.as_json(), indent=2) + "\n").encode()
            atomic_write(self.root / STATE_NAME, data)
        return stamped


def _copy_synced(src: Path, dst: Path) -> None:
    """Copy one file and fsync it: after a power cut a stored package is whole or refused."""
    with src.open("rb") as fi, dst.open("wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    os.chmod(dst, 0o644)
