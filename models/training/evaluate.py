"""Evaluate a model the way the line will use it.

Two views: detection quality (box and mask mAP50 / mAP50-95, by ultralytics' validator on the
exported ONNX file, i.e. the bytes that ship) and the line's real metric, image-level OK/DEFECT,
computed through the appliance's own runtime (package -> loader -> OnnxDetector -> numpy decode),
so the numbers describe the decoder the daemon runs, not ultralytics' predictor.

The report says what was measured on how many images (per split: images, defect and OK images,
instances and images per class), gives AP per class (classes absent from a split are "no
instances", not 0), and marks image-level numbers "not measurable" (None plus the reason, with
the count) where a split has too few OK or defect images: a split without OK parts cannot show a
false positive, so its precision of 1.000 would be an artefact, not a result.
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
from models.training.operating_point import (
    OperatingPoint,
    choose_threshold,
    confusion_at,
    image_auroc,
    shortfall,
)
from models.types import Detection

log = structlog.get_logger(__name__)

Progress = Callable[[int], None]
DEFAULT_FLOOR = 0.05
"""Decoder confidence floor during evaluation: image scores below it count as 'no detection'."""
REPORT_FORMAT = 2
"""1 (no ``format`` key): before per-class counts, per-class AP and "not measurable"; still read."""
DETECTION_CONF = 0.25
"""Detections from this score count in the per-class detection confusion matrix (the default of
ultralytics' ``ConfusionMatrix``; its validator would pass the mAP floor, 0.001)."""


@dataclass(slots=True)
class ImageScores:
    """Per-image results of one split: the score that decides OK/DEFECT and the truth."""

    files: list[str]
    scores: np.ndarray
    defect: np.ndarray
    top_class: list[str | None] = field(default_factory=list)
    instances: list[list[int]] | None = None
    """Class ids of each image's labelled instances (None in reports written before format 2)."""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "files": self.files,
            "scores": [round(float(s), 6) for s in self.scores],
            "defect": [bool(d) for d in self.defect],
            "top_class": self.top_class,
        }
        if self.instances is not None:
            d["instances"] = self.instances
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageScores:
        inst = d.get("instances")
        return cls(
            list(d["files"]),
            np.asarray(d["scores"], np.float64),
            np.asarray(d["defect"], bool),
            list(d.get("top_class", [])),
            None if inst is None else [[int(c) for c in row] for row in inst],
        )

    def counts(self, classes: Sequence[str]) -> dict[str, Any]:
        """What this split holds: images, defect/OK images, instances, and per class images and
        instances (``instances``/``per_class`` None when the report predates them)."""
        n_def = int(self.defect.sum())
        out: dict[str, Any] = {
            "images": len(self.files),
            "defect_images": n_def,
            "ok_images": len(self.files) - n_def,
            "instances": None,
            "per_class": None,
        }
        if self.instances is not None:
            per: dict[str, dict[str, int]] = {c: {"images": 0, "instances": 0} for c in classes}
            for ids in self.instances:
                for cid in ids:
                    row = per.setdefault(_class_name(classes, cid), {"images": 0, "instances": 0})
                    row["instances"] += 1
                for cid in set(ids):
                    per[_class_name(classes, cid)]["images"] += 1
            out["instances"] = sum(len(ids) for ids in self.instances)
            out["per_class"] = per
        return out


def _class_name(classes: Sequence[str], cid: int) -> str:
    return classes[cid] if 0 <= cid < len(classes) else f"class {cid}"


