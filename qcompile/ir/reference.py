"""The numpy reference interpreter: the executable definition of the integer IR (no torch needed).

Semantics per op (``rhe`` = round half to even, all float arithmetic in float32 unless said otherwise):

- ``quantize``: ``clip(rhe(x / s_out), qmin, qmax)``.
- ``dequantize``: ``float32(q) * s_in`` (per tensor or per channel).
- ``conv2d`` / ``dense`` on integers: exact integer accumulation of ``q_x · q_w`` plus the int32 bias; an
  accumulator outside int32 raises :class:`IntegerOverflowError`. On float32 operands: a float convolution.
  ``dense`` contracts the last axis of an input of any rank (``nn.Linear`` on a channels-last tensor), so its
  output channels, and the accumulator's per-channel scale, run along the last axis (the value's ``axis``).
- ``matmul`` of two code tensors (batch axes broadcasting, as ``np.matmul``): exact integer accumulation of
  ``Σ q_a · q_b``, an int32 accumulator at the one scale ``float32(s_a · s_b)`` that a ``requantize`` reads. Of
  float32 operands (a float model's): in float64, rounded once.
- ``requantize``: ``clip(rhe(float32(acc) * M[c]), lo, qmax)`` with ``lo = max(qmin, 0)`` when a ReLU is folded
  in, ``c`` along the accumulator's channel axis; in ``dyadic`` mode ``M = m · 2^-shift`` with an int32 ``m`` and
  integer-only rounding.
- ``relu``, ``maxpool2d``, ``adaptive_maxpool2d`` (PyTorch's adaptive windows), ``flatten``, ``reshape``,
  ``transpose``, ``flip``, ``slice``, ``pad`` (zero), ``concat``, ``upsample_nearest`` (each pixel repeated
  ``scale`` times along height and width): on codes directly (they commute with a positive scale and a zero point
  of 0).
- ``lut``: ``table[q - qmin_in]``, a table of output codes per input code: a unary function of a tensor of at
  most 8 bits, tabulated at lowering (exact by construction in every backend).
- ``global_avgpool`` on codes of at most 8 bits, per tensor, (N, C, H, W) or (N, C, L): the sum over every
  axis after the channels, ``clip(rhe(float32(Σ q) · M), qmin, qmax)`` with ``M = s_in / (s_out · float32(H·W))``
  in float32: onnxruntime's ``QLinearGlobalAveragePool`` (MLAS), bit for bit, defined where MLAS defines it
  (:func:`global_avgpool_multiplier`). Those axes are kept as 1s, or dropped without ``keepdim``.
- ``add``, ``mul``, ``maximum``, ``minimum`` (broadcasting), ``avgpool2d``, ``adaptive_avgpool2d``, ``mean``:
  float ops between dequantize and quantize (ONNX DQ → op → Q); sums are taken in float64 and rounded once to float32.
- ``upsample_bilinear`` to ``size`` (PyTorch's linear interpolation, ``align_corners`` either way): a float op,
  in float64, width then height, rounded once (:func:`linear_resize_taps`).
- ``reduce_sum`` over ``dims`` (timm's selective kernels sum their branches): a float op, summed in float64.
- ``reduce_l2`` over ``dims`` (``torch.norm(x, p=2, dim=...)``: ConvNeXt V2's global response normalisation):
  a float op, ``sqrt(Σ x²)`` in float64, rounded once.
- ``reduce_max`` over ``dims`` (CBAM's ``torch.max(x, 1)[0]``, ``amax``): a float op, exact in any precision.
- ``layer_norm(x, w, b)``: over the last ``w.ndim`` axes, in float64: ``d = x - mean(x)``,
  ``var = mean(d²)`` (biased), ``d / sqrt(var + eps) · w + b``, rounded once to float32. ``eps`` is a float32
  value (what PyTorch adds in float32 and ONNX's attribute holds); a norm without weight or bias has ones and
  zeros (exact). A float op between dequantize and quantize: the backends compute it in float64 too, so only a
  reduction order can differ, far below a float32 rounding step.
- ``group_norm(x, w, b)`` with ``groups`` G on (N, C, ...): ``layer_norm``'s float64 normalisation over each
  group of C/G channels and every axis after them, then ``· w + b`` per channel (shape (C,)), rounded once to
  float32.
- ``normalize`` over ``dim`` (``F.normalize``: a cosine classifier, an embedding): in float64,
  ``x / max(sqrt(Σ x²), eps)``, rounded once to float32.
- ``softmax`` and ``log_softmax`` over ``dim`` of float values (a classifier's head, after its logits): in
  float64, ``e = exp(x - max)``, ``e / Σe`` or ``x - max - log(Σe)``, rounded once to float32.
- ``activation`` of float values (a float model's SiLU, GELU, sigmoid, ...; a quantized model tabulates its
  functions as ``lut`` instead): PyTorch's definition in float64, rounded once to float32. The backends run
  their runtimes' float32 kernels, so they agree with it within float32 rounding, not bit for bit, as a float
  conv does: only the float model that ``--measure`` times beside the artifact has these ops.
- Pooling with ``ceil_mode`` follows PyTorch: the last window may hang over the (padded) input; max pooling
  ignores the overhang, average pooling divides by the window's part inside the padded input
  (``count_include_pad``) or inside the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qcompile.errors import QCompileError
from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.ops import OpTable
from qcompile.ir.types import TensorInfo

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_EXACT_F64 = 2**53


class IntegerOverflowError(QCompileError, ArithmeticError):
    """An accumulator left (or could leave) the int32 range: an integer kernel would silently wrap."""


class DivisionByZeroError(QCompileError, ArithmeticError):
    """A division of two values divided by zero on some input: its divisor is quantized, and code 0 is exactly 0,
    so a divisor that is small next to its quantizer's range becomes 0 (``0 / 0`` has no code at all)."""


