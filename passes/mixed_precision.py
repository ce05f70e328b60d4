"""Mixed-precision search: measure each layer's sensitivity at each candidate width, then let an integer program
pick one width per layer under a cost budget (or the cheapest plan under a degradation bound). In the advanced
pipeline each lowered layer is AdaQuant-optimised before it is measured (Hubara et al.), so the plan prices a
layer by the error AdaQuant leaves.

The pass decides; it does not apply. Its plan becomes ordinary per-layer overrides (later ones win) and the
precision and cost it leaves are invalidated, so the pipeline runs assign_precision and annotate_cost after it
(see :mod:`qcompile.pipelines`), and every later pass, the cost report and the IR see the plan as they would see
``--set`` overrides. Layers the user
pinned with ``--set`` keep their precision; a module called at several sites gets one width for all of them.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from fractions import Fraction

from qcompile.passes._layerwise import calibration_batches
from torch import fx

from qcompile.errors import DegradationError, PipelineError, RecipeError
from qcompile.frontend.graph import compute_nodes, is_matmul, layer_names, module_of
from qcompile.pipeline import COST, PRECISION, QUANTIZERS, SHAPES, Pass, PassContext
from qcompile.quantization.cost import BF16_BITS, layer_cost
from qcompile.quantization.latency import LatencyProfile, layer_key
from qcompile.quantization.recipes import SUPPORTED_INT_BITS, Override, resolve_overrides
from qcompile.quantization.spec import Precision, get_annotation
from qcompile.search.bit_allocation import BUDGET_KINDS, Budget, Option, allocate
from qcompile.search.sensitivity import check_metric, sensitivities

DEFAULT_BITS = (4, 8)


class MixedPrecision(Pass):
    name = "mixed_precision"
    requires = frozenset({SHAPES, PRECISION, COST})
    invalidates = frozenset({PRECISION, COST})

    def __init__(self, budget: Budget | None = None, max_degradation: float | None = None,
                 bits: Sequence[int] = DEFAULT_BITS, metric: str = "kl", adaquant_iterations: int = 0,
                 adaquant_scope: str = "layer", profile: LatencyProfile | None = None) -> None:
        if (budget is None) == (max_degradation is None):
            both = ", not both" if budget is not None else ""
            raise RecipeError.with_parameters("mixed precision needs either a cost budget ({budget} linear=0.30) or a "
                                              "degradation bound ({max_degradation})" + both)
        if max_degradation is not None and not (math.isfinite(max_degradation) and max_degradation >= 0):
            raise DegradationError(max_degradation, "must be a finite number >= 0 (the allowed loss, e.g. 0.05)")
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
        self.profile = profile
        if budget is not None and budget.kind == "latency" and profile is None:
            raise RecipeError.with_parameters("a latency {budget} needs a latency profile "
                                              "({cost_model} measured:PROFILE)")

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
        keys = {names[n]: layer_key(module_of(gm, n), n) for n in compute_nodes(gm)}

        def cost(site: str, p: Precision) -> int:
            if field == "latency_ns":
                return self.profile.layer_ns(keys[site], p)  # type: ignore[union-attr]
            return getattr(layer_cost(site_costs[site].macs, site_costs[site].weights, p), field)

        costs = {u: {p: sum(cost(s, p) for s in sites) for p in choices[u]} for u, sites in units.items()}
        bf16 = {"linear": ctx.cost.macs * BF16_BITS, "quadratic": ctx.cost.macs * BF16_BITS ** 2,
                "memory_bits": ctx.cost.params * BF16_BITS, "latency_ns": ctx.cost.float_latency_ns}[field]
        # what no choice changes: a measured plan's time outside its layers; a modelled one's matrix products of
        # two tensors (at the residual width)
        fixed = self.profile.overhead_ns(quantized=True) if field == "latency_ns" else sum(  # type: ignore[union-attr]
            getattr(get_annotation(n).cost, field) for n in gm.graph.nodes if is_matmul(n))
        limit = self.budget.limit(bf16) - fixed if self.budget else None
        cheapest = sum(min(c.values()) for c in costs.values())
        if limit is not None and cheapest > limit:  # before measuring anything
            raise RecipeError(f"budget {self.budget} cannot be met: the cheapest plan costs "
                              f"{float(Fraction(cheapest + fixed, bf16)):.4f} of "
                              f"{'the float latency' if field == 'latency_ns' else 'bf16'} (widths "
                              f"{', '.join(str(p) for p in self.candidates)})")
        table, cache = sensitivities(gm, ctx, free, self.candidates, data, self.metric, self.adaquant_iterations,
                                     self.adaquant_scope)
        options = {u: [Option(p, c, table[u][str(p)] if u in free else 0.0) for p, c in costs[u].items()]
                   for u in units}
        plan = allocate(options, max_cost=limit, max_degradation=self.max_degradation)
        ctx.overrides = [*ctx.overrides, *(Override(glob.escape(s), plan[u].precision, "mixed-precision plan")
                                           for u, sites in units.items() for s in sites)]
        total = fixed + sum(o.cost for o in plan.values())
        ctx.results["mixed_precision"] = {
            "objective": f"least {self.metric} degradation with {self.budget}" if self.budget
            else f"least {field} cost with {self.metric} degradation <= {self.max_degradation}",
            "budget": str(self.budget) if self.budget else None,
            "budget_cost": None if limit is None else limit + fixed, "plan_cost": total,
            "plan_cost_vs_bf16": total / bf16,
            "max_degradation": self.max_degradation,
            "candidates": [str(p) for p in self.candidates],
            "predicted_degradation": sum(o.degradation for o in plan.values()),
            "plan": {s: str(plan[u].precision) for u, sites in units.items() for s in sites},
            "sensitivity": table, "pinned": sorted(pinned), **{f"sensitivity_{k}": v for k, v in cache.items()},
        }
        return gm
