import pytest
import torch
from torch import fx, nn

from qcompile.frontend.elementwise import arithmetic_kind, unary_of


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


class NumberFirst(nn.Module):
    def forward(self, x):
        return (1 + torch.sigmoid(x)) * (6.0 - x) * (2 * x) / (1.0 / (x + 0.5)) + (x / 3 - 1)


def test_arithmetic_with_a_number_on_either_side_is_a_unary_function():
    """``1 + sigmoid(x)`` (BAM's gate), ``6 - x``, ``2 * x``, ``1 / x``: each the function of its one tensor."""
    gm = fx.symbolic_trace(NumberFirst())
    x = torch.linspace(-2.0, 2.0, 9)
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, expected in (("add", 1 + x), ("sub", 6.0 - x), ("mul_1", 2 * x), ("truediv", 1.0 / x),
                           ("add_1", x + 0.5), ("truediv_2", x / 3), ("sub_1", x - 1)):
        u = unary_of(gm, by_name[name])
        assert u is not None and torch.allclose(u.fn(x), expected), name
    assert unary_of(gm, by_name["mul"]) is None  # a product of two tensors
