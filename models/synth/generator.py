"""One synthetic sample: seeded, so (seed, index) always yields the same image and labels.

Each image draws its own generator from ``np.random.default_rng([seed, index])``: samples are
independent of generation order, so a dataset can be built in parallel or partially and still be
byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.datasets.yolo import Instance, mask_to_polygons
from models.synth.defects import PAINTERS
from models.synth.texture import add_benign_marks, finish, render_surface

CLASSES: tuple[str, ...] = ("scratch", "pit", "crack", "stain")


class SynthConfig(BaseModel):
    """What to generate. Defaults make the demo data set."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(default=256, ge=32, le=4096)
    height: int = Field(default=256, ge=32, le=4096)
    defect_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    """Share of images with at least one defect; the rest are OK parts."""
    max_defects: int = Field(default=3, ge=1, le=20)
    class_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    """Relative frequency of scratch, pit, crack, stain."""
    min_instance_area_px: int = Field(default=6, ge=1)
    """Defects whose visible mask ends up smaller (clipped by the part edge) are dropped."""


@dataclass(slots=True)
class SynthSample:
    image: np.ndarray
    """uint8 HxW grayscale."""
    instances: list[Instance]
    masks: list[np.ndarray]
    """bool HxW mask per defect (several polygons of one mask share its class)."""
    mask_classes: list[int]
    material: str
    instance_mask: list[int] = field(default_factory=list)
    """Index into ``masks`` of each instance (a clipped defect may give several polygons)."""
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def is_defect(self) -> bool:
        return bool(self.masks)


def generate_sample(seed: int, index: int, cfg: SynthConfig | None = None) -> SynthSample:
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng([seed, index])
    h, w = cfg.height, cfg.width
    scale = min(h, w) / 256.0
    img, part, material = render_surface(rng, h, w)
    add_benign_marks(rng, img, part)
    weights = np.asarray(cfg.class_weights, np.float64)
    weights = weights / weights.sum()
    n_defects = (
        int(rng.integers(1, cfg.max_defects + 1)) if rng.random() < cfg.defect_fraction else 0
    )
    # Defects sit on the part, away from its edge (the chamfer highlight is not a defect).
    allowed = part.copy()
    if allowed.min() == 0:
        k = max(3, int(6 * scale)) | 1
        allowed = cv2.erode(allowed, np.ones((k, k), np.uint8))
    masks: list[np.ndarray] = []
    classes: list[int] = []
    instances: list[Instance] = []
    owner: list[int] = []
    for _ in range(n_defects):
        cls = int(rng.choice(len(CLASSES), p=weights))
        mask = PAINTERS[CLASSES[cls]](rng, img, allowed, scale)
        if int(mask.sum()) < cfg.min_instance_area_px:
            continue
        polys = mask_to_polygons(mask, min_area_px=cfg.min_instance_area_px / 2)
        if not polys:
            continue
        masks.append(mask)
        classes.append(cls)
        instances.extend(Instance(cls, p) for p in polys)
        owner.extend([len(masks) - 1] * len(polys))
    out = finish(rng, img)
    return SynthSample(
        out, instances, masks, classes, material, owner, {"seed": seed, "index": index}
    )
