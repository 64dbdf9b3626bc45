"""TensorRT detector: the GPU runtime (Jetson / T4 class appliances).

This module imports on any machine: ``tensorrt`` and ``pycuda`` are imported only when a
TensorRT detector is built or loaded, and their absence is reported as a ModelError that says
what to install. CPU appliances never need them.

Engines are specific to a GPU model and a TensorRT version, so they are never shipped in a model
package: they are built on the target from the package's ONNX file (FP16, or INT8 calibrated on
sample images) and cached next to a small JSON sidecar recording which ONNX file (sha256),
precision, batch, GPU model (name and compute capability) and TensorRT version produced them. A
stale engine (new package, TensorRT upgrade, the disk moved to another GPU) is detected and
rebuilt instead of being run against the wrong model or a GPU it was not tuned for.

TensorRT <= 10 builds with the precision builder flags (INT8 through an entropy calibrator and a
calibration cache). TensorRT 11 removed them (strong typing only): there the ONNX is converted
first, to FP16 with onnxconverter-common, or to INT8 Q/DQ with NVIDIA ModelOpt.

At run time one execution context runs on one CUDA stream with page-locked host buffers and
device buffers allocated once at load; calls are serialised by a lock (a context cannot run two
batches at once) and the CUDA context is pushed around each call, since inference runs in
worker threads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from models.config import ModelSettings, TensorRTSettings
from models.decode import MaskMapper, limit_blas_threads, params_for
from models.package import ModelPackage, check_io_shapes
from models.preprocess import PAD_VALUE, preprocess
from models.segbase import SegDetectorBase
from models.types import ModelError, ModelInfo

log = structlog.get_logger(__name__)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


# ---- availability ----


def tensorrt_installed() -> bool:
    return (
        importlib.util.find_spec("tensorrt") is not None
        and importlib.util.find_spec("pycuda") is not None
    )


def nvidia_gpu_present() -> bool:
    """An NVIDIA device node exists (desktop/datacenter GPUs, or Jetson's integrated GPU)."""
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu"))


def tensorrt_available() -> bool:
    return tensorrt_installed() and nvidia_gpu_present()


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ModelError(
            "model.runtime is 'tensorrt' but the tensorrt Python package is not installed: it "
            "comes with JetPack / the NVIDIA TensorRT container (or `pip install tensorrt` on an "
            "x86 host with an NVIDIA driver); otherwise set model.runtime: onnxruntime"
        ) from e
    return trt


def _import_cuda() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise ModelError(
            "model.runtime is 'tensorrt' but pycuda is not installed: `pip install "
            "'edge-inspect[gpu]'` (needs the CUDA toolkit headers), "
            "or set model.runtime: onnxruntime"
        ) from e
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise ModelError("model.runtime is 'tensorrt' but CUDA sees no GPU")
    except cuda.Error as e:
        raise ModelError(f"CUDA cannot start ({e}); check the NVIDIA driver") from e
    return cuda


def _has_weak_typing(trt: Any) -> bool:
    """TensorRT <= 10 has precision builder flags; 11 removed them (strongly typed only)."""
    return hasattr(trt.BuilderFlag, "FP16")


# ---- engine building ----


def _trt_version(trt: Any) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def gpu_identity(cuda: Any, device: int = 0) -> str:
    """The GPU model an engine is built for, file-name safe: ``Tesla-T4-sm75``.

    TensorRT picks kernels (tactics) for the exact GPU at build time; an engine from another GPU
    model either refuses to deserialize or runs with tactics tuned for different hardware. So
    the name and compute capability are part of the engine's cache key.
    """
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{dev.name()}-sm{major}{minor}").strip("-")


def default_engine_path(
    package: ModelPackage, settings: ModelSettings, trt_version: str, gpu: str
) -> Path:
    """``<cache_dir>/<name>-<version>-<sha12>-<precision>-b<batch>-<gpu>-trt<version>.engine``,
    or the configured ``engine_path``: one file per package, precision, batch, GPU model and
    TensorRT version, so boxes sharing an image (or a GPU swap) never pick up a foreign engine."""
    t = settings.tensorrt
    if t.engine_path is not None:
        return t.engine_path
    m = package.manifest
    name = (
        f"{m.name}-{m.version}-{package.model_sha256[:12]}-{t.precision}-b{settings.max_batch}"
        f"-{gpu}-trt{trt_version}.engine"
    )
    return t.cache_dir / name


def _sidecar(engine_path: Path) -> Path:
    return engine_path.with_suffix(engine_path.suffix + ".json")


def _expected_meta(
    package: ModelPackage, settings: ModelSettings, trt_version: str, gpu: str
) -> dict[str, Any]:
    """The engine's identity, kept in its sidecar: the engine is reused only on a full match
    (an explicit ``engine_path`` has no identity in its name, so this is what guards it)."""
    return {
        "onnx_sha256": package.model_sha256,
        "precision": settings.tensorrt.precision,
        "max_batch": settings.max_batch,
        "tensorrt": trt_version,
        "gpu": gpu,
        "input_size": list(package.manifest.input_size),
    }


def check_writable_dir(folder: Path) -> None:
    """Fail before a build of minutes, not after it, when the engine cannot be stored.

    Under the systemd unit (ProtectSystem=strict) only /var/lib/edge and /var/cache/edge are
    writable; a cache_dir elsewhere would build on every start and then fail to save.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ModelError(
            f"cannot write the engine to {folder} ({e}); set model.tensorrt.cache_dir (or "
            "engine_path) to a writable directory (the systemd unit allows /var/cache/edge)"
        ) from e


def engine_is_current(engine_path: Path, expected: dict[str, Any]) -> bool:
    try:
        meta = json.loads(_sidecar(engine_path).read_text())
    except (OSError, ValueError):
        return False
    return engine_path.is_file() and all(meta.get(k) == v for k, v in expected.items())


def calibration_batches(
    images_dir: Path, input_hw: tuple[int, int], batch: int, limit: int = 512
) -> Iterator[np.ndarray]:
    """Preprocessed Nx3xHxW float32 batches from sample images (same letterbox as inference)."""
    import cv2

    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ModelError(
            f"no calibration images (png/jpg/bmp/tif) under {images_dir}: INT8 needs a few hundred "
            "representative line images (model.tensorrt.calibration_images)"
        )
    buf: list[np.ndarray] = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if img is None:
            log.warning("calibration_image_unreadable", path=str(f))
            continue
        if img.dtype != np.uint8:
            img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        buf.append(preprocess(img, input_hw).tensor[0])
        if len(buf) == batch:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def _make_calibrator(
    trt: Any, cuda: Any, batches: list[np.ndarray], cache_path: Path | None
) -> Any:
    """IInt8EntropyCalibrator2 over pre-made batches (TensorRT <= 10)."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._batches = batches
            self._i = 0
            self._dev = cuda.mem_alloc(max(b.nbytes for b in batches)) if batches else None

        def get_batch_size(self) -> int:
            return int(batches[0].shape[0]) if batches else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._i >= len(self._batches) or self._dev is None:
                return None
            b = np.ascontiguousarray(self._batches[self._i], dtype=np.float32)
            if b.shape[0] != self.get_batch_size():
                return None  # TensorRT needs full batches
            cuda.memcpy_htod(self._dev, b)
            self._i += 1
            return [int(self._dev)]

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache_path.write_bytes(bytes(cache))

    return _Calibrator()


def _convert_for_strong_typing(
    onnx_path: Path, t: TensorRTSettings, input_hw: tuple[int, int], work: Path
) -> Path:
    """TensorRT 11+: precision lives in the ONNX graph itself (FP16 casts or INT8 Q/DQ nodes)."""
    if t.precision == "fp32":
        return onnx_path
    if t.precision == "fp16":
        try:
            import onnx
            from onnxconverter_common import float16
        except ImportError as e:
            raise ModelError(
                "TensorRT 11 needs an FP16 ONNX: `pip install onnx onnxconverter-common`"
            ) from e
        model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
        out = work / "model_fp16.onnx"
        onnx.save(model, str(out))
        return out
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise ModelError(
            "TensorRT 11 builds INT8 from a Q/DQ ONNX: `pip install nvidia-modelopt[onnx]`"
        ) from e
    cache = t.calibration_cache
    data = None
    if cache is None or not cache.is_file():
        if t.calibration_images is None:
            raise ModelError(
                "INT8 needs model.tensorrt.calibration_images (or a calibration cache)"
            )
        data = np.concatenate(list(calibration_batches(t.calibration_images, input_hw, 8)))
    out = work / "model_int8_qdq.onnx"
    quantize(
        onnx_path=str(onnx_path),
        quantize_mode="int8",
        calibration_data=data,
        calibration_cache_path=str(cache) if cache is not None and cache.is_file() else None,
        output_path=str(out),
    )
    return out


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    input_hw: tuple[int, int],
    tensorrt: TensorRTSettings,
    max_batch: int = 1,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Build and serialise an engine from an ONNX file; writes ``<engine>.json`` beside it.

    Slow (tens of seconds to minutes): meant for ``edge model build-engine`` or the first load.
    """
    check_writable_dir(engine_path.parent)
    trt = _import_trt()
    cuda = _import_cuda()
    t = tensorrt
    logger = trt.Logger(trt.Logger.WARNING)
    weak = _has_weak_typing(trt)
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        with tempfile.TemporaryDirectory(prefix="edge-trt-") as tmp:
            source = (
                onnx_path if weak else _convert_for_strong_typing(onnx_path, t, input_hw, Path(tmp))
            )
            builder = trt.Builder(logger)
            flags = 0
            if (
                _trt_version(trt).split(".")[0].isdigit()
                and int(_trt_version(trt).split(".")[0]) < 10
            ):
                # TensorRT 8.x (JetPack 5): explicit batch must be asked for.
                flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(source)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise ModelError(f"TensorRT cannot parse {source}: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, t.workspace_mib << 20)
            inp = network.get_input(0)
            if inp.shape[0] == -1:  # dynamic batch export: one profile up to max_batch
                profile = builder.create_optimization_profile()
                shape = (1, 3, *input_hw)
                profile.set_shape(
                    inp.name, shape, (max_batch, 3, *input_hw), (max_batch, 3, *input_hw)
                )
                config.add_optimization_profile(profile)
            if weak and t.precision in ("fp16", "int8"):
                config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines keep FP16 fallbacks
            if weak and t.precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)
                batches: list[np.ndarray] = []
                cache = t.calibration_cache
                if cache is None or not cache.is_file():
                    if t.calibration_images is None:
                        raise ModelError(
                            "INT8 needs model.tensorrt.calibration_images (or a calibration_cache)"
                        )
                    batches = [b for b in calibration_batches(t.calibration_images, input_hw, 1)]
                config.int8_calibrator = _make_calibrator(trt, cuda, batches, cache)
            log.info(
                "tensorrt_build_start",
                onnx=str(onnx_path),
                precision=t.precision,
                tensorrt=_trt_version(trt),
                strongly_typed=not weak,
            )
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise ModelError(f"TensorRT failed to build an engine from {source} (see its log)")
            try:
                engine_path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(engine_path, bytes(plan))
                _atomic_write(_sidecar(engine_path), json.dumps(meta or {}, indent=2).encode())
            except OSError as e:
                raise ModelError(
                    f"cannot write the engine to {engine_path} ({e}); set "
                    "model.tensorrt.cache_dir (or engine_path) to a writable directory"
                ) from e
    finally:
        ctx.pop()
        ctx.detach()
    log.info("tensorrt_build_done", engine=str(engine_path), bytes=engine_path.stat().st_size)
    return engine_path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the daemon may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine_for_package(package: ModelPackage, settings: ModelSettings) -> Path:
    """The engine a TensorRTDetector would load for this package and settings, built now."""
    trt = _import_trt()
    version = _trt_version(trt)
    gpu = gpu_identity(_import_cuda())
    path = default_engine_path(package, settings, version, gpu)
    return build_engine(
        package.model_path,
        path,
        input_hw=(package.manifest.input_size[0], package.manifest.input_size[1]),
        tensorrt=settings.tensorrt,
        max_batch=settings.max_batch,
        meta=_expected_meta(package, settings, version, gpu),
    )


# ---- the detector ----


class TensorRTDetector(SegDetectorBase):
    """models.types.Detector on a TensorRT engine, in-process."""

    def __init__(self, package: ModelPackage, settings: ModelSettings) -> None:
        trt = _import_trt()
        cuda = _import_cuda()
        self._cuda = cuda
        self._lock = threading.Lock()
        manifest = package.manifest
        self._input_hw = (manifest.input_size[0], manifest.input_size[1])
        version = _trt_version(trt)
        gpu = gpu_identity(cuda)
        engine_path = default_engine_path(package, settings, version, gpu)
        expected = _expected_meta(package, settings, version, gpu)
        if not engine_is_current(engine_path, expected):
            if not settings.tensorrt.build_if_missing:
                raise ModelError(
                    f"TensorRT engine {engine_path} is missing or was built from another model/"
                    "precision/TensorRT version; run `edge model build-engine` or set "
                    "model.tensorrt.build_if_missing: true"
                )
            build_engine_for_package(package, settings)

        self._ctx = cuda.Device(0).retain_primary_context()
        self._ctx.push()
        try:
            self._trt_logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._trt_logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self._engine is None:
                raise ModelError(f"TensorRT cannot deserialize {engine_path}; rebuild it")
            self._context = self._engine.create_execution_context()
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            if len(inputs) != 1:
                raise ModelError(f"engine {engine_path} has {len(inputs)} inputs; expected 1")
            # ultralytics names them output0 (detections) and output1 (prototypes).
            outputs.sort()
            self._in_name = inputs[0]
            self._out_names = outputs
            in_shape = tuple(self._engine.get_tensor_shape(self._in_name))
            out_shapes = [tuple(self._engine.get_tensor_shape(n)) for n in outputs]
            dyn = in_shape[0] == -1
            check_io_shapes(
                manifest,
                ["batch" if d == -1 else int(d) for d in in_shape],
                [["batch" if d == -1 else int(d) for d in s] for s in out_shapes],
                where=str(engine_path),
            )
            self._capacity = settings.max_batch if dyn else int(in_shape[0])
            self._dynamic = dyn
            self.max_batch = settings.max_batch
            self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._in_name)))
            full_in = (self._capacity, 3, *self._input_hw)
            if dyn:
                self._context.set_input_shape(self._in_name, full_in)
            self._h_in = cuda.pagelocked_empty(full_in, self._in_dtype)
            self._d_in = cuda.mem_alloc(self._h_in.nbytes)
            self._context.set_tensor_address(self._in_name, int(self._d_in))
            self._h_out: list[np.ndarray] = []
            self._d_out: list[Any] = []
            for n, s in zip(outputs, out_shapes, strict=True):
                shape = (self._capacity, *[int(d) for d in s[1:]])
                dt = np.dtype(trt.nptype(self._engine.get_tensor_dtype(n)))
                h = cuda.pagelocked_empty(shape, dt)
                d = cuda.mem_alloc(h.nbytes)
                self._context.set_tensor_address(n, int(d))
                self._h_out.append(h)
                self._d_out.append(d)
            self._stream = cuda.Stream()
        finally:
            self._ctx.pop()

        self._classes = tuple(manifest.classes)
        self._dtype = self._in_dtype.type
        self._params = params_for(settings, manifest)
        limit_blas_threads(settings.blas_threads)
        self._mapper = MaskMapper()
        self._closed = False
        self.engine_path = engine_path
        self.info: ModelInfo = package.info("tensorrt")
        gray = np.full((1, 3, *self._input_hw), PAD_VALUE / 255.0, dtype=np.float32)
        for _ in range(settings.warmup_runs):
            self.infer(gray)
        log.info(
            "tensorrt_detector_loaded",
            model=self.info.model_id,
            engine=str(engine_path),
            precision=settings.tensorrt.precision,
            capacity=self._capacity,
            tensorrt=version,
            gpu=gpu,
        )

    def _run_chunk(self, chunk: np.ndarray) -> list[np.ndarray]:
        cuda = self._cuda
        n = chunk.shape[0]
        self._h_in[:n] = chunk
        if self._dynamic:
            self._context.set_input_shape(self._in_name, (n, 3, *self._input_hw))
        # A leading-axis slice of the pinned buffer is still contiguous, pinned memory.
        cuda.memcpy_htod_async(self._d_in, self._h_in[:n], self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise ModelError("TensorRT execute_async_v3 failed")
        for h, d in zip(self._h_out, self._d_out, strict=True):
            cuda.memcpy_dtoh_async(h, d, self._stream)
        self._stream.synchronize()
        return [h[:n].astype(np.float32, copy=True) for h in self._h_out]

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self._check_batch(batch)
        with self._lock:
            if self._closed:
                raise ModelError("detector is closed")
            self._ctx.push()
            try:
                parts = [
                    self._run_chunk(batch[i : i + self._capacity])
                    for i in range(0, batch.shape[0], self._capacity)
                ]
            except self._cuda.Error as e:
                raise ModelError(f"CUDA error during inference: {e}") from e
            finally:
                self._ctx.pop()
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ctx.push()
            try:
                for d in [self._d_in, *self._d_out]:
                    with contextlib.suppress(Exception):
                        d.free()
                del self._context, self._engine, self._runtime
            finally:
                self._ctx.pop()
                self._ctx.detach()
