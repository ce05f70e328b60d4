"""``qcompile profile MODEL.py --out PROFILE.json``: measure the latency profile the measured cost model reads.

The model is lowered in float and at each candidate precision uniformly (every layer ``w{b}a{b}``), each IR
exported as the serving ONNX model and profiled by onnxruntime (kernel times mapped back to layers, as
``--measure`` does), or with ``--backend tvm`` built for a TVM CPU target and timed per call (calls charged to
layers by their order); every layer's time is filed under its shape and precision. The same shape measured at
several layers gets their mean, so that the layers keep their sum. Latency does not depend on the weights'
values, so calibration uses random inputs of the example's shape. Each uniform model is also timed end to end
(interleaved rounds), and its per-layer times are scaled to sum to that time: a profiler's per-kernel times
overstate the whole, unevenly across precisions (``profiler_scale`` records the factors).

For a target this machine cannot run (``--target sm90``), ``--stage DIR`` builds every model with its IR and
layer keys into DIR and stops; on the GPU machine, with TVM's runtime alone, ``qcompile profile --staged DIR
--out PROFILE.json`` measures them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompile.artifacts import atomic_path, output_transaction
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
from qcompile.ir.serialize import load as load_ir
from qcompile.ir.serialize import save as save_ir
from qcompile.quantization.latency import (
    FLOAT,
    LatencyProfile,
    layer_key,
    precision_key,
)
from qcompile.quantization.ptq import parse_bits
from qcompile.quantization.recipes import Override, get_recipe
from qcompile.quantization.spec import BF16, Precision
from qcompile.reporting.measured import machine, per_layer

STAGE_PLAN = "plan.json"
UNPAIRED = "TVM's calls do not pair with the IR's conv2d/dense ops: no per-layer profile"


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
    """TVM: one artifact per model (float ones with float32 convolutions, as a float deployment runs), calls
    charged to layers by their order (:mod:`qcompile.backends.tvm.measure`). CUDA builds launch kernel by kernel
    (no CUDA graph), so that the VM sees every call."""

    def __init__(self, args: argparse.Namespace, target: str, folder: Path | None = None) -> None:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts: before any run
        import tvm

        from qcompile.backends.tvm.targets import get_target

        self.args = args
        self.spec = get_target(target)
        self.built = 0
        self.temporary = None if folder is not None else tempfile.TemporaryDirectory()
        self.folder = folder if folder is not None else Path(self.temporary.name)
        self.meta = {"backend": f"tvm ({target})", "runtime": f"tvm {tvm.__version__}"}

    def build(self, ir: IRGraph, is_float: bool, name: str) -> Path:
        from qcompile.backends.tvm.build import build
        from qcompile.backends.tvm.measure import layer_calls, planned_calls

        artifact = build(ir, self.spec.name, self.folder / name, batch=self.args.batch,
                         float_dtype="float32" if is_float else "float64", cuda_graph=False)
        if layer_calls(ir, [(call, 0.0) for call in planned_calls(artifact.executable)]) is None:
            raise QCompileError(f"{name}: {UNPAIRED}")
        return artifact.path

    def load(self, path: Path) -> Any:
        from qcompile.backends.tvm import runtime

        model = runtime.load(path)  # on the device it was built for
        if self.spec.is_cuda:
            self.meta["device"] = model.device.device_name  # the GPU; "machine" names the host
        return model

    def prepare(self, ir: IRGraph, is_float: bool) -> Any:
        self.built += 1
        return self.load(self.build(ir, is_float, str(self.built)))

    def layers(self, model: Any, ir: IRGraph, x: np.ndarray) -> list[dict[str, Any]]:
        from qcompile.backends.tvm.measure import call_times, layer_calls

        kernels = layer_calls(ir, call_times(model, x, self.args.rounds))
        if kernels is None:
            raise QCompileError(UNPAIRED)
        return per_layer(ir, kernels)

    def interleaved(self, models: dict[str, Any], x: np.ndarray) -> dict[str, list[float]]:
        from qcompile.backends.tvm.measure import interleaved_latency

        return interleaved_latency(models, x, self.args.rounds)


@dataclass
class _Entry:
    """One model of the profile: its width, precision key, IR, and its layers' shape keys by layer name."""

    width: float
    precision: str
    ir: IRGraph
    keys: dict[str, str]

    @property
    def is_float(self) -> bool:
        return self.precision == FLOAT


