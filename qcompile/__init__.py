"""qcompile: a compiler-style quantizer for PyTorch CNNs (fx capture → passes → integer IR → backends)."""

from qcompile.capture import capture, propagate_shapes
from qcompile.errors import QCompileError
from qcompile.pipeline import Pass, PassContext, Pipeline, PipelineResult
from qcompile.recipes import RECIPES, Recipe, get_recipe
from qcompile.spec import Calibrator, Granularity, LayerRole, NodeQuant, Precision, QuantSpec, get_annotation

__version__ = "0.1.0"

__all__ = [
    "RECIPES",
    "Calibrator",
    "Granularity",
    "LayerRole",
    "NodeQuant",
    "Pass",
    "PassContext",
    "Pipeline",
    "PipelineResult",
    "Precision",
    "QCompileError",
    "QuantSpec",
    "Recipe",
    "capture",
    "get_annotation",
    "get_recipe",
    "propagate_shapes",
]
