"""``qcompile train MODEL.py`` and ``qcompile sweep MODEL.py``: quantization-aware training of one model, and
the width × recipe Pareto sweep. Run under ``torchrun --nproc_per_node N -m qcompile ...`` for data parallelism."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompile.cli.arguments import build_train_parser, check_train_args, parse_widths
from qcompile.cli.compile import data_splits
from qcompile.frontend.model_file import check_labels, load_model_file, load_weights, logit_count, parse_model_args
from qcompile.quantization.latency import LatencyProfile
from qcompile.quantization.recipes import get_recipe, parse_set
from qcompile.train.distributed import init_from_env
from qcompile.train.run import RunSpec, Splits, train_and_lower
from qcompile.train.sweep import Pair, run_sweep
from qcompile.train.trainer import TrainConfig


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, observe_fraction=args.observe_fraction, seed=args.seed,
                       progress=not args.quiet, compile=args.compile)


def _splits(args: argparse.Namespace, device: Any, model: nn.Module, example: tuple[torch.Tensor, ...]) -> Splits:
    """The --data splits at the example input's size and normalised as ``qcompile MODEL.py`` reads them (the trained
    model is lowered and verified on them), whose labels must index the model's logits."""
    train, test, stats = data_splits(args, example, args.train_size, args.eval_size)
    count = logit_count(model, example)
    if count is not None:
        check_labels(count, torch.from_numpy(np.concatenate([train.labels, test.labels])), "training", train.classes)
    return Splits.from_imagesets(train, test, device, args.train_eval_size, stats)


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
    args = build_train_parser(command).parse_args(rest)
    check_train_args(command, args)
    cfg = _config(args)
    mf = load_model_file(args.model)
    model_args = parse_model_args(args.model_args)
    stem = Path(args.model).stem
    if command == "train":
        recipe = get_recipe(args.recipe)
        dist = init_from_env(args.device)
        model = mf.build(**model_args)
        for note in load_weights(model, args.weights) if args.weights else []:
            print(f"warning: {note}")
        example = mf.example_input()
        splits = _splits(args, dist.device, model, example)
        spec = RunSpec(model, example, recipe, args.width, parse_set(args.sets, "--set"),
                       args.leaf_modules)
        out = Path(args.out) if args.out else Path("qcompile-out") / f"train-{stem}-{recipe.name}"
        row = train_and_lower(spec, splits, cfg, dist, out, args.verify_size)
        if row is not None:
            print(_summary(row))
            print(f"wrote {out / 'result.json'}")
        return 0
    widths = parse_widths(args.widths)
    recipes = [get_recipe(r.strip()) for r in args.recipes.split(",") if r.strip()]
    pairs = [Pair(w, r.name) for w in widths for r in recipes]
    dist = init_from_env(args.device)
    splits = _splits(args, dist.device, mf.build(**model_args), mf.example_input())
    out = Path(args.out) if args.out else Path("qcompile-out") / f"sweep-{stem}"

    def make_spec(pair: Pair) -> RunSpec:
        return RunSpec(mf.build(**model_args), mf.example_input(), get_recipe(pair.recipe), pair.width,
                       leaf_modules=args.leaf_modules)

    def report(pair: Pair, row: dict[str, Any], reused: bool) -> None:
        print(("(done before) " if reused else "") + _summary(row), flush=True)

    profile = LatencyProfile.load(args.cost_model.removeprefix("measured:")) if args.cost_model else None
    run_sweep(pairs, make_spec, splits, cfg, out, dist, args.verify_size, title=stem, on_pair=report,
              profile=profile)
    if dist.is_main:
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'} and plots in {out}")
    return 0
