import pytest
import torch
from qcompile.passes import AssignPrecision, FoldBatchNorm

from qcompile import Pipeline, get_annotation, get_recipe
from qcompile.errors import RecipeError
from qcompile.frontend.graph import compute_nodes, layer_names
from qcompile.models import resnet18
from qcompile.quantization.recipes import parse_set
from qcompile.quantization.spec import Granularity, LayerRole, Precision


def _plan(model, shape, recipe, sets=()):
    res = Pipeline([FoldBatchNorm(), AssignPrecision()]).run(
        model.eval(), torch.randn(shape), recipe=get_recipe(recipe), overrides=parse_set(sets))
    gm = res.graph_module
    names = layer_names(gm)
    return {names[n]: get_annotation(n) for n in compute_nodes(gm)}


def test_mostly4bit_first_and_last_found_from_the_graph(tiny):
    plan = _plan(tiny, (1, 3, 8, 8), "mostly4bit")  # layers named stem/body/head, not conv1/fc
    assert plan["stem"].role == {LayerRole.FIRST} and plan["head"].role == {LayerRole.LAST}
    assert plan["stem"].precision == Precision(8, 8) and plan["head"].precision == Precision(8, 8)
    assert plan["body"].precision == Precision(4, 4)


def test_signedness_is_inferred(tiny):
    plan = _plan(tiny, (1, 3, 8, 8), "int8")
    assert plan["stem"].input_act.signed  # the image
    assert not plan["body"].input_act.signed and plan["body"].input_act.qmax == 255  # ReLU output
    assert not plan["head"].input_act.signed  # pooled ReLU output
    assert plan["body"].weight.granularity is Granularity.PER_CHANNEL and plan["body"].weight.signed


def test_resnet18_mostly4bit_and_overrides():
    plan = _plan(resnet18(stem="cifar"), (1, 3, 32, 32), "mostly4bit", ["layer4.*=8", "layer1.0.conv1=bf16"])
    assert plan["conv1"].precision == Precision(8, 8) and plan["fc"].precision == Precision(8, 8)
    assert plan["layer2.0.conv1"].precision == Precision(4, 4)
    assert plan["layer4.1.conv2"].precision == Precision(8, 8)
    assert plan["layer1.0.conv1"].precision.is_float and not plan["layer1.0.conv1"].weight.is_quantized
    assert sum(a.role == {LayerRole.HIDDEN} for a in plan.values()) == len(plan) - 2


def test_override_that_matches_nothing(tiny):
    with pytest.raises(RecipeError, match="matches no layer"):
        _plan(tiny, (1, 3, 8, 8), "int8", ["layer1.*=8"])
