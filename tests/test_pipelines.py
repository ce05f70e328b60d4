"""qcompile.pipelines: the pass lists, pinned by pass name for the flag combinations the CLI offers."""

from __future__ import annotations

import pytest

from qcompile.errors import QCompileError, RecipeError
from qcompile.pipelines import compile_passes, lowering_passes, ptq_passes, sensitivity_passes, uses_ptq
from qcompile.quantization.recipes import RECIPES, get_recipe
from qcompile.search.bit_allocation import parse_budget

PLAIN = ["fold_bn", "assign_precision", "annotate_cost", "insert_quantizers", "calibrate", "align_add_scales",
         "lower_integer"]


def names(passes) -> list[str]:
    return [p.name for p in passes]


def test_only_auto_is_searched() -> None:
    assert [r.name for r in RECIPES.values() if r.searched] == ["auto"]


def test_plain_compile() -> None:
    assert names(compile_passes(get_recipe("int8"))) == PLAIN
    assert names(compile_passes(get_recipe("int8"), width=0.5)) == ["width_scale", *PLAIN]
    assert names(compile_passes(get_recipe("int8"), has_calibration=False)) == PLAIN[:3]
    assert names(compile_passes(get_recipe("bf16"))) == PLAIN[:3]
    assert names(lowering_passes()) == ["fold_bn", "assign_precision", *PLAIN[3:]]


SEARCH = ["assign_precision", "annotate_cost", "mixed_precision", "assign_precision", "annotate_cost"]
FOLD = ["fold_bn", "assign_precision", "annotate_cost"]  # a BatchNorm that follows no layer is a new layer


@pytest.mark.parametrize(("recipe", "mode", "expected"), [
    ("int8", "light", ["assign_precision", "annotate_cost", "bn_tune", *FOLD, *PLAIN[3:6], "lower_integer"]),
    ("auto", None, [*SEARCH, *FOLD, *PLAIN[3:6], "lower_integer"]),
    ("auto", "advanced", [*SEARCH, "bn_tune", *FOLD, *PLAIN[3:6], "adaquant", "bias_correct", "lower_integer"]),
])
def test_ptq_compile(recipe: str, mode: str | None, expected: list[str]) -> None:
    budget = "linear=0.4" if recipe == "auto" else None
    assert uses_ptq(get_recipe(recipe), ptq_mode=mode, budget=budget)
    got = names(compile_passes(get_recipe(recipe), ptq_mode=mode, budget=budget, bits="4,8"))
    assert got == expected
    assert names(ptq_passes(get_recipe(recipe), mode, budget=parse_budget(budget) if budget else None)) == got


def test_ptq_options_are_checked() -> None:
    with pytest.raises(RecipeError, match="add recipe auto"):
        compile_passes(get_recipe("int8"), budget="linear=0.4")
    with pytest.raises(RecipeError, match="not bf16"):
        compile_passes(get_recipe("bf16"), ptq_mode="light")
    with pytest.raises(QCompileError, match="calibration data"):
        compile_passes(get_recipe("auto"), budget="linear=0.4", has_calibration=False)


def test_sensitivity_passes() -> None:
    assert names(sensitivity_passes()) == ["fold_bn", "assign_precision", *PLAIN[3:6]]
    assert names(sensitivity_passes(fold_bn=False, adaquant_iterations=5, adaquant_layers=["conv1"])) == [
        "assign_precision", *PLAIN[3:6], "adaquant"]
