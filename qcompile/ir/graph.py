"""The integer IR: a straight-line list of typed ops over named values.

Every value has a :class:`TensorInfo`; constants (weights at their real width, int32 biases, requantize
multipliers) live in ``constants``. Ops and their semantics are documented in :mod:`qcompile.ir.reference`,
which is the executable definition every backend is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcompile.ir.ops import checked_attrs
from qcompile.ir.types import DType, TensorInfo

@dataclass
class Op:
    """One IR operation. ``source`` names the fx node (and user code line) it was lowered from; ``attrs`` are
    checked against the kind's schema (:data:`qcompile.ir.ops.OP_SCHEMAS`), defaults filled in."""

    kind: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        self.attrs = checked_attrs(self.kind, self.output, self.attrs)


@dataclass
class IRGraph:
    """Inputs, outputs, typed values, constants and ops in execution order."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    values: dict[str, TensorInfo] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def add_value(self, name: str, info: TensorInfo) -> str:
        if name in self.values:
            raise ValueError(f"IR value {name!r} defined twice")
        self.values[name] = info
        return name

    def add_constant(self, name: str, data: np.ndarray, info: TensorInfo) -> str:
        self.add_value(name, info)
        self.constants[name] = data
        return name

    def add_op(self, kind: str, inputs: list[str], output: str, info: TensorInfo, source: str = "",
               **attrs: Any) -> str:
        for i in inputs:
            if i not in self.values:
                raise ValueError(f"op {kind} -> {output}: input {i!r} is not defined")
        op = Op(kind, inputs, output, attrs, source)  # checked before the graph changes
        self.add_value(output, info)
        self.ops.append(op)
        return output

    def producer(self, name: str) -> Op | None:
        return next((op for op in self.ops if op.output == name), None)

    def prune(self) -> None:
        """Drop the ops that no output depends on, and their values: a rewrite may leave the ops it replaced."""
        needed = set(self.outputs)
        kept: list[Op] = []
        for op in reversed(self.ops):
            if op.output in needed:
                kept.append(op)
                needed.update(op.inputs)
        for op in self.ops:
            if op.output not in needed:
                del self.values[op.output]
        self.ops = kept[::-1]

    def dequantized_logits(self) -> str | None:
        """The integers the first output (the logits) dequantizes (through a ReLU applied to them, if any), so
        that a backend's logits compare as those integers; None where float ops follow the dequantize (a softmax
        head, a pooling of the last feature map, a flatten) and the logits compare as float32 bits."""
        op = self.producer(self.outputs[0]) if self.outputs else None
        return self._dequantized(op) if op is not None and op.kind == "dequantize" else None

    def final_integers(self) -> list[str]:
        """The integer values the outputs are computed from: what each output dequantizes (through a ReLU
        applied to them, if any), or, where float ops follow the dequantize (a softmax head, a global average
        pool of the last feature map, a flatten), the integers those float ops start from."""
        return self._output_tail()[0]

    def float_tail(self) -> set[str]:
        """The float values between the final integers and the outputs (dequantizes and outputs included): no
        quantizer rounds them again, so a backend computes them as the reference does, bit for bit."""
        return self._output_tail()[1]

    def _output_tail(self) -> tuple[list[str], set[str]]:
        finals: list[str] = []
        tail: set[str] = set()
        todo = list(reversed(self.outputs))
        while todo:
            name = todo.pop()
            op = self.producer(name)
            if name in tail or op is None or self.values[name].dtype is not DType.FLOAT32:
                continue
            tail.add(name)
            if op.kind == "dequantize":
                if (ints := self._dequantized(op)) not in finals:
                    finals.append(ints)
            else:
                todo.extend(reversed([i for i in op.inputs if i not in self.constants]))
        return finals, tail

    def _dequantized(self, op: Op) -> str:
        """The integers a dequantize reads, a ReLU applied to them seen through."""
        src = self.producer(op.inputs[0])
        return src.inputs[0] if src is not None and src.kind == "relu" else op.inputs[0]

    def summary(self) -> str:
        """One line per op, for humans."""
        lines = []
        for op in self.ops:
            t = self.values[op.output]
            scale = "" if t.scale is None else (f" s[{t.scale.size}]" if t.per_channel else f" s={float(t.scale):.4g}")
            lines.append(f"{op.output:<32} = {op.kind}({', '.join(op.inputs)}) : {t.dtype.value}{list(t.shape)}{scale}")
        return "\n".join(lines)
