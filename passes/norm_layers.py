"""The BatchNorms of a training graph (QAT), made to train as what ``fold_bn`` will make of them.

First, ``F.batch_norm`` on a module's own statistics and trainable parameters (timm's fused norm-activation
layers) becomes a BatchNorm module sharing those tensors, which follows the graph's mode: traced, the call holds
the capture's ``self.training`` as a constant, so it would train with frozen statistics (an eval capture) or not
lower (a training capture). ``F.layer_norm`` and ``F.group_norm`` on attributes likewise become modules holding
those tensors, as ``fold_bn`` makes them, so a quantizer that reads one has the same name in the graph QAT trains
and in the one it lowers (the bounds it learned are found by that name).

Then: ``fold_bn`` turns a 2-d BatchNorm that follows no foldable conv/dense (pre-activation ResNets, DenseNet, DPN)
into a depthwise 1×1 conv, which gets a precision and quantizes its input like any layer. Quantization-aware
training keeps its BatchNorms, so without this pass the trained graph has no quantizer where the deployed one
quantizes such a layer's input: the bounds QAT learned would not cover the model it ships, and the residual
stream of a pre-activation network would be rounded at deployment in a way training never saw. Second, each such
BatchNorm becomes a :class:`NormLayer`: a depthwise 1×1 conv to every pass (precision, cost, input quantizer)
that still normalises with the batch's statistics in training, as the BatchNorm did.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.frontend.canonical import (
    as_parameter,
    attribute_tensor,
    free_module_name,
    holder_of,
    replace_with_module,
)
from qcompile.frontend.graph import is_compute, module_of, set_submodule, tensor_rank
from qcompile.pipeline import COST, PRECISION, Pass, PassContext

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # SyncBatchNorm: a DDP model's


def call_sites(gm: fx.GraphModule) -> Counter[object]:
    """How many times each submodule is called."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def has_running_statistics(bn: nn.Module) -> bool:
    """Whether an eval-mode BatchNorm normalises with running statistics, so that it is an affine map."""
    return bool(bn.track_running_stats) and bn.running_mean is not None


def folds_into_layer(gm: fx.GraphModule, bn_node: fx.Node, sites: Counter[object]) -> bool:
    """Whether ``fold_bn`` fuses this BatchNorm into the conv/dense it reads: that call's only reader, and, where
    the layer is called at several sites (one body run on an image and on its mirror image), the only reader of
    every one of them, each a call of this BatchNorm, which is called nowhere else."""
    src = bn_node.args[0] if bn_node.args else None
    if not (isinstance(src, fx.Node) and is_compute(gm, src) and has_running_statistics(module_of(gm, bn_node))):
        return False
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == src.target]
    return sites[bn_node.target] == len(calls) and all(
        len(c.users) == 1 and next(iter(c.users)).target == bn_node.target
        and next(iter(c.users)).op == "call_module" for c in calls)


def becomes_layer(gm: fx.GraphModule, bn_node: fx.Node, sites: Counter[object]) -> bool:
    """Whether ``fold_bn`` makes this BatchNorm, which follows no foldable layer, a depthwise 1×1 conv."""
    bn = module_of(gm, bn_node)
    return (isinstance(bn, BATCH_NORMS) and not folds_into_layer(gm, bn_node, sites) and has_running_statistics(bn)
            and (isinstance(bn, nn.BatchNorm2d) or tensor_rank(bn_node) == 4) and sites[bn_node.target] == 1)


class NormLayer(nn.Conv2d):
    """A BatchNorm that will fold into a depthwise 1×1 conv, as that conv in a training graph.

    It computes what the BatchNorm computed (batch statistics in training, running statistics in eval) and holds
    its state under the BatchNorm's names, with γ as ``weight``: so the weight quantizer a 4-bit or 8-bit layer
    gets is exact on it (one value per channel is its channel's bound), as it is on the folded weight γ/σ, and
    ``fold_bn`` folds it like the BatchNorm. Its bias is added in float (the folded bias is rounded to int32
    only when lowering)."""

    def __init__(self, bn: nn.Module) -> None:
        c = bn.num_features
        super().__init__(c, c, 1, groups=c, bias=True, device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            gamma = bn.weight.detach().clone() if bn.weight is not None else torch.ones_like(bn.running_mean)
            beta = bn.bias.detach().clone() if bn.bias is not None else torch.zeros_like(bn.running_mean)
        self.weight = nn.Parameter(gamma, requires_grad=bn.weight is not None)
        self.bias = nn.Parameter(beta, requires_grad=bn.bias is not None)
        self.num_features, self.eps, self.momentum = c, bn.eps, bn.momentum
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as BatchNorm's momentum=None
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            0.0 if factor is None else factor, self.eps)


BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
"""``F.batch_norm``'s parameters in order."""


