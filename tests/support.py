"""Helpers shared by fixtures that start real peers: free ports, and processes stopped by PID."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the peer binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.01
) -> None:
    """Poll a condition (a readiness probe, not a sleep standing in for synchronisation)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@contextlib.contextmanager
def spawned(
    cmd: Sequence[str],
    *,
    ready: Callable[[], bool],
    what: str,
    timeout_s: float = 20.0,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a peer in its own process group, wait for readiness, stop it by PID afterwards."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        list(cmd),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:

        def _ready() -> bool:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log else ""
                raise RuntimeError(f"{what} exited with {proc.returncode} before ready\n{tail}")
            return ready()

        wait_until(_ready, timeout_s, what)
        yield proc
    finally:
        stop_pid(proc)
        if log:
            out.close()  # type: ignore[union-attr]


def stop_pid(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM then SIGKILL the process group we started (never anything else)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace_s)


_MBPOLL_LINE = re.compile(r"^\[(\d+)\]:\s+0x([0-9A-Fa-f]{4})\s*$")


def mbpoll_write(port: int, address: int, values: list[int], unit: int = 1) -> None:
    """Holding registers written by Debian's mbpoll (libmodbus), as a PLC program or an
    operator's tool would: an independent Modbus client."""
    exe = shutil.which("mbpoll")
    assert exe, "mbpoll missing: apt-get install mbpoll"
    subprocess.run(
        [exe, "-m", "tcp", "-p", str(port), "-a", str(unit), "-0", "-r", str(address),
         "-t", "4", "-1", "127.0.0.1", *(str(v) for v in values)],
        check=True,
        capture_output=True,
        timeout=10,
    )


def mbpoll_read(port: int, address: int, count: int, unit: int = 1) -> list[int]:
    """Holding registers read by Debian's mbpoll (libmodbus), an independent Modbus client."""
    exe = shutil.which("mbpoll")
    assert exe, "mbpoll missing: apt-get install mbpoll"
    out = subprocess.run(
        [
            exe,
            "-m",
            "tcp",
            "-p",
            str(port),
            "-a",
            str(unit),
            "-0",
            "-r",
            str(address),
            "-c",
            str(count),
            "-t",
            "4:hex",
            "-1",
            "-o",
            "2",
            "127.0.0.1",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    regs = {
        int(m.group(1)): int(m.group(2), 16)
        for line in out.splitlines()
        if (m := _MBPOLL_LINE.match(line.strip()))
    }
    assert sorted(regs) == list(range(address, address + count)), out
    return [regs[a] for a in range(address, address + count)]
