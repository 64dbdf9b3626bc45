#!/usr/bin/env python
"""PLC link benchmark on loopback: write round trip per backend, and recovery after faults.

For each peer (server in its own process, as a real PLC would be):
  * write round trip: N decision records (record v2), one at a time, each timed from the call to
    its ACK;
  * recovery after a restart: the server is killed, restarted on the same port, and the time from
    "port open again" to the first acknowledged write is measured (a writer keeps writing every
    2 ms, 30 ms budget each);
  * recovery after a stall: the server is SIGSTOPped for --stop-ms (its kernel still accepts
    connections), then SIGCONTed; the time from SIGCONT to the first acknowledged write, over
    --stops cycles (median, p99, max). The documented target is <= 250 ms.

    python scripts/bench_plc.py [--writes 2000] [--restarts 5] [--stops 20] [--stop-ms 300]
                                [--json out.json] [--only modbus-sim]

Peers: modbus-sim (plc.sim, pymodbus server), modbus-libmodbus (C server, built with gcc),
modbus-pymodbustcp (pyModbusTCP server), s7-python (python-snap7 3.x server), s7-native (Snap7
C++ from python-snap7 2.1 in .venv-snap7-native, see scripts/install_snap7_native.sh), opcua
(asyncua server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plc import native_peer  # noqa: E402
from plc.config import ModbusSettings, OpcUaSettings, S7Settings  # noqa: E402
from plc.factory import create_link  # noqa: E402
from plc.linkbase import ReconnectingLink  # noqa: E402
from plc.record import DecisionRecord, Verdict, WriteOutcome  # noqa: E402

PEERS = ROOT / "tests" / "plc" / "peers"
NATIVE_PY = ROOT / ".venv-snap7-native" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Peer:
    def __init__(self, cmd: Callable[[int], list[str]], ready: str = "port") -> None:
        self.cmd, self.ready = cmd, ready
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        self.proc = subprocess.Popen(self.cmd(port), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=ROOT)
        if self.ready == "line":
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line.startswith(b"READY"):
                raise RuntimeError(f"peer did not start: {self.cmd(port)}")
        end = time.monotonic() + 30
        while not port_open(port):
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError(f"peer did not open port {port}: {self.cmd(port)}")
            time.sleep(0.005)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def _summary(xs: list[float]) -> dict[str, Any]:
    ok = [x for x in xs if math.isfinite(x)]
    return {"runs": len(xs), "recovered": len(ok),
            "median": statistics.median(ok) if ok else None,
            "p99": pct(ok, 0.99) if ok else None, "max": max(ok) if ok else None,
            "all": [round(x, 1) for x in xs]}


async def bench_peer(name: str, peer: Peer, make_settings: Callable[[int], Any], writes: int,
                     restarts: int, stops: int = 0, stop_ms: float = 300.0) -> dict[str, Any]:
    port = free_port()
    await asyncio.to_thread(peer.start, port)
    link: ReconnectingLink = create_link(make_settings(port), 4)  # type: ignore[assignment]
    await link.start()
    if not await link.wait_connected(10):
        raise RuntimeError(f"{name}: no connection: {link.health().last_error}")
    seq = 0

    async def write(budget_ms: float) -> tuple[WriteOutcome, int, int]:
        nonlocal seq
        seq += 1
        t0 = time.monotonic_ns()
        r = await link.write_decision(
            DecisionRecord(seq % 4, seq, seq, Verdict.OK, 0, 990, 12, 1), t0 + int(budget_ms * 1e6))
        return r.outcome, t0, (r.acked_ns or time.monotonic_ns())

    for _ in range(50):  # warm-up
        await write(200)
    rtt: list[float] = []
    bad = 0
    for _ in range(writes):
        outcome, t0, t1 = await write(200)
        if outcome is WriteOutcome.ACKED:
            rtt.append((t1 - t0) / 1e6)
        else:
            bad += 1
    recov: list[float] = []
    for _ in range(restarts):
        peer.kill()
        await asyncio.sleep(0.2)  # the PLC stays down a while, frames keep failing meanwhile
        for _ in range(20):
            await write(30)
        start_task = asyncio.create_task(asyncio.to_thread(peer.start, port))
        up_at = None
        while True:
            if up_at is None and start_task.done():
                start_task.result()
                up_at = time.monotonic_ns()
            outcome, _, t1 = await write(30)
            if up_at is not None and outcome is WriteOutcome.ACKED:
                recov.append((t1 - up_at) / 1e6)
                break
            await asyncio.sleep(0.002)
    stalls: list[float] = []
    for _ in range(stops):
        for _ in range(2000):  # healthy before each stall
            if (await write(100))[0] is WriteOutcome.ACKED:
                break
            await asyncio.sleep(0.005)
        assert peer.proc is not None
        pid = peer.proc.pid
        os.kill(pid, signal.SIGSTOP)
        for _ in range(5000):
            if _stopped(pid):
                break
            await asyncio.sleep(0.001)
        t_stop = time.monotonic_ns()
        while time.monotonic_ns() - t_stop < stop_ms * 1e6:  # frames keep coming meanwhile
            await write(30)
            await asyncio.sleep(0.002)
        os.kill(pid, signal.SIGCONT)
        t_cont = time.monotonic_ns()
        while True:
            outcome, _, t1 = await write(30)
            if outcome is WriteOutcome.ACKED:
                stalls.append((t1 - t_cont) / 1e6)
                break
            if time.monotonic_ns() - t_cont > 10e9:
                stalls.append(math.inf)
                break
            await asyncio.sleep(0.002)
    await link.close()
    peer.kill()
    st = link.health().stats
    return {
        "peer": name, "writes": len(rtt), "not_acked": bad,
        "write_rtt_ms": {"p50": statistics.median(rtt), "p99": pct(rtt, 0.99), "max": max(rtt)},
        "recovery_ms": _summary(recov),
        "stall_recovery_ms": _summary(stalls),
        "stop_ms": stop_ms,
        "min_status_period_ms": link.min_status_period_ms,
        "stats": {k: getattr(st, k) for k in ("acked", "failed", "dropped_late", "unknown",
                                              "confirmed_applied", "confirmed_not_applied",
                                              "probes_failed")},
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--stops", type=int, default=20, help="SIGSTOP/SIGCONT cycles per peer")
    ap.add_argument("--stop-ms", type=float, default=300.0, help="how long each stall lasts")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", action="append", help="peer name(s) to run")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-plc-"))
    py = sys.executable
    peers: list[tuple[str, Peer, Callable[[int], Any], int]] = [
        ("modbus-sim", Peer(lambda p: [py, "-m", "plc.sim", "--port", str(p)]),
         lambda p: ModbusSettings(port=p), a.writes),
        ("modbus-libmodbus", Peer(lambda p: [str(native_peer.build(tmp)), str(p)]),
         lambda p: ModbusSettings(port=p), a.writes),
        ("modbus-pymodbustcp", Peer(lambda p: [py, str(PEERS / "pymodbustcp_server.py"), str(p)],
                                    "line"), lambda p: ModbusSettings(port=p), a.writes),
        ("s7-python", Peer(lambda p: [py, str(PEERS / "s7_server.py"), str(p), "100", "1024"],
                           "line"), lambda p: S7Settings(port=p), a.writes),
        ("s7-native", Peer(lambda p: [str(NATIVE_PY), str(PEERS / "s7_server.py"), str(p), "100",
                                      "1024"], "line"), lambda p: S7Settings(port=p), a.writes),
        ("opcua", Peer(lambda p: [py, str(PEERS / "opcua_server.py"), str(p)], "line"),
         lambda p: OpcUaSettings(endpoint=f"opc.tcp://127.0.0.1:{p}"), max(200, a.writes // 4)),
    ]
    results = []
    for name, peer, settings, n in peers:
        if a.only and name not in a.only:
            continue
        if name == "s7-native" and not NATIVE_PY.exists():
            print(f"{name}: skipped ({NATIVE_PY} missing: scripts/install_snap7_native.sh)")
            continue
        try:
            res = await bench_peer(name, peer, settings, n, a.restarts, a.stops, a.stop_ms)
        finally:
            peer.kill()
        results.append(res)
        w, r, z = res["write_rtt_ms"], res["recovery_ms"], res["stall_recovery_ms"]

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}"

        print(f"{name:18s} write p50 {w['p50']:.3f} ms  p99 {w['p99']:.3f} ms  max {w['max']:.2f}"
              f" ms  (n={res['writes']}, not acked {res['not_acked']})\n"
              f"{'':18s} recovery after restart: median {f(r['median'])} ms, max {f(r['max'])} ms"
              f" over {r['runs']}; after a {a.stop_ms:.0f} ms SIGSTOP: median {f(z['median'])}"
              f" ms, p99 {f(z['p99'])} ms, max {f(z['max'])} ms ({z['recovered']}/{z['runs']} "
              "recovered)", flush=True)
    out = {"machine": {"host": platform.node(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "platform": platform.platform()},
           "results": results}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
