"""Readers of labelled-data formats (COCO, YOLO, CVAT XML, mask folders) into one record."""
