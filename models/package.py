"""Model package: the only form in which the daemon accepts a model.

A package is a directory holding ``manifest.json`` and the files it lists (the ONNX model, and
optionally a calibration cache, an evaluation report, ...). The manifest pins every file by
sha256 and size, so a half-copied, corrupted or hand-edited model is refused at load time instead
of silently producing wrong verdicts on a production line. It also carries what the line needs to
*decide* (classes, thresholds, the numeric id the PLC sees) and what a reviewer needs to *trust*
the model (training data, recipe, evaluation metrics).

Only numpy/pydantic/onnxruntime are used here: no torch or ultralytics on the runtime path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.types import ModelInfo, ModelPackageError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
NUM_MASK_COEFFS = 32
"""YOLOv8-seg prototype count: output0 rows are 4 box + nc class scores + 32 mask coefficients."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
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
            if p.is_absolute() or ".." in p.parts or name in ("", MANIFEST_NAME) or "\\" in name:
                raise ValueError(
                    f"file name {name!r} must be a plain relative path inside the package"
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

    @property
    def model_sha256(self) -> str:
        return self.manifest.files[self.manifest.model_file].sha256

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
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``manifest.json`` (no file checks)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelPackageError(
            f"{path} not found: a model package is a directory with {MANIFEST_NAME} and the model "
            "files it lists (build one with models.package.write_package / `edge model export`)"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelPackageError(f"{path}: not readable JSON ({e}); restore the package") from e
    if not isinstance(raw, dict):
        raise ModelPackageError(f"{path}: must hold a JSON object, found {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt != FORMAT_VERSION:
        hint = (
            "it was written by a newer edge-inspect: upgrade this appliance"
            if isinstance(fmt, int) and fmt > FORMAT_VERSION
            else "rebuild the package with this version's tooling"
        )
        raise ModelPackageError(
            f"{path}: package format {fmt!r} is not supported (this runtime reads format "
            f"{FORMAT_VERSION}); {hint}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise ModelPackageError(f"{path}: invalid manifest:\n{_format_validation(e)}") from e


def _listed_files_present(root: Path) -> Iterable[str]:
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            yield Path(dirpath, n).relative_to(root).as_posix()


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file present with its size and hash; nothing unlisted beside them."""
    for name, entry in manifest.files.items():
        p = root / name
        if not p.is_file():
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
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise ModelPackageError(
                f"{p}: sha256 {digest} does not match the manifest ({entry.sha256}); the file was "
                "modified or corrupted - restore the package from its source"
            )
    extra = sorted(
        n for n in _listed_files_present(root) if n != MANIFEST_NAME and n not in manifest.files
    )
    if extra:
        raise ModelPackageError(
            f"{root}: files not listed in {MANIFEST_NAME}: {extra}; a package must contain exactly "
            "what its manifest lists - remove them or rebuild the package"
        )


def load_package(path: str | os.PathLike[str], *, check_model: bool = True) -> ModelPackage:
    """Load and fully verify a package directory (or its manifest.json).

    ``check_model`` opens the ONNX file with onnxruntime to compare its tensor shapes with the
    manifest; a runtime that opens the model anyway can pass False and call
    :func:`check_io_shapes` on its own session instead of loading the model twice.
    """
    p = Path(path)
    if p.is_file() and p.name == MANIFEST_NAME:
        p = p.parent
    if p.is_file():
        raise ModelPackageError(
            f"{p} is a bare model file; the daemon loads model packages only (a directory with "
            f"{MANIFEST_NAME}). Build one with models.package.write_package / `edge model export`"
        )
    if not p.is_dir():
        raise ModelPackageError(f"model package {p} does not exist; check models.package in config")
    root = p.resolve()
    manifest = read_manifest(root / MANIFEST_NAME)
    verify_files(root, manifest)
    model_path = root / manifest.model_file
    if check_model and model_path.suffix == ".onnx":
        _check_onnx_model(manifest, model_path)
    return ModelPackage(root=root, manifest=manifest, model_path=model_path)


def write_package(
    out_dir: str | os.PathLike[str],
    model_file: str | os.PathLike[str],
    *,
    extra_files: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]] = (),
    overwrite: bool = False,
    check_model: bool = True,
    **manifest_fields: Any,
) -> Path:
    """Assemble a package: copy the model (+ extra files), hash them, validate, write manifest.

    ``manifest_fields`` are the Manifest fields (name, version, plc_model_id, classes, input_size,
    training, metrics, thresholds, runtime_hints, created_at...). ``format``, ``files`` and
    ``model_file`` are computed. ``extra_files`` is a list of paths (stored under their base
    name) or a mapping {name in package: source path}. The manifest is written last, after the
    model was checked against it, so a failed call never leaves a package that looks valid.
    Returns the package directory.
    """
    for computed in ("files", "model_file", "format"):
        if computed in manifest_fields:
            raise ModelPackageError(f"write_package computes {computed!r}; do not pass it")
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
        if name in sources or name == MANIFEST_NAME:
            raise ModelPackageError(f"duplicate file name {name!r} in package")
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
    manifest_path = out / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)
    if overwrite:
        own = {s.resolve() for s in sources.values()}
        for q in out.iterdir():
            if q.resolve() in own:
                continue
            if q.is_dir():
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
    fields.setdefault("created_at", datetime.now(timezone.utc))
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

    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".manifest.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the daemon may run as another user
        os.replace(tmp, manifest_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
