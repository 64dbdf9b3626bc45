"""Dataset import (COCO, YOLO, CVAT XML, mask folders) and YOLO-seg label helpers (training
tooling: numpy, OpenCV; pycocotools for COCO RLE)."""
