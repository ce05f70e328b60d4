"""Graph capture: torch.fx symbolic tracing plus shape propagation, with errors that say what to do.

Tracing happens on a deep copy, so passes never mutate the user's model. Shape arithmetic that does not depend on
the batch size is folded into constants (:mod:`qcompile.frontend.shapes`). Python that branches on sizes (dynamic
"same" padding) cannot be traced with sizes as nodes; such a model is traced again by :class:`_ShapeValuedTracer`,
which knows the sizes while tracing. torch.export would need dynamic-shape specifications from the user and
produces aten-level graphs the passes do not work on. Errors name the user's line
(:mod:`qcompile.frontend.source_lines`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import operator
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from qcompile.errors import CaptureError, first_line
from qcompile.frontend import einops_patterns
from qcompile.frontend.attention import attention_decomposed, selections_before_permutations
from qcompile.frontend.batch_first import batch_kept_first
from qcompile.frontend.canonical import (
    batch_kept_in_squeezes,
    canonicalize,
    identities_removed,
    pixel_shuffles_as_reshapes,
    shape_argument_layers_to_modules,
    weight_layers_to_modules,
    zero_concatenations_as_pads,
)
from qcompile.frontend.einsum import einsums_as_products
from qcompile.frontend.graph import call
from qcompile.frontend.inplace import inplace_ops_functionalized
from qcompile.frontend.multihead_attention import multihead_attention_decomposed, transformer_layers_inlined
from qcompile.frontend.reparametrized import check_trainable, copy_for_inference
from qcompile.frontend.shapes import (
    buffers_kept,
    one_more_sample,
    propagate,
    propagate_shapes,
    shape_arithmetic,
    specialize_shapes,
)
from qcompile.frontend.source_lines import source_location, user_frame

LeafSpec = str | type[nn.Module]
# in-place random fills: timm's drop_path draws its mask with x.new_empty(shape).bernoulli_(keep_prob)
_RANDOM_FILLS = frozenset({"bernoulli_", "uniform_", "normal_", "exponential_", "geometric_", "cauchy_",
                           "log_normal_", "random_"})
class _SiteTracer(fx.Tracer):
    """A tracer that treats named modules as leaves and remembers which module it was inside when it failed."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...], leaf_type_names: set[str]) -> None:
        # einops' functions and layers cannot run on proxies: each call is recorded as one node (einops_patterns)
        super().__init__(autowrap_modules=(math, *einops_patterns.MODULES),
                         autowrap_functions=einops_patterns.FUNCTIONS)
        self.leaf_names = leaf_names
        self.leaf_types = (*leaf_types, *einops_patterns.LAYERS)
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

    def trace(self, root, concrete_args=None):  # type: ignore[no-untyped-def, override]
        """Trace with every leaf module's direct ``m.forward(x)`` call recorded as a call of ``m``.

        fx records a module call in ``Module.__call__``; research code that writes ``self.bn.forward(x)`` would
        otherwise trace into torch's own ``forward`` (BatchNorm's input-rank check cannot take a proxy). ``root``
        is the capture's deep copy; the routing is removed before the graph module takes its submodules.
        """
        routed = []
        for name, m in root.named_modules():
            if name and self.is_leaf_module(m, name):
                m.forward = functools.partial(self._direct_forward, m, m.forward)
                routed.append(m)
        try:
            with _script_functions_inlined(root), _zeros_of_traced_sizes():
                return super().trace(root, concrete_args)
        finally:
            for m in routed:
                del m.forward

    def _direct_forward(self, m: nn.Module, forward, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.call_module(m, forward, args, kwargs)


@contextlib.contextmanager
def _script_functions_inlined(root: nn.Module) -> Iterator[None]:
    """TorchScript functions (``@torch.jit.script`` helpers, as timm's older activations are written) are opaque
    to torch.fx, which cannot pass them a proxy. While tracing, each name bound to one in the globals of a module's
    ``forward`` reads its Python original, which torch keeps for torch.compile (``_torchdynamo_inline``)."""
    patched: list[tuple[dict[str, object], str, object]] = []
    namespaces = {id(g): g for m in root.modules() if (g := getattr(type(m).forward, "__globals__", None))}
    for g in namespaces.values():
        for name, value in list(g.items()):
            original = getattr(value, "_torchdynamo_inline", None)
            if isinstance(value, torch.jit.ScriptFunction) and callable(original):
                patched.append((g, name, value))
                g[name] = original
    try:
        yield
    finally:
        for g, name, value in patched:
            g[name] = value


@contextlib.contextmanager
def _zeros_of_traced_sizes() -> Iterator[None]:
    """``torch.zeros(n, c, h, w)`` with a traced size (the batch: PyramidNet pads its shortcut's channels by
    concatenating such a tensor) is a graph node while tracing: torch's argument parser takes no proxy."""
    original = torch.zeros

    def zeros(*args: object, **kwargs: object) -> object:
        proxies: list[fx.Proxy] = []
        map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", original, args, kwargs)
        return original(*args, **kwargs)

    torch.zeros = zeros
    try:
        yield
    finally:
        torch.zeros = original


class _NoValue(Exception):
    """A proxy's argument has no value in a run: the result has none either."""


class _ShapeProxy(fx.Proxy):
    """A proxy whose shape reads are numbers where the runs at both batch sizes agree (``x.size()[-2:]``), so
    that Python code computing padding or kernel sizes from them (``math.ceil``, ``max``, ``if pad > 0``) runs
    as Python; a size that differs (the batch) stays a node."""

    tracer: _ShapeValuedTracer

    def _shape_read(self, method: str, *args: object) -> object:
        runs = self.tracer.values.get(self.node)
        if runs is None or not all(isinstance(r, torch.Tensor) for r in runs):
            return self.tracer.create_proxy("call_method", method, (self, *args), {})
        got = [getattr(r, method)(*args) for r in runs]
        if method != "size" or args:
            return got[0] if len(set(got)) == 1 else self.tracer.create_proxy("call_method", method, (self, *args), {})
        whole: list[fx.Proxy] = []
        items: list[object] = []
        for i, sizes in enumerate(zip(*got)):
            if len(set(sizes)) == 1:
                items.append(sizes[0])
                continue
            whole = whole or [self.tracer.create_proxy("call_method", "size", (self,), {})]
            items.append(whole[0][i])
        return tuple(items)

    def _length(self) -> int | None:
        """The length of a tuple or list value (``torch.split``'s pieces) that is the same in both runs."""
        runs = self.tracer.values.get(self.node)
        lengths = {len(r) for r in runs if isinstance(r, tuple | list)} if runs else set()
        return lengths.pop() if len(lengths) == 1 and all(isinstance(r, tuple | list) for r in runs) else None

    def __iter__(self):  # type: ignore[no-untyped-def]
        """The pieces of a sequence of known length (``sum(torch.split(x, n, 1))``, ``zip(a, b)``)."""
        n = self._length()
        return iter([self[i] for i in range(n)]) if n is not None else super().__iter__()

    def __len__(self) -> int:
        n = self._length()
        return n if n is not None else super().__len__()

    def size(self, dim: int | None = None) -> object:
        return self._shape_read("size") if dim is None else self._shape_read("size", dim)

    def dim(self) -> object:
        return self._shape_read("dim")

    def numel(self) -> object:
        return self._shape_read("numel")

    @property
    def shape(self) -> object:
        return self.size()

    @property
    def ndim(self) -> object:
        return self.dim()


class _ShapeValuedTracer(_SiteTracer):
    """:class:`_SiteTracer` that also runs every traced op on the example at its batch size and at one more, so
    that its proxies (:class:`_ShapeProxy`) know their shapes and lengths while tracing: timm's and
    EfficientNet-PyTorch's dynamic "same" padding compute the padding from ``x.size()`` with ``math.ceil`` and
    branch on it, and ResNeSt iterates over ``torch.split``'s pieces, which plain symbolic tracing cannot
    follow. Used only when plain tracing fails."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...], leaf_type_names: set[str],
                 runs: Sequence[Sequence[torch.Tensor]]) -> None:
        super().__init__(leaf_names, leaf_types, leaf_type_names)
        self.runs = runs
        self.values: dict[fx.Node, tuple[object, ...] | None] = {}
        self._placeholders = 0
        self._computing = False
        self._leaf_forward = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[no-untyped-def]
        return attr_val if self._computing else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward, args, kwargs):  # type: ignore[no-untyped-def]
        if self._computing:
            return forward(*args, **kwargs)
        self._leaf_forward = forward
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,  # type: ignore[no-untyped-def]
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, fx.Proxy):
            self.values[proxy.node] = self._run(kind, target, args, kwargs)
        return proxy

    def _run(self, kind: str, target: object, args: tuple, kwargs: dict) -> tuple[object, ...] | None:
        """The op's value in each run, or None where it has none (an input it cannot get, an op that fails)."""
        if kind == "placeholder":
            i, self._placeholders = self._placeholders, self._placeholders + 1
            return tuple(run[i] for run in self.runs) if i < len(self.runs[0]) else None
        self._computing = True
        try:
            with torch.no_grad():
                return tuple(self._run_once(kind, target, args, kwargs, r) for r in range(len(self.runs)))
        except Exception:
            return None
        finally:
            self._computing = False

    def _run_once(self, kind: str, target: object, args: tuple, kwargs: dict, r: int) -> object:
        def value(a: object) -> object:
            if isinstance(a, fx.Proxy):
                got = self.values.get(a.node)
                if got is None:
                    raise _NoValue
                return got[r]
            return a

        a, k = map_aggregate(args, value), map_aggregate(kwargs, value)
        if kind in ("call_function", "call_method"):
            return call(kind, target, a, k)  # type: ignore[arg-type]
        if kind == "call_module":
            return self._leaf_forward(*a, **k)  # type: ignore[misc]
        if kind == "get_attr":
            return functools.reduce(getattr, target.split("."), self.root)  # type: ignore[union-attr]
        raise _NoValue


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


def _defaults_after(model: nn.Module, n_inputs: int) -> dict[str, object]:
    """The ``forward`` parameters after the example's ``n_inputs`` that have defaults (``return_features=False``):
    traced at their defaults, as the model runs on the example, instead of as inputs that control flow cannot
    branch on."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[n_inputs:] if p.default is not p.empty}


def _drop_specialized_inputs(graph: fx.Graph, n_inputs: int) -> None:
    """Remove the placeholders fx keeps for ``concrete_args`` and the guards asserting their values: the
    traced code already uses the values, and the graph's inputs are the example's."""
    extra = [n for n in graph.nodes if n.op == "placeholder"][n_inputs:]
    doomed: dict[fx.Node, None] = {}
    for n in graph.nodes:
        if n in extra or any(a in doomed for a in n.all_input_nodes):
            doomed[n] = None
    for n in reversed(doomed):
        graph.erase_node(n)


def check_finite(model: nn.Module) -> None:
    """Every parameter and floating-point buffer (BatchNorm statistics) finite: a NaN or Inf would calibrate to
    a meaningless scale and lower to garbage codes, far from where it came in."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise CaptureError(f"model {kind} {name} has {bad} non-finite value(s) (NaN or Inf) of {t.numel()}; "
                                   "the weights are broken (a diverged training run or a corrupt checkpoint)")


