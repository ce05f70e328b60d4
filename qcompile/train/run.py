"""One training run end to end: build, prepare for QAT, train, evaluate the trained model, lower it to the
integer IR and evaluate that too. Shared by ``qcompile train`` and each pair of ``qcompile sweep``."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompile.artifacts import write_json
from qcompile.data import CIFAR_MEAN, CIFAR_STD, ImageSet, Stats
from qcompile.frontend.tracing import LeafSpec
from qcompile.ir.serialize import save as save_ir
from qcompile.quantization.recipes import Override, Recipe
from qcompile.reporting.evaluate import take_images
from qcompile.reporting.verify import verify_reference
from qcompile.train.data import DeviceData
from qcompile.train.distributed import DistContext
from qcompile.train.qat import QATModel, lower_trained, prepare_qat, qat_recipe
from qcompile.train.trainer import TrainConfig, evaluate, train


@dataclass
class Splits:
    """Training images, evaluation images, and a fixed train subset on which the train loss is measured."""

    train: DeviceData
    eval: DeviceData
    train_eval: DeviceData

    @classmethod
    def from_imagesets(cls, train: ImageSet, test: ImageSet, device: torch.device,
                       train_eval_size: int | None = 10_000, stats: Stats = (CIFAR_MEAN, CIFAR_STD)) -> Splits:
        dev_train = DeviceData.from_imageset(train, device, stats)
        order = np.random.default_rng(0).permutation(len(test))  # splits are class-sorted: mix the classes so
        dev_eval = DeviceData.from_imageset(  # the first --verify-size images are a fair sample
            ImageSet(test.images[order], test.labels[order], test.classes), device, stats)
        sub = train.subset(train_eval_size, seed=1)
        dev_sub = dev_train if len(sub) == len(train) else DeviceData.from_imageset(sub, device, stats)
        return cls(dev_train, dev_eval, dev_sub)


@dataclass
class RunSpec:
    """What to train: a model at a width (None: as built, weights kept) under a recipe."""

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    recipe: Recipe
    width: float | None = None
    overrides: list[Override] = field(default_factory=list)
    leaf_modules: list[LeafSpec] = field(default_factory=list)


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The hyper-parameters a result depends on, recorded with it so that a sweep never reuses a pair trained
    differently."""
    settings: dict[str, Any] = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                                "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "seed": cfg.seed}
    # recorded only where used, so that rows trained before these options existed still match
    settings.update({k: v for k, v in (("label_smoothing", cfg.label_smoothing), ("cutout", cfg.cutout)) if v})
    return settings


def prepare_run(spec: RunSpec, cfg: TrainConfig) -> QATModel:
    """The trainable graph of ``spec``, seeded by ``cfg`` (width_scale re-initialises the weights: same seed,
    same start), so that a run trained in one process can be lowered from its checkpoint in another."""
    torch.manual_seed(cfg.seed)
    return prepare_qat(spec.model, spec.example_inputs, qat_recipe(spec.recipe) if spec.recipe.quantized
                       else spec.recipe, spec.width, spec.overrides, spec.leaf_modules)


def train_and_lower(spec: RunSpec, splits: Splits, cfg: TrainConfig, dist: DistContext,
                    out: Path | None = None, verify_size: int = 500) -> dict[str, Any] | None:
    """Train and lower one model; the main process returns the result row (others None). With ``out``, the
    checkpoint lives there and the main process writes ``out/ir`` and ``out/result.json``. A checkpoint that
    finished training (trained elsewhere, say on a GPU) is only evaluated and lowered."""
    qm = prepare_run(spec, cfg)
    if out is not None:
        cfg = copy.copy(cfg)
        cfg.checkpoint = out / "checkpoint.pt"
    result = train(qm.graph, splits.train, cfg, dist)
    if not dist.is_main:
        dist.barrier()
        return None
    float_top1, eval_loss, n_eval = evaluate(qm.graph, splits.eval.eval_batches())
    train_top1, train_loss, _ = evaluate(qm.graph, splits.train_eval.eval_batches())
    qm.graph.cpu()
    gm, ctx = lower_trained(qm)
    assert ctx.cost is not None
    row: dict[str, Any] = {
        "width": ctx.width, "recipe": spec.recipe.name, "params": ctx.cost.params, "macs": ctx.cost.macs,
        "linear_cost": ctx.cost.vs_bf16("linear", width1=True),
        "quadratic_cost": ctx.cost.vs_bf16("quadratic", width1=True),
        "memory_cost": ctx.cost.vs_bf16("memory", width1=True),
        "float_top1": float_top1, "int_top1": None, "top1": float_top1,
        "train_loss": train_loss, "eval_loss": eval_loss, "generalization_gap": eval_loss - train_loss,
        "train_top1": train_top1, **training_settings(cfg), "train_images": len(splits.train),
        "eval_images": n_eval, "train_seconds": result.seconds, "processes": dist.world,
        "reference_top1": None, "reference_agreement": None, "reference_images": 0,
    }
    if ctx.ir is not None:
        int_top1, _, _ = evaluate(copy.deepcopy(gm).to(dist.device), splits.eval.eval_batches())
        row.update(int_top1=int_top1, top1=int_top1)
        if verify_size:
            checked = take_images(((x.cpu(), y.cpu()) for x, y in splits.eval.eval_batches(250)), verify_size)
            v = verify_reference(gm, ctx.ir, checked)
            row.update(reference_top1=v.reference_top1, reference_agreement=v.top1_agreement,
                       reference_images=v.images)
        if out is not None:
            save_ir(ctx.ir, out / "ir")
    if out is not None:
        write_json(out / "result.json", row)
    dist.barrier()
    return row
