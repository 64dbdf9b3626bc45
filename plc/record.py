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


class Alarm(enum.IntFlag):
    CAMERA_DOWN = 1 << 0
    MODEL_DOWN = 1 << 1
    FAILSAFE_ACTIVE = 1 << 2
    UPLINK_BACKLOG_HIGH = 1 << 3
    SPOOL_FAULT = 1 << 4
    PLC_RECOVERED = 1 << 5


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

    async def close(self) -> None: ...
