"""`edge bench`: the real pipeline, in-process, against synthetic cameras at a chosen rate.

It answers two questions a line owner asks before buying a box: how many frames per second this
box decides within budget, and how much the daemon adds on top of the bare model. So the same run
first drives the full daemon (paced replay cameras -> pipeline -> real Modbus TCP on loopback ->
spool), then times ``session.run`` alone on the same preprocessed inputs, and reports the ratio.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from edge.config import DEMO_CONFIG, LineConfig, load_config
from edge.stats import percentiles


def bench_config(base: LineConfig, rate: float, cameras: int, spool_dir: Path) -> LineConfig:
    """The base line, with N replay cameras at `rate` fps and the embedded Modbus PLC."""
    from camera.config import ReplayCameraSettings
    from plc.config import ModbusSettings

    template = next((c for c in base.cameras if isinstance(c, ReplayCameraSettings)), None)
    samples = template.path if template else DEMO_CONFIG.parent.parent / "models/demo/samples"
    cams = [
        ReplayCameraSettings(
            type="replay", id=f"bench{i}", plc_slot=i, path=samples, fps=rate, loop=True
        )
        for i in range(cameras)
    ]
    plc = (
        base.plc
        if isinstance(base.plc, ModbusSettings) and base.plc.simulator
        else ModbusSettings(simulator=True, port=0)
    )
    return base.model_copy(
        update={
            "cameras": cams,
            "plc": plc,
            "uplink": base.uplink.model_copy(
                update={"spool_dir": spool_dir, "kafka": None, "s3": None}
            ),
            "observability": base.observability.model_copy(update={"enabled": False}),
            "decision": base.decision.model_copy(update={"camera_roi": {}}),
        }
    )


def bare_model_timing(cfg: LineConfig, images: list[np.ndarray], runs: int) -> dict[str, Any]:
    """``session.run`` alone, same package, same threads, same preprocessed inputs."""
    import onnxruntime as ort

    from models.loader import load_detector
    from models.package import load_package

    pkg = load_package(cfg.model.package)
    det = load_detector(cfg.model)
    tensors = [det.preprocess(img).tensor for img in images]
    det.close()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.model.intra_op_threads
    opts.inter_op_num_threads = cfg.model.inter_op_threads
    sess = ort.InferenceSession(str(pkg.model_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for t in tensors[:3]:
        sess.run(None, {name: t})
    samples = []
    for i in range(runs):
        t = tensors[i % len(tensors)]
        t0 = time.perf_counter_ns()
        sess.run(None, {name: t})
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return percentiles(samples) | {"samples": samples}


def load_sample_images(folder: Path, limit: int = 64) -> list[np.ndarray]:
    import cv2

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in files[:limit]]
    return [im for im in images if im is not None]


def _sample_cdf(samples: list[float]) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(np.asarray(samples, dtype=np.float64))
    return v, np.arange(1, v.size + 1) / max(v.size, 1)


def write_cdf_png(
    path: Path, series: dict[str, tuple[np.ndarray, np.ndarray]], budget_ms: float
) -> None:
    """One CDF curve per series, each given as (latency ms ascending, fraction <= it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        typer.echo("matplotlib not installed (pip install 'edge-inspect[bench]'): no PNG", err=True)
        return
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for label, (x, frac) in series.items():
        if not len(x):
            continue
        ax.step(x, frac, where="post", label=label)
    ax.axvline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("edge bench: latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Line YAML for model/pipeline settings.")
    ] = None,
    rate: Annotated[float, typer.Option(help="Frames per second per camera.")] = 60.0,
    cameras: Annotated[int, typer.Option(min=1, max=32, help="Synthetic cameras.")] = 1,
    duration: Annotated[float, typer.Option(help="Seconds of daemon run.")] = 20.0,
    bare_runs: Annotated[int, typer.Option(help="session.run calls for the bare timing.")] = 300,
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench-cdf.png.")] = Path(
        "bench-out"
    ),
) -> None:
    """Run the real pipeline against synthetic cameras, then the bare model; report both."""
    from edge.daemon import ExitCode, run_daemon
    from edge.logs import configure_logging

    base = load_config(config or DEMO_CONFIG)
    configure_logging("warning", "console")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        cfg = bench_config(base, rate, cameras, Path(tmp) / "spool")
        typer.echo(
            f"daemon: {cameras} camera(s) x {rate:g} fps for {duration:g}s "
            f"(model {cfg.model.package.name}, {cfg.model.intra_op_threads} thread(s))"
        )
        t0 = time.monotonic()
        code, daemon = run_daemon(cfg, None, duration, status_line=False)
        wall = time.monotonic() - t0
    if code is not ExitCode.OK:
        typer.echo(f"daemon exited with {code.name}", err=True)
        raise typer.Exit(int(code))
    model = daemon.components.get("model")
    if model is None or not model.up:
        typer.echo(
            f"no benchmark: the model did not load ({model.detail if model else '?'})", err=True
        )
        raise typer.Exit(int(ExitCode.STARTUP_FAILED))
    s = daemon.stats.summary()
    samples_dir = cfg.cameras[0].path  # type: ignore[union-attr]
    typer.echo(f"bare model: {bare_runs} x session.run on the same inputs")
    bare = bare_model_timing(cfg, load_sample_images(samples_dir), bare_runs)
    infer = s["stages_ms"].get("infer", percentiles([]))
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "cpus": _cpu_count(),
        },
        "config": {
            "rate_fps_per_camera": rate,
            "cameras": cameras,
            "duration_s": duration,
            "model": str(cfg.model.package),
            "intra_op_threads": cfg.model.intra_op_threads,
            "budget_ms": cfg.pipeline.budget_ms,
        },
        "offered_fps": rate * cameras,
        "decided_fps": s["decided"] / duration,
        "wall_s": wall,
        "summary": s,
        "bare_session_run_ms": {k: v for k, v in bare.items() if k != "samples"},
        "ratio_daemon_infer_to_bare_p50": infer["p50"] / bare["p50"],
        "ratio_end_to_end_to_bare_p50": s["end_to_end_ms"]["p50"] / bare["p50"],
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    write_cdf_png(
        out / "bench-cdf.png",
        {
            "end-to-end (capture->PLC ack)": daemon.stats.e2e_ms.cdf(),
            "infer stage in daemon": daemon.stats.stages_ms["infer"].cdf(),
            "bare session.run": _sample_cdf(bare["samples"]),
        },
        cfg.pipeline.budget_ms,
    )
    typer.echo(format_bench(report))
    typer.echo(f"wrote {out / 'bench.json'} and {out / 'bench-cdf.png'}")


