"""What every YOLOv8-seg runtime shares: the pre- and post-processing around the network.

Keeping it in one place is what keeps the ONNX Runtime and TensorRT detectors numerically equal to
each other and to ultralytics' predict (tests/models/test_decode_equivalence.py); a runtime only
adds how the tensor gets through the network (``infer``) and how it is released (``close``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.decode import DecodeParams, MaskMapper, postprocess
from models.preprocess import preprocess
from models.types import Detection, ModelError, Prepared


class SegDetectorBase:
    _input_hw: tuple[int, int]
    _dtype: type
    """Input tensor dtype (float32, or float16 for FP16 models/engines)."""
    _classes: tuple[str, ...]
    _params: DecodeParams
    _mapper: MaskMapper
    max_batch: int

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def _check_batch(self, batch: np.ndarray) -> None:
        """Refuse a batch the network cannot take, naming the shape it expects."""
        expected = (3, *self._input_hw)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
            raise ModelError(
                f"batch shape {batch.shape}; expected Nx{'x'.join(map(str, expected))}"
            )
        if batch.shape[0] > self.max_batch:
            raise ModelError(f"batch of {batch.shape[0]} exceeds max_batch={self.max_batch}")

    def preprocess(self, image: np.ndarray) -> Prepared:
        return preprocess(image, self._input_hw, self._dtype)

    def postprocess(
        self,
        outputs: list[np.ndarray],
        prepared: Sequence[Prepared],
        *,
        masks: bool = True,
        outlines: bool = True,
    ) -> list[list[Detection]]:
        return postprocess(
            outputs,
            prepared,
            self._classes,
            self._input_hw,
            self._params,
            masks=masks,
            outlines=outlines,
            mapper=self._mapper,
        )

    def detect(self, image: np.ndarray, *, masks: bool = True) -> list[Detection]:
        """Convenience for tools and tests: preprocess + infer + postprocess of one image."""
        p = self.preprocess(image)
        return self.postprocess(self.infer(p.tensor), [p], masks=masks)[0]
