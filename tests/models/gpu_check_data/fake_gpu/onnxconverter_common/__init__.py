"""Stand-in: the gpu extra's onnxconverter-common (only TensorRT 11 uses it; imported by the
script's install check)."""
