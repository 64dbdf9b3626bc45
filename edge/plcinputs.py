"""What the PLC tells the appliance: parts to inspect, their ids, the recipe, what it consumed.

One read per poll (default every 5 ms, through the EDF queue, so a record due sooner still goes
first) returns every camera slot's trigger counter and part id as one snapshot, plus the recipe
register and the acknowledged sequences when those are configured (docs/plc-register-map.md).

PLC-triggered cameras: each increment of a slot's counter is one part. Its id and the recipe
latched in the same snapshot travel with it; the camera's software trigger is fired and the frame
that answers it carries the id. The part's budget counts from the snapshot that announced it (so
a slow camera cannot make the appliance later than the PLC's own watchdog), and a part whose frame
does not come in time, or whose trigger the camera refused, gets a FAIL-SAFE record (NO_FRAME).
A counter jump of more than one means parts the appliance never saw: one FAIL-SAFE record each
(TRIGGER_MISSED, part id 0 since their ids were overwritten). Never silence.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from pydantic import BaseModel, ConfigDict, Field

from camera.frame import Frame
from camera.worker import CameraWorker
from edge.plcqueue import DeadlineOrderedLink
from edge.recipes import RecipeBook
from plc.record import FailsafeReason, PlcInputs, unacked_count

log = structlog.get_logger(__name__)

_U16 = 0x10000
MAX_JUMP = 64
"""A counter that moved further than this between two polls was reset (PLC restarted or its
program reloaded), not incremented: the watcher re-bases instead of inventing thousands of
missed parts."""
_MAX_PENDING = 256


class PlcInputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    poll_ms: float = Field(default=5.0, ge=1.0, le=1000.0)
    """How often the PLC's inputs are read (one request for every slot)."""
    unacked_alarm: int = Field(default=4, ge=1, le=1_000_000)
    """Acknowledged mode: records not yet acknowledged by the PLC that raise the alarm bit."""


FailPart = Callable[[str, int, FailsafeReason, int | None, int | None], None]
"""(camera id, part id, reason, announced at ns, recipe) -> writes the part's fail-safe record."""


@dataclass(slots=True)
class _Part:
    part_id: int
    recipe: int | None
    announced_ns: int
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Slot:
    camera_id: str
    worker: CameraWorker | None
    """The PLC-triggered worker of this slot (None: not triggered by the PLC)."""
    latch_part_id: bool = False
    """Hardware-triggered camera whose frames take the PLC's part id when they arrive."""
    count: int | None = None
    pending: collections.deque[_Part] = field(default_factory=collections.deque)
    part_id: int = 0
    """The slot's part id in the latest snapshot (hardware-triggered cameras latch it)."""


