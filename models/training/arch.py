"""The demo network: genuine YOLOv8-seg topology, narrowed to fit a 2-core line PC.

yolov8n-seg at 256 px costs ~15 ms per image with one ONNX Runtime thread, which leaves no room
for 60 fps next to the daemon; the same graph at a smaller width keeps the standard
``output0``/``output1`` outputs (so every decoder and exporter still applies) at a fraction of
the cost.
"""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

# The upstream yolov8-seg.yaml backbone/head, verbatim; only the scale constants differ.
_BACKBONE = [
    [-1, 1, "Conv", [64, 3, 2]],
    [-1, 1, "Conv", [128, 3, 2]],
    [-1, 3, "C2f", [128, True]],
    [-1, 1, "Conv", [256, 3, 2]],
    [-1, 6, "C2f", [256, True]],
    [-1, 1, "Conv", [512, 3, 2]],
    [-1, 6, "C2f", [512, True]],
    [-1, 1, "Conv", [1024, 3, 2]],
    [-1, 3, "C2f", [1024, True]],
    [-1, 1, "SPPF", [1024, 5]],
]
_HEAD = [
    [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
    [[-1, 6], 1, "Concat", [1]],
    [-1, 3, "C2f", [512]],
    [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]],
    [-1, 3, "C2f", [256]],
    [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 12], 1, "Concat", [1]],
    [-1, 3, "C2f", [512]],
    [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 9], 1, "Concat", [1]],
    [-1, 3, "C2f", [1024]],
    [[15, 18, 21], 1, "Segment", ["nc", 32, 256]],
]

SCALES: dict[str, tuple[float, float, int]] = {
    # name: (depth_multiple, width_multiple, max_channels)
    "p": (0.33, 0.125, 1024),  # "pico": the demo model
    "n": (0.33, 0.25, 1024),  # upstream yolov8n-seg
    "s": (0.33, 0.50, 1024),
}


def write_arch_yaml(out_dir: Path, nc: int, scale: str = "p") -> Path:
    """Write a model yaml for ``nc`` classes; returns its path (name encodes the scale)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    depth, width, max_ch = SCALES[scale]
    doc = {
        "nc": nc,
        "depth_multiple": depth,
        "width_multiple": width,
        "max_channels": max_ch,
        "backbone": _BACKBONE,
        "head": _HEAD,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # No 'yolov8<letter>' in the name: ultralytics would then apply its own scale table.
    path = out_dir / f"edge-v8seg-{scale}-nc{nc}.yaml"
    yml = YAML(typ="safe", pure=True)
    yml.default_flow_style = None
    with path.open("w") as fh:
        yml.dump(doc, fh)
    return path
