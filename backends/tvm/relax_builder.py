"""The integer IR transcribed op by op into a Relax module (BlockBuilder), with the reference's numerics.

Layout: 4-d activations are NHWC inside the module (what the CUDA tensor-core schedules want); the input and
4-d outputs are NCHW, as in the IR. Ops whose attributes index NCHW axes (slice, pad, flatten, reshape) see an
NCHW view. Containers: codes in [-128, 127] are ``int8``, unsigned 8-bit codes ``uint8``, accumulators ``int32``.

Conv and dense run as ``int8 x int8 -> int32``: a ``uint8`` activation is padded with its zero code, shifted
by -128 into ``int8`` and the exact correction ``128 · Σw`` is added to the accumulator. Where a conv or dense
layer reads a ``uint8`` activation and nothing but such layers and dequantizes (which add the 128 back) does,
its producer writes it shifted (``q - 128`` as ``int8``, fused into the producer's epilogue) and the conv pads it
implicitly with zeros: the correction is then ``128 ·`` the weights over the in-bounds part of each window, a
per-channel vector plus a constant border term, so no kernel only shifts or pads activations. 4-bit weights are
parameters packed two per byte and unpacked in the graph (TVM 0.27's int4 dtypes compute wrong results), or
int8 codes where ``pack_int4`` is off (CUDA artifacts).
Float ops that the reference sums in float64 (pooling, mean, layer norm) are computed in float64 and rounded
once. A dense layer contracts the last axis in the IR's own order (a channels-last tensor after a permute is a
plain 4-d value here, not NHWC), so its channels and its accumulator's scales run along the last axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qcompile.backends.tvm import TvmBackendError, require_tvm

from qcompile.ir import int4
from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.ops import SCALAR_ARITHMETIC, OpTable, basic_index
from qcompile.ir.reference import adaptive_window, bilinear_taps, global_avgpool_multiplier
from qcompile.ir.types import DType, TensorInfo

NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}  # NCHW axis -> NHWC axis
SIGNED, OFFSET, SHIFTED = "signed", "offset", "shifted"  # how an int8 operand holds its codes


OFFSET_READERS = frozenset({"conv2d", "dense", "dequantize"})  # ops that read an activation shifted into int8


def _readers(ir: IRGraph) -> dict[str, list[Op]]:
    readers: dict[str, list[Op]] = {}
    for op in ir.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    return readers


def _may_offset(ir: IRGraph, name: str, readers: list[Op]) -> bool:
    """A ``uint8`` activation that only convs, dense layers and dequantizes read (as their input), not a graph
    output: its producer can write it shifted into ``int8``."""
    return (name in ir.values and name not in ir.constants and name not in ir.outputs and name not in ir.inputs
            and ir.values[name].dtype not in (DType.FLOAT32, DType.INT32) and container(ir.values[name]) == "uint8"
            and all(op.kind in OFFSET_READERS and op.inputs.index(name) == 0 for op in readers))


def _offset_values(ir: IRGraph, readers: dict[str, list[Op]]) -> set[str]:
    """The activations written shifted: those that may be and that a conv or dense layer reads."""
    return {name for name, rs in readers.items()
            if _may_offset(ir, name, rs) and any(op.kind in ("conv2d", "dense") for op in rs)}


def _sibling_quantizes(ir: IRGraph, readers: dict[str, list[Op]], offset: set[str]) -> dict[str, list[Op]]:
    """Float values read only by two quantizes whose codes both fit int8 (a residual sum quantized to 8 bits for
    the next add and to 4 bits for the next conv): value -> the two. Extends ``offset`` with members that may be
    written shifted, so that both hold int8. They are emitted as one int16 ``256·b + (a + 128)`` computed by
    elementwise ops, so that the sum's producer writes both codes in its epilogue (elementwise ops fuse there,
    a stack would not), where separate quantize kernels read the sum in float32; each reader takes its byte back
    with elementwise int32 ops (``>> 8``; ``& 255`` then ``- 128``), which fuse into the reader."""
    groups: dict[str, list[Op]] = {}
    for name, rs in readers.items():
        if len(rs) != 2 or any(op.kind != "quantize" for op in rs) or name not in ir.values:
            continue
        outs = [op.output for op in rs]
        widen = {o for o in outs if o not in offset and _may_offset(ir, o, readers.get(o, []))}
        if all(o in offset or o in widen or container(ir.values[o]) == "int8" for o in outs):
            offset |= widen
            groups[name] = rs
    return groups


@dataclass
class RelaxModel:
    """The Relax module, its parameters in argument order (after the input), and the batch it was built for."""

    mod: Any
    params: list[tuple[str, np.ndarray]] = field(default_factory=list)
    batch: int | None = None


def container(t: TensorInfo) -> str:
    """The Relax dtype holding a value's codes."""
    if t.dtype is DType.FLOAT32:
        return "float32"
    if t.dtype is DType.INT32:
        return "int32"
    if t.qmin >= -128 and t.qmax <= 127:
        return "int8"
    if t.qmin >= 0 and t.qmax <= 255:
        return "uint8"
    raise TvmBackendError(f"codes in [{t.qmin}, {t.qmax}] do not fit an 8-bit container")


OPS: OpTable[Callable[[_Builder, Op], None]] = OpTable("relax")
"""The builder's transcription of every op kind: ``impl(builder, op)``."""


