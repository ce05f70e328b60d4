import pytest
import torch
from torch import fx

from qcompile import Pass, PassContext, Pipeline
from qcompile.errors import PipelineError
from qcompile.passes import AnnotateCost, AssignPrecision, FoldBatchNorm
from qcompile.pipeline import BN_FOLDED, COST, PRECISION


class BreakShapes(Pass):
    """A faulty pass: adds a node without a shape."""

    name = "break_shapes"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            extra = gm.graph.call_function(torch.neg, (out.args[0],))
        out.args = (extra,)
        return gm


def test_pipeline_runs_times_and_reports_properties(tiny):
    res = Pipeline([FoldBatchNorm(), AssignPrecision(), AnnotateCost()]).run(tiny, torch.randn(1, 3, 8, 8))
    assert [name for name, _ in res.context.timings] == ["fold_bn", "assign_precision", "annotate_cost"]
    assert all(sec >= 0 for _, sec in res.context.timings)
    assert {BN_FOLDED, PRECISION, COST} <= res.context.properties
    assert res.context.cost is not None and res.context.cost.macs > 0


def test_unmet_requirement_fails_before_running(tiny):
    with pytest.raises(PipelineError, match="annotate_cost requires precision_assigned; run assign_precision"):
        Pipeline([AnnotateCost(), AssignPrecision()]).run(tiny, torch.randn(1, 3, 8, 8))
    with pytest.raises(PipelineError, match="annotate_cost requires precision_assigned$"):
        Pipeline([AnnotateCost()]).run(tiny, torch.randn(1, 3, 8, 8))


def test_lint_catches_the_pass_that_broke_the_graph(tiny):
    with pytest.raises(PipelineError, match="after pass break_shapes: node neg .* has no shape"):
        Pipeline([FoldBatchNorm(), BreakShapes()]).run(tiny, torch.randn(1, 3, 8, 8))


def test_dump_after_hook(tiny):
    dumps: list[str] = []
    Pipeline([FoldBatchNorm(), AssignPrecision()], dump_after=["assign_precision"], dump=dumps.append).run(
        tiny, torch.randn(1, 3, 8, 8))
    assert len(dumps) == 1 and dumps[0].startswith("--- graph after assign_precision")
    assert "w:s8" in dumps[0] or "bf16" in dumps[0]
    with pytest.raises(PipelineError, match="cannot dump after nope"):
        Pipeline([FoldBatchNorm()], dump_after=["nope"])


def test_a_pass_runs_alone_on_a_graph(tiny):
    from qcompile import capture

    gm = capture(tiny, torch.randn(1, 3, 8, 8))
    gm = FoldBatchNorm()(gm)
    assert not any("bn" in str(n.target) for n in gm.graph.nodes)
