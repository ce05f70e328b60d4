import json

import pytest

from qcompile.errors import RecipeError
from qcompile.quantization.recipes import (
    RECIPES,
    LayerChoice,
    get_recipe,
    load_overrides,
    parse_precision,
    parse_set,
    resolve_overrides,
)
from qcompile.quantization.spec import BF16, Calibrator, LayerRole, Precision

FIRST, LAST, HIDDEN = (frozenset({r}) for r in (LayerRole.FIRST, LayerRole.LAST, LayerRole.HIDDEN))


def test_the_four_recipes():
    assert set(RECIPES) == {"bf16", "int8", "mostly4bit", "int4", "auto"}
    m4 = get_recipe("mostly4bit")
    assert m4.precision_for(FIRST) == Precision(8, 8)
    assert m4.precision_for(LAST) == Precision(8, 8)
    assert m4.precision_for(HIDDEN) == Precision(4, 4)
    assert get_recipe("int4").precision_for(FIRST) == Precision(4, 4)
    assert get_recipe("int8").precision_for(HIDDEN) == Precision(8, 8)
    assert get_recipe("bf16").precision_for(FIRST) == BF16 and not get_recipe("bf16").quantized


def test_bad_recipe_name_lists_the_valid_ones():
    with pytest.raises(RecipeError, match="unknown recipe 'int3'.*bf16, int8, mostly4bit, int4"):
        get_recipe("int3")


@pytest.mark.parametrize(("text", "expected"), [("8", Precision(8, 8)), (4, Precision(4, 4)),
                                                ("w4a8", Precision(4, 8)), ("bf16", BF16), ("W2A8", Precision(2, 8))])
def test_parse_precision(text, expected):
    assert parse_precision(text, "t") == expected


@pytest.mark.parametrize("text", ["12", "w4a16", "1", "fp8", ""])
def test_unhonourable_or_malformed_precision(text):
    with pytest.raises(RecipeError):
        parse_precision(text, "t")


def test_parse_set_and_resolution_last_wins():
    ovs = parse_set(["layer1.*=8", "layer1.0.conv1=w4a8"])
    plan = resolve_overrides(["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"], ovs)
    assert {k: v.precision for k, v in plan.items()} == {
        "layer1.0.conv1": Precision(4, 8), "layer1.0.conv2": Precision(8, 8)}


def test_calibrator_overrides_merge_with_precision():
    plan = resolve_overrides(["a", "b"], parse_set(["*=4:mse", "b=percentile", "b=8"]))
    assert plan["a"] == LayerChoice(Precision(4, 4), Calibrator.MSE)
    assert plan["b"] == LayerChoice(Precision(8, 8), Calibrator.PERCENTILE)
    with pytest.raises(RecipeError, match="unknown calibrator|cannot parse"):
        parse_set(["a=4:median"])


@pytest.mark.parametrize("item", ["layer1", "=8", "layer1=", "layer1.*=9"])
def test_bad_set_items(item):
    with pytest.raises(RecipeError):
        parse_set([item])


def test_override_matching_nothing_is_an_error():
    with pytest.raises(RecipeError, match="'layer9.*' .* matches no layer"):
        resolve_overrides(["conv1", "fc"], parse_set(["layer9.*=8"]))


def test_override_files(tmp_path):
    (tmp_path / "o.toml").write_text('[overrides]\n"layer1.*" = 8\nfc = "w8a8"\n')
    (tmp_path / "o.json").write_text(json.dumps({"conv1": "bf16"}))
    assert [(o.pattern, o.precision) for o in load_overrides(tmp_path / "o.toml")] == [
        ("layer1.*", Precision(8, 8)), ("fc", Precision(8, 8))]
    assert load_overrides(tmp_path / "o.json")[0].precision == BF16


def test_bad_override_files(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        load_overrides(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("this is = = not toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_overrides(tmp_path / "bad.toml")
    (tmp_path / "bits.json").write_text(json.dumps({"fc": 32}))
    with pytest.raises(RecipeError, match="cannot be honoured"):
        load_overrides(tmp_path / "bits.json")
