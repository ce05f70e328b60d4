"""AdaQuant lowers each layer's MSE to the float network, keeps integer weights, and lowers bit-exactly."""

import pytest
import torch
from qcompile.passes import AdaQuant
from qcompile.passes._layerwise import capture, capture_node, float_reference, set_quantization
from qcompile.passes.insert_quantizers import weight_quantizers

from qcompile.errors import RecipeError
from qcompile.reporting.verify import verify_reference
from tests.passes.ptq_helpers import batches, quantize


def logits_mse(gm, ref, data):
    with torch.no_grad():
        return float(sum(((gm(x) - ref(x)) ** 2).mean() for x, _ in data))


def test_adaquant_reduces_mse_and_keeps_integer_weights(tiny):
    data = batches()
    plain = quantize(tiny, data)
    tuned = quantize(tiny, data, after_calibrate=[AdaQuant(iterations=60)])
    rows = tuned.context.results["adaquant"]["units"]
    assert [r["unit"] for r in rows] == ["stem", "body", "head"]
    assert all(r["mse_after"] < r["mse_before"] for r in rows if r["kept"]) and sum(r["kept"] for r in rows) >= 2
    ref = float_reference(tuned.graph_module, tuned.context)
    assert logits_mse(tuned.graph_module, ref, data) < logits_mse(plain.graph_module, ref, data)
    for name, wq in weight_quantizers(tuned.graph_module).items():
        w = tuned.graph_module.get_submodule(name).parametrizations.weight.original.detach()
        codes = w / wq.scale_for(w)
        assert torch.allclose(codes, codes.round(), atol=1e-4), name  # stored weights are codes · step
        assert codes.round().min() >= wq.spec.qmin and codes.round().max() <= wq.spec.qmax
        assert torch.equal(codes.round().abs().flatten(1).amax(1), torch.full((w.shape[0],), float(wq.spec.qmax)))


def test_adaquant_changes_weights_but_not_the_float_reference(tiny):
    data = batches()
    result = quantize(tiny, data, after_calibrate=[AdaQuant(iterations=50)])
    gm, ref = result.graph_module, result.context.float_reference
    assert not torch.equal(gm.stem.parametrizations.weight.original, ref.stem.weight)
    set_quantization(gm, False)  # the float view of the tuned graph is no longer the float network
    first = capture(gm, gm.stem, data, output=True)
    assert not torch.allclose(first, capture(ref, ref.stem, data, output=True))


def test_adaquant_graph_lowers_and_verifies_bit_exactly(tiny):
    data = batches()
    result = quantize(tiny, data, after_calibrate=[AdaQuant(iterations=50)])
    summary = verify_reference(result.graph_module, result.context.ir, data).summary()
    assert summary["identical_fraction"] == 1.0 and summary["max_lsb_diff"] == 0 and summary["top1_agreement"] == 1.0


def test_adaquant_can_be_limited_to_named_layers(tiny):
    data = batches()
    plain = quantize(tiny, data)
    only = quantize(tiny, data, after_calibrate=[AdaQuant(iterations=40, layers=["body"])])
    assert [r["unit"] for r in only.context.results["adaquant"]["units"]] == ["body"]
    for name in ("stem", "head"):  # the others keep their calibrated weights
        assert torch.equal(only.graph_module.get_submodule(name).parametrizations.weight.original,
                           plain.graph_module.get_submodule(name).parametrizations.weight.original)


def test_block_scope_optimises_each_region_and_lowers_bit_exactly(tiny):
    data = batches()
    plain = quantize(tiny, data)
    tuned = quantize(tiny, data, after_calibrate=[AdaQuant(iterations=60, scope="block")])
    result = tuned.context.results["adaquant"]
    assert result["scope"] == "block"
    assert [(r["unit"], r["layers"]) for r in result["units"]] == [("stem", ["stem"]), ("body", ["body"]),
                                                                    ("head", ["head"])]
    assert all(r["mse_after"] < r["mse_before"] for r in result["units"] if r["kept"])
    assert sum(r["kept"] for r in result["units"]) >= 2
    ref = float_reference(tuned.graph_module, tuned.context)
    assert logits_mse(tuned.graph_module, ref, data) < logits_mse(plain.graph_module, ref, data)
    summary = verify_reference(tuned.graph_module, tuned.context.ir, data).summary()
    assert summary["identical_fraction"] == 1.0 and summary["max_lsb_diff"] == 0


def test_block_scope_matches_the_block_output_not_each_layer(tiny):
    """The body block ends at the residual add: its target is the float add, which no module returns."""
    data = batches()
    only = quantize(tiny, data, after_calibrate=[AdaQuant(iterations=40, scope="block", layers=["body"])])
    rows = only.context.results["adaquant"]["units"]
    assert [r["layers"] for r in rows] == [["body"]]
    gm, ref = only.graph_module, only.context.float_reference
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name)
    ref_add = next(n for n in ref.graph.nodes if n.name == add.name)
    before = rows[0]["mse_before"]
    expected = float(((capture_node(gm, add, data) - capture_node(ref, ref_add, data)) ** 2).mean())
    assert expected == pytest.approx(min(rows[0]["mse_after"], before), rel=1e-2)  # stored weights: rounded


def test_unknown_scope_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown AdaQuant scope 'net'"):
        AdaQuant(scope="net")