class InputShapeError(QCompileError, ValueError):
    """Inputs that are not of the shape the graph was compiled for (batch size aside)."""


def rhe(x: np.ndarray) -> np.ndarray:
    """Round half to even (numpy's rint), as ONNX QuantizeLinear and torch.round."""
    return np.rint(x)


def _as_f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False)


def global_avgpool_multiplier(codes: TensorInfo, pooled: TensorInfo) -> np.float32 | None:
    """``global_avgpool``'s float32 ``M = s_in / (s_out · float32(area))``, computed as MLAS computes it; None
    where the op is undefined: a sum that could leave int32, an area of 2^24 or more, or ``M`` outside
    [2^-32, 256) (MLAS refuses those: every output would be constant)."""
    area = math.prod(int(d) for d in codes.shape[2:])
    largest = max(abs(int(codes.qmin)), abs(int(codes.qmax)))
    if (len(codes.shape) < 3 or codes.scale is None or pooled.scale is None or area >= 2**24
            or area * largest > INT32_MAX):
        return None
    f32 = np.float32
    m = f32(f32(codes.scale) / (f32(pooled.scale) * f32(area)))
    return m if 2.0**-32 <= m < 256.0 else None


def _conv_windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int], pad_value: float) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) windows of ``x`` (a view where possible)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    win = sliding_window_view(x, span, axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def exact_gemm_dtype(a: np.ndarray, b: np.ndarray, k: int) -> type:
    """The cheapest dtype whose GEMM of integer ``a`` and ``b`` over ``k`` terms is exact (2^24 / 2^53 bounds)."""
    bound = int(np.abs(a).max(initial=0)) * int(np.abs(b).max(initial=0)) * k
    if bound < 2**24:
        return np.float32
    return np.float64 if bound < _EXACT_F64 else np.int64


def conv2d(x: np.ndarray, w: np.ndarray, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int) -> np.ndarray:
    """Grouped 2-d convolution as im2col + GEMM; integer inputs accumulate exactly (int64 result)."""
    n, c, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    integer = np.issubdtype(x.dtype, np.integer)
    acc_t = exact_gemm_dtype(x, w, cg * kh * kw) if integer else np.float64
    wg = w.reshape(groups, cout // groups, cg * kh * kw).astype(acc_t)
    chunk = max(1, 2**24 // max(1, c * kh * kw * h * wd))  # bound the im2col buffer
    outs = []
    for start in range(0, n, chunk):
        win = _conv_windows(x[start:start + chunk], (kh, kw), stride, padding, dilation, 0)
        b, _, oh, ow = win.shape[:4]
        if groups > 1:  # all groups in one contraction (a Python loop over a depthwise conv's groups is slow)
            part = np.ascontiguousarray(win, dtype=acc_t).reshape(b, groups, cg, oh, ow, kh * kw)
            wk = wg.reshape(groups, cout // groups, cg, kh * kw)
            outs.append(np.einsum("bgchwk,gock->bgohw", part, wk, optimize=True).reshape(b, cout, oh, ow))
            continue
        cols = np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5), dtype=acc_t).reshape(b * oh * ow, c * kh * kw)
        outs.append((cols @ wg[0].T).reshape(b, oh, ow, -1).transpose(0, 3, 1, 2))
    out = np.concatenate(outs)
    return out.astype(np.int64) if integer else out


def _check_int32(acc: np.ndarray, op: Op) -> np.ndarray:
    lo, hi = int(acc.min(initial=0)), int(acc.max(initial=0))
    if lo < INT32_MIN or hi > INT32_MAX:
        raise IntegerOverflowError(
            f"{op.kind} {op.output} ({op.source}): accumulator range [{lo}, {hi}] exceeds int32; an integer "
            "kernel would wrap. Use fewer bits, a smaller bound, or split the reduction."
        )
    return acc.astype(np.int32)


def pool_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
    """PyTorch's pooled length: with ``ceil``, a last window that starts inside the padded input counts."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    if not ceil:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pad else out


def _pool_windows(x: np.ndarray, attrs: dict[str, Any], pad_value: float,
                  overhang_value: float | None = None) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) windows over ``x`` padded with ``pad_value``; a ``ceil_mode`` window's part past
    the padded input reads ``overhang_value`` (by default ``pad_value``)."""
    kernel, stride, padding = tuple(attrs["kernel"]), tuple(attrs["stride"]), tuple(attrs["padding"])
    dilation = tuple(attrs.get("dilation", (1, 1)))  # average pooling has none
    extra = [0, 0]
    if attrs["ceil_mode"]:
        for i, (size, k, s, p, d) in enumerate(zip(x.shape[2:], kernel, stride, padding, dilation)):
            out = pool_output_size(size, k, s, p, d, True)
            extra[i] = max(0, (out - 1) * s + d * (k - 1) + 1 - (size + 2 * p))
    x = np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])), constant_values=pad_value)
    if any(extra):
        fill = pad_value if overhang_value is None else overhang_value
        x = np.pad(x, ((0, 0), (0, 0), (0, extra[0]), (0, extra[1])), constant_values=fill)
    return _conv_windows(x, kernel, stride, (0, 0), dilation, pad_value)


