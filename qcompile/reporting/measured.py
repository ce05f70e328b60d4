"""``report["measured"]``: the artifact's latency on this machine beside the float model's, and per layer.

The figures come from a backend's timer and profiler (end-to-end samples from interleaved rounds, and the
kernels it ran mapped to IR ops); this module only turns them into the report's shape, per layer as
:mod:`qcompile.ir.layers` groups ops, so the per-layer table can show the measured time beside the cost model.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from qcompile.ir.graph import IRGraph
from qcompile.ir.layers import INPUT, op_layers

RUNTIME_INSERTED = "(runtime)"


class Kernel(Protocol):
    """What a backend's profiler reports per kernel."""

    op_type: str
    ir_op: str | None
    ms: float
    integer: bool
    compute: bool


def machine() -> str:
    """The CPU and core count the figures were taken on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def layer_timings(report: dict[str, Any]) -> dict[str, Any] | None:
    """The measurement whose per-layer times the report's table shows: onnxruntime's when it ran, else TVM's."""
    return report.get("measured") or report.get("measured_tvm")


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over interleaved rounds of ``a / b``: robust to a round that the machine slowed for both."""
    return statistics.median(x / y for x, y in zip(a, b))


def median_ratio_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median over rounds of ``a / b`` (order statistics, as the sign test
    gives them; with 31 rounds the 10th and 22nd of the sorted ratios, 97% coverage): when it spans 1.0, the two
    runners tie on this machine whatever the median says. Too few rounds for ``confidence`` give the full range."""
    ratios = sorted(x / y for x, y in zip(a, b))
    n, tail = len(ratios), (1 - confidence) / 2
    k, below = -1, 0.0  # the largest k with P(Binomial(n, 1/2) <= k) <= tail
    while k + 1 < n and below + math.comb(n, k + 1) / 2**n <= tail:
        k += 1
        below += math.comb(n, k) / 2**n
    return (ratios[0], ratios[-1]) if k < 0 else (ratios[k], ratios[n - 1 - k])


def end_to_end(samples: Mapping[int, tuple[list[float], list[float]]]) -> dict[str, dict[str, float]]:
    """Per batch size, (artifact, float) latencies of interleaved rounds → medians and the median ratio (None
    for both where the float model was not timed)."""
    out = {}
    for batch, (artifact, float_) in samples.items():
        out[str(batch)] = {"artifact_ms": round(statistics.median(artifact), 4),
                           "float_ms": round(statistics.median(float_), 4) if float_ else None,
                           "ratio": round(median_ratio(artifact, float_), 4) if float_ else None}
    return out


def per_layer(ir: IRGraph, kernels: Iterable[Kernel]) -> list[dict[str, Any]]:
    """The kernels' time summed per layer (in IR order), with the kernels that ran for it: the layer's own
    conv/dense kernel first, so a float fallback (``Conv`` instead of ``QLinearConv``) is visible."""
    owner = op_layers(ir)
    ms: dict[str, float] = defaultdict(float)
    ran: dict[str, list[str]] = defaultdict(list)
    integer: dict[str, bool] = {}
    for k in kernels:
        layer = owner.get(k.ir_op, RUNTIME_INSERTED)  # a node the runtime inserted has no IR op
        ms[layer] += k.ms
        if k.compute and layer not in integer:
            ran[layer].insert(0, k.op_type)
            integer[layer] = k.integer
        elif k.op_type not in ran[layer]:
            ran[layer].append(k.op_type)
    order = [INPUT, *dict.fromkeys(owner.values()), RUNTIME_INSERTED]
    return [{"name": layer, "ms": round(ms[layer], 4), "kernels": ran[layer], "integer": integer.get(layer)}
            for layer in dict.fromkeys(order) if layer in ms]
