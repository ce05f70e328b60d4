"""``qcompile MODEL.py --recipe NAME``: capture, run the recipe's passes, report costs, write artifacts and
measure accuracy."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qcompile.artifacts import check_output_dir, output_transaction, write_json
from qcompile.cli.arguments import check_compile_args
from qcompile.cli.artifacts import LabelledBatches, VerificationFailed, keep_failed_run, seal_report, write_integer_artifacts
from qcompile.cli.measure import float_reference, measure_onnx, measure_tvm
from qcompile.data import (
    Batches,
    ImageSet,
    Stats,
    default_normalization,
    iterate_batches,
    load_train_test,
    parse_normalization,
)
from qcompile.errors import QCompileError
from qcompile.frontend.model_file import (
    ModelFile,
    check_batches,
    hook_batches,
    load_model_file,
    load_weights,
    parse_model_args,
)
from qcompile.pipeline import Pipeline, PipelineResult
from qcompile.pipelines import compile_passes, uses_ptq
from qcompile.quantization.latency import LatencyProfile
from qcompile.quantization.recipes import Recipe, get_recipe, load_overrides, parse_calibrator, parse_set
from qcompile.reporting.evaluate import take_images, top1
from qcompile.reporting.html import render_html
from qcompile.reporting.report import build_report, print_report


def _image_size(example: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """The (H, W) --data images are resized to: the example input's, which must be one (N, 3, H, W) tensor."""
    shape = tuple(example[0].shape) if len(example) == 1 else ()
    if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in example)
        raise QCompileError(f"--data needs one (N, 3, H, W) example input to size the images; example_input() "
                            f"gives {shapes}")
    return shape[2], shape[3]


def data_splits(args: argparse.Namespace, example: tuple[torch.Tensor, ...], train_size: int | None,
                test_size: int | None, train_seed: int = 0) -> tuple[ImageSet, ImageSet, Stats]:
    """--data's train and test splits (``train_size`` and ``test_size`` images) at the example input's size, and
    their normalisation: --normalize's, parsed before any image is decoded, else the images' default."""
    asked = parse_normalization(args.normalize) if args.normalize is not None else None
    train, test = load_train_test(args.data, _image_size(example), train_size, test_size, train_seed)
    return train, test, asked or default_normalization(train, test)


def resolve_data(
    args: argparse.Namespace, mf: ModelFile, example: tuple[torch.Tensor, ...] | None = None
) -> tuple[LabelledBatches | None, LabelledBatches | None]:
    """Calibration and evaluation batches from --data (train / test splits) or the model file's hooks.

    --data images are resized to the example input's size (``mf.example_input()`` when none is given).
    """
    if args.data:
        train, test, stats = data_splits(args, example if example is not None else mf.example_input(),
                                         args.calib_size, args.eval_size, args.calib_seed)
        calib = list(iterate_batches(train, args.batch_size, stats=stats)) if args.calib_size else []
        # a fixed shuffle, so that the first --verify-size images of the (class-sorted) split mix the classes
        return calib, Batches(test, args.batch_size, shuffle=True, stats=stats)
    calib_src, eval_src = mf.data("calibration_data"), mf.data("eval_data")
    calib = list(take_images(hook_batches(_drawn(calib_src, args.calib_size, args.calib_seed), "calibration_data",
                                          labelled=False), args.calib_size)) if calib_src is not None else None
    return calib, (list(take_images(hook_batches(_drawn(eval_src, args.eval_size, 0), "eval_data", labelled=True),
                                    args.eval_size)) if eval_src is not None else None)


def _drawn(batches: Any, n: int | None, seed: int) -> Any:
    """A data hook's batches, of which the CLI takes the first ``n`` images; where the hook returns qcompile's
    :class:`Batches` over more than ``n`` images, a seeded class-mixed draw of ``n`` of them instead, as --data
    draws: image sets are often stored by class, and their first images are then one or two classes."""
    if not isinstance(batches, Batches) or n is None or n >= len(batches.data):
        return batches
    return Batches(batches.data.subset(n, seed), batches.batch_size, batches.shuffle, batches.seed, batches.stats)


