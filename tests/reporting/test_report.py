"""The cost report: a row per layer and per matrix product of two tensors, in graph order, summing to the
totals."""

import io

import torch
from qcompile.passes import AnnotateCost, AssignPrecision
from rich.console import Console

from qcompile import Pipeline, get_recipe
from qcompile.reporting.report import build_report, print_report
from tests.quantization.test_cost import NonLocalCost


def test_products_of_two_tensors_are_rows_of_their_own_and_the_rows_sum_to_the_totals():
    res = Pipeline([AssignPrecision(), AnnotateCost()]).run(NonLocalCost(), torch.randn(1, 3, 8, 8),
                                                            recipe=get_recipe("mostly4bit"))
    report = build_report(res.graph_module, res.context, "nonlocal.py")
    rows = [(r["name"], r["op"], r["macs"], r["params"], r["w_bits"], r["a_bits"]) for r in report["layers"]]
    assert rows == [("conv", "conv2d", 768, 12, 8, 8), ("matmul", "matmul", 16384, 0, 8, 8),
                    ("matmul_1", "matmul", 16384, 0, 8, 8), ("fc", "dense", 40, 40, 8, 8)]
    for key in ("macs", "linear", "quadratic", "memory_bits"):
        assert sum(r[key] for r in report["layers"]) == report["total"][key]
    out = io.StringIO()
    print_report(report, Console(file=out, width=140))
    assert "matmul_1 │ matmul" in out.getvalue()
