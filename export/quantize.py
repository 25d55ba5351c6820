"""Static int8 quantisation of exported graphs (QDQ), calibrated on real samples.

Static, not dynamic: dynamic quantisation turns Conv into ConvInteger, which many execution
providers do not implement, and quantises activations on every call. QDQ keeps the graph
standard ONNX (QuantizeLinear / DequantizeLinear around float ops) that ONNX Runtime fuses into
QLinearConv / QGemm on CPUs and that TensorRT reads on Jetsons.

Which int8 kernels run depends on the CPU, so the scheme matters: x86 CPUs without VNNI multiply
uint8 activations by int8 weights with ``vpmaddubsw``, whose 16-bit pair sums saturate, while
VNNI CPUs and ARM's dot-product kernels do not. ``SCHEMES`` holds the choices measured in
``bench/int8_isa.py`` (docs/RESULTS.md, "int8 per instruction set"); ``DEFAULT_SCHEME`` is the
one that keeps fp32's answers on every CPU measured.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


@dataclass(frozen=True)
class Scheme:
    """How activations and weights become 8-bit integers."""

    activations: QuantType
    weights: QuantType
    reduce_range: bool  # weights in 7 bits: no 16-bit overflow in vpmaddubsw (AVX2 without VNNI)
    why: str

    def describe(self, name: str) -> dict[str, Any]:
        """What the manifest records about the scheme."""
        bits = "7-bit range" if self.reduce_range else "8-bit range"
        return {"scheme": name, "format": "QDQ",
                "weights": f"{self.weights.name} per output channel, {bits}",
                "activations": f"{self.activations.name} per tensor",
                "calibration_method": "MinMax",
                "tool": "onnxruntime.quantization.quantize_static", "why": self.why}


SCHEMES: dict[str, Scheme] = {
    "u8s8": Scheme(QuantType.QUInt8, QuantType.QInt8, False,
                   "ONNX Runtime's default; saturates on x86 CPUs without VNNI"),
    "u8s8-rr": Scheme(QuantType.QUInt8, QuantType.QInt8, True,
                      "7-bit weights: the u8s8 kernels cannot overflow on any CPU"),
    "u8u8": Scheme(QuantType.QUInt8, QuantType.QUInt8, False,
                   "unsigned weights: ONNX Runtime's u8u8 kernels widen to 16 bits first"),
}
DEFAULT_SCHEME = "u8s8-rr"


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


def quantize_int8(src: Path, dst: Path, input_name: str, calibration: np.ndarray,
                  scheme: str = DEFAULT_SCHEME) -> None:
    """Writes the int8 QDQ version of the fp32 graph ``src`` to ``dst``.

    The graph first goes through ONNX Runtime's recommended pre-processing (shape inference and
    graph optimisation), so that every tensor has a shape and the calibrator sees the graph that
    will run.
    """
    if len(calibration) == 0:
        raise ValueError("int8 quantisation needs at least one calibration sample")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    s = SCHEMES[scheme]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))
        quantize_static(str(prepared), str(dst), ArrayReader(input_name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=s.activations, weight_type=s.weights,
                        reduce_range=s.reduce_range, calibrate_method=CalibrationMethod.MinMax)
