"""How a backend's integer results agree with the reference interpreter's (numpy only).

Kept beside the IR rather than in :mod:`qcompile.reporting.verify` so that a backend artifact can be compared with the
reference without torch: the IR, its reference interpreter and these measures are all numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qcompile.errors import QCompileError
from qcompile.ir.graph import IRGraph


@dataclass
class TensorAgreement:
    """How one integer tensor compares: fraction of identical codes and the largest difference in LSB."""

    name: str
    elements: int = 0
    identical: int = 0
    max_lsb_diff: int = 0

    @property
    def identical_fraction(self) -> float:
        return self.identical / self.elements if self.elements else 1.0

    def update(self, ref: np.ndarray, other: np.ndarray) -> None:
        diff = np.abs(ref.astype(np.int64) - other.astype(np.int64))
        self.elements += diff.size
        self.identical += int((diff == 0).sum())
        self.max_lsb_diff = max(self.max_lsb_diff, int(diff.max(initial=0)))


def final_scale(ir: IRGraph) -> np.ndarray | None:
    """The scale the IR's logits are dequantized with, broadcast over (N, classes); None where float ops follow
    the dequantize (a softmax head, a pooling of the last feature map), whose outputs are compared bit for bit."""
    finals = ir.final_integers()
    if not finals:
        raise QCompileError("the IR's output is not computed from integers (no quantized layer before it)")
    logits = ir.dequantized_logits()
    return None if logits is None else ir.values[logits].broadcast_scale(2)


def _float_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as integers ordered like the floats, so that a difference counts units in the last place."""
    bits = np.ascontiguousarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def compare_logits(scale: np.ndarray | None, run: Callable[[np.ndarray], np.ndarray],
                   pairs: list[tuple[np.ndarray, np.ndarray]], name: str = "logits") -> dict[str, object]:
    """A backend's logits (``run(x)``) vs the reference's on ``(inputs, reference logits)`` pairs: top-1
    agreement and the final integer outputs (the accumulators the logits are dequantized from by ``scale``),
    or with ``scale`` None (a softmax head) the float32 outputs themselves, differences in units in the last
    place. Needs only the scale, not the IR, so that a machine without the IR's weights can check an artifact."""
    agreement = TensorAgreement(name)
    images = agree = 0
    for x, ref in pairs:
        out = run(x)
        if scale is None:
            agreement.update(_float_bits(ref), _float_bits(out))
        else:
            agreement.update(np.rint(ref / scale), np.rint(out / scale))
        images += len(x)
        agree += int((ref.argmax(1) == out.argmax(1)).sum())
    return {"images": images, "top1_agreement": agree / images if images else float("nan"),
            "identical_fraction": agreement.identical_fraction, "max_lsb_diff": agreement.max_lsb_diff}


def compare_backend(ir: IRGraph, run: Callable[[np.ndarray], np.ndarray],
                    pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, object]:
    """:func:`compare_logits` with the IR's own final scale."""
    return compare_logits(final_scale(ir), run, pairs, ir.final_integers()[0])
