"""Golden numbers for the paper's cost models (docs/numerics.md, cost models: the paper, sec. 4)."""

import pytest
import torch
from qcompile.passes import AnnotateCost, AssignPrecision

from qcompile import Pipeline, get_recipe
from qcompile.models import resnet18, resnet50
from qcompile.quantization.cost import hardware_bits, layer_cost
from qcompile.quantization.spec import Precision

RESNET50_MACS = 4_089_184_256


def costs(model, shape, recipe, device="cpu"):
    res = Pipeline([AssignPrecision(), AnnotateCost()]).run(
        model.to(device).eval(), torch.empty(shape, device=device), recipe=get_recipe(recipe))
    return res.context.cost


@pytest.fixture(scope="module")
def r50():
    return {r: costs(resnet50(), (1, 3, 224, 224), r, "meta") for r in ("bf16", "int8", "int4", "mostly4bit")}


def test_resnet50_macs_golden(r50):
    assert r50["bf16"].macs == RESNET50_MACS


def test_resnet50_macs_at_batch_256():
    assert costs(resnet50(), (256, 3, 224, 224), "bf16", "meta").macs == 1_046_831_169_536


def test_resnet50_ratios(r50):
    assert r50["int8"].vs_bf16("linear") == 0.5
    assert r50["int4"].vs_bf16("linear") == 0.25
    assert r50["int4"].vs_bf16("quadratic") == 0.0625
    assert r50["int8"].vs_bf16("quadratic") == 0.25
    for recipe, bits in (("bf16", 16), ("int8", 8), ("int4", 4)):
        assert r50[recipe].memory_bits == r50[recipe].params * bits


def _resnet18_layers() -> list[tuple[int, int, int, int]]:
    """(kernel, cin, cout, output side) of every conv in ResNet-18 at 224x224, written out by hand."""
    layers = [(7, 3, 64, 112)]
    cin = 64
    for cout, side, first_stride in ((64, 56, 1), (128, 28, 2), (256, 14, 2), (512, 7, 2)):
        for block in range(2):
            layers.append((3, cin, cout, side))
            layers.append((3, cout, cout, side))
            if block == 0 and (first_stride != 1 or cin != cout):
                layers.append((1, cin, cout, side))
            cin = cout
    return layers


def test_resnet18_mostly4bit_by_hand():
    convs = _resnet18_layers()
    conv_macs = [k * k * ci * co * s * s for k, ci, co, s in convs]
    first, fc = conv_macs[0], 512 * 1000
    total = sum(conv_macs) + fc
    weights = [k * k * ci * co for k, ci, co, _ in convs]
    params = sum(weights) + 512 * 1000
    eight = first + fc
    four = total - eight
    c = costs(resnet18(), (1, 3, 224, 224), "mostly4bit", "meta")
    assert c.macs == total == 1_814_073_344
    assert c.params == params
    assert c.vs_bf16("linear") == pytest.approx((8 * eight + 4 * four) / (16 * total), rel=1e-15)
    assert c.vs_bf16("quadratic") == pytest.approx((64 * eight + 16 * four) / (256 * total), rel=1e-15)
    assert c.memory_bits == 8 * (weights[0] + 512 * 1000) + 4 * (params - weights[0] - 512 * 1000)


def test_hardware_bits_and_layer_cost():
    assert [hardware_bits(b) for b in (2, 4, 5, 8, 16)] == [4, 4, 8, 8, 16]
    c = layer_cost(100, 10, Precision(4, 8))
    assert (c.linear, c.quadratic, c.memory_bits) == (800, 3200, 40)


def test_shared_module_stores_weights_once():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    res = Pipeline([AssignPrecision(), AnnotateCost()]).run(Twice(), torch.randn(1, 4, 8, 8), recipe=get_recipe("int8"))
    c = res.context.cost
    assert c.macs == 2 * 9 * 16 * 64 and c.params == 144 and c.memory_bits == 144 * 8


class NonLocalCost(torch.nn.Module):
    """A 1×1 conv to 4 channels on an 8×8 map, then a non-local block's two products of positions: (64×4)(4×64)
    and (64×64)(64×4), 16,384 MACs each."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1, bias=False)
        self.fc = torch.nn.Linear(4, 10, bias=False)

    def forward(self, x):
        t = self.conv(x).flatten(2)  # (N, 4, 64)
        a = torch.softmax(t.transpose(1, 2) @ t, dim=-1)  # (N, 64, 64)
        y = a @ t.transpose(1, 2)  # (N, 64, 4)
        return self.fc(y.mean(1))


@pytest.mark.parametrize("recipe, layer_bits, product_bits", [("bf16", 16, 16), ("mostly4bit", 8, 8),
                                                              ("int4", 4, 8)])
def test_products_of_two_tensors_cost_their_macs_at_the_residual_width(recipe, layer_bits, product_bits):
    c = costs(NonLocalCost(), (1, 3, 8, 8), recipe)
    layers, products = 3 * 4 * 64 + 4 * 10, 2 * 64 * 64 * 4
    assert c.macs == layers + products and c.params == 3 * 4 + 4 * 10
    assert c.linear == layer_bits * layers + product_bits * products
    assert c.quadratic == layer_bits ** 2 * layers + product_bits ** 2 * products
    assert c.memory_bits == layer_bits * c.params
