"""The frame: the one object that crosses from the camera layer into the pipeline.

Timestamps: ``captured_ns`` is ``time.monotonic_ns()`` on the host when the buffer arrived. The
per-frame deadline is computed from it, so it must come from a clock that never jumps. The wall
clock time (``captured_wall_ns``) is for events and humans only.

Every frame a camera delivers is handed on, even one that cannot be inspected (too large, an
unsupported pixel format, empty): such a frame carries a ``problem`` and a tiny placeholder image,
so the line still makes exactly one decision for that part (a fail-safe REJECT naming the
problem) instead of losing it silently or crashing on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    camera_id: str
    frame_id: int
    """Device frame counter (or the source's own), unwrapped to a monotonically growing int."""
    part_id: int
    """The part this frame shows: the id given to ``CameraWorker.trigger(part_id)`` (PLC
    triggers), else the trigger count in triggered mode (one trigger = one part); equal to
    frame_id in free-run."""
    captured_ns: int
    """Host monotonic clock (time.monotonic_ns) when the buffer was delivered."""
    captured_wall_ns: int
    """Host wall clock (time.time_ns) at the same instant, for events."""
    image: np.ndarray
    """HxW (mono) or HxWx3 (BGR) uint8, contiguous, owned by the frame (not a driver buffer)."""
    pixel_format: str = "BGR8"
    device_timestamp_ns: int | None = None
    source_meta: dict[str, object] = field(default_factory=dict)
    problem: str | None = None
    """Why this frame cannot be inspected ("oversized 8000x8000 > 4096x4096", "unsupported pixel
    format ...", "empty image"); None for a good frame. A frame with a problem must get a
    fail-safe decision; its ``image`` is a placeholder (see camera.guard.PLACEHOLDER)."""
