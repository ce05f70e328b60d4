"""The mixed-precision pass: measured sensitivities, an optimal plan within the budget, and the on-disk cache."""

import itertools

import pytest
import torch
from qcompile.passes import AnnotateCost, AssignPrecision
from qcompile.passes.mixed_precision import MixedPrecision

from qcompile import Pipeline, get_recipe
from qcompile.errors import RecipeError
from qcompile.frontend.graph import compute_nodes, layer_names
from qcompile.quantization.cost import BF16_BITS, layer_cost
from qcompile.quantization.recipes import parse_set
from qcompile.quantization.spec import Precision, get_annotation
from qcompile.search import sensitivity
from qcompile.search.bit_allocation import parse_budget
from tests.passes.ptq_helpers import batches

W4, W8 = Precision(4, 4), Precision(8, 8)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def search(model, data, budget, overrides=(), metric="kl", adaquant_iterations=0, adaquant_scope="layer"):
    passes = [AssignPrecision(), AnnotateCost(),
              MixedPrecision(parse_budget(budget), metric=metric, adaquant_iterations=adaquant_iterations,
                             adaquant_scope=adaquant_scope),
              AssignPrecision(), AnnotateCost()]  # the pass decides the plan; these two apply it
    with torch.no_grad():
        return Pipeline(passes).run(model, data[0][0][:1], recipe=get_recipe("auto"), calibration_data=data,
                                    overrides=parse_set(overrides))


def test_plan_is_the_best_within_the_budget_and_is_annotated(tiny):
    data = batches()
    result = search(tiny, data, "linear=0.4")
    gm, ctx = result.graph_module, result.context
    mp = ctx.results["mixed_precision"]
    names = layer_names(gm)
    nodes = compute_nodes(gm)
    bf16 = ctx.cost.macs * BF16_BITS
    assert ctx.cost.linear <= 0.4 * bf16 and mp["plan_cost"] == ctx.cost.linear  # the annotated graph is the plan
    for n in nodes:
        assert str(get_annotation(n).precision) == mp["plan"][names[n]]
    # enumerate every plan: none within the budget has a smaller predicted degradation
    best = None
    for combo in itertools.product((W4, W8), repeat=len(nodes)):
        cost = sum(layer_cost(get_annotation(n).cost.macs, 0, p).linear for n, p in zip(nodes, combo))
        loss = sum(mp["sensitivity"][names[n]][str(p)] for n, p in zip(nodes, combo))
        if cost <= 0.4 * bf16 and (best is None or loss < best):
            best = loss
    assert mp["predicted_degradation"] == pytest.approx(best)
    assert mp["sensitivity_measured"] == 3 and mp["sensitivity_reused"] == 0  # w8a8 is the reference: 0
    assert all(v["w8a8"] == 0.0 and v["w4a4"] > -1e-3 for v in mp["sensitivity"].values())  # 4 bits hurt


def test_second_budget_reuses_cached_sensitivities(tiny, cache, monkeypatch):
    data = batches()
    first = search(tiny, data, "linear=0.4").context.results["mixed_precision"]
    assert len(list((cache / "sensitivity").glob("*.json"))) == 1

    def must_not_measure(*args, **kwargs):
        raise AssertionError("sensitivity re-measured although cached")

    monkeypatch.setattr(sensitivity, "measure_one", must_not_measure)
    second = search(tiny, data, "linear=0.3").context.results["mixed_precision"]
    assert second["sensitivity_measured"] == 0 and second["sensitivity_reused"] == 3
    assert second["sensitivity"] == first["sensitivity"] and second["plan_cost_vs_bf16"] <= 0.3
    with pytest.raises(AssertionError, match="re-measured"):  # other calibration data is another key
        search(tiny, batches(seed=7), "linear=0.3")
    with pytest.raises(AssertionError, match="re-measured"):  # and so is another metric
        search(tiny, data, "linear=0.3", metric="loss")


