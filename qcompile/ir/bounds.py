"""Static int32 safety of the integer IR: every conv, dense and matmul accumulator bounded from its weights and its
input's code range, whatever the data (docs/numerics.md: accumulators are proven to fit at lowering, not only checked
on test images). A bound past int32 means an integer kernel could wrap silently, so lowering refuses it.

The bound of output channel c is ``Σ_k |w[c, k]| · max|a| + |b[c]|`` with ``max|a|`` the largest magnitude of
the input's code range: every product at its largest, all of one sign (reached by some signed input; for an
unsigned input it is conservative). Backends that shift unsigned codes into int8 (TVM) accumulate
``Σ w · (a - 128)``, whose magnitude is at most half of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.reference import INT32_MAX, IntegerOverflowError


@dataclass(frozen=True)
class AccumulatorBound:
    """The worst-case |accumulator| of one integer conv/dense op, and how far it stays from int32's limit."""

    op: str
    source: str
    bound: int

    @property
    def headroom_bits(self) -> float:
        """log2(int32 max / bound): how many more bits of input or weight range the accumulator could take."""
        return math.log2(INT32_MAX / self.bound) if self.bound else math.inf

    @property
    def fits(self) -> bool:
        return self.bound <= INT32_MAX


def _largest(ir: IRGraph, name: str) -> int:
    """The largest magnitude of a value's code range."""
    t = ir.values[name]
    return max(abs(int(t.qmin)), abs(int(t.qmax)))


def accumulator_bound(ir: IRGraph, op: Op) -> int:
    """The worst-case |accumulator| of an integer conv2d/dense/matmul ``op`` over every input its codes allow
    (a matrix product: its inner dimension times the largest product of two codes)."""
    if op.kind == "matmul":
        return ir.values[op.inputs[0]].shape[-1] * _largest(ir, op.inputs[0]) * _largest(ir, op.inputs[1])
    x = ir.values[op.inputs[0]]
    w = ir.constants[op.inputs[1]].astype(np.int64)
    largest_input = max(abs(int(x.qmin)), abs(int(x.qmax)))
    per_channel = np.abs(w).reshape(w.shape[0], -1).sum(axis=1) * largest_input
    if len(op.inputs) > 2:
        per_channel = per_channel + np.abs(ir.constants[op.inputs[2]].astype(np.int64))
    return int(per_channel.max(initial=0))


def accumulator_bounds(ir: IRGraph) -> list[AccumulatorBound]:
    """The bound of every integer conv2d/dense/matmul, in op order (float layers have no accumulator to bound)."""
    return [AccumulatorBound(op.output, op.source, accumulator_bound(ir, op))
            for op in ir.ops
            if op.kind in ("conv2d", "dense", "matmul") and ir.values[op.inputs[0]].dtype.is_int]


def check_int32(ir: IRGraph) -> list[AccumulatorBound]:
    """Every accumulator's bound; the first that can leave int32 raises :class:`IntegerOverflowError`."""
    bounds = accumulator_bounds(ir)
    for b in bounds:
        if not b.fits:
            op = next(op for op in ir.ops if op.output == b.op)
            x = ir.values[op.inputs[0]]
            where = f"{b.op}{f' ({b.source})' if b.source else ''}"
            if op.kind == "matmul":
                y = ir.values[op.inputs[1]]
                raise IntegerOverflowError(
                    f"matrix product {where}: its int32 accumulator can reach {b.bound:,} (> {INT32_MAX:,}) for "
                    f"{x.shape[-1]:,} products of codes in [{x.qmin}, {x.qmax}] and [{y.qmin}, {y.qmax}]; an integer "
                    "kernel could wrap: the product sums over too many positions for its codes; run the model on "
                    "smaller inputs")
            raise IntegerOverflowError(
                f"layer {where}: its int32 accumulator can reach {b.bound:,} (> {INT32_MAX:,}) for "
                f"inputs in [{x.qmin}, {x.qmax}]; an integer kernel could wrap: give this layer fewer input or weight "
                "bits")
    return bounds
