"""The pass lists: the one place that turns a recipe plus options into the passes to run (like TVM's relax
pipelines). The CLI, sensitivity measurement, QAT and the benchmarks take their lists from here, so a pass
added to or reordered in a flow changes in one place; this is the one library module that imports the passes
to assemble lists (see docs/architecture.md).

- :func:`compile_passes`: ``qcompile MODEL.py``: plain calibration, or the post-training pipelines of Hubara et
  al. (:func:`ptq_passes`) when a PTQ mode, a searched recipe (``auto``) or a search option asks for them.
- :func:`ptq_passes`: plain calibration, ``light`` (mixed precision + BN tuning) and ``advanced`` (AdaQuant +
  mixed precision + BN tuning + bias tuning). Mixed precision runs when the recipe is searched (widths from the
  integer program under a budget); with a fixed recipe the recipe's widths are kept. BN tuning runs before BN
  is folded, AdaQuant and bias correction on the calibrated fake-quant graph, and the result lowers to the
  integer IR like any other recipe.
- :func:`lowering_passes`: fold, assign, calibrate and lower, no cost annotation (the benchmarks).
- :func:`sensitivity_passes`: the calibrated fake-quant graph one sensitivity measurement runs.
- :func:`qat_prepare_passes`, :func:`qat_quantizer_passes`, :func:`qat_lowering_passes`: quantization-aware
  training's capture, fake quantizers and lowering from frozen activation bounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qcompile.errors import QCompileError, RecipeError
from qcompile.passes import (
    AdaQuant,
    AlignAddScales,
    AnnotateCost,
    AssignPrecision,
    BiasCorrect,
    BnTune,
    Calibrate,
    FoldBatchNorm,
    InsertQuantizers,
    LowerInteger,
    WidthScale,
)
from qcompile.passes.load_bounds import BoundKey, LoadBounds
from qcompile.passes.mixed_precision import MixedPrecision
from qcompile.passes.norm_layers import NormsAsLayers
from qcompile.pipeline import Pass
from qcompile.quantization.latency import LatencyProfile
from qcompile.quantization.ptq import PTQ_MODES, parse_bits
from qcompile.quantization.recipes import Recipe
from qcompile.search.bit_allocation import Budget, parse_budget


def uses_ptq(recipe: Recipe, *, ptq_mode: str | None = None, budget: Budget | str | None = None,
             max_degradation: float | None = None, adaquant_scope: str = "layer") -> bool:
    """Whether :func:`compile_passes` takes the post-training path (:func:`ptq_passes`) for these options."""
    return (bool(ptq_mode) or recipe.searched or budget is not None or max_degradation is not None
            or adaquant_scope != "layer")


def quantize_passes() -> list[Pass]:
    """Fake quantizers, calibrated, with the residual adds' scales aligned."""
    return [InsertQuantizers(), Calibrate(), AlignAddScales()]


def compile_passes(recipe: Recipe, *, width: float = 1.0, ptq_mode: str | None = None,
                   budget: Budget | str | None = None, max_degradation: float | None = None,
                   bits: Sequence[int] | str | None = None, adaquant_iterations: int = 200,
                   adaquant_scope: str = "layer", metric: str = "kl", dyadic: bool = False,
                   has_calibration: bool = True, profile: LatencyProfile | None = None) -> list[Pass]:
    """The passes after capture for ``qcompile MODEL.py``: width scaling (``width`` other than 1), then either
    :func:`ptq_passes` (see :func:`uses_ptq`) or fold, assign and cost, calibrating and lowering when the recipe
    quantizes and there is calibration data. ``budget`` and ``bits`` may be given as their CLI text; a latency
    ``profile`` adds the measured cost model (and makes a ``latency`` budget possible)."""
    passes: list[Pass] = [WidthScale(width)] if width != 1.0 else []
    if uses_ptq(recipe, ptq_mode=ptq_mode, budget=budget, max_degradation=max_degradation,
                adaquant_scope=adaquant_scope):
        if isinstance(budget, str):
            budget = parse_budget(budget) if budget else None
        if isinstance(bits, str):
            bits = parse_bits(bits)
        return passes + ptq_passes(recipe, ptq_mode, budget=budget, max_degradation=max_degradation, bits=bits,
                                   adaquant_iterations=adaquant_iterations, adaquant_scope=adaquant_scope,
                                   metric=metric, dyadic=dyadic, has_calibration=has_calibration, profile=profile)
    passes += [FoldBatchNorm(), AssignPrecision(), AnnotateCost(profile)]
    if recipe.quantized and has_calibration:
        passes += [*quantize_passes(), LowerInteger(dyadic=dyadic)]
    return passes


