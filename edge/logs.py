"""Structured logging: JSON lines under systemd (journald keeps them whole), readable on a TTY.

Three things make "every line in JSON mode is JSON" true, not just for our own log calls:

* the standard library's logging (pymodbus, snap7, librdkafka via confluent-kafka, botocore,
  harvesters, asyncio) is routed through structlog's ProcessorFormatter, so a third-party record
  renders exactly like ours (same keys, same timestamp);
* Python warnings and uncaught exceptions in threads go through logging too;
* with ``capture_stderr`` (the daemon), file descriptor 2 itself is replaced by a pipe: whatever a
  C library writes there (libjpeg's "Corrupt JPEG data", a GenTL producer's printf), or a child
  process that inherited it, reaches a reader thread that passes JSON lines through and wraps any
  other line as ``{"event": "stderr", "line": ...}``.

Per-frame conditions are not logged per frame: `Aggregator` logs the first occurrence at once and
then one summary per interval with counts by key ("log once when it goes, count in between").
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import structlog

_THIRD_PARTY_LEVELS = {
    # Chatty at INFO/DEBUG in ways that are per request or per connection attempt.
    "pymodbus": logging.WARNING,
    "asyncua": logging.WARNING,
    "snap7": logging.WARNING,
    "botocore": logging.WARNING,
    "aiobotocore": logging.WARNING,
    "urllib3": logging.WARNING,
    "harvesters": logging.WARNING,
    "matplotlib": logging.WARNING,
    "PIL": logging.WARNING,
}

_capture: _StderrCapture | None = None


def under_systemd() -> bool:
    return "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ


def wants_json(fmt: str) -> bool:
    return fmt == "json" or (fmt == "auto" and (under_systemd() or not sys.stderr.isatty()))


_MAX_FIELD = 2000
"""Longest string kept in a log field: a library's hex dump must not become a 10 KB line."""


def _truncate(
    _logger: Any, _method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    for key, value in event.items():
        if isinstance(value, str) and len(value) > _MAX_FIELD:
            event[key] = f"{value[:_MAX_FIELD]}... [{len(value) - _MAX_FIELD} chars cut]"
    return event


def _shared_processors() -> list[structlog.types.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        _truncate,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def configure_logging(level: str = "info", fmt: str = "auto", capture_stderr: bool = False) -> None:
    """Configure structlog and the standard library's logging to render the same way.

    ``capture_stderr`` (only the daemon process asks for it, and only in JSON mode) also wraps
    raw writes to file descriptor 2.
    """
    use_json = wants_json(fmt)
    if use_json and capture_stderr:
        _start_capture()
    out: Any = _capture.out if _capture is not None else _CurrentStderr()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = logging.getLevelName(level.upper())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_logger_name_as_field, *_shared_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, lvl in _THIRD_PARTY_LEVELS.items():
        logging.getLogger(name).setLevel(max(lvl, numeric))
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception
    structlog.configure(
        processors=[*_shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class _CurrentStderr:
    """Whatever `sys.stderr` is at the time of each write (a CLI run inside a test harness
    swaps it; a logger bound to the old, closed stream would fail every later log call)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _logger_name_as_field(
    _logger: Any, _method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    record = event.get("_record")
    if record is not None:
        event["logger"] = record.name
    return event


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    structlog.get_logger("edge.threads").error(
        "thread_crashed",
        thread=args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


class _StderrCapture:
    """fd 2 -> pipe -> reader thread -> the real stderr, wrapping non-JSON lines."""

    def __init__(self) -> None:
        self._real_fd = os.dup(2)
        self.out: TextIO = os.fdopen(os.dup(self._real_fd), "w", buffering=1, encoding="utf-8")
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._r = r
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        self._thread = threading.Thread(target=self._pump, name="stderr-json", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 65536)
            except OSError:
                return
            if not chunk:
                if buf:
                    self._emit(buf)
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._emit(line)
            if len(buf) > 65536:  # a writer that never ends its line: don't grow forever
                self._emit(buf)
                buf = b""

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        if not (text.startswith("{") and text.endswith("}") and _is_json(text)):
            text = json.dumps(
                {
                    "event": "stderr",
                    "text": text,
                    "level": "warning",
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                    + f".{int(time.time() * 1e6) % 1_000_000:06d}Z",
                }
            )
        with contextlib.suppress(OSError, ValueError):
            self.out.write(text + "\n")

    def close(self) -> None:
        """Give fd 2 back and let the reader drain what was written."""
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.dup2(self._real_fd, 2)  # closes the pipe's last write end we hold
        sys.stderr = sys.__stderr__
        self._thread.join(1.0)


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _start_capture() -> None:
    global _capture
    if _capture is None:
        _capture = _StderrCapture()
        atexit.register(_capture.close)


class Aggregator:
    """Rate-limited logging of a repeated condition (deadline misses, fail-safes by reason).

    The first occurrence of each key is logged at once (the operator sees the onset), later ones
    are counted and one ``<event>_summary`` line per interval reports the counts by key. A
    10-minute PLC outage at 60 fps then writes tens of lines, not 36,000.
    """

    def __init__(self, event: str, interval_s: float = 10.0, level: str = "warning") -> None:
        self.event = event
        self.interval_s = interval_s
        self._log = getattr(structlog.get_logger("edge.aggregate"), level)
        self._seen: set[str] = set()
        self._counts: collections.Counter[str] = collections.Counter()
        self._last_flush = time.monotonic()
        self.total = 0

    def note(self, key: str, **fields: Any) -> None:
        self.total += 1
        if key not in self._seen:
            if len(self._seen) < 256:  # bounded: keys are reasons/outcomes, not frame ids
                self._seen.add(key)
            self._log(self.event, key=key, first=True, **fields)
        else:
            self._counts[key] += 1
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.interval_s:
            return
        if self._counts:
            self._log(
                f"{self.event}_summary",
                interval_s=round(now - self._last_flush, 1),
                counts=dict(self._counts),
                total=sum(self._counts.values()),
            )
            self._counts.clear()
        else:
            self._seen.clear()  # a quiet interval: the next occurrence is an onset again
        self._last_flush = now
