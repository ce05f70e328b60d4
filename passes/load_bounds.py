"""Set activation quantizers' bounds from another graph's frozen quantizers instead of calibrating.

Quantization-aware training learns its activation bounds on a graph that still has its BatchNorms; the model
it deploys is the folded one. Folding erases a BN node and hands its users to the conv before it, so a
quantizer is identified by the tensor it reads with a foldable BN seen through to its conv, plus its spec.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from qcompile.passes.insert_quantizers import activation_quantizer_calls
from torch import fx

from qcompile.errors import PipelineError
from qcompile.frontend.graph import is_compute, module_of
from qcompile.passes.norm_layers import BATCH_NORMS
from qcompile.pipeline import CALIBRATED, QUANTIZERS, Pass, PassContext
from qcompile.quantization.quantizer import ActivationQuantizer, QuantizerState
from qcompile.quantization.spec import QuantSpec


BoundKey = tuple[str, QuantSpec]


def bound_key(gm: fx.GraphModule, node: fx.Node) -> BoundKey:
    """``(source tensor, spec)`` of the quantizer called at ``node``, a foldable BN's output named after its conv,
    and a quantizer chained to requantize another's codes (a value read at 8 and at 4 bits) after that one's key:
    the quantizer it reads is named after the BN in the trained graph and after the conv in the folded one."""
    q = module_of(gm, node)
    assert isinstance(q, ActivationQuantizer)
    src = node.args[0]
    assert isinstance(src, fx.Node)
    if isinstance(module_of(gm, src), ActivationQuantizer):
        inner, spec = bound_key(gm, src)
        return f"{inner} as {spec.describe()}", q.spec
    if isinstance(module_of(gm, src), BATCH_NORMS) and isinstance(src.args[0], fx.Node):
        conv = src.args[0]
        if is_compute(gm, conv) and len(conv.users) == 1:
            src = conv
    return src.name, q.spec


def activation_bounds(gm: fx.GraphModule) -> dict[BoundKey, torch.Tensor]:
    """Every frozen activation quantizer's scale, by :func:`bound_key`; an unfrozen one is an error."""
    out = {}
    for node, q in activation_quantizer_calls(gm):
        if q.state is not QuantizerState.FROZEN:
            raise PipelineError(f"activation quantizer {node.target} was never frozen; train past the observe phase")
        out[bound_key(gm, node)] = q.scale.detach().clone()
    return out


class LoadBounds(Pass):
    name = "load_bounds"
    requires = frozenset({QUANTIZERS})
    guarantees = frozenset({CALIBRATED})

    def __init__(self, bounds: Mapping[BoundKey, torch.Tensor]) -> None:
        self.bounds = dict(bounds)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for node, q in activation_quantizer_calls(gm):
            key = bound_key(gm, node)
            if key not in self.bounds:
                raise PipelineError(f"load_bounds: no trained bound for {node.target} (reads {key[0]}, "
                                    f"{key[1].describe()}); was the source graph quantized with the same recipe?")
            q.scale.copy_(self.bounds[key].to(q.scale))
            q.state = QuantizerState.FROZEN
        return gm
