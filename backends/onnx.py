"""ONNX backend: the integer IR transcribed as an opset-21 QDQ model that onnxruntime runs.

Flavours:

- ``serving``: every quantized tensor in an 8-bit container (activations ``uint8``, weights ``int8``);
  4-bit codes stay in range through their quantization bounds, with a ``Clip`` only where ``QuantizeLinear``'s
  container range is wider than the code range. onnxruntime fuses DQ → Conv → Q into its integer kernels,
  whose fast path wants unsigned activations: a signed activation code ``q`` is stored as ``q + 128`` in
  ``uint8`` with ONNX zero point 128, which dequantizes to exactly the same value (the IR's zero point stays 0).
- ``compact``: 4-bit weights as packed ``INT4``/``UINT4`` initializers, so the file is as small as the memory
  cost says, each cast to 8 bits in the graph (constant-folded by onnxruntime, so the integer kernels still run).

Value mapping: an IR integer tensor (≤ 8 bits) is an ONNX tensor of codes; an IR int32 accumulator is the float
output of the ONNX ``Conv``/``Gemm`` (its dequantized value, ``acc · s_x · s_w``); float values are float. A dense
layer on a channels-last tensor runs as a 2-d ``Gemm`` (the only one onnxruntime fuses into its integer kernel):
its input codes are reshaped to 2-d and its requantized codes back, both exact on codes.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from qcompile.backends.host import u8s8_pairs_saturate

from qcompile.errors import QCompileError, first_line, require_extra
from qcompile.ir import int4
from qcompile.ir.agreement import TensorAgreement, compare_backend
from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.ops import SCALAR_ARITHMETIC, OpTable, basic_index
from qcompile.ir.reference import PAD_MODES, adaptive_window, avgpool_divisors, avgpool_windows, bilinear_taps
from qcompile.ir.types import DType, TensorInfo

Flavour = Literal["serving", "compact"]
WeightType = Literal["auto", "int8", "uint8"]
WEIGHT_TYPES: tuple[str, ...] = ("auto", "int8", "uint8")
OPSET = 21
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; opset 21 needs >= 10
NODE_SEPARATOR = "/"
"""Nodes are named ``<IR op output>/<ONNX op>__<n>``: a profile of the model maps every kernel back to its IR op."""
_ACCUMULATOR_MOVES = frozenset({"reshape", "flatten", "transpose", "slice", "flip", "roll", "maxpool2d", "relu"})
"""Ops that move or max-pool an int32 value, keeping it the accumulator it was."""
_CODE_MOVES = frozenset({"reshape", "flatten", "transpose"})
"""Ops onnxruntime's transpose optimizer can take out from between two quantizations of codes."""


class OnnxExportError(QCompileError):
    """An IR construct with no ONNX transcription."""


def _onnx() -> Any:
    return require_extra("onnx", extra="onnx", needed_for="the ONNX backend", error=OnnxExportError)


def fused_add_is_exact(a: TensorInfo, b: TensorInfo, out: TensorInfo) -> bool:
    """Whether onnxruntime's ``QLinearAdd`` (what it fuses DQ → Add → Q into) computes exactly the IR's
    ``Q(DQ(a) + DQ(b))`` for every pair of codes.

    The IR's form is float32: two products, a sum, a division, round half to even. The x86 kernel computes
    ``a·(s_a/s_out) + b·(s_b/s_out) + fixed`` in float32 with FMAs, then rounds half to even. Both give the
    same integers whenever every value in the kernel is exact (power-of-two scale ratios, short mantissas:
    passes/align_add_scales.py) and the float32 form rounds to the exact result, which is checked here on all
    code pairs (at most 255 × 255)."""
    scales = [float(t.scale) for t in (a, b, out) if t.scale is not None and t.scale.ndim == 0]
    if len(scales) != 3:
        return False
    sa, sb, sc = scales
    ra, rb = sa / sc, sb / sc
    if any(not r > 0 or math.frexp(r)[0] != 0.5 or np.float32(r) != r for r in (ra, rb)):
        return False  # not powers of two: the kernel's ratios are rounded
    qa = np.arange(a.qmin, a.qmax + 1, dtype=np.float64)[:, None]
    qb = np.arange(b.qmin, b.qmax + 1, dtype=np.float64)[None, :]
    exact = qa * ra + qb * rb  # exact in float64: small integers times powers of two
    za, zb, zc = (128.0 if t.dtype.signed else 0.0 for t in (a, b, out))  # the 8-bit containers' zero points
    fixed = zc - (za * ra + zb * rb)
    kernel = [np.float64(fixed), (qb + zb) * rb + fixed, exact + zc]  # every value the kernel forms
    if any(not np.array_equal(np.asarray(v, np.float32).astype(np.float64), v) for v in kernel):
        return False
    f32 = np.float32
    ours = np.rint((qa.astype(f32) * f32(sa) + qb.astype(f32) * f32(sb)) / f32(sc))
    return bool(np.array_equal(ours, np.rint(exact)))  # both then clamp to the same range


def rectified(t: TensorInfo) -> TensorInfo:
    """``t`` with its codes clipped at 0: ``Q(relu(y)) = max(Q(y), 0)``, so a ReLU before a requantize is a Clip
    of its codes after it. (A ``Relu`` node before a signed ``QuantizeLinear``, zero point 128, would keep
    onnxruntime from fusing the conv into its integer kernel: the float conv then rounds differently.)"""
    return replace(t, qmin=max(t.qmin, 0))


OPS: OpTable[Callable[[_Exporter, Op], None]] = OpTable("onnx")
"""The exporter's transcription of every op kind: ``impl(exporter, op)``."""


