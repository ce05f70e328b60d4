"""``qcompile MODEL.py --recipe NAME``: capture, run the recipe's passes, report costs, write artifacts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qcompile.artifacts import write_json
from qcompile.errors import QCompileError
from qcompile.model_file import load_model_file, load_weights, parse_model_args
from qcompile.pipeline import Pass, Pipeline
from qcompile.passes import AnnotateCost, AssignPrecision, FoldBatchNorm, WidthScale
from qcompile.recipes import RECIPES, get_recipe, load_overrides, parse_set
from qcompile.report import build_report, print_report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qcompile",
        description="Quantize a PyTorch CNN: capture it with torch.fx, run a recipe's passes, report its costs.",
    )
    ap.add_argument("model", help="model file defining build_model(**kwargs) and example_input()")
    ap.add_argument("--recipe", default="mostly4bit", help=f"one of: {', '.join(RECIPES)} (default: mostly4bit)")
    ap.add_argument("--width", type=float, default=1.0, help="global filter multiplier c (re-initialises weights)")
    ap.add_argument("--weights", help="state dict to load (torch.load with weights_only=True)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATTERN=BITS",
                    help="per-layer override, e.g. 'layer1.*=8', 'fc=w8a8', 'conv1=bf16' (repeatable)")
    ap.add_argument("--overrides", help="TOML or JSON file of PATTERN = BITS overrides")
    ap.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword passed to build_model, e.g. stem=cifar (repeatable)")
    ap.add_argument("--leaf-module", dest="leaf_modules", action="append", default=[], metavar="NAME",
                    help="module path or class name to keep opaque when tracing (repeatable)")
    ap.add_argument("--dump-after", dest="dump_after", action="append", default=[], metavar="PASS",
                    help="print the graph after this pass ('all' for every pass; repeatable)")
    ap.add_argument("--out", help="output directory (default: qcompile-out/<model>-<recipe>)")
    ap.add_argument("--quiet", action="store_true", help="do not print the per-layer table")
    return ap


def compile_model(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.recipe)
    overrides = parse_set(args.sets) + (load_overrides(args.overrides) if args.overrides else [])
    if args.width <= 0:
        raise QCompileError(f"--width must be positive, got {args.width}")
    if args.weights and args.width != 1.0:
        raise QCompileError(
            "--weights cannot be combined with --width other than 1: width_scale re-initialises every layer; "
            "pass the trained width to build_model instead (--model-arg width=C)"
        )
    mf = load_model_file(args.model)
    model = mf.build(**parse_model_args(args.model_args))
    if args.weights:
        load_weights(model, args.weights)
    model.eval()
    inputs = mf.example_input()
    passes: list[Pass] = [WidthScale(args.width)] if args.width != 1.0 else []
    passes += [FoldBatchNorm(), AssignPrecision(), AnnotateCost()]
    pipeline = Pipeline(passes, dump_after=args.dump_after)
    with torch.no_grad():
        result = pipeline.run(model, inputs, leaf_modules=args.leaf_modules, recipe=recipe, overrides=overrides,
                              width=args.width)
    report = build_report(result.graph_module, result.context, model=str(args.model))
    out = Path(args.out) if args.out else Path("qcompile-out") / f"{Path(args.model).stem}-{recipe.name}"
    write_json(out / "report.json", report)
    if not args.quiet:
        print_report(report)
    print(f"wrote {out / 'report.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qcompile`` console script; user errors are one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return compile_model(args)
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
