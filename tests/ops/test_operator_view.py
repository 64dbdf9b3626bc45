"""OperatorView and the HTTP routes of the operator page, with real frames, decisions and a real
ObservabilityServer on a free port (the browser test is test_operator_page.py)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from camera.frame import Frame
from edge.decision import Decision
from edge.http import ObservabilityServer
from edge.operator import OperatorView, render_defect
from edge.pipeline import DecidedPart
from models.types import Detection
from plc.record import Verdict

SQUARE = ((40, 40), (80, 40), (80, 80), (40, 80))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def frame(camera: str = "cam0", n: int = 0, shape: tuple[int, ...] = (120, 160, 3)) -> Frame:
    image = np.full(shape, 90, np.uint8)
    return Frame(camera, n, n, time.monotonic_ns(), time.time_ns(), image)


def detection(score: float = 0.87, outline: tuple[tuple[int, int], ...] = SQUARE) -> Detection:
    return Detection(0, "crack", score, (40.0, 40.0, 80.0, 80.0), 1600, outline=outline)


def part(verdict: Verdict, camera: str = "cam0", n: int = 0, e2e: float | None = 20.0,
         reason: str = "none", f: Frame | None = None,
         dets: tuple[Detection, ...] | None = None) -> DecidedPart:
    f = f or frame(camera, n)
    decision = None
    if verdict is Verdict.DEFECT:
        ds = dets if dets is not None else (detection(),)
        decision = Decision(Verdict.DEFECT, "defect:crack", ds[0], ds)
    elif verdict is Verdict.OK:
        decision = Decision(Verdict.OK, "no_defect", None, ())
    return DecidedPart(frame=f, verdict=verdict, reason=reason, decision=decision, recipe=3,
                       model_id="synth-demo:1.0.0", e2e_ms=e2e)


def test_counts_rates_and_latency_per_camera() -> None:
    clock = Clock()
    view = OperatorView("line1", window_s=60, clock=clock, budget_ms=348)
    for i in range(300):  # 10 parts/s for 30 s on cam0: OK, DEFECT, fail-safe in turn
        clock.t = 1000.0 + i / 10
        v = (Verdict.OK, Verdict.DEFECT, Verdict.FAILSAFE_REJECT)[i % 3]
        view.observe(part(v, n=i, e2e=float(10 + i % 100),
                          reason="overload" if v is Verdict.FAILSAFE_REJECT else "none"))
    view.observe(part(Verdict.OK, camera="cam1", e2e=None))  # a deadline miss
    snap = view.snapshot()
    json.dumps(snap, allow_nan=False)  # JSON-ready as it is
    cam = snap["cameras"]["cam0"]
    assert cam["parts"] == 300
    assert cam["verdicts"] == {"OK": 100, "DEFECT": 100, "FAILSAFE_REJECT": 100}
    assert cam["failsafe_reasons"] == {"overload": 100}
    assert cam["rate_per_s"] == pytest.approx(10, rel=0.05)
    assert cam["window"]["defect_share"] == pytest.approx(1 / 3, abs=0.01)
    assert cam["latency_ms"]["n"] == 300
    assert 10 <= cam["latency_ms"]["p50"] <= cam["latency_ms"]["p99"] <= 109
    assert cam["last"]["part_id"] == 299 and cam["last"]["recipe"] == 3
    assert snap["cameras"]["cam1"]["missed"] == 1
    assert snap["cameras"]["cam1"]["latency_ms"]["n"] == 0
    assert snap["totals"] == {"parts": 301, "OK": 100, "DEFECT": 100, "FAILSAFE_REJECT": 100,
                              "missed": 1}
    assert snap["budget_ms"] == 348
    # Rates and percentiles decay: two quiet minutes later the window is empty.
    clock.t += 120
    later = view.snapshot()["cameras"]["cam0"]
    assert later["rate_per_s"] == 0 and later["window"]["parts"] == 0
    assert later["latency_ms"]["n"] == 0
    assert later["parts"] == 300  # totals since start stay


def test_memory_is_bounded_whatever_the_run_length() -> None:
    clock = Clock()
    view = OperatorView("line1", defects=5, latency_samples=64, window_s=10, clock=clock)
    img_bytes = frame().image.nbytes
    for i in range(5000):
        clock.t += 0.01
        view.observe(part(Verdict.DEFECT if i % 2 else Verdict.OK, n=i))
    assert len(view._defects) == 5 and len(view._by_id) == 5
    assert view._defect_bytes == 5 * img_bytes
    cam = view._cameras["cam0"]
    assert len(cam.buckets) == 11 and len(cam.latencies) == 64
    snap = view.snapshot()
    assert [d["part_id"] for d in snap["defects"]] == [4999, 4997, 4995, 4993, 4991]
    assert snap["defects_seen"] == 2500
    # A byte bound below the count bound keeps fewer (but always the newest) images.
    small = OperatorView("line1", defects=10, max_defect_bytes=3 * img_bytes, clock=clock)
    for i in range(20):
        small.observe(part(Verdict.DEFECT, n=i))
    assert [d["part_id"] for d in small.snapshot()["defects"]] == [19, 18, 17]


def test_only_real_defects_with_an_image_are_kept() -> None:
    view = OperatorView("line1")
    view.observe(part(Verdict.OK))
    view.observe(part(Verdict.FAILSAFE_REJECT, reason="model_down"))
    placeholder = Frame("cam0", -1, 7, time.monotonic_ns(), time.time_ns(),
                        np.zeros((1, 1), np.uint8), pixel_format="none")
    view.observe(part(Verdict.DEFECT, f=placeholder))  # a part that never had a frame
    assert view.snapshot()["defects"] == []
    view.observe(part(Verdict.DEFECT, n=9))
    (d,) = view.snapshot()["defects"]
    assert d["part_id"] == 9 and d["detections"][0]["class"] == "crack"
    assert d["detections"][0]["score"] == 0.87 and d["size"] == [160, 120]


def _decode(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a JPEG"
    return np.asarray(img)


def _red_pixels(jpeg: bytes) -> np.ndarray:
    img = _decode(jpeg)
    b, g, r = (img[..., i].astype(int) for i in range(3))
    return np.asarray((r > 150) & (g < 90) & (b < 90))


def test_render_draws_outline_fill_and_label() -> None:
    image = np.full((120, 160, 3), 90, np.uint8)
    jpeg = render_defect(image, (detection(),))
    img = _decode(jpeg)
    assert img.shape == (120, 160, 3)
    red = _red_pixels(jpeg)
    assert red[40, 40:81].mean() > 0.8 and red[40:81, 80].mean() > 0.8  # the outline (BGR red)
    inside = img[55:65, 55:65].astype(int)
    assert (inside[..., 2] - inside[..., 1]).mean() > 30  # filled, tinted red
    assert red[:40, :].sum() > 20  # the label box above the detection
    assert not red[100:, :].any()  # nothing drawn elsewhere
    # Thumbnail: the requested width, outline still there; a mono frame renders too.
    thumb = _decode(render_defect(image, (detection(),), 80))
    assert thumb.shape == (60, 80, 3)
    mono = render_defect(np.full((120, 160), 90, np.uint8), (detection(outline=()),))
    assert _red_pixels(mono)[50:81, 38:43].any(axis=1).mean() > 0.8  # no outline: the box


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def server() -> Iterator[tuple[ObservabilityServer, OperatorView, list[bool]]]:
    view = OperatorView("line1")
    healthy = [True]

    def health() -> tuple[bool, dict[str, Any]]:
        return healthy[0], {"status": "ok" if healthy[0] else "degraded", "line": "line1",
                            "model": {"model": "m:1", "per_frame_ms": float("nan")}}

    srv = ObservabilityServer("127.0.0.1", 0, CollectorRegistry(), health, view=view)
    srv.start()
    try:
        yield srv, view, healthy
    finally:
        srv.stop()


def test_routes_of_the_operator_page(
    server: tuple[ObservabilityServer, OperatorView, list[bool]],
) -> None:
    srv, view, healthy = server
    base = f"http://127.0.0.1:{srv.port}"
    code, headers, body = _get(base + "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/static/page.js" in body and b"/static/page.css" in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for asset in ("/static/page.js", "/static/page.css"):
        code, _h, body = _get(base + asset)
        assert code == 200 and body
        # Nothing from another origin: the page must work with no internet.
        assert b"http://" not in body and b"https://" not in body, asset
    view.observe(part(Verdict.DEFECT, n=5))
    code, headers, body = _get(base + "/api/status")
    assert code == 200 and headers["Cache-Control"] == "no-store"
    doc = json.loads(body)  # strict JSON: the NaN in health became null
    assert doc["healthy"] is True and doc["health"]["model"]["per_frame_ms"] is None
    (d,) = doc["view"]["defects"]
    code, headers, jpeg = _get(base + d["image"] + "?w=320")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert _red_pixels(jpeg).any()
    # Degraded health still serves the page's data (the page shows it), /healthz says 503.
    healthy[0] = False
    assert _get(base + "/api/status")[0] == 200
    assert _get(base + "/healthz")[0] == 503
    for bad in ("/api/defects/ffff-1.jpg", "/api/defects/../../etc/passwd",
                "/static/../http.py", "/static/page.py", "/nothing"):
        assert _get(base + bad)[0] == 404, bad
    assert _get(base + "/metrics")[0] == 200


def test_server_without_a_view_serves_health_only() -> None:
    srv = ObservabilityServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, {"line": "x"}))
    srv.start()
    try:
        base = f"http://127.0.0.1:{srv.port}"
        doc = json.loads(_get(base + "/api/status")[2])
        assert doc["view"] is None and doc["health"]["line"] == "x"
        assert _get(base + "/api/defects/abc-1.jpg")[0] == 404
        view = OperatorView("x")
        view.observe(part(Verdict.DEFECT))
        srv.attach_view(view)  # what a ready hook does after start
        assert json.loads(_get(base + "/api/status")[2])["view"]["totals"]["DEFECT"] == 1
    finally:
        srv.stop()


def test_observing_while_the_page_reads_is_consistent(
    server: tuple[ObservabilityServer, OperatorView, list[bool]],
) -> None:
    """The loop observes while HTTP threads snapshot and render: no error, no lost count."""
    srv, view, _healthy = server
    base = f"http://127.0.0.1:{srv.port}"
    errors: list[str] = []
    reads = [0, 0, 0]
    done = threading.Event()

    def reader(k: int) -> None:
        while not done.is_set():
            code, _h, body = _get(base + "/api/status")
            if code != 200:
                errors.append(f"status {code}")
                continue
            doc = json.loads(body)["view"]
            t = doc["totals"]
            if t["parts"] != t["OK"] + t["DEFECT"] + t["FAILSAFE_REJECT"] + t["missed"]:
                errors.append(f"torn snapshot {t}")
            for d in doc["defects"][:2]:
                c = _get(base + d["image"] + "?w=160")[0]
                if c not in (200, 404):  # 404: the ring moved on meanwhile
                    errors.append(f"image {c}")
            reads[k] += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    n = 0
    deadline = time.monotonic() + 60
    try:
        # Observe until every reader has read a few times while parts kept coming.
        while (n < 3000 or min(reads) < 5) and time.monotonic() < deadline:
            view.observe(part(Verdict.DEFECT if n % 2 else Verdict.OK, n=n))
            n += 1
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert min(reads) >= 5, reads
    assert not errors, errors[:5]
    assert view.snapshot()["totals"]["parts"] == n
