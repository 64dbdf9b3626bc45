"""`edge bench`: the real pipeline beside the bare model and the naive loop, in one run.

It answers what a line owner asks before buying a box: how many parts per second this box
decides within budget, how much latency the daemon adds on top of the model, and whether the
daemon beats the twenty-line loop a plant engineer would write instead. So one run measures, on
the same model, the same images and a real Modbus server in its own process (`--plc`: by default
the native libmodbus server, so that the PLC's own response does not count as the box's time;
`--plc sim` the project's Python simulator, ~0.2-0.3 ms slower per write at p50 on 2 vCPUs):

* the daemon: replay cameras -> inference workers -> Modbus TCP -> spool, either paced at
  `--rate` fps per camera (latency) or **closed loop** (`--closed-loop`: each decision triggers
  the next frame, a fixed number of parts in flight: the capacity in real verdicts/s);
* bare `session.run` on the same preprocessed inputs: one caller with all the daemon's inference
  threads, and one caller per worker (what the workers could do with nothing else on the box);
* with `--peer naive` (train extra): ultralytics `YOLO(model.onnx).predict` + a synchronous
  pymodbus write per frame, closed loop (models/training/naive_peer.py).

Ratios come from this one run, never from another day's table. The references (bare and naive)
run in two halves, before and after the daemon phase, so that a VM's drift over the run lands on
both sides of the ratio; each half is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from edge.config import DEMO_CONFIG, LineConfig, load_config
from edge.pipeline import usable_cpus
from edge.stats import percentiles
from plc import native_peer


def bench_config(
    base: LineConfig,
    rate: float,
    cameras: int,
    spool_dir: Path,
    plc_port: int,
    closed_loop: bool,
    workers: int | None = None,
    intra_op: int | None = None,
    samples: Path | None = None,
) -> LineConfig:
    """The base line with N replay cameras (paced or triggered) and the PLC at `plc_port`."""
    from camera.config import ReplayCameraSettings, TriggeredMode
    from plc.config import ModbusSettings

    template = next((c for c in base.cameras if isinstance(c, ReplayCameraSettings)), None)
    folder = samples or (template.path if template else DEMO_CONFIG.parent.parent
                         / "models/demo/samples")
    cams = [
        ReplayCameraSettings(
            type="replay", id=f"bench{i}", plc_slot=i, path=folder, fps=0 if closed_loop else rate,
            loop=True,
        )
        for i in range(cameras)
    ]
    if closed_loop:  # the bench fires each camera's software trigger itself
        trigger = TriggeredMode(mode="triggered", source="software")
        cams = [c.model_copy(update={"trigger": trigger}) for c in cams]
    model = base.model
    if intra_op is not None:
        model = model.model_copy(update={"intra_op_threads": intra_op})
    pipeline = base.pipeline
    if workers is not None:
        pipeline = pipeline.model_copy(update={"workers": workers})
    return base.model_copy(
        update={
            "cameras": cams,
            "model": model,
            "pipeline": pipeline,
            "plc": ModbusSettings(host="127.0.0.1", port=plc_port),
            "uplink": base.uplink.model_copy(
                update={"spool_dir": spool_dir, "kafka": None, "s3": None}
            ),
            "observability": base.observability.model_copy(update={"enabled": False}),
            "control": base.control.model_copy(update={"enabled": False}),
            "decision": base.decision.model_copy(update={"camera_roi": {}}),
            "recipes": None,
        }
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PLC_PEERS = ("auto", "native", "sim")


def resolve_plc_peer(choice: str, build_dir: Path) -> tuple[str, Path | None]:
    """("native", binary) or ("sim", None). `auto` takes the native server where it builds."""
    if choice == "sim":
        return "sim", None
    try:
        return "native", native_peer.build(build_dir)
    except native_peer.PeerUnavailable as exc:
        if choice == "native":
            raise
        typer.echo(f"PLC: the Python simulator (no native server: {exc})")
        return "sim", None


@contextlib.contextmanager
def plc_process(slots: int, native: Path | None = None) -> Iterator[int]:
    """A PLC on a free port, in a process of its own, stopped by its PID: the native Modbus
    server (plc/native_peer.py) or `python -m plc.sim`. Yields the port."""
    port = _free_port()
    cmd = (
        [str(native), str(port)]
        if native is not None
        else [sys.executable, "-m", "plc.sim", "--port", str(port), "--camera-slots", str(slots)]
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"PLC peer did not start: {line!r}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def load_sample_images(folder: Path, limit: int = 64) -> list[np.ndarray]:
    import cv2

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in files[:limit]]
    return [im for im in images if im is not None]


SAMPLES_KEPT = 50_000
"""Latency samples a bare run keeps for the merged percentiles and the CDF."""


def bare_session_run(
    cfg: LineConfig,
    images: list[np.ndarray],
    duration_s: float,
    callers: int,
    threads: int,
    rate_hz: float | None = None,
) -> dict[str, Any]:
    """`session.run` alone: `callers` threads, each its own session with `threads` intra-op
    threads, on the same preprocessed inputs the daemon's workers see. Closed loop, or paced at
    `rate_hz` per caller (a model that idles between frames runs a cold core and cold caches:
    the paced figure is the fair 'bare' for a paced daemon run)."""
    import onnxruntime as ort

    from models.loader import load_detector
    from models.package import load_package

    pkg = load_package(cfg.model.package)
    det = load_detector(cfg.model.model_copy(update={"warmup_runs": 0}))
    tensors = [det.preprocess(img).tensor for img in images]
    det.close()

    def session() -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(pkg.model_path), opts, providers=["CPUExecutionProvider"])

    sessions = [session() for _ in range(callers)]
    name = sessions[0].get_inputs()[0].name
    for sess in sessions:
        for tensor in tensors[:3]:
            sess.run(None, {name: tensor})
    lat: list[list[float]] = [[] for _ in range(callers)]
    stop = time.monotonic() + duration_s

    def loop(i: int) -> None:
        s, k = sessions[i], i
        due = time.monotonic()
        while time.monotonic() < stop:
            if rate_hz:
                due += 1.0 / rate_hz
                time.sleep(max(0.0, due - time.monotonic()))
            t0 = time.perf_counter_ns()
            s.run(None, {name: tensors[k % len(tensors)]})
            lat[i].append((time.perf_counter_ns() - t0) / 1e6)
            k += callers

    t0 = time.monotonic()
    runners = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    wall = time.monotonic() - t0
    flat = [x for part in lat for x in part]
    return {"callers": callers, "intra_op_threads": threads, "paced_hz": rate_hz,
            "runs": len(flat), "wall_s": wall, "runs_per_s": len(flat) / wall,
            "latency_ms": percentiles(flat), "samples": flat[:SAMPLES_KEPT]}


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One bare figure from its halves run before and after the daemon phase.

    A shared VM's speed drifts by 10-15 % over a minute; measured only after the daemon, the bare
    reference carried that drift into every ratio. Halves on both sides bracket the daemon phase,
    and the drift between them is reported, so a reader can see how far to trust a ratio."""
    runs, wall = before["runs"] + after["runs"], before["wall_s"] + after["wall_s"]
    samples = before["samples"] + after["samples"]
    return {**before, "runs": runs, "wall_s": wall, "runs_per_s": runs / wall,
            "latency_ms": percentiles(samples), "samples": samples[:SAMPLES_KEPT],
            "before_runs_per_s": before["runs_per_s"], "after_runs_per_s": after["runs_per_s"],
            "drift": after["runs_per_s"] / before["runs_per_s"] - 1 if before["runs_per_s"]
            else None}


