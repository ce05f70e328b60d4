"""``qcompile MODEL.py --recipe NAME``: capture, run the recipe's passes, report costs, write artifacts."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from qcompile.artifacts import check_output_dir, failed_path, file_digests, keep_failed, output_transaction, write_json
from qcompile.data import default_normalization, iterate_batches, load_split, parse_normalization
from qcompile.reporting.evaluate import take_images, top1
from qcompile.errors import QCompileError
from qcompile.ir.graph import IRGraph
from qcompile.ir.serialize import save as save_ir
from qcompile.frontend.model_file import ModelFile, check_batches, load_model_file, load_weights, parse_model_args
from qcompile.pipeline import Pipeline
from qcompile.passes.adaquant import SCOPES
from qcompile.pipelines import compile_passes, uses_ptq
from qcompile.quantization.ptq import PTQ_MODES
from qcompile.quantization.recipes import RECIPES, get_recipe, load_overrides, parse_calibrator, parse_set
from qcompile.reporting.report import build_report, print_report
from qcompile.search.sensitivity import METRICS
from qcompile.reporting.verify import verify_reference


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qcompile",
        description="Quantize a PyTorch CNN: capture it with torch.fx, run a recipe's passes, report its costs.",
    )
    ap.add_argument("model", help="model file defining build_model(**kwargs) and example_input()")
    ap.add_argument("--recipe", default="mostly4bit", help=f"one of: {', '.join(RECIPES)} (default: mostly4bit)")
    ap.add_argument("--width", type=float, default=1.0, help="global filter multiplier c (re-initialises weights)")
    ap.add_argument("--weights", help="state dict to load (torch.load with weights_only=True)")
    ap.add_argument("--weights-key", metavar="KEY",
                    help="--weights: take checkpoint[KEY], e.g. model_ema (default: the state dict itself, or "
                         "the one under state_dict, model, model_state_dict or net)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATTERN=BITS",
                    help="per-layer override, e.g. 'layer1.*=8', 'fc=w8a8', 'conv1=bf16' (repeatable)")
    ap.add_argument("--overrides", help="TOML or JSON file of PATTERN = BITS overrides")
    ap.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword passed to build_model, e.g. stem=cifar (repeatable)")
    ap.add_argument("--leaf-module", dest="leaf_modules", action="append", default=[], metavar="NAME",
                    help="module path or class name to keep opaque when tracing (repeatable)")
    ap.add_argument("--dump-after", dest="dump_after", action="append", default=[], metavar="PASS",
                    help="print the graph after this pass ('all' for every pass; repeatable)")
    ap.add_argument("--data", help="CIFAR-style archive (.tar.gz) or ImageFolder directory with train/ and test/ "
                                   "splits; overrides the model file's calibration_data()/eval_data()")
    ap.add_argument("--normalize", metavar="cifar|imagenet|MEAN,STD",
                    help="--data: input normalisation, cifar, imagenet, or six numbers: three RGB means, then "
                         "three standard deviations, e.g. 0.5,0.5,0.5,0.25,0.25,0.25 (default: cifar for 32x32 "
                         "images, imagenet otherwise)")
    ap.add_argument("--calib-size", type=int, default=512, metavar="N", help="calibration images (default 512)")
    ap.add_argument("--calib-seed", type=int, default=0, metavar="S",
                    help="--data: which --calib-size training images calibrate (a seeded draw; default 0)")
    ap.add_argument("--eval-size", type=int, default=None, metavar="N", help="evaluation images (default: all)")
    ap.add_argument("--calibrator", help="activation calibrator for every layer: ema_max, max, percentile, mse "
                                         "(default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=256, help="batch size for --data (default 256)")
    ap.add_argument("--verify-size", type=int, default=2000, metavar="N",
                    help="images on which the integer reference is checked against the fake-quant model "
                         "(default 2000; 0 skips verification)")
    ap.add_argument("--backend", dest="backends", action="append", choices=["onnx", "tvm", "none"], default=None,
                    help="artifacts to build from the integer IR (default: onnx, when the onnx extra is installed); "
                         "onnx writes model.onnx (serving) and model.compact.onnx; tvm writes tvm/<target>/")
    ap.add_argument("--target", dest="targets", action="append", choices=["cpu", "sm80", "sm90", "cpu-generic"],
                    default=None, help="TVM target (repeatable; default cpu): cpu = x86-64 with AVX-512 VNNI, "
                                       "sm80 = A100, sm90 = H100, cpu-generic = x86-64 AVX2")
    ap.add_argument("--tvm-batch", type=int, metavar="N",
                    help="compile the TVM artifacts for batches of N images (default: any batch size; the loader "
                         "splits and pads). On an H100, ResNet-50 sm90 at batch 256 ran 2.5x faster built for 256")
    ap.add_argument("--dyadic", action="store_true",
                    help="integer-only requantization (int32 multiplier and shift) instead of float32 multipliers")
    ap.add_argument("--ptq", choices=PTQ_MODES, help="post-training pipeline (Hubara et al.): light = BN tuning "
                                                     "(+ mixed precision with --recipe auto); advanced = AdaQuant + "
                                                     "BN tuning + bias correction (+ mixed precision)")
    ap.add_argument("--budget", metavar="KIND=RATIO", help="--recipe auto: cost budget vs bf16, KIND linear, "
                                                           "quadratic or memory, e.g. linear=0.30")
    ap.add_argument("--max-degradation", type=float, metavar="LOSS",
                    help="--recipe auto: cheapest plan whose predicted degradation (in --sensitivity units) is at "
                         "most LOSS")
    ap.add_argument("--bits", default="4,8", metavar="B,B", help="--recipe auto: candidate widths (default 4,8; 2-8)")
    ap.add_argument("--sensitivity", choices=METRICS, default="kl",
                    help="--recipe auto: per-layer degradation measure, kl = KL divergence from the all-widest "
                         "network's outputs (default), loss = calibration cross-entropy change")
    ap.add_argument("--adaquant-iters", type=int, default=200, metavar="N",
                    help="AdaQuant Adam steps per layer or block (default 200)")
    ap.add_argument("--adaquant-scope", choices=SCOPES, default="layer",
                    help="--ptq advanced: match each layer's output to the float network (layer, Hubara et al.) "
                         "or each block's (block: the stem, every residual block, the head; BRECQ)")
    ap.add_argument("--out", help="output directory (default: qcompile-out/<model>-<recipe>)")
    ap.add_argument("--quiet", action="store_true", help="do not print the per-layer table")
    return ap


BatchList = list[tuple[torch.Tensor, torch.Tensor]]


def _image_size(example: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """The (H, W) --data images are resized to: the example input's, which must be one (N, 3, H, W) tensor."""
    shape = tuple(example[0].shape) if len(example) == 1 else ()
    if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in example)
        raise QCompileError(f"--data needs one (N, 3, H, W) example input to size the images; example_input() "
                            f"gives {shapes}")
    return shape[2], shape[3]


