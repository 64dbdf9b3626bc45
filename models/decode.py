"""YOLOv8-seg output decode in numpy/OpenCV (no torch, no ultralytics on the runtime path).

It reproduces ultralytics' predict for an exported ONNX model, step by step:

* ``non_max_suppression``: best class per anchor, ``score > conf``, class-aware greedy NMS done
  like ultralytics (boxes offset by ``class * 7680`` then torchvision's NMS, suppress when
  ``IoU > iou``), keep at most ``max_det``, highest score first;
* ``scale_boxes``: undo the letterbox with the per-axis gains of the rounded resized size, clip;
* ``process_mask_native`` (``retina_masks=True``): masks at the ORIGINAL resolution, from the mask
  logits ``coeffs @ protos``: bilinear upsample by 1/2/4, crop the letterbox padding, bilinear
  resize to the original size, ``> 0``, crop to the box (``x1 <= col < x2``); detections whose mask
  is empty are dropped.

The original-resolution path is the one the line needs (areas in real pixels, defect images).
Instead of resizing every mask to the full frame (a 5 MP frame x N detections), the two bilinear
steps are folded into one separable linear map per axis and evaluated only inside each box, which
gives the same numbers at a fraction of the cost. Tests compare this module against ultralytics'
own predict on the same ONNX file.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np
import structlog

from models.config import ModelSettings
from models.package import NUM_MASK_COEFFS, Manifest
from models.preprocess import letterbox_params
from models.types import Detection, ModelError, Prepared

log = structlog.get_logger(__name__)

MAX_WH = 7680
"""ultralytics' per-class box offset for class-aware NMS in one pass."""
MAX_NMS = 30000
"""ultralytics' cap on candidates entering NMS (top scores kept)."""
OUTLINE_EPSILON_PX = 1.0
"""approxPolyDP tolerance floor; the effective tolerance is max(this, 1% of the perimeter)."""
NMS_MATRIX_MAX = 512
"""Up to this many candidates NMS computes the whole IoU matrix at once (1 MB of float32 at
512); above it, one row per kept box, in memory linear in the candidates."""


@dataclass(frozen=True, slots=True)
class DecodeParams:
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300


def params_for(settings: ModelSettings, manifest: Manifest) -> DecodeParams:
    """Decode parameters of a runtime: config first, then the package's hints.

    The candidate floor must not exceed any decision threshold of the package, or detections
    the decision rules should see would be dropped before they get there.
    """
    conf = settings.conf_threshold
    if conf is None:
        hint = manifest.runtime_hints.get("conf_threshold")
        t = manifest.thresholds
        lowest = min([t.default, *t.per_class.values()])
        conf = min(float(hint) if isinstance(hint, (int, float)) else 0.25, lowest)
    return DecodeParams(conf=conf, iou=settings.iou_threshold, max_det=settings.max_det)


def limit_blas_threads(n: int | None) -> None:
    """Cap every loaded BLAS library (numpy's and OpenCV's OpenBLAS) at ``n`` threads.

    Process-wide on purpose: the only BLAS work in the daemon is this module's small products,
    and an idle-spinning BLAS pool steals the cores inference and I/O need.
    """
    if n is None:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.warning(
            "blas_threads_not_limited",
            hint="pip install threadpoolctl (a runtime dependency): without it OpenBLAS threads "
            "spin and slow inference on small machines",
        )
        return
    threadpool_limits(limits=n, user_api="blas")


