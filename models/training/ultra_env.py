"""Make ultralytics usable on an offline, 2-core machine before it is first imported.

Each trap here was hit for real (see FIELD-NOTES): the font check downloads even with plots off,
settings sync phones home, AMP checks download weights, and CPU training is capped at cores-1
threads. All state goes to a project-local config dir so nothing touches the user's home.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT_CONFIG_DIR = Path("var/ultralytics")
_prepared: Path | None = None


def _font_source() -> Path:
    import matplotlib

    src = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not src.exists():
        raise FileNotFoundError(
            f"{src} missing: reinstall matplotlib (ultralytics needs a TTF font)"
        )
    return src


def _install_fonts(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (folder / name).exists():
            shutil.copyfile(_font_source(), folder / name)


def prepare(config_dir: Path | None = None, threads: int | None = None) -> ModuleType:
    """Configure the environment, import ultralytics and return it.

    ``threads`` defaults to every core (ultralytics would use cores-1, i.e. one core here).
    """
    global _prepared
    cfg = (config_dir or Path(os.environ.get("YOLO_CONFIG_DIR", DEFAULT_CONFIG_DIR))).resolve()
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "false")
    n = threads or os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    _install_fonts(cfg / "Ultralytics")

    import torch
    import ultralytics
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR, torch_utils

    # ultralytics fixes its config dir at first import: if someone imported it earlier with
    # another YOLO_CONFIG_DIR, the fonts must be where *that* import looks.
    _install_fonts(Path(USER_CONFIG_DIR))

    if _prepared is None:
        SETTINGS.update(
            {
                "sync": False,
                "runs_dir": str(cfg / "runs"),
                "weights_dir": str(cfg / "weights"),
                "datasets_dir": str(cfg / "datasets"),
                **dict.fromkeys(("clearml", "comet", "dvc", "mlflow", "raytune", "wandb"), False),
            }
        )
        _prepared = cfg
    torch_utils.NUM_THREADS = n
    torch.set_num_threads(n)
    return ultralytics


def yolo(model: str | Path, **kwargs: Any) -> Any:
    """An ``ultralytics.YOLO`` built after :func:`prepare` (prepares with defaults if needed)."""
    if _prepared is None:
        prepare()
    from ultralytics import YOLO

    return YOLO(str(model), task="segment", **kwargs)
