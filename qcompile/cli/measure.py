"""``--measure``: the deployed artifact's latency on this machine, beside the float model's in the same runtime.

The float reference is the same model lowered at ``bf16`` (the IR's float ops, BN folded), exported by the same
exporter and run by the same onnxruntime: the ratio then isolates what quantization changes. Only timings; the
artifact itself was verified before it is measured.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from qcompile.ir.graph import IRGraph
from qcompile.pipeline import Pipeline
from qcompile.pipelines import lowering_passes
from qcompile.quantization.recipes import get_recipe
from qcompile.reporting.measured import end_to_end, machine, per_layer


def float_ir(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], width: float) -> IRGraph:
    """The float model as IR (float32 ops), at the run's width."""
    batch = [(torch.cat(inputs[:1]), torch.zeros(len(inputs[0]), dtype=torch.long))]
    with torch.no_grad():
        result = Pipeline(lowering_passes(width=width)).run(model, inputs, recipe=get_recipe("bf16"),
                                                            calibration_data=batch)
    assert result.context.ir is not None
    return result.context.ir


def measure_onnx(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], ir: IRGraph,
                 serving: Any) -> dict[str, Any]:
    """``report["measured"]`` for the ONNX serving model: end to end per ``--measure-batch`` and per layer."""
    import onnxruntime

    from qcompile.backends import onnx as qonnx
    from qcompile.backends.onnx_measure import interleaved_latency, kernel_times

    reference = qonnx.to_onnx(float_ir(model, inputs, args.width), "serving")
    rng = np.random.default_rng(0)
    shape = tuple(inputs[0].shape[1:])
    samples, kernels = {}, {}
    for batch in args.measure_batches:
        x = rng.standard_normal((batch, *shape), dtype=np.float32)
        timed = interleaved_latency({"artifact": serving, "float": reference}, x, args.measure, args.measure_threads)
        samples[batch] = (timed["artifact"], timed["float"])
    x = rng.standard_normal((args.measure_batches[0], *shape), dtype=np.float32)
    kernels = kernel_times(serving, x, args.measure, args.measure_threads, [op.output for op in ir.ops])
    return {
        "backend": "onnx (serving)",
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "machine": machine(),
        "threads": args.measure_threads,
        "rounds": args.measure,
        "batches": end_to_end(samples),
        "layers_batch": args.measure_batches[0],
        "layers": per_layer(ir, kernels),
    }
