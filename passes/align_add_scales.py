"""Align the scales around each residual add to powers of two of one shared 8-bit mantissa.

The IR adds in float between dequantize and quantize (ONNX DQ → Add → Q). onnxruntime runs that pattern as its
integer ``QLinearAdd`` kernel, which computes with the scale *ratios* instead, so it rounds differently on a few
elements in 10^5, unless every value on the way is exact in float32. It is when the ratios between the add's
input and output scales are powers of two and the scales have short mantissas: then the sum is the exact rational
result in both forms and both round it half to even. This pass moves each calibrated scale to the nearest such
value (by at most a factor of 2^(1/2), i.e. half a bit of resolution or of range), so the exported model is both
exact and as fast as onnxruntime's own quantizer.

Every quantizer of an add's inputs and of its sum (the residual quantizer and any layer input reading the sum)
joins one class; classes that share a quantizer merge. Each class gets the 8-bit mantissa that moves its scales
least (in log2), each scale the nearest power-of-two multiple of it. Run after calibration, before any pass that
learns weights against the activation scales (AdaQuant, bias correction).

The quantizers of a concatenation's inputs (one spec each, ``insert_quantizers``) join a class too, and after
snapping all take the largest of their scales (still a power-of-two multiple of the class's mantissa): the
concatenation then joins codes of one grid, an integer ``Concat`` in every backend instead of a float one.
"""

from __future__ import annotations

import math

import torch
from qcompile.passes.insert_quantizers import is_add, is_concat, quantizer_of, sum_value
from torch import fx

from qcompile.frontend.graph import module_of
from qcompile.pipeline import CALIBRATED, Pass, PassContext
from qcompile.quantization.quantizer import ActivationQuantizer, QuantizerState

MANTISSA_BITS = 8


def concat_inputs(gm: fx.GraphModule) -> list[list[ActivationQuantizer]]:
    """Per concatenation whose inputs are all read through quantizers of one spec: those quantizers, and the
    quantizers of that spec that read the concatenation (a layer's input): on the same grid, they move no code,
    where a scale of their own would requantize the whole concatenation (DenseNet: before every layer)."""
    out = []
    for node in gm.graph.nodes:
        if not is_concat(node):
            continue
        qs = [module_of(gm, p) for p in node.args[0]]
        if all(isinstance(q, ActivationQuantizer) for q in qs) and len({q.spec for q in qs}) == 1:  # type: ignore[union-attr]
            readers = [module_of(gm, r) for r in node.users]
            out.append(qs + [r for r in readers if isinstance(r, ActivationQuantizer) and r.spec == qs[0].spec])
    return out  # type: ignore[return-value]


def add_groups(gm: fx.GraphModule) -> list[list[str]]:
    """Names of the activation quantizers tied together by residual adds and concatenations, one list per
    class."""
    name_of = {id(m): n for n, m in gm.named_modules()}
    ties = []
    for node in gm.graph.nodes:
        if not is_add(node):
            continue
        ins = [quantizer_of(gm, a) for a in node.args if isinstance(a, fx.Node)]
        if any(q is None for q in ins):
            continue  # an input off any grid: nothing to align (the export keeps the exact float add)
        outs = [r for r in sum_value(gm, node).users if isinstance(module_of(gm, r), ActivationQuantizer)]
        ties.append([name_of[id(q)] for q in ins] + [str(r.target) for r in outs])
    ties += [[name_of[id(q)] for q in qs] for qs in concat_inputs(gm)]
    return [sorted(g) for g in _components(ties)]


def _components(ties: list[list[str]]) -> list[list[str]]:
    """The classes of names that ``ties`` join, each tie putting its names in one class (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for names in ties:
        for other in names[1:]:
            parent[find(other)] = find(names[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def best_mantissa(scales: list[float], bits: int = MANTISSA_BITS) -> float:
    """The ``bits``-bit mantissa in [1, 2) whose nearest power-of-two multiples move ``scales`` least (log2)."""
    logs = [math.log2(s) for s in scales]
    best, best_err = 1.0, math.inf
    for k in range(2 ** (bits - 1)):
        m = 1.0 + k / 2 ** (bits - 1)
        lm = math.log2(m)
        err = sum((x - lm - round(x - lm)) ** 2 for x in logs)
        if err < best_err:
            best, best_err = m, err
    return best


def snap(scale: float, mantissa: float) -> float:
    """The power-of-two multiple of ``mantissa`` nearest to ``scale`` in log2 (exact in float32)."""
    return math.ldexp(mantissa, round(math.log2(scale / mantissa)))


def align_add_scales(gm: fx.GraphModule) -> int:
    """Snap every frozen quantizer tied to a residual add (see the module docstring); the number of classes."""
    modules = dict(gm.named_modules())
    groups = add_groups(gm)
    for group in groups:
        qs = [modules[n] for n in group]
        assert all(isinstance(q, ActivationQuantizer) and q.state is QuantizerState.FROZEN for q in qs)
        m = best_mantissa([float(q.scale) for q in qs])  # type: ignore[arg-type]
        with torch.no_grad():
            for q in qs:
                q.scale.copy_(torch.tensor(snap(float(q.scale), m), dtype=q.scale.dtype))  # type: ignore[union-attr,arg-type]
    _tie_concat_scales(gm)
    return len(groups)


def _tie_concat_scales(gm: fx.GraphModule) -> None:
    """One scale, the largest, for every quantizer joined by concatenations (transitively: DenseNet
    concatenates each layer's output into every later concatenation of its block)."""
    modules = dict(gm.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    with torch.no_grad():
        for component in _components([[name_of[id(q)] for q in qs] for qs in concat_inputs(gm)]):
            qs = [modules[n] for n in component]
            widest = max(q.scale.item() for q in qs)
            for q in qs:
                q.scale.fill_(widest)


class AlignAddScales(Pass):
    name = "align_add_scales"
    requires = frozenset({CALIBRATED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        align_add_scales(gm)
        return gm
