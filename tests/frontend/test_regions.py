"""Elementwise regions: a function of one tensor written with comparisons, ``torch.where`` or an elementwise max
or min becomes one module at capture; a join of two different tensors stays as written."""

import torch
import torch.nn.functional as F
from torch import nn

from qcompile import capture
from qcompile.frontend.graph import ElementwiseRegion


class Joins(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        leaky = torch.where(a > 0, a, 0.1 * a)  # one tensor: fused
        clipped = torch.minimum(torch.maximum(F.relu(b), b * 0.5), torch.ones_like(b))  # one tensor: fused
        maxout = torch.max(a, b)  # two tensors: as written
        gated = torch.where(b > 0, a, b)  # two tensors: as written
        return leaky + clipped + maxout + gated


def test_joins_of_one_tensor_fuse_and_joins_of_two_stay():
    model = Joins().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, x)
    regions = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                  ElementwiseRegion)]
    assert [n.args[0].target for n in regions] == ["a", "b"]
    calls = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.max in calls and torch.where in calls  # the two-tensor joins
    assert torch.equal(gm(x), model(x))
