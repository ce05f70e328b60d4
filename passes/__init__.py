"""Graph rewrites, one module each; every pass is usable alone or inside a :class:`qcompile.Pipeline`."""

from qcompile.passes.adaquant import AdaQuant
from qcompile.passes.align_add_scales import AlignAddScales
from qcompile.passes.annotate_cost import AnnotateCost
from qcompile.passes.assign_precision import AssignPrecision
from qcompile.passes.bias_correct import BiasCorrect
from qcompile.passes.bn_tune import BnTune
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.insert_quantizers import InsertQuantizers
from qcompile.passes.lower_integer import LowerInteger
from qcompile.passes.norm_layers import NormsAsLayers
from qcompile.passes.width_scale import WidthScale

__all__ = ["AdaQuant", "AlignAddScales", "AnnotateCost", "AssignPrecision", "BiasCorrect", "BnTune", "Calibrate",
           "FoldBatchNorm", "InsertQuantizers", "LowerInteger", "NormsAsLayers", "WidthScale"]
