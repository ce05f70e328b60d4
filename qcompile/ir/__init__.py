"""The integer IR: typed integer tensors and ops, its on-disk format, and the numpy reference interpreter."""

from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.types import DType, TensorInfo

__all__ = ["DType", "IRGraph", "Op", "TensorInfo"]
