"""Surfaces of inspected parts: machined metal and ceramic textures under uneven lighting.

The textures carry the kind of structured clutter (tool marks, grain, mottling, part edges)
that makes a defect detector earn its precision: a plain noisy background would be too easy.
"""

from __future__ import annotations

import cv2
import numpy as np


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth zero-mean noise with features about ``cell`` pixels wide."""
    gh, gw = max(2, int(np.ceil(h / cell)) + 2), max(2, int(np.ceil(w / cell)) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    return big[:h, :w]


def fractal_noise(
    rng: np.random.Generator, h: int, w: int, base_cell: float, octaves: int = 4
) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    amp, cell, total = 1.0, base_cell, 0.0
    for _ in range(octaves):
        out += amp * value_noise(rng, h, w, max(cell, 1.5))
        total += amp
        amp *= 0.5
        cell /= 2.0
    return out / total


def directional_noise(
    rng: np.random.Generator, h: int, w: int, angle_deg: float, length: float
) -> np.ndarray:
    """Brushed/ground metal: noise smeared along one direction."""
    side = int(np.ceil(np.hypot(h, w))) + 4
    n: np.ndarray = rng.standard_normal((side, side)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigmaX=length, sigmaY=0.7)
    m = cv2.getRotationMatrix2D((side / 2, side / 2), angle_deg, 1.0)
    n = cv2.warpAffine(n, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    y0, x0 = (side - h) // 2, (side - w) // 2
    n = n[y0 : y0 + h, x0 : x0 + w]
    return n / (n.std() + 1e-6)


def turning_marks(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Concentric lathe marks around a centre that may lie off the image."""
    cy = rng.uniform(-1.5, 2.5) * h
    cx = rng.uniform(-1.5, 2.5) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    period = rng.uniform(2.5, 6.0)
    jitter = value_noise(rng, h, w, 24.0) * rng.uniform(0.5, 2.0)
    return np.sin(2 * np.pi * (r + jitter) / period).astype(np.float32)


def lighting(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multiplicative illumination: a linear gradient plus a soft hotspot or vignette."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= max(h - 1, 1)
    xx /= max(w - 1, 1)
    a = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)) * rng.uniform(0.0, 0.45)
    cy, cx = rng.uniform(0.1, 0.9, size=2)
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    spot = np.exp(-r2 / (2 * rng.uniform(0.08, 0.5) ** 2)) * rng.uniform(-0.15, 0.3)
    return (1.0 + grad + spot).astype(np.float32)


def part_region(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Where the part is (1) vs. fixture background (0); often the part fills the frame."""
    mask = np.ones((h, w), np.uint8)
    kind = rng.choice(["full", "edge", "disc", "slot"], p=[0.45, 0.3, 0.15, 0.1])
    if kind == "edge":
        # A straight part edge crossing the frame.
        a = rng.uniform(0, 2 * np.pi)
        n = np.array([np.cos(a), np.sin(a)])
        yy, xx = np.mgrid[0:h, 0:w]
        d = (xx - w / 2) * n[0] + (yy - h / 2) * n[1]
        mask = (d < rng.uniform(0.15, 0.4) * min(h, w)).astype(np.uint8)
    elif kind == "disc":
        mask[:] = 0
        c = (int(rng.uniform(0.35, 0.65) * w), int(rng.uniform(0.35, 0.65) * h))
        cv2.circle(mask, c, int(rng.uniform(0.55, 0.8) * max(h, w)), 1, -1)
    elif kind == "slot":
        # A hole or slot machined into the part: background shows through.
        c = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
        axes = (int(rng.uniform(0.05, 0.15) * w), int(rng.uniform(0.05, 0.25) * h))
        cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 0, -1)
    return mask


def render_surface(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A defect-free part image (float32 0..255), its part mask and the material name."""
    material = str(rng.choice(["brushed", "turned", "ceramic", "cast"]))
    base = rng.uniform(95, 175)
    if material == "brushed":
        tex = directional_noise(rng, h, w, rng.uniform(0, 180), rng.uniform(6, 30)) * rng.uniform(
            5, 12
        )
        tex += fractal_noise(rng, h, w, 64) * rng.uniform(3, 8)
    elif material == "turned":
        tex = turning_marks(rng, h, w) * rng.uniform(3, 8)
        tex += fractal_noise(rng, h, w, 48) * rng.uniform(3, 8)
    elif material == "ceramic":
        tex = fractal_noise(rng, h, w, 40, octaves=5) * rng.uniform(6, 14)
        tex += rng.standard_normal((h, w)).astype(np.float32) * rng.uniform(2, 5)
    else:  # cast: coarse mottling plus sand grain
        tex = fractal_noise(rng, h, w, 20, octaves=3) * rng.uniform(6, 12)
        grain = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.8)
        tex += grain * rng.uniform(4, 9)
    part = part_region(rng, h, w)
    img = (base + tex) * lighting(rng, h, w)
    bg_level = rng.uniform(15, 50)
    bg = bg_level + fractal_noise(rng, h, w, 30) * 6
    soft = cv2.GaussianBlur(part.astype(np.float32), (0, 0), rng.uniform(0.6, 1.5))
    img = img * soft + bg * (1 - soft)
    # A bright chamfer highlight along the part edge, as under a ring light.
    if part.min() == 0:
        edge = cv2.morphologyEx(part, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(
            np.float32
        )
        img += cv2.GaussianBlur(edge, (0, 0), 1.0) * rng.uniform(20, 60)
    return img.astype(np.float32), part, material


def add_benign_marks(rng: np.random.Generator, img: np.ndarray, part: np.ndarray) -> None:
    """Nuisances a good detector must ignore: faint handling marks and tiny dust."""
    h, w = img.shape
    for _ in range(int(rng.integers(0, 3))):
        layer = np.zeros((h, w), np.float32)
        p0 = rng.uniform(0, 1, 2) * (w, h)
        p1 = p0 + rng.normal(0, 0.3, 2) * (w, h)
        cv2.line(layer, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1.0, 1, cv2.LINE_AA)
        img += cv2.GaussianBlur(layer, (0, 0), 1.2) * rng.uniform(-6, 6) * part
    for _ in range(int(rng.integers(0, 4))):
        c = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        layer = np.zeros((h, w), np.float32)
        cv2.circle(layer, c, 1, 1.0, -1)
        img += cv2.GaussianBlur(layer, (0, 0), 0.8) * rng.uniform(-10, 10)


def finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Optics and sensor: slight defocus, shot/read noise, 8-bit quantisation."""
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.9))
    noise_sigma = rng.uniform(1.0, 3.5)
    img = img + rng.standard_normal(img.shape).astype(np.float32) * noise_sigma
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
