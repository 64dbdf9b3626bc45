"""The per-part event: a versioned, JSON-serialisable record (schema: uplink/event.schema.json).

Version 2 adds what the PLC handshake, recipes and the model lifecycle need (sequence may be None,
recipe, model_digest, kind/canary/amends/changes, image_dropped). Every new field has a default, so
callers written for version 1 still build valid events; version-1 rows already in a spool are
forwarded as they were stored (consumers read `schema_version`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 2
EVENT_KINDS = ("part", "shadow", "amendment")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_event_id(wall_ns: int | None = None) -> str:
    """A ULID (48-bit ms time + 80 random bits, Crockford base32): unique and time-sortable."""
    ms = (time.time_ns() if wall_ns is None else wall_ns) // 1_000_000
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


@dataclass(slots=True)
class PartEvent:
    event_id: str
    """ULID-like: sortable by time, unique; consumers dedupe on it."""
    line: str
    camera: str
    part_id: int
    sequence: int | None
    """The record sequence that went on the wire to the PLC; None = no record was written."""
    frame_id: int
    captured_at: str
    """RFC 3339 UTC with microseconds."""
    decided_at: str
    plc_acked_at: str | None
    verdict: str
    """"OK" | "DEFECT" | "FAILSAFE_REJECT"."""
    reason: str
    model_id: str
    detections: list[dict[str, Any]] = field(default_factory=list)
    """[{"class": str, "score": float, "box": [x1,y1,x2,y2], "area_px": int,
    "outline": [[x,y],...]}]"""
    latency_ms: dict[str, float] = field(default_factory=dict)
    """Per stage: queue, preprocess, infer, postprocess, decide, plc, total."""
    plc_outcome: str = "acked"
    image_ref: str | None = None
    """Object key once an image is attached (defects always, OK sampled)."""
    schema_version: int = SCHEMA_VERSION
    recipe: int | None = None
    """Product recipe number that decided the part (None: no recipes configured)."""
    model_digest: str | None = None
    """Digest of the model package that decided (model_id stays "name:version")."""
    kind: Literal["part", "shadow", "amendment"] = "part"
    """part: the verdict the PLC got; shadow: a candidate model's opinion (never sent to the PLC);
    amendment: a correction of the event named by `amends`."""
    canary: bool = False
    """The part was decided by a canary model."""
    amends: str | None = None
    """event_id of the event an amendment corrects."""
    changes: dict[str, Any] | None = None
    """An amendment's corrected fields (the same values are also set on this event)."""
    image_dropped: bool = False
    """The image should have been kept but was dropped (image queue byte bound reached)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "event_id": self.event_id,
            "line": self.line,
            "camera": self.camera,
            "part_id": self.part_id,
            "sequence": self.sequence,
            "frame_id": self.frame_id,
            "captured_at": self.captured_at,
            "decided_at": self.decided_at,
            "plc_acked_at": self.plc_acked_at,
            "verdict": self.verdict,
            "reason": self.reason,
            "plc_outcome": self.plc_outcome,
            "model_id": self.model_id,
            "detections": self.detections,
            "latency_ms": self.latency_ms,
            "image_ref": self.image_ref,
            "recipe": self.recipe,
            "model_digest": self.model_digest,
            "kind": self.kind,
            "canary": self.canary,
            "amends": self.amends,
            "changes": self.changes,
            "image_dropped": self.image_dropped,
        }

    def to_json(self) -> str:
        """Compact JSON, the exact bytes the spool stores and Kafka carries."""
        return json.dumps(
            self.to_dict(), separators=(",", ":"), ensure_ascii=False, default=_plain
        )


def _plain(obj: Any) -> Any:
    """numpy scalars/arrays slip into detections easily; store them as plain JSON values."""
    for attr in ("tolist", "item"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"event field value of type {type(obj).__name__} is not JSON-serialisable")

