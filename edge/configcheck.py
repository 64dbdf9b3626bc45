"""What the schema alone cannot check, checked before anything starts.

`edge config check` and `edge run` (and a SIGHUP reload) share this, so a config that passes the
check cannot then fail at start-up with exit 3 (systemd would restart it forever): the model
package verifies and matches the decision rules, the files the cameras need exist, the PLC map
fits the camera slots, and every secret can be read. Each problem names its key path and what to
do, like the schema errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from edge.config import LineConfig


def deep_check(cfg: LineConfig) -> list[str]:
    problems: list[str] = []
    problems += _check_model(cfg)
    problems += _check_cameras(cfg)
    problems += _check_plc(cfg)
    problems += _check_secrets(cfg)
    return problems


def _check_model(cfg: LineConfig) -> list[str]:
    from edge.recipes import build_rules
    from models.package import verify_package
    from models.types import ModelPackageError

    try:
        package = verify_package(cfg.model.package, cfg.model.trusted_keys)
    except ModelPackageError as exc:
        return [f"model.package: {exc}"]
    except Exception as exc:  # a broken package must read as a config problem, not a crash
        return [f"model.package: cannot be verified ({type(exc).__name__}: {exc})"]
    try:
        build_rules(cfg.recipes, cfg.decision, package)
    except ValueError as exc:
        where = "recipes" if str(exc).startswith("recipes.") else "decision.classes"
        return [f"{where}: {exc}"]
    return []


def _check_cameras(cfg: LineConfig) -> list[str]:
    from camera.config import GenicamCameraSettings, ReplayCameraSettings

    problems: list[str] = []
    for i, cam in enumerate(cfg.cameras):
        where = f"cameras[{i}]"
        if isinstance(cam, ReplayCameraSettings):
            # Existence and image files here; whether they decode is the camera's business at
            # run time (skipped and counted; none decodable = camera down + alarm, and it comes
            # up once good files appear), like an unplugged camera is not a config error.
            from camera.replay import list_images

            if not cam.path.exists():
                problems.append(f"{where}.path: {cam.path} does not exist")
            elif cam.path.is_dir() and not list_images(cam.path):
                problems.append(
                    f"{where}.path: folder {cam.path} holds no images (png, jpg, bmp, ...)"
                )
        elif isinstance(cam, GenicamCameraSettings):
            for j, cti in enumerate(cam.cti):
                if not cti.is_file():
                    problems.append(
                        f"{where}.cti[{j}]: GenTL producer {cti} not found (install the camera "
                        "vendor's SDK or fix the path)"
                    )
    return problems


def _check_plc(cfg: LineConfig) -> list[str]:
    from plc.factory import check_map

    slots = max(c.plc_slot for c in cfg.cameras) + 1
    try:
        check_map(cfg.plc, camera_slots=slots)
    except ValueError as exc:
        return [f"plc: {exc}"]
    return []


def _check_secrets(cfg: LineConfig) -> list[str]:
    from uplink.config import SecretSource

    problems = []
    for where, secret in _walk(cfg, ""):
        if isinstance(secret, SecretSource):
            try:
                secret.resolve()
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
    return problems


def _walk(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    yield where, node
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            with contextlib.suppress(AttributeError):
                yield from _walk(getattr(node, name), f"{where}.{name}" if where else name)
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from _walk(item, f"{where}[{i}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from _walk(item, f"{where}.{key}")

