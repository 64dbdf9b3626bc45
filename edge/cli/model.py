"""`edge model ...`: the training-to-package tool chain (needs the `train` extra for most commands).

Imports of models.training (torch, ultralytics) happen inside the commands, so `edge --help` and
the daemon never load them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(
    help=(
        "Models: train, evaluate, gate, export, package and sign them; keep them in the store; "
        "activate, canary, shadow, promote and roll back on the running line."
    ),
    no_args_is_help=True,
)
console = Console(stderr=True, soft_wrap=True)
"""soft_wrap: messages carry paths and digests that must stay whole (and greppable) in logs."""


@app.callback()
def _logs_to_stderr() -> None:
    """Runtime logs (detector loaded, ...) go to stderr: stdout is kept for --json output."""
    from edge.logs import configure_logging

    configure_logging("info", "console")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@contextmanager
def _bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A factory of progress bars: ``bar(label, total)`` returns an ``advance(n)`` callable."""
    with _progress() as prog:

        def make(label: str, total: int) -> Callable[[int], None]:
            task = prog.add_task(label, total=total)

            def advance(n: int = 1) -> None:
                prog.advance(task, n)

            return advance

        yield make


def _fail(msg: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}")
    return typer.Exit(code)


@app.command()
def synth(
    out: Annotated[
        Path, typer.Option(help="Dataset directory to write (YOLO layout + data.yaml).")
    ],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 1500,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same images and labels.")] = 0,
    size: Annotated[int, typer.Option(help="Image width and height in pixels.")] = 256,
    defect_fraction: Annotated[float, typer.Option(help="Share of images with defects.")] = 0.5,
    fractions: Annotated[
        str, typer.Option(help="train,val,test shares, e.g. 0,0,1 for a pure hold-out set.")
    ] = "0.7,0.15,0.15",
) -> None:
    """Generate a synthetic defect data set (scratch, pit, crack, stain; 70/15/15 split)."""
    from models.synth import SynthConfig, write_dataset

    try:
        tr, va, te = (float(v) for v in fractions.split(","))
        cfg = SynthConfig(width=size, height=size, defect_fraction=defect_fraction)
        with _bars() as bar:
            path = write_dataset(
                out, n, seed=seed, cfg=cfg, fractions=(tr, va, te), progress=bar("synth", n)
            )
    except ValueError as e:
        raise _fail(f"{e} (--fractions wants three numbers: train,val,test)") from e
    console.print(f"wrote {path}")


@app.command("convert-magnetic-tile")
def convert_magnetic_tile(
    src: Annotated[Path, typer.Option(help="The magnetic-tile folder (MT_* class folders).")],
    out: Annotated[
        Path, typer.Option(help="Where to write the YOLO data set (not inside the package).")
    ],
    seed: Annotated[int, typer.Option(help="Seed of the group split.")] = 0,
    gap: Annotated[
        int, typer.Option(help="A new tile group starts when num jumps by more than this.")
    ] = 100,
) -> None:
    """Convert magnetic-tile masks to YOLO-seg polygons, split 70/15/15 by tile group."""
    from models.datasets.magnetic_tile import convert

    try:
        with _bars() as bar:
            summary = convert(src, out, seed=seed, gap=gap, progress=bar)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    console.print_json(json.dumps(summary["splits"]))
    console.print(f"wrote {out / 'data.yaml'}")


