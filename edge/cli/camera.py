"""`edge camera list|snapshot`, `edge calibrate` and `edge replay`: the technician's camera tools.

These run on the appliance beside (not inside) the daemon. A GenICam or GigE Vision camera
accepts one controlling application at a time, so stop the line's daemon before calibrating its
camera; the open error says so when the device is busy.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
import typer

from camera.config import (
    AravisCameraSettings,
    GenicamCameraSettings,
    ReplayCameraSettings,
)
from camera.frame import Frame
from camera.source import CameraError, FrameSource
from edge.cli.common import fail, load_or_exit
from edge.yamledit import update_yaml

app = typer.Typer(
    help="Cameras: list producers, devices and key nodes; take a snapshot.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Line YAML (default: the demo config).")
]
CameraOpt = Annotated[
    str | None, typer.Option("--camera", help="Camera id in the config (default: the first).")
]

CameraSettingsT = ReplayCameraSettings | GenicamCameraSettings | AravisCameraSettings


def _load(config: Path | None) -> tuple[Path, Any]:
    from edge.config import DEMO_CONFIG

    path = config or DEMO_CONFIG
    return path, load_or_exit(path)


def _pick(cfg: Any, camera: str | None) -> tuple[int, CameraSettingsT]:
    cams = list(cfg.cameras)
    if camera is None:
        return 0, cams[0]
    for i, c in enumerate(cams):
        if c.id == camera:
            return i, c
    raise fail(f"no camera {camera!r} in the config; cameras: {[c.id for c in cams]}", 2)


@contextmanager
def _opened(settings: CameraSettingsT) -> Iterator[FrameSource]:
    from camera.factory import open_source

    src = open_source(settings)
    try:
        src.open()
    except CameraError as exc:
        raise fail(
            f"cannot open camera {settings.id}: {exc}\n(is the line's daemon running? a camera "
            "accepts one controlling application: stop the daemon first)"
        ) from None
    try:
        yield src
    finally:
        src.close()
        if isinstance(settings, GenicamCameraSettings):
            from camera.genicam import release_producers

            release_producers()


def _grab(src: FrameSource, settings: CameraSettingsT, timeout_s: float) -> Frame:
    from camera.calibrate import fresh_frame
    from camera.config import TriggeredMode

    trig = settings.trigger
    soft = isinstance(trig, TriggeredMode) and trig.fires_software
    try:
        return fresh_frame(src.read, skip=0, timeout_s=timeout_s,
                           trigger=src.trigger if soft else None)
    except CameraError as exc:
        raise fail(f"camera {settings.id}: {exc}") from None


# -- edge camera list ---------------------------------------------------------------------------
@app.command("list")
def list_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="List the cameras of this line YAML.")
    ] = None,
    cti: Annotated[
        list[Path] | None,
        typer.Option("--cti", help="GenTL producer(s) to list (default: TLSimu when installed)."),
    ] = None,
    address: Annotated[
        list[str] | None,
        typer.Option("--address", help="GigE Vision camera IP to query (no discovery is done)."),
    ] = None,
    nodes: Annotated[bool, typer.Option(help="Open each device to read its key nodes.")] = True,
) -> None:
    """Producers, their devices and key nodes (value, range, choices).

    GigE Vision cameras are only queried by the addresses given (or in the config): this command
    never broadcasts a discovery on the plant network.
    """
    producers: list[list[Path]] = [[p] for p in cti or []]
    addresses = list(address or [])
    if config is not None:
        _path, cfg = _load(config)
        for cam in cfg.cameras:
            if isinstance(cam, GenicamCameraSettings) and cam.cti not in producers:
                producers.append(list(cam.cti))
            elif isinstance(cam, AravisCameraSettings):
                addresses.append(cam.address)
            elif isinstance(cam, ReplayCameraSettings):
                typer.echo(f"camera {cam.id}: replay of {cam.path} at {cam.fps} fps")
    if not producers and not addresses and config is None:
        from camera.genicam import default_cti

        sim = default_cti()
        if sim is None:
            raise fail("give --cti PATH, --address IP or --config FILE", 2)
        typer.echo(f"(no --cti/--address/--config: listing the simulator {sim})")
        producers.append([sim])
    for paths in producers:
        from camera.genicam import describe_devices, release_producers

        typer.echo(f"producer {', '.join(map(str, paths))}")
        try:
            devices = describe_devices(paths, with_nodes=nodes)
        except CameraError as exc:
            typer.echo(f"  error: {exc}")
            continue
        finally:
            release_producers()
        if not devices:
            typer.echo("  (no devices)")
        for d in devices:
            typer.echo(f"  - serial_number: {d['serial_number']}  model: {d['model']}  "
                       f"user_defined_name: {d['user_defined_name']}  vendor: {d['vendor']}")
            if d.get("error"):
                typer.echo(f"      {d['error']}")
            for name, text in d["nodes"].items():
                typer.echo(f"      {name}: {text}")
    for ip in addresses:
        try:
            from camera.aravis import describe_camera
        except ImportError as exc:
            typer.echo(f"GigE Vision {ip}: Aravis is not available ({exc})")
            continue
        info = describe_camera(ip)
        typer.echo(f"GigE Vision {ip}")
        if info.get("error"):
            typer.echo(f"  error: {info['error']}")
        for name, text in info.get("nodes", {}).items():
            typer.echo(f"      {name}: {text}")


# -- edge camera snapshot -----------------------------------------------------------------------
@app.command("snapshot")
def snapshot_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path(
        "snapshot.png"
    ),
    config: ConfigOpt = None,
    camera: CameraOpt = None,
    cti: Annotated[
        Path | None, typer.Option("--cti", help="Ad hoc: GenTL producer (instead of --config).")
    ] = None,
    serial: Annotated[
        str | None, typer.Option("--serial", help="Ad hoc: device serial number with --cti.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a frame.")] = 5.0,
) -> None:
    """Grab one frame from a camera and write it as PNG (exactly what the model would get)."""
    if cti is not None:
        settings: CameraSettingsT = GenicamCameraSettings.model_validate({
            "type": "genicam", "id": "snapshot", "plc_slot": 0, "cti": [cti],
            "device": {"serial_number": serial} if serial else {},
        })
    else:
        _path, cfg = _load(config)
        settings = _pick(cfg, camera)[1]
    with _opened(settings) as src:
        frame = _grab(src, settings, timeout)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), frame.image):
        raise fail(f"cannot write {out}")
    h, w = frame.image.shape[:2]
    typer.echo(f"{out}: {w}x{h} {frame.pixel_format} camera {frame.camera_id} "
               f"frame {frame.frame_id} part {frame.part_id}")


# -- edge calibrate -----------------------------------------------------------------------------
def _roi_from_config(cfg: Any, cam_id: str) -> tuple[int, int, int, int] | None:
    roi = cfg.decision.camera_roi.get(cam_id, cfg.decision.roi)
    return None if roi is None else (roi.x, roi.y, roi.width, roi.height)


def calibrate_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="The line YAML to tune.")],
    camera: CameraOpt = None,
    target_mean: Annotated[
        float | None,
        typer.Option(help="Auto-exposure: ROI mean level to reach (0-255); omit to keep exposure."),
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Accepted distance from the target.")] = 4.0,
    roi: Annotated[
        str | None,
        typer.Option(help="Region of interest x,y,width,height (written to decision.camera_roi)."),
    ] = None,
    focus_seconds: Annotated[
        float, typer.Option(help="Show the live focus score this long while the lens is turned.")
    ] = 0.0,
    report: Annotated[
        Path | None, typer.Option(help="Annotated PNG report (default calibration-<camera>.png).")
    ] = None,
    write: Annotated[
        bool, typer.Option("--write/--dry-run", help="Write tuned values back into the YAML.")
    ] = True,
) -> None:
    """Tune a camera: exposure to a target level, live focus score, ROI; write an annotated
    report and the tuned values back into the line's YAML (comments kept)."""
    from camera.calibrate import (
        auto_exposure,
        focus_score,
        fresh_frame,
        levels,
        parse_roi,
        render_report,
    )
    from camera.config import TriggeredMode

    _path, cfg = _load(config)
    index, settings = _pick(cfg, camera)
    try:
        region = parse_roi(roi) if roi else _roi_from_config(cfg, settings.id)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    trig = settings.trigger
    soft = isinstance(trig, TriggeredMode) and trig.fires_software
    notes: list[str] = []
    updates: list[tuple[list[str | int], Any]] = []
    with _opened(settings) as src:
        trigger = src.trigger if soft else None

        def next_frame() -> Frame:
            return fresh_frame(src.read, trigger=trigger, skip=0 if soft else 2)

        try:
            frame = next_frame()
            if region is not None:
                h, w = frame.image.shape[:2]
                if region[0] + region[2] > w or region[1] + region[3] > h:
                    raise fail(f"ROI {region} does not fit the {w}x{h} image", 2)
            if target_mean is not None:
                acc = getattr(src, "node_access", lambda: None)()
                if acc is None:
                    notes.append("exposure: this camera type has no exposure control")
                else:
                    try:
                        res = auto_exposure(acc, next_frame, target_mean, roi=region,
                                            tolerance=tolerance)
                    except (CameraError, ValueError) as exc:
                        notes.append(f"exposure: not tuned ({exc})")
                        typer.echo(f"exposure not tuned: {exc}", err=True)
                    else:
                        for exp, mean in res.steps:
                            typer.echo(f"  exposure {exp:10.1f} us -> mean {mean:6.1f}")
                        typer.echo(f"exposure: {res.exposure_us:g} us, mean {res.mean:.1f} "
                                   f"(target {target_mean:g}): {res.reason}")
                        notes.append(f"exposure {res.exposure_us:g} us ({res.node}): {res.reason}")
                        updates.append(
                            (["cameras", index, "nodes", "exposure_us"], round(res.exposure_us, 1))
                        )
                    frame = next_frame()
            if focus_seconds > 0:
                best, shown = 0.0, 0.0
                end = time.monotonic() + focus_seconds
                tty = sys.stderr.isatty()
                while (now := time.monotonic()) < end:
                    frame = next_frame()
                    score = focus_score(frame.image, region)
                    best = max(best, score)
                    if tty and now - shown > 0.2:  # a live line the technician watches
                        shown = now
                        sys.stderr.write(f"\rfocus {score:10.1f}   best {best:10.1f}   "
                                         f"{max(end - now, 0):3.0f}s left ")
                        sys.stderr.flush()
                if tty:
                    sys.stderr.write("\n")
                typer.echo(f"focus: last {score:.1f}, best seen {best:.1f}")
                notes.append(f"best focus seen: {best:.1f}")
        except CameraError as exc:
            raise fail(f"camera {settings.id}: {exc}") from None
    lv = levels(frame.image, region)
    focus = focus_score(frame.image, region)
    img = render_report(frame.image, roi=region, focus=focus, lv=lv,
                        title=f"edge calibrate: line {cfg.line}, camera {settings.id}", lines=notes)
    report = report or Path(f"calibration-{settings.id}.png")
    report.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(report), img)
    typer.echo(f"mean {lv.mean:.1f}  saturated {lv.saturated * 100:.2f}%  focus {focus:.1f}")
    typer.echo(f"report: {report}")
    if roi:
        x, y, w, h = region  # type: ignore[misc]
        updates.append((["decision", "camera_roi", settings.id],
                        {"x": x, "y": y, "width": w, "height": h}))
    if not updates:
        return
    if not write:
        typer.echo("dry run: would set " + ", ".join(
            f"{'.'.join(map(str, k))}={v}" for k, v in updates))
        return
    try:
        update_yaml(config, updates)
    except ValueError as exc:
        raise fail(f"{config} not changed: {exc}") from None
    for keys, value in updates:
        typer.echo(f"{config}: {'.'.join(map(str, keys))} = {value}")


