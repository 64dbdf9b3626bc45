"""Evaluate a model the way the line will use it.

Two views: detection quality (box and mask mAP50 / mAP50-95, by ultralytics' validator on the
exported ONNX file, i.e. the bytes that ship) and the line's real metric, image-level OK/DEFECT,
computed through the appliance's own runtime (package -> loader -> OnnxDetector -> numpy decode),
so the numbers describe the decoder the daemon runs, not ultralytics' predictor.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import structlog

from models.config import ModelSettings, OnnxRuntimeSettings
from models.datasets.yolo import class_names, label_path_for, load_data_yaml, split_images
from models.loader import load_detector
from models.package import load_package, write_package
from models.training import ultra_env
from models.training.gate import GateCriteria, GateDecision, judge
from models.training.operating_point import OperatingPoint, choose_threshold, confusion_at
from models.types import Detection

log = structlog.get_logger(__name__)

Progress = Callable[[int], None]
DEFAULT_FLOOR = 0.05
"""Decoder confidence floor during evaluation: image scores below it count as 'no detection'."""


@dataclass(slots=True)
class ImageScores:
    """Per-image results of one split: the score that decides OK/DEFECT and the truth."""

    files: list[str]
    scores: np.ndarray
    defect: np.ndarray
    top_class: list[str | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "scores": [round(float(s), 6) for s in self.scores],
            "defect": [bool(d) for d in self.defect],
            "top_class": self.top_class,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageScores:
        return cls(
            list(d["files"]),
            np.asarray(d["scores"], np.float64),
            np.asarray(d["defect"], bool),
            list(d.get("top_class", [])),
        )


def onnx_input_hw(model: Path) -> tuple[int, int]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    if not (isinstance(shape[2], int) and isinstance(shape[3], int)):
        raise ValueError(f"{model}: dynamic input size {shape}; export with dynamic=False")
    return int(shape[2]), int(shape[3])


def image_score(
    dets: Sequence[Detection], min_area_px: Mapping[str, int]
) -> tuple[float, str | None]:
    """The image's decisive score: best detection that is large enough to count."""
    best, cls = 0.0, None
    for d in dets:
        if d.area_px >= min_area_px.get(d.class_name, 0) and d.score > best:
            best, cls = d.score, d.class_name
    return best, cls


def score_images(
    package_dir: Path,
    images: Sequence[Path],
    *,
    floor: float = DEFAULT_FLOOR,
    min_area_px: Mapping[str, int] | None = None,
    threads: int = 2,
    progress: Progress | None = None,
) -> ImageScores:
    """Run the appliance runtime over ``images``; truth = the image's label file is non-empty."""
    settings = ModelSettings(
        package=package_dir,
        runtime="onnxruntime",
        onnxruntime=OnnxRuntimeSettings(intra_op_threads=threads),
        conf_threshold=floor,
        warmup_runs=1,
    )
    det = load_detector(settings)
    scores, truth, files, tops = [], [], [], []
    try:
        for path in images:
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError(f"{path}: unreadable image")
            prep = det.preprocess(img)
            out = det.infer(prep.tensor)
            dets = det.postprocess(out, [prep], masks=False)[0]
            s, c = image_score(dets, min_area_px or {})
            lbl = label_path_for(path)
            scores.append(s)
            truth.append(lbl.exists() and lbl.read_text().strip() != "")
            files.append(path.name)
            tops.append(c)
            if progress:
                progress(1)
    finally:
        det.close()
    return ImageScores(files, np.asarray(scores), np.asarray(truth, bool), tops)


def detection_metrics(model: Path, data: Path, split: str, imgsz: int) -> dict[str, float]:
    """Box and mask mAP by ultralytics' validator, run on the ONNX file itself."""
    ultra_env.prepare()
    yolo = ultra_env.yolo(model)
    with tempfile.TemporaryDirectory(prefix="edge-val-") as tmp:
        m = yolo.val(
            data=str(data),
            split=split,
            imgsz=imgsz,
            batch=1,
            device="cpu",
            plots=False,
            save_json=False,
            project=tmp,
            name="val",
            verbose=False,
            workers=0,
        )
    out = {
        "box_map50": float(m.box.map50),
        "box_map50_95": float(m.box.map),
        "mask_map50": float(m.seg.map50),
        "mask_map50_95": float(m.seg.map),
        "box_precision": float(m.box.mp),
        "box_recall": float(m.box.mr),
    }
    names = m.names
    for i, ci in enumerate(m.box.ap_class_index):
        out[f"box_map50_{names[int(ci)]}"] = float(m.box.ap50[i])
        out[f"mask_map50_{names[int(ci)]}"] = float(m.seg.ap50[i])
    return out