@app.command("import-data")
def import_data(
    src: Annotated[
        Path, typer.Argument(help="COCO JSON, CVAT XML, a YOLO folder or class folders of masks.")
    ],
    out: Annotated[Path, typer.Option(help="Where to write the YOLO-seg set (a new folder).")],
    fmt: Annotated[
        str | None, typer.Option("--format", help="coco|yolo|cvat|masks (default: detected).")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Named settings: magnetic-tile.")] = None,
    classes: Annotated[
        str | None, typer.Option(help="a,b,c: class order/subset (YOLO: names of ids 0,1,..).")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="COCO/CVAT: image folder (default: images/ beside).")
    ] = None,
    class_map: Annotated[
        str | None, typer.Option(help="masks: FOLDER=class,...; FOLDER= is defect-free.")
    ] = None,
    images_subdir: Annotated[str | None, typer.Option(help="masks: e.g. Imgs.")] = None,
    masks_subdir: Annotated[str | None, typer.Option(help="masks: masks folder.")] = None,
    mask_suffix: Annotated[str | None, typer.Option(help="masks: e.g. _mask.")] = None,
    mask_threshold: Annotated[
        int | None, typer.Option(help="masks: pixels above this are the region (127).")
    ] = None,
    group_regex: Annotated[
        str | None, typer.Option(help="Group key: 1st capture group over the relative path.")
    ] = None,
    group_gap: Annotated[
        int | None, typer.Option(help="Cluster numeric keys: new group when the gap exceeds N.")
    ] = None,
    group_csv: Annotated[
        Path | None, typer.Option(help="Group key from a CSV with a 'file' column.")
    ] = None,
    group_column: Annotated[str | None, typer.Option(help="CSV column (group).")] = None,
    stratify: Annotated[str | None, typer.Option(help="class (default)|defect|none.")] = None,
    fractions: Annotated[str | None, typer.Option(help="train,val,test (0.7,0.15,0.15).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the group split (0).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print import-report.json.")] = False,
) -> None:
    """Import labelled images as a YOLO-seg set, split by group; see models/README.md."""
    from models.datasets.importer import import_data as run_import
    from models.datasets.importer import options_from_args, report_text

    try:
        opts = options_from_args(
            preset,
            format=fmt,
            classes=classes,
            images_dir=images,
            class_map=class_map,
            images_subdir=images_subdir,
            masks_subdir=masks_subdir,
            mask_suffix=mask_suffix,
            mask_threshold=mask_threshold,
            group_regex=group_regex,
            group_gap=group_gap,
            group_csv=group_csv,
            group_column=group_column,
            stratify=stratify,
            fractions=fractions,
            seed=seed,
        )
        with _bars() as bar:
            done = run_import(src, out, opts, progress=bar)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    if as_json:
        typer.echo(json.dumps(done.report, indent=2))
    console.print(report_text(done.report), markup=False, highlight=False)
    console.print(f"wrote {out / 'data.yaml'}, split.json, import-report.json", markup=False)


@app.command()
def train(
    data: Annotated[
        Path | None, typer.Option(help="data.yaml (or its directory); not with --resume.")
    ] = None,
    scale: Annotated[str, typer.Option(help="Network width: p (demo), n (yolov8n-seg), s.")] = "p",
    epochs: Annotated[
        int, typer.Option(help="Epochs (design default 50; the cap with --hours).")
    ] = 50,
    hours: Annotated[
        float | None,
        typer.Option(
            help="Wall-clock budget in hours: the epoch count is fixed once, after two measured "
            "epochs, and the LR schedule and mosaic close then keep to it."
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size (design default 64).")] = 64,
    lr0: Annotated[
        float, typer.Option(help="Initial learning rate (design default 0.00232).")
    ] = 0.00232,
    imgsz: Annotated[int, typer.Option(help="Training image size (multiple of 32).")] = 256,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="Start from your own pretrained ultralytics segmentation .pt (transfer "
            "learning; another class count is fine: the head is rebuilt)."
        ),
    ] = None,
    project: Annotated[Path, typer.Option(help="Runs directory.")] = Path("var/runs"),
    name: Annotated[str, typer.Option(help="Run name (a folder under --project).")] = "train",
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Data loader workers (default: 0 on CPU, where ultralytics uses 0; 2 on GPU)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch/OpenMP threads (default: OMP_NUM_THREADS, else all usable cores)."
        ),
    ] = None,
    close_mosaic: Annotated[int, typer.Option(help="Turn mosaic off for the last N epochs.")] = 10,
    warmup_epochs: Annotated[float, typer.Option(help="Learning-rate warm-up epochs.")] = 3.0,
    val: Annotated[
        bool, typer.Option("--val/--no-val", help="Validate every epoch (off: only at the end).")
    ] = True,
    device: Annotated[
        str, typer.Option(help="Torch device: cpu, or a CUDA index such as 0 (GPU training).")
    ] = "cpu",
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue an interrupted run (RUN_DIR or its weights/last.pt) with its recorded "
            "recipe and epoch plan; other options are ignored except --threads."
        ),
    ] = None,
) -> None:
    """Train a YOLOv8-seg model from scratch (or from --weights) on a data set.

    Everything that shaped the run goes to RUN_DIR/recipe.json; one `train.epoch` log line per
    epoch reaches stderr as it goes. Ctrl-C leaves a resumable run (--resume RUN_DIR).
    """
    from pydantic import ValidationError

    from models.training.recipe import TrainRecipe
    from models.training.train import TrainSetupError
    from models.training.train import resume as run_resume
    from models.training.train import train as run_train

    if data is None and resume is None:
        raise _fail("give --data DATA.yaml (or --resume RUN_DIR to continue a run)")
    fields = {
        "data": data,
        "scale": scale,
        "epochs": epochs,
        "hours": hours,
        "batch": batch,
        "lr0": lr0,
        "imgsz": imgsz,
        "weights": weights,
        "project": project,
        "name": name,
        "seed": seed,
        "workers": workers,
        "threads": threads,
        "close_mosaic": close_mosaic,
        "warmup_epochs": warmup_epochs,
        "val": val,
        "device": device,
    }
    recipe = None
    if resume is None:
        try:
            recipe = TrainRecipe.model_validate(fields)
        except ValidationError as e:
            raise _fail(f"bad training options:\n{e}") from e
    run_dir = resume if resume is not None else (project / name).resolve()

    def run(on_epoch: Callable[[int, int, dict[str, float]], None] | None) -> Any:
        if recipe is None:
            assert resume is not None
            return run_resume(resume, on_epoch, threads=threads)
        return run_train(recipe, on_epoch)

    try:
        if console.is_terminal:
            with _progress() as prog:
                task = prog.add_task("train", total=epochs)

                def on_epoch(done: int, planned: int, metrics: dict[str, float]) -> None:
                    m50 = metrics.get("metrics/mAP50(B)")
                    loss = metrics.get("train/loss")
                    desc = (
                        f"train box mAP50 {m50:.3f}"
                        if m50 is not None
                        else f"train loss {loss:.3f}"
                        if loss is not None
                        else "train"
                    )
                    prog.update(task, completed=done, total=max(planned, done), description=desc)

                result = run(on_epoch)
        else:
            # A log file or a pipe: a bar would only render when training ends; the train.epoch
            # log lines carry the progress instead.
            result = run(None)
    except TrainSetupError as e:
        raise _fail(str(e)) from e
    except KeyboardInterrupt as e:
        raise _fail(
            f"interrupted; continue with `edge model train --resume {run_dir}`", code=130
        ) from e
    console.print(f"best: {result.best}  epochs: {result.epochs_done}  wall: {result.wall_s:.0f} s")


