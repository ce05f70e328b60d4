"""einsum → sums, permutes, reshapes and matrix products: the rewritten graph computes what torch.einsum does, for
equations drawn at random, and the forms it leaves are named by the lowering."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qcompile import capture
from qcompile.frontend.einsum import Equation, parse_equation
from qcompile.frontend.graph import compute_nodes


@pytest.mark.parametrize("equation, ranks, expected", [
    ("bcn,bcm->bnm", (3, 3), ((("b", "c", "n"), ("b", "c", "m")), ("b", "n", "m"))),
    ("b u k m, b u v m -> b k v", (4, 4), ((tuple("bukm"), tuple("buvm")), tuple("bkv"))),
    ("bc,kc", (2, 2), ((tuple("bc"), tuple("kc")), tuple("bk"))),  # implicit: once-only indices, sorted
    ("bC,Kc", (2, 2), ((tuple("bC"), tuple("Kc")), tuple("CKbc"))),  # upper case sorts first, as in torch
    ("...dn,...en->...de", (4, 3), (((".1", ".0", "d", "n"), (".0", "e", "n")), (".1", ".0", "d", "e"))),
    ("...ij,...jk", (3, 2), (((".0", "i", "j"), ("j", "k")), (".0", "i", "k"))),
    ("bchw->bhwc", (4,), ((tuple("bchw"),), tuple("bhwc"))),
])
def test_equations_parse_with_ellipsis_and_implicit_outputs(equation, ranks, expected):
    operands, output = expected
    assert parse_equation(equation, ranks) == Equation(operands, output)


@pytest.mark.parametrize("equation, ranks", [
    ("bii->bi", (3,)),  # a diagonal
    ("bc,kc->bk", (2,)),  # operands missing
    ("bc,kc->bz", (2, 2)),  # an output index no operand has
    ("bc,kc->bkk", (2, 2)),
    ("bc->bc", (3,)),  # a rank the term does not name
    ("b1,kc->bk", (2, 2)),
])
def test_equations_that_are_not_rewritten_do_not_parse(equation, ranks):
    assert parse_equation(equation, ranks) is None


class Einsum(nn.Module):
    """``torch.einsum(equation, ...)`` of the inputs given (times 1: computed tensors, as in a model), and of a
    weight (first or last) where there is one."""

    def __init__(self, equation: str, weight: torch.Tensor | None = None, weight_first: bool = False) -> None:
        super().__init__()
        self.equation, self.weight_first = equation, weight_first
        self.weight = None if weight is None else nn.Parameter(weight)

    def forward(self, a, b=None, c=None):
        operands = [x * 1.0 for x in (a, b, c) if x is not None]
        if self.weight is not None:
            operands.insert(0 if self.weight_first else len(operands), self.weight)
        return torch.einsum(self.equation, *operands)


def _einsums(gm) -> int:
    return sum(n.op == "call_function" and n.target is torch.einsum for n in gm.graph.nodes)


@st.composite
def products(draw, operands: int):
    """An equation over ``operands`` tensors whose first index, the batch, every operand and the output have,
    with indices of every kind (shared and kept, summed, one operand's alone, summed away alone), and the
    operands' sizes."""
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    sizes = {"b": draw(st.integers(1, 3))}
    terms = [["b"] for _ in range(operands)]
    output = []
    for _ in range(draw(st.integers(0, 5))):
        i = next(letters)
        if i == "b":
            i = next(letters)
        sizes[i] = draw(st.integers(1, 3))
        holders = draw(st.sets(st.integers(0, operands - 1), min_size=1))
        for k in holders:
            terms[k].insert(draw(st.integers(1, len(terms[k]))), i)
        if draw(st.booleans()):
            output.append(i)
    output = ["b", *draw(st.permutations(output))]
    equation = ",".join("".join(t) for t in terms) + "->" + "".join(output)
    return equation, [tuple(sizes[i] for i in t) for t in terms]


@pytest.mark.parametrize("operands, examples", [(2, 40), (3, 20)])
def test_products_are_rewritten_and_compute_the_einsum_at_any_batch_size(operands, examples):
    @settings(max_examples=examples, deadline=None)
    @given(products(operands), st.integers(0, 2**31 - 1))
    def check(case, seed):
        equation, shapes = case
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(s, generator=g) for s in shapes]
        gm = capture(Einsum(equation).eval(), xs)
        assert _einsums(gm) == 0, equation
        torch.testing.assert_close(gm(*xs), torch.einsum(equation, *xs), rtol=1e-5, atol=1e-5)
        larger = [torch.randn((s[0] + 2, *s[1:]), generator=g) for s in shapes]  # the batch is free in the reshapes
        torch.testing.assert_close(gm(*larger), torch.einsum(equation, *larger), rtol=1e-5, atol=1e-5)

    check()


@pytest.mark.parametrize("equation, x_shape, w_shape, weight_first", [
    ("bc,kc->bk", (2, 6), (4, 6), False),  # a classifier on the transposed weight: the weight itself
    ("bchw,oc->bohw", (2, 6, 3, 5), (4, 6), False),  # a 1×1 conv: rows b, h, w; the output permuted back
    ("nmku,buvm->bnkv", (2, 1, 3, 6), (4, 6, 2, 1), True),  # a lambda layer's position lambdas: the weight first
])
def test_a_product_with_a_weight_is_a_dense_layer(equation, x_shape, w_shape, weight_first):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(x_shape, generator=g), torch.randn(w_shape, generator=g)
    gm = capture(Einsum(equation, w, weight_first).eval(), x)
    assert _einsums(gm) == 0
    assert [type(gm.get_submodule(str(n.target))) for n in compute_nodes(gm)] == [nn.Linear]
    expected = torch.einsum(equation, w, x) if weight_first else torch.einsum(equation, x, w)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation, shapes, weight", [
    ("bii->bi", [(2, 3, 3)], None),  # a diagonal
    ("bij,bjk->bik", [(2, 3, 4), (1, 4, 5)], None),  # the batch broadcasts
    ("bhd,hd->bh", [(2, 3, 4)], (3, 4)),  # a weight per head: no one dense layer
])
def test_forms_without_products_are_left_for_the_lowering_to_name(equation, shapes, weight):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=g) for s in shapes]
    w = None if weight is None else torch.randn(weight, generator=g)
    model = Einsum(equation, w).eval()
    gm = capture(model, xs)
    assert _einsums(gm) == 1
    torch.testing.assert_close(gm(*xs), model(*xs))
