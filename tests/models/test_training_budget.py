"""Training that behaves on a shared box (issue 14): a budget that fixes the epoch count once,
one LR schedule and a mosaic close that stay put, a hard-stop guard, resume, progress lines in a
redirected log, OpenMP thread settings, and transfer learning from the user's own checkpoint.

Time budgets are tested on an injected clock that the test advances from ultralytics callbacks,
so nothing waits. The data is tiny (16 synthetic 64-px images, 3 batches per epoch).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from models.synth import SynthConfig, write_dataset
from models.training.train import (
    GUARD_FACTOR,
    BudgetKeeper,
    EpochPlan,
    TrainSetupError,
    fit_epochs,
)

REPO = Path(__file__).resolve().parents[2]
LR0 = 0.00232
LRF = 0.01  # ultralytics' default final LR fraction


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ---- the rules, without ultralytics ----


def test_fit_epochs_counts_whole_epochs_inside_the_budget() -> None:
    assert fit_epochs(50, 550.0, 2, 200.0, 100.0) == 5
    assert fit_epochs(50, 599.0, 2, 200.0, 100.0) == 5  # rounded down: end inside the budget
    assert fit_epochs(4, 10_000.0, 2, 200.0, 100.0) == 4  # --epochs stays the cap
    assert fit_epochs(50, 150.0, 2, 200.0, 100.0) == 2  # spent: never fewer than done


def test_budget_keeper_fixes_once_after_two_measured_epochs() -> None:
    clock = FakeClock()
    plan = EpochPlan(requested=50, budget_s=550.0, planned=50, close_mosaic=2)
    keeper = BudgetKeeper(plan, clock)
    clock.t = 130.0  # epoch 1 carries start-up cost
    assert not keeper.epoch_finished(1, 130.0)
    assert plan.planned == 50 and not plan.fixed
    clock.t = 230.0
    assert keeper.epoch_finished(2, 100.0)
    assert (plan.planned, plan.fixed_after_epoch, plan.estimate_s) == (5, 2, 100.0)
    assert plan.measured_epoch_s == [130.0, 100.0]
    clock.t = 2000.0  # a much slower epoch later changes nothing: the plan is fixed
    assert not keeper.epoch_finished(3, 1770.0)
    assert plan.planned == 5
    assert plan.mosaic_epochs() == 3  # ultralytics closes it at epoch planned - close_mosaic
    assert keeper.over_guard() and keeper.guard_limit_s() == pytest.approx(GUARD_FACTOR * 550)


def test_a_budget_spent_by_the_first_epoch_stops_there() -> None:
    clock = FakeClock()
    plan = EpochPlan(requested=50, budget_s=60.0, planned=50, close_mosaic=5)
    keeper = BudgetKeeper(plan, clock)
    clock.t = 90.0
    assert keeper.epoch_finished(1, 90.0)
    assert (plan.planned, plan.fixed_after_epoch) == (1, 1)
    assert "budget spent" in plan.reason


def test_mosaic_close_when_the_count_is_fixed_after_its_planned_epoch() -> None:
    # close_mosaic 5 > 3 planned epochs fixed after epoch 2: it closes right after fixing.
    late = EpochPlan(50, 1.0, planned=3, close_mosaic=5, fixed_after_epoch=2)
    assert late.mosaic_epochs() == 2
    assert late.as_json()["mosaic_off_from_epoch"] == 3
    # The provisional count (--epochs 3) had already closed it during the measured epochs.
    early = EpochPlan(3, 1.0, planned=2, close_mosaic=2, fixed_after_epoch=2)
    assert early.mosaic_epochs() == 1
    plain = EpochPlan(10, None, planned=10, close_mosaic=0, fixed_after_epoch=0)
    assert plain.mosaic_epochs() == 10 and plain.as_json()["mosaic_off_from_epoch"] is None


# ---- real (tiny) training ----


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models.training import ultra_env

    root = tmp_path_factory.mktemp("budget")
    ultra_env.prepare(root / "yolo-config")
    data = write_dataset(
        root / "data", 16, seed=3, cfg=SynthConfig(width=64, height=64, defect_fraction=0.5)
    )
    return {"root": root, "data": data, "config": root / "yolo-config"}


def _recipe(setup: dict[str, Path], name: str, **kw: Any) -> Any:
    from models.training.recipe import TrainRecipe

    base: dict[str, Any] = {
        "data": setup["data"],
        "imgsz": 64,
        "epochs": 50,
        "batch": 4,
        "cache": False,
        "project": setup["root"] / "runs",
        "name": name,
        "warmup_epochs": 0,  # the LR of an epoch is then exactly lr0 * lf(epoch)
        "val": False,
    }
    return TrainRecipe.model_validate({**base, **kw})


def _mosaic_p(trainer: Any) -> float:
    """The mosaic probability of the transforms the loader really uses (0 once closed)."""
    stack = [trainer.train_loader.dataset.transforms]
    while stack:
        t = stack.pop()
        if type(t).__name__ == "Mosaic":
            return float(t.p)
        stack.extend(getattr(t, "transforms", []) or [])
        if getattr(t, "pre_transform", None) is not None:
            stack.append(t.pre_transform)
    raise AssertionError("no Mosaic transform found")


def _record(run_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((run_dir / "recipe.json").read_text())
    return doc


def _ckpt_epochs(pt: Path) -> int:
    import torch

    return int(torch.load(pt, map_location="cpu", weights_only=False)["train_args"]["epochs"])


def test_budget_fixes_the_plan_once_and_resume_keeps_it(setup: dict[str, Path]) -> None:
    from edge.cli.model import app
    from models.training.train import train

    clock = FakeClock()
    lr: dict[int, float] = {}
    mosaic: dict[int, float] = {}

    def epoch_costs_100_s(trainer: Any) -> None:
        clock.t += 100.0
        lr[int(trainer.epoch)] = float(trainer.lr["lr/pg0"])

    def see_mosaic(trainer: Any) -> None:
        mosaic.setdefault(int(trainer.epoch), _mosaic_p(trainer))

    def interrupt_in_epoch_4(trainer: Any) -> None:
        if int(trainer.epoch) == 3:
            raise KeyboardInterrupt

    # 550 s at 100 s per epoch: 5 epochs; mosaic off for the last 2 (from 0-based epoch 3).
    recipe = _recipe(setup, "plan", hours=550 / 3600, close_mosaic=2)
    with pytest.raises(KeyboardInterrupt):
        train(
            recipe,
            clock=clock,
            callbacks={
                "on_train_epoch_end": [epoch_costs_100_s],
                "on_train_batch_start": [see_mosaic],
                "on_train_batch_end": [interrupt_in_epoch_4],
            },
        )
    run = (setup["root"] / "runs" / "plan").resolve()
    rec = _record(run)
    plan = rec["epoch_plan"]
    assert rec["status"] == "interrupted" and rec["epochs_done"] == 3
    assert (plan["planned"], plan["fixed_after_epoch"], plan["requested"]) == (5, 2, 50)
    assert plan["measured_epoch_s"] == [100.0, 100.0] and plan["mosaic_off_from_epoch"] == 4
    # The checkpoint a resume reads carries the fixed count, not --epochs.
    assert _ckpt_epochs(run / "weights" / "last.pt") == 5
    assert "time" not in rec["ultralytics_kwargs"]
    assert rec["ultralytics_args"]["epochs"] == 5 and rec["recipe"]["epochs"] == 50
    assert rec["data"]["yaml_sha256"] and rec["versions"]["ultralytics"]
    # Before the fix the provisional count (50) drove the schedule; from epoch 2 on, one
    # schedule for 5 epochs.
    assert lr[1] == pytest.approx(LR0 * ((1 - 1 / 50) * (1 - LRF) + LRF))
    assert lr[2] == pytest.approx(LR0 * ((1 - 2 / 5) * (1 - LRF) + LRF))
    assert mosaic[0] > 0 and mosaic[1] > 0 and mosaic[2] > 0 and mosaic[3] == 0

    with pytest.raises(TrainSetupError, match="unfinished run"):  # not overwritten by mistake
        train(recipe)

    res = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    rec = _record(run)
    assert rec["status"] == "finished" and rec["epochs_done"] == 5 and rec["resumed"]
    assert [s["resumed_from_epoch"] for s in rec["sessions"]] == [None, 3]
    assert [s["status"] for s in rec["sessions"]] == ["interrupted", "finished"]
    assert rec["sessions"][1]["mosaic_closed_at_epoch"] == 4  # still off after the resume
    assert rec["epoch_plan"]["planned"] == 5 and rec["ultralytics_args"]["epochs"] == 5
    assert not rec["guard"]["stopped"]
    # ultralytics' own per-epoch log (results.csv) spans both sessions: one schedule after
    # the fix, continued across the resume.
    with (run / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3, 4, 5]
    for e in (2, 3, 4):
        assert float(rows[e]["lr/pg0"]) == pytest.approx(
            LR0 * ((1 - e / 5) * (1 - LRF) + LRF), rel=1e-4
        )
    res = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 2 and "already finished" in res.output


def test_small_budget_and_the_guard(setup: dict[str, Path]) -> None:
    from models.training.train import train

    # The first epoch spends the whole budget: the plan is 1 epoch, fixed after epoch 1.
    clock = FakeClock()

    def slow_epoch(trainer: Any) -> None:
        clock.t += 1000.0

    result = train(
        _recipe(setup, "tiny", hours=0.1, close_mosaic=5),
        clock=clock,
        callbacks={"on_train_epoch_end": [slow_epoch]},
    )
    rec = _record(result.run_dir)
    assert result.epochs_done == 1 and rec["epoch_plan"]["planned"] == 1
    assert "budget spent" in rec["epoch_plan"]["reason"] and not rec["guard"]["stopped"]

    # 10 s per batch while measuring (30 s epochs) -> 155 s fits 5 epochs, so close_mosaic 5
    # must close at once after fixing; then the box becomes 100x slower and the guard
    # (1.15 x budget) stops the run inside epoch 3.
    clock = FakeClock()
    mosaic: dict[int, float] = {}

    def batch_cost(trainer: Any) -> None:
        clock.t += 10.0 if int(trainer.epoch) < 2 else 1000.0

    def see_mosaic(trainer: Any) -> None:
        mosaic.setdefault(int(trainer.epoch), _mosaic_p(trainer))

    result = train(
        _recipe(setup, "guard", hours=155 / 3600, close_mosaic=5),
        clock=clock,
        callbacks={"on_train_batch_end": [batch_cost], "on_train_batch_start": [see_mosaic]},
    )
    rec = _record(result.run_dir)
    plan = rec["epoch_plan"]
    assert (plan["planned"], plan["fixed_after_epoch"], plan["mosaic_off_from_epoch"]) == (5, 2, 3)
    assert mosaic[0] > 0 and mosaic[1] > 0 and mosaic[2] == 0
    assert rec["guard"]["stopped"] and rec["guard"]["at_epoch"] == 3
    assert rec["guard"]["limit_s"] == pytest.approx(GUARD_FACTOR * 155)
    assert result.epochs_done == 3 and rec["status"] == "finished"
    assert result.best.exists()


def _child_env(setup: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    env.update(YOLO_CONFIG_DIR=str(setup["config"]), PYTHONPATH=str(REPO))
    return env


_WATCH_LOG = """
import os, sys
from models.training import train as t

