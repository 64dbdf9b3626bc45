"""ReplaySource on real files: decode once, order, loop/EOF, pacing, triggered parts, video."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from camera.config import ReplayCameraSettings
from camera.factory import open_source
from camera.replay import ReplaySource, replay_path_problem
from camera.source import CameraConfigError, FrameSource
from tests.camera.conftest import write_images


def settings(path: Path, **kw: object) -> ReplayCameraSettings:
    base: dict[str, object] = {"type": "replay", "id": "cam0", "plc_slot": 0, "path": path}
    base.update(kw)
    return ReplayCameraSettings.model_validate(base)


def test_plays_in_order_then_eof(image_dir: Path) -> None:
    src = ReplaySource(settings(image_dir, fps=0, loop=False))
    assert isinstance(src, FrameSource)
    src.open()
    frames = [src.read(1.0) for _ in range(5)]
    with pytest.raises(EOFError):
        src.read(1.0)
    src.close()
    src.close()  # idempotent
    assert [f.frame_id for f in frames if f] == [0, 1, 2, 3, 4]
    assert [f.part_id for f in frames if f] == [0, 1, 2, 3, 4]
    assert [int(f.image[0, 0, 0]) for f in frames if f] == [0, 1, 2, 3, 4]
    assert all(f is not None and f.pixel_format == "BGR8" for f in frames)
    assert frames[0] is not None
    assert Path(str(frames[0].source_meta["file"])).name == "img_000.png"


def test_loop_and_grayscale_and_readonly(image_dir: Path) -> None:
    src = ReplaySource(settings(image_dir, fps=0, loop=True, grayscale=True))
    src.open()
    frames = [src.read(1.0) for _ in range(12)]
    src.close()
    assert [f.frame_id for f in frames if f] == list(range(12))
    assert [int(f.image[0, 0]) for f in frames if f] == [i % 5 for i in range(12)]
    f0 = frames[0]
    assert f0 is not None and f0.image.ndim == 2 and f0.pixel_format == "Mono8"
    with pytest.raises(ValueError):
        f0.image[0, 0] = 1  # shared decoded buffer: consumers cannot corrupt later loops


def test_decoded_once_at_open(image_dir: Path) -> None:
    """After open, deleting the files changes nothing: nothing is decoded per frame."""
    src = ReplaySource(settings(image_dir, fps=0, loop=True))
    src.open()
    for p in image_dir.iterdir():
        p.unlink()
    got = [src.read(1.0) for _ in range(7)]
    src.close()
    assert all(f is not None for f in got)


def test_paced_on_absolute_schedule(image_dir: Path) -> None:
    fps = 50.0
    src = ReplaySource(settings(image_dir, fps=fps))
    src.open()
    stamps: list[int] = []
    while len(stamps) < 25:
        f = src.read(0.5)
        if f is not None:
            stamps.append(f.captured_ns)
    src.close()
    span_s = (stamps[-1] - stamps[0]) / 1e9
    # 24 periods of 20 ms: never faster than the schedule, and not drifting far behind it.
    assert span_s >= 24 / fps * 0.98
    assert span_s < 24 / fps + 0.25
    assert stamps == sorted(stamps)


def test_read_timeout_returns_none_before_due(image_dir: Path) -> None:
    src = ReplaySource(settings(image_dir, fps=0.5))
    src.open()
    assert src.read(0.5) is not None  # frame 0 is due at open
    t = time.monotonic()
    assert src.read(0.05) is None  # frame 1 is due in 2 s
    assert time.monotonic() - t < 1.0
    src.close()


def test_consumer_far_behind_loses_overdue_frames(image_dir: Path) -> None:
    src = ReplaySource(settings(image_dir, fps=200, max_lag_frames=2))
    src.open()
    assert src.read(0.5) is not None
    time.sleep(0.2)  # the consumer is busy elsewhere (this is the behaviour under test, not sync)
    f = src.read(0.5)
    src.close()
    assert f is not None and f.frame_id > 30  # ~40 frames overdue, all but 2 dropped
    assert src.dropped == f.frame_id - 1  # the gap in frame ids is exactly what was dropped


def test_triggered_each_trigger_is_one_part(image_dir: Path) -> None:
    src = ReplaySource(settings(image_dir, trigger={"mode": "triggered"}))
    src.open()
    assert src.read(0.05) is None  # no trigger, no frame
    for _ in range(3):
        src.trigger()
    parts = [src.read(0.5) for _ in range(3)]
    assert src.read(0.05) is None
    src.close()
    assert [f.part_id for f in parts if f] == [1, 2, 3]


def test_video_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30, (64, 48))
    for i in range(6):
        w.write(np.full((48, 64, 3), i * 40, np.uint8))
    w.release()
    src = open_source(settings(path, fps=0, loop=True, grayscale=True))
    src.open()
    got = [src.read(1.0) for _ in range(9)]
    src.close()
    levels = [int(f.image.mean()) for f in got if f is not None]
    assert len(levels) == 9
    assert levels[:6] == sorted(levels[:6]) and levels[6] < levels[5]  # rewound after 6 frames
    assert abs(levels[0] - 0) < 8 and abs(levels[5] - 200) < 8


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CameraConfigError, match="does not exist"):
        ReplaySource(settings(tmp_path / "nope")).open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CameraConfigError, match="no images"):
        ReplaySource(settings(tmp_path / "empty")).open()
    allbad = tmp_path / "allbad"
    allbad.mkdir()
    (allbad / "a.png").write_bytes(b"")
    (allbad / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CameraConfigError, match=r"none of the 2 image files .* can be decoded"):
        ReplaySource(settings(allbad)).open()
    (tmp_path / "v.avi").write_bytes(b"RIFF....AVI garbage")
    with pytest.raises(CameraConfigError, match=r"v\.avi"):
        ReplaySource(settings(tmp_path / "v.avi")).open()
    with pytest.raises(ValidationError, match="fsp"):
        settings(tmp_path, fsp=3)
    with pytest.raises(ValidationError):
        settings(tmp_path, fps=-1)
    with pytest.raises(ValidationError, match="path"):
        settings("")  # type: ignore[arg-type]


def test_undecodable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    """Issue 9.8: one zero-byte PNG used to make open() raise: 0 frames, a silent camera."""
    folder = tmp_path / "imgs"
    write_images(folder, 3)
    (folder / "img_001b.png").write_bytes(b"")  # a zero-byte file in the middle of the order
    (folder / "img_002b.jpg").write_bytes(b"\xff\xd8 truncated")
    src = ReplaySource(settings(folder, fps=0, loop=True))
    src.open()
    got = [src.read(1.0) for _ in range(7)]
    src.close()
    assert [int(f.image[0, 0, 0]) for f in got if f] == [0, 1, 2, 0, 1, 2, 0]
    assert [f.frame_id for f in got if f] == list(range(7))  # ids consecutive: nothing missed
    assert src.skipped_files == 2
    assert [Path(p).name for p in src.skipped_paths] == ["img_001b.png", "img_002b.jpg"]
    src.open()  # a reopen does not count them again (decoded once)
    src.close()
    assert src.skipped_files == 2
    assert replay_path_problem(folder) is None
    assert replay_path_problem(tmp_path / "nope") == f"{tmp_path / 'nope'} does not exist"
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"")
    assert "none of the 1 image files" in str(replay_path_problem(empty))


def _mjpg(path: Path, n: int, corrupt: tuple[int, ...] = ()) -> None:
    """An MJPG AVI of n frames (frame i has level 40*i); listed frames get their JPEG data
    overwritten, as a bad sector or a truncated copy would."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30, (64, 48))
    for i in range(n):
        w.write(np.full((48, 64, 3), i * 40, np.uint8))
    w.release()
    data = bytearray(path.read_bytes())
    soi = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(soi) == n
    for k in corrupt:
        data[soi[k]:soi[k] + 200] = bytes(200)
    path.write_bytes(bytes(data))


