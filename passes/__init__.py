"""Graph rewrites, one module each; every pass is usable alone or inside a :class:`qcompile.Pipeline`."""

from qcompile.passes.annotate_cost import AnnotateCost
from qcompile.passes.assign_precision import AssignPrecision
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.insert_quantizers import InsertQuantizers
from qcompile.passes.lower_integer import LowerInteger
from qcompile.passes.width_scale import WidthScale

__all__ = ["AnnotateCost", "AssignPrecision", "Calibrate", "FoldBatchNorm", "InsertQuantizers", "LowerInteger", "WidthScale"]
