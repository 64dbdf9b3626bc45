"""Commissioning a camera: exposure to a target level, focus score, and an annotated report.

Exposure is tuned on the region the model will judge (the ROI), not the whole frame: a bright
conveyor edge must not darken the part. Focus is the variance of the Laplacian: it rises with
edge contrast, so the technician turns the lens until it peaks. Both use only numpy/OpenCV, so
``edge calibrate`` runs on the appliance itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from camera.frame import Frame
from camera.nodes import NodeAccess, check_value
from camera.source import CameraConfigError, CameraError

Roi = tuple[int, int, int, int]
"""x, y, width, height in image pixels."""

EXPOSURE_NODES = ("ExposureTime", "ExposureTimeAbs")


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def crop(image: np.ndarray, roi: Roi | None) -> np.ndarray:
    if roi is None:
        return image
    x, y, w, h = roi
    ih, iw = image.shape[:2]
    if x >= iw or y >= ih or w <= 0 or h <= 0:
        raise ValueError(f"ROI {roi} lies outside the {iw}x{ih} image")
    return image[y : min(y + h, ih), x : min(x + w, iw)]


def parse_roi(text: str) -> Roi:
    """'x,y,w,h' -> a ROI, with an error that says what was expected."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"ROI {text!r} must be four integers x,y,width,height") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"ROI {text!r}: x,y must be >= 0 and width,height > 0")
    return x, y, w, h


def focus_score(image: np.ndarray, roi: Roi | None = None) -> float:
    """Variance of the Laplacian over the ROI: higher is sharper (compare on the same scene)."""
    # 16-bit Laplacian (exact for 8-bit input, |value| <= 1020) and OpenCV's double-precision
    # moments: the same variance as float64 + numpy's var to ~1e-16, in half the time (the drift
    # watch takes it on every frame). 16-bit frames need the float64 path.
    img = crop(gray(image), roi)
    if img.dtype != np.uint8:
        return float(cv2.Laplacian(img, cv2.CV_64F).var())
    _mean, std = cv2.meanStdDev(cv2.Laplacian(img, cv2.CV_16S))
    return float(std[0, 0]) ** 2


@dataclass
class Levels:
    mean: float
    saturated: float
    """Fraction of ROI pixels at 255 (detail lost in highlights)."""
    dark: float
    """Fraction of ROI pixels at 0."""
    histogram: np.ndarray


def levels(image: np.ndarray, roi: Roi | None = None) -> Levels:
    g = crop(gray(image), roi)
    hist = np.bincount(g.ravel(), minlength=256)[:256]
    n = max(g.size, 1)
    return Levels(float(g.mean()), float(hist[255]) / n, float(hist[0]) / n, hist)


@dataclass
class ExposureResult:
    node: str
    exposure_us: float
    mean: float
    converged: bool
    reason: str
    steps: list[tuple[float, float]] = field(default_factory=list)
    """(exposure_us, ROI mean) per iteration."""


def exposure_node(acc: NodeAccess) -> str:
    for name in EXPOSURE_NODES:
        if acc.has(name):
            return name
    raise CameraConfigError(
        "the camera has no ExposureTime/ExposureTimeAbs node: exposure cannot be tuned "
        "(set the lens aperture or lighting instead)"
    )


def auto_exposure(
    acc: NodeAccess,
    next_frame: Callable[[], Frame],
    target: float,
    *,
    roi: Roi | None = None,
    tolerance: float = 4.0,
    max_steps: int = 12,
) -> ExposureResult:
    """Adjust exposure until the ROI mean is within ``tolerance`` of ``target`` (0-255).

    Mean level is roughly proportional to exposure below saturation, so each step scales
    exposure by target/mean (bounded to x0.25..x4 per step, and at most halving while the ROI is
    saturated, where the mean under-reports). ``next_frame`` must return a frame exposed
    *after* the last change (see :func:`fresh_frame`).
    """
    if not 0 < target < 255:
        raise ValueError(f"target mean {target} must be between 0 and 255")
    node = exposure_node(acc)
    if acc.has("ExposureAuto"):
        try:
            acc.set("ExposureAuto", "Off")
        except Exception as exc:
            raise CameraError(f"cannot switch ExposureAuto off: {exc}") from exc
    lo, hi, _inc = acc.bounds(node)
    exposure = float(acc.get(node))
    result = ExposureResult(node, exposure, float("nan"), False, "max steps reached")
    for _ in range(max_steps):
        lv = levels(next_frame().image, roi)
        result.steps.append((exposure, lv.mean))
        result.exposure_us, result.mean = exposure, lv.mean
        if abs(lv.mean - target) <= tolerance:
            result.converged, result.reason = True, "on target"
            return result
        factor = target / max(lv.mean, 1.0)
        if lv.saturated > 0.05:
            factor = min(factor, 0.5)
        factor = min(max(factor, 0.25), 4.0)
        new = min(max(exposure * factor, lo), hi)
        if new == exposure:
            result.reason = f"exposure limit reached ({'max' if factor > 1 else 'min'} {new:g} us)"
            return result
        value = check_value(acc, node, new)
        acc.set(node, value)
        exposure = float(acc.get(node))
    return result


