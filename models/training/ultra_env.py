"""Make ultralytics usable on an offline, shared CPU box before torch is first imported.

Each trap here was hit for real (see FIELD-NOTES): the font check downloads even with plots off,
settings sync phones home, AMP checks download weights, and CPU training is capped at cores-1
threads. All state goes to a project-local config dir so nothing touches the user's home.

Threads (issue 14): torch's OpenMP (libgomp) threads spin while they wait for each other
between parallel regions (300,000 rounds by default). Beside one busy process a niced training
starves: the spinning threads hold the cores the one they wait for needs. Measured with
``scripts/bench_train_threads.py`` (2 vCPU, 256 px, seconds per epoch, idle / beside a busy
process): libgomp's default 0.84 / 58.3; ``OMP_WAIT_POLICY=PASSIVE`` (never spin) 1.27 / 2.22;
``GOMP_SPINCOUNT=1000`` (spin briefly, then sleep) 0.92 / 2.57 (models/README.md). The short
spin keeps the idle speed that PASSIVE gives away (40 %) and is within 20 % of it beside a busy
process, so it is the default; ``passive`` remains a choice. libgomp reads its environment
once, when torch loads it, so :func:`prepare` sets it and explicit thread counts before the
first ``import torch`` in the process, and records what was in effect. A user's own
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

DEFAULT_CONFIG_DIR = Path("var/ultralytics")
WaitMode = Literal["short-spin", "passive", "default"]
"""How OpenMP threads wait: spin ``SPINCOUNT`` rounds then sleep (the tool's choice), never spin
(``OMP_WAIT_POLICY=PASSIVE``), or libgomp's default (the benchmark's "before")."""
WAIT: WaitMode = "short-spin"
SPINCOUNT = 1000
"""libgomp's own value when a machine is oversubscribed; its default is 300,000."""
_WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_prepared: Path | None = None
_ours: dict[str, str] = {}
"""Environment values this module set: anything else in the environment is the user's."""
_threads: ThreadSettings | None = None
_default: tuple[int, str] | None = None
"""Threads without --threads, fixed at the first call (before this module sets the env)."""


@dataclass(frozen=True, slots=True)
class ThreadSettings:
    """What shaped torch's CPU threading in this process (recorded in recipe.json)."""

    threads: int
    """Intra-op threads asked for (torch.set_num_threads, OMP_NUM_THREADS, MKL_NUM_THREADS)."""
    threads_source: str
    """``--threads``, ``OMP_NUM_THREADS`` (the user's environment) or ``cores`` (all usable)."""
    cores: int
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    omp_wait_policy: str | None
    """OMP_WAIT_POLICY when OpenMP was loaded; None: libgomp's default (spin, then sleep)."""
    gomp_spincount: str | None
    """GOMP_SPINCOUNT when OpenMP was loaded; None: libgomp's default (300,000)."""
    omp_wait_policy_source: str
    """Who chose the waiting: ``tool`` (short-spin or passive), ``user`` (their OMP_WAIT_POLICY
    or GOMP_SPINCOUNT, kept as set) or ``unset`` (libgomp's default)."""
    omp_num_threads: str | None
    mkl_num_threads: str | None
    env_applied: bool
    """False when OpenMP was already loaded before :func:`prepare` (something imported torch
    first): the environment values above then did not reach it; only the torch calls did."""
    torch_threads: int
    torch_interop_threads: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def usable_cores() -> int:
    """CPUs this process may use: a taskset/cgroup-limited process must not plan for all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def openmp_loaded() -> bool:
    """Whether an OpenMP runtime is already mapped (then its environment is fixed)."""
    maps = Path("/proc/self/maps")
    if maps.exists():
        try:
            text = maps.read_text()
        except OSError:
            text = ""
        if any(lib in text for lib in ("libgomp", "libiomp", "libomp")):
            return True
    return "torch" in sys.modules


def _users(name: str) -> str | None:
    """The environment value unless this module put it there."""
    value = os.environ.get(name)
    return None if value is None or _ours.get(name) == value else value


def _set(name: str, value: str) -> None:
    os.environ[name] = value
    _ours[name] = value


def _default_threads() -> tuple[int, str]:
    """Threads when --threads is not given, and why: the user's OMP_NUM_THREADS, else cores."""
    # Once OpenMP is loaded (someone imported torch or ultralytics first) OMP_NUM_THREADS may be
    # ultralytics' own "1" rather than the user's: only the core count counts then.
    user_n = None if openmp_loaded() else _users("OMP_NUM_THREADS")
    if user_n is not None and user_n.isdigit() and int(user_n) > 0:
        return int(user_n), "OMP_NUM_THREADS"
    return usable_cores(), "cores"


