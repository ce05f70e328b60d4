"""Scale every conv's filter count by a global multiplier c (the paper's width sweep) and re-initialise.

Each conv's output channels become ``round(c·C)`` to a multiple of 8 (by default); layers that consume a scaled
tensor (BatchNorm, the next conv, the final dense layer's inputs) are resized to match. The first conv's input
(the image) and the dense layer's outputs (the classes) keep their size. Weights are re-initialised, so this is
a pass for building models to train, not for compressing trained ones.
"""

from __future__ import annotations

import math

from torch import fx, nn

from qcompile.errors import PipelineError, QCompileError
from qcompile.frontend.graph import compute_nodes, is_matmul, module_of, set_submodule
from qcompile.frontend.shapes import propagate_shapes
from qcompile.models.width import scaled_channels
from qcompile.passes.norm_layers import BATCH_NORMS
from qcompile.pipeline import SHAPES, WIDTH_SCALED, Pass, PassContext, WidthReference
from qcompile.quantization.cost import layer_macs, product_macs, weight_count


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on the device and dtype of ``old``'s parameters, in ``old``'s train/eval mode."""
    ref = next(old.parameters(), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    return new.train(old.training)


def _channels(node: object) -> int | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(tm, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) > 1 else None


class WidthScale(Pass):
    name = "width_scale"
    guarantees = frozenset({SHAPES, WIDTH_SCALED})

    def __init__(self, width: float, multiple: int = 8) -> None:
        if width <= 0:
            raise PipelineError(f"width multiplier must be positive, got {width}")
        self.width = width
        self.multiple = multiple

    def __repr__(self) -> str:
        return f"WidthScale(width={self.width}, multiple={self.multiple})"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        layers = compute_nodes(gm)
        ctx.width_reference = WidthReference(
            macs=sum(layer_macs(module_of(gm, n), n) for n in layers) + sum(
                product_macs(n) for n in gm.graph.nodes if is_matmul(n)),
            params=sum(weight_count(module_of(gm, n)) for n in {n.target: n for n in layers}.values()),
        )
        ctx.width = self.width
        new: dict[fx.Node, int | None] = {}
        resized: set[str] = set()
        for node in gm.graph.nodes:
            old = _channels(node)
            inputs = [a for a in node.all_input_nodes if _channels(a) is not None]
            src = inputs[0] if inputs else None
            m = module_of(gm, node)
            if node.op == "placeholder" or old is None:
                new[node] = old
            elif isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d):
                new[node] = self._resize_conv(gm, node, m, new[src] if src is not None else None, resized)
            elif isinstance(m, nn.Linear):
                self._resize_linear(gm, node, m, src, new, resized)
                new[node] = old
            else:
                if isinstance(m, BATCH_NORMS) and str(node.target) not in resized and src is not None:
                    self._resize_bn(gm, node, m, new[src], resized)
                elif m is not None and any(True for _ in m.parameters()) and not isinstance(m, BATCH_NORMS):
                    raise PipelineError(
                        f"width_scale: cannot resize {node.target} ({type(m).__name__}); "
                        "it holds parameters width_scale does not know how to scale"
                    )
                scales = {new[a] * 1.0 / _channels(a) for a in inputs if new.get(a) is not None}  # type: ignore[operator]
                if node.target in ("add", "sub", "mul") or getattr(node.target, "__name__", "") in ("add", "sub", "mul"):
                    sizes = {new[a] for a in inputs}
                    if len(sizes) > 1:
                        raise PipelineError(
                            f"width_scale: {node.name} combines tensors whose scaled channel counts differ {sorted(sizes)}"
                        )
                factor = scales.pop() if len(scales) == 1 else 1.0
                new[node] = int(round(old * factor))
        try:
            propagate_shapes(gm, ctx.example_inputs)
        except QCompileError as exc:
            raise PipelineError(f"width_scale produced a model that does not run: {exc}") from None
        return gm

    def _resize_conv(self, gm: fx.GraphModule, node: fx.Node, m: nn.Module, cin: int | None,
                     resized: set[str]) -> int:
        target = str(node.target)
        if target in resized:
            return gm.get_submodule(target).out_channels  # type: ignore[return-value]
        cin = m.in_channels if cin is None else cin
        if m.groups == m.in_channels == m.out_channels and m.groups > 1:
            cout, groups = cin, cin
        else:
            groups = m.groups
            step = math.lcm(self.multiple, groups)
            cout = scaled_channels(m.out_channels, self.width, step)
            if cin % groups:
                raise PipelineError(f"width_scale: {target} has {groups} groups but {cin} scaled input channels")
        conv = type(m)(
            cin, cout, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups,
            bias=m.bias is not None, padding_mode=m.padding_mode,
        )
        set_submodule(gm, target, _like(conv, m))
        resized.add(target)
        return cout

    def _resize_linear(self, gm: fx.GraphModule, node: fx.Node, m: nn.Linear, src: fx.Node | None,
                       new: dict[fx.Node, int | None], resized: set[str]) -> None:
        target = str(node.target)
        if target in resized or src is None:
            return
        old_in, new_in = _channels(src), new.get(src)
        features = m.in_features if old_in is None or new_in is None else m.in_features * new_in // old_in
        lin = nn.Linear(features, m.out_features, bias=m.bias is not None)
        set_submodule(gm, target, _like(lin, m))
        resized.add(target)

    def _resize_bn(self, gm: fx.GraphModule, node: fx.Node, m: nn.Module, features: int | None,
                   resized: set[str]) -> None:
        if features is None:
            return
        bn = type(m)(features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                     track_running_stats=m.track_running_stats)
        set_submodule(gm, str(node.target), _like(bn, m))
        resized.add(str(node.target))


def width_scale(gm: fx.GraphModule, width: float, multiple: int = 8) -> fx.GraphModule:
    """Scale the filters of a captured graph by ``width`` (re-initialising its weights) and return it."""
    return WidthScale(width, multiple)(gm)
