"""Annotate each compute layer with its MACs and its linear, quadratic and memory cost; total them.

A module called at several sites costs MACs at every site but stores its weights once (at the widest
precision any site asks for), so memory counts it at its first site only. With a latency profile (the measured
cost model, :mod:`qcompile.quantization.latency`) every site also gets its predicted time, and the totals the
model's predicted latency beside the float model's.

A matrix product of two tensors (attention over positions) is annotated too, with its precision (both operands
at the recipe's residual width, as ``insert_quantizers`` quantizes them; bf16 in a float model) and its cost,
which the totals include; a latency profile has no entries for products (it counts their time as the profiled
model's time outside its layers).
"""

from __future__ import annotations

from torch import fx

from qcompile.frontend.graph import compute_nodes, is_matmul, module_of
from qcompile.pipeline import COST, PRECISION, SHAPES, Pass, PassContext
from qcompile.quantization.cost import CostTotals, layer_cost, layer_macs, product_macs, weight_count
from qcompile.quantization.latency import LatencyProfile, layer_key
from qcompile.quantization.spec import BF16, Precision, annotate, get_annotation


class AnnotateCost(Pass):
    name = "annotate_cost"
    requires = frozenset({SHAPES, PRECISION})
    guarantees = frozenset({COST})

    def __init__(self, profile: LatencyProfile | None = None) -> None:
        self.profile = profile

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = compute_nodes(gm)
        widest: dict[str, int] = {}
        for n in nodes:
            ann = get_annotation(n)
            assert ann is not None and ann.precision is not None
            widest[str(n.target)] = max(widest.get(str(n.target), 0), ann.precision.w_bits)
        stored: set[str] = set()
        float_ns = 0
        for n in nodes:
            ann = get_annotation(n)
            assert ann is not None and ann.precision is not None
            first_site = str(n.target) not in stored
            stored.add(str(n.target))
            module = module_of(gm, n)
            weights = weight_count(module) if first_site else 0
            latency = None
            if self.profile is not None:
                key = layer_key(module, n)
                latency = self.profile.layer_ns(key, ann.precision)
                float_ns += self.profile.layer_ns(key, BF16)
            ann.cost = layer_cost(layer_macs(module, n), weights, ann.precision, widest[str(n.target)], latency)
        layer_costs = [get_annotation(n).cost for n in nodes]  # type: ignore[union-attr]
        quantized = any(not get_annotation(n).precision.is_float for n in nodes)  # type: ignore[union-attr]
        operands = Precision(ctx.recipe.residual_bits, ctx.recipe.residual_bits) if quantized else BF16
        product_costs = []
        for n in filter(is_matmul, gm.graph.nodes):
            ann = annotate(n)
            ann.precision, ann.cost = operands, layer_cost(product_macs(n), 0, operands)
            product_costs.append(ann.cost)
        costs = [*layer_costs, *product_costs]
        macs = sum(c.macs for c in costs)  # type: ignore[union-attr]
        params = sum(c.weights for c in costs)  # type: ignore[union-attr]
        ref = ctx.width_reference
        latency_ns = float_latency_ns = None
        if self.profile is not None:
            latency_ns = self.profile.overhead_ns(quantized) + sum(c.latency_ns for c in layer_costs)  # type: ignore
            float_latency_ns = self.profile.overhead_ns(False) + float_ns
        ctx.cost = CostTotals(
            macs=macs,
            params=params,
            linear=sum(c.linear for c in costs),  # type: ignore[union-attr]
            quadratic=sum(c.quadratic for c in costs),  # type: ignore[union-attr]
            memory_bits=sum(c.memory_bits for c in costs),  # type: ignore[union-attr]
            ref_macs=ref.macs if ref else macs,
            ref_params=ref.params if ref else params,
            latency_ns=latency_ns,
            float_latency_ns=float_latency_ns,
        )
        return gm
