"""Static INT8 quantization of a package (ONNX Runtime, QDQ), refused unless it decides like FP32.

Why static QDQ: activations are calibrated once on sample images (no per-frame range computation),
and QDQ is what ONNX Runtime's CPU provider fuses into integer kernels (VNNI on current x86; the
measured speed-up is in models/README.md), and what TensorRT reads as an explicitly quantized net.

What stays in float: the detection head's tail, i.e. every node between the last convolutions and
the outputs, plus the DFL box decoder. ``output0`` concatenates box coordinates in pixels
(0..input size) with class scores (0..1): one INT8 scale for both would round every score to
~2 % steps and move decisions; the DFL turns 16-bin distributions into coordinates, where the
rounding becomes box error. The convolutions, where the time goes, are quantized.

The gate compares image-level decisions (the line's real output) of the INT8 package with the
FP32 package on a hold-out set, under the package's own decision rule; below the agreement limit
(default 0.98) the quantized package is refused with the numbers and nothing is written.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from models.compare import compare_decisions, onnx_detector
from models.config import OnnxRuntimeSettings
from models.package import load_package, verify_package, write_package
from models.preprocess import preprocess
from models.training.valstats import IMAGE_SUFFIXES, STATS_FILE, write_stats
from models.types import ModelPackageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

Progress = Callable[[str, int], Callable[[int], None]]


class QuantizationRefused(Exception):
    """The quantized model does not decide like the FP32 one on the hold-out."""


@dataclass(slots=True)
class QuantizeReport:
    images: int
    agreement: float
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    fp32_ms: float = 0.0
    int8_ms: float = 0.0
    """Median bare session.run, 1 thread, on the hold-out tensors."""
    excluded_nodes: int = 0
    package: Path | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "holdout_images": self.images,
            "decision_agreement": round(self.agreement, 6),
            "disagreements": self.disagreements[:50],
            "fp32_session_run_ms_p50": round(self.fp32_ms, 3),
            "int8_session_run_ms_p50": round(self.int8_ms, 3),
            "float_nodes_kept": self.excluded_nodes,
        }


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory of images")
    out = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not out:
        raise ValueError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return out[:limit] if limit else out


def holdout_images(data_yaml: Path, split: str | None = None) -> tuple[list[Path], str]:
    """Images of the hold-out split of a YOLO data.yaml (``test``, else ``val``)."""
    from models.datasets.yolo import load_data_yaml
    from models.training.valstats import validation_images

    doc = load_data_yaml(data_yaml)
    path = data_yaml / "data.yaml" if data_yaml.is_dir() else data_yaml
    for s in [split] if split else ["test", "val"]:
        imgs = validation_images(doc, path, s)
        if imgs:
            return imgs, s
    raise ValueError(
        f"{data_yaml}: no hold-out images in split {split or 'test or val'}; the INT8 gate needs "
        "images the model was not calibrated on"
    )


def float_tail(model_path: Path) -> list[str]:
    """Names of the nodes kept in float: graph outputs back to the last convolutions, and DFL."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    keep: set[str] = set()
    todo = deque(o.name for o in g.output)
    while todo:
        n = producer.get(todo.popleft())
        if n is None or n.name in keep:
            continue
        if n.op_type in ("Conv", "ConvTranspose") and "/dfl/" not in n.name:
            continue
        keep.add(n.name)
        todo.extend(n.input)
    keep.update(n.name for n in g.node if "/dfl/" in n.name)
    return sorted(keep)


