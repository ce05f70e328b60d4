"""Static accumulator bounds: never below what any input reaches, and a model that could overflow is refused."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger
from torch import nn

from qcompile import Pipeline, get_recipe
from qcompile.ir import reference
from qcompile.ir.bounds import accumulator_bounds, check_int32
from qcompile.ir.graph import IRGraph
from qcompile.ir.reference import IntegerOverflowError
from qcompile.ir.types import DType, TensorInfo, code_range


def _conv_ir(w: np.ndarray, b: np.ndarray, bits: int, signed: bool) -> IRGraph:
    lo, hi = code_range(bits, signed)
    ir = IRGraph(inputs=["x"], outputs=["y"])
    ir.add_value("x", TensorInfo(DType.for_bits(bits, signed), (1, w.shape[1], 4, 4), np.float32(1), None, lo, hi))
    ir.add_constant("w", w, TensorInfo(DType.INT8, w.shape, np.ones(len(w), np.float32), 0))
    ir.add_constant("b", b, TensorInfo(DType.INT32, b.shape, np.ones(len(w), np.float32), 0))
    ir.add_op("conv2d", ["x", "w", "b"], "y", TensorInfo(DType.INT32, (1, len(w), 2, 2), np.ones(len(w), np.float32), 1),
              stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    return ir


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8), signed=st.booleans())
def test_bound_holds_for_every_input_and_is_reached_by_the_worst(seed, bits, signed):
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int32)
    b = rng.integers(-1000, 1000, 3).astype(np.int32)
    ir = _conv_ir(w, b, bits, signed)
    (bound,) = accumulator_bounds(ir)
    lo, hi = code_range(bits, signed)
    x = rng.integers(lo, hi + 1, (8, 2, 4, 4)).astype(np.int32)
    acc = reference.run_op(ir.ops[0], [x, w, b], ir)
    assert np.abs(acc.astype(np.int64)).max() <= bound.bound
    # the worst input of channel c: the largest code of the sign of w (and of b) everywhere
    c = int(np.argmax(np.abs(w).reshape(3, -1).sum(1) + np.abs(b)))
    if signed and lo == -hi:
        sign = np.sign(b[c]) or 1
        worst = (np.sign(w[c]) * sign * hi).astype(np.int32)[None]
        worst = np.pad(worst, ((0, 0), (0, 0), (0, 1), (0, 1)))  # 4x4 input, the 3x3 window at the origin
        reached = reference.run_op(ir.ops[0], [worst, w, b], ir)[0, c, 0, 0]
        assert abs(int(reached)) == int(np.abs(w[c]).sum()) * hi + abs(int(b[c]))


def test_check_int32_names_the_layer():
    w = np.full((1, 4096, 5, 5), 127, np.int32)
    ir = _conv_ir(w, np.zeros(1, np.int32), 8, False)
    with pytest.raises(IntegerOverflowError, match=r"layer y: .*can reach 3,316,224,000 .*\[0, 255\]"):
        check_int32(ir)


class WideConv(nn.Module):
    """A 4096-channel 7x7 conv after a ReLU: with 8-bit codes its worst case overflows int32 (random weights put
    Σ|w| at about half of 127 per input)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 4096, 1)
        self.wide = nn.Conv2d(4096, 4, 7)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.wide(torch.relu(self.expand(x)))).mean((2, 3)))


def test_a_model_that_could_overflow_is_refused_at_lowering():
    torch.manual_seed(0)
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    passes = [FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate(), LowerInteger()]
    with pytest.raises(IntegerOverflowError, match="layer wide "):
        Pipeline(passes).run(WideConv(), calib[0][0][:1], recipe=get_recipe("int8"), calibration_data=calib)
    res = Pipeline(passes).run(WideConv(), calib[0][0][:1], recipe=get_recipe("int4"), calibration_data=calib)
    assert all(b.fits for b in accumulator_bounds(res.context.ir))  # 4-bit codes fit


def _matmul_ir(k: int, a_signed: bool, b_signed: bool) -> IRGraph:
    ir = IRGraph(inputs=["a", "b"], outputs=["y"])
    for name, signed, shape in (("a", a_signed, (2, 3, k)), ("b", b_signed, (2, k, 4))):
        lo, hi = code_range(8, signed, symmetric=False)
        ir.add_value(name, TensorInfo(DType.for_bits(8, signed), shape, np.float32(1), None, lo, hi))
    ir.add_op("matmul", ["a", "b"], "y", TensorInfo(DType.INT32, (2, 3, 4), np.float32(1)))
    return ir


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), a_signed=st.booleans(), b_signed=st.booleans())
def test_a_matmul_bound_holds_and_is_reached(seed, a_signed, b_signed):
    """The bound of a product of two code tensors is its inner size times the largest product of two codes,
    which codes at the ends of both ranges reach."""
    ir = _matmul_ir(50, a_signed, b_signed)
    (bound,) = accumulator_bounds(ir)
    a_lo, a_hi = code_range(8, a_signed, symmetric=False)
    b_lo, b_hi = code_range(8, b_signed, symmetric=False)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(a_lo, a_hi + 1, (2, 3, 50)), rng.integers(b_lo, b_hi + 1, (2, 50, 4))
    assert np.abs(reference.run_op(ir.ops[0], [a, b], ir).astype(np.int64)).max() <= bound.bound
    a_end, b_end = (a_lo if abs(a_lo) > a_hi else a_hi), (b_lo if abs(b_lo) > b_hi else b_hi)
    worst = reference.run_op(ir.ops[0], [np.full((2, 3, 50), a_end), np.full((2, 50, 4), b_end)], ir)
    assert abs(int(worst[0, 0, 0])) == bound.bound


def test_a_matmul_that_could_overflow_is_refused():
    """70,000 products of signed 8-bit codes stay within int32 (at most 70,000 · 128 · 128 ≈ 1.15e9); 140,000
    could pass it."""
    assert accumulator_bounds(_matmul_ir(70_000, True, True))[0].fits
    with pytest.raises(IntegerOverflowError, match=r"matrix product y: .*140,000 products of codes in \[-128, 127\]"):
        check_int32(_matmul_ir(140_000, True, True))
