"""The measured cost model: layer keys, the profile file, predicted latency totals and a latency budget."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from qcompile.passes import AnnotateCost, AssignPrecision
from qcompile.passes.mixed_precision import MixedPrecision

from qcompile import Pipeline, get_recipe
from qcompile.errors import RecipeError
from qcompile.frontend.graph import compute_nodes, layer_names, module_of
from qcompile.quantization.latency import LatencyProfile, ProfileError, layer_key, precision_key
from qcompile.quantization.spec import BF16, Precision
from qcompile.search.bit_allocation import parse_budget
from tests.passes.ptq_helpers import batches

W4, W8 = Precision(4, 4), Precision(8, 8)


def keys_of(tiny) -> dict[str, str]:
    gm = Pipeline([AssignPrecision()]).run(tiny, torch.randn(1, 3, 8, 8), recipe=get_recipe("int8")).graph_module
    names = layer_names(gm)
    return {names[n]: layer_key(module_of(gm, n), n) for n in compute_nodes(gm)}


def test_layer_keys_name_the_shape_without_the_batch(tiny) -> None:
    assert keys_of(tiny) == {"stem": "conv2d 3>8 k3x3 s1x1 p1x1 d1x1 g1 @3x8x8",
                             "body": "conv2d 8>8 k3x3 s1x1 p1x1 d1x1 g1 @8x8x8",
                             "head": "dense 8>5 @8"}
    assert precision_key(BF16) == "float" and precision_key(W4) == "w4a4"


def toy_profile(tiny) -> LatencyProfile:
    """Float 1.0 ms per layer, w8a8 0.5 ms, w4a4 0.4 ms (the head 0.45); overhead 0.1 float, 0.2 quantized."""
    profile = LatencyProfile(overhead={"float": 0.1, "quantized": 0.2}, meta={"model": "tiny"})
    for name, key in keys_of(tiny).items():
        profile.add(key, "float", [1.0])
        profile.add(key, "w8a8", [0.5, 0.6, 0.4])  # the mean of the layers of that shape
        profile.add(key, "w4a4", [0.45 if name == "head" else 0.4])
    return profile


def test_profile_round_trips_and_rejects_what_it_cannot_read(tiny, tmp_path) -> None:
    profile = toy_profile(tiny)
    profile.save(tmp_path / "p.json")
    loaded = LatencyProfile.load(tmp_path / "p.json")
    assert loaded.entries == profile.entries and loaded.overhead == profile.overhead and loaded.meta == profile.meta
    bad = {"not json": "{", "another format": json.dumps({"format": "x", "version": 1}),
           "no numbers": json.dumps({"format": "qcompile-latency-profile", "version": 1, "overhead_ms": {},
                                     "layers_ms": {"k": {"w8a8": "fast"}}})}
    for text in bad.values():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ProfileError):
            LatencyProfile.load(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="no entry for conv2d 3>8 .* at w2a2"):
        profile.layer_ns(keys_of(tiny)["stem"], Precision(2, 2))


def test_annotate_cost_predicts_the_latency_of_the_plan(tiny) -> None:
    profile = toy_profile(tiny)
    ctx = Pipeline([AssignPrecision(), AnnotateCost(profile)]).run(
        tiny, torch.randn(1, 3, 8, 8), recipe=get_recipe("mostly4bit")).context
    # mostly4bit: stem and head 8-bit, body 4-bit; overhead 0.2 ms quantized, 0.1 ms float
    assert ctx.cost.latency_ns == 200_000 + 500_000 + 400_000 + 500_000
    assert ctx.cost.float_latency_ns == 100_000 + 3 * 1_000_000
    totals = ctx.cost.as_dict()
    assert totals["predicted_latency_ms"] == 1.6 and totals["latency_vs_float"] == pytest.approx(1.6 / 3.1)


def plan_for(tiny, ratio: str, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    profile, data = toy_profile(tiny), batches()
    passes = [AssignPrecision(), AnnotateCost(profile),
              MixedPrecision(parse_budget(f"latency={ratio}"), profile=profile), AssignPrecision(), AnnotateCost(profile)]
    with torch.no_grad():
        return Pipeline(passes).run(tiny, data[0][0][:1], recipe=get_recipe("auto"), calibration_data=data).context


@pytest.mark.parametrize(("ratio", "expected"), [
    ("0.55", {"stem": "w8a8", "body": "w8a8", "head": "w8a8"}),  # 1.7 ms of 3.1 fits: the least degradation
    ("0.5", None),  # 1.55 ms: one 8-bit layer at most
    ("0.47", {"stem": "w4a4", "body": "w4a4", "head": "w4a4"}),  # 1.457 ms: only the all-4-bit plan (1.45) fits
])
def test_a_latency_budget_is_met_exactly(tiny, tmp_path, monkeypatch, ratio, expected) -> None:
    ctx = plan_for(tiny, ratio, tmp_path, monkeypatch)
    plan = ctx.results["mixed_precision"]
    assert ctx.cost.latency_ns <= Fraction(ratio) * ctx.cost.float_latency_ns
    assert plan["plan_cost"] == ctx.cost.latency_ns and plan["plan_cost_vs_bf16"] == ctx.cost.vs_bf16("latency")
    assert expected is None or plan["plan"] == expected
    assert sum(p == "w8a8" for p in plan["plan"].values()) <= (3 if ratio == "0.55" else 1)


def test_a_latency_budget_below_the_cheapest_plan_is_refused(tiny, tmp_path, monkeypatch) -> None:
    with pytest.raises(RecipeError, match="latency=0.46 cannot be met: the cheapest plan costs 0.4677 of the float"):
        plan_for(tiny, "0.46", tmp_path, monkeypatch)


def test_a_latency_budget_without_a_profile_is_refused() -> None:
    with pytest.raises(RecipeError, match="latency budget needs a latency profile"):
        MixedPrecision(parse_budget("latency=0.5"))
