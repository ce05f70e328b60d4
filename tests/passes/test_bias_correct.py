"""Bias correction removes each quantized layer's per-channel output shift relative to the float network, down to
the int32 bias grid the integer kernel adds on."""

from qcompile.passes import BiasCorrect
from qcompile.passes._layerwise import channel_mean, float_reference

from qcompile.reporting.verify import verify_reference
from tests.passes.ptq_helpers import batches, quantize

LAYERS = ("stem", "body", "head")


def shifts(result, data):
    gm, ref = result.graph_module, float_reference(result.graph_module, result.context)
    return {name: (channel_mean(gm, gm.get_submodule(name), data) - channel_mean(ref, ref.get_submodule(name), data))
            for name in LAYERS}


def bias_steps(result):
    return {name: result.graph_module.get_submodule(name).parametrizations.bias[0].scale() for name in LAYERS}


def test_every_layer_is_corrected_to_within_half_a_bias_step(tiny):
    data = batches()
    plain = quantize(tiny, data)
    corrected = quantize(tiny, data, after_calibrate=[BiasCorrect()])
    before, after, steps = shifts(plain, data), shifts(corrected, data), bias_steps(corrected)
    assert any((before[n].abs() > steps[n]).any() for n in LAYERS)  # some shift was worth correcting
    for n in LAYERS:
        assert (after[n].abs() <= steps[n] / 2 + 1e-5).all(), n
    recorded = {r["layer"] for r in corrected.context.results["bias_correct"]["layers"]}
    assert recorded == set(LAYERS)


def test_corrected_graph_lowers_and_verifies_bit_exactly(tiny):
    data = batches()
    result = quantize(tiny, data, after_calibrate=[BiasCorrect()])
    summary = verify_reference(result.graph_module, result.context.ir, data).summary()
    assert summary["identical_fraction"] == 1.0 and summary["max_lsb_diff"] == 0
