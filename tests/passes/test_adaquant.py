"""AdaQuant lowers each layer's MSE to the float network, keeps integer weights, and lowers bit-exactly."""

import torch

from qcompile.passes import AdaQuant
from qcompile.passes._layerwise import capture, float_reference, set_quantization
from qcompile.passes.insert_quantizers import weight_quantizers
from qcompile.verify import verify_reference
from tests.passes.ptq_helpers import batches, quantize


def logits_mse(gm, ref, data):
    with torch.no_grad():
        return float(sum(((gm(x) - ref(x)) ** 2).mean() for x, _ in data))


def test_adaquant_reduces_mse_and_keeps_integer_weights(tiny):
    data = batches()
    plain = quantize(tiny, data)
    tuned = quantize(tiny, data, after_calibrate=[AdaQuant(iterations=60)])
    rows = tuned.context.results["adaquant"]["layers"]
    assert [r["layer"] for r in rows] == ["stem", "body", "head"]
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
    assert [r["layer"] for r in only.context.results["adaquant"]["layers"]] == ["body"]
    for name in ("stem", "head"):  # the others keep their calibrated weights
        assert torch.equal(only.graph_module.get_submodule(name).parametrizations.weight.original,
                           plain.graph_module.get_submodule(name).parametrizations.weight.original)