def run_daemon_phase(cfg: LineConfig, duration_s: float, closed_loop: bool) -> tuple[Any, Any]:
    """The real daemon for `duration_s`; closed loop: each decision triggers the next frame."""
    from edge.daemon import Daemon, ExitCode, run_daemon
    from edge.pipeline import DecidedPart

    hooks: list[Callable[[Daemon], None]] = []
    if closed_loop:

        def attach(daemon: Daemon) -> None:
            assert daemon.pipeline is not None
            workers = daemon.workers
            p = cfg.pipeline
            n_workers = p.worker_count(cfg.model.intra_op_threads)
            window = n_workers * p.worker_depth * p.max_batch + 1
            cams = list(workers.values())

            def next_frame(part: DecidedPart) -> None:
                workers[part.frame.camera_id].trigger()

            daemon.pipeline.observers.append(next_frame)
            loop = asyncio.get_running_loop()

            def prime() -> None:  # cameras open in their own threads: fire once all are up
                if not all(w.state == "up" for w in cams):
                    loop.call_later(0.01, prime)
                    return
                for i in range(window):
                    cams[i % len(cams)].trigger()

            prime()

        hooks.append(attach)
    code, daemon = run_daemon(cfg, None, duration_s, status_line=False, ready_hooks=hooks)
    if code is not ExitCode.OK:
        raise typer.Exit(int(code))
    return code, daemon


