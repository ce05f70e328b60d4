"""Give every compute layer a precision from the recipe and the overrides, and derive its quantizer specs.

First and last layers are found from the graph (no compute layer before / after them), not from names.
Activation signedness is inferred from the graph: a tensor the graph proves non-negative (a ReLU output,
pooled or added) is quantized unsigned, gaining one bit of range, as in the paper.
"""

from __future__ import annotations

from torch import fx

from qcompile.frontend.graph import is_nonnegative, layer_names, layer_roles
from qcompile.pipeline import PRECISION, Pass, PassContext
from qcompile.quantization.recipes import activation_calibrator, resolve_overrides
from qcompile.quantization.spec import Calibrator, Granularity, Precision, QuantSpec, annotate


def weight_spec(precision: Precision) -> QuantSpec:
    """Per-output-channel symmetric weights with bound max|w|, or bf16."""
    if precision.is_float:
        return QuantSpec.bf16()
    return QuantSpec(precision.w_bits, True, Granularity.PER_CHANNEL, Calibrator.MAX)


def activation_spec(precision: Precision, signed: bool, calibrator: Calibrator) -> QuantSpec:
    """Per-tensor activations (an integer kernel cannot rescale per input channel after accumulating), signed
    ones over the full code range."""
    if precision.is_float:
        return QuantSpec.bf16()
    return QuantSpec(precision.a_bits, signed, Granularity.PER_TENSOR, calibrator, symmetric=False)


class AssignPrecision(Pass):
    name = "assign_precision"
    guarantees = frozenset({PRECISION})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        roles = layer_roles(gm)
        names = layer_names(gm)
        chosen = resolve_overrides(names.values(), ctx.overrides)
        memo: dict[fx.Node, bool] = {}
        for node, role in roles.items():
            choice = chosen.get(names[node])
            precision = (choice and choice.precision) or ctx.recipe.precision_for(role)
            calibrator = activation_calibrator(ctx.recipe, choice and choice.calibrator)
            src = node.args[0]
            signed = not (isinstance(src, fx.Node) and is_nonnegative(gm, src, memo))
            ann = annotate(node)
            ann.role = role
            ann.precision = precision
            ann.weight = weight_spec(precision)
            ann.input_act = activation_spec(precision, signed, calibrator)
        return gm
