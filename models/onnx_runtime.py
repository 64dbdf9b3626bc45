"""ONNX Runtime detector: the CPU runtime of the appliance (and CUDA where the provider exists).

One ``InferenceSession`` per detector, created with the thread counts of the config: on a 2-core
box the daemon gives inference a fixed share of the cores and ORT must not spin up one thread per
core behind its back. ``session.run`` is thread-safe, so several inference workers may share one
detector. Models exported with a fixed batch of 1 (the default export) are run frame by frame
inside one ``infer`` call; a dynamic-batch export runs the whole batch at once.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import structlog

from models.config import ModelSettings, OnnxRuntimeSettings
from models.decode import MaskMapper, limit_blas_threads, params_for
from models.package import ModelPackage, check_io_shapes
from models.preprocess import PAD_VALUE
from models.segbase import SegDetectorBase
from models.types import ModelError, ModelInfo, ModelPackageError

log = structlog.get_logger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def choose_providers(settings: ModelSettings | OnnxRuntimeSettings) -> list[str]:
    """Providers to ask for; unavailable ones are dropped with a warning, CPU is always last."""
    o = settings.onnxruntime if isinstance(settings, ModelSettings) else settings
    available = set(ort.get_available_providers())
    wanted = list(o.providers) if o.providers else ([CUDA, CPU] if o.use_cuda else [CPU])
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning(
            "onnxruntime_providers_unavailable",
            missing=missing,
            available=sorted(available),
            hint="install onnxruntime-gpu for CUDA; falling back to what is available",
        )
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(o: OnnxRuntimeSettings) -> ort.SessionOptions:
    """SessionOptions from the onnxruntime settings section (shared with scripts/bench_model.py,
    so the benchmark measures exactly what the daemon runs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = o.intra_op_threads
    opts.inter_op_num_threads = o.inter_op_threads
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if o.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    opts.graph_optimization_level = _OPT_LEVELS[o.graph_optimization]
    opts.enable_cpu_mem_arena = o.cpu_mem_arena
    opts.enable_mem_pattern = o.mem_pattern
    opts.log_severity_level = 3
    spin = "1" if o.spin_wait else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if o.thread_affinity:
        opts.add_session_config_entry("session.intra_op_thread_affinities", o.thread_affinity)
    return opts


class OnnxDetector(SegDetectorBase):
    """models.types.Detector on an ONNX Runtime session."""

    def __init__(self, package: ModelPackage, settings: ModelSettings) -> None:
        self._package = package
        manifest = package.manifest
        opts = session_options(settings.onnxruntime)
        providers = choose_providers(settings)
        try:
            session = ort.InferenceSession(str(package.model_path), opts, providers=providers)
        except Exception as e:  # ORT raises untyped runtime errors for bad models
            raise ModelPackageError(
                f"{package.model_path}: onnxruntime cannot load this model ({e})"
            ) from e
        self._session: ort.InferenceSession | None = session
        inp = session.get_inputs()
        outs = session.get_outputs()
        if len(inp) != 1:
            raise ModelPackageError(f"{package.model_path}: {len(inp)} inputs; expected 1 image")
        check_io_shapes(
            manifest, inp[0].shape, [o.shape for o in outs], where=str(package.model_path)
        )
        self._input_name = inp[0].name
        self._output_names = [o.name for o in outs]
        self._input_hw = (manifest.input_size[0], manifest.input_size[1])
        self._dtype: type = np.float16 if inp[0].type == "tensor(float16)" else np.float32
        batch_dim = inp[0].shape[0]
        self._fixed_batch: int | None = batch_dim if isinstance(batch_dim, int) else None
        self.max_batch = settings.max_batch
        self._classes = tuple(manifest.classes)
        self._params = params_for(settings, manifest)
        limit_blas_threads(settings.blas_threads)
        self._mapper = MaskMapper()
        self.providers: list[str] = session.get_providers()
        self.info: ModelInfo = package.info("onnxruntime")
        self._warm_up(settings.warmup_runs)
        log.info(
            "onnx_detector_loaded",
            model=self.info.model_id,
            sha256=self.info.sha256[:12],
            providers=self.providers,
            intra_op_threads=settings.onnxruntime.intra_op_threads,
            inter_op_threads=settings.onnxruntime.inter_op_threads,
            digest=self.info.digest[:12],
            fixed_batch=self._fixed_batch,
            max_batch=self.max_batch,
        )

    @property
    def input_hw(self) -> tuple[int, int]:
        return self._input_hw

    @property
    def session(self) -> ort.InferenceSession:
        """The raw session, for benchmarks that time ``session.run`` alone."""
        if self._session is None:
            raise ModelError("detector is closed")
        return self._session

    def _warm_up(self, runs: int) -> None:
        if runs <= 0:
            return
        gray: np.ndarray = np.full((1, 3, *self._input_hw), PAD_VALUE / 255.0, dtype=self._dtype)
        sizes = {1, self.max_batch} if self._fixed_batch is None else {1}
        for n in sorted(sizes):
            batch = np.repeat(gray, n, axis=0)
            for _ in range(runs):
                self.infer(batch)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise ModelError("detector is closed")
        try:
            return list(session.run(self._output_names, {self._input_name: batch}))
        except Exception as e:  # ORT raises untyped runtime errors
            raise ModelError(f"onnxruntime inference failed: {e}") from e

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self._check_batch(batch)
        if batch.dtype != self._dtype:
            batch = batch.astype(self._dtype)
        fixed = self._fixed_batch
        if fixed is None or batch.shape[0] == fixed:
            return self._run(np.ascontiguousarray(batch))
        # Fixed-batch export: run in chunks of the exported batch, padding the last chunk.
        parts: list[list[np.ndarray]] = []
        n = batch.shape[0]
        for start in range(0, n, fixed):
            chunk = batch[start : start + fixed]
            real = chunk.shape[0]
            if real < fixed:
                pad = np.zeros((fixed - real, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            parts.append([o[:real] for o in self._run(np.ascontiguousarray(chunk))])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def close(self) -> None:
        # Dropping the session frees its arena; later calls raise ModelError.
        self._session = None
