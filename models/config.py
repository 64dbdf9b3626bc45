"""Model runtime settings (the ``model:`` section of a line config).

Decoding thresholds live here as well as in the package: the package carries the operating point
chosen on validation data (decision thresholds), while ``conf_threshold`` is only the floor below
which candidates are not even decoded. It must stay at or below every decision threshold, or the
decision rules would never see the detections they are meant to judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TensorRTSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine_path: Path | None = None
    """Where the serialized engine lives. None: ``<package>/../<name>-<version>-<precision>.engine``
    under the cache dir. Engines are tied to the GPU and TensorRT version, so they are built on
    the target and never shipped inside a package."""
    cache_dir: Path = Path("/var/cache/edge-inspect/engines")
    precision: Literal["fp16", "int8", "fp32"] = "fp16"
    calibration_images: Path | None = None
    """A directory of sample images for INT8 calibration (needed only to build an INT8 engine)."""
    calibration_cache: Path | None = None
    """INT8 calibration cache: reused when present, written after calibrating otherwise."""
    build_if_missing: bool = True
    """Build the engine at load when it does not exist (minutes on a Jetson; seconds on a T4)."""
    workspace_mib: int = Field(default=1024, ge=64)


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: Path
    """A model package directory (manifest.json + model files). Bare model files are refused."""
    runtime: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    intra_op_threads: int = Field(default=2, ge=1, le=256)
    """ONNX Runtime threads inside one operator: set to the cores given to inference."""
    inter_op_threads: int = Field(default=1, ge=1, le=256)
    blas_threads: int | None = Field(default=1, ge=1, le=256)
    """Process-wide BLAS (OpenBLAS) thread cap set at load. The decode's matrix products are tiny;
    a multi-threaded BLAS pool busy-waits after each one and fights ONNX Runtime for the cores
    (2-core box: postprocess 10.7 -> 0.55 ms p50, infer 12.6 -> ~6 ms). None leaves it alone."""
    spin_wait: bool = False
    """Let ONNX Runtime's worker threads busy-wait between runs. Off by default: on a small box
    the spinning threads steal the cores that decode, capture and the PLC link need."""
    use_cuda: bool = False
    """Use ONNX Runtime's CUDA provider when it is installed (falls back to CPU with a warning)."""
    providers: list[str] | None = None
    """Explicit ONNX Runtime provider list; overrides ``use_cuda`` when given."""
    max_batch: int = Field(default=1, ge=1, le=64)
    conf_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Candidate score floor for decoding (ultralytics' ``conf``). None: the package's
    ``runtime_hints.conf_threshold``, else min(0.25, the package's lowest decision threshold)."""
    iou_threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    """Class-aware NMS IoU (ultralytics' ``iou``, default 0.7)."""
    max_det: int = Field(default=300, ge=1, le=10000)
    warmup_runs: int = Field(default=2, ge=0, le=100)
    """Inferences run at load so the first real frame does not pay for lazy initialisation."""
    tensorrt: TensorRTSettings = Field(default_factory=TensorRTSettings)

    @model_validator(mode="after")
    def _providers_known(self) -> ModelSettings:
        if self.providers is not None and not self.providers:
            raise ValueError("providers: give at least one provider or leave it unset")
        return self