class PlcInputWatcher:
    def __init__(
        self,
        plc: DeadlineOrderedLink,
        settings: PlcInputSettings,
        recipes: RecipeBook,
        slots: dict[int, tuple[str, CameraWorker | None, bool]],
        fail_part: FailPart,
        budget_ns: int,
        reserve_ns: int,
        *,
        read_triggers: bool,
        read_acks: bool,
        read_timeout_ms: float = 50.0,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.plc = plc
        self.settings = settings
        self.recipes = recipes
        self.slots = {i: _Slot(cam, w, latch) for i, (cam, w, latch) in slots.items()}
        self._by_camera = {s.camera_id: s for s in self.slots.values()}
        self.fail_part = fail_part
        self.budget_ns = budget_ns
        self.reserve_ns = reserve_ns
        self.read_triggers = read_triggers
        self.read_recipe = recipes.plc_selects
        self.read_acks = read_acks
        self.read_timeout_ns = int(read_timeout_ms * 1e6)
        """A poll may wait this long for its answer: a 5 ms budget would turn a PLC that is a
        little slow for a moment into a dropped connection (the link drops it on a timeout)."""
        self._clock_ns = clock_ns
        self.acked: dict[int, int] = {}
        self.unacked: dict[int, int] = {}
        self.polls_ok = 0
        self.polls_failed = 0
        self.parts = 0
        self.missed = 0
        self.no_frame = 0
        self.late_frames = 0
        self.resets = 0
        self.last_snapshot_ns = 0

    @property
    def needed(self) -> bool:
        return self.read_triggers or self.read_recipe or self.read_acks

    async def run(self) -> None:
        period_ns = int(self.settings.poll_ms * 1e6)
        next_ns = self._clock_ns()
        was_ok = True
        while True:
            inputs = await self.plc.read_inputs(
                self._clock_ns() + max(period_ns, self.read_timeout_ns),
                triggers=self.read_triggers,
                recipe=self.read_recipe,
                acks=self.read_acks,
            )
            if inputs is None:
                self.polls_failed += 1
                if was_ok:
                    log.warning("plc_inputs_unreadable", polls_ok=self.polls_ok)
                was_ok = False
                # Counters seen again after an outage are compared with the last good snapshot:
                # parts announced meanwhile read as a jump (TRIGGER_MISSED), as they should.
            else:
                if not was_ok or not self.polls_ok:
                    log.info("plc_inputs_readable", first=not self.polls_ok)
                was_ok = True
                self.polls_ok += 1
                self.apply(inputs)
            next_ns += period_ns
            delay = (next_ns - self._clock_ns()) / 1e9
            if delay < -self.settings.poll_ms / 1000:
                next_ns = self._clock_ns()  # fell behind: don't burst
            await asyncio.sleep(max(0.0, delay))

    # ---- a snapshot -----------------------------------------------------------------------------

    def apply(self, inputs: PlcInputs) -> None:
        self.last_snapshot_ns = inputs.read_ns
        if inputs.recipe is not None:
            self.recipes.select(inputs.recipe, by="plc")
        if inputs.part_ids is not None:
            for i, slot in self.slots.items():
                if i < len(inputs.part_ids):
                    slot.part_id = inputs.part_ids[i]
        if inputs.trigger_counts is not None:
            for i, slot in self.slots.items():
                if slot.worker is not None and i < len(inputs.trigger_counts):
                    self._count(slot, inputs.trigger_counts[i], inputs.read_ns)
        if inputs.acked_sequences is not None:
            written = self.plc.last_sequences()
            for i in self.slots:
                if i < len(inputs.acked_sequences):
                    self.acked[i] = inputs.acked_sequences[i]
                    self.unacked[i] = unacked_count(written.get(i, 0), self.acked[i])

    def _count(self, slot: _Slot, count: int, read_ns: int) -> None:
        prev, slot.count = slot.count, count
        if prev is None:
            return  # the first snapshot is the baseline: parts announced before we ran are past
        jump = (count - prev) % _U16
        if jump == 0:
            return
        if jump > MAX_JUMP:
            self.resets += 1
            log.warning("plc_trigger_counter_reset", camera=slot.camera_id, previous=prev,
                        now=count, fix="expected after a PLC restart; otherwise check the program")
            return
        for _ in range(jump - 1):
            self.missed += 1
            self.fail_part(slot.camera_id, 0, FailsafeReason.TRIGGER_MISSED, read_ns, None)
        self._announce(slot, slot.part_id, read_ns)

    def _announce(self, slot: _Slot, part_id: int, read_ns: int) -> None:
        assert slot.worker is not None
        self.parts += 1
        part = _Part(part_id, self.recipes.for_part(), read_ns)
        if not slot.worker.trigger(part_id):
            self.no_frame += 1
            self.fail_part(slot.camera_id, part_id, FailsafeReason.NO_FRAME, read_ns, part.recipe)
            return
        loop = asyncio.get_running_loop()
        part.timer = loop.call_at(
            (read_ns + self.budget_ns - self.reserve_ns) / 1e9, self._no_frame, slot, part
        )
        slot.pending.append(part)
        while len(slot.pending) > _MAX_PENDING:  # bounded; the timers fail-safe them anyway
            self._no_frame(slot, slot.pending[0])

    def _no_frame(self, slot: _Slot, part: _Part) -> None:
        with contextlib.suppress(ValueError):
            slot.pending.remove(part)
            if part.timer is not None:
                part.timer.cancel()
            self.no_frame += 1
            self.fail_part(slot.camera_id, part.part_id, FailsafeReason.NO_FRAME,
                           part.announced_ns, part.recipe)

    # ---- frames and lost triggers (event loop) ----------------------------------------------

    def frame_arrived(self, frame: Frame) -> tuple[Frame, int | None] | None:
        """The frame as the pipeline should see it and its recipe; None to drop it (its part
        was already fail-safed: a second record for one part must never go out)."""
        slot = self._by_camera.get(frame.camera_id)
        if slot is None or (slot.worker is None and not slot.latch_part_id):
            return frame, self.recipes.for_part()
        if slot.worker is None:  # hardware trigger: latch the PLC's part id now
            return dataclasses.replace(frame, part_id=slot.part_id), self.recipes.for_part()
        while slot.pending and slot.pending[0].part_id != frame.part_id:
            self._no_frame(slot, slot.pending[0])  # its frame can no longer come (FIFO)
        if not slot.pending:
            self.late_frames += 1
            return None
        part = slot.pending.popleft()
        if part.timer is not None:
            part.timer.cancel()
        captured = min(frame.captured_ns, part.announced_ns)
        return dataclasses.replace(frame, captured_ns=captured), part.recipe

    def trigger_lost(self, camera_id: str, part_id: int, reason: str) -> None:
        slot = self._by_camera.get(camera_id)
        if slot is None:
            return
        part = next((p for p in slot.pending if p.part_id == part_id), None)
        if part is not None:
            log.info("plc_part_lost_at_camera", camera=camera_id, part=part_id, reason=reason)
            self._no_frame(slot, part)

    def stats(self) -> dict[str, object]:
        return {
            "polls_ok": self.polls_ok,
            "polls_failed": self.polls_failed,
            "parts": self.parts,
            "missed_triggers": self.missed,
            "no_frame": self.no_frame,
            "late_frames": self.late_frames,
            "counter_resets": self.resets,
            "pending": {s.camera_id: len(s.pending) for s in self.slots.values()},
            "acked": dict(self.acked),
            "unacked": dict(self.unacked),
        }
