"""What the daemon needs from a camera: a blocking frame source driven from its own thread.

Sources block (harvesters' fetch, Aravis' pop_buffer, a paced replay); the daemon runs each one in
a dedicated thread through :class:`camera.worker.CameraWorker`, which owns reopen-with-backoff and
stall detection, so every backend only has to get open/read/close right.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from camera.frame import Frame


class CameraError(Exception):
    """A camera fault the worker recovers from by closing and reopening the source."""


class CameraConfigError(CameraError):
    """A setting the device rejects or lacks; reopening will not help, so it is reported as-is."""


@runtime_checkable
class FrameSource(Protocol):
    camera_id: str

    def open(self) -> None:
        """Connect and start acquisition. Raise CameraError (or a subclass) on failure."""

    def read(self, timeout_s: float) -> Frame | None:
        """Block for the next frame; None on timeout (no frame yet), CameraError on fault.

        A finite source (replay without loop) raises EOFError when exhausted.
        """

    def trigger(self) -> None:
        """Fire a software trigger (triggered mode); a no-op for free-running sources."""

    def close(self) -> None:
        """Stop acquisition and release the device; must be safe to call twice."""
