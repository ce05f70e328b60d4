"""The integer IR and the backends' artifacts of one run, each verified against the integer reference under
one tolerance policy (:func:`within_tolerance`); a run that fails verification is kept beside ``--out``."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from qcompile.artifacts import failed_path, file_digests, keep_failed, write_json
from qcompile.errors import QCompileError
from qcompile.ir.graph import IRGraph
from qcompile.ir.serialize import save as save_ir
from qcompile.reporting.evaluate import take_images
from qcompile.reporting.verify import verify_reference

# a list, or a re-iterable qcompile.data.Batches; calibration batches may have labels None (images alone)
LabelledBatches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]
ReferencePairs = list[tuple[np.ndarray, np.ndarray]]  # (inputs, reference logits) per batch


class VerificationFailed(QCompileError):
    """A backend's artifact disagrees with the integer reference. The run is not swapped into --out: it is kept
    beside it (``keep_failed``) with its report, for the diff to be read and the artifact to be run."""


def within_tolerance(result: dict[str, Any]) -> bool:
    """An artifact agrees with the reference: >= 99.9% identical final integers, max 1 LSB, top-1 >= 99.9%."""
    return result["identical_fraction"] >= 0.999 and result["max_lsb_diff"] <= 1 and result["top1_agreement"] >= 0.999


def build_onnx_artifacts(args: argparse.Namespace, ir: IRGraph, out: Path, report: dict[str, Any],
                         pairs: ReferencePairs) -> None:
    """model.onnx (serving) and model.compact.onnx, each checked against the reference in onnxruntime."""
    wanted = args.backends or ["onnx"]
    if "onnx" not in wanted:
        return
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        if args.backends:
            raise QCompileError("--backend onnx needs the onnx extra: pip install 'qcompile[onnx]'")
        report["warnings"].append("ONNX artifacts skipped: the onnx extra is not installed (pip install 'qcompile[onnx]')")
        return
    if ir.metadata.get("requantize") == "dyadic":
        report["warnings"].append("ONNX artifacts skipped: dyadic requantization has no ONNX QDQ form")
        return
    from qcompile.backends import onnx as qonnx

    unsigned = qonnx.unsigned_weights(args.onnx_weight_type)
    report["onnx_weight_type"] = {
        "asked": args.onnx_weight_type, "chosen": "uint8" if unsigned else "int8",
        "why": ("asked for" if args.onnx_weight_type != "auto" else
                "this CPU's onnxruntime uint8 x int8 kernels saturate (x86-64 without VNNI or AMX): 8-bit weights past "
                "+-64 are uint8 (zero point 128), which its exact uint8 x uint8 kernels run" if unsigned else
                "this CPU's onnxruntime uint8 x int8 kernels are exact (VNNI, AMX, or not x86-64)")}
    for flavour, name in (("serving", "model.onnx"), ("compact", "model.compact.onnx")):
        model = qonnx.to_onnx(ir, flavour, weight_type=args.onnx_weight_type)
        path = qonnx.save(model, out / name)
        report.setdefault("artifacts", {})[f"onnx_{flavour}"] = str(path)
        if flavour == "serving":
            report["onnx_clips"] = qonnx.remaining_clips(ir, model)
        if not pairs:
            continue
        result = qonnx.compare_with_reference(ir, model, pairs)
        report.setdefault("verification", {}).setdefault("onnx_vs_reference", {})[flavour] = result
        if within_tolerance(result):
            continue
        rows = qonnx.layer_diff(ir, model, pairs[0][0])
        first = next((r for r in rows if r["max_lsb_diff"] > 0), None)
        result["layers"] = rows
        where = (f"; first differing tensor {first['name']} ({first['identical_fraction']:.5f} identical, "
                 f"max {first['max_lsb_diff']} LSB)" if first else "")
        raise VerificationFailed(
            f"onnxruntime ({flavour}) disagrees with the integer reference: identical "
            f"{result['identical_fraction']:.5f}, max {result['max_lsb_diff']} LSB, top-1 agreement "
            f"{result['top1_agreement']:.4f}{where}; per-layer diff in report.json")


def build_tvm_artifacts(args: argparse.Namespace, ir: IRGraph, out: Path, report: dict[str, Any],
                        pairs: ReferencePairs) -> None:
    """OUT/tvm/<target>/ per --target, each run with qcompile.backends.tvm.runtime and checked against the
    reference where this machine can run it (a CUDA artifact: where the driver reports a GPU)."""
    if "tvm" not in (args.backends or []):
        return
    if importlib.util.find_spec("tvm") is None:
        raise QCompileError("--backend tvm needs the tvm extra: pip install 'qcompile[tvm]'")
    from qcompile.backends.tvm import runtime
    from qcompile.backends.tvm.build import build
    from qcompile.backends.tvm.targets import get_target, host_cpu_target
    from qcompile.ir.agreement import compare_backend

    for name in dict.fromkeys(args.targets or [host_cpu_target()]):
        artifact = build(ir, name, out, batch=args.tvm_batch)
        report.setdefault("artifacts", {})[f"tvm_{name}"] = str(artifact.path)
        spec = get_target(name)
        if not spec.host_can_run():
            why = (f"no NVIDIA GPU on this machine (check it on one: python benchmarks/tvm_agreement.py OUT/ir "
                   f"OUT/tvm/{name} --data DATA)" if spec.is_cuda else f"this CPU lacks {', '.join(spec.cpu_flags)}")
            report["warnings"].append(f"TVM {name} artifact not verified: {why}")
            continue
        if not pairs:
            continue
        model = runtime.load(artifact.path)
        result = compare_backend(ir, lambda x: model(x)[0], pairs)
        report.setdefault("verification", {})[f"tvm_{name.replace('-', '_')}_vs_reference"] = result
        if not within_tolerance(result):
            raise VerificationFailed(
                f"TVM ({name}) disagrees with the integer reference: identical {result['identical_fraction']:.5f}, "
                f"max {result['max_lsb_diff']} LSB, top-1 agreement {result['top1_agreement']:.4f}")


def write_integer_artifacts(args: argparse.Namespace, gm: fx.GraphModule, ir: IRGraph, out: Path,
                            report: dict[str, Any], checked: LabelledBatches) -> None:
    """OUT/ir and the backends' artifacts, written under ``out`` (the run's staging folder) and each verified on
    the first ``--verify-size`` images."""
    ir.metadata.update(model=str(args.model), qcompile_version=report["qcompile_version"])
    report["artifacts"] = {"ir": str(save_ir(ir, out / "ir"))}
    # the reference interpreter runs once: the fake-quant comparison keeps its logits for the backends
    verification = (verify_reference(gm, ir, take_images(checked, args.verify_size))
                    if args.verify_size and checked else None)
    pairs = verification.reference_outputs if verification is not None else []
    build_onnx_artifacts(args, ir, out, report, pairs)
    build_tvm_artifacts(args, ir, out, report, pairs)
    if verification is None:
        return
    summary = verification.summary()
    report.setdefault("verification", {})["reference_vs_fakequant"] = summary
    if not within_tolerance(summary):
        report["warnings"].append(
            f"integer reference disagrees with the fake-quant model: top-1 agreement "
            f"{summary['top1_agreement']:.4f}, identical {summary['identical_fraction']:.5f}, "
            f"max difference {summary['max_lsb_diff']} LSB")


def seal_report(report: dict[str, Any], staging: Path, out: Path) -> dict[str, Any]:
    """The report as it reads once the run is in ``out``: artifact paths under ``out``, not under the staging
    folder they were written to, and the size and sha256 of every file of the run, so that a folder can be
    checked to hold exactly the run its report describes."""
    sealed = dict(report, files=file_digests(staging))
    if "artifacts" in report:
        sealed["artifacts"] = {k: str(out / Path(v).relative_to(staging)) for k, v in report["artifacts"].items()}
    return sealed


def keep_failed_run(exc: VerificationFailed, report: dict[str, Any], staging: Path, out: Path) -> QCompileError:
    """Move a run whose artifact failed verification beside --out, its report written; the error to raise."""
    kept = failed_path(out.resolve())
    write_json(staging / "report.json", seal_report(report, staging, kept))
    keep_failed(staging, out)
    return QCompileError(f"{exc}; run kept in {kept} (--out {out} unchanged)")
