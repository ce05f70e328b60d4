"""Facts about a captured graph that several passes need: compute layers, their names, roles and signedness."""

from __future__ import annotations

import operator
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from qcompile.quantization.quantizer import ActivationQuantizer
from qcompile.quantization.spec import LayerRole

COMPUTE_MODULES = (_ConvNd, nn.Linear)

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


def set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``target`` inside ``gm`` (replacing what is there)."""
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


_SOFTMAX_FUNCTIONS = {F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log_softmax",
                      torch.log_softmax: "log_softmax"}


def softmax_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int | None] | None:
    """``("softmax" | "log_softmax", dim)`` for a softmax in any spelling (``nn.Softmax``, ``F.softmax``,
    ``torch.log_softmax``, ``x.softmax(1)``), else None."""
    m = module_of(gm, node)
    if isinstance(m, nn.Softmax | nn.LogSoftmax):
        return ("softmax" if isinstance(m, nn.Softmax) else "log_softmax"), m.dim
    if node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS:
        return _SOFTMAX_FUNCTIONS[node.target], argument(node, 1, "dim")  # type: ignore[index]
    if node.op == "call_method" and node.target in ("softmax", "log_softmax"):
        return str(node.target), argument(node, 1, "dim")
    return None


def resize_mode(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The mode of a resizing call (``F.interpolate``, ``nn.Upsample`` and its subclasses); None for other nodes."""
    m = module_of(gm, node)
    if isinstance(m, nn.Upsample):
        return m.mode
    if node.op == "call_function" and node.target is F.interpolate:
        return argument(node, 3, "mode", "nearest")
    return None


def nearest_upsampling(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    """The integer (height, width) factors of a nearest-neighbour upsampling of a 4-d tensor (``F.interpolate``,
    ``nn.Upsample``, ``nn.UpsamplingNearest2d`` with mode ``"nearest"``: every pixel repeated), read from the
    recorded shapes; None for any other node, another mode, or factors that are not integers."""
    mode = resize_mode(gm, node)
    src = node.args[0] if node.args else None
    if mode != "nearest" or not isinstance(src, fx.Node) or "tensor_meta" not in node.meta:
        return None
    before, after = tuple(src.meta["tensor_meta"].shape), tuple(node.meta["tensor_meta"].shape)
    if len(before) != 4 or any(a % b for a, b in zip(after[2:], before[2:])):
        return None
    return after[2] // before[2], after[3] // before[3]


def is_softmax_head(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A softmax whose only reader is the graph's output: a classifier's head, computed on the logits."""
    return softmax_of(gm, node) is not None and all(u.op == "output" for u in node.users)


def call(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """A ``call_function`` or ``call_method`` node's operation run on concrete ``args`` and ``kwargs``."""
    return target(*args, **kwargs) if op == "call_function" else getattr(args[0], target)(*args[1:], **kwargs)


def unused_name(base: str, taken: Callable[[str], bool]) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first that is not ``taken``."""
    name, k = base, 1
    while taken(name):
        name, k = f"{base}_{k}", k + 1
    return name


def literal(value: object) -> object | None:
    """``value`` as a constant fx can write into code (a ``torch.Size`` as a tuple), or None if it is none."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, tuple | list):
        items = [literal(v) for v in value]
        return None if any(v is None for v in items) else items if isinstance(value, list) else tuple(items)
    return None


def argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional argument ``index`` or keyword ``name`` of a call (a method's ``self`` is argument 0)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def target_name(node: fx.Node) -> str:
    """What ``node`` calls, as its source names it: a method or module path, or a function's name."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def recorded_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape of the tensor ``node`` was recorded to produce; None when capture recorded none."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if isinstance(shape, torch.Size) else None


def inserted_before(node: fx.Node, op: str, target: Any, args: tuple[Any, ...]) -> fx.Node:
    """A new ``call_function`` / ``call_method`` node just before ``node`` that carries its source line, so that
    an error about a node a rewrite made names the user's line."""
    with node.graph.inserting_before(node):
        new = node.graph.create_node(op, target, args)
    new.meta["stack_trace"] = node.meta.get("stack_trace")
    return new


def each_rewritten(gm: fx.GraphModule, rewrite: Callable[[fx.GraphModule, fx.Node], fx.Node | None]) -> bool:
    """Each node for which ``rewrite`` emits the nodes computing it anew (returning the last, or one of its
    inputs for an identity) replaced by them; the last keeps the node's metadata (its shape, which later rewrites
    read). Whether any changed."""
    changed = False
    for node in list(gm.graph.nodes):
        out = rewrite(gm, node)
        if out is None:
            continue
        if out not in node.all_input_nodes:
            out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        changed = True
    return changed


def tensor_rank(node: fx.Node) -> int:
    """The rank of the tensor ``node`` was recorded to produce; -1 when capture recorded none."""
    tm = node.meta.get("tensor_meta")
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else -1


def permutation(node: fx.Node, rank: int) -> list[int] | None:
    """The axis order a ``permute`` or ``transpose`` node produces (output axis i is input axis ``perm[i]``), in
    any of their call forms; None for any other node."""
    t = node.target
    if (node.op == "call_function" and t is torch.transpose) or (node.op == "call_method" and t == "transpose"):
        perm = list(range(rank))
        d0, d1 = argument(node, 1, "dim0") % rank, argument(node, 2, "dim1") % rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if (node.op == "call_function" and t is torch.permute) or (node.op == "call_method" and t == "permute"):
        dims = node.args[1:] if len(node.args) > 2 else argument(node, 1, "dims")
        return [int(d) % rank for d in dims]
    return None


_MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.mm, torch.bmm)
_MATMUL_METHODS = ("matmul", "mm", "bmm")


def matrix_product_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """The two operands of a matrix product (``a @ b``, ``torch.matmul``, ``torch.mm``, ``torch.bmm`` or their
    methods), else None."""
    calls = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS)
    return (node.args[0], node.args[1]) if calls and len(node.args) == 2 and not node.kwargs else None


def is_matmul(node: fx.Node) -> bool:
    """A matrix product of two computed tensors: attention over positions in a global-context or non-local
    block. A product with a parameter is a layer's business (canonical makes it one)."""
    operands = matrix_product_operands(node)
    return operands is not None and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in operands)


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


