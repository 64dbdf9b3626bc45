"""scripts/gpu_check.sh as far as a CPU box can check it.

The script's GPU work runs only on an NVIDIA machine; here: it parses and lints clean, its dry run
plans the whole check in order with consistent paths, it refuses to run without nvidia-smi and
leaves nothing behind, and its Python helper (scripts/gpu/gpucheck.py) does the right thing for
everything that needs no GPU: nvidia-smi parsing, the TensorRT wheel choice, the pycuda build
config, the bench line YAML (validated by the daemon's own config loader), the bench table from
real `edge bench` output, the run summary, and the ONNX Runtime side of the decision compare.
Also the engine cache key (GPU model + TensorRT version) and the cache path the systemd unit
lets the daemon write.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
HELPER = REPO / "scripts" / "gpu" / "gpucheck.py"
SAMPLES = Path(__file__).parent / "gpu_check_data"
PY = sys.executable


def _helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpucheck", HELPER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _helper()


def _run(args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> Any:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


# ---- the shell script ----


def test_bash_syntax_and_shellcheck() -> None:
    assert _run(["bash", "-n", str(SCRIPT)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: scripts/setup.sh test installs it (apt)"
    r = _run([shellcheck, str(SCRIPT)])
    assert r.returncode == 0, r.stdout + r.stderr


def _plan(out: str) -> list[tuple[str, str]]:
    """(step, command) of every '[plan] step (timeout Ns): command' line."""
    steps = []
    for line in out.splitlines():
        m = re.match(r"\[plan\] (\S+) \(timeout (\d+)s\): (.*)$", line)
        if m:
            steps.append((m.group(1), m.group(3)))
    return steps


def test_dry_run_plans_builds_compares_then_bench(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    r = _run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out)], env={**os.environ, "WORK": str(work)}
    )
    assert r.returncode == 0, r.stderr
    steps = _plan(r.stdout)
    names = [s for s, _ in steps]
    models = ("demo", "yolov8n-seg", "yolov8s-seg")
    builds = [f"build-{m}-{p}" for m in models for p in ("fp16", "int8")]
    compares = [f"compare-{m}-{p}" for m in models for p in ("fp16", "int8")]
    benches = [f"bench-{n}cam" for n in (1, 4, 8, 16)]
    for name in builds + compares + benches + ["pip-tensorrt", "setup-venv"]:
        assert name in names, f"{name} missing from the plan:\n{r.stdout}"
    pos = {n: i for i, n in enumerate(names)}
    assert max(pos[b] for b in builds) < min(pos[c] for c in compares)
    assert max(pos[c] for c in compares) < min(pos[b] for b in benches)
    assert [pos[b] for b in benches] == sorted(pos[b] for b in benches)
    assert pos["pip-tensorrt"] < min(pos[b] for b in builds)
    cmd = dict(steps)
    # Each compare loads the engine its build wrote; the bench YAML points at the demo FP16 one.
    for m in models:
        for p in ("fp16", "int8"):
            built = re.search(r"--out (\S+\.engine)", cmd[f"build-{m}-{p}"])
            assert built and f"--engine {built.group(1)}" in cmd[f"compare-{m}-{p}"]
            assert f"--precision {p}" in cmd[f"build-{m}-{p}"]
        assert "--calibration-images" in cmd[f"build-{m}-int8"]
    demo_engine = re.search(r"--out (\S+)", cmd["build-demo-fp16"])
    assert demo_engine and f"--engine {demo_engine.group(1)}" in cmd["line-yaml"]
    yaml = re.search(r"--out (\S+)", cmd["line-yaml"])
    assert yaml
    for n in (1, 4, 8, 16):
        b = cmd[f"bench-{n}cam"]
        assert f"--config {yaml.group(1)}" in b and f"--cameras {n} " in b and "--rate 60" in b
    for m in ("yolov8n-seg", "yolov8s-seg"):
        assert "--imgsz 640" in cmd[f"export-{m}"]
    # A dry run writes nothing.
    assert not out.exists() and not Path(f"{out}.partial").exists() and not work.exists()


def test_dry_run_train_plan(tmp_path: Path) -> None:
    r = _run(["bash", str(SCRIPT), "--mode", "train", "--dry-run", "--out", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    cmd = dict(_plan(r.stdout))
    train = cmd["train-report"]
    assert train.endswith("scripts/make_magnetic_tile_report.sh")
    for kv in ("DEVICE=0", "SCALE=n", "SIZE=640", "EPOCHS=50", "BATCH=64", "LR0=0.00232"):
        assert f" {kv} " in train, f"{kv} not in {train}"
    assert re.search(r" HOURS=(''|) ", train), train  # no wall-clock cap on a GPU
    assert "torch-cuda" in cmd and not any(n.startswith("build-") for n in cmd)


def _no_gpu_env(tmp_path: Path) -> dict[str, str]:
    """A PATH with only what the script needs before its nvidia-smi check (holds on GPU boxes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "realpath", "date"):
        src = shutil.which(tool)
        assert src, tool
        (bin_dir / tool).symlink_to(src)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path), "WORK": str(tmp_path / "work")}