own = t._Run._callbacks

def callbacks(self):
    # Inside the CLI process: when epoch 2 starts, is epoch 1's line already in the log file?
    cbs = own(self)
    def check(trainer):
        if int(trainer.epoch) == 1:
            text = open(os.environ["WATCH_LOG"]).read()
            seen = any("train.epoch" in ln and "epoch=1 " in ln for ln in text.splitlines())
            open(os.environ["WATCH_OUT"], "w").write(str(seen))
    cbs.setdefault("on_train_epoch_start", []).append(check)
    return cbs

t._Run._callbacks = callbacks
from edge.cli.model import app
sys.argv[0] = "edge-model"
app()
"""


def test_cli_epoch_lines_reach_a_redirected_log_as_training_goes(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    log_file, seen = tmp_path / "train.log", tmp_path / "seen"
    env = {**_child_env(setup), "WATCH_LOG": str(log_file), "WATCH_OUT": str(seen)}
    args = ["--data", str(setup["data"]), "--imgsz", "64", "--epochs", "2", "--batch", "4"]
    args += ["--no-val", "--close-mosaic", "0", "--workers", "2", "--threads", "1"]
    args += ["--project", str(tmp_path / "runs"), "--name", "cli"]
    with log_file.open("w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", _WATCH_LOG, "train", *args],
            stderr=err,
            stdout=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
            timeout=300,
            check=False,
        )
    text = log_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert seen.read_text() == "True"  # epoch 1's line was in the file while epoch 2 ran
    lines = [ln for ln in text.splitlines() if "train.epoch" in ln]
    assert len(lines) == 2 and "planned=2" in lines[1] and "eta_s=" in lines[1]
    assert text.count("train.workers_ignored") == 1
    rec = _record(tmp_path / "runs" / "cli")
    assert rec["workers"] == {
        "requested": 2,
        "effective": 0,
        "note": "ultralytics loads data in the training process on CPU",
    }
    threads = rec["threads"]
    assert (threads["gomp_spincount"], threads["omp_wait_policy"]) == ("1000", None)
    assert threads["omp_wait_policy_source"] == "tool"
    assert threads["env_applied"] is True
    assert (threads["threads"], threads["torch_threads"], threads["omp_num_threads"]) == (1, 1, "1")
    assert rec["status"] == "finished" and rec["epochs_done"] == 2


def test_a_users_wait_policy_is_kept_and_a_late_import_is_recorded(
    setup: dict[str, Path],
) -> None:
    code = (
        "import json, sys\n"
        "if sys.argv[1] == 'late':\n"
        "    import torch\n"
        "from models.training import ultra_env\n"
        "ultra_env.prepare()\n"
        "print(json.dumps(ultra_env.thread_settings().as_json()))\n"
    )
    env = {**_child_env(setup), "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, "early"], env=env, capture_output=True, text=True, check=True
    )
    early = json.loads(out.stdout.strip().splitlines()[-1])
    assert (early["omp_wait_policy"], early["omp_wait_policy_source"]) == ("ACTIVE", "user")
    assert (early["threads_source"], early["torch_threads"], early["env_applied"]) == (
        "OMP_NUM_THREADS",
        1,
        True,
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "late"],
        env=_child_env(setup),
        capture_output=True,
        text=True,
        check=True,
    )
    late = json.loads(out.stdout.strip().splitlines()[-1])
    assert late["env_applied"] is False  # torch came first: OpenMP never saw the short spin


def _relabel(src: Path, dst: Path, names: list[str], remap: Callable[[int], int]) -> Path:
    """A copy of a YOLO data set with its classes merged (``remap``) into ``names``."""
    import shutil

    shutil.copytree(src.parent, dst)
    for label in (dst / "labels").rglob("*.txt"):
        lines = [ln.split() for ln in label.read_text().splitlines() if ln.strip()]
        label.write_text("".join(" ".join([str(remap(int(p[0]))), *p[1:]]) + "\n" for p in lines))
    yml = YAML(typ="safe", pure=True)
    doc = yml.load((dst / "data.yaml").read_text())
    doc["path"], doc["names"] = str(dst), names
    with (dst / "data.yaml").open("w") as fh:
        yml.dump(doc, fh)
    return dst / "data.yaml"


def test_weights_from_a_one_class_model_train_a_two_class_one(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from edge.cli.model import app
    from models.training.train import train

    one = _relabel(setup["data"], tmp_path / "one", ["defect"], lambda c: 0)
    two = _relabel(setup["data"], tmp_path / "two", ["a", "b"], lambda c: c % 2)
    first = train(
        _recipe(setup, "one", data=one, epochs=1, close_mosaic=0, project=tmp_path / "runs")
    )
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(two),
            "--weights",
            str(first.best),
            "--imgsz",
            "64",
            "--epochs",
            "1",
            "--batch",
            "4",
            "--no-val",
            "--close-mosaic",
            "0",
            "--project",
            str(tmp_path / "runs"),
            "--name",
            "two",
        ],
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "two"
    rec = _record(run)
    assert rec["weights"]["classes"] == 1 and rec["weights"]["sha256"]
    assert rec["classes"] == ["a", "b"]
    ckpt = torch.load(run / "weights" / "best.pt", map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt["model"]  # the final best.pt is stripped to "model"
    assert model.nc == 2 and list(model.names.values()) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"not a checkpoint", "not a loadable ultralytics checkpoint")],
)
def test_bad_weights_are_a_clear_error(
    setup: dict[str, Path], tmp_path: Path, content: bytes | None, message: str
) -> None:
    from edge.cli.model import app

    pt = tmp_path / "mine.pt"
    if content is not None:
        pt.write_bytes(content)
    res = CliRunner().invoke(
        app,
        ["train", "--data", str(setup["data"]), "--weights", str(pt), "--project", str(tmp_path)],
    )
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_resume_and_data_errors(tmp_path: Path) -> None:
    from edge.cli.model import app

    res = CliRunner().invoke(app, ["train"])
    assert res.exit_code == 2 and "--data" in res.output
    res = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "recipe.json" in res.output
    with pytest.raises(TrainSetupError, match="first epoch"):
        from models.training.train import resume_target

        (tmp_path / "recipe.json").write_text("{}")
        resume_target(tmp_path)
