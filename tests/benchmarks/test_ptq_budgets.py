"""benchmarks/ptq_budgets.py: merging runs made in parallel, and the paired comparison of IP plans."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
ptq_budgets = pytest.importorskip("ptq_budgets")


def row(name, recipe, cost, top1, ptq="plain", budget="", seed=0):
    return {"name": name, "recipe": recipe, "ptq": ptq, "budget": budget, "sensitivity": "kl" if budget else "",
            "adaquant_scope": "", "calib_seed": seed, "linear_vs_bf16": f"{cost:.6f}", "quadratic_vs_bf16": "0",
            "memory_vs_bf16": "0", "top1": f"{top1:.4f}", "float_top1": "0.9", "images": 8, "verified_images": 8,
            "verify_identical": 1.0, "verify_top1_agreement": 1.0, "seconds": 1}


def test_merge_and_paired_comparison(tmp_path, capsys):
    ip = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)
    int8 = np.array([1, 1, 1, 1, 1, 0, 0, 1], bool)
    int4 = np.array([1, 0, 1, 0, 1, 0, 1, 0], bool)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    ptq_budgets.write_rows(a / "ptq_budgets.csv", [row("auto-linear0.30-plain", "auto", 0.3, ip.mean(),
                                                       budget="linear=0.30")])
    ptq_budgets.write_hits(a / "hits.npz", {"auto-linear0.30-plain": ip})
    ptq_budgets.write_rows(b / "ptq_budgets.csv", [row("int8-plain", "int8", 0.5, int8.mean()),
                                                   row("int4-plain", "int4", 0.25, int4.mean()),
                                                   row("int8-light", "int8", 0.5, int8.mean(), ptq="light")])
    ptq_budgets.write_hits(b / "hits.npz", {"int8-plain": int8, "int4-plain": int4, "int8-light": int8})
    ptq_budgets.merge([a, b], out)
    assert {r["name"] for r in ptq_budgets.read_rows(out / "ptq_budgets.csv")} == {
        "auto-linear0.30-plain", "int8-plain", "int4-plain", "int8-light"}
    assert np.array_equal(ptq_budgets.read_hits(out / "hits.npz")["int4-plain"], int4)  # bit-packed round trip
    result = ptq_budgets.compare(out)
    assert [r["uniform"] for r in result] == ["int8"]  # int4 costs less; int8-light is another mode
    d = ip.astype(float) - int8.astype(float)
    assert result[0]["diff"] == pytest.approx(100 * d.mean())
    assert result[0]["ci95"] == pytest.approx(196 * d.std(ddof=1) / math.sqrt(len(d)))
    assert result[0]["disagree"] == 2
    assert "linear=0.30 vs int8" in capsys.readouterr().out
    assert (out / "comparison.csv").exists()


def test_hits_of_different_test_sets_do_not_mix(tmp_path):
    with pytest.raises(SystemExit, match="different test sets"):
        ptq_budgets.write_hits(tmp_path / "h.npz", {"a": np.ones(4, bool), "b": np.ones(5, bool)})
