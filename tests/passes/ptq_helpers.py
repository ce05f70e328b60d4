"""Calibration data and a quantization pipeline for the PTQ pass tests (TinyNet, small random images)."""

from __future__ import annotations

import torch
from qcompile.passes import AnnotateCost, AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger
from torch import nn

from qcompile import Pipeline, get_recipe
from qcompile.pipeline import Pass, PipelineResult


def batches(seed: int = 1, n: int = 4, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def quantize(model: nn.Module, data, before_fold: list[Pass] = (), after_calibrate: list[Pass] = (),
             recipe: str = "int4") -> PipelineResult:
    """AssignPrecision → AnnotateCost → [before_fold] → fold → assign and cost again → quantize → calibrate →
    [after_calibrate] → lower (the order of ``ptq_passes``)."""
    passes = [AssignPrecision(), AnnotateCost(), *before_fold, FoldBatchNorm(), AssignPrecision(), AnnotateCost(),
              InsertQuantizers(), Calibrate(), *after_calibrate, LowerInteger()]
    with torch.no_grad():
        return Pipeline(passes).run(model, data[0][0][:1], recipe=get_recipe(recipe), calibration_data=data)