def _label_classes(label: Path) -> list[int]:
    """Class ids of a YOLO label file (first token of each non-empty line); [] when absent."""
    if not label.exists():
        return []
    return [int(float(ln.split()[0])) for ln in label.read_text().splitlines() if ln.strip()]


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
    instances: list[list[int]] = []
    try:
        for path in images:
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError(f"{path}: unreadable image")
            prep = det.preprocess(img)
            out = det.infer(prep.tensor)
            dets = det.postprocess(out, [prep], masks=False, outlines=False)[0]
            s, c = image_score(dets, min_area_px or {})
            ids = _label_classes(label_path_for(path))
            scores.append(s)
            truth.append(bool(ids))
            instances.append(ids)
            files.append(path.name)
            tops.append(c)
            if progress:
                progress(1)
    finally:
        det.close()
    return ImageScores(files, np.asarray(scores), np.asarray(truth, bool), tops, instances)


@dataclass(slots=True)
class DetectionResult:
    """ultralytics' validator on one split: mean and per-class AP, its confusion matrix."""

    metrics: dict[str, float]
    """Mean box/mask mAP50, mAP50-95, P, R (plus ``box_map50_<class>`` keys, as before)."""
    per_class: dict[str, dict[str, Any]]
    """class -> images, instances, box/mask AP50 and AP50-95 (None + note "no instances")."""
    confusion: dict[str, Any]
    """``{"names": [...classes, "background"], "matrix": [[...]], "conf": ...}``, [pred][true]."""
    confusion_png: bytes | None = None


def detection_metrics(
    model: Path, data: Path, split: str, imgsz: int, *, plots: bool = True
) -> DetectionResult:
    """Box and mask AP by ultralytics' validator, run on the ONNX file itself.

    ``plots`` makes the validator fill and draw its per-class detection confusion matrix (it does
    neither otherwise); its fonts were put in place offline by :func:`ultra_env.prepare`.
    """
    ultra_env.prepare()
    yolo = ultra_env.yolo(model)
    with tempfile.TemporaryDirectory(prefix="edge-val-") as tmp:
        m = yolo.val(
            validator=_validator_counting_from(DETECTION_CONF),
            data=str(data),
            split=split,
            imgsz=imgsz,
            batch=1,
            device="cpu",
            plots=plots,
            save_json=False,
            project=tmp,
            name="val",
            exist_ok=True,
            verbose=False,
            workers=0,
        )
        png_path = Path(tmp) / "val" / "confusion_matrix.png"
        png = png_path.read_bytes() if plots and png_path.is_file() else None
    out = {
        "box_map50": float(m.box.map50),
        "box_map50_95": float(m.box.map),
        "mask_map50": float(m.seg.map50),
        "mask_map50_95": float(m.seg.map),
        "box_precision": float(m.box.mp),
        "box_recall": float(m.box.mr),
    }
    names = {int(k): str(v) for k, v in m.names.items()}
    nt_inst = _per_class_counts(getattr(m, "nt_per_class", None), len(names))
    nt_img = _per_class_counts(getattr(m, "nt_per_image", None), len(names))
    per_class: dict[str, dict[str, Any]] = {
        name: {
            "images": int(nt_img[i]) if i < nt_img.size else 0,
            "instances": int(nt_inst[i]) if i < nt_inst.size else 0,
            "box_ap50": None,
            "box_ap50_95": None,
            "mask_ap50": None,
            "mask_ap50_95": None,
            "note": "no instances",
        }
        for i, name in sorted(names.items())
    }
    # ap_class_index lists the classes with labelled instances in this split; ``maps`` would fill
    # the others with the mean mAP, which is why it is not used.
    for i, ci in enumerate(m.box.ap_class_index):
        name = names[int(ci)]
        out[f"box_map50_{name}"] = float(m.box.ap50[i])
        out[f"mask_map50_{name}"] = float(m.seg.ap50[i])
        per_class[name].update(
            box_ap50=float(m.box.ap50[i]),
            box_ap50_95=float(m.box.ap[i]),
            mask_ap50=float(m.seg.ap50[i]),
            mask_ap50_95=float(m.seg.ap[i]),
            note=None,
        )
    cm = getattr(m, "confusion_matrix", None)
    confusion: dict[str, Any] = {}
    if plots and cm is not None:
        confusion = {
            "names": [names[i] for i in sorted(names)] + ["background"],
            "matrix": np.asarray(cm.matrix).astype(int).tolist(),
            "conf": DETECTION_CONF,
            "axes": "matrix[predicted][true]",
        }
    return DetectionResult(out, per_class, confusion, png)


