"""Replay: a folder of images or a video file as a camera (demo, ``edge bench``, re-inspection).

Images are decoded once, at open, into read-only arrays: at the demo's 60 fps a PNG decode per
frame would cost more than the model, and the frames would no longer arrive on time. Pacing follows
an absolute schedule (frame n is due at t0 + n/fps) so rounding errors never accumulate into drift.
Like a real camera with a bounded buffer pool, a consumer that falls more than ``max_lag_frames``
behind loses the overdue frames: their ids are skipped, so the worker counts them as missed.

Bad input never disables the camera: an undecodable file (a zero-byte PNG, a half-copied JPEG)
is skipped at load, logged once with the list and counted (``skipped_files``); an undecodable
frame of a video is skipped and counted the same way each time it is met. Only a folder or video
with no decodable image at all is a config error. Ids are consecutive over what decoded, so
``missed`` keeps meaning "frames lost behind schedule" and nothing is counted twice.

Trigger modes: ``software``/``plc`` release the next image per trigger (on a bench or in a
test, the replay stands in for a software-triggered camera); ``hardware`` plays at ``fps`` as if
a trigger line fired once per image, so the daemon's hardware-trigger wiring (``part_id: plc``
or ``count``) can be exercised without a camera.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import structlog

from camera.config import ReplayCameraSettings, TriggeredMode
from camera.frame import Frame
from camera.source import CameraConfigError, CameraError

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder in name order (the order a replay plays them)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


VIDEO_BAD_RUN = 16
"""Consecutive undecodable video frames taken as the end of the file (OpenCV reports a corrupt
frame and the end the same way, and its position counter does not advance on either)."""


def decode_image(path: Path, grayscale: bool) -> np.ndarray:
    """Decode one file to contiguous uint8 (HxW or HxWx3 BGR), or raise a CameraConfigError."""
    flag = cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR
    try:
        img = cv2.imread(str(path), flag)
    except cv2.error as exc:  # e.g. beyond OpenCV's pixel limit
        raise CameraConfigError(f"replay: cannot decode image {path}: {exc}") from exc
    if img is None:
        raise CameraConfigError(f"replay: cannot decode image {path} (corrupt or not an image)")
    return np.ascontiguousarray(img, dtype=np.uint8)


def replay_path_problem(path: Path, grayscale: bool = False) -> str | None:
    """Why a replay ``path`` cannot play at all (for ``edge config check``); None when it can.

    Decodes files in play order only until the first good one, so a large folder is cheap to
    check; undecodable files besides are skipped (and counted) at run time, not an error.
    """
    if str(path) in ("", "."):
        return "replay path is empty: name a folder of images or a video file"
    if not path.exists():
        return f"{path} does not exist"
    if path.is_file():
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened():
                return f"OpenCV cannot open video {path}"
            for _ in range(VIDEO_BAD_RUN):
                ok, _img = cap.read()
                if ok:
                    return None
            return f"video {path}: no decodable frame"
        finally:
            cap.release()
    files = list_images(path)
    if not files:
        return f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}"
    for f in files:
        try:
            decode_image(f, grayscale)
            return None
        except CameraConfigError:
            continue
    return f"none of the {len(files)} image files in {path} can be decoded"


class ReplaySource:
    """A FrameSource over files; see the module docstring for the timing model."""

    def __init__(self, settings: ReplayCameraSettings) -> None:
        self.camera_id = settings.id
        self._settings = settings
        self._period_s = 1.0 / settings.fps if settings.fps > 0 else 0.0
        trig = settings.trigger
        self._triggered = isinstance(trig, TriggeredMode) and trig.fires_software
        self._hw_triggered = isinstance(trig, TriggeredMode) and not trig.fires_software
        self._images: list[np.ndarray] | None = None
        self._names: list[str] = []
        self._video: cv2.VideoCapture | None = None
        self._is_video = settings.path.is_file()
        self._closed = threading.Event()
        self._closed.set()
        self._cond = threading.Condition()
        self._triggers_fired = 0
        self._triggers_served = 0
        self._next_id = 0
        self._base_id = 0
        self._t0 = 0.0
        self.dropped = 0
        """Frames skipped because the consumer fell behind (their ids are missing)."""
        self.skipped_files = 0
        """Undecodable files skipped at load, plus undecodable video frames met while playing."""
        self.skipped_paths: list[str] = []
        self._video_good = 0  # frames decoded since the last rewind

    # -- FrameSource ------------------------------------------------------------------------
    def open(self) -> None:
        path = self._settings.path
        if not path.exists():
            raise CameraConfigError(f"replay: path {path} does not exist")
        if self._is_video:
            cap = cv2.VideoCapture(str(path))
            if not cap.isOpened():
                raise CameraConfigError(f"replay: OpenCV cannot open video {path}")
            for _ in range(VIDEO_BAD_RUN):  # a file OpenCV opens may still decode nothing
                ok, _img = cap.read()
                if ok:
                    break
            else:
                cap.release()
                raise CameraConfigError(f"replay: video {path} has no decodable frame")
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._video = cap
            self._video_good = 0
        elif self._images is None:
            self._load_folder(path)
        self._closed.clear()
        with self._cond:  # triggers fired into the previous session died with it
            self._triggers_served = self._triggers_fired
        self._t0 = time.monotonic()
        self._base_id = self._next_id

    def read(self, timeout_s: float) -> Frame | None:
        if self._closed.is_set():
            raise CameraError(f"replay {self.camera_id}: read on a closed source")
        part_id: int | None = None
        if self._triggered:
            with self._cond:
                if not self._cond.wait_for(
                    lambda: self._triggers_served < self._triggers_fired or self._closed.is_set(),
                    timeout_s,
                ):
                    return None
                if self._closed.is_set():
                    raise CameraError(f"replay {self.camera_id}: closed while waiting")
                self._triggers_served += 1
                part_id = self._triggers_served
        elif self._period_s > 0:
            due = self._t0 + (self._next_id - self._base_id) * self._period_s
            wait = due - time.monotonic()
            if wait > timeout_s:
                self._closed.wait(timeout_s)
                return None
            if wait > 0 and self._closed.wait(wait):
                raise CameraError(f"replay {self.camera_id}: closed while waiting")
            behind = int((time.monotonic() - due) / self._period_s)
            if behind > self._settings.max_lag_frames:
                skip = behind - self._settings.max_lag_frames
                self._skip(skip)
        return self._deliver(part_id)

    def trigger(self) -> None:
        if not self._triggered:
            return
        with self._cond:
            self._triggers_fired += 1
            self._cond.notify_all()

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        if self._video is not None:
            self._video.release()
            self._video = None

    # -- internals --------------------------------------------------------------------------
    def _load_folder(self, path: Path) -> None:
        files = list_images(path)
        if not files:
            raise CameraConfigError(
                f"replay: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}"
            )
        images: list[np.ndarray] = []
        names: list[str] = []
        bad: list[str] = []
        for f in files:
            try:
                img = decode_image(f, self._settings.grayscale)
            except CameraConfigError:
                bad.append(str(f))
                continue
            img.flags.writeable = False  # shared by every loop: consumers must not draw on it
            images.append(img)
            names.append(str(f))
        if not images:
            raise CameraConfigError(
                f"replay: none of the {len(files)} image files in {path} can be decoded "
                f"(first: {bad[0]}); replace or remove them"
            )
        if bad:
            log.warning(
                "replay_files_skipped", camera=self.camera_id, count=len(bad), files=bad[:50],
                fix="these files are corrupt or not images; remove or replace them",
            )
        self.skipped_files += len(bad)
        self.skipped_paths = bad
        self._images, self._names = images, names
        log.info(
            "replay_loaded",
            camera=self.camera_id,
            images=len(images),
            skipped=len(bad),
            mbytes=round(sum(i.nbytes for i in images) / 1e6, 1),
        )

    def _skip(self, n: int) -> None:
        """Overdue frames are lost, as on a camera whose buffers all filled up."""
        self.dropped += n
        if self._video is not None:
            for _ in range(n):
                if not self._video.grab():
                    break
        self._next_id += n

    def _deliver(self, part_id: int | None) -> Frame:
        frame_id = self._next_id
        if self._video is not None:
            image, name = self._next_video_image(), str(self._settings.path)
        else:
            assert self._images is not None
            idx = frame_id
            if idx >= len(self._images) and not self._settings.loop:
                raise EOFError(f"replay {self.camera_id}: all {len(self._images)} images played")
            idx %= len(self._images)
            image, name = self._images[idx], self._names[idx]
        self._next_id += 1
        now_ns = time.monotonic_ns()
        return Frame(
            camera_id=self.camera_id,
            frame_id=frame_id,
            part_id=(frame_id + 1 if self._hw_triggered else frame_id)
            if part_id is None
            else part_id,
            captured_ns=now_ns,
            captured_wall_ns=time.time_ns(),
            image=image,
            pixel_format="Mono8" if image.ndim == 2 else "BGR8",
            device_timestamp_ns=None,
            source_meta={"file": name},
        )

    def _next_video_image(self) -> np.ndarray:
        video, path = self._video, self._settings.path
        assert video is not None
        for _attempt in range(2):  # this pass, then once more after a rewind
            bad = 0
            while bad < VIDEO_BAD_RUN:
                ok, img = video.read()
                if ok and img is not None:
                    if bad:
                        self._video_skipped(bad)
                    self._video_good += 1
                    return self._video_frame(img)
                bad += 1
            # A run of failures: the end of the file (trailing corrupt frames look the same).
            if self._video_good == 0:
                raise CameraConfigError(f"replay: video {path} has no decodable frame")
            if not self._settings.loop:
                raise EOFError(f"replay {self.camera_id}: end of video {path}")
            video.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._video_good = 0
        raise CameraError(f"replay {self.camera_id}: cannot rewind {path}")

    def _video_skipped(self, n: int) -> None:
        if not self.skipped_files:
            log.warning("replay_video_frames_skipped", camera=self.camera_id,
                        path=str(self._settings.path), note="logged once; counted in bad_files")
        self.skipped_files += n

    def _video_frame(self, img: np.ndarray) -> np.ndarray:
        if self._settings.grayscale and img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        return np.ascontiguousarray(img)
