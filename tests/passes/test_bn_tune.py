"""BN tuning: the folding invariance it relies on, the statistics it re-estimates, and its place before fold_bn."""

import pytest
import torch
from qcompile.passes import AnnotateCost, AssignPrecision, BnTune, Calibrate, FoldBatchNorm, InsertQuantizers
from qcompile.passes._layerwise import channel_mean, graph_copy, sub_context
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qcompile import Pipeline, get_recipe
from qcompile.errors import PipelineError
from qcompile.quantization.quantizer import WeightQuantizer, quantize
from qcompile.quantization.spec import Calibrator, Granularity, QuantSpec
from tests.passes.ptq_helpers import batches
from tests.passes.ptq_helpers import quantize as quantize_model


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_weight_codes_survive_bn_folding(bits):
    """w' = w·γ/σ scales channel c and its max|w| by one factor: the same codes, negated where γ < 0."""
    torch.manual_seed(bits)
    conv, bn = nn.Conv2d(6, 10, 3), nn.BatchNorm2d(10).eval()
    bn.weight.data = torch.randn(10) * 2  # both signs
    bn.running_var.uniform_(0.1, 4.0)
    bn.running_mean.normal_()
    wq = WeightQuantizer(QuantSpec(bits, True, Granularity.PER_CHANNEL, Calibrator.MAX))
    fused = fuse_conv_bn_eval(conv.eval(), bn)

    def codes(w):
        return quantize(w, wq.scale_for(w), wq.spec.qmin, wq.spec.qmax)

    sign = torch.sign(bn.weight.data).view(-1, 1, 1, 1)
    assert torch.equal(codes(fused.weight.detach()), sign * codes(conv.weight.detach()))


def tuned(tiny, data, **kw):
    passes = [AssignPrecision(), AnnotateCost(), BnTune(**kw)]
    with torch.no_grad():
        return Pipeline(passes).run(tiny, data[0][0][:1], recipe=get_recipe("int4"), calibration_data=data)


def test_bn_tune_re_estimates_means_on_the_quantized_network(tiny):
    data = batches()
    result = tuned(tiny, data)
    gm, ctx = result.graph_module, result.context
    assert ctx.float_reference is not None and torch.equal(ctx.float_reference.stem_bn.running_mean,
                                                           tiny.stem_bn.running_mean)
    assert not torch.allclose(gm.stem_bn.running_mean, tiny.stem_bn.running_mean)
    assert torch.equal(gm.stem_bn.running_var, tiny.stem_bn.running_var)  # means only, by default
    # the stem's quantized output does not depend on BN statistics: its mean over the data is what was stored
    q = graph_copy(gm)
    Pipeline([InsertQuantizers(), Calibrate()]).run_graph(q, sub_context(ctx))
    assert torch.allclose(channel_mean(q, q.stem, data), gm.stem_bn.running_mean, atol=1e-5)


def test_bn_tune_variance_option_and_the_result_lowers(tiny):
    data = batches()
    result = tuned(tiny, data, variance=True)
    assert not torch.allclose(result.graph_module.stem_bn.running_var, tiny.stem_bn.running_var)
    lowered = quantize_model(tiny, data, before_fold=[BnTune()])
    assert lowered.context.ir is not None and lowered.context.results["bn_tune"]["batchnorms"] == 2


def test_bn_tune_after_folding_is_an_error(tiny):
    data = batches()
    with pytest.raises(PipelineError, match="bn_tune must run before fold_bn"):
        Pipeline([FoldBatchNorm(), AssignPrecision(), BnTune()]).run(
            tiny, data[0][0][:1], recipe=get_recipe("int4"), calibration_data=data)