def _per_class_counts(v: Any, n: int) -> np.ndarray:
    return np.zeros(n, np.int64) if v is None else np.asarray(v, np.int64).reshape(-1)


def _validator_counting_from(conf: float) -> type:
    """ultralytics' segmentation validator whose confusion matrix counts detections from ``conf``.

    8.4.190 fills the matrix at the validation floor (conf 0.001, kept for mAP), so its background
    row is mostly low-score noise no line would ever act on; the matrix is counted from ``conf``
    instead (``ConfusionMatrix.process_batch``'s own default). mAP still sees every detection.
    """
    from ultralytics.models.yolo.segment import SegmentationValidator

    class CountingValidator(SegmentationValidator):
        def init_metrics(self, model: Any) -> None:
            super().init_metrics(model)
            matrix: Any = self.confusion_matrix
            count = matrix.process_batch

            def from_conf(detections: Any, batch: Any, conf: float = 0.0, **kw: Any) -> Any:
                return count(detections, batch, conf=max(conf, min_conf), **kw)

            matrix.process_batch = from_conf

    min_conf = conf
    return CountingValidator


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
    """Everything needed to choose an operating point, gate, and package (stored as JSON).

    Image-level numbers are judged measurable against the gate criteria's ``min_ok_images`` /
    ``min_defect_images`` (:meth:`gate_criteria`): one knob for what is reported and what passes.
    """

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
    classes: list[str] = field(default_factory=list)
    per_class: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """split -> class -> images, instances, box/mask AP50 and AP50-95 (see DetectionResult)."""
    detection_confusion: dict[str, dict[str, Any]] = field(default_factory=dict)
    """split -> ultralytics' per-class detection confusion matrix (counts)."""
    criteria: dict[str, Any] | None = None
    """The GateCriteria last used (also when no threshold could be chosen)."""
    plots: dict[str, Any] = field(default_factory=dict)
    """PNG files next to the report, by name relative to its folder: ``image_confusion`` and
    ``detection_confusion`` (split -> file)."""
    pending_png: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Detection confusion PNGs (split -> bytes) not yet written: :meth:`save` writes them."""

    # ---- what was measured, and whether it is measurable ----

    def gate_criteria(self) -> GateCriteria:
        """The criteria this report is judged with (their minimums also decide measurability)."""
        doc = self.criteria or (self.gate or {}).get("criteria")
        return GateCriteria(**doc) if doc else GateCriteria()

    def _mins(self) -> dict[str, int]:
        c = self.gate_criteria()
        return {"min_ok_images": c.min_ok_images, "min_defect_images": c.min_defect_images}

    def counts(self, split: str) -> dict[str, Any]:
        """Images, defect/OK images, instances and per-class images/instances of ``split``."""
        return self.images[split].counts(self.classes)

    def image_point(self, split: str) -> OperatingPoint | None:
        """Image-level confusion of ``split`` at the chosen threshold (None: none chosen yet, or
        the split has no images)."""
        s = self.images[split]
        if self.operating_point is None or not s.files:
            return None
        thr = float(self.operating_point["threshold"])
        return confusion_at(s.scores, s.defect, thr, split=split, **self._mins())

    def not_measurable(self, split: str) -> dict[str, str]:
        """Image-level numbers ``split`` cannot measure (metric -> reason with the count)."""
        c = self.counts(split)
        m = self._mins()
        return shortfall(
            c["ok_images"], c["defect_images"], m["min_ok_images"], m["min_defect_images"], split
        )

    def auroc(self, split: str) -> float | None:
        s = self.images[split]
        if not s.files:
            return None
        return image_auroc(s.scores, s.defect, **self._mins())

    def warnings(self) -> list[str]:
        """One line per number this report cannot honestly give, and per fallback taken."""
        out: list[str] = []
        for split in self.images:
            for metric, why in self.not_measurable(split).items():
                if metric in ("precision", "recall"):
                    out.append(f"image {metric} on {split} not measurable: {why}")
        op = self.operating_point
        if op and op.get("basis") == "recall-only":
            out.append(
                f"threshold chosen on {op['split']} from the recall target alone (recall-only "
                "fallback): no precision was weighed"
            )
        return out

    # ---- storage ----

    def to_json(self) -> dict[str, Any]:
        splits = {}
        for split in self.images:
            point = self.image_point(split)
            splits[split] = {
                **self.counts(split),
                "auroc": self.auroc(split),
                "not_measurable": self.not_measurable(split),
                "at_threshold": None if point is None else point.as_dict(),
            }
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "data": self.data,
            "imgsz": self.imgsz,
            "floor": self.floor,
            "classes": self.classes,
            "criteria": self.criteria,
            "splits": splits,
            "warnings": self.warnings(),
            "detection": self.detection,
            "per_class": self.per_class,
            "detection_confusion": self.detection_confusion,
            "plots": self.plots,
            "images": {k: v.as_dict() for k, v in self.images.items()},
            "min_area_px": self.min_area_px,
            "operating_point": self.operating_point,
            "test_point": self.test_point,
            "gate": self.gate,
        }

    def save(self, path: Path, *, plots: bool = True) -> None:
        """Write the JSON and, next to it, the confusion PNGs (``<stem>_confusion.png`` at the
        chosen threshold, ``<stem>_<split>_detection_confusion.png`` from ultralytics)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if plots:
            self._write_plots(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def _write_plots(self, path: Path) -> None:
        for split, png in self.pending_png.items():
            f = path.with_name(f"{path.stem}_{split}_detection_confusion.png")
            f.write_bytes(png)
            self.plots.setdefault("detection_confusion", {})[split] = f.name
        self.pending_png.clear()
        image = path.with_name(f"{path.stem}_confusion.png")
        if self.operating_point is None or not any(s.files for s in self.images.values()):
            image.unlink(missing_ok=True)  # a matrix at an old threshold would mislead
            self.plots.pop("image_confusion", None)
            return
        from models.training.plots import ConfusionPanel, confusion_png

        panels = []
        for split in self.images:
            p = self.image_point(split)
            if p is None:
                continue
            panels.append(
                ConfusionPanel(
                    f"{split}: {p.defect_images + p.ok_images} images",
                    p.tp,
                    p.fp,
                    p.fn,
                    p.tn,
                    tuple(
                        f"{k} not measurable: {v.split(': ')[0]}"
                        for k, v in p.not_measurable.items()
                        if k in ("precision", "recall")
                    ),
                )
            )
        op = self.operating_point
        image.write_bytes(
            confusion_png(
                panels,
                f"image level OK/DEFECT at threshold {float(op['threshold']):.4f} "
                f"(chosen on {op.get('split', '?')})",
            )
        )
        self.plots["image_confusion"] = image.name

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        """Read a report; format 1 (before counts and per-class AP) is read as far as it goes."""
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no evaluation report; run `edge model evaluate` first"
            )
        d = json.loads(path.read_text())
        fmt = int(d.get("format", 1))
        if fmt > REPORT_FORMAT:
            raise ValueError(
                f"{path}: evaluation report format {fmt} is newer than this tool reads "
                f"({REPORT_FORMAT}); update, or re-run `edge model evaluate`"
            )
        try:
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
                list(d.get("classes") or []),
                dict(d.get("per_class") or {}),
                dict(d.get("detection_confusion") or {}),
                d.get("criteria"),
                dict(d.get("plots") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: not an evaluation report ({type(e).__name__}: {e}); "
                "re-run `edge model evaluate`"
            ) from e

    # ---- choosing and judging ----

    def choose(
        self,
        recall_target: float,
        criteria: GateCriteria | None = None,
        choose_on: str = "val",
        judge_on: str = "test",
        *,
        allow_recall_only: bool = False,
    ) -> tuple[OperatingPoint, OperatingPoint, GateDecision]:
        """Pick the threshold on ``choose_on``, apply it to ``judge_on``, gate the result.

        Raises NotMeasurableError (a ValueError; the report is left as it was) when ``choose_on``
        has fewer OK or defect images than the criteria's minimums, unless
        ``allow_recall_only`` (see :func:`choose_threshold`).
        """
        c = criteria or self.gate_criteria()
        if choose_on not in self.images:
            raise ValueError(f"no '{choose_on}' split in the report (has {list(self.images)})")
        v = self.images[choose_on]
        op = choose_threshold(
            v.scores,
            v.defect,
            recall_target,
            floor=self.floor,
            min_ok_images=c.min_ok_images,
            min_defect_images=c.min_defect_images,
            allow_recall_only=allow_recall_only,
            split=choose_on,
        )
        self.criteria = c.model_dump()
        self.operating_point = {**op.as_dict(), "split": choose_on}
        tp, decision = self.judge(c, judge_on)
        return op, tp, decision

    def judge(
        self, criteria: GateCriteria | None = None, judge_on: str | None = None
    ) -> tuple[OperatingPoint, GateDecision]:
        """Apply the chosen threshold to ``judge_on`` (default: the split judged before, else
        test) and gate it; the threshold itself is not touched."""
        if self.operating_point is None:
            raise ValueError("the report has no operating point: run `edge model choose-threshold`")
        c = criteria or self.gate_criteria()
        split = judge_on or str((self.test_point or {}).get("split", "test"))
        if split not in self.images:
            raise ValueError(f"no '{split}' split in the report (has {list(self.images)})")
        self.criteria = c.model_dump()
        t = self.images[split]
        tp = confusion_at(
            t.scores,
            t.defect,
            float(self.operating_point["threshold"]),
            min_ok_images=c.min_ok_images,
            min_defect_images=c.min_defect_images,
            split=split,
        )
        decision = judge(tp, c, self.detection.get(split))
        basis = self.operating_point.get("basis", "precision")
        self.test_point = {**tp.as_dict(), "basis": basis, "split": split}
        self.gate = decision.as_dict()
        return tp, decision