def test_video_undecodable_frame_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    _mjpg(path, 6, corrupt=(2,))
    src = ReplaySource(settings(path, fps=0, loop=True, grayscale=True))
    src.open()
    got = [src.read(1.0) for _ in range(10)]
    src.close()
    levels = [round(f.image.mean() / 40) for f in got if f is not None]
    assert levels == [0, 1, 3, 4, 5, 0, 1, 3, 4, 5]  # frame 2 skipped on every pass
    assert [f.frame_id for f in got if f] == list(range(10))
    assert src.skipped_files == 2  # met twice
    src = ReplaySource(settings(path, fps=0, loop=False))
    src.open()
    n = 0
    with pytest.raises(EOFError):
        while True:
            n += src.read(1.0) is not None
    src.close()
    assert n == 5 and src.skipped_files == 1


def test_hardware_trigger_mode_plays_at_fps_one_part_per_image(image_dir: Path) -> None:
    """Replay as a hardware-triggered camera: each image is one trigger of the line."""
    src = ReplaySource(settings(image_dir, fps=0, trigger={"mode": "triggered",
                                                           "source": "hardware"}))
    src.open()
    got = [src.read(1.0) for _ in range(4)]
    src.trigger()  # no software trigger in this mode: a no-op, never an extra frame
    src.close()
    assert [(f.frame_id, f.part_id) for f in got if f] == [(0, 1), (1, 2), (2, 3), (3, 4)]
