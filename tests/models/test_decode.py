"""Unit checks of the numpy pre/post-processing against the reference implementations it mirrors.

Each piece is compared with the code ultralytics (or torchvision, which ultralytics calls) runs
in its own predict: the letterbox, the NMS, the box rescale and the bilinear mask resize.
The end-to-end comparison on a real model is in test_decode_equivalence.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from models.decode import (
    DecodeParams,
    _axis_maps,
    _bilinear_matrix,
    decode_image,
    nms,
    outlined,
    scale_boxes,
    select,
)
from models.package import NUM_MASK_COEFFS
from models.preprocess import letterbox, preprocess
from models.types import ModelError

SHAPES = [(256, 256), (240, 320), (320, 240), (457, 123), (97, 161), (1200, 1920), (1, 5), (33, 7)]
INPUTS = [(320, 320), (256, 320), (640, 640)]


@pytest.mark.parametrize("input_hw", INPUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_letterbox_is_ultralytics_letterbox(
    ultralytics_offline: Path, shape: tuple[int, int], input_hw: tuple[int, int]
) -> None:
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, ratio, pad = letterbox(img, input_hw)
    ref = LetterBox(input_hw, auto=False, stride=32)(image=img)
    assert ours.shape == (*input_hw, 3)
    np.testing.assert_array_equal(ours, ref)
    assert ratio == pytest.approx(min(input_hw[0] / shape[0], input_hw[1] / shape[1]))
    assert all(p >= 0 for p in pad)


def test_preprocess_tensor_is_ultralytics_tensor(ultralytics_offline: Path) -> None:
    """RGB order, CHW, float32 /255, identical to the tensor ultralytics feeds its model."""
    import torch
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (123, 457, 3), dtype=np.uint8)
    p = preprocess(img, (320, 320))
    boxed = LetterBox((320, 320), auto=False, stride=32)(image=img)
    ref = torch.from_numpy(boxed).unsqueeze(0).permute(0, 3, 1, 2).flip(1).float().div_(255)
    assert p.tensor.dtype == np.float32 and p.tensor.flags.c_contiguous
    np.testing.assert_array_equal(p.tensor, ref.numpy())
    assert p.orig_shape == (123, 457)


def test_mono_input_equals_its_bgr_expansion() -> None:
    rng = np.random.default_rng(2)
    mono = rng.integers(0, 256, (200, 300), dtype=np.uint8)
    bgr = np.repeat(mono[:, :, None], 3, axis=2)
    a = preprocess(mono, (320, 320))
    b = preprocess(bgr, (320, 320))
    c = preprocess(mono[:, :, None], (320, 320))
    np.testing.assert_array_equal(a.tensor, b.tensor)
    np.testing.assert_array_equal(a.tensor, c.tensor)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10,), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
    ],
    ids=["bgra", "float", "1d", "empty"],
)
def test_bad_images_raise_model_error(bad: np.ndarray) -> None:
    with pytest.raises(ModelError, match=r"image|shape|dtype"):
        preprocess(bad, (320, 320))


def _random_boxes(rng: np.random.Generator, n: int, span: float = 300.0) -> np.ndarray:
    xy = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(2, 80, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [40, 400, 1000])  # the IoU-matrix path up to 512, rows above
def test_nms_matches_torchvision(iou: float, seed: int, n: int) -> None:
    import torch
    import torchvision

    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, n)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, iou), ref)


@pytest.mark.parametrize("max_keep", [None, 1, 7, 50])
def test_nms_matrix_and_row_paths_agree_on_odd_boxes(
    monkeypatch: pytest.MonkeyPatch, max_keep: int | None
) -> None:
    """Tied scores, duplicate boxes and zero-area boxes (IoU 0/0) give the same kept boxes, in
    the same order, whichever path runs."""
    import models.decode as decode

    rng = np.random.default_rng(11)
    boxes = _random_boxes(rng, 300, span=60.0)
    boxes[50:60] = boxes[40]  # duplicates
    boxes[70:80, 2:] = boxes[70:80, :2]  # zero area
    scores = rng.choice(np.float32([0.3, 0.5, 0.9]), 300)  # ties everywhere
    with np.errstate(invalid="ignore"):
        matrix = nms(boxes, scores, 0.5, max_keep)
        monkeypatch.setattr(decode, "NMS_MATRIX_MAX", 0)
        rows = nms(boxes, scores, 0.5, max_keep)
    np.testing.assert_array_equal(matrix, rows)
    assert matrix.dtype == np.int64 and (max_keep is None or matrix.size <= max_keep)


def test_nms_handles_empty_and_single() -> None:
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).size == 0
    np.testing.assert_array_equal(
        nms(np.array([[0, 0, 1, 1]], np.float32), np.array([0.9], np.float32), 0.5), [0]
    )


def _fake_output(
    rng: np.random.Generator, nc: int, n: int, input_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A plausible raw YOLOv8-seg output: clustered boxes, sparse class scores, mask logits."""
    centers = rng.uniform(20, min(input_hw) - 20, (6, 2))
    pick = rng.integers(0, 6, n)
    xy = centers[pick] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(8, 60, (n, 2))
    cls = rng.uniform(0, 0.2, (nc, n))
    hot = rng.integers(0, nc, n)
    cls[hot, np.arange(n)] = rng.uniform(0, 1, n)
    coeffs = rng.normal(0, 1, (NUM_MASK_COEFFS, n))
    pred = np.concatenate([xy.T, wh.T, cls, coeffs]).astype(np.float32)
    protos = rng.normal(0, 1, (NUM_MASK_COEFFS, input_hw[0] // 4, input_hw[1] // 4))
    return pred, protos.astype(np.float32)


@pytest.mark.parametrize("orig", [(240, 320), (457, 123), (600, 960), (320, 320)])
def test_decode_matches_ultralytics_ops_on_synthetic_outputs(
    ultralytics_offline: Path, orig: tuple[int, int]
) -> None:
    """Full decode vs ultralytics' non_max_suppression + scale_boxes + process_mask_native."""
    import torch
    from ultralytics.utils import nms as unms
    from ultralytics.utils import ops

    input_hw, nc = (320, 320), 4
    rng = np.random.default_rng(orig[0])
    pred, protos = _fake_output(rng, nc, 2100, input_hw)
    params = DecodeParams(conf=0.25, iou=0.7, max_det=300)
    names = [f"c{i}" for i in range(nc)]
    ours = decode_image(pred, protos, orig, input_hw, names, params)

    det = unms.non_max_suppression(torch.from_numpy(pred[None]), 0.25, 0.7, max_det=300, nc=nc)[0]
    det[:, :4] = ops.scale_boxes(input_hw, det[:, :4], orig)
    masks = ops.process_mask_native(torch.from_numpy(protos), det[:, 6:], det[:, :4], orig)
    keep = masks.amax((-2, -1)) > 0
    det, masks = det[keep], masks[keep].numpy().astype(bool)

    assert len(ours) == len(det) > 0
    for d, ref, m in zip(ours, det.numpy(), masks, strict=True):
        np.testing.assert_allclose(d.box, ref[:4], atol=1e-3)
        assert d.score == pytest.approx(float(ref[4]), abs=1e-6)
        assert d.class_id == int(ref[5])
        full = d.full_mask(orig)
        assert full is not None and full.shape == orig
        inter = np.logical_and(full, m).sum()
        union = np.logical_or(full, m).sum()
        assert inter / union > 0.995
        assert d.area_px == int(full.sum())


@pytest.mark.parametrize(("n_in", "n_out"), [(80, 320), (80, 240), (320, 123), (160, 1920), (7, 3)])
def test_bilinear_matrix_matches_torch_interpolate(n_in: int, n_out: int) -> None:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(n_in + n_out)
    x = rng.normal(0, 1, (5, n_in)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None, :, :, None], (n_out, 1), mode="bilinear")
    ours = x @ _bilinear_matrix(n_in, n_out).T
    # Same sample positions and weights; only float32 rounding (FMA, summation order) differs.
    np.testing.assert_allclose(ours, ref[0, :, :, 0].numpy(), atol=1e-4)


def test_axis_maps_reproduce_native_mask_resize(ultralytics_offline: Path) -> None:
    """The folded per-axis maps give the logits ultralytics computes at full resolution."""
    import math

    import torch
    import torch.nn.functional as F
    from ultralytics.utils import ops

    rng = np.random.default_rng(3)
    mh, mw, orig = 80, 80, (457, 123)
    logits = rng.normal(0, 1, (mh, mw)).astype(np.float32)
    a, b = _axis_maps((mh, mw), orig)
    ours = a @ logits @ b.T
    # Reference: the steps of ultralytics.utils.ops.process_mask_native before thresholding.
    h, w = orig
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    c = torch.from_numpy(logits)[None, None]
    c = F.interpolate(c, scale_factor=f, mode="bilinear") if f > 1 else c
    ref = ops.scale_masks(c, orig)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_scale_boxes_matches_ultralytics(ultralytics_offline: Path) -> None:
    import torch
    from ultralytics.utils import ops

    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, 50, 280)
    for orig in [(457, 123), (240, 320), (1200, 1920)]:
        ref = np.asarray(ops.scale_boxes((320, 320), torch.from_numpy(boxes.copy()), orig))
        np.testing.assert_allclose(scale_boxes(boxes, (320, 320), orig), ref, atol=1e-4)


