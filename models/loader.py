"""The daemon's single entry point to a model: config in, verified Detector out.

It always goes through a package (digest-verified, manifest-checked, and signed by a trusted key
when ``model.trusted_keys`` is set), never a bare file, and builds the runtime through the
registry (models/runtimes.py), which imports a runtime only when it is selected: TensorRT (and
pycuda) are absent on CPU appliances and must not be needed to run them.
"""

from __future__ import annotations

import structlog

from models.config import ModelSettings
from models.package import ModelPackage, load_package
from models.runtimes import RUNTIMES
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


def load_detector(settings: ModelSettings, package: ModelPackage | None = None) -> Detector:
    """Load the package at ``settings.package`` and open it with the configured runtime.

    ``package``: an already verified package (skips verifying it twice). Signatures are enforced
    here when ``settings.trusted_keys`` is set, so every path that builds a detector (the daemon,
    its worker processes, the tools) refuses an unsigned or wrongly signed package.
    Raises ModelPackageError for a bad package, ModelError when the runtime cannot be used.
    """
    if package is None:
        package = load_package(
            settings.package, check_model=False, trusted_keys=settings.trusted_keys
        )
    _check_thresholds(package, settings)
    spec = RUNTIMES.get(settings.runtime)
    if spec is None:  # unreachable: config validates it
        raise ModelError(f"unknown runtime {settings.runtime!r}; known: {sorted(RUNTIMES)}")
    return spec.load(package, settings)
