"""Per-layer sensitivity to quantization: how much the network's outputs degrade when only that layer is lowered.

Two measures of degradation on the calibration set:

- ``kl`` (default): the mean KL divergence of the plan's softmax outputs from the reference network's. It needs
  no labels and is never negative, so a harmless layer reads as ~0 rather than as the label noise of a few
  hundred images (on the ResNet-20 checkpoint, whose training images it fits, the ``loss`` entries of half the
  4-bit layers were within +-0.002 of 0, several below it);
- ``loss``: the change of the mean cross-entropy against the labels (Hubara et al.'s measure).

The reference network has every layer at the widest candidate (8 bits for ``--bits 4,8``), so a layer's entry
at width b is the degradation of the plan "this layer at b, every other layer as wide as the search allows":
the quantization of the neighbours and of the residuals, which every plan has, is already in the reference
rather than counted again in each layer's entry. The widest candidate's entries are 0 by definition. In the
advanced pipeline the lowered layer is AdaQuant-optimised before it is measured.

Measuring costs one calibration run per layer and narrower candidate, so the table is cached on disk under
``$QCOMPILE_CACHE/sensitivity``, keyed by the captured graph's code, its weights, the calibration set, the
candidate precisions, the calibrator, the measure and the AdaQuant iterations: a re-run with another budget
reads it back instead of re-measuring.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm import tqdm

from qcompile.artifacts import write_json
from qcompile.data import cache_dir
from qcompile.errors import RecipeError
from qcompile.pipeline import BN_FOLDED, Pass, PassContext, Pipeline
from qcompile.recipes import Override
from qcompile.spec import Precision

CACHE_VERSION = 5  # 2: residuals after the ReLU, aligned add scales; 3: widest-candidate reference; 4: metrics;
# 5: AdaQuant scope
METRICS = ("kl", "loss")


@torch.no_grad()
def outputs(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The model's logits per calibration batch (eval mode)."""
    was_training = model.training
    model.eval()
    out = [model(x) for x, _ in batches]
    model.train(was_training)
    return out


def calibration_loss(logits: Sequence[torch.Tensor], batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy of the logits against the batches' labels."""
    total = sum(float(F.cross_entropy(z, y, reduction="sum")) for z, (_, y) in zip(logits, batches))
    return total / sum(len(y) for _, y in batches)


def mean_kl(reference: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> float:
    """Mean over images of KL(softmax(reference) || softmax(logits))."""
    total = sum(float(F.kl_div(F.log_softmax(z, 1), F.log_softmax(r, 1), reduction="sum", log_target=True))
                for r, z in zip(reference, logits))
    return total / sum(len(r) for r in reference)


def check_metric(metric: str) -> None:
    """A one-line error for a measure that is not one of METRICS."""
    if metric not in METRICS:
        raise RecipeError(f"unknown sensitivity metric {metric!r}; choose one of: {', '.join(METRICS)}")


def degradation(metric: str, reference: Sequence[torch.Tensor], logits: Sequence[torch.Tensor],
                batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """How much worse ``logits`` are than the reference network's, by ``metric``."""
    if metric == "kl":
        return mean_kl(reference, logits)
    return calibration_loss(logits, batches) - calibration_loss(reference, batches)


def cache_key(gm: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              candidates: Sequence[Precision], ctx: PassContext, metric: str, adaquant_iterations: int = 0,
              adaquant_scope: str = "layer") -> str:
    """What the measurements depend on: graph, weights, calibration data, candidates, calibrator, residual width,
    metric, AdaQuant (iterations and scope)."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{gm.code}|{[str(p) for p in candidates]}|{ctx.recipe.act_calibrator.value}|"
             f"{ctx.recipe.residual_bits}|{metric}|{adaquant_iterations}|{adaquant_scope}".encode())
    for name, t in sorted(gm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for x, y in batches:
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def measure_one(gm: fx.GraphModule, ctx: PassContext, sites: Sequence[str], precision: Precision,
                batches: Sequence[tuple[torch.Tensor, torch.Tensor]], reference: Precision,
                adaquant_iterations: int = 0, adaquant_scope: str = "layer") -> list[torch.Tensor]:
    """Logits on the calibration batches with only ``sites`` (layer names) at ``precision``, every other layer at
    ``reference``; with ``adaquant_iterations``, the ``sites`` are AdaQuant-optimised first (alone, or within
    their block with ``adaquant_scope="block"``)."""
    from qcompile.passes import AdaQuant, AlignAddScales, AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers
    from qcompile.passes._layerwise import graph_copy, sub_context

    copy = graph_copy(gm)
    overrides = [Override("*", reference, "sensitivity")]
    overrides += [Override(glob.escape(s), precision, "sensitivity") for s in sites]
    passes: list[Pass] = [] if BN_FOLDED in ctx.properties else [FoldBatchNorm()]
    passes += [AssignPrecision(), InsertQuantizers(), Calibrate(), AlignAddScales()]
    if adaquant_iterations and sites:
        passes.append(AdaQuant(iterations=adaquant_iterations, layers=sites, scope=adaquant_scope))
    Pipeline(passes).run_graph(copy, sub_context(ctx, overrides=overrides, calibration_data=batches))
    return outputs(copy, batches)


def sensitivities(gm: fx.GraphModule, ctx: PassContext, units: Mapping[str, Sequence[str]],
                  candidates: Sequence[Precision], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  metric: str = "kl", adaquant_iterations: int = 0, adaquant_scope: str = "layer",
                  ) -> tuple[dict[str, dict[str, float]], dict[str, object]]:
    """Degradation from the widest-candidate network per unit (a module, by its call sites) and candidate, read
    from the cache where measured before; also what the report says about the cache. With
    ``adaquant_iterations`` each lowered unit is AdaQuant-optimised before it is measured, as in Hubara et al.'s
    advanced pipeline: the search then prices a layer by what is left after AdaQuant."""
    check_metric(metric)
    widest = max(candidates, key=lambda p: (p.w_bits, p.a_bits))
    key = cache_key(gm, batches, candidates, ctx, metric, adaquant_iterations, adaquant_scope)
    path = cache_dir() / "sensitivity" / f"{key}.json"
    table: dict[str, dict[str, float]] = {}
    reference_loss = None
    if path.exists():
        stored = json.loads(path.read_text())
        table, reference_loss = stored["layers"], stored["reference_loss"]
    todo = [(u, p) for u in units for p in candidates if p != widest and str(p) not in table.get(u, {})]
    if todo:
        reference = measure_one(gm, ctx, [], widest, batches, widest)
        reference_loss = calibration_loss(reference, batches)
        for unit, p in tqdm(todo, desc="sensitivity", unit="run", disable=None, leave=False):
            logits = measure_one(gm, ctx, units[unit], p, batches, widest, adaquant_iterations, adaquant_scope)
            table.setdefault(unit, {})[str(p)] = degradation(metric, reference, logits, batches)
        write_json(path, {"version": CACHE_VERSION, "metric": metric, "adaquant_iterations": adaquant_iterations,
                          "adaquant_scope": adaquant_scope,
                          "reference": str(widest),
                          "reference_loss": reference_loss, "layers": table})
    for u in units:
        table.setdefault(u, {})[str(widest)] = 0.0
    info = {"cache": str(path), "measured": len(todo),
            "reused": sum(len(table[u]) - 1 for u in units) - len(todo),
            "metric": metric, "adaquant_iterations": adaquant_iterations, "adaquant_scope": adaquant_scope,
            "reference": str(widest),
            "reference_loss": reference_loss}
    return {u: table[u] for u in units}, info
