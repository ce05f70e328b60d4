"""qcompile: a compiler-style quantizer for PyTorch CNNs (fx capture → passes → integer IR → backends).

Names are imported lazily, so ``qcompile.ir`` (the integer IR, its file format and reference interpreter) loads
and runs without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "capture": "qcompile.tracing",
    "propagate_shapes": "qcompile.tracing",
    "QCompileError": "qcompile.errors",
    "Pass": "qcompile.pipeline",
    "PassContext": "qcompile.pipeline",
    "Pipeline": "qcompile.pipeline",
    "PipelineResult": "qcompile.pipeline",
    "RECIPES": "qcompile.recipes",
    "Recipe": "qcompile.recipes",
    "get_recipe": "qcompile.recipes",
    "Calibrator": "qcompile.spec",
    "Granularity": "qcompile.spec",
    "LayerRole": "qcompile.spec",
    "NodeQuant": "qcompile.spec",
    "Precision": "qcompile.spec",
    "QuantSpec": "qcompile.spec",
    "get_annotation": "qcompile.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
