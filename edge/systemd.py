"""sd_notify: READY, WATCHDOG, STATUS and STOPPING over $NOTIFY_SOCKET.

The protocol is one datagram per message; a missing socket (not under systemd) makes every call a
no-op, so the daemon behaves the same in a terminal, in tests and under Type=notify.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_s: float | None = None
        if usec and (pid is None or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> None:
        if self._sock is None or self._addr is None:
            return
        with contextlib.suppress(OSError):  # systemd gone (shutdown): nothing useful to do
            self._sock.sendto(message.encode(), self._addr)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