_Cols = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""x1, y1, x2, y2, area of every box (float32)."""


def _iou(cols: _Cols, i: int | np.ndarray, j: np.ndarray) -> np.ndarray:
    """IoU of boxes ``i`` with boxes ``j`` (indices; shapes broadcast), in torchvision's float32
    arithmetic. Both NMS paths call it, so they cannot drift apart."""
    x1, y1, x2, y2, areas = cols
    zero = np.float32(0)
    w = np.maximum(np.minimum(x2[i], x2[j]) - np.maximum(x1[i], x1[j]), zero)
    h = np.maximum(np.minimum(y2[i], y2[j]) - np.maximum(y1[i], y1[j]), zero)
    inter = w * h
    return cast(np.ndarray, inter / (areas[i] + areas[j] - inter))


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_keep: int | None = None
) -> np.ndarray:
    """Greedy NMS with torchvision's semantics (float32 IoU, suppress when IoU > threshold).

    Returns kept indices ordered by decreasing score. Greedy NMS keeps in score order, so
    stopping at ``max_keep`` equals running it all and truncating (as ultralytics does).
    Up to NMS_MATRIX_MAX candidates every pairwise IoU is computed in one pass (the demo's 30-40
    candidates: 22-26 us instead of 50-94 us; 300: 1.1 ms instead of 2.2); above, one row per
    kept box.
    """
    n = boxes.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    boxes = boxes.astype(np.float32, copy=False)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    cols = (x1, y1, x2, y2, (x2 - x1) * (y2 - y1))
    order = np.argsort(-scores, kind="stable")
    thr = np.float64(iou_thres)
    if n <= NMS_MATRIX_MAX:
        over = _iou(cols, order[:, None], order) > thr  # [a, b]: in score order
        removed = np.zeros(n, dtype=bool)
        kept: list[int] = []
        for a in range(n):
            if removed[a]:
                continue
            kept.append(a)
            if len(kept) == max_keep:
                break
            removed |= over[a]
        return order[kept].astype(np.int64, copy=False)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if order.size == 1 or len(keep) == max_keep:
            break
        rest = order[1:]
        order = rest[~(_iou(cols, i, rest) > thr)]
    return np.asarray(keep, dtype=np.int64)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


_NOTHING = (
    _frozen(np.zeros((0, 4), np.float32)),
    _frozen(np.zeros(0, np.float32)),
    _frozen(np.zeros(0, np.int64)),
    _frozen(np.zeros((0, NUM_MASK_COEFFS), np.float32)),
)
"""What `select` returns without a candidate (shared, so read-only)."""


def select(
    pred: np.ndarray, nc: int, params: DecodeParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's output0 [4+nc+32, N] -> boxes xyxy (network px), scores, class ids, coeffs."""
    if pred.ndim != 2 or pred.shape[0] != 4 + nc + NUM_MASK_COEFFS:
        raise ModelError(
            f"output0 has shape {pred.shape}; "
            f"expected [{4 + nc + NUM_MASK_COEFFS}, N] for {nc} classes"
        )
    pred = pred.astype(np.float32, copy=False)
    cls_scores = pred[4 : 4 + nc]
    # Most frames of a line hold no candidate at all: one reduction answers that (~20 us right
    # after an inference, against ~50 for the three steps below). NaN goes the long way.
    if cls_scores.max() <= params.conf:
        return _NOTHING
    cand = np.flatnonzero(cls_scores.max(axis=0) > params.conf)
    if cand.size == 0:
        return _NOTHING
    x = pred[:, cand].T  # (k, 4+nc+32)
    xy, wh = x[:, :2], x[:, 2:4] / 2
    boxes = np.concatenate([xy - wh, xy + wh], axis=1)
    j = x[:, 4 : 4 + nc].argmax(axis=1)
    scores = x[np.arange(x.shape[0]), 4 + j]
    coeffs = x[:, 4 + nc :]
    if scores.shape[0] > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        boxes, scores, j, coeffs = boxes[top], scores[top], j[top], coeffs[top]
    offset = (j.astype(np.float32) * np.float32(MAX_WH))[:, None]
    keep = nms(boxes + offset, scores, params.iou, params.max_det)
    return boxes[keep], scores[keep], j[keep].astype(np.int64), coeffs[keep]


