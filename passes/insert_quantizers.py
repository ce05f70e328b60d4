"""Insert fake quantizers: per-channel weights, per-tensor activations on compute inputs and residual adds.

Every conv/dense input gets an activation quantizer with the layer's spec (one quantizer per tensor and spec,
shared by consumers that agree). Each residual add and each product of two tensors gets quantizers on those inputs
that are not already on a quantizer's grid (an add's before the permutes and reshapes producing it, which then move
codes), and one on its output (after the ReLU that follows an add, if any), at the recipe's residual width: in the
integer IR they are DQ → op → Q, except that a matrix product (``a @ b``) multiplies the codes into an int32
accumulator that its output quantizer requantizes, as a layer's. A unary function (SiLU, sigmoid, a clamp, ``x +
3``) gets a quantizer on its input unless it is on a grid already, and one on its output unless only quantizers
read it: the IR tabulates it from input codes to output codes. A clamp of a layer's output needs no input
quantizer: it folds into the layer's requantize. A LayerNorm needs no quantizer of its own: it reads its input in
float like any float op, and whatever reads its output either quantizes it (a layer, an add, a product, a unary
function), is exact on floats (permutes, reshapes) or is a float op the IR defines anyway (pooling), so every
backend computes the same float32 values. The inputs of a concatenation get quantizers of one spec
(``align_add_scales`` then gives them one scale, so the concatenation moves codes). Last, a quantized layer's
accumulator is never read in float: where anything but a quantizer, a ReLU, a clamp or max pooling reads it
(pooling, a mean, a reshape), it is quantized first, so every layer runs as an integer kernel and no backend's
float accumulation order can show. Signedness comes from the graph. Weights are quantized through a
parametrization, so layers stay ``nn.Conv2d`` / ``nn.Linear``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from qcompile.errors import PipelineError
from qcompile.frontend.elementwise import arithmetic_kind, binary_extremum, is_binary_mul, tensor_input, unary_of
from qcompile.frontend.graph import (compute_nodes, is_compute, is_matmul, is_nonnegative, is_relu, is_softmax_head,
                                     module_of, nearest_upsampling)
from qcompile.passes.norm_layers import NormLayer
from qcompile.pipeline import PRECISION, QUANTIZERS, SHAPES, Pass, PassContext
from qcompile.quantization.quantizer import (ActivationQuantizer, BiasQuantizer, LayerAccumulator, ProductAccumulator,
                                             WeightQuantizer)
from qcompile.quantization.recipes import activation_calibrator
from qcompile.quantization.spec import Granularity, QuantSpec, annotate, get_annotation

_NO_OPS = (nn.Identity, nn.Dropout)
_NO_OP_METHODS = frozenset({"contiguous", "clone"})
_TRANSPARENT_MODULES = (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.Flatten, nn.Dropout)
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   torch.flip, torch.roll}
_MOVE_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "flip",
                 "roll"}
_TRANSPARENT_FUNCTIONS = {F.relu, torch.relu, F.max_pool2d, F.dropout} | _MOVE_FUNCTIONS
_TRANSPARENT_METHODS = {"relu"} | _MOVE_METHODS


def _shared_input_specs(gm: fx.GraphModule, layers: list[fx.Node]) -> dict[str, QuantSpec]:
    """The one input spec of each quantized layer with a bias that is called at several sites: signed if any
    site's input is signed; sites that differ otherwise are an error (the int32 bias needs one input scale)."""
    calls = Counter(str(n.target) for n in layers)
    specs: dict[str, QuantSpec] = {}
    for node in layers:
        target, spec = str(node.target), get_annotation(node).input_act
        if calls[target] < 2 or getattr(gm.get_submodule(target), "bias", None) is None or not spec.is_quantized:
            continue
        first = specs.setdefault(target, spec)
        if replace(first, signed=True) != replace(spec, signed=True):
            raise PipelineError(f"insert_quantizers: {target} has a bias and is called on inputs that quantize "
                                f"differently ({first.describe()}, {spec.describe()}); its int32 bias scale would "
                                "be ambiguous: give its call sites one precision")
        if spec.signed:
            specs[target] = spec
    return specs


def is_concat(node: fx.Node) -> bool:
    """``torch.cat`` of a list of tensors along a dimension other than the batch."""
    return (node.op == "call_function" and node.target is torch.cat and bool(node.args)
            and isinstance(node.args[0], (list, tuple)) and all(isinstance(a, fx.Node) for a in node.args[0]))


