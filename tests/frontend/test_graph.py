"""graph.regions: the blocks block-wise AdaQuant optimises together; is_nonnegative: what is quantized unsigned."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile import capture
from qcompile.frontend.graph import compute_nodes, is_compute, is_nonnegative, layer_names, regions
from qcompile.models import resnet20_cifar


def test_tiny_regions_are_stem_residual_body_and_head(tiny):
    gm = capture(tiny, torch.randn(1, 3, 8, 8))
    names = layer_names(gm)
    found = regions(gm)
    assert [[names[n] for n in r.nodes if is_compute(gm, n)] for r in found] == [["stem"], ["body"], ["head"]]
    assert found[0].entry.op == "placeholder"
    assert found[1].output.target is not None and found[1].output.op == "call_function"  # the residual add
    for before, after in zip(found, found[1:]):
        assert after.entry is before.output


def test_resnet20_regions_are_stem_nine_blocks_and_head():
    gm = capture(resnet20_cifar().eval(), torch.randn(1, 3, 32, 32))
    names = layer_names(gm)
    layers = [[names[n] for n in r.nodes if is_compute(gm, n)] for r in regions(gm)]
    assert len(layers) == 11 and layers[0] == ["conv1"] and layers[-1] == ["fc"]
    assert layers[4] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0"]  # the downsampling block
    assert sum(layers, []) == [names[n] for n in compute_nodes(gm)]  # every layer in exactly one region, in order


class TwoInputs(nn.Module):
    """Two graph inputs meet in the first layer's input: no region starts before they are joined."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x + y)))


def test_regions_with_two_inputs():
    gm = capture(TwoInputs(), (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)))
    assert [[str(n.target) for n in r.nodes if is_compute(gm, n)] for r in regions(gm)] == [["a"], ["b"]]


class Construct(nn.Module):
    """``fn(x, *mods)``: one construct of a signedness table row, traced with its modules as submodules."""

    def __init__(self, fn, *mods: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.mods)