def scale_boxes(
    boxes: np.ndarray, input_hw: tuple[int, int], orig_hw: tuple[int, int]
) -> np.ndarray:
    """Network-pixel xyxy -> original-pixel xyxy (ultralytics ``scale_boxes``), clipped."""
    h0, w0 = orig_hw
    gain = min(input_hw[0] / h0, input_hw[1] / w0)
    new_h, new_w = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
    gain_y, gain_x = new_h / h0, new_w / w0
    pad_x = round((input_hw[1] - new_w) / 2 - 0.1)
    pad_y = round((input_hw[0] - new_h) / 2 - 0.1)
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - np.float32(pad_x)) / np.float32(gain_x)
    out[:, [1, 3]] = (out[:, [1, 3]] - np.float32(pad_y)) / np.float32(gain_y)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w0)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h0)
    return out


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's bilinear resize along one axis (align_corners=False)."""
    # float32 index arithmetic, as torch's CPU kernel (opmath float) does it for float32 tensors.
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = np.maximum((np.arange(n_out, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = (src - i0.astype(f32)).astype(np.float64)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - l1)
    np.add.at(m, (rows, i1), l1)
    return m


def _axis_maps(
    proto_hw: tuple[int, int], orig_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis linear maps proto -> original pixels, as ultralytics ``process_mask_native``.

    Upsample by f in {1, 2, 4} (so the letterbox padding falls on whole pixels), crop the padding
    (``scale_masks``), bilinear resize to the original size. Returns (A (H0, mh), B (W0, mw)).
    """
    mh, mw = proto_hw
    h, w = orig_hw
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    uh, uw = f * mh, f * mw
    up_y = _bilinear_matrix(mh, uh) if f > 1 else np.eye(mh)
    up_x = _bilinear_matrix(mw, uw) if f > 1 else np.eye(mw)
    if (uh, uw) == (h, w):
        return up_y.astype(np.float32), up_x.astype(np.float32)
    g = min(uh / h, uw / w)
    pad_w, pad_h = (uw - max(round(w * g), 1)) / 2, (uh - max(round(h * g), 1)) / 2
    top, left = round(pad_h - 0.1), round(pad_w - 0.1)
    bottom, right = top + max(round(h * g), 1), left + max(round(w * g), 1)
    a = _bilinear_matrix(bottom - top, h) @ up_y[top:bottom]
    b = _bilinear_matrix(right - left, w) @ up_x[left:right]
    return a.astype(np.float32), b.astype(np.float32)


def _band(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: first and one-past-last nonzero column (the rows are monotonic bands)."""
    nz = m != 0
    lo = nz.argmax(axis=1)
    hi = m.shape[1] - nz[:, ::-1].argmax(axis=1)
    return lo, hi


_Maps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class MaskMapper:
    """Caches the per-axis maps (and their bands) per (proto size, frame size).

    Cameras rarely change size, so this is computed once per camera, not per frame.
    """

    def __init__(self, max_entries: int = 16) -> None:
        self._cache: dict[tuple[int, int, int, int], _Maps] = {}
        self._max = max_entries
        self._lock = threading.Lock()  # postprocess runs in several inference threads

    def maps(self, proto_hw: tuple[int, int], orig_hw: tuple[int, int]) -> _Maps:
        """(A, A_lo, A_hi, B, B_lo, B_hi): maps and their per-row nonzero column spans."""
        key = (*proto_hw, *orig_hw)
        with self._lock:
            got = self._cache.get(key)
        if got is None:
            a, b = _axis_maps(proto_hw, orig_hw)
            got = (a, *_band(a), b, *_band(b))
            with self._lock:
                if len(self._cache) >= self._max:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = got
        return got


def _outline(roi: np.ndarray, offset: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    contours, _ = cv2.findContours(
        roi.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=offset
    )
    if not contours:
        return ()
    c = max(contours, key=cv2.contourArea)
    eps = max(OUTLINE_EPSILON_PX, 0.01 * cv2.arcLength(c, True))
    poly = cv2.approxPolyDP(c, eps, True).reshape(-1, 2)
    points = cast(list[list[int]], poly.tolist())  # 7x faster than int() per numpy scalar
    return tuple((x, y) for x, y in points)


def outlined(det: Detection) -> Detection:
    """``det`` with its outline drawn from its mask, and the mask dropped.

    The outline is a third of a frame's decode time and only the detections a decision counts
    carry one into an event, so the pipeline decodes with ``outlines=False`` and outlines these
    afterwards. A detection without a mask (decoded without one, or outlined already) is
    returned as it is.
    """
    if det.mask is None:
        return det
    outline = det.outline or _outline(det.mask, det.mask_origin)
    return dataclasses.replace(det, mask=None, outline=outline)


def decode_image(
    pred: np.ndarray,
    protos: np.ndarray,
    orig_hw: tuple[int, int],
    input_hw: tuple[int, int],
    class_names: Sequence[str],
    params: DecodeParams,
    *,
    masks: bool = True,
    outlines: bool = True,
    mapper: MaskMapper | None = None,
) -> list[Detection]:
    """Decode one image: pred [4+nc+32, N], protos [32, mh, mw] -> detections, best first.

    Areas are always computed (the decision needs them); the box-local boolean mask is kept
    only when ``masks`` is True, the outline drawn only when ``outlines`` is True (`outlined`
    draws it later from the mask).
    """
    nc = len(class_names)
    if protos.ndim != 3 or protos.shape[0] != NUM_MASK_COEFFS:
        raise ModelError(
            f"output1 has shape {protos.shape}; expected [{NUM_MASK_COEFFS}, H/4, W/4]"
        )
    boxes_in, scores, cls, coeffs = select(pred, nc, params)
    if scores.size == 0:
        return []
    boxes = scale_boxes(boxes_in, input_hw, orig_hw)
    mh, mw = protos.shape[1:]
    a, a_lo, a_hi, b, b_lo, b_hi = (mapper or MaskMapper()).maps((mh, mw), orig_hw)
    logits = (coeffs @ protos.astype(np.float32, copy=False).reshape(NUM_MASK_COEFFS, -1)).reshape(
        -1, mh, mw
    )
    h0, w0 = orig_hw
    out: list[Detection] = []
    for k in range(scores.shape[0]):
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        r0, r1 = min(math.ceil(y1), h0), min(math.ceil(y2), h0)
        c0, c1 = min(math.ceil(x1), w0), min(math.ceil(x2), w0)
        if r1 <= r0 or c1 <= c0:
            continue  # empty crop -> empty mask: ultralytics drops it too
        # Both maps are banded: only a few proto rows/cols feed the box, skip the exact zeros.
        j0, j1 = int(a_lo[r0]), int(a_hi[r1 - 1])
        i0, i1 = int(b_lo[c0]), int(b_hi[c1 - 1])
        roi = (a[r0:r1, j0:j1] @ logits[k, j0:j1, i0:i1] @ b[c0:c1, i0:i1].T) > 0
        area = int(np.count_nonzero(roi))
        if area == 0:
            continue
        out.append(
            Detection(
                class_id=int(cls[k]),
                class_name=class_names[int(cls[k])],
                score=float(scores[k]),
                box=(x1, y1, x2, y2),
                area_px=area,
                mask=roi if masks else None,
                mask_origin=(c0, r0),
                outline=_outline(roi, (c0, r0)) if outlines else (),
            )
        )
    return out


def postprocess(
    outputs: Sequence[np.ndarray],
    prepared: Sequence[Prepared],
    class_names: Sequence[str],
    input_hw: tuple[int, int],
    params: DecodeParams,
    *,
    masks: bool = True,
    outlines: bool = True,
    mapper: MaskMapper | None = None,
) -> list[list[Detection]]:
    """Batch decode: outputs = [output0 (B, 4+nc+32, N), output1 (B, 32, mh, mw)]."""
    if len(outputs) != 2:
        raise ModelError(f"expected 2 model outputs (detections, prototypes), got {len(outputs)}")
    out0, out1 = outputs
    if (
        out0.ndim != 3
        or out1.ndim != 4
        or out0.shape[0] < len(prepared)
        or out1.shape[0] < len(prepared)
    ):
        raise ModelError(
            f"output shapes {out0.shape} / {out1.shape} do not hold a batch of {len(prepared)}"
        )
    mapper = mapper or MaskMapper()
    return [
        decode_image(
            out0[i],
            out1[i],
            p.orig_shape,
            input_hw,
            class_names,
            params,
            masks=masks,
            outlines=outlines,
            mapper=mapper,
        )
        for i, p in enumerate(prepared)
    ]


__all__ = [
    "DecodeParams",
    "MaskMapper",
    "decode_image",
    "letterbox_params",
    "limit_blas_threads",
    "nms",
    "outlined",
    "params_for",
    "postprocess",
    "scale_boxes",
    "select",
]
