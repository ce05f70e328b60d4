"""PyTorch's own attention layers as the computations they fuse, in the forms the passes and backends know.

torch.fx records ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` as one
call each (they are torch.nn modules, and their fast paths branch on their inputs), and
``F.multi_head_attention_forward`` as one call too (CLIP's attention pooling calls it with its own projections).

- An encoder is its layers, then its norm; an encoder layer is its blocks: ``x + dropout1(self_attn(norm1(x)))``
  and ``x + dropout2(linear2(dropout(activation(linear1(norm2(x))))))`` with ``norm_first``, each norm after its
  residual addition without. Dropout only in a training-mode capture (QAT), where it drops.
- Multi-head attention is the query, key and value projections (dense layers), the heads split off, ``softmax(q @
  kᵀ / √d) @ v`` per head (:func:`~qcompile.frontend.attention.attention_products`), the heads joined, and the
  output projection. The module's packed input projection (``in_proj_weight``) becomes three dense layers beside
  ``out_proj``: ``q_proj``, ``k_proj``, ``v_proj``, so each output has its own quantizer. Inputs in the
  sequence-first layout (``batch_first=False``, the function's only one) are transposed to batch-first around the
  computation; :mod:`qcompile.frontend.batch_first` then cancels such a transpose against the user's own.

Masks, added key and value biases (``add_bias_kv``), zero attention and reading the attention weights are refused
in one line naming the call; so are masks of the encoder.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.errors import CaptureError
from qcompile.frontend.attention import attention_products
from qcompile.frontend.canonical import attribute_tensor, free_module_name, holder_of, register_folded
from qcompile.frontend.graph import inserted_before, module_of, recorded_shape, set_submodule, unused_name
from qcompile.frontend.source_lines import source_location

_MODULE_CALL = inspect.signature(nn.MultiheadAttention.forward)
_FUNCTION_CALL = inspect.signature(F.multi_head_attention_forward)
_ENCODER_LAYER_CALL = inspect.signature(nn.TransformerEncoderLayer.forward)
_ENCODER_CALL = inspect.signature(nn.TransformerEncoder.forward)
_MASKS = ("key_padding_mask", "attn_mask", "src_mask", "src_key_padding_mask", "mask")


def _arguments(signature: inspect.Signature, node: fx.Node, method: bool) -> dict[str, Any]:
    """The call's arguments by name, defaults included (``method``: the signature's ``self`` is the module)."""
    bound = signature.bind(*((None,) if method else ()), *node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _refuse_masks(node: fx.Node, what: str, args: dict[str, Any]) -> None:
    given = [name for name in _MASKS if args.get(name) is not None] + (["is_causal"] if args.get("is_causal") else [])
    if given:
        raise CaptureError(f"{what} at {source_location(node)} is given {', '.join(given)}, which does not lower: "
                           "qcompile lowers attention without masks")


class _Emitter:
    """New nodes just before ``at``, carrying its source line."""

    def __init__(self, at: fx.Node) -> None:
        self.at = at

    def method(self, name: str, *args: object) -> fx.Node:
        return inserted_before(self.at, "call_method", name, args)

    def function(self, fn: object, *args: object) -> fx.Node:
        return inserted_before(self.at, "call_function", fn, args)

    def module(self, target: str, *args: object) -> fx.Node:
        return inserted_before(self.at, "call_module", target, args)


def _dropout(gm: fx.GraphModule, holder: str, p: float) -> str | None:
    """A dropout module beside ``holder`` in a training-mode capture (QAT trains with it; the graph lowered in
    eval mode has the identity there); None where nothing drops."""
    if not gm.training or p == 0:
        return None
    name = free_module_name(gm, f"{holder}.attention_dropout" if holder else "attention_dropout")
    gm.add_submodule(name, nn.Dropout(p).train(gm.training))
    return name


def _attention(emit: _Emitter, projected: tuple[fx.Node, fx.Node, fx.Node], heads: int, head_dim: int,
               lengths: tuple[int, int], dropout: str | None) -> fx.Node:
    """Batch-first projections ``(N, L, E)``, ``(N, S, E)``, ``(N, S, E)`` → each head's attention, the heads
    joined again: ``(N, L, E)``."""
    (length, source), width = lengths, heads * head_dim
    q, k, v = (emit.method("permute", emit.method("reshape", x, -1, n, heads, head_dim), 0, 2, 1, 3)
               for x, n in zip(projected, (length, source, source)))
    out = attention_products(emit.at, q, k, v, head_dim ** -0.5, dropout=dropout)
    return emit.method("reshape", emit.method("permute", out, 0, 2, 1, 3), -1, length, width)


def _multihead(node: fx.Node, what: str, inputs: tuple[Any, Any, Any], seq_first: bool, heads: int,
               project: Any, out_project: Any, dropout: str | None) -> fx.Node:
    """The attention of ``node``'s inputs, through ``project(i, x)`` (query, key, value) and ``out_project``."""
    shapes = [recorded_shape(x) if isinstance(x, fx.Node) else None for x in inputs]
    if any(s is None or len(s) != 3 for s in shapes):
        raise CaptureError(f"{what} at {source_location(node)} is called on inputs that are not batches of "
                           "sequences (3-d tensors), which does not lower")
    emit, axis = _Emitter(node), 0 if seq_first else 1
    batch_first: dict[fx.Node, fx.Node] = {}

    def first(x: fx.Node) -> fx.Node:
        if seq_first and x not in batch_first:
            batch_first[x] = emit.method("transpose", x, 0, 1)
        return batch_first.get(x, x)

    projected = tuple(project(emit, i, first(x)) for i, x in enumerate(inputs))
    width = shapes[0][-1]
    joined = _attention(emit, projected, heads, width // heads, (shapes[0][axis], shapes[1][axis]), dropout)
    out = out_project(emit, joined)
    return emit.method("transpose", out, 0, 1) if seq_first else out


def _refuse_extras(node: fx.Node, what: str, added_kv: bool, zero_attention: bool) -> None:
    if added_kv or zero_attention:
        raise CaptureError(f"{what} at {source_location(node)} adds "
                           f"{'key and value biases (add_bias_kv)' if added_kv else 'zero attention (add_zero_attn)'}"
                           ", which does not lower")


def _projection_modules(gm: fx.GraphModule, path: str, m: nn.MultiheadAttention) -> tuple[str, str, str]:
    """``path.q_proj``, ``.k_proj``, ``.v_proj``: dense layers on the module's input projection, made once per
    module (a module called at several sites shares them)."""
    names = ("q_proj", "k_proj", "v_proj")
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
        packed = m._qkv_same_embed_dim
        weights = m.in_proj_weight.chunk(3) if packed else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        biases = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
        for name, w, b in zip(names, weights, biases):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            if b is not None:
                layer.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
            m.add_module(name, layer)
    return tuple(f"{path}.{n}" for n in names)  # type: ignore[return-value]


def _module_call(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> fx.Node:
    args, path = _arguments(_MODULE_CALL, node, method=True), str(node.target)
    what = f"nn.MultiheadAttention {path}"
    _refuse_masks(node, what, args)
    _refuse_extras(node, what, m.bias_k is not None, m.add_zero_attn)
    projections = _projection_modules(gm, path, m)
    return _multihead(node, what, (args["query"], args["key"], args["value"]), not m.batch_first, m.num_heads,
                      lambda emit, i, x: emit.module(projections[i], x),
                      lambda emit, x: emit.module(f"{path}.out_proj", x), _dropout(gm, path, m.dropout))


def _bias_piece(gm: fx.GraphModule, emit: _Emitter, bias: Any, i: int, width: int, weight: fx.Node) -> Any:
    """The ``i``-th third of a packed input-projection bias: the ``i``-th tensor where it is a concatenation of
    three (CLIP's ``torch.cat([q_proj.bias, k_proj.bias, v_proj.bias])``, kept so in a training-mode capture); an
    attribute beside the projection's weight where it is one (an eval-mode capture folded the concatenation), so
    the dense layer made of the two keeps the weight's module name."""
    if bias is None:
        return None
    if bias.op == "call_function" and bias.target is torch.cat and isinstance(bias.args[0], list | tuple) \
            and len(bias.args[0]) == 3:
        return bias.args[0][i]
    piece = slice(i * width, (i + 1) * width)
    if (packed := attribute_tensor(gm, bias)) is None or (holder := holder_of(weight)) == "":
        return emit.function(operator.getitem, bias, piece)
    module = gm.get_submodule(holder)
    name = unused_name("bias_packed", lambda n: hasattr(module, n))
    register_folded(module, name, packed[piece], [packed])
    return inserted_before(emit.at, "get_attr", f"{holder}.{name}", ())


def _function_call(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    args = _arguments(_FUNCTION_CALL, node, method=False)
    what = "F.multi_head_attention_forward"
    _refuse_masks(node, what, args)
    _refuse_extras(node, what, args["bias_k"] is not None or args["static_k"] is not None, args["add_zero_attn"])
    width = int(args["embed_dim_to_check"])

    def project(emit: _Emitter, i: int, x: fx.Node) -> fx.Node:
        weight = (args[f"{'qkv'[i]}_proj_weight"] if args["use_separate_proj_weight"] else
                  emit.function(operator.getitem, args["in_proj_weight"], slice(i * width, (i + 1) * width)))
        return emit.function(F.linear, x, weight, _bias_piece(gm, emit, args["in_proj_bias"], i, width, weight))

    dropout = _dropout(gm, "", float(args["dropout_p"]) if args["training"] else 0.0)
    return _multihead(node, what, (args["query"], args["key"], args["value"]), True, int(args["num_heads"]), project,
                      lambda emit, x: emit.function(F.linear, x, args["out_proj_weight"], args["out_proj_bias"]),
                      dropout)


def multihead_attention_decomposed(gm: fx.GraphModule) -> bool:
    """Each ``nn.MultiheadAttention`` and ``F.multi_head_attention_forward`` call → the computation above, its
    output read where the call's first output was; whether any changed. The modules keep only the layers they
    hold."""
    rewritten: dict[str, nn.MultiheadAttention] = {}
    changed = False
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if isinstance(m, nn.MultiheadAttention):
            out, what = _module_call(gm, node, m), f"nn.MultiheadAttention {node.target}"
            rewritten[str(node.target)] = m
        elif node.op == "call_function" and node.target is F.multi_head_attention_forward:
            out, what = _function_call(gm, node), "F.multi_head_attention_forward"
        else:
            continue
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
                raise CaptureError(f"the output of {what} at {source_location(node)} is read whole; read its "
                                   "attention output alone (out, _ = attention(q, k, v))")
            if user.args[1] == 1 and user.users:
                raise CaptureError(f"{what} at {source_location(node)}: its attention weights are read, which do "
                                   "not lower; call it with need_weights=False")
            if user.args[1] == 0:
                out.meta.update(user.meta)
                user.replace_all_uses_with(out)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        changed = True
    for path, m in rewritten.items():
        layers = nn.Module()
        for name, child in m.named_children():
            layers.add_module(name, child)
        set_submodule(gm, path, layers)
    return changed


def _encoder_layer(gm: fx.GraphModule, node: fx.Node, m: nn.TransformerEncoderLayer) -> fx.Node:
    args, path, emit = _arguments(_ENCODER_LAYER_CALL, node, method=True), str(node.target), _Emitter(node)
    _refuse_masks(node, f"nn.TransformerEncoderLayer {path}", args)

    def sub(name: str, x: fx.Node) -> fx.Node:
        return emit.module(f"{path}.{name}", x)

    def dropped(name: str, x: fx.Node) -> fx.Node:
        return sub(name, x) if gm.training and getattr(m, name).p > 0 else x

    def add(a: fx.Node, b: fx.Node) -> fx.Node:
        return emit.function(operator.add, a, b)

    def attention(x: fx.Node) -> fx.Node:
        return dropped("dropout1", emit.function(operator.getitem, emit.module(f"{path}.self_attn", x, x, x), 0))

    def feed_forward(x: fx.Node) -> fx.Node:
        hidden = sub("linear1", x)
        hidden = sub("activation", hidden) if isinstance(m.activation, nn.Module) else emit.function(m.activation,
                                                                                                     hidden)
        return dropped("dropout2", sub("linear2", dropped("dropout", hidden)))

    x = args["src"]
    if m.norm_first:
        x = add(x, attention(sub("norm1", x)))
        return add(x, feed_forward(sub("norm2", x)))
    x = sub("norm1", add(x, attention(x)))
    return sub("norm2", add(x, feed_forward(x)))


def _encoder(node: fx.Node, m: nn.TransformerEncoder) -> fx.Node:
    args, path, emit = _arguments(_ENCODER_CALL, node, method=True), str(node.target), _Emitter(node)
    _refuse_masks(node, f"nn.TransformerEncoder {path}", args)
    x = args["src"]
    for i in range(len(m.layers)):
        x = emit.module(f"{path}.layers.{i}", x)
    return emit.module(f"{path}.norm", x) if m.norm is not None else x


def transformer_layers_inlined(gm: fx.GraphModule) -> bool:
    """Each ``nn.TransformerEncoder`` call → its layers' calls, then each ``nn.TransformerEncoderLayer`` call → its
    blocks (its self-attention a ``nn.MultiheadAttention`` call); whether any changed."""
    changed = False
    for kind, inline in ((nn.TransformerEncoder, lambda node, m: _encoder(node, m)),
                         (nn.TransformerEncoderLayer, lambda node, m: _encoder_layer(gm, node, m))):
        for node in list(gm.graph.nodes):
            if isinstance(m := module_of(gm, node), kind):
                out = inline(node, m)
                out.meta.update(node.meta)
                node.replace_all_uses_with(out)
                gm.graph.erase_node(node)
                changed = True
    return changed
