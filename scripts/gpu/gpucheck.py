#!/usr/bin/env python3
"""The Python half of scripts/gpu_check.sh: everything that is easier to get right (and to test
on a CPU box) in Python than in bash.

Each subcommand is one small step the shell script calls; the pure parts (parsing nvidia-smi,
choosing the TensorRT wheel, the pycuda build config, the line YAML, the bench table, the run
summary) are plain functions that tests/models/test_gpu_check_script.py exercises without a GPU.
Heavy imports (torch, ultralytics, TensorRT, the project's runtime) happen inside the subcommands
that need them, so ``--help`` and the pure functions run with the standard library alone.

    python scripts/gpu/gpucheck.py gpu-info --smi nvidia-smi.txt --query query.csv
    python scripts/gpu/gpucheck.py trt-spec --cuda-major 12
    python scripts/gpu/gpucheck.py bench-table OUT/bench/*/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# ---- GPU facts from nvidia-smi ----


def parse_gpu_info(smi_text: str, query_csv: str) -> dict[str, Any]:
    """GPU name, driver, compute capability and the driver's CUDA version, for the first GPU.

    ``smi_text`` is plain ``nvidia-smi`` output (its banner carries "CUDA Version: 12.2", the
    newest CUDA the driver supports, which decides the TensorRT wheel); ``query_csv`` is
    ``nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total
    --format=csv,noheader`` (older drivers have no compute_cap: fewer columns are accepted).
    """
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_text)
    if m is None:
        raise ValueError(
            "nvidia-smi shows no 'CUDA Version': the NVIDIA driver is not loaded or too old"
        )
    lines = [ln for ln in query_csv.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("nvidia-smi --query-gpu listed no GPU")
    cols = [c.strip() for c in lines[0].split(",")]
    info: dict[str, Any] = {
        "name": cols[0],
        "driver": cols[1] if len(cols) > 1 else "unknown",
        "compute_cap": cols[2] if len(cols) > 2 and re.fullmatch(r"\d+\.\d+", cols[2]) else None,
        "memory": cols[3] if len(cols) > 3 else None,
        "cuda": f"{m.group(1)}.{m.group(2)}",
        "cuda_major": int(m.group(1)),
        "gpus": len(lines),
        "jetson": Path("/etc/nv_tegra_release").exists(),
    }
    return info


def trt_pip_spec(cuda_major: int) -> str:
    """The TensorRT wheel for the driver's CUDA major.

    Pinned below 11: TensorRT 11 removed the FP16/INT8 builder flags and the INT8 calibrator
    (strong typing only), so its INT8 path needs NVIDIA ModelOpt's Q/DQ conversion; 10.x builds
    FP16 and calibrated INT8 directly and runs on every GPU from Turing (T4) on. TRT_SPEC in the
    environment overrides this (e.g. ``tensorrt-cu12==11.4.*`` to test the 11.x path).
    """
    if cuda_major == 11:
        return "tensorrt-cu11>=10.0,<11"
    if cuda_major == 12:
        return "tensorrt-cu12>=10.3,<11"
    if cuda_major == 13:
        return "tensorrt-cu13>=10.13.2,<11"
    raise ValueError(
        f"no TensorRT wheel is known for CUDA {cuda_major}: set TRT_SPEC to a pip requirement "
        "(e.g. tensorrt-cu12) that matches this driver"
    )


def cuda_runtime_pip_spec(cuda_major: int) -> str:
    """The pip wheel that carries cuda.h for this CUDA major (pycuda's build needs the header)."""
    if cuda_major >= 13:
        return f"nvidia-cuda-runtime>={cuda_major},<{cuda_major + 1}"
    return f"nvidia-cuda-runtime-cu{cuda_major}"


# ---- pycuda without a CUDA toolkit ----


def find_cuda_header_dir(site_dirs: Iterable[Path]) -> Path | None:
    """The ``include`` folder holding cuda.h inside pip's ``nvidia/*`` wheels, if any."""
    for site in site_dirs:
        for inc in sorted((site / "nvidia").glob("*/include")):
            if (inc / "cuda.h").is_file():
                return inc
    return None


def find_libcuda(ldconfig_text: str) -> Path | None:
    """libcuda.so.1 (the driver's own library) from ``ldconfig -p`` output."""
    for line in ldconfig_text.splitlines():
        m = re.match(r"\s*libcuda\.so\.1\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if m and ("64" in m.group(1) or "aarch64" in m.group(1) or "AArch64" in m.group(1)):
            return Path(m.group(2))
    return None


def write_pycuda_siteconf(home: Path, include_dir: Path, libcuda: Path) -> Path:
    """``$HOME/.aksetup-defaults.py`` for building pycuda from pip's CUDA headers.

    pycuda's setup finds the toolkit through ``nvcc`` on PATH; on a box with only the driver
    (common on cloud T4 images and containers) there is none. Its build reads defaults from
    ``~/.aksetup-defaults.py``: point it at pip's cuda.h, link against the driver's libcuda
    through a ``libcuda.so`` link (the unversioned name is part of the toolkit, not the driver),
    and leave out CURAND, whose library the driver does not carry. The file goes into a
    throw-away HOME used only for that pip command.
    """
    libdir = home / "libcuda"
    libdir.mkdir(parents=True, exist_ok=True)
    link = libdir / "libcuda.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(libcuda)
    conf = home / ".aksetup-defaults.py"
    conf.write_text(
        f"CUDA_ROOT = {str(include_dir.parent)!r}\n"
        f"CUDA_INC_DIR = [{str(include_dir)!r}]\n"
        f"CUDADRV_LIB_DIR = [{str(libdir)!r}]\n"
        "CUDA_ENABLE_CURAND = False\n"
    )
    return conf


# ---- the temporary line YAML for `edge bench` ----


def line_yaml(
    *,
    package: Path,
    engine: Path,
    precision: str,
    samples: Path,
    spool: Path,
    workers: str,
    cache_dir: Path,
) -> str:
    """A line config that runs ``package`` on TensorRT from an engine built beforehand.

    ``build_if_missing: false``: the bench must time the engine the check built and compared,
    and a stale or foreign engine (sidecar identity: ONNX, precision, batch, GPU, TensorRT) is
    an error instead of a silent rebuild inside the measured run.
    """
    w = workers if workers == "auto" else str(int(workers))
    return f"""# Written by scripts/gpu_check.sh: the demo line on TensorRT (edge bench input).
line: gpu-check
cameras:
  - id: cam0
    type: replay
    plc_slot: 0
    path: {json.dumps(str(samples))}
    fps: 60
    loop: true
model:
  package: {json.dumps(str(package))}
  runtime: tensorrt
  tensorrt:
    engine_path: {json.dumps(str(engine))}
    cache_dir: {json.dumps(str(cache_dir))}
    precision: {precision}
    build_if_missing: false
  max_batch: 1
  warmup_runs: 3
pipeline:
  budget_ms: 348
  failsafe_reserve_ms: 30
  queue_size: 16
  max_batch: 1
  workers: {w}
plc:
  type: modbus
  simulator: true
  port: 0
uplink:
  spool_dir: {json.dumps(str(spool))}
"""


# ---- the bench table ----


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def bench_row(doc: dict[str, Any]) -> dict[str, Any]:
    """One table row from an `edge bench` bench.json."""
    s = doc["summary"]
    e2e = s.get("end_to_end_ms", {})
    failsafes = s.get("failsafes") or {}
    return {
        "cameras": int(doc["config"]["cameras"]),
        "offered_fps": _num(doc.get("offered_fps")),
        "real_verdicts_per_s": _num(doc.get("real_verdicts_per_s")),
        "failsafes": int(sum(failsafes.values())),
        "failsafe_reasons": dict(failsafes),
        "deadline_misses": int(s.get("deadline_misses", 0)),
        "e2e_p50_ms": _num(e2e.get("p50")),
        "e2e_p99_ms": _num(e2e.get("p99")),
        "workers": doc["config"].get("workers"),
    }


def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def format_bench_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table (cameras ascending): what the README's multi-camera table is made of."""
    out = [
        "| cameras | offered fps | real verdicts/s | fail-safes | e2e p50 ms | e2e p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["cameras"]):
        fs = str(r["failsafes"])
        if r["failsafes"]:
            top = max(r["failsafe_reasons"].items(), key=lambda kv: kv[1])
            fs += f" (most: {top[0]})"
        out.append(
            f"| {r['cameras']} | {_fmt(r['offered_fps'], 0)} | {_fmt(r['real_verdicts_per_s'])} "
            f"| {fs} | {_fmt(r['e2e_p50_ms'])} | {_fmt(r['e2e_p99_ms'])} |"
        )
    return "\n".join(out)


# ---- the run summary ----


def read_steps(path: Path) -> list[dict[str, Any]]:
    """steps.tsv written by the shell: name, status, rc, seconds, log (one line per step)."""
    steps: list[dict[str, Any]] = []
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != 5:
            continue
        name, status, rc, seconds, log = parts
        steps.append(
            {"name": name, "status": status, "rc": int(rc), "seconds": float(seconds), "log": log}
        )
    return steps


def build_summary(out: Path, mode: str, state: str) -> dict[str, Any]:
    """Everything a reader needs from one run, in one JSON: GPU, steps, agreement, bench rows."""
    steps = read_steps(out / "steps.tsv")
    doc: dict[str, Any] = {"mode": mode, "state": state, "steps": steps}
    gpu = out / "gpu.json"
    if gpu.is_file():
        doc["gpu"] = json.loads(gpu.read_text())
    versions = out / "versions.json"
    if versions.is_file():
        doc["versions"] = json.loads(versions.read_text())
    compares = []
    for f in sorted((out / "compare").glob("*.json")):
        c = json.loads(f.read_text())
        compares.append(
            {
                k: c.get(k)
                for k in (
                    "model",
                    "precision",
                    "images",
                    "agreement",
                    "min_agreement",
                    "reference_infer_ms_p50",
                    "candidate_infer_ms_p50",
                    "max_top_score_diff",
                )
            }
        )
    doc["compare"] = compares
    rows = [bench_row(json.loads(f.read_text())) for f in sorted(out.glob("bench/*/bench.json"))]
    doc["bench"] = sorted(rows, key=lambda r: r["cameras"])
    failed = [s["name"] for s in steps if s["status"] not in ("ok", "cached")]
    doc["failed_steps"] = failed
    doc["ok"] = state == "finished" and not failed
    return doc


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, default=str, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


# ---- subcommands that need the project (and a GPU for some) ----


def cmd_random_model(args: argparse.Namespace) -> int:
    """A YOLOv8-seg checkpoint with random weights, built from the architecture yaml.

    Weights cannot be downloaded (offline boxes), and for speed and runtime agreement the
    weights do not matter: the graph (yolov8n/s-seg topology at 640) is what TensorRT optimises.
    """
    sys.path.insert(0, str(REPO))
    from models.training import ultra_env
    from models.training.arch import write_arch_yaml

    yaml = write_arch_yaml(args.out.parent, args.nc, args.scale)
    model = ultra_env.yolo(yaml)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(args.out))
    print(f"wrote {args.out} ({args.scale} scale, {args.nc} classes, random weights)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """TensorRT (or, on a CPU box, ONNX Runtime) against ONNX Runtime f32: same images, same
    preprocessed tensors, the package's own OK/DEFECT rule (models/compare.py)."""
    sys.path.insert(0, str(REPO))
    from models.compare import compare_decisions, onnx_detector
    from models.config import ModelSettings, TensorRTSettings
    from models.loader import load_detector
    from models.package import verify_package
    from models.quantize import holdout_images
    from models.training.valstats import decision_floor

    pkg = verify_package(args.package)
    images, split = holdout_images(args.data, args.split)
    images = images[: args.limit]
    reference = onnx_detector(pkg, args.threads)
    if args.runtime == "tensorrt":
        if args.engine is None:
            raise SystemExit("--engine is required with --runtime tensorrt")
        candidate = load_detector(
            ModelSettings(
                package=pkg.root,
                runtime="tensorrt",
                tensorrt=TensorRTSettings(
                    engine_path=args.engine,
                    precision=args.precision,
                    build_if_missing=False,  # compare the engine the check built, nothing else
                ),
                conf_threshold=decision_floor(pkg),
                warmup_runs=3,
            ),
            pkg,
        )
    else:
        candidate = onnx_detector(pkg, args.threads)
    result = compare_decisions(pkg, reference, pkg, candidate, images)
    doc = {
        "model": args.name or pkg.ref,
        "package": str(pkg.root),
        "runtime": args.runtime,
        "precision": args.precision if args.runtime == "tensorrt" else "f32",
        "engine": str(args.engine) if args.engine else None,
        "split": split,
        "min_agreement": args.min_agreement,
        **result.as_json(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, doc)
    print(
        f"{doc['model']} {doc['precision']}: decides like ONNX Runtime on "
        f"{result.agreement:.2%} of {result.images} images; infer p50 "
        f"{result.reference_ms:.2f} ms (onnxruntime) -> {result.candidate_ms:.2f} ms "
        f"({args.runtime})"
    )
    if result.agreement < args.min_agreement:
        print(f"agreement below {args.min_agreement}", file=sys.stderr)
        return 1
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    """TensorRT, pycuda and the GPU identity as the runtime sees them (the engine cache key)."""
    sys.path.insert(0, str(REPO))
    import pycuda.driver as cuda
    import tensorrt as trt

    from models.tensorrt_runtime import gpu_identity

    cuda.init()
    doc = {
        "tensorrt": str(trt.__version__),
        "tensorrt_weak_typing": hasattr(trt.BuilderFlag, "FP16"),
        "pycuda": __import__("pycuda").VERSION_TEXT,
        "gpu_identity": gpu_identity(cuda),
        "cuda_driver_api": cuda.get_driver_version(),
    }
    write_json_atomic(args.out, doc)
    print(json.dumps(doc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("gpu-info", help="parse nvidia-smi output into gpu.json + shell lines")
    p.add_argument("--smi", type=Path, required=True)
    p.add_argument("--query", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("trt-spec", help="pip requirement of TensorRT for a CUDA major")
    p.add_argument("--cuda-major", type=int, required=True)

    p = sub.add_parser("cuda-runtime-spec", help="pip requirement of the wheel with cuda.h")
    p.add_argument("--cuda-major", type=int, required=True)

    p = sub.add_parser("pycuda-home", help="write a throw-away HOME that lets pycuda build")
    p.add_argument("--home", type=Path, required=True)

    p = sub.add_parser("random-model", help="random-weights YOLOv8-seg checkpoint (train extra)")
    p.add_argument("--scale", choices=["p", "n", "s"], required=True)
    p.add_argument("--nc", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("compare", help="runtime decisions against ONNX Runtime, as JSON")
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="data.yaml of the images")
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--runtime", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    p.add_argument("--engine", type=Path, default=None)
    p.add_argument("--precision", choices=["fp16", "int8", "fp32"], default="fp16")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--min-agreement", type=float, default=0.0)
    p.add_argument("--name", default=None)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("versions", help="TensorRT/pycuda versions and the GPU identity")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("line-yaml", help="the temporary TensorRT line YAML for edge bench")
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--spool", type=Path, required=True)
    p.add_argument("--workers", default="auto")
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("bench-table", help="the multi-camera table from bench.json files")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)

    p = sub.add_parser("summary", help="summary.json of a run directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--state", default="finished")

    args = ap.parse_args(argv)
    if args.cmd == "gpu-info":
        info = parse_gpu_info(args.smi.read_text(), args.query.read_text())
        write_json_atomic(args.out, info)
        # KEY=value lines the shell reads one by one (never eval'd).
        for k in ("name", "driver", "cuda", "cuda_major", "compute_cap", "jetson"):
            print(f"{k}={info[k]}")
        return 0
    if args.cmd == "trt-spec":
        try:
            print(trt_pip_spec(args.cuda_major))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "cuda-runtime-spec":
        print(cuda_runtime_pip_spec(args.cuda_major))
        return 0
    if args.cmd == "pycuda-home":
        import site

        inc = find_cuda_header_dir(Path(p) for p in site.getsitepackages())
        if inc is None:
            print(
                "error: no cuda.h in pip's nvidia wheels (install the CUDA runtime wheel)",
                file=sys.stderr,
            )
            return 2
        ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
        text = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
        lib = find_libcuda(text)
        if lib is None:
            print(
                "error: libcuda.so.1 not found by ldconfig: is the NVIDIA driver installed?",
                file=sys.stderr,
            )
            return 2
        print(write_pycuda_siteconf(args.home, inc, lib))
        return 0
    if args.cmd == "random-model":
        return cmd_random_model(args)
    if args.cmd == "compare":
        return cmd_compare(args)
    if args.cmd == "versions":
        return cmd_versions(args)
    if args.cmd == "line-yaml":
        text = line_yaml(
            package=args.package.resolve(),
            engine=args.engine.resolve(),
            precision=args.precision,
            samples=args.samples.resolve(),
            spool=args.spool.resolve(),
            workers=args.workers,
            cache_dir=args.cache_dir.resolve(),
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        sys.path.insert(0, str(REPO))
        from edge.config import load_config

        load_config(args.out)  # refuse to hand edge bench a config it would reject
        print(f"wrote {args.out}")
        return 0
    if args.cmd == "bench-table":
        rows = [bench_row(json.loads(f.read_text())) for f in args.files]
        print(format_bench_table(rows))
        if args.json:
            write_json_atomic(args.json, {"rows": sorted(rows, key=lambda r: r["cameras"])})
        return 0
    if args.cmd == "summary":
        doc = build_summary(args.out, args.mode, args.state)
        write_json_atomic(args.out / "summary.json", doc)
        print(
            f"summary: {'OK' if doc['ok'] else 'NOT OK'} ({args.state}); "
            f"failed steps: {', '.join(doc['failed_steps']) or 'none'}"
        )
        return 0 if doc["ok"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
