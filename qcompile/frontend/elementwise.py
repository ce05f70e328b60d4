"""Elementwise functions of a captured graph: which node computes which float function of one tensor.

The integer IR runs a unary function of a quantized tensor of at most 8 bits as a table of output codes, one per
input code (docs/numerics.md), computed once at lowering from the very function the fake-quant model calls. So any
function of one tensor and constants qualifies: activations (SiLU, Hardswish, GELU, sigmoid, ...), clamps,
arithmetic with a Python number (``x + 3``, ``x / 6``, ``x ** 2``) and elementwise math (``abs``, ``exp``, ``sqrt``,
...). Clamps (ReLU6, Hardtanh, ``clamp``) are recorded with
their bounds as well: right after a conv or dense layer they fold into the requantize's clipping instead.
Common activations also name the IR's float ``activation`` that computes them, which a float model runs and
which the ONNX exporter uses for a table where onnxruntime computes the same codes from it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.frontend.graph import ElementwiseRegion, argument, target_name

Bounds = tuple[float | None, float | None]


@dataclass(frozen=True)
class Unary:
    """A node's float function of its one tensor input; ``clamp`` holds the bounds when it is a clamp, and
    ``activation`` the attributes of the IR's float ``activation`` op that computes it, when one does (a float
    model runs its functions as such ops; a quantized one tabulates them)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    clamp: Bounds | None = None
    activation: dict[str, Any] | None = None


_MODULE_ACTIVATIONS = {nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
                       nn.Hardsigmoid: "hardsigmoid"}
_FUNCTION_ACTIVATIONS = {F.silu: "silu", F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", "sigmoid": "sigmoid",
                         torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh", F.hardswish: "hardswish",
                         "hardswish": "hardswish", F.hardsigmoid: "hardsigmoid"}


def _clip(bounds: Bounds) -> dict[str, Any]:
    return {"function": "clip"} | {k: v for k, v in zip(("min", "max"), bounds) if v is not None}


def _gelu(approximate: object) -> dict[str, Any]:
    return {"function": "gelu_tanh" if approximate == "tanh" else "gelu"}


def _module_activation(m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, nn.Hardtanh):
        return _clip((float(m.min_val), float(m.max_val)))
    if isinstance(m, nn.GELU):
        return _gelu(m.approximate)
    if isinstance(m, nn.LeakyReLU):
        return {"function": "leaky_relu", "alpha": float(m.negative_slope)}
    name = _MODULE_ACTIVATIONS.get(type(m))
    return {"function": name} if name else None


def _function_activation(node: fx.Node, clamp: Bounds | None) -> dict[str, Any] | None:
    t = node.target
    if clamp is not None:
        return _clip(clamp) if any(b is not None for b in clamp) else None
    if t is F.gelu:
        return _gelu(argument(node, 1, "approximate", "none"))
    if t is F.leaky_relu:
        return {"function": "leaky_relu", "alpha": float(argument(node, 1, "negative_slope", 0.01))}
    name = _FUNCTION_ACTIVATIONS.get(t)  # type: ignore[call-overload]
    return {"function": name} if name else None


_MODULES = (
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.RReLU, nn.Threshold,
)
_FUNCTIONS = {
    F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.sigmoid, torch.sigmoid, F.gelu, torch.tanh, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, torch.clamp, torch.clip, torch.clamp_min,
    torch.clamp_max, F.softsign, F.logsigmoid, F.tanhshrink, F.softshrink, F.hardshrink, F.rrelu, F.threshold,
    # elementwise math of one tensor and numbers (``x ** 2``, ``torch.abs(x)``, ``-x``): tables like the rest
    torch.abs, torch.exp, torch.expm1, torch.log, torch.log1p, torch.sqrt, torch.rsqrt, torch.square, torch.erf,
    torch.neg, operator.neg, torch.reciprocal, torch.pow, operator.pow,
}
_METHODS = {"sigmoid", "tanh", "clamp", "clip", "clamp_min", "clamp_max", "hardswish", "abs", "exp", "expm1", "log",
            "log1p", "sqrt", "rsqrt", "square", "erf", "neg", "reciprocal", "pow"}
