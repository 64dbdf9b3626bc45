"""Train a YOLOv8-seg network from the recipe; ultralytics does the work, we make it repeatable.

Why the epoch plan is ours and not ultralytics' ``time``: with ``time`` ultralytics re-estimates
the epoch count after every epoch and refits the LR schedule each time. On a shared box the slow
first epochs dropped the estimate to 9, so ``close_mosaic 5`` switched mosaic off after epoch 4
of what became 18, and a 0.6 h run reached 18 epochs where ~38 fitted. Here the count is fixed
ONCE, after :data:`MEASURE_EPOCHS` measured epochs (the first carries start-up cost), the
scheduler is rebuilt once the way ultralytics builds it, and from then on the LR schedule,
the warm-up and the mosaic close (``epoch == planned - close_mosaic``) never move. A hard
wall-clock stop at :data:`GUARD_FACTOR` x budget is only a guard, recorded when it fires.

Everything that shaped a run goes to ``RUN_DIR/recipe.json``, written when training starts
(status ``running``), after every epoch, and at the end (``finished``, ``interrupted``,
``failed``). ``resume(RUN_DIR)`` continues from ``weights/last.pt`` with the recorded recipe
and plan.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from models.datasets.yolo import class_names, load_data_yaml
from models.package import atomic_write, sha256_file
from models.training import ultra_env
from models.training.arch import write_arch_yaml
from models.training.recipe import TrainRecipe

log = structlog.get_logger(__name__)

EpochCallback = Callable[[int, int, dict[str, float]], None]
"""(epoch done, epochs planned, metrics) after every epoch: drives progress bars."""
Clock = Callable[[], float]
"""Seconds, monotonic: injected by tests so a time budget is tested without waiting."""
TrainerCallbacks = Mapping[str, list[Callable[[Any], None]]]
"""Extra ultralytics callbacks by event, run after this module's own (tests, benchmarks)."""

MEASURE_EPOCHS = 2
"""Epochs measured before the count is fixed: epoch 1 carries start-up cost (first allocations,
loader warm-up), so the estimate is the time of the last of these."""
GUARD_FACTOR = 1.15
"""The hard stop, as a multiple of the budget: the plan is meant to end inside the budget, the
guard only catches a box that got much slower after the count was fixed."""
RECORD_NAME = "recipe.json"