def evaluate(
    model: Path,
    data: Path,
    *,
    splits: Sequence[str] = ("val", "test"),
    floor: float = DEFAULT_FLOOR,
    min_area_px: Mapping[str, int] | None = None,
    with_map: bool = True,
    plots: bool = True,
    threads: int = 2,
    progress: Callable[[str, int], Progress] | None = None,
) -> EvalReport:
    """Evaluate an ONNX file or a package dir on ``splits`` of the data set.

    ``progress(label, total)`` returns a per-image tick function (the CLI draws a bar with it).
    ``plots``: keep ultralytics' detection confusion matrix PNG per split (written by ``save``).
    """
    doc = load_data_yaml(data)
    data_yaml = data / "data.yaml" if data.is_dir() else data
    classes = class_names(doc)
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
        report = EvalReport(
            str(model),
            pkg.model_sha256,
            str(data_yaml.resolve()),
            imgsz,
            floor,
            {},
            {},
            dict(min_area_px or {}),
            classes=classes,
        )
        for split in splits:
            files = split_images(doc, split)
            tick = progress(f"score {split}", len(files)) if progress else None
            report.images[split] = score_images(
                pkg_dir, files, floor=floor, min_area_px=min_area_px, threads=threads, progress=tick
            )
            if with_map:
                res = detection_metrics(onnx, data_yaml, split, imgsz, plots=plots)
                report.detection[split] = res.metrics
                report.per_class[split] = res.per_class
                if res.confusion:
                    report.detection_confusion[split] = res.confusion
                if res.confusion_png:
                    report.pending_png[split] = res.confusion_png
        return report
