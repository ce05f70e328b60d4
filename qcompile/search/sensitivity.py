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
``$QCOMPILE_CACHE/sensitivity``, keyed by the captured graph's code, its weights, the layers searched, the
calibration set, the candidate precisions, the calibrator, the measure and the AdaQuant iterations and scope: a
re-run with another budget reads it back instead of re-measuring. The entry is a :mod:`qcompile.cache` entry,
and a table is checked both before it is written and when it is read back (every layer and candidate present,
every value finite, no negative KL divergence), because the search would otherwise build a plan on it silently.
"""

from __future__ import annotations

import glob
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm import tqdm

from qcompile import cache
from qcompile.errors import PipelineError, RecipeError
from qcompile.frontend.model_file import logits
from qcompile.pipeline import BN_FOLDED, PassContext, Pipeline
from qcompile.quantization.recipes import Override, activation_calibrator
from qcompile.quantization.spec import Precision

CACHE_KIND = "sensitivity"
CACHE_VERSION = 6  # 2: residuals after the ReLU, aligned add scales; 3: widest-candidate reference; 4: metrics;
# 5: AdaQuant scope; 6: qcompile.cache entry (content hash), keyed by the layers searched, KL clamped at 0
METRICS = ("kl", "loss")


@torch.no_grad()
def outputs(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The model's logits per calibration batch (eval mode)."""
    was_training = model.training
    model.eval()
    out = [logits(model(x)) for x, _ in batches]
    model.train(was_training)
    return out


