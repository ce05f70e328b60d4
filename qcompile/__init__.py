"""qcompile: a compiler-style quantizer for PyTorch CNNs (fx capture → passes → integer IR → backends).

Names are imported lazily, so ``qcompile.ir`` (the integer IR, its file format and reference interpreter) loads
and runs without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "capture": "qcompile.frontend.tracing",
    "propagate_shapes": "qcompile.frontend.shapes",
    "QCompileError": "qcompile.errors",
    "Pass": "qcompile.pipeline",
    "PassContext": "qcompile.pipeline",
    "Pipeline": "qcompile.pipeline",
    "PipelineResult": "qcompile.pipeline",
    "RECIPES": "qcompile.quantization.recipes",
    "Recipe": "qcompile.quantization.recipes",
    "get_recipe": "qcompile.quantization.recipes",
    "Calibrator": "qcompile.quantization.spec",
    "Granularity": "qcompile.quantization.spec",
    "LayerRole": "qcompile.quantization.spec",
    "NodeQuant": "qcompile.quantization.spec",
    "Precision": "qcompile.quantization.spec",
    "QuantSpec": "qcompile.quantization.spec",
    "get_annotation": "qcompile.quantization.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
