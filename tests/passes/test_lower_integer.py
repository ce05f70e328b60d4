"""Lowering is general: the tensor code real CNN model files contain lowers, and verifies bit-exactly."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger
from qcompile.passes.lower_integer import LoweringError
from torch import nn

from qcompile import Pipeline, get_recipe
from qcompile.ir import reference
from qcompile.quantization.spec import Calibrator
from qcompile.reporting.verify import verify_reference
from tests.conftest import randomize_bn


class Lambda(nn.Module):
    """A module wrapping a lambda, as many CIFAR ResNet files define it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class OptionAShortcut(nn.Module):
    """He et al.'s option-A block: the shortcut is strided slicing plus zero channel padding, not a conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        pad = (cout - cin) // 2
        self.shortcut = Lambda(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FunctionalNet(nn.Module):
    """Functional relu / pooling / add, view with x.size(0), mean, option-A shortcut, torch.cat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = OptionAShortcut(8, 16)
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = self.block(x)
        x = torch.cat([F.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        x = torch.add(F.relu(self.mix(x)), F.avg_pool2d(x, 3, 1, 1))
        x = x.mean((2, 3), keepdim=True)
        return self.fc(x.view(x.size(0), -1))


class ModuleNet(nn.Module):
    """Module forms: nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, reshape, grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.features(x).reshape(-1, 32))


class ArithmeticNet(nn.Module):
    """Float arithmetic with buffers and parameters: the model normalises its own input (buffers of shape
    (3, 1, 1), an epsilon added to one), subtracts and divides two values, and scales by a parameter where no
    layer can take it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.gain = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = (x - self.mean) / (self.std + 1e-5)
        x = F.relu(self.stem(x))
        y = self.a(x) - self.b(x)
        y = y / (torch.sigmoid(self.b(x)) + 0.5)
        y = F.max_pool2d(F.relu(y), 2) * self.gain
        return self.fc(y.mean((2, 3)))


def _lowered(model, recipe, size=16):
    torch.manual_seed(0)
    model = randomize_bn(model, data=torch.randn(16, 3, size, size))
    calib = [(torch.randn(8, 3, size, size), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    res = Pipeline([FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate(), LowerInteger()]).run(
        model, torch.randn(1, 3, size, size), recipe=get_recipe(recipe), calibration_data=calib)
    return res


@pytest.mark.parametrize("recipe", ["int8", "mostly4bit", "int4"])
@pytest.mark.parametrize("build", [FunctionalNet, ModuleNet, ArithmeticNet])
def test_lowers_and_verifies_bit_exactly(build, recipe):
    res = _lowered(build(), recipe)
    kinds = {op.kind for op in res.context.ir.ops}
    if build is FunctionalNet:
        assert {"slice", "pad", "concat", "global_avgpool", "avgpool2d", "maxpool2d", "add", "requantize"} <= kinds
    elif build is ArithmeticNet:
        assert {"add", "mul", "div", "lut"} <= kinds
    else:
        assert {"global_avgpool", "avgpool2d", "maxpool2d"} <= kinds  # the flatten and reshape fold into the pool
    batches = [(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    v = verify_reference(res.graph_module, res.context.ir, batches).summary()
    assert v["top1_agreement"] == 1.0 and v["max_lsb_diff"] == 0
    assert all(layer["max_lsb_diff"] == 0 for layer in v["layers"])


def test_float32_fake_quant_agrees_too():
    res = _lowered(FunctionalNet(), "int8")
    batches = [(torch.randn(32, 3, 16, 16), torch.zeros(32, dtype=torch.long))]
    v = verify_reference(res.graph_module, res.context.ir, batches, dtype=torch.float32).summary()
    assert v["top1_agreement"] == 1.0 and v["max_lsb_diff"] <= 1 and v["identical_fraction"] >= 0.99


class PooledHead(nn.Module):
    """A conv, a 4x4 max pool, then ``head``: the ways model files average the last feature map."""

    def __init__(self, head) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.head = head

    def forward(self, x):
        return self.head(self, F.max_pool2d(F.relu(self.conv(x)), 4))


HEADS = {  # head -> (the op kinds it lowers to, the float pooling kinds that stay)
    "adaptive_flatten": (lambda m, x: m.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), {"global_avgpool"}, set()),
    "mean_viewed_3d": (lambda m, x: m.fc(x.mean((2, 3)).view(x.size(0), 1, -1)).flatten(1),
                       {"global_avgpool", "reshape"}, set()),
    "mean_negative_dims": (lambda m, x: m.fc(x.mean((-1, -2))), {"global_avgpool"}, set()),
    "avg_pool_whole_map_view": (lambda m, x: m.fc(F.avg_pool2d(x, 4).view(x.size(0), -1)), {"global_avgpool"},
                                set()),
    "mean_over_width_only": (lambda m, x: m.fc(x.mean(3).mean(2)), {"mean"}, {"mean"}),
    "mean_of_a_flat_view": (lambda m, x: m.fc(x.view(x.size(0), x.size(1), -1).mean(2)),
                            {"global_avgpool", "reshape"}, set()),  # the view reshapes the codes
    "mean_of_adaptive_2x2": (lambda m, x: m.fc(F.adaptive_avg_pool2d(x, 2).mean((2, 3))), set(),
                             {"adaptive_avgpool2d", "mean"}),
    "mean_also_an_output": (lambda m, x: (lambda p: (m.fc(p), p))(x.mean((2, 3))), {"global_avgpool"}, {"mean"}),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_global_means_of_codes_lower_to_integer_pooling(head):
    """A quantized global average of codes is one ``global_avgpool``, the reshapes after it on codes; the float
    pooling stays only where something reads the float value or the pooling is not global, and no op computes
    what nothing reads."""
    fn, kinds, float_pools = HEADS[head]
    res = _lowered(PooledHead(fn), "int8")
    ir = res.context.ir
    present = {op.kind for op in ir.ops}
    assert kinds <= present and present & {"avgpool2d", "adaptive_avgpool2d", "mean"} == float_pools
    assert ("reshape" in present or "flatten" in present) == ("reshape" in kinds)  # a flatten to (N, C) is folded
    read = {i for op in ir.ops for i in op.inputs} | set(ir.outputs)
    assert all(op.output in read for op in ir.ops)
    batches = [(torch.randn(32, 3, 16, 16), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    v = verify_reference(res.graph_module, ir, batches).summary()
    assert v["top1_agreement"] == 1.0 and v["max_lsb_diff"] <= 1 and v["identical_fraction"] >= 0.99


def test_dyadic_requantization_is_close_to_float32():
    torch.manual_seed(0)
    res = _lowered(ModuleNet(), "int8")
    x = torch.randn(8, 3, 16, 16).numpy()
    ref = reference.run(res.context.ir, x)[res.context.ir.outputs[0]]
    dy = Pipeline([LowerInteger(dyadic=True)]).run_graph(res.graph_module, res.context)
    assert dy is res.graph_module and any(op.attrs.get("mode") == "dyadic" for op in res.context.ir.ops)
    out = reference.run(res.context.ir, x)[res.context.ir.outputs[0]]
    assert abs(out - ref).max() <= abs(ref).max() * 0.05


class CumSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cumsum(self.conv(x), 1).mean((2, 3))


def test_unlowerable_op_names_node_op_and_line():
    with pytest.raises(LoweringError) as err:
        _lowered(CumSum(), "int8")
    msg = str(err.value)
    assert "node cumsum (call_function cumsum)" in msg and "test_lower_integer.py" in msg
    assert "no integer lowering" in msg


def test_batch_statistics_norm_says_why_it_does_not_lower():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    with pytest.raises(LoweringError, match=r"node _1 .*BatchNorm2d without running statistics "
                                            r"\(track_running_stats=False\) normalises every batch"):
        _lowered(model, "int8")


class LogOfAbs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.log(self.conv(x).abs()).mean((2, 3))


def test_a_function_undefined_on_some_code_names_itself_and_its_line():
    with pytest.raises(LoweringError, match=r"node log \(call_function log\) at .*test_lower_integer.py:\d+: log is not "
                                            r"finite on every code of its input .* clamp its input first"):
        _lowered(LogOfAbs(), "int8")


class Resize(nn.Module):
    def __init__(self, mode: str, factor: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.mode, self.factor = mode, factor

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=self.factor, mode=self.mode).mean((2, 3))


@pytest.mark.parametrize(("mode", "factor"), [("bicubic", 2.0), ("nearest", 1.5)])
def test_a_resize_that_does_not_lower_says_which_does(mode, factor):
    with pytest.raises(LoweringError, match=rf"'{mode}' resizing to \[\d+, \d+\] does not lower: only nearest-.* and "
                                            "bilinear resizing do"):
        _lowered(Resize(mode, factor), "int8")


class PerHeadWeight(nn.Module):
    """A weight per attention head (``"bhn,hd->bhnd"``): no one dense layer, so the einsum stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(2, 3))

    def forward(self, x):
        q = self.conv(x).flatten(2).reshape(x.shape[0], 2, -1)
        return torch.einsum("bhn,hd->bhnd", q, self.scale).mean((2, 3))


def test_an_einsum_that_does_not_lower_says_which_do():
    with pytest.raises(LoweringError, match=r"node einsum \(call_function einsum\) at .*test_lower_integer.py:\d+: "
                                            r"einsum 'bhn,hd->bhnd' has no integer lowering: an einsum lowers as "
                                            r"products of tensors that share a batch index and"):
        _lowered(PerHeadWeight(), "int8")


class SaturatedRelu6(nn.Module):
    """MobileNetV2's last block: a 4-bit conv's BN output through ReLU6, which calibration saturates at 6.0."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 64, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.fc(F.relu6(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("recipe", ["mostly4bit", "int4"])
def test_a_relu6_bound_calibrated_as_the_range_end_lowers_bit_exactly(recipe):
    """With the max and EMA-max calibrators (QAT's) the bound is exactly 6.0; requantizing it from a coarse 4-bit
    accumulator rounded to 255 in some channels and 254 in others ("the clamp bound 6.0 requantizes to different
    codes per channel"), so MobileNetV2 could not lower, or be trained, at 4 bits. The quantizer's scale narrows
    until 6.0 is code 255 in every channel."""
    torch.manual_seed(0)
    model = randomize_bn(SaturatedRelu6(), data=torch.randn(16, 3, 8, 8))
    model.bn.weight.data *= 20  # most outputs past 6: the ReLU6 saturates
    calib = [(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    recipe = dataclasses.replace(get_recipe(recipe), act_calibrator=Calibrator.EMA_MAX)
    passes = [FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate()]
    calibrated = Pipeline(passes).run(model, torch.randn(1, 3, 8, 8), recipe=recipe, calibration_data=calib)
    q = dict(calibrated.graph_module.named_modules())["relu6_aq_u8_ema_max"]
    assert float(q.scale) * 255 == pytest.approx(6.0)  # calibrated at the clamp
    res = Pipeline([LowerInteger()]).run_graph(calibrated.graph_module, calibrated.context)
    assert 0.9 < float(q.scale) * 255 / 6.0 < 1.0  # narrowed by half the accumulator's step (MobileNetV2: 0.3%)
    v = verify_reference(res, calibrated.context.ir, calib).summary()
    assert v["identical_fraction"] == 1.0 and v["max_lsb_diff"] == 0
