"""The daemon's single entry point to a model: config in, verified Detector out.

It always goes through a package (hash-verified, manifest-checked), never a bare file, and
imports a runtime only when it is selected: TensorRT (and pycuda) are absent on CPU appliances
and must not be needed to run them.
"""

from __future__ import annotations

import structlog

from models.config import ModelSettings
from models.package import ModelPackage, load_package
from models.types import Detector, ModelError

log = structlog.get_logger(__name__)


def _check_thresholds(package: ModelPackage, settings: ModelSettings) -> None:
    t = package.manifest.thresholds
    lowest = min([t.default, *t.per_class.values()])
    if settings.conf_threshold is not None and settings.conf_threshold > lowest:
        log.warning(
            "conf_threshold_above_decision_threshold",
            conf_threshold=settings.conf_threshold,
            lowest_package_threshold=lowest,
            hint="detections between the two are never decoded; lower model.conf_threshold",
        )


def load_detector(settings: ModelSettings) -> Detector:
    """Load the package at ``settings.package`` and open it with the configured runtime.

    Raises ModelPackageError for a bad package, ModelError when the runtime cannot be used.
    """
    package = load_package(settings.package, check_model=False)
    _check_thresholds(package, settings)
    if settings.runtime == "onnxruntime":
        from models.onnx_runtime import OnnxDetector

        return OnnxDetector(package, settings)
    if settings.runtime == "tensorrt":
        from models.tensorrt_runtime import TensorRTDetector

        return TensorRTDetector(package, settings)
    raise ModelError(f"unknown runtime {settings.runtime!r}")  # unreachable: config validates it
