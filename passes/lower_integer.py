"""Lower a calibrated fake-quant graph to the integer IR (:mod:`qcompile.ir`).

Each fake-quant construct becomes its integer meaning: an activation quantizer on a float tensor is
``quantize``, on a conv/dense accumulator a ``requantize`` (a ReLU or a clamp such as ReLU6 between them folds
into its clipping), on codes of another grid ``dequantize`` → ``quantize``, and on a unary function of codes
(SiLU, sigmoid, Hardswish, a clamp, ``x + 3``) a ``lut``: the table of the quantizer's output code for every
input code, computed with the function the fake-quant model calls. A quantized conv/dense is an integer
conv/dense with int32 accumulation and bias (a dense on a channels-last tensor has its channels, and its
accumulator's scales, on the last axis), and so is a matrix product of two quantized tensors (one scale,
``s_a · s_b``); ReLU, max-pool, reshapes, transposes, flips and rolls, slices (``chunk``, ``split`` and
``unbind`` pieces included), zero padding and same-grid concatenation act on codes; a quantized global average of codes
(adaptive or global-window average pooling, a mean over every axis after the channels) is an integer
``global_avgpool``; add, mul, LayerNorm, L2 norms and other average pooling and means run in float between dequantize and
quantize (ONNX QDQ semantics). A node it cannot lower is an error naming the node, the op and the source line.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from qcompile.errors import QCompileError
from qcompile.frontend.elementwise import (
    Bounds,
    Unary,
    arithmetic_kind,
    binary_extremum,
    is_binary_mul,
    scalar_arguments,
    tensor_input,
    unary_of,
)
from qcompile.frontend.canonical import attribute_tensor
from qcompile.frontend.graph import (argument, is_matmul, is_relu, layer_names, module_of, nearest_upsampling,
                                     permutation, resize_mode, softmax_of, target_name, unused_name)
from qcompile.frontend.shapes import BATCH_MULTIPLE
from qcompile.frontend.source_lines import source_location
from qcompile.ir.bounds import check_int32
from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.reference import PAD_MODES, global_avgpool_multiplier
from qcompile.ir.types import DType, TensorInfo
from qcompile.passes.align_add_scales import add_groups, concat_inputs
from qcompile.pipeline import CALIBRATED, LOWERED, QUANTIZERS, Pass, PassContext
from qcompile.quantization.quantizer import (
    ActivationQuantizer,
    BiasQuantizer,
    QuantizerState,
    WeightQuantizer,
    channel_axis,
)


class LoweringError(QCompileError):
    """A node has no integer lowering."""


@dataclass
class _Val:
    """What an fx node lowered to: an IR value, with a ReLU or clamp still to apply to an accumulator (folded
    into the requantize that follows), or a unary function of codes (tabulated by the quantizer that follows)."""

    name: str
    relu: bool = False
    clamp: Bounds | None = None
    unary: Unary | None = None


_ADD_FUNCS = {operator.add, torch.add}
_ALIAS_MODULES = (nn.Identity, nn.Dropout)
_SPLITS = {"chunk", "split", "unbind"}


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def dyadic(multiplier: np.ndarray, bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """``M ≈ m · 2^-shift`` with int32 ``m`` in [2^30, 2^31): HAWQ-V3's integer-only requantization."""
    m = np.asarray(multiplier, dtype=np.float64)
    exp = np.floor(np.log2(m)).astype(np.int64)
    shift = (bits - 1) - exp
    mant = np.rint(m * np.exp2(shift)).astype(np.int64)
    overflow = mant >= 2**bits
    mant = np.where(overflow, mant // 2, mant)
    shift = np.where(overflow, shift - 1, shift)
    if (shift < 1).any() or (shift > 62).any():
        raise LoweringError("requantize multiplier out of the dyadic range")
    return mant.astype(np.int32), shift.astype(np.int32)


class _Lowerer:
    def __init__(self, gm: fx.GraphModule, dyadic_requant: bool) -> None:
        self.gm = gm
        self.g = IRGraph()
        self.env: dict[fx.Node, _Val | None] = {}
        self.dyadic = dyadic_requant
        self._dq_cache: dict[str, str] = {}
        self.layer_names = layer_names(gm)  # a module called at several sites gets constants per site
        self._tied: set[int] | None = None  # quantizers whose scales align_add_scales tied together

    # --- helpers -----------------------------------------------------------------------------------------
    def free_scale(self, q: ActivationQuantizer) -> bool:
        """Whether ``q``'s scale is its own: not aligned with others' at a residual add or a concatenation
        (:mod:`~qcompile.passes.align_add_scales`), so that lowering may narrow it."""
        if self._tied is None:
            modules = dict(self.gm.named_modules())
            self._tied = {id(modules[n]) for group in add_groups(self.gm) for n in group}
            self._tied |= {id(t) for group in concat_inputs(self.gm) for t in group}
        return id(q) not in self._tied

    def fail(self, node: fx.Node, reason: str) -> LoweringError:
        return LoweringError(f"cannot lower node {node.name} ({node.op} {target_name(node)}) at "
                             f"{source_location(node)}: {reason}")

    def src(self, node: fx.Node) -> str:
        return f"{node.name} @ {source_location(node)}"

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        tm = node.meta.get("tensor_meta")
        return tuple(int(d) for d in tm.shape) if tm is not None and hasattr(tm, "shape") else ()

    def info(self, name: str) -> TensorInfo:
        return self.g.values[name]

    def value(self, node: fx.Node, arg: Any) -> _Val:
        if not isinstance(arg, fx.Node) or self.env.get(arg) is None:
            raise self.fail(node, f"input {arg!r} is not a tensor the IR can hold")
        return self.env[arg]  # type: ignore[return-value]

    def materialize(self, node: fx.Node, v: _Val) -> str:
        """The value with any pending ReLU applied (a pending clamp or unary function needs a quantizer)."""
        if v.clamp is not None or v.unary is not None:
            raise self.fail(node, f"reads the result of {(v.unary.name if v.unary else 'a clamp')} without a "
                                  "quantizer between them (run insert_quantizers)")
        if not v.relu:
            return v.name
        out = f"{v.name}__relu"
        if out not in self.g.values:
            t = self.info(v.name)
            self.g.add_op("relu", [v.name], out, TensorInfo(t.dtype, t.shape, t.scale, t.axis, t.qmin, t.qmax),
                          self.src(node))
        return out

    def as_float(self, node: fx.Node, arg: Any) -> str:
        name = self.materialize(node, self.value(node, arg))
        t = self.info(name)
        if t.dtype is DType.FLOAT32:
            return name
        if name not in self._dq_cache:
            out = f"{name}__dq"
            self.g.add_op("dequantize", [name], out, TensorInfo(DType.FLOAT32, t.shape), self.src(node))
            self._dq_cache[name] = out
        return self._dq_cache[name]

    def operand(self, node: fx.Node, arg: Any, keeps_channels: bool) -> str:
        """The input as codes, or dequantized when it is a per-channel accumulator whose channels the op moves."""
        name = self.materialize(node, self.value(node, arg))
        return name if keeps_channels or not self.info(name).per_channel else self.as_float(node, arg)

    def same(self, node: fx.Node, kind: str, inputs: list[str], **attrs: Any) -> str:
        """An op whose output has the input's type (codes stay codes) and the node's shape."""
        t = self.info(inputs[0])
        info = TensorInfo(t.dtype, self.shape(node), t.scale, t.axis, t.qmin, t.qmax)
        return self.g.add_op(kind, inputs, node.name, info, self.src(node), **attrs)

    def float_op(self, node: fx.Node, kind: str, inputs: list[str], **attrs: Any) -> str:
        return self.g.add_op(kind, inputs, node.name, TensorInfo(DType.FLOAT32, self.shape(node)), self.src(node),
                             **attrs)

    # --- lowering ----------------------------------------------------------------------------------------
    def lower(self) -> IRGraph:
        for node in self.gm.graph.nodes:
            self.env[node] = self.lower_node(node)
        self.g.prune()  # the float form of a pooling that global_avgpool replaced, unless something else reads it
        return self.g

    def lower_node(self, node: fx.Node) -> _Val | None:
        if node.op == "placeholder":
            self.g.inputs.append(node.name)
            return _Val(self.g.add_value(node.name, TensorInfo(DType.FLOAT32, self.shape(node))))
        if node.op == "output":
            self.lower_output(node)
            return None
        if node.op == "get_attr":
            return None  # a parameter read as a tensor: its reader fails, naming itself
        if "tensor_meta" not in node.meta or _is_split(node):
            return None  # sizes and other Python values, chunk/split tuples: consumers read what they need
        if (head := softmax_of(self.gm, node)) is not None:
            return self.lower_softmax(node, *head)
        if (scale := nearest_upsampling(self.gm, node)) is not None:
            return self.lower_upsampling(node, scale)
        if (mode := resize_mode(self.gm, node)) in ("bilinear", "linear"):
            return self.lower_bilinear(node)
        if mode is not None:
            raise self.fail(node, f"{mode!r} resizing to {list(self.shape(node)[2:])} does not lower: only "
                                  "nearest-neighbour upsampling by whole factors and bilinear resizing do")
        m = module_of(self.gm, node)
        if m is not None:
            return self.lower_module(node, m)
        if node.op == "call_function" and node.target is torch.einsum:  # one that capture left as written
            raise self.fail(node, f"einsum {node.args[0]!r} has no integer lowering: an einsum lowers as products "
                                  "of tensors that share a batch index and of a tensor and a weight that shares no "
                                  "index with the output; diagonals and operands that broadcast do not")
        return self.lower_call(node)

    def lower_output(self, node: fx.Node) -> None:
        if isinstance(node.args[0], dict):
            keys = ", ".join(repr(k) for k in node.args[0])
            raise LoweringError(f"the model returns a dict (keys {keys}); a compiled model returns a tensor or a tuple "
                                "of tensors, the logits first: wrap it in a module that returns those")
        outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
        for o in outs:
            name = self.as_float(node, o)
            self.g.outputs.append(name)

    def lower_module(self, node: fx.Node, m: nn.Module) -> _Val | None:
        if is_relu(self.gm, node):
            return self.lower_relu(node)
        if (u := unary_of(self.gm, node)) is not None:
            return self.lower_unary(node, u)
        if isinstance(m, ActivationQuantizer):
            return self.lower_quantizer(node, m)
        if isinstance(m, nn.Conv2d | nn.Linear):
            return self.lower_layer(node, m)
        if isinstance(m, nn.LayerNorm):
            return self.lower_layer_norm(node, m)
        if isinstance(m, nn.GroupNorm):
            return self.lower_group_norm(node, m)
        if isinstance(m, nn.PReLU):
            return self.lower_prelu(node, m.weight)
        if isinstance(m, _ALIAS_MODULES):
            return self.value(node, node.args[0])
        if isinstance(m, nn.MaxPool2d):
            return self.lower_maxpool(node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            return self.lower_avgpool(node, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                      m.divisor_override)
        if isinstance(m, nn.AdaptiveMaxPool2d):
            return self.lower_adaptive_maxpool(node)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return _Val(self.float_op(node, "adaptive_avgpool2d", [self.as_float(node, node.args[0])],
                                      output_size=list(self.shape(node)[2:])))
        if isinstance(m, nn.Flatten):
            return self.lower_flatten(node, m.start_dim, m.end_dim)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            raise self.fail(node, f"{type(m).__name__} without running statistics (track_running_stats=False) "
                                  "normalises every batch by that batch's statistics; it has no integer lowering")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise self.fail(node, f"a {type(m).__name__} that fold_bn could neither fold into its layer nor make a "
                                  "layer of its own (the report's fold_bn warning says why) has no integer lowering")
        raise self.fail(node, f"module type {type(m).__name__} has no integer lowering")

    def lower_call(self, node: fx.Node) -> _Val | None:
        t = node.target
        fn = node.op == "call_function"
        meth = node.op == "call_method"
        if (kind := _float_arithmetic(node)) is not None:
            return self.lower_arithmetic(node, kind)
        if fn and t is F.prelu and (slope := attribute_tensor(self.gm, argument(node, 1, "weight"))) is not None:
            return self.lower_prelu(node, slope)
        scalars = scalar_arguments(self.gm, node)
        params = [str(a.target) for a in node.args
                  if isinstance(a, fx.Node) and a.op == "get_attr" and a not in scalars]
        if params:
            raise self.fail(node, f"reads parameter {params[0]} as a tensor; parameters lower only as a layer's "
                                  "weights or as a layer scale right after a conv/dense (folded by fold_bn)")
        if is_relu(self.gm, node):
            return self.lower_relu(node)
        if (u := unary_of(self.gm, node)) is not None:
            return self.lower_unary(node, u)
        if is_binary_mul(node):
            return _Val(self.float_op(node, "mul", [self.as_float(node, a) for a in node.args]))
        if is_matmul(node):
            return self.lower_matmul(node)
        if (extremum := binary_extremum(node)) is not None:  # exact on dequantized codes, as a max pooling is
            return _Val(self.float_op(node, extremum, [self.as_float(node, a) for a in node.args]))
        if (fn and t in _ADD_FUNCS) or (meth and t == "add"):
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            if len(tensors) != 2 or node.kwargs.get("alpha", 1) != 1:
                raise self.fail(node, "only tensor + tensor additions lower (add a quantized constant as a layer)")
            return _Val(self.float_op(node, "add", [self.as_float(node, a) for a in tensors]))
        if (fn and t is torch.flatten) or (meth and t == "flatten"):
            return self.lower_flatten(node, argument(node, 1, "start_dim", 0), argument(node, 2, "end_dim", -1))
        if (fn and t in (torch.reshape, torch.squeeze, torch.unsqueeze)) or (
                meth and t in ("view", "reshape", "squeeze", "unsqueeze")):
            return self.lower_reshape(node)
        if (meth and t in ("contiguous", "clone")) or (fn and t is F.dropout and argument(node, 2, "training", True)
                                                        is False):
            return self.value(node, node.args[0])
        if (fn and t in (torch.permute, torch.transpose)) or (meth and t in ("permute", "transpose")):
            return self.lower_transpose(node)
        if (fn and t is torch.flip) or (meth and t == "flip"):
            return self.lower_flip(node)
        if (fn and t is torch.roll) or (meth and t == "roll"):
            return self.lower_roll(node)
        if fn and t is F.max_pool2d:
            k = argument(node, 1, "kernel_size")
            return self.lower_maxpool(node, k, argument(node, 2, "stride") or k, argument(node, 3, "padding", 0),
                                      argument(node, 4, "dilation", 1), argument(node, 5, "ceil_mode", False))
        if fn and t is F.avg_pool2d:
            k = argument(node, 1, "kernel_size")
            return self.lower_avgpool(node, k, argument(node, 2, "stride") or k, argument(node, 3, "padding", 0),
                                      argument(node, 4, "ceil_mode", False),
                                      argument(node, 5, "count_include_pad", True),
                                      argument(node, 6, "divisor_override"))
        if fn and t is F.adaptive_max_pool2d:
            return self.lower_adaptive_maxpool(node)
        if fn and t is F.adaptive_avg_pool2d:
            return _Val(self.float_op(node, "adaptive_avgpool2d", [self.as_float(node, node.args[0])],
                                      output_size=list(self.shape(node)[2:])))
        if (fn and t in (torch.mean, torch.sum)) or (meth and t in ("mean", "sum")):
            return self.lower_reduction(node, "mean" if t in (torch.mean, "mean") else "sum")
        if (fn and t in (torch.max, torch.amax)) or (meth and t in ("max", "amax")):
            return self.lower_reduce_max(node)
        if (fn and t in (torch.norm, torch.linalg.vector_norm)) or (meth and t == "norm"):
            return self.lower_norm(node)
        if fn and t in (operator.getitem, getattr) and isinstance(node.args[0], fx.Node) and _is_max_over_dim(
                node.args[0]):
            if node.args[1] not in (0, "values"):
                raise self.fail(node, "the indices of a max (an argmax) do not lower; use its values")
            return self.value(node, node.args[0])
        if fn and t is operator.getitem and isinstance(node.args[0], fx.Node) and _is_split(node.args[0]):
            return self.lower_split_piece(node)
        if fn and t is operator.getitem:
            return self.lower_slice(node)
        if fn and t is F.pad:
            return self.lower_pad(node)
        if fn and t is F.normalize:
            return self.lower_normalize(node)
        if fn and t is torch.cat:
            return self.lower_concat(node)
        raise self.fail(node, "this operation has no integer lowering")

    def lower_quantizer(self, node: fx.Node, q: ActivationQuantizer) -> _Val:
        if q.state is not QuantizerState.FROZEN:
            raise self.fail(node, "activation quantizer is not calibrated (run the calibrate pass)")
        spec = q.spec
        out_t = TensorInfo(DType.for_bits(spec.bits, spec.signed), self.shape(node),
                           q.scale.detach().numpy().astype(np.float32), None, spec.qmin, spec.qmax)
        v = self.value(node, node.args[0])
        if v.unary is not None:
            return _Val(self.lut(node, v, q, out_t))
        in_t = self.info(v.name)
        if in_t.dtype is DType.FLOAT32 and (pooled := self.integer_pool(node, v, out_t)) is not None:
            return _Val(pooled)
        if in_t.dtype is DType.FLOAT32:
            # an unsigned quantize clamps at 0, so a pending ReLU is already in it: Q(relu(x)) = Q(x)
            src = v.name if v.relu and out_t.qmin >= 0 else self.materialize(node, v)
            return _Val(self.g.add_op("quantize", [src], node.name, out_t, self.src(node)))
        if in_t.dtype is DType.INT32 and q.accumulator_scale() is None:
            # the fake-quant quantizer rounds the float value: so does the IR (DQ → Q), bit for bit
            return _Val(self.g.add_op("quantize", [self.as_float(node, node.args[0])], node.name, out_t,
                                      self.src(node)))
        if in_t.dtype is DType.INT32:
            if not np.array_equal(q.accumulator_scale().numpy().astype(np.float32), in_t.scale):
                raise self.fail(node, "the quantizer's accumulator scale differs from the IR's (internal error)")
            attrs: dict[str, Any] = {"relu": v.relu}
            if v.clamp is not None:
                out_t = self.clamped(node, q, v.clamp, out_t, in_t.scale.size)  # may narrow q's scale
                attrs["relu"] = False
            mult = (in_t.scale.astype(np.float64) / float(out_t.scale)).astype(np.float32)
            if self.dyadic:
                mant, shift = dyadic(mult)
                attrs.update(mode="dyadic",
                             mantissa=self.g.add_constant(f"{node.name}__m", mant, TensorInfo(DType.INT32, mant.shape)),
                             shift=self.g.add_constant(f"{node.name}__shift", shift, TensorInfo(DType.INT32, shift.shape)))
            else:
                attrs.update(mode="float32", multiplier=self.g.add_constant(
                    f"{node.name}__mult", mult, TensorInfo(DType.FLOAT32, mult.shape)))
            return _Val(self.g.add_op("requantize", [v.name], node.name, out_t, self.src(node), **attrs))
        src = self.materialize(node, v)
        same_grid = (in_t.dtype, in_t.qmin, in_t.qmax) == (out_t.dtype, out_t.qmin, out_t.qmax) and np.array_equal(
            in_t.scale, out_t.scale)
        if same_grid:
            return _Val(src)
        return _Val(self.g.add_op("quantize", [self.as_float(node, node.args[0])], node.name, out_t, self.src(node)))

    def integer_pool(self, node: fx.Node, v: _Val, out_t: TensorInfo) -> str | None:
        """``quantize(reshape*(global mean(dequantize(codes))))`` as ``reshape*(global_avgpool(codes))``: an
        integer sum and one float32 multiply per channel, where the float form reads every code back as a float
        (onnxruntime runs it as its ``QLinearGlobalAveragePool``). The reshapes and flattens between the pooling
        and the quantizer move onto the codes, and one to (N, C) (``torch.flatten(x, 1)``) makes it a pooling
        without ``keepdim``. None where the pattern does not hold. The float ops left behind are pruned after
        lowering unless something else reads them."""
        if v.relu and out_t.qmin < 0:
            return None  # Q(relu(x)) is Q(x) only for an unsigned quantizer
        reshapes: list[Op] = []
        pool = self.g.producer(v.name)
        while pool is not None and pool.kind in ("flatten", "reshape"):
            reshapes.append(pool)
            pool = self.g.producer(pool.inputs[0])
        if pool is None or not self.is_global_mean(pool):
            return None
        dq = self.g.producer(pool.inputs[0])
        if dq is None or dq.kind != "dequantize":
            return None
        codes = self.info(dq.inputs[0])
        if not codes.dtype.is_int or codes.dtype is DType.INT32 or codes.per_channel:
            return None
        pooled = replace(out_t, shape=self.info(pool.output).shape)
        if global_avgpool_multiplier(codes, pooled) is None:
            return None
        keepdim = pool.attrs["keepdim"] if pool.kind == "mean" else True
        if reshapes and len(out_t.shape) == 2:  # flattened to (N, C): the pooling without keepdim, as it is
            keepdim, reshapes, pooled = False, [], out_t
        name = self.g.add_op("global_avgpool", [dq.inputs[0]], f"{node.name}__pooled" if reshapes else node.name,
                             pooled, pool.source, keepdim=keepdim)
        for i, op in enumerate(reversed(reshapes)):
            out = node.name if i == len(reshapes) - 1 else f"{node.name}__{op.output}"
            name = self.g.add_op(op.kind, [name], out, replace(out_t, shape=self.info(op.output).shape), op.source,
                                 **op.attrs)
        return name

    def is_global_mean(self, op: Op) -> bool:
        """Whether ``op`` averages each channel over every axis after it: H and W of a 4-d value, or L of an
        (N, C, L) view (``x.view(n, c, -1).mean(2)``)."""
        x = self.info(op.inputs[0])
        rank = len(x.shape)
        if op.kind == "mean":
            return rank >= 3 and sorted(d % rank for d in op.attrs["dims"]) == list(range(2, rank))
        if rank != 4:
            return False
        if op.kind == "adaptive_avgpool2d":
            return list(op.attrs["output_size"]) == [1, 1]
        return (op.kind == "avgpool2d" and list(op.attrs["kernel"]) == list(x.shape[2:])
                and list(op.attrs["padding"]) == [0, 0])

    def clamped(self, node: fx.Node, q: ActivationQuantizer, bounds: Bounds, out_t: TensorInfo,
                channels: int) -> TensorInfo:
        """The requantize's code range narrowed to the clamp's bounds: the fake-quant model requantizes the
        clamped accumulator, which (requantizing being monotone) is the requantized codes clipped to the codes of
        the bounds. Those are computed by the quantizer itself; they must agree across ``channels``, and where
        they do not (a bound calibration made the range's end), a scale of the quantizer's own is narrowed until
        they do (:meth:`ActivationQuantizer.saturate_at`)."""
        lo, hi = out_t.qmin, out_t.qmax
        for i, b in enumerate(bounds):
            if b is None:
                continue
            codes = q.codes(torch.full((1, channels), b, dtype=torch.float32)).unique()
            if codes.numel() != 1 and self.free_scale(q) and q.saturate_at(b, channels):
                codes = q.codes(torch.full((1, channels), b, dtype=torch.float32)).unique()
            if codes.numel() != 1:
                raise self.fail(node, f"the clamp bound {b} requantizes to different codes per channel "
                                      f"({codes.tolist()}); quantize the clamp's input explicitly")
            lo, hi = (max(lo, int(codes)), hi) if i == 0 else (lo, min(hi, int(codes)))
        return replace(out_t, scale=q.scale.detach().numpy().astype(np.float32), qmin=lo, qmax=hi)

    def lut(self, node: fx.Node, v: _Val, q: ActivationQuantizer, out_t: TensorInfo) -> str:
        """``lut``: the quantizer's code of the unary function of every input code's dequantized value, computed
        as the fake-quant model computes it (float32 ``q · s``, the model's own function, the quantizer)."""
        assert v.unary is not None
        table = tabulate(v.unary.fn, self.info(v.name), q)
        if table is None:  # named after the function, where the model computes it, not after its quantizer
            fn_node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node
            raise self.fail(fn_node, f"{v.unary.name} is not finite on every code of its input (a code outside its "
                                     "domain: the log of 0, a root of a negative code); clamp its input first")
        name = self.g.add_constant(f"{node.name}__table", table, TensorInfo(DType.INT32, table.shape))
        float_form = {"activation" if k == "function" else k: a for k, a in (v.unary.activation or {}).items()}
        return self.g.add_op("lut", [v.name, name], node.name, out_t, self.src(node), function=v.unary.name,
                             **float_form)

    def lower_arithmetic(self, node: fx.Node, kind: str) -> _Val:
        """Float ``+ - * /`` with a parameter or buffer (``(x - self.mean) / self.std``, a model normalising its own
        input), or ``-`` and ``/`` of two values. ``a - b`` is ``a + (-b)``, the same float32 result; a constant
        is stored at the output's rank (broadcasting as it did)."""
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
            raise self.fail(node, "arithmetic with alpha or a rounding mode does not lower")
        a, b = (self.float_operand(node, arg) for arg in node.args[:2])
        if kind == "sub":
            kind, b = "add", self.negated(node, b)
        return _Val(self.float_op(node, kind, [a, b]))

    def float_operand(self, node: fx.Node, arg: Any) -> str:
        """A value as float, or a parameter, buffer or number as a float32 constant."""
        t = attribute_tensor(self.gm, arg)
        if t is None and isinstance(arg, fx.Node):
            return self.as_float(node, arg)
        data = t.detach().numpy() if t is not None else np.asarray(arg)
        rank = len(self.shape(node))
        if data.ndim > rank:
            raise self.fail(node, f"a constant of rank {data.ndim} does not broadcast to the rank-{rank} output")
        data = data.astype(np.float32).reshape((1,) * (rank - data.ndim) + data.shape)
        base = str(arg.target) if t is not None else f"{node.name}.constant"
        return self.g.add_constant(self.free_name(base), data, TensorInfo(DType.FLOAT32, data.shape))

    def negated(self, node: fx.Node, name: str) -> str:
        """``-x``: a constant negated, a value times -1 (both exact)."""
        if name in self.g.constants:
            data = -self.g.constants[name]
            return self.g.add_constant(self.free_name(f"{name}.neg"), data, TensorInfo(DType.FLOAT32, data.shape))
        shape = self.info(name).shape
        ones = (1,) * len(shape)  # at the value's own rank, so the product keeps its shape
        minus = self.g.add_constant(self.free_name(f"{node.name}.minus_one"), np.full(ones, -1.0, np.float32),
                                    TensorInfo(DType.FLOAT32, ones))
        return self.g.add_op("mul", [name, minus], self.free_name(f"{node.name}.neg"),
                             TensorInfo(DType.FLOAT32, shape), self.src(node))

    def lower_prelu(self, node: fx.Node, slope: torch.Tensor) -> _Val:
        """PReLU (one slope, or one per channel) as exact float ops: ``relu(x) + (-a)·relu(-x)`` is ``x`` where
        ``x > 0`` and ``a·x`` elsewhere, each product rounded once as PyTorch rounds it."""
        x = self.as_float(node, node.args[0])
        shape, rank = self.shape(node), len(self.shape(node))
        a = slope.detach().numpy().astype(np.float32).reshape(-1)
        per_channel = a.reshape((1,) * rank) if a.size == 1 else a.reshape((1, a.size) + (1,) * (rank - 2))
        info = TensorInfo(DType.FLOAT32, shape)

        def op(kind: str, inputs: list[str], suffix: str) -> str:
            return self.g.add_op(kind, inputs, self.free_name(f"{node.name}.{suffix}"), info, self.src(node))

        minus_a = self.g.add_constant(self.free_name(f"{node.name}.minus_slope"), -per_channel,
                                      TensorInfo(DType.FLOAT32, per_channel.shape))
        negative = op("relu", [self.negated(node, x)], "negative_part")
        scaled = op("mul", [negative, minus_a], "scaled_negative")
        return _Val(self.float_op(node, "add", [op("relu", [x], "positive_part"), scaled]))

    def free_name(self, base: str) -> str:
        return unused_name(base, self.g.values.__contains__)

    def lower_unary(self, node: fx.Node, u: Unary) -> _Val:
        """A clamp of an accumulator stays pending until its requantize; a function of codes until the
        quantizer that tabulates it."""
        v = self.value(node, tensor_input(node))
        t = self.info(v.name)
        if u.clamp is not None and t.dtype is DType.INT32 and v.unary is None:
            return _Val(v.name, clamp=_tighter(_tighter(v.clamp, (0.0, None) if v.relu else None), u.clamp))
        if t.dtype is DType.FLOAT32:
            return self.lower_float_unary(node, u)
        if not t.dtype.is_int or t.dtype is DType.INT32 or t.per_channel or v.unary is not None or v.clamp:
            raise self.fail(node, f"{u.name} of a value that is not quantized per tensor does not lower "
                                  "(insert_quantizers quantizes its input)")
        return _Val(self.materialize(node, v), unary=u)

    def lower_float_unary(self, node: fx.Node, u: Unary) -> _Val:
        """A function of a float value (a float model's, which tabulates nothing): float arithmetic with the
        number, or the IR's float ``activation``."""
        if (kind := arithmetic_kind(node)) is not None:
            return self.lower_arithmetic(node, kind)
        if u.activation is not None:
            return _Val(self.float_op(node, "activation", [self.as_float(node, tensor_input(node))], **u.activation))
        raise self.fail(node, f"{u.name} of a float value does not lower: the IR computes it only on quantized "
                              "codes (as a table)")

    def lower_transpose(self, node: fx.Node) -> _Val:
        src = node.args[0]
        perm = permutation(node, len(self.shape(src)))  # type: ignore[arg-type]
        assert perm is not None
        if perm[0] != 0:
            raise self.fail(node, "a transpose that moves the batch dimension does not lower")
        x = self.operand(node, src, keeps_channels=perm[1] == 1)
        return _Val(self.same(node, "transpose", [x], perm=perm))

    def lower_flip(self, node: fx.Node) -> _Val:
        """``torch.flip(x, dims)`` (test-time augmentation in ``forward``: the image mirrored) moves codes."""
        src, rank = node.args[0], len(self.shape(node))
        dims = argument(node, 1, "dims")
        dims = sorted({int(d) % rank for d in ((dims,) if isinstance(dims, int) else dims)})
        if 0 in dims:
            raise self.fail(node, "a flip of the batch dimension does not lower")
        x = self.operand(node, src, keeps_channels=1 not in dims)
        return _Val(self.same(node, "flip", [x], dims=dims))

    def lower_roll(self, node: fx.Node) -> _Val:
        """``torch.roll(x, shifts, dims)`` (Swin's shifted windows, spatial-shift blocks) moves codes."""
        src, rank = node.args[0], len(self.shape(node))
        shifts, dims = argument(node, 1, "shifts"), argument(node, 2, "dims")
        shifts = [shifts] if isinstance(shifts, int) else list(shifts)
        dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else []
        if not dims or len(dims) != len(shifts) or any(d % rank == 0 for d in dims):
            raise self.fail(node, "a roll of the batch dimension, or of the flattened tensor, does not lower")
        x = self.operand(node, src, keeps_channels=all(d % rank != 1 for d in dims))
        return _Val(self.same(node, "roll", [x], shifts=[int(s) for s in shifts], dims=[d % rank for d in dims]))

    def lower_reduction(self, node: fx.Node, what: str) -> _Val:
        """A mean or a sum over some dimensions (not the batch): float ``mean`` / ``reduce_sum`` of the
        dequantized input, in float64 and rounded once (timm's selective kernels sum their branches so)."""
        dims = argument(node, 1, "dim")
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            raise self.fail(node, f"a {what} over every dimension (batch included) does not lower")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(d % len(self.shape(node.args[0])) == 0 for d in dims):
            raise self.fail(node, f"a {what} over the batch dimension does not lower")
        if argument(node, 3, "dtype") is not None:
            raise self.fail(node, f"a {what} with a dtype does not lower")
        return _Val(self.float_op(node, "mean" if what == "mean" else "reduce_sum",
                                  [self.as_float(node, node.args[0])], dims=dims,
                                  keepdim=bool(argument(node, 2, "keepdim", False))))

    def lower_norm(self, node: fx.Node) -> _Val:
        """The L2 norm over some dimensions (not the batch): ``torch.norm(x, p=2, dim=(1, 2), keepdim=True)``
        (ConvNeXt V2's global response normalisation), ``x.norm(dim=...)``, ``torch.linalg.vector_norm``; a
        float ``reduce_l2`` of the dequantized input, in float64 and rounded once."""
        vector = node.target is torch.linalg.vector_norm
        p = argument(node, 1, "ord" if vector else "p", 2 if vector else "fro")
        dims, keepdim = argument(node, 2, "dim"), argument(node, 3, "keepdim", False)
        rank = len(self.shape(node.args[0]))
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if p not in (2, 2.0, "fro", None) or not dims or any(d % rank == 0 for d in dims) or len(node.args) > 4 or (
                node.kwargs.get("dtype") is not None or node.kwargs.get("out") is not None):
            raise self.fail(node, f"a norm with p={p!r} over dim={dims or None} does not lower: only the L2 norm "
                                  "over dimensions after the batch does")
        return _Val(self.float_op(node, "reduce_l2", [self.as_float(node, node.args[0])],
                                  dims=[d % rank for d in dims], keepdim=bool(keepdim)))

    def lower_reduce_max(self, node: fx.Node) -> _Val:
        """``torch.max(x, dim)`` (its values: ``[0]`` or ``.values`` read them) and ``amax`` over some
        dimensions, as a float ``reduce_max`` of the dequantized input, exact in any precision."""
        dims = argument(node, 1, "dim")
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            raise self.fail(node, "a max over every dimension (batch included) does not lower")
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = len(self.shape(node.args[0]))
        if any(d % rank == 0 for d in dims):
            raise self.fail(node, "a max over the batch dimension does not lower")
        tm = node.meta["tensor_meta"]
        shape = tuple(int(d) for d in (tm if hasattr(tm, "shape") else tm[0]).shape)  # torch.max: values, indices
        return _Val(self.g.add_op("reduce_max", [self.as_float(node, node.args[0])], node.name,
                                  TensorInfo(DType.FLOAT32, shape), self.src(node), dims=dims,
                                  keepdim=bool(argument(node, 2, "keepdim", False))))

    def lower_split_piece(self, node: fx.Node) -> _Val:
        """Piece i of ``chunk``/``split``: a slice along the split dimension, bounds from the recorded shapes;
        of ``unbind`` (``q, k, v = qkv.unbind(1)``): index i of that dimension."""
        split, i = node.args[0], node.args[1]
        src = split.args[0]
        rank = len(self.shape(src))
        unbind = split.target in ("unbind", torch.unbind)
        dim = int(argument(split, 1 if unbind else 2, "dim", 0)) % rank
        if dim == 0:
            raise self.fail(node, "splitting the batch dimension does not lower")
        pieces = [tuple(p.shape) for p in split.meta["tensor_meta"]]
        i = int(i) % len(pieces)
        if unbind:
            piece = {"index": i}
        else:
            start = sum(p[dim] for p in pieces[:i])
            piece = {"slice": [start, start + pieces[i][dim], None]}
        items = [{"slice": [None, None, None]}] * dim + [piece]
        x = self.operand(node, src, keeps_channels=dim != 1)
        return _Val(self.same(node, "slice", [x], index=items))

    def lower_layer(self, node: fx.Node, m: nn.Conv2d | nn.Linear) -> _Val:
        quantized = parametrize.is_parametrized(m, "weight")
        layer = self.layer_names[node]
        if isinstance(m, nn.Conv2d):
            if isinstance(m.padding, str) or m.padding_mode != "zeros":
                raise self.fail(node, f"conv padding {m.padding!r} / mode {m.padding_mode!r} does not lower; "
                                      "use explicit integer zero padding")
            attrs: dict[str, Any] = dict(stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation),
                                         groups=m.groups)
            kind = "conv2d"
        else:
            attrs, kind = {}, "dense"
        if not quantized:
            x = self.as_float(node, node.args[0])
            w = self.g.add_constant(f"{layer}.weight", m.weight.detach().numpy().astype(np.float32),
                                    TensorInfo(DType.FLOAT32, tuple(m.weight.shape)))
            inputs = [x, w]
            if m.bias is not None:
                inputs.append(self.g.add_constant(f"{layer}.bias", m.bias.detach().numpy().astype(np.float32),
                                                  TensorInfo(DType.FLOAT32, tuple(m.bias.shape))))
            return _Val(self.float_op(node, kind, inputs, **attrs))
        v = self.value(node, node.args[0])
        x = self.materialize(node, v)
        xt = self.info(x)
        if not xt.dtype.is_int or xt.dtype is DType.INT32 or xt.per_channel:
            raise self.fail(node, "a quantized layer must consume a per-tensor quantized activation")
        wq = next(p for p in m.parametrizations.weight if isinstance(p, WeightQuantizer))
        w_float = m.parametrizations.weight.original.detach()
        s_w = wq.scale_for(w_float)
        codes = torch.round(w_float / s_w).clamp(wq.spec.qmin, wq.spec.qmax).to(torch.int32).numpy()
        s_w = s_w.reshape(-1).numpy().astype(np.float32)
        w = self.g.add_constant(
            f"{layer}.weight", codes,
            TensorInfo(DType.for_bits(wq.spec.bits, True), codes.shape, s_w, 0, wq.spec.qmin, wq.spec.qmax))
        s_acc = (torch.from_numpy(xt.scale) * torch.from_numpy(s_w)).numpy().astype(np.float32)
        inputs = [x, w]
        if m.bias is not None:
            bq = next(p for p in m.parametrizations.bias if isinstance(p, BiasQuantizer))
            b = torch.round(m.parametrizations.bias.original.detach() / bq.scale()).to(torch.int64).numpy()
            if np.abs(b).max(initial=0) > 2**31 - 1:
                raise self.fail(node, "the int32 bias overflows; the layer's input or weight scale is too small")
            inputs.append(self.g.add_constant(f"{layer}.bias", b.astype(np.int32),
                                              TensorInfo(DType.INT32, b.shape, s_acc, 0)))
        shape = self.shape(node)
        return _Val(self.g.add_op(kind, inputs, node.name,
                                  TensorInfo(DType.INT32, shape, s_acc, channel_axis(m, len(shape))),
                                  self.src(node), **attrs))

    def lower_matmul(self, node: fx.Node) -> _Val:
        """A matrix product of two quantized tensors (a global-context block's attention pooling): the codes'
        exact product into an int32 accumulator at ``float32(s_a · s_b)``, which the quantizer reading it
        requantizes as a layer's (insert_quantizers links the two). Of two float tensors, a float product."""
        names = [self.materialize(node, self.value(node, a)) for a in node.args]
        a, b = (self.info(n) for n in names)
        if a.dtype is DType.FLOAT32 and b.dtype is DType.FLOAT32:  # the float model (bf16, --measure's)
            return _Val(self.float_op(node, "matmul", names))
        if any(not t.dtype.is_int or t.dtype is DType.INT32 or t.per_channel for t in (a, b)):
            raise self.fail(node, "a matrix product lowers on the codes of two quantized tensors (run "
                                  "insert_quantizers)")
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise self.fail(node, "a matrix product of a vector does not lower: unsqueeze it to a matrix")
        s_acc = np.asarray(np.float32(a.scale) * np.float32(b.scale), dtype=np.float32)
        return _Val(self.g.add_op("matmul", names, node.name, TensorInfo(DType.INT32, self.shape(node), s_acc),
                                  self.src(node)))

    def lower_layer_norm(self, node: fx.Node, m: nn.LayerNorm) -> _Val:
        """Float ``layer_norm`` of the dequantized input; the quantizer of whatever reads it (the next layer's
        input) rounds it. A missing weight or bias is ones or zeros (exact); eps is kept as the float32 that
        PyTorch adds."""
        consts = self.affine_constants(node, m, tuple(m.normalized_shape))
        return _Val(self.float_op(node, "layer_norm", [self.as_float(node, node.args[0]), *consts],
                                  eps=float(np.float32(m.eps))))

    def affine_constants(self, node: fx.Node, m: nn.LayerNorm | nn.GroupNorm, shape: tuple[int, ...]) -> list[str]:
        """A norm's weight and bias as float32 constants of ``shape``; ones and zeros where it has none (exact)."""
        affine = {"weight": m.weight if m.weight is not None else torch.ones(shape),
                  "bias": m.bias if m.bias is not None else torch.zeros(shape)}
        return [self.g.add_constant(f"{node.name}.{k}", t.detach().numpy().astype(np.float32),
                                    TensorInfo(DType.FLOAT32, shape)) for k, t in affine.items()]

    def lower_group_norm(self, node: fx.Node, m: nn.GroupNorm) -> _Val:
        """Float ``group_norm`` of the dequantized input, as :meth:`lower_layer_norm` (BiT's ResNetV2 and other
        small-batch ResNets normalise with it where BatchNorm would fold into the conv)."""
        consts = self.affine_constants(node, m, (m.num_channels,))
        return _Val(self.float_op(node, "group_norm", [self.as_float(node, node.args[0]), *consts],
                                  groups=int(m.num_groups), eps=float(np.float32(m.eps))))

    def lower_normalize(self, node: fx.Node) -> _Val:
        """``F.normalize`` (L2, a cosine classifier's features or an embedding): a float op of the dequantized
        input in float64 in every backend; the quantizer of whatever reads it rounds it. eps is kept as the
        float32 that PyTorch compares with."""
        p, dim = argument(node, 1, "p", 2.0), argument(node, 2, "dim", 1)
        rank = len(self.shape(node))
        if p != 2 or not isinstance(dim, int) or dim % rank == 0:
            raise self.fail(node, f"F.normalize with p={p}, dim={dim} does not lower: only the L2 norm over a "
                                  "dimension after the batch does")
        return _Val(self.float_op(node, "normalize", [self.as_float(node, node.args[0])], dim=dim % rank,
                                  eps=float(np.float32(argument(node, 3, "eps", 1e-12)))))

    def lower_softmax(self, node: fx.Node, kind: str, dim: int | None) -> _Val:
        """Float ``softmax`` / ``log_softmax`` of the dequantized input (a classifier's head: the PyTorch MNIST
        example ends in ``F.log_softmax``), in float64 in every backend."""
        if dim is None:
            raise self.fail(node, f"{kind} without dim (PyTorch's implicit choice is deprecated): pass dim=1")
        return _Val(self.float_op(node, kind, [self.as_float(node, node.args[0])], dim=dim % len(self.shape(node))))

    def lower_relu(self, node: fx.Node) -> _Val:
        v = self.value(node, node.args[0])
        t = self.info(v.name)
        if v.clamp is not None:
            return _Val(v.name, clamp=_tighter(v.clamp, (0.0, None)))
        if t.dtype in (DType.INT32, DType.FLOAT32):
            return _Val(v.name, relu=True)  # folded into the (re)quantize that follows, else applied where read
        return _Val(self.same(node, "relu", [self.materialize(node, v)]))

    def lower_maxpool(self, node: fx.Node, k: Any, s: Any, p: Any, d: Any, ceil: bool) -> _Val:
        v = self.value(node, node.args[0])
        x = v.name if v.clamp is not None else self.materialize(node, v)  # max pooling commutes with a clamp
        return _Val(self.same(node, "maxpool2d", [x], kernel=list(_pair(k)), stride=list(_pair(s if s else k)),
                              padding=list(_pair(p)), dilation=list(_pair(d)), ceil_mode=bool(ceil)), clamp=v.clamp)

    def lower_upsampling(self, node: fx.Node, scale: tuple[int, int]) -> _Val:
        """Nearest-neighbour upsampling repeats each value, on the codes insert_quantizers puts before it."""
        x = self.materialize(node, self.value(node, node.args[0]))
        return _Val(self.same(node, "upsample_nearest", [x], scale=list(scale)))

    def lower_bilinear(self, node: fx.Node) -> _Val:
        """Bilinear resizing (``F.interpolate(mode="bilinear")``, ``nn.Upsample``, ``nn.UpsamplingBilinear2d``): a
        float op of the dequantized input, in float64 in every backend, with PyTorch's source coordinates (the
        quantizer of whatever reads it rounds it)."""
        m = module_of(self.gm, node)
        if m is not None:
            factor, align, recompute, antialias = m.scale_factor, m.align_corners, m.recompute_scale_factor, False
        else:
            factor, align = argument(node, 2, "scale_factor"), argument(node, 4, "align_corners")
            recompute, antialias = argument(node, 5, "recompute_scale_factor"), argument(node, 6, "antialias", False)
        if antialias or len(self.shape(node)) != 4:
            raise self.fail(node, "bilinear resizing lowers for 4-d tensors without antialias")
        factors = factor if isinstance(factor, (tuple, list)) else (factor, factor)
        scale = [0.0, 0.0] if factor is None or recompute else [float(f) for f in factors]
        return _Val(self.float_op(node, "upsample_bilinear", [self.as_float(node, node.args[0])],
                                  size=list(self.shape(node)[2:]), align_corners=bool(align), scale=scale))

    def lower_adaptive_maxpool(self, node: fx.Node) -> _Val:
        """Adaptive max pooling on codes: where every output takes an equal window of the input (global max
        pooling, to 1×1), a ``maxpool2d`` whose kernel and stride are that window; else PyTorch's windows of two
        lengths (a spatial pyramid's 7×7 to 2×2), an ``adaptive_maxpool2d``."""
        if argument(node, 2, "return_indices", False) or getattr(module_of(self.gm, node), "return_indices", False):
            raise self.fail(node, "max pooling that returns indices does not lower")
        sides, out = self.shape(node.args[0])[2:], self.shape(node)[2:]
        if not any(i % o for i, o in zip(sides, out)):
            window = [i // o for i, o in zip(sides, out)]
            return self.lower_maxpool(node, window, window, 0, 1, False)
        v = self.value(node, node.args[0])
        x = v.name if v.clamp is not None else self.materialize(node, v)  # max pooling commutes with a clamp
        return _Val(self.same(node, "adaptive_maxpool2d", [x], output_size=list(out)), clamp=v.clamp)

    def lower_avgpool(self, node: fx.Node, k: Any, s: Any, p: Any, ceil: bool, include_pad: bool,
                      divisor: Any) -> _Val:
        if divisor is not None:
            raise self.fail(node, "average pooling with divisor_override does not lower")
        x = self.as_float(node, node.args[0])
        return _Val(self.float_op(node, "avgpool2d", [x], kernel=list(_pair(k)), stride=list(_pair(s if s else k)),
                                  padding=list(_pair(p)), count_include_pad=bool(include_pad), ceil_mode=bool(ceil)))

    def lower_flatten(self, node: fx.Node, start: int, end: int) -> _Val:
        if start == 0:
            raise self.fail(node, "flattening the batch dimension does not lower")
        x = self.operand(node, node.args[0], keeps_channels=False)
        return _Val(self.same(node, "flatten", [x], start_dim=int(start), end_dim=int(end)))

    def lower_reshape(self, node: fx.Node) -> _Val:
        """A reshape after the batch dimension, or one folding rows of each sample into it and back (attention
        heads as ``q.reshape(B * heads, d, -1)`` ... ``out.reshape(B, C, H, W)``): the IR's ``-1`` first size then
        keeps each sample's rows together at any batch size."""
        src = node.args[0]
        out, inp = self.shape(node), self.shape(src)  # type: ignore[arg-type]
        if not out or not inp or (out[0] != inp[0] and not self.folds_batch(node, out[0])):
            raise self.fail(node, "a reshape that moves the batch dimension does not lower")
        x = self.operand(node, src, keeps_channels=False)
        return _Val(self.same(node, "reshape", [x], shape=[-1, *out[1:]]))

    def folds_batch(self, node: fx.Node, rows: int) -> bool:
        """Whether a reshape's first size is a whole number of rows per sample at any batch size: ``-1`` with
        the rest fixed, or a size the capture found to be k times the batch size (:data:`BATCH_MULTIPLE`)."""
        if not ((node.op == "call_function" and node.target is torch.reshape)
                or (node.op == "call_method" and node.target in ("view", "reshape"))):
            return False  # a squeeze or unsqueeze of the batch
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if not sizes or any(isinstance(s, fx.Node) for s in sizes[1:]):
            return False
        batch = self.example_batch()
        first = sizes[0]
        if isinstance(first, fx.Node):
            return first.meta.get(BATCH_MULTIPLE, 0) * batch == rows
        return first == -1 and rows % batch == 0

    def example_batch(self) -> int:
        """The batch size of the example input the shapes were recorded with."""
        return next(self.shape(n)[0] for n in self.gm.graph.nodes if n.op == "placeholder" and self.shape(n))

    def lower_slice(self, node: fx.Node) -> _Val:
        src, index = node.args[0], node.args[1]
        if not isinstance(src, fx.Node) or self.env.get(src) is None:
            raise self.fail(node, "indexing a non-tensor")
        items = []
        for it in index if isinstance(index, tuple) else (index,):
            if isinstance(it, slice):
                if any(isinstance(b, fx.Node) for b in (it.start, it.stop, it.step)):
                    raise self.fail(node, "slice bounds computed at run time do not lower")
                items.append({"slice": [it.start, it.stop, it.step]})
            elif isinstance(it, int):
                if not items and it is not None:
                    raise self.fail(node, "indexing the batch dimension does not lower")
                items.append({"index": it})
            elif it is Ellipsis:
                items.append({"ellipsis": True})
            elif it is None:
                items.append({"none": True})
            else:
                raise self.fail(node, f"index {it!r} does not lower (tensor indices are not supported)")
        if items and "slice" in items[0] and items[0]["slice"] != [None, None, None]:
            raise self.fail(node, "slicing the batch dimension does not lower")
        plain = all("slice" in it for it in items[:2])
        keeps = plain and (len(items) < 2 or items[1]["slice"] == [None, None, None])
        x = self.operand(node, src, keeps_channels=keeps)
        return _Val(self.same(node, "slice", [x], index=items))

    def lower_pad(self, node: fx.Node) -> _Val:
        pads = list(argument(node, 1, "pad"))
        mode = argument(node, 2, "mode", "constant")
        value = argument(node, 3, "value", None) or 0.0
        if mode not in PAD_MODES:
            raise self.fail(node, f"padding mode {mode!r} does not lower ({', '.join(PAD_MODES)} do)")
        if mode != "constant":  # values of the input repeated: on codes, as a zero padding
            x = self.operand(node, node.args[0], keeps_channels=len(pads) <= 4)
            return _Val(self.same(node, "pad", [x], pads=pads, mode=mode))
        if value == 0:
            x = self.operand(node, node.args[0], keeps_channels=len(pads) <= 4)
            return _Val(self.same(node, "pad", [x], pads=pads, value=0))
        return _Val(self.float_op(node, "pad", [self.as_float(node, node.args[0])], pads=pads, value=float(value)))

    def lower_concat(self, node: fx.Node) -> _Val:
        parts = argument(node, 0, "tensors")
        dim = argument(node, 1, "dim", 0)
        if dim % len(self.shape(node)) == 0:
            raise self.fail(node, "concatenating along the batch dimension does not lower")
        names = [self.materialize(node, self.value(node, p)) for p in parts]
        types = [self.info(n) for n in names]
        first = types[0]
        on_one_grid = all(
            t.dtype is first.dtype and t.dtype is not DType.INT32 and (t.qmin, t.qmax) == (first.qmin, first.qmax)
            and t.scale is not None and first.scale is not None and not t.per_channel
            and np.array_equal(t.scale, first.scale)
            for t in types
        )
        if on_one_grid:
            return _Val(self.same(node, "concat", names, dim=int(dim)))
        return _Val(self.float_op(node, "concat", [self.as_float(node, p) for p in parts], dim=int(dim)))


def _float_arithmetic(node: fx.Node) -> str | None:
    """``add``/``sub``/``mul``/``div`` when the node is arithmetic the float ops take: with a parameter or buffer
    operand, or a subtraction or division of two values (a sum or product of two values, and arithmetic with a
    Python number alone, lower elsewhere)."""
    kind = arithmetic_kind(node, inplace=True)
    if kind is None:
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if any(a.op == "get_attr" for a in tensors):
        return kind
    return kind if len(tensors) == 2 and kind in ("sub", "div") else None


def _tighter(a: Bounds | None, b: Bounds | None) -> Bounds | None:
    """Both clamps applied, as one: the larger of the lower bounds, the smaller of the upper ones."""
    if a is None or b is None:
        return a or b
    lows = [x for x in (a[0], b[0]) if x is not None]
    highs = [x for x in (a[1], b[1]) if x is not None]
    return (max(lows) if lows else None, min(highs) if highs else None)


@torch.no_grad()
def tabulate(fn: Callable[[torch.Tensor], torch.Tensor], in_t: TensorInfo, q: ActivationQuantizer) -> np.ndarray | None:
    """The output code of ``fn`` for every input code ``qmin..qmax`` of ``in_t``: quantizer ``q`` of ``fn`` of
    the float32 dequantized code ``code · s_in``, as the fake-quant model computes it; None if not finite."""
    x = torch.arange(in_t.qmin, in_t.qmax + 1, dtype=torch.float32) * torch.from_numpy(in_t.scale).float()
    y = fn(x)
    if not bool(torch.isfinite(y).all()):
        return None
    return q.codes(y).numpy().astype(np.int32)


def _is_max_over_dim(node: fx.Node) -> bool:
    """``torch.max(x, dim)`` / ``x.max(dim)``: values and indices, as a pair."""
    return ((node.op == "call_function" and node.target is torch.max) or (
        node.op == "call_method" and node.target == "max")) and len(node.args) + len(node.kwargs) > 1


def _is_split(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _SPLITS) or (
        node.op == "call_function" and node.target in (torch.chunk, torch.split, torch.unbind))


class LowerInteger(Pass):
    """Lower the calibrated fake-quant graph to ``ctx.ir`` (the graph module itself is unchanged); a layer whose
    int32 accumulator some input could overflow is refused (:func:`qcompile.ir.bounds.check_int32`)."""

    name = "lower_integer"
    requires = frozenset({QUANTIZERS, CALIBRATED})
    guarantees = frozenset({LOWERED})

    def __init__(self, dyadic: bool = False) -> None:
        self.dyadic = dyadic

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        ir = _Lowerer(gm, self.dyadic).lower()
        check_int32(ir)  # proven for every input, not only the verification images
        ir.metadata.update(recipe=ctx.recipe.name, width=ctx.width, requantize="dyadic" if self.dyadic else "float32")
        ctx.ir = ir
        return gm
