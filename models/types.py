"""Typed surface of the models package: what a detector takes and what it returns.

The pipeline times each stage separately (preprocess, infer, postprocess), so a detector exposes
the three steps rather than one opaque call. All three are CPU/GPU-heavy and are called from a
worker thread, never from the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class Detection:
    class_id: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 in original-image pixels."""
    area_px: int
    """Mask area in original-image pixels (box area when the model has no masks)."""
    mask: np.ndarray | None = None
    """bool mask of the box region at original resolution (None when masks were not requested).

    Box-local, not full-frame: pixel (row r, col c) of the mask is image pixel
    (mask_origin[1] + r, mask_origin[0] + c). A 5 MP frame with a few hundred candidates would
    otherwise allocate gigabytes per frame. ``full_mask`` gives the frame-sized array."""
    mask_origin: tuple[int, int] = (0, 0)
    """(x, y) of the mask's top-left pixel in the image."""
    outline: tuple[tuple[int, int], ...] = ()
    """Simplified polygon of the mask, original-image pixels, for events."""

    def full_mask(self, image_shape: tuple[int, ...]) -> np.ndarray | None:
        """The mask as a bool array of the whole image (overlays, tests), or None."""
        if self.mask is None:
            return None
        full = np.zeros(image_shape[:2], dtype=bool)
        x0, y0 = self.mask_origin
        h, w = self.mask.shape
        full[y0 : y0 + h, x0 : x0 + w] = self.mask
        return full


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    """Network input (height, width)."""
    sha256: str
    runtime: str
    """The registry name of the runtime that runs it: "onnxruntime", "tensorrt" or "openvino"."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per-class decision score thresholds recommended by the package (operating point)."""
    digest: str = ""
    """The package digest (sha256 over manifest + every file, see models.package): the one id
    that changes with ANY change of what decides, thresholds included. Events should carry it;
    empty only for detectors not built from a package (test fakes)."""

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class Prepared:
    """One preprocessed image plus what postprocess needs to map back to the original."""

    tensor: np.ndarray
    """1x3xHxW float32 (or float16 for FP16 engines), ready to be stacked into a batch."""
    orig_shape: tuple[int, int]
    ratio: float
    pad: tuple[float, float]
    """Letterbox padding (left, top) in network pixels."""


class ModelError(Exception):
    """Inference failed (runtime error, bad output); the frame goes to fail-safe."""


class ModelPackageError(Exception):
    """A model package is corrupt, tampered or does not match its manifest."""


@runtime_checkable
class Detector(Protocol):
    info: ModelInfo
    max_batch: int

    def preprocess(self, image: np.ndarray) -> Prepared: ...

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the network on an Nx3xHxW batch (N <= max_batch); raw outputs."""
        ...

    def postprocess(
        self,
        outputs: list[np.ndarray],
        prepared: Sequence[Prepared],
        *,
        masks: bool = True,
        outlines: bool = True,
    ) -> list[list[Detection]]:
        """Detections per image, best first; ``masks``/``outlines`` False leave them out."""
        ...

    def close(self) -> None: ...
