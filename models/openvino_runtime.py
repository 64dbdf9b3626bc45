"""OpenVINO detector: Intel's CPU runtime, an optional alternative to ONNX Runtime on x86 boxes.

Why it exists: on the reference 2-core box it ran the same ONNX file faster than ONNX Runtime at
the same thread count, in FP32 (numbers and command in models/README.md). It reads the package's
ONNX file directly (no conversion step, nothing new to ship), and the shared pre/post-processing
(models/segbase.py) keeps its detections equal to the ONNX Runtime detector's
(tests/models/test_runtime_openvino.py).

``precision`` is explicit on purpose: on CPUs with bf16 support OpenVINO silently defaults to bf16
inference, which moves scores (and so decisions near a threshold); f32 is the default here, bf16
a measured, opt-in choice.

OpenVINO is the ``openvino`` extra (``pip install 'edge-inspect[openvino]'``); this module imports
it only when the runtime is selected and says what to install when it is missing. The runtime
(``openvino.Core``) sends no telemetry; the ``openvino-telemetry`` package it pulls in is used by
OpenVINO's model-conversion tools, which the appliance never runs.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import structlog

from models.config import ModelSettings
from models.decode import MaskMapper, limit_blas_threads, params_for
from models.package import ModelPackage, check_io_shapes
from models.preprocess import PAD_VALUE
from models.segbase import SegDetectorBase
from models.types import ModelError, ModelInfo, ModelPackageError

log = structlog.get_logger(__name__)

_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as e:
        raise ModelError(
            "model.runtime is 'openvino' but the openvino package is not installed: "
            "pip install 'edge-inspect[openvino]' (x86 CPUs), or set model.runtime: onnxruntime"
        ) from e
    return ov


def _dims(partial_shape: Any) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in partial_shape]


class OpenVinoDetector(SegDetectorBase):
    """models.types.Detector on an OpenVINO compiled model (one infer request, serialised)."""

    def __init__(self, package: ModelPackage, settings: ModelSettings) -> None:
        ov = _import_openvino()
        o = settings.openvino
        manifest = package.manifest
        core = ov.Core()
        if o.cache_dir is not None:
            core.set_property({"CACHE_DIR": str(o.cache_dir)})
        try:
            model = core.read_model(str(package.model_path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses for bad files
            raise ModelPackageError(
                f"{package.model_path}: OpenVINO cannot read this model ({e})"
            ) from e
        if len(model.inputs) != 1:
            raise ModelPackageError(
                f"{package.model_path}: {len(model.inputs)} inputs; expected 1 image"
            )
        in_shape = _dims(model.inputs[0].get_partial_shape())
        check_io_shapes(
            manifest,
            in_shape,
            [_dims(out.get_partial_shape()) for out in model.outputs],
            where=str(package.model_path),
        )
        config = {
            "INFERENCE_NUM_THREADS": o.threads,
            "NUM_STREAMS": o.num_streams,
            "PERFORMANCE_HINT": o.performance_hint,
            "INFERENCE_PRECISION_HINT": _PRECISIONS[o.precision],
            "ENABLE_CPU_PINNING": o.cpu_pinning,
        }
        try:
            compiled = core.compile_model(model, o.device, config)
        except Exception as e:
            raise ModelError(f"OpenVINO cannot compile the model for {o.device}: {e}") from e
        self._compiled: Any = compiled
        self._request: Any = compiled.create_infer_request()
        self._outputs = list(compiled.outputs)
        self._lock = threading.Lock()  # one infer request: one batch at a time
        self._input_hw = (manifest.input_size[0], manifest.input_size[1])
        self._dtype: type = np.float32
        batch_dim = in_shape[0]
        self._fixed_batch: int | None = batch_dim if isinstance(batch_dim, int) else None
        self.max_batch = settings.max_batch
        self._classes = tuple(manifest.classes)
        self._params = params_for(settings, manifest)
        limit_blas_threads(settings.blas_threads)
        self._mapper = MaskMapper()
        self.info: ModelInfo = package.info("openvino")
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision: str = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        """What OpenVINO actually runs in (f32, bf16...), as it reports it."""
        self._warm_up(settings.warmup_runs)
        log.info(
            "openvino_detector_loaded",
            model=self.info.model_id,
            digest=self.info.digest[:12],
            device=o.device,
            threads=o.threads,
            precision=self.precision,
            version=ov.__version__,
        )

    def _warm_up(self, runs: int) -> None:
        gray = np.full((1, 3, *self._input_hw), PAD_VALUE / 255.0, dtype=np.float32)
        for _ in range(runs):
            self.infer(gray)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        if self._request is None:
            raise ModelError("detector is closed")
        try:
            with self._lock:
                res = self._request.infer({0: batch})
                return [np.array(res[out], copy=True) for out in self._outputs]
        except Exception as e:
            raise ModelError(f"OpenVINO inference failed: {e}") from e

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self._check_batch(batch)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        fixed = self._fixed_batch
        if fixed is None or batch.shape[0] == fixed:
            return self._run(batch)
        parts: list[list[np.ndarray]] = []
        for start in range(0, batch.shape[0], fixed):
            chunk = batch[start : start + fixed]
            real = chunk.shape[0]
            if real < fixed:
                chunk = np.concatenate(
                    [chunk, np.zeros((fixed - real, *chunk.shape[1:]), np.float32)]
                )
            parts.append([o[:real] for o in self._run(chunk)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def close(self) -> None:
        self._request = None
        self._compiled = None
