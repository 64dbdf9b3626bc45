"""The runtime registry: one entry per inference runtime, with its own settings class.

Like Frigate's detector plugins, each runtime brings only its own knobs, and this one table both
validates the config (``ModelSettings`` accepts the section of the selected runtime and refuses a
section for another one) and dispatches (``models.loader`` builds the selected runtime's detector,
importing its module only then, so CPU appliances never need TensorRT installed). Adding a runtime
is one settings class, one ``Runtime`` entry here, and one section field on ``ModelSettings``
(a test checks that the three agree).

In a line YAML::

    model:
      package: /var/lib/edge/models/parts-seg/2.1.0
      runtime: onnxruntime
      onnxruntime:            # only the selected runtime's section is allowed
        intra_op_threads: 2
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from models.config import ModelSettings
    from models.package import ModelPackage
    from models.types import Detector


class OnnxRuntimeSettings(BaseModel):
    """ONNX Runtime session options. Defaults are what scripts/bench_model.py measured best on
    the 2-core reference box (table in models/README.md); each option says what it bought."""

    model_config = ConfigDict(extra="forbid")

    intra_op_threads: int = Field(default=2, ge=1, le=256)
    """Threads inside one operator: set to the cores given to inference."""
    inter_op_threads: int = Field(default=1, ge=1, le=256)
    """Threads running independent operators at once; used only with execution_mode parallel.
    YOLOv8-seg is one chain of convolutions with little to overlap: parallel mode measured no
    faster than sequential with the same total threads (models/README.md)."""
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    """ORT graph rewrites (constant folding, Conv+BN/activation fusion, layout). "all" measured
    fastest; lower levels exist to rule the optimiser out when debugging a model."""
    cpu_mem_arena: bool = True
    """ORT's arena allocator: buffers reused across runs instead of malloc/free per tensor."""
    mem_pattern: bool = True
    """Pre-plans the activation buffers of a fixed-shape model once (our exports are static)."""
    spin_wait: bool = False
    """Let ORT's worker threads busy-wait between runs. Off by default: on a small box the
    spinning threads steal the cores that decode, capture and the PLC link need."""
    thread_affinity: str | None = None
    """ORT ``session.intra_op_thread_affinities`` (e.g. "1;2" pins the 2nd and 3rd intra-op
    threads to CPUs 1 and 2; logical processors are 1-based). None: the OS schedules them."""
    use_cuda: bool = False
    """Use ONNX Runtime's CUDA provider when it is installed (falls back to CPU with a warning)."""
    providers: list[str] | None = None
    """Explicit ONNX Runtime provider list; overrides ``use_cuda`` when given."""

    @model_validator(mode="after")
    def _providers_known(self) -> OnnxRuntimeSettings:
        if self.providers is not None and not self.providers:
            raise ValueError("providers: give at least one provider or leave it unset")
        if self.thread_affinity is not None and self.thread_affinity.count(";") + 2 != (
            self.intra_op_threads
        ):
            raise ValueError(
                f"thread_affinity {self.thread_affinity!r} must list intra_op_threads - 1 = "
                f"{self.intra_op_threads - 1} entries separated by ';' (the first thread is the "
                "caller's own)"
            )
        return self


class TensorRTSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine_path: Path | None = None
    """Where the serialized engine lives. None: a file under ``cache_dir`` named after the package,
    precision, batch, GPU model and TensorRT version (models/tensorrt_runtime.py). Engines are
    tied to the GPU and TensorRT version, so they are built on the target and never shipped
    inside a package."""
    cache_dir: Path = Path("/var/cache/edge/engines")
    """Under the systemd unit's CacheDirectory=edge: the only cache path the sandboxed service
    (ProtectSystem=strict) may write."""
    precision: Literal["fp16", "int8", "fp32"] = "fp16"
    calibration_images: Path | None = None
    """A directory of sample images for INT8 calibration (needed only to build an INT8 engine)."""
    calibration_cache: Path | None = None
    """INT8 calibration cache: reused when present, written after calibrating otherwise."""
    build_if_missing: bool = True
    """Build the engine at load when it does not exist (minutes on a Jetson; seconds on a T4)."""
    workspace_mib: int = Field(default=1024, ge=64)


class OpenVinoSettings(BaseModel):
    """OpenVINO options (the optional ``openvino`` extra; x86 CPUs)."""

    model_config = ConfigDict(extra="forbid")

    device: str = "CPU"
    threads: int = Field(default=2, ge=1, le=256)
    """INFERENCE_NUM_THREADS: the cores given to inference."""
    num_streams: int = Field(default=1, ge=1, le=64)
    """Parallel inference streams; 1 for the lowest latency per frame."""
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    precision: Literal["f32", "bf16", "f16"] = "f32"
    """Inference precision. Explicit because OpenVINO defaults to bf16 on CPUs that support it,
    which moves scores; bf16 is faster where supported but must be checked against f32
    decisions first (models/README.md)."""
    cpu_pinning: bool = False
    """Pin inference threads to cores (ENABLE_CPU_PINNING)."""
    cache_dir: Path | None = None
    """Compiled-model cache (CACHE_DIR): faster reloads; None: compile at every load."""


RuntimeName = Literal["onnxruntime", "tensorrt", "openvino"]


@dataclass(frozen=True, slots=True)
class Runtime:
    name: str
    settings: type[BaseModel]
    """Its own settings class: the YAML section ``model.<name>``."""
    detector: str
    """``module:Class`` of its Detector, imported only when this runtime is selected."""
    summary: str

    def load(self, package: ModelPackage, settings: ModelSettings) -> Detector:
        module, _, cls = self.detector.partition(":")
        factory = getattr(importlib.import_module(module), cls)
        detector: Detector = factory(package, settings)
        return detector


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime(
            "onnxruntime",
            OnnxRuntimeSettings,
            "models.onnx_runtime:OnnxDetector",
            "ONNX Runtime: CPU (and CUDA where onnxruntime-gpu is installed)",
        ),
        Runtime(
            "tensorrt",
            TensorRTSettings,
            "models.tensorrt_runtime:TensorRTDetector",
            "TensorRT engine built on the target GPU (Jetson, T4)",
        ),
        Runtime(
            "openvino",
            OpenVinoSettings,
            "models.openvino_runtime:OpenVinoDetector",
            "OpenVINO on x86 CPUs (the optional openvino extra)",
        ),
    )
}
