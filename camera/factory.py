"""Settings -> source, importing vendor stacks only for the backend a line actually uses.

harvesters (and its GenTL producers) and PyGObject/Aravis are heavy, native and optional: a line
that only replays files, or a CI job without them, must never need them at import time.
"""

from __future__ import annotations

from camera.config import (
    AravisCameraSettings,
    CameraSettings,
    GenicamCameraSettings,
    ReplayCameraSettings,
)
from camera.source import CameraConfigError, FrameSource


def open_source(settings: CameraSettings) -> FrameSource:
    """Build the (not yet opened) source for one camera; ``CameraWorker`` opens and reopens it."""
    if isinstance(settings, ReplayCameraSettings):
        from camera.replay import ReplaySource

        return ReplaySource(settings)
    if isinstance(settings, GenicamCameraSettings):
        try:
            from camera.genicam import GenicamSource
        except ImportError as exc:
            raise CameraConfigError(
                f"camera {settings.id}: type 'genicam' needs harvesters "
                f"(pip install 'harvesters>=1.4.3'): {exc}"
            ) from exc
        return GenicamSource(settings)
    if isinstance(settings, AravisCameraSettings):
        try:
            from camera.aravis import AravisSource
        except ImportError as exc:
            raise CameraConfigError(
                f"camera {settings.id}: type 'aravis' needs PyGObject and Aravis 0.8 "
                f"(apt-get install python3-gi gir1.2-aravis-0.8; see docs/camera.md): {exc}"
            ) from exc
        return AravisSource(settings)
    raise CameraConfigError(f"unknown camera settings type {type(settings).__name__}")


make_source = open_source
