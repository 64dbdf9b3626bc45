"""The decision record and the PLC link interface the daemon writes through.

The record is what one frame's verdict looks like on the wire, independent of the protocol; each
backend (Modbus, S7, OPC UA) encodes it per the documented map in docs/plc-register-map.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class Verdict(enum.IntEnum):
    """Codes written to the PLC. 0 is never written, so a zeroed record is never mistaken for OK."""

    OK = 1
    DEFECT = 2
    FAILSAFE_REJECT = 3


class FailsafeReason(enum.IntEnum):
    """Why a FAILSAFE_REJECT was written; the code travels in the record's reason word."""

    NONE = 0
    QUEUE_FULL = 1
    """The inference queue was full when the frame arrived."""
    OVERLOAD = 2
    """Admission control: the predicted completion was past the deadline."""
    QUEUE_WAIT = 3
    """The deadline guard fired while the frame still waited for inference."""
    INFERENCE_TIMEOUT = 4
    """The deadline guard fired during inference (slow or hung model)."""
    MODEL_ERROR = 5
    """Inference raised."""
    MODEL_DOWN = 6
    """No model loaded (load failed, or the model is marked down)."""
    LATE_ARRIVAL = 7
    """The frame reached the daemon with too little budget left."""
    PLC_RETRY = 8
    """The real verdict's write failed; the fail-safe was written in the reserved time."""
    SHUTDOWN = 9
    """The daemon stopped before the frame could be inspected."""
    TRIGGER_MISSED = 10
    """The PLC's trigger counter jumped by more than one: a part the daemon never saw."""
    NO_FRAME = 11
    """A trigger was fired but the camera delivered no frame in time."""
    RECIPE_UNKNOWN = 12
    """The PLC selected a recipe number the line config does not define (never a guess)."""
    BAD_FRAME = 13
    """A frame refused as unusable (undecodable, oversized)."""


class Alarm(enum.IntFlag):
    CAMERA_DOWN = 1 << 0
    MODEL_DOWN = 1 << 1
    FAILSAFE_ACTIVE = 1 << 2
    UPLINK_BACKLOG_HIGH = 1 << 3
    SPOOL_FAULT = 1 << 4
    PLC_RECOVERED = 1 << 5
    RECIPE_UNKNOWN = 1 << 6
    """The PLC selects a recipe number the line config does not define."""
    RESULTS_UNACKNOWLEDGED = 1 << 7
    """Acknowledged mode: the PLC is behind (or silent) in acknowledging records."""
    DRIFT = 1 << 8
    """The input data drifted away from what the model was validated on."""


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    camera_index: int
    """Slot of the camera in the PLC map (0-based), not its name."""
    sequence: int
    """uint32 per camera, +1 per written record; the PLC's "new result" strobe."""
    part_id: int
    """uint32 part/trigger id the decision belongs to."""
    verdict: Verdict
    defect_class: int
    """Class id of the deciding detection + 1; 0 = none."""
    score_permille: int
    """Deciding score x 1000 (0..1000)."""
    latency_ms: int
    """Capture -> decision, ms, saturating at 65535."""
    model_id: int
    """Numeric model id from the package manifest (uint16)."""
    reason: int = 0
    """Fail-safe reason code (FailsafeReason), 0 for real verdicts."""
    recipe: int = 0
    """uint16 recipe (product type) number the part was judged under; 0 = none/default."""


@dataclass(frozen=True, slots=True)
class PlcInputs:
    """One snapshot of what the PLC writes for the appliance (see docs/plc-register-map.md).

    Trigger counters, part ids (and the recipe, where the map keeps them together, as it does by
    default) come from ONE read request: the PLC writes a part's id before it increments the
    counter, so a snapshot that shows a new count also shows that part's id.
    """

    read_ns: int
    """time.monotonic_ns() when the answer arrived."""
    trigger_counts: tuple[int, ...] | None
    """Per camera slot, uint16 (wraps 65535 -> 0); None when not requested."""
    part_ids: tuple[int, ...] | None
    """Per camera slot, uint32, same snapshot as trigger_counts."""
    recipe: int | None
    """uint16 recipe number selected by the PLC; None when not requested."""
    acked_sequences: tuple[int, ...] | None
    """Per slot, uint32: the last sequence the PLC consumed (0 = none); None when not requested."""


U32_MASK = 0xFFFF_FFFF


def next_sequence(held: int) -> int:
    """The sequence after `held`: +1 in 1..2^32-1, skipping 0 (0 means "never written")."""
    return (int(held) & U32_MASK) % U32_MASK + 1


def unacked_count(last_written: int, acked: int) -> int:
    """How many records after `acked` up to `last_written` the PLC has not acknowledged.

    Both are uint32 sequences in 1..2^32-1 (0 = none). Wrap-aware: after 2^32-1 comes 1.
    ``acked == 0`` (the PLC never acknowledged anything) counts every sequence up to
    `last_written`. An ack "ahead" of `last_written` (e.g. a restarted daemon continuing from an
    older number) counts as 0: nothing is known to be outstanding.
    """
    last, ack = int(last_written) & U32_MASK, int(acked) & U32_MASK
    if last == 0:
        return 0
    if ack == 0:
        return last
    d = (last - ack) % U32_MASK
    return 0 if d >= 1 << 31 else d


class WriteOutcome(enum.Enum):
    ACKED = "acked"
    """The PLC acknowledged the write before the deadline."""
    DROPPED_LATE = "dropped_late"
    """Not sent: its deadline had passed (or would pass before the request could complete)."""
    FAILED = "failed"
    """Definitely not applied (connection refused/down, exception response)."""
    UNKNOWN = "unknown"
    """Timed out in flight: it may or may not have been applied; the link confirms by read-back."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    outcome: WriteOutcome
    acked_ns: int | None = None
    """time.monotonic_ns() when the acknowledgement arrived."""
    detail: str = ""
    sequence: int | None = None
    """The sequence number the record went out with, when the sender assigned it."""


@runtime_checkable
class PlcLink(Protocol):
    """One connection to one PLC; requests are serialised; timeouts come from the deadline.

    ``deadline_ns`` is an absolute ``time.monotonic_ns()`` instant: a request that cannot be
    completed before it is not sent (DROPPED_LATE). No method ever raises for a PLC fault: the
    outcome says what happened, and ``connected`` says whether the link is up.
    """

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None:
        """Begin connecting (and reconnecting with backoff) in the background; returns at once."""

    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> WriteResult: ...

    async def write_status(
        self, heartbeat: int, alarms: Alarm, deadline_ns: int
    ) -> WriteResult: ...

    async def read_part_id(self, camera_index: int, deadline_ns: int) -> int | None: ...

    async def read_inputs(
        self,
        deadline_ns: int,
        *,
        triggers: bool = True,
        recipe: bool = False,
        acks: bool = False,
    ) -> PlcInputs | None:
        """Trigger counters + part ids (+ recipe, + acks) of every slot; None on any failure."""

    async def read_sequences(self, deadline_ns: int) -> list[int] | None:
        """Per slot, the newest record sequence the PLC holds (0 = never written); None on
        failure. A (re)started daemon continues from ``next_sequence(held)``."""

    @property
    def min_status_period_ms(self) -> float:
        """The shortest heartbeat period this link can honour (the daemon floors heartbeat_ms)."""

    async def close(self) -> None: ...
