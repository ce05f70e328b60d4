"""Calibrate activation quantizers: run calibration batches in float while observers collect statistics,
then freeze every bound once (the paper's schedule, and plain PTQ).

One pass over the data serves every quantizer. A batch whose input holds more than ``part_elements`` values
(256 ImageNet-sized images: 38.5M, whose activations in ResNet-50 take about 3 GB) runs in parts of nearly equal
size, so the activations alive at once stay a fraction of that, while the quantizers' statistics are those of the
whole batch (:meth:`ActivationQuantizer.begin_batch`): bounds are what one forward of the batch would give. This
relies on the model treating the images of a batch independently, as an inference network does; CIFAR-sized
batches are never split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import fx
from tqdm import tqdm

from qcompile.errors import DataError, PipelineError
from qcompile.frontend.source_lines import source_location
from qcompile.pipeline import CALIBRATED, QUANTIZERS, Pass, PassContext
from qcompile.passes.insert_quantizers import activation_quantizers, weight_quantizers
from qcompile.quantization.quantizer import (
    ActivationQuantizer,
    BatchPart,
    NonFiniteActivation,
    QuantizerState,
    fit_bias_scales,
)

PART_ELEMENTS = 1 << 24  # input values per forward: 111 images of 3x224x224 (about 1 GB of ResNet-50 activations)


def _not_finite(gm: fx.GraphModule, quantizer: torch.nn.Module) -> str:
    """One line naming the value a quantizer found NaN or inf in, and the model's line that computed it."""
    name = next(n for n, m in gm.named_modules() if m is quantizer)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    value = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node
    return (f"calibration: {value.name} ({source_location(value)}) is not finite (NaN or inf) on a calibration batch, "
            "so it has no range to quantize; the float model computes it so on these inputs (a log or square root of "
            "a negative value, a division by zero, an overflow?)")


class Calibrate(Pass):
    name = "calibrate"
    requires = frozenset({QUANTIZERS})
    guarantees = frozenset({CALIBRATED})

    def __init__(self, part_elements: int = PART_ELEMENTS) -> None:
        self.part_elements = part_elements

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        acts = activation_quantizers(gm)
        weights = weight_quantizers(gm)
        if not acts:
            return gm
        if ctx.calibration_data is None:
            raise PipelineError.with_parameters("calibrate needs calibration data (a model file's calibration_data() or {data})")
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
                    self._observe(gm, acts.values(), x)
                    images += len(x)
        except NonFiniteActivation as exc:
            raise DataError(_not_finite(gm, exc.quantizer)) from None
        finally:
            for w in weights.values():
                w.enabled = True
            gm.train(was_training)
        if images == 0:
            raise DataError("the calibration set is empty: no batches to calibrate on")
        for name, q in acts.items():
            q.freeze(name)
        ctx.warnings.extend(f"calibrate: {line}" for line in fit_bias_scales(gm))
        ctx.calibration_images = images
        return gm

    def _observe(self, gm: fx.GraphModule, acts: Iterable[ActivationQuantizer], x: torch.Tensor) -> None:
        """One forward of ``x``, or one per part when it holds more than ``part_elements`` values."""
        parts = min(len(x), math.ceil(x.numel() / self.part_elements)) if isinstance(x, torch.Tensor) else 1
        if parts <= 1:
            gm(x)
            return
        part = BatchPart(len(x))
        for q in acts:
            q.begin_batch(part)
        try:
            for chunk in torch.tensor_split(x, parts):
                part.count = len(chunk)
                gm(chunk)
                part.start += part.count
        finally:
            for q in acts:
                q.end_batch()
