"""AdaQuant (Hubara et al., 2021): optimise each quantized layer on the calibration set, layer by layer.

Sequential mode: layer k is fed what the already-quantized network (layers before k optimised) gives it, and
its output is matched in mean squared error to the float network's layer k. Adam optimises the layer's
weights, bias, per-channel weight step sizes and, when the layer is the only reader of its input quantizer, that
quantizer's step size, through straight-through rounding. What is kept is integer-rounded: each weight is stored
as ``code · step`` with the step no larger than max|w|/qmax, so the existing per-channel weight quantizer
(bound max|w|) re-derives exactly that step and those codes, and lowering and verification see a plain
calibrated graph. A layer whose optimised MSE is not below its starting MSE is left as it was.

Block scope (``scope="block"``) optimises the layers of each ``graph.regions`` block (the stem, a residual block,
the head) together, matching the block's output, for a residual block the float network's sum. The block is
run from its captured input by interpreting its nodes, with each layer replaced by its trainable view. On the
ResNet-20 checkpoint this was level with layer scope except at linear=0.30 (+0.18 points on the mean of three
calibration draws; docs/results.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from qcompile.passes._layerwise import BatchList, calibration_batches, capture, capture_node, float_reference
from qcompile.passes.insert_quantizers import weight_quantizers
from torch import fx, nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from qcompile.errors import PipelineError, RecipeError
from qcompile.frontend.graph import Region, compute_nodes, is_compute, layer_names, module_of, regions
from qcompile.pipeline import CALIBRATED, QUANTIZERS, Pass, PassContext
from qcompile.quantization.quantizer import ActivationQuantizer, WeightQuantizer

CHUNK = 256  # images per forward when measuring MSE over the whole calibration set


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Fake quantization with straight-through rounding whose gradient also reaches the step (LSQ)."""
    q = x / step
    q = q + (torch.round(q) - q).detach()
    return q.clamp(qmin, qmax) * step


