"""Static int8 quantisation of exported graphs (QDQ), calibrated on real samples.

Static, not dynamic: dynamic quantisation turns Conv into ConvInteger, which many execution
providers do not implement, and quantises activations on every call. QDQ keeps the graph
standard ONNX (QuantizeLinear / DequantizeLinear around float ops) that ONNX Runtime fuses into
QLinearConv / QGemm on CPUs and that TensorRT reads on Jetsons.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

# What the manifest says about how int8 graphs were made.
METHOD = {
    "format": "QDQ",
    "weights": "int8 (QInt8), per output channel",
    "activations": "uint8 (QUInt8), per tensor",
    "calibration_method": "MinMax",
    "tool": "onnxruntime.quantization.quantize_static",
}


class ArrayReader(CalibrationDataReader):
    """Feeds calibration samples to ONNX Runtime's calibrator in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self.input_name, self.x, self.batch = input_name, x, batch
        self._it: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.x), self.batch):
            yield {self.input_name: np.ascontiguousarray(self.x[i : i + self.batch], np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def quantize_int8(src: Path, dst: Path, input_name: str, calibration: np.ndarray) -> None:
    """Writes the int8 QDQ version of the fp32 graph ``src`` to ``dst``.

    The graph first goes through ONNX Runtime's recommended pre-processing (shape inference and
    graph optimisation), so that every tensor has a shape and the calibrator sees the graph that
    will run.
    """
    if len(calibration) == 0:
        raise ValueError("int8 quantisation needs at least one calibration sample")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))
        quantize_static(str(prepared), str(dst), ArrayReader(input_name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