def _avgpool(x: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """Window sums in float64 over the divisor PyTorch uses, rounded once to float32."""
    sums = _pool_windows(x.astype(np.float64), attrs, 0.0).sum(axis=(-2, -1))
    if attrs["count_include_pad"] and not attrs["ceil_mode"]:
        return _as_f32(sums / float(np.prod(attrs["kernel"])))
    return _as_f32(sums / avgpool_divisors(x.shape[2:], attrs))


def avgpool_divisors(size: tuple[int, ...], attrs: dict[str, Any]) -> np.ndarray:
    """The (OH, OW) divisors of ``avgpool2d``'s windows over an (H, W) map, PyTorch's: the padding counts when
    included, the overhang of a ``ceil_mode`` window never."""
    ones = np.ones((1, 1, *size), dtype=np.float64)
    return _pool_windows(ones, attrs, 1.0 if attrs["count_include_pad"] else 0.0, 0.0).sum(axis=(-2, -1))[0, 0]


def avgpool_windows(size: tuple[int, ...], attrs: dict[str, Any]) -> np.ndarray:
    """``avgpool2d``'s windows over an (H, W) map as an (H·W, OH·OW) 0/1 matrix (pixel in window), so that a
    backend without a float64 pooling sums the windows in float64 by a matrix product."""
    h, w = size
    basis = np.eye(h * w, dtype=np.float64).reshape(h * w, 1, h, w)
    return _pool_windows(basis, attrs, 0.0).sum(axis=(-2, -1)).reshape(h * w, -1)


def linear_resize_taps(size: int, out: int, align_corners: bool, scale: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's linear interpolation along one axis (``upsample_bilinear2d``), as the two source indices of each
    output and their float64 weights: source ``s = step · i`` with ``align_corners``, else ``step · (i + 0.5) − 0.5``
    clamped at 0, where ``step`` is ``(size − 1) / (out − 1)``, or ``1 / scale`` for a scale factor the model gave
    (``scale`` > 0), else ``size / out``; the neighbours ``floor(s)`` and the next (the last pixel repeats),
    weighted ``1 − λ`` and ``λ``."""
    if align_corners:
        step = (size - 1) / (out - 1) if out > 1 else 0.0
    else:
        step = 1.0 / scale if scale > 0 else size / out
    low, high, w_low, w_high = (np.zeros(out, np.int64), np.zeros(out, np.int64), np.zeros(out), np.zeros(out))
    for i in range(out):
        src = step * i if align_corners else max(step * (i + 0.5) - 0.5, 0.0)
        low[i] = min(int(math.floor(src)), size - 1)
        high[i] = low[i] + (1 if low[i] < size - 1 else 0)
        w_high[i] = min(max(src - low[i], 0.0), 1.0)
        w_low[i] = 1.0 - w_high[i]
    return low, high, w_low, w_high


def bilinear_taps(shape: tuple[int, ...], attrs: dict[str, Any]) -> list[tuple[np.ndarray, ...]]:
    """:func:`linear_resize_taps` of ``upsample_bilinear``'s width, then its height (PyTorch's order)."""
    (h, w), (oh, ow), (sh, sw) = shape[2:], attrs["size"], attrs["scale"]
    align = attrs["align_corners"]
    return [linear_resize_taps(w, ow, align, sw), linear_resize_taps(h, oh, align, sh)]


def resize_bilinear(x: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """``upsample_bilinear`` in float64, two weighted taps per output along the width, then the height, each
    ``x[low] · w_low + x[high] · w_high`` (no fused multiply-add), rounded once."""
    y = x.astype(np.float64)
    for axis, (low, high, w_low, w_high) in zip((3, 2), bilinear_taps(x.shape, attrs)):
        shape = (-1, 1) if axis == 2 else (-1,)
        y = np.take(y, low, axis) * w_low.reshape(shape) + np.take(y, high, axis) * w_high.reshape(shape)
    return _as_f32(y)


def adaptive_window(i: int, cells: int, size: int) -> tuple[int, int]:
    """PyTorch's adaptive window ``[start, end)`` of output cell ``i`` of ``cells`` over ``size`` inputs."""
    return (i * size) // cells, math.ceil((i + 1) * size / cells)


def _adaptive_pool(x: np.ndarray, out_size: tuple[int, int], reduce: Callable[..., np.ndarray],
                   dtype: Any) -> np.ndarray:
    n, c, h, w = x.shape
    oh, ow = out_size
    out = np.empty((n, c, oh, ow), dtype=dtype)
    for i in range(oh):
        h0, h1 = adaptive_window(i, oh, h)
        for j in range(ow):
            w0, w1 = adaptive_window(j, ow, w)
            out[:, :, i, j] = reduce(x[:, :, h0:h1, w0:w1], axis=(2, 3))
    return out


def _adaptive_avg(x: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    return _as_f32(_adaptive_pool(x.astype(np.float64), out_size, np.mean, np.float64))


def _normalized(x64: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps)`` over ``axes`` in float64, in two passes: the mean, then the biased
    variance of the centred values."""
    d = x64 - x64.mean(axis=axes, keepdims=True)
    return d / np.sqrt((d * d).mean(axis=axes, keepdims=True) + float(eps))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Layer normalisation over the last ``w.ndim`` axes in float64, rounded once to float32."""
    y = _normalized(x.astype(np.float64), tuple(range(x.ndim - w.ndim, x.ndim)), eps)
    return _as_f32(y * w.astype(np.float64) + b.astype(np.float64))


def group_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """Group normalisation in float64 (two passes per group of channels, as :func:`layer_norm`), the per-channel
    affine in float64 too, rounded once to float32."""
    n, c = x.shape[:2]
    y = _normalized(x.astype(np.float64).reshape(n, groups, -1), (2,), eps).reshape(x.shape)
    channels = (1, c) + (1,) * (x.ndim - 2)
    return _as_f32(y * w.astype(np.float64).reshape(channels) + b.astype(np.float64).reshape(channels))


def softmax(x: np.ndarray, dim: int, log: bool = False) -> np.ndarray:
    """Softmax (or its log) over ``dim`` in float64, rounded once to float32."""
    shifted = x.astype(np.float64) - x.max(axis=dim, keepdims=True)
    total = np.exp(shifted).sum(axis=dim, keepdims=True)
    return _as_f32(shifted - np.log(total) if log else np.exp(shifted) / total)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x), as e^x / (1 + e^x) for negative x: no overflow, and no cancellation in the tail."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


_erf = np.frompyfunc(math.erf, 1, 1)
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x * math.sqrt(0.5)).astype(np.float64)),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda x: np.clip(x + 3.0, 0.0, 6.0) / 6.0,
}


