"""Measured latency of TVM artifacts on this machine: end to end in interleaved rounds
(:mod:`qcompile.backends.timing`), and per compiled function with the VM's instrument hook.

TVM fuses the IR's ops into functions it names itself (``fused_conv2d_add_...``), so the per-function times are
reported under those names, not mapped to IR layers as onnxruntime's kernels are.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
from qcompile.backends.timing import interleaved_times
from qcompile.backends.tvm.runtime import TvmModel


def interleaved_latency(models: dict[str, TvmModel], x: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Per loaded artifact, its latency per call in ms in each of ``rounds`` interleaved rounds, the input already
    on the device (what serving pays per batch once the images are there)."""
    inputs = {key: model.to_device(x) for key, model in models.items()}

    def runner(model: TvmModel, xd: Any):  # noqa: ANN202 - a timing closure
        return lambda: (model.run_device(xd), model.device.sync())

    return interleaved_times({key: runner(m, inputs[key]) for key, m in models.items()}, rounds)


VM_BUILTIN = "vm.builtin."  # the VM's own shape and allocation calls: not the model's compute


def function_times(model: TvmModel, x: np.ndarray, runs: int = 3) -> dict[str, float]:
    """Median ms per call of every compiled function the VM calls for one batch (the device synchronised around
    each; the VM's builtins left out)."""
    samples: dict[str, list[float]] = defaultdict(list)
    start: list[float] = [0.0]
    seen: dict[str, float] = defaultdict(float)

    def instrument(func: object, name: str, before: bool, ret: object, *args: object) -> int:
        model.device.sync()
        if before:
            start[0] = time.perf_counter()
        else:
            seen[str(name)] += (time.perf_counter() - start[0]) * 1e3
        return 0  # run the call as usual

    xd = model.to_device(x)
    model.run_device(xd)
    model.vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            seen.clear()
            model.run_device(xd)
            for name, ms in seen.items():
                samples[name].append(ms)
    finally:
        model.vm.set_instrument(None)
    return {name: float(np.median(ms)) for name, ms in samples.items() if not name.startswith(VM_BUILTIN)}
