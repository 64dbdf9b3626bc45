#!/usr/bin/env python3
"""Training seconds per epoch, idle and beside a busy process, before and after the OpenMP fix.

Why: torch's OpenMP (libgomp) threads wait for each other by spinning. On a 2-core box with one
busy process beside a niced training, a batch took 16.8 s instead of 0.72 s (issue 14). The tool
now sets a short spin (``GOMP_SPINCOUNT=1000``) and explicit thread counts before torch loads
(``models/training/ultra_env.py``). This script measures that on the machine it runs on:

    python scripts/bench_train_threads.py                        # 64 images, 256 px, batch 16
    python scripts/bench_train_threads.py --epochs 3 --out var/bench-train.json
    python scripts/bench_train_threads.py --configs before,after --loads busy --max-seconds 300

Configurations (each case is its own subprocess: libgomp reads its environment once, when
torch loads):

* ``before``: what the tool did before the fix: threads = all usable cores, no
  ``OMP_WAIT_POLICY`` (libgomp's default: spin for a while, then sleep).
* ``active``: the same with ``OMP_WAIT_POLICY=ACTIVE`` (spin only): the worst case.
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (never spin): the tool's other choice.
* ``after``: the tool's own settings (short spin, all usable cores unless ``--threads``).

Loads: ``idle``, and ``busy``: one un-niced ``python -c "while True: pass"`` started by this
script (and killed by its PID afterwards) beside a training niced by ``--nice`` (10), as in the
issue. Every case is bounded by ``--max-seconds``; a case that runs out is killed by PID and
reported as such. Seconds per epoch are training only (epoch start to epoch end, no validation),
the mean over the epochs after the first (which carries start-up cost); the median batch time
is there too, comparable with the issue's per-batch figures. Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = ("before", "active", "passive", "after")
LOADS = ("idle", "busy")


def _child(spec: dict[str, Any]) -> None:
    """One case, in its own process: configure OpenMP, train, print one JSON line."""
    from models.training import ultra_env

    cores = ultra_env.usable_cores()
    threads = spec["threads"]
    if spec["config"] in ("before", "active"):  # active: the env says so (a user's is kept)
        ultra_env.prepare(Path(spec["config_dir"]), threads or cores, wait="default")
    elif spec["config"] == "passive":
        ultra_env.prepare(Path(spec["config_dir"]), threads or cores, wait="passive")
    else:
        ultra_env.prepare(Path(spec["config_dir"]), threads)
    from models.training.recipe import TrainRecipe
    from models.training.train import train

    epoch_s: list[float] = []
    batch_s: list[float] = []
    marks: dict[str, float] = {}

    def epoch_start(_: Any) -> None:
        marks["epoch"] = time.perf_counter()

    def epoch_end(_: Any) -> None:
        epoch_s.append(time.perf_counter() - marks["epoch"])

    def batch_start(_: Any) -> None:
        marks["batch"] = time.perf_counter()

    def batch_end(_: Any) -> None:
        batch_s.append(time.perf_counter() - marks["batch"])

    recipe = TrainRecipe(
        data=Path(spec["data"]),
        scale=spec["scale"],
        imgsz=spec["size"],
        epochs=spec["epochs"],
        batch=spec["batch"],
        val=False,
        cache=True,
        close_mosaic=0,
        warmup_epochs=0,
        project=Path(spec["runs"]),
        name=spec["name"],
        threads=threads if spec["config"] == "after" else threads or cores,
    )
    train(
        recipe,
        callbacks={
            "on_train_epoch_start": [epoch_start],
            "on_train_epoch_end": [epoch_end],
            "on_train_batch_start": [batch_start],
            "on_train_batch_end": [batch_end],
        },
    )
    steady = epoch_s[1:] or epoch_s
    settings = ultra_env.thread_settings()
    print(
        json.dumps(
            {
                "epoch_s": [round(s, 3) for s in epoch_s],
                "s_per_epoch": round(statistics.fmean(steady), 3),
                "batch_s_median": round(statistics.median(batch_s), 3),
                "batches": len(batch_s),
                "threads": settings.as_json() if settings else None,
            }
        ),
        flush=True,
    )


def _env(config: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    if config == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    env["PYTHONPATH"] = str(REPO)
    return env


def _run_case(
    args: argparse.Namespace, work: Path, data: Path, config: str, load: str
) -> dict[str, Any]:
    name = f"{config}-{load}"
    spec = {
        "config": config,
        "threads": args.threads,
        "config_dir": str(work / "yolo-config"),
        "data": str(data),
        "scale": args.scale,
        "size": args.size,
        "epochs": args.epochs,
        "batch": args.batch,
        "runs": str(work / "runs"),
        "name": name,
    }
    busy = None
    if load == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    log = work / f"{name}.log"
    nice = args.nice
    t0 = time.perf_counter()
    try:
        with log.open("w") as err:
            child = subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=_env(config),
                cwd=work,
                preexec_fn=(lambda: os.nice(nice)) if nice else None,
            )
            try:
                out, _ = child.communicate(timeout=args.max_seconds)
            except subprocess.TimeoutExpired:
                child.kill()  # by its PID, this case's own child only
                child.communicate()
                return {
                    "config": config,
                    "load": load,
                    "timed_out": True,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "log": str(log),
                }
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    result: dict[str, Any] = {"config": config, "load": load, "timed_out": False, "log": str(log)}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if child.returncode != 0:
        result["error"] = f"exit {child.returncode}: {log.read_text()[-2000:]}"
        return result
    result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def _waiting(t: dict[str, Any]) -> str:
    if t.get("omp_wait_policy"):
        return f"OMP_WAIT_POLICY={t['omp_wait_policy']}"
    if t.get("gomp_spincount"):
        return f"GOMP_SPINCOUNT={t['gomp_spincount']}"
    return "libgomp default"


def _table(results: list[dict[str, Any]]) -> str:
    by = {(r["config"], r["load"]): r for r in results}

    def cell(r: dict[str, Any] | None, key: str) -> str:
        if r is None:
            return "-"
        if r.get("timed_out"):
            return f"> {r['wall_s']:.0f} s (timed out)"
        if "error" in r:
            return "error"
        return f"{r[key]:.2f}"

    lines = [
        "| config | waiting | threads | idle s/epoch | busy s/epoch | busy / idle "
        "| idle s/batch (median) | busy s/batch (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in dict.fromkeys(r["config"] for r in results):
        idle, busy = by.get((config, "idle")), by.get((config, "busy"))
        some = next((r for r in (idle, busy) if r and r.get("threads")), None)
        t = some["threads"] if some else {}
        ratio = (
            f"{busy['s_per_epoch'] / idle['s_per_epoch']:.1f}x"
            if idle and busy and "s_per_epoch" in idle and "s_per_epoch" in busy
            else "-"
        )
        lines.append(
            f"| {config} | {_waiting(t)} "
            f"| {t.get('torch_threads', '-')} "
            f"| {cell(idle, 's_per_epoch')} | {cell(busy, 's_per_epoch')} | {ratio} "
            f"| {cell(idle, 'batch_s_median')} | {cell(busy, 'batch_s_median')} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=64, help="synthetic images (7/8 train)")
    p.add_argument("--size", type=int, default=256, help="image and network size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--scale", default="p", choices=("p", "n", "s"))
    p.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--loads", default=",".join(LOADS), help=f"subset of {','.join(LOADS)}")
    p.add_argument("--nice", type=int, default=10, help="niceness of the training (0: none)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="per case; then killed")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return 0
    configs = [c for c in args.configs.split(",") if c]
    loads = [ld for ld in args.loads.split(",") if ld]
    bad = sorted(set(configs) - set(CONFIGS)) + sorted(set(loads) - set(LOADS))
    if bad:
        p.error(f"unknown configs/loads: {bad}")

    from models.synth import SynthConfig, write_dataset
    from models.training.ultra_env import usable_cores

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data = write_dataset(
            work / "data",
            args.images,
            seed=0,
            cfg=SynthConfig(width=args.size, height=args.size),
            fractions=(0.875, 0.125, 0.0),
        )
        machine = {
            "cores": usable_cores(),
            "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        }
        results = []
        for load in loads:
            for config in configs:
                r = _run_case(args, work, data, config, load)
                results.append(r)
                print(
                    f"{config:6s} {load:4s} "
                    + (
                        "timed out"
                        if r.get("timed_out")
                        else r.get("error") or f"{r['s_per_epoch']:.2f} s/epoch"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        settings = {
            k: v
            for k, v in vars(args).items()
            if k not in ("child", "out", "workdir") and v is not None
        }
        doc = {"settings": settings, "machine": machine, "results": results}
        print(_table(results))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