def is_add(node: fx.Node) -> bool:
    """A tensor + tensor add (the residual join); a parameter or buffer added is a float constant, not a tensor
    to quantize."""
    tensor_args = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
    return arithmetic_kind(node) == "add" and len(tensor_args) == 2


def sum_value(gm: fx.GraphModule, add: fx.Node) -> fx.Node:
    """The node whose output a residual add's readers read: the ReLU when it is the sum's only reader (the
    residual is quantized after it), else the sum itself."""
    users = list(add.users)
    return users[0] if len(users) == 1 and is_relu(gm, users[0]) else add


def is_move(node: fx.Node) -> bool:
    """Pure data movement of one tensor: a reshape or a permute (a per-tensor quantizer commutes with it)."""
    return bool(node.args) and isinstance(node.args[0], fx.Node) and (
        (node.op == "call_function" and node.target in _MOVE_FUNCTIONS)
        or (node.op == "call_method" and node.target in _MOVE_METHODS))


def quantizer_of(gm: fx.GraphModule, node: fx.Node) -> ActivationQuantizer | None:
    """The activation quantizer whose grid ``node``'s values lie on (through ReLU, max-pool, reshapes and
    permutes), if any."""
    while True:
        m = module_of(gm, node)
        if isinstance(m, ActivationQuantizer):
            return m
        transparent = isinstance(m, _TRANSPARENT_MODULES) or (
            node.op == "call_function" and node.target in _TRANSPARENT_FUNCTIONS
        ) or (node.op == "call_method" and node.target in _TRANSPARENT_METHODS) or (
            nearest_upsampling(gm, node) is not None)
        if not transparent or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]