_ARITHMETIC: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "add": lambda x, a: x + a, "mul": lambda x, a: x * a, "div": lambda x, a: x / a,
    "rsub": lambda x, a: a - x, "rdiv": lambda x, a: a / x,
}


def activation(x: np.ndarray, function: str, attrs: dict[str, Any]) -> np.ndarray:
    """PyTorch's float ``function`` (an :data:`~qcompile.ir.ops.ACTIVATIONS` name; ``clip`` reads ``min``/``max``
    from ``attrs``, ``leaky_relu`` and arithmetic with a number ``alpha``) in float64, rounded once to float32."""
    d = x.astype(np.float64)
    if function == "clip":
        lo, hi = attrs.get("min", -np.inf), attrs.get("max", np.inf)
        return _as_f32(np.minimum(np.maximum(d, lo), hi))
    if function == "leaky_relu":
        return _as_f32(np.where(d > 0, d, attrs["alpha"] * d))
    if function in _ARITHMETIC:
        return _as_f32(_ARITHMETIC[function](d, float(attrs["alpha"])))
    return _as_f32(_ACTIVATIONS[function](d))


def _index(items: list[dict[str, Any]]) -> tuple[object, ...]:
    out: list[object] = []
    for it in items:
        if "slice" in it:
            out.append(slice(*it["slice"]))
        elif "index" in it:
            out.append(it["index"])
        elif "ellipsis" in it:
            out.append(Ellipsis)
        else:
            out.append(None)
    return tuple(out)