# --- signedness: which tensors the graph proves >= 0 (quantized unsigned, one more bit of range) ---------------

_Nonneg = Callable[[object], bool]  # a tensor node proven >= 0, or a number >= 0
_Rule = Callable[[fx.Node, _Nonneg], bool]


def _always(node: fx.Node, nonneg: _Nonneg) -> bool:
    return True


def _first(node: fx.Node, nonneg: _Nonneg) -> bool:
    """Ops that move, select, pool or average their input's elements: >= 0 if the input is."""
    return nonneg(argument(node, 0, "input"))


def _both(node: fx.Node, nonneg: _Nonneg) -> bool:
    """Sums, products and quotients: >= 0 if both operands are (and ``add``'s alpha)."""
    operands = (argument(node, 0, "input"), argument(node, 1, "other"), node.kwargs.get("alpha", 1))
    return all(nonneg(a) for a in operands)


def _either(node: fx.Node, nonneg: _Nonneg) -> bool:
    """An elementwise maximum is >= 0 if one operand is."""
    return nonneg(argument(node, 0, "input")) or nonneg(argument(node, 1, "other"))


def _max(node: fx.Node, nonneg: _Nonneg) -> bool:
    """``torch.max(a, b)`` is an elementwise maximum; ``torch.max(x[, dim])`` a reduction of ``x``."""
    return (_either if isinstance(argument(node, 1, "other"), fx.Node) else _first)(node, nonneg)


def _min(node: fx.Node, nonneg: _Nonneg) -> bool:
    """``torch.min(a, b)`` is an elementwise minimum; ``torch.min(x[, dim])`` a reduction of ``x``."""
    return (_both if isinstance(argument(node, 1, "other"), fx.Node) else _first)(node, nonneg)