def _trace(tracer: _SiteTracer, model: nn.Module, n_inputs: int) -> fx.Graph:
    """The graph of ``model`` called with ``n_inputs`` tensors, its other ``forward`` options at their defaults."""
    tracer.record_stack_traces = True
    defaults = _defaults_after(model, n_inputs)
    graph = tracer.trace(model, concrete_args=defaults or None)
    _variadic_inputs_resolved(graph, n_inputs)
    if defaults:
        _drop_specialized_inputs(graph, n_inputs)
    return graph


def _variadic_inputs_resolved(graph: fx.Graph, n_inputs: int) -> None:
    """``forward(self, x, *args, **kwargs)``: torch.fx makes ``*args`` and ``**kwargs`` placeholders, which the
    example does not fill. Those the traced code does not read go; ``forward(self, *inputs)`` reading
    ``inputs[i]`` takes the example's tensors as placeholders of their own."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    named = sum(not str(p.target).startswith("*") for p in placeholders)
    for p in placeholders:
        if not str(p.target).startswith("*"):
            continue
        if not str(p.target).startswith("**") and p.users:
            with graph.inserting_before(p):
                own = [graph.placeholder(f"{p.name}_{i}") for i in range(max(n_inputs - named, 0))]
            for reader in list(p.users):
                i = reader.args[1] if reader.target is operator.getitem and len(reader.args) == 2 else None
                if isinstance(i, int) and -len(own) <= i < len(own):
                    reader.replace_all_uses_with(own[i])
                    graph.erase_node(reader)
        if not p.users:
            graph.erase_node(p)


def _untraceable(exc: Exception) -> CaptureError:
    """The one line for a model torch.fx cannot trace: where, why, and which module to keep opaque."""
    site = getattr(exc, "_qcompile_site", None)
    where = f" in module '{site[0]}' ({site[1]})" if site and site[0] else ""
    hint = (
        f"mark it as a leaf module (CLI: --leaf-module {site[0]}; API: capture(..., leaf_modules=[{site[0]!r}]))"
        if site and site[0]
        else "move the untraceable code into a submodule and mark it as a leaf module (--leaf-module NAME)"
    )
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CaptureError(f"cannot trace the model{where} at {user_frame(exc)}: {msg}; {hint}")


def _trace_with_shapes(model: nn.Module, leaves: tuple[set[str], tuple[type, ...], set[str]],
                       example_inputs: Sequence[torch.Tensor]) -> fx.Graph:
    """Trace with :class:`_ShapeValuedTracer`, leaving ``model``'s buffers as they were (a model in training
    mode updates its BatchNorm statistics when the ops run)."""
    runs = [example_inputs, *filter(None, [one_more_sample(example_inputs)])]
    with buffers_kept(model):
        return _trace(_ShapeValuedTracer(*leaves, runs), model, len(example_inputs))


def _outputs(module: nn.Module, inputs: Sequence[torch.Tensor], training: bool) -> list[torch.Tensor]:
    """``module``'s output tensors on copies of ``inputs`` (an in-place model may change them), in eval mode or,
    for a training capture (whose graph holds ``self.training`` branches as traced), in training mode on a copy
    (a training forward updates BatchNorm statistics) with the random generator seeded (dropout draws alike)."""
    if training:
        module = copy.deepcopy(module)
    was_training = module.training
    module.train(training)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = module(*[x.clone() for x in inputs])
    finally:
        module.train(was_training)
    found: list[torch.Tensor] = []
    map_aggregate(out, lambda t: found.append(t) if isinstance(t, torch.Tensor) else None)
    return found


def _functionalize(gm: fx.GraphModule, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
    """Make ``gm``'s in-place operations values (:mod:`qcompile.frontend.inplace`) and check on the example that
    the graph still computes the model: it does not where a changed tensor is also read through a view."""
    done = inplace_ops_functionalized(gm)
    if done.refused:
        node, written = next(iter(done.refused.items()))
        if gm.training and node.op == "call_method" and node.target in _RANDOM_FILLS:
            raise CaptureError(f"{written} at {source_location(node)} draws random numbers in the model's training "
                               "mode (stochastic depth, a hand-written dropout), which does not lower; return the "
                               "model from build_model() in eval mode (model.eval()): QAT then trains without it")
        raise CaptureError(f"{written} at {source_location(node)} changes a tensor in place and has no "
                           "out-of-place form that qcompile follows; compute a new tensor instead")
    if not done.rewritten or any(x.is_meta for x in example_inputs):  # a meta capture (costs) has no values
        return
    try:
        ours, theirs = _outputs(gm, example_inputs, gm.training), _outputs(model, example_inputs, gm.training)
    except Exception as exc:
        raise CaptureError(f"the example input does not run through the model: {first_line(exc)}") from None
    if len(ours) == len(theirs) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=0)
                                        for a, b in zip(ours, theirs)):
        return
    places = ", ".join(f"{w} at {source_location(n)}" for n, w in list(done.rewritten.items())[:3])
    raise CaptureError(f"the model changes tensors in place ({places}{', ...' if len(done.rewritten) > 3 else ''}) "
                       "and one of them is also read through a view, which the graph cannot follow; "
                       "write that operation out of place (y = x.relu() rather than x.relu_())")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` and ``torch.compile`` wrappers (a model
    file may return its model wrapped for training), which torch.fx cannot trace through."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _copy_to_trace(model: nn.Module) -> nn.Module:
    """The copy that is traced: in eval mode, with weight and spectral norms baked into plain weights."""
    if model.training:
        check_trainable(model)
        return copy.deepcopy(model)
    return copy_for_inference(model)


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    leaf_modules: Iterable[LeafSpec] = (),
) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, fold batch-independent shape arithmetic, and propagate shapes to every node.

    ``leaf_modules`` (qualified names such as ``"layer1.0"``, class names, or classes) are kept as opaque calls:
    the way around Python control flow that tracing cannot follow. Each call site becomes its own node, so a
    module called twice carries two independent annotations. A model that plain tracing cannot follow is traced
    again with its shapes known (:class:`_ShapeValuedTracer`), and the error is that trace's.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = unwrapped(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script or "
                           "torch.jit.trace), which torch.fx cannot capture; give qcompile the nn.Module it was made "
                           "from")
    check_finite(model)
    traced = _copy_to_trace(model)
    leaves = _split_leaves(traced, leaf_modules)
    try:
        graph = _trace(_SiteTracer(*leaves), traced, len(example_inputs))
    except Exception:
        traced = _copy_to_trace(model)
        try:
            graph = _trace_with_shapes(traced, leaves, example_inputs)
        except Exception as exc:
            raise _untraceable(exc) from None
    gm = fx.GraphModule(traced, graph, class_name=type(traced).__name__)
    gm.train(traced.training)
    _functionalize(gm, model, example_inputs)
    canonicalize(gm)
    shape_nodes = shape_arithmetic(gm.graph)
    values = propagate(gm, example_inputs, shape_nodes)
    if shape_nodes:
        specialize_shapes(gm, example_inputs, shape_nodes, values)
        shape_argument_layers_to_modules(gm)
    # in this order: each reads recorded shapes, which the nodes made by the ones before it lack until propagated
    if transformer_layers_inlined(gm):
        gm.recompile()
        propagate_shapes(gm, example_inputs)
    attention = multihead_attention_decomposed(gm)
    rearranged, products = einops_patterns.einops_as_reshapes(gm), einsums_as_products(gm)
    if products or attention:
        weight_layers_to_modules(gm)
    rewritten = [attention, rearranged, products, zero_concatenations_as_pads(gm), pixel_shuffles_as_reshapes(gm),
                 batch_kept_in_squeezes(gm), attention_decomposed(gm), selections_before_permutations(gm)]
    if any(rewritten):
        gm.delete_all_unused_submodules()
        gm.recompile()
        propagate_shapes(gm, example_inputs)
    identities_removed(gm)  # a cast to the input's own dtype (CLIP's ``.to(x.dtype)``) would read the batch
    if batch_kept_first(gm):
        weight_layers_to_modules(gm)
        gm.delete_all_unused_submodules()
        gm.recompile()
        propagate_shapes(gm, example_inputs)
    identities_removed(gm)
    return gm
