"""What the operator page shows: recent rates, verdict mix, latency and the last defect images.

The view is a pipeline observer: ``observe()`` runs on the event loop for every decided part, so
it only counts and keeps references, O(1) per part (a few dict/list updates under a lock held for
microseconds). Everything that costs CPU, percentiles over the recent latencies, drawing the
outlines on a defect image and encoding it as JPEG, happens later on the HTTP thread that asks for
it, and a rendered image is cached, so a page refreshed every two seconds encodes each defect at
most once per size.

Memory is bounded whatever the run length: per camera a ring of one-second buckets (the sliding
window) and a fixed number of recent latencies; for the whole line a ring of the last ``defects``
defect parts, also bounded in bytes, that keeps a *reference* to the frame's image (the frame owns
its pixels; nothing is copied on the loop). At 1280x1024 BGR the default 12 images hold 47 MB.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from models.types import Detection

if TYPE_CHECKING:
    from edge.pipeline import DecidedPart

VERDICTS = ("OK", "DEFECT", "FAILSAFE_REJECT")
THUMB_WIDTHS = (160, 320, 640)
"""The sizes an image is rendered at (a request's width is rounded up to one of them, or full
size): a client cannot make the daemon render and cache an unbounded number of variants."""
_PALETTE = (
    (0, 0, 255),
    (0, 200, 255),
    (255, 0, 255),
    (255, 128, 0),
    (0, 255, 0),
    (255, 255, 0),
    (128, 0, 255),
    (0, 128, 255),
)
"""BGR colours per class id: saturated, so an outline stands out on a grey metal part."""


@dataclass(slots=True)
class _Bucket:
    second: int = -1
    parts: int = 0
    ok: int = 0
    defect: int = 0
    failsafe: int = 0
    missed: int = 0


@dataclass(slots=True)
class _Camera:
    """One camera's tallies; reasons are a small closed set (FailsafeReason), so the Counter is
    bounded."""

    window_s: int
    latency_samples: int
    first_seen: float
    parts: int = 0
    missed: int = 0
    verdicts: collections.Counter[str] = field(default_factory=collections.Counter)
    failsafe_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    buckets: list[_Bucket] = field(default_factory=list)
    latencies: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    last: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.buckets = [_Bucket() for _ in range(self.window_s + 1)]
        self.latencies = collections.deque(maxlen=self.latency_samples)


@dataclass(slots=True)
class _Defect:
    id: str
    camera: str
    part_id: int
    frame_id: int
    captured_wall_ns: int
    reason: str
    model_id: str
    recipe: int
    e2e_ms: float | None
    detections: tuple[Detection, ...]
    image: np.ndarray
    nbytes: int
    rendered: dict[int, bytes] = field(default_factory=dict)
    """JPEG by width (0 = full size), filled lazily on the HTTP thread."""


class OperatorView:
    """Observer of decided parts for the operator page (attach ``observe`` to the pipeline).

    Thread model: ``observe`` on the event loop; ``snapshot`` and ``defect_jpeg`` on HTTP threads.
    One lock guards the tallies and the ring; it is never held while computing or encoding.
    """

    def __init__(
        self,
        line: str,
        *,
        budget_ms: float | None = None,
        defects: int = 12,
        max_defect_bytes: int = 64 << 20,
        window_s: int = 60,
        latency_samples: int = 1024,
        jpeg_quality: int = 80,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if defects < 1 or window_s < 1 or latency_samples < 1:
            raise ValueError("defects, window_s and latency_samples must be at least 1")
        self.line = line
        self.budget_ms = budget_ms
        self.max_defects = defects
        self.max_defect_bytes = max_defect_bytes
        self.window_s = window_s
        self.latency_samples = latency_samples
        self.jpeg_quality = jpeg_quality
        self._clock = clock
        self._lock = threading.Lock()
        self._render = threading.Semaphore(1)
        """One render at a time: the page may ask for 12 thumbnails at once, and on a 2-core
        line PC they must not compete with inference for both cores."""
        self._cameras: dict[str, _Camera] = {}
        self._defects: collections.deque[_Defect] = collections.deque()
        self._by_id: dict[str, _Defect] = {}
        self._defect_bytes = 0
        self._defects_seen = 0
        self._run = f"{time.time_ns() // 1_000_000 % 0xFFFFFFFF:x}"
        """Part of every defect id: ids restart with the daemon, a browser cache must not."""
        self._models: collections.Counter[str] = collections.Counter()
        self.started = clock()

    # ---- event loop ------------------------------------------------------------------------

    def observe(self, part: DecidedPart) -> None:
        """Count one decided part (on the loop: O(1), never blocks beyond the short lock)."""
        now = self._clock()
        second = int(now)
        frame = part.frame
        verdict = part.verdict.name
        missed = part.e2e_ms is None
        with self._lock:
            cam = self._cameras.get(frame.camera_id)
            if cam is None:
                cam = _Camera(self.window_s, self.latency_samples, now)
                self._cameras[frame.camera_id] = cam
            cam.parts += 1
            b = cam.buckets[second % len(cam.buckets)]
            if b.second != second:
                b.second, b.parts, b.ok, b.defect, b.failsafe, b.missed = second, 0, 0, 0, 0, 0
            b.parts += 1
            if missed:
                cam.missed += 1
                b.missed += 1
            else:
                cam.verdicts[verdict] += 1
                if verdict == "OK":
                    b.ok += 1
                elif verdict == "DEFECT":
                    b.defect += 1
                else:
                    b.failsafe += 1
                cam.latencies.append((now, float(part.e2e_ms or 0.0)))
            if verdict == "FAILSAFE_REJECT":
                cam.failsafe_reasons[part.reason] += 1
            if len(self._models) < 64 or part.model_id in self._models:
                self._models[part.model_id] += 1
            cam.last = {
                "part_id": frame.part_id,
                "verdict": verdict,
                "reason": part.reason,
                "at_ns": frame.captured_wall_ns,
                "model": part.model_id,
                "recipe": part.recipe,
                "e2e_ms": part.e2e_ms,
            }
            if (
                verdict == "DEFECT"
                and part.decision is not None
                and frame.frame_id >= 0
                and frame.problem is None
            ):
                self._keep_defect(part)

    def _keep_defect(self, part: DecidedPart) -> None:
        """Append to the ring (lock held); evict the oldest past the count or byte bound."""
        frame = part.frame
        assert part.decision is not None
        self._defects_seen += 1
        entry = _Defect(
            id=f"{self._run}-{self._defects_seen}",
            camera=frame.camera_id,
            part_id=frame.part_id,
            frame_id=frame.frame_id,
            captured_wall_ns=frame.captured_wall_ns,
            reason=part.reason,
            model_id=part.model_id,
            recipe=part.recipe,
            e2e_ms=part.e2e_ms,
            detections=tuple(part.decision.counted),
            image=frame.image,
            nbytes=int(frame.image.nbytes),
        )
        self._defects.append(entry)
        self._by_id[entry.id] = entry
        self._defect_bytes += entry.nbytes
        while len(self._defects) > 1 and (
            len(self._defects) > self.max_defects or self._defect_bytes > self.max_defect_bytes
        ):
            old = self._defects.popleft()
            self._by_id.pop(old.id, None)
            self._defect_bytes -= old.nbytes

    # ---- HTTP threads ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready dict for /api/status (any thread)."""
        now = self._clock()
        second = int(now)
        with self._lock:
            cams = {
                cid: (
                    c.parts,
                    c.missed,
                    dict(c.verdicts),
                    dict(c.failsafe_reasons),
                    [
                        (b.parts, b.ok, b.defect, b.failsafe, b.missed)
                        for b in c.buckets
                        if 0 <= second - b.second < self.window_s
                    ],
                    list(c.latencies),
                    dict(c.last),
                    c.first_seen,
                )
                for cid, c in self._cameras.items()
            }
            defects = list(self._defects)
            models = dict(self._models)
            defects_seen = self._defects_seen
        cameras: dict[str, Any] = {}
        totals: collections.Counter[str] = collections.Counter()
        for cid, (parts, missed, verdicts, reasons, buckets, lat, last, first) in sorted(
            cams.items()
        ):
            w_parts, w_ok, w_defect, w_failsafe, w_missed = (
                [sum(col) for col in zip(*buckets, strict=True)] if buckets else [0] * 5
            )
            recent = [ms for t, ms in lat if now - t <= self.window_s]
            span = max(1.0, min(float(self.window_s), now - first))
            decided = w_ok + w_defect + w_failsafe
            cameras[cid] = {
                "parts": parts,
                "verdicts": {v: verdicts.get(v, 0) for v in VERDICTS},
                "missed": missed,
                "failsafe_reasons": reasons,
                "rate_per_s": round(w_parts / span, 2),
                "window": {
                    "parts": w_parts,
                    "OK": w_ok,
                    "DEFECT": w_defect,
                    "FAILSAFE_REJECT": w_failsafe,
                    "missed": w_missed,
                    "defect_share": round(w_defect / decided, 4) if decided else None,
                },
                "latency_ms": _percentiles(recent),
                "last": _last(last),
            }
            totals["parts"] += parts
            totals["missed"] += missed
            for v in VERDICTS:
                totals[v] += verdicts.get(v, 0)
        return {
            "line": self.line,
            "generated_at": _iso(time.time_ns()),
            "uptime_s": round(now - self.started, 1),
            "window_s": self.window_s,
            "budget_ms": self.budget_ms,
            "totals": {k: totals.get(k, 0) for k in ("parts", *VERDICTS, "missed")},
            "cameras": cameras,
            "models_seen": models,
            "defects_seen": defects_seen,
            "defects": [_defect_doc(d) for d in reversed(defects)],
        }

    def defect_jpeg(self, defect_id: str, width: int | None = None) -> bytes | None:
        """The defect image with its outlines, class and score drawn, as JPEG; None when the
        ring no longer holds it. Runs on the HTTP thread (never on the loop)."""
        key = _width_key(width)
        with self._lock:
            entry = self._by_id.get(defect_id)
            if entry is None:
                return None
            cached = entry.rendered.get(key)
        if cached is not None:
            return cached
        with self._render:
            with self._lock:  # another request may have rendered it while we waited
                cached = entry.rendered.get(key)
            if cached is not None:
                return cached
            jpeg = render_defect(entry.image, entry.detections, key or None, self.jpeg_quality)
        with self._lock:
            entry.rendered[key] = jpeg
        return jpeg


