from dataclasses import replace

import pytest
import torch
from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers
from qcompile.passes.calibrate import PART_ELEMENTS
from qcompile.passes.insert_quantizers import activation_quantizers, weight_quantizers

from qcompile import Pipeline, get_recipe
from qcompile.errors import DataError, PipelineError
from qcompile.models import resnet20_cifar
from qcompile.pipeline import CAPTURED, QUANTIZERS, SHAPES, PassContext
from qcompile.quantization.quantizer import QuantizerState
from qcompile.quantization.spec import Calibrator
from tests.conftest import randomize_bn

PASSES = [FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate()]


def _model():
    torch.manual_seed(0)
    return randomize_bn(resnet20_cifar(), data=torch.randn(32, 3, 32, 32))


def _calibrated(recipe, batches):
    return Pipeline(PASSES).run(_model(), torch.randn(1, 3, 32, 32), recipe=get_recipe(recipe),
                                calibration_data=batches)


def test_calibration_freezes_every_quantizer_and_int8_tracks_float():
    torch.manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32), torch.zeros(16)) for _ in range(4)]
    res = _calibrated("int8", batches)
    gm = res.graph_module
    assert res.context.calibration_images == 64
    assert all(q.state is QuantizerState.FROZEN and q.scale > 0 for q in activation_quantizers(gm).values())
    assert all(w.enabled for w in weight_quantizers(gm).values())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref, out = _model()(x), gm(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def test_weights_sit_on_their_grid():
    res = _calibrated("mostly4bit", [(torch.randn(8, 3, 32, 32), torch.zeros(8))])
    conv = res.graph_module.get_submodule("layer1.0.conv1")
    wq = weight_quantizers(res.graph_module)["layer1.0.conv1"]
    w = conv.weight
    codes = w / wq.scale_for(w)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4


def test_empty_calibration_set():
    with pytest.raises(DataError, match="calibration set is empty"):
        _calibrated("int8", [])


def test_missing_calibration_data():
    with pytest.raises(PipelineError, match="calibrate needs calibration data"):
        _calibrated("int8", None)


@pytest.mark.parametrize("calibrator", ["ema_max", "max", "percentile", "mse"])
def test_large_batches_run_in_parts_and_calibrate_as_whole_batches(calibrator):
    torch.manual_seed(2)
    batches = [(torch.randn(20, 3, 32, 32) * (i + 1), torch.zeros(20)) for i in range(3)]
    recipe = replace(get_recipe("mostly4bit"), act_calibrator=Calibrator(calibrator))

    def calibrated(part_elements):
        seen = []
        passes = [FoldBatchNorm(), AssignPrecision(), InsertQuantizers()]
        gm = Pipeline(passes).run(_model(), torch.randn(1, 3, 32, 32), recipe=recipe).graph_module
        gm.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
        ctx = PassContext.for_graph(gm, recipe=recipe, calibration_data=batches,
                                    properties={CAPTURED, SHAPES, QUANTIZERS})
        Calibrate(part_elements).run(gm, ctx)
        return {n: (q.scale, q.ema_max, q.running_max, q.batches) for n, q in activation_quantizers(gm).items()}, seen

    whole, seen_whole = calibrated(PART_ELEMENTS)
    parts, seen_parts = calibrated(8 * 3 * 32 * 32)
    assert seen_whole == [20, 20, 20] and seen_parts == [7, 7, 6] * 3
    assert whole.keys() == parts.keys()
    for name, (scale, ema, running, n) in whole.items():
        p_scale, p_ema, p_running, p_n = parts[name]
        assert torch.equal(scale, p_scale) and torch.equal(ema, p_ema) and torch.equal(running, p_running)
        assert n == p_n == 3


class FadedHead(torch.nn.Module):
    """A classifier whose pooled features are nearly zero next to its bias (an untrained network's, a near-dead
    feature map): at the calibrated input scale the bias would need more than int32's codes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.conv.weight.mul_(1e-7)
            self.conv.bias.zero_()
            self.fc.bias.fill_(0.5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_an_input_scale_too_small_for_its_layers_bias_is_raised_and_the_model_lowers():
    from qcompile.passes import LowerInteger
    from qcompile.quantization.quantizer import BIAS_CODE_LIMIT
    from qcompile.reporting.verify import verify_reference

    torch.manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8), torch.zeros(16)) for _ in range(2)]
    res = Pipeline([*PASSES, LowerInteger()]).run(FadedHead().eval(), torch.randn(1, 3, 8, 8),
                                                  recipe=get_recipe("int8"), calibration_data=batches)
    assert [w for w in res.context.warnings if "fc was raised" in w and "so the bias fits int32" in w]
    ir = res.context.ir
    fc = next(op for op in ir.ops if op.kind == "dense")
    assert 0 < abs(ir.constants[fc.inputs[2]]).max() <= BIAS_CODE_LIMIT
    assert verify_reference(res.graph_module, ir, batches).summary()["identical_fraction"] == 1.0
