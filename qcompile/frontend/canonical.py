"""One spelling for the constructs the passes recognise, chosen at capture time.

- Functional layers become modules: ``F.conv2d(x, self.weight, self.bias, ...)`` and ``F.linear(x, self.w,
  self.b)`` on attribute tensors become ``nn.Conv2d`` / ``nn.Linear`` call sites. Every pass treats a conv or
  dense module call as a layer (weights, MACs, a precision, a quantizer); model code in the functional style, or
  a conv subclass whose ``forward`` calls ``F.conv2d`` on its own weight (EfficientNet-PyTorch's static-"SAME"
  conv), traces to calls whose weights are ``get_attr`` reads, and each becomes a module holding the same
  parameter objects. A call whose weight is computed from the input (or, in a training-mode capture, from
  parameters) or whose hyper-parameters are graph values is left alone; the lowering then names it.
- In an eval-mode capture, computations on parameters, buffers and literals alone (``torch.tensor([...],
  device=x.device)`` made in ``forward``) are their results: weight
  standardisation (BiT's ``StdConv2d`` standardises its weight in ``forward``), a scale reshaped for
  broadcasting, ``self.weight.t()``. Each result that feeds the rest of the graph becomes an attribute of the
  module holding the first tensor it reads (``root.weight_folded``): a trainable parameter where it is computed
  from one (QAT of an eval-mode capture trains it), else a buffer. So a conv on a standardised weight is a layer
  like any other. A training-mode capture (QAT) keeps the computations: there the parameters change.
- In an eval-mode capture, a matrix product with a 2-d parameter or buffer (``features @ self.weight``) is
  ``F.linear`` on its transpose, so it becomes a layer as above.
- Padding modules become ``F.pad``: ``nn.ZeroPad2d``, ``nn.ConstantPad2d`` and the reflection / replication pads
  are the function with their padding, value and mode, which the sign analysis and the lowering read.
- In an eval-mode capture, dropout in every form (``nn.Dropout``, ``Dropout2d``, ``AlphaDropout``, ...,
  ``F.dropout*(x, p, training=self.training)``) is the identity it computes there, and goes. A functional dropout
  called with ``training`` left at its default of True drops in eval mode too, and stays. In a training-mode
  capture (QAT), a functional dropout that drops is a dropout module, which follows the graph's mode.
- A function of one tensor written with comparisons, ``torch.where`` or an elementwise max or min (a leaky ReLU
  as ``torch.where(x > 0, x, 0.1 * x)``) is one module (:mod:`qcompile.frontend.regions`), tabulated like an
  activation.
- Adding the number 0 goes: Python's ``sum(tensors)`` starts from 0 (ResNeSt's split attention sums its
  splits so).
- ``torch.stack`` of a list is a ``torch.cat`` of the parts unsqueezed (timm's selective kernels stack their
  branches), the one form in which the passes join codes.
- Once shapes are known, a concatenation with tensors of zeros at either end is a zero padding of the rest
  (PyramidNet widens its shortcut by ``torch.cat((shortcut, torch.zeros(n, c, h, w)), 1)``); a pixel shuffle or
  unshuffle is the reshape, permute and reshape PyTorch defines it as; a ``squeeze()`` without dimensions on a
  batch of one squeezes the dimensions after the batch, as it does at any other batch size.
- A 1-d conv is a 2-d conv of height 1 between an ``unsqueeze(2)`` and a ``squeeze(2)`` (ECA-Net's channel
  attention runs ``nn.Conv1d`` across the channels), so the passes and backends see the conv they know.
- Casts that change nothing go (after shapes are known, :func:`identities_removed`): ``x.float()``,
  ``x.to(torch.float32)``, ``x.type_as(y)``, ``x.cpu()``, ``x.detach()`` on a float32 tensor, as mixed-precision
  and training code writes them. A cast that changes the dtype stays, and the lowering names it. So does
  ``y.expand_as(x)`` / ``y.expand(...)`` read only by elementwise arithmetic whose output already has the
  expanded shape (ECA's ``x * y.expand_as(x)``), directly or through permutations (timm's relative-position
  logits): broadcasting computes the same.
- A conv's string padding becomes numbers: ``"valid"`` is 0, and ``"same"`` is the symmetric padding where the
  kernel's extent ``dilation·(k−1)`` is even, else zero padding with an ``F.pad`` before the conv that puts the
  extra row and column at the bottom and right, as PyTorch does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.dropout import _DropoutNd

from qcompile.frontend.elementwise import arithmetic_kind
from qcompile.frontend.graph import (
    argument,
    call,
    inserted_before,
    literal,
    matrix_product_operands,
    permutation,
    recorded_shape,
    set_submodule,
    unused_name,
)
from qcompile.frontend.regions import elementwise_regions_fused


def attribute_tensor(gm: fx.GraphModule, arg: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (a parameter or buffer), else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value: Any = gm
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def free_module_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first that names no submodule of ``gm`` yet."""
    return unused_name(base, {n for n, _ in gm.named_modules()}.__contains__)


