"""Elementwise functions of one tensor written with comparisons, ``torch.where`` or an elementwise max or min of
two values, fused into one :class:`~qcompile.frontend.graph.ElementwiseRegion` at capture.

``torch.where(x > 0, x, 0.1 * x)`` and ``torch.maximum(x, 0.1 * x)`` are leaky ReLUs; ``torch.where(x < 0,
torch.zeros_like(x), x)`` is a ReLU. Each operation alone reads two tensors (or makes a boolean one), which the
integer IR has no op for, but together they are a function of ``x`` alone, which lowers as a table of its codes.
Only regions holding such a join are fused: every other elementwise spelling lowers as it did.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.frontend.elementwise import arithmetic_kind, unary_of
from qcompile.frontend.graph import ElementwiseRegion, is_relu, target_name, unused_name

_COMPARISONS = {operator.gt, operator.lt, operator.ge, operator.le, torch.gt, torch.lt, torch.ge, torch.le,
                "gt", "lt", "ge", "le"}
_JOINS = {torch.where, torch.maximum, torch.minimum, torch.max, torch.min, torch.fmax, torch.fmin,
          "where", "maximum", "minimum", "max", "min", "fmax", "fmin"}
_LIKE = {torch.zeros_like, torch.ones_like, torch.full_like}


def _target(node: fx.Node) -> object:
    return node.target if node.op in ("call_function", "call_method") else None


def _tensors(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def _is_join(node: fx.Node) -> bool:
    """A where, or a max / min of two tensors (not a reduction over a dimension)."""
    t = _target(node)
    return t in _JOINS and (t in (torch.where, "where") or (len(_tensors(node)) == 2 and len(node.args) == 2))


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node a region may hold: a join, a comparison with a number, ``zeros_like`` and the like, arithmetic of
    two values, a ReLU or another unary function of one."""
    t = _target(node)
    if _is_join(node) or t in _LIKE:
        return True
    if t in _COMPARISONS:
        return len(_tensors(node)) == 1 and not node.kwargs
    return arithmetic_kind(node) is not None or unary_of(gm, node) is not None or is_relu(gm, node)


def _region(gm: fx.GraphModule, join: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, list[fx.Node]] | None:
    """The one tensor the elementwise operations above ``join`` read and those operations in graph order, up to
    the nearest value every path from ``join`` passes through; None when no such value is reached through
    elementwise operations alone."""
    members, heads = [join], set(_tensors(join))
    while len(heads) > 1:
        head = max(heads, key=order.__getitem__)  # the latest: every other path must reach past it
        if head.op in ("placeholder", "get_attr") or not _elementwise(gm, head):
            return None
        heads.remove(head)
        members.append(head)
        heads |= set(_tensors(head))
    if not heads or next(iter(heads)).op == "get_attr":
        return None
    return heads.pop(), sorted(members, key=order.__getitem__)


def elementwise_regions_fused(gm: fx.GraphModule) -> None:
    """Each join (``torch.where``, an elementwise max or min of two values) whose operations read one tensor →
    one :class:`ElementwiseRegion` call on that tensor."""
    for join in [n for n in gm.graph.nodes if _is_join(n)]:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        found = _region(gm, join, order) if join in order else None
        if found is None:
            continue
        root, members = found
        region = fx.Graph()
        env = {root: region.placeholder("x")}
        for n in members:
            env[n] = region.node_copy(n, env.__getitem__)
        region.output(env[join])
        name = unused_name(f"{join.name}_region", {m for m, _ in gm.named_modules()}.__contains__)
        gm.add_submodule(name, ElementwiseRegion(fx.GraphModule(gm, region), f"{target_name(join)} of one tensor"))
        with gm.graph.inserting_before(join):
            call = gm.graph.call_module(name, (root,))
        call.meta.update(join.meta)
        join.replace_all_uses_with(call)
        gm.graph.erase_node(join)
        gm.graph.eliminate_dead_code()

