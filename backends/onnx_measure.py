"""Measured latency of ONNX models in onnxruntime on this machine: end to end and per IR op.

End to end, models are timed in interleaved rounds (:mod:`qcompile.backends.timing`), so the machine's noise hits
all of them alike; a ratio of two models is best taken as the median of the per-round ratios
(:func:`qcompile.reporting.measured.median_ratio`). Sessions spin their worker threads during a run, as a
deployed session does, and stop them when it returns: the spinning threads of the sessions not being timed would
take the cores from the one that is.

Per op, onnxruntime's own profiler times every kernel of its optimized graph. The exporter names each ONNX node
``<IR op output>/<ONNX op>``, and onnxruntime keeps that name as the prefix of the node it fuses a group into
(``QLinearConv`` from DQ → Conv → Q keeps the Conv's name), so every kernel maps back to the IR op it came from.
Its NCHWc layout pass names a float conv after its output value instead (``<value>_nchwc``), which is an IR op's
output too. Nodes onnxruntime inserts itself (layout reorders and transposes) map to no op.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from qcompile.backends.onnx import NODE_SEPARATOR, run, session
from qcompile.backends.timing import interleaved_times

COMPUTE_KERNELS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QLinearConv",
                             "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "DynamicQuantizeMatMul"})
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
                             "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool",
                             "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid"})


@dataclass(frozen=True)
class KernelTime:
    """One kernel of onnxruntime's optimized graph: its node, operator, the IR op it runs, median ms per run."""

    node: str
    op_type: str
    ir_op: str | None
    ms: float

    @property
    def integer(self) -> bool:
        return self.op_type in INTEGER_KERNELS

    @property
    def compute(self) -> bool:
        """A convolution or matrix product: the kernel a layer is for (the rest are its epilogue)."""
        return self.op_type in COMPUTE_KERNELS


_RUNTIME_SUFFIX = re.compile(r"(_nchwc|_token_\d+)+$")


def ir_op_of(node: str, ops: Collection[str]) -> str | None:
    """The IR op (of ``ops``, by output) an onnxruntime node came from (``None`` for a node it inserted)."""
    head, sep, _ = node.rpartition(NODE_SEPARATOR)
    if sep:
        return head
    value = _RUNTIME_SUFFIX.sub("", node)
    return value if value in ops else None


def interleaved_latency(models: dict[str, Any], x: np.ndarray, rounds: int, threads: int, warmup: int = 3,
                        min_round_ms: float = 20.0) -> dict[str, list[float]]:
    """Per model (a ModelProto or a path), its latency per run in ms in each of ``rounds`` interleaved rounds
    (:func:`qcompile.backends.timing.interleaved_times`)."""
    sessions = {key: session(model, threads=threads, spin_between_runs=False) for key, model in models.items()}
    return interleaved_times({key: partial(run, sess, [x]) for key, sess in sessions.items()}, rounds, warmup,
                             min_round_ms)


def kernel_times(model: Any, x: np.ndarray, runs: int, threads: int, ops: Collection[str],
                 warmup: int = 3) -> list[KernelTime]:
    """Every kernel onnxruntime ran for ``model`` (exported from an IR whose op outputs are ``ops``) on ``x``, with
    its median time per run over ``runs`` runs."""
    with TemporaryDirectory() as tmp:
        sess = session(model, threads=threads, spin_between_runs=False, profile_prefix=str(Path(tmp) / "profile"))
        for _ in range(warmup + runs):
            run(sess, [x])
        events = json.loads(Path(sess.end_profiling()).read_text())
    starts = [e["ts"] for e in events if e.get("name") == "model_run"]
    first = starts[warmup] if len(starts) > warmup else 0
    durations: dict[str, list[float]] = defaultdict(list)
    op_types: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            node = e["name"].removesuffix("_kernel_time")
            durations[node].append(e["dur"] / 1e3)
            op_types[node] = e["args"]["op_name"]
    return [KernelTime(node, op_types[node], ir_op_of(node, ops), statistics.median(times))
            for node, times in durations.items()]