def resolve_data(
    args: argparse.Namespace, mf: ModelFile, example: tuple[torch.Tensor, ...] | None = None
) -> tuple[BatchList | None, BatchList | None]:
    """Calibration and evaluation batches from --data (train / test splits) or the model file's hooks.

    --data images are resized to the example input's size (``mf.example_input()`` when none is given).
    """
    if args.calib_size < 0 or (args.eval_size is not None and args.eval_size < 0):
        raise QCompileError("--calib-size and --eval-size must not be negative")
    if args.normalize is not None and not args.data:
        raise QCompileError("--normalize applies to --data")
    if args.data:
        asked = parse_normalization(args.normalize) if args.normalize is not None else None
        size = _image_size(example if example is not None else mf.example_input())
        train = load_split(args.data, "train", size).subset(args.calib_size, seed=args.calib_seed)
        test = load_split(args.data, "test", size).subset(args.eval_size)
        stats = asked or default_normalization(train, test)
        calib = list(iterate_batches(train, args.batch_size, stats=stats)) if args.calib_size else []
        # a fixed shuffle, so that the first --verify-size images of the (class-sorted) split mix the classes
        return calib, list(iterate_batches(test, args.batch_size, shuffle=True, stats=stats))
    calib_src, eval_src = mf.data("calibration_data"), mf.data("eval_data")
    calib = list(take_images(calib_src, args.calib_size)) if calib_src is not None else None
    return calib, (list(take_images(eval_src, args.eval_size)) if eval_src is not None else None)


