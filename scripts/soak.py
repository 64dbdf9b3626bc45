#!/usr/bin/env python3
"""Soak: the demo line at 60 fps for a given time, with faults injected on a schedule.

    scripts/soak.sh --duration 1800 --out soak-out      # the README's 30-minute figures
    scripts/soak.sh --duration 180 --out soak-ci        # the CI version (tests/core/test_soak.py)

Everything is real and local: `edge run` as a process, the PLC simulator as its own process (its
per-record log is the independent accounting), noida-db as the Kafka broker, SeaweedFS as S3; all
on 127.0.0.1 free ports, stopped by PID. The faults, cycled: a worker frozen (SIGSTOP, the daemon
must kill and respawn it) and killed (SIGKILL), the PLC server killed and restarted, the broker
paused, S3 down long enough to hit the spool's disk quota, and SIGHUP with a bad then a good config.

It samples the daemon's and its workers' RSS and the event loop's lag each second, and asserts:
  * memory: the daemon's RSS slope after warm-up is ~0 (below --max-rss-slope MB/min);
  * every frame one decision: the daemon decided every frame it received, and the PLC's own log
    holds at most one record per part with sequences growing by exactly one (a PLC killed
    mid-write may miss what was sent to it as it died);
  * recovery: real verdicts back within 2 s of each fault affecting them ending;
  * nothing lost: after the run (and `edge uplink drain`), Kafka holds every decided part's
    event (distinct event ids, read back by kcat, a consumer the project did not write).
Writes soak.json (figures), soak.png (RSS, loop lag, latency over time, faults shaded) and
daemon.log (every line the daemon wrote).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import free_port, port_open, stop_pid, wait_until  # noqa: E402

PY = sys.executable
S3_KEY, S3_SECRET, BUCKET, TOPIC = "SOAKKEY", "soak-secret-0123456789", "soak-images", "edge.events"
REAL = {1, 2}


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- peers ----------------------------------------------------------------------------------


class Peer:
    """A restartable server process (same port, same data)."""

    def __init__(self, name: str, cmd: list[str], port: int, logfile: Path,
                 health: str | None = None, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.port, self.logfile = name, cmd, port, logfile
        self.health, self.env = health, env
        self.proc: subprocess.Popen[bytes] | None = None

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.logfile.read_text()[-2000:]}")
        if not port_open(self.port):
            return False
        if self.health is None:
            return True
        try:
            with urllib.request.urlopen(self.health, timeout=0.5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def start(self) -> None:
        out = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(self.env or {})})
        out.close()
        wait_until(self._ready, 60, f"{self.name} ready", poll_s=0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
        wait_until(lambda: not port_open(self.port), 20, f"{self.name} port closed")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


class PlcPeer:
    """The PLC simulator process; its REC lines (one per record it received) are timestamped on
    arrival. It keeps its port across restarts so the daemon reconnects to 'the same PLC'."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.records: list[tuple[float, int, int, int, int]] = []
        """(monotonic arrival, camera slot, sequence, part id, verdict), across restarts."""
        self.generations: list[int] = []
        """Index in `records` of each server start's first record."""
        self.restarts = 0
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()
        proc = subprocess.Popen(
            [PY, "-u", "-m", "plc.sim", "--port", str(self.port), "--camera-slots", "4",
             "--log-records"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=ROOT)
        self.proc = proc

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                parts = raw.decode().split()
                if parts[:1] == ["READY"]:
                    ready.set()
                elif parts[:1] == ["REC"]:
                    cam, seq, part, verdict = (int(x) for x in parts[1:5])
                    self.records.append((time.monotonic(), cam, seq, part, verdict))

        self.generations.append(len(self.records))
        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(30):
            raise RuntimeError("PLC simulator did not start")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # a PLC that dies, not one that says bye
            self.proc.wait(10)
            self.proc = None
        if self._pump is not None:
            self._pump.join(10)  # every record the dead server logged is counted before a restart
            self._pump = None
        wait_until(lambda: not port_open(self.port), 20, "PLC port closed")


def weed_port() -> int:
    while True:
        port = free_port()
        if port < 50000 and not port_open(port + 10000):
            return port


def make_weed(d: Path) -> Peer:
    d.mkdir(parents=True)
    ids = d / "identities.json"
    ids.write_text(json.dumps({"identities": [{
        "name": "edge", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {n: weed_port() for n in ("master", "volume", "filer", "s3")}
    (d / "data").mkdir()
    weed = shutil.which("weed") or str(Path(PY).with_name("weed"))
    cmd = [weed, "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
           f"-s3.config={ids}", f"-filer.localSocket={d / 'filer.sock'}",
           f"-s3.localSocket={d / 's3.sock'}"]
    return Peer("seaweedfs", cmd, ports["s3"], d.parent / "weed.log",
                health=f"http://127.0.0.1:{ports['s3']}/healthz")


def make_kafka(d: Path) -> Peer:
    import noida_db

    d.mkdir(parents=True)
    port = free_port()
    binary = Path(noida_db.__file__).with_name("noida-db")
    return Peer("noida-db", [str(binary), "start", "--data-dir", str(d), "--host", "127.0.0.1",
                             "--only", "kafka", "--kafka-port", str(port)], port,
                d.parent / "noida.log")


# ---- the daemon ----------------------------------------------------------------------------


class Daemon:
    def __init__(self, config: Path, summary: Path, log_file: Path) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "edge", "run", "--config", str(config), "--summary-json", str(summary)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=ROOT)
        self.events: Counter[str] = Counter()
        self.levels: Counter[str] = Counter()
        self.non_json: list[str] = []
        self.tail: deque[dict[str, Any]] = deque(maxlen=300)
        self.http_port: int | None = None
        self.log_file = log_file
        """Every line the daemon wrote, kept with the report: a miss or a stall in the figures
        can be traced to its log lines afterwards (~700 lines in 30 minutes)."""
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def wait(self, timeout_s: float) -> int:
        """The daemon's exit code, once every line it wrote has been read and kept."""
        rc = self.proc.wait(timeout_s)
        self._pumping.join(10)
        return rc

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        with self.log_file.open("wb", buffering=0) as keep:
            for raw in self.proc.stderr:
                keep.write(raw)
                self._read(raw)

    def _read(self, raw: bytes) -> None:
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if len(self.non_json) < 100:
                self.non_json.append(raw.decode(errors="replace"))
            return
        ev = str(rec.get("event"))
        self.events[ev] += 1
        self.levels[str(rec.get("level"))] += 1
        self.tail.append(rec)
        if ev == "daemon_ready":
            self.http_port = rec.get("http_port")

    def workers(self) -> list[int]:
        kids: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                kids += [int(k) for k in (task / "children").read_text().split()]
        return [k for k in kids if _is_worker(k)]

    def count(self, event: str) -> int:
        return self.events[event]


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (the text format's sample lines)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def hist_quantile(before: dict[str, float], after: dict[str, float], name: str,
                  q: float) -> float | None:
    """q-quantile (bucket upper bound) of the observations between two scrapes."""
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{") and 'le="' in key:
            le = key.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0.0)))
    merged: dict[float, float] = {}
    for bound, n in buckets:
        merged[bound] = merged.get(bound, 0.0) + n
    total = merged.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for bound in sorted(merged):
        if merged[bound] >= q * total:
            return bound
    return None


@dataclass
class Sample:
    t: float
    rss_daemon: float
    rss_workers: float
    loop_lag_p99: float | None
    e2e_p99: float | None
    frames: float


@dataclass
class FaultRun:
    name: str
    start: float
    end: float = 0.0
    affects_verdicts: bool = False
    recovery_s: float | None = None
    note: str = ""


@dataclass
class Soak:
    args: argparse.Namespace
    tmp: Path
    plc: PlcPeer = field(init=False)
    kafka: Peer = field(init=False)
    s3: Peer = field(init=False)
    daemon: Daemon = field(init=False)
    config: Path = field(init=False)
    good_config: str = ""
    samples: list[Sample] = field(default_factory=list)
    faults: list[FaultRun] = field(default_factory=list)
    t0: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    # ---- setup ------------------------------------------------------------------------------

    def start(self) -> None:
        self.plc = PlcPeer(free_port())
        self.plc.start()
        self.kafka = make_kafka(self.tmp / "kafka")
        self.kafka.start()
        self.s3 = make_weed(self.tmp / "weed")
        self.s3.start()
        from minio import Minio

        Minio(f"127.0.0.1:{self.s3.port}", access_key=S3_KEY, secret_key=S3_SECRET,
              secure=False, region="us-east-1").make_bucket(BUCKET)
        cfg = {
            "line": "soak-line",
            "cameras": [{"id": "cam0", "type": "replay", "plc_slot": 0,
                         "path": str(ROOT / "models/demo/samples"), "fps": self.args.fps}],
            "model": {"package": str(ROOT / "models/demo/package"), "intra_op_threads": 1},
            "pipeline": {"queue_size": 16, "max_batch": 1, "model_hang_s": 1.0},
            "plc": {"type": "modbus", "host": "127.0.0.1", "port": self.plc.port},
            "uplink": {
                "spool_dir": str(self.tmp / "spool"), "quota_mb": self.args.quota_mb,
                "kafka": {"bootstrap_servers": [f"127.0.0.1:{self.kafka.port}"],
                          "events_topic": TOPIC},
                "s3": {"endpoint_url": f"http://127.0.0.1:{self.s3.port}", "bucket": BUCKET,
                       "credentials": {"access_key_id": {"value": S3_KEY},
                                       "secret_access_key": {"value": S3_SECRET}}},
            },
            "status": {"heartbeat_ms": 100},
            "observability": {"host": "127.0.0.1", "port": free_port()},
            "logging": {"level": "info", "format": "json"},
        }
        self.config = self.tmp / "line.yaml"
        self.good_config = json.dumps(cfg, indent=1)  # JSON is YAML
        self.config.write_text(self.good_config)
        self.daemon = Daemon(self.config, self.tmp / "summary.json", self.args.out / "daemon.log")
        wait_until(lambda: self.daemon.http_port is not None, 120, "daemon_ready")
        wait_until(lambda: any(v in REAL for *_, v in self.plc.records), 60, "a real verdict")
        self.t0 = time.monotonic()
        threading.Thread(target=self._sampler, daemon=True).start()

    def _sampler(self) -> None:
        assert self.daemon.http_port is not None
        prev: dict[str, float] = {}
        while not self._stop.is_set():
            try:
                cur = scrape(self.daemon.http_port)
            except OSError:
                cur = {}
            kids = self.daemon.workers()
            self.samples.append(Sample(
                time.monotonic() - self.t0,
                rss_mb(self.daemon.proc.pid),
                sum(rss_mb(k) for k in kids),
                hist_quantile(prev, cur, "edge_event_loop_lag_ms", 0.99) if prev else None,
                hist_quantile(prev, cur, "edge_end_to_end_latency_ms", 0.99) if prev else None,
                sum(v for k, v in cur.items() if k.startswith("edge_frames_total")),
            ))
            if cur:
                prev = cur
            self._stop.wait(1.0)

    # ---- faults ------------------------------------------------------------------------------

    def _worker(self) -> int:
        wait_until(lambda: len(self.daemon.workers()) == 1, 30, "one inference worker")
        return self.daemon.workers()[0]

    def fault_worker_hang(self) -> FaultRun:
        run = FaultRun("worker frozen (SIGSTOP 3 s)", time.monotonic(), affects_verdicts=True)
        pid = self._worker()
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        run.end = time.monotonic()
        return run

    def fault_worker_kill(self) -> FaultRun:
        run = FaultRun("worker killed (SIGKILL)", time.monotonic(), affects_verdicts=True)
        os.kill(self._worker(), signal.SIGKILL)
        run.end = time.monotonic()
        return run

    def fault_plc_restart(self) -> FaultRun:
        run = FaultRun("PLC server killed, back after 3 s", time.monotonic(),
                       affects_verdicts=True)
        self.plc.stop()
        time.sleep(3)
        self.plc.start()
        self.plc.restarts += 1
        run.end = time.monotonic()
        return run

    def fault_broker_pause(self) -> FaultRun:
        run = FaultRun(f"Kafka broker paused {self.args.outage_s:g} s", time.monotonic())
        self.kafka.signal(signal.SIGSTOP)
        time.sleep(self.args.outage_s)
        self.kafka.signal(signal.SIGCONT)
        run.end = time.monotonic()
        return run

    def fault_s3_down(self) -> FaultRun:
        down = self.args.outage_s * 4 / 3
        run = FaultRun(f"S3 down {down:g} s (spool quota hit)", time.monotonic())
        self.s3.stop()
        time.sleep(down)
        self.s3.start()
        run.end = time.monotonic()
        return run

    def fault_sighup(self) -> FaultRun:
        run = FaultRun("SIGHUP: a bad config, then a good one", time.monotonic())
        rejected, done = self.daemon.count("reload_rejected"), self.daemon.count("reload_done")
        self.config.write_bytes(b"line: [unclosed\n\xff\xfe")
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.daemon.count("reload_rejected") > rejected, 30, "refused")
        self.config.write_text(self.good_config)
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.daemon.count("reload_done") > done, 60, "reload done")
        run.end = time.monotonic()
        return run

    def schedule(self) -> list[Callable[[], FaultRun]]:
        every = [self.fault_worker_hang, self.fault_sighup, self.fault_worker_kill,
                 self.fault_broker_pause, self.fault_plc_restart, self.fault_s3_down]
        only = self.args.faults
        return [f for f in every if f.__name__.removeprefix("fault_") in only] if only else every

    def run(self) -> None:
        end = self.t0 + self.args.duration
        time.sleep(min(self.args.warmup, self.args.duration / 5))
        faults = [] if self.args.no_faults else self.schedule()
        i = 0
        while faults and time.monotonic() + 25 < end:
            fault = faults[i % len(faults)]
            log(f"fault: {fault.__name__.removeprefix('fault_')}")
            run = fault()
            self.faults.append(run)
            i += 1
            time.sleep(min(self.args.gap, max(0.0, end - time.monotonic())))
        time.sleep(max(0.0, end - time.monotonic()))

    # ---- end and analysis ----------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self.daemon.proc.send_signal(signal.SIGTERM)
        rc = self.daemon.wait(60)
        summary = json.loads((self.tmp / "summary.json").read_text())
        log(f"daemon exited {rc}; draining the spool with `edge uplink drain`")
        drain = subprocess.run([PY, "-m", "edge", "uplink", "drain", "--config", str(self.config),
                                "--timeout", "180"], capture_output=True, text=True, cwd=ROOT)
        kafka_ids = kafka_part_events(self.kafka.port, summary["decided"])
        for run in self.faults:
            if run.affects_verdicts:
                after = [t for t, *_, v in self.plc.records if t >= run.end and v in REAL]
                run.recovery_s = (after[0] - run.end) if after else None
        return {"exit_code": rc, "summary": summary, "drain_rc": drain.returncode,
                "drain_out": drain.stdout + drain.stderr, "kafka_part_events": len(kafka_ids)}

    def cleanup(self) -> None:
        if self.daemon.proc.poll() is None:
            self.daemon.proc.kill()
        for peer in (self.kafka, self.s3):
            with contextlib.suppress(Exception):
                peer.stop()
        with contextlib.suppress(Exception):
            self.plc.stop()


def kafka_part_events(port: int, expect: int, timeout_s: float = 120.0) -> set[str]:
    """Distinct event ids of part events in the topic, read by Debian's kcat."""
    kcat = shutil.which("kcat")
    if kcat is None:
        raise SystemExit("kcat missing: scripts/setup.sh test installs it")
    end = time.monotonic() + timeout_s
    ids: set[str] = set()
    while time.monotonic() < end:
        out = subprocess.run([kcat, "-C", "-b", f"127.0.0.1:{port}", "-t", TOPIC, "-o",
                              "beginning", "-e", "-q", "-f", "%s\n"], capture_output=True,
                             text=True, timeout=timeout_s).stdout
        ids = set()
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("kind", "part") == "part":
                    ids.add(doc["event_id"])
        if len(ids) >= expect:
            break
    return ids


def slope_mb_per_min(samples: list[Sample], warmup_s: float) -> float:
    pts = [(s.t, s.rss_daemon) for s in samples if s.t >= warmup_s and s.rss_daemon > 0]
    if len(pts) < 10:
        return float("nan")
    n = len(pts)
    mx = sum(t for t, _ in pts) / n
    my = sum(v for _, v in pts) / n
    var = sum((t - mx) ** 2 for t, _ in pts)
    cov = sum((t - mx) * (v - my) for t, v in pts)
    return cov / var * 60 if var else 0.0


def check_plc_log(
    records: list[tuple[float, int, int, int, int]], generations: list[int]
) -> list[str]:
    """At most one record per part; per camera the sequence grows by exactly one, except that
    a restarted PLC may miss the records sent to it while it died (their writes got no answer:
    those parts fall to the PLC's watchdog); the sequence still only moves forward then."""
    problems = []
    seen: set[tuple[int, int]] = set()
    last: dict[int, int] = {}
    restarted: set[int] = set()
    starts = set(generations[1:])
    dupes = 0
    for i, (_t, cam, seq, part, _v) in enumerate(records):
        if i in starts:
            restarted = set(last)
        if (cam, part) in seen:
            dupes += 1
        seen.add((cam, part))
        if cam in last:
            step = (seq - last[cam]) % 0xFFFF_FFFF
            ok = 1 <= step < 0x8000_0000 if cam in restarted else step == 1
            if not ok:
                problems.append(f"slot {cam}: sequence {last[cam]} -> {seq}")
        restarted.discard(cam)
        last[cam] = seq
    if dupes:
        problems.append(f"{dupes} parts reached the PLC twice")
    return problems[:20]


def plot(path: Path, samples: list[Sample], faults: list[FaultRun], t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), dpi=110, sharex=True)
    t = [s.t / 60 for s in samples]
    a1.plot(t, [s.rss_daemon for s in samples], label="daemon RSS (MB)")
    a1.plot(t, [s.rss_workers for s in samples], label="inference worker(s) RSS (MB)")
    a1.set_ylabel("MB")
    a1.legend(loc="upper left", fontsize=8)
    lag = [(s.t / 60, s.loop_lag_p99) for s in samples if s.loop_lag_p99 is not None]
    e2e = [(s.t / 60, s.e2e_p99) for s in samples if s.e2e_p99 is not None]
    a2.step([x for x, _ in lag], [y for _, y in lag], where="post", label="event-loop lag p99/s")
    a2.step([x for x, _ in e2e], [y for _, y in e2e], where="post", label="capture->PLC p99/s")
    a2.axhline(348, color="red", linestyle="--", linewidth=0.8, label="budget 348 ms")
    a2.set_yscale("log")
    a2.set_ylabel("ms (histogram bucket bound)")
    a2.set_xlabel("minutes")
    a2.legend(loc="upper left", fontsize=8)
    for ax in (a1, a2):
        for f in faults:
            ax.axvspan((f.start - t0) / 60, (max(f.end, f.start + 0.5) - t0) / 60,
                       color="orange", alpha=0.25)
    a1.set_title("edge soak: memory, loop lag, latency (faults shaded)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of line run")
    ap.add_argument("--out", type=Path, default=Path("soak-out"))
    ap.add_argument("--fps", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=30.0,
                    help="seconds before faults and before the RSS slope is fitted")
    ap.add_argument("--gap", type=float, default=12.0, help="seconds between faults")
    ap.add_argument("--quota-mb", type=int, default=12, help="spool quota (hit while S3 is down)")
    ap.add_argument("--outage-s", type=float, default=15.0,
                    help="broker pause (S3 stays down 4/3 of it)")
    ap.add_argument("--fit-after", type=float, default=None,
                    help="fit the RSS slope from this second on (default: after the first "
                         "full fault cycle: every code path has allocated once)")
    ap.add_argument("--max-rss-slope", type=float, default=1.0, help="MB/min allowed after warm-up")
    ap.add_argument("--max-recovery-s", type=float, default=2.0)
    ap.add_argument("--no-faults", action="store_true", help="a quiet run (a baseline)")
    ap.add_argument("--faults", type=lambda v: v.split(","), default=None,
                    help="only these faults, comma-separated (worker_hang, sighup, worker_kill, "
                         "broker_pause, plc_restart, s3_down): to isolate one")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    soak = Soak(args, tmp)
    try:
        log(f"starting peers and the daemon in {tmp}")
        soak.start()
        log(f"running {args.duration:g}s at {args.fps:g} fps")
        soak.run()
        end = soak.finish()
    finally:
        soak.cleanup()
    s = end["summary"]
    cycle = len(soak.schedule())
    first_cycle_end = (
        soak.faults[cycle - 1].end - soak.t0 if len(soak.faults) > cycle
        else min(args.warmup, args.duration / 5) + 10
    )
    fit_after = args.fit_after if args.fit_after is not None else first_cycle_end
    slope = slope_mb_per_min(soak.samples, fit_after)
    lag = [x.loop_lag_p99 for x in soak.samples if x.loop_lag_p99 is not None]
    failures: list[str] = []
    if end["exit_code"] != 0:
        failures.append(f"daemon exit code {end['exit_code']}")
    if s["frames"] != s["decided"]:
        failures.append(f"{s['frames']} frames but {s['decided']} decided")
    failures += check_plc_log(soak.plc.records, soak.plc.generations)
    if not slope < args.max_rss_slope:
        failures.append(f"daemon RSS slope {slope:.2f} MB/min >= {args.max_rss_slope}")
    for run in soak.faults:
        if run.affects_verdicts and (run.recovery_s is None or
                                     run.recovery_s > args.max_recovery_s):
            failures.append(f"{run.name}: real verdicts back after {run.recovery_s} s")
    if end["kafka_part_events"] < s["decided"]:
        failures.append(f"Kafka holds {end['kafka_part_events']} part events of {s['decided']}")
    if soak.daemon.non_json:
        failures.append(f"{len(soak.daemon.non_json)} non-JSON stderr lines")
    report = {
        "machine": {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "frames": s["frames"], "decided": s["decided"], "verdicts": s["verdicts"],
        "failsafes": s["failsafes"], "deadline_misses": s["deadline_misses"],
        "misses_by_outcome": s["misses_by_outcome"], "end_to_end_ms": s["end_to_end_ms"],
        "event_loop_lag_ms": s.get("event_loop_lag_ms"), "gc_pause_ms": s.get("gc_pause_ms"),
        "rss_daemon_mb": {"first": soak.samples[0].rss_daemon if soak.samples else None,
                          "last": soak.samples[-1].rss_daemon if soak.samples else None,
                          "slope_mb_per_min_after_warmup": round(slope, 3),
                          "fitted_from_s": round(fit_after, 1)},
        "rss_workers_mb_last": soak.samples[-1].rss_workers if soak.samples else None,
        "loop_lag_p99_per_s_max": max(lag) if lag else None,
        "faults": [{"name": f.name, "at_s": round(f.start - soak.t0, 1),
                    "lasted_s": round(f.end - f.start, 1),
                    "real_verdicts_back_after_s": None if f.recovery_s is None
                    else round(f.recovery_s, 3)} for f in soak.faults],
        "plc_records": len(soak.plc.records), "plc_restarts": soak.plc.restarts,
        "kafka_part_events": end["kafka_part_events"], "drain": end["drain_out"].strip()[-400:],
        "daemon_log": {"lines_by_level": dict(soak.daemon.levels),
                       "non_json_lines": len(soak.daemon.non_json)},
        "model": s.get("model"), "cameras": s.get("cameras"),
        "failures": failures,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    plot(args.out / "soak.png", soak.samples, soak.faults, soak.t0)
    shutil.rmtree(tmp, ignore_errors=True)
    log(json.dumps({k: report[k] for k in ("frames", "decided", "failsafes", "deadline_misses",
                                           "rss_daemon_mb", "kafka_part_events", "faults")},
                   default=str))
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    log(f"OK: wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
