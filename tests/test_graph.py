"""graph.regions: the blocks block-wise AdaQuant optimises together."""

import torch
from torch import nn

from qcompile import capture
from qcompile.graph import compute_nodes, is_compute, layer_names, regions
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