def test_decode_rejects_wrong_output_shapes() -> None:
    names = ["a", "b"]
    with pytest.raises(ModelError, match="output0"):
        decode_image(
            np.zeros((4 + 3 + 32, 10), np.float32),
            np.zeros((32, 8, 8), np.float32),
            (32, 32),
            (32, 32),
            names,
            DecodeParams(),
        )
    with pytest.raises(ModelError, match="output1"):
        decode_image(
            np.zeros((4 + 2 + 32, 10), np.float32),
            np.zeros((16, 8, 8), np.float32),
            (32, 32),
            (32, 32),
            names,
            DecodeParams(),
        )


def test_max_det_and_conf_are_applied() -> None:
    rng = np.random.default_rng(5)
    pred, protos = _fake_output(rng, 3, 2100, (320, 320))
    names = ["a", "b", "c"]
    many = decode_image(pred, protos, (320, 320), (320, 320), names, DecodeParams(conf=0.05))
    few = decode_image(
        pred, protos, (320, 320), (320, 320), names, DecodeParams(conf=0.05, max_det=3)
    )
    strict = decode_image(pred, protos, (320, 320), (320, 320), names, DecodeParams(conf=0.9))
    assert len(many) > 3 and len(few) <= 3
    assert [d.score for d in few] == [d.score for d in many[: len(few)]]
    assert all(d.score > 0.9 for d in strict)
    assert all(a.score >= b.score for a, b in itertools.pairwise(many))


