"""Shared by the benchmark scripts: an integer IR of a torchvision-layout ResNet, and median timing."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from qcompile import Pipeline, get_recipe
from qcompile.ir.graph import IRGraph
from qcompile.pipelines import lowering_passes


def lowered(model: torch.nn.Module, recipe: str, size: int = 224, seed: int = 0,
            calib: list[torch.Tensor] | None = None) -> IRGraph:
    """The model's integer IR, calibrated on ``calib`` or on a few random images (speed does not depend on the
    weights)."""
    torch.manual_seed(seed)
    model.eval()
    if calib is None:
        calib = [torch.randn(4, 3, size, size) for _ in range(2)]
    calib_data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib]
    passes = lowering_passes()
    with torch.no_grad():
        res = Pipeline(passes).run(model, torch.randn(1, 3, size, size), recipe=get_recipe(recipe),
                                   calibration_data=calib_data)
    return res.context.ir


def float_onnx(model: torch.nn.Module, size: int, path: Path) -> Path:
    """The float model through torch's TorchScript ONNX exporter, input ``input``, dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return path


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
