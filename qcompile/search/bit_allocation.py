"""Choose one bit width per layer with an integer program (Hubara et al., sec. 4), solved by HiGHS.

Each layer has options (a precision, its integer cost, its measured degradation); exactly one is picked per
layer, minimising total degradation under a cost budget, or total cost under a degradation bound. Costs are
integers (MACs · bits, weights · bits), so a budget is checked exactly after solving: a plan the solver's
tolerances let slip over is re-solved against a tightened bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from qcompile.errors import BudgetError, QCompileError, RecipeError
from qcompile.quantization.spec import Precision

BUDGET_KINDS = {"linear": "linear", "quadratic": "quadratic", "memory": "memory_bits",  # kind → LayerCost field
                "latency": "latency_ns"}  # measured: needs a latency profile


@dataclass(frozen=True)
class Budget:
    """A cost budget as a fraction of the bf16 model's cost: ``linear=0.30`` (``latency=0.7``: of the float
    model's latency in a measured profile)."""

    kind: str
    ratio: Fraction

    def __str__(self) -> str:
        return f"{self.kind}={float(self.ratio):g}"

    def limit(self, bf16_cost: int) -> int:
        """The largest integer cost within the budget (exact: the ratio is kept as a fraction)."""
        return math.floor(self.ratio * bf16_cost)


def parse_budget(text: str) -> Budget:
    """``KIND=RATIO`` with KIND linear, quadratic, memory or latency and RATIO in (0, 1]; a latency may exceed 1
    (a CPU without 4-bit kernels can run a small model's integer form slower than its float one)."""
    kind, sep, value = text.partition("=")
    kind = kind.strip().lower()
    if not sep or kind not in BUDGET_KINDS:
        raise BudgetError(text, f"expected KIND=RATIO with KIND one of {', '.join(BUDGET_KINDS)}, e.g. linear=0.30")
    try:
        ratio = Fraction(value.strip())
    except (ValueError, ZeroDivisionError):
        raise BudgetError(text, f"{value.strip()!r} is not a number") from None
    if kind == "latency" and not ratio > 0:
        raise BudgetError(text, "the ratio to the float model's latency must be positive")
    if kind != "latency" and not 0 < ratio <= 1:
        raise BudgetError(text, "the ratio to the bf16 cost must be in (0, 1]")
    return Budget(kind, ratio)


@dataclass(frozen=True)
class Option:
    """One choice for one layer."""

    precision: Precision
    cost: int
    degradation: float


def allocate(options: Mapping[str, Sequence[Option]], max_cost: int | None = None,
             max_degradation: float | None = None) -> dict[str, Option]:
    """The optimal choice per layer: least degradation with cost <= ``max_cost``, or least cost with
    degradation <= ``max_degradation`` (exactly one of the two)."""
    if (max_cost is None) == (max_degradation is None):
        raise ValueError("give exactly one of max_cost and max_degradation")
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise QCompileError("mixed precision needs scipy's MILP solver: pip install 'qcompile[ptq]'") from None
    layers = list(options)
    flat = [(layer, o) for layer in layers for o in options[layer]]
    if not layers or any(not options[layer] for layer in layers):
        raise ValueError("every layer needs at least one option")
    cost = np.array([o.cost for _, o in flat], dtype=np.float64)
    degr = np.array([o.degradation for _, o in flat], dtype=np.float64)
    one_each = np.array([[1.0 if owner == layer else 0.0 for owner, _ in flat] for layer in layers])
    cheapest = sum(min(o.cost for o in options[layer]) for layer in layers)
    if max_cost is not None and cheapest > max_cost:
        raise RecipeError(f"the cost budget {max_cost:,} cannot be met: the cheapest plan costs {cheapest:,}")
    scale = float(max(cost.max(), 1.0)) * len(layers)
    bound = float(max_cost if max_cost is not None else max_degradation)
    for _ in range(8):
        if max_cost is not None:
            objective, row, rhs = degr, cost / scale, bound / scale
        else:
            objective, row, rhs = cost / scale, degr, bound
        res = milp(objective, integrality=np.ones(len(flat)), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(row[None, :], -np.inf, rhs)])
        if res.x is None:
            raise RecipeError(f"no bit-width plan meets the degradation bound {max_degradation} "
                              f"(the least achievable is {sum(min(o.degradation for o in options[k]) for k in layers):.4g})")
        picked = {layer: o for (layer, o), x in zip(flat, res.x) if x > 0.5}
        total = sum(o.cost for o in picked.values())
        if max_cost is None or total <= max_cost:
            return picked
        bound -= total - max_cost  # the solver's tolerance let the plan over the budget: tighten and solve again
    raise RecipeError(f"the integer program did not find a plan within the cost budget {max_cost:,}")