class _Exporter:
    def __init__(self, ir: IRGraph, flavour: Flavour, float_luts: bool = False,
                 weight_type: WeightType = "auto") -> None:
        """``float_luts``: write every ``lut`` that names its float function as that function, unchecked (the
        probe of :func:`float_lut_is_exact`). ``weight_type``: see :func:`to_onnx`."""
        self.onnx = _onnx()
        self.ir = ir
        self.flavour = flavour
        self.float_luts = float_luts
        self.unsigned_weights = unsigned_weights(weight_type)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.alias: dict[tuple[str, str], str] = {}  # (reader, value) -> the copy of value that reader uses
        self.done: set[str] = set()  # outputs of ops already written as part of an earlier op's rewrite
        self.flat: dict[str, str] = {}  # N-d dense output (or its copy) -> the 2-d Gemm output it reshapes
        self.unfused: dict[str, str] = {}  # dequantized value -> its Cast → Sub → Mul form, written once
        self.readers: dict[str, list[Op]] = {}
        self.producer = {o.output: o for o in ir.ops}
        self.tail = ir.float_tail()  # float values no quantizer rounds again: computed as the reference computes them
        for o in ir.ops:
            for name in o.inputs:
                self.readers.setdefault(name, []).append(o)
        self._n = 0
        self.named_inits: set[str] = set()
        self.current = ""  # the IR op being written: every node is named after it

    # --- helpers -----------------------------------------------------------------------------------------
    def uid(self, base: str) -> str:
        self._n += 1
        return f"{base}__{self._n}"

    def const(self, base: str, array: np.ndarray, elem: int | None = None) -> str:
        name = self.uid(base)
        helper, TP = self.onnx.helper, self.onnx.TensorProto
        if elem in (TP.INT4, TP.UINT4):
            t = helper.make_tensor(name, elem, list(array.shape), int4.pack(array).tobytes(), raw=True)
        else:
            t = self.onnx.numpy_helper.from_array(np.array(array, order="C"), name)  # keeps 0-d scalars
        self.inits.append(t)
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        output = output or self.uid(op)
        for i in inputs:  # an IR constant read as it is (a float op's operand) is an initializer of its name
            if i in self.ir.constants and i not in self.named_inits:
                self.named_inits.add(i)
                self.inits.append(self.onnx.numpy_helper.from_array(np.array(self.ir.constants[i], order="C"), i))
        name = self.uid(f"{self.current}{NODE_SEPARATOR}{op}")
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def container(self, t: TensorInfo) -> tuple[type, int]:
        """(numpy type, code offset) of an activation: uint8, signed codes shifted by 128 (ONNX zero point
        128)."""
        return np.uint8, (128 if t.dtype.signed else 0)

    def weight_container(self, name: str) -> tuple[type, int]:
        """(numpy type, code offset) of a weight: int8 as it is, but uint8 shifted by 128 where onnxruntime's
        uint8 × int8 kernels could saturate on it (``unsigned_weights``, and codes past ±64: two products of a
        byte activation with such codes can pass 32,767), so that onnxruntime takes its exact uint8 × uint8
        kernels there."""
        t = self.ir.values[name]
        if not t.dtype.signed:
            return np.uint8, 0
        if self.unsigned_weights and int(np.abs(self.ir.constants[name]).max(initial=0)) > 64:
            return np.uint8, 128
        return np.int8, 0

    def scale_zp(self, base: str, t: TensorInfo, container: tuple[type, int] | None = None) -> tuple[str, str]:
        assert t.scale is not None
        ty, offset = container or self.container(t)
        zp = self.const(f"{base}_zp", np.full(t.scale.shape, offset, dtype=ty))
        return self.const(f"{base}_scale", t.scale.astype(np.float32)), zp

    def quantize_to(self, src: str, out: str, t: TensorInfo) -> str:
        """QuantizeLinear into the 8-bit container, then Clip to the code range when it is narrower."""
        s, zp = self.scale_zp(out, t)
        ty, offset = self.container(t)
        lo, hi = t.qmin + offset, t.qmax + offset
        if (lo, hi) == (0, 255):
            return self.node("QuantizeLinear", [src, s, zp], out)
        q = self.node("QuantizeLinear", [src, s, zp])
        low = "" if lo == 0 else self.const(f"{out}_lo", np.array(lo, ty))  # saturation already clamps at 0
        return self.node("Clip", [q, low, self.const(f"{out}_hi", np.array(hi, ty))], out)

    def dq(self, name: str, src: str | None = None) -> str:
        """The float view of an IR value, or of ``src``, an ONNX tensor holding it in another shape."""
        t = self.ir.values[name]
        src = src or name
        if t.dtype is DType.FLOAT32 or t.dtype is DType.INT32:
            return src
        s, zp = self.scale_zp(name, t)
        return self.node("DequantizeLinear", [src, s, zp], self.uid(f"{name}_dq"))

    def reshape(self, src: str, shape: list[int], output: str | None = None) -> str:
        return self.node("Reshape", [src, self.const("shape", np.array(shape, np.int64))], output)

    # --- ops ---------------------------------------------------------------------------------------------
    def export(self) -> Any:
        helper, TP = self.onnx.helper, self.onnx.TensorProto
        for op in self.ir.ops:
            if op.output not in self.done:
                self.current = op.output
                (OPS.lookup(op.kind) or _Exporter.unsupported)(self, op)
        inputs = [helper.make_tensor_value_info(n, TP.FLOAT, ["N", *self.ir.values[n].shape[1:]]) for n in self.ir.inputs]
        outputs = [helper.make_tensor_value_info(n, TP.FLOAT, ["N", *self.ir.values[n].shape[1:]])
                   for n in self.ir.outputs]
        nodes, inits = self.live(self.ir.outputs)
        graph = helper.make_graph(nodes, "qcompile", inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qcompile")
        model.ir_version = IR_VERSION
        return model

    def live(self, outputs: list[str]) -> tuple[list[Any], list[Any]]:
        """The nodes the outputs depend on, in order, and the initializers they read. A node nothing reads (e.g. the
        DequantizeLinear of a value that a float pooling reads in its unfused form) is not left to the runtime:
        onnxruntime computes it anyway (0.22 ms of 98 ms on ResNet-50 at batch 8)."""
        needed = set(outputs)
        kept = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(i for i in node.input if i)
        return kept[::-1], [t for t in self.inits if t.name in needed]

    def unsupported(self, op: Op) -> None:
        raise OnnxExportError(f"IR op {op.kind} ({op.source}) has no ONNX transcription")

    @OPS.implements("quantize")
    def op_quantize(self, op: Op) -> None:
        src = self.alias.get((op.output, op.inputs[0]), op.inputs[0])
        if src == op.inputs[0] and self.requantizes_alone(src):
            src = self.unfused_dq(src)
        self.quantize_to(src, op.output, self.ir.values[op.output])

    def requantizes_alone(self, name: str) -> bool:
        """Whether ``name`` dequantizes codes that nothing else reads, moved (transposed, reshaped) or not since
        a quantizer or a layer's requantize wrote them, for one quantizer to requantize. Written as DQ → Q, that is
        onnxruntime's ``Q → DQ → Q → DQ`` once its transpose optimizer has cancelled the moves (a channels-last
        block permutes there and back), and its DoubleQDQPairsRemover then merges the two roundings into one of a
        new scale: other codes. The requantization reads the unfused form instead (:meth:`unfused_dq`)."""
        if not self.dequantized_codes(name) or len(self.readers.get(name, [])) != 1:
            return False
        codes = self.producer[name].inputs[0]
        while len(self.readers.get(codes, [])) == 1 and (op := self.producer.get(codes)) is not None:
            if op.kind in ("quantize", "requantize"):  # written as a QuantizeLinear
                return True
            if op.kind not in _CODE_MOVES:
                return False
            codes = op.inputs[0]
        return False

    def holds_accumulator(self, name: str) -> bool:
        """Whether the ONNX tensor of int32 IR value ``name`` is the accumulator itself (a ``matmul``'s, moved
        or max-pooled since), in float32, rather than its dequantized value (a float ``Conv``'s or ``Gemm``'s)."""
        op = self.producer.get(name)
        while op is not None and op.kind in _ACCUMULATOR_MOVES:
            op = self.producer.get(op.inputs[0])
        return op is not None and op.kind == "matmul"

    @OPS.implements("dequantize")
    def op_dequantize(self, op: Op) -> None:
        src = self.ir.values[op.inputs[0]]
        if src.dtype is DType.INT32 and self.holds_accumulator(op.inputs[0]):
            self.node("Mul", [op.inputs[0], self.const(f"{op.output}_scale", src.scale.astype(np.float32))],
                      op.output)
        elif src.dtype is DType.INT32:
            self.node("Identity", [op.inputs[0]], op.output)
        else:
            s, zp = self.scale_zp(op.inputs[0], src)
            self.node("DequantizeLinear", [op.inputs[0], s, zp], op.output)

    @OPS.implements("requantize")
    def op_requantize(self, op: Op) -> None:
        if op.attrs["mode"] == "dyadic":
            raise OnnxExportError.with_parameters("dyadic requantization has no ONNX QDQ form; lower without {dyadic}")
        t = self.ir.values[op.output]
        src = self.alias.get((op.output, op.inputs[0]), op.inputs[0])
        flat = self.flat.get(src)
        src = flat or src
        if op.attrs["relu"]:
            t = rectified(t)
        if self.holds_accumulator(op.inputs[0]):  # rhe(float32(acc) · M): the multiply, then a scale of 1
            m = self.const(f"{op.output}_multiplier", self.ir.constants[op.attrs["multiplier"]])
            self.quantize_to(self.node("Mul", [src, m]), op.output, replace(t, scale=np.ones_like(t.scale)))
            return
        if flat is None:
            self.quantize_to(src, op.output, t)
            return
        codes = self.quantize_to(src, self.uid(f"{op.output}_2d"), t)
        self.reshape(codes, [-1, *t.shape[1:]], op.output)

    def _weights(self, name: str) -> str:
        t = self.ir.values[name]
        codes = self.ir.constants[name]
        if t.dtype is DType.FLOAT32:
            return self.const(name, codes.astype(np.float32))
        TP = self.onnx.TensorProto
        packed = self.flavour == "compact" and t.dtype in (DType.INT4, DType.UINT4)
        elem = (TP.INT4 if t.dtype.signed else TP.UINT4) if packed else None
        ty, offset = self.weight_container(name)
        w = self.const(name, (codes.astype(np.int32) + offset).astype(ty) if not packed else codes, elem)
        if packed:  # widened once at session start (constant folding), so the conv still fuses into QLinearConv
            w = self.node("Cast", [w], to=TP.INT8 if t.dtype.signed else TP.UINT8)
        s, zp = self.scale_zp(name, t, (ty, offset))
        return self.node("DequantizeLinear", [w, s, zp], self.uid(f"{name}_dq"), axis=0)

    def _bias(self, name: str) -> str:
        t = self.ir.values[name]
        data = self.ir.constants[name]
        if t.dtype is DType.FLOAT32:
            return self.const(name, data.astype(np.float32))
        b = self.const(name, data.astype(np.int32))
        s = self.const(f"{name}_scale", t.scale.astype(np.float32))
        zp = self.const(f"{name}_zp", np.zeros(t.scale.shape, np.int32))
        return self.node("DequantizeLinear", [b, s, zp], self.uid(f"{name}_dq"), axis=0)

    def copies(self, op: Op) -> list[str]:
        """Output names for a dense layer: one per requantize that reads it, so that each DQ → Gemm → Q chain
        fuses into an integer kernel (a shared float output would stay a float Gemm); else the output itself."""
        readers = self.readers.get(op.output, [])
        if len(readers) > 1 and all(o.kind == "requantize" for o in readers):
            return [self.copy_for(op, o) for o in readers]
        return [op.output]

    def copy_for(self, op: Op, requantize: Op) -> str:
        """The name of ``op``'s output copy that ``requantize`` alone reads (its QuantizeLinear follows it)."""
        alias = f"{op.output}__for_{requantize.output}"
        self.alias[(requantize.output, op.output)] = alias
        return alias

    def requantize_routes(self, op: Op) -> list[tuple[list[Op], Op]] | None:
        """Every requantize that reads a conv's output, directly or through ReLUs and max pools, with the ops
        between (a ResNet stem's ReLU → max pool; CBAM's global max pool beside the block's own requantize);
        None where anything else reads it.

        The IR pools the int32 accumulators and requantizes after; onnxruntime fuses a conv into QLinearConv only
        when a QuantizeLinear alone follows it. Requantizing is monotone per channel (positive multipliers, zero
        maps to zero), so it commutes with ReLU and max pooling: Conv → Q → MaxPool on the codes computes the
        same integers, with one Conv → Q per route."""

        def routes_from(r: Op, chain: list[Op]) -> list[tuple[list[Op], Op]] | None:
            if r.kind == "requantize":
                return None if r.attrs["mode"] == "dyadic" else [(chain, r)]
            readers = self.readers.get(r.output, [])
            if r.kind not in ("relu", "maxpool2d") or not readers or r.output in self.ir.outputs:
                return None
            found: list[tuple[list[Op], Op]] = []
            for nxt in readers:
                if (sub := routes_from(nxt, [*chain, r])) is None:
                    return None
                found += sub
            return found

        readers = self.readers.get(op.output, [])
        routes = [routes_from(r, []) for r in readers]
        if not readers or op.output in self.ir.outputs or any(r is None for r in routes):
            return None
        return [route for rs in routes for route in rs]  # type: ignore[union-attr]

    @OPS.implements("conv2d")
    def op_conv2d(self, op: Op) -> None:
        """A float Conv of DQ inputs, one per requantize that reads it (:meth:`requantize_routes`), so that
        every DQ → Conv → Q chain fuses into an integer kernel; a shared float output would stay a float Conv."""
        a = op.attrs
        inputs = [self.dq(op.inputs[0]), self._weights(op.inputs[1])]
        if len(op.inputs) > 2:
            inputs.append(self._bias(op.inputs[2]))
        w_shape = self.ir.constants[op.inputs[1]].shape
        attrs = dict(strides=list(a["stride"]), pads=list(a["padding"]) * 2, dilations=list(a["dilation"]),
                     group=a["groups"], kernel_shape=list(w_shape[2:]))
        routes = self.requantize_routes(op)
        if routes is None or (len(routes) == 1 and not any(c.kind == "maxpool2d" for c in routes[0][0])):
            self.node("Conv", inputs, op.output, **attrs)
            return
        for chain, rq in routes:
            if not chain:  # the requantize writes its QuantizeLinear, reading this copy
                self.node("Conv", inputs, self.copy_for(op, rq), **attrs)
                continue
            t = self.ir.values[rq.output]
            relu = rq.attrs["relu"] or any(c.kind == "relu" for c in chain)
            src = self.quantize_to(self.node("Conv", inputs, **attrs), self.uid(f"{rq.output}_unpooled"),
                                   rectified(t) if relu else t)
            pools = [c for c in chain if c.kind == "maxpool2d"]
            for i, pool in enumerate(pools):
                src = self.maxpool(src, pool, rq.output if i == len(pools) - 1 else None)
            if not pools:
                self.node("Identity", [src], rq.output)
            self.done.add(rq.output)
            self.done.update(c.output for c in chain)

    @OPS.implements("dense")
    def op_dense(self, op: Op) -> None:
        """``Gemm``; on a channels-last input, of the codes reshaped to 2-d, the requantizes reading it reshaping
        their codes back (``op_requantize``), any other reader the float output."""
        x, shape = op.inputs[0], self.ir.values[op.output].shape
        nd = len(shape) > 2
        src = self.reshape(x, [-1, self.ir.values[x].shape[-1]]) if nd else x
        inputs = [self.dq(x, src), self._weights(op.inputs[1])]
        if len(op.inputs) > 2:
            inputs.append(self._bias(op.inputs[2]))
        float_readers = any(r.kind != "requantize" for r in self.readers.get(op.output, [])) or (
            op.output in self.ir.outputs)
        for out in self.copies(op):
            if not nd:
                self.node("Gemm", inputs, out, transB=1)
                continue
            self.flat[out] = self.node("Gemm", inputs, transB=1)
            if out == op.output and float_readers:
                self.reshape(self.flat[out], [-1, *shape[1:]], out)

    @OPS.implements("matmul")
    def op_matmul(self, op: Op) -> None:
        """``MatMulInteger`` of the codes, their containers' offsets as zero points: the exact int32 accumulator,
        held in float32 for the requantize that reads it (:meth:`holds_accumulator`). onnxruntime fuses DQ →
        ``MatMul`` → Q into its integer ``QLinearMatMul`` only when all three are uint8; a float ``MatMul`` would
        round its sums. A float model's product is a float ``MatMul``."""
        if self.ir.values[op.inputs[0]].dtype is DType.FLOAT32:
            self.node("MatMul", list(op.inputs), op.output)
            return
        inputs, zero_points = [], []
        for name in op.inputs:
            ty, offset = self.container(self.ir.values[name])
            inputs.append(name)
            zero_points.append(self.const(f"{name}_zp", np.array(offset, ty)))
        acc = self.node("MatMulInteger", [*inputs, *zero_points])
        self.node("Cast", [acc], op.output, to=self.onnx.TensorProto.FLOAT)

    @OPS.implements("relu")
    def op_relu(self, op: Op) -> None:
        t = self.ir.values[op.output]
        if t.dtype is DType.FLOAT32 or t.dtype is DType.INT32:
            self.node("Relu", [op.inputs[0]], op.output)
            return
        ty, offset = self.container(t)
        self.node("Clip", [op.inputs[0], self.const("zero", np.array(offset, ty)),
                           self.const("max", np.array(t.qmax + offset, ty))], op.output)

    def maxpool(self, src: str, op: Op, output: str | None = None) -> str:
        a = op.attrs
        return self.node("MaxPool", [src], output, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                         pads=list(a["padding"]) * 2, dilations=list(a["dilation"]),
                         ceil_mode=int(a["ceil_mode"]))

    @OPS.implements("maxpool2d")
    def op_maxpool2d(self, op: Op) -> None:
        self.maxpool(op.inputs[0], op, op.output)

    @OPS.implements("avgpool2d")
    def op_avgpool2d(self, op: Op) -> None:
        """A float ``AveragePool`` of unfused dequantized codes: onnxruntime fuses DQ → AveragePool → Q into its
        ``QLinearAveragePool``, which rounds differently (a DenseNet transition disagreed on 0.6% of outputs). In
        double where no quantizer follows (the model's output is the pooling), as the reference pools."""
        if op.output in self.tail:
            self.in_double(op, lambda x: self.avgpool_in_double(x, op))
            return
        a = op.attrs
        self.node("AveragePool", [self.unfused_dq(op.inputs[0])], op.output, kernel_shape=list(a["kernel"]),
                  strides=list(a["stride"]), pads=list(a["padding"]) * 2, count_include_pad=int(a["count_include_pad"]),
                  ceil_mode=int(a["ceil_mode"]))

    def avgpool_in_double(self, x: str, op: Op) -> str:
        """``avgpool2d`` of a double tensor (onnxruntime's ``AveragePool`` is float32 only): the window sums as a
        matrix product of the flattened map with the windows' 0/1 matrix, over PyTorch's divisors. Sums of
        float32 values are exact in double in any order, so this is the reference's pooling bit for bit."""
        (c, h, w), (oh, ow) = self.ir.values[op.inputs[0]].shape[1:], self.ir.values[op.output].shape[2:]
        flat = self.reshape(x, [-1, h * w])
        sums = self.node("MatMul", [flat, self.const("windows", avgpool_windows((h, w), op.attrs))])
        means = self.node("Div", [sums, self.const("divisors", avgpool_divisors((h, w), op.attrs).reshape(-1))])
        return self.reshape(means, [-1, c, oh, ow])

    @OPS.implements("adaptive_avgpool2d")
    def op_adaptive_avgpool2d(self, op: Op) -> None:
        """Global or fixed-window pooling where the output size divides the input; otherwise PyTorch's windows
        of two lengths, one ``ReduceMean`` per output cell, concatenated. Pooling a float op's output (not
        dequantized codes) takes double ``ReduceMean``s (onnxruntime pools in float32 only): float32 sums of
        arbitrary floats round where the reference's float64 sum, rounded once, does not; so does a pooling that
        no quantizer rounds again (the model's output is the pooling)."""
        out = tuple(op.attrs["output_size"])
        h, w = self.ir.values[op.inputs[0]].shape[2:]
        if not self.dequantized_codes(op.inputs[0]) or op.output in self.tail:
            self.in_double(op, lambda x: self.adaptive_windows(x, out, (h, w)))
            return
        src = self.unfused_dq(op.inputs[0])  # onnxruntime's QLinear pooling kernels round differently
        if out == (1, 1):
            self.node("GlobalAveragePool", [src], op.output)
        elif h % out[0] == 0 and w % out[1] == 0:
            k = [h // out[0], w // out[1]]
            self.node("AveragePool", [src], op.output, kernel_shape=k, strides=k)
        else:
            self.adaptive_windows(op.inputs[0], out, (h, w), op.output)

    def adaptive_windows(self, src: str, out: tuple[int, int], size: tuple[int, int], output: str | None = None,
                         reduce: str = "ReduceMean") -> str:
        """PyTorch's adaptive windows of ``src`` (H, W = ``size``), one ``reduce`` per output cell, joined."""
        rows = [[self.window_reduce(src, (i, out[0], size[0]), (j, out[1], size[1]), reduce)
                 for j in range(out[1])] for i in range(out[0])]
        joined = [r[0] if len(r) == 1 else self.node("Concat", r, axis=3) for r in rows]
        if len(joined) == 1:
            return self.node("Identity", joined, output) if output else joined[0]
        return self.node("Concat", joined, output, axis=2)

    def window_reduce(self, src: str, row: tuple[int, int, int], col: tuple[int, int, int], reduce: str) -> str:
        """``reduce`` (a mean, a max) over adaptive window (i of n over size) × (j of m over size), kept 4-d."""
        (h0, h1), (w0, w1) = adaptive_window(*row), adaptive_window(*col)
        c = [self.const(n_, np.array(v, np.int64)) for n_, v in (("starts", [h0, w0]), ("ends", [h1, w1]),
                                                                 ("axes", [2, 3]))]
        window = self.node("Slice", [src, *c])
        return self.node(reduce, [window, self.const("axes", np.array([2, 3], np.int64))], keepdims=1)

    @OPS.implements("adaptive_maxpool2d")
    def op_adaptive_maxpool2d(self, op: Op) -> None:
        """One ``ReduceMax`` per output cell on the codes (or the accumulator), joined."""
        size = self.ir.values[op.inputs[0]].shape[2:]
        self.adaptive_windows(op.inputs[0], tuple(op.attrs["output_size"]), size, op.output, "ReduceMax")

    @OPS.implements("global_avgpool")
    def op_global_avgpool(self, op: Op) -> None:
        """DQ → ``GlobalAveragePool`` → Q, which onnxruntime fuses into its ``QLinearGlobalAveragePool``: the
        IR's integer sum and float32 multiply (MLAS), with the NHWC layout its integer convs run in (the float
        form needs a transpose back to NCHW). Without ``keepdim``, the codes are reshaped to (N, C)."""
        t = self.ir.values[op.output]
        pooled = self.node("GlobalAveragePool", [self.dq(op.inputs[0])])
        if op.attrs["keepdim"]:
            self.quantize_to(pooled, op.output, t)
            return
        self.reshape(self.quantize_to(pooled, self.uid(f"{op.output}_4d"), t), [-1, t.shape[1]], op.output)

    @OPS.implements("mean")
    def op_mean(self, op: Op) -> None:
        """``ReduceMean``; in double for a float op's output and for a mean no quantizer rounds again, as
        adaptive pooling."""
        axes = self.const("axes", np.array(op.attrs["dims"], np.int64))
        keep = int(op.attrs["keepdim"])
        if self.dequantized_codes(op.inputs[0]) and op.output not in self.tail:
            self.node("ReduceMean", [op.inputs[0], axes], op.output, keepdims=keep)
            return
        self.in_double(op, lambda x: self.node("ReduceMean", [x, axes], keepdims=keep))

    @OPS.implements("reduce_sum")
    def op_reduce_sum(self, op: Op) -> None:
        """``ReduceSum`` in double, as the reference sums."""
        axes = self.const("axes", np.array(op.attrs["dims"], np.int64))
        self.in_double(op, lambda x: self.node("ReduceSum", [x, axes], keepdims=int(op.attrs["keepdim"])))

    @OPS.implements("reduce_l2")
    def op_reduce_l2(self, op: Op) -> None:
        """``sqrt(ReduceSum(x · x))`` in double, as the reference computes it."""
        self.in_double(op, lambda x: self.l2_norm(x, op.attrs["dims"], op.attrs["keepdim"]))

    def l2_norm(self, xd: str, dims: list[int], keepdim: bool) -> str:
        """``sqrt(Σ x²)`` over ``dims`` of a double tensor (``reduce_l2``, ``normalize``)."""
        sums = self.node("ReduceSum", [self.node("Mul", [xd, xd]), self.const("axes", np.array(dims, np.int64))],
                         keepdims=int(keepdim))
        return self.node("Sqrt", [sums])

    @OPS.implements("reduce_max")
    def op_reduce_max(self, op: Op) -> None:
        """``ReduceMax`` in float32: a max is one of its inputs, exact in any precision."""
        axes = self.const("axes", np.array(op.attrs["dims"], np.int64))
        self.node("ReduceMax", [op.inputs[0], axes], op.output, keepdims=int(op.attrs["keepdim"]))

    def in_double(self, op: Op, compute: Callable[[str], str]) -> None:
        """``op``'s float32 output computed in double from its first input (Cast in, ``compute``, Cast back), as
        the reference computes float ops in float64."""
        x = self.node("Cast", [op.inputs[0]], to=self.onnx.TensorProto.DOUBLE)
        self.node("Cast", [compute(x)], op.output, to=self.onnx.TensorProto.FLOAT)

    def codes_behind(self, name: str) -> TensorInfo | None:
        """The 8-bit code tensor a float value dequantizes, if it is a dequantize's output."""
        src = self.producer.get(name)
        if src is None or src.kind != "dequantize":
            return None
        t = self.ir.values[src.inputs[0]]
        return t if t.dtype is not DType.INT32 else None

    @OPS.implements("add")
    def op_add(self, op: Op) -> None:
        """One ``Add`` per quantize reading the sum where onnxruntime's fused QLinearAdd is provably exact
        (:func:`fused_add_is_exact`), so each DQ → Add → Q becomes that integer kernel; elsewhere a ``Sum``,
        which onnxruntime leaves unfused: float DQ → add → Q, the IR's semantics, at the price of three float
        passes over the tensor."""
        a, b = (self.codes_behind(n) for n in op.inputs)
        rest = op.output in self.ir.outputs
        for r in self.readers.get(op.output, []):
            if r.kind == "quantize" and a is not None and b is not None and fused_add_is_exact(
                    a, b, self.ir.values[r.output]):
                self.alias[(r.output, op.output)] = self.node("Add", list(op.inputs))
            else:
                rest = True
        if rest:
            self.node("Sum", list(op.inputs), op.output)

    @OPS.implements("mul")
    def op_mul(self, op: Op) -> None:
        """A float ``Mul``; onnxruntime would fuse DQ → Mul → Q of two dequantizations into ``QLinearMul``, which
        rounds differently, so one operand at most stays a ``DequantizeLinear`` (see :meth:`binary_operands`)."""
        self.node("Mul", self.binary_operands(op), op.output)

    @OPS.implements("div")
    def op_div(self, op: Op) -> None:
        self.node("Div", self.binary_operands(op), op.output)

    @OPS.implements("maximum")
    def op_maximum(self, op: Op) -> None:
        self.node("Max", self.binary_operands(op), op.output)

    @OPS.implements("minimum")
    def op_minimum(self, op: Op) -> None:
        self.node("Min", self.binary_operands(op), op.output)

    def binary_operands(self, op: Op) -> list[str]:
        """The float operands of a product or quotient: the largest dequantized-codes operand as it is (one
        ``DequantizeLinear`` pass over it), any other in its unfused form (:meth:`unfused_dq`), so that no
        QDQ pattern onnxruntime fuses into an integer kernel of its own arises. A squeeze-and-excitation gate
        multiplies a whole feature map: three float passes over it became one."""
        coded = [n for n in op.inputs if self.dequantized_codes(n)]
        kept = max(coded, key=lambda n: np.prod(self.ir.values[n].shape), default=None)
        if op.inputs.count(kept) > 1:
            kept = None
        return [n if n == kept else self.unfused_dq(n) for n in op.inputs]

    def dequantized_codes(self, name: str) -> bool:
        """Whether ``name`` is codes of at most 8 bits dequantized (not a float op's output or an accumulator)."""
        src = self.producer.get(name)
        return src is not None and src.kind == "dequantize" and self.ir.values[src.inputs[0]].dtype is not DType.INT32

    def unfused_dq(self, name: str) -> str:
        """``name`` itself unless it dequantizes codes: then ``Cast`` → ``Sub`` → ``Mul``, the same float32 values,
        in a form onnxruntime fuses into no integer kernel of its own."""
        if not self.dequantized_codes(name):
            return name
        src = self.producer[name]
        if name not in self.unfused:
            t = self.ir.values[src.inputs[0]]
            _, offset = self.container(t)
            x = self.node("Cast", [src.inputs[0]], to=self.onnx.TensorProto.FLOAT)
            if offset:
                x = self.node("Sub", [x, self.const("zp", np.array(offset, np.float32))])
            self.unfused[name] = self.node("Mul", [x, self.const(f"{name}_scale", t.scale.astype(np.float32))])
        return self.unfused[name]

    @OPS.implements("layer_norm")
    def op_layer_norm(self, op: Op) -> None:
        """``LayerNormalization`` in double (Cast in and out) on the input centred first. onnxruntime's kernel
        takes the variance as E[x²] - mean², which cancels where the mean is large against the spread; centred,
        it agrees with the reference's two-pass float64 form but for reduction order (measured: every float32
        output equal on millions of random dequantized codes; on adversarial ones, codes 250..255, at most one in
        10^6 a unit in the last place apart). Its epsilon attribute is a float32, hence the IR's float32 eps."""
        _, w, b = op.inputs
        k = self.ir.constants[w].ndim

        def normalize(xd: str) -> str:
            mean = self.node("ReduceMean", [xd, self.const("axes", np.arange(-k, 0, dtype=np.int64))], keepdims=1)
            affine = [self.const(n, self.ir.constants[n].astype(np.float64)) for n in (w, b)]
            return self.node("LayerNormalization", [self.node("Sub", [xd, mean]), *affine], axis=-k,
                             epsilon=float(op.attrs["eps"]))

        self.in_double(op, normalize)

    @OPS.implements("normalize")
    def op_normalize(self, op: Op) -> None:
        """The reference's float64 form op by op: ``x / max(sqrt(Σ x²), eps)``."""
        def normalize(xd: str) -> str:
            eps = self.const("eps", np.array(op.attrs["eps"], np.float64))
            return self.node("Div", [xd, self.node("Max", [self.l2_norm(xd, [op.attrs["dim"]], True), eps])])

        self.in_double(op, normalize)

    @OPS.implements("group_norm")
    def op_group_norm(self, op: Op) -> None:
        """The reference's float64 form op by op on (N, G, C/G·H·W) (onnxruntime has no double
        ``GroupNormalization``): mean, centred values, biased variance, ``d / sqrt(var + eps)``, back to the input's
        shape, ``· w + b`` per channel."""
        x, w, b = op.inputs
        channels = (-1,) + (1,) * (len(self.ir.values[x].shape) - 2)

        def normalize(xd: str) -> str:
            grouped = self.node("Reshape", [xd, self.const("groups", np.array([0, op.attrs["groups"], -1], np.int64))])
            last = self.const("axes", np.array([2], np.int64))
            d = self.node("Sub", [grouped, self.node("ReduceMean", [grouped, last], keepdims=1)])
            var = self.node("ReduceMean", [self.node("Mul", [d, d]), last], keepdims=1)
            eps = self.const("eps", np.array(op.attrs["eps"], np.float64))
            y = self.node("Reshape", [self.node("Div", [d, self.node("Sqrt", [self.node("Add", [var, eps])])]),
                                      self.node("Shape", [xd])])
            w64, b64 = (self.const(n, self.ir.constants[n].astype(np.float64).reshape(channels)) for n in (w, b))
            return self.node("Add", [self.node("Mul", [y, w64]), b64])

        self.in_double(op, normalize)

    @OPS.implements("softmax")
    @OPS.implements("log_softmax")
    def op_softmax(self, op: Op) -> None:
        """``Softmax`` / ``LogSoftmax`` in double (Cast in and out), as the reference."""
        kind = "Softmax" if op.kind == "softmax" else "LogSoftmax"
        self.in_double(op, lambda x: self.node(kind, [x], axis=op.attrs["dim"]))

    @OPS.implements("activation")
    def op_activation(self, op: Op) -> None:
        """A float model's function as onnxruntime's float32 kernel for it (the reference rounds its float64 value
        once: they agree within float32 rounding, which timing a float model does not need closer)."""
        self.float_function(op.inputs[0], op.attrs["function"], op.attrs, op.output)

    def float_function(self, x: str, fn: str, params: dict[str, Any], output: str | None = None) -> str:
        """Float ``fn`` (an IR activation, ``min``/``max``/``alpha`` from ``params``) of ``x`` in onnxruntime's
        float32 kernels."""
        if fn == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x])], output)
        if fn == "clip":
            bounds = [self.const(k, np.array(params[k], np.float32)) if k in params else "" for k in ("min", "max")]
            return self.node("Clip", [x, *bounds], output)
        if fn in ("gelu", "gelu_tanh"):
            return self.node("Gelu", [x], output, approximate="tanh" if fn == "gelu_tanh" else "none")
        if fn == "hardsigmoid":
            return self.node("HardSigmoid", [x], output, alpha=1.0 / 6.0, beta=0.5)
        if fn == "leaky_relu":
            return self.node("LeakyRelu", [x], output, alpha=float(params["alpha"]))
        if fn in SCALAR_ARITHMETIC:
            a = self.const("alpha", np.array(params["alpha"], np.float32))
            kind, operands = {"add": ("Add", [x, a]), "mul": ("Mul", [x, a]), "div": ("Div", [x, a]),
                              "rsub": ("Sub", [a, x]), "rdiv": ("Div", [a, x])}[fn]
            return self.node(kind, operands, output)
        return self.node({"sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}[fn], [x], output)

    @OPS.implements("lut")
    def op_lut(self, op: Op) -> None:
        """DQ → the table's float function → Q where onnxruntime computes the table that way
        (:func:`float_lut_is_exact`): its float kernels (or its own table, ``QLinearSigmoid``) beat a ``Gather``,
        which copies one byte per call and keeps the NHWC integer convs' layout from passing through, by far
        (EfficientNet-B0 at 32×32, batch 1: 6.45 → 1.31 ms, float 1.28 ms). Otherwise ``Gather`` from a 256-entry
        table over the 8-bit container's values (codes shifted by the container's zero point on both sides;
        container values outside the code range read the nearest code's entry)."""
        t_in, t_out = self.ir.values[op.inputs[0]], self.ir.values[op.output]
        fn = op.attrs.get("activation")
        if fn and (self.float_luts or float_lut_is_exact(t_in, t_out, self.ir.constants[op.inputs[1]], op.attrs)):
            self.quantize_to(self.float_function(self.dq(op.inputs[0]), fn, op.attrs), op.output, t_out)
            return
        _, off_in = self.container(t_in)
        ty, off_out = self.container(t_out)
        codes = np.clip(np.arange(256) - off_in, t_in.qmin, t_in.qmax)
        table = self.ir.constants[op.inputs[1]][codes - t_in.qmin] + off_out
        index = self.node("Cast", [op.inputs[0]], to=self.onnx.TensorProto.INT32)
        self.node("Gather", [self.const(f"{op.output}_table", table.astype(ty)), index], op.output, axis=0)

    @OPS.implements("upsample_nearest")
    def op_upsample_nearest(self, op: Op) -> None:
        """``Resize`` to the nearest pixel, the source index ``floor(dst / scale)``: each code repeated."""
        scales = self.const("scales", np.array([1, 1, *op.attrs["scale"]], np.float32))
        self.node("Resize", [op.inputs[0], "", scales], op.output, mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    @OPS.implements("upsample_bilinear")
    def op_upsample_bilinear(self, op: Op) -> None:
        """The reference's float64 taps (onnxruntime's ``Resize`` is float32): per axis, two ``Gather``s of the
        source pixels, each multiplied by its weights, added; width first."""
        def resize(xd: str) -> str:
            for axis, (low, high, w_low, w_high) in zip((3, 2), bilinear_taps(self.ir.values[op.inputs[0]].shape,
                                                                              op.attrs)):
                shape = (-1, 1) if axis == 2 else (-1,)
                taps = [self.node("Mul", [self.node("Gather", [xd, self.const("index", index)], axis=axis),
                                          self.const("weight", weight.reshape(shape))])
                        for index, weight in ((low, w_low), (high, w_high))]
                xd = self.node("Add", taps)
            return xd

        self.in_double(op, resize)

    @OPS.implements("transpose")
    def op_transpose(self, op: Op) -> None:
        self.node("Transpose", [op.inputs[0]], op.output, perm=list(op.attrs["perm"]))

    @OPS.implements("flip")
    def op_flip(self, op: Op) -> None:
        """``Slice`` backwards along each flipped axis: from the last element, step -1, to before the first."""
        dims = list(op.attrs["dims"])
        k = len(dims)
        backwards = self.const("steps", np.full(k, -1, np.int64))
        self.node("Slice", [op.inputs[0], self.const("starts", np.full(k, -1, np.int64)),
                            self.const("ends", np.full(k, np.iinfo(np.int64).min, np.int64)),
                            self.const("axes", np.array(dims, np.int64)), backwards], op.output)

    @OPS.implements("roll")
    def op_roll(self, op: Op) -> None:
        """Per rolled axis, the last ``shift`` elements ``Concat``-ed before the rest (two ``Slice``s)."""
        x = op.inputs[0]
        shape = self.ir.values[x].shape
        for i, (shift, dim) in enumerate(zip(op.attrs["shifts"], op.attrs["dims"])):
            cut = shape[dim] - shift % shape[dim]
            axis = self.const("axes", np.array([dim], np.int64))
            tail = self.node("Slice", [x, self.const("starts", np.array([cut], np.int64)),
                                       self.const("ends", np.array([shape[dim]], np.int64)), axis])
            head = self.node("Slice", [x, self.const("starts", np.array([0], np.int64)),
                                       self.const("ends", np.array([cut], np.int64)), axis])
            last = i == len(op.attrs["dims"]) - 1
            x = self.node("Concat", [tail, head], op.output if last else None, axis=dim)

    @OPS.implements("flatten")
    def op_flatten(self, op: Op) -> None:
        """``Flatten`` of every axis after the batch; any other range (``x.flatten(2)``: (N, C, H·W)) a ``Reshape``
        that copies the batch, since ONNX's ``Flatten`` always makes a matrix."""
        rank = len(self.ir.values[op.inputs[0]].shape)
        if op.attrs["start_dim"] == 1 and op.attrs["end_dim"] % rank == rank - 1:
            self.node("Flatten", [op.inputs[0]], op.output, axis=1)
            return
        shape = np.array([0, *self.ir.values[op.output].shape[1:]], np.int64)
        self.node("Reshape", [op.inputs[0], self.const("shape", shape)], op.output)

    @OPS.implements("reshape")
    def op_reshape(self, op: Op) -> None:
        self.node("Reshape", [op.inputs[0], self.const("shape", np.array(op.attrs["shape"], np.int64))], op.output)

    @OPS.implements("slice")
    def op_slice(self, op: Op) -> None:
        """``Slice`` over the axes the index cuts, then ``Squeeze`` of those an integer index drops."""
        index = basic_index(op.attrs["index"], len(self.ir.values[op.inputs[0]].shape))
        if index is None:
            self.unsupported(op)
        cuts, dropped = index
        if not cuts:
            self.node("Identity", [op.inputs[0]], op.output)
            return
        big = np.iinfo(np.int64).max
        starts, ends = [0 if c[1] is None else c[1] for c in cuts], [big if c[2] is None else c[2] for c in cuts]
        c = [self.const(n, np.array(v, np.int64)) for n, v in (("starts", starts), ("ends", ends),
                                                               ("axes", [c[0] for c in cuts]),
                                                               ("steps", [c[3] for c in cuts]))]
        if not dropped:
            self.node("Slice", [op.inputs[0], *c], op.output)
            return
        cut = self.node("Slice", [op.inputs[0], *c])
        self.node("Squeeze", [cut, self.const("axes", np.array(dropped, np.int64))], op.output)

    @OPS.implements("pad")
    def op_pad(self, op: Op) -> None:
        pads = op.attrs["pads"]
        rank = len(self.ir.values[op.inputs[0]].shape)
        begin, end = [0] * rank, [0] * rank
        for i in range(len(pads) // 2):
            begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
        t = self.ir.values[op.inputs[0]]
        if t.dtype in (DType.FLOAT32, DType.INT32):
            ty, offset = np.float32, 0
        else:
            ty, offset = self.container(t)
        pads_const = self.const("pads", np.array(begin + end, np.int64))
        if op.attrs["mode"] != "constant":
            self.node("Pad", [op.inputs[0], pads_const], op.output, mode=PAD_MODES[op.attrs["mode"]])
            return
        value = self.const("pad_value", np.array(op.attrs["value"] + offset, ty))
        self.node("Pad", [op.inputs[0], pads_const, value], op.output, mode="constant")

    @OPS.implements("concat")
    def op_concat(self, op: Op) -> None:
        """Codes of one grid concatenate as they are; dequantized ones unfused (onnxruntime's ``QLinearConcat``,
        which DQ → Concat → Q becomes, requantizes each input its own way)."""
        self.node("Concat", [self.unfused_dq(n) for n in op.inputs], op.output, axis=op.attrs["dim"])


_EXACT_FLOAT_LUTS: dict[tuple[Any, ...], bool] = {}

LUT_PROBE_OFFSETS = 17
"""Each input code is probed at this many positions (every alignment to a 16-float vector and one more), since a
runtime's vector kernels may take another path for a tail of elements."""


def float_lut_is_exact(t_in: TensorInfo, t_out: TensorInfo, table: np.ndarray, attrs: dict[str, Any]) -> bool:
    """Whether onnxruntime, on this machine, computes ``table`` (a ``lut``'s output codes per input code) from
    DQ → its float function → Q, for every input code at every alignment: a probe model of that form, run once
    per distinct table and cached. The artifact's own verification then checks the whole model again. Without
    onnxruntime nothing can be probed: False, so an export on such a machine writes the table itself."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    key = (t_in.dtype, t_in.qmin, t_in.qmax, t_in.scale.tobytes(), t_out.dtype, t_out.qmin, t_out.qmax,
           t_out.scale.tobytes(), table.tobytes(), tuple(sorted(attrs.items())))
    if key not in _EXACT_FLOAT_LUTS:
        codes = np.tile(np.arange(t_in.qmin, t_in.qmax + 1), LUT_PROBE_OFFSETS)
        shape = (1, len(codes))
        probe = IRGraph()
        probe.inputs.append(probe.add_value("x", TensorInfo(DType.FLOAT32, shape)))
        probe.add_op("quantize", ["x"], "codes", replace(t_in, shape=shape))
        entries = probe.add_constant("table", table, TensorInfo(DType.INT32, table.shape))
        probe.add_op("lut", ["codes", entries], "y", replace(t_out, shape=shape), **attrs)
        probe.outputs.append(probe.add_op("dequantize", ["y"], "out", TensorInfo(DType.FLOAT32, shape)))
        out = run(session(_Exporter(probe, "serving", float_luts=True).export(), threads=1),
                  [(codes * t_in.scale).astype(np.float32)[None]])[0]
        _EXACT_FLOAT_LUTS[key] = bool(np.array_equal(np.rint(out[0] / t_out.scale), table[codes - t_in.qmin]))
    return _EXACT_FLOAT_LUTS[key]


def unsigned_weights(weight_type: WeightType) -> bool:
    """Whether 8-bit weights that could saturate onnxruntime's uint8 × int8 kernels are stored as uint8:
    ``uint8`` always, ``int8`` never, ``auto`` where this CPU's kernels saturate
    (:func:`~qcompile.backends.host.u8s8_pairs_saturate`)."""
    if weight_type not in WEIGHT_TYPES:
        raise OnnxExportError(f"unknown ONNX weight type {weight_type!r}; use one of: {', '.join(WEIGHT_TYPES)}")
    return weight_type == "uint8" or (weight_type == "auto" and u8s8_pairs_saturate())


def to_onnx(ir: IRGraph, flavour: Flavour = "serving", metadata: dict[str, str] | None = None,
            weight_type: WeightType = "auto") -> Any:
    """The IR as an ONNX ModelProto of the given flavour, checked by onnx.checker.

    ``weight_type`` is onnxruntime's quantizer's choice of weight type, for the 8-bit weights whose codes pass
    ±64: ``int8`` runs its fastest kernels, which are exact on CPUs with VNNI or AMX but saturate on x86-64
    without (AVX2: a product pair past 32,767); ``uint8`` runs its exact uint8 × uint8 kernels everywhere, slower;
    ``auto`` takes ``int8`` where this machine's kernels are exact and ``uint8`` where they are not. Other weights
    are int8 in every case (no pair of their products can saturate). The choice is in the model's metadata."""
    if flavour not in ("serving", "compact"):
        raise OnnxExportError(f"unknown ONNX flavour {flavour!r}; use serving or compact")
    model = _Exporter(ir, flavour, weight_type=weight_type).export()
    meta = {"qcompile.flavour": flavour, "qcompile.weight_type": "uint8" if unsigned_weights(weight_type) else "int8",
            **{f"qcompile.{k}": str(v) for k, v in ir.metadata.items()}}
    meta.update(metadata or {})
    onnx = _onnx()
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def remaining_clips(ir: IRGraph, model: Any) -> list[dict[str, str]]:
    """Every ``Clip`` of an exported model, with the reason onnxruntime needs it: the exporter writes one only
    where the runtime would otherwise compute other codes than the IR."""
    clips = []
    for node in model.graph.node:
        if node.op_type != "Clip":
            continue
        op = node.name.rpartition(NODE_SEPARATOR)[0]
        t = ir.values[op]
        kind = next(o.kind for o in ir.ops if o.output == op)
        why = ("ReLU of signed codes: onnxruntime has no integer ReLU" if kind == "relu" else
               f"{t.dtype.bits}-bit codes in [{t.qmin}, {t.qmax}] stored in 8 bits: QuantizeLinear saturates only at "
               "the container's range")
        clips.append({"tensor": op, "why": why})
    return clips


def save(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write a model atomically."""
    from qcompile.artifacts import atomic_path

    with atomic_path(path) as tmp:
        _onnx().save(model, str(tmp))
    return Path(path)


def session(model: Any, threads: int = 2, optimized_path: str | None = None, spin_between_runs: bool = True,
            profile_prefix: str | None = None) -> Any:
    """An onnxruntime CPU session on ``model`` (a ModelProto or a path), at full graph optimisation.

    Its worker threads spin while a run is in progress, as in a deployed session; ``spin_between_runs=False``
    stops them when the run returns (``session.force_spinning_stop``), which a benchmark that alternates between
    sessions needs: the idle sessions' spinning threads would take the cores from the one being timed. (Forbidding
    spinning altogether instead, as qcompile did before, made ResNet-20 at batch 1 run 0.36 ms where a deployed
    session takes 0.25.) ``profile_prefix`` turns on onnxruntime's profiler, writing its trace there
    (``end_profiling()``)."""
    ort = require_extra("onnxruntime", extra="onnx", needed_for="running ONNX models", error=OnnxExportError)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin_between_runs:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # a kernel or a type this onnxruntime lacks: a runtime's refusal, not a traceback
        raise OnnxExportError.with_parameters(f"onnxruntime {ort.__version__} cannot load the ONNX model: "
                                              f"{first_line(exc)}; the TVM artifacts do not need it "
                                              "({backend} tvm)") from exc


def run(sess: Any, inputs: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Run a session on float32 inputs in graph order."""
    names = [i.name for i in sess.get_inputs()]
    try:
        return sess.run(None, {n: np.asarray(x, np.float32) for n, x in zip(names, inputs)})
    except Exception as exc:  # onnxruntime's own failure on this model's data (a kernel's shape check)
        raise OnnxExportError.with_parameters(f"onnxruntime cannot run the ONNX model: {first_line(exc)}; the TVM "
                                              "artifacts do not need it ({backend} tvm)") from exc


def layer_diff(ir: IRGraph, model: Any, x: np.ndarray) -> list[dict[str, Any]]:
    """Per integer tensor: onnxruntime's codes (exposed as extra graph outputs) against the reference's."""
    onnx = _onnx()
    from qcompile.ir import reference

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [op.output for op in ir.ops
             if ir.values[op.output].dtype.is_int and ir.values[op.output].dtype is not DType.INT32]
    for n in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UINT8, None))
    outs = run(session(probe), [x])[1:]
    env = reference.run(ir, x, keep=True)
    rows = []
    for n, o in zip(names, outs):
        agreement = TensorAgreement(n)
        agreement.update(env[n] + (128 if ir.values[n].dtype.signed else 0), o.astype(np.int64))
        rows.append({"name": n, "identical_fraction": agreement.identical_fraction,
                     "max_lsb_diff": agreement.max_lsb_diff})
    return rows


def compare_with_reference(ir: IRGraph, model: Any, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """onnxruntime vs the reference interpreter on ``(inputs, reference logits)`` pairs: top-1 agreement and
    the final integer outputs (the accumulators the logits are dequantized from)."""
    sess = session(model)
    return compare_backend(ir, lambda x: run(sess, [x])[0], pairs)
