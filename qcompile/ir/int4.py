"""The one 4-bit codec: two codes per byte, element 2i in the low nibble and 2i+1 in the high one.

Signed codes are stored as their low four bits (two's complement), so int4 and uint4 share one packing and
only :func:`unpack` needs to know which it is. An odd number of codes is padded with a zero nibble. This is
the layout of the IR's ``tensors.npz``, of ONNX INT4/UINT4 raw data (``pack(codes).tobytes()``) and of the
TVM parameters (``pack(codes).view(np.int8)``, unpacked in the graph).
"""

from __future__ import annotations

import numpy as np


def pack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (any shape, values in [-8, 15]) as a flat uint8 array of ``ceil(size / 2)`` bytes."""
    flat = (np.asarray(codes).reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    """Inverse of :func:`pack`: int32 codes of ``shape``, sign-extended from four bits when ``signed``."""
    packed = np.asarray(packed).reshape(-1)
    if packed.dtype == np.int8:  # the TVM view of the same bytes
        packed = packed.view(np.uint8)
    n = int(np.prod(shape)) if shape else 1
    nib = np.empty(packed.size * 2, dtype=np.int32)
    nib[0::2] = packed & 0xF
    nib[1::2] = packed >> 4
    nib = nib[:n]
    if signed:
        nib = np.where(nib >= 8, nib - 16, nib)
    return nib.reshape(shape)
