"""Pixel conversion from what a camera sends to what the model takes (Mono8 or BGR8, uint8).

Every path ends in a fresh contiguous array: the driver's buffer is requeued as soon as the frame
is built, so nothing may keep a view into it. Where a conversion already allocates (demosaic,
colour swap) that allocation *is* the copy, so a frame never costs two copies.

OpenCV names Bayer patterns by the second row/column, one position off GenICam's (PFNC) names:
GenICam BayerRG (R at 0,0) is OpenCV's ``COLOR_BayerBG2BGR``. The mapping below was checked on a
synthetic RGGB mosaic (see tests/camera/test_pixels.py).
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from camera.source import CameraConfigError

Output = Literal["mono8", "bgr8"]

_BAYER_TO_CV = {
    "BayerRG": (cv2.COLOR_BayerBG2BGR, cv2.COLOR_BayerBG2GRAY),
    "BayerBG": (cv2.COLOR_BayerRG2BGR, cv2.COLOR_BayerRG2GRAY),
    "BayerGR": (cv2.COLOR_BayerGB2BGR, cv2.COLOR_BayerGB2GRAY),
    "BayerGB": (cv2.COLOR_BayerGR2BGR, cv2.COLOR_BayerGR2GRAY),
}
_MONO_BITS = {"Mono8": 8, "Mono10": 10, "Mono12": 12, "Mono14": 14, "Mono16": 16}
_COLOUR = {
    "RGB8": (3, cv2.COLOR_RGB2BGR, cv2.COLOR_RGB2GRAY),
    "BGR8": (3, None, cv2.COLOR_BGR2GRAY),
    "RGBa8": (4, cv2.COLOR_RGBA2BGR, cv2.COLOR_RGBA2GRAY),
    "BGRa8": (4, cv2.COLOR_BGRA2BGR, cv2.COLOR_BGRA2GRAY),
}

SUPPORTED = sorted(
    [*_MONO_BITS, *_COLOUR]
    + [f"{p}{b}" for p in _BAYER_TO_CV for b in (8, 10, 12, 16)]
)


def _to_8bit(img: np.ndarray, bits: int) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    return (img >> (bits - 8)).astype(np.uint8)


def convert(
    data: np.ndarray,
    width: int,
    height: int,
    pixel_format: str,
    output: Output,
    *,
    copy: bool = True,
) -> tuple[np.ndarray, str]:
    """Convert one buffer's pixels; returns (contiguous uint8 image, "Mono8" | "BGR8").

    ``data`` may be a view into a driver buffer (flat or shaped); the result never is, unless
    ``copy=False`` says ``data`` is already ours (Aravis hands out a bytes copy), which saves
    the one copy a Mono8-to-Mono8 frame would otherwise cost.
    """
    want_mono = output == "mono8"
    if pixel_format in _MONO_BITS:
        mono = _to_8bit(data.reshape(height, width), _MONO_BITS[pixel_format])
        if want_mono:
            shared = mono.base is not None or mono is data
            return (mono.copy() if shared and copy else mono), "Mono8"
        return cv2.cvtColor(mono, cv2.COLOR_GRAY2BGR), "BGR8"
    if pixel_format in _COLOUR:
        ch, to_bgr, to_gray = _COLOUR[pixel_format]
        img = data.reshape(height, width, ch)
        if want_mono:
            return cv2.cvtColor(img, to_gray), "Mono8"
        if to_bgr is None:
            return img.copy(), "BGR8"
        return cv2.cvtColor(img, to_bgr), "BGR8"
    for prefix, (to_bgr, to_gray) in _BAYER_TO_CV.items():
        if pixel_format.startswith(prefix) and pixel_format[len(prefix):].isdigit():
            bits = int(pixel_format[len(prefix):])
            raw = _to_8bit(data.reshape(height, width), bits)
            return cv2.cvtColor(raw, to_gray if want_mono else to_bgr), (
                "Mono8" if want_mono else "BGR8"
            )
    raise CameraConfigError(
        f"pixel format {pixel_format!r} is not supported; set the camera's PixelFormat to one of "
        f"{', '.join(SUPPORTED)}"
    )
