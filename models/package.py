"""Model package: the only form in which the daemon accepts a model.

A package is a directory holding ``manifest.json``, the files it lists (the ONNX model, and
optionally a calibration cache, validation statistics, ...) and ``package.digest``. The manifest
pins every file by sha256 and size, so a half-copied or corrupted model is refused at load time
instead of silently producing wrong verdicts on a production line. It also carries what the line
needs to *decide* (classes, thresholds, the numeric id the PLC sees) and what a reviewer needs to
*trust* the model (training data, recipe, evaluation metrics).

Integrity of the manifest itself (issue: a hand edit of ``thresholds`` 0.15 -> 0.99 turned every
defective part into OK, and the model id in events did not change): the **package digest** is
one sha256 over the manifest and every file, stored in ``package.digest`` when the package is
written, and checked at every load. The digest is the hash of this UTF-8 "statement":

    edge-inspect package v1\n
    manifest.json <sha256 of the exact bytes of manifest.json> <size in bytes>\n
    <name> <sha256> <size>\n        one line per file listed in manifest.json "files",
                                    sorted by byte value (``LC_ALL=C sort``)

Why this construction:

- The manifest is hashed as the bytes on disk, not re-serialised: no JSON canonicalisation to get
  wrong (duplicate keys, float formatting, key order), any byte edit changes the digest, and an
  auditor can recompute it with ``sha256sum`` and ``stat`` alone (a test does).
- File hashes come from the files as read, not from the manifest's claims (those are checked
  too): the digest names exactly the bytes that will run.
- It lives in its own file because it cannot live inside what it hashes. That file also holds the
  ed25519 signatures (:mod:`models.signing`), which sign the digest, so one signature covers the
  manifest and every file, and signing an existing package does not change its digest.
- The digest alone is not a secret: someone who edits the manifest AND recomputes the digest gets
  a package that loads, but under a new digest, which the events and the PLC record name; that
  edit is a deliberate new model, no longer an invisible one. Against a malicious edit the
  defence is a signature by a trusted key (``model.trusted_keys``).

A package is also refused when it holds anything but plain files and directories (a symlink can
point anywhere, so it would smuggle unverified bytes past the unlisted-file check; a FIFO would
hang the loader), files its manifest does not list, a manifest over 1 MiB, not UTF-8, with
duplicate keys or non-finite numbers, or an ONNX model whose tensors disagree with the manifest.

Only numpy/pydantic/onnxruntime/cryptography are used here: no torch or ultralytics on the runtime
path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.signing import (
    PublicKey,
    Signature,
    load_private_key,
    load_trusted_keys,
    sign_digest,
)
from models.types import ModelInfo, ModelPackageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MANIFEST_NAME = "manifest.json"
SEAL_NAME = "package.digest"
"""The digest (and signatures) file; not listed in the manifest, not part of the digest."""
FORMAT_VERSION = 1
SEAL_FORMAT = 1
DIGEST_HEADER = "edge-inspect package v1"
MAX_MANIFEST_BYTES = 1 << 20
"""A manifest is a few KB; a bigger one is a mistake or an attack on the loader."""
MAX_SEAL_BYTES = 64 * 1024
MAX_PACKAGE_ENTRIES = 1000
"""Files + directories in a package: a handful in practice; bounded so a scan cannot run away."""
NUM_MASK_COEFFS = 32
"""YOLOv8-seg prototype count: output0 rows are 4 box + nc class scores + 32 mask coefficients."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*$")
"""Listed file names: relative, no hidden files, no '..', no spaces or control characters (which
also keeps the digest statement's one-line-per-file format unambiguous)."""
_CHUNK = 1 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    bytes: int = Field(ge=0)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError("must be 64 lowercase hex characters")
        return v


class Thresholds(BaseModel):
    """The operating point chosen on validation data; the line config may override it."""

    model_config = ConfigDict(extra="forbid")

    default: float = Field(default=0.25, ge=0.0, le=1.0)
    per_class: dict[str, float] = Field(default_factory=dict)
    min_area_px: dict[str, int] = Field(default_factory=dict)

    @field_validator("per_class")
    @classmethod
    def _scores_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for name, score in v.items():
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"threshold for {name!r} is {score}; must be within [0, 1]")
        return v

    @field_validator("min_area_px")
    @classmethod
    def _areas_non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        for name, area in v.items():
            if area < 0:
                raise ValueError(f"min_area_px for {name!r} is {area}; must be >= 0")
        return v


