import numpy as np
import pytest

from qcompile.ir.graph import IRGraph
from qcompile.ir.reference import IntegerOverflowError, conv2d, rhe, run
from qcompile.ir.types import DType, TensorInfo


def _dense_graph(k: int, x_code: int, w_code: int) -> IRGraph:
    g = IRGraph()
    g.inputs.append(g.add_value("x", TensorInfo(DType.FLOAT32, (1, k))))
    g.add_op("quantize", ["x"], "xq", TensorInfo(DType.UINT8, (1, k), np.float32(1.0)))
    w = g.add_constant("w", np.full((1, k), w_code, dtype=np.int32), TensorInfo(DType.INT8, (1, k), np.ones(1), 0))
    g.add_op("dense", ["xq", w], "acc", TensorInfo(DType.INT32, (1, 1), np.ones(1, dtype=np.float32), 1))
    g.add_op("dequantize", ["acc"], "y", TensorInfo(DType.FLOAT32, (1, 1)))
    g.outputs.append("y")
    return g


def test_int32_overflow_is_reported_not_wrapped():
    k = 70_000  # 70000 * 255 * 127 > 2^31
    g = _dense_graph(k, 255, 127)
    with pytest.raises(IntegerOverflowError, match="exceeds int32"):
        run(g, np.full((1, k), 255.0, dtype=np.float32))


def test_accumulation_just_inside_int32_is_exact():
    k = 66_000  # 66000 * 255 * 127 = 2,137,455,000 < 2^31 - 1
    g = _dense_graph(k, 255, 127)
    y = run(g, np.full((1, k), 255.0, dtype=np.float32))["y"]
    assert int(run(g, np.full((1, k), 255.0, dtype=np.float32), keep=True)["acc"][0, 0]) == 66_000 * 255 * 127
    assert y.dtype == np.float32


def test_round_half_to_even():
    assert list(rhe(np.array([0.5, 1.5, 2.5, -0.5, -1.5]))) == [0, 2, 2, -0, -2]


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 4)])
def test_integer_conv_matches_a_direct_loop(stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, (2, 4, 7, 7)).astype(np.int32)
    w = rng.integers(-7, 8, (8, 4 // groups, 3, 3)).astype(np.int32)
    out = conv2d(x, w, (stride, stride), (padding, padding), (dilation, dilation), groups)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))).astype(np.int64)
    cg, og = 4 // groups, 8 // groups
    for n in range(2):
        for o in range(8):
            g = o // og
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    patch = xp[n, g * cg:(g + 1) * cg, i * stride:i * stride + dilation * 2 + 1:dilation,
                               j * stride:j * stride + dilation * 2 + 1:dilation]
                    assert out[n, o, i, j] == int((patch * w[o]).sum())
