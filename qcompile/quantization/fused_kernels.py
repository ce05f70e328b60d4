"""Fused fake quantization for CUDA tensors, written in Triton: one pass over an activation instead of the eight
elementwise kernels of the eager definition, so QAT on a GPU is bound by its convolutions rather than by
re-reading every activation. Bit-identical with the eager definition in :mod:`qcompile.quantization.quantizer`
(IEEE division, round half to even, float64 for the requantize, the same float32 products), so it is used in
evaluation as well as in training. Triton is imported on first use; without it (or for CPU tensors, other
layouts, per-channel weight scales) the eager code runs.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

BLOCK = 1024
_ROUND32 = 12582912.0  # 1.5 * 2**23: (v + c) - c rounds |v| < 2**22 half to even in float32 arithmetic
_ROUND64 = 6755399441055744.0  # 1.5 * 2**52, the same in float64
SWITCH_ENV = "QCOMPILE_FUSED_QUANT"  # "0": off; "cpu": CPU tensors too, in Triton's interpreter (tests)


@functools.cache
def _kernels() -> ModuleType | None:
    """The compiled-on-demand kernels, or None where Triton is missing or turned off."""
    if os.environ.get(SWITCH_ENV) == "0":
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from qcompile.quantization import _triton_fake_quant

    return _triton_fake_quant


def set_enabled(on: bool) -> None:
    """Turn the kernels on (the default) or off for this process: the fallback where they fail on a device."""
    if on:
        os.environ.pop(SWITCH_ENV, None)
    else:
        os.environ[SWITCH_ENV] = "0"
    _kernels.cache_clear()


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its storage span exactly (any dense layout: NCHW, channels-last, ...)."""
    return x.is_contiguous() or x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def applies(x: torch.Tensor, *scales: torch.Tensor) -> bool:
    """Whether the fused kernels handle ``x`` (a dense CUDA tensor, or any with ``QCOMPILE_FUSED_QUANT=cpu``) with
    these scales."""
    on_device = x.is_cuda or os.environ.get(SWITCH_ENV) == "cpu"
    return (on_device and x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _dense(x) and all(s.device == x.device for s in scales) and _kernels() is not None)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                  with_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``clip(rhe(x / s), qmin, qmax) · s`` for a per-tensor ``scale``, and the in-range mask when asked."""
    k = _kernels()
    assert k is not None
    out = torch.empty_like(x)
    inside = torch.empty_like(x, dtype=torch.bool) if with_mask else out
    n = x.numel()
    k.fake_quant_kernel[(k.cdiv(n, BLOCK),)](x, scale.float().reshape(1), out, inside, n, float(qmin), float(qmax),
                                             _ROUND32, SAVE_MASK=with_mask, BLOCK=BLOCK)
    return out, inside if with_mask else None


def requantize(y: torch.Tensor, s_acc: torch.Tensor, s_out: torch.Tensor, axis: int, qmin: int, qmax: int,
               with_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The accumulator requantize ``clip(rhe(float32(rhe(y / s_acc[c])) · M[c]), qmin, qmax) · s_out`` with
    ``M = float32(s_acc / s_out)`` and ``s_acc`` per channel along ``axis``."""
    k = _kernels()
    assert k is not None
    out = torch.empty_like(y)
    inside = torch.empty_like(y, dtype=torch.bool) if with_mask else out
    n = y.numel()
    k.requantize_kernel[(k.cdiv(n, BLOCK),)](y, s_acc.float().reshape(-1).contiguous(), s_out.float().reshape(1),
                                             out, inside, n, y.shape[axis], y.stride(axis), float(qmin), float(qmax),
                                             _ROUND32, _ROUND64, SAVE_MASK=with_mask, BLOCK=BLOCK,
                                             enable_fp_fusion=False)  # no fma: the product is rounded first
    return out, inside if with_mask else None
