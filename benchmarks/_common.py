"""Shared by the benchmark scripts: an integer IR of a torchvision-layout ResNet, and median timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from qcompile import Pipeline, get_recipe
from qcompile.ir.graph import IRGraph
from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger


def lowered(model: torch.nn.Module, recipe: str, size: int = 224, seed: int = 0) -> IRGraph:
    """The model's integer IR, calibrated on a few random images (speed does not depend on the weights)."""
    torch.manual_seed(seed)
    model.eval()
    calib = [(torch.randn(4, 3, size, size), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    passes = [FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate(), LowerInteger()]
    with torch.no_grad():
        res = Pipeline(passes).run(model, torch.randn(1, 3, size, size), recipe=get_recipe(recipe),
                                   calibration_data=calib)
    return res.context.ir


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
