"""Measured figures in the report's shape: medians, per-round ratios, kernels summed per layer."""

from dataclasses import dataclass

import numpy as np

from qcompile.ir.graph import IRGraph
from qcompile.ir.layers import INPUT
from qcompile.ir.types import DType, TensorInfo
from qcompile.reporting.measured import RUNTIME_INSERTED, end_to_end, median_ratio_interval, per_layer


@dataclass(frozen=True)
class K:
    op_type: str
    ir_op: str | None
    ms: float
    integer: bool = False
    compute: bool = False


def test_end_to_end_takes_medians_and_the_median_ratio() -> None:
    out = end_to_end({1: ([1.0, 2.0, 9.0], [2.0, 2.0, 3.0])})
    assert out == {"1": {"artifact_ms": 2.0, "float_ms": 2.0, "ratio": 1.0}}  # ratios 0.5, 1, 3


def test_the_ratio_interval_is_the_sign_tests_order_statistics() -> None:
    rounds = list(range(1, 32))
    shuffled = rounds[::2] + rounds[1::2]  # the order of the rounds does not matter, only the ratios
    assert median_ratio_interval([float(r) for r in shuffled], [1.0] * 31) == (10.0, 22.0)  # 97% coverage
    assert median_ratio_interval([1.0, 3.0, 2.0, 5.0, 4.0], [1.0] * 5) == (1.0, 5.0)  # 5 rounds: the full range
    assert median_ratio_interval([4.0] * 9, [2.0] * 9) == (2.0, 2.0)


def test_kernels_add_up_per_layer_with_the_layer_kernel_first() -> None:
    g = IRGraph(inputs=["x"])
    f = TensorInfo(DType.FLOAT32, (1, 2, 4, 4))
    g.add_value("x", f)
    w = g.add_constant("stem.weight", np.ones((2, 2, 1, 1), np.float32), TensorInfo(DType.FLOAT32, (2, 2, 1, 1)))
    g.add_op("quantize", ["x"], "xq", f)
    g.add_op("conv2d", ["xq", w], "c", f, stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    g.add_op("relu", ["c"], "cq", f)
    kernels = [K("QuantizeLinear", "xq", 0.1), K("Transpose", None, 0.05), K("Clip", "cq", 0.02),
               K("QLinearConv", "c", 1.0, True, True), K("Clip", "cq", 0.03)]
    rows = per_layer(g, kernels)
    assert rows == [{"name": INPUT, "ms": 0.1, "kernels": ["QuantizeLinear"], "integer": None},
                    {"name": "stem", "ms": 1.05, "kernels": ["QLinearConv", "Clip"], "integer": True},
                    {"name": RUNTIME_INSERTED, "ms": 0.05, "kernels": ["Transpose"], "integer": None}]
