"""IR tensor types: integer dtypes at their real width, int32 accumulators, float32; zero point is always 0."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


def code_range(bits: int, signed: bool, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of b-bit codes. Signed weights are symmetric (int8 in [-127, 127], so +-bound map to +-qmax
    and a weight's negation is exact); signed activations use the full range (``symmetric=False``: int8 in
    [-128, 127], the container's, so a runtime needs no clip after quantizing). Unsigned tensors (after ReLU)
    gain the sign bit as one extra bit of range ([0, 2^b - 1])."""
    if not signed:
        return 0, 2**bits - 1
    return (-(2 ** (bits - 1)) + (1 if symmetric else 0), 2 ** (bits - 1) - 1)


class DType(enum.Enum):
    INT4 = "int4"
    UINT4 = "uint4"
    INT8 = "int8"
    UINT8 = "uint8"
    INT32 = "int32"
    FLOAT32 = "float32"

    @property
    def is_int(self) -> bool:
        return self is not DType.FLOAT32

    @property
    def bits(self) -> int:
        return {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int32": 32, "float32": 32}[self.value]

    @property
    def signed(self) -> bool:
        return self not in (DType.UINT4, DType.UINT8)

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.signed)[1]

    @classmethod
    def for_bits(cls, bits: int, signed: bool) -> DType:
        """The narrowest container for a b-bit code: 2..4 bits in int4/uint4, 5..8 bits in int8/uint8."""
        if bits <= 4:
            return cls.INT4 if signed else cls.UINT4
        if bits <= 8:
            return cls.INT8 if signed else cls.UINT8
        raise ValueError(f"no integer container for {bits}-bit codes")


@dataclass
class TensorInfo:
    """A value's type: dtype, shape (dim 0 is the batch for activations), scale and code range.

    ``scale`` is a float32 array: shape () per tensor, or (C,) per channel along ``axis``. ``qmin``/``qmax`` are the
    code range actually used (a 3-bit code in an int4 container has a narrower range than the container).
    """

    dtype: DType
    shape: tuple[int, ...]
    scale: np.ndarray | None = None
    axis: int | None = None
    qmin: int | None = None
    qmax: int | None = None

    def __post_init__(self) -> None:
        if self.scale is not None:
            self.scale = np.asarray(self.scale, dtype=np.float32)
        if self.dtype.is_int and self.dtype is not DType.INT32:
            self.qmin = self.dtype.qmin if self.qmin is None else self.qmin
            self.qmax = self.dtype.qmax if self.qmax is None else self.qmax

    @property
    def per_channel(self) -> bool:
        return self.scale is not None and self.scale.ndim == 1

    def broadcast_scale(self, ndim: int) -> np.ndarray:
        """The scale shaped to broadcast over a tensor of ``ndim`` dims."""
        assert self.scale is not None
        return self.along_channels(self.scale, ndim)

    def along_channels(self, vec: np.ndarray, ndim: int) -> np.ndarray:
        """A per-channel vector of this value (its scale, a requantize multiplier) shaped to broadcast along its
        channel axis (``axis``, else 1) over ``ndim`` dims; a scalar stays as it is."""
        if vec.ndim != 1:
            return vec
        shape = [1] * ndim
        shape[self.axis if self.axis is not None else 1] = -1
        return vec.reshape(shape)