class TrainSetupError(ValueError):
    """Bad input found before any training started (the CLI exits 2 with the message)."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_dir: Path
    best: Path
    last: Path
    epochs_done: int
    wall_s: float
    recipe: dict[str, Any]


@dataclass(slots=True)
class EpochPlan:
    """How many epochs the run trains and why (``recipe.json`` -> ``epoch_plan``)."""

    requested: int
    """``--epochs``: the count without a budget, the cap with one."""
    budget_s: float | None
    planned: int
    """The count in force: equal to ``requested`` until a budget fixes it."""
    close_mosaic: int
    warmup_epochs: float = 0.0
    fixed_after_epoch: int | None = None
    """Epochs done when the count was fixed (0: before training, no budget); None: not yet."""
    fixed_at_elapsed_s: float | None = None
    measured_epoch_s: list[float] = field(default_factory=list)
    """Wall seconds (train + validation + checkpoint) of the epochs measured before fixing."""
    estimate_s: float | None = None
    """Seconds per epoch the count was fitted with."""
    reason: str = "requested epochs"

    @property
    def fixed(self) -> bool:
        return self.fixed_after_epoch is not None

    def mosaic_epochs(self) -> int:
        """Epochs trained with mosaic under this plan (ultralytics closes it at this 0-based
        epoch; later if the count was fixed only after that epoch had passed)."""
        if not self.close_mosaic:
            return self.planned
        planned_close = max(self.planned - self.close_mosaic, 0)
        fixed_after = self.fixed_after_epoch or 0
        if planned_close >= fixed_after:
            return planned_close
        # Fixed too late for the planned close: it happens right after fixing, unless the
        # provisional (requested) count had already closed it during the measured epochs.
        return min(max(self.requested - self.close_mosaic, 0), fixed_after)

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["fixed"] = self.fixed
        doc["mosaic_off_from_epoch"] = (
            self.mosaic_epochs() + 1 if self.close_mosaic and self.fixed else None
        )
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EpochPlan:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


def fit_epochs(requested: int, budget_s: float, done: int, elapsed_s: float, epoch_s: float) -> int:
    """The epoch count that fits the budget: the epochs done plus the whole epochs of
    ``epoch_s`` left in it, at most ``requested``, never fewer than are done (an epoch cannot
    be untrained). Whole epochs, rounded down: the run should end inside its budget; the
    guard is for surprises, not for the planned last epoch."""
    room = budget_s - elapsed_s
    more = math.floor(room / epoch_s) if epoch_s > 0 and room > 0 else 0
    return max(done, min(requested, done + more))


class BudgetKeeper:
    """Fixes the epoch count once from measured epochs and watches the hard stop.

    Pure bookkeeping over an injected clock (no ultralytics), so the rules are unit-tested
    directly. ``prior_s`` is the wall time of earlier sessions of a resumed run.
    """

    def __init__(self, plan: EpochPlan, clock: Clock, prior_s: float = 0.0) -> None:
        self.plan = plan
        self.clock = clock
        self.prior_s = prior_s
        self.t0 = clock()

    def elapsed(self) -> float:
        return self.prior_s + self.clock() - self.t0

    def epoch_finished(self, done: int, epoch_s: float) -> bool:
        """Account one finished epoch; True when this call fixed the count."""
        plan = self.plan
        if plan.fixed or plan.budget_s is None:
            return False
        plan.measured_epoch_s.append(round(epoch_s, 3))
        elapsed = self.elapsed()
        if elapsed >= plan.budget_s:
            plan.planned, plan.reason = done, f"budget spent after epoch {done}"
        elif done >= MEASURE_EPOCHS or done >= plan.requested:
            plan.planned = fit_epochs(plan.requested, plan.budget_s, done, elapsed, epoch_s)
            plan.estimate_s = round(epoch_s, 3)
            plan.reason = (
                "requested epochs fit the budget"
                if plan.planned == plan.requested
                else f"budget fits {plan.planned} epochs at {epoch_s:.1f} s (epoch {done})"
            )
        else:
            return False
        plan.fixed_after_epoch = done
        plan.fixed_at_elapsed_s = round(elapsed, 3)
        return True

    def guard_limit_s(self) -> float | None:
        return None if self.plan.budget_s is None else GUARD_FACTOR * self.plan.budget_s

    def over_guard(self) -> bool:
        limit = self.guard_limit_s()
        return limit is not None and self.elapsed() > limit


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _write_record(run_dir: Path, doc: Mapping[str, Any]) -> None:
    """Atomic: a reader (or a resume after a crash) never sees half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / RECORD_NAME, (json.dumps(_jsonable(doc), indent=2) + "\n").encode())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import torch
    import ultralytics

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "ultralytics": str(ultralytics.__version__),
    }


def _data_record(data_yaml: Path) -> dict[str, Any]:
    split = data_yaml.parent / "split.json"
    return {
        "yaml": str(data_yaml),
        "yaml_sha256": sha256_file(data_yaml),
        "split_json": str(split) if split.is_file() else None,
        "split_json_sha256": sha256_file(split) if split.is_file() else None,
    }


def check_weights(path: Path) -> dict[str, Any]:
    """Validate a user's pretrained checkpoint before training; what it is, for the record.

    Loadable by ultralytics and a segmentation model, or :class:`TrainSetupError` saying why.
    A different class count is fine: ultralytics rebuilds the head for the data's classes and
    transfers every layer whose shape matches.
    """
    if not path.is_file():
        raise TrainSetupError(f"--weights {path}: no such file")
    if path.suffix != ".pt":
        raise TrainSetupError(f"--weights {path}: expected an ultralytics .pt checkpoint")
    if ultra_env.thread_settings() is None:  # a bare call; inside a run prepare() already ran
        ultra_env.prepare()  # (again without --threads it would reset torch to every core)
    from ultralytics.nn.tasks import load_checkpoint

    try:
        model, ckpt = load_checkpoint(path)
    except Exception as e:  # torch/pickle raise anything on a file that is not a checkpoint
        raise TrainSetupError(
            f"--weights {path}: not a loadable ultralytics checkpoint ({type(e).__name__}: {e})"
        ) from e
    task = getattr(model, "task", None)
    if task != "segment":
        raise TrainSetupError(
            f"--weights {path}: a {task!r} checkpoint; segmentation training needs a "
            "segmentation one (yolov8*-seg.pt, or a best.pt from `edge model train`)"
        )
    names = getattr(model, "names", None) or {}
    return {
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "task": task,
        "classes": len(names),
        "names": [str(v) for v in (names.values() if isinstance(names, dict) else names)],
        "trained_epochs": (int(ckpt["epoch"]) + 1) if isinstance(ckpt.get("epoch"), int) else None,
    }


