"""Mixed-precision search: measure each layer's sensitivity at each candidate width, then let an integer program
pick one width per layer under a cost budget (or the cheapest plan under a degradation bound). In the advanced
pipeline each lowered layer is AdaQuant-optimised before it is measured (Hubara et al.), so the plan prices a
layer by the error AdaQuant leaves.

The plan becomes ordinary per-layer overrides (later ones win), and assign_precision and annotate_cost run again,
so every later pass, the cost report and the IR see it as they would see ``--set`` overrides. Layers the user
pinned with ``--set`` keep their precision; a module called at several sites gets one width for all of them.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from fractions import Fraction

from torch import fx

from qcompile.search.bit_allocation import BUDGET_KINDS, Budget, Option, allocate
from qcompile.quantization.cost import BF16_BITS, layer_cost
from qcompile.errors import PipelineError, RecipeError
from qcompile.frontend.graph import compute_nodes, layer_names
from qcompile.pipeline import COST, PRECISION, QUANTIZERS, SHAPES, Pass, PassContext
from qcompile.passes._layerwise import calibration_batches
from qcompile.passes.annotate_cost import AnnotateCost
from qcompile.passes.assign_precision import AssignPrecision
from qcompile.quantization.recipes import SUPPORTED_INT_BITS, Override, resolve_overrides
from qcompile.search.sensitivity import check_metric, sensitivities
from qcompile.quantization.spec import Precision, get_annotation

DEFAULT_BITS = (4, 8)


class MixedPrecision(Pass):
    name = "mixed_precision"
    requires = frozenset({SHAPES, PRECISION, COST})
    guarantees = frozenset({PRECISION, COST})

    def __init__(self, budget: Budget | None = None, max_degradation: float | None = None,
                 bits: Sequence[int] = DEFAULT_BITS, metric: str = "kl", adaquant_iterations: int = 0,
                 adaquant_scope: str = "layer") -> None:
        if (budget is None) == (max_degradation is None):
            raise RecipeError("mixed precision needs either a cost budget (--budget linear=0.30) or a degradation "
                              "bound (--max-degradation), not both")
        bad = [b for b in bits if b not in SUPPORTED_INT_BITS]
        if bad or not bits:
            raise RecipeError(f"candidate bit widths must be in {SUPPORTED_INT_BITS.start}..{SUPPORTED_INT_BITS.stop - 1}, "
                              f"got {', '.join(map(str, bits)) or 'none'}")
        self.budget = budget
        self.max_degradation = max_degradation
        check_metric(metric)
        self.candidates = [Precision(b, b) for b in sorted(set(bits))]
        self.metric = metric
        self.adaquant_iterations = adaquant_iterations
        self.adaquant_scope = adaquant_scope

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if QUANTIZERS in ctx.properties:
            raise PipelineError("mixed_precision must run before insert_quantizers: it measures the float graph")
        assert ctx.cost is not None
        data = calibration_batches(ctx, "mixed_precision")
        names = layer_names(gm)
        units: dict[str, list[str]] = {}
        for node in compute_nodes(gm):
            units.setdefault(str(node.target), []).append(names[node])
        pinned = {n: c.precision for n, c in resolve_overrides(names.values(), ctx.overrides).items() if c.precision}
        free = {u: sites for u, sites in units.items() if not any(s in pinned for s in sites)}
        field = BUDGET_KINDS[self.budget.kind] if self.budget else "linear"
        site_costs = {names[n]: get_annotation(n).cost for n in compute_nodes(gm)}  # type: ignore[union-attr]
        choices = {u: [pinned[sites[0]]] if u not in free else self.candidates for u, sites in units.items()}
        costs = {u: {p: sum(getattr(layer_cost(site_costs[s].macs, site_costs[s].weights, p), field) for s in sites)
                     for p in choices[u]} for u, sites in units.items()}
        bf16 = {"linear": ctx.cost.macs * BF16_BITS, "quadratic": ctx.cost.macs * BF16_BITS ** 2,
                "memory_bits": ctx.cost.params * BF16_BITS}[field]
        limit = self.budget.limit(bf16) if self.budget else None
        cheapest = sum(min(c.values()) for c in costs.values())
        if limit is not None and cheapest > limit:  # before measuring anything
            raise RecipeError(f"budget {self.budget} cannot be met: the cheapest plan costs "
                              f"{float(Fraction(cheapest, bf16)):.4f} of bf16 (widths "
                              f"{', '.join(str(p) for p in self.candidates)})")
        table, cache = sensitivities(gm, ctx, free, self.candidates, data, self.metric, self.adaquant_iterations,
                                     self.adaquant_scope)
        options = {u: [Option(p, c, table[u][str(p)] if u in free else 0.0) for p, c in costs[u].items()]
                   for u in units}
        plan = allocate(options, max_cost=limit, max_degradation=self.max_degradation)
        ctx.overrides = [*ctx.overrides, *(Override(glob.escape(s), plan[u].precision, "mixed-precision plan")
                                           for u, sites in units.items() for s in sites)]
        AssignPrecision().run(gm, ctx)
        AnnotateCost().run(gm, ctx)
        total = sum(o.cost for o in plan.values())
        ctx.results["mixed_precision"] = {
            "objective": f"least {self.metric} degradation with {self.budget}" if self.budget
            else f"least {field} cost with {self.metric} degradation <= {self.max_degradation}",
            "budget": str(self.budget) if self.budget else None,
            "budget_cost": limit, "plan_cost": total, "plan_cost_vs_bf16": total / bf16,
            "max_degradation": self.max_degradation,
            "candidates": [str(p) for p in self.candidates],
            "predicted_degradation": sum(o.degradation for o in plan.values()),
            "plan": {s: str(plan[u].precision) for u, sites in units.items() for s in sites},
            "sensitivity": table, "pinned": sorted(pinned), **{f"sensitivity_{k}": v for k, v in cache.items()},
        }
        return gm