def holder_of(*args: object) -> str:
    """The module path that holds the first attribute among ``args`` (``stem.1`` for ``stem.1.weight``)."""
    return next((str(a.target).rpartition(".")[0] for a in args if isinstance(a, fx.Node) and a.op == "get_attr"), "")


def replace_with_module(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module | None = None) -> fx.Node:
    """Replace call ``node`` by a call of submodule ``name`` (added first when ``module`` is given) on its first
    argument, keeping the node's metadata (its stack trace names the user's source line)."""
    if module is not None:
        gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def as_parameter(t: torch.Tensor) -> nn.Parameter:
    """``t`` itself if a parameter (a module built around it trains it), else a frozen parameter on its storage."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)


def _conv2d(weight: torch.Tensor, bias: torch.Tensor | None, args: dict[str, Any]) -> nn.Module | None:
    if weight.dim() != 4:
        return None
    groups = args.get("groups", 1)
    return nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                     stride=args.get("stride", 1), padding=args.get("padding", 0), dilation=args.get("dilation", 1),
                     groups=groups, bias=bias is not None, device="meta")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, args: dict[str, Any]) -> nn.Module | None:
    if weight.dim() != 2:
        return None
    return nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")


_Builder = Callable[[torch.Tensor, torch.Tensor | None, dict[str, Any]], nn.Module | None]
_LAYERS: dict[object, tuple[str, tuple[str, ...], _Builder]] = {
    F.conv2d: ("conv", ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), _conv2d),
    F.linear: ("fc", ("input", "weight", "bias"), _linear),
}


def _reads_values(args: object) -> bool:
    """Whether any (nested) argument is a graph value rather than a Python constant."""
    found: list[fx.Node] = []
    fx.node.map_arg(tuple(args), found.append)  # type: ignore[arg-type]
    return bool(found)


def _used_up(gm: fx.GraphModule, holder: str, node: fx.Node) -> bool:
    """Whether every use of module ``holder`` in the graph is an attribute that ``node`` alone reads: the module
    can then be replaced by the layer, which keeps its name."""
    if not holder:
        return False
    prefix = holder + "."
    for n in gm.graph.nodes:
        target = str(n.target)
        if n.op == "call_module" and (target == holder or target.startswith(prefix)):
            return False
        if n.op == "get_attr" and target.startswith(prefix) and set(n.users) != {node}:
            return False
    return True


def canonicalize(gm: fx.GraphModule) -> None:
    """Rewrite ``gm`` in place into the spellings above and recompile it."""
    padding_modules_to_functions(gm)
    conv1d_as_conv2d(gm)
    stack_as_cat(gm)
    zero_additions_removed(gm)
    elementwise_regions_fused(gm)
    if not gm.training:
        parameter_computations_folded(gm)
        weight_products_as_linear(gm)
    functional_layers_to_modules(gm)
    numeric_conv_padding(gm)
    if gm.training:
        training_dropout_as_modules(gm)
    else:
        eval_dropout_removed(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()


def weight_layers_to_modules(gm: fx.GraphModule) -> None:
    """The folding and the functional layers above once more, for the rewrites that need shapes: an einsum with
    a weight (``torch.einsum("bnkd,dc->bnkc", x, self.w)``) is ``F.linear`` of the input, reshaped, on the weight
    permuted and reshaped, which an eval-mode capture folds into one weight of a dense layer."""
    if not gm.training:
        parameter_computations_folded(gm)
    functional_layers_to_modules(gm)


def shape_argument_layers_to_modules(gm: fx.GraphModule) -> None:
    """:func:`functional_layers_to_modules` again once the shapes are numbers: a call whose hyper-parameters read
    the input's shape (antialiased-cnns' BlurPool: ``F.conv2d(x, self.filt, stride=2, groups=x.shape[1])``) is
    a layer too."""
    functional_layers_to_modules(gm)
    numeric_conv_padding(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()


_CONSTANT_MAKERS = frozenset({torch.tensor, torch.as_tensor, torch.ones, torch.zeros, torch.full, torch.arange,
                              torch.linspace, torch.eye})
_NEW_METHODS = frozenset({"new_tensor", "new_ones", "new_zeros", "new_full"})


def _device_of(gm: fx.GraphModule) -> torch.device:
    return next((t.device for t in (*gm.parameters(), *gm.buffers())), torch.device("cpu"))


def parameter_computations_folded(gm: fx.GraphModule) -> None:
    """Each computation whose inputs are parameters, buffers and constants alone → a buffer holding its result
    (a Python number or tuple → that constant), read where the computation was. Constants include tensors made
    in ``forward`` from literals (``torch.tensor([0.485, 0.456, 0.406], device=x.device)``,
    ``x.new_tensor(...)``: a model normalising its own input), whose only reads of the input are its device."""
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if (t := attribute_tensor(gm, node)) is not None:
                values[node] = t
            continue
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("device",):
            values[node] = _device_of(gm)
            continue
        made = (node.op == "call_function" and node.target in _CONSTANT_MAKERS) or (
            node.op == "call_method" and node.target in _NEW_METHODS)
        # ``x.new_tensor(...)`` reads nothing of ``x`` but its dtype and device: an empty tensor stands in for it
        stand_in = {node.args[0]: torch.empty(0, device=_device_of(gm))} if node.op == "call_method" and made else {}
        inputs = [a for a in node.all_input_nodes if a not in stand_in]
        if node.op not in ("call_function", "call_method") or not (inputs or made) or not all(
                a in values for a in inputs):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: stand_in.get(a, values.get(a)))
        try:
            with torch.no_grad():
                values[node] = call(node.op, node.target, args, kwargs)  # type: ignore[arg-type]
        except Exception:
            continue
    for node, value in values.items():
        outside = [u for u in node.users if u not in values]
        if node.op == "get_attr" or not outside:
            continue
        if isinstance(value, torch.Tensor):
            attributes = _attribute_inputs(node)
            holder, _, attribute = str(attributes[0].target).rpartition(".") if attributes else ("", "", node.name)
            module = gm.get_submodule(holder)
            name = unused_name(f"{attribute}_folded", lambda n: hasattr(module, n))
            register_folded(module, name, value, [values[a] for a in attributes])
            with gm.graph.inserting_before(node):
                read = gm.graph.get_attr(f"{holder}.{name}" if holder else name)
            read.meta.update(node.meta)
            node.replace_all_uses_with(read, delete_user_cb=lambda u: u not in values)
        elif (constant := literal(value)) is not None:
            for user in outside:
                user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs),
                                                         lambda a: constant if a is node else a)
    for node in reversed(list(values)):
        if not node.users:
            gm.graph.erase_node(node)


def register_folded(module: nn.Module, name: str, value: torch.Tensor, sources: list[object]) -> None:
    """``value`` as an attribute of ``module``: a trainable parameter where it is computed from one (quantization-
    aware training of an eval-mode capture then trains it, as the layer weight it becomes), else a buffer."""
    if any(isinstance(s, nn.Parameter) and s.requires_grad for s in sources):
        module.register_parameter(name, nn.Parameter(value.detach().clone()))
    else:
        module.register_buffer(name, value.detach().clone())


def _attribute_inputs(node: fx.Node) -> list[fx.Node]:
    """The ``get_attr`` nodes ``node`` is computed from, in graph order."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen and n.op == "get_attr"]


