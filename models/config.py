"""Model runtime settings (the ``model:`` section of a line config).

Decoding thresholds live here as well as in the package: the package carries the operating point
chosen on validation data (decision thresholds), while ``conf_threshold`` is only the floor below
which candidates are not even decoded. It must stay at or below every decision threshold, or the
decision rules would never see the detections they are meant to judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.runtimes import (
    RUNTIMES,
    OnnxRuntimeSettings,
    OpenVinoSettings,
    RuntimeName,
    TensorRTSettings,
)

__all__ = [
    "RUNTIMES",
    "ModelSettings",
    "OnnxRuntimeSettings",
    "OpenVinoSettings",
    "TensorRTSettings",
]

LEGACY_ONNX_KEYS = ("intra_op_threads", "inter_op_threads", "spin_wait", "use_cuda", "providers")
"""ONNX Runtime knobs that used to sit directly under ``model:``; still accepted there (moved into
the ``onnxruntime`` section) so existing line configs keep loading."""


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: Path
    """A model package directory (manifest.json + model files). Bare model files are refused."""
    runtime: RuntimeName = "onnxruntime"
    """Which entry of the runtime registry (models/runtimes.py) runs the model."""
    onnxruntime: OnnxRuntimeSettings = Field(default_factory=OnnxRuntimeSettings)
    """Options of the onnxruntime runtime (allowed only when it is selected)."""
    tensorrt: TensorRTSettings = Field(default_factory=TensorRTSettings)
    """Options of the tensorrt runtime (allowed only when it is selected)."""
    openvino: OpenVinoSettings = Field(default_factory=OpenVinoSettings)
    """Options of the openvino runtime (allowed only when it is selected)."""
    blas_threads: int | None = Field(default=1, ge=1, le=256)
    """Process-wide BLAS (OpenBLAS) thread cap set at load, for every runtime. The decode's matrix
    products are tiny; a multi-threaded BLAS pool busy-waits after each one and fights ONNX
    Runtime for the cores (2-core box: postprocess 10.7 -> 0.55 ms p50, infer 12.6 -> ~6 ms).
    None leaves it alone."""
    max_batch: int = Field(default=1, ge=1, le=64)
    conf_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Candidate score floor for decoding (ultralytics' ``conf``). None: the daemon uses the
    lowest decision threshold of its rules (every recipe's: a candidate below it cannot change a
    verdict, so its mask is never paid for); a runtime used alone (bench, replay) uses the
    package's ``runtime_hints.conf_threshold``, else min(0.25, its lowest decision threshold)."""
    iou_threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    """Class-aware NMS IoU (ultralytics' ``iou``, default 0.7)."""
    max_det: int = Field(default=300, ge=1, le=10000)
    warmup_runs: int = Field(default=2, ge=0, le=100)
    """Inferences run at load so the first real frame does not pay for lazy initialisation."""
    trusted_keys: list[Path] = Field(default_factory=list)
    """Public keys (PEM, from `edge model keygen`) of which one must have signed every package
    this line loads. Empty: signatures are not required (the package digest is still checked)."""
    store: Path | None = None
    """The model store (models/store.py). None: ``<uplink.spool_dir>/../models`` (the demo);
    on a line, ``/var/lib/edge/models``."""

    @model_validator(mode="before")
    @classmethod
    def _lift_legacy_keys(cls, data: Any) -> Any:
        """Accept the old flat ONNX Runtime keys by moving them into ``onnxruntime:``."""
        if not isinstance(data, dict):
            return data
        legacy = [k for k in LEGACY_ONNX_KEYS if k in data]
        if not legacy:
            return data
        data = dict(data)
        runtime = data.get("runtime", "onnxruntime")
        if runtime != "onnxruntime":
            raise ValueError(
                f"{', '.join(legacy)}: ONNX Runtime option(s), but runtime is {runtime!r}; "
                f"remove them (the {runtime} options go under model.{runtime})"
            )
        section = data.get("onnxruntime")
        if isinstance(section, BaseModel):
            section = section.model_dump(exclude_unset=True)
        section = dict(section or {})
        clash = [k for k in legacy if k in section]
        if clash:
            raise ValueError(
                f"{', '.join(clash)} given both directly under model and under model.onnxruntime; "
                "keep only the onnxruntime one"
            )
        for k in legacy:
            section[k] = data.pop(k)
        data["onnxruntime"] = section
        return data

    @model_validator(mode="after")
    def _only_the_selected_runtime(self) -> ModelSettings:
        spec = RUNTIMES[self.runtime]
        for name in RUNTIMES:
            if name != self.runtime and name in self.model_fields_set:
                raise ValueError(
                    f"model.{name} is set but runtime is {self.runtime!r}: a section holds one "
                    f"runtime's options; remove it or select runtime: {name}"
                )
        if not isinstance(self.runtime_settings, spec.settings):  # registry and fields disagree
            raise ValueError(f"model.{self.runtime} is not a {spec.settings.__name__}")
        return self

    @property
    def runtime_settings(self) -> BaseModel:
        """The selected runtime's own settings (its section, defaults filled in)."""
        section: BaseModel = getattr(self, self.runtime)
        return section

    # Read-only views kept for callers written before the per-runtime sections (edge/bench.py).
    @property
    def intra_op_threads(self) -> int:
        return self.onnxruntime.intra_op_threads

    @property
    def cpu_threads(self) -> int:
        """CPU threads one detector's network runs on (0: it runs on a GPU)."""
        if self.runtime == "tensorrt":
            return 0
        if self.runtime == "openvino":
            return self.openvino.threads if self.openvino.device.upper() == "CPU" else 0
        return self.onnxruntime.intra_op_threads

    @property
    def inter_op_threads(self) -> int:
        return self.onnxruntime.inter_op_threads

    @property
    def spin_wait(self) -> bool:
        return self.onnxruntime.spin_wait

    @property
    def use_cuda(self) -> bool:
        return self.onnxruntime.use_cuda

    @property
    def providers(self) -> list[str] | None:
        return self.onnxruntime.providers
