"""Fleet fixtures: three real demo lines (`edge run` processes, each with its own spool, state,
control socket, observability port and embedded Modbus PLC), an Ansible inventory naming them,
and the packages the issue's acceptance rolls out."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.support import free_port, spawned

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"
EDGE = [sys.executable, "-m", "edge"]
ROLLOUT = ROOT / "scripts" / "fleet" / "rollout"
DATA_YAML = "names: {0: scratch, 1: pit, 2: crack, 3: stain}\nnc: 4\n"


def edge(*args: str, timeout: float = 120) -> Any:
    """The project's own CLI, a reader independent of the rollout's module."""
    r = subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"edge {' '.join(args)}: {r.stderr}"
    return json.loads(r.stdout) if "--json" in args else r.stdout


@dataclass
class Line:
    name: str
    config: Path
    http_port: int
    log: Path

    def status(self) -> dict[str, Any]:
        """`model.status` through the daemon's own control client (edge/control.py), what
        `edge model status --json` prints, without a CLI start per read."""
        from edge.config import load_config
        from edge.control import call

        st: dict[str, Any] = call(load_config(self.config, deep=False).control_socket(),
                                  "model.status", timeout_s=30)
        return st

    def store(self) -> list[str]:
        """NAME:VERSION of every package in the line's model store (the store's own reader)."""
        from edge.config import load_config
        from models.store import ModelStore, default_store_root

        cfg = load_config(self.config, deep=False)
        root = default_store_root(cfg.model.store, Path(cfg.uplink.spool_dir))
        return sorted(e.ref for e in ModelStore(root).list())


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _line_yaml(root: Path, name: str, http_port: int) -> Path:
    """The demo line at 15 fps (three of them share two cores with the rollout), a fixed
    observability port (the rollout reads it from the YAML), and a store/socket of its own."""
    cfg = {
        "line": name,
        "cameras": [{"id": "cam0", "type": "replay", "plc_slot": 0,
                     "path": str(DEMO / "samples"), "fps": 15, "loop": True}],
        "model": {"package": str(DEMO / "package"), "onnxruntime": {"intra_op_threads": 1},
                  "warmup_runs": 1},
        "pipeline": {"max_batch": 1, "workers": 1},
        "plc": {"type": "modbus", "simulator": True, "port": 0},
        "uplink": {"spool_dir": str(root / "spool"), "quota_mb": 512},
        "observability": {"host": "127.0.0.1", "port": http_port},
        "logging": {"format": "json"},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "line.yaml"
    with path.open("w") as f:
        YAML().dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Line]]:
    """Three running lines; stopped by PID at the end of the module."""
    base = tmp_path_factory.mktemp("fleet")
    lines = []
    with ExitStack() as stack:
        for i in (1, 2, 3):
            port = free_port()
            cfg = _line_yaml(base / f"line{i}", f"line{i}", port)
            log = base / f"line{i}" / "daemon.log"
            stack.enter_context(spawned(
                [*EDGE, "run", "--config", str(cfg)], ready=functools.partial(_healthy, port),
                what=f"line{i} daemon", timeout_s=90, log=log))
            lines.append(Line(f"line{i}", cfg, port, log))
        yield lines


@pytest.fixture(scope="module")
def inventory(fleet: list[Line], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ansible INI: line2 is the canary (first wave, although not first in the file)."""
    path = tmp_path_factory.mktemp("inv") / "lines.ini"
    hosts = "\n".join(f"{ln.name} edge_config={ln.config}" for ln in fleet)
    path.write_text(
        f"[lines]\n{hosts}\n\n[canary]\nline2\n\n[all:vars]\nansible_connection=local\n"
        f"ansible_python_interpreter={sys.executable}\n"
        f"edge_bin={Path(sys.executable).parent / 'edge'}\n"
        f"edge_incoming={path.parent}\n"
    )
    return path


@pytest.fixture(scope="session")
def good_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model re-packaged as synth-demo 1.0.1, exactly as the issue's acceptance does."""
    tmp = tmp_path_factory.mktemp("pkg-good")
    (tmp / "data.yaml").write_text(DATA_YAML)
    out = tmp / "synth-demo-1.0.1"
    edge("model", "package", "--model", str(DEMO / "package" / "model.onnx"),
         "--name", "synth-demo", "--version", "1.0.1", "--plc-model-id", "2",
         "--data", str(tmp / "data.yaml"), "--no-gate", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def bad_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo weights with every decision threshold at 0: it calls every part DEFECT (half of
    the demo parts are good), a properly sealed package that only a gate can stop."""
    from models.package import load_package, write_package

    out = tmp_path_factory.mktemp("pkg-bad") / "synth-demo-6.6.6"
    src = load_package(DEMO / "package")
    m = src.manifest
    write_package(out, src.model_path, name="synth-demo", version="6.6.6", plc_model_id=9,
                  classes=list(m.classes), input_size=m.input_size,
                  thresholds={"default": 0.0, "per_class": {}, "min_area_px": {}},
                  runtime_hints={"conf_threshold": 0.0})
    return out