def activation_quantizers(gm: fx.GraphModule) -> dict[str, ActivationQuantizer]:
    """Every activation quantizer of the graph by submodule name."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, ActivationQuantizer)}


def activation_quantizer_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, ActivationQuantizer]]:
    """Every call site of an activation quantizer, in graph order: for the passes that need the tensor a
    quantizer reads (its node's input), not just the module :func:`activation_quantizers` gives."""
    return [(node, q) for node in gm.graph.nodes if isinstance(q := module_of(gm, node), ActivationQuantizer)]


def weight_quantizers(gm: fx.GraphModule) -> dict[str, WeightQuantizer]:
    """Every weight quantizer (parametrization) by the name of the layer it quantizes."""
    out = {}
    for name, m in gm.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:  # type: ignore[union-attr]
                if isinstance(p, WeightQuantizer):
                    out[name] = p
    return out


def _is_no_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An ``nn.Identity`` or dropout module, ``x.contiguous()`` or ``x.clone()``: the value itself, so that a
    quantizer of it is shared with its other readers (a second quantizer on a residual sum behind a
    ``contiguous``, ResNeSt's block end, made onnxruntime run the next conv in float)."""
    return isinstance(module_of(gm, node), _NO_OPS) or (node.op == "call_method" and node.target in _NO_OP_METHODS)


def _is_monotone(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU, clamp, max pooling or no-op: per-channel monotone maps that commute with requantizing an
    accumulator (the IR folds them into the requantize or applies them to its codes)."""
    return (
        is_relu(gm, node)
        or _is_no_op(gm, node) or isinstance(module_of(gm, node), nn.MaxPool2d)
        or (node.op == "call_function" and node.target is F.max_pool2d)
        or ((u := unary_of(gm, node)) is not None and u.clamp is not None)
    )


def _quantized_layer(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """The quantized conv/dense call whose output ``node`` is, seen back through monotone maps; else None."""
    while isinstance(node, fx.Node) and _is_monotone(gm, node):
        node = tensor_input(node)
    if not isinstance(node, fx.Node):
        return None
    layer = module_of(gm, node)
    return node if layer is not None and parametrize.is_parametrized(layer, "weight") else None


def _quantized_product(gm: fx.GraphModule, node: object) -> ProductAccumulator | None:
    """The accumulator of the matrix product of two quantized tensors whose output ``node`` is (seen back through
    a ReLU), else None."""
    if isinstance(node, fx.Node) and is_relu(gm, node):
        node = tensor_input(node)
    if not isinstance(node, fx.Node) or not is_matmul(node):
        return None
    a, b = (module_of(gm, x) for x in node.args)  # type: ignore[arg-type]
    if isinstance(a, ActivationQuantizer) and isinstance(b, ActivationQuantizer):
        return ProductAccumulator(a, b)
    return None


def _divides_by(node: fx.Node, value: fx.Node) -> bool:
    """``node`` is ``a / value`` (``value`` only as the divisor): SimAM's ``x / (4 * (variance + eps))``."""
    return arithmetic_kind(node) == "div" and node.args[1] is value and node.args[0] is not value


def _activation_spec(bits: int, signed: bool, ctx: PassContext) -> QuantSpec:
    """A per-tensor activation quantizer at ``bits`` with the recipe's calibrator."""
    return QuantSpec(bits, signed, Granularity.PER_TENSOR, activation_calibrator(ctx.recipe), symmetric=False)


class InsertQuantizers(Pass):
    name = "insert_quantizers"
    requires = frozenset({SHAPES, PRECISION})
    guarantees = frozenset({QUANTIZERS})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        self._edges: dict[tuple[fx.Node, QuantSpec], fx.Node] = {}
        layers = compute_nodes(gm)
        weight_specs: dict[str, QuantSpec] = {}
        shared_inputs: dict[str, fx.Node] = {}  # a biased layer called at several sites -> its input quantizer
        shared_specs = _shared_input_specs(gm, layers)
        any_quantized = False
        for node in layers:
            ann = get_annotation(node)
            assert ann is not None and ann.weight is not None and ann.input_act is not None
            if ann.weight.is_quantized:
                any_quantized = True
                target = str(node.target)
                if weight_specs.setdefault(target, ann.weight) != ann.weight:
                    raise PipelineError(
                        f"insert_quantizers: module {target} is called at several sites with different weight "
                        "precisions; give its call sites one precision"
                    )
            if not ann.input_act.is_quantized:
                continue
            target = str(node.target)
            if target in shared_specs:
                q = self._quantize_shared_input(gm, node, shared_specs[target], shared_inputs.get(target))
                shared_inputs.setdefault(target, q)
            else:
                q = self._quantize_edge(gm, node.args[0], ann.input_act)
            node.args = (q, *node.args[1:])
        for target, spec in weight_specs.items():
            parametrize.register_parametrization(gm.get_submodule(target), "weight", WeightQuantizer(spec))
        self._quantize_biases(gm, layers)
        if any_quantized:
            residual = ctx.recipe.residual_bits
            memo: dict[fx.Node, bool] = {}
            self._quantize_elementwise(gm, residual, ctx, memo)
            for node in [n for n in gm.graph.nodes if is_add(n)]:
                new_args = []
                for a in node.args:
                    if isinstance(a, fx.Node) and quantizer_of(gm, a) is None:
                        a = self._quantize_before_moves(gm, a, residual, ctx, memo)
                    new_args.append(a)
                node.args = tuple(new_args)
                self._quantize_sum(gm, node, residual, ctx, memo)
            for node in [n for n in gm.graph.nodes if is_concat(n)]:
                self._quantize_concat(gm, node, residual, ctx, memo)
            self._quantize_accumulators(gm, residual, ctx, memo)
        for node in reversed(list(gm.graph.nodes)):  # no-op calls the quantizers made unused
            if not node.users and _is_no_op(gm, node):
                gm.graph.erase_node(node)
        self._chain_narrower(gm)
        self._link_requantizers(gm)
        return gm

    def _quantize_elementwise(self, gm: fx.GraphModule, bits: int, ctx: PassContext,
                              memo: dict[fx.Node, bool]) -> None:
        """Quantizers around unary functions and products of tensors, in graph order (so a function's output
        quantizer is in place before its readers ask whether their input is on a grid)."""
        for node in list(gm.graph.nodes):
            if "tensor_meta" not in node.meta:
                continue  # sizes and other Python values: ``B * self.heads`` is shape arithmetic, not a function
            u = unary_of(gm, node)
            if u is not None:
                src = tensor_input(node)
                if u.clamp is None or _quantized_layer(gm, src) is None:  # a clamp of a layer folds instead
                    self._quantize_input(gm, node, src, bits, ctx, memo)
            elif is_binary_mul(node) or is_matmul(node) or binary_extremum(node) is not None:
                for a in dict.fromkeys(node.args):
                    self._quantize_input(gm, node, a, bits, ctx, memo)
            else:
                continue
            readers = [r for r in node.users if not isinstance(module_of(gm, r), ActivationQuantizer)]
            if readers:
                spec = self._spec(gm, node, bits, ctx, memo)
                if not spec.signed and all(_divides_by(r, node) for r in readers):
                    spec = replace(spec, positive=True)  # a code 0 would divide by zero
                q = self._quantize_edge(gm, node, spec)
                for r in readers:
                    r.replace_input_with(node, q)

    def _quantize_input(self, gm: fx.GraphModule, node: fx.Node, src: fx.Node, bits: int, ctx: PassContext,
                        memo: dict[fx.Node, bool]) -> None:
        """``node`` reads ``src`` through a quantizer, unless ``src`` is on a quantizer's grid already."""
        if quantizer_of(gm, src) is None:
            node.replace_input_with(src, self._quantize_edge(gm, src, self._spec(gm, src, bits, ctx, memo)))

    def _quantize_before_moves(self, gm: fx.GraphModule, value: fx.Node, bits: int, ctx: PassContext,
                               memo: dict[fx.Node, bool]) -> fx.Node:
        """A quantizer for ``value`` placed before the single-use permutes, reshapes and no-ops that produce it,
        which then move codes; returns what to read instead of ``value``. A layer's output permuted back to channels
        first (ConvNeXt's residual branch) is then requantized once, instead of requantized before the permute
        (a layer's accumulator is never read in float) and quantized again after it."""
        move, src = None, value
        while len(src.users) == 1 and (is_move(src) or _is_no_op(gm, src)):
            move, src = src, src.args[0]
        q = self._quantize_edge(gm, src, self._spec(gm, src, bits, ctx, memo))
        if move is None:
            return q
        move.replace_input_with(src, q)
        return value

    def _quantize_concat(self, gm: fx.GraphModule, node: fx.Node, bits: int, ctx: PassContext,
                         memo: dict[fx.Node, bool]) -> None:
        """Every input of a concatenation through a quantizer of one spec (signed unless all are >= 0)."""
        parts = list(node.args[0])
        spec = _activation_spec(bits, not all(is_nonnegative(gm, p, memo) for p in parts), ctx)
        quantized = []
        for p in parts:
            m = module_of(gm, p)
            quantized.append(p if isinstance(m, ActivationQuantizer) and m.spec == spec
                             else self._quantize_edge(gm, p, spec))
        node.args = (type(node.args[0])(quantized), *node.args[1:])

    def _quantize_accumulators(self, gm: fx.GraphModule, bits: int, ctx: PassContext,
                               memo: dict[fx.Node, bool]) -> None:
        """A quantizer wherever something other than a quantizer, a layer, the graph output or a softmax head
        reads a quantized layer's output (or its ReLU, clamp or max pool)."""
        for layer in compute_nodes(gm):
            if _quantized_layer(gm, layer) is None:
                continue
            frontier = [layer]
            while frontier:
                v = frontier.pop()
                for r in list(v.users):
                    if (r.op == "output" or isinstance(module_of(gm, r), ActivationQuantizer) or is_compute(gm, r)
                            or is_softmax_head(gm, r)):
                        continue
                    if _is_monotone(gm, r) or isinstance(module_of(gm, r), nn.modules.batchnorm._BatchNorm):
                        frontier.append(r)  # a BatchNorm still in place (bn_tune's copy) belongs to its layer
                        continue
                    r.replace_input_with(v, self._quantize_edge(gm, v, self._spec(gm, v, bits, ctx, memo)))

    @staticmethod
    def _chain_narrower(gm: fx.GraphModule) -> None:
        """Where several quantizers of one signedness read a value that is not a residual sum (a ResNet stem
        read by the 8-bit residual and by a 4-bit layer), the narrower ones requantize the widest one's codes:
        the layer producing the value then runs once as an integer kernel, followed by an elementwise
        requantize, instead of once per reader. A sum stays read in float by each quantizer: each becomes its
        own integer add in onnxruntime."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # a move below reorders one value's quantizers only
        for node in list(gm.graph.nodes):
            src = node.args[0] if is_relu(gm, node) and node.args else node
            if isinstance(src, fx.Node) and is_add(src):
                continue
            readers = [(u, q) for u in node.users if isinstance(q := module_of(gm, u), ActivationQuantizer)]
            if len(readers) < 2:
                continue
            widest, wq = max(readers, key=lambda r: r[1].spec.bits)
            for u, q in readers:
                if q.spec.bits < wq.spec.bits and q.spec.signed == wq.spec.signed:
                    u.replace_input_with(node, widest)
                    if order[u] < order[widest]:  # the value's quantizers sit right after it, newest first
                        widest.append(u)

    def _quantize_sum(self, gm: fx.GraphModule, add: fx.Node, bits: int, ctx: PassContext,
                      memo: dict[fx.Node, bool]) -> None:
        """The residual quantizer of an add, read by every non-quantizer consumer of the sum.

        When a ReLU is the sum's only reader, the ReLU's output is quantized: unsigned codes, one more bit of
        range than a signed sum (the paper's scheme). Quantizers already reading the sum (a layer's input at
        another width) keep reading it in float, so each of them rounds once from the same value; the ONNX
        backend then writes every one of them as its own integer add (QLinearAdd)."""
        out = sum_value(gm, add)
        users = [u for u in out.users if not isinstance(module_of(gm, u), ActivationQuantizer)]
        if not users:
            return  # only layers read the sum (a downsampling block's input): no residual tensor to quantize
        spec = self._spec(gm, out, bits, ctx, memo)
        annotate(add).output_act = spec
        q = self._quantize_edge(gm, out, spec)
        for u in users:
            if u is not q:
                u.replace_input_with(out, q)

    @staticmethod
    def _link_requantizers(gm: fx.GraphModule) -> None:
        """Tell each quantizer that reads a quantized layer's output (through ReLU and max-pooling, which
        commute with the accumulator's positive per-channel scale), or a matrix product of two quantized tensors
        (through a ReLU), which accumulator it requantizes, so it rounds exactly as the integer kernel."""
        for node, q in activation_quantizer_calls(gm):
            if (product := _quantized_product(gm, node.args[0])) is not None:
                q.requantizes(product)
                continue
            src = _quantized_layer(gm, node.args[0])
            if src is None or isinstance(module_of(gm, src), NormLayer):  # no integer accumulator while training
                continue
            layer = module_of(gm, src)
            in_q = module_of(gm, src.args[0]) if isinstance(src.args[0], fx.Node) else None
            if isinstance(in_q, ActivationQuantizer):
                wq = next(p for p in layer.parametrizations.weight if isinstance(p, WeightQuantizer))
                q.requantizes(LayerAccumulator(layer, in_q, wq))

    def _quantize_shared_input(self, gm: fx.GraphModule, node: fx.Node, spec: QuantSpec,
                               first: fx.Node | None) -> fx.Node:
        """The input quantizer of a biased layer called at several sites (CBAM's MLP, shared by the average-
        and the max-pooled features): one module, called on each site's input and calibrated on all of them, so
        that the layer's int32 bias has one scale."""
        if first is None or node.args[0] is first.args[0]:
            return self._quantize_edge(gm, node.args[0], spec)
        src = node.args[0]
        with gm.graph.inserting_after(src):
            q = gm.graph.call_module(str(first.target), (src,))
        q.meta["tensor_meta"] = src.meta.get("tensor_meta")
        return q

    @staticmethod
    def _quantize_biases(gm: fx.GraphModule, layers: list[fx.Node]) -> None:
        """int32 biases at ``s_x · s_w``, so the fake-quant model adds exactly what the integer kernel adds."""
        sites: dict[str, list[fx.Node]] = {}
        for n in layers:
            sites.setdefault(str(n.target), []).append(n)
        for target, nodes in sites.items():
            layer = gm.get_submodule(target)
            if (getattr(layer, "bias", None) is None or not parametrize.is_parametrized(layer, "weight")
                    or isinstance(layer, NormLayer)):  # its bias is β, not the folded bias the IR rounds
                continue
            inputs = {id(module_of(gm, n.args[0])) for n in nodes}
            aq = module_of(gm, nodes[0].args[0])
            if len(inputs) != 1 or not isinstance(aq, ActivationQuantizer):
                raise PipelineError(
                    f"insert_quantizers: {target} has a bias and is called on differently quantized inputs; "
                    "its int32 bias scale would be ambiguous"
                )
            wq = next(p for p in layer.parametrizations.weight if isinstance(p, WeightQuantizer))
            parametrize.register_parametrization(layer, "bias", BiasQuantizer(layer, aq, wq))

    @staticmethod
    def _spec(gm: fx.GraphModule, src: fx.Node, bits: int, ctx: PassContext, memo: dict[fx.Node, bool]) -> QuantSpec:
        return _activation_spec(bits, not is_nonnegative(gm, src, memo), ctx)

    def _quantize_edge(self, gm: fx.GraphModule, src: object, spec: QuantSpec) -> fx.Node:
        if not isinstance(src, fx.Node):
            raise PipelineError(f"insert_quantizers: cannot quantize a non-tensor input {src!r}")
        while _is_no_op(gm, src) and isinstance(src.args[0], fx.Node):
            src = src.args[0]  # quantize the tensor itself, so consumers behind an Identity share its quantizer
        key = (src, spec)
        if key not in self._edges:
            name = f"{src.name}_aq_{spec.describe()}_{spec.calibrator.value}"
            gm.add_submodule(name, ActivationQuantizer(spec))
            with gm.graph.inserting_after(src):
                q = gm.graph.call_module(name, (src,))
            q.meta["tensor_meta"] = src.meta.get("tensor_meta")
            self._edges[key] = q
        return self._edges[key]