@app.command()
def export(
    weights: Annotated[Path, typer.Option(help="Trained checkpoint (best.pt).")],
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
    imgsz: Annotated[int, typer.Option(help="Network input size.")] = 256,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
) -> None:
    """Export a checkpoint to a static, simplified ONNX file (outputs output0/output1)."""
    from models.training.export import export_onnx

    try:
        path = export_onnx(weights, out, imgsz=imgsz, opset=opset)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    console.print(f"wrote {path}")


MinOkOpt = Annotated[
    int,
    typer.Option(
        "--min-ok",
        "--min-ok-images",
        min=1,
        help="OK images a split needs: below it image precision (and specificity, AUROC) is "
        "reported as not measurable, the gate refuses on test and no threshold is chosen on it.",
    ),
]
MinDefectsOpt = Annotated[
    int,
    typer.Option(
        "--min-defects",
        "--min-defect-images",
        min=1,
        help="Defect images a split needs: below it image recall is not measurable (as --min-ok).",
    ),
]
AllowRecallOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--allow-recall-only",
        help="When the choice split has too few OK images, take the highest threshold that "
        "reaches the recall target instead of refusing (marked 'recall-only' in the report).",
    ),
]


def _criteria(min_precision: float, min_recall: float, min_defects: int, min_ok: int) -> Any:
    from models.training.gate import GateCriteria

    return GateCriteria(
        min_precision=min_precision,
        min_recall=min_recall,
        min_defect_images=min_defects,
        min_ok_images=min_ok,
    )