def _r(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


SIGNEDNESS = {  # name: (construct, whether its output is proven >= 0)
    "input": (lambda x: x, False),
    "relu": (lambda x: _r(x), True),
    "tanh_of_relu": (lambda x: torch.tanh(_r(x)), False),
    "pad_constant_positive": (lambda x: F.pad(_r(x), (1, 1, 2, 0), value=0.5), True),
    "pad_default": (lambda x: F.pad(_r(x), (1, 1)), True),
    "pad_constant_negative": (lambda x: F.pad(_r(x), (1, 1), "constant", -1.0), False),
    "pad_replicate": (lambda x: F.pad(_r(x), (1, 1, 1, 1), mode="replicate"), True),
    "pad_signed": (lambda x: F.pad(x, (1, 1)), False),
    "view_size0": (lambda x: _r(x).view(x.size(0), -1), True),
    "reshape": (lambda x: torch.reshape(_r(x), (x.shape[0], -1)), True),
    "flatten": (lambda x: _r(x).flatten(1), True),
    "permute": (lambda x: _r(x).permute(0, 2, 3, 1), True),
    "transpose": (lambda x: torch.transpose(_r(x), 1, 2).contiguous(), True),
    "squeeze_unsqueeze": (lambda x: _r(x).unsqueeze(1).squeeze(1), True),
    "chunk": (lambda x: _r(x).chunk(2, 1)[1], True),
    "split": (lambda x: torch.split(_r(x), 2, 1)[0], True),
    "slice": (lambda x: _r(x)[:, 1:3, ::2], True),
    "max_pool2d": (lambda x: F.max_pool2d(_r(x), 2), True),
    "avg_pool2d": (lambda x: F.avg_pool2d(_r(x), 3, 1, 1), True),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(_r(x), 1), True),
    "pool_signed": (lambda x: F.max_pool2d(x, 2), False),
    "cat": (lambda x: torch.cat([_r(x), F.relu6(x)], dim=1), True),
    "cat_one_signed": (lambda x: torch.cat([_r(x), x], dim=1), False),
    "stack": (lambda x: torch.stack([_r(x), _r(x) * 2]), True),
    "max_elementwise": (lambda x: torch.max(_r(x), x), True),
    "pow_even": (lambda x: (x - x.mean((2, 3), keepdim=True)).pow(2), True),
    "pow_odd": (lambda x: x ** 3, False),
    "quotient": (lambda x: _r(x) / (_r(x) + 1), True),
    "quotient_signed": (lambda x: x / (_r(x) + 1), False),
    "max_reduce": (lambda x: torch.max(_r(x), dim=1)[0], True),
    "max_signed": (lambda x: torch.max(x, x * 2), False),
    "maximum_either": (lambda x: torch.maximum(x, _r(x)), True),
    "maximum_signed": (lambda x: torch.maximum(x, x + 1), False),
    "clamp_min0": (lambda x: torch.clamp(x, min=0), True),
    "clamp_0_6_method": (lambda x: x.clamp(0, 6), True),
    "clamp_negative_min": (lambda x: torch.clamp(x, -1, 1), False),
    "clamp_negative_min_of_relu": (lambda x: torch.clamp(_r(x), -1, 1), True),
    "clamp_max_only_of_relu": (lambda x: torch.clamp(_r(x), max=6), True),
    "clamp_negative_max": (lambda x: torch.clamp(x, min=0.5, max=-1), False),
    "clamp_min": (lambda x: torch.clamp_min(x, 0.0), True),
    "hardtanh_0_6": (lambda x: F.hardtanh(x, 0.0, 6.0), True),
    "hardtanh_default": (lambda x: F.hardtanh(x), False),
    "relu6": (lambda x: F.relu6(x), True),
    "sigmoid": (lambda x: torch.sigmoid(x), True),
    "sigmoid_functional": (lambda x: F.sigmoid(x), True),
    "sigmoid_method": (lambda x: x.sigmoid(), True),
    "hardsigmoid": (lambda x: F.hardsigmoid(x), True),
    "mul": (lambda x: _r(x) * torch.sigmoid(x), True),
    "mul_signed": (lambda x: _r(x) * x, False),
    "mul_positive_scalar": (lambda x: torch.mul(_r(x), 0.5), True),
    "add": (lambda x: _r(x) + F.relu6(x), True),
    "add_negative_scalar": (lambda x: _r(x) + -1.0, False),
    "add_negative_alpha": (lambda x: torch.add(_r(x), _r(x), alpha=-1), False),
    "mean": (lambda x: _r(x).mean((2, 3), keepdim=True), True),
    "softmax": (lambda x: F.softmax(x, dim=1), True),
    "softmax_method": (lambda x: x.softmax(-1), True),
    "log_softmax": (lambda x: F.log_softmax(x, dim=1), False),
    "matmul": (lambda x: _r(x) @ x.softmax(-1), True),
    "matmul_signed": (lambda x: torch.matmul(_r(x), x), False),
    "minimum": (lambda x: torch.minimum(_r(x), torch.sigmoid(x)), True),
    "minimum_signed": (lambda x: torch.min(_r(x), x), False),
    "min_reduce": (lambda x: _r(x).min(1)[0], True),
    "normalize": (lambda x: F.normalize(_r(x), dim=1), True),
    "normalize_signed": (lambda x: F.normalize(x, dim=1), False),
}

MODULE_SIGNEDNESS = {  # name: (module, proven >= 0 after a ReLU, proven >= 0 on the signed input)
    "Identity": (nn.Identity(), True, False),
    "Dropout": (nn.Dropout(0.1), True, False),
    "MaxPool2d": (nn.MaxPool2d(2), True, False),
    "AvgPool2d": (nn.AvgPool2d(2), True, False),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d(1), True, False),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d(1), True, False),
    "Flatten": (nn.Flatten(), True, False),
    "ReLU6": (nn.ReLU6(), True, True),
    "Hardtanh_0_1": (nn.Hardtanh(0.0, 1.0), True, True),
    "Hardtanh_default": (nn.Hardtanh(), True, False),
    "Sigmoid": (nn.Sigmoid(), True, True),
    "Hardsigmoid": (nn.Hardsigmoid(), True, True),
    "Tanh": (nn.Tanh(), False, False),
    "Softmax": (nn.Softmax(dim=1), True, True),
}


def _output_source(fn, *mods: nn.Module) -> bool:
    gm = capture(Construct(fn, *mods), torch.randn(2, 4, 6, 6))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return is_nonnegative(gm, out)


@pytest.mark.parametrize("name", list(SIGNEDNESS))
def test_nonnegative_through_functions_and_methods(name):
    fn, expected = SIGNEDNESS[name]
    assert _output_source(fn) is expected


@pytest.mark.parametrize("name", list(MODULE_SIGNEDNESS))
def test_nonnegative_through_modules(name):
    module, after_relu, on_signed = MODULE_SIGNEDNESS[name]
    assert _output_source(lambda x, m: m(torch.relu(x)), module) is after_relu
    assert _output_source(lambda x, m: m(x), module) is on_signed
