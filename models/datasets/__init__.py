"""Dataset converters and YOLO-seg label helpers (training tooling; numpy + OpenCV only)."""
