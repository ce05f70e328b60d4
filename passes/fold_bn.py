"""Fold eval-mode BatchNorm into the conv or dense layer that feeds it.

Exact in eval mode: ``bn(conv(x)) == conv'(x)`` with ``w' = w·γ/σ`` and ``b' = (b-μ)·γ/σ + β`` from the running
statistics. A BatchNorm that follows no foldable layer is left in place and reported.
"""

from __future__ import annotations

from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from qcompile.graph import is_compute, module_of
from qcompile.pipeline import BN_FOLDED, Pass, PassContext
from qcompile.passes._modules import set_submodule

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FoldBatchNorm(Pass):
    name = "fold_bn"
    guarantees = frozenset({BN_FOLDED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        sites = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        for bn_node in list(gm.graph.nodes):
            bn = module_of(gm, bn_node)
            if not isinstance(bn, _BN):
                continue
            src = bn_node.args[0] if bn_node.args else None
            foldable = (
                isinstance(src, fx.Node)
                and is_compute(gm, src)
                and len(src.users) == 1
                and sites[src.target] == 1
                and bn.track_running_stats
                and bn.running_mean is not None
            )
            if not foldable:
                ctx.warnings.append(f"fold_bn: {bn_node.target} follows no single-use conv/dense; left unfolded")
                continue
            layer = module_of(gm, src)
            was_training = layer.training
            fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
            fused = fuse(layer.eval(), bn.eval())
            fused.train(was_training)
            set_submodule(gm, str(src.target), fused)
            bn_node.replace_all_uses_with(src)
            gm.graph.erase_node(bn_node)
        gm.delete_all_unused_submodules()
        return gm


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every foldable BatchNorm of ``gm`` (a captured graph) and return it."""
    return FoldBatchNorm()(gm)