def _trainable_batch_norm(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str] | None:
    """A BatchNorm module for ``F.batch_norm`` on a module's running statistics and trainable affine parameters,
    called with the capture's own mode (``training=self.training``, as timm's ``BatchNormAct2d`` calls it), sharing
    those tensors, and the path of the module holding them; None for any other call (a frozen BatchNorm's buffers,
    a literal mode)."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    args = dict(zip(BATCH_NORM_ARGS, node.args)) | dict(node.kwargs)
    mean, var = attribute_tensor(gm, args.get("running_mean")), attribute_tensor(gm, args.get("running_var"))
    weight, bias = attribute_tensor(gm, args.get("weight")), attribute_tensor(gm, args.get("bias"))
    momentum, eps, rank = args.get("momentum", 0.1), args.get("eps", 1e-5), tensor_rank(node)
    if (mean is None or var is None or not all(isinstance(p, nn.Parameter) and p.requires_grad for p in (weight, bias))
            or args.get("training", False) is not gm.training or not isinstance(momentum, float | int)
            or not isinstance(eps, float | int) or rank not in (2, 3, 4)):
        return None
    bn = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(mean.numel(), eps=float(eps), momentum=float(momentum))
    bn.weight, bn.bias = weight, bias
    bn.running_mean, bn.running_var = mean, var
    holder = holder_of(args["running_mean"])
    counter = getattr(gm.get_submodule(holder), "num_batches_tracked", None)
    if isinstance(counter, torch.Tensor):
        bn.num_batches_tracked = counter
    return bn.to(mean.device).train(gm.training), holder


def _norm_call(gm: fx.GraphModule, node: fx.Node, names: tuple[str, ...]
               ) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None] | None:
    """A functional norm's arguments by ``names``, with its weight and bias read from attributes (or None);
    None when either is computed."""
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    weight, bias = attribute_tensor(gm, args.get("weight")), attribute_tensor(gm, args.get("bias"))
    if (args.get("weight") is not None and weight is None) or (args.get("bias") is not None and bias is None):
        return None
    return args, weight, bias


def _layer_norm_module(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str] | None:
    """``F.layer_norm(x, shape, weight, bias, eps)`` with weight and bias read from attributes (or None) as an
    ``nn.LayerNorm`` holding them and the name to give it; None when either is computed."""
    call = _norm_call(gm, node, ("input", "normalized_shape", "weight", "bias", "eps"))
    if call is None:
        return None
    args, weight, bias = call
    ln = nn.LayerNorm(tuple(args["normalized_shape"]), eps=float(args.get("eps", 1e-5)),
                      elementwise_affine=weight is not None or bias is not None, bias=bias is not None)
    return _holding(ln, args, weight, bias, "layer_norm")


def _group_norm_module(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str] | None:
    """``F.group_norm(x, groups, weight, bias, eps)`` (timm's ``GroupNormAct``) with weight and bias read from
    attributes (or None) as an ``nn.GroupNorm`` holding them and the name to give it; None when either is
    computed."""
    call = _norm_call(gm, node, ("input", "num_groups", "weight", "bias", "eps"))
    channels = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if call is None or not isinstance(call[0].get("num_groups"), int) or channels is None:
        return None
    args, weight, bias = call
    gn = nn.GroupNorm(args["num_groups"], channels.shape[1], eps=float(args.get("eps", 1e-5)))
    return _holding(gn, args, weight, bias, "group_norm")


def _holding(norm: nn.Module, args: dict[str, Any], weight: torch.Tensor | None, bias: torch.Tensor | None,
             kind: str) -> tuple[nn.Module, str]:
    """``norm`` holding the call's own weight and bias (where it has them), and its name: ``<holder>.<kind>``."""
    if weight is not None:
        norm.weight = as_parameter(weight)
    if bias is not None:
        norm.bias = as_parameter(bias)
    holder = holder_of(args.get("weight"), args.get("bias"))
    return norm, f"{holder}.{kind}" if holder else kind


_FUNCTIONAL_NORMS = {F.layer_norm: _layer_norm_module, F.group_norm: _group_norm_module}


def layer_and_group_norm_calls_as_modules(gm: fx.GraphModule) -> None:
    """Each ``F.layer_norm`` / ``F.group_norm`` on attribute tensors (timm's and torchvision's ``LayerNorm2d``,
    ConvNeXt V2's channels-last ``LayerNorm``) → a call of a module holding the same tensors, named after their
    holder: in the graph QAT trains (it trains those parameters) as in the one it lowers, so that a quantizer
    reading the norm has one name in both."""
    for node in list(gm.graph.nodes):
        make = _FUNCTIONAL_NORMS.get(node.target) if node.op == "call_function" else None  # type: ignore[call-overload]
        if (made := make(gm, node) if make is not None else None) is not None:
            module, base = made
            replace_with_module(gm, node, free_module_name(gm, base), module.train(gm.training))
    gm.graph.eliminate_dead_code()


def batch_norm_calls_as_modules(gm: fx.GraphModule) -> None:
    """Each ``F.batch_norm`` :func:`_trainable_batch_norm` accepts → a call of that module, which follows the graph's
    mode: batch statistics while QAT trains, running ones when lowered; folded or made a layer like any BatchNorm."""
    for node in list(gm.graph.nodes):
        if (found := _trainable_batch_norm(gm, node)) is not None:
            bn, holder = found
            replace_with_module(gm, node, free_module_name(gm, f"{holder}.bn" if holder else "batch_norm"), bn)
    gm.graph.eliminate_dead_code()


class NormsAsLayers(Pass):
    name = "norms_as_layers"
    invalidates = frozenset({PRECISION, COST})  # new layers, as folding makes them

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        batch_norm_calls_as_modules(gm)
        layer_and_group_norm_calls_as_modules(gm)
        sites = call_sites(gm)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and becomes_layer(gm, node, sites):
                set_submodule(gm, str(node.target), NormLayer(module_of(gm, node)))
        gm.recompile()
        return gm