@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_entries_are_the_metric_of_the_one_layer_plan_against_the_all_widest_plan(tiny, metric):
    data = batches()
    result = search(tiny, data, "linear=0.4", metric=metric)
    mp = result.context.results["mixed_precision"]
    assert mp["sensitivity_metric"] == metric and mp["objective"] == f"least {metric} degradation with linear=0.4"
    reference = sensitivity.measure_one(result.graph_module, result.context, [], W8, data, W8)
    assert mp["sensitivity_reference_loss"] == pytest.approx(sensitivity.calibration_loss(reference, data))
    for layer, entry in mp["sensitivity"].items():
        lowered = sensitivity.measure_one(result.graph_module, result.context, [layer], W4, data, W8)
        assert entry["w8a8"] == 0.0
        assert entry["w4a4"] == pytest.approx(sensitivity.degradation(metric, reference, lowered, data), abs=1e-6)


def test_pinned_layers_keep_their_precision(tiny):
    data = batches()
    mp = search(tiny, data, "linear=0.5", overrides=["head=w8a8", "stem=4"]).context.results["mixed_precision"]
    assert mp["plan"]["head"] == "w8a8" and mp["plan"]["stem"] == "w4a4" and mp["pinned"] == ["head", "stem"]
    assert set(mp["sensitivity"]) == {"body"}


def test_budget_below_the_cheapest_plan_is_a_user_error(tiny):
    with pytest.raises(RecipeError, match=r"budget linear=0.2 cannot be met: .*0.2500 of bf16"):
        search(tiny, batches(), "linear=0.2")


class Attending(torch.nn.Module):
    """Two convs with attention over their 64 positions between them: products no width choice changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        t = self.conv(x).flatten(2)
        y = (torch.softmax(t.transpose(1, 2) @ t, dim=-1) @ t.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.conv2(y.reshape(x.shape[0], 4, 8, 8))).mean((2, 3)))


def test_a_plan_pays_for_the_products_of_two_tensors_at_the_residual_width():
    torch.manual_seed(0)
    result = search(Attending().eval(), batches(), "linear=0.45")
    ctx, mp = result.context, result.context.results["mixed_precision"]
    products = 2 * 64 * 64 * 4 * 8  # two products of 64·64·4 MACs, 8-bit operands
    layers = sum(get_annotation(n).cost.linear for n in compute_nodes(result.graph_module))
    assert mp["plan_cost"] == ctx.cost.linear == layers + products <= 0.45 * ctx.cost.macs * BF16_BITS
    # every layer at 4 bits still pays for the products: (4 · 19,240 + 8 · 32,768) / (16 · 52,008)
    with pytest.raises(RecipeError, match=r"budget linear=0.3 cannot be met: the cheapest plan costs 0.4075 of bf16"):
        search(Attending().eval(), batches(), "linear=0.3")


def test_advanced_search_measures_each_layer_after_adaquant(tiny, monkeypatch):
    data = batches()
    plain = search(tiny, data, "linear=0.4").context.results["mixed_precision"]
    measured = []
    real = sensitivity.measure_one

    def spy(gm, ctx, sites, precision, batches_, reference, adaquant_iterations=0, adaquant_scope="layer"):
        measured.append((tuple(sites), adaquant_iterations, adaquant_scope))
        return real(gm, ctx, sites, precision, batches_, reference, adaquant_iterations, adaquant_scope)

    monkeypatch.setattr(sensitivity, "measure_one", spy)
    tuned = search(tiny, data, "linear=0.4", adaquant_iterations=30).context.results["mixed_precision"]
    assert tuned["sensitivity_measured"] == 3  # another cache entry, not the plain one
    assert sorted(measured) == sorted([((), 0, "layer"), *(((s,), 30, "layer") for s in plain["sensitivity"])])
    assert tuned["sensitivity_adaquant_iterations"] == 30
    assert tuned["sensitivity"] != plain["sensitivity"]
    assert all(v["w4a4"] >= 0 for v in tuned["sensitivity"].values())
    measured.clear()
    block = search(tiny, data, "linear=0.4", adaquant_iterations=30, adaquant_scope="block")
    block = block.context.results["mixed_precision"]
    assert block["sensitivity_measured"] == 3 and block["sensitivity_adaquant_scope"] == "block"  # its own entry
    assert sorted(measured) == sorted([((), 0, "layer"), *(((s,), 30, "block") for s in plain["sensitivity"])])
