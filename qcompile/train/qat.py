"""Quantization-aware training graphs: prepare one with the existing passes, schedule its activation
quantizers, and lower the trained result through the ordinary pipeline.

The trained graph keeps its BatchNorms (training without them is slower and worse) with per-output-channel
weight quantizers on the convs. Folding a BN later scales each output channel by ``γ/σ``, and a per-channel
symmetric quantizer with bound ``max|w|`` is invariant under that: ``w·k / (max|w|·|k| / qmax) = ±w / s``, so
the folded layer has the integers QAT trained (the bias absorbs the BN shift). Lowering therefore starts again
from the float graph with the trained weights — fold BN, assign precision, insert quantizers — and takes the
activation bounds QAT froze (:class:`~qcompile.passes.load_bounds.LoadBounds`) instead of calibrating.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from qcompile.errors import QCompileError
from qcompile.frontend.tracing import LeafSpec
from qcompile.passes.align_add_scales import align_add_scales
from qcompile.passes.insert_quantizers import activation_quantizers
from qcompile.passes.load_bounds import activation_bounds
from qcompile.pipeline import PassContext, Pipeline
from qcompile.pipelines import lowering_passes, qat_lowering_passes, qat_prepare_passes, qat_quantizer_passes
from qcompile.quantization.quantizer import QuantizerState, fit_bias_scales
from qcompile.quantization.recipes import Override, Recipe
from qcompile.quantization.spec import Calibrator

_PARAMETRIZED = re.compile(r"parametrizations\.(\w+)\.original$")


@dataclass
class QATModel:
    """The trainable fake-quant graph, the float graph lowering restarts from, and the pass context."""

    graph: fx.GraphModule
    float_graph: fx.GraphModule
    context: PassContext

    @property
    def recipe(self) -> Recipe:
        return self.context.recipe


def qat_recipe(recipe: Recipe, calibrator: Calibrator = Calibrator.EMA_MAX) -> Recipe:
    """The recipe with QAT's activation observer: an EMA of max|x| (the paper's) unless told otherwise."""
    return replace(recipe, act_calibrator=calibrator)


def prepare_qat(model: nn.Module, example_inputs: Sequence[torch.Tensor], recipe: Recipe,
                width: float | None = None, overrides: Iterable[Override] = (),
                leaf_modules: Iterable[LeafSpec] = ()) -> QATModel:
    """Capture ``model`` (a copy), optionally width-scale it (re-initialising it), annotate precision and cost,
    and insert fake quantizers when the recipe quantizes. Activation quantizers start out observing."""
    result = Pipeline(qat_prepare_passes(width)).run(model, tuple(example_inputs), leaf_modules=leaf_modules,
                                                     recipe=recipe, overrides=list(overrides),
                                                     width=1.0 if width is None else width)
    gm, ctx = result.graph_module, result.context
    float_graph = copy.deepcopy(gm)
    if recipe.quantized:
        check_lowers(float_graph, ctx)
        gm = Pipeline(qat_quantizer_passes()).run_graph(gm, ctx)
    return QATModel(gm.train(), float_graph, ctx)


def check_lowers(float_graph: fx.GraphModule, ctx: PassContext) -> None:
    """Lower a copy of the untrained model, calibrated on the example input: a model that cannot lower (an
    operation with no integer form) then stops before training, in one line, not after a training run."""
    gm = copy.deepcopy(float_graph).cpu().eval()
    example = tuple(x.cpu() for x in ctx.example_inputs)
    check = PassContext(example_inputs=example, recipe=ctx.recipe, overrides=list(ctx.overrides), width=ctx.width,
                        width_reference=ctx.width_reference,
                        calibration_data=[(example[0], torch.zeros(len(example[0]), dtype=torch.long))])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the example's degenerate ranges: this model is not the one trained
            Pipeline(lowering_passes()).run_graph(gm, check)  # QAT's lowering, calibrated instead of trained
    except QCompileError as exc:
        raise type(exc)(f"the model would not lower after training, so it is not trained: {exc}") from None


class ActivationSchedule:
    """Activation quantizers observe (values pass through) for the first ``fraction`` of the steps, are then
    frozen once from what they saw, and quantize from then on. Weights are quantized from step 0."""

    def __init__(self, gm: nn.Module, total_steps: int, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"the observe fraction must be in (0, 1], got {fraction}")
        self.graph = gm if isinstance(gm, fx.GraphModule) else None  # a float model has nothing to schedule
        self.quantizers = activation_quantizers(self.graph) if self.graph is not None else {}
        self.freeze_step = max(1, round(fraction * total_steps))

    @property
    def frozen(self) -> bool:
        return all(q.state is QuantizerState.FROZEN for q in self.quantizers.values())

    def before_step(self, step: int) -> bool:
        """Freeze every quantizer when ``step`` reaches the freeze step; True on the step that froze them."""
        if step < self.freeze_step or self.frozen:
            return False
        self.freeze()
        return True

    def freeze(self) -> None:
        """Freeze every bound, then align the residual adds' scales (passes/align_add_scales.py), so training
        adapts to the scales the exported model runs with."""
        for name, q in self.quantizers.items():
            q.freeze(name)
        if self.graph is not None:
            fit_bias_scales(self.graph)
            align_add_scales(self.graph)

    def state_dict(self) -> dict[str, dict[str, object]]:
        """The quantizers' Python-side state (their tensors are in the module's state dict)."""
        return {name: {"state": q.state.value, "batches": q.batches} for name, q in self.quantizers.items()}

    def load_state_dict(self, state: dict[str, dict[str, object]]) -> None:
        for name, q in self.quantizers.items():
            q.state = QuantizerState(state[name]["state"])
            q.batches = int(state[name]["batches"])  # type: ignore[call-overload]


def set_rank_sync(gm: nn.Module, on: bool) -> None:
    """Make activation observers take the max over every data-parallel process's shard of the batch."""
    if isinstance(gm, fx.GraphModule):
        for q in activation_quantizers(gm).values():
            q.sync_across_ranks = on


def float_state_dict(gm: nn.Module) -> dict[str, torch.Tensor]:
    """The trained graph's float parameters and buffers under their unparametrized names (quantizers dropped)."""
    return {_PARAMETRIZED.sub(r"\1", key): value for key, value in gm.state_dict().items()}


def lower_trained(qm: QATModel) -> tuple[fx.GraphModule, PassContext]:
    """Fold BN and lower the trained model through the pipeline: (fake-quant graph bit-exact with the integer
    IR, context with ``ir`` and ``cost``). A float recipe stops after folding and costing."""
    gm = copy.deepcopy(qm.float_graph).cpu()
    wanted = gm.state_dict()
    trained = float_state_dict(qm.graph)
    gm.load_state_dict({k: trained[k].detach().cpu() for k in wanted})
    gm.eval()
    src = qm.context
    ctx = PassContext(example_inputs=src.example_inputs, recipe=src.recipe, overrides=src.overrides,
                      width=src.width, width_reference=src.width_reference)
    bounds = activation_bounds(qm.graph) if src.recipe.quantized else {}
    with torch.no_grad():
        gm = Pipeline(qat_lowering_passes(src.recipe, bounds)).run_graph(gm, ctx)
    return gm, ctx
