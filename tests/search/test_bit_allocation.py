"""The integer program: exact budgets, the optimum on instances small enough to enumerate, and its errors."""

import itertools
from fractions import Fraction

import pytest

from qcompile.errors import RecipeError
from qcompile.quantization.spec import Precision
from qcompile.search.bit_allocation import Budget, Option, allocate, parse_budget

W4, W8 = Precision(4, 4), Precision(8, 8)


def instance():
    """Three layers: cost is MACs·bits, degradation differs per layer (a hand-checkable plan)."""
    return {
        "a": [Option(W4, 400, 0.50), Option(W8, 800, 0.01)],  # sensitive and cheap: worth 8 bits
        "b": [Option(W4, 1000, 0.05), Option(W8, 2000, 0.00)],  # robust and expensive: stays 4-bit
        "c": [Option(W4, 300, 0.20), Option(W8, 600, 0.02)],
    }


def brute_force(options, max_cost):
    best = None
    for combo in itertools.product(*options.values()):
        cost = sum(o.cost for o in combo)
        degr = sum(o.degradation for o in combo)
        if cost <= max_cost and (best is None or degr < best[0]):
            best = (degr, combo)
    return best


def test_hand_checked_plan():
    # all-4-bit costs 1,700; a at 8 bits adds 400 (saves 0.49), c adds 300 (saves 0.18)
    plan = allocate(instance(), max_cost=2099)  # only c fits
    assert {k: o.precision for k, o in plan.items()} == {"a": W4, "b": W4, "c": W8}
    plan = allocate(instance(), max_cost=2100)  # a fits and is worth more than c
    assert {k: o.precision for k, o in plan.items()} == {"a": W8, "b": W4, "c": W4}
    # 2,400 lets c up too (1,700 + 400 + 300); b at 8 bits (+1,000) never pays at that budget
    plan = allocate(instance(), max_cost=2400)
    assert {k: o.precision for k, o in plan.items()} == {"a": W8, "b": W4, "c": W8}


@pytest.mark.parametrize("max_cost", [1700, 1999, 2000, 2399, 2400, 3000, 3399, 3400])
def test_budget_is_respected_exactly_and_plan_is_optimal(max_cost):
    options = instance()
    plan = allocate(options, max_cost=max_cost)
    assert sum(o.cost for o in plan.values()) <= max_cost
    best, _ = brute_force(options, max_cost)
    assert sum(o.degradation for o in plan.values()) == pytest.approx(best)


def test_large_costs_stay_within_an_integer_budget():
    """Costs of real size (1e8 MACs·bits): the solver's tolerance must not let a plan over by a few units."""
    options = {f"l{i}": [Option(W4, 10**8 + 7 * i, 1.0 / (i + 1)), Option(W8, 2 * 10**8 + 14 * i, 0.0)] for i in range(12)}
    cheapest = sum(o[0].cost for o in options.values())
    for extra in (1, 10**8 + 69, 3 * 10**8 + 100):
        plan = allocate(options, max_cost=cheapest + extra)
        assert sum(o.cost for o in plan.values()) <= cheapest + extra


def test_least_cost_under_a_degradation_bound():
    plan = allocate(instance(), max_degradation=0.30)
    # all 4-bit loses 0.75; a at 8 bits brings it to 0.26 at cost 2,100 — the cheapest plan under 0.30
    assert {k: o.precision for k, o in plan.items()} == {"a": W8, "b": W4, "c": W4}


def test_impossible_budget_is_a_user_error():
    with pytest.raises(RecipeError, match="cheapest plan costs 1,700"):
        allocate(instance(), max_cost=1699)


def test_parse_budget():
    b = parse_budget("linear=0.30")
    assert b == Budget("linear", Fraction(3, 10)) and str(b) == "linear=0.3"
    assert b.limit(1000) == 300 and b.limit(1001) == 300
    assert parse_budget("memory=0.5").kind == "memory"
    for bad in ("linear", "speed=0.3", "linear=abc", "linear=0", "linear=1.5"):
        with pytest.raises(RecipeError):
            parse_budget(bad)