def _losses(trainer: Any) -> dict[str, float]:
    loss = trainer.tloss
    if isinstance(loss, Mapping) and loss:
        return {str(k): round(float(v), 4) for k, v in loss.items()}
    return {}


_METRIC_KEYS = {
    "metrics/mAP50(B)": "box_map50",
    "metrics/mAP50-95(B)": "box_map50_95",
    "metrics/mAP50(M)": "mask_map50",
    "metrics/mAP50-95(M)": "mask_map50_95",
}


class _Run:
    """One training session (a fresh run or a resumed one) and its record."""

    def __init__(
        self,
        recipe: TrainRecipe,
        *,
        on_epoch: EpochCallback | None,
        clock: Clock,
        callbacks: TrainerCallbacks | None,
        record: dict[str, Any] | None = None,
        last: Path | None = None,
    ) -> None:
        self.recipe = recipe
        self.on_epoch = on_epoch
        self.clock = clock
        self.extra = callbacks or {}
        self.last_ckpt = last
        self.resuming = last is not None
        self.run_dir = (
            last.parent.parent.resolve()
            if last is not None
            else recipe.project.resolve() / recipe.name
        )
        prior = record or {}
        self.sessions: list[dict[str, Any]] = list(prior.get("sessions", []))
        prior_s = float(prior.get("wall_s", 0.0)) if self.resuming else 0.0
        if self.resuming and prior.get("epoch_plan"):
            plan = EpochPlan.from_json(prior["epoch_plan"])
        else:
            plan = EpochPlan(
                requested=recipe.epochs,
                budget_s=None if recipe.hours is None else recipe.hours * 3600.0,
                planned=recipe.epochs,
                close_mosaic=recipe.close_mosaic,
                warmup_epochs=recipe.warmup_epochs,
            )
            if plan.budget_s is None:
                plan.fixed_after_epoch, plan.reason = 0, "requested epochs (no --hours budget)"
        self.keeper = BudgetKeeper(plan, clock, prior_s)
        self.doc: dict[str, Any] = dict(prior) if self.resuming else {}
        self.epochs_done = int(prior.get("epochs_done", 0)) if self.resuming else 0
        self.reported = self.epochs_done
        self.epoch_t0 = 0.0
        self.session_epoch_s: list[float] = []
        self.validated = False
        self.lr: dict[str, float] = {}
        self.final_metrics: dict[str, float] = {}
        self.guard: dict[str, Any] = dict(prior.get("guard") or {})
        self.mosaic_closed_at: int | None = None
        self.session: dict[str, Any] = {}
        self.trainer_args: Any = None

    # ---- the record ----

    def _save(self, status: str, **extra: Any) -> None:
        plan = self.keeper.plan
        wall = self.keeper.elapsed()
        if self.trainer_args is not None:  # as resolved by ultralytics, epochs as planned now
            self.doc["ultralytics_args"] = dict(vars(self.trainer_args))
        self.doc.update(
            {
                "status": status,
                "recipe": self.recipe.model_dump(mode="json"),
                "run_dir": str(self.run_dir),
                "epochs_done": self.epochs_done,
                "epoch_plan": plan.as_json(),
                "wall_s": round(wall, 1),
                "resumed": self.resuming or bool(self.doc.get("resumed")),
                "sessions": [*self.sessions, self.session],
                "guard": {
                    "factor": GUARD_FACTOR,
                    "limit_s": self.keeper.guard_limit_s(),
                    "stopped": bool(self.guard.get("stopped")),
                    **self.guard,
                },
                "updated": _now(),
                **extra,
            }
        )
        _write_record(self.run_dir, self.doc)

    # ---- ultralytics callbacks ----

    def _pretrain_start(self, trainer: Any) -> None:
        # After check_resume: a checkpoint written between fixing the count and re-saving
        # still carries the old count; the recorded plan wins.
        plan = self.keeper.plan
        if plan.fixed and int(trainer.args.epochs) != plan.planned:
            trainer.epochs = trainer.args.epochs = plan.planned

    def _pretrain_end(self, trainer: Any) -> None:
        original = trainer._close_dataloader_mosaic

        def closing() -> None:
            self.mosaic_closed_at = int(trainer.epoch) + 1
            self.session["mosaic_closed_at_epoch"] = self.mosaic_closed_at
            log.info("train.mosaic_closed", epoch=self.mosaic_closed_at)
            original()

        trainer._close_dataloader_mosaic = closing  # records the epoch it really happened
        if self.resuming:  # the checkpoint, not the record, says where training stands
            self.epochs_done = self.reported = int(trainer.start_epoch)
            self.session["resumed_from_epoch"] = self.epochs_done
        workers = int(getattr(trainer.train_loader, "num_workers", 0))
        self.doc["workers"] = {
            "requested": self.recipe.workers,
            "effective": workers,
            **(
                {"note": "ultralytics loads data in the training process on CPU"}
                if self.recipe.cpu_like()
                else {}
            ),
        }
        self.doc["device"] = {"requested": self.recipe.device, "resolved": str(trainer.device)}
        self.trainer_args = trainer.args  # copied into the record at every save
        self.doc["train_images"] = len(trainer.train_loader.dataset)
        self.doc["batches_per_epoch"] = len(trainer.train_loader)
        self.session["threads"] = self.doc["threads"]  # recorded by execute() for this session
        self._save("running")

    def _epoch_start(self, trainer: Any) -> None:
        self.epoch_t0 = self.clock()
        self.validated = False

    def _val_end(self, _validator: Any) -> None:
        self.validated = True

    def _batch_end(self, trainer: Any) -> None:
        if not self.guard.get("stopped") and self.keeper.over_guard():
            trainer.stop = True
            self.guard.update(
                stopped=True,
                at_epoch=int(trainer.epoch) + 1,
                elapsed_s=round(self.keeper.elapsed(), 1),
            )
            log.warning(
                "train.guard_stop",
                epoch=int(trainer.epoch) + 1,
                planned=self.keeper.plan.planned,
                elapsed_s=round(self.keeper.elapsed(), 1),
                limit_s=self.keeper.guard_limit_s(),
                why="the box got slower after the epoch count was fixed",
            )

    def _train_epoch_end(self, trainer: Any) -> None:
        self.epochs_done = int(trainer.epoch) + 1
        self.lr = {k: float(v) for k, v in (getattr(trainer, "lr", None) or {}).items()}

    def _fit_epoch_end(self, trainer: Any) -> None:
        # ultralytics fires this once more after training, for the final validation of best.pt.
        if self.epochs_done <= self.reported:
            self.final_metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
            return
        self.reported = done = self.epochs_done
        epoch_s = self.clock() - self.epoch_t0
        self.session_epoch_s.append(epoch_s)
        plan = self.keeper.plan
        if self.keeper.epoch_finished(done, epoch_s):
            self._apply_plan(trainer, done)
        metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
        shown = {
            short: round(metrics[k], 4)
            for k, short in _METRIC_KEYS.items()
            if self.validated and k in metrics
        }
        steady = self.session_epoch_s[1:] or self.session_epoch_s
        eta = (
            max(plan.planned - done, 0) * sum(steady) / len(steady)
            if plan.fixed or plan.budget_s is None
            else max(plan.budget_s - self.keeper.elapsed(), 0.0)
        )
        log.info(
            "train.epoch",
            epoch=done,
            planned=plan.planned,
            plan="fixed" if plan.fixed else "provisional",
            **_losses(trainer),
            **shown,
            lr=round(next(iter(self.lr.values()), 0.0), 8),
            epoch_s=round(epoch_s, 1),
            elapsed_s=round(self.keeper.elapsed(), 1),
            eta_s=round(eta),
        )
        self._save("running")
        if self.on_epoch is not None:
            # Before any validation ultralytics' metrics are zeros, not measurements.
            shown_metrics = metrics if self.validated else {}
            loss = _losses(trainer)
            if loss:
                shown_metrics["train/loss"] = float(sum(loss.values()))
            self.on_epoch(done, max(plan.planned, done), shown_metrics)

    def _apply_plan(self, trainer: Any, done: int) -> None:
        """Set the fixed count and rebuild the scheduler once, as ultralytics' time mode does
        every epoch: the next scheduler step lands on epoch ``done`` of the new schedule."""
        plan = self.keeper.plan
        trainer.epochs = trainer.args.epochs = plan.planned
        trainer._setup_scheduler()
        trainer.scheduler.last_epoch = int(trainer.epoch)
        log.info(
            "train.plan",
            planned=plan.planned,
            requested=plan.requested,
            after_epoch=done,
            measured_epoch_s=plan.measured_epoch_s,
            budget_s=plan.budget_s,
            reason=plan.reason,
            mosaic_off_from_epoch=plan.mosaic_epochs() + 1 if plan.close_mosaic else None,
        )
        if plan.warmup_epochs > 0 and plan.planned <= plan.warmup_epochs:
            log.warning(
                "train.warmup_longer_than_run",
                warmup_epochs=plan.warmup_epochs,
                planned=plan.planned,
                why="the warm-up length was set at the start from the requested epochs",
            )
        if plan.close_mosaic and plan.planned - plan.close_mosaic < done < plan.planned:
            log.warning(
                "train.close_mosaic_late",
                close_mosaic=plan.close_mosaic,
                planned=plan.planned,
                mosaic_off_from_epoch=done + 1,
                why="the count was fixed after the planned close; mosaic goes off now",
            )
        if done >= plan.planned:
            trainer.stop = True
        else:
            # This epoch's checkpoint was written before the count was fixed: write it again
            # so that last.pt (what a resume reads) carries the plan in its train_args.
            trainer.save_model()

    # ---- running ----

    def _refuse_to_overwrite_an_unfinished_run(self) -> None:
        """A fresh run in the same folder would delete the resumable one's results."""
        path = self.run_dir / RECORD_NAME
        if not (path.is_file() and (self.run_dir / "weights" / "last.pt").is_file()):
            return
        try:
            old = json.loads(path.read_text())
        except ValueError:
            return
        if isinstance(old, dict) and old.get("status") in ("running", "interrupted", "failed"):
            raise TrainSetupError(
                f"{self.run_dir} holds an unfinished run (status {old['status']}, "
                f"{old.get('epochs_done', '?')} epochs done): continue it with "
                f"`edge model train --resume {self.run_dir}`, or choose another --name"
            )

    def _threads(self) -> dict[str, Any] | None:
        t = ultra_env.thread_settings()
        return None if t is None else t.as_json()

    def _callbacks(self) -> dict[str, list[Callable[[Any], None]]]:
        own: dict[str, list[Callable[[Any], None]]] = {
            "on_pretrain_routine_start": [self._pretrain_start],
            "on_pretrain_routine_end": [self._pretrain_end],
            "on_train_epoch_start": [self._epoch_start],
            "on_val_end": [self._val_end],
            "on_train_batch_end": [self._batch_end],
            "on_train_epoch_end": [self._train_epoch_end],
            "on_fit_epoch_end": [self._fit_epoch_end],
        }
        for event, fns in self.extra.items():
            own.setdefault(event, []).extend(fns)
        return own

    def execute(self) -> TrainResult:
        recipe = self.recipe
        ultra_env.prepare(threads=recipe.threads)
        settings = ultra_env.thread_settings()
        if settings is not None and not settings.env_applied:
            log.warning(
                "train.openmp_env_late",
                why="torch was imported before the tool set OMP_WAIT_POLICY and thread counts; "
                "OpenMP keeps the environment it started with (only torch's counts were set)",
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
            )
        if recipe.workers and recipe.cpu_like():
            log.warning(
                "train.workers_ignored",
                requested=recipe.workers,
                effective=0,
                why="ultralytics loads data in the training process on CPU",
            )
        data_yaml = recipe.data_yaml()
        try:
            names = class_names(load_data_yaml(data_yaml))
        except (FileNotFoundError, ValueError) as e:
            raise TrainSetupError(str(e)) from e
        if not self.resuming:
            self._refuse_to_overwrite_an_unfinished_run()
        weights = check_weights(recipe.weights) if recipe.weights and not self.resuming else None
        self.session = {
            "started": _now(),
            "resumed_from_epoch": self.epochs_done if self.resuming else None,
        }
        if self.resuming:
            assert self.last_ckpt is not None
            model = ultra_env.yolo(self.last_ckpt)
            kwargs: dict[str, Any] = {"resume": str(self.last_ckpt), "data": str(data_yaml)}
            self.session["ultralytics_kwargs"] = kwargs
        else:
            source = (
                weights["path"]
                if weights
                else write_arch_yaml(self.run_dir, len(names), recipe.scale)
            )
            model = ultra_env.yolo(source)
            kwargs = recipe.train_kwargs()
            self.doc = {"ultralytics_kwargs": kwargs}
            if weights:
                self.doc["weights"] = weights
                if weights["classes"] != len(names):
                    log.info(
                        "train.weights_head",
                        checkpoint_classes=weights["classes"],
                        data_classes=len(names),
                        note="the head is rebuilt for the data's classes; matching layers transfer",
                    )
        for event, fns in self._callbacks().items():
            for fn in fns:
                model.add_callback(event, fn)
        self.doc.update(
            {
                "data": _data_record(data_yaml),
                "classes": names,
                "versions": _versions(),
                "threads": self._threads(),
            }
        )
        self._save("running")
        log.info(
            "train.resume" if self.resuming else "train.start",
            run_dir=str(self.run_dir),
            data=str(data_yaml),
            scale=recipe.scale,
            epochs=recipe.epochs,
            hours=recipe.hours,
            planned=self.keeper.plan.planned,
            batch=recipe.batch,
            lr0=recipe.lr0,
            imgsz=recipe.imgsz,
            from_epoch=self.epochs_done + 1,
            **(self._threads() or {}),
        )
        try:
            model.train(**kwargs)
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.session.update(status=status, wall_s=round(self.clock() - self.keeper.t0, 1))
            self._save(status, error=f"{type(e).__name__}: {e}")
            log.warning(
                f"train.{status}",
                run_dir=str(self.run_dir),
                epochs_done=self.epochs_done,
                resume=f"edge model train --resume {self.run_dir}",
            )
            raise
        trainer = model.trainer
        best, last = Path(trainer.best), Path(trainer.last)
        if not best.exists():
            raise RuntimeError(f"training finished without {best}; see the log above")
        self.session.update(status="finished", wall_s=round(self.clock() - self.keeper.t0, 1))
        if self.mosaic_closed_at is not None:
            self.session["mosaic_closed_at_epoch"] = self.mosaic_closed_at
        self.doc.pop("error", None)
        self._save("finished", final_metrics=self.final_metrics)
        wall = self.keeper.elapsed()
        log.info(
            "train.done",
            run_dir=str(self.run_dir),
            epochs=self.epochs_done,
            planned=self.keeper.plan.planned,
            wall_s=round(wall, 1),
            guard_stopped=bool(self.guard.get("stopped")),
        )
        return TrainResult(
            self.run_dir, best, last, self.epochs_done, wall, recipe.model_dump(mode="json")
        )


