"""``torch.einsum`` → the sums, permutes, reshapes and matrix products it computes.

Attention and lambda layers written with einsum (``torch.einsum("bcn,bcm->bnm", q, k)``) compute products the
passes and backends already know: a batched matrix product of two tensors (:func:`qcompile.frontend.graph.is_matmul`)
or, where one operand is a weight (``torch.einsum("bc,kc->bk", x, self.w)``), a dense layer. Each einsum becomes
them, operand by operand from the left: the indices two operands share and the output (or a later operand) keeps
are the product's batch, the ones they share and nothing later reads are summed over, the rest are its rows and
columns. An index only one operand has and nothing later reads is summed away first. The batch keeps the first
operand's order, so a model's sample index (first in each operand and in the output) stays first, and the
reshapes fold the rest of the batch into it (``-1``) as at any batch size.

Left as written (and the lowering names it): diagonals (an index twice in one operand), operands that broadcast
against each other, and a product with a weight that shares an index with the output (a per-head weight, which
is no one dense layer).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from qcompile.frontend.graph import each_rewritten, inserted_before, recorded_shape


@dataclass(frozen=True)
class Equation:
    """An einsum equation with ``...`` spelled out: one index per dimension of each operand and of the output
    (the dimensions an ellipsis covers are named from the right, ``.0`` the last, as they broadcast)."""

    operands: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]


def _indices(term: str, rank: int) -> tuple[str, ...] | None:
    head, dots, tail = term.partition("...")
    if "." in head + tail or not all(c in string.ascii_letters for c in head + tail):
        return None
    covered = rank - len(head) - len(tail)
    if covered < 0 or (covered and not dots):
        return None
    return (*head, *(f".{i}" for i in reversed(range(covered))), *tail)


def parse_equation(equation: str, ranks: Sequence[int]) -> Equation | None:
    """The indices of each operand (of the given ranks) and of the output, torch's implicit output (the ellipsis,
    then the indices that occur once, in alphabetical order) where there is no ``->``; None if it does not parse
    or holds a diagonal."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ranks):
        return None
    operands = tuple(_indices(t, r) for t, r in zip(terms, ranks))
    if any(o is None or len(set(o)) != len(o) for o in operands):
        return None
    seen = [i for o in operands for i in o]  # type: ignore[union-attr]
    ellipsis = tuple(f".{i}" for i in reversed(range(max((int(i[1:]) + 1 for i in seen if i[0] == "."),
                                                          default=0))))
    if arrow:
        out = _indices(output, len(output.replace("...", "")) + len(ellipsis))
    else:
        out = (*ellipsis, *sorted(i for i in set(seen) if seen.count(i) == 1 and i[0] != "."))
    if out is None or len(set(out)) != len(out) or not set(out) <= set(seen):
        return None
    return Equation(operands, out)  # type: ignore[arg-type]


