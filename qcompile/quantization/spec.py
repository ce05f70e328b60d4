"""Typed quantization state: what a quantizer computes (QuantSpec) and what a graph node carries (NodeQuant).

Every pass reads and writes per-layer state through :func:`get_annotation` / :func:`annotate` on
``node.meta["qcompile"]``. Annotations live on graph nodes, so a module called at two sites gets two of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from torch.fx import Node

from qcompile.ir.types import code_range

META_KEY = "qcompile"


class NumFormat(enum.Enum):
    """How a tensor is stored: uniform integers, or bf16 (the unquantized baseline)."""

    INT = "int"
    BF16 = "bf16"


class Granularity(enum.Enum):
    """One scale per tensor, or one per output channel (weights)."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


class Calibrator(enum.Enum):
    """How a quantizer's bound is chosen."""

    MAX = "max"  # max|w| of the tensor or channel: the paper's weight bound
    EMA_MAX = "ema_max"  # EMA of the per-batch max|x|: the paper's activation bound
    PERCENTILE = "percentile"
    MSE = "mse"  # the bound minimising quantization MSE
    NONE = "none"  # bf16: nothing to calibrate


class LayerRole(enum.Enum):
    """Where a compute layer sits; recipes keep FIRST and LAST layers at higher precision."""

    FIRST = "first"
    LAST = "last"
    HIDDEN = "hidden"


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer's contract: zero point 0, ``q = clip(round_half_even(x / s), qmin, qmax)``, ``s = bound / qmax``.

    ``symmetric`` codes (weights) stop at ``-qmax``; activations use the container's full range down to
    ``-2^(b-1)`` (see :func:`qcompile.ir.types.code_range`)."""

    bits: int
    signed: bool = True
    granularity: Granularity = Granularity.PER_TENSOR
    calibrator: Calibrator = Calibrator.EMA_MAX
    fmt: NumFormat = NumFormat.INT
    symmetric: bool = True
    positive: bool = False
    """Unsigned codes from 1: for a divisor, which code 0 would make a division by zero."""

    def __post_init__(self) -> None:
        if self.positive and self.signed:
            raise ValueError("a positive spec is unsigned")
        if self.fmt is NumFormat.BF16:
            if self.bits != 16:
                raise ValueError("a bf16 spec has 16 bits")
        elif not 2 <= self.bits <= 16:
            raise ValueError(f"integer quantizers support 2..16 bits, got {self.bits}")

    @classmethod
    def bf16(cls) -> QuantSpec:
        """The unquantized baseline: bf16 storage, nothing to calibrate."""
        return cls(bits=16, signed=True, calibrator=Calibrator.NONE, fmt=NumFormat.BF16)

    @property
    def is_quantized(self) -> bool:
        return self.fmt is NumFormat.INT

    @property
    def qmin(self) -> int:
        return 1 if self.positive else code_range(self.bits, self.signed, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.signed, self.symmetric)[1]

    def with_signed(self, signed: bool) -> QuantSpec:
        return replace(self, signed=signed)

    def describe(self) -> str:
        if not self.is_quantized:
            return "bf16"
        return f"{'s' if self.signed else 'u'}{self.bits}{'pos' if self.positive else ''}"


@dataclass(frozen=True)
class Precision:
    """Bit widths chosen for one compute layer: weights and the activation it consumes."""

    w_bits: int
    a_bits: int

    @property
    def is_float(self) -> bool:
        return self.w_bits == 16 and self.a_bits == 16

    def __str__(self) -> str:
        return "bf16" if self.is_float else f"w{self.w_bits}a{self.a_bits}"


BF16 = Precision(16, 16)


@dataclass(frozen=True)
class LayerCost:
    """One layer's cost under the paper's models (sec. 4); see :mod:`qcompile.passes.annotate_cost`."""

    macs: int
    weights: int
    linear: int
    quadratic: int
    memory_bits: int
    latency_ns: int | None = None
    """Measured: from a latency profile (:mod:`qcompile.quantization.latency`), when the run has one."""


@dataclass
class NodeQuant:
    """Everything qcompile knows about one compute node (a conv or dense call site); on a matrix product of two
    tensors, its precision and cost alone."""

    role: frozenset[LayerRole] = frozenset()  # set for compute nodes by assign_precision
    precision: Precision | None = None
    weight: QuantSpec | None = None
    input_act: QuantSpec | None = None
    output_act: QuantSpec | None = None
    cost: LayerCost | None = None


def get_annotation(node: Node) -> NodeQuant | None:
    """The node's annotation, or None if no pass has annotated it."""
    ann = node.meta.get(META_KEY)
    if ann is not None and not isinstance(ann, NodeQuant):
        raise TypeError(f"node {node.name}: meta[{META_KEY!r}] holds {type(ann).__name__}, expected NodeQuant")
    return ann


def annotate(node: Node) -> NodeQuant:
    """The node's annotation, created empty on first use."""
    ann = get_annotation(node)
    if ann is None:
        ann = NodeQuant()
        node.meta[META_KEY] = ann
    return ann
