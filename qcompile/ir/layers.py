"""Which layer each IR op belongs to, so per-op figures (measured kernel time) add up to per-layer ones.

A layer (a ``conv2d`` or ``dense`` op, named after its module as the cost report names it, or a ``matmul`` of two
tensors, named after its node as the report's row for it is) owns itself and the ops after it up to the next
layer: its requantize, the residual add and activation that follow it, a pooling.
Ops before the first layer (the input's quantization) belong to :data:`INPUT`. Every op belongs to exactly one
layer, so the layers' times sum to the model's.
"""

from __future__ import annotations

from qcompile.ir.graph import IRGraph, Op

LAYER_KINDS = frozenset({"conv2d", "dense", "matmul"})
INPUT = "(input)"


def layer_name(op: Op) -> str:
    """The module name of a conv/dense op (its weight constant is ``<module>.weight``); a matmul's own name."""
    return op.output if op.kind == "matmul" else op.inputs[1].removesuffix(".weight")


def op_layers(ir: IRGraph) -> dict[str, str]:
    """IR op (by its output) → the layer it belongs to."""
    owner, out = INPUT, {}
    for op in ir.ops:
        if op.kind in LAYER_KINDS:
            owner = layer_name(op)
        out[op.output] = owner
    return out
