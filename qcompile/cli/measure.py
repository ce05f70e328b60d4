"""``--measure``: the deployed artifact's latency on this machine, beside the float model's in the same runtime.

The float reference is the same model lowered at ``bf16`` (the IR's float ops, BN folded), exported by the same
exporter and run by the same onnxruntime (or built by TVM for the same target and batch): the ratio then
isolates what quantization changes. Only timings; the artifact itself was verified before it is measured.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from qcompile.errors import QCompileError
from qcompile.frontend.tracing import LeafSpec
from qcompile.ir.graph import IRGraph
from qcompile.pipeline import Pipeline
from qcompile.pipelines import lowering_passes
from qcompile.quantization.recipes import Override, Recipe, get_recipe
from qcompile.reporting.measured import end_to_end, machine, per_layer


def lowered(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, width: float,
            leaf_modules: Sequence[LeafSpec], calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
            overrides: Sequence[Override] = ()) -> tuple[fx.GraphModule, IRGraph]:
    """The model lowered at ``recipe`` (``bf16``: its float form, float32 ops, BN folded; it needs no
    calibration) for timing it: the float reference of ``--measure``, each precision of ``qcompile profile``."""
    with torch.no_grad():
        result = Pipeline(lowering_passes(width=width)).run(
            model, inputs, leaf_modules=leaf_modules, recipe=recipe, overrides=list(overrides), width=width,
            calibration_data=calibration)
    assert result.context.ir is not None
    return result.graph_module, result.context.ir


FloatReference = tuple[IRGraph | None, str | None]
"""The float model lowered to time beside the artifacts, or None and why not."""


def float_reference(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                    args: argparse.Namespace) -> FloatReference:
    """The float model lowered once to time beside every artifact, or None and why: a function with no float IR
    op (a Mish, say: the IR tabulates every function on codes, but runs only common ones in float,
    :data:`~qcompile.ir.ops.ACTIVATIONS`), so such a model is timed without it."""
    try:
        return lowered(model, inputs, get_recipe("bf16"), args.width, args.leaf_modules)[1], None
    except QCompileError as exc:
        return None, f"no float build of the model to time beside the artifact ({exc}); the artifact is timed alone"


def measure_onnx(args: argparse.Namespace, reference: FloatReference, inputs: tuple[torch.Tensor, ...],
                 ir: IRGraph, serving: Any) -> dict[str, Any]:
    """``report["measured"]`` for the ONNX serving model: end to end per ``--measure-batch`` and per layer."""
    import onnxruntime

    from qcompile.backends import onnx as qonnx
    from qcompile.backends.onnx_measure import interleaved_latency, kernel_times

    float_ir, why = reference
    contenders = {"artifact": serving} | ({"float": qonnx.to_onnx(float_ir, "serving")} if float_ir else {})
    rng = np.random.default_rng(0)
    shape = tuple(inputs[0].shape[1:])
    xs = {batch: rng.standard_normal((batch, *shape), dtype=np.float32) for batch in args.measure_batches}
    samples = {}
    for batch, x in xs.items():
        timed = interleaved_latency(contenders, x, args.measure, args.measure_threads)
        samples[batch] = (timed["artifact"], timed.get("float", []))
    first = args.measure_batches[0]
    kernels = kernel_times(serving, xs[first], args.measure, args.measure_threads, [op.output for op in ir.ops])
    return {
        "backend": "onnx (serving)",
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "machine": machine(),
        "threads": args.measure_threads,
        "rounds": args.measure,
        "batches": end_to_end(samples),
        **({"float_missing": why} if why else {}),
        "layers_batch": first,
        "layers": per_layer(ir, kernels),
    }


def measure_tvm(args: argparse.Namespace, reference: FloatReference, inputs: tuple[torch.Tensor, ...],
                ir: IRGraph, artifact: str) -> dict[str, Any]:
    """``report["measured_tvm"]`` for a TVM CPU artifact: end to end per batch beside the float model built by
    TVM for the same target and batch (float32 convolutions, not the reference's float64), per compiled function,
    and per layer (calls charged to IR ops by their order, :mod:`qcompile.backends.tvm.measure`). A fixed-batch
    artifact is timed at its batch only."""
    import tempfile

    import tvm

    from qcompile.backends.tvm import runtime
    from qcompile.backends.tvm.build import build
    from qcompile.backends.tvm.measure import call_times, function_times, interleaved_latency, layer_calls

    served = runtime.load(artifact)
    float_ir, why = reference
    batches = [served.batch] if served.batch is not None else args.measure_batches
    rng = np.random.default_rng(0)
    shape = tuple(inputs[0].shape[1:])
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {"artifact": served}
        if float_ir is not None:
            contenders["float"] = runtime.load(build(float_ir, served.meta["target"], tmp, batch=served.batch,
                                                     float_dtype="float32").path)  # a float deployment's arithmetic
        samples = {}
        for batch in batches:
            timed = interleaved_latency(contenders, rng.standard_normal((batch, *shape), dtype=np.float32),
                                        args.measure)
            samples[batch] = (timed["artifact"], timed.get("float", []))
    calls = call_times(served, rng.standard_normal((batches[0], *shape), dtype=np.float32))
    functions = function_times(calls)
    kernels = layer_calls(ir, calls)
    return {
        "backend": f"tvm ({served.meta['target']})",
        "runtime": f"tvm {tvm.__version__}",
        "machine": machine(),
        "threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
        "rounds": args.measure,
        "batches": end_to_end(samples),
        **({"float_missing": why} if why else {}),
        "functions_batch": batches[0],
        "functions": [{"name": n, "ms": round(ms, 4)} for n, ms in sorted(functions.items(), key=lambda kv: -kv[1])],
        "layers_batch": batches[0],
        "layers": per_layer(ir, kernels) if kernels is not None else [],
    }
