"""Facts about a captured graph that several passes need: compute layers, their names, roles and signedness."""

from __future__ import annotations

import operator
from collections import Counter, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from qcompile.spec import LayerRole

COMPUTE_MODULES = (_ConvNd, nn.Linear)

_PASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Dropout, nn.Identity,
)
_PASS_FUNCTIONS = {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.mean,
    F.dropout, torch.cat, operator.add, torch.add, operator.getitem, torch.reshape, F.pad,
}
_PASS_METHODS = {"view", "reshape", "flatten", "mean", "contiguous", "permute", "transpose", "squeeze", "unsqueeze"}


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU in any of its forms: ``nn.ReLU``, ``F.relu``/``torch.relu(_)``, ``x.relu()``/``x.relu_()``."""
    return (
        isinstance(module_of(gm, node), nn.ReLU)
        or (node.op == "call_function" and node.target in _RELU_FUNCTIONS)
        or (node.op == "call_method" and node.target in _RELU_METHODS)
    )


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def is_compute(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Conv and dense call sites: the layers that carry weights, MACs and a precision."""
    m = module_of(gm, node)
    return isinstance(m, COMPUTE_MODULES) and not isinstance(m, _ConvTransposeNd)


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Compute nodes in topological order."""
    return [n for n in gm.graph.nodes if is_compute(gm, n)]


def layer_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """A stable user-facing name per compute node: the module path, with ``@k`` when one module has k call sites."""
    nodes = compute_nodes(gm)
    counts = Counter(n.target for n in nodes)
    seen: Counter[str] = Counter()
    names = {}
    for n in nodes:
        target = str(n.target)
        names[n] = target if counts[target] == 1 else f"{target}@{seen[target]}"
        seen[target] += 1
    return names


def _reaches_compute(gm: fx.GraphModule, start: fx.Node, downstream: bool) -> bool:
    """Whether another compute node lies strictly up- (or down-) stream of ``start``."""
    queue = deque(start.users if downstream else start.all_input_nodes)
    seen: set[fx.Node] = set()
    while queue:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        if is_compute(gm, n):
            return True
        queue.extend(n.users if downstream else n.all_input_nodes)
    return False


def layer_roles(gm: fx.GraphModule) -> dict[fx.Node, frozenset[LayerRole]]:
    """FIRST: no compute layer before it (it sees the input); LAST: no compute layer after it (it feeds the output)."""
    roles = {}
    for n in compute_nodes(gm):
        r = set()
        if not _reaches_compute(gm, n, downstream=False):
            r.add(LayerRole.FIRST)
        if not _reaches_compute(gm, n, downstream=True):
            r.add(LayerRole.LAST)
        roles[n] = frozenset(r or {LayerRole.HIDDEN})
    return roles


def is_nonnegative(gm: fx.GraphModule, node: fx.Node, _memo: dict[fx.Node, bool] | None = None) -> bool:
    """Whether the graph guarantees ``node``'s output is >= 0 (a ReLU, or pooling/adding/reshaping of such)."""
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    memo[node] = False
    m = module_of(gm, node)
    tensor_inputs = [a for a in node.all_input_nodes]
    if is_relu(gm, node) or isinstance(m, nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6):
        result = True
    elif isinstance(m, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or (
        node.op == "call_method" and node.target in _PASS_METHODS
    ):
        result = bool(tensor_inputs) and all(is_nonnegative(gm, a, memo) for a in tensor_inputs)
        if node.target in (operator.add, torch.add) and any(
            isinstance(a, (int, float)) and a < 0 for a in node.args
        ):
            result = False
    else:
        result = False
    memo[node] = result
    return result


def format_graph(gm: fx.GraphModule) -> str:
    """One line per node: name, op, target, output shape and the qcompile annotation if any."""
    from qcompile.spec import get_annotation

    lines = []
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        shape = "x".join(str(d) for d in tm.shape) if tm is not None and hasattr(tm, "shape") else "-"
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        args = ", ".join(a.name for a in n.all_input_nodes)
        line = f"{n.name:<28} {n.op:<13} {str(target):<28} [{shape}] ({args})"
        ann = get_annotation(n)
        if ann is not None:
            bits = []
            if ann.precision is not None:
                bits.append(str(ann.precision))
            if ann.weight is not None:
                bits.append(f"w:{ann.weight.describe()}")
            if ann.input_act is not None:
                bits.append(f"in:{ann.input_act.describe()}")
            if ann.role:
                bits.append("role:" + "+".join(sorted(r.value for r in ann.role)))
            if ann.output_act is not None:
                bits.append(f"out:{ann.output_act.describe()}")
            if ann.cost is not None:
                bits.append(f"macs:{ann.cost.macs}")
            line += "  {" + " ".join(bits) + "}"
        lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class Region:
    """A stretch of the graph that only one earlier value flows into: ``entry``, then ``nodes`` in order, whose
    last node is the region's output."""

    entry: fx.Node
    nodes: tuple[fx.Node, ...]

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


def regions(gm: fx.GraphModule) -> list[Region]:
    """The graph cut at every node through which all values pass (one live value after it), grouped so that each
    region ends at a compute layer or at the node that joins its branches (a residual add): in a ResNet, the stem
    and each residual block, whose internal values and weights can then be optimised together. Nodes between the
    last compute layer and the output, and in a graph with several inputs those before the inputs are joined,
    belong to no region."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    remaining = {n: len(n.users) for n in gm.graph.nodes}
    live = set(placeholders)
    start = placeholders[0] if len(placeholders) == 1 else None
    body: list[fx.Node] = []  # since the region's entry
    segment: list[fx.Node] = []  # since the last cut
    out: list[Region] = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        body.append(n)
        segment.append(n)
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                remaining[a] -= 1
                if remaining[a] == 0:
                    live.discard(a)
        if n.users:
            live.add(n)
        if live != {n}:
            continue
        if start is None:
            start, body = n, []
        elif any(is_compute(gm, m) for m in segment):
            out.append(Region(start, tuple(body)))
            start, body = n, []
        segment = []
    return out
