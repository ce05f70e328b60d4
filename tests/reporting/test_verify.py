"""The reference-vs-fake-quant check compares the model with the IR's definition, not with a float64 variant
of it: tabulated functions run in float32, as their tables were computed."""

import pytest
import torch.nn.functional as F

from qcompile.passes import LowerInteger
from qcompile.reporting import verify
from tests.passes.test_lower_constructs import ConvAct, _batches, lowered


def _tied_leaky_relu():
    """``leaky_relu(x, 0.1)`` with the scale 0.04 in and out: code -15 gives -1.5 codes, a rounding tie that
    float32 and float64 arithmetic break differently."""
    res = lowered("leaky", "int8", {"leaky": lambda: ConvAct(fn=lambda x: F.leaky_relu(x, 0.1))})
    gm, ctx = res.graph_module, res.context
    lut = next(op for op in ctx.ir.ops if op.kind == "lut")
    for name in (lut.inputs[0], lut.output):
        gm.get_submodule(name).scale.fill_(0.04)
    LowerInteger().run(gm, ctx)
    return gm, ctx.ir


def test_the_nodes_a_table_computes_are_found():
    gm, ir = _tied_leaky_relu()
    assert {gm.graph.find_nodes(op="call_function", target=F.leaky_relu)[0].name} == verify.tabulated_nodes(gm, ir)


@pytest.mark.parametrize("float32_tables", [True, False])
def test_a_table_on_rounding_ties_agrees_with_the_model(float32_tables, monkeypatch):
    gm, ir = _tied_leaky_relu()
    if not float32_tables:
        monkeypatch.setattr(verify, "tabulated_nodes", lambda gm, ir: set())
    summary = verify.verify_reference(gm, ir, _batches()).summary()
    if float32_tables:
        assert summary["identical_fraction"] == 1.0 and summary["max_lsb_diff"] == 0
    else:  # the float64 evaluation this replaced: the ties round the other way
        lut_layer = next(t for t in summary["layers"] if t["name"] == next(
            op.output for op in ir.ops if op.kind == "lut"))
        assert lut_layer["identical_fraction"] < 1.0