class _Builder:
    def __init__(self, ir: IRGraph, batch: int | None, float_dtype: str = "float64", pack_int4: bool = True) -> None:
        self.tvm = require_tvm()
        from tvm import relax

        self.relax = relax
        self.op = relax.op
        self.ir = ir
        self.float_dtype = float_dtype  # float conv/dense arithmetic: float64 is the reference's, bit for bit
        self.pack_int4 = pack_int4
        self.batch = batch if batch is not None else self.tvm.tirx.Var("n", "int64")
        self.bb = relax.BlockBuilder()
        self.env: dict[str, Any] = {}
        self.nhwc: set[str] = set()
        self.params: list[tuple[str, np.ndarray]] = []
        self.param_vars: dict[str, Any] = {}
        readers = _readers(ir)
        self.offset = _offset_values(ir, readers)
        self.siblings = _sibling_quantizes(ir, readers, self.offset)
        # the high byte of a joint int16 that only convs read: value -> the joint, taken in the conv's own kernel
        self.high_bytes: dict[str, Any] = {}
        self.conv_only = {name for name, rs in readers.items() if rs and all(r.kind == "conv2d" for r in rs)}

    # --- helpers -----------------------------------------------------------------------------------------
    def emit(self, expr: Any) -> Any:
        return self.bb.emit(expr)

    def const(self, array: np.ndarray, dtype: str) -> Any:
        return self.relax.const(np.asarray(array).astype(dtype), dtype)

    def shape(self, name: str) -> tuple[Any, ...]:
        """The value's shape at the runtime batch: ``rows`` per sample (more than 1 where a reshape folded
        attention heads into the batch)."""
        rows = self.ir.values[name].shape[0] // self.ir.values[self.ir.inputs[0]].shape[0]
        return (self.batch * rows if rows != 1 else self.batch, *self.ir.values[name].shape[1:])

    def param(self, key: str, array: np.ndarray, dtype: str) -> Any:
        var = self.relax.Var(key, self.relax.TensorType(array.shape, dtype))
        self.params.append((key, np.ascontiguousarray(array.astype(dtype))))
        self.param_vars[key] = var
        return var

    def nchw(self, name: str) -> Any:
        if name in self.nhwc:
            return self.emit(self.op.permute_dims(self.env[name], [0, 3, 1, 2]))
        return self.env[name]

    def as_nhwc(self, name: str) -> Any:
        if name in self.nhwc or len(self.ir.values[name].shape) != 4:
            return self.env[name]
        return self.emit(self.op.permute_dims(self.env[name], [0, 2, 3, 1]))

    def minus_128(self, expr: Any) -> Any:
        """Unsigned 8-bit codes shifted into int8: ``q - 128``."""
        return self.op.astype(self.op.subtract(self.op.astype(expr, "int16"), self.const(128, "int16")), "int8")

    def shifted(self, name: str, expr: Any) -> Any:
        """``expr`` as ``name``'s readers take it: shifted into int8 if ``name`` is written offset."""
        if name in self.offset:  # its readers take int8: the shift fuses into this producer's epilogue
            return self.minus_128(expr)
        return expr

    def set(self, name: str, expr: Any, nhwc: bool) -> None:
        self.env[name] = self.emit(self.shifted(name, expr))
        if nhwc and len(self.ir.values[name].shape) == 4:
            self.nhwc.add(name)

    def channel_vector(self, vec: np.ndarray, t: TensorInfo, nhwc: bool, dtype: str) -> Any:
        """A per-channel constant of value ``t`` shaped to broadcast along its channel axis (IR axis ``t.axis``,
        1 unless a dense layer put the channels last), moved to where NHWC holds that axis."""
        vec = np.asarray(vec)
        if vec.ndim == 0:
            return self.const(vec, dtype)
        ndim = len(t.shape)
        axis = 1 if t.axis is None else t.axis
        shape = [1] * ndim
        shape[NHWC_AXIS[axis] if (nhwc and ndim == 4) else axis] = -1
        return self.const(vec.reshape(shape), dtype)

    def weights(self, name: str, layout: tuple[int, ...]) -> Any:
        """A conv/dense weight parameter in int8 (4-bit codes packed two per byte and unpacked here)."""
        t = self.ir.values[name]
        codes = np.transpose(self.ir.constants[name], layout)
        if t.dtype not in (DType.INT4, DType.UINT4) or not self.pack_int4:
            return self.param(name, codes, "int8")
        nibbles = int4.pack(codes).view(np.int8)  # element 2i in the low nibble, 2i+1 in the high one
        packed = self.param(name, nibbles, "int8")
        # the low nibble sign-extended as ((p & 15) ^ 8) - 8, not (p << 4) >> 4: CUDA C promotes int8 to int
        # before shifting, so the shift pair leaves the whole byte there (mostly4bit on GPUs gave wrong logits)
        lo = self.op.subtract(self.op.bitwise_xor(self.op.bitwise_and(packed, self.const(15, "int8")),
                                                  self.const(8, "int8")), self.const(8, "int8"))
        hi = self.op.right_shift(packed, self.const(4, "int8"))
        flat = self.emit(self.op.reshape(self.op.stack([lo, hi], axis=1), (2 * nibbles.size,)))
        if codes.size % 2:
            flat = self.emit(self.op.strided_slice(flat, [0], [0], [codes.size]))
        return self.emit(self.op.reshape(flat, codes.shape))

    def int8_operand(self, name: str, pad: tuple[int, int] | None) -> tuple[Any, str]:
        """Activation codes as int8 (NHWC for conv) and how: ``signed`` (as they are), ``offset`` (written
        shifted by their producer; a conv pads them implicitly) or ``shifted`` (shifted here, explicitly
        zero-padded first)."""
        t = self.ir.values[name]
        x = self.as_nhwc(name) if pad is not None else self.nchw(name)
        if name in self.offset:
            return x, OFFSET
        if container(t) == "int8":
            return x, SIGNED
        if pad is not None and any(pad):
            x = self.emit(self.op.nn.pad(x, [0, 0, pad[0], pad[0], pad[1], pad[1], 0, 0], pad_value=0.0))
        return self.emit(self.minus_128(x)), SHIFTED

    # --- build -------------------------------------------------------------------------------------------
    def build(self) -> RelaxModel:
        relax = self.relax
        (inp,) = self.ir.inputs
        x = relax.Var(inp, relax.TensorType(self.shape(inp), "float32"))
        with self.bb.function("main", pure=True):
            with self.bb.dataflow():
                self.env[inp] = x
                for op in self.ir.ops:
                    (OPS.lookup(op.kind) or _Builder.unsupported)(self, op)
                outs = [self.nchw(o) for o in self.ir.outputs]
                result = self.bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
            self.bb.emit_func_output(result, params=[x, *self.param_vars.values()])
        mod = self.bb.get()
        # every parameter after the image is a weight: static, so CUDA-graph capture may keep their addresses
        mod["main"] = mod["main"].with_attr("num_input", 1)
        return RelaxModel(mod, self.params, self.batch if isinstance(self.batch, int) else None)

    def unsupported(self, op: Op) -> None:
        raise TvmBackendError(f"IR op {op.kind} ({op.source}) has no Relax transcription")

    # --- ops ---------------------------------------------------------------------------------------------
    @OPS.implements("quantize")
    def op_quantize(self, op: Op) -> None:
        src = op.inputs[0]
        if op.output in self.env:  # emitted with its siblings
            return
        if src not in self.siblings:
            self.set(op.output, self.quantized(src, op.output), src in self.nhwc)
            return
        low, high = [q.output for q in self.siblings[src]]
        codes = [self.op.astype(self.shifted(o, self.quantized(src, o)), "int16") for o in (low, high)]
        joint = self.emit(self.op.add(self.op.multiply(codes[1], self.const(256, "int16")),
                                      self.op.add(codes[0], self.const(128, "int16"))))
        # two separate chains from the joint value: a binding both shared would be a kernel of its own
        if high in self.conv_only and src in self.nhwc:  # each conv takes the byte in its input load
            self.high_bytes[high] = joint
        else:
            top = self.op.right_shift(self.op.astype(joint, "int32"), self.const(8, "int32"))  # floor(joint / 256)
            self.env[high] = self.emit(self.op.astype(top, "int8"))
        bottom = self.op.bitwise_and(self.op.astype(joint, "int32"), self.const(255, "int32"))
        self.env[low] = self.emit(self.op.astype(self.op.subtract(bottom, self.const(128, "int32")), "int8"))
        if src in self.nhwc:
            self.nhwc.update(o for o in (low, high) if len(self.ir.values[o].shape) == 4)

    def quantized(self, src: str, out: str) -> Any:
        """The codes of quantizing value ``src`` to ``out``'s scale and range, in ``out``'s container."""
        t = self.ir.values[out]
        s = self.channel_vector(t.scale, t, src in self.nhwc, "float32")
        q = self.op.clip(self.op.round(self.op.divide(self.env[src], s)), t.qmin, t.qmax)
        return self.op.astype(q, container(t))

    @OPS.implements("dequantize")
    def op_dequantize(self, op: Op) -> None:
        src = op.inputs[0]
        t = self.ir.values[src]
        nhwc = src in self.nhwc
        s = self.channel_vector(t.scale, t, nhwc, "float32")
        codes = self.op.astype(self.env[src], "float32")
        if src in self.offset:  # written as q - 128: the codes back, exactly (integers below 2^24)
            codes = self.op.add(codes, self.const(128, "float32"))
        self.set(op.output, self.op.multiply(codes, s), nhwc)

    @OPS.implements("requantize")
    def op_requantize(self, op: Op) -> None:
        src, t, a = op.inputs[0], self.ir.values[op.output], op.attrs
        nhwc = src in self.nhwc
        acc = self.ir.values[src]
        x = self.env[src]
        lo = max(t.qmin, 0) if a["relu"] else t.qmin
        if a["mode"] == "dyadic":
            m = self.channel_vector(self.ir.constants[a["mantissa"]], acc, nhwc, "int64")
            s_np = self.ir.constants[a["shift"]].astype(np.int64)
            s = self.channel_vector(s_np, acc, nhwc, "int64")
            half = self.channel_vector(np.left_shift(np.int64(1), s_np - 1), acc, nhwc, "int64")
            v = self.emit(self.op.multiply(self.op.astype(x, "int64"), m))
            q = self.emit(self.op.right_shift(v, s))
            r = self.emit(self.op.subtract(v, self.op.left_shift(q, s)))
            odd = self.op.equal(self.op.bitwise_and(q, self.const(1, "int64")), self.const(1, "int64"))
            up = self.op.logical_or(self.op.greater(r, half), self.op.logical_and(self.op.equal(r, half), odd))
            q = self.op.add(q, self.op.astype(up, "int64"))
        else:
            mult = self.channel_vector(self.ir.constants[a["multiplier"]], acc, nhwc, "float32")
            q = self.op.round(self.op.multiply(self.op.astype(x, "float32"), mult))
        self.set(op.output, self.op.astype(self.op.clip(q, lo, t.qmax), container(t)), nhwc)

    @OPS.implements("conv2d")
    def op_conv2d(self, op: Op) -> None:
        a = op.attrs
        xt = self.ir.values[op.inputs[0]]
        w_codes = self.ir.constants[op.inputs[1]]
        pad = tuple(a["padding"])
        conv = dict(strides=tuple(a["stride"]), dilation=tuple(a["dilation"]), groups=a["groups"],
                    data_layout="NHWC", kernel_layout="OHWI")
        if xt.dtype is DType.FLOAT32:
            w = self.const(np.transpose(w_codes, (0, 2, 3, 1)), self.float_dtype)
            x = self.op.astype(self.as_nhwc(op.inputs[0]), self.float_dtype)
            acc = self.op.nn.conv2d(x, w, padding=pad, out_dtype=self.float_dtype, **conv)
            if len(op.inputs) > 2:
                acc = self.op.add(acc, self.const(self.ir.constants[op.inputs[2]], self.float_dtype))
            self.set(op.output, self.op.astype(acc, "float32"), True)
            return
        w = self.weights(op.inputs[1], (0, 2, 3, 1))
        if op.inputs[0] in self.high_bytes:
            how = OFFSET if op.inputs[0] in self.offset else SIGNED
            acc = self._conv_of_high_byte(op.inputs[0], w, pad, conv)
        else:
            x, how = self.int8_operand(op.inputs[0], pad)
            acc = self.op.nn.conv2d(x, w, padding=(0, 0) if how == SHIFTED else pad, out_dtype="int32", **conv)
        acc = self._bias(op, acc, w_codes.reshape(len(w_codes), -1), how != SIGNED)
        if how == OFFSET and any(pad):
            acc = self.op.add(acc, self.const(self._border(op, xt, w_codes), "int32"))
        self.set(op.output, acc, True)

    def _conv_of_high_byte(self, name: str, w: Any, pad: tuple[int, int], conv: dict[str, Any]) -> Any:
        """The int32 conv of ``name``'s codes, the high byte of a joint int16 (:func:`_sibling_quantizes`), as one
        TE function: the byte is taken where the conv loads its input (the tensor-core schedule inlines it into
        the shared-memory copy), not by a kernel of its own that Relax would not fuse into the conv."""
        from tvm import te, topi

        def conv_of_high_byte(joint: Any, filt: Any) -> Any:
            codes = te.compute(joint.shape, lambda *i: (joint[i].astype("int32") >> 8).astype("int8"),
                               name="high_byte")
            return topi.nn.conv(codes, filt, conv["strides"], pad, conv["dilation"], conv["groups"], "NHWC",
                                "OHWI", "int32")

        return self.bb.call_te(conv_of_high_byte, self.high_bytes[name], w, primfunc_name_hint="conv2d")

    def _border(self, op: Op, xt: TensorInfo, w_codes: np.ndarray) -> np.ndarray:
        """``-128 ·`` the weights that fall on the implicit padding, per output position and channel (NHWC):
        what an offset input's zero padding (code 128) adds beyond the padding of code 0."""
        a = op.attrs
        (h, w), (oh, ow) = xt.shape[2:], self.ir.values[op.output].shape[2:]
        kh, kw = w_codes.shape[2:]

        def inside(size: int, out: int, k: int, stride: int, pad: int, dilation: int) -> np.ndarray:
            pos = np.arange(out)[:, None] * stride - pad + np.arange(k)[None, :] * dilation
            return ((pos >= 0) & (pos < size)).astype(np.int64)

        rows = inside(h, oh, kh, a["stride"][0], a["padding"][0], a["dilation"][0])
        cols = inside(w, ow, kw, a["stride"][1], a["padding"][1], a["dilation"][1])
        per_tap = w_codes.astype(np.int64).sum(axis=1)  # (out channels, kh, kw), over each group's inputs
        outside = np.einsum("ak,bl,ckl->abc", 1 - rows, np.ones_like(cols), per_tap) + np.einsum(
            "ak,bl,ckl->abc", rows, 1 - cols, per_tap)  # taps outside in rows, or inside in rows but not in columns
        return (-128 * outside)[None]

    @OPS.implements("dense")
    def op_dense(self, op: Op) -> None:
        xt = self.ir.values[op.inputs[0]]
        w_codes = self.ir.constants[op.inputs[1]]
        if xt.dtype is DType.FLOAT32:
            x = self.op.astype(self.nchw(op.inputs[0]), self.float_dtype)
            acc = self.op.matmul(x, self.const(w_codes.T, self.float_dtype), out_dtype=self.float_dtype)
            if len(op.inputs) > 2:
                acc = self.op.add(acc, self.const(self.ir.constants[op.inputs[2]], self.float_dtype))
            self.set(op.output, self.op.astype(acc, "float32"), False)
            return
        w = self.weights(op.inputs[1], (1, 0))
        x, how = self.int8_operand(op.inputs[0], None)
        acc = self.op.matmul(x, w, out_dtype="int32")
        self.set(op.output, self._bias(op, acc, w_codes, how != SIGNED), False)

    @OPS.implements("matmul")
    def op_matmul(self, op: Op) -> None:
        """The codes' matrix product in int32 (their readers never take them shifted: see OFFSET_READERS); a
        float model's in its float dtype."""
        dtype = self.float_dtype if self.ir.values[op.output].dtype is DType.FLOAT32 else "int32"
        a, b = (self.op.astype(self.nchw(name), dtype) for name in op.inputs)
        product = self.op.matmul(a, b, out_dtype=dtype)
        self.set(op.output, self.op.astype(product, "float32") if dtype != "int32" else product, False)

    def _bias(self, op: Op, acc: Any, w_rows: np.ndarray, shifted: bool) -> Any:
        """The int32 bias, plus ``128 · Σw`` per output channel when the input was shifted into int8 (a vector
        along the last axis: NHWC for a conv, the channels of a dense layer)."""
        bias = np.zeros(len(w_rows), np.int64)
        if len(op.inputs) > 2:
            bias += self.ir.constants[op.inputs[2]].astype(np.int64)
        if shifted:
            bias += 128 * w_rows.astype(np.int64).sum(axis=1)
        if not bias.any():
            return acc
        if np.abs(bias).max() > 2**31 - 1:
            raise TvmBackendError(f"{op.kind} {op.output} ({op.source}): its bias correction overflows int32")
        return self.op.add(acc, self.const(bias, "int32"))

    @OPS.implements("relu")
    def op_relu(self, op: Op) -> None:
        src = op.inputs[0]
        zero = self.const(0, container(self.ir.values[src]))
        self.set(op.output, self.op.maximum(self.env[src], zero), src in self.nhwc)

    def _pool_args(self, a: dict[str, Any]) -> dict[str, Any]:
        return dict(pool_size=tuple(a["kernel"]), strides=tuple(a["stride"]), padding=tuple(a["padding"]),
                    dilation=tuple(a.get("dilation", (1, 1))),  # average pooling has none
                    ceil_mode=a["ceil_mode"], layout="NHWC")

    @OPS.implements("maxpool2d")
    def op_maxpool2d(self, op: Op) -> None:
        self.set(op.output, self.op.nn.max_pool2d(self.as_nhwc(op.inputs[0]), **self._pool_args(op.attrs)), True)

    @OPS.implements("avgpool2d")
    def op_avgpool2d(self, op: Op) -> None:
        x = self.op.astype(self.as_nhwc(op.inputs[0]), "float64")
        pooled = self.op.nn.avg_pool2d(x, count_include_pad=op.attrs["count_include_pad"],
                                       **self._pool_args(op.attrs))
        self.set(op.output, self.op.astype(pooled, "float32"), True)

    @OPS.implements("adaptive_avgpool2d")
    def op_adaptive_avgpool2d(self, op: Op) -> None:
        x = self.op.astype(self.as_nhwc(op.inputs[0]), "float64")
        pooled = self.op.nn.adaptive_avg_pool2d(x, tuple(op.attrs["output_size"]), layout="NHWC")
        self.set(op.output, self.op.astype(pooled, "float32"), True)

    @OPS.implements("adaptive_maxpool2d")
    def op_adaptive_maxpool2d(self, op: Op) -> None:
        """PyTorch's adaptive windows (Relax has no adaptive max pooling): one ``max`` per output cell, joined."""
        x = self.nchw(op.inputs[0])
        (h, w), (oh, ow) = self.ir.values[op.inputs[0]].shape[2:], op.attrs["output_size"]
        rows = []
        for i in range(oh):
            h0, h1 = adaptive_window(i, oh, h)
            cells = []
            for j in range(ow):
                w0, w1 = adaptive_window(j, ow, w)
                window = self.op.strided_slice(x, axes=[2, 3], begin=[h0, w0], end=[h1, w1])
                cells.append(self.emit(self.op.max(window, axis=[2, 3], keepdims=True)))
            rows.append(self.emit(self.op.concat(cells, axis=3)) if ow > 1 else cells[0])
        self.set(op.output, self.op.concat(rows, axis=2) if oh > 1 else rows[0], False)

    @OPS.implements("mean")
    def op_mean(self, op: Op) -> None:
        src, dims, keep = op.inputs[0], [d % len(self.ir.values[op.inputs[0]].shape) for d in op.attrs["dims"]], \
            op.attrs["keepdim"]
        nhwc = src in self.nhwc and (keep or sorted(dims) == [2, 3])
        x = self.env[src] if nhwc else self.nchw(src)
        axes = [NHWC_AXIS[d] for d in dims] if nhwc else dims
        m = self.op.mean(self.op.astype(x, "float64"), axis=axes, keepdims=keep)
        self.set(op.output, self.op.astype(m, "float32"), nhwc)

    @OPS.implements("reduce_sum")
    def op_reduce_sum(self, op: Op) -> None:
        """A sum over some dimensions in float64, as the reference sums."""
        dims = [d % len(self.ir.values[op.inputs[0]].shape) for d in op.attrs["dims"]]
        s = self.op.sum(self.op.astype(self.nchw(op.inputs[0]), "float64"), axis=dims, keepdims=op.attrs["keepdim"])
        self.set(op.output, self.op.astype(s, "float32"), False)

    @OPS.implements("reduce_l2")
    def op_reduce_l2(self, op: Op) -> None:
        """``sqrt(Σ x²)`` over some dimensions in float64, as the reference computes it."""
        dims = [d % len(self.ir.values[op.inputs[0]].shape) for d in op.attrs["dims"]]
        xd = self.emit(self.op.astype(self.nchw(op.inputs[0]), "float64"))
        self.set(op.output, self.op.astype(self.l2_norm(xd, dims, op.attrs["keepdim"]), "float32"), False)

    def l2_norm(self, xd: Any, dims: list[int], keepdim: bool) -> Any:
        """``sqrt(Σ x²)`` over ``dims`` of a float64 tensor (``reduce_l2``, ``normalize``)."""
        return self.op.sqrt(self.op.sum(self.op.multiply(xd, xd), axis=dims, keepdims=keepdim))

    @OPS.implements("reduce_max")
    def op_reduce_max(self, op: Op) -> None:
        """A max over some dimensions, in float32 (exact in any precision)."""
        dims = [d % len(self.ir.values[op.inputs[0]].shape) for d in op.attrs["dims"]]
        self.set(op.output, self.op.max(self.nchw(op.inputs[0]), axis=dims, keepdims=op.attrs["keepdim"]), False)

    @OPS.implements("global_avgpool")
    def op_global_avgpool(self, op: Op) -> None:
        """One kernel: the int32 sum of each channel's codes (over H and W, NHWC axes 1 and 2; or over L of an
        (N, C, L) value), one float32 multiply, rounded half to even and clipped (the reference's arithmetic).
        Written as a TE function, so that the widening to int32 happens inside the reduction: as Relax ops, the
        producer's epilogue would take the cast and write the codes as int32, four times the bytes."""
        from tvm import te, tirx

        src, t, keep = op.inputs[0], self.ir.values[op.output], op.attrs["keepdim"]
        m = tirx.const(float(global_avgpool_multiplier(self.ir.values[src], t)), "float32")
        lo, hi, dtype = tirx.const(float(t.qmin), "float32"), tirx.const(float(t.qmax), "float32"), container(t)
        nhwc = len(self.ir.values[src].shape) == 4

        def global_avgpool(x: Any) -> Any:  # its name is the kernel's
            if nhwc:
                n, h, w, c = x.shape
                shape = (n, 1, 1, c) if keep else (n, c)
                rh, rw = te.reduce_axis((0, h), "rh"), te.reduce_axis((0, w), "rw")
                total = te.compute(shape, lambda i, *r: te.sum(x[i, rh, rw, r[-1]].astype("int32"), axis=[rh, rw]),
                                   name="code_sum")
            else:
                n, c, length = x.shape
                shape = (n, c, 1) if keep else (n, c)
                rl = te.reduce_axis((0, length), "rl")
                total = te.compute(shape, lambda i, j, *_: te.sum(x[i, j, rl].astype("int32"), axis=[rl]),
                                   name="code_sum")

            def code(*i: Any) -> Any:
                q = tirx.round(total(*i).astype("float32") * m)
                return tirx.Cast(dtype, te.max(te.min(q, hi), lo))

            return te.compute(shape, code, name="global_avgpool")

        self.set(op.output, self.bb.call_te(global_avgpool, self.as_nhwc(src)), nhwc and keep)

    @OPS.implements("add")
    def op_add(self, op: Op) -> None:
        self.binary(op, self.op.add)

    @OPS.implements("mul")
    def op_mul(self, op: Op) -> None:
        self.binary(op, self.op.multiply)

    @OPS.implements("div")
    def op_div(self, op: Op) -> None:
        self.binary(op, self.op.divide)

    @OPS.implements("maximum")
    def op_maximum(self, op: Op) -> None:
        self.binary(op, self.op.maximum)

    @OPS.implements("minimum")
    def op_minimum(self, op: Op) -> None:
        self.binary(op, self.op.minimum)

    def binary(self, op: Op, fn: Any) -> None:
        """An elementwise float op of two values or float constants, NHWC when all are 4-d (broadcasting)."""
        a, b = op.inputs
        for n in (a, b):
            if n in self.ir.constants and n not in self.env:
                self.env[n] = self.const(self.ir.constants[n], "float32")
        four = all(len(self.ir.values[n].shape) == 4 for n in (a, b, op.output))
        xa, xb = (self.as_nhwc(a), self.as_nhwc(b)) if four else (self.nchw(a), self.nchw(b))
        self.set(op.output, fn(xa, xb), four)

    @OPS.implements("layer_norm")
    def op_layer_norm(self, op: Op) -> None:
        """The reference's float64 form op by op (TOPI's ``layer_norm`` takes float32 and float16 only), over the
        last axes in the IR's order: mean, centred values, biased variance, ``d / sqrt(var + eps) · w + b``."""
        x, w, b = op.inputs
        rank, k = len(self.ir.values[x].shape), self.ir.constants[w].ndim
        axes = list(range(rank - k, rank))
        xd = self.emit(self.op.astype(self.nchw(x), "float64"))
        d = self.emit(self.op.subtract(xd, self.op.mean(xd, axis=axes, keepdims=True)))
        var = self.emit(self.op.mean(self.op.multiply(d, d), axis=axes, keepdims=True))
        norm = self.op.divide(d, self.op.sqrt(self.op.add(var, self.const(op.attrs["eps"], "float64"))))
        y = self.op.add(self.op.multiply(norm, self.const(self.ir.constants[w], "float64")),
                        self.const(self.ir.constants[b], "float64"))
        self.set(op.output, self.op.astype(y, "float32"), False)

    @OPS.implements("normalize")
    def op_normalize(self, op: Op) -> None:
        """The reference's float64 form: ``x / max(sqrt(Σ x²), eps)``."""
        xd = self.emit(self.op.astype(self.nchw(op.inputs[0]), "float64"))
        y = self.op.divide(xd, self.op.maximum(self.l2_norm(xd, [op.attrs["dim"]], True),
                                               self.const(op.attrs["eps"], "float64")))
        self.set(op.output, self.op.astype(y, "float32"), False)

    @OPS.implements("group_norm")
    def op_group_norm(self, op: Op) -> None:
        """The reference's float64 form op by op on (N, G, C/G·H·W), then the per-channel affine."""
        x, w, b = op.inputs
        shape = self.shape(x)
        groups, per_group = op.attrs["groups"], int(np.prod(self.ir.values[x].shape[1:])) // op.attrs["groups"]
        xd = self.emit(self.op.reshape(self.op.astype(self.nchw(x), "float64"), (shape[0], groups, per_group)))
        d = self.emit(self.op.subtract(xd, self.op.mean(xd, axis=[2], keepdims=True)))
        var = self.emit(self.op.mean(self.op.multiply(d, d), axis=[2], keepdims=True))
        norm = self.op.divide(d, self.op.sqrt(self.op.add(var, self.const(op.attrs["eps"], "float64"))))
        channels = (-1,) + (1,) * (len(shape) - 2)
        y = self.op.add(self.op.multiply(self.op.reshape(norm, shape),
                                         self.const(self.ir.constants[w].reshape(channels), "float64")),
                        self.const(self.ir.constants[b].reshape(channels), "float64"))
        self.set(op.output, self.op.astype(y, "float32"), False)

    @OPS.implements("softmax")
    @OPS.implements("log_softmax")
    def op_softmax(self, op: Op) -> None:
        """Softmax or its log in float64, as the reference."""
        fn = self.op.nn.softmax if op.kind == "softmax" else self.op.nn.log_softmax
        x = self.op.astype(self.nchw(op.inputs[0]), "float64")
        self.set(op.output, self.op.astype(fn(x, axis=op.attrs["dim"]), "float32"), False)

    @OPS.implements("activation")
    def op_activation(self, op: Op) -> None:
        """A float model's function in float32 (Relax's own op where it has one), in the input's layout."""
        src, a = op.inputs[0], op.attrs
        x, fn, nn = self.env[src], a["function"], self.op.nn

        def clipped(v: Any, lo: float | None, hi: float | None) -> Any:
            v = v if lo is None else self.op.maximum(v, self.const(lo, "float32"))
            return v if hi is None else self.op.minimum(v, self.const(hi, "float32"))

        if fn == "clip":
            y = clipped(x, a.get("min"), a.get("max"))
        elif fn in ("hardswish", "hardsigmoid"):
            y = clipped(self.op.add(x, self.const(3.0, "float32")), 0.0, 6.0)
            y = self.op.divide(self.op.multiply(x, y) if fn == "hardswish" else y, self.const(6.0, "float32"))
        elif fn == "leaky_relu":
            y = nn.leakyrelu(x, float(a["alpha"]))
        elif fn in SCALAR_ARITHMETIC:
            alpha = self.const(a["alpha"], "float32")
            f, operands = {"add": (self.op.add, (x, alpha)), "mul": (self.op.multiply, (x, alpha)),
                           "div": (self.op.divide, (x, alpha)), "rsub": (self.op.subtract, (alpha, x)),
                           "rdiv": (self.op.divide, (alpha, x))}[fn]
            y = f(*operands)
        else:
            y = {"sigmoid": self.op.sigmoid, "silu": nn.silu, "tanh": self.op.tanh, "gelu": nn.gelu,
                 "gelu_tanh": nn.gelu_tanh}[fn](x)
        self.set(op.output, y, src in self.nhwc)

    @OPS.implements("lut")
    def op_lut(self, op: Op) -> None:
        """``take`` from the table, indexed by the code minus the input's lowest code."""
        src, t_out = op.inputs[0], self.ir.values[op.output]
        t_in = self.ir.values[src]
        table = self.const(self.ir.constants[op.inputs[1]], container(t_out))
        index = self.op.subtract(self.op.astype(self.env[src], "int32"), self.const(t_in.qmin, "int32"))
        self.set(op.output, self.op.take(table, index, axis=0, mode="clip"), src in self.nhwc)

    @OPS.implements("upsample_bilinear")
    def op_upsample_bilinear(self, op: Op) -> None:
        """The reference's float64 taps: per axis, two ``take``s of the source pixels, weighted, added; width
        first."""
        x = self.emit(self.op.astype(self.nchw(op.inputs[0]), "float64"))
        for axis, (low, high, w_low, w_high) in zip((3, 2), bilinear_taps(self.ir.values[op.inputs[0]].shape,
                                                                          op.attrs)):
            shape = (-1, 1) if axis == 2 else (-1,)
            taps = [self.op.multiply(self.op.take(x, self.const(index, "int64"), axis=axis, mode="clip"),
                                     self.const(weight.reshape(shape), "float64"))
                    for index, weight in ((low, w_low), (high, w_high))]
            x = self.emit(self.op.add(*taps))
        self.set(op.output, self.op.astype(x, "float32"), False)

    @OPS.implements("transpose")
    def op_transpose(self, op: Op) -> None:
        self.set(op.output, self.op.permute_dims(self.nchw(op.inputs[0]), list(op.attrs["perm"])), False)

    @OPS.implements("flip")
    def op_flip(self, op: Op) -> None:
        x = self.nchw(op.inputs[0])
        for d in op.attrs["dims"]:
            x = self.op.flip(x, d)
        self.set(op.output, x, False)

    @OPS.implements("roll")
    def op_roll(self, op: Op) -> None:
        """Per rolled axis, the last ``shift`` elements concatenated before the rest."""
        x = self.nchw(op.inputs[0])
        shape = self.ir.values[op.inputs[0]].shape
        for shift, dim in zip(op.attrs["shifts"], op.attrs["dims"]):
            cut = shape[dim] - shift % shape[dim]
            tail = self.op.strided_slice(x, axes=[dim], begin=[cut], end=[shape[dim]])
            head = self.op.strided_slice(x, axes=[dim], begin=[0], end=[cut])
            x = self.emit(self.op.concat([tail, head], axis=dim))
        self.set(op.output, x, False)

    @OPS.implements("flatten")
    def op_flatten(self, op: Op) -> None:
        self.set(op.output, self.op.reshape(self.nchw(op.inputs[0]), self.shape(op.output)), False)

    @OPS.implements("upsample_nearest")
    def op_upsample_nearest(self, op: Op) -> None:
        """Each pixel repeated: the spatial axes split in two, the new unit axes broadcast to the factors, joined
        again, in the input's layout."""
        src, (sh, sw) = op.inputs[0], op.attrs["scale"]
        nhwc = src in self.nhwc
        n, c, h, w = self.shape(src)
        inner, tiled, out = (((n, h, 1, w, 1, c), (n, h, sh, w, sw, c), (n, h * sh, w * sw, c)) if nhwc else
                             ((n, c, h, 1, w, 1), (n, c, h, sh, w, sw), (n, c, h * sh, w * sw)))
        repeated = self.op.broadcast_to(self.op.reshape(self.env[src], inner), tiled)
        self.set(op.output, self.op.reshape(repeated, out), nhwc)

    @OPS.implements("reshape")
    def op_reshape(self, op: Op) -> None:
        self.set(op.output, self.op.reshape(self.nchw(op.inputs[0]), self.shape(op.output)), False)

    @OPS.implements("slice")
    def op_slice(self, op: Op) -> None:
        """``strided_slice`` over the axes the index cuts (never the batch), reshaped to the output's shape where an
        integer index drops an axis."""
        shape = self.ir.values[op.inputs[0]].shape
        index = basic_index(op.attrs["index"], len(shape))
        if index is None or any(axis == 0 for axis, *_ in index[0]):
            self.unsupported(op)
        cuts, dropped = index
        bounds = [slice(start, stop, step).indices(shape[axis]) for axis, start, stop, step in cuts]
        x = self.nchw(op.inputs[0])
        if cuts:
            x = self.op.strided_slice(x, [c[0] for c in cuts], [b[0] for b in bounds], [b[1] for b in bounds],
                                      [b[2] for b in bounds])
        self.set(op.output, self.op.reshape(x, self.shape(op.output)) if dropped else x, False)

    @OPS.implements("pad")
    def op_pad(self, op: Op) -> None:
        pads, x = op.attrs["pads"], self.nchw(op.inputs[0])
        rank = len(self.ir.values[op.inputs[0]].shape)
        width = [0] * (2 * rank)
        for i in range(len(pads) // 2):
            width[2 * (rank - 1 - i)], width[2 * (rank - 1 - i) + 1] = pads[2 * i], pads[2 * i + 1]
        self.set(op.output, self.op.nn.pad(x, width, pad_mode=op.attrs["mode"], pad_value=float(op.attrs["value"])),
                 False)

    @OPS.implements("concat")
    def op_concat(self, op: Op) -> None:
        dim = op.attrs["dim"] % len(self.ir.values[op.output].shape)
        if len(self.ir.values[op.output].shape) == 4:
            self.set(op.output, self.op.concat([self.as_nhwc(i) for i in op.inputs], axis=NHWC_AXIS[dim]), True)
        else:
            self.set(op.output, self.op.concat([self.env[i] for i in op.inputs], axis=dim), False)


def to_relax(ir: IRGraph, batch: int | None = None, float_dtype: str = "float64", pack_int4: bool = True) -> RelaxModel:
    """The IR as a Relax module ``main(x, *params)``; ``batch=None`` builds a symbolic batch dimension.
    ``float_dtype="float32"`` computes float convolutions and dense layers in float32, as a float deployment
    would: not bit-exact with the reference, for timing a float model beside a quantized one. ``pack_int4=False``
    stores 4-bit weights as int8 codes instead of two per byte unpacked in the graph (one kernel per layer per
    call on a GPU, where nothing computes in 4 bits anyway)."""
    if len(ir.inputs) != 1:
        raise TvmBackendError(f"the TVM backend takes one input, the IR has {len(ir.inputs)}")
    return _Builder(ir, batch, float_dtype, pack_int4).build()
