"""The four defect classes, each drawn as an intensity change plus the exact pixel mask.

Every defect is rendered into a soft float layer first; the label mask is that layer thresholded,
so the label covers exactly the pixels whose appearance changed visibly.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from models.synth.texture import fractal_noise

Painter = Callable[[np.random.Generator, np.ndarray, np.ndarray, float], np.ndarray]


def _point_in(rng: np.random.Generator, allowed: np.ndarray, margin: int) -> tuple[int, int] | None:
    """A random (x, y) inside ``allowed`` at least ``margin`` pixels from its border."""
    k = 2 * margin + 1
    inner = cv2.erode(allowed, np.ones((k, k), np.uint8)) if margin > 0 else allowed
    ys, xs = np.nonzero(inner)
    if len(xs) == 0:
        return None
    i = int(rng.integers(0, len(xs)))
    return int(xs[i]), int(ys[i])


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def scratch(rng: np.random.Generator, img: np.ndarray, allowed: np.ndarray, s: float) -> np.ndarray:
    """A long, thin, gently curved line; bright (specular) or dark (groove)."""
    h, w = img.shape
    start = _point_in(rng, allowed, int(4 * s))
    if start is None:
        return np.zeros((h, w), bool)
    length = rng.uniform(45, 160) * s
    a = rng.uniform(0, 2 * np.pi)
    p0 = np.array(start, np.float64)
    p2 = p0 + length * np.array([np.cos(a), np.sin(a)])
    bend = rng.normal(0, 0.18) * length
    mid = (p0 + p2) / 2 + bend * np.array([-np.sin(a), np.cos(a)])
    pts = _bezier(p0, mid, p2, 40)
    layer = np.zeros((h, w), np.float32)
    thick = max(2, round(rng.uniform(1.6, 3.2) * s))
    cv2.polylines(
        layer, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], False, 1.0, thick, cv2.LINE_AA
    )
    layer *= allowed
    # Scratches fade along their length where the tool lifted.
    fade = np.clip(fractal_noise(rng, h, w, 30) * 0.4 + 0.85, 0.55, 1.0)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    img += layer * fade * sign * rng.uniform(30, 65)
    return layer > 0.45


def pit(rng: np.random.Generator, img: np.ndarray, allowed: np.ndarray, s: float) -> np.ndarray:
    """A small crater: dark centre with a bright rim on the lit side."""
    h, w = img.shape
    r = rng.uniform(2.5, 7.5) * s
    c = _point_in(rng, allowed, int(r + 2))
    if c is None:
        return np.zeros((h, w), bool)
    axes = (
        max(2, round(r * rng.uniform(0.75, 1.25))),
        max(2, round(r * rng.uniform(0.75, 1.25))),
    )
    core = np.zeros((h, w), np.float32)
    cv2.ellipse(core, c, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
    dark = cv2.GaussianBlur(core, (0, 0), 0.8)
    img -= dark * rng.uniform(45, 95)
    # Rim highlight offset towards the light.
    a = rng.uniform(0, 2 * np.pi)
    shift = np.array([[1, 0, np.cos(a) * 1.5 * s], [0, 1, np.sin(a) * 1.5 * s]], np.float32)
    rim = cv2.warpAffine(core, shift, (w, h)) - core
    img += np.clip(rim, 0, 1) * rng.uniform(15, 40)
    return core > 0.5


def crack(rng: np.random.Generator, img: np.ndarray, allowed: np.ndarray, s: float) -> np.ndarray:
    """A jagged dark fracture, a random walk with momentum that may branch once."""
    h, w = img.shape
    start = _point_in(rng, allowed, int(6 * s))
    if start is None:
        return np.zeros((h, w), bool)
    layer = np.zeros((h, w), np.float32)
    thick = max(2, round(rng.uniform(1.5, 2.6) * s))

    def walk(p: np.ndarray, heading: float, steps: int) -> list[np.ndarray]:
        pts = [p.copy()]
        for _ in range(steps):
            heading += rng.normal(0, 0.45)
            p = p + rng.uniform(2.0, 4.5) * s * np.array([np.cos(heading), np.sin(heading)])
            pts.append(p.copy())
        return pts

    heading = rng.uniform(0, 2 * np.pi)
    main = walk(np.array(start, np.float64), heading, int(rng.integers(12, 34)))
    branches = [main]
    if rng.random() < 0.5:
        j = int(rng.integers(len(main) // 3, max(len(main) // 3 + 1, len(main) - 2)))
        branches.append(
            walk(
                main[j],
                heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2),
                int(rng.integers(5, 14)),
            )
        )
    for br in branches:
        pts = np.round(np.array(br)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(layer, [pts], False, 1.0, thick, cv2.LINE_AA)
    layer *= allowed
    img -= layer * rng.uniform(50, 100)
    # Lit edge of the fracture.
    img += np.clip(np.roll(layer, 1, axis=0) - layer, 0, 1) * rng.uniform(10, 30)
    return layer > 0.45


def stain(rng: np.random.Generator, img: np.ndarray, allowed: np.ndarray, s: float) -> np.ndarray:
    """A broad, irregular discoloration (coolant, oxidation) with a darker tide line."""
    h, w = img.shape
    r = rng.uniform(12, 38) * s
    c = _point_in(rng, allowed, int(r * 0.4))
    if c is None:
        return np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = (
        np.sqrt(
            ((xx - c[0]) / rng.uniform(0.7, 1.3)) ** 2 + ((yy - c[1]) / rng.uniform(0.7, 1.3)) ** 2
        )
        / r
    )
    field = 1.0 - d + fractal_noise(rng, h, w, max(r / 2, 4.0), octaves=3) * 0.35
    mask = ((field > 0) & (allowed > 0)).astype(np.uint8)
    # Keep the biggest piece so one stain is one instance.
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return np.zeros((h, w), bool)
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (lab == keep).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (0, 0), 1.2)
    sign = -1.0 if rng.random() < 0.75 else 1.0
    img += soft * sign * rng.uniform(20, 40)
    edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    img -= cv2.GaussianBlur(edge, (0, 0), 1.0) * rng.uniform(5, 18)
    return mask > 0.5


PAINTERS: dict[str, Painter] = {"scratch": scratch, "pit": pit, "crack": crack, "stain": stain}
