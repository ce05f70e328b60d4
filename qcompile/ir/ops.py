"""The IR's op kinds: one schema per kind (its attributes' names, types and defaults) and :class:`OpTable`, the
registry through which the reference and every backend find their implementation of a kind.

Attributes stay the JSON-shaped dict that ``graph.json`` holds, so the file format does not change; the schema
checks it wherever an op is made (lowering, tests) or loaded, and fills in the defaults, so that an implementation
reads ``attrs["ceil_mode"]`` without a fallback of its own. A backend registers each of its implementations with
``@OPS.implements(kind)`` and names the kinds it cannot run; ``OpTable.uncovered`` (tested for every table) lists
the kinds it forgot, so a new op kind fails until every backend either implements it or says it does not.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_ints(v: Any) -> bool:
    return isinstance(v, list | tuple) and all(_is_int(i) for i in v)


def _is_index_item(item: Any) -> bool:
    """``{"slice": [start, stop, step]}`` (ints or nulls), ``{"index": i}``, ``{"ellipsis": true}`` or
    ``{"none": true}``: a Python index, item by item."""
    if not isinstance(item, Mapping) or len(item) != 1:
        return False
    [(key, v)] = item.items()
    if key == "slice":
        return isinstance(v, list | tuple) and len(v) == 3 and all(b is None or _is_int(b) for b in v)
    if key == "index":
        return _is_int(v)
    return key in ("ellipsis", "none") and v is True


def basic_index(items: Sequence[Mapping[str, Any]],
                rank: int) -> tuple[list[tuple[int, Any, Any, int]], list[int]] | None:
    """A ``slice`` op's index on a rank-``rank`` input as ``(axis, start, stop, step)`` for every axis it does
    not take whole (an integer ``i`` is ``i:i+1``) and the axes the integers drop, the ellipsis expanded; None
    where it inserts an axis (``None``). The backends slice, then drop those axes."""
    explicit = sum("slice" in it or "index" in it for it in items)
    cuts: list[tuple[int, Any, Any, int]] = []
    dropped: list[int] = []
    axis = 0
    for it in items:
        if "ellipsis" in it:
            axis += rank - explicit
        elif "slice" in it:
            start, stop, step = it["slice"]
            if (start, stop, step) != (None, None, None):
                cuts.append((axis, start, stop, 1 if step is None else step))
            axis += 1
        elif "index" in it:
            i = it["index"]
            cuts.append((axis, i, None if i == -1 else i + 1, 1))
            dropped.append(axis)
            axis += 1
        else:
            return None
    return cuts, dropped


@dataclass(frozen=True)
class AttrType:
    """What an attribute's value must be: ``accepts`` tests it, ``name`` says it in an error."""

    name: str
    accepts: Callable[[Any], bool]


