"""The running daemon's control API: JSON lines over a Unix socket (no TCP, by design).

`edge recipe set`, `edge model activate|rollback|shadow|promote|status` talk to the daemon of a
line through this socket, found from the line's YAML. A Unix socket is reachable only on the box
and only by the users its file mode allows (0660, group of the service), so changing a running
line's model needs the same rights as editing its config: nothing listens on the network.

One request per line, one answer per line: {"cmd": "...", "args": {...}} ->
{"ok": true, "result": ...} or {"ok": false, "error": "what is wrong and what to do"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict

log = structlog.get_logger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 1 << 20


class ControlSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    socket: Path | None = None
    """Unix socket path; None: `<state_dir>/control.sock` (/var/lib/edge/state/control.sock
    with configs/line.example.yaml)."""
    group: str | None = None
    """Group that may use the socket (mode 0660); None: the daemon's own group."""


class ControlError(Exception):
    """A refused command: the message says what is wrong and what to do."""


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler], group: str | None = None) -> None:
        self.path = path
        self.handlers = handlers
        self.group = group
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()  # a stale socket of a previous run (one daemon per line)
        self._server = await asyncio.start_unix_server(
            self._client, path=str(self.path), limit=MAX_REQUEST
        )
        os.chmod(self.path, 0o660)
        if self.group:
            try:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            except (KeyError, PermissionError) as exc:
                log.error("control_socket_group", group=self.group, error=str(exc))
        log.info("control_socket_ready", path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        with contextlib.suppress(FileNotFoundError, OSError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await self._answer(line), default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd, args = req["cmd"], req.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"malformed request ({exc}); send one JSON object per "
                                          "line: {\"cmd\": ..., \"args\": {...}}"}
        handler = self.handlers.get(cmd)
        if handler is None:
            known = sorted(self.handlers)
            return {"ok": False, "error": f"unknown command {cmd!r}; known: {known}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a command must never take the daemon down
            log.exception("control_command_failed", cmd=cmd)
            return {"ok": False, "error": f"{cmd} failed: {type(exc).__name__}: {exc}"}


def call(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 300.0) -> Any:
    """Send one command to a running daemon; its result, or ControlError with its message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(
                f"no daemon listening on {path} ({exc.strerror}); is the line running "
                "(`systemctl status edge`) and is this its config?"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: run as a member of the service's group"
            ) from None
        s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError("the daemon closed the connection without an answer")
            buf += chunk
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer.get("result")
