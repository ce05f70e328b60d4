"""einops' ``rearrange`` and ``reduce`` (functions and ``einops.layers.torch`` layers) → the reshapes, permutes
and reductions their patterns spell.

Model code from the wild moves axes with einops (``rearrange(x, "b c h w -> b (h w) c")``,
``Rearrange("b (h w) c -> b c h w", h=8)``, ``reduce(x, "b c h w -> b c", "mean")``). einops cannot run on
torch.fx's proxies, so capture records each call as one node (:data:`FUNCTIONS`, :data:`LAYERS`); once the shapes
are known, each becomes a reshape to the pattern's elementary axes, a reduction over the axes the output lacks,
a permute into the output's order and a reshape into its groups, each step only where it changes something,
the batch kept a free size (``-1``). Left as written (and then refused by the lowering): patterns whose first
axis is not the batch on both sides, ``repeat``, anonymous axes other than ``1`` and ``()``, and reductions other
than mean, sum, max and min.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import fx, nn

from qcompile.frontend.graph import each_rewritten, inserted_before, recorded_shape

try:  # an optional dependency of the user's model, not of qcompile
    import einops
    from einops.layers.torch import Rearrange, Reduce
except ImportError:  # pragma: no cover - exercised where einops is missing
    einops = None

MODULES: tuple[ModuleType, ...] = (einops,) if einops is not None else ()
"""Modules whose functions capture records as calls (torch.fx ``autowrap_modules``)."""
FUNCTIONS: tuple[Any, ...] = (einops.rearrange, einops.reduce) if einops is not None else ()
LAYERS: tuple[type[nn.Module], ...] = (Rearrange, Reduce) if einops is not None else ()
_REDUCTIONS = {"mean": "mean", "sum": "sum", "max": "amax", "min": "amin"}


@dataclass(frozen=True)
class Pattern:
    """A pattern's groups of elementary axes on each side (a group of none: an axis of size 1)."""

    left: tuple[tuple[str, ...], ...]
    right: tuple[tuple[str, ...], ...]


def _groups(side: str, rank: int | None) -> tuple[tuple[str, ...], ...] | None:
    tokens = re.findall(r"\(|\)|\.\.\.|[A-Za-z_][A-Za-z0-9_]*|\d+|\S", side)
    groups: list[tuple[str, ...]] = []
    current: list[str] | None = None
    for t in tokens:
        if t == "(":
            if current is not None:
                return None
            current = []
        elif t == ")":
            if current is None:
                return None
            groups.append(tuple(current))
            current = None
        elif t == "1" or t == "..." or t.isidentifier():
            axes = [] if t == "1" else [t]
            if current is None:
                groups.append(tuple(axes))
            else:
                current.extend(axes)
        else:
            return None
    if current is not None:
        return None
    return tuple(groups) if rank is None else _spelled_out(tuple(groups), rank)


def _spelled_out(groups: tuple[tuple[str, ...], ...], rank: int) -> tuple[tuple[str, ...], ...] | None:
    """The left side's ``...`` as one axis per dimension it covers, ``.0``, ``.1``, ...; None if the rank does
    not match."""
    if any("..." in g for g in groups if g != ("...",)):
        return None  # einops allows an ellipsis in a group on the output side only
    if ("...",) not in groups:
        return groups if len(groups) == rank else None
    covered = rank - len(groups) + 1
    if covered < 0:
        return None
    i = groups.index(("...",))
    return (*groups[:i], *(((f".{k}",)) for k in range(covered)), *groups[i + 1:])


def parse_pattern(pattern: str, rank: int) -> Pattern | None:
    """The two sides of ``pattern`` for an input of ``rank`` dimensions, or None where it is not a plain
    rearrangement (axes twice, ``...`` inside a group on the left)."""
    left_side, arrow, right_side = pattern.partition("->")
    left = _groups(left_side, rank)
    right = _groups(right_side, None) if arrow else None
    if left is None or right is None:
        return None
    dots = tuple(a for g in left for a in g if a.startswith("."))
    right = tuple(tuple(a for axis in g for a in (dots if axis == "..." else (axis,))) for g in right)
    elementary = [a for g in left for a in g]
    named = [a for g in right for a in g]
    if len(set(elementary)) != len(elementary) or len(set(named)) != len(named) or not set(named) <= set(elementary):
        return None
    return Pattern(left, right)


def _sizes(pattern: Pattern, shape: Sequence[int], lengths: dict[str, int]) -> dict[str, int] | None:
    """Each elementary axis's size, from the input's shape and the lengths given; None if they do not fit."""
    sizes = dict(lengths)
    for group, dim in zip(pattern.left, shape):
        unknown = [a for a in group if a not in sizes]
        known = math.prod(sizes[a] for a in group if a in sizes)
        if len(unknown) > 1 or (not unknown and known != dim) or (unknown and dim % known):
            return None
        if unknown:
            sizes[unknown[0]] = dim // known
    return sizes


def _call(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str, str | None, dict[str, int]] | None:
    """(input, pattern, reduction or None, axis lengths) of an einops call or layer call."""
    if node.op == "call_module" and isinstance(m := gm.get_submodule(str(node.target)), LAYERS):
        source, pattern, lengths = node.args[0], m.pattern, dict(m.axes_lengths)
        reduction = m.reduction if isinstance(m, Reduce) else None
    elif node.op == "call_function" and node.target in FUNCTIONS:
        source, pattern = node.args[0], node.args[1]
        lengths = {k: v for k, v in node.kwargs.items() if k != "reduction"}
        reduction = None if node.target is einops.rearrange else (
            node.args[2] if len(node.args) > 2 else node.kwargs.get("reduction"))
    else:
        return None
    if not isinstance(source, fx.Node) or not isinstance(pattern, str) or (
            reduction is not None and reduction not in _REDUCTIONS) or not all(
            isinstance(v, int) for v in lengths.values()):
        return None
    return source, pattern, reduction, lengths


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    found = _call(gm, node)
    shape = recorded_shape(found[0]) if found else None
    if found is None or shape is None:
        return None
    source, text, reduction, lengths = found
    pattern = parse_pattern(text, len(shape))
    sizes = _sizes(pattern, shape, lengths) if pattern is not None else None
    if pattern is None or sizes is None:
        return None
    elementary = [a for g in pattern.left for a in g]
    named = [a for g in pattern.right for a in g]
    if not named or elementary[0] != named[0] or (reduction is None and set(named) != set(elementary)):
        return None  # the batch would move, or an axis would vanish without a reduction

    def emit(target: str, *args: object) -> fx.Node:
        return inserted_before(node, "call_method", target, args)

    x = source
    if any(len(g) != 1 for g in pattern.left):
        x = emit("reshape", x, -1, *(sizes[a] for a in elementary[1:]))
    gone = [i for i, a in enumerate(elementary) if a not in named]
    if gone:
        x = emit(_REDUCTIONS[reduction], x, tuple(gone))  # type: ignore[index]
    kept = [a for a in elementary if a in named]
    order = [kept.index(a) for a in named]
    if order != sorted(order):
        x = emit("permute", x, *order)
    if any(len(g) != 1 for g in pattern.right):
        x = emit("reshape", x, -1, *(math.prod(sizes[a] for a in g) for g in pattern.right[1:]))
    return x


def einops_as_reshapes(gm: fx.GraphModule) -> bool:
    """Rewrite each einops call of the forms above (needs the recorded shapes); whether any changed."""
    if not each_rewritten(gm, _rewrite):
        return False
    gm.delete_all_unused_submodules()
    return True