def zero_additions_removed(gm: fx.GraphModule) -> None:
    """Each ``0 + x`` or ``x + 0`` (``sum()``'s start) → ``x``."""
    for node in list(gm.graph.nodes):
        if arithmetic_kind(node) != "add" or node.kwargs:
            continue
        values = [a for a in node.args if isinstance(a, fx.Node)]
        zeros = [a for a in node.args if not isinstance(a, bool) and isinstance(a, int | float) and a == 0]
        if len(values) == 1 and len(zeros) == 1:
            node.replace_all_uses_with(values[0])
            gm.graph.erase_node(node)


def stack_as_cat(gm: fx.GraphModule) -> None:
    """Each ``torch.stack(xs, dim)`` of a list of values → ``torch.cat([x.unsqueeze(dim) for x in xs], dim)``,
    the same tensor, in the one form the passes join codes in (timm's selective kernels stack their branches)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.stack:
            continue
        parts, dim = node.args[0] if node.args else node.kwargs.get("tensors"), argument(node, 1, "dim", 0)
        if not isinstance(parts, list | tuple) or not all(isinstance(p, fx.Node) for p in parts):
            continue
        with gm.graph.inserting_before(node):
            wide = [gm.graph.call_method("unsqueeze", (p, dim)) for p in parts]
            cat = gm.graph.call_function(torch.cat, (wide, dim))
        for n in (*wide, cat):
            n.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)


def _is_zeros(node: object) -> bool:
    """``torch.zeros(...)``, ``torch.zeros_like(x)``, ``x.new_zeros(...)``: a tensor of zeros (float by default)."""
    if not isinstance(node, fx.Node) or "dtype" in node.kwargs:
        return False
    return (node.op == "call_function" and node.target in (torch.zeros, torch.zeros_like)) or (
        node.op == "call_method" and node.target == "new_zeros")


def zero_concatenations_as_pads(gm: fx.GraphModule) -> bool:
    """Each ``torch.cat`` with tensors of zeros first or last → ``F.pad`` of the rest along that dimension
    (PyramidNet widens its shortcut so: ``torch.cat((shortcut, torch.zeros(n, c, h, w)), 1)``), a padding of
    codes. Needs the recorded shapes; whether anything changed (the new nodes have none yet)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.cat or "tensor_meta" not in node.meta:
            continue
        parts, dim = list(argument(node, 0, "tensors")), argument(node, 1, "dim", 0)
        rank = len(node.meta["tensor_meta"].shape)
        lead = next((i for i, p in enumerate(parts) if not _is_zeros(p)), len(parts))
        tail = next((i for i, p in enumerate(reversed(parts)) if not _is_zeros(p)), len(parts))
        kept = parts[lead:len(parts) - tail]
        if not kept or len(kept) == len(parts) or any(_is_zeros(p) for p in kept) or dim % rank == 0:
            continue
        before, after = (sum(p.meta["tensor_meta"].shape[dim] for p in zeros)
                         for zeros in (parts[:lead], parts[len(parts) - tail:]))
        pads = [0] * (2 * (rank - dim % rank))
        pads[-2:] = [before, after]
        with gm.graph.inserting_before(node):
            x = kept[0] if len(kept) == 1 else gm.graph.call_function(torch.cat, (kept, dim))
            pad = gm.graph.call_function(F.pad, (x, tuple(pads)))
        for n in {x, pad} - {kept[0]}:
            n.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(pad)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