def _print_report(report: Any, path: Path | None = None) -> None:
    """What was measured on how many images, per-class AP, the image-level numbers at the chosen
    threshold ("not measurable" with the count where a split cannot give one), warnings, gate."""
    from models.training.report import precision_cell, recall_cell

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    t = Table(title="evaluated images; detection by ultralytics val on the ONNX file")
    for col in ("split", "images", "defect", "OK", "instances", "box mAP50", "box mAP50-95"):
        t.add_column(col)
    t.add_column("mask mAP50")
    t.add_column("mask mAP50-95")
    for split in report.images:
        c, m = report.counts(split), report.detection.get(split, {})
        t.add_row(
            split,
            *(str(c[k]) for k in ("images", "defect_images", "ok_images")),
            "n/a" if c["instances"] is None else str(c["instances"]),
            *(f(m.get(k)) for k in ("box_map50", "box_map50_95", "mask_map50", "mask_map50_95")),
        )
    console.print(t)
    for split, per in report.per_class.items():
        pc = Table(title=f"per class on {split}")
        for col in ("class", "images", "instances", "box AP50", "box AP50-95", "mask AP50"):
            pc.add_column(col)
        pc.add_column("mask AP50-95")
        absent = [name for name, r in per.items() if not r.get("instances")]
        for name, r in per.items():
            aps = [r.get(k) for k in ("box_ap50", "box_ap50_95", "mask_ap50", "mask_ap50_95")]
            pc.add_row(
                name,
                str(r["images"]),
                str(r["instances"]),
                *(["-"] * 4 if name in absent else [f(v) for v in aps]),
            )
        console.print(pc)
        if absent:
            console.print(f"no instances in {split} (AP undefined, not 0): {', '.join(absent)}")
    op = report.operating_point
    if op:
        how = "recall-only fallback" if op.get("basis") == "recall-only" else "best precision"
        console.print(
            f"operating point: threshold {op['threshold']:.4f}, chosen on {op['split']} for "
            f"recall target {op['recall_target']} ({how}"
            + ("" if op.get("met", True) else "; target NOT reached")
            + ")"
        )
        it = Table(title=f"image level OK/DEFECT at threshold {op['threshold']:.4f}")
        for col in ("split", "precision", "recall", "AUROC"):
            it.add_column(col)
        for split in report.images:
            p, auc = report.image_point(split), report.auroc(split)
            if p is None:  # a split without images
                continue
            it.add_row(
                split,
                precision_cell(p),
                recall_cell(p),
                "not measurable" if auc is None else f"{auc:.3f}",
            )
        console.print(it)
    for w in report.warnings():
        console.print(f"[yellow]warning:[/yellow] {w}")
    if report.gate:
        g = report.gate
        console.print(
            f"[green]gate on {(report.test_point or {}).get('split', 'test')}: PASSED[/green]"
            if g["passed"]
            else "[red]gate: REFUSED[/red] " + "; ".join(g["reasons"])
        )
    if path is not None:
        for name in _plot_files(report.plots):
            console.print(f"wrote {path.with_name(name)}")


def _plot_files(plots: dict[str, Any]) -> list[str]:
    out = [plots["image_confusion"]] if plots.get("image_confusion") else []
    return out + list((plots.get("detection_confusion") or {}).values())


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="ONNX file or model package directory.")],
    data: Annotated[Path, typer.Option(help="data.yaml (or its directory).")],
    out: Annotated[Path, typer.Option(help="Evaluation report (JSON) to write.")],
    recall_target: Annotated[
        float, typer.Option(help="Image-level recall the threshold must reach on val.")
    ] = 0.95,
    min_precision: Annotated[
        float, typer.Option(help="Gate: minimum image precision on test.")
    ] = 0.97,
    min_recall: Annotated[float, typer.Option(help="Gate: minimum image recall on test.")] = 0.95,
    min_defects: MinDefectsOpt = 20,
    min_ok: MinOkOpt = 20,
    allow_recall_only: AllowRecallOnlyOpt = False,
    floor: Annotated[float, typer.Option(help="Decoder confidence floor during scoring.")] = 0.05,
    no_map: Annotated[bool, typer.Option("--no-map", help="Skip box/mask mAP (faster).")] = False,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads.")] = 2,
) -> None:
    """mAP (box, mask, per class) + image-level OK/DEFECT scores, operating point on val, gate
    on test; writes the report and its confusion matrix PNGs next to it.

    Exit 2 (report still written, without a threshold) when val has too few OK or defect images
    to choose a threshold on: see `edge model choose-threshold`.
    """
    from models.training.evaluate import evaluate as run_eval

    criteria = _criteria(min_precision, min_recall, min_defects, min_ok)
    try:
        with _bars() as bar:
            report = run_eval(
                model, data, floor=floor, with_map=not no_map, threads=threads, progress=bar
            )
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    report.criteria = criteria.model_dump()
    try:
        report.choose(recall_target, criteria, allow_recall_only=allow_recall_only)
    except ValueError as e:
        # The scores took long to compute: keep them, without a threshold, and say what to do.
        report.save(out)
        _print_report(report, out)
        raise _fail(f"{e}\nscores saved in {out}: re-run `edge model choose-threshold`") from e
    report.save(out)
    _print_report(report, out)
    console.print(f"wrote {out}")


@app.command("choose-threshold")
def choose_threshold(
    eval_report: Annotated[Path, typer.Option("--eval", help="Report from `edge model evaluate`.")],
    recall_target: Annotated[
        float, typer.Option(help="Image-level recall to reach on the split.")
    ] = 0.95,
    split: Annotated[str, typer.Option(help="Split to choose on.")] = "val",
    allow_recall_only: AllowRecallOnlyOpt = False,
) -> None:
    """Re-choose the score threshold on an existing report (and re-gate with its criteria).

    Exit 2, report unchanged, when the split has fewer OK or defect images than the criteria's
    minimums (--min-ok / --min-defects of evaluate or gate), unless --allow-recall-only.
    """
    from models.training.evaluate import EvalReport

    try:
        report = EvalReport.load(eval_report)
        report.choose(recall_target, choose_on=split, allow_recall_only=allow_recall_only)
    except ValueError as e:
        raise _fail(str(e)) from e
    report.save(eval_report)
    _print_report(report, eval_report)


