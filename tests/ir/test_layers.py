"""Every IR op belongs to one layer: the conv/dense op or matrix product before it, or the input."""

import numpy as np

from qcompile.ir.graph import IRGraph
from qcompile.ir.layers import INPUT, op_layers
from qcompile.ir.types import DType, TensorInfo


def test_ops_belong_to_the_layer_before_them() -> None:
    g = IRGraph(inputs=["x"])
    f = TensorInfo(DType.FLOAT32, (1, 2, 4, 4))
    g.add_value("x", f)
    w = g.add_constant("stem.weight", np.ones((2, 2, 1, 1), np.float32), TensorInfo(DType.FLOAT32, (2, 2, 1, 1)))
    v = g.add_constant("body.weight", np.ones((2, 2, 1, 1), np.float32), TensorInfo(DType.FLOAT32, (2, 2, 1, 1)))
    g.add_op("relu", ["x"], "pre", f)
    g.add_op("conv2d", ["pre", w], "stem_out", f, stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    g.add_op("relu", ["stem_out"], "r", f)
    g.add_op("conv2d", ["r", v], "body_out", f, stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    g.add_op("add", ["body_out", "r"], "sum", f)
    assert op_layers(g) == {"pre": INPUT, "stem_out": "stem", "r": "stem", "body_out": "body", "sum": "body"}


def test_a_matrix_product_of_two_tensors_is_a_layer_of_its_own_name() -> None:
    g = IRGraph(inputs=["x"])
    f = TensorInfo(DType.FLOAT32, (1, 4, 4))
    g.add_value("x", f)
    g.add_op("matmul", ["x", "x"], "matmul_1", f)
    g.add_op("softmax", ["matmul_1"], "attention", f, dim=-1)
    assert op_layers(g) == {"matmul_1": "matmul_1", "attention": "matmul_1"}