_PIXEL_SHUFFLES: dict[object, tuple[bool, str]] = {  # callable -> (shuffle, not unshuffle; its factor's keyword)
    F.pixel_shuffle: (True, "upscale_factor"), torch.pixel_shuffle: (True, "upscale_factor"),
    F.pixel_unshuffle: (False, "downscale_factor"), torch.pixel_unshuffle: (False, "downscale_factor"),
}


def _pixel_shuffle(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, int] | None:
    """``(shuffle, factor)`` of a pixel (un)shuffle call, module or function; None for anything else."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.PixelShuffle):
            return True, m.upscale_factor
        return (False, m.downscale_factor) if isinstance(m, nn.PixelUnshuffle) else None
    if node.op != "call_function" or node.target not in _PIXEL_SHUFFLES:  # type: ignore[operator]
        return None
    shuffle, keyword = _PIXEL_SHUFFLES[node.target]
    factor = argument(node, 1, keyword)
    return (shuffle, factor) if isinstance(factor, int) else None


def pixel_shuffles_as_reshapes(gm: fx.GraphModule) -> bool:
    """Each pixel shuffle / unshuffle of a 4-d tensor (``nn.PixelUnshuffle(2)`` as a space-to-depth stem) → the
    reshape, permute, reshape that PyTorch defines it as, with the batch kept a free size: moves of codes. Needs
    the recorded shapes; whether anything changed (the new nodes have none yet)."""
    changed = False
    for node in list(gm.graph.nodes):
        found = _pixel_shuffle(gm, node)
        shape = _shape_of(node.args[0]) if found and node.args else None
        if found is None or shape is None or len(shape) != 4:
            continue
        (shuffle, r), (_, c, h, w) = found, shape
        if shuffle:
            split, order, joined = (c // (r * r), r, r, h, w), (0, 1, 4, 2, 5, 3), (c // (r * r), h * r, w * r)
        else:
            split, order, joined = (c, h // r, r, w // r, r), (0, 1, 3, 5, 2, 4), (c * r * r, h // r, w // r)
        a = inserted_before(node, "call_method", "reshape", (node.args[0], -1, *split))
        b = inserted_before(node, "call_method", "permute", (a, *order))
        out = inserted_before(node, "call_method", "reshape", (b, -1, *joined))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        changed = True
    return changed


def batch_kept_in_squeezes(gm: fx.GraphModule) -> bool:
    """Each ``x.squeeze()`` / ``torch.squeeze(x)`` without dimensions on a tensor whose batch is 1 in the example
    (a head written ``self.pool(x).squeeze()``, which squeezes the batch too at batch size 1) → a squeeze of the
    size-1 dimensions after the batch, as it runs at every other batch size: the compiled model keeps its batch.
    Needs the recorded shapes; whether anything changed (the shapes after it change)."""
    changed = False
    for node in gm.graph.nodes:
        squeeze = (node.op == "call_method" and node.target == "squeeze") or (
            node.op == "call_function" and node.target is torch.squeeze)
        shape = _shape_of(node.args[0]) if squeeze and len(node.args) == 1 and not node.kwargs else None
        if shape and shape[0] == 1:
            node.args = (node.args[0], tuple(i for i, d in enumerate(shape) if i > 0 and d == 1))
            changed = True
    return changed


def conv1d_as_conv2d(gm: fx.GraphModule) -> None:
    """Each ``nn.Conv1d`` (zero padding) → an ``nn.Conv2d`` with kernel (1, k) holding the same weights with a
    unit height, called on ``x.unsqueeze(2)`` and squeezed back."""
    for node in list(gm.graph.nodes):
        m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if type(m) is not nn.Conv1d or m.padding_mode != "zeros" or isinstance(m.padding, str):
            continue
        conv = nn.Conv2d(m.in_channels, m.out_channels, (1, *m.kernel_size), stride=(1, *m.stride),
                         padding=(0, *m.padding), dilation=(1, *m.dilation), groups=m.groups, bias=m.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(m.weight.unsqueeze(2))
            if m.bias is not None:
                conv.bias.copy_(m.bias)
        set_submodule(gm, str(node.target), conv.train(m.training))
        with gm.graph.inserting_before(node):
            wide = gm.graph.call_method("unsqueeze", (node.args[0], 2))
        with gm.graph.inserting_after(node):
            narrow = gm.graph.call_method("squeeze", (node, 2))
        wide.meta["stack_trace"] = narrow.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(narrow, delete_user_cb=lambda u: u is not narrow)
        node.args = (wide,)


_SAME_VALUE = frozenset({"float", "to", "type", "type_as", "cpu", "detach"})


def _shape_of(arg: object) -> tuple[int, ...] | None:
    if isinstance(arg, fx.Node):
        return recorded_shape(arg) or None
    return () if isinstance(arg, bool | int | float) else None


def _broadcast_away(node: fx.Node, source: tuple[int, ...], expanded: tuple[int, ...]
                    ) -> dict[fx.Node, tuple[int, ...]] | None:
    """Whether every reader of ``node`` (``source`` expanded to ``expanded``) is elementwise arithmetic whose
    other operand broadcasts with ``source`` to ``expanded`` by itself, or a permutation whose readers are (timm's
    relative-position logits expand, permute, then add): the permutations' shapes without the expand, else None."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    def redundant(n: fx.Node, source: tuple[int, ...], expanded: tuple[int, ...]) -> bool:
        for u in n.users:
            if (perm := permutation(u, len(expanded))) is not None:
                shapes[u] = tuple(source[p] for p in perm)
                if not redundant(u, shapes[u], tuple(expanded[p] for p in perm)):
                    return False
                continue
            other = [_shape_of(a) for a in u.args if a is not n]
            if arithmetic_kind(u) is None or len(other) != 1 or other[0] is None:
                return False
            try:
                if tuple(torch.broadcast_shapes(source, other[0])) != expanded:
                    return False
            except RuntimeError:
                return False
        return bool(n.users)

    return shapes if redundant(node, source, expanded) else None


