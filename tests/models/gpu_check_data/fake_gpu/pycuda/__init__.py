"""Stand-in for pycuda on a CPU box: the slice the TensorRT runtime uses (see driver.py)."""

VERSION_TEXT = "fake"