def _lowered_entries(args: argparse.Namespace, precisions: list[Precision]) -> Iterator[_Entry]:
    """Every (width, precision) of the profile lowered from the model file."""
    mf = load_model_file(args.model)
    model = mf.build(**parse_model_args(args.model_args)).eval()
    inputs = mf.example_input()
    calib = [(torch.randn(8, *inputs[0].shape[1:]), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    for width in parse_widths(args.widths):
        for p in precisions:
            recipe = get_recipe("bf16" if p.is_float else "int8")
            overrides = [] if p.is_float else [Override("*", p, "qcompile profile")]
            gm, ir = lowered(model, inputs, recipe, width, args.leaf_modules, calib, overrides)
            keys = {str(n.target): layer_key(module_of(gm, n), n) for n in compute_nodes(gm)}
            yield _Entry(width, precision_key(p), ir, keys)


def _stage(args: argparse.Namespace, precisions: list[Precision]) -> int:
    """Build every model for a target this machine cannot run, with what measuring them there needs; the folder
    is written whole or not at all (an error or Ctrl-C leaves it as it was)."""
    folder = Path(args.stage)
    plan: dict[str, Any] = {"model": str(args.model), "target": args.target, "batch": args.batch,
                            "precisions": [precision_key(p) for p in precisions], "entries": []}
    with output_transaction(folder, marker=STAGE_PLAN) as staging:
        backend = _Tvm(args, args.target, staging)
        for n, entry in enumerate(_lowered_entries(args, precisions)):
            name = f"w{entry.width:g}-{entry.precision}"
            artifact = backend.build(entry.ir, entry.is_float, name)
            save_ir(entry.ir, staging / name / "ir")
            plan["entries"].append({"width": entry.width, "precision": entry.precision, "keys": entry.keys,
                                    "artifact": str(artifact.relative_to(staging)), "ir": f"{name}/ir"})
            print(f"built {n + 1}: {name}", flush=True)
        (staging / STAGE_PLAN).write_text(json.dumps(plan, indent=1))
    print(f"staged {len(plan['entries'])} models in {folder}; on the machine they are for, with TVM's runtime: "
          f"qcompile profile --staged {folder} --out PROFILE.json")
    return 0


def _staged_entries(args: argparse.Namespace, backend: _Tvm, plan: dict[str, Any]) -> Iterator[tuple[_Entry, Any]]:
    folder = Path(args.staged)
    for row in plan["entries"]:
        entry = _Entry(row["width"], row["precision"], load_ir(folder / row["ir"]), row["keys"])
        yield entry, backend.load(folder / row["artifact"])


@dataclass
class _Profiled:
    """One model's profiled run: its layers' times by shape, and the time outside every layer (summed)."""

    entry: _Entry
    layers: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outside: float = 0.0


def _calibrated(profiled: list[_Profiled], whole: dict[str, dict[str, float]]
                ) -> tuple[LatencyProfile, dict[str, dict[str, float]]]:
    """The profile, each model's layer and overhead times scaled so that they sum to its end-to-end median.

    A profiler's per-kernel times overstate the model they come from (the profiler's own cost per node, and a
    run that is not interleaved with the others), and unevenly across models: on ResNet-20 at batch 1 here the
    sums ran from a few percent to 2.8x over the end-to-end medians, most for the small quantized models.
    Scaled, a uniform plan's prediction is that model's measured time, and a mixed plan's follows each layer's
    share."""
    profile = LatencyProfile()
    overhead: dict[str, list[float]] = defaultdict(list)
    scales: dict[str, dict[str, float]] = defaultdict(dict)
    for run in profiled:
        width, precision = f"{run.entry.width:g}", run.entry.precision
        total = run.outside + sum(map(sum, run.layers.values()))
        scale = whole[width][precision] / total if total > 0 else 1.0
        scales[width][precision] = round(scale, 4)
        for key, samples in run.layers.items():
            profile.add(key, precision, [ms * scale for ms in samples])
        overhead[FLOAT if run.entry.is_float else "quantized"].append(run.outside * scale)
    profile.overhead = {k: round(float(np.median(v)), 6) for k, v in overhead.items()}
    return profile, dict(scales)


def profile_model(argv: list[str]) -> int:
    """Run ``qcompile profile`` (``argv`` after the subcommand)."""
    args = build_profile_parser().parse_args(argv)
    check_profile_args(args)
    precisions = [BF16, *(Precision(b, b) for b in parse_bits(args.bits))]
    if args.stage:
        return _stage(args, precisions)
    if args.staged:
        try:
            plan = json.loads((Path(args.staged) / STAGE_PLAN).read_text())
        except (OSError, ValueError) as exc:
            raise QCompileError(f"--staged {args.staged}: not a folder written by --stage ({exc})") from None
        args.batch = plan["batch"]
        backend: _Onnx | _Tvm = _Tvm(args, plan["target"], Path(args.staged))
        served = _staged_entries(args, backend, plan)
        model_name, precisions_meta = plan["model"], plan["precisions"]
    else:
        backend = _Tvm(args, args.target) if args.backend == "tvm" else _Onnx(args)
        served = ((entry, backend.prepare(entry.ir, entry.is_float)) for entry in _lowered_entries(args, precisions))
        model_name, precisions_meta = str(args.model), [precision_key(p) for p in precisions]

    whole: dict[str, dict[str, float]] = {}
    by_width: dict[float, dict[str, Any]] = defaultdict(dict)
    profiled: list[_Profiled] = []
    x: np.ndarray | None = None
    for entry, model in served:
        if x is None:
            shape = entry.ir.values[entry.ir.inputs[0]].shape[1:]
            x = np.random.default_rng(0).standard_normal((args.batch, *shape), dtype=np.float32)
        by_width[entry.width][entry.precision] = model
        run = _Profiled(entry)
        for row in backend.layers(model, entry.ir, x):
            if row["name"] not in entry.keys:  # the input's, the runtime's, a matrix product of two tensors
                run.outside += row["ms"]
            else:
                run.layers[entry.keys[row["name"]]].append(row["ms"])
        profiled.append(run)
    for width, models in by_width.items():
        timed = backend.interleaved(models, x)
        whole[f"{width:g}"] = {k: round(float(np.median(v)), 4) for k, v in timed.items()}
    profile, scales = _calibrated(profiled, whole)
    profile.meta = {"model": model_name, **backend.meta, "machine": machine(),
                    "python": platform.python_version(), "threads": args.threads, "batch": args.batch,
                    "rounds": args.rounds, "precisions": precisions_meta,
                    "widths": [float(w) for w in by_width], "end_to_end_ms": whole, "profiler_scale": scales}
    with atomic_path(args.out) as tmp:
        profile.save(tmp)
    print(f"wrote {args.out}: {len(profile.entries)} layer shapes x {len(precisions_meta)} precisions; end to end "
          f"(ms, batch {args.batch}): " + "; ".join(f"width {w}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items())
                                                   for w, r in whole.items()))
    return 0