def _operands(node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    if node.op != "call_function" or node.target is not torch.einsum or node.kwargs or not node.args:
        return None
    equation, rest = node.args[0], list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    if not isinstance(equation, str) or not rest or not all(isinstance(a, fx.Node) for a in rest):
        return None
    return equation, rest


class _Builder:
    """Emits the rewrite of one einsum before it, each new node carrying its source line."""

    def __init__(self, einsum: fx.Node, sizes: dict[str, int]) -> None:
        self.einsum, self.sizes = einsum, sizes

    def method(self, name: str, *args: object) -> fx.Node:
        return self.emit("call_method", name, args)

    def emit(self, op: str, target: object, args: tuple[object, ...]) -> fx.Node:
        return inserted_before(self.einsum, op, target, args)

    def arrange(self, x: fx.Node, have: tuple[str, ...], want: tuple[str, ...]) -> fx.Node:
        """``x`` (indices ``have``) with its dimensions in the order ``want``."""
        order = tuple(have.index(i) for i in want)
        return x if order == tuple(range(len(order))) else self.method("permute", x, *order)

    def summed(self, x: fx.Node, have: tuple[str, ...], keep: set[str]) -> tuple[fx.Node, tuple[str, ...]]:
        gone = tuple(d for d, i in enumerate(have) if i not in keep)
        if not gone:
            return x, have
        return self.method("sum", x, gone), tuple(i for i in have if i in keep)

    def reshaped(self, x: fx.Node, groups: Sequence[Sequence[str]], first_free: bool) -> fx.Node:
        """``x`` (its indices the groups' in order) reshaped to one size per group of indices, the first ``-1``
        (the batch, at any batch size) where ``first_free``."""
        if all(len(g) == 1 for g in groups):
            return x
        sizes = [math.prod(self.sizes[i] for i in g) for g in groups]
        return self.method("reshape", x, *([-1] if first_free else sizes[:1]), *sizes[1:])

    def split(self, x: fx.Node, groups: Sequence[Sequence[str]]) -> tuple[fx.Node, tuple[str, ...]]:
        """``x`` (one dimension per group of indices) with one dimension per index, and its indices."""
        indices = tuple(i for g in groups for i in g)
        if all(len(g) == 1 for g in groups):
            return x, indices
        return self.method("reshape", x, -1, *(self.sizes[i] for i in indices[1:])), indices

    def product(self, a: fx.Node, a_idx: tuple[str, ...], b: fx.Node, b_idx: tuple[str, ...],
                keep: set[str]) -> tuple[fx.Node, tuple[str, ...]] | None:
        """``a`` times ``b`` summed over the indices they share that ``keep`` lacks, and its indices."""
        a, a_idx = self.summed(a, a_idx, keep | set(b_idx))
        b, b_idx = self.summed(b, b_idx, keep | set(a_idx))
        if a.op == "get_attr" and b.op != "get_attr":
            a, a_idx, b, b_idx = b, b_idx, a, a_idx
        batch = tuple(i for i in a_idx if i in b_idx and i in keep)
        summed = tuple(i for i in a_idx if i in b_idx and i not in keep)
        rows = tuple(i for i in a_idx if i not in b_idx)
        cols = tuple(i for i in b_idx if i not in a_idx)
        if b.op == "get_attr":
            if batch or not rows:
                return None  # a weight per batch index is no one dense layer
            left = self.reshaped(self.arrange(a, a_idx, rows + summed), [rows, summed], True)
            weight = self.reshaped(self.arrange(b, b_idx, cols + summed), [cols, summed], False)
            return self.split(self.emit("call_function", F.linear, (left, weight)), [rows, cols])
        if not batch:
            return None  # the product would mix the samples of the batch
        left = self.reshaped(self.arrange(a, a_idx, batch + rows + summed), [batch, rows, summed], True)
        right = self.reshaped(self.arrange(b, b_idx, batch + summed + cols), [batch, summed, cols], True)
        return self.split(self.method("matmul", left, right), [batch, rows, cols])


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node computing ``node``'s einsum from products, or None (nothing emitted) where it is left."""
    found = _operands(node)
    if found is None:
        return None
    equation, operands = found
    shapes = [recorded_shape(o) for o in operands]
    if any(s is None for s in shapes) or recorded_shape(node) is None:
        return None
    eq = parse_equation(equation, [len(s) for s in shapes])  # type: ignore[arg-type]
    if eq is None:
        return None
    sizes: dict[str, int] = {}
    for idx, shape in zip(eq.operands, shapes):
        for i, size in zip(idx, shape):  # type: ignore[arg-type]
            if sizes.setdefault(i, size) != size:
                return None  # broadcasting
    mark = node.prev
    build = _Builder(node, sizes)
    x, x_idx = build.summed(operands[0], eq.operands[0], set(eq.output).union(*eq.operands[1:]))
    for k in range(1, len(operands)):
        later = set(eq.output).union(*eq.operands[k + 1:])
        done = build.product(x, x_idx, operands[k], eq.operands[k], later)
        if done is None:
            _erase_after(gm.graph, mark, node)
            return None
        x, x_idx = done
    return build.arrange(x, x_idx, eq.output)


def _erase_after(graph: fx.Graph, mark: fx.Node, stop: fx.Node) -> None:
    """Erase the nodes emitted between ``mark`` and ``stop``, last first."""
    emitted = []
    n = mark.next
    while n is not stop:
        emitted.append(n)
        n = n.next
    for n in reversed(emitted):
        graph.erase_node(n)


def einsums_as_products(gm: fx.GraphModule) -> bool:
    """Rewrite each einsum of ``gm`` that has the forms above (needs the recorded shapes); whether any changed."""
    return each_rewritten(gm, _rewrite)