# -- edge replay --------------------------------------------------------------------------------
_PALETTE = [(0, 0, 255), (0, 165, 255), (255, 0, 255), (255, 255, 0), (0, 255, 0), (255, 0, 0)]


def draw_overlay(image: np.ndarray, decision: Any, detections: Sequence[Any],
                 roi: tuple[int, int, int, int] | None, name: str) -> np.ndarray:
    """Masks (tinted), boxes, labels and the verdict on a copy of the image."""
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    counted = {id(d) for d in decision.counted}
    for det in detections:
        colour = _PALETTE[det.class_id % len(_PALETTE)]
        m = det.full_mask(out.shape)
        if m is not None:
            out[m] = (0.5 * out[m] + 0.5 * np.array(colour)).astype(np.uint8)
        x1, y1, x2, y2 = (round(v) for v in det.box)
        thick = 2 if id(det) in counted else 1
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        label = f"{det.class_name} {det.score:.2f}" + ("" if id(det) in counted else " (ignored)")
        cv2.putText(out, label, (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1,
                    cv2.LINE_AA)
    if roi is not None:
        x, y, w, h = roi
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (0, 255, 0), 1)
    ok = decision.verdict.name == "OK"
    banner = np.full((22, out.shape[1], 3), (0, 140, 0) if ok else (0, 0, 190), np.uint8)
    cv2.putText(banner, f"{decision.verdict.name}  {decision.reason}  {name}", (4, 15),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([banner, out])


def replay_command(
    images: Annotated[Path, typer.Argument(help="Folder of images (or a video file) to inspect.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays and verdicts.")],
    config: ConfigOpt = None,
    camera: CameraOpt = None,
) -> None:
    """Re-inspect recorded images offline with the line's model and decision rules: a verdict
    per image (verdicts.csv, verdicts.jsonl) and an overlay PNG with masks and boxes."""
    from camera.replay import ReplaySource
    from edge.decision import DecisionRules
    from models.loader import load_detector
    from models.package import load_package
    from models.types import ModelError, ModelPackageError

    _path, cfg = _load(config)
    _i, cam = _pick(cfg, camera)
    grayscale = (
        cam.grayscale if isinstance(cam, ReplayCameraSettings) else cam.output == "mono8"
    )
    try:
        package = load_package(cfg.model.package, check_model=False)
        detector = load_detector(cfg.model)
        th = package.manifest.thresholds
        rules = DecisionRules(cfg.decision, detector.info.classes, package_thresholds=th.per_class,
                              package_default=th.default, package_min_area=th.min_area_px)
    except (ModelError, ModelPackageError, ValueError) as exc:
        raise fail(f"model: {exc}") from None
    src = ReplaySource(ReplayCameraSettings(
        type="replay", id=cam.id, plc_slot=0, path=images, fps=0, loop=False,
        grayscale=grayscale,
    ))
    try:
        src.open()
    except CameraError as exc:
        raise fail(str(exc), 2) from None
    for bad in src.skipped_paths:  # skipped, not fatal: the rest is still worth inspecting
        typer.echo(f"skipped (cannot decode): {bad}", err=True)
    out.mkdir(parents=True, exist_ok=True)
    roi = _roi_from_config(cfg, cam.id)
    counts: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    try:
        with (out / "verdicts.jsonl").open("w") as jl:
            while True:
                try:
                    frame = src.read(1.0)
                except EOFError:
                    break
                if frame is None:
                    continue
                t0 = time.perf_counter()
                prep = detector.preprocess(frame.image)
                outputs = detector.infer(prep.tensor)
                dets = detector.postprocess(outputs, [prep], masks=True)[0]
                decision = rules.decide(dets, frame.image.shape, cam.id)
                ms = (time.perf_counter() - t0) * 1e3
                file = Path(str(frame.source_meta.get("file", f"frame{frame.frame_id}")))
                name = file.name if file.suffix else f"frame_{frame.frame_id:06d}.png"
                overlay = draw_overlay(frame.image, decision, dets, roi, name)
                cv2.imwrite(str(out / (Path(name).stem + ".png")), overlay)
                counts[decision.verdict.name] = counts.get(decision.verdict.name, 0) + 1
                row = {"file": name, "verdict": decision.verdict.name, "reason": decision.reason,
                       "detections": len(dets), "counted": len(decision.counted),
                       "top_class": decision.deciding.class_name if decision.deciding else "",
                       "top_score": round(decision.deciding.score, 4) if decision.deciding else "",
                       "ms": round(ms, 1)}
                rows.append(row)
                jl.write(json.dumps({**row, "all": [
                    {"class": d.class_name, "score": round(d.score, 4),
                     "box": [round(v, 1) for v in d.box], "area_px": d.area_px,
                     "counted": any(d is c for c in decision.counted)} for d in dets]}) + "\n")
                typer.echo(f"{name}: {decision.verdict.name} ({decision.reason})")
    finally:
        src.close()
        detector.close()
    if rows:
        with (out / "verdicts.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = "  ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    skipped = f", {src.skipped_files} undecodable skipped" if src.skipped_files else ""
    typer.echo(
        f"{len(rows)} image(s): {summary or 'none'}{skipped}; overlays and verdicts in {out}"
    )
