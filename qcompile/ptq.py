"""The post-training pipelines of Hubara et al. as pass lists: plain calibration, ``light`` (mixed precision +
BN tuning) and ``advanced`` (AdaQuant + mixed precision + BN tuning + bias tuning).

Mixed precision runs when the recipe is ``auto`` (widths from the integer program under a budget); with a fixed
recipe the recipe's widths are kept. BN tuning runs before BN is folded, AdaQuant and bias correction on the
calibrated fake-quant graph, and the result lowers to the integer IR like any other recipe.
"""

from __future__ import annotations

from qcompile.bit_allocation import Budget
from qcompile.errors import QCompileError, RecipeError
from qcompile.passes import (
    AdaQuant, AlignAddScales, AnnotateCost, AssignPrecision, BiasCorrect, BnTune, Calibrate, FoldBatchNorm,
    InsertQuantizers, LowerInteger,
)
from qcompile.passes.mixed_precision import MixedPrecision
from qcompile.pipeline import Pass

PTQ_MODES = ("light", "advanced")


def parse_bits(text: str) -> list[int]:
    """``4,8`` → [4, 8]."""
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise RecipeError(f"--bits {text!r}: expected comma-separated bit widths, e.g. 4,8") from None


def ptq_passes(mode: str | None, auto: bool, budget: Budget | None = None, max_degradation: float | None = None,
               bits: list[int] | None = None, adaquant_iterations: int = 200, dyadic: bool = False,
               has_calibration: bool = True, quantized: bool = True, metric: str = "kl",
               adaquant_scope: str = "layer") -> list[Pass]:
    """The passes after capture (and width scaling) for a PTQ mode and/or an IP-chosen precision plan."""
    if mode is not None and mode not in PTQ_MODES:
        raise RecipeError(f"unknown --ptq mode {mode!r}; choose one of: {', '.join(PTQ_MODES)}")
    if not auto and (budget is not None or max_degradation is not None):
        raise RecipeError("--budget and --max-degradation choose widths for --recipe auto; add --recipe auto")
    if adaquant_scope != "layer" and mode != "advanced":
        raise RecipeError(f"--adaquant-scope {adaquant_scope} sets how --ptq advanced runs AdaQuant; add --ptq advanced")
    if not quantized:
        raise RecipeError("--ptq quantizes: choose a quantized recipe (int8, mostly4bit, int4, auto), not bf16")
    if not has_calibration:
        raise QCompileError("--ptq and --recipe auto need calibration data (define calibration_data() in the model "
                            "file or pass --data)")
    passes: list[Pass] = [AssignPrecision(), AnnotateCost()]
    if auto:
        passes.append(MixedPrecision(budget, max_degradation, bits or [4, 8], metric,
                                    adaquant_iterations if mode == "advanced" else 0, adaquant_scope))
    if mode is not None:
        passes.append(BnTune())
    passes += [FoldBatchNorm(), InsertQuantizers(), Calibrate(), AlignAddScales()]
    if mode == "advanced":
        passes += [AdaQuant(iterations=adaquant_iterations, scope=adaquant_scope), BiasCorrect()]
    return passes + [LowerInteger(dyadic=dyadic)]