def _calibration_reader(input_name: str, tensors: Sequence[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(tensors)

        def get_next(self) -> dict[str, np.ndarray] | None:
            t = next(self._it, None)
            return None if t is None else {input_name: t}

    return Reader()


def quantize_onnx(
    src: Path, dst: Path, calibration: Sequence[np.ndarray], *, method: str = "minmax"
) -> int:
    """Write the static INT8 QDQ model; returns how many nodes stayed in float."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"calibration method {method!r}: choose one of {sorted(methods)}")
    input_name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0]
    with tempfile.TemporaryDirectory(prefix="edge-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        keep = float_tail(pre)
        quantize_static(
            str(pre),
            str(dst),
            _calibration_reader(input_name.name, calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=methods[method],
            nodes_to_exclude=keep,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return len(keep)


def _median_run_ms(model: Path, tensors: Sequence[np.ndarray], runs: int = 60) -> float:
    import onnxruntime as ort

    from models.onnx_runtime import session_options

    sess = ort.InferenceSession(
        str(model),
        session_options(OnnxRuntimeSettings(intra_op_threads=1)),
        providers=["CPUExecutionProvider"],
    )
    name = sess.get_inputs()[0].name
    for t in tensors[:5]:
        sess.run(None, {name: t})
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: tensors[i % len(tensors)]})
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def quantize_package(
    package: Path,
    calibration: Path,
    holdout: Path,
    out: Path,
    *,
    version: str | None = None,
    plc_model_id: int | None = None,
    min_agreement: float = 0.98,
    calibration_max: int = 200,
    holdout_split: str | None = None,
    method: str = "minmax",
    overwrite: bool = False,
    sign_with: Ed25519PrivateKey | str | os.PathLike[str] | None = None,
    trusted_keys: Sequence[Path] = (),
    progress: Progress | None = None,
) -> QuantizeReport:
    """INT8 package from a verified FP32 package; QuantizationRefused (nothing written) when the
    hold-out decisions agree less than ``min_agreement``."""
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement {min_agreement} must be in (0, 1]")
    src = verify_package(package, trusted_keys)
    m = src.manifest
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelPackageError(f"{out} is not empty; pass --overwrite or choose a new directory")
    calib_files = list_images(calibration, calibration_max)
    hold_files, split = holdout_images(holdout, holdout_split)
    hw = (m.input_size[0], m.input_size[1])

    def tensors(files: Sequence[Path], label: str) -> list[np.ndarray]:
        tick = progress(label, len(files)) if progress else None
        out_t = []
        for f in files:
            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError(f"{f}: unreadable image")
            out_t.append(preprocess(img, hw).tensor)
            if tick:
                tick(1)
        return out_t

    calib = tensors(calib_files, "calibration images")
    new_version = version or f"{m.version}+int8"
    with tempfile.TemporaryDirectory(
        prefix="edge-int8-", dir=out.parent if out.parent.exists() else None
    ) as tmp:
        q_model = Path(tmp) / m.model_file
        kept = quantize_onnx(src.model_path, q_model, calib, method=method)
        fields: dict[str, Any] = {
            "name": m.name,
            "version": new_version,
            "plc_model_id": m.plc_model_id if plc_model_id is None else plc_model_id,
            "classes": list(m.classes),
            "input_size": list(m.input_size),
            "thresholds": m.thresholds.model_dump(mode="json"),
            "runtime_hints": dict(m.runtime_hints),
            "metrics": m.metrics.model_dump(mode="json", exclude_none=True),
        }
        training = m.training.model_dump(mode="json")
        candidate = write_package(Path(tmp) / "candidate", q_model, training=training, **fields)
        int8 = load_package(candidate)
        result = compare_decisions(
            src,
            onnx_detector(src),
            int8,
            onnx_detector(int8),
            hold_files,
            progress=progress("hold-out FP32 vs INT8", len(hold_files)) if progress else None,
            stats=True,
        )
        report = QuantizeReport(result.images, result.agreement, result.disagreements)
        stats = result.stats
        assert stats is not None
        report.excluded_nodes = kept
        report.fp32_ms = _median_run_ms(src.model_path, calib)
        report.int8_ms = _median_run_ms(q_model, calib)
        if report.agreement < min_agreement:
            raise QuantizationRefused(
                f"INT8 decisions agree with FP32 on {report.agreement:.2%} of {report.images} "
                f"hold-out images ({split} split), below the required {min_agreement:.2%}; "
                f"{len(report.disagreements)} differ (e.g. "
                f"{[d['image'] for d in report.disagreements[:5]]}). Try more or more "
                "representative calibration images, or --method percentile/entropy; the FP32 "
                "package stays the one to run"
            )
        training["quantization"] = {
            "from": {"ref": src.ref, "digest": src.digest},
            "format": "QDQ static INT8 (activations uint8 asymmetric, weights int8 per channel)",
            "method": method,
            "calibration_images": len(calib_files),
            "calibration_source": str(calibration),
            "holdout": f"{holdout} split {split!r}",
            "min_agreement": min_agreement,
            **report.as_json(),
        }
        stats_path = write_stats(
            Path(tmp) / STATS_FILE, stats.as_json(source=f"{holdout} split {split!r} (INT8)")
        )
        if out.exists() and overwrite:
            shutil.rmtree(out)
        write_package(
            out,
            q_model,
            extra_files={STATS_FILE: stats_path},
            training=training,
            sign_with=sign_with,
            **fields,
        )
    report.package = out
    return report