def identities_removed(gm: fx.GraphModule) -> None:
    """Each cast method whose output has its input's dtype and shape, and each expand that broadcasting makes
    redundant (``tensor_meta`` from shape propagation) → its input; ``x.view_as(y)`` / ``x.reshape_as(y)`` →
    ``x.reshape(-1, *y.shape[1:])``, the one reshape spelling the passes know, the batch kept a free size."""
    for node in list(gm.graph.nodes):
        shaped = node.meta.get("tensor_meta")
        if node.op == "call_method" and node.target in ("view_as", "reshape_as") and hasattr(shaped, "shape"):
            node.target, node.args = "reshape", (node.args[0], -1, *shaped.shape[1:])
        is_cast = node.op == "call_method" and node.target in _SAME_VALUE
        is_expand = node.op == "call_method" and node.target in ("expand", "expand_as")
        source = node.args[0] if (is_cast or is_expand) and node.args else None
        if not isinstance(source, fx.Node):
            continue
        before, after = source.meta.get("tensor_meta"), node.meta.get("tensor_meta")
        if not (hasattr(before, "dtype") and hasattr(after, "dtype")) or before.dtype != after.dtype:
            continue
        if is_cast and before.shape != after.shape:
            continue
        moved = {} if is_cast else _broadcast_away(node, tuple(before.shape), tuple(after.shape))
        if moved is None:
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        for n, shape in moved.items():  # what the next expand's check reads
            n.meta["tensor_meta"] = n.meta["tensor_meta"]._replace(shape=torch.Size(shape))
    gm.recompile()