def format_bench(r: dict[str, Any]) -> str:
    s = r["summary"]
    e2e, bare = s["end_to_end_ms"], r["bare_session_run_ms"]
    lines = [
        f"offered {r['offered_fps']:.1f} fps, decided {r['decided_fps']:.1f} fps; "
        f"verdicts {s['verdicts']}; fail-safes {s['failsafes'] or 'none'}; "
        f"deadline misses {s['deadline_misses']}",
        f"{'stage':<14}{'p50':>9}{'p99':>9}{'max':>9}  (ms)",
    ]
    for stage, st in s["stages_ms"].items():
        lines.append(f"{stage:<14}{st['p50']:9.2f}{st['p99']:9.2f}{st['max']:9.2f}")
    lines.append(f"{'end-to-end':<14}{e2e['p50']:9.2f}{e2e['p99']:9.2f}{e2e['max']:9.2f}")
    lines.append(f"{'bare run':<14}{bare['p50']:9.2f}{bare['p99']:9.2f}{bare['max']:9.2f}")
    lines.append(
        f"daemon/bare p50: infer stage {r['ratio_daemon_infer_to_bare_p50']:.2f}x, "
        f"end-to-end {r['ratio_end_to_end_to_bare_p50']:.2f}x"
    )
    return "\n".join(lines)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
