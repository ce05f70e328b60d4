"""Measured latency of TVM artifacts on this machine: end to end in interleaved rounds
(:mod:`qcompile.backends.timing`), and per compiled function with the VM's instrument hook.

TVM names its functions itself (``conv2d6``, ``tir_round1``, ...; on CUDA, where each conv is fused with its
epilogue, ``fused_conv2d3_add1_...``) and shares one function between layers of one shape, so calls are mapped to
IR ops by their order instead: the VM calls them in the IR's op order, one
convolution or matmul function per ``conv2d`` / ``dense`` op, and every call is charged to the last of those ops
before it (the IR's own grouping of ops into layers, :mod:`qcompile.ir.layers`). Where the counts differ, no
layers are given.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from qcompile.backends.timing import interleaved_times
from qcompile.backends.tvm.runtime import TvmModel

from qcompile.ir.graph import IRGraph
from qcompile.ir.layers import LAYER_KINDS
from qcompile.ir.types import DType

COMPUTE_FUNCTION = re.compile(r"(?:^|_)(?:conv2d|matmul|dense)\d*(?:_|$)")


@dataclass(frozen=True)
class FunctionCall:
    """One call's median time, and the IR op it is charged to (a :class:`qcompile.reporting.measured.Kernel`)."""

    op_type: str
    ir_op: str | None
    ms: float
    integer: bool
    compute: bool


def interleaved_latency(models: dict[str, TvmModel], x: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Per loaded artifact, its latency per call in ms in each of ``rounds`` interleaved rounds, the input already
    on the device (what serving pays per batch once the images are there)."""
    inputs = {key: model.to_device(x) for key, model in models.items()}

    def runner(model: TvmModel, xd: Any):  # noqa: ANN202 - a timing closure
        return lambda: (model.run_device(xd), model.device.sync())

    return interleaved_times({key: runner(m, inputs[key]) for key, m in models.items()}, rounds)


VM_BUILTIN = "vm.builtin."  # the VM's own shape and allocation calls: not the model's compute


def call_times(model: TvmModel, x: np.ndarray, runs: int = 3) -> list[tuple[str, float]]:
    """Every compiled function the VM calls for one batch, in call order, with its median ms over ``runs`` (the
    device synchronised around each call; the VM's builtins left out)."""
    runs_seen: list[list[tuple[str, float]]] = []
    start: list[float] = [0.0]

    def instrument(func: object, name: str, before: bool, ret: object, *args: object) -> int:
        model.device.sync()
        if before:
            start[0] = time.perf_counter()
        elif not str(name).startswith(VM_BUILTIN):
            runs_seen[-1].append((str(name), (time.perf_counter() - start[0]) * 1e3))
        return 0  # run the call as usual

    xd = model.to_device(x)
    model.run_device(xd)
    model.vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            runs_seen.append([])
            model.run_device(xd)
    finally:
        model.vm.set_instrument(None)
    return [(calls[0][0], float(np.median([ms for _, ms in calls]))) for calls in zip(*runs_seen)]


def planned_calls(executable: Any) -> list[str]:
    """The compiled functions ``main`` calls, in order, read from a built executable (its VM listing), without
    running it: to check before a machine with the target runs it that its calls will pair with the IR."""
    body = executable.as_text().split("@main:\n", 1)[1].split("\n@", 1)[0]
    return [name for name in re.findall(r"call\s+([\w.]+)\s+in:", body) if not name.startswith(VM_BUILTIN)]


def layer_calls(ir: IRGraph, calls: list[tuple[str, float]]) -> list[FunctionCall] | None:
    """The calls charged to IR ops by their order (the module docstring), or None when the convolution and
    matmul calls do not pair one to one with the IR's ``conv2d`` / ``dense`` ops."""
    compute = [op for op in ir.ops if op.kind in LAYER_KINDS]
    if sum(bool(COMPUTE_FUNCTION.search(name)) for name, _ in calls) != len(compute):
        return None
    before_first = ir.ops[0].output if ir.ops and ir.ops[0].kind not in LAYER_KINDS else None  # "(input)"
    owner, seen, out = before_first, 0, []
    for name, ms in calls:
        is_compute = bool(COMPUTE_FUNCTION.search(name))
        integer = False
        if is_compute:
            op = compute[seen]
            owner, seen = op.output, seen + 1
            integer = ir.values[op.inputs[0]].dtype is not DType.FLOAT32
        out.append(FunctionCall(name, owner, ms, integer, is_compute))
    return out


def function_times(calls: list[tuple[str, float]]) -> dict[str, float]:
    """Per function name, its ms summed over the calls (a function serves every layer of its shape)."""
    totals: dict[str, float] = defaultdict(float)
    for name, ms in calls:
        totals[name] += ms
    return dict(totals)