_ARITHMETIC_FUNCTIONS = {
    **dict.fromkeys((operator.add, torch.add), "add"), **dict.fromkeys((operator.sub, torch.sub), "sub"),
    **dict.fromkeys((operator.mul, torch.mul), "mul"), **dict.fromkeys((operator.truediv, torch.div), "div"),
}
_ARITHMETIC_METHODS = ("add", "sub", "mul", "div")
_CLAMP_ARGS = {  # callable -> (positional index, keyword) of its lower and upper bound
    F.hardtanh: ((1, "min_val"), (2, "max_val")),
    torch.clamp: ((1, "min"), (2, "max")),
    torch.clip: ((1, "min"), (2, "max")),
    "clamp": ((1, "min"), (2, "max")),
    "clip": ((1, "min"), (2, "max")),
    torch.clamp_min: ((1, "min"), None),
    "clamp_min": ((1, "min"), None),
    torch.clamp_max: (None, (1, "max")),
    "clamp_max": (None, (1, "max")),
}


def _constant(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _attribute(gm: fx.GraphModule, v: fx.Node) -> Any:
    """What a ``get_attr`` node reads, as it is now."""
    return operator.attrgetter(str(v.target))(gm)


def _scalar_attribute(gm: fx.GraphModule, v: Any) -> bool:
    """Whether ``v`` reads a one-element parameter or buffer (GeM pooling's learned exponent, ``x.pow(self.p)``)."""
    if not isinstance(v, fx.Node) or v.op != "get_attr":
        return False
    t = _attribute(gm, v)
    return isinstance(t, torch.Tensor) and t.numel() == 1


def scalar_arguments(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The one-element parameters and buffers a unary function reads besides its tensor (their values at each
    call: the table is computed from the ones the fake-quant model has then)."""
    return [a for a in (*node.args[1:], *node.kwargs.values()) if _scalar_attribute(gm, a)]


def _bound(node: fx.Node, where: tuple[int, str] | None, default: float | None) -> float | None:
    if where is None:
        return None
    v = argument(node, *where, default)
    return None if v is None else float(v)


def unary_of(gm: fx.GraphModule, node: fx.Node) -> Unary | None:
    """The float function ``node`` applies to its one tensor input, when it is elementwise and its other
    arguments are constants; None otherwise (ReLU is not one: the IR keeps it as an op on codes)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, ElementwiseRegion) and len(node.args) == 1:
            return Unary(m.name, m)
        if not isinstance(m, _MODULES) or len(node.args) != 1 or node.kwargs:
            return None
        clamp = (float(m.min_val), float(m.max_val)) if isinstance(m, nn.Hardtanh) else None
        return Unary(type(m).__name__, m, clamp, _module_activation(m))
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    if not isinstance(node.args[0], fx.Node):
        return _scalar_arithmetic(node)  # a number first: BAM's ``1 + F.sigmoid(...)``
    t = node.target
    rest, kwargs = node.args[1:], dict(node.kwargs)
    def allowed(a: Any) -> bool:  # arithmetic with a parameter is a float op (lower_arithmetic), not a table
        return _constant(a) or (arithmetic_kind(node) is None and _scalar_attribute(gm, a))

    if not all(allowed(a) for a in (*rest, *kwargs.values())):
        return _scalar_arithmetic(node)
    if node.op == "call_function" and t in _FUNCTIONS:
        fn: Callable[..., torch.Tensor] = t  # type: ignore[assignment]
    elif node.op == "call_method" and t in _METHODS:
        def fn(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            return getattr(x, str(t))(*a, **k)
    else:
        return _scalar_arithmetic(node)
    kwargs.pop("inplace", None)
    clamp = None
    if t is F.relu6:
        clamp = (0.0, 6.0)
    elif t in _CLAMP_ARGS:
        lo, hi = _CLAMP_ARGS[t]  # type: ignore[index]
        clamp = (_bound(node, lo, -1.0 if t is F.hardtanh else None), _bound(node, hi, 1.0 if t is F.hardtanh else None))
    def value(a: Any) -> Any:
        return _attribute(gm, a) if isinstance(a, fx.Node) else a

    return Unary(target_name(node), lambda x: fn(x, *map(value, rest), **{k: value(v) for k, v in kwargs.items()}),
                 clamp,
                 _function_activation(node, clamp) if not scalar_arguments(gm, node) else None)


def arithmetic_kind(node: fx.Node, inplace: bool = False) -> str | None:
    """``"add"``, ``"sub"``, ``"mul"`` or ``"div"`` for arithmetic on two arguments in function or method form
    (``x - y``, ``torch.sub(x, y)``, ``x.sub(y)``; with ``inplace``, ``x.sub_(y)`` too; torch.fx records
    ``x -= y`` as ``x - y``), else None."""
    if len(node.args) != 2:
        return None
    if node.op == "call_function":
        return _ARITHMETIC_FUNCTIONS.get(node.target)  # type: ignore[call-overload]
    name = str(node.target).removesuffix("_") if inplace else str(node.target)
    return name if node.op == "call_method" and name in _ARITHMETIC_METHODS else None


def _scalar_arithmetic(node: fx.Node) -> Unary | None:
    """``x + c``, ``c * x``, ``x / c``, ``c - x`` and the like with a Python number ``c``."""
    kind = arithmetic_kind(node)
    if kind is None or node.kwargs:
        return None
    dunder = "truediv" if kind == "div" else kind
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        op = getattr(torch.Tensor, f"__{dunder}__")
        form = {"function": "add", "alpha": -float(b)} if kind == "sub" else {"function": kind, "alpha": float(b)}
        return Unary(target_name(node), lambda x: op(x, b), activation=form)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool) and node.op == "call_function":
        op = getattr(torch.Tensor, f"__r{dunder}__")
        function = {"add": "add", "mul": "mul", "sub": "rsub", "div": "rdiv"}[kind]
        return Unary(target_name(node), lambda x: op(x, a), activation={"function": function, "alpha": float(a)})
    return None


def tensor_input(node: fx.Node) -> fx.Node:
    """The one tensor argument of a unary node (first for calls, either side of scalar arithmetic)."""
    return next(a for a in node.args if isinstance(a, fx.Node))


def is_mul(node: fx.Node) -> bool:
    """``a * b``, ``torch.mul(a, b)`` or ``a.mul(b)`` of two graph values, whatever they are."""
    is_call = (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
        node.op == "call_method" and node.target == "mul")
    return is_call and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs


_EXTREMA = {torch.maximum: "maximum", torch.fmax: "maximum", torch.max: "maximum", torch.minimum: "minimum",
            torch.fmin: "minimum", torch.min: "minimum"}
_EXTREMUM_METHODS = {"maximum": "maximum", "fmax": "maximum", "max": "maximum", "minimum": "minimum",
                     "fmin": "minimum", "min": "minimum"}


def binary_extremum(node: fx.Node) -> str | None:
    """``"maximum"`` or ``"minimum"`` for an elementwise max or min of two computed tensors (FReLU's
    ``torch.max(x, self.bn(self.conv(x)))``, maxout), else None. One of two functions of one tensor is an
    :class:`~qcompile.frontend.graph.ElementwiseRegion` by now; ``torch.max(x, dim)`` is a reduction."""
    if node.op == "call_function":
        kind = _EXTREMA.get(node.target)  # type: ignore[arg-type]
    else:
        kind = _EXTREMUM_METHODS.get(str(node.target)) if node.op == "call_method" else None
    if kind is None or len(node.args) != 2 or node.kwargs:
        return None
    return kind if all(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args) else None


def is_binary_mul(node: fx.Node) -> bool:
    """A product of two computed tensors (a squeeze-and-excitation gate, an attention map), with broadcasting.
    A product with a parameter (a layer scale) is not one: fold_bn folds it into the layer before it."""
    return is_mul(node) and all(a.op != "get_attr" for a in node.args)  # type: ignore[union-attr]
