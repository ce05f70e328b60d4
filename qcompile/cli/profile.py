"""``qcompile profile MODEL.py --out PROFILE.json``: measure the latency profile the measured cost model reads.

The model is lowered in float and at each candidate precision uniformly (every layer ``w{b}a{b}``), each IR
exported as the serving ONNX model and profiled by onnxruntime (kernel times mapped back to layers, as
``--measure`` does), or with ``--backend tvm`` built for a TVM CPU target and timed per call (calls charged to
layers by their order); every layer's time is filed under its shape and precision. The same shape measured at
several layers gets their median. Latency does not depend on the weights' values, so calibration uses random
inputs of the example's shape. The end-to-end latencies of the uniform models (interleaved rounds) are stored
beside, to show how well the per-layer sum predicts the whole.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompile.artifacts import atomic_path
from qcompile.cli.arguments import (
    build_profile_parser,
    check_profile_args,
    parse_widths,
)
from qcompile.cli.measure import lowered
from qcompile.errors import QCompileError
from qcompile.frontend.graph import compute_nodes, module_of
from qcompile.frontend.model_file import load_model_file, parse_model_args
from qcompile.ir.graph import IRGraph
from qcompile.ir.layers import INPUT
from qcompile.quantization.latency import (
    FLOAT,
    LatencyProfile,
    layer_key,
    precision_key,
)
from qcompile.quantization.ptq import parse_bits
from qcompile.quantization.recipes import Override, get_recipe
from qcompile.quantization.spec import BF16, Precision
from qcompile.reporting.measured import RUNTIME_INSERTED, machine, per_layer


class _Onnx:
    """onnxruntime: the serving ONNX model, kernels mapped to layers by node name."""

    def __init__(self, args: argparse.Namespace) -> None:
        import onnxruntime

        self.args = args
        self.meta = {"backend": "onnx (serving)", "runtime": f"onnxruntime {onnxruntime.__version__}"}

    def prepare(self, ir: IRGraph, is_float: bool) -> Any:
        from qcompile.backends import onnx as qonnx

        return qonnx.to_onnx(ir, "serving")

    def layers(self, model: Any, ir: IRGraph, x: np.ndarray) -> list[dict[str, Any]]:
        from qcompile.backends.onnx_measure import kernel_times

        return per_layer(ir, kernel_times(model, x, self.args.rounds, self.args.threads, [op.output for op in ir.ops]))

    def interleaved(self, models: dict[str, Any], x: np.ndarray) -> dict[str, list[float]]:
        from qcompile.backends.onnx_measure import interleaved_latency

        return interleaved_latency(models, x, self.args.rounds, self.args.threads)


class _Tvm:
    """TVM on this CPU: one artifact per model (float ones with float32 convolutions, as a float deployment
    runs), calls charged to layers by their order (:mod:`qcompile.backends.tvm.measure`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts: before any run
        import tvm

        self.args = args
        self.folder = tempfile.TemporaryDirectory()
        self.built = 0
        self.meta = {"backend": f"tvm ({args.target})", "runtime": f"tvm {tvm.__version__}"}

    def prepare(self, ir: IRGraph, is_float: bool) -> Any:
        from qcompile.backends.tvm import runtime
        from qcompile.backends.tvm.build import build

        self.built += 1
        artifact = build(ir, self.args.target, Path(self.folder.name) / str(self.built), batch=self.args.batch,
                         float_dtype="float32" if is_float else "float64")
        return runtime.load(artifact.path)

    def layers(self, model: Any, ir: IRGraph, x: np.ndarray) -> list[dict[str, Any]]:
        from qcompile.backends.tvm.measure import call_times, layer_calls

        kernels = layer_calls(ir, call_times(model, x, self.args.rounds))
        if kernels is None:
            raise QCompileError("TVM's calls do not pair with the IR's conv2d/dense ops: no per-layer profile")
        return per_layer(ir, kernels)

    def interleaved(self, models: dict[str, Any], x: np.ndarray) -> dict[str, list[float]]:
        from qcompile.backends.tvm.measure import interleaved_latency

        return interleaved_latency(models, x, self.args.rounds)


def profile_model(argv: list[str]) -> int:
    """Run ``qcompile profile`` (``argv`` after the subcommand)."""
    args = build_profile_parser().parse_args(argv)
    check_profile_args(args)
    precisions = [BF16, *(Precision(b, b) for b in parse_bits(args.bits))]
    widths = parse_widths(args.widths)
    backend = _Tvm(args) if args.backend == "tvm" else _Onnx(args)

    mf = load_model_file(args.model)
    model = mf.build(**parse_model_args(args.model_args)).eval()
    inputs = mf.example_input()
    x = np.random.default_rng(0).standard_normal((args.batch, *inputs[0].shape[1:]), dtype=np.float32)
    calib = [(torch.randn(8, *inputs[0].shape[1:]), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    profile = LatencyProfile()
    overhead: dict[str, list[float]] = defaultdict(list)
    whole: dict[str, dict[str, float]] = {}
    for width in widths:
        models = {}
        for p in precisions:
            recipe = get_recipe("bf16" if p.is_float else "int8")
            overrides = [] if p.is_float else [Override("*", p, "qcompile profile")]
            gm, ir = lowered(model, inputs, recipe, width, args.leaf_modules, calib, overrides)
            keys = {str(n.target): layer_key(module_of(gm, n), n) for n in compute_nodes(gm)}
            models[precision_key(p)] = served = backend.prepare(ir, p.is_float)
            by_key: dict[str, list[float]] = defaultdict(list)
            for row in backend.layers(served, ir, x):
                if row["name"] in (INPUT, RUNTIME_INSERTED):
                    overhead[FLOAT if p.is_float else "quantized"].append(row["ms"])
                else:
                    by_key[keys[row["name"]]].append(row["ms"])
            for key, samples in by_key.items():
                profile.add(key, precision_key(p), samples)
        timed = backend.interleaved(models, x)
        whole[f"{width:g}"] = {k: round(float(np.median(v)), 4) for k, v in timed.items()}
    profile.overhead = {k: round(float(np.median(v)), 6) for k, v in overhead.items()}
    profile.meta = {"model": str(args.model), **backend.meta, "machine": machine(),
                    "python": platform.python_version(), "threads": args.threads, "batch": args.batch,
                    "rounds": args.rounds, "precisions": [precision_key(p) for p in precisions],
                    "widths": widths, "end_to_end_ms": whole}
    with atomic_path(args.out) as tmp:
        profile.save(tmp)
    print(f"wrote {args.out}: {len(profile.entries)} layer shapes x {len(precisions)} precisions; end to end (ms, "
          f"batch {args.batch}): " + "; ".join(f"width {w}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items())
                                              for w, r in whole.items()))
    return 0
