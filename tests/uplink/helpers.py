"""Event and image factories shared by the uplink tests (plain data, no fakes of peers)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from uplink.event import PartEvent, new_event_id


def make_event(line: str, camera: str, part_id: int, verdict: str = "OK") -> PartEvent:
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return PartEvent(
        event_id=new_event_id(), line=line, camera=camera, part_id=part_id, sequence=part_id,
        frame_id=part_id, captured_at=now, decided_at=now, plc_acked_at=now, verdict=verdict,
        reason="score" if verdict != "OK" else "clean", model_id="demo-seg@1",
        detections=[{"class": "crack", "score": 0.91, "box": [10, 12, 40, 48], "area_px": 600,
                     "outline": [[10, 12], [40, 12], [40, 48], [10, 48]]}]
        if verdict != "OK" else [],
        latency_ms={"queue": 0.3, "preprocess": 2.1, "infer": 24.0, "postprocess": 3.0,
                    "decide": 0.1, "plc": 0.2, "total": 30.1},
    )


def make_image(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(h, w), dtype=np.uint8)
