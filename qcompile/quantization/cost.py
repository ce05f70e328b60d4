"""The paper's cost models (sec. 4): MACs from shapes, linear / quadratic compute cost, memory.

Linear: ``MACs * max(bw, ba)`` with bits rounded up to 4, 8 or 16 (what hardware actually offers).
Quadratic: ``MACs * bw * ba``. Memory: ``weights * bw`` (biases ignored). bf16 counts as 16 bits.
A matrix product of two tensors (attention over positions) counts as a layer whose weight is its second operand,
with no memory: its MACs at the width of its operands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx, nn

from qcompile.quantization.spec import LayerCost, Precision

BF16_BITS = 16


def hardware_bits(bits: int) -> int:
    """Round a bit width up to the datapath widths hardware offers: 4, 8, 16."""
    for width in (4, 8, 16):
        if bits <= width:
            return width
    raise ValueError(f"no hardware datapath for {bits} bits")


def layer_macs(module: nn.Module, node: fx.Node) -> int:
    """Multiply-accumulates of one conv/dense call from its output shape: B·K·A·Cin·Cout/groups, B·Cin·Cout."""
    out_shape = tuple(node.meta["tensor_meta"].shape)
    if isinstance(module, nn.Linear):
        return math.prod(out_shape[:-1]) * module.in_features * module.out_features
    conv = module
    batch, spatial = out_shape[0], out_shape[2:]
    return (
        batch
        * math.prod(conv.kernel_size)  # type: ignore[arg-type]
        * math.prod(spatial)
        * conv.in_channels  # type: ignore[operator]
        * conv.out_channels
        // conv.groups  # type: ignore[operator]
    )


def product_macs(node: fx.Node) -> int:
    """Multiply-accumulates of a matrix product of two tensors (attention over positions): every output element
    sums K products, K the first operand's last size."""
    first = node.args[0]
    assert isinstance(first, fx.Node)
    return math.prod(node.meta["tensor_meta"].shape) * first.meta["tensor_meta"].shape[-1]


def weight_count(module: nn.Module) -> int:
    """Number of weights (biases excluded, as the memory model says)."""
    return module.weight.numel()  # type: ignore[union-attr,operator]


def layer_cost(macs: int, weights: int, precision: Precision, stored_bits: int | None = None,
               latency_ns: int | None = None) -> LayerCost:
    """Cost of one layer at a precision; ``stored_bits`` overrides the weight bits its memory is counted at, and
    ``latency_ns`` is its measured time when a latency profile is in use."""
    return LayerCost(
        macs=macs,
        weights=weights,
        linear=macs * hardware_bits(max(precision.w_bits, precision.a_bits)),
        quadratic=macs * precision.w_bits * precision.a_bits,
        memory_bits=weights * (precision.w_bits if stored_bits is None else stored_bits),
        latency_ns=latency_ns,
    )


@dataclass(frozen=True)
class CostTotals:
    """Whole-model totals with ratios to bf16 at this width and to the width-1.0 bf16 model; with a latency
    profile, the predicted latency too (overhead included) and the float model's, its reference."""

    macs: int
    params: int
    linear: int
    quadratic: int
    memory_bits: int
    ref_macs: int
    ref_params: int
    latency_ns: int | None = None
    float_latency_ns: int | None = None

    def vs_bf16(self, kind: str, width1: bool = False) -> float:
        """``kind`` (linear, quadratic or memory) relative to bf16 at this width or, with ``width1``, at width 1;
        ``latency`` relative to the float model's predicted latency."""
        if kind == "latency":
            if self.latency_ns is None or not self.float_latency_ns:
                raise ValueError("no latency profile in this run")
            return self.latency_ns / self.float_latency_ns
        macs, params = (self.ref_macs, self.ref_params) if width1 else (self.macs, self.params)
        bf16 = {"linear": macs * BF16_BITS, "quadratic": macs * BF16_BITS**2, "memory": params * BF16_BITS}
        total = {"linear": self.linear, "quadratic": self.quadratic, "memory": self.memory_bits}
        return total[kind] / bf16[kind]

    def as_dict(self) -> dict[str, float | int]:
        keys = ("macs", "params", "linear", "quadratic", "memory_bits")
        kinds = ("linear", "quadratic", "memory")
        out = {**{k: getattr(self, k) for k in keys}, **{f"{k}_vs_bf16": self.vs_bf16(k) for k in kinds},
               **{f"{k}_vs_bf16_width1": self.vs_bf16(k, width1=True) for k in kinds}}
        if self.latency_ns is not None:
            out.update(predicted_latency_ms=self.latency_ns / 1e6, float_latency_ms=(self.float_latency_ns or 0) / 1e6,
                       latency_vs_float=self.vs_bf16("latency"))
        return out
