"""In-place operations as values, so that the graph's edges say what each operation reads.

torch.fx records ``out.add_(x)``, ``F.relu(out, inplace=True)`` or an in-place ``nn.ReLU`` called as a statement
as a node whose result nothing may read, while later code reads ``out``, the tensor it changed. Run eagerly, the
graph module still computes the model; but every pass reads edges, and would compile the value before the
change (the residual add and the ReLU would vanish from the compiled model). Each in-place node becomes its
out-of-place form, and every later reader of the changed tensor reads the node instead.

That is exact unless the changed tensor is a view of another that is read later (``x[:, :8].relu_()``): the
change shows through the other tensor too. The capture therefore runs the rewritten graph beside the model on the
example when anything was rewritten, and refuses the model, naming the operation, if they differ. In-place
operations without an out-of-place form (``x.zero_()``, ``x.copy_(y)``) are refused outright where anything
reads what they changed. (Item assignment, ``x[:, 0] = y``, does not trace at all: torch.fx's proxies take no
items.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

_NO_VALUE_CHANGE = frozenset({"requires_grad_", "retain_grad"})
_NOT_TWINS = frozenset({"bernoulli_", "resize_"})  # an out-of-place method of the same name that computes otherwise


@dataclass
class Functionalized:
    """What :func:`inplace_ops_functionalized` did: the nodes it rewrote, and those it could not rewrite although
    something reads what they changed; each with how the model wrote it (:func:`describe`)."""

    rewritten: dict[fx.Node, str] = field(default_factory=dict)
    refused: dict[fx.Node, str] = field(default_factory=dict)


def _inplace_method(name: str) -> str | None:
    """``add_`` → ``add``: the out-of-place tensor method of an in-place one; "" for an in-place method without
    one (``zero_``), None for a name that is not in place."""
    if name.startswith("_") or not name.endswith("_"):
        return None
    return name[:-1] if name not in _NOT_TWINS and callable(getattr(torch.Tensor, name[:-1], None)) else ""


def _inplace_function(target: object) -> object | None:
    """``torch.relu_`` → ``torch.relu``, ``F.elu_`` → ``F.elu``; None for any other function."""
    name = getattr(target, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    for namespace in (F, torch):
        if getattr(namespace, name, None) is target:
            return getattr(namespace, name[:-1], None)
    return None


def _without_inplace_flag(node: fx.Node) -> bool:
    """Turn ``F.relu(x, inplace=True)`` (keyword or positional) into ``F.relu(x)``; whether it was one."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    if bound.arguments.get("inplace") is not True:
        return False
    bound.arguments["inplace"] = False
    node.args, node.kwargs = bound.args, bound.kwargs
    return True


def _inplace_module(gm: fx.GraphModule, node: fx.Node, made: set[str]) -> bool:
    """A torch.nn module built with ``inplace=True`` (``nn.ReLU(inplace=True)``), made out of place; ``made``
    holds those already made so (a module called at several sites changes its input at each)."""
    target = str(node.target)
    m = gm.get_submodule(target)
    if target not in made and (getattr(m, "inplace", False) is not True
                               or not type(m).__module__.startswith("torch.nn")):
        return False
    m.inplace = False
    made.add(target)
    return True


def _rewrite(node: fx.Node, gm: fx.GraphModule, made: set[str]) -> bool | None:
    """Make ``node`` out of place: True if it was in place, False if not, None if it has no out-of-place form."""
    if node.op == "call_method":
        base = _inplace_method(str(node.target))
        if base:
            node.target = base
        return None if base == "" else base is not None
    if node.op == "call_function":
        if (base := _inplace_function(node.target)) is not None:
            node.target = base
            return True
        return _without_inplace_flag(node)
    if node.op == "call_module":
        return _inplace_module(gm, node, made)
    return False


def inplace_ops_functionalized(gm: fx.GraphModule) -> Functionalized:
    """Rewrite ``gm``'s in-place operations as values (see the module docstring); recompile it."""
    done, made = Functionalized(), set[str]()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        changed = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_method" and node.target in _NO_VALUE_CHANGE and changed is not None:
            node.replace_all_uses_with(changed)
            gm.graph.erase_node(node)
            continue
        written = describe(node)
        later = [r for r in (changed.users if changed is not None else ()) if order[r] > order[node]]
        rewritten = _rewrite(node, gm, made)
        if rewritten is None and (later or node.users):
            done.refused[node] = written
        elif rewritten and changed is not None:
            for reader in later:
                reader.replace_input_with(changed, node)
            done.rewritten[node] = written
    gm.recompile()
    return done


def describe(node: fx.Node) -> str:
    """How the user wrote an in-place node: ``x.add_(...)``, ``relu(..., inplace=True)``, an in-place module."""
    if node.op == "call_module":
        return f"in-place module {node.target}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"x.{name}(...)" if node.op == "call_method" else f"{name}(..., inplace=True)"