class Training(BaseModel):
    """Provenance. Open-ended on purpose: recipes grow fields, and none of them drive inference."""

    model_config = ConfigDict(extra="allow")

    data: str | None = None
    recipe: str | None = None
    epochs: int | None = None


class Metrics(BaseModel):
    """Evaluation on held-out data. Extra numeric metrics are allowed (e.g. per-class values)."""

    model_config = ConfigDict(extra="allow")

    box_map50: float | None = None
    box_map50_95: float | None = None
    mask_map50: float | None = None
    mask_map50_95: float | None = None
    image_precision: float | None = None
    image_recall: float | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
    plc_model_id: int = Field(ge=0, le=65535)
    """The numeric model id written to the PLC next to each verdict (uint16)."""
    task: Literal["segment"] = "segment"
    classes: list[str] = Field(min_length=1)
    input_size: tuple[int, int]
    """Network input (height, width)."""
    model_file: str
    """Which entry of ``files`` is the network (the ONNX file)."""
    files: dict[str, FileEntry] = Field(min_length=1)
    runtime_hints: dict[str, Any] = Field(default_factory=dict)
    training: Training = Field(default_factory=Training)
    metrics: Metrics = Field(default_factory=Metrics)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    created_at: datetime

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if any(not c.strip() for c in v):
            raise ValueError("class names must be non-empty")
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class names {dupes}")
        return v

    @field_validator("input_size")
    @classmethod
    def _stride_multiple(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(d < 32 or d % 32 for d in v):
            raise ValueError(f"input_size {list(v)} must be positive multiples of 32 (YOLO stride)")
        return v

    @field_validator("files")
    @classmethod
    def _relative_names(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            p = PurePosixPath(name)
            if (
                p.is_absolute()
                or ".." in p.parts
                or name in ("", MANIFEST_NAME, SEAL_NAME)
                or not _FILE_NAME.match(name)
            ):
                raise ValueError(
                    f"file name {name!r} must be a plain relative path inside the package "
                    "(letters, digits, . _ + - and /; not manifest.json or package.digest)"
                )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        if self.model_file not in self.files:
            raise ValueError(f"model_file {self.model_file!r} is not listed in files")
        known = set(self.classes)
        for field in ("per_class", "min_area_px"):
            unknown = sorted(set(getattr(self.thresholds, field)) - known)
            if unknown:
                raise ValueError(
                    f"thresholds.{field} names unknown classes {unknown}; "
                    f"classes are {self.classes}"
                )
        return self


@dataclass(frozen=True, slots=True)
class ModelPackage:
    root: Path
    manifest: Manifest
    model_path: Path
    digest: str
    """The package digest (64 hex): names manifest + every file; what events should carry."""
    signed_by: tuple[str, ...] = ()
    """Key ids of the valid signatures the package carries (trusted or not)."""

    @property
    def model_sha256(self) -> str:
        return self.manifest.files[self.manifest.model_file].sha256

    @property
    def ref(self) -> str:
        """``NAME:VERSION``, the model store's name for the package."""
        return f"{self.manifest.name}:{self.manifest.version}"

    def file(self, name: str) -> Path:
        """Path of a listed file (e.g. an INT8 calibration cache); refuses unlisted names."""
        if name not in self.manifest.files:
            raise ModelPackageError(
                f"{self.root}: {name!r} is not listed in {MANIFEST_NAME} "
                f"(listed: {sorted(self.manifest.files)})"
            )
        return self.root / name

    def info(self, runtime: str) -> ModelInfo:
        m = self.manifest
        return ModelInfo(
            name=m.name,
            version=m.version,
            classes=tuple(m.classes),
            input_size=(m.input_size[0], m.input_size[1]),
            sha256=self.model_sha256,
            runtime=runtime,
            thresholds={c: m.thresholds.per_class.get(c, m.thresholds.default) for c in m.classes},
            digest=self.digest,
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_regular_file(path: Path) -> tuple[str, int]:
    """sha256 and size of a regular file, never following a symlink (O_NOFOLLOW)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelPackageError(f"{path}: not a regular file; a package holds plain files only")
    with os.fdopen(fd, "rb") as f:
        h = hashlib.sha256()
        n = 0
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def digest_statement(
    manifest_sha256: str, manifest_bytes: int, files: Mapping[str, tuple[str, int]]
) -> bytes:
    """The bytes the package digest hashes (see the module docstring)."""
    lines = [DIGEST_HEADER, f"{MANIFEST_NAME} {manifest_sha256} {manifest_bytes}"]
    for name in sorted(files, key=lambda n: n.encode("utf-8")):
        sha, size = files[name]
        lines.append(f"{name} {sha} {size}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def package_digest(manifest_raw: bytes, files: Mapping[str, tuple[str, int]]) -> str:
    """Digest of a package from its manifest bytes and {listed name: (sha256, size)}."""
    statement = digest_statement(hashlib.sha256(manifest_raw).hexdigest(), len(manifest_raw), files)
    return hashlib.sha256(statement).hexdigest()


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<manifest>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def check_io_shapes(
    manifest: Manifest,
    input_shape: Sequence[int | str | None],
    output_shapes: Sequence[Sequence[int | str | None]],
    *,
    where: str,
) -> None:
    """Refuse a network whose tensors disagree with the manifest (wrong class count, input size).

    Symbolic (dynamic) dimensions are accepted; only fixed dimensions are compared. ``where``
    names the package/model in the error message.
    """
    nc = len(manifest.classes)
    if len(input_shape) != 4:
        raise ModelPackageError(
            f"{where}: model input has shape {list(input_shape)}; expected NCHW"
        )
    h, w = input_shape[2], input_shape[3]
    if isinstance(h, int) and isinstance(w, int) and (h, w) != tuple(manifest.input_size):
        raise ModelPackageError(
            f"{where}: model input is {h}x{w} but manifest input_size is "
            f"{manifest.input_size[0]}x{manifest.input_size[1]}; "
            "re-export the model or fix input_size"
        )
    if len(output_shapes) != 2:
        raise ModelPackageError(
            f"{where}: model has {len(output_shapes)} outputs; a YOLOv8-seg model has 2 "
            "(detections and mask prototypes) - was it exported with task=segment?"
        )
    rows = output_shapes[0][1] if len(output_shapes[0]) == 3 else None
    if isinstance(rows, int) and rows != 4 + nc + NUM_MASK_COEFFS:
        model_nc = rows - 4 - NUM_MASK_COEFFS
        raise ModelPackageError(
            f"{where}: manifest lists {nc} classes {manifest.classes} but the model predicts "
            f"{model_nc} (output0 has {rows} rows = 4 + nc + {NUM_MASK_COEFFS}); "
            "fix 'classes' in the manifest or package the right model"
        )
    if len(output_shapes[0]) != 3 or len(output_shapes[1]) != 4:
        raise ModelPackageError(
            f"{where}: unexpected output ranks {[list(s) for s in output_shapes]}; expected "
            f"[1, 4+nc+{NUM_MASK_COEFFS}, N] and [1, {NUM_MASK_COEFFS}, H/4, W/4]"
        )
    nm = output_shapes[1][1]
    if isinstance(nm, int) and nm != NUM_MASK_COEFFS:
        raise ModelPackageError(f"{where}: output1 has {nm} prototypes; expected {NUM_MASK_COEFFS}")


# Digests whose model already passed the onnxruntime check in this process. The digest covers
# the manifest and every file's sha256 (just verified), so the same digest is the same bytes: a
# SIGHUP with an unchanged package skips a second session. Each session left a few MB of native
# heap behind in the daemon (6 MB per reload in the soak); bounded, oldest first.
_ONNX_CHECKED: OrderedDict[str, None] = OrderedDict()
_ONNX_CHECKED_MAX = 16


def _check_onnx_model(manifest: Manifest, model_path: Path) -> None:
    # Imported here so that reading/writing manifests does not need onnxruntime loaded.
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
        raise ModelPackageError(
            f"{model_path}: onnxruntime cannot load this model ({e}); re-export it"
        ) from e
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ModelPackageError(f"{model_path}: model has {len(inputs)} inputs; expected 1 image")
    check_io_shapes(
        manifest,
        inputs[0].shape,
        [o.shape for o in sess.get_outputs()],
        where=str(model_path),
    )


# ---- reading and checking ----


class _Refused(ValueError):
    """Internal: a JSON hook refusal (duplicate key, NaN) turned into a ModelPackageError."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise _Refused(f"non-finite number {name}")


def _strict_json(raw: bytes, where: Path, what: str) -> Any:
    """Parse JSON refusing what a hand edit or an attack slips in and json.loads accepts."""
    if raw.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        raise ModelPackageError(
            f"{where}: {what} starts with a byte-order mark (UTF-16 or UTF-8-BOM); it must be "
            "plain UTF-8 JSON - restore the package from its source"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelPackageError(
            f"{where}: {what} is not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r}); "
            "restore the package from its source"
        ) from None
    if _nesting(text) > _MAX_NESTING:
        # Refused before parsing: a RecursionError caught from the C decoder can leave CPython
        # 3.11's recursion accounting inconsistent ("AST constructor recursion depth mismatch").
        raise ModelPackageError(f"{where}: {what} is nested too deeply to be a manifest")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _Refused as e:
        raise ModelPackageError(f"{where}: {what} is refused: {e}; restore the package") from None
    except json.JSONDecodeError as e:
        raise ModelPackageError(
            f"{where}: {what} is not readable JSON ({e}); restore the package"
        ) from None
    except RecursionError:
        raise ModelPackageError(f"{where}: {what} is nested too deeply to be a manifest") from None


_MAX_NESTING = 64
"""Deeper than any manifest; a deeper document is refused without parsing it."""


def _nesting(text: str) -> int:
    """Deepest [ / { nesting of a JSON text, strings skipped: linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _read_capped(path: Path, limit: int, what: str, missing_hint: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ModelPackageError(f"{path} not found: {missing_hint}") from None
    except OSError as e:
        raise ModelPackageError(f"{path}: {what} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelPackageError(f"{path}: {what} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ModelPackageError(
            f"{path}: {what} is larger than {limit // 1024} KiB; a real one is a few KB - "
            "this is not a package written by `edge model package`"
        )
    return raw


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """Validate manifest bytes (already read); ``path`` names it in errors."""
    doc = _strict_json(raw, path, "manifest")
    if not isinstance(doc, dict):
        raise ModelPackageError(f"{path}: must hold a JSON object, found {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != FORMAT_VERSION:
        hint = (
            "it was written by a newer edge-inspect: upgrade this appliance"
            if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT_VERSION
            else "rebuild the package with this version's tooling"
        )
        raise ModelPackageError(
            f"{path}: package format {fmt!r} is not supported (this runtime reads format "
            f"{FORMAT_VERSION}); {hint}"
        )
    try:
        return Manifest.model_validate(doc)
    except ValidationError as e:
        raise ModelPackageError(f"{path}: invalid manifest:\n{_format_validation(e)}") from e


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``manifest.json`` (no file or digest checks)."""
    raw = _read_capped(
        path,
        MAX_MANIFEST_BYTES,
        "manifest",
        f"a model package is a directory with {MANIFEST_NAME} and the model files it lists "
        "(build one with `edge model package` / models.package.write_package)",
    )
    return parse_manifest(raw, path)


def scan_package(root: Path) -> set[str]:
    """Relative names of the regular files under ``root``; refuses links and special files.

    A symlinked file or directory would let bytes the manifest never pinned into the package
    (and a symlinked directory used to pass the unlisted-file check); a FIFO or device would
    hang or mislead the hashing. So a package holds plain files and directories, nothing else.
    """
    found: set[str] = set()
    stack: list[tuple[Path, str]] = [(root, "")]
    entries = 0
    while stack:
        folder, prefix = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError as e:
            raise ModelPackageError(f"{folder}: cannot list ({e.strerror or e})") from None
        with it:
            for entry in it:
                entries += 1
                if entries > MAX_PACKAGE_ENTRIES:
                    raise ModelPackageError(
                        f"{root}: more than {MAX_PACKAGE_ENTRIES} entries; not a model package"
                    )
                rel = prefix + entry.name
                if entry.is_symlink():
                    target = os.readlink(entry.path)
                    raise ModelPackageError(
                        f"{root}: {rel!r} is a symlink (-> {target}); a package must hold plain "
                        "files only, since a link can point at bytes the manifest never pinned. "
                        "Replace it with the file itself (or remove it) and re-package"
                    )
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=False):
                    found.add(rel)
                else:
                    raise ModelPackageError(
                        f"{root}: {rel!r} is not a regular file (FIFO, socket or device); "
                        "remove it - a package holds plain files only"
                    )
    return found


def verify_files(
    root: Path, manifest: Manifest, present: set[str] | None = None
) -> dict[str, tuple[str, int]]:
    """Every listed file present with its size and hash; nothing unlisted beside them.

    Returns {name: (sha256, size)} as read from disk (what the digest is computed from).
    """
    if present is None:
        present = scan_package(root)
    hashes: dict[str, tuple[str, int]] = {}
    for name, entry in manifest.files.items():
        p = root / name
        if name not in present:
            raise ModelPackageError(
                f"{root}: file {name!r} listed in {MANIFEST_NAME} is missing; restore the package "
                "from its source (do not edit manifests by hand)"
            )
        size = p.stat().st_size
        if size != entry.bytes:
            raise ModelPackageError(
                f"{p}: size is {size} bytes but the manifest says {entry.bytes}; the file is "
                "truncated or was replaced - restore the package from its source"
            )
        digest, size = _hash_regular_file(p)
        if digest != entry.sha256:
            raise ModelPackageError(
                f"{p}: sha256 {digest} does not match the manifest ({entry.sha256}); the file was "
                "modified or corrupted - restore the package from its source"
            )
        hashes[name] = (digest, size)
    extra = sorted(n for n in present if n not in (MANIFEST_NAME, SEAL_NAME) and n not in hashes)
    if extra:
        raise ModelPackageError(
            f"{root}: files not listed in {MANIFEST_NAME}: {extra}; a package must contain exactly "
            "what its manifest lists - remove them or rebuild the package"
        )
    return hashes


@dataclass(frozen=True, slots=True)
class Seal:
    """Contents of ``package.digest``."""

    manifest_sha256: str
    digest: str
    signatures: tuple[Signature, ...] = ()

    def to_bytes(self) -> bytes:
        doc = {
            "format": SEAL_FORMAT,
            "algorithm": "sha256",
            "manifest_sha256": self.manifest_sha256,
            "digest": self.digest,
            "signatures": [s.as_json() for s in self.signatures],
        }
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


_SEAL_KEYS = {"format", "algorithm", "manifest_sha256", "digest", "signatures"}


def read_seal(root: Path) -> Seal:
    path = root / SEAL_NAME
    raw = _read_capped(
        path,
        MAX_SEAL_BYTES,
        "package digest",
        f"the package has no {SEAL_NAME}, so an edit of its manifest could not be detected. "
        "It was made by an older edge-inspect (or the file was deleted): re-package it with "
        f"`edge model repackage {root}` (or `edge model package ...`) and use the result",
    )
    doc = _strict_json(raw, path, SEAL_NAME)
    if not isinstance(doc, dict) or set(doc) != _SEAL_KEYS:
        raise ModelPackageError(
            f"{path}: not a package digest file (expected keys {sorted(_SEAL_KEYS)}); "
            f"re-seal with `edge model repackage {root}`"
        )
    if doc["format"] != SEAL_FORMAT or doc["algorithm"] != "sha256":
        raise ModelPackageError(
            f"{path}: digest format {doc['format']!r}/{doc['algorithm']!r} is not supported "
            f"(this runtime reads format {SEAL_FORMAT}, sha256)"
        )
    for key in ("manifest_sha256", "digest"):
        if not isinstance(doc[key], str) or not _HEX64.match(doc[key]):
            raise ModelPackageError(f"{path}: {key} must be 64 lowercase hex characters")
    if not isinstance(doc["signatures"], list):
        raise ModelPackageError(f"{path}: signatures must be a list")
    sigs = tuple(Signature.from_json(e, str(path)) for e in doc["signatures"])
    return Seal(doc["manifest_sha256"], doc["digest"], sigs)


def _check_signatures(
    root: Path, seal: Seal, digest: str, trusted: Sequence[PublicKey]
) -> tuple[str, ...]:
    signed_by: list[str] = []
    for sig in seal.signatures:
        if not sig.public_key.verify(sig.signature, digest):
            raise ModelPackageError(
                f"{root}: the signature by key {sig.key_id} does not verify: the package changed "
                "after it was signed, or the signature is damaged. Restore the package from its "
                "source, or re-sign it (`edge model sign`)"
            )
        signed_by.append(sig.key_id)
    if trusted:
        trusted_ids = sorted(k.key_id for k in trusted)
        if not seal.signatures:
            raise ModelPackageError(
                f"{root}: the package is not signed, and this line requires a signature by a "
                f"trusted key (model.trusted_keys: {trusted_ids}); sign it with "
                "`edge model sign PKG --key PRIVATE_KEY` (or package it with --sign)"
            )
        if not set(signed_by) & set(trusted_ids):
            raise ModelPackageError(
                f"{root}: signed by key(s) {signed_by}, none of which is trusted on this line "
                f"(model.trusted_keys: {trusted_ids}); sign it with a trusted key or add the "
                "signer's public key to model.trusted_keys"
            )
    return tuple(signed_by)


def _package_root(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.name == MANIFEST_NAME and (p.is_file() or p.is_symlink()):
        p = p.parent
    if p.is_file():
        raise ModelPackageError(
            f"{p} is a bare model file; the daemon loads model packages only (a directory with "
            f"{MANIFEST_NAME}). Build one with `edge model package` / models.package.write_package"
        )
    if not p.is_dir():
        raise ModelPackageError(f"model package {p} does not exist; check models.package in config")
    # The package directory itself may be reached through a link (e.g. a `current` link on a
    # line PC); only what is INSIDE it must be plain files.
    return p.resolve()


def load_package(
    path: str | os.PathLike[str],
    *,
    check_model: bool = True,
    trusted_keys: Iterable[str | os.PathLike[str] | PublicKey] = (),
) -> ModelPackage:
    """Load and fully verify a package directory (or its manifest.json).

    Verifies: only plain files inside; a valid manifest; every listed file's size and sha256;
    nothing unlisted; the package digest in ``package.digest`` (so an edited manifest is refused);
    every signature present; and, when ``trusted_keys`` is given, a valid signature by one of
    them. ``check_model`` opens the ONNX file with onnxruntime to compare its tensor shapes with
    the manifest; a runtime that opens the model anyway can pass False and call
    :func:`check_io_shapes` on its own session instead of loading the model twice.
    Raises ModelPackageError naming the problem and what to do.
    """
    trusted = load_trusted_keys(trusted_keys)
    root = _package_root(path)
    present = scan_package(root)
    if MANIFEST_NAME not in present:
        read_manifest(root / MANIFEST_NAME)  # raises the "not found" explanation
    raw = _read_capped(root / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest", "")
    manifest = parse_manifest(raw, root / MANIFEST_NAME)
    seal = read_seal(root)
    manifest_sha = hashlib.sha256(raw).hexdigest()
    if manifest_sha != seal.manifest_sha256:
        raise ModelPackageError(
            f"{root}: {MANIFEST_NAME} was changed after the package was sealed (its sha256 is "
            f"{manifest_sha[:16]}..., {SEAL_NAME} recorded {seal.manifest_sha256[:16]}...). "
            "Hand edits of a package (thresholds, classes, ids) are refused: they would change "
            "what the line decides under the same model id. Restore the package from its source, "
            "or make a new version with `edge model package`"
        )
    hashes = verify_files(root, manifest, present)
    digest = package_digest(raw, hashes)
    if digest != seal.digest:
        raise ModelPackageError(
            f"{root}: {SEAL_NAME} records digest {seal.digest[:16]}... but the package's manifest "
            f"and files hash to {digest[:16]}...: the digest file was edited or damaged. Restore "
            f"the package from its source (or re-seal it with `edge model repackage {root}`)"
        )
    signed_by = _check_signatures(root, seal, digest, trusted)
    model_path = root / manifest.model_file
    if check_model and model_path.suffix == ".onnx" and digest not in _ONNX_CHECKED:
        _check_onnx_model(manifest, model_path)
        _ONNX_CHECKED[digest] = None
        while len(_ONNX_CHECKED) > _ONNX_CHECKED_MAX:
            _ONNX_CHECKED.popitem(last=False)
    return ModelPackage(
        root=root, manifest=manifest, model_path=model_path, digest=digest, signed_by=signed_by
    )


def verify_package(
    path: str | os.PathLike[str],
    trusted_keys: Iterable[str | os.PathLike[str] | PublicKey] = (),
) -> ModelPackage:
    """Everything :func:`load_package` checks, model tensors included, with signatures enforced
    when ``trusted_keys`` is non-empty. The one call for config check, import, activate and
    SIGHUP: raises ModelPackageError with the reason, or returns the verified package."""
    return load_package(path, check_model=True, trusted_keys=trusted_keys)


# ---- writing ----


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write-to-temp + fsync + rename: a crash leaves the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600; the daemon may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _private_key(key: Ed25519PrivateKey | str | os.PathLike[str]) -> Ed25519PrivateKey:
    if isinstance(key, (str, os.PathLike)):
        return load_private_key(key)
    return key


def _write_seal(
    root: Path,
    manifest_raw: bytes,
    hashes: Mapping[str, tuple[str, int]],
    keep: Sequence[Signature] = (),
    sign_with: Sequence[Ed25519PrivateKey | str | os.PathLike[str]] = (),
) -> Seal:
    digest = package_digest(manifest_raw, hashes)
    sigs = {s.key_id: s for s in keep if s.public_key.verify(s.signature, digest)}
    for key in sign_with:
        s = sign_digest(_private_key(key), digest)
        sigs[s.key_id] = s
    seal = Seal(hashlib.sha256(manifest_raw).hexdigest(), digest, tuple(sigs.values()))
    atomic_write(root / SEAL_NAME, seal.to_bytes())
    return seal


def _as_keys(
    sign_with: Ed25519PrivateKey | str | os.PathLike[str] | None,
) -> list[Ed25519PrivateKey | str | os.PathLike[str]]:
    return [] if sign_with is None else [sign_with]


def sign_package(
    path: str | os.PathLike[str],
    key: Ed25519PrivateKey | str | os.PathLike[str],
) -> ModelPackage:
    """Add (or refresh) a signature to a verified package; its digest does not change."""
    pkg = load_package(path, check_model=False)
    raw = (pkg.root / MANIFEST_NAME).read_bytes()
    hashes = {n: (e.sha256, e.bytes) for n, e in pkg.manifest.files.items()}
    seal = read_seal(pkg.root)
    _write_seal(pkg.root, raw, hashes, keep=seal.signatures, sign_with=[key])
    return load_package(pkg.root, check_model=False)


def repackage(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    sign_with: Ed25519PrivateKey | str | os.PathLike[str] | None = None,
    check_model: bool = True,
) -> ModelPackage:
    """Seal a package made before package digests existed (in place, or a copy in ``out``).

    Everything else is verified first (manifest, every file's size and hash, no links, nothing
    unlisted, the model's tensors), and the manifest bytes are kept as they are, so the result is
    the same package with its digest added. Valid signatures already present are kept.

    Caution: this trusts the manifest as it is now. On a package that was edited by hand it seals
    the edit (under a new digest); re-package from the source when in doubt.
    """
    root = _package_root(path)
    present = scan_package(root)
    raw = _read_capped(
        root / MANIFEST_NAME,
        MAX_MANIFEST_BYTES,
        "manifest",
        f"a model package is a directory with {MANIFEST_NAME}",
    )
    manifest = parse_manifest(raw, root / MANIFEST_NAME)
    hashes = verify_files(root, manifest, present)
    if check_model and manifest.model_file.endswith(".onnx"):
        _check_onnx_model(manifest, root / manifest.model_file)
    try:
        keep = read_seal(root).signatures
    except ModelPackageError:
        keep = ()
    target = root
    if out is not None:
        target = Path(out)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ModelPackageError(f"{target} exists and is not empty; choose a new directory")
        target.mkdir(parents=True, exist_ok=True)
        for name in manifest.files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, target / name)
        atomic_write(target / MANIFEST_NAME, raw)
    _write_seal(target, raw, hashes, keep=keep, sign_with=_as_keys(sign_with))
    return load_package(target, check_model=False)


def write_package(
    out_dir: str | os.PathLike[str],
    model_file: str | os.PathLike[str],
    *,
    extra_files: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]] = (),
    overwrite: bool = False,
    check_model: bool = True,
    sign_with: Ed25519PrivateKey | str | os.PathLike[str] | None = None,
    **manifest_fields: Any,
) -> Path:
    """Assemble a package: copy the model (+ extra files), hash them, validate, write manifest,
    then seal it (``package.digest``; signed when ``sign_with`` is a private key or its path).

    ``manifest_fields`` are the Manifest fields (name, version, plc_model_id, classes, input_size,
    training, metrics, thresholds, runtime_hints, created_at...). ``format``, ``files`` and
    ``model_file`` are computed. ``extra_files`` is a list of paths (stored under their base
    name) or a mapping {name in package: source path}. The manifest and then the digest are
    written last, after the model was checked against it, so a failed call never leaves a
    package that loads. Returns the package directory.
    """
    for computed in ("files", "model_file", "format"):
        if computed in manifest_fields:
            raise ModelPackageError(f"write_package computes {computed!r}; do not pass it")
    signer = _private_key(sign_with) if sign_with is not None else None  # fail before writing
    out = Path(out_dir)
    src_model = Path(model_file)
    if not src_model.is_file():
        raise ModelPackageError(f"model file {src_model} does not exist")
    sources: dict[str, Path] = {src_model.name: src_model}
    extras = (
        {k: Path(v) for k, v in extra_files.items()}
        if isinstance(extra_files, Mapping)
        else {Path(v).name: Path(v) for v in extra_files}
    )
    for name, src in extras.items():
        if name in sources or name in (MANIFEST_NAME, SEAL_NAME):
            raise ModelPackageError(f"duplicate or reserved file name {name!r} in package")
        if not src.is_file():
            raise ModelPackageError(f"extra file {src} does not exist")
        sources[name] = src

    if out.exists():
        existing = [q for q in out.iterdir()] if out.is_dir() else [out]
        own = {s.resolve() for s in sources.values()}
        foreign = [q for q in existing if q.resolve() not in own]
        if foreign and not overwrite:
            raise ModelPackageError(
                f"{out} is not empty ({sorted(q.name for q in foreign)}); pass overwrite=True or "
                "choose a new directory"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / SEAL_NAME).unlink(missing_ok=True)
    manifest_path = out / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)
    if overwrite:
        own = {s.resolve() for s in sources.values()}
        for q in out.iterdir():
            if q.resolve() in own and not q.is_symlink():
                continue
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q)
            else:
                q.unlink()

    files: dict[str, dict[str, Any]] = {}
    for name, src in sources.items():
        dst = out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        files[name] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}

    fields = dict(manifest_fields)
    fields.setdefault("created_at", datetime.now(UTC))
    try:
        manifest = Manifest.model_validate(
            {**fields, "format": FORMAT_VERSION, "files": files, "model_file": src_model.name}
        )
    except ValidationError as e:
        raise ModelPackageError(
            f"invalid manifest fields for {out}:\n{_format_validation(e)}"
        ) from e
    if check_model and src_model.suffix == ".onnx":
        _check_onnx_model(manifest, out / src_model.name)

    raw = (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n").encode()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelPackageError(
            f"the manifest for {out} would be {len(raw)} bytes (limit {MAX_MANIFEST_BYTES}); "
            "put large documents in a listed file instead of the manifest"
        )
    atomic_write(manifest_path, raw)
    hashes = {n: (f["sha256"], f["bytes"]) for n, f in files.items()}
    _write_seal(out, raw, hashes, sign_with=[signer] if signer is not None else [])
    return out
