"""/metrics, /healthz and the read-only operator page, on a small threaded HTTP server.

A scrape or a page refresh must never delay a frame, so the server runs in its own thread and
only reads snapshots the daemon keeps up to date; the expensive work the page asks for (drawing
and encoding defect images) happens here, on the request's thread, never on the event loop.

Routes:
  /metrics                    Prometheus text format
  /healthz, /health           the daemon's health document (503 while degraded)
  /                           the operator page (edge/page/, served from the package: no CDN)
  /static/<file>              its CSS and JavaScript
  /api/status                 health + the operator view's snapshot, one JSON document
  /api/defects/<id>.jpg?w=320 a recent defect image with its outlines drawn
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger(__name__)

_PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
"""A fixed table, not a file system lookup: nothing outside it can be requested."""
_DEFECT_PATH = re.compile(r"^/api/defects/([0-9a-f]{1,16}-[0-9]{1,20})\.jpg$")
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page may load nothing from anywhere else: it works on a line PC with no internet, and
the browser enforces that it does not try."""


class StatusView(Protocol):
    """What the operator page reads besides health (edge.operator.OperatorView)."""

    def snapshot(self) -> dict[str, Any]: ...

    def defect_jpeg(self, defect_id: str, width: int | None = None) -> bytes | None: ...


def _load_page() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("edge") / "page"
    return {
        route: ((folder / name).read_bytes(), ctype) for route, (name, ctype) in _PAGE_FILES.items()
    }


class ObservabilityServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        view: StatusView | None = None,
    ) -> None:
        registry_ = registry
        health_ = health
        server = self
        self.view: StatusView | None = view
        page = _load_page()
        errors_logged: set[str] = set()

        class Handler(BaseHTTPRequestHandler):
            server_version = "edge"
            sys_version = ""

            def do_GET(self) -> None:
                try:
                    self._route()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a browser closing a tab)
                except Exception as exc:
                    key = type(exc).__name__
                    if key not in errors_logged and len(errors_logged) < 32:  # once per kind
                        errors_logged.add(key)
                        log.exception("http_request_failed", path=self.path)
                    with contextlib.suppress(Exception):
                        self._send(500, "text/plain", f"internal error: {exc!r}\n".encode())

            def _route(self) -> None:
                url = urlsplit(self.path)
                path = url.path
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry_))
                elif path in ("/healthz", "/health"):
                    ok, doc = health_()
                    body = json.dumps(doc, indent=1, default=str).encode()
                    self._send(200 if ok else 503, "application/json", body)
                elif path in page:
                    body, ctype = page[path]
                    self._send(200, ctype, body, cache="no-cache")
                elif path == "/api/status":
                    self._send(200, "application/json", server.status_json(), cache="no-store")
                elif m := _DEFECT_PATH.match(path):
                    self._defect(m.group(1), parse_qs(url.query).get("w", [""])[0])
                else:
                    self._send(
                        404,
                        "text/plain",
                        b"not found: try / (operator page), /metrics, /healthz or /api/status\n",
                    )

            def _defect(self, defect_id: str, w: str) -> None:
                view = server.view
                if view is None:
                    self._send(404, "text/plain", b"no operator view attached\n")
                    return
                width = int(w) if w.isdigit() else None
                jpeg = view.defect_jpeg(defect_id, width)
                if jpeg is None:
                    self._send(404, "text/plain", b"defect image no longer kept (ring moved on)\n")
                    return
                # Ids are unique per daemon run, so the browser may keep the image.
                self._send(200, "image/jpeg", jpeg, cache="private, max-age=600")

            def _send(self, code: int, ctype: str, body: bytes, cache: str | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Content-Type-Options", "nosniff")
                if ctype.startswith("text/html"):
                    self.send_header("Content-Security-Policy", _CSP)
                    self.send_header("Referrer-Policy", "no-referrer")
                if cache:
                    self.send_header("Cache-Control", cache)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes and page refreshes are not worth a log line each

        self._health = health
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def attach_view(self, view: StatusView | None) -> None:
        """Attach (or replace) the operator view after start; requests see it from then on."""
        self.view = view

    def status_json(self) -> bytes:
        """/api/status: health and the view's snapshot in one document, so the page never
        shows a health state and counters from two different moments far apart."""
        ok, doc = self._health()
        view = self.view
        snap = view.snapshot() if view is not None else None
        out = {"healthy": ok, "served_at_ms": int(time.time() * 1000), "health": doc, "view": snap}
        return json.dumps(_json_safe(out), default=str, allow_nan=False).encode()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


def _json_safe(obj: Any) -> Any:
    """NaN and infinities (an empty latency estimate) as null: browsers reject bare NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
