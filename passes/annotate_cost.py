"""Annotate each compute layer with its MACs and its linear, quadratic and memory cost; total them.

A module called at several sites costs MACs at every site but stores its weights once (at the widest
precision any site asks for), so memory counts it at its first site only.
"""

from __future__ import annotations

from torch import fx

from qcompile.quantization.cost import CostTotals, layer_cost, layer_macs, weight_count
from qcompile.frontend.graph import compute_nodes, module_of
from qcompile.pipeline import COST, PRECISION, SHAPES, Pass, PassContext
from qcompile.quantization.spec import get_annotation


class AnnotateCost(Pass):
    name = "annotate_cost"
    requires = frozenset({SHAPES, PRECISION})
    guarantees = frozenset({COST})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = compute_nodes(gm)
        widest: dict[str, int] = {}
        for n in nodes:
            ann = get_annotation(n)
            assert ann is not None and ann.precision is not None
            widest[str(n.target)] = max(widest.get(str(n.target), 0), ann.precision.w_bits)
        stored: set[str] = set()
        for n in nodes:
            ann = get_annotation(n)
            assert ann is not None and ann.precision is not None
            first_site = str(n.target) not in stored
            stored.add(str(n.target))
            weights = weight_count(module_of(gm, n)) if first_site else 0
            ann.cost = layer_cost(layer_macs(module_of(gm, n), n), weights, ann.precision, widest[str(n.target)])
        costs = [get_annotation(n).cost for n in nodes]  # type: ignore[union-attr]
        macs = sum(c.macs for c in costs)  # type: ignore[union-attr]
        params = sum(c.weights for c in costs)  # type: ignore[union-attr]
        ref = ctx.width_reference
        ctx.cost = CostTotals(
            macs=macs,
            params=params,
            linear=sum(c.linear for c in costs),  # type: ignore[union-attr]
            quadratic=sum(c.quadratic for c in costs),  # type: ignore[union-attr]
            memory_bits=sum(c.memory_bits for c in costs),  # type: ignore[union-attr]
            ref_macs=ref.macs if ref else macs,
            ref_params=ref.params if ref else params,
        )
        return gm
