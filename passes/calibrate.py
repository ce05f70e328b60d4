"""Calibrate activation quantizers: run calibration batches in float while observers collect statistics,
then freeze every bound once (the paper's schedule, and plain PTQ)."""

from __future__ import annotations

import torch
from torch import fx
from tqdm import tqdm

from qcompile.errors import DataError, PipelineError
from qcompile.pipeline import CALIBRATED, QUANTIZERS, Pass, PassContext
from qcompile.passes.insert_quantizers import activation_quantizers, weight_quantizers
from qcompile.quantization.quantizer import QuantizerState


class Calibrate(Pass):
    name = "calibrate"
    requires = frozenset({QUANTIZERS})
    guarantees = frozenset({CALIBRATED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        acts = activation_quantizers(gm)
        weights = weight_quantizers(gm)
        if not acts:
            return gm
        if ctx.calibration_data is None:
            raise PipelineError("calibrate needs calibration data (a model file's calibration_data() or --data)")
        for q in acts.values():
            q.state = QuantizerState.OBSERVING
        for w in weights.values():
            w.enabled = False
        was_training = gm.training
        gm.eval()
        images = 0
        try:
            with torch.no_grad():
                for x, _ in tqdm(ctx.calibration_data, desc="calibrate", unit="batch", disable=None, leave=False):
                    gm(x)
                    images += len(x)
        finally:
            for w in weights.values():
                w.enabled = True
            gm.train(was_training)
        if images == 0:
            raise DataError("the calibration set is empty: no batches to calibrate on")
        for name, q in acts.items():
            q.freeze(name)
        ctx.calibration_images = images
        return gm