def naive_peer(
    cfg: LineConfig, images_dir: Path, plc_port: int, duration_s: float, out: Path, name: str
) -> dict[str, Any] | None:
    from models.package import load_package

    pkg = load_package(cfg.model.package)
    result = out / f"naive-{name}.json"
    r = subprocess.run(
        [sys.executable, "-m", "models.training.naive_peer", "--model", str(pkg.model_path),
         "--imgsz", str(pkg.manifest.input_size[0]), "--images", str(images_dir),
         "--modbus-port", str(plc_port), "--duration", str(duration_s), "--out", str(result)],
        capture_output=True, text=True, timeout=duration_s * 4 + 300,
    )
    if r.returncode != 0:
        typer.echo(f"naive peer failed (needs the train extra): {r.stderr.strip()[-500:]}",
                   err=True)
        return None
    doc: dict[str, Any] = json.loads(result.read_text())
    return doc


def bracket_naive(before: dict[str, Any] | None, after: dict[str, Any] | None
                  ) -> dict[str, Any] | None:
    """The naive loop's halves before and after the daemon, as one figure (see `bracket`)."""
    if before is None or after is None:
        return None
    samples = before.pop("samples_ms") + after.pop("samples_ms")
    frames, wall = before["frames"] + after["frames"], before["wall_s"] + after["wall_s"]
    return {**before, "frames": frames, "wall_s": wall, "verdicts_per_s": frames / wall,
            "latency_ms": percentiles(samples), "before_per_s": before["verdicts_per_s"],
            "after_per_s": after["verdicts_per_s"]}


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
    rate: Annotated[float, typer.Option(help="Frames per second per camera (paced mode).")] = 60.0,
    cameras: Annotated[int, typer.Option(min=1, max=32, help="Synthetic cameras.")] = 1,
    duration: Annotated[float, typer.Option(help="Seconds of each measured phase.")] = 20.0,
    closed_loop: Annotated[
        bool,
        typer.Option("--closed-loop", help="Capacity: each decision triggers the next frame."),
    ] = False,
    workers: Annotated[
        str | None, typer.Option(help="Inference workers (a number or 'auto'; default: config).")
    ] = None,
    intra_op_threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime threads per worker (default: config).")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="Folder of frames to replay (default: the demo samples).")
    ] = None,
    peer: Annotated[
        list[str] | None, typer.Option(help="Also run a comparison peer: 'naive' (train extra).")
    ] = None,
    plc: Annotated[
        str,
        typer.Option(
            help="The PLC the daemon (and the naive loop) write to: 'native' (libmodbus, C), "
            "'sim' (the project's Python simulator) or 'auto' (native where gcc and "
            "libmodbus-dev are installed)."
        ),
    ] = "auto",
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench-cdf.png.")] = Path(
        "bench-out"
    ),
) -> None:
    """Run the real pipeline, bare session.run and (optionally) the naive loop; report ratios."""
    from edge.cpulatency import CpuLatencyHint
    from edge.logs import configure_logging
    from edge.malloc import limit_arenas

    limit_arenas()  # as `edge run` does
    base = load_config(config or DEMO_CONFIG)
    configure_logging("warning", "console")
    out.mkdir(parents=True, exist_ok=True)
    # The bare model and the naive peer run under the same CPU wake-up latency as the daemon
    # (pipeline.cpu_latency_us): a ratio between differently tuned boxes would be meaningless.
    hint = CpuLatencyHint(base.pipeline.cpu_latency_us)
    hint.start()
    n_workers: int | None = None
    if workers is not None:
        n_workers = None if workers == "auto" else int(workers)
    with_naive = bool(peer and "naive" in peer)
    if plc not in PLC_PEERS:
        typer.echo(f"--plc must be one of {', '.join(PLC_PEERS)}, not {plc!r}", err=True)
        raise typer.Exit(2)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-bench-"))
        try:
            plc_peer, native = resolve_plc_peer(plc, Path(tmp))
        except native_peer.PeerUnavailable as exc:
            typer.echo(f"--plc native: {exc}; or use --plc sim", err=True)
            raise typer.Exit(2) from None
        port = stack.enter_context(plc_process(cameras, native))
        # The naive loop writes to a PLC of its own: the daemon's sees only the daemon's records.
        naive_port = stack.enter_context(plc_process(1, native)) if with_naive else 0
        cfg = bench_config(base, rate, cameras, Path(tmp) / "spool", port, closed_loop,
                           n_workers, intra_op_threads, images)
        if workers == "auto":
            cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
                update={"workers": "auto"})})
        p = cfg.pipeline
        n = p.worker_count(cfg.model.intra_op_threads)
        threads = cfg.model.intra_op_threads
        mode = "closed loop" if closed_loop else f"{rate:g} fps x {cameras} camera(s)"
        typer.echo(f"daemon: {mode} for {duration:g}s ({n} worker(s) x {threads} thread(s), "
                   f"model {cfg.model.package.name})")
        folder = cfg.cameras[0].path  # type: ignore[union-attr]
        imgs = load_sample_images(folder)
        half = max(2.5, duration / 4)
        kinds: dict[str, tuple[int, int, float | None]] = {
            "one_caller_all_threads": (1, n * threads, None),
            "one_caller_per_worker": (n, threads, None),
        }
        if not closed_loop:  # the same frame rate as the daemon saw, spread over its workers
            kinds["paced_like_the_daemon"] = (n, threads, rate * cameras / n)

        def bare_phase() -> dict[str, dict[str, Any]]:
            done: dict[tuple[int, int, float | None], dict[str, Any]] = {}
            for shape in kinds.values():  # 1 worker: "all threads" and "per worker" are one run
                if shape not in done:
                    callers, th, hz = shape
                    done[shape] = bare_session_run(cfg, imgs, half, callers, th, rate_hz=hz)
            return {k: done[shape] for k, shape in kinds.items()}

        typer.echo(f"bare session.run: {half:g}s each, before and after the daemon")
        try:
            before = bare_phase()
        except Exception as exc:  # the daemon phase would only fail-safe: say why here
            typer.echo(f"no benchmark: the model did not work ({exc})", err=True)
            raise typer.Exit(3) from None
        naive_run: Callable[[str], dict[str, Any] | None] | None = None
        if with_naive:
            typer.echo(f"naive peer (ultralytics + pymodbus): {duration / 2:g}s before and after")
            naive_run = functools.partial(naive_peer, cfg, folder, naive_port, duration / 2, out)
        naive_before = naive_run("before") if naive_run else None
        t0 = time.monotonic()
        _code, daemon = run_daemon_phase(cfg, duration, closed_loop)
        wall = time.monotonic() - t0
        model = daemon.components.get("model")
        if model is None or not model.up:
            typer.echo(f"no benchmark: the model did not work ({model.detail if model else '?'})",
                       err=True)
            raise typer.Exit(3)
        s = daemon.stats.summary()
        after = bare_phase()
        bare = {k: bracket(before[k], after[k]) for k in kinds}
        naive = bracket_naive(naive_before, naive_run("after")) if naive_run else None
    hint.stop()
    real = s["verdicts"].get("OK", 0) + s["verdicts"].get("DEFECT", 0)
    real_per_s = real / duration
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "cpus": usable_cpus(),
            "load_avg": os.getloadavg(),
        },
        "config": {
            "mode": "closed_loop" if closed_loop else "paced",
            "rate_fps_per_camera": None if closed_loop else rate,
            "cameras": cameras,
            "duration_s": duration,
            "model": str(cfg.model.package),
            "workers": n,
            "intra_op_threads": threads,
            "max_batch": p.max_batch,
            "budget_ms": p.budget_ms,
            "plc_peer": plc_peer,
        },
        "offered_fps": None if closed_loop else rate * cameras,
        "decided_per_s": s["decided"] / duration,
        "real_verdicts_per_s": real_per_s,
        "wall_s": wall,
        "summary": s,
        "bare": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in bare.items()},
        "naive": naive,
        "ratios": _ratios(real_per_s, s, bare, naive),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    write_cdf_png(
        out / "bench-cdf.png",
        {
            "end-to-end (capture->PLC ack)": daemon.stats.e2e_ms.cdf(),
            "infer stage in daemon": daemon.stats.stages_ms["infer"].cdf(),
            "bare session.run (one caller)": _sample_cdf(
                bare["one_caller_per_worker"]["samples"]
            ),
        },
        cfg.pipeline.budget_ms,
    )
    typer.echo(format_bench(report))
    typer.echo(f"wrote {out / 'bench.json'} and {out / 'bench-cdf.png'}")