def render_defect(
    image: np.ndarray,
    detections: tuple[Detection, ...],
    width: int | None = None,
    quality: int = 80,
) -> bytes:
    """Draw each detection's outline (filled at 35 %, stroked) or box, with "class score", and
    encode as JPEG. Scales down first when ``width`` is smaller than the image, so a thumbnail
    costs a resize of the frame, not a full-size drawing."""
    img = image
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    h, w = img.shape[:2]
    scale = 1.0
    if width is not None and width < w:
        scale = width / w
        canvas = cv2.resize(img, (width, max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    else:
        canvas = np.ascontiguousarray(img).copy()
    overlay = canvas.copy()
    thick = max(2, round(2 * max(canvas.shape[:2]) / 640))
    for det in detections:
        color = _PALETTE[det.class_id % len(_PALETTE)]
        if det.outline and len(det.outline) >= 3:
            pts = (np.asarray(det.outline, dtype=np.float64) * scale).round().astype(np.int32)
            cv2.fillPoly(overlay, [pts], color)
    cv2.addWeighted(overlay, 0.35, canvas, 0.65, 0, dst=canvas)
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = max(0.35, 0.45 * max(canvas.shape[:2]) / 640)
    for det in detections:
        color = _PALETTE[det.class_id % len(_PALETTE)]
        x0, y0, x1, y1 = (round(v * scale) for v in det.box)
        if det.outline and len(det.outline) >= 3:
            pts = (np.asarray(det.outline, dtype=np.float64) * scale).round().astype(np.int32)
            cv2.polylines(canvas, [pts], True, color, thick, cv2.LINE_AA)
        else:
            cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thick)
        label = f"{det.class_name} {det.score:.2f}"
        (tw, th), base = cv2.getTextSize(label, font, font_scale, 1)
        ty = y0 - 3 if y0 - th - base - 3 >= 0 else min(canvas.shape[0] - 1, y1 + th + 3)
        cv2.rectangle(canvas, (x0, ty - th - 2), (x0 + tw + 2, ty + base - 1), color, -1)
        cv2.putText(canvas, label, (x0 + 1, ty - 1), font, font_scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf.tobytes())


def _width_key(width: int | None) -> int:
    if width is None or width <= 0:
        return 0
    for w in THUMB_WIDTHS:
        if width <= w:
            return w
    return 0


def _percentiles(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": int(a.size),
        "p50": round(float(p50), 2),
        "p90": round(float(p90), 2),
        "p99": round(float(p99), 2),
        "max": round(float(a.max()), 2),
    }


def _last(last: dict[str, Any]) -> dict[str, Any]:
    if not last:
        return {}
    out = dict(last)
    at_ns = out.pop("at_ns", None)
    out["at"] = _iso(at_ns) if at_ns else None
    e2e = out.get("e2e_ms")
    out["e2e_ms"] = round(e2e, 2) if isinstance(e2e, float) and math.isfinite(e2e) else None
    return out


def _defect_doc(d: _Defect) -> dict[str, Any]:
    return {
        "id": d.id,
        "camera": d.camera,
        "part_id": d.part_id,
        "frame_id": d.frame_id,
        "at": _iso(d.captured_wall_ns),
        "reason": d.reason,
        "model": d.model_id,
        "recipe": d.recipe,
        "e2e_ms": round(d.e2e_ms, 2) if d.e2e_ms is not None else None,
        "size": [int(d.image.shape[1]), int(d.image.shape[0])],
        "detections": [
            {
                "class": det.class_name,
                "score": round(float(det.score), 3),
                "box": [round(float(v), 1) for v in det.box],
                "area_px": int(det.area_px),
            }
            for det in d.detections
        ],
        "image": f"/api/defects/{d.id}.jpg",
    }


def _iso(wall_ns: int) -> str:
    secs, ns = divmod(int(wall_ns), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1_000_000:03d}Z"