def test_a_frame_without_candidates_and_nan_scores_take_the_right_path() -> None:
    """No score above the floor: nothing, from the shared read-only empties. A NaN score of one
    anchor must not hide the candidates of the others (the one-reduction shortcut skips it)."""
    rng = np.random.default_rng(8)
    pred, protos = _fake_output(rng, 2, 2100, (320, 320))
    args = ((320, 320), (320, 320), ["a", "b"], DecodeParams(conf=0.25))
    full = decode_image(pred, protos, *args)
    assert full
    quiet = pred.copy()
    quiet[4:6] = np.minimum(quiet[4:6], 0.2)
    assert decode_image(quiet, protos, *args) == []
    boxes, *_ = select(quiet, 2, DecodeParams(conf=0.25))
    assert boxes.shape == (0, 4) and not boxes.flags.writeable
    nan = pred.copy()
    weak = int(np.argmin(pred[4:6].max(axis=0)))  # an anchor far below the floor
    nan[4, weak] = np.nan
    assert [(d.score, d.box, d.area_px) for d in decode_image(nan, protos, *args)] == [
        (d.score, d.box, d.area_px) for d in full
    ]


def test_outline_is_a_polygon_inside_the_mask_box() -> None:
    rng = np.random.default_rng(6)
    pred, protos = _fake_output(rng, 2, 2100, (320, 320))
    dets = decode_image(pred, protos, (480, 640), (320, 320), ["a", "b"], DecodeParams())
    assert dets
    for d in dets:
        assert len(d.outline) >= 3 or d.area_px < 4
        x1, y1, x2, y2 = d.box
        for x, y in d.outline:
            assert x1 - 1 <= x <= x2 + 1 and y1 - 1 <= y <= y2 + 1
    no_masks = decode_image(
        pred, protos, (480, 640), (320, 320), ["a", "b"], DecodeParams(), masks=False
    )
    assert [d.area_px for d in no_masks] == [d.area_px for d in dets]
    assert all(d.mask is None for d in no_masks)