_PAD_MODES = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate", nn.CircularPad2d: "circular"}


def padding_modules_to_functions(gm: fx.GraphModule) -> None:
    """Each call of a 2-d padding module → ``F.pad(x, padding, mode, value)``."""
    for node in list(gm.graph.nodes):
        m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(m, nn.ConstantPad2d | nn.ZeroPad2d):
            kwargs: dict[str, Any] = {"value": float(m.value)} if m.value else {}
        elif type(m) in _PAD_MODES:
            kwargs = {"mode": _PAD_MODES[type(m)]}
        else:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(F.pad, (node.args[0], list(m.padding)), kwargs)
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)


def numeric_conv_padding(gm: fx.GraphModule) -> None:
    """Each conv with ``padding="same"`` or ``"valid"`` → numeric padding, and an ``F.pad`` before each of its
    call sites where "same" is asymmetric; a conv with another ``padding_mode`` than zeros (``"reflect"``,
    ``"replicate"``, ``"circular"``) → that ``F.pad`` before each call site and no padding of its own, as
    PyTorch computes it."""
    asymmetric: dict[nn.Module, list[int]] = {}
    modes: dict[nn.Module, str] = {}
    for node in list(gm.graph.nodes):
        m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(m, nn.Conv2d):
            continue
        if m.padding_mode != "zeros":
            asymmetric[m], modes[m] = list(m._reversed_padding_repeated_twice), m.padding_mode
            m.padding, m.padding_mode = (0, 0), "zeros"
        if m.padding == "valid":
            m.padding = (0, 0)
        elif m.padding == "same":
            extent = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            m.padding = tuple(e // 2 for e in extent) if all(e % 2 == 0 for e in extent) else (0, 0)
            if any(e % 2 for e in extent):
                asymmetric[m] = [p for e in reversed(extent) for p in (e // 2, e - e // 2)]  # F.pad: W, then H
        if m in asymmetric:
            with gm.graph.inserting_before(node):
                mode = {"mode": modes[m]} if m in modes else {}
                pad = gm.graph.call_function(F.pad, (node.args[0], asymmetric[m]), mode)
            pad.meta.update({k: v for k, v in node.meta.items() if k == "stack_trace"})
            node.replace_input_with(node.args[0], pad)


_DROPOUT_MODULES = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                    F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                    F.feature_alpha_dropout: nn.FeatureAlphaDropout}


def training_dropout_as_modules(gm: fx.GraphModule) -> None:
    """In a training-mode capture, each functional dropout that drops (``F.dropout(x, p, self.training)``, traced
    with ``self.training`` True) → a dropout module, which follows the graph's mode: the graph QAT trains drops, and
    the one it lowers in eval mode has the identity there, as the model has."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUT_MODULES:
            continue
        p, training = argument(node, 1, "p", 0.5), argument(node, 2, "training", True)
        if training is True and isinstance(p, float | int) and isinstance(node.args[0], fx.Node):
            module = _DROPOUT_MODULES[node.target](float(p))
            replace_with_module(gm, node, free_module_name(gm, "dropout"), module.train(gm.training))


def eval_dropout_removed(gm: fx.GraphModule) -> None:
    """Each dropout that is the identity in eval mode → its input."""
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        functional = node.op == "call_function" and node.target in _DROPOUT_MODULES
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        if isinstance(module, _DropoutNd) or (functional and training is False):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def weight_products_as_linear(gm: fx.GraphModule) -> None:
    """``x @ W`` (``torch.matmul``, ``torch.mm``, their methods) with ``W`` a 2-d parameter or buffer, or one
    folded from them (``self.rel_k.t()``) → ``F.linear(x, Wᵀ)``, ``Wᵀ`` an attribute beside ``W`` (a parameter
    if ``W`` is one): a classifier written as ``features @ self.weight + self.bias`` is a dense layer like
    ``nn.Linear`` (eval captures; a training capture keeps the product)."""
    for node in list(gm.graph.nodes):
        if (operands := matrix_product_operands(node)) is None:
            continue
        x, w_node = operands
        w = attribute_tensor(gm, w_node)
        if w is None or w.dim() != 2 or not isinstance(x, fx.Node):
            continue
        holder, _, attribute = str(w_node.target).rpartition(".")
        module = gm.get_submodule(holder)
        name = unused_name(f"{attribute}_t", lambda n: hasattr(module, n))
        register_folded(module, name, w.t().contiguous(), [w])
        with gm.graph.inserting_before(node):
            read = gm.graph.get_attr(f"{holder}.{name}" if holder else name)
            linear = gm.graph.call_function(F.linear, (x, read))
        linear.meta.update(node.meta)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        if not w_node.users:
            gm.graph.erase_node(w_node)


def functional_layers_to_modules(gm: fx.GraphModule) -> None:
    """Each ``F.conv2d`` / ``F.linear`` on attribute weights → a call of a module sharing those parameters, named
    after the module that held them (which it replaces when nothing else used it). Call sites with the same
    weights and hyper-parameters share one module."""
    made: dict[tuple[Any, ...], str] = {}
    for node in list(gm.graph.nodes):
        spec = _LAYERS.get(node.target) if node.op == "call_function" else None  # type: ignore[call-overload]
        if spec is None:
            continue
        kind, names, build = spec
        args = dict(zip(names, node.args)) | dict(node.kwargs)
        weight, bias = attribute_tensor(gm, args.get("weight")), attribute_tensor(gm, args.get("bias"))
        hyper = {k: v for k, v in args.items() if k not in ("input", "weight", "bias")}
        if weight is None or (args.get("bias") is not None and bias is None):
            continue
        if _reads_values(hyper.values()):
            continue
        key = (kind, str(args["weight"].target), str(getattr(args.get("bias"), "target", None)), repr(hyper))
        if key in made:
            replace_with_module(gm, node, made[key])
            continue
        layer = build(weight, bias, hyper)
        if layer is None:
            continue
        layer.weight = as_parameter(weight)
        if bias is not None:
            layer.bias = as_parameter(bias)
        holder = holder_of(args["weight"])
        if _used_up(gm, holder, node):
            set_submodule(gm, holder, layer)
            made[key] = holder
            replace_with_module(gm, node, holder)
        else:
            base = f"{holder}.{kind}" if holder else f"{str(args['weight'].target)}_{kind}"
            made[key] = free_module_name(gm, base)
            replace_with_module(gm, node, made[key], layer)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
