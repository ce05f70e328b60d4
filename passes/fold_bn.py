"""Fold eval-mode BatchNorm into the conv or dense layer that feeds it; turn any other BatchNorm into a layer.

Exact in eval mode: ``bn(conv(x)) == conv'(x)`` with ``w' = w·γ/σ`` and ``b' = (b-μ)·γ/σ + β`` from the running
statistics. A 2-d BatchNorm that follows no foldable layer (pre-activation ResNets, DenseNet) becomes what it
computes, a per-channel affine map: a depthwise 1×1 conv with weight γ/σ and bias β - μ·γ/σ (the same float
function), which then quantizes and lowers like any layer. Its per-channel weight quantizes exactly (one weight
per channel sits at the channel's bound), so only its input and int32 bias are rounded. It is one more layer
in the cost report: C·H·W MACs. ``F.batch_norm`` called with statistics read from attributes (fused
norm-activation layers do this) is first made a BatchNorm module, so it folds or converts the same way.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from qcompile.graph import is_compute, module_of
from qcompile.pipeline import BN_FOLDED, Pass, PassContext
from qcompile.passes._modules import set_submodule

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def affine_conv(bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The eval-mode BatchNorm as a depthwise 1×1 conv computing the same per-channel affine map."""
    c = bn.num_features
    inv = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
    conv = nn.Conv2d(c, c, 1, groups=c, bias=True).to(bn.running_mean.dtype)
    with torch.no_grad():
        conv.weight.copy_((gamma * inv).reshape(c, 1, 1, 1))
        conv.bias.copy_(beta - bn.running_mean.detach().double() * gamma * inv)
    return conv.train(bn.training)


def _attr(gm: fx.GraphModule, arg: object) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = gm
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _free_name(gm: fx.GraphModule, base: str) -> str:
    names = {n for n, _ in gm.named_modules()}
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    return name


def _functional_to_modules(gm: fx.GraphModule) -> None:
    """``F.batch_norm(x, mean, var, weight, bias, False, momentum, eps)`` on attribute tensors → a module."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        args = dict(zip(names, node.args)) | dict(node.kwargs)
        mean, var = _attr(gm, args.get("running_mean")), _attr(gm, args.get("running_var"))
        weight, bias = _attr(gm, args.get("weight")), _attr(gm, args.get("bias"))
        if mean is None or var is None or args.get("training", False) is not False or mean.dim() != 1:
            continue
        if (args.get("weight") is not None and weight is None) or (args.get("bias") is not None and bias is None):
            continue
        bn = nn.BatchNorm2d(mean.numel(), eps=float(args.get("eps", 1e-5)), affine=weight is not None)
        bn.running_mean.copy_(mean.detach())
        bn.running_var.copy_(var.detach())
        if weight is not None:
            bn.weight.data.copy_(weight.detach())
            bn.bias.data.copy_(bias.detach() if bias is not None else torch.zeros_like(weight))
        holder = str(args["running_mean"].target).rpartition(".")[0]
        name = _free_name(gm, f"{holder}.bn" if holder else "batch_norm")
        gm.add_submodule(name, bn.eval())
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (args["input"],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


class FoldBatchNorm(Pass):
    name = "fold_bn"
    guarantees = frozenset({BN_FOLDED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        _functional_to_modules(gm)
        sites = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        for bn_node in list(gm.graph.nodes):
            bn = module_of(gm, bn_node)
            if not isinstance(bn, _BN):
                continue
            src = bn_node.args[0] if bn_node.args else None
            usable = bn.track_running_stats and bn.running_mean is not None
            foldable = (
                isinstance(src, fx.Node)
                and is_compute(gm, src)
                and len(src.users) == 1
                and sites[src.target] == 1
                and usable
            )
            if foldable:
                layer = module_of(gm, src)
                was_training = layer.training
                fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
                fused = fuse(layer.eval(), bn.eval())
                fused.train(was_training)
                set_submodule(gm, str(src.target), fused)
                bn_node.replace_all_uses_with(src)
                gm.graph.erase_node(bn_node)
            elif isinstance(bn, nn.BatchNorm2d) and usable and sites[bn_node.target] == 1:
                set_submodule(gm, str(bn_node.target), affine_conv(bn))
                ctx.warnings.append(f"fold_bn: {bn_node.target} follows no single-use conv/dense; "
                                    "it runs as a depthwise 1x1 conv")
            else:
                ctx.warnings.append(f"fold_bn: {bn_node.target} follows no single-use conv/dense; left unfolded")
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every foldable BatchNorm of ``gm`` (a captured graph) and return it."""
    return FoldBatchNorm()(gm)