def fresh_frame(
    read: Callable[[float], Frame | None], *, after_ns: int | None = None, skip: int = 2,
    timeout_s: float = 5.0, trigger: Callable[[], None] | None = None,
) -> Frame:
    """The first frame captured after ``after_ns`` (default: now), past ``skip`` more frames.

    Buffers already queued in the driver were exposed with the old settings; skipping them keeps
    the exposure loop from chasing its own past.
    """
    since = time.monotonic_ns() if after_ns is None else after_ns
    end = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < end:
        if trigger is not None:
            trigger()
        f = read(0.5)
        if f is None or f.captured_ns < since:
            continue
        if seen >= skip:
            return f
        seen += 1
    raise CameraError(f"no frame from the camera within {timeout_s}s")


def render_report(
    image: np.ndarray,
    *,
    roi: Roi | None,
    focus: float,
    lv: Levels,
    title: str,
    lines: list[str],
) -> np.ndarray:
    """An annotated BGR image: frame with ROI and saturation overlay, histogram, key numbers."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    g = gray(image)
    bgr[g >= 255] = (0, 0, 255)  # saturated pixels in red
    bgr[g == 0] = (255, 0, 0)  # black-clipped pixels in blue
    if roi is not None:
        x, y, w, h = roi
        cv2.rectangle(bgr, (x, y), (x + w - 1, y + h - 1), (0, 255, 0), max(1, g.shape[1] // 400))
    # Scale to a readable width, then add a side panel with the histogram and the numbers.
    width = 960
    scale = width / bgr.shape[1]
    frame = cv2.resize(bgr, (width, max(1, round(bgr.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    panel_w = 420
    height = max(frame.shape[0], 520)
    canvas = np.full((height, width + panel_w, 3), 32, np.uint8)
    canvas[: frame.shape[0], :width] = frame
    px = width + 20
    hist_h, hist_w = 180, panel_w - 40
    hist = lv.histogram.astype(np.float64)
    if hist.max() > 0:
        hist = hist / hist.max()
    cv2.rectangle(canvas, (px, 40), (px + hist_w, 40 + hist_h), (80, 80, 80), 1)
    for i in range(256):
        x0 = px + int(i * hist_w / 256)
        x1 = px + int((i + 1) * hist_w / 256)
        top = 40 + hist_h - int(hist[i] * hist_h)
        colour = (0, 0, 255) if i == 255 else (255, 0, 0) if i == 0 else (220, 220, 220)
        cv2.rectangle(canvas, (x0, top), (max(x0, x1 - 1), 40 + hist_h), colour, -1)
    mx = px + int(lv.mean * hist_w / 256)
    cv2.line(canvas, (mx, 36), (mx, 44 + hist_h), (0, 255, 255), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, title, (px, 26), font, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    where = "whole image" if roi is None else "x={} y={} w={} h={}".format(*roi)
    text = [
        f"ROI: {where}",
        f"mean level: {lv.mean:.1f} / 255",
        f"saturated: {lv.saturated * 100:.2f}%   black: {lv.dark * 100:.2f}%",
        f"focus (var. of Laplacian): {focus:.1f}",
        *lines,
    ]
    for i, line in enumerate(text):
        cv2.putText(canvas, line, (px, 250 + 26 * i), font, 0.5, (230, 230, 230), 1, cv2.LINE_AA)
    return canvas
