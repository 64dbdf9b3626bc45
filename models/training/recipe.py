"""The training recipe: the design's defaults, typed so a run's settings are recorded exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainRecipe(BaseModel):
    """Defaults from the design: lr 0.00232, batch 64, 50 epochs (split 70/15/15 is the data's job).

    ``optimizer`` is pinned because ultralytics' ``auto`` silently replaces ``lr0`` with its own
    choice, which would make the recorded recipe a lie.
    """

    model_config = ConfigDict(extra="forbid")

    data: Path
    scale: Literal["p", "n", "s"] = "p"
    """Network width: p (demo, ~4 ms at 256 px on one core), n (yolov8n-seg), s."""
    weights: Path | None = None
    """Start from a checkpoint (.pt) instead of from scratch."""
    imgsz: int = Field(default=256, ge=32, le=2048, multiple_of=32)
    epochs: int = Field(default=50, ge=1)
    hours: float | None = Field(default=None, gt=0)
    """Wall-clock budget. The epoch count (at most ``epochs``) is fixed once from the measured
    first epochs and then kept, so the LR schedule and the mosaic close stay put (see
    ``models.training.train``); ultralytics' own ``time`` is never used."""
    batch: int = Field(default=64, ge=1)
    lr0: float = Field(default=0.00232, gt=0)
    optimizer: Literal["AdamW", "SGD", "Adam"] = "AdamW"
    patience: int = Field(default=100, ge=0)
    seed: int = 0
    workers: int | None = Field(default=None, ge=0)
    """Data loader processes; None: 0 on CPU (ultralytics forces 0 there anyway), 2 on a GPU."""
    threads: int | None = Field(default=None, ge=1)
    """Torch/OpenMP threads; None: the user's OMP_NUM_THREADS, else every usable core."""
    cache: bool = True
    flipud: float = Field(default=0.5, ge=0, le=1)
    """Surfaces have no up: vertical flips are free data."""
    close_mosaic: int = Field(default=10, ge=0)
    warmup_epochs: float = Field(default=3.0, ge=0)
    val: bool = True
    """Validate every epoch. Off: only the final model is validated (CPU time goes to training)."""
    plots: bool = False
    project: Path = Path("var/runs")
    name: str = "train"
    device: str = "cpu"

    def data_yaml(self) -> Path:
        """The data.yaml file itself (``data`` may name its directory), absolute."""
        path = self.data / "data.yaml" if self.data.is_dir() else self.data
        return path.resolve()

    def cpu_like(self) -> bool:
        """Whether ultralytics treats the device as CPU (it then loads data in-process)."""
        return self.device.lower() in ("cpu", "mps")

    def effective_workers(self) -> int:
        """Workers ultralytics will really use: none on CPU, whatever was asked."""
        if self.cpu_like():
            return 0
        return 2 if self.workers is None else self.workers

    def train_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``YOLO.train`` (offline-safe: amp off, no plots by default).

        No ``time``: with it ultralytics re-estimates the epoch count after every epoch and
        refits the LR schedule each time (close_mosaic then fired after epoch 4 of 18); the
        budget is kept by ``models.training.train`` instead.
        """
        kw: dict[str, Any] = {
            "data": str(self.data_yaml()),
            "imgsz": self.imgsz,
            "epochs": self.epochs,
            "batch": self.batch,
            "lr0": self.lr0,
            "optimizer": self.optimizer,
            "patience": self.patience,
            "seed": self.seed,
            "deterministic": True,
            "workers": self.effective_workers(),
            "cache": "ram" if self.cache else False,
            "flipud": self.flipud,
            "close_mosaic": self.close_mosaic,
            "warmup_epochs": self.warmup_epochs,
            "val": self.val,
            "plots": self.plots,
            "amp": False,
            "project": str(self.project.resolve()),
            "name": self.name,
            "exist_ok": True,
            "device": self.device,
            "verbose": False,
        }
        return kw