def train(
    recipe: TrainRecipe,
    on_epoch: EpochCallback | None = None,
    *,
    clock: Clock = time.monotonic,
    callbacks: TrainerCallbacks | None = None,
) -> TrainResult:
    """Train and return where the checkpoints are; raises with the reason if none was written.

    :class:`TrainSetupError` before training for bad input; ``KeyboardInterrupt`` passes
    through after ``recipe.json`` was marked ``interrupted`` (continue with :func:`resume`).
    """
    return _Run(recipe, on_epoch=on_epoch, clock=clock, callbacks=callbacks).execute()


def resume_target(path: Path) -> tuple[Path, Path]:
    """``RUN_DIR`` or ``RUN_DIR/weights/last.pt`` -> (run dir, last.pt), checked."""
    last = path if path.suffix == ".pt" else path / "weights" / "last.pt"
    run_dir = last.parent.parent
    if not (run_dir / RECORD_NAME).is_file():
        raise TrainSetupError(
            f"--resume {path}: no {RECORD_NAME} in {run_dir} (not a run of `edge model train`)"
        )
    if not last.is_file():
        raise TrainSetupError(
            f"--resume {path}: no {last}: the run stopped before its first epoch ended; "
            "start it again"
        )
    return run_dir, last


def resume(
    path: Path,
    on_epoch: EpochCallback | None = None,
    *,
    threads: int | None = None,
    clock: Clock = time.monotonic,
    callbacks: TrainerCallbacks | None = None,
) -> TrainResult:
    """Continue an interrupted run from its ``last.pt`` with its recorded recipe and plan.

    Only ``threads`` may differ (it belongs to the box, not to the recipe). The data set is the
    recorded absolute data.yaml, so a resume works from any directory.
    """
    run_dir, last = resume_target(path)
    try:
        record = json.loads((run_dir / RECORD_NAME).read_text())
        recipe = TrainRecipe.model_validate(record["recipe"])
    except (ValueError, KeyError, TypeError) as e:
        raise TrainSetupError(f"--resume {path}: unreadable {RECORD_NAME}: {e}") from e
    if record.get("status") == "finished":
        raise TrainSetupError(f"--resume {path}: the run already finished")
    data = (record.get("data") or {}).get("yaml")
    updates: dict[str, Any] = {"data": Path(data) if data else recipe.data}
    if threads is not None:
        updates["threads"] = threads
    recipe = recipe.model_copy(update=updates)
    return _Run(
        recipe, on_epoch=on_epoch, clock=clock, callbacks=callbacks, record=record, last=last
    ).execute()