def labelled(batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
    """Whether every batch has labels (a calibration set may be images alone)."""
    return all(y is not None for _, y in batches)


def calibration_loss(logits: Sequence[torch.Tensor], batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy of the logits against the batches' labels."""
    total = sum(float(F.cross_entropy(z, y, reduction="sum")) for z, (_, y) in zip(logits, batches))
    return total / sum(len(y) for _, y in batches)


def mean_kl(reference: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> float:
    """Mean over images of KL(softmax(reference) || softmax(logits)).

    Clamped at 0: float32 rounding can take the divergence of near-identical outputs a hair below it, and a
    negative KL divergence is what the cache check rejects as impossible.
    """
    total = sum(float(F.kl_div(F.log_softmax(z, 1), F.log_softmax(r, 1), reduction="sum", log_target=True))
                for r, z in zip(reference, logits))
    return max(total / sum(len(r) for r in reference), 0.0)


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
              candidates: Sequence[Precision], ctx: PassContext, metric: str, units: Mapping[str, Sequence[str]],
              adaquant_iterations: int = 0, adaquant_scope: str = "layer") -> str:
    """What the measurements depend on: graph, weights, the units measured (so an entry is complete for exactly
    them), calibration data, candidates, calibrator, residual width, metric, AdaQuant (iterations and scope)."""
    h = hashlib.sha256()
    h.update(f"{gm.code}|{[str(p) for p in candidates]}|{activation_calibrator(ctx.recipe).value}|"
             f"{ctx.recipe.residual_bits}|{metric}|{adaquant_iterations}|{adaquant_scope}|"
             f"{sorted((u, list(sites)) for u, sites in units.items())}".encode())
    for name, t in sorted(gm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for x, y in batches:
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.contiguous().numpy().tobytes() if y is not None else b"unlabelled")
    return h.hexdigest()[:24]


def measure_one(gm: fx.GraphModule, ctx: PassContext, sites: Sequence[str], precision: Precision,
                batches: Sequence[tuple[torch.Tensor, torch.Tensor]], reference: Precision,
                adaquant_iterations: int = 0, adaquant_scope: str = "layer") -> list[torch.Tensor]:
    """Logits on the calibration batches with only ``sites`` (layer names) at ``precision``, every other layer at
    ``reference``; with ``adaquant_iterations``, the ``sites`` are AdaQuant-optimised first (alone, or within
    their block with ``adaquant_scope="block"``)."""
    from qcompile.passes._layerwise import graph_copy, sub_context
    from qcompile.pipelines import sensitivity_passes

    copy = graph_copy(gm)
    overrides = [Override("*", reference, "sensitivity")]
    overrides += [Override(glob.escape(s), precision, "sensitivity") for s in sites]
    passes = sensitivity_passes(fold_bn=BN_FOLDED not in ctx.properties, adaquant_iterations=adaquant_iterations,
                                adaquant_layers=sites, adaquant_scope=adaquant_scope)
    Pipeline(passes).run_graph(copy, sub_context(ctx, overrides=overrides, calibration_data=batches))
    return outputs(copy, batches)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def table_problem(stored: Mapping[str, Any], units: Sequence[str], lowered: Sequence[str], metric: str) -> str | None:
    """What is wrong with a sensitivity table (phrased to follow its name), or None when the search may use it.

    Every unit needs an entry per lowered candidate, each a finite number; ``kl`` entries are divergences and
    cannot be negative, ``loss`` entries can (a lowered layer may lower the calibration loss by chance).
    """
    if stored.get("metric") != metric:
        return f"measures {stored.get('metric')!r}, not {metric!r}"
    if not _finite(stored.get("reference_loss")) and not (metric == "kl" and stored.get("reference_loss") is None):
        return f"has reference loss {stored.get('reference_loss')!r}, not a finite number"
    layers = stored.get("layers")
    if not isinstance(layers, dict) or set(layers) != set(units):
        found = set(layers) if isinstance(layers, dict) else set()
        missing, extra = sorted(set(units) - found), sorted(found - set(units))
        return f"has the wrong layers (missing: {', '.join(missing) or 'none'}; unknown: {', '.join(extra) or 'none'})"
    for unit in units:
        entry = layers[unit]
        if not isinstance(entry, dict) or set(entry) != set(lowered):
            got = ", ".join(sorted(entry)) if isinstance(entry, dict) else repr(entry)
            return f"has candidates [{got}] for layer {unit}, expected [{', '.join(sorted(lowered))}]"
        for precision, value in entry.items():
            if not _finite(value):
                return f"gives layer {unit} at {precision} {value!r}, not a finite number"
            if metric == "kl" and value < 0:
                return f"gives layer {unit} at {precision} a negative KL divergence ({value})"
    return None


def _measure_table(gm: fx.GraphModule, ctx: PassContext, units: Mapping[str, Sequence[str]],
                   lowered: Sequence[Precision], widest: Precision,
                   batches: Sequence[tuple[torch.Tensor, torch.Tensor]], metric: str, adaquant_iterations: int,
                   adaquant_scope: str) -> dict[str, Any]:
    """A fresh table: each unit's degradation at each ``lowered`` candidate, and the reference network's loss."""
    reference = measure_one(gm, ctx, [], widest, batches, widest)
    layers: dict[str, dict[str, float]] = {u: {} for u in units}
    todo = [(u, p) for u in units for p in lowered]
    for unit, p in tqdm(todo, desc="sensitivity", unit="run", disable=None, leave=False):
        logits = measure_one(gm, ctx, units[unit], p, batches, widest, adaquant_iterations, adaquant_scope)
        layers[unit][str(p)] = degradation(metric, reference, logits, batches)
    return {"metric": metric, "adaquant_iterations": adaquant_iterations, "adaquant_scope": adaquant_scope,
            "reference": str(widest), "layers": layers,
            "reference_loss": calibration_loss(reference, batches) if labelled(batches) else None}


def _cached_table(path: Path, units: Sequence[str], lowered: Sequence[str], metric: str) -> dict[str, Any] | None:
    """The table cached at ``path``; None when there is none or it is unusable (then deleted, with a warning)."""
    stored = cache.load_json(path, CACHE_KIND, CACHE_VERSION)
    problem = table_problem(stored, units, lowered, metric) if stored is not None else None
    if problem is not None:
        cache.discard(path, problem)
        return None
    return stored


def sensitivities(gm: fx.GraphModule, ctx: PassContext, units: Mapping[str, Sequence[str]],
                  candidates: Sequence[Precision], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  metric: str = "kl", adaquant_iterations: int = 0, adaquant_scope: str = "layer",
                  ) -> tuple[dict[str, dict[str, float]], dict[str, object]]:
    """Degradation from the widest-candidate network per unit (a module, by its call sites) and candidate, read
    from the cache where measured before; also what the report says about the cache. With
    ``adaquant_iterations`` each lowered unit is AdaQuant-optimised before it is measured, as in Hubara et al.'s
    advanced pipeline: the search then prices a layer by what is left after AdaQuant."""
    check_metric(metric)
    if not labelled(batches) and metric == "loss":
        raise PipelineError("mixed_precision: the 'loss' sensitivity metric needs labelled calibration batches; "
                            "these have images only (the 'kl' metric needs no labels)")
    widest = max(candidates, key=lambda p: (p.w_bits, p.a_bits))
    lowered = [p for p in candidates if p != widest]
    names = [str(p) for p in lowered]
    key = cache_key(gm, batches, candidates, ctx, metric, units, adaquant_iterations, adaquant_scope)
    path = cache.cache_dir() / "sensitivity" / f"{key}.json"
    stored = _cached_table(path, list(units), names, metric)
    runs = len(units) * len(lowered)
    measured = runs if stored is None else 0
    if stored is None:
        stored = _measure_table(gm, ctx, units, lowered, widest, batches, metric, adaquant_iterations,
                                adaquant_scope)
        problem = table_problem(stored, list(units), names, metric)
        if problem is not None:  # e.g. a lowered network whose outputs are not finite: no plan can rest on it
            raise PipelineError(f"mixed_precision: the measured sensitivity table {problem}; nothing was cached")
        cache.store_json(path, CACHE_KIND, CACHE_VERSION, stored)
    table = {u: {**stored["layers"][u], str(widest): 0.0} for u in units}
    info = {"cache": str(path), "measured": measured, "reused": runs - measured,
            "metric": metric, "adaquant_iterations": adaquant_iterations, "adaquant_scope": adaquant_scope,
            "reference": str(widest), "reference_loss": stored["reference_loss"]}
    return table, info
