"""Shape propagation, and folding the shape arithmetic that does not depend on the batch size into constants.

``tensor_meta`` (shape, dtype) is recorded on every node by running the example in eval mode. Shape arithmetic
(``x.size()[3]``, ``c // groups``, ``x.dim()``) traces to nodes that compute Python numbers, which the integer
lowering cannot take as, say, a pooling kernel: the graph is run at the example's batch size and at one more, and
every such number that is the same in both is replaced by its value; those that change (``x.size(0)``,
``x.numel()``) stay nodes, so the graph module still runs at any batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from qcompile.errors import CaptureError, first_line
from qcompile.frontend.graph import literal
from qcompile.frontend.source_lines import source_location

_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension"})
_SHAPE_ATTRS = frozenset({"shape", "ndim"})


class _NodeFailure(Exception):
    def __init__(self, node: fx.Node, cause: Exception) -> None:
        super().__init__(str(cause))
        self.node, self.cause = node, cause


class _ShapeRecorder(fx.Interpreter):
    """torch.fx's ShapeProp without its traceback printing: names the failing node, records ``tensor_meta``
    (with ``record_meta``) and keeps the values of the ``watched`` nodes."""

    def __init__(self, gm: fx.GraphModule, watched: Collection[fx.Node] = (), record_meta: bool = True) -> None:
        super().__init__(gm)
        self.watched = set(watched)
        self.record_meta = record_meta
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
        if n in self.watched:
            self.values[n] = result
        if self.record_meta:
            _record_meta(n, result)
        return result


def _record_meta(n: fx.Node, result: object) -> None:
    """``tensor_meta`` for the tensors in ``result`` (none for a Python value), and its type."""
    found = False

    def extract(obj: object) -> object:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    meta = map_aggregate(result, extract)
    if found:
        n.meta["tensor_meta"] = meta
    n.meta["type"] = type(result)


def _run(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], recorder: _ShapeRecorder) -> None:
    """Run ``recorder`` in eval mode without gradients, leaving ``gm``'s train/eval mode and buffers as they were."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad(), buffers_kept(gm):
            recorder.run(*inputs)
    finally:
        gm.train(was_training)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running the example inputs in eval mode."""
    propagate(gm, example_inputs, watched=())


def propagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
               watched: Collection[fx.Node]) -> dict[fx.Node, object]:
    """:func:`propagate_shapes`, returning the ``watched`` nodes' values from the same run."""
    recorder = _ShapeRecorder(gm, watched)
    try:
        _run(gm, example_inputs, recorder)
    except _NodeFailure as fail:
        n = fail.node
        raise CaptureError(
            f"the example input does not run through the model at node {n.name} ({n.op} {n.target}, "
            f"{source_location(n)}): {first_line(fail.cause)}"
        ) from None
    except Exception as exc:
        raise CaptureError(f"the example input does not run through the model: {first_line(exc)}") from None
    return recorder.values


def _reads_shape(n: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.numel()``, ``x.shape``, ``x.ndim``: where shape arithmetic starts."""
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    return n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] in _SHAPE_ATTRS


def shape_arithmetic(graph: fx.Graph) -> list[fx.Node]:
    """Shape reads and the operators (``[]``, ``//``, ``*``, ...) applied to them only, in graph order.

    Only these are specialised: a number computed from tensor data (``x.max().item()``) is not a constant even
    when two runs on the same data agree."""
    found: dict[fx.Node, None] = {}
    for n in graph.nodes:
        is_operator = n.op == "call_function" and getattr(n.target, "__module__", None) == "_operator"
        if _reads_shape(n) or (is_operator and n.all_input_nodes and all(a in found for a in n.all_input_nodes)):
            found[n] = None
    return list(found)


def one_more_sample(example_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """The inputs with their first sample repeated at the end (batch b+1, also from b = 1); None if none has a
    batch dimension."""
    grown = [torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() and len(x) else x
             for x in example_inputs]
    return None if all(g is x for g, x in zip(grown, example_inputs)) else grown


def _batch_dependent(nodes: Sequence[fx.Node], here: dict[fx.Node, object],
                     there: dict[fx.Node, object]) -> set[fx.Node]:
    """Nodes whose value differs between the two batch sizes, or computed from a number that does: two batch
    sizes can agree by chance (``n // 4`` at 1 and 2), but arithmetic on the batch size is never a constant."""
    dependent: set[fx.Node] = set()
    for n in nodes:
        value = literal(here.get(n))
        from_batch = any(a in dependent and isinstance(here.get(a), bool | int | float) for a in n.all_input_nodes)
        if value is None or value != literal(there.get(n)) or from_batch:
            dependent.add(n)
    return dependent


BATCH_MULTIPLE = "qcompile_batch_multiple"
"""``node.meta`` key of a batch-dependent size that is k times the batch size, at both sizes run: k. A reshape whose
first size is one (``q.reshape(B * heads, d, -1)``, attention heads folded into the batch) keeps each sample's rows
together at any batch size."""


def _mark_batch_multiples(nodes: Collection[fx.Node], here: dict[fx.Node, object], there: dict[fx.Node, object],
                          batch: int) -> None:
    """Mark the sizes that are k times the batch size at ``batch`` (``here``) and at ``batch + 1`` (``there``)."""
    for n in nodes:
        a, b = here.get(n), there.get(n)
        if type(a) is int and type(b) is int and a > 0 and a % batch == 0 and b == a // batch * (batch + 1):
            n.meta[BATCH_MULTIPLE] = a // batch


def _substitute(node: fx.Node, value: object) -> None:
    """Write ``value`` into the arguments of ``node``'s users in its place."""
    for user in list(node.users):
        user.args = map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = map_arg(user.kwargs, lambda a: value if a is node else a)


def specialize_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], nodes: Sequence[fx.Node],
                       here: dict[fx.Node, object]) -> None:
    """Fold the shape arithmetic that does not depend on the batch size into constants (``here``: the values at
    the example's batch size). A model that does not run at another batch size is left as traced."""
    grown = one_more_sample(example_inputs)
    if grown is None:
        return
    recorder = _ShapeRecorder(gm, nodes, record_meta=False)
    try:
        _run(gm, grown, recorder)
    except _NodeFailure:
        return
    dependent = _batch_dependent(nodes, here, recorder.values)
    batch = next(len(x) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() and len(x))
    _mark_batch_multiples(dependent, here, recorder.values, batch)
    for n in nodes:
        if n not in dependent:
            _substitute(n, literal(here[n]))
    for n in reversed(nodes):
        if not n.users:
            gm.graph.erase_node(n)
    gm.recompile()


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """``module``'s buffers restored after the block: BatchNorm statistics that running ops on an example would
    update (a training-mode ``F.batch_norm`` does whatever the module's mode)."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
