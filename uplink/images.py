"""Images of the spool: which ones are kept, how they are encoded, and how they reach disk durably.

Why a separate path from the events: encoding a 1280x1024 frame and fsyncing it takes tens of ms,
committing a batch of events takes a few. `ImagePipeline` runs on its own threads with its own
byte-bounded admission, so a slow encode or fsync never delays an event commit, and a disk stall
can hold at most `uplink.image_queue_mb` of pixels in memory (past it an image is dropped and
counted; its event is still spooled and says `image_dropped: true`).

Only frames that will be stored are ever referenced: the keep/drop decision (`keep_ok_image`) is a
hash of a short string, taken synchronously on the caller's thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import structlog

from uplink.config import ImageSettings

log = structlog.get_logger(__name__)


def keep_ok_image(line: str, camera: str, part_id: int, rate: float) -> bool:
    """Deterministic per part: replays and restarts sample the same OK parts (no RNG state)."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    digest = hashlib.blake2b(f"{line}/{camera}/{part_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def safe_name(part: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in part) or "_"


def image_file_name(event_id: str, ext: str) -> str:
    """Deterministic, so a restart can re-attach a file whose 'stored' note never committed."""
    return f"{safe_name(event_id)}.{ext}"


def object_key(
    prefix: str, line: str, camera: str, event_id: str, captured_at: str, ext: str
) -> str:
    """S3 key layout: <prefix><line>/<YYYY-MM-DD>/<camera>/<event_id>.<ext> (UTC capture date)."""
    try:
        day = datetime.fromisoformat(captured_at.replace("Z", "+00:00"))
        if day.tzinfo is not None:
            day = day.astimezone(UTC)
        date = day.strftime("%Y-%m-%d")
    except ValueError:
        date = datetime.now(UTC).strftime("%Y-%m-%d")
    return f"{prefix}{safe_name(line)}/{date}/{safe_name(camera)}/{safe_name(event_id)}.{ext}"


BACKGROUND_NICE = 10
"""Niceness of the spool's threads (Linux: per thread): encoding and committing never take a
core from an inference worker or the event loop (2-core box at 60 fps: inference p99 5.4 ->
see README performance)."""


def background_priority() -> None:
    """Lower the calling thread's CPU priority (the process's other threads keep theirs)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """tmp + fsync + rename: a reader (or a restart) sees the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def encode(image: np.ndarray, cfg: ImageSettings) -> bytes:
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(
            f"image must be a non-empty HxW or HxWxC numpy array, got "
            f"{getattr(image, 'shape', type(image).__name__)}"
        )
    if cfg.format == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, cfg.png_compression])
    else:
        if image.dtype != np.uint8:
            raise ValueError(f"JPEG needs uint8 pixels, got {image.dtype}")
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
    if not ok:
        raise ValueError("OpenCV could not encode the image")
    return bytes(buf.tobytes())


class DirGuard:
    """Shared for image writes, exclusive for moving the images directory (quarantine): a file
    is never half-renamed into a directory that is being moved away. Image writes share it, so
    their fsyncs still overlap."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cv:
                self._shared -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cv.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()


@dataclass(frozen=True, slots=True)
class ImageNote:
    """What the image path tells the writer: the file is durable (size), or it failed (error)."""

    event_id: str
    file: str
    size: int
    error: str | None = None


class ImagePipeline:
    """Encode + durable write on `workers` threads, admission bounded by held pixel bytes.

    `offer()` is O(1) and never blocks: it reserves the frame's bytes or refuses. The reservation is
    released when the file is durable (or failed); `on_done(note)` is then called from the worker
    thread (the spool's writer attaches the file to its event row).
    """

    def __init__(
        self,
        images_dir: Path,
        cfg: ImageSettings,
        bound_bytes: int,
        workers: int,
        on_done: Callable[[ImageNote], None],
        guard: DirGuard | None = None,
    ) -> None:
        self.images_dir = images_dir
        self.guard = guard or DirGuard()
        self.cfg = cfg
        self.bound_bytes = bound_bytes
        self._workers = workers
        self._on_done = on_done
        self._lock = threading.Condition()
        self._held = 0
        self._in_flight = 0
        self.accepted = 0
        self.dropped = 0
        self.written = 0
        self.errors = 0
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self._workers, "uplink-image", initializer=background_priority
            )

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def offer(self, event_id: str, image: np.ndarray) -> bool:
        """Take the frame if the byte bound allows; False = dropped (counted)."""
        size = int(getattr(image, "nbytes", 0)) or 1
        with self._lock:
            pool = self._pool
            if pool is None or self._held + size > self.bound_bytes:
                self.dropped += 1
                return False
            self._held += size
            self._in_flight += 1
            self.accepted += 1
        try:
            pool.submit(self._store, event_id, image, size)
        except RuntimeError:  # pool shut down between the check and the submit
            self._release(size, ok=False)
            with self._lock:
                self.accepted -= 1
                self.dropped += 1
            return False
        return True

    def _release(self, size: int, ok: bool) -> None:
        with self._lock:
            self._held -= size
            self._in_flight -= 1
            if ok:
                self.written += 1
            else:
                self.errors += 1
            self._lock.notify_all()

    def _store(self, event_id: str, image: np.ndarray, size: int) -> None:
        name = image_file_name(event_id, self.cfg.extension)
        try:
            data = encode(image, self.cfg)
            del image  # the pixels are not needed past the encode
            with self.guard.shared():
                write_atomic(self.images_dir / name, data)
                fsync_dir(self.images_dir)
            note = ImageNote(event_id, name, len(data))
        except (OSError, ValueError, cv2.error) as exc:
            note = ImageNote(event_id, name, 0, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # never let a worker die with the reservation held
            note = ImageNote(event_id, name, 0, f"{type(exc).__name__}: {exc}")
        try:  # the note first: once idle, every note has been handed over (flush relies on it)
            self._on_done(note)
        except Exception as exc:
            log.error("uplink_image_note_failed", error=repr(exc))
        finally:
            self._release(size, ok=note.error is None)

    def wait_idle(self, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout_s)

    def stop(self, timeout_s: float) -> bool:
        """Finish what is in flight (up to timeout_s); True if nothing was left behind."""
        with self._lock:
            pool, self._pool = self._pool, None
        idle = self.wait_idle(timeout_s)
        if pool is not None:
            pool.shutdown(wait=idle, cancel_futures=not idle)
        return idle
