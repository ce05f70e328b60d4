"""Property: every lookup table equals the float function rounded as the IR defines it, on every input code,
and the reference interpreter and onnxruntime look codes up exactly as tabulated."""

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from qcompile.passes.lower_integer import tabulate
from torch import nn

from qcompile.ir import reference
from qcompile.ir.graph import IRGraph
from qcompile.ir.types import DType, TensorInfo, code_range
from qcompile.quantization.quantizer import ActivationQuantizer, QuantizerState
from qcompile.quantization.spec import QuantSpec

FUNCTIONS = {
    "silu": F.silu, "sigmoid": torch.sigmoid, "hardswish": nn.Hardswish(), "hardsigmoid": F.hardsigmoid,
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "tanh": torch.tanh,
    "leaky_relu": nn.LeakyReLU(0.1), "elu": F.elu, "relu6": F.relu6, "hardtanh": F.hardtanh,
    "mish": F.mish, "plus3": lambda x: x + 3.0, "div6": lambda x: x / 6.0,
}

grids = st.tuples(st.integers(2, 8), st.booleans(), st.floats(0.0009765625, 2.0, width=32))


def _quantizer(bits: int, signed: bool, scale: float) -> ActivationQuantizer:
    q = ActivationQuantizer(QuantSpec(bits, signed))
    q.scale.fill_(scale)
    q.state = QuantizerState.FROZEN
    return q


def _input(bits: int, signed: bool, scale: float) -> TensorInfo:
    lo, hi = code_range(bits, signed)
    return TensorInfo(DType.for_bits(bits, signed), (1, 4), np.float32(scale), None, lo, hi)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(FUNCTIONS)), grid_in=grids, grid_out=grids)
def test_table_is_the_function_rounded_on_every_code(name, grid_in, grid_out):
    fn = FUNCTIONS[name]
    in_t, q = _input(*grid_in), _quantizer(*grid_out)
    table = tabulate(fn, in_t, q)
    s_in, s_out = np.float32(grid_in[2]), np.float32(q.scale.item())
    for i, code in enumerate(range(in_t.qmin, in_t.qmax + 1)):
        x = torch.tensor([np.float32(code) * s_in], dtype=torch.float32)  # one element: the scalar code path
        y = np.float32(fn(x).item())
        expected = np.clip(np.rint(np.float32(y / s_out)), q.spec.qmin, q.spec.qmax)
        assert table[i] == expected, (name, code, y)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(FUNCTIONS)), grid_in=grids, grid_out=grids)
def test_reference_and_onnxruntime_look_every_code_up(name, grid_in, grid_out):
    from qcompile.backends import onnx as qonnx

    in_t, q = _input(*grid_in), _quantizer(*grid_out)
    table = tabulate(FUNCTIONS[name], in_t, q)
    codes = np.arange(in_t.qmin, in_t.qmax + 1, dtype=np.int32)
    out_t = TensorInfo(DType.for_bits(q.spec.bits, q.spec.signed), (1, len(codes)), q.scale.numpy(), None,
                       q.spec.qmin, q.spec.qmax)
    ir = IRGraph(inputs=["x"], outputs=["y"])
    ir.add_value("x", TensorInfo(DType.FLOAT32, (1, len(codes))))
    ir.add_op("quantize", ["x"], "q", TensorInfo(in_t.dtype, (1, len(codes)), in_t.scale, None, in_t.qmin, in_t.qmax))
    ir.add_constant("table", table, TensorInfo(DType.INT32, table.shape))
    ir.add_op("lut", ["q", "table"], "t", out_t)
    ir.add_op("dequantize", ["t"], "y", TensorInfo(DType.FLOAT32, (1, len(codes))))
    x = (codes.astype(np.float32) * in_t.scale)[None]
    ref = reference.run(ir, x, keep=True)
    assert np.array_equal(ref["t"][0], table)
    ort = qonnx.run(qonnx.session(qonnx.to_onnx(ir)), [x])[0]
    assert np.array_equal(ort, ref["y"])