ReferencePairs = list[tuple[np.ndarray, np.ndarray]]  # (inputs, reference logits) per batch


class VerificationFailed(QCompileError):
    """A backend's artifact disagrees with the integer reference. The run is not swapped into --out: it is kept
    beside it (``keep_failed``) with its report, for the diff to be read and the artifact to be run."""


def build_onnx_artifacts(args: argparse.Namespace, ir: IRGraph, out: Path, report: dict[str, Any],
                         pairs: ReferencePairs) -> None:
    """model.onnx (serving) and model.compact.onnx, each checked against the reference in onnxruntime."""
    wanted = args.backends or ["onnx"]
    if "onnx" not in wanted:
        return
    import importlib.util

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        if args.backends:
            raise QCompileError("--backend onnx needs the onnx extra: pip install 'qcompile[onnx]'")
        report["warnings"].append("ONNX artifacts skipped: the onnx extra is not installed (pip install 'qcompile[onnx]')")
        return
    if ir.metadata.get("requantize") == "dyadic":
        report["warnings"].append("ONNX artifacts skipped: dyadic requantization has no ONNX QDQ form")
        return
    from qcompile.backends import onnx as qonnx

    for flavour, name in (("serving", "model.onnx"), ("compact", "model.compact.onnx")):
        model = qonnx.to_onnx(ir, flavour)
        path = qonnx.save(model, out / name)
        report.setdefault("artifacts", {})[f"onnx_{flavour}"] = str(path)
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
    """OUT/tvm/<target>/ per --target; CPU artifacts are run with qcompile.backends.tvm.runtime and checked against the
    reference."""
    if "tvm" not in (args.backends or []):
        return
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        raise QCompileError("--backend tvm needs the tvm extra: pip install 'qcompile[tvm]'")
    from qcompile.backends.tvm import runtime
    from qcompile.backends.tvm.build import build
    from qcompile.backends.tvm.targets import get_target
    from qcompile.ir.agreement import compare_backend

    for name in dict.fromkeys(args.targets or ["cpu"]):
        artifact = build(ir, name, out, batch=args.tvm_batch)
        report.setdefault("artifacts", {})[f"tvm_{name}"] = str(artifact.path)
        spec = get_target(name)
        if spec.is_cuda:
            continue
        if not spec.host_can_run():
            report["warnings"].append(f"TVM {name} artifact not verified: this CPU lacks {', '.join(spec.cpu_flags)}")
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


def within_tolerance(result: dict[str, Any]) -> bool:
    """An artifact agrees with the reference: >= 99.9% identical final integers, max 1 LSB, top-1 >= 99.9%."""
    return result["identical_fraction"] >= 0.999 and result["max_lsb_diff"] <= 1 and result["top1_agreement"] >= 0.999


def write_integer_artifacts(args: argparse.Namespace, gm: fx.GraphModule, ir: IRGraph, out: Path,
                            report: dict[str, Any], checked: BatchList) -> None:
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


def output_dir(args: argparse.Namespace, recipe: str) -> Path:
    """--out, or qcompile-out/<model>-<recipe>[-<ptq>][-<budget>]."""
    if args.out:
        return Path(args.out)
    suffix = "".join(f"-{v}" for v in (args.ptq, args.budget) if v)
    return Path("qcompile-out") / f"{Path(args.model).stem}-{recipe}{suffix}"


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


