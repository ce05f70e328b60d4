"""Per-layer sensitivity to quantization: the calibration loss change when only that layer is lowered.

The reference network has every layer at the widest candidate (8 bits for ``--bits 4,8``), so a layer's entry
at width b is the loss increase of the plan "this layer at b, every other layer as wide as the search allows":
the quantization of the neighbours and of the residuals, which every plan has, is already in the reference
rather than counted again in each layer's entry. The widest candidate's entries are 0 by definition.

Measuring costs one calibration run per layer and narrower candidate, so the table is cached on disk under
``$QCOMPILE_CACHE/sensitivity``, keyed by the captured graph's code, its weights, the calibration set, the
candidate precisions and the calibrator: a re-run with another budget reads it back instead of re-measuring.
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
from qcompile.pipeline import BN_FOLDED, Pass, PassContext, Pipeline
from qcompile.recipes import Override
from qcompile.spec import Precision

CACHE_VERSION = 3  # 2: residuals after the ReLU, aligned add scales; 3: widest-candidate reference


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy of ``model`` over the batches."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    model.train(was_training)
    return total / n


def cache_key(gm: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              candidates: Sequence[Precision], ctx: PassContext) -> str:
    """What the measurements depend on: graph, weights, calibration data, candidates, calibrator, residual width."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{gm.code}|{[str(p) for p in candidates]}|{ctx.recipe.act_calibrator.value}|"
             f"{ctx.recipe.residual_bits}".encode())
    for name, t in sorted(gm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for x, y in batches:
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def measure_one(gm: fx.GraphModule, ctx: PassContext, sites: Sequence[str], precision: Precision,
                batches: Sequence[tuple[torch.Tensor, torch.Tensor]], reference: Precision) -> float:
    """Calibration loss with only ``sites`` (layer names) at ``precision``, every other layer at ``reference``."""
    from qcompile.passes import AlignAddScales, AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers
    from qcompile.passes._layerwise import graph_copy, sub_context

    copy = graph_copy(gm)
    overrides = [Override("*", reference, "sensitivity")]
    overrides += [Override(glob.escape(s), precision, "sensitivity") for s in sites]
    passes: list[Pass] = [] if BN_FOLDED in ctx.properties else [FoldBatchNorm()]
    passes += [AssignPrecision(), InsertQuantizers(), Calibrate(), AlignAddScales()]
    Pipeline(passes).run_graph(copy, sub_context(ctx, overrides=overrides, calibration_data=batches))
    return calibration_loss(copy, batches)


def sensitivities(gm: fx.GraphModule, ctx: PassContext, units: Mapping[str, Sequence[str]],
                  candidates: Sequence[Precision], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  ) -> tuple[dict[str, dict[str, float]], dict[str, object]]:
    """Loss increase over the widest-candidate network per unit (a module, by its call sites) and candidate,
    read from the cache where measured before; also what the report says about the cache."""
    widest = max(candidates, key=lambda p: (p.w_bits, p.a_bits))
    key = cache_key(gm, batches, candidates, ctx)
    path = cache_dir() / "sensitivity" / f"{key}.json"
    table: dict[str, dict[str, float]] = {}
    reference_loss = None
    if path.exists():
        stored = json.loads(path.read_text())
        table, reference_loss = stored["layers"], stored["reference_loss"]
    todo = [(u, p) for u in units for p in candidates if p != widest and str(p) not in table.get(u, {})]
    if todo:
        if reference_loss is None:
            reference_loss = measure_one(gm, ctx, [], widest, batches, widest)
        for unit, p in tqdm(todo, desc="sensitivity", unit="run", disable=None, leave=False):
            loss = measure_one(gm, ctx, units[unit], p, batches, widest)
            table.setdefault(unit, {})[str(p)] = loss - reference_loss
        write_json(path, {"version": CACHE_VERSION, "reference": str(widest), "reference_loss": reference_loss,
                          "layers": table})
    for u in units:
        table.setdefault(u, {})[str(widest)] = 0.0
    info = {"cache": str(path), "measured": len(todo),
            "reused": sum(len(table[u]) - 1 for u in units) - len(todo),
            "reference": str(widest), "reference_loss": reference_loss}
    return {u: table[u] for u in units}, info