def _power(node: fx.Node, nonneg: _Nonneg) -> bool:
    """``x ** n``: >= 0 for an even integer ``n`` (SimAM's squared deviations), else if ``x`` is."""
    exponent = argument(node, 1, "exponent")
    return (isinstance(exponent, int) and exponent % 2 == 0) or _first(node, nonneg)


def _all_tensors(node: fx.Node, nonneg: _Nonneg) -> bool:
    """``torch.cat`` / ``torch.stack``: >= 0 if every part is."""
    parts = argument(node, 0, "tensors")
    return isinstance(parts, list | tuple) and bool(parts) and all(nonneg(p) for p in parts)


def _pad(node: fx.Node, nonneg: _Nonneg) -> bool:
    """Constant padding adds its value (None is 0); the other modes copy the input's elements."""
    value = argument(node, 3, "value")
    if argument(node, 2, "mode", "constant") == "constant" and value is not None and not nonneg(value):
        return False
    return _first(node, nonneg)


def _clamped(lo: object, hi: object, input_nonnegative: Callable[[], bool], nonneg: _Nonneg) -> bool:
    """``min(max(x, lo), hi) >= 0`` when ``hi`` is absent or >= 0 and either ``lo`` or ``x`` is >= 0."""
    return (hi is None or nonneg(hi)) and (nonneg(lo) or input_nonnegative())


def _clamp(lo_name: str, hi_name: str, lo_default: object = None, hi_default: object = None) -> _Rule:
    """The rule of a clamp whose bounds are arguments 1 and 2 (``clamp``, ``clamp_min``, ``hardtanh``)."""

    def rule(node: fx.Node, nonneg: _Nonneg) -> bool:
        lo, hi = argument(node, 1, lo_name, lo_default), argument(node, 2, hi_name, hi_default)
        return _clamped(lo, hi, lambda: _first(node, nonneg), nonneg)

    return rule


