import pytest
import torch
from torch import fx, nn

from qcompile.frontend.elementwise import arithmetic_kind


class Forms(nn.Module):
    def forward(self, x, y):
        a = x - y
        b = torch.div(a, y)
        c = b.mul(y)
        c -= y
        d = c.add_(y)
        return d + 2


@pytest.mark.parametrize(("inplace", "kinds"), [
    (False, ["sub", "div", "mul", "sub", None, "add"]),  # fx records `c -= y` as `c - y`
    (True, ["sub", "div", "mul", "sub", "add", "add"]),
])
def test_arithmetic_kind_in_every_form(inplace, kinds):
    nodes = [n for n in fx.symbolic_trace(Forms()).graph.nodes if n.op in ("call_function", "call_method")]
    assert [arithmetic_kind(n, inplace=inplace) for n in nodes] == kinds