@app.command()
def gate(
    eval_report: Annotated[Path, typer.Option("--eval", help="Report from `edge model evaluate`.")],
    min_precision: Annotated[float, typer.Option(help="Minimum image precision on test.")] = 0.97,
    min_recall: Annotated[float, typer.Option(help="Minimum image recall on test.")] = 0.95,
    min_defects: MinDefectsOpt = 20,
    min_ok: MinOkOpt = 20,
) -> None:
    """Judge the model at its chosen threshold; exit 1 when it is refused (a number the test
    split cannot measure refuses too)."""
    from models.training.evaluate import EvalReport

    try:
        report = EvalReport.load(eval_report)
    except ValueError as e:
        raise _fail(str(e)) from e
    if report.operating_point is None:
        raise _fail("the report has no operating point: run `edge model choose-threshold` first")
    try:
        report.judge(_criteria(min_precision, min_recall, min_defects, min_ok))
    except ValueError as e:
        raise _fail(str(e)) from e
    report.save(eval_report)
    _print_report(report, eval_report)
    if not report.gate or not report.gate["passed"]:
        raise typer.Exit(1)


@app.command()
def package(
    model: Annotated[Path, typer.Option(help="The ONNX file that was evaluated.")],
    out: Annotated[Path, typer.Option(help="Package directory to write.")],
    name: Annotated[str, typer.Option(help="Model name.")],
    version: Annotated[str, typer.Option(help="Model version.")],
    plc_model_id: Annotated[int, typer.Option(help="Numeric id the PLC sees (0..65535).")],
    eval_report: Annotated[
        Path | None, typer.Option("--eval", help="Report from `edge model evaluate`.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="data.yaml: class names (default: the report's) and, when it has validation "
            "images, the drift baseline recorded in the package (validation_stats.json)."
        ),
    ] = None,
    training_json: Annotated[
        Path | None, typer.Option(help="JSON merged into the manifest's 'training'.")
    ] = None,
    no_gate: Annotated[
        bool,
        typer.Option(
            "--no-gate", help="Package although the gate did not pass (marked in the manifest)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing package directory.")] = False,
    sign: Annotated[
        Path | None,
        typer.Option("--sign", help="Private key (from `edge model keygen`) to sign it with."),
    ] = None,
    stats_split: Annotated[
        str, typer.Option(help="Split of --data whose images make the drift baseline.")
    ] = "val",
    stats_max: Annotated[
        int, typer.Option(help="At most this many images for the baseline (0: none).")
    ] = 500,
) -> None:
    """Write a model package (model + manifest with metrics, thresholds, package digest);
    refuses gated-out ones.

    A model that already sits in a verified package (same bytes) keeps that package's operating
    point, metrics and gate decision unless --eval gives new ones.
    """
    from models.datasets.yolo import class_names, load_data_yaml
    from models.training.evaluate import EvalReport
    from models.training.packaging import PromotionRefused, package_model, package_of
    from models.training.valstats import validation_images
    from models.types import ModelPackageError

    try:
        report = EvalReport.load(eval_report) if eval_report else None
        data_path = data or (Path(report.data) if report else None)
        if data_path is None:
            raise _fail("give --data (for the class names) or --eval")
        data_yaml = data_path / "data.yaml" if data_path.is_dir() else data_path
        doc = load_data_yaml(data_path)
        classes = class_names(doc)
        training: dict[str, Any] = json.loads(training_json.read_text()) if training_json else {}
        training.setdefault("data", str(data_path))
        inherit = package_of(model) if report is None and model.is_file() else None
        if inherit is not None:
            console.print(
                f"model is the one in {inherit.ref} (digest {inherit.digest[:12]}): its operating "
                "point, metrics and gate decision are carried over"
            )
        images = validation_images(doc, data_yaml, stats_split)[: max(stats_max, 0)]
        with _bars() as bar:
            path = package_model(
                model,
                out,
                report=report,
                name=name,
                version=version,
                plc_model_id=plc_model_id,
                classes=classes,
                training=training,
                require_gate=not no_gate,
                overwrite=overwrite,
                inherit=inherit,
                stats_images=images,
                stats_source=f"{data_yaml} split {stats_split!r}",
                sign_with=sign,
                progress=bar("validation stats", len(images)) if images else None,
            )
    except PromotionRefused as e:
        raise _fail(str(e), code=1) from e
    except (ModelPackageError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    if not images:
        console.print(
            f"no '{stats_split}' images in {data_path}: no drift baseline recorded "
            "(validation_stats.json)"
        )
    _print_package(path)


def _print_package(path: Path) -> None:
    from models.package import load_package

    pkg = load_package(path, check_model=False)
    signed = f", signed by {', '.join(pkg.signed_by)}" if pkg.signed_by else ", unsigned"
    console.print(f"wrote package {path}: {pkg.ref} digest {pkg.digest}{signed}")


# ---- integrity, signatures and the model store ----


def _trusted(keys: list[Path] | None, config: Path | None) -> list[Path]:
    out = list(keys or [])
    if config is not None:
        from edge.cli.common import load_or_exit

        out += list(load_or_exit(config, deep=False).model.trusted_keys)
    return out


TrustedOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted-key",
        help="Public key whose signature is required (repeatable; adds to the config's "
        "model.trusted_keys).",
    ),
]
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Model store directory (default: from --config).")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Line YAML: its model.store and model.trusted_keys are used."
    ),
]


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Directory for NAME.key (0600) and NAME.pub.")],
    name: Annotated[str, typer.Option(help="Base name of the key files.")] = "edge-model",
) -> None:
    """Make an ed25519 key pair for signing packages (the .pub goes to model.trusted_keys)."""
    from models.signing import generate_keypair, load_public_key
    from models.types import ModelPackageError

    try:
        priv, pub = generate_keypair(out, name)
    except (ModelPackageError, OSError) as e:
        raise _fail(str(e)) from e
    console.print(f"private key {priv} (mode 0600: keep it on the packaging machine)")
    console.print(f"public key  {pub} (key id {load_public_key(pub).key_id})")


