"""Attention as vision transformers and hybrid CNNs write it (timm's ``Attention``: MobileViT, CoAtNet, ...), in
the forms the passes and backends know.

- ``qkv.permute(2, 0, 3, 1, 4)`` then ``q, k, v = qkv.unbind(0)`` (or ``qkv[0]``, ``qkv[1]``, ...) moves the
  batch away from the first axis only to take it back: each piece is the selection on the axis the permutation
  brings first, then the rest of the permutation, so the batch stays first throughout.
- ``F.scaled_dot_product_attention(q, k, v)`` without dropout or causality, its mask (if any) a float bias (a
  relative-position bias: MaxViT), is the computation it fuses: ``softmax(q @ kᵀ · scale + mask) @ v``, two matrix
  products of tensors, an addition and a softmax.

Both need the recorded shapes (ranks, the head size).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from qcompile.frontend.graph import argument, each_rewritten, inserted_before, permutation, recorded_shape, tensor_rank


def _first_axis_selection(node: fx.Node) -> list[tuple[fx.Node, int]] | None:
    """``(reader, index)`` for each reader of ``node`` that picks one index of its first axis (``x[i]``, a piece
    of ``x.unbind(0)``), or None if any reader does something else."""
    def picks_one(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int)

    picks = []
    for u in node.users:
        if picks_one(u):
            picks.append((u, u.args[1]))
            continue
        unbind = (u.op == "call_method" and u.target == "unbind") or (
            u.op == "call_function" and u.target is torch.unbind)
        if not unbind or argument(u, 1, "dim", 0) != 0 or not all(picks_one(piece) for piece in u.users):
            return None
        picks.extend((piece, piece.args[1]) for piece in u.users)
    return picks or None


def selections_before_permutations(gm: fx.GraphModule) -> bool:
    """Each permutation that moves the batch and is read only by selections of its first axis → those
    selections on the source, each permuted as the rest; whether any changed."""
    changed = False
    for node in list(gm.graph.nodes):
        rank = tensor_rank(node)
        perm = permutation(node, rank) if rank > 0 else None
        if perm is None or perm[0] == 0 or (picks := _first_axis_selection(node)) is None:
            continue
        axis, size = perm[0], node.meta["tensor_meta"].shape[0]
        rest = [p - (p > axis) for p in perm[1:]]
        for reader, index in picks:
            piece = inserted_before(reader, "call_function", operator.getitem,
                                    (node.args[0], (*[slice(None)] * axis, index % size)))
            out = piece if rest == sorted(rest) else inserted_before(reader, "call_method", "permute", (piece, *rest))
            reader.replace_all_uses_with(out)
        for reader, _ in picks:
            gm.graph.erase_node(reader)
        for u in list(node.users):  # the emptied unbind nodes
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _sdpa_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None, float] | None:
    """Query, key, value, additive mask and scale of a ``scaled_dot_product_attention`` call without dropout,
    causality, grouped heads or a boolean mask (the scale, where not given, its default: one over the square root
    of the head size); None for any other node."""
    if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
        return None
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    mask = args.get("attn_mask")
    additive = mask is None or (isinstance(mask, fx.Node) and getattr(mask.meta.get("tensor_meta"), "dtype", None)
                                in (torch.float32, torch.float64))
    if not additive or args.get("dropout_p", 0.0) != 0 or args.get("is_causal", False) \
            or args.get("enable_gqa", False) or not isinstance(args.get("scale"), float | int | None):
        return None
    q, k, v = args["query"], args["key"], args["value"]
    if args.get("scale") is not None:
        return q, k, v, mask, float(args["scale"])
    shape = recorded_shape(q)
    return None if not shape else (q, k, v, mask, shape[-1] ** -0.5)


def attention_products(at: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, scale: float, mask: fx.Node | None = None,
                       dropout: str | None = None) -> fx.Node:
    """The nodes computing ``softmax(q @ kᵀ · scale + mask, -1) @ v`` (the probabilities through the dropout
    module ``dropout`` where given: a training-mode capture), inserted before ``at``; the last returned."""
    def emit(op: str, target: object, *args: object) -> fx.Node:
        return inserted_before(at, op, target, args)

    scores = emit("call_method", "matmul", q, emit("call_method", "transpose", k, -2, -1))
    logits = emit("call_function", operator.mul, scores, scale)
    if mask is not None:
        logits = emit("call_function", operator.add, logits, mask)
    probabilities = emit("call_method", "softmax", logits, -1)
    if dropout is not None:
        probabilities = emit("call_module", dropout, probabilities)
    return emit("call_method", "matmul", probabilities, v)


def _decomposed(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The nodes computing a fused attention of the form above from its products, the last returned; None for any
    other node."""
    if (found := _sdpa_operands(node)) is None:
        return None
    q, k, v, mask, scale = found
    return attention_products(node, q, k, v, scale, mask)


def attention_decomposed(gm: fx.GraphModule) -> bool:
    """Each ``F.scaled_dot_product_attention`` of the form above → ``softmax(q @ kᵀ · scale + mask, -1) @ v``;
    whether any changed."""
    return each_rewritten(gm, _decomposed)