def ptq_passes(recipe: Recipe, mode: str | None, *, budget: Budget | None = None,
               max_degradation: float | None = None, bits: Sequence[int] | None = None,
               adaquant_iterations: int = 200, adaquant_scope: str = "layer", metric: str = "kl",
               dyadic: bool = False, has_calibration: bool = True,
               profile: LatencyProfile | None = None) -> list[Pass]:
    """The passes after capture (and width scaling) for a PTQ mode and/or a searched precision plan."""
    if mode is not None and mode not in PTQ_MODES:
        raise RecipeError.with_parameters(f"unknown {{ptq}} mode {mode!r}; choose one of: {', '.join(PTQ_MODES)}")
    if not recipe.searched and (budget is not None or max_degradation is not None):
        raise RecipeError.with_parameters("{budget} and {max_degradation} choose widths for {recipe} auto; "
                                          "add {recipe} auto")
    if adaquant_scope != "layer" and mode != "advanced":
        raise RecipeError.with_parameters(f"{{adaquant_scope}} {adaquant_scope} sets how {{ptq}} advanced runs "
                                          "AdaQuant; add {ptq} advanced")
    if not recipe.quantized:
        raise RecipeError.with_parameters("{ptq} quantizes: choose a quantized recipe (int8, mostly4bit, int4, auto), "
                                          "not bf16")
    if not has_calibration:
        raise QCompileError.with_parameters("{ptq} and {recipe} auto need calibration data (define calibration_data() "
                                            "in the model file or pass {data})")
    passes: list[Pass] = [AssignPrecision(), AnnotateCost(profile)]
    if recipe.searched:
        passes += [MixedPrecision(budget, max_degradation, list(bits) if bits else [4, 8], metric,
                                  adaquant_iterations if mode == "advanced" else 0, adaquant_scope, profile),
                   AssignPrecision(), AnnotateCost(profile)]
    if mode is not None:
        passes.append(BnTune())
    # a BatchNorm that follows no layer becomes one when folded (pre-activation blocks): assign and cost it too
    passes += [FoldBatchNorm(), AssignPrecision(), AnnotateCost(profile), *quantize_passes()]
    if mode == "advanced":
        passes += [AdaQuant(iterations=adaquant_iterations, scope=adaquant_scope), BiasCorrect()]
    return passes + [LowerInteger(dyadic=dyadic)]


def lowering_passes(*, dyadic: bool = False, width: float = 1.0) -> list[Pass]:
    """Fold BN, assign the recipe's widths, calibrate and lower to the integer IR (no cost annotation); for
    ``bf16`` the IR holds the float model, which a backend runs as the float reference of a measurement."""
    passes: list[Pass] = [WidthScale(width)] if width != 1.0 else []
    return passes + [FoldBatchNorm(), AssignPrecision(), *quantize_passes(), LowerInteger(dyadic=dyadic)]


def sensitivity_passes(*, fold_bn: bool = True, adaquant_iterations: int = 0, adaquant_layers: Sequence[str] = (),
                       adaquant_scope: str = "layer") -> list[Pass]:
    """One sensitivity measurement's calibrated fake-quant graph (BN folded first unless it already is), the
    ``adaquant_layers`` AdaQuant-optimised when ``adaquant_iterations`` and layers are given."""
    passes: list[Pass] = [FoldBatchNorm()] if fold_bn else []
    passes += [AssignPrecision(), *quantize_passes()]
    if adaquant_iterations and adaquant_layers:
        passes.append(AdaQuant(iterations=adaquant_iterations, layers=adaquant_layers, scope=adaquant_scope))
    return passes


def qat_prepare_passes(width: float | None = None, profile: LatencyProfile | None = None) -> list[Pass]:
    """QAT's capture: optional width scaling (re-initialising), precision and cost (with a latency ``profile``,
    the predicted latency too); BN is kept for training, a BatchNorm that folds into a layer of its own as that
    layer (``norms_as_layers``)."""
    passes: list[Pass] = [WidthScale(width)] if width is not None else []
    return passes + [NormsAsLayers(), AssignPrecision(), AnnotateCost(profile)]


def qat_quantizer_passes() -> list[Pass]:
    """The fake quantizers QAT trains through (activation quantizers start out observing)."""
    return [InsertQuantizers()]


def qat_lowering_passes(recipe: Recipe, bounds: Mapping[BoundKey, Any]) -> list[Pass]:
    """Lower a trained model from its float graph: fold BN, assign and cost, then (when the recipe quantizes)
    quantizers with the activation ``bounds`` QAT froze instead of calibration, and the integer IR."""
    passes: list[Pass] = [FoldBatchNorm(), AssignPrecision(), AnnotateCost()]
    if recipe.quantized:
        passes += [InsertQuantizers(), LoadBounds(bounds), LowerInteger()]
    return passes
