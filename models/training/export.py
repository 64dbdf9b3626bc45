"""Export a trained checkpoint to the ONNX file the appliance runs (and check it opens)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnxruntime as ort

from models.training import ultra_env

EXPECTED_OUTPUTS = ("output0", "output1")


def export_onnx(weights: Path, out: Path, *, imgsz: int = 256, opset: int = 17) -> Path:
    """Static-shape (batch 1), simplified ONNX as the runtimes expect; returns ``out``.

    Raises ValueError when the exported graph lacks the YOLOv8-seg outputs (e.g. a detect-only
    checkpoint was given).
    """
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such checkpoint (train first: `edge model train`)")
    model = ultra_env.yolo(weights)
    produced = Path(
        model.export(
            format="onnx",
            imgsz=imgsz,
            opset=opset,
            simplify=True,
            dynamic=False,
            half=False,
            batch=1,
            device="cpu",
        )
    )
    sess = ort.InferenceSession(str(produced), providers=["CPUExecutionProvider"])
    names = tuple(o.name for o in sess.get_outputs())
    if names != EXPECTED_OUTPUTS:
        raise ValueError(
            f"{produced}: outputs {names}, expected {EXPECTED_OUTPUTS} (not a -seg model?)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    if produced.resolve() != out.resolve():
        shutil.copyfile(produced, out)
    return out
