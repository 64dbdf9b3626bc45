"""Letterbox + tensor layout, identical to ultralytics' predict path (so the decode matches it).

Ultralytics' ``LetterBox`` (auto=False for a fixed-size exported model, scaleup allowed, centred,
pad value 114, cv2.INTER_LINEAR) is reproduced bit for bit: the same rounding of the resized
size and of the split padding. Any drift here shifts every box by a pixel and breaks the
equivalence test, so keep it literal.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.types import ModelError, Prepared

PAD_VALUE = 114


def letterbox_params(
    orig_hw: tuple[int, int], input_hw: tuple[int, int]
) -> tuple[float, tuple[int, int], tuple[int, int, int, int]]:
    """Scale ratio, resized (w, h) and padding (top, bottom, left, right), as ultralytics does."""
    h, w = orig_hw
    r = min(input_hw[0] / h, input_hw[1] / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (input_hw[1] - new_w) / 2, (input_hw[0] - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return r, (new_w, new_h), (top, bottom, left, right)


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Camera frames are BGR8 or Mono8; the network was trained on 3-channel images."""
    if image.dtype != np.uint8:
        raise ModelError(f"image dtype {image.dtype} not supported; expected uint8 (Mono8/BGR8)")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ModelError(f"image shape {image.shape} not supported; expected HxW (mono) or HxWx3 (BGR)")


def letterbox(
    image: np.ndarray, input_hw: tuple[int, int]
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """BGR uint8 HxWx3 -> letterboxed BGR uint8 (input_h x input_w x 3), ratio, pad (left, top)."""
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ModelError(f"empty image {image.shape}")
    r, new_wh, (top, bottom, left, right) = letterbox_params((h, w), input_hw)
    if (w, h) != new_wh:
        image = cv2.resize(image, new_wh, interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(
        image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return out, r, (left, top)


def preprocess(image: np.ndarray, input_hw: tuple[int, int], dtype: type = np.float32) -> Prepared:
    """Frame image -> Prepared(1x3xHxW RGB in [0, 1])."""
    bgr = as_bgr(image)
    boxed, r, pad = letterbox(bgr, input_hw)
    tensor: np.ndarray = np.empty((1, 3, input_hw[0], input_hw[1]), dtype=dtype)
    # BGR->RGB and HWC->CHW: OpenCV splits the planes, then one contiguous scaled copy per plane
    # (30 % faster than dividing a strided RGB/CHW view, same values). Divide, not multiply by
    # 1/255, in float32: exactly as ultralytics' ``im.float().div_(255)``.
    for plane, channel in zip(cv2.split(boxed)[::-1], tensor[0], strict=True):
        np.divide(plane, np.float32(255.0), out=channel, dtype=np.float32, casting="unsafe")
    return Prepared(
        tensor=tensor,
        orig_shape=(bgr.shape[0], bgr.shape[1]),
        ratio=r,
        pad=(float(pad[0]), float(pad[1])),
    )
