"""Graph capture: torch.fx symbolic tracing plus shape propagation, with errors that say what to do.

Tracing happens on a deep copy, so passes never mutate the user's model.
"""

from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from qcompile.errors import CaptureError

LeafSpec = str | type[nn.Module]
_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)


class _SiteTracer(fx.Tracer):
    """A tracer that treats named modules as leaves and remembers which module it was inside when it failed."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...], leaf_type_names: set[str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.leaf_type_names = leaf_type_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaf_names
            or isinstance(m, self.leaf_types)
            or type(m).__name__ in self.leaf_type_names
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward, args, kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_qcompile_site"):
                exc._qcompile_site = (self.path_of_module(m), type(m).__name__)  # type: ignore[attr-defined]
            raise


def _user_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost frame outside torch and qcompile's capture: the user's offending line."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith(_TORCH_DIR) and os.path.abspath(f.filename) != _HERE
    ]
    if not frames:
        return "unknown location"
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f"{f.filename}:{f.lineno}{code}"


def _split_leaves(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> tuple[set[str], tuple[type, ...], set[str]]:
    names: set[str] = set()
    types: list[type] = []
    type_names: set[str] = set()
    qualnames = {n for n, _ in model.named_modules()}
    class_names = {type(m).__name__ for m in model.modules()}
    for leaf in leaf_modules:
        if isinstance(leaf, type):
            types.append(leaf)
        elif leaf in qualnames:
            names.add(leaf)
        elif leaf in class_names:
            type_names.add(leaf)
        else:
            raise CaptureError(f"leaf module {leaf!r} matches no submodule name or class of {type(model).__name__}")
    return names, tuple(types), type_names


def source_location(node: fx.Node) -> str:
    """``file:line`` of the user code that created ``node`` (recorded at trace time), or ``unknown location``."""
    found = "unknown location"
    for line in (node.stack_trace or "").splitlines():
        line = line.strip()
        if line.startswith("File "):
            parts = line.split(",")
            path = os.path.abspath(parts[0][5:].strip().strip('"'))
            if not path.startswith(_TORCH_DIR) and path != _HERE:
                found = f"{path}:{parts[1].strip().removeprefix('line ')}"
    return found


class _NodeFailure(Exception):
    def __init__(self, node: fx.Node, cause: Exception) -> None:
        super().__init__(str(cause))
        self.node, self.cause = node, cause


class _ShapeRecorder(fx.Interpreter):
    """torch.fx's ShapeProp without its traceback printing: records ``tensor_meta`` and names the failing node."""

    def run_node(self, n: fx.Node) -> object:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
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
        return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running the example inputs in eval mode."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*example_inputs)
    except _NodeFailure as fail:
        n = fail.node
        raise CaptureError(
            f"the example input does not run through the model at node {n.name} ({n.op} {n.target}, "
            f"{source_location(n)}): {_first_line(fail.cause)}"
        ) from None
    except Exception as exc:
        raise CaptureError(f"the example input does not run through the model: {_first_line(exc)}") from None
    finally:
        gm.train(was_training)


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    leaf_modules: Iterable[LeafSpec] = (),
) -> fx.GraphModule:
    """Trace ``model`` with torch.fx and propagate shapes to every node.

    ``leaf_modules`` (qualified names such as ``"layer1.0"``, class names, or classes) are kept as opaque calls:
    the way around Python control flow that tracing cannot follow. Each call site becomes its own node, so a
    module called twice carries two independent annotations.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = copy.deepcopy(model)
    names, types, type_names = _split_leaves(model, leaf_modules)
    tracer = _SiteTracer(names, types, type_names)
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        site = getattr(exc, "_qcompile_site", None)
        where = f" in module '{site[0]}' ({site[1]})" if site and site[0] else ""
        hint = (
            f"mark it as a leaf module (CLI: --leaf-module {site[0]}; API: capture(..., leaf_modules=[{site[0]!r}]))"
            if site and site[0]
            else "move the untraceable code into a submodule and mark it as a leaf module (--leaf-module NAME)"
        )
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"cannot trace the model{where} at {_user_frame(exc)}: {msg}; {hint}") from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(model.training)
    propagate_shapes(gm, example_inputs)
    return gm