def _apply(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    return layer._conv_forward(x, w, b)  # type: ignore[operator,union-attr]


@dataclass
class _Layer:
    """The trainable view of one quantized layer: weights in units of their starting step, log step factors."""

    layer: nn.Module
    wq: WeightQuantizer
    aq: ActivationQuantizer | None  # the input quantizer, when this layer alone reads it
    out_scale: float

    def __post_init__(self) -> None:
        w0 = self.layer.parametrizations.weight.original.detach()  # type: ignore[union-attr]
        self.s0 = self.wq.scale_for(w0)
        self.v = (w0 / self.s0).clone().requires_grad_()
        self.log_step = torch.zeros_like(self.s0, requires_grad=True)
        b0 = self.bias_tensor()
        self.b0 = None if b0 is None else b0.detach().clone()
        self.db = None if b0 is None else torch.zeros_like(b0, requires_grad=True)
        self.a0 = None if self.aq is None else self.aq.scale.detach().clone()
        self.log_act = torch.zeros((), requires_grad=True)

    def bias_tensor(self) -> torch.Tensor | None:
        if getattr(self.layer, "bias", None) is None:
            return None
        if parametrize.is_parametrized(self.layer, "bias"):
            return self.layer.parametrizations.bias.original  # type: ignore[union-attr]
        return self.layer.bias  # type: ignore[return-value]

    def groups(self, lr: float) -> list[dict[str, object]]:
        out: list[dict[str, object]] = [{"params": [self.v], "lr": lr}, {"params": [self.log_step], "lr": lr / 5}]
        if self.db is not None:
            out.append({"params": [self.db], "lr": lr / 5})
        if self.aq is not None:
            out.append({"params": [self.log_act], "lr": lr / 5})
        return out

    def step(self) -> torch.Tensor:
        """The learned per-channel step, capped at max|w|/qmax so the weight quantizer re-derives it."""
        w = self.v * self.s0
        cap = w.abs().flatten(1).amax(1).view_as(self.s0) / self.wq.spec.qmax
        return torch.minimum(self.s0 * self.log_step.exp(), cap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.wq.spec
        w = lsq_quantize(self.v * self.s0, self.step(), spec.qmin, spec.qmax)
        if self.aq is not None:
            a = self.aq.spec
            x = lsq_quantize(x, self.a0 * self.log_act.exp(), a.qmin, a.qmax)
        b = None if self.b0 is None else self.b0 + self.db * self.out_scale  # type: ignore[operator]
        return _apply(self.layer, x, w, b)

    @torch.no_grad()
    def store(self) -> None:
        """Write integer-rounded weights (codes · step), the bias and the input step back into the graph."""
        step = self.step()
        spec = self.wq.spec
        codes = torch.round(self.v * self.s0 / step).clamp(spec.qmin, spec.qmax)
        self.layer.parametrizations.weight.original.copy_(codes * step)  # type: ignore[union-attr]
        if self.db is not None:
            self.bias_tensor().copy_(self.b0 + self.db * self.out_scale)  # type: ignore[union-attr,operator]
        if self.aq is not None:
            self.aq.scale.copy_(self.a0 * self.log_act.exp())  # type: ignore[operator]


SCOPES = ("layer", "block")
_Quantizers = tuple[WeightQuantizer, ActivationQuantizer | None]  # a layer's, and its input's where it alone reads it


class AdaQuant(Pass):
    """Optimisation of quantized weights, biases and step sizes against the float network, one layer at a time
    (sequential AdaQuant) or one block at a time (the stem, each residual block, the head: BRECQ's granularity,
    Li et al., 2021), which lets the layers of a block compensate each other's rounding."""

    name = "adaquant"
    single_threaded = True
    requires = frozenset({QUANTIZERS, CALIBRATED})

    def __init__(self, iterations: int = 200, batch_size: int = 32, lr: float = 1e-2, seed: int = 0,
                 layers: Collection[str] | None = None, scope: str = "layer") -> None:
        """``layers``: the layer names to optimise (default every quantized layer); the mixed-precision search
        optimises only the layer whose sensitivity it is measuring. ``scope``: what one optimisation matches to
        the float network, a layer's output or a block's (graph.regions)."""
        if scope not in SCOPES:
            raise RecipeError(f"unknown AdaQuant scope {scope!r}; choose one of: {', '.join(SCOPES)}")
        self.iterations = iterations
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.layers = None if layers is None else frozenset(layers)
        self.scope = scope

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        data = calibration_batches(ctx, "adaquant")
        ref = float_reference(gm, ctx)
        names = layer_names(gm)
        sites = Counter(str(n.target) for n in compute_nodes(gm))
        calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        quantizers = weight_quantizers(gm)

        def quantizers_of(node: fx.Node) -> _Quantizers | None:
            """The weight quantizer of ``node``'s layer and its input quantizer where the layer alone reads it, or
            None where the layer is not optimised."""
            wq = quantizers.get(str(node.target))
            if wq is None or (self.layers is not None and names[node] not in self.layers):
                return None
            if sites[str(node.target)] > 1:
                ctx.warnings.append(f"adaquant: {names[node]} is one module called at several sites; left as calibrated")
                return None
            src = node.args[0]
            aq = module_of(gm, src) if isinstance(src, fx.Node) else None
            own = isinstance(aq, ActivationQuantizer) and len(src.users) == 1 and calls[str(src.target)] == 1
            return wq, aq if own else None  # type: ignore[return-value]

        blocks = regions(gm) if self.scope == "block" else []
        rows = [row for region in tqdm(blocks, desc="adaquant", unit="block", disable=None, leave=False)
                if (row := self._region(gm, ref, data, region, names, quantizers_of)) is not None]
        covered = {n for region in blocks for n in region.nodes}
        rows += self._by_layer(gm, ref, data, [n for n in compute_nodes(gm) if n not in covered], names,
                               quantizers_of)
        ctx.results["adaquant"] = {"iterations": self.iterations, "scope": self.scope, "units": rows}
        return gm

    def _by_layer(self, gm: fx.GraphModule, ref: fx.GraphModule, data: BatchList, nodes: list[fx.Node],
                  names: dict[fx.Node, str], quantizers_of: Callable[[fx.Node], _Quantizers | None],
                  ) -> list[dict[str, object]]:
        """Optimise each of ``nodes`` (in order) alone on its own output: every layer in layer scope, those in no
        block in block scope."""
        rows = []
        for node in tqdm(nodes, desc="adaquant", unit="layer", disable=None, leave=False):
            found = quantizers_of(node)
            if found is None:
                continue
            target = capture(ref, ref.get_submodule(str(node.target)), data, output=True)
            v = _Layer(module_of(gm, node), *found, float(target.std()) or 1.0)  # type: ignore[arg-type]
            inputs = capture(gm, v.aq if v.aq is not None else v.layer, data, output=False)
            fit = self._optimise([v], v.forward, inputs, target)
            rows.append({"unit": names[node], "layers": [names[node]], **fit})
        return rows

    def _region(self, gm: fx.GraphModule, ref: fx.GraphModule, data: BatchList, region: Region,
                names: dict[fx.Node, str], quantizers_of: Callable[[fx.Node], _Quantizers | None],
                ) -> dict[str, object] | None:
        """Optimise every selected layer of ``region`` together on the region's output (each layer's bias moves
        by the size of its float output on the first calibration batch)."""
        views: dict[fx.Node, _Layer] = {}
        for node in region.nodes:
            found = quantizers_of(node) if is_compute(gm, node) else None
            if found is not None:
                size = float(capture(ref, ref.get_submodule(str(node.target)), data[:1], output=True).std())
                views[node] = _Layer(module_of(gm, node), *found, size or 1.0)  # type: ignore[arg-type]
        if not views:
            return None
        ref_output = {n.name: n for n in ref.graph.nodes}.get(region.output.name)
        if ref_output is None:
            raise PipelineError(f"adaquant: the float reference has no node {region.output.name}")
        owned = {node.args[0] for node, v in views.items() if v.aq is not None and node.args[0] in region.nodes}
        target = capture_node(ref, ref_output, data)
        inputs = capture_node(gm, region.entry, data)
        interp = fx.Interpreter(gm)

        def forward(x: torch.Tensor) -> torch.Tensor:
            env: dict[fx.Node, object] = {region.entry: x}

            def value(a: fx.Node) -> object:
                return env[a] if a in env else interp.fetch_attr(str(a.target))

            for n in region.nodes:
                args = fx.node.map_arg(n.args, value)
                if n in views:
                    env[n] = views[n].forward(args[0])  # type: ignore[arg-type,index]
                elif n in owned:
                    env[n] = args[0]  # type: ignore[index]  # the reading layer's view quantizes with its own step
                else:
                    env[n] = getattr(interp, n.op)(n.target, args, fx.node.map_arg(n.kwargs, value))
            return env[region.output]  # type: ignore[return-value]

        fit = self._optimise(list(views.values()), forward, inputs, target)
        layers = [names[n] for n in views]
        return {"unit": _common_prefix(layers), "layers": layers, **fit}

    def _optimise(self, views: list[_Layer], forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                  target: torch.Tensor) -> dict[str, float | bool]:
        before = _mse(forward, inputs, target)
        opt = torch.optim.Adam([g for v in views for g in v.groups(self.lr)])
        gen = torch.Generator().manual_seed(self.seed)
        with torch.enable_grad():  # pipelines run under no_grad
            for _ in range(self.iterations):
                idx = torch.randint(len(inputs), (min(self.batch_size, len(inputs)),), generator=gen)
                loss = F.mse_loss(forward(inputs[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        after = _mse(forward, inputs, target)
        kept = after < before
        if kept:
            for v in views:
                v.store()
        return {"mse_before": before, "mse_after": after, "kept": kept}


@torch.no_grad()
def _mse(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over the whole calibration set, in chunks (copied: a block may start with an in-place
    ReLU)."""
    total = sum(float(((forward(inputs[i:i + CHUNK].clone()) - target[i:i + CHUNK]) ** 2).sum())
                for i in range(0, len(inputs), CHUNK))
    return total / target.numel()


def _common_prefix(names: list[str]) -> str:
    """``layer2.0.conv1``, ``layer2.0.conv2`` → ``layer2.0``: a block's name from its layers' module paths."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or "+".join(names)