_PASS_MODULES = (
    _MaxPoolNd, _AvgPoolNd, _AdaptiveMaxPoolNd, _AdaptiveAvgPoolNd, nn.Flatten, nn.Identity, nn.Upsample,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_CLAMP = _clamp("min", "max")
_HARDTANH = _clamp("min_val", "max_val", -1.0, 1.0)
_FUNCTION_RULES: dict[object, _Rule] = {
    **dict.fromkeys((
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_max_pool1d,
        F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
        torch.unsqueeze, torch.flip, torch.roll, torch.chunk, torch.split, torch.unbind, operator.getitem, getattr,
        torch.mean, torch.sum, torch.amax, F.dropout, F.interpolate, F.normalize,
    ), _first),
    **dict.fromkeys((torch.pow, operator.pow), _power),
    **dict.fromkeys((torch.sigmoid, F.sigmoid, F.hardsigmoid, F.relu6, torch.abs, torch.exp, torch.sqrt,
                     torch.rsqrt, torch.square, torch.norm, torch.linalg.vector_norm), _always),
    **dict.fromkeys((operator.add, torch.add, operator.mul, torch.mul, operator.truediv, torch.div,
                     *_MATMUL_FUNCTIONS), _both),
    **dict.fromkeys((F.softmax, torch.softmax), _always),
    **dict.fromkeys((torch.cat, torch.stack), _all_tensors),
    **dict.fromkeys((torch.clamp, torch.clip, torch.clamp_min), _CLAMP),
    **dict.fromkeys((F.hardtanh, F.hardtanh_), _HARDTANH),
    **dict.fromkeys((torch.maximum, torch.fmax), _either),
    **dict.fromkeys((torch.minimum, torch.fmin), _both),
    torch.max: _max,
    torch.min: _min,
    F.pad: _pad,
}
_METHOD_RULES: dict[str, _Rule] = {
    **dict.fromkeys((
        "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "flip", "roll",
        "chunk", "split", "unbind", "mean", "sum", "amax",
    ), _first),
    "pow": _power,
    **dict.fromkeys(("add", "mul", "div", *_MATMUL_METHODS), _both),
    "softmax": _always,
    **dict.fromkeys(("clamp", "clip", "clamp_min"), _CLAMP),
    **dict.fromkeys(("sigmoid", "abs", "exp", "sqrt", "rsqrt", "square", "norm"), _always),
    **dict.fromkeys(("maximum", "fmax"), _either),
    **dict.fromkeys(("minimum", "fmin"), _both),
    "max": _max,
    "min": _min,
}


class ElementwiseRegion(nn.Module):
    """Elementwise operations of one tensor written with comparisons, ``torch.where`` or an elementwise max or min
    of two of its functions (a leaky ReLU as ``torch.where(x > 0, x, 0.1 * x)`` or ``torch.maximum(x, 0.1 * x)``),
    as one function of that tensor (:mod:`qcompile.frontend.regions`), which is tabulated on its codes like any
    activation."""

    def __init__(self, region: fx.GraphModule, name: str) -> None:
        super().__init__()
        self.region = region
        self.name = name

    def extra_repr(self) -> str:
        return self.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.region(x)

    def nonnegative(self, input_nonnegative: bool) -> bool:
        """Whether the function is >= 0, by the rules above applied inside it, its input as signed as given."""
        nodes = list(self.region.graph.nodes)
        memo = {n: input_nonnegative for n in nodes if n.op == "placeholder"}
        return is_nonnegative(self.region, nodes[-1].args[0], memo)


def _module_nonnegative(m: nn.Module, node: fx.Node, nonneg: _Nonneg) -> bool:
    if isinstance(m, nn.ReLU | nn.Sigmoid | nn.Hardsigmoid | nn.Softmax):
        return True
    if isinstance(m, ActivationQuantizer):  # unsigned codes, or the input's sign
        return not m.spec.signed or _first(node, nonneg)
    if isinstance(m, nn.Hardtanh):  # nn.ReLU6 too
        return _clamped(m.min_val, m.max_val, lambda: _first(node, nonneg), nonneg)
    if isinstance(m, ElementwiseRegion):
        return m.nonnegative(_first(node, nonneg))
    return isinstance(m, _PASS_MODULES) and _first(node, nonneg)


def _proven_nonnegative(gm: fx.GraphModule, node: fx.Node, nonneg: _Nonneg) -> bool:
    m = module_of(gm, node)
    if m is not None:
        return _module_nonnegative(m, node, nonneg)
    rules = _FUNCTION_RULES if node.op == "call_function" else _METHOD_RULES if node.op == "call_method" else {}
    rule = rules.get(node.target)
    return is_relu(gm, node) or (rule is not None and rule(node, nonneg))


def is_nonnegative(gm: fx.GraphModule, node: fx.Node, _memo: dict[fx.Node, bool] | None = None) -> bool:
    """Whether the graph guarantees ``node``'s output is >= 0: a ReLU, a sigmoid, a clamp at >= 0, or moving,
    pooling, padding, concatenating, adding, multiplying or taking the maximum of such (the rules above); a
    softmax."""
    memo = {} if _memo is None else _memo
    if node not in memo:
        memo[node] = False

        def nonneg(value: object) -> bool:
            if isinstance(value, fx.Node):
                return is_nonnegative(gm, value, memo)
            return isinstance(value, int | float) and value >= 0

        memo[node] = _proven_nonnegative(gm, node, nonneg)
    return memo[node]


def format_graph(gm: fx.GraphModule) -> str:
    """One line per node: name, op, target, output shape and the qcompile annotation if any."""
    from qcompile.quantization.spec import get_annotation

    lines = []
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        shape = "x".join(str(d) for d in tm.shape) if tm is not None and hasattr(tm, "shape") else "-"
        args = ", ".join(a.name for a in n.all_input_nodes)
        line = f"{n.name:<28} {n.op:<13} {target_name(n):<28} [{shape}] ({args})"
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