def output_dir(args: argparse.Namespace, recipe: str) -> Path:
    """--out, or qcompile-out/<model>-<recipe>[-<ptq>][-<budget>]."""
    if args.out:
        return Path(args.out)
    suffix = "".join(f"-{v}" for v in (args.ptq, args.budget) if v)
    return Path("qcompile-out") / f"{Path(args.model).stem}-{recipe}{suffix}"


def _accuracy(model: torch.nn.Module, result: PipelineResult, recipe: Recipe, evald: LabelledBatches,
              report: dict[str, Any]) -> dict[str, Any]:
    """Top-1 of the float and the fake-quant model on the evaluation batches, with the integer reference's where
    it was verified."""
    float_top1, n = top1(model, evald, desc="eval float")
    quant_top1 = top1(result.graph_module, evald, desc="eval quantized")[0] if recipe.quantized else float_top1
    accuracy = {"float_top1": float_top1, "quant_top1": quant_top1, "n": n,
                "calibration_images": result.context.calibration_images}
    ref = report.get("verification", {}).get("reference_vs_fakequant")
    if ref is not None:
        accuracy.update(reference_top1=ref["reference_top1"], reference_n=ref["images"])
    return accuracy


def compile_model(args: argparse.Namespace) -> int:
    """Run ``qcompile MODEL.py``: contradictory flags and an unusable ``--out`` are refused before the model is
    loaded, and ``--out`` is replaced only by a complete, verified run."""
    recipe = get_recipe(args.recipe)
    if args.calibrator:
        recipe = replace(recipe, act_calibrator=parse_calibrator(args.calibrator, "--calibrator"))
    overrides = parse_set(args.sets, "--set") + (load_overrides(args.overrides) if args.overrides else [])
    check_compile_args(args)
    out = output_dir(args, recipe.name)
    check_output_dir(out)
    profile = LatencyProfile.load(args.cost_model.removeprefix("measured:")) if args.cost_model else None
    mf = load_model_file(args.model)
    model = mf.build(**parse_model_args(args.model_args))
    notes = load_weights(model, args.weights, key=args.weights_key) if args.weights else []
    model.eval()
    inputs = mf.example_input()
    calib, evald = resolve_data(args, mf, inputs)
    check_batches(model, inputs, calib, "calibration")
    check_batches(model, inputs, evald, "evaluation")
    passes = compile_passes(recipe, width=args.width, ptq_mode=args.ptq, budget=args.budget,
                            max_degradation=args.max_degradation, bits=args.bits,
                            adaquant_iterations=args.adaquant_iters, adaquant_scope=args.adaquant_scope,
                            metric=args.sensitivity, dyadic=args.dyadic, has_calibration=calib is not None,
                            profile=profile)
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
            serving = report["artifacts"].get("onnx_serving")
            verified = report.get("verification", {})
            tvm_cpu = next((report["artifacts"][f"tvm_{t}"] for t in ("cpu", "cpu-generic")
                            if f"tvm_{t.replace('-', '_')}_vs_reference" in verified), None)
            if args.measure and (serving or tvm_cpu):
                reference = float_reference(model, inputs, args)
                if serving:
                    report["measured"] = measure_onnx(args, reference, inputs, result.context.ir, serving)
                if tvm_cpu:
                    report["measured_tvm"] = measure_tvm(args, reference, inputs, result.context.ir, tvm_cpu)
                report["warnings"] += [reference[1]] if reference[1] else []
        if evald is not None and (not recipe.quantized or calib is not None):
            report["accuracy"] = _accuracy(model, result, recipe, evald, report)
        (staging / "report.html").write_text(render_html(report))
        report = seal_report(report, staging, out)
        write_json(staging / "report.json", report)
    if not args.quiet:
        print_report(report)
    print(f"wrote {out / 'report.json'}")
    return 0
