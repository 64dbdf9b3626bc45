"""The last check before a frame leaves the camera thread: it must be something the line can use.

Backends differ in what can go wrong (a replay folder with a stray 8000x8000 photo, a device
switched to a pixel format the converter does not know, a zero-sized buffer), but the rule is
one: never raise into the daemon and never drop a part silently. A frame the model cannot take is
handed on with ``Frame.problem`` set and its pixels replaced by :data:`PLACEHOLDER`, so the daemon
writes one fail-safe REJECT for that part and memory is not held for pixels nobody will look at.
An oversized frame is refused or downscaled here, in the camera thread, per ``max_frame``: the
cost of one huge frame then lands on that camera alone, not on the line's shared inference queue.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import cv2
import numpy as np

from camera.config import MaxFrameSettings
from camera.frame import Frame

PLACEHOLDER = np.zeros((8, 8), np.uint8)
"""The image of a frame with a problem: tiny, read-only, shared."""
PLACEHOLDER.flags.writeable = False

Verdict = Literal["ok", "refused", "downscaled"]


def problem_frame(frame: Frame, problem: str) -> Frame:
    """``frame`` marked unusable: pixels dropped, the original shape kept for the event."""
    meta = dict(frame.source_meta)
    img = frame.image
    if isinstance(img, np.ndarray):
        meta["original_shape"] = list(img.shape)
        meta["original_dtype"] = str(img.dtype)
    return dataclasses.replace(
        frame, image=PLACEHOLDER, pixel_format="Mono8", problem=problem, source_meta=meta
    )


def image_problem(img: object) -> str | None:
    """Why ``img`` is not a uint8 HxW (Mono8) or HxWx3 (BGR8) array; None when it is."""
    if not isinstance(img, np.ndarray):
        return f"unsupported image type {type(img).__name__} (need a numpy array)"
    if img.size == 0:
        return f"empty image (shape {tuple(img.shape)})"
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        return (
            f"unsupported pixel format: {img.dtype} array of shape {tuple(img.shape)} (need "
            "uint8 HxW Mono8 or HxWx3 BGR8)"
        )
    return None


class FrameGuard:
    """Applies one camera's ``max_frame`` and the image-format rule to every frame."""

    def __init__(self, limits: MaxFrameSettings | None = None) -> None:
        self.limits = limits or MaxFrameSettings()

    def check(self, frame: Frame) -> tuple[Frame, Verdict]:
        if frame.problem is not None:  # the backend already knew (e.g. unknown pixel format)
            if frame.image is not PLACEHOLDER:
                frame = problem_frame(frame, frame.problem)
            return frame, "refused"
        img = frame.image
        why = image_problem(img)
        if why is not None:
            return problem_frame(frame, why), "refused"
        h, w = img.shape[:2]
        lim = self.limits
        if w > lim.width or h > lim.height:
            if lim.action == "refuse":
                return problem_frame(
                    frame, f"oversized {w}x{h} > {lim.width}x{lim.height} (max_frame)"
                ), "refused"
            return self._downscale(frame, w, h), "downscaled"
        if not img.flags.c_contiguous:  # a backend bug, not the part's fault: fix it, one copy
            frame = dataclasses.replace(frame, image=np.ascontiguousarray(img))
        return frame, "ok"

    def _downscale(self, frame: Frame, w: int, h: int) -> Frame:
        lim = self.limits
        scale = min(lim.width / w, lim.height / h)
        nw = min(lim.width, max(1, int(w * scale)))
        nh = min(lim.height, max(1, int(h * scale)))
        small = cv2.resize(frame.image, (nw, nh), interpolation=cv2.INTER_AREA)
        meta = dict(frame.source_meta)
        meta["downscaled_from"] = [w, h]
        return dataclasses.replace(frame, image=np.ascontiguousarray(small), source_meta=meta)
