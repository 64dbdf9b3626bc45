"""Where a batch is inferred: in a thread of the daemon, or in a worker process of its own.

A process is the default on a line. The event loop that keeps the deadlines shares the GIL with
every thread of the daemon; a model whose decode is Python-heavy (hundreds of candidates on a
large frame) or a driver that spins can delay the deadline timers. In a process it cannot. And a
hung thread can never be stopped, while a hung process is killed and respawned: the deadline guard
fail-safes its frames meanwhile, and the line is back within a model load instead of a daemon
restart. Threads remain for tests with injected faults and for boxes where memory is very tight.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np
import structlog

from camera.frame import Frame
from edge.decision import Decision, DecisionRules
from edge.logs import configure_logging
from models.config import ModelSettings
from models.loader import load_detector
from models.types import Detector, ModelError, ModelInfo

log = structlog.get_logger(__name__)

_MS = 1_000_000


@dataclass(slots=True)
class BatchOutput:
    decisions: list[Decision]
    stages_ms: dict[str, float]


class BatchRunner(Protocol):
    """Runs whole batches; ``run`` blocks (it is called from an inference thread)."""

    def run(self, frames: list[Frame], masks: bool) -> BatchOutput: ...

    def kill(self) -> bool:
        """Stop a hung batch if the runner can (True if it did)."""
        ...

    def close(self) -> None: ...


def run_batch(
    detector: Detector, rules: DecisionRules, frames: list[Frame], masks: bool
) -> BatchOutput:
    """Every CPU-heavy step of one batch, timed per stage."""
    t0 = time.perf_counter_ns()
    prepared = [detector.preprocess(f.image) for f in frames]
    t1 = time.perf_counter_ns()
    step = max(1, detector.max_batch)
    chunks = [prepared[i : i + step] for i in range(0, len(prepared), step)]
    outputs = [
        detector.infer(c[0].tensor if len(c) == 1 else np.concatenate([p.tensor for p in c]))
        for c in chunks
    ]
    t2 = time.perf_counter_ns()
    detections = [
        d
        for c, out in zip(chunks, outputs, strict=True)
        for d in detector.postprocess(out, c, masks=masks)
    ]
    t3 = time.perf_counter_ns()
    decisions = [
        rules.decide(d, f.image.shape, f.camera_id) for d, f in zip(detections, frames, strict=True)
    ]
    t4 = time.perf_counter_ns()
    return BatchOutput(
        decisions,
        {
            "preprocess": (t1 - t0) / _MS,
            "infer": (t2 - t1) / _MS,
            "postprocess": (t3 - t2) / _MS,
            "decide": (t4 - t3) / _MS,
        },
    )


class ThreadRunner:
    """Inference in the calling thread, on a detector owned by the daemon process."""

    def __init__(self, detector: Detector, rules: DecisionRules) -> None:
        self.detector = detector
        self.rules = rules
        self.info = detector.info

    def run(self, frames: list[Frame], masks: bool) -> BatchOutput:
        return run_batch(self.detector, self.rules, frames, masks)

    def kill(self) -> bool:
        return False  # a thread cannot be stopped; the guard keeps fail-safing its frames

    def close(self) -> None:
        self.detector.close()


def _child_main(
    conn: Connection, settings: ModelSettings, rules: DecisionRules, logging: tuple[str, str]
) -> None:
    """The worker process: load the model once, then serve batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    configure_logging(*logging)
    try:
        detector = load_detector(settings)
    except Exception as exc:  # reported to the parent, which keeps the line on fail-safes
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", detector.info))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        frames, masks = msg
        try:
            conn.send(("ok", run_batch(detector, rules, frames, masks)))
        except Exception as exc:  # one bad batch is one set of fail-safes, not a dead worker
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    detector.close()


class ProcessRunner:
    """Inference in a dedicated process, respawned on demand after a crash or a kill."""

    def __init__(
        self,
        settings: ModelSettings,
        rules: DecisionRules,
        logging: tuple[str, str] = ("info", "auto"),
        load_timeout_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.logging = logging
        self.load_timeout_s = load_timeout_s
        self._ctx = mp.get_context("spawn")  # fork would copy the daemon's threads' locks
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self.info: ModelInfo = self._spawn()
        self.respawns = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> ModelInfo:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_child_main,
            args=(child, self.settings, self.rules, self.logging),
            name="edge-infer",
            daemon=True,
        )
        proc.start()
        child.close()
        if not parent.poll(self.load_timeout_s):
            proc.kill()
            raise ModelError(f"inference process did not load the model in {self.load_timeout_s}s")
        try:
            kind, payload = parent.recv()
        except EOFError:
            proc.join(1)
            code = proc.exitcode
            raise ModelError(f"inference process died while loading (exit {code})") from None
        if kind != "ready":
            proc.join(5)
            raise ModelError(f"inference process could not load the model: {payload}")
        self._proc, self._conn = proc, parent
        log.info("inference_process_ready", pid=proc.pid, model=payload.model_id)
        info: ModelInfo = payload
        return info

    def run(self, frames: list[Frame], masks: bool) -> BatchOutput:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._reap()
                self.respawns += 1
                log.warning("inference_process_respawn", respawns=self.respawns)
                self._spawn()
            assert self._conn is not None
            try:
                self._conn.send((frames, masks))
                kind, payload = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                code = self._proc.exitcode if self._proc is not None else None
                self._reap()
                raise ModelError(f"inference process died (exit {code}): {exc!r}") from None
        if kind != "ok":
            raise ModelError(payload)
        out: BatchOutput = payload
        return out

    def kill(self) -> bool:
        """Kill a hung worker; the blocked ``run`` then fails and the next one respawns it."""
        proc = self._proc
        if proc is None or not proc.is_alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        log.error("inference_process_killed", pid=proc.pid, reason="hung")
        return True

    def _reap(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(1)
        self._proc, self._conn = None, None

    def close(self) -> None:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send(None)
        proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
        conn.close()
        self._proc, self._conn = None, None
