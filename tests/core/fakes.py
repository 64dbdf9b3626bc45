"""In-process fakes for pipeline unit tests (the integration tests use real peers)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from camera.frame import Frame
from edge.decision import DecisionRules, DecisionSettings
from edge.inference import ThreadWorker, Worker
from edge.pool import InferencePool, PoolModel
from models.types import Detection, ModelError, ModelInfo, Prepared
from plc.record import Alarm, DecisionRecord, WriteOutcome, WriteResult


class FakeDetector:
    """Marks a frame DEFECT when its top-left pixel is 255; behaviour switchable per test."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.info = ModelInfo("fake", "1", ("scratch", "pit"), (32, 32), "0" * 64, "fake")
        self.max_batch = 8
        self.delay_s = delay_s
        self.fail = False
        self.hang = threading.Event()  # set = hang until released
        self.release = threading.Event()
        self.calls = 0

    def preprocess(self, image: np.ndarray) -> Prepared:
        return Prepared(np.zeros((1, 3, 32, 32), np.float32), image.shape[:2], 1.0, (0.0, 0.0))

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self.calls += 1
        if self.fail:
            raise ModelError("injected failure")
        if self.hang.is_set():
            self.release.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        return [batch]

    def postprocess(
        self,
        outputs: list[np.ndarray],
        prepared: Sequence[Prepared],
        *,
        masks: bool = True,
        outlines: bool = True,
    ) -> list[list[Detection]]:
        return [[] for _ in prepared]

    def close(self) -> None:
        self.release.set()


@dataclass
class Write:
    record: DecisionRecord
    deadline_ns: int
    sent_ns: int
    acked_ns: int | None
    outcome: WriteOutcome


@dataclass
class FakeLink:
    """Acks after `delay_s`; refuses what cannot finish before the deadline, like the real links."""

    delay_s: float = 0.0
    fail_next: int = 0
    writes: list[Write] = field(default_factory=list)
    status_writes: int = 0
    down_until_ns: int = 0
    """Until then the link is 'reconnecting': writes fail at once, definitely not applied."""

    @property
    def connected(self) -> bool:
        return time.monotonic_ns() >= self.down_until_ns

    async def start(self) -> None:
        return None

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult:
        now = time.monotonic_ns()
        if now + self.delay_s * 1e9 > deadline_ns:
            self.writes.append(Write(record, deadline_ns, now, None, WriteOutcome.DROPPED_LATE))
            return WriteResult(WriteOutcome.DROPPED_LATE)
        if not self.connected:
            self.writes.append(Write(record, deadline_ns, now, None, WriteOutcome.FAILED))
            return WriteResult(WriteOutcome.FAILED, detail="not connected")
        if self.fail_next:
            self.fail_next -= 1
            self.writes.append(Write(record, deadline_ns, now, None, WriteOutcome.FAILED))
            return WriteResult(WriteOutcome.FAILED, detail="injected")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        acked = time.monotonic_ns()
        self.writes.append(Write(record, deadline_ns, now, acked, WriteOutcome.ACKED))
        return WriteResult(WriteOutcome.ACKED, acked)

    async def write_status(self, heartbeat: int, alarms: Alarm, deadline_ns: int) -> WriteResult:
        self.status_writes += 1
        return WriteResult(WriteOutcome.ACKED, time.monotonic_ns())

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None:
        return None

    async def close(self) -> None:
        return None


def make_frame(camera: str, frame_id: int, *, age_ms: float = 0.0) -> Frame:
    now = time.monotonic_ns() - int(age_ms * 1e6)
    return Frame(
        camera_id=camera,
        frame_id=frame_id,
        part_id=frame_id,
        captured_ns=now,
        captured_wall_ns=time.time_ns(),
        image=np.zeros((48, 64), np.uint8),
        pixel_format="Mono8",
    )


async def thread_pool(
    det: FakeDetector | object,
    *,
    workers: int = 1,
    depth: int = 2,
    hang_s: float = 2.0,
    error_threshold: int = 3,
    plc_model_id: int = 7,
) -> tuple[InferencePool, PoolModel]:
    """An inference pool of thread workers over one in-process detector (unit tests)."""
    info = det.info  # type: ignore[attr-defined]
    rules = {0: DecisionRules(DecisionSettings(), info.classes)}

    def factory(name: str, on_death: Callable[[Worker, str], None], nice: int) -> Worker:
        return ThreadWorker(name, lambda: det, rules, on_death=on_death)  # type: ignore[arg-type,return-value]

    pool = InferencePool(
        "test", factory, workers=workers, depth=depth, hang_s=hang_s,
        error_threshold=error_threshold,
    )
    started = await pool.start()
    return pool, PoolModel(started, plc_model_id, "0" * 64)
