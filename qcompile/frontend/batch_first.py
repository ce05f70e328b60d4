"""The batch back on the first axis, where a model moves it away only to bring it back.

Sequence-first code (``nn.MultiheadAttention``'s default layout; CLIP's attention pooling turns a feature map into
``(HW)NC`` tokens with ``x.flatten(2).permute(2, 0, 1)``) permutes the batch off the first axis, computes, and
permutes it back. The passes and backends keep the batch first throughout (a transpose that moves it does not
lower), and for most operations the layout does not matter: ``op(x.permute(p)) == op'(x).permute(p')``. So each
permutation that moves the batch is moved past the operations reading it, one at a time, rewriting each for the
layout before the permutation (a dimension read, a constant operand permuted the other way, an index per axis):
permutations meet and compose, and where they cancel the batch never left. What it moves past:

- another permutation or transpose (they compose; the identity goes);
- elementwise functions of one tensor (activations, arithmetic with numbers, dropout), ``contiguous``;
- arithmetic, an elementwise max or min, and a matrix product, of tensors permuted alike (the product keeping its
  last two axes) or of a tensor and a constant (the constant permuted the other way, made the same rank first);
- a concatenation of tensors permuted alike; a softmax; a mean, sum, max or min over some axes, not the batch;
- indexing and slicing by integers and slices, not of the batch; ``squeeze`` / ``unsqueeze`` of one axis;
- dense layers and layer norms, whose last axes the permutation leaves in place.

A permutation that reaches anything else stays there, and the lowering names it as before.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.dropout import _DropoutNd

from qcompile.frontend.canonical import attribute_tensor
from qcompile.frontend.elementwise import arithmetic_kind, binary_extremum, unary_of
from qcompile.frontend.graph import (
    is_relu,
    matrix_product_operands,
    module_of,
    permutation,
    recorded_shape,
    tensor_rank,
)

_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin"})
_REDUCTION_FUNCTIONS = frozenset({torch.mean, torch.sum, torch.amax, torch.amin})
_CATS = (torch.cat, torch.concat, torch.concatenate)
# which operands change with the layout: the first alone (the others are weights, numbers, a learned exponent),
# every tensor (each permuted alike, or a constant that broadcasts), or every tensor permuted alike
_FIRST, _BROADCAST, _ALIKE = "first", "broadcast", "alike"


def _unchanged(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, kwargs


def _compact(axes: list[int]) -> list[int]:
    """Distinct axis numbers renumbered 0, 1, ... in their order (the axes left after some were removed)."""
    order = sorted(axes)
    return [order.index(a) for a in axes]


class _Sinker:
    """Permutations moved past their readers, with the ranks of the nodes made on the way (their shapes are
    recorded again after capture's rewrites)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.ranks: dict[fx.Node, int] = {}

    def rank(self, node: Any) -> int:
        return self.ranks.get(node, tensor_rank(node)) if isinstance(node, fx.Node) else -1

    def perm(self, node: Any) -> list[int] | None:
        rank = self.rank(node)
        return permutation(node, rank) if isinstance(node, fx.Node) and rank > 0 else None

    def constant(self, node: Any) -> bool:
        """Whether ``node`` reads attributes alone (a parameter, or in a training capture a computation on them)."""
        if not isinstance(node, fx.Node) or node.op in ("placeholder", "call_module"):
            return False
        return node.op == "get_attr" or all(self.constant(a) for a in node.all_input_nodes)

    def emit(self, at: fx.Node, op: str, target: Any, args: tuple, kwargs: dict | None = None,
             rank: int = -1, trace_of: fx.Node | None = None) -> fx.Node:
        with self.gm.graph.inserting_before(at):
            new = self.gm.graph.create_node(op, target, args, kwargs or {})
        new.meta["stack_trace"] = (trace_of or at).meta.get("stack_trace")
        self.ranks[new] = rank
        return new

    def permuted(self, at: fx.Node, x: fx.Node, perm: list[int], trace_of: fx.Node) -> fx.Node:
        if perm == sorted(perm):
            return x
        return self.emit(at, "call_method", "permute", (x, *perm), rank=len(perm), trace_of=trace_of)

    def step(self) -> bool:
        """Move one permutation that moves the batch past one of its readers; whether one moved."""
        for node in list(self.gm.graph.nodes):
            perm = self.perm(node)
            if perm is None or perm[0] == 0:
                continue
            for user in list(node.users):
                if (out := self.sunk(user, node, perm)) is not None:
                    if out in self.ranks:  # a node made here: it has the reader's shape
                        out.meta.update({k: v for k, v in user.meta.items() if k != "stack_trace"})
                    inputs = user.all_input_nodes
                    user.replace_all_uses_with(out)
                    self.gm.graph.erase_node(user)
                    for a in inputs:  # this permutation, and any other one permuted alike that it read
                        if not a.users and self.perm(a) is not None:
                            self.gm.graph.erase_node(a)
                    return True
        return False

    def sunk(self, u: fx.Node, moved: fx.Node, perm: list[int]) -> fx.Node | None:
        """The nodes computing ``u`` with ``moved``'s permutation after it (None where it cannot move past)."""
        x, r = moved.args[0], len(perm)
        if (after := self.perm(u)) is not None and u.args[0] is moved:
            return self.permuted(u, x, [perm[i] for i in after], moved)
        rule = self.rule(u, perm)
        if rule is None:
            return None
        rewrite, out_perm, mode, last = rule
        before = None
        if last and perm[r - last:] != list(range(r - last, r)):
            if 0 in perm[r - last:]:
                return None
            # split: a permutation keeping the batch first that puts the last axes in place, then the rest
            before = [0, *(a for a in perm if a != 0 and a not in perm[r - last:]), *perm[r - last:]]
            out_perm = [before.index(a) for a in perm]
        operands = self.operands(u, moved, perm, r, mode, before)
        if operands is None or (mode == _FIRST and u.args[0] is not moved):
            return None
        args, kwargs = fx.node.map_arg((u.args, u.kwargs), lambda a: operands.get(a, a))
        args, kwargs = rewrite(args, kwargs)
        inner = self.emit(u, u.op, u.target, args, kwargs, rank=len(out_perm), trace_of=u)
        return self.permuted(u, inner, out_perm, moved)

    def operands(self, u: fx.Node, moved: fx.Node, perm: list[int], r: int, mode: str,
                 before: list[int] | None) -> dict[fx.Node, fx.Node] | None:
        """Each tensor operand of ``u`` in the layout before ``perm`` (or after ``before``, where the permutation
        was split): a tensor permuted alike is its input (so permuted); in :data:`_BROADCAST` mode, a constant is
        permuted the other way (made rank ``r`` first); in :data:`_FIRST` mode the other operands stay. None if an
        operand is neither."""
        def base(a: fx.Node) -> fx.Node:
            return a.args[0] if before is None else self.emit(u, "call_method", "permute", (a.args[0], *before),
                                                              rank=r, trace_of=a)

        if mode == _FIRST:
            return {moved: base(moved)}
        layout = perm if before is None else [before.index(a) for a in perm]
        inverse = [layout.index(i) for i in range(r)]
        found: dict[fx.Node, fx.Node] = {}
        for a in u.all_input_nodes:
            if self.perm(a) == perm:
                found[a] = base(a)
            elif mode == _BROADCAST and self.constant(a) and (shape := self.shape(a)) is not None and len(shape) <= r:
                full = (1,) * (r - len(shape)) + shape
                # a reshape where only axes of size 1 move (a bias vector): no permutation to mistake for the batch's
                if [i for i in inverse if full[i] != 1] == sorted(i for i in inverse if full[i] != 1):
                    found[a] = self.emit(u, "call_method", "reshape", (a, *(full[i] for i in inverse)), rank=r)
                    continue
                c = a if len(shape) == r else self.emit(u, "call_method", "reshape", (a, *full), rank=r)
                found[a] = self.emit(u, "call_method", "permute", (c, *inverse), rank=r)
            else:
                return None
        return found

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        if node.op == "get_attr":
            t = attribute_tensor(self.gm, node)
            return None if t is None else tuple(t.shape)
        return recorded_shape(node)

    def rule(self, u: fx.Node, perm: list[int]) -> tuple[Any, list[int], str, int] | None:
        """How ``u``'s arguments change for the layout before ``perm``, the permutation after it, which of its
        operands change (:data:`_FIRST`, :data:`_BROADCAST`, :data:`_ALIKE`) and how many last axes it needs in
        place (a dense layer its features, a layer norm its normalised axes, a matrix product its matrices: a
        permutation that moves them is split into one that keeps the batch first and puts them in place, and the
        rest, which moves on); None where it cannot move past."""
        same = _unchanged, perm, _FIRST, 0
        m = module_of(self.gm, u)
        if m is not None:
            if isinstance(m, nn.Linear):
                return _unchanged, perm, _FIRST, 1
            if isinstance(m, nn.LayerNorm):
                return _unchanged, perm, _FIRST, len(m.normalized_shape)
            return same if isinstance(m, _DropoutNd | nn.Identity) or unary_of(self.gm, u) or is_relu(self.gm, u) \
                else None
        if u.op == "call_function" and u.target is F.linear:
            return _unchanged, perm, _FIRST, 1
        if unary_of(self.gm, u) is not None or is_relu(self.gm, u) or (u.op == "call_method" and u.target in (
                "contiguous", "clone")):
            return same
        if arithmetic_kind(u) is not None or binary_extremum(u) is not None:
            return _unchanged, perm, _BROADCAST, 0
        if matrix_product_operands(u) is not None:
            return _unchanged, perm, _ALIKE, 2
        rule = self.axis_rule(u, perm)
        return None if rule is None else (*rule, 0)

    def axis_rule(self, u: fx.Node, perm: list[int]) -> tuple[Any, list[int], str] | None:
        """Rules for the operations that name axes: concatenation, softmax, reductions, indexing, squeezes."""
        r = len(perm)
        method, function = u.op == "call_method", u.op == "call_function"
        if function and u.target in _CATS and len(u.args) >= 1:
            dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
            if not isinstance(dim, int) or "out" in u.kwargs:
                return None
            return (lambda args, kwargs: ((args[0], perm[dim % r]), {})), perm, _ALIKE
        if (method and u.target == "softmax") or (function and u.target in (F.softmax, torch.softmax)):
            dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
            if not isinstance(dim, int) or len(u.args) > 2 or set(u.kwargs) - {"dim"}:
                return None
            return (lambda args, kwargs: ((args[0], perm[dim % r]), {})), perm, _FIRST
        if (method and u.target in _REDUCTIONS) or (function and u.target in _REDUCTION_FUNCTIONS):
            return self.reduction_rule(u, perm)
        if function and u.target is operator.getitem:
            return self.index_rule(u, perm)
        if (method and u.target == "squeeze") or (function and u.target is torch.squeeze):
            dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
            if not isinstance(dim, int) or perm[dim % r] == 0:
                return None
            gone = perm[dim % r]
            return (lambda args, kwargs: ((args[0], gone), {})), _compact([a for a in perm if a != gone]), _FIRST
        if (method and u.target == "unsqueeze") or (function and u.target is torch.unsqueeze):
            dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
            if not isinstance(dim, int):
                return None
            at = dim % (r + 1)
            return (lambda args, kwargs: ((args[0], r), {})), [*perm[:at], r, *perm[at:]], _FIRST
        return None

    def reduction_rule(self, u: fx.Node, perm: list[int]) -> tuple[Any, list[int], str] | None:
        r = len(perm)
        names = ("input", "dim", "keepdim")
        given = dict(zip(names, u.args)) | dict(u.kwargs)
        dims = given.get("dim")
        if set(given) - set(names) or dims is None:
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            return None
        moved_dims = [perm[d % r] for d in dims]
        if 0 in moved_dims:
            return None
        keep = bool(given.get("keepdim", False))
        out_perm = perm if keep else _compact([a for a in perm if a not in moved_dims])

        def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return (args[0], moved_dims), {"keepdim": keep}

        return rewrite, out_perm, _FIRST

    def index_rule(self, u: fx.Node, perm: list[int]) -> tuple[Any, list[int], str] | None:
        r = len(perm)
        index = u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],)
        if len(index) > r or not all(isinstance(i, int | slice) and not isinstance(i, bool) for i in index):
            return None
        if any(isinstance(i, slice) and not all(isinstance(v, int | None) for v in (i.start, i.stop, i.step))
               for i in index):
            return None
        moved_index: list[Any] = [slice(None)] * r
        for i, e in enumerate(index):
            moved_index[perm[i]] = e
        if moved_index[0] != slice(None):
            return None
        gone = {perm[i] for i, e in enumerate(index) if isinstance(e, int)}
        last = max((i for i, e in enumerate(moved_index) if e != slice(None)), default=-1)
        return ((lambda args, kwargs: ((args[0], tuple(moved_index[:last + 1])), {})),
                _compact([a for a in perm if a not in gone]), _FIRST)


def batch_kept_first(gm: fx.GraphModule) -> bool:
    """Each permutation that moves the batch off the first axis moved past the operations above until it meets
    another or one it cannot pass; whether any moved."""
    sinker = _Sinker(gm)
    changed = False
    while sinker.step():
        changed = True
    for node in reversed(list(gm.graph.nodes)):  # what only a permutation left behind read, as a dtype
        dead_read = node.op == "call_function" and node.target is getattr
        if not node.users and (dead_read or (changed and sinker.perm(node) is not None)):
            gm.graph.erase_node(node)
    return changed
