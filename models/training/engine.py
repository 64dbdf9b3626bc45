"""`edge model build-engine`: a thin wrapper over the TensorRT runtime's own builder.

The engine is built by the same code the daemon would use at load, so an engine built ahead of
time (e.g. during installation on a Jetson) is exactly the one the runtime accepts as current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from models.config import ModelSettings, TensorRTSettings
from models.package import load_package


def build(
    package_dir: Path,
    out: Path | None = None,
    *,
    precision: Literal["fp16", "int8", "fp32"] = "fp16",
    calibration_images: Path | None = None,
    calibration_cache: Path | None = None,
    max_batch: int = 1,
) -> Path:
    from models.tensorrt_runtime import build_engine_for_package

    trt = TensorRTSettings(
        engine_path=out,
        precision=precision,
        calibration_images=calibration_images,
        calibration_cache=calibration_cache,
    )
    settings = ModelSettings(
        package=package_dir, runtime="tensorrt", max_batch=max_batch, tensorrt=trt
    )
    return build_engine_for_package(load_package(package_dir), settings)
