import pytest
import torch
from qcompile.passes import AnnotateCost, AssignPrecision, FoldBatchNorm
from torch import fx, nn

from qcompile import Pass, PassContext, Pipeline
from qcompile.errors import PipelineError
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


def test_single_threaded_passes_run_on_one_thread_and_restore_the_count():
    seen = []

    class Reduces(Pass):
        name = "reduces"
        single_threaded = True

        def run(self, gm, ctx):
            seen.append(torch.get_num_threads())
            return gm

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Pipeline([Reduces()]).run(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    from qcompile.passes import AdaQuant, BiasCorrect, BnTune

    assert AdaQuant.single_threaded and BiasCorrect.single_threaded and BnTune.single_threaded


@pytest.mark.slow
def test_ptq_advanced_writes_the_same_ir_with_one_and_two_threads(tmp_path):
    """On the bundled checkpoint, where two threads' reductions did change 59 of 65 IR constants."""
    import hashlib
    import os
    import subprocess
    import sys

    digests = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        subprocess.run([sys.executable, "-m", "qcompile", "examples/resnet20_cifar.py", "--recipe", "mostly4bit",
                        "--ptq", "advanced", "--adaquant-iters", "20", "--calib-size", "128", "--eval-size", "100",
                        "--verify-size", "50", "--backend", "none", "--out", str(out), "--quiet"],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True)
        digests.append([hashlib.sha256((out / "ir" / f).read_bytes()).hexdigest()
                        for f in ("graph.json", "tensors.npz")])
    assert digests[0] == digests[1]