def provisional_package(
    model: Path,
    data: Path,
    out: Path,
    *,
    name: str = "candidate",
    version: str = "0",
    floor: float = DEFAULT_FLOOR,
) -> Path:
    """Wrap a bare ONNX into a package so it can be scored through the daemon's own loader."""
    names = class_names(load_data_yaml(data))
    return write_package(
        out,
        model,
        overwrite=True,
        name=name,
        version=version,
        plc_model_id=0,
        classes=names,
        input_size=list(onnx_input_hw(model)),
        thresholds={"default": max(floor, 0.01)},
    )


@dataclass(slots=True)
class EvalReport:
    """Everything needed to choose an operating point, gate, and package (stored as JSON)."""

    model: str
    model_sha256: str
    data: str
    imgsz: int
    floor: float
    detection: dict[str, dict[str, float]]
    """split -> metrics."""
    images: dict[str, ImageScores]
    min_area_px: dict[str, int] = field(default_factory=dict)
    operating_point: dict[str, Any] | None = None
    test_point: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "data": self.data,
            "imgsz": self.imgsz,
            "floor": self.floor,
            "detection": self.detection,
            "images": {k: v.as_dict() for k, v in self.images.items()},
            "min_area_px": self.min_area_px,
            "operating_point": self.operating_point,
            "test_point": self.test_point,
            "gate": self.gate,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no evaluation report; run `edge model evaluate` first"
            )
        d = json.loads(path.read_text())
        return cls(
            d["model"],
            d["model_sha256"],
            d["data"],
            int(d["imgsz"]),
            float(d["floor"]),
            d["detection"],
            {k: ImageScores.from_dict(v) for k, v in d["images"].items()},
            dict(d.get("min_area_px") or {}),
            d.get("operating_point"),
            d.get("test_point"),
            d.get("gate"),
        )

    def choose(
        self,
        recall_target: float,
        criteria: GateCriteria | None = None,
        choose_on: str = "val",
        judge_on: str = "test",
    ) -> tuple[OperatingPoint, OperatingPoint, GateDecision]:
        """Pick the threshold on ``choose_on``, apply it to ``judge_on``, gate the result."""
        v = self.images[choose_on]
        op = choose_threshold(v.scores, v.defect, recall_target, floor=self.floor)
        t = self.images[judge_on]
        tp = confusion_at(t.scores, t.defect, op.threshold)
        decision = judge(tp, criteria, self.detection.get(judge_on))
        self.operating_point = {**op.as_dict(), "split": choose_on}
        self.test_point = {**tp.as_dict(), "split": judge_on}
        self.gate = decision.as_dict()
        return op, tp, decision


def evaluate(
    model: Path,
    data: Path,
    *,
    splits: Sequence[str] = ("val", "test"),
    floor: float = DEFAULT_FLOOR,
    min_area_px: Mapping[str, int] | None = None,
    with_map: bool = True,
    threads: int = 2,
    progress: Callable[[str, int], Progress] | None = None,
) -> EvalReport:
    """Evaluate an ONNX file or a package dir on ``splits`` of the data set.

    ``progress(label, total)`` returns a per-image tick function (the CLI draws a bar with it).
    """
    doc = load_data_yaml(data)
    data_yaml = data / "data.yaml" if data.is_dir() else data
    with tempfile.TemporaryDirectory(prefix="edge-eval-") as tmp:
        if model.is_dir() or model.name == "manifest.json":
            pkg = load_package(model)
            pkg_dir, onnx = pkg.root, pkg.model_path
        else:
            onnx = model
            pkg_dir = provisional_package(model, data_yaml, Path(tmp) / "pkg", floor=floor)
            pkg = load_package(pkg_dir)
        imgsz = pkg.manifest.input_size[0]
        if pkg.manifest.input_size[0] != pkg.manifest.input_size[1]:
            log.warning("evaluate.non_square_input", input_size=pkg.manifest.input_size)
        images: dict[str, ImageScores] = {}
        detection: dict[str, dict[str, float]] = {}
        for split in splits:
            files = split_images(doc, split)
            tick = progress(f"score {split}", len(files)) if progress else None
            images[split] = score_images(
                pkg_dir, files, floor=floor, min_area_px=min_area_px, threads=threads, progress=tick
            )
            if with_map:
                detection[split] = detection_metrics(onnx, data_yaml, split, imgsz)
        return EvalReport(
            str(model),
            pkg.model_sha256,
            str(data_yaml.resolve()),
            imgsz,
            floor,
            detection,
            images,
            dict(min_area_px or {}),
        )