@app.command()
def sign(
    package_dir: Annotated[Path, typer.Argument(help="Package directory.")],
    key: Annotated[Path, typer.Option("--key", help="Private key from `edge model keygen`.")],
) -> None:
    """Sign a verified package (its digest does not change; other signatures are kept)."""
    from models.package import sign_package
    from models.types import ModelPackageError

    try:
        pkg = sign_package(package_dir, key)
    except ModelPackageError as e:
        raise _fail(str(e)) from e
    console.print(f"signed {pkg.ref} digest {pkg.digest}; signatures by {', '.join(pkg.signed_by)}")


@app.command()
def verify(
    package_dir: Annotated[Path, typer.Argument(help="Package directory.")],
    trusted_key: TrustedOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Verify a package exactly as the daemon would (digest, files, model, signatures)."""
    from models.package import verify_package
    from models.types import ModelPackageError

    keys = _trusted(trusted_key, config)
    try:
        pkg = verify_package(package_dir, keys)
    except ModelPackageError as e:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": str(e)}))
        raise _fail(str(e)) from e
    doc = {
        "ok": True,
        "ref": pkg.ref,
        "digest": pkg.digest,
        "plc_model_id": pkg.manifest.plc_model_id,
        "signed_by": list(pkg.signed_by),
        "signature_required": bool(keys),
    }
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        console.print(
            f"OK {pkg.ref} digest {pkg.digest} plc_model_id {pkg.manifest.plc_model_id} "
            f"signed by {list(pkg.signed_by) or 'nobody'}"
            + (" (trusted signature checked)" if keys else "")
        )


@app.command()
def repackage(
    package_dir: Annotated[Path, typer.Argument(help="Package made before package digests.")],
    out: Annotated[
        Path | None, typer.Option(help="Write a sealed copy here (default: seal in place).")
    ] = None,
    sign_key: Annotated[
        Path | None, typer.Option("--sign", help="Also sign it with this private key.")
    ] = None,
) -> None:
    """Add the package digest to an older package (everything else is verified, manifest kept
    byte for byte). On a package that was edited by hand this seals the edit: re-package from
    the source when in doubt."""
    from models.package import repackage as do_repackage
    from models.types import ModelPackageError

    try:
        pkg = do_repackage(package_dir, out, sign_with=sign_key)
    except ModelPackageError as e:
        raise _fail(str(e)) from e
    console.print(f"sealed {pkg.root}: {pkg.ref} digest {pkg.digest}")


def _store(store: Path | None, config: Path | None) -> Any:
    from models.store import ModelStore, default_store_root

    if store is None and config is None:
        raise _fail("give --store DIR or --config LINE.yaml (whose model.store is used)")
    if store is None:
        from edge.cli.common import load_or_exit

        cfg = load_or_exit(config, deep=False)  # the store's place, not the line's package
        store = default_store_root(cfg.model.store, cfg.uplink.spool_dir)
    return ModelStore(store)


@app.command("import")
def import_package(
    package_dir: Annotated[Path, typer.Argument(help="Package directory to verify and import.")],
    store: StoreOpt = None,
    config: ConfigOpt = None,
    trusted_key: TrustedOpt = None,
) -> None:
    """Verify a package (digest, files, model; a trusted signature when keys are configured)
    and copy it into the model store as NAME/VERSION. Nothing changes on a refusal."""
    from models.types import ModelPackageError

    st = _store(store, config)
    try:
        pkg = st.import_package(package_dir, _trusted(trusted_key, config))
    except ModelPackageError as e:
        raise _fail(f"refused: {e}") from e
    console.print(f"imported {pkg.ref} digest {pkg.digest} -> {pkg.root}")


@app.command("list")
def list_models(
    store: StoreOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    verify_files: Annotated[
        bool, typer.Option("--verify", help="Re-hash every file (shows damage in the store).")
    ] = False,
) -> None:
    """The packages in the model store and which one is active, previous and shadow."""
    from models.types import ModelPackageError

    st = _store(store, config)
    entries = st.list(verify=verify_files)
    try:
        state = st.read_state().as_json()
    except ModelPackageError as exc:
        state = {"error": str(exc)}
    if as_json:
        typer.echo(
            json.dumps(
                {"store": str(st.root), "state": state, "packages": [e.as_json() for e in entries]}
            )
        )
        return
    t = Table(title=f"model store {st.root}")
    for col in ("model", "role", "digest", "plc id", "signed by", "created", "status"):
        t.add_column(col)
    for e in entries:
        t.add_row(
            e.ref,
            ",".join(e.roles),
            e.digest[:12],
            "" if e.plc_model_id is None else str(e.plc_model_id),
            ",".join(e.signed_by),
            (e.created_at or "")[:19],
            "ok" if e.error is None else f"[red]{e.error}[/red]",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    console.print(
        "active: {a}  previous: {p}  shadow: {s}".format(
            a=state.get("active"), p=state.get("previous"), s=state.get("shadow")
        )
        if "error" not in state
        else f"[red]state.json: {state['error']}[/red]"
    )


@app.command()
def quantize(
    package_dir: Annotated[Path, typer.Argument(help="The FP32 package to quantize.")],
    calibration: Annotated[
        Path, typer.Option(help="Folder of representative images (camera frames) to calibrate on.")
    ],
    holdout: Annotated[
        Path, typer.Option(help="data.yaml whose test (else val) images judge the INT8 model.")
    ],
    out: Annotated[Path, typer.Option(help="Directory of the INT8 package.")],
    min_agreement: Annotated[
        float,
        typer.Option(help="Gate: share of hold-out images decided like FP32 (OK/DEFECT)."),
    ] = 0.98,
    version: Annotated[
        str | None, typer.Option(help="Version of the INT8 package (default: VERSION+int8).")
    ] = None,
    plc_model_id: Annotated[
        int | None, typer.Option(help="PLC model id (default: the FP32 package's).")
    ] = None,
    method: Annotated[str, typer.Option(help="Calibration: minmax, percentile or entropy.")] = (
        "minmax"
    ),
    calibration_max: Annotated[int, typer.Option(help="Use at most this many images.")] = 200,
    holdout_split: Annotated[
        str | None, typer.Option(help="Split of --holdout (default: test, else val).")
    ] = None,
    sign_key: Annotated[
        Path | None, typer.Option("--sign", help="Sign the INT8 package with this private key.")
    ] = None,
    trusted_key: TrustedOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Static INT8 (QDQ) quantization with ONNX Runtime, refused unless the INT8 package makes
    the same OK/DEFECT decisions as FP32 on the hold-out (>= --min-agreement)."""
    from models.quantize import QuantizationRefused, quantize_package
    from models.types import ModelPackageError

    try:
        with _bars() as bar:
            report = quantize_package(
                package_dir,
                calibration,
                holdout,
                out,
                version=version,
                plc_model_id=plc_model_id,
                min_agreement=min_agreement,
                calibration_max=calibration_max,
                holdout_split=holdout_split,
                method=method,
                overwrite=overwrite,
                sign_with=sign_key,
                trusted_keys=list(trusted_key or []),
                progress=bar,
            )
    except QuantizationRefused as e:
        raise _fail(f"refused: {e}", code=1) from e
    except (ModelPackageError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    console.print(
        f"INT8 decisions agree with FP32 on {report.agreement:.2%} of {report.images} hold-out "
        f"images; session.run p50 {report.fp32_ms:.2f} ms (FP32) -> {report.int8_ms:.2f} ms "
        f"(INT8, 1 thread)"
    )
    _print_package(out)


@app.command()
def compare(
    package_dir: Annotated[
        Path, typer.Argument(help="The reference package (run on ONNX Runtime).")
    ],
    holdout: Annotated[Path, typer.Option(help="data.yaml whose test (else val) images are used.")],
    against: Annotated[
        Path | None, typer.Option(help="Another package to compare (e.g. its INT8 version).")
    ] = None,
    runtime: Annotated[
        str, typer.Option(help="Runtime of the candidate: onnxruntime or openvino.")
    ] = "onnxruntime",
    precision: Annotated[
        str, typer.Option(help="openvino: f32, bf16 or f16 (bf16 is faster where the CPU has it).")
    ] = "f32",
    threads: Annotated[int, typer.Option(help="Inference threads of both sides.")] = 2,
    min_agreement: Annotated[
        float, typer.Option(help="Exit 1 when fewer images than this share are decided alike.")
    ] = 0.98,
    holdout_split: Annotated[
        str | None, typer.Option(help="Split of --holdout (default: test, else val).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Check that a candidate (another package, or the same one on another runtime/precision)
    makes the same OK/DEFECT decisions as the reference on ONNX Runtime, before deploying it."""
    from models.compare import compare_decisions, onnx_detector
    from models.config import ModelSettings
    from models.loader import load_detector
    from models.package import verify_package
    from models.quantize import holdout_images
    from models.runtimes import OpenVinoSettings
    from models.training.valstats import decision_floor
    from models.types import ModelError, ModelPackageError

    try:
        ref = verify_package(package_dir)
        cand = verify_package(against) if against else ref
        images, split = holdout_images(holdout, holdout_split)
        if runtime == "openvino":
            cand_det = load_detector(
                ModelSettings(
                    package=cand.root,
                    runtime="openvino",
                    openvino=OpenVinoSettings.model_validate(
                        {"threads": threads, "precision": precision}
                    ),
                    conf_threshold=decision_floor(cand),
                    warmup_runs=1,
                ),
                cand,
            )
        elif runtime == "onnxruntime":
            cand_det = onnx_detector(cand, threads)
        else:
            raise _fail(f"--runtime {runtime!r}: choose onnxruntime or openvino")
        with _bars() as bar:
            result = compare_decisions(
                ref,
                onnx_detector(ref, threads),
                cand,
                cand_det,
                images,
                progress=bar(f"{split} images", len(images)),
            )
    except (ModelPackageError, ModelError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    label = f"{cand.ref} on {runtime}" + (f" ({precision})" if runtime == "openvino" else "")
    doc = {"reference": ref.ref, "candidate": label, **result.as_json()}
    if as_json:
        typer.echo(json.dumps(doc))
    console.print(
        f"{label} decides like {ref.ref} (onnxruntime) on {result.agreement:.2%} of "
        f"{result.images} images ({len(result.disagreements)} differ; largest top-score "
        f"difference {result.max_score_diff:.4f}); infer p50 {result.reference_ms:.2f} ms -> "
        f"{result.candidate_ms:.2f} ms"
    )
    if result.agreement < min_agreement:
        raise _fail(f"agreement below --min-agreement {min_agreement}", code=1)


@app.command("build-engine")
def build_engine(
    package_dir: Annotated[Path, typer.Option("--package", help="Model package directory.")],
    out: Annotated[
        Path | None, typer.Option(help="Engine file (default: the runtime's cache path).")
    ] = None,
    precision: Annotated[str, typer.Option(help="fp16, int8 or fp32.")] = "fp16",
    calibration_images: Annotated[
        Path | None, typer.Option(help="Images for INT8 calibration.")
    ] = None,
    calibration_cache: Annotated[
        Path | None, typer.Option(help="INT8 calibration cache (read or written).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch the engine serves.")] = 1,
) -> None:
    """Build a TensorRT engine for a package on this machine's GPU."""
    from models.training.engine import build

    if precision not in ("fp16", "int8", "fp32"):
        raise _fail(f"--precision {precision!r}: choose fp16, int8 or fp32")
    prec: Literal["fp16", "int8", "fp32"] = precision  # type: ignore[assignment]
    try:
        path = build(
            package_dir,
            out,
            precision=prec,
            calibration_images=calibration_images,
            calibration_cache=calibration_cache,
            max_batch=max_batch,
        )
    except Exception as e:  # TensorRT/driver errors are untyped; report them plainly
        raise _fail(f"{type(e).__name__}: {e}") from e
    console.print(f"wrote engine {path}")


if __name__ == "__main__":  # `python -m edge.cli.model ...`: the training scripts use it
    app()
