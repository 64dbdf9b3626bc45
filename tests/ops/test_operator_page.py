"""The operator page in a real browser (headless Chromium) against a running demo daemon.

Chromium loads `/`, runs the page's JavaScript (which fetches /api/status and the defect
thumbnails) and hands back the rendered DOM (`--dump-dom`) or a PNG (`--screenshot`).
`--virtual-time-budget` lets the page's timers and fetches run before the dump.

Set EDGE_SCREENSHOT_DIR to keep the screenshot (docs/operator-page.png is made that way:
`EDGE_SCREENSHOT_DIR=docs pytest tests/ops/test_operator_page.py`).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np

from tests.ops.conftest import DemoDaemon
from tests.support import wait_until

_runs = itertools.count()


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def walk(self) -> list[Node]:
        return [self, *(n for c in self.children for n in c.walk())]

    def find(self, tag: str | None = None, cls: str | None = None,
             **attrs: str) -> list[Node]:
        return [
            n for n in self.walk()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.attrs.get("class", "").split())
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def by_id(self, ident: str) -> Node:
        (node,) = self.find(id=ident)
        return node


_VOID = {"img", "meta", "link", "br", "hr", "input", "source", "col", "area", "base", "wbr"}


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(html: str) -> Node:
    p = _Parser()
    p.feed(html)
    return p.root


def chromium_run(exe: str, url: str, tmp: Path, *extra: str) -> str:
    """One headless Chromium run in its own process group and profile; stdout back."""
    profile = tmp / f"chromium-profile-{next(_runs)}"
    cmd = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # timed out: the browser and its helpers, by our group id
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


def _render(exe: str, demo: DemoDaemon, tmp: Path) -> Node:
    html = chromium_run(exe, demo.url + "/?refresh=1000", tmp, "--dump-dom")
    dom = parse(html)
    (body,) = dom.find("body")
    assert int(body.attrs["data-refreshes"]) >= 1, "the page never got /api/status"
    return dom


def test_operator_page_renders_live_data_in_chromium(
    demo: DemoDaemon, chromium: str, tmp_path: Path
) -> None:
    first = _render(chromium, demo, tmp_path)
    status = demo.status()
    health = status["health"]

    assert first.by_id("line-name").all_text() == demo.line
    assert first.by_id("line-state").all_text() in ("running", "degraded")
    parts_1 = int(first.by_id("total-parts").attrs["data-value"])
    assert parts_1 > 0
    # Components, model and uplink as the daemon reports them.
    components = first.by_id("components").all_text()
    for name in health["components"]:
        assert name in components
    assert health["model"]["model"] in first.by_id("models").all_text()
    assert re.search(r"kafka\s*up", first.by_id("uplink").all_text())
    # One camera card with a rate and latency percentiles.
    (cam,) = first.find(cls="camera", data_camera="cam0")
    assert float(cam.find(cls="rate")[0].attrs["data-rate"]) > 0
    assert re.search(r"p99 ms\s*\d+\.\d", cam.all_text())
    # Defect thumbnails: present, loaded by the browser, with class and score.
    figures = first.find("figure", cls="defect-card")
    assert len(figures) >= 3
    for fig in figures:
        (img,) = fig.find("img", cls="defect-thumb")
        assert img.attrs["data-loaded"] == "1", f"thumbnail not loaded: {img.attrs}"
        assert re.fullmatch(r"/api/defects/[0-9a-f]+-\d+\.jpg\?w=320", img.attrs["src"])
        assert re.search(r"[a-z_]+ (0|1)\.\d\d", fig.find(cls="cls")[0].all_text())

    # Counters move between two loads (wait for the daemon to decide more parts, not a sleep).
    wait_until(lambda: demo.status()["view"]["totals"]["parts"] > parts_1 + 10, 60,
               "more decided parts", poll_s=0.2)
    second = _render(chromium, demo, tmp_path)
    parts_2 = int(second.by_id("total-parts").attrs["data-value"])
    assert parts_2 > parts_1
    newest = [f.find("figure")[0].attrs["data-id"] for f in (first, second)]
    assert newest[0] != newest[1], "the defect gallery did not move on"


def test_operator_page_screenshot(demo: DemoDaemon, chromium: str, tmp_path: Path) -> None:
    png = tmp_path / "operator-page.png"
    chromium_run(chromium, demo.url + "/", tmp_path, f"--screenshot={png}",
                 "--window-size=1280,900", "--hide-scrollbars")
    img = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (900, 1280, 3)
    assert img[:40].mean() < 90, "the dark header bar is missing"
    # A rendered page with thumbnails, not a blank or error page: many distinct colours.
    colours = np.unique(img.reshape(-1, 3) // 8, axis=0)
    assert len(colours) > 300, len(colours)
    keep = os.environ.get("EDGE_SCREENSHOT_DIR")
    if keep:
        shutil.copyfile(png, Path(keep) / "operator-page.png")
