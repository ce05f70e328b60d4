"""Fold eval-mode BatchNorm into the conv or dense layer that feeds it; turn any other BatchNorm into a layer.

Exact in eval mode: ``bn(conv(x)) == conv'(x)`` with ``w' = w·γ/σ`` and ``b' = (b-μ)·γ/σ + β`` from the running
statistics. A 2-d BatchNorm that follows no foldable layer (pre-activation ResNets, DenseNet) becomes what it
computes, a per-channel affine map: a depthwise 1×1 conv with weight γ/σ and bias β - μ·γ/σ (the same float
function), which then quantizes and lowers like any layer. Its per-channel weight quantizes exactly (one weight
per channel sits at the channel's bound), so only its input and int32 bias are rounded. It is one more layer
in the cost report: C·H·W MACs. ``F.batch_norm`` called with statistics read from attributes (fused
norm-activation layers do this) is first made a BatchNorm module, so it folds or converts the same way;
``F.layer_norm`` with weights read from attributes (timm's and torchvision's ``LayerNorm2d``) likewise becomes an
``nn.LayerNorm``, which lowers as a float op.

A layer scale, ``gamma * y`` with a parameter ``gamma`` that scales each output channel of the single-use
conv/dense computing ``y`` (ConvNeXt; torchvision multiplies after permuting the channels back, so permutes may
sit between), is the same kind of per-channel affine map and folds the same way: ``w' = w·γ``, ``b' = b·γ``,
exact up to the rounding of each product to float32 (done once, from float64). A layer shift, ``y + beta`` with
an attribute ``beta`` of one value per output channel, folds into the bias: ``b' = b + β``. Together they fold a
BatchNorm frozen into buffers (torchvision's and detectron2's ``FrozenBatchNorm2d``: ``x * scale + bias``, with
``scale`` and ``bias`` computed from buffers, which capture has already evaluated).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from qcompile.frontend.elementwise import arithmetic_kind
from qcompile.frontend.canonical import attribute_tensor, free_module_name, holder_of, replace_with_module
from qcompile.frontend.graph import module_of, permutation, set_submodule, tensor_rank
from qcompile.passes.norm_layers import (BATCH_NORM_ARGS, BATCH_NORMS, NormLayer, becomes_layer, call_sites,
                                        folds_into_layer, has_running_statistics,
                                        layer_and_group_norm_calls_as_modules)
from qcompile.pipeline import BN_FOLDED, COST, PRECISION, Pass, PassContext
from qcompile.quantization.quantizer import channel_axis


def affine_conv(bn: nn.Module) -> nn.Conv2d:
    """The eval-mode BatchNorm (or :class:`NormLayer`) as a depthwise 1×1 conv computing the same per-channel affine
    map."""
    c = bn.num_features
    inv = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
    conv = nn.Conv2d(c, c, 1, groups=c, bias=True).to(bn.running_mean.dtype)
    with torch.no_grad():
        conv.weight.copy_((gamma * inv).reshape(c, 1, 1, 1))
        conv.bias.copy_(beta - bn.running_mean.detach().double() * gamma * inv)
    return conv.train(bn.training)


def _batch_norm_module(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str] | None:
    """``F.batch_norm(x, mean, var, weight, bias, False, momentum, eps)`` on attribute tensors as a module and the
    name to give it; None when the call is not one (training mode, computed statistics)."""
    args = dict(zip(BATCH_NORM_ARGS, node.args)) | dict(node.kwargs)
    mean, var = attribute_tensor(gm, args.get("running_mean")), attribute_tensor(gm, args.get("running_var"))
    weight, bias = attribute_tensor(gm, args.get("weight")), attribute_tensor(gm, args.get("bias"))
    if mean is None or var is None or args.get("training", False) is not False or mean.dim() != 1:
        return None
    if (args.get("weight") is not None and weight is None) or (args.get("bias") is not None and bias is None):
        return None
    bn = nn.BatchNorm2d(mean.numel(), eps=float(args.get("eps", 1e-5)), affine=weight is not None)
    bn.running_mean.copy_(mean.detach())
    bn.running_var.copy_(var.detach())
    if weight is not None:
        bn.weight.data.copy_(weight.detach())
        bn.bias.data.copy_(bias.detach() if bias is not None else torch.zeros_like(weight))
    holder = holder_of(args["running_mean"])
    return bn, f"{holder}.bn" if holder else "batch_norm"


def _instance_norm_as(m: nn.Module, training: bool) -> nn.Module | None:
    """``nn.InstanceNorm1d/2d`` (IBN-Net's ResNets) as what it computes: with running statistics in eval mode,
    a BatchNorm of them (which folds); else a GroupNorm of one channel per group, the per-sample statistics."""
    if type(m) not in (nn.InstanceNorm1d, nn.InstanceNorm2d):
        return None
    c = m.num_features
    if m.track_running_stats and not training:
        norm: nn.Module = (nn.BatchNorm1d if isinstance(m, nn.InstanceNorm1d) else nn.BatchNorm2d)(
            c, eps=m.eps, affine=m.affine)
        norm.running_mean.copy_(m.running_mean)
        norm.running_var.copy_(m.running_var)
    else:
        norm = nn.GroupNorm(c, c, eps=m.eps, affine=m.affine)
    if m.affine:
        norm.weight.data.copy_(m.weight.detach())
        norm.bias.data.copy_(m.bias.detach())
    return norm.train(training)


def _functional_to_modules(gm: fx.GraphModule) -> None:
    """Functional batch, layer and group norms on attribute tensors → modules (then folded, converted or
    lowered)."""
    for node in list(gm.graph.nodes):
        made = _batch_norm_module(gm, node) if node.op == "call_function" and node.target is F.batch_norm else None
        if made is not None:
            module, base = made
            replace_with_module(gm, node, free_module_name(gm, base), module.eval())
    layer_and_group_norm_calls_as_modules(gm)
    gm.graph.eliminate_dead_code()


def _channel_constant(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor, int] | None:
    """``y ∘ gamma`` (either order, ``node`` a product or a sum) with an attribute ``gamma`` that has one value
    along a single axis of ``y``: ``(y, gamma as a vector, that axis)``."""
    if arithmetic_kind(node) not in ("mul", "add") or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    params = [a for a in node.args if attribute_tensor(gm, a) is not None]
    if len(params) != 1:
        return None
    gamma = attribute_tensor(gm, params[0]).detach()
    y = next(a for a in node.args if a is not params[0])
    rank = tensor_rank(y)
    if gamma.dim() > rank:
        return None
    shape = (1,) * (rank - gamma.dim()) + tuple(gamma.shape)
    axis = max(range(rank), key=lambda i: shape[i])
    return (y, gamma.reshape(-1), axis) if math.prod(shape) == shape[axis] else None


def _channel_layer(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """For a layer scale or shift, the single-use conv/dense node it scales or shifts per output channel (seen
    through single-use permutes and transposes, which move that axis) and its values; None for anything else."""
    found = _channel_constant(gm, node)
    if found is None:
        return None
    y, gamma, axis = found
    while len(y.users) == 1 and (perm := permutation(y, tensor_rank(y))) is not None:
        axis, y = perm[axis], y.args[0]  # type: ignore[assignment]
    layer = module_of(gm, y)
    if not isinstance(layer, nn.Conv2d | nn.Linear) or len(y.users) != 1 or axis != channel_axis(layer, tensor_rank(y)):
        return None
    return (y, gamma) if len(gamma) == layer.weight.shape[0] else None


def _fold_layer_scales_and_shifts(gm: fx.GraphModule) -> None:
    """Every layer scale folded into its conv/dense's weight and bias, every layer shift into its bias (per output
    channel, from float64), in graph order, so that ``conv(x) * scale + shift`` folds whole."""
    sites = call_sites(gm)
    for node in list(gm.graph.nodes):
        found = _channel_layer(gm, node)
        if found is None or sites[found[0].target] != 1:
            continue
        y, gamma = found
        layer = module_of(gm, y)
        g = gamma.double()
        with torch.no_grad():
            if arithmetic_kind(node) == "mul":
                layer.weight.copy_(layer.weight.double() * g.reshape(-1, *([1] * (layer.weight.dim() - 1))))
                if layer.bias is not None:
                    layer.bias.copy_(layer.bias.double() * g)
            elif layer.bias is None:
                layer.bias = nn.Parameter(gamma.to(layer.weight.dtype).clone())
            else:
                layer.bias.copy_(layer.bias.double() + g)
        node.replace_all_uses_with(next(a for a in node.args if attribute_tensor(gm, a) is None))
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


class FoldBatchNorm(Pass):
    name = "fold_bn"
    guarantees = frozenset({BN_FOLDED})
    invalidates = frozenset({PRECISION, COST})  # a BatchNorm that follows no layer becomes a layer of its own

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        _functional_to_modules(gm)
        for target, m in list(gm.named_modules()):
            if (norm := _instance_norm_as(m, gm.training)) is not None:
                set_submodule(gm, target, norm)
        sites = call_sites(gm)
        folding = {n for n in gm.graph.nodes if isinstance(module_of(gm, n), BATCH_NORMS)
                   and folds_into_layer(gm, n, sites)}  # decided before any fold changes who reads what
        fused_layers: set[object] = set()
        for bn_node in list(gm.graph.nodes):
            bn = module_of(gm, bn_node)
            if bn_node in folding:
                src = bn_node.args[0]
                if src.target not in fused_layers:  # a layer called at several sites folds once
                    fused_layers.add(src.target)
                    layer = module_of(gm, src)
                    was_training = layer.training
                    fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
                    fused = fuse(layer.eval(), bn.eval())
                    fused.train(was_training)
                    set_submodule(gm, str(src.target), fused)
                bn_node.replace_all_uses_with(src)
                gm.graph.erase_node(bn_node)
            elif isinstance(bn, NormLayer) or becomes_layer(gm, bn_node, sites):  # a NormLayer: QAT trained it so
                set_submodule(gm, str(bn_node.target), affine_conv(bn))
                ctx.warnings.append(f"fold_bn: {bn_node.target} follows no single-use conv/dense; "
                                    "it runs as a depthwise 1x1 conv")
            elif isinstance(bn, BATCH_NORMS):
                calls = sites[bn_node.target]
                why = ("it has no running statistics" if not has_running_statistics(bn) else
                       f"it is called at {calls} sites" if calls > 1 else "it is not 2-d")
                ctx.warnings.append(f"fold_bn: {bn_node.target} follows no single-use conv/dense and {why}; "
                                    "left unfolded")
        _fold_layer_scales_and_shifts(gm)
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every foldable BatchNorm of ``gm`` (a captured graph) and return it."""
    return FoldBatchNorm()(gm)