OPS: OpTable[Callable[[Op, list[np.ndarray], IRGraph], np.ndarray]] = OpTable("reference")
"""The reference's implementation of every op kind: ``impl(op, args, graph)``."""


@OPS.implements("quantize")
def _quantize(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    out_t = graph.values[op.output]
    q = rhe(_as_f32(args[0]) / out_t.broadcast_scale(args[0].ndim))
    return np.clip(q, out_t.qmin, out_t.qmax).astype(np.int32)


@OPS.implements("dequantize")
def _dequantize(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    in_t = graph.values[op.inputs[0]]
    return _as_f32(args[0]).astype(np.float32) * in_t.broadcast_scale(args[0].ndim)


@OPS.implements("requantize")
def _requantize(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    a, out_t, acc_t = op.attrs, graph.values[op.output], graph.values[op.inputs[0]]
    lo = max(out_t.qmin, 0) if a["relu"] else out_t.qmin
    x = args[0]
    if a["mode"] == "dyadic":
        m = acc_t.along_channels(graph.constants[a["mantissa"]].astype(np.int64), x.ndim)
        s = acc_t.along_channels(graph.constants[a["shift"]].astype(np.int64), x.ndim)
        v = x.astype(np.int64) * m
        q = v >> s
        r = v - (q << s)
        half = np.left_shift(1, s - 1)
        q = q + ((r > half) | ((r == half) & (q & 1 == 1))).astype(np.int64)
    else:
        q = rhe(_as_f32(x) * acc_t.along_channels(graph.constants[a["multiplier"]], x.ndim))
    return np.clip(q, lo, out_t.qmax).astype(np.int32)


@OPS.implements("conv2d")
def _conv2d(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    a, x, w = op.attrs, args[0], args[1]
    acc = conv2d(x, w, tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), a["groups"])
    if len(args) > 2:
        acc = acc + args[2].reshape(1, -1, 1, 1).astype(acc.dtype)
    return _check_int32(acc, op) if np.issubdtype(x.dtype, np.integer) else _as_f32(acc)


@OPS.implements("dense")
def _dense(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    x, w = args[0], args[1]
    if np.issubdtype(x.dtype, np.integer):
        acc_t = exact_gemm_dtype(x, w, w.shape[1])
        acc = (x.astype(acc_t) @ w.astype(acc_t).T).astype(np.int64)
        if len(args) > 2:
            acc = acc + args[2].astype(np.int64)
        return _check_int32(acc, op)
    out = x.astype(np.float64) @ w.astype(np.float64).T
    return _as_f32(out + args[2] if len(args) > 2 else out)


@OPS.implements("matmul")
def _matmul(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    a, b = args
    if not np.issubdtype(a.dtype, np.integer):
        return _as_f32(np.matmul(a.astype(np.float64), b.astype(np.float64)))
    acc_t = exact_gemm_dtype(a, b, a.shape[-1])
    return _check_int32(np.matmul(a.astype(acc_t), b.astype(acc_t)).astype(np.int64), op)


@OPS.implements("relu")
def _relu(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.maximum(args[0], 0).astype(args[0].dtype)


@OPS.implements("maxpool2d")
def _maxpool2d(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    x = args[0]
    pad = np.iinfo(np.int32).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    return _pool_windows(x, op.attrs, pad).max(axis=(-2, -1)).astype(x.dtype)


@OPS.implements("avgpool2d")
def _avgpool2d(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return _avgpool(args[0], op.attrs)


@OPS.implements("adaptive_avgpool2d")
def _adaptive_avgpool2d(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return _adaptive_avg(args[0], tuple(op.attrs["output_size"]))


@OPS.implements("adaptive_maxpool2d")
def _adaptive_maxpool2d(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return _adaptive_pool(args[0], tuple(op.attrs["output_size"]), np.max, args[0].dtype)


@OPS.implements("upsample_bilinear")
def _upsample_bilinear(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return resize_bilinear(args[0], op.attrs)


@OPS.implements("mean")
def _mean(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return _as_f32(args[0].astype(np.float64).mean(axis=tuple(op.attrs["dims"]), keepdims=op.attrs["keepdim"]))


@OPS.implements("reduce_sum")
def _reduce_sum(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return _as_f32(args[0].astype(np.float64).sum(axis=tuple(op.attrs["dims"]), keepdims=op.attrs["keepdim"]))


def _l2_norm(x64: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """``sqrt(Σ x²)`` over ``axes`` of a float64 array, as ``normalize`` and ``reduce_l2`` take it."""
    return np.sqrt((x64 * x64).sum(axis=axes, keepdims=keepdims))


@OPS.implements("reduce_l2")
def _reduce_l2(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return _as_f32(_l2_norm(args[0].astype(np.float64), tuple(op.attrs["dims"]), op.attrs["keepdim"]))


@OPS.implements("reduce_max")
def _reduce_max(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return _as_f32(args[0]).max(axis=tuple(op.attrs["dims"]), keepdims=op.attrs["keepdim"])


@OPS.implements("global_avgpool")
def _global_avgpool(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    in_t, out_t = graph.values[op.inputs[0]], graph.values[op.output]
    m = global_avgpool_multiplier(in_t, out_t)
    if m is None:
        raise ValueError(f"global_avgpool {op.output} ({op.source}): undefined for these scales and this area")
    acc = args[0].astype(np.int64).sum(axis=tuple(range(2, args[0].ndim)), keepdims=op.attrs["keepdim"])
    return np.clip(rhe(acc.astype(np.float32) * m), out_t.qmin, out_t.qmax).astype(np.int32)


@OPS.implements("add")
def _add(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return (_as_f32(args[0]) + _as_f32(args[1])).astype(np.float32)


@OPS.implements("mul")
def _mul(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return (_as_f32(args[0]) * _as_f32(args[1])).astype(np.float32)


@OPS.implements("maximum")
def _maximum(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.maximum(_as_f32(args[0]), _as_f32(args[1])).astype(np.float32)


@OPS.implements("minimum")
def _minimum(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.minimum(_as_f32(args[0]), _as_f32(args[1])).astype(np.float32)


@OPS.implements("div")
def _div(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    divisor = _as_f32(args[1])
    if not np.all(divisor):
        raise DivisionByZeroError(
            f"{op.source or op.output} divides by zero: its divisor is quantized, and a divisor small next to its "
            "range becomes 0 (0 / 0 has no code); keep the divisor away from zero at 8 bits (a larger epsilon added "
            "to it) or divide by a parameter, which stays float")
    return (_as_f32(args[0]) / divisor).astype(np.float32)


@OPS.implements("layer_norm")
def _layer_norm(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return layer_norm(args[0], args[1], args[2], op.attrs["eps"])


@OPS.implements("normalize")
def _normalize(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    x = args[0].astype(np.float64)
    return _as_f32(x / np.maximum(_l2_norm(x, (op.attrs["dim"],), True), op.attrs["eps"]))


@OPS.implements("group_norm")
def _group_norm(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return group_norm(args[0], args[1], args[2], op.attrs["groups"], op.attrs["eps"])


@OPS.implements("activation")
def _activation(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return activation(args[0], op.attrs["function"], op.attrs)


@OPS.implements("softmax")
def _softmax(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return softmax(args[0], op.attrs["dim"])


@OPS.implements("log_softmax")
def _log_softmax(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return softmax(args[0], op.attrs["dim"], log=True)


@OPS.implements("upsample_nearest")
def _upsample_nearest(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    sh, sw = op.attrs["scale"]
    return np.repeat(np.repeat(args[0], sh, axis=2), sw, axis=3)


@OPS.implements("lut")
def _lut(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return args[1][args[0] - graph.values[op.inputs[0]].qmin].astype(np.int32)


@OPS.implements("transpose")
def _transpose(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(args[0], op.attrs["perm"]))


@OPS.implements("flip")
def _flip(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.ascontiguousarray(np.flip(args[0], op.attrs["dims"]))


@OPS.implements("roll")
def _roll(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.roll(args[0], op.attrs["shifts"], axis=op.attrs["dims"])


@OPS.implements("flatten")
def _flatten(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    x = args[0]
    s, e = op.attrs["start_dim"], op.attrs["end_dim"] % x.ndim
    return x.reshape(*x.shape[:s], -1, *x.shape[e + 1:])


@OPS.implements("reshape")
def _reshape(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return args[0].reshape(-1, *op.attrs["shape"][1:])


@OPS.implements("slice")
def _slice(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.ascontiguousarray(args[0][_index(op.attrs["index"])])


PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}
"""``pad``'s modes by their PyTorch names (a constant, the mirror image without the edge, the edge repeated),
each with its name in numpy's ``np.pad`` and ONNX's ``Pad``, which agree."""


@OPS.implements("pad")
def _pad(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    pads, x = op.attrs["pads"], args[0]
    width = [(0, 0)] * x.ndim
    for i in range(len(pads) // 2):
        width[x.ndim - 1 - i] = (pads[2 * i], pads[2 * i + 1])
    if op.attrs["mode"] != "constant":
        return np.pad(x, width, mode=PAD_MODES[op.attrs["mode"]])
    return np.pad(x, width, constant_values=op.attrs["value"])


@OPS.implements("concat")
def _concat(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    return np.concatenate(args, axis=op.attrs["dim"])


def run_op(op: Op, args: list[np.ndarray], graph: IRGraph) -> np.ndarray:
    """Execute one op on numpy arrays (integers as int32, floats as float32)."""
    impl = OPS.lookup(op.kind)
    if impl is None:
        raise NotImplementedError(f"reference: no implementation for op {op.kind}")
    return impl(op, args, graph)


def run(graph: IRGraph, *inputs: np.ndarray, keep: bool = False) -> dict[str, np.ndarray]:
    """Run the graph. Returns the outputs by name, and with ``keep`` every intermediate value too."""
    if len(inputs) != len(graph.inputs):
        raise InputShapeError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
    for name, x in zip(graph.inputs, inputs):
        want = graph.values[name].shape
        if np.ndim(x) != len(want) or tuple(np.shape(x)[1:]) != tuple(want[1:]):
            raise InputShapeError(f"input {name} has shape {tuple(np.shape(x))}; the graph was compiled for "
                                  f"(N, {', '.join(map(str, want[1:]))})")
    env: dict[str, np.ndarray] = {n: np.asarray(x, dtype=np.float32) for n, x in zip(graph.inputs, inputs)}
    consumers: dict[str, int] = {}
    for op in graph.ops:
        for i in op.inputs:
            consumers[i] = consumers.get(i, 0) + 1
    for op in graph.ops:
        args = [env[i] if i in env else graph.constants[i] for i in op.inputs]
        env[op.output] = run_op(op, args, graph)
        if not keep:
            for i in op.inputs:
                consumers[i] -= 1
                if consumers[i] == 0 and i not in graph.outputs and i in env and i not in graph.inputs:
                    del env[i]
    return env if keep else {n: env[n] for n in graph.outputs}