BOOL = AttrType("a bool", lambda v: isinstance(v, bool))
INT = AttrType("an int", _is_int)
FLOAT = AttrType("a float", lambda v: isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral))
NUMBER = AttrType("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool))
STR = AttrType("a string", lambda v: isinstance(v, str))
INTS = AttrType("a list of ints", _is_ints)
PAIR = AttrType("a list of two ints", lambda v: _is_ints(v) and len(v) == 2)
NUMBER_PAIR = AttrType("a list of two numbers", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(
    isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v))
INDEX = AttrType("a list of index items ({'slice': [start, stop, step]}, {'index': i}, {'ellipsis': true} or "
                 "{'none': true})", lambda v: isinstance(v, list | tuple) and all(map(_is_index_item, v)))
REQUANTIZE_MODE = AttrType("'float32' or 'dyadic'", lambda v: v in ("float32", "dyadic"))


class Presence(Enum):
    """An attribute without a default value: one every op of its kind has, or one it may leave out."""

    REQUIRED = "required"
    OPTIONAL = "optional"


@dataclass(frozen=True)
class Attr:
    """One attribute: its name, its type, and :class:`Presence` or the value it takes when absent."""

    name: str
    type: AttrType
    default: Any = Presence.REQUIRED


@dataclass(frozen=True)
class OpSchema:
    """An op kind's attributes in the order ``graph.json`` writes them, and ``rule``, a check across them that
    returns the problem (or None)."""

    kind: str
    attrs: tuple[Attr, ...] = ()
    rule: Callable[[Mapping[str, Any]], str | None] | None = None

    def check(self, output: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """``attrs`` in schema order with defaults filled in; a ValueError names the op and the bad attribute."""
        where = f"op {self.kind} -> {output}"
        if not isinstance(attrs, Mapping):
            raise ValueError(f"{where}: attributes must be a mapping, not {attrs!r}")
        known = [a.name for a in self.attrs]
        for name in attrs:
            if name not in known:
                takes = ", ".join(known) or "no attributes"
                raise ValueError(f"{where}: unknown attribute {name!r} ({self.kind} takes {takes})")
        checked: dict[str, Any] = {}
        for a in self.attrs:
            if a.name not in attrs:
                if a.default is Presence.REQUIRED:
                    raise ValueError(f"{where}: attribute {a.name!r} is missing")
                if a.default is not Presence.OPTIONAL:
                    checked[a.name] = a.default
                continue
            value = attrs[a.name]
            if not a.type.accepts(value):
                raise ValueError(f"{where}: attribute {a.name!r} must be {a.type.name}, not {value!r}")
            checked[a.name] = value
        problem = self.rule(checked) if self.rule is not None else None
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        return checked


def _requantize_constants(attrs: Mapping[str, Any]) -> str | None:
    """A float32 requantize names its multiplier, a dyadic one its mantissa and shift, and neither the other's."""
    want = {"float32": {"multiplier"}, "dyadic": {"mantissa", "shift"}}[attrs["mode"]]
    have = {"multiplier", "mantissa", "shift"} & attrs.keys()
    if have == want:
        return None
    return (f"attributes {sorted(have)}: a {attrs['mode']} requantize takes the constant(s) "
            f"{', '.join(repr(n) for n in sorted(want))}")


SCALAR_ARITHMETIC = ("add", "mul", "div", "rsub", "rdiv")
"""Arithmetic with a number ``alpha``: ``x + a``, ``x · a``, ``x / a``, ``a − x``, ``a / x``."""
ACTIVATIONS = ("sigmoid", "silu", "tanh", "gelu", "gelu_tanh", "hardswish", "hardsigmoid", "clip", "leaky_relu",
               *SCALAR_ARITHMETIC)
"""The float functions of :data:`OP_SCHEMAS`' ``activation`` (PyTorch's definitions; ``gelu_tanh`` is
``approximate="tanh"``)."""
ACTIVATION = AttrType(f"one of {', '.join(ACTIVATIONS)}", lambda v: v in ACTIVATIONS)


def _activation_parameters(attrs: Mapping[str, Any], key: str = "function") -> str | None:
    """``clip`` takes ``min`` and/or ``max``, ``leaky_relu`` its ``alpha``, and no function the others' (the
    function named by ``key``)."""
    fn = attrs.get(key)
    takes_alpha = fn == "leaky_relu" or fn in SCALAR_ARITHMETIC
    want = {"min", "max"} if fn == "clip" else {"alpha"} if takes_alpha else set()
    extra = ({"min", "max", "alpha"} & attrs.keys()) - want
    if extra:
        return f"{fn or f'an op without {key!r}'} takes no attribute {sorted(extra)[0]!r}"
    if fn == "clip" and not want & attrs.keys():
        return "clip needs 'min', 'max' or both"
    if takes_alpha and "alpha" not in attrs:
        return f"{fn} needs 'alpha'"
    return None


_POOL = (Attr("kernel", PAIR), Attr("stride", PAIR), Attr("padding", PAIR))

OP_SCHEMAS: dict[str, OpSchema] = {s.kind: s for s in (
    OpSchema("quantize"),
    OpSchema("dequantize"),
    OpSchema("requantize", (Attr("relu", BOOL, False), Attr("mode", REQUANTIZE_MODE, "float32"),
                            Attr("multiplier", STR, Presence.OPTIONAL), Attr("mantissa", STR, Presence.OPTIONAL),
                            Attr("shift", STR, Presence.OPTIONAL)), _requantize_constants),
    OpSchema("conv2d", (Attr("stride", PAIR), Attr("padding", PAIR), Attr("dilation", PAIR), Attr("groups", INT))),
    OpSchema("dense"),
    OpSchema("matmul"),
    OpSchema("relu"),
    OpSchema("maxpool2d", (*_POOL, Attr("dilation", PAIR, (1, 1)), Attr("ceil_mode", BOOL, False))),
    OpSchema("avgpool2d", (*_POOL, Attr("count_include_pad", BOOL, True), Attr("ceil_mode", BOOL, False))),
    OpSchema("adaptive_avgpool2d", (Attr("output_size", PAIR),)),
    OpSchema("adaptive_maxpool2d", (Attr("output_size", PAIR),)),
    OpSchema("mean", (Attr("dims", INTS), Attr("keepdim", BOOL))),
    OpSchema("reduce_max", (Attr("dims", INTS), Attr("keepdim", BOOL))),
    OpSchema("reduce_sum", (Attr("dims", INTS), Attr("keepdim", BOOL))),
    OpSchema("reduce_l2", (Attr("dims", INTS), Attr("keepdim", BOOL))),
    OpSchema("global_avgpool", (Attr("keepdim", BOOL, True),)),
    OpSchema("add"),
    OpSchema("mul"),
    OpSchema("div"),
    OpSchema("maximum"),
    OpSchema("minimum"),
    OpSchema("layer_norm", (Attr("eps", FLOAT),)),
    OpSchema("group_norm", (Attr("groups", INT), Attr("eps", FLOAT))),
    OpSchema("normalize", (Attr("dim", INT), Attr("eps", FLOAT))),
    OpSchema("softmax", (Attr("dim", INT),)),
    OpSchema("log_softmax", (Attr("dim", INT),)),
    # ``function``: the tabulated function's name, for readers; ``activation`` (with its parameters): the float
    # function the table holds, when it is one, which a backend may compute instead where that gives the table
    OpSchema("lut", (Attr("function", STR, Presence.OPTIONAL), Attr("activation", ACTIVATION, Presence.OPTIONAL),
                     Attr("min", NUMBER, Presence.OPTIONAL), Attr("max", NUMBER, Presence.OPTIONAL),
                     Attr("alpha", NUMBER, Presence.OPTIONAL)),
             lambda attrs: _activation_parameters(attrs, "activation")),
    OpSchema("activation", (Attr("function", ACTIVATION), Attr("min", NUMBER, Presence.OPTIONAL),
                            Attr("max", NUMBER, Presence.OPTIONAL), Attr("alpha", NUMBER, Presence.OPTIONAL)),
             _activation_parameters),
    OpSchema("flatten", (Attr("start_dim", INT), Attr("end_dim", INT))),
    OpSchema("reshape", (Attr("shape", INTS),)),
    OpSchema("transpose", (Attr("perm", INTS),)),
    OpSchema("flip", (Attr("dims", INTS),)),
    OpSchema("roll", (Attr("shifts", INTS), Attr("dims", INTS))),
    OpSchema("slice", (Attr("index", INDEX),)),
    OpSchema("pad", (Attr("pads", INTS), Attr("value", NUMBER, 0), Attr("mode", STR, "constant"))),
    OpSchema("upsample_nearest", (Attr("scale", PAIR),)),
    # ``scale``: the model's scale factor per axis where it gave one (PyTorch's kernel then steps by 1 / it), else 0
    OpSchema("upsample_bilinear", (Attr("size", PAIR), Attr("align_corners", BOOL), Attr("scale", NUMBER_PAIR))),
    OpSchema("concat", (Attr("dim", INT),)),
)}
"""Every op kind of the IR; :mod:`qcompile.ir.reference` defines what each computes."""


def checked_attrs(kind: str, output: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of op ``kind -> output`` checked against its schema (see :meth:`OpSchema.check`)."""
    schema = OP_SCHEMAS.get(kind)
    if schema is None:
        raise ValueError(f"op {kind} -> {output}: unknown IR op kind {kind!r}")
    return schema.check(output, attrs)


Impl = TypeVar("Impl", bound=Callable[..., Any])


class OpTable(Generic[Impl]):
    """One backend's implementation of each op kind, found by kind, so that the reference and the exporters
    dispatch through one registry of kinds (:data:`OP_SCHEMAS`) instead of names they build themselves."""

    def __init__(self, backend: str, unsupported: Iterable[str] = ()) -> None:
        self.backend = backend
        self.unsupported = frozenset(unsupported)
        unknown = self.unsupported - OP_SCHEMAS.keys()
        if unknown:
            raise ValueError(f"{backend}: unknown op kinds listed as unsupported: {sorted(unknown)}")
        self._impls: dict[str, Impl] = {}

    def implements(self, kind: str) -> Callable[[Impl], Impl]:
        """Register the decorated function as this backend's ``kind``."""
        if kind not in OP_SCHEMAS:
            raise ValueError(f"{self.backend}: {kind!r} is not an IR op kind")
        if kind in self._impls or kind in self.unsupported:
            raise ValueError(f"{self.backend}: op kind {kind!r} is implemented twice, or also listed as unsupported")

        def register(fn: Impl) -> Impl:
            self._impls[kind] = fn
            return fn

        return register

    def lookup(self, kind: str) -> Impl | None:
        """The implementation of ``kind``, or None where the backend has none (it raises its unsupported error)."""
        return self._impls.get(kind)

    def uncovered(self) -> set[str]:
        """The op kinds this backend neither implements nor lists as unsupported: none, in a complete backend."""
        return set(OP_SCHEMAS) - self._impls.keys() - self.unsupported