def _configure_openmp_env(n: int, wait: WaitMode) -> str:
    """Set OpenMP/MKL variables (only effective before OpenMP loads); returns who chose the
    waiting."""
    for name in _THREAD_ENV:
        _set(name, str(n))
    if any(_users(name) is not None for name in _WAIT_ENV):
        return "user"
    for name in _WAIT_ENV:
        if _ours.pop(name, None) is not None:
            os.environ.pop(name, None)
    if wait == "short-spin":
        _set("GOMP_SPINCOUNT", str(SPINCOUNT))
    elif wait == "passive":
        _set("OMP_WAIT_POLICY", "PASSIVE")
    return "unset" if wait == "default" else "tool"


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


def prepare(
    config_dir: Path | None = None,
    threads: int | None = None,
    *,
    wait: WaitMode = WAIT,
) -> ModuleType:
    """Configure the environment, import ultralytics and return it.

    ``threads`` defaults to the user's ``OMP_NUM_THREADS``, else every usable core (ultralytics
    would use cores-1, i.e. one core on a 2-core box). ``wait`` is how OpenMP threads wait
    (:data:`WaitMode`); a user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is always kept.
    The OpenMP environment can only be chosen once, before torch loads: later calls (and calls
    after someone else imported torch) change only torch's own thread counts, and
    :func:`thread_settings` says so (``env_applied``).
    """
    global _prepared, _threads, _default
    cfg = (config_dir or Path(os.environ.get("YOLO_CONFIG_DIR", DEFAULT_CONFIG_DIR))).resolve()
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "false")

    if _default is None:
        _default = _default_threads()
    n, source = (threads, "--threads") if threads else _default
    if _threads is None:
        late = openmp_loaded()
        policy_source = _configure_openmp_env(n, wait)
        env_policy = os.environ.get("OMP_WAIT_POLICY")
        env_spin = os.environ.get("GOMP_SPINCOUNT")
        env_omp = os.environ.get("OMP_NUM_THREADS")
        env_mkl = os.environ.get("MKL_NUM_THREADS")
    else:  # OpenMP's environment was fixed by the first call; only torch's counts can change
        late = not _threads.env_applied
        policy_source = _threads.omp_wait_policy_source
        env_policy, env_spin, env_omp, env_mkl = (
            _threads.omp_wait_policy,
            _threads.gomp_spincount,
            _threads.omp_num_threads,
            _threads.mkl_num_threads,
        )
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
    # select_device() resets torch to this count at every trainer start (cores-1 by default).
    torch_utils.NUM_THREADS = n
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # allowed only before any inter-op parallel work
        torch.set_num_interop_threads(n)
    _threads = ThreadSettings(
        threads=n,
        threads_source=source,
        cores=usable_cores(),
        omp_wait_policy=env_policy,
        gomp_spincount=env_spin,
        omp_wait_policy_source=policy_source,
        omp_num_threads=env_omp,
        mkl_num_threads=env_mkl,
        env_applied=not late,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
    )
    return ultralytics


def thread_settings() -> ThreadSettings | None:
    """The threading in effect after the last :func:`prepare` (None before the first)."""
    return _threads


def yolo(model: str | Path, **kwargs: Any) -> Any:
    """An ``ultralytics.YOLO`` built after :func:`prepare` (prepares with defaults if needed)."""
    if _prepared is None:
        prepare()
    from ultralytics import YOLO

    return YOLO(str(model), task="segment", **kwargs)
