"""Re-estimate BatchNorm statistics on the quantized network (Hubara et al.'s BN tuning), before BN is folded.

Quantization shifts and rescales each layer's output, so the float running statistics no longer normalise what
the quantized network computes. A copy of the graph is quantized with BN still in place and run in BN-training
mode over the calibration set; the statistics it measures replace the graph's. Per-output-channel symmetric
weight quantization is invariant under folding a BN (``w·γ/σ`` scales channel c by one factor, and so does its
max|w|), so the folded layer quantizes to the same integers the statistics were measured with.
"""

from __future__ import annotations

import torch
from qcompile.passes._layerwise import calibration_batches, graph_copy, sub_context
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.insert_quantizers import InsertQuantizers
from torch import fx, nn
from tqdm import tqdm

from qcompile.errors import PipelineError
from qcompile.pipeline import BN_FOLDED, PRECISION, SHAPES, Pass, PassContext, Pipeline

_BN = nn.modules.batchnorm._BatchNorm


class BnTune(Pass):
    name = "bn_tune"
    single_threaded = True
    requires = frozenset({SHAPES, PRECISION})

    def __init__(self, variance: bool = False) -> None:
        self.variance = variance

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if BN_FOLDED in ctx.properties:
            raise PipelineError("bn_tune must run before fold_bn: folded BatchNorms have no statistics to re-estimate")
        bns = {name: m for name, m in gm.named_modules() if isinstance(m, _BN) and m.track_running_stats}
        if not bns:
            ctx.warnings.append("bn_tune: the model has no BatchNorm with running statistics; nothing to tune")
            return gm
        data = calibration_batches(ctx, "bn_tune")
        if ctx.float_reference is None:
            ctx.float_reference = graph_copy(gm)  # the float network later passes match, before its BN changes
        quantized = graph_copy(gm)
        Pipeline([InsertQuantizers(), Calibrate()]).run_graph(quantized, sub_context(ctx))
        tuned = {name: m for name, m in quantized.named_modules() if name in bns}
        quantized.eval()
        for bn in tuned.values():
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the calibration batches
            bn.train()
        with torch.no_grad():
            for x, _ in tqdm(data, desc="bn_tune", unit="batch", disable=None, leave=False):
                quantized(x)
        shifts = []
        for name, bn in bns.items():
            new = tuned[name]
            shifts.append(float(((new.running_mean - bn.running_mean).abs() / bn.running_var.sqrt().add(bn.eps)).mean()))
            bn.running_mean.copy_(new.running_mean)
            if self.variance:
                bn.running_var.copy_(new.running_var)
        ctx.results["bn_tune"] = {"batchnorms": len(bns), "images": sum(len(x) for x, _ in data),
                                  "mean_shift_in_std": sum(shifts) / len(shifts)}
        return gm