def compile_model(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.recipe)
    if args.calibrator:
        recipe = replace(recipe, act_calibrator=parse_calibrator(args.calibrator, "--calibrator"))
    overrides = parse_set(args.sets) + (load_overrides(args.overrides) if args.overrides else [])
    if args.dyadic and "onnx" in (args.backends or []):
        raise QCompileError("--backend onnx cannot carry --dyadic requantization (ONNX QDQ has no such form)")
    if not math.isfinite(args.width) or args.width <= 0:
        raise QCompileError(f"--width must be a positive number, got {args.width}")
    if "tvm" not in (args.backends or []) and (args.targets or args.tvm_batch is not None):
        raise QCompileError("--target and --tvm-batch apply to --backend tvm")
    if args.tvm_batch is not None and args.tvm_batch < 1:
        raise QCompileError("--tvm-batch must be at least 1")
    if args.weights and args.width != 1.0:
        raise QCompileError(
            "--weights cannot be combined with --width other than 1: width_scale re-initialises every layer; "
            "pass the trained width to build_model instead (--model-arg width=C)"
        )
    if args.weights_key is not None and not args.weights:
        raise QCompileError("--weights-key applies to --weights")
    out = output_dir(args, recipe.name)
    check_output_dir(out)
    mf = load_model_file(args.model)
    model = mf.build(**parse_model_args(args.model_args))
    if args.weights:
        load_weights(model, args.weights, key=args.weights_key)
    model.eval()
    inputs = mf.example_input()
    calib, evald = resolve_data(args, mf, inputs)
    check_batches(inputs, calib, "calibration")
    check_batches(inputs, evald, "evaluation")
    passes = compile_passes(recipe, width=args.width, ptq_mode=args.ptq, budget=args.budget,
                            max_degradation=args.max_degradation, bits=args.bits,
                            adaquant_iterations=args.adaquant_iters, adaquant_scope=args.adaquant_scope,
                            metric=args.sensitivity, dyadic=args.dyadic, has_calibration=calib is not None)
    notes = []
    ptq = uses_ptq(recipe, ptq_mode=args.ptq, budget=args.budget, max_degradation=args.max_degradation,
                   adaquant_scope=args.adaquant_scope)
    if not ptq and recipe.quantized and calib is None:
        notes.append("no calibration data (define calibration_data() in the model file or pass --data): "
                     "costs only, no calibration or accuracy")
    pipeline = Pipeline(passes, dump_after=args.dump_after)
    with torch.no_grad():
        result = pipeline.run(model, inputs, leaf_modules=args.leaf_modules, recipe=recipe, overrides=overrides,
                              width=args.width, calibration_data=calib)
    report = build_report(result.graph_module, result.context, model=str(args.model))
    report["warnings"] += notes
    if ptq:
        report["ptq"] = {"mode": args.ptq or "plain", **result.context.results}
    with output_transaction(out) as staging:  # out keeps the previous complete run until the swap at the end
        if result.context.ir is not None:
            checked = evald if evald is not None else calib
            try:
                write_integer_artifacts(args, result.graph_module, result.context.ir, staging, report, checked or [])
            except VerificationFailed as exc:
                raise keep_failed_run(exc, report, staging, out) from None
        if evald is not None and (not recipe.quantized or calib is not None):
            float_top1, n = top1(model, evald, desc="eval float")
            quant_top1 = (top1(result.graph_module, evald, desc="eval quantized")[0] if recipe.quantized
                          else float_top1)
            report["accuracy"] = {"float_top1": float_top1, "quant_top1": quant_top1, "n": n,
                                  "calibration_images": result.context.calibration_images}
            ref = report.get("verification", {}).get("reference_vs_fakequant")
            if ref is not None and evald is not None:
                report["accuracy"].update(reference_top1=ref["reference_top1"], reference_n=ref["images"])
        report = seal_report(report, staging, out)
        write_json(staging / "report.json", report)
    if not args.quiet:
        print_report(report)
    print(f"wrote {out / 'report.json'}")
    return 0


def _one_line_warning(message: Warning | str, *_: object, **__: object) -> None:
    text = str(message).strip()
    print(f"qcompile: warning: {text.splitlines()[0] if text else type(message).__name__}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qcompile`` console script; user errors are one line and exit status 2, warnings
    (a cache entry recomputed, a degenerate range) one line each."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] in ("train", "sweep"):  # subcommands; anything else is a model file
            from qcompile.train.cli import run_subcommand

            return run_subcommand(argv)
        return compile_model(build_parser().parse_args(argv))
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error of the compile
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
