"""``qcompile train MODEL.py`` and ``qcompile sweep MODEL.py``: quantization-aware training of one model, and
the width × recipe Pareto sweep. Run under ``torchrun --nproc_per_node N -m qcompile ...`` for data parallelism."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qcompile.data import load_split
from qcompile.errors import QCompileError
from qcompile.frontend.model_file import load_model_file, load_weights, parse_model_args
from qcompile.quantization.recipes import RECIPES, get_recipe, parse_set
from qcompile.train.distributed import init_from_env
from qcompile.train.run import RunSpec, Splits, train_and_lower
from qcompile.train.sweep import Pair, run_sweep
from qcompile.train.trainer import TrainConfig


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="model file defining build_model(**kwargs) and example_input()")
    ap.add_argument("--data", required=True, help="CIFAR-style archive (.tar.gz) or ImageFolder directory with "
                                                  "train/ and test/ splits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the cosine schedule (default 0.1)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--observe-fraction", type=float, default=0.2, metavar="F",
                    help="fraction of steps during which activation bounds are observed (EMA of max|x|) before "
                         "they are frozen and quantization switches on (default 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--train-size", type=int, default=None, metavar="N", help="training images (default: all)")
    ap.add_argument("--eval-size", type=int, default=None, metavar="N", help="evaluation images (default: all)")
    ap.add_argument("--train-eval-size", type=int, default=10_000, metavar="N",
                    help="training images on which the train loss is measured (default 10000)")
    ap.add_argument("--verify-size", type=int, default=200, metavar="N",
                    help="images on which the integer reference is run against the lowered model (default 200)")
    ap.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--leaf-module", dest="leaf_modules", action="append", default=[], metavar="NAME")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "train":
        ap = argparse.ArgumentParser(prog="qcompile train", description="Quantization-aware training of one model; "
                                     "the result is lowered to the integer IR and evaluated.")
        _common(ap)
        ap.add_argument("--recipe", default="mostly4bit", help=f"one of: {', '.join(RECIPES)} (default: mostly4bit)")
        ap.add_argument("--width", type=float, default=None,
                        help="global filter multiplier (re-initialises the weights; default: the model as built)")
        ap.add_argument("--weights", help="state dict to start from (fine-tuning)")
        ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATTERN=BITS")
        return ap
    ap = argparse.ArgumentParser(prog="qcompile sweep", description="Train every (width, recipe) pair from scratch "
                                 "and plot accuracy against cost; resumable.")
    _common(ap)
    ap.add_argument("--widths", default="0.5,0.75,1.0,1.5,2.0", help="comma-separated width multipliers")
    ap.add_argument("--recipes", default="bf16,int8,mostly4bit,int4", help="comma-separated recipes")
    return ap


def _config(args: argparse.Namespace) -> TrainConfig:
    if args.epochs < 1 or args.batch_size < 1:
        raise QCompileError("--epochs and --batch-size must be at least 1")
    if not 0 < args.observe_fraction <= 1:
        raise QCompileError(f"--observe-fraction must be in (0, 1], got {args.observe_fraction}")
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, observe_fraction=args.observe_fraction, seed=args.seed,
                       progress=not args.quiet, compile=args.compile)


def _splits(args: argparse.Namespace, device: Any) -> Splits:
    train = load_split(args.data, "train").subset(args.train_size)
    test = load_split(args.data, "test").subset(args.eval_size)
    return Splits.from_imagesets(train, test, device, args.train_eval_size)


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QCompileError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.5,1.0,2.0") from None
    if not values or any(v <= 0 for v in values):
        raise QCompileError(f"{flag} {text!r}: widths must be positive")
    return values


def _summary(row: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    return (f"width {row['width']:g} {row['recipe']}: top-1 float {pct(row['float_top1'])}, integer "
            f"{pct(row['int_top1'])} (reference {pct(row['reference_top1'])} on {row['reference_images']}), "
            f"linear cost {row['linear_cost']:.4g}, train loss {row['train_loss']:.4f}, eval loss "
            f"{row['eval_loss']:.4f}, {row['train_seconds']:.0f}s training")


def run_subcommand(argv: list[str]) -> int:
    """Dispatch ``train`` / ``sweep`` (argv[0])."""
    command, rest = argv[0], argv[1:]
    args = build_parser(command).parse_args(rest)
    cfg = _config(args)
    mf = load_model_file(args.model)
    model_args = parse_model_args(args.model_args)
    stem = Path(args.model).stem
    if command == "train":
        recipe = get_recipe(args.recipe)
        if args.width is not None and args.weights:
            raise QCompileError("--weights cannot be combined with --width: width_scale re-initialises every layer")
        dist = init_from_env(args.device)
        splits = _splits(args, dist.device)
        model = mf.build(**model_args)
        if args.weights:
            load_weights(model, args.weights)
        spec = RunSpec(model, mf.example_input(), recipe, args.width, parse_set(args.sets), args.leaf_modules)
        out = Path(args.out) if args.out else Path("qcompile-out") / f"train-{stem}-{recipe.name}"
        row = train_and_lower(spec, splits, cfg, dist, out, args.verify_size)
        if row is not None:
            print(_summary(row))
            print(f"wrote {out / 'result.json'}")
        return 0
    widths = _floats(args.widths, "--widths")
    recipes = [get_recipe(r.strip()) for r in args.recipes.split(",") if r.strip()]
    pairs = [Pair(w, r.name) for w in widths for r in recipes]
    dist = init_from_env(args.device)
    splits = _splits(args, dist.device)
    out = Path(args.out) if args.out else Path("qcompile-out") / f"sweep-{stem}"

    def make_spec(pair: Pair) -> RunSpec:
        return RunSpec(mf.build(**model_args), mf.example_input(), get_recipe(pair.recipe), pair.width,
                       leaf_modules=args.leaf_modules)

    def report(pair: Pair, row: dict[str, Any], reused: bool) -> None:
        print(("(done before) " if reused else "") + _summary(row), flush=True)

    run_sweep(pairs, make_spec, splits, cfg, out, dist, args.verify_size, title=stem, on_pair=report)
    if dist.is_main:
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'} and plots in {out}")
    return 0
