"""The Triton kernels behind :mod:`qcompile.quantization.fused_kernels` (imported only where Triton is).

Elements are read in memory order, whatever the layout; the requantize finds an element's channel as
``(offset // stride[axis]) % channels``, which holds for every dense layout. Rounding half to even is
``(v + c) - c`` with ``c = 1.5 · 2^23`` (``2^52`` in float64): exact IEEE arithmetic, the same on the GPU and in
Triton's CPU interpreter, and right for every ``|v| < 2^22``; larger ``|v|`` clip to the range either way.
"""

import triton
import triton.language as tl

cdiv = triton.cdiv


@triton.jit
def _round_half_even(v, c):
    return (v + c) - c


@triton.jit
def _store(out_ptr, offs, value, valid):
    """Store float32 ``value`` in the output's dtype, rounding to nearest even as PyTorch's ``.to`` does."""
    if out_ptr.dtype.element_ty == tl.float32:
        tl.store(out_ptr + offs, value, mask=valid)
    else:
        tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=valid)


@triton.jit
def fake_quant_kernel(x_ptr, s_ptr, out_ptr, inside_ptr, n, qmin, qmax, c32,
                      SAVE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    s = tl.load(s_ptr)
    q = _round_half_even(tl.div_rn(x, s), c32)
    if SAVE_MASK:
        tl.store(inside_ptr + offs, (q >= qmin) & (q <= qmax), mask=valid)
    out = tl.minimum(tl.maximum(q, qmin), qmax) * s
    _store(out_ptr, offs, out, valid)


@triton.jit
def requantize_kernel(y_ptr, sacc_ptr, sout_ptr, out_ptr, inside_ptr, n, channels, channel_stride, qmin, qmax,
                      c32, c64, SAVE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    channel = (offs // channel_stride) % channels
    y = tl.load(y_ptr + offs, mask=valid, other=0.0).to(tl.float64)
    s_acc = tl.load(sacc_ptr + channel, mask=valid, other=1.0).to(tl.float64)
    s_out = tl.load(sout_ptr)
    acc = _round_half_even(y / s_acc, c64).to(tl.float32)
    mult = (s_acc / s_out.to(tl.float64)).to(tl.float32)
    q = _round_half_even(acc * mult, c32)
    if SAVE_MASK:
        tl.store(inside_ptr + offs, (q >= qmin) & (q <= qmax), mask=valid)
    out = tl.minimum(tl.maximum(q, qmin), qmax) * s_out
    _store(out_ptr, offs, out, valid)
