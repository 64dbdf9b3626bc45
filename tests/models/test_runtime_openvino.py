"""The OpenVINO runtime: selected through the registry, and deciding like ONNX Runtime (f32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.config import ModelSettings
from models.loader import load_detector
from models.openvino_runtime import OpenVinoDetector
from models.runtimes import OnnxRuntimeSettings, OpenVinoSettings
from models.types import ModelError, ModelPackageError

ImageFactory = Callable[[list[tuple[int, int]], int], list[np.ndarray]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def test_openvino_f32_detections_equal_onnxruntime(
    demo_package: Path, synthetic_images: ImageFactory
) -> None:
    ov = load_detector(
        ModelSettings(
            package=demo_package,
            runtime="openvino",
            openvino=OpenVinoSettings(threads=1),
            max_batch=3,
            warmup_runs=1,
        )
    )
    ort = load_detector(
        ModelSettings(
            package=demo_package,
            onnxruntime=OnnxRuntimeSettings(intra_op_threads=1),
            max_batch=3,
            warmup_runs=0,
        )
    )
    assert isinstance(ov, OpenVinoDetector) and ov.info.runtime == "openvino"
    assert ov.precision == "f32"
    assert ov.info.digest == ort.info.digest
    images = synthetic_images([(256, 256), (480, 640), (600, 300), (256, 256)], 31)
    compared = 0
    for img in images:
        a = ort.detect(img)  # type: ignore[attr-defined]
        b = ov.detect(img)  # type: ignore[attr-defined]
        assert [d.class_name for d in a] == [d.class_name for d in b]
        for da, db in zip(a, b, strict=True):
            assert db.score == pytest.approx(da.score, abs=2e-3)
            assert np.allclose(db.box, da.box, atol=0.5)
            assert _iou(da.full_mask(img.shape), db.full_mask(img.shape)) > 0.95
            compared += 1
    assert compared > 0  # the images have defects: something was compared
    # A batch larger than the export's fixed batch of 1 runs chunked, same outputs.
    preps = [ov.preprocess(i) for i in images[:3]]
    batch = np.concatenate([p.tensor for p in preps])
    outs = ov.infer(batch)
    single = ov.infer(preps[1].tensor)
    assert outs[0].shape[0] == 3
    np.testing.assert_allclose(outs[0][1], single[0][0], atol=1e-4)
    ov.close()
    ort.close()
    with pytest.raises(ModelError, match="closed"):
        ov.infer(preps[0].tensor)


def test_openvino_refuses_a_manifest_that_disagrees(package_copy: Path, reseal: object) -> None:
    import json

    m = json.loads((package_copy / "manifest.json").read_text())
    m["classes"] = [*m["classes"], "dent"]
    (package_copy / "manifest.json").write_text(json.dumps(m))
    reseal(package_copy)  # type: ignore[operator]
    with pytest.raises(ModelPackageError, match="predicts 4"):
        load_detector(ModelSettings(package=package_copy, runtime="openvino", warmup_runs=0))


def test_openvino_section_is_validated(demo_package: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        ModelSettings.model_validate(
            {"package": str(demo_package), "runtime": "openvino", "openvino": {"precision": "i8"}}
        )
    with pytest.raises(ValueError, match=r"model\.openvino is set"):
        ModelSettings.model_validate({"package": str(demo_package), "openvino": {"threads": 1}})
