"""Train a YOLOv8-seg network from the recipe; ultralytics does the work, we make it repeatable."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from models.datasets.yolo import class_names, load_data_yaml
from models.training import ultra_env
from models.training.arch import write_arch_yaml
from models.training.recipe import TrainRecipe

log = structlog.get_logger(__name__)

EpochCallback = Callable[[int, int, dict[str, float]], None]
"""(epoch done, epochs planned, metrics) after every epoch: drives progress bars."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_dir: Path
    best: Path
    last: Path
    epochs_done: int
    wall_s: float
    recipe: dict[str, Any]


def train(recipe: TrainRecipe, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train and return where the checkpoints are; raises with the reason if none was written."""
    doc = load_data_yaml(recipe.data)
    names = class_names(doc)
    ultra_env.prepare(threads=recipe.threads)
    arch_dir = (recipe.project / recipe.name).resolve()
    source: Path = (
        recipe.weights if recipe.weights else write_arch_yaml(arch_dir, len(names), recipe.scale)
    )
    model = ultra_env.yolo(source)
    done = {"epochs": 0, "reported": 0}

    def _trained_one(trainer: Any) -> None:
        done["epochs"] += 1

    def _epoch_end(trainer: Any) -> None:
        # ultralytics fires this once more after training, for the final validation of best.pt:
        # only epochs that were trained are reported.
        if done["reported"] >= done["epochs"]:
            return
        done["reported"] = done["epochs"]
        if on_epoch is not None:
            metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
            loss = trainer.tloss
            if isinstance(loss, dict) and loss:
                metrics["train/loss"] = float(sum(float(v) for v in loss.values()))
            on_epoch(done["epochs"], max(int(trainer.epochs), done["epochs"]), metrics)

    model.add_callback("on_train_epoch_end", _trained_one)
    model.add_callback("on_fit_epoch_end", _epoch_end)
    kwargs = recipe.train_kwargs()
    log.info(
        "train.start",
        data=str(recipe.data),
        scale=recipe.scale,
        epochs=recipe.epochs,
        hours=recipe.hours,
        batch=recipe.batch,
        lr0=recipe.lr0,
        imgsz=recipe.imgsz,
    )
    t0 = time.perf_counter()
    model.train(**kwargs)
    wall = time.perf_counter() - t0
    run_dir = Path(model.trainer.save_dir)
    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    if not best.exists():
        raise RuntimeError(f"training finished without {best}; see the log above")
    record = recipe.model_dump(mode="json")
    (run_dir / "recipe.json").write_text(
        json.dumps(
            {"recipe": record, "epochs_done": done["epochs"], "wall_s": round(wall, 1)}, indent=2
        )
        + "\n"
    )
    log.info("train.done", run_dir=str(run_dir), epochs=done["epochs"], wall_s=round(wall, 1))
    return TrainResult(run_dir, best, last, done["epochs"], wall, record)