def _ratios(
    real_per_s: float, s: dict[str, Any], bare: dict[str, Any], naive: dict[str, Any] | None
) -> dict[str, float | None]:
    e2e = s["end_to_end_ms"]
    per_worker = bare["one_caller_per_worker"]
    latency_ref = bare.get("paced_like_the_daemon", per_worker)
    out: dict[str, float | None] = {
        "daemon_vs_bare_one_caller_all_threads":
            real_per_s / bare["one_caller_all_threads"]["runs_per_s"],
        "daemon_vs_bare_one_caller_per_worker": real_per_s / per_worker["runs_per_s"],
        "e2e_p99_minus_bare_p99_ms": e2e["p99"] - latency_ref["latency_ms"]["p99"],
        "daemon_vs_naive": None,
    }
    if naive:
        out["daemon_vs_naive"] = real_per_s / naive["verdicts_per_s"]
    return out


def format_bench(r: dict[str, Any]) -> str:
    s, c, rt = r["summary"], r["config"], r["ratios"]
    e2e = s["end_to_end_ms"]
    lines = [
        f"{c['mode']}: {c['workers']} worker(s) x {c['intra_op_threads']} thread(s), "
        f"{r['machine']['cpus']} CPU(s), load {r['machine']['load_avg'][0]:.1f}, "
        f"PLC {c['plc_peer']}",
        f"daemon: {r['decided_per_s']:.1f} decided/s, {r['real_verdicts_per_s']:.1f} real "
        f"verdicts/s; fail-safes {s['failsafes'] or 'none'}; deadline misses "
        f"{s['deadline_misses']}",
        f"{'stage':<16}{'p50':>9}{'p99':>9}{'max':>9}  (ms)",
    ]
    for stage, st in s["stages_ms"].items():
        lines.append(f"{stage:<16}{st['p50']:9.2f}{st['p99']:9.2f}{st['max']:9.2f}")
    lines.append(f"{'end-to-end':<16}{e2e['p50']:9.2f}{e2e['p99']:9.2f}{e2e['max']:9.2f}")
    shown: set[tuple[Any, ...]] = set()
    for b in r["bare"].values():
        shape = (b["callers"], b["intra_op_threads"], b.get("paced_hz"))
        if shape in shown:  # the same run under two names (1 worker)
            continue
        shown.add(shape)
        lat = b["latency_ms"]
        paced = f", paced {b['paced_hz']:g} Hz each" if b.get("paced_hz") else ""
        drift = (f" (before {b['before_runs_per_s']:.1f}, after {b['after_runs_per_s']:.1f}/s)"
                 if "drift" in b else "")
        lines.append(
            f"bare session.run, {b['callers']} caller(s) x {b['intra_op_threads']} thread(s)"
            f"{paced}: {b['runs_per_s']:.1f} runs/s{drift}, p50 {lat['p50']:.2f} "
            f"p99 {lat['p99']:.2f} ms"
        )
    if r["naive"]:
        nv = r["naive"]
        lines.append(
            f"naive loop (ultralytics predict + pymodbus write): {nv['verdicts_per_s']:.1f}/s "
            f"(before {nv['before_per_s']:.1f}, after {nv['after_per_s']:.1f}/s), "
            f"p50 {nv['latency_ms']['p50']:.2f} p99 {nv['latency_ms']['p99']:.2f} ms"
        )
    lines.append(
        "ratios: daemon/bare(1 caller, all threads) "
        f"{rt['daemon_vs_bare_one_caller_all_threads']:.2f}, daemon/bare(1 caller per worker) "
        f"{rt['daemon_vs_bare_one_caller_per_worker']:.2f}"
        + (f", daemon/naive {rt['daemon_vs_naive']:.2f}" if rt["daemon_vs_naive"] else "")
        + f"; e2e p99 - bare p99 {rt['e2e_p99_minus_bare_p99_ms']:+.1f} ms"
        + (" (bare paced like the daemon)" if "paced_like_the_daemon" in r["bare"] else "")
    )
    return "\n".join(lines)