def test_an_outline_drawn_later_from_the_mask_is_the_one_decode_draws() -> None:
    """The pipeline decodes without outlines and outlines only what its decision counted."""
    rng = np.random.default_rng(7)
    pred, protos = _fake_output(rng, 2, 2100, (320, 320))
    args = (pred, protos, (480, 640), (320, 320), ["a", "b"], DecodeParams())
    full = decode_image(*args)
    bare = decode_image(*args, outlines=False)
    assert len(full) > 3 and all(d.outline == () and d.mask is not None for d in bare)
    same = [(d.score, d.area_px, d.box) for d in full]
    assert [(d.score, d.area_px, d.box) for d in bare] == same
    later = [outlined(d) for d in bare]
    assert [d.outline for d in later] == [d.outline for d in full]
    assert all(d.mask is None for d in later)
    assert outlined(later[0]) is later[0]  # no mask left: nothing to do


def test_conf_floor_never_exceeds_a_decision_threshold() -> None:
    from models.config import ModelSettings
    from models.decode import params_for
    from models.package import Manifest

    def manifest(hints: dict[str, float], per_class: dict[str, float]) -> Manifest:
        return Manifest.model_validate(
            {
                "name": "n",
                "version": "1",
                "plc_model_id": 1,
                "classes": ["a", "b"],
                "input_size": [320, 320],
                "model_file": "m.onnx",
                "files": {"m.onnx": {"sha256": "0" * 64, "bytes": 1}},
                "created_at": "2026-01-01T00:00:00Z",
                "runtime_hints": hints,
                "thresholds": {"default": 0.5, "per_class": per_class},
            }
        )

    s = ModelSettings(package=Path("unused"))
    assert params_for(s, manifest({}, {})).conf == 0.25
    assert params_for(s, manifest({}, {"b": 0.1})).conf == 0.1
    assert params_for(s, manifest({"conf_threshold": 0.05}, {})).conf == 0.05
    assert params_for(s, manifest({"conf_threshold": 0.4}, {"a": 0.3})).conf == 0.3
    explicit = ModelSettings(package=Path("unused"), conf_threshold=0.6, iou_threshold=0.5)
    p = params_for(explicit, manifest({"conf_threshold": 0.05}, {}))
    assert (p.conf, p.iou) == (0.6, 0.5)


@pytest.mark.parametrize("shape", [(320, 320), (240, 320), (200, 300)])
def test_read_only_and_strided_frames_are_accepted(shape: tuple[int, int]) -> None:
    """Replay/camera frames may be read-only shared arrays or views; preprocess must not write."""
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ro = img.copy()
    ro.flags.writeable = False
    strided = np.ascontiguousarray(np.concatenate([img, img], axis=1))[:, ::2]
    ref = preprocess(img, (320, 320)).tensor
    np.testing.assert_array_equal(preprocess(ro, (320, 320)).tensor, ref)
    assert preprocess(strided, (320, 320)).tensor.shape == ref.shape
    np.testing.assert_array_equal(ro, img)