@pytest.mark.parametrize("mode", ["check", "train"])
def test_without_gpu_exits_2_and_writes_nothing(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "out"
    bash = shutil.which("bash")
    assert bash
    r = _run([bash, str(SCRIPT), "--mode", mode, "--out", str(out)], env=_no_gpu_env(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nvidia-smi not found" in r.stderr and "--dry-run" in r.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "infer"], "choose check or train"),
        (["--timeout-min", "0"], "whole minutes"),
        (["--bogus"], "unknown argument"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    r = _run(["bash", str(SCRIPT), *args, "--dry-run"])
    assert r.returncode == 2 and message in r.stderr


def test_report_script_trains_on_the_gpu_without_time_cap(tmp_path: Path) -> None:
    """make_magnetic_tile_report.sh, as train mode calls it, with stand-in commands that print
    their arguments: the device reaches `edge model train`, and HOURS= drops --hours."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text('#!/bin/sh\necho "python $*"\n')
    stub.chmod(0o755)
    work = tmp_path / "mt"
    (work / "runs" / "mt").mkdir(parents=True)
    (work / "runs" / "mt" / "recipe.json").write_text("{}")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "WORK": str(work),
        "DEVICE": "0",
        "SCALE": "n",
        "SIZE": "640",
        "HOURS": "",
        "EPOCHS": "50",
        "BATCH": "64",
        "WARMUP": "3",
        "CLOSE_MOSAIC": "10",
        "NICE": "env",
    }
    r = _run(["bash", str(REPO / "scripts" / "make_magnetic_tile_report.sh")], env=env)
    assert r.returncode == 0, r.stderr
    train = next(ln for ln in r.stdout.splitlines() if " train " in ln)
    assert "--device 0" in train and "--imgsz 640" in train and "--scale n" in train
    assert "--epochs 50" in train and "--batch 64" in train and "--hours" not in train
    assert "--warmup-epochs 3" in train and "--close-mosaic 10" in train
    env["HOURS"] = "0.5"
    r = _run(["bash", str(REPO / "scripts" / "make_magnetic_tile_report.sh")], env=env)
    assert "--hours 0.5" in next(ln for ln in r.stdout.splitlines() if " train " in ln)


def test_edge_model_train_takes_a_device() -> None:
    # A subprocess: the CLI's callback configures process-wide logging to its own stderr.
    r = _run([PY, "-m", "edge.cli.model", "train", "--help"], env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "--device" in r.stdout


# ---- helper: GPU facts, wheels, pycuda ----

T4_SMI = """\
Mon Jan  1 00:00:00 2026
+---------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
|-----------------------------------------+----------------------+----------------------+
|   0  Tesla T4                       Off | 00000000:00:04.0 Off |                    0 |
"""


def test_parse_gpu_info() -> None:
    info = gc.parse_gpu_info(T4_SMI, "Tesla T4, 535.104.05, 7.5, 15360 MiB\n")
    assert info["name"] == "Tesla T4" and info["driver"] == "535.104.05"
    assert info["cuda"] == "12.2" and info["cuda_major"] == 12 and info["compute_cap"] == "7.5"
    assert info["gpus"] == 1
    old = gc.parse_gpu_info(T4_SMI.replace("12.2", "11.4"), "Tesla T4, 470.1\nTesla T4, 470.1\n")
    assert old["cuda_major"] == 11 and old["compute_cap"] is None and old["gpus"] == 2
    with pytest.raises(ValueError, match="CUDA Version"):
        gc.parse_gpu_info("NVIDIA-SMI has failed", "x")
    with pytest.raises(ValueError, match="no GPU"):
        gc.parse_gpu_info(T4_SMI, "\n")


def test_tensorrt_wheel_follows_the_cuda_major() -> None:
    for major in (11, 12, 13):
        spec = gc.trt_pip_spec(major)
        assert spec.startswith(f"tensorrt-cu{major}") and spec.endswith("<11")
    with pytest.raises(ValueError, match="TRT_SPEC"):
        gc.trt_pip_spec(10)
    assert gc.cuda_runtime_pip_spec(12) == "nvidia-cuda-runtime-cu12"
    assert gc.cuda_runtime_pip_spec(13).startswith("nvidia-cuda-runtime>=13")


LDCONFIG = """\
1234 libs found in cache `/etc/ld.so.cache'
\tlibcudart.so.12 (libc6,x86-64) => /usr/local/lib/libcudart.so.12
\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
"""


def test_pycuda_builds_from_pip_headers_and_the_driver(tmp_path: Path) -> None:
    assert gc.find_libcuda(LDCONFIG) == Path("/usr/lib/x86_64-linux-gnu/libcuda.so.1")
    assert gc.find_libcuda("nothing here") is None
    site = tmp_path / "site-packages"
    (site / "nvidia" / "cublas" / "include").mkdir(parents=True)
    inc = site / "nvidia" / "cuda_runtime" / "include"
    inc.mkdir(parents=True)
    assert gc.find_cuda_header_dir([site]) is None
    (inc / "cuda.h").write_text("/* header */")
    assert gc.find_cuda_header_dir([tmp_path / "nowhere", site]) == inc
    driver = tmp_path / "libcuda.so.1"
    driver.write_bytes(b"\x7fELF")
    home = tmp_path / "home"
    conf = gc.write_pycuda_siteconf(home, inc, driver)
    gc.write_pycuda_siteconf(home, inc, driver)  # idempotent (reruns)
    assert conf == home / ".aksetup-defaults.py"
    values: dict[str, Any] = {}
    exec(compile(conf.read_text(), str(conf), "exec"), values)  # what pycuda's setup does
    assert values["CUDA_INC_DIR"] == [str(inc)] and values["CUDA_ENABLE_CURAND"] is False
    (libdir,) = values["CUDADRV_LIB_DIR"]
    assert (Path(libdir) / "libcuda.so").resolve() == driver.resolve()


# ---- helper: line YAML, bench table, summary ----


@pytest.mark.parametrize("workers", ["auto", "3"])
def test_line_yaml_is_a_valid_tensorrt_line(
    tmp_path: Path, demo_package: Path, workers: str
) -> None:
    from edge.config import load_config

    out = tmp_path / "line.yaml"
    r = _run(
        [
            PY, str(HELPER), "line-yaml", "--package", str(demo_package),
            "--engine", str(tmp_path / "e" / "demo-fp16.engine"), "--precision", "fp16",
            "--samples", str(REPO / "models" / "demo" / "samples"), "--spool", str(tmp_path / "s"),
            "--workers", workers, "--cache-dir", str(tmp_path / "e"), "--out", str(out),
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = load_config(out)
    assert cfg.model.runtime == "tensorrt"
    assert cfg.model.tensorrt.engine_path == tmp_path / "e" / "demo-fp16.engine"
    assert cfg.model.tensorrt.build_if_missing is False and cfg.model.max_batch == 1
    assert cfg.pipeline.workers == (workers if workers == "auto" else int(workers))
    assert cfg.model.package.resolve() == demo_package.resolve()


def _samples() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(SAMPLES.glob("bench-*.json"))]


def test_bench_table_from_real_bench_json() -> None:
    docs = _samples()
    assert len(docs) >= 2
    rows = [gc.bench_row(d) for d in reversed(docs)]
    table = gc.format_bench_table(rows).splitlines()
    assert table[0].startswith("| cameras | offered fps | real verdicts/s | fail-safes |")
    body = [ln.strip("|").split("|") for ln in table[2:]]
    by_cams = sorted(docs, key=lambda d: d["config"]["cameras"])
    assert [int(c[0]) for c in body] == [d["config"]["cameras"] for d in by_cams]
    for cells, d in zip(body, by_cams, strict=True):
        s = d["summary"]
        assert float(cells[1]) == pytest.approx(d["offered_fps"], abs=0.5)
        assert float(cells[2]) == pytest.approx(d["real_verdicts_per_s"], abs=0.05)
        total = sum(s["failsafes"].values())
        assert cells[3].strip().startswith(str(total))
        if total:
            worst = max(s["failsafes"].items(), key=lambda kv: kv[1])[0]
            assert f"most: {worst}" in cells[3]
        assert float(cells[4]) == pytest.approx(s["end_to_end_ms"]["p50"], abs=0.05)
        assert float(cells[5]) == pytest.approx(s["end_to_end_ms"]["p99"], abs=0.05)


def test_bench_table_command_and_missing_latency(tmp_path: Path) -> None:
    empty = json.loads((SAMPLES / "bench-1cam.json").read_text())
    empty["config"]["cameras"] = 16
    empty["summary"]["end_to_end_ms"] = {"n": 0, "p50": float("nan"), "p99": float("nan")}
    (tmp_path / "b16.json").write_text(json.dumps(empty))
    files = [str(p) for p in sorted(SAMPLES.glob("bench-*.json"))] + [str(tmp_path / "b16.json")]
    r = _run([PY, str(HELPER), "bench-table", *files, "--json", str(tmp_path / "t.json")])
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("| 16 |") and last.endswith("| n/a | n/a |")
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [row["cameras"] for row in rows] == sorted(row["cameras"] for row in rows)


def _run_dir(tmp_path: Path, statuses: dict[str, str]) -> Path:
    run = tmp_path / "run.partial"
    (run / "compare").mkdir(parents=True)
    lines = [
        f"{n}\t{st}\t{0 if st in ('ok', 'cached') else 1}\t1.5\t-" for n, st in statuses.items()
    ]
    (run / "steps.tsv").write_text("\n".join(lines) + "\n")
    (run / "gpu.json").write_text(json.dumps({"name": "Tesla T4", "cuda_major": 12}))
    (run / "compare" / "demo-fp16.json").write_text(
        json.dumps({"model": "demo", "precision": "fp16", "images": 80, "agreement": 1.0})
    )
    for p in SAMPLES.glob("bench-*.json"):
        d = run / "bench" / p.stem
        d.mkdir(parents=True)
        shutil.copyfile(p, d / "bench.json")
    return run


def test_summary_ok_only_when_every_step_passed(tmp_path: Path) -> None:
    good = _run_dir(tmp_path / "a", {"setup-venv": "cached", "build-demo-fp16": "ok"})
    doc = gc.build_summary(good, "check", "finished")
    assert doc["ok"] and doc["failed_steps"] == [] and doc["gpu"]["name"] == "Tesla T4"
    assert doc["compare"][0]["agreement"] == 1.0
    assert [b["cameras"] for b in doc["bench"]] == sorted(b["cameras"] for b in doc["bench"])
    assert not gc.build_summary(good, "check", "interrupted")["ok"]
    bad = _run_dir(
        tmp_path / "b",
        {"build-demo-fp16": "ok", "build-demo-int8": "timeout", "bench-1cam": "skipped"},
    )
    r = _run([PY, str(HELPER), "summary", "--out", str(bad), "--mode", "check"])
    assert r.returncode == 1 and "build-demo-int8, bench-1cam" in r.stdout
    written = json.loads((bad / "summary.json").read_text())
    assert written["failed_steps"] == ["build-demo-int8", "bench-1cam"] and not written["ok"]
    assert [s["seconds"] for s in written["steps"]] == [1.5, 1.5, 1.5]


def test_compare_writes_agreement_json(tmp_path: Path, demo_package: Path) -> None:
    """The compare step's ONNX Runtime side (on a GPU the candidate is the TensorRT engine)."""
    from models.synth import SynthConfig, write_dataset

    data = write_dataset(
        tmp_path / "synth", 12, seed=3, cfg=SynthConfig(width=256, height=256),
        fractions=(0.5, 0.0, 0.5),
    )  # fmt: skip
    out = tmp_path / "cmp" / "demo.json"
    r = _run(
        [
            PY, str(HELPER), "compare", "--runtime", "onnxruntime", "--package", str(demo_package),
            "--data", str(data), "--split", "test", "--limit", "4", "--threads", "1",
            "--min-agreement", "0.99", "--name", "demo", "--out", str(out),
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["model"] == "demo" and doc["images"] == 4 and doc["agreement"] == 1.0
    assert doc["split"] == "test" and doc["min_agreement"] == 0.99
    assert doc["reference_infer_ms_p50"] > 0 and doc["candidate_infer_ms_p50"] > 0
    r = _run(
        [
            PY, str(HELPER), "compare", "--package", str(demo_package), "--data", str(data),
            "--out", str(tmp_path / "x.json"),
        ]
    )  # fmt: skip
    assert r.returncode != 0 and "--engine is required" in r.stderr


def test_random_model_checkpoint(tmp_path: Path, ultralytics_offline: Path) -> None:
    """A random-weights checkpoint from the architecture yaml that `edge model export` accepts."""
    pt = tmp_path / "rand" / "yolov8p-seg.pt"
    env = {**os.environ, "YOLO_CONFIG_DIR": str(ultralytics_offline)}
    r = _run(
        [PY, str(HELPER), "random-model", "--scale", "p", "--nc", "4", "--out", str(pt)], env=env
    )
    assert r.returncode == 0, r.stderr
    import torch

    ckpt = torch.load(pt, map_location="cpu", weights_only=False)
    assert int(ckpt["model"].yaml["nc"]) == 4


# ---- the engine cache key and path (models/tensorrt_runtime.py) ----


def _fake_cuda(name: str, cc: tuple[int, int]) -> Any:
    class Device:
        def __init__(self, i: int) -> None:
            assert i == 0

        def name(self) -> str:
            return name

        def compute_capability(self) -> tuple[int, int]:
            return cc

    return SimpleNamespace(Device=Device)


def test_engine_cache_key_has_gpu_model_and_tensorrt_version(
    demo_package: Path, tmp_path: Path
) -> None:
    from models.config import ModelSettings, TensorRTSettings
    from models.package import load_package
    from models.tensorrt_runtime import _expected_meta, default_engine_path, gpu_identity

    t4 = gpu_identity(_fake_cuda("Tesla T4", (7, 5)))
    orin = gpu_identity(_fake_cuda("Orin (nvgpu)", (8, 7)))
    assert t4 == "Tesla-T4-sm75" and orin == "Orin-nvgpu-sm87"
    pkg = load_package(demo_package)
    s = ModelSettings(
        package=demo_package, runtime="tensorrt", tensorrt=TensorRTSettings(cache_dir=tmp_path)
    )
    paths = {default_engine_path(pkg, s, v, g) for v in ("10.3.0", "10.13.3.9") for g in (t4, orin)}
    assert len(paths) == 4 and all(p.parent == tmp_path for p in paths)
    p = default_engine_path(pkg, s, "10.3.0", t4)
    assert "Tesla-T4-sm75" in p.name and "trt10.3.0" in p.name and "/" not in p.name
    assert _expected_meta(pkg, s, "10.3.0", t4)["gpu"] == t4


def test_unwritable_engine_cache_fails_before_building(demo_package: Path, tmp_path: Path) -> None:
    """Checked before TensorRT is even imported: a Jetson must not build for minutes first."""
    from models.config import TensorRTSettings
    from models.tensorrt_runtime import build_engine, check_writable_dir
    from models.types import ModelError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelError, match="writable directory"):
        check_writable_dir(blocker / "engines")
    with pytest.raises(ModelError, match="writable directory"):
        build_engine(
            demo_package / "model.onnx",
            blocker / "engines" / "x.engine",
            input_hw=(256, 256),
            tensorrt=TensorRTSettings(),
        )
    check_writable_dir(tmp_path / "new" / "engines")
    assert (tmp_path / "new" / "engines").is_dir()
    assert list((tmp_path / "new" / "engines").iterdir()) == []


def test_default_engine_cache_is_writable_under_the_systemd_unit() -> None:
    """ProtectSystem=strict: the service may write only its ReadWritePaths / CacheDirectory."""
    from models.config import TensorRTSettings

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "systemd" / "edge.service")
    svc = unit["Service"]
    assert svc.get("ProtectSystem") == "strict"
    writable = [Path(p) for p in svc.get("ReadWritePaths", "").split()]
    writable += [Path("/var/cache") / d for d in svc.get("CacheDirectory", "").split()]
    cache = TensorRTSettings().cache_dir
    assert any(cache.is_relative_to(w) for w in writable), (cache, writable)


# ---- rehearsals of the real (non-dry) run on a CPU box ----

FAKE_GPU = SAMPLES / "fake_gpu"
"""A stand-in nvidia-smi (T4, CUDA 12.2) and stand-in tensorrt/pycuda modules whose "engine" is
the ONNX file run by ONNX Runtime: they prove the script's orchestration, not TensorRT."""


def _rehearsal_env(tmp_path: Path, fake_trt: bool, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{FAKE_GPU / 'bin'}:{os.environ['PATH']}",
        "WORK": str(tmp_path / "work"),
        "YOLO_CONFIG_DIR": str(tmp_path / "yolo"),
        "PIP_NO_INDEX": "1",  # never reach a registry from a test
        "CHECK_MODELS": "demo",
        "COMPARE_IMAGES": "4",
        "BENCH_CAMERAS": "",
        **extra,
    }
    if fake_trt:
        env["PYTHONPATH"] = str(FAKE_GPU)
    return env


def test_rehearsal_builds_compares_and_summarises(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run(
        ["bash", str(SCRIPT), "--out", str(out), "--timeout-min", "10"],
        env=_rehearsal_env(tmp_path, fake_trt=True),
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert out.is_dir() and not Path(f"{out}.partial").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["state"] == "finished", summary["failed_steps"]
    status = {s["name"]: s["status"] for s in summary["steps"]}
    for step in ("versions", "synth-256", "build-demo-fp16", "build-demo-int8", "line-yaml"):
        assert status[step] == "ok", (step, status)
    assert status["setup-venv"] == "cached" and status["pip-tensorrt"] == "cached"
    assert summary["gpu"]["cuda_major"] == 12 and summary["gpu"]["name"] == "Fake T4"
    assert summary["versions"]["gpu_identity"] == "Fake-T4-sm75"
    # The TensorRT path (engine -> pinned buffers -> decode) decides exactly like ONNX Runtime
    # when the "engine" is the same network.
    for prec in ("fp16", "int8"):
        cmp = json.loads((out / "compare" / f"demo-{prec}.json").read_text())
        assert cmp["images"] == 4 and cmp["agreement"] == 1.0 and cmp["precision"] == prec
        meta = json.loads((tmp_path / "work" / "engines" / f"demo-{prec}.engine.json").read_text())
        assert meta["gpu"] == "Fake-T4-sm75" and meta["precision"] == prec
    assert (tmp_path / "work" / "engines" / "demo-int8.calib").read_bytes().startswith(b"fake")
    assert "summary: OK" in r.stdout


def test_rehearsal_failed_install_is_reported_not_half_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # tensorrt does not import (even on a box that has it), and pip has no index to install from.
    broken = tmp_path / "broken" / "tensorrt"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no TensorRT in this rehearsal')\n")
    env = _rehearsal_env(tmp_path, fake_trt=False, PYTHONPATH=str(broken.parent))
    r = _run(["bash", str(SCRIPT), "--out", str(out)], env=env)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "pip could not install tensorrt-cu12" in r.stderr
    assert not Path(f"{out}.partial").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "failed" and not summary["ok"]
    assert summary["failed_steps"] == ["pip-tensorrt"]
    assert (out / "logs" / "pip-tensorrt.log").read_text().strip()


def test_rehearsal_interrupted_leaves_partial_and_no_processes(tmp_path: Path) -> None:
    import signal

    from tests.support import wait_until

    out = tmp_path / "run"
    part = Path(f"{out}.partial")
    # A slow first step: a big synthetic set, so the signal lands while it runs.
    env = _rehearsal_env(tmp_path, fake_trt=True, CHECK_MODELS="yolov8n-seg")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--out", str(out)], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: (part / "logs" / "synth-640.log").exists(), 60, "the synth step")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert part.is_dir() and not out.exists()
    assert json.loads((part / "summary.json").read_text())["state"] == "interrupted"
    # Each step runs in its own process group, which the trap ends: nothing is left running.
    wait_until(
        lambda: (
            subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True).returncode
            != 0
        ),
        30,
        "the interrupted step's processes to end",
    )


def test_train_mode_needs_the_data_and_a_gpu_for_torch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = _rehearsal_env(tmp_path, fake_trt=False, SRC=str(tmp_path / "no-data"))
    r = _run(["bash", str(SCRIPT), "--mode", "train", "--out", str(out)], env=env)
    assert r.returncode == 2 and "magnetic-tile data is not at" in r.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()
    data = tmp_path / "mt"
    data.mkdir()
    (data / "ABOUT.md").write_text("stand-in")
    env["SRC"] = str(data)
    # The stand-in nvidia-smi passes the preflight, but torch sees no CUDA device (hidden even on
    # a GPU box).
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = _run(["bash", str(SCRIPT), "--mode", "train", "--out", str(out)], env=env)
    assert r.returncode == 1 and "torch cannot use the GPU" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_steps"] == ["torch-cuda"] and summary["mode"] == "train"
    assert "available False" in (out / "logs" / "torch-cuda.log").read_text()
