"""What the post-training passes share: independent graph copies, the float reference, and per-layer capture.

AdaQuant, bias correction, BN tuning and the sensitivity search each run the network many times while
looking at one layer; these helpers keep that in one place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import torch
from qcompile.passes.fold_bn import fold_bn
from torch import fx, nn

from qcompile.errors import DataError, PipelineError
from qcompile.pipeline import BN_FOLDED, PassContext
from qcompile.quantization.quantizer import ActivationQuantizer, WeightQuantizer
from qcompile.quantization.spec import META_KEY, NodeQuant

BatchList = Sequence[tuple[torch.Tensor, torch.Tensor]]


def graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy whose NodeQuant annotations are its own (fx copies node meta shallowly)."""
    out = copy.deepcopy(gm)
    for n in out.graph.nodes:
        ann = n.meta.get(META_KEY)
        if isinstance(ann, NodeQuant):
            n.meta[META_KEY] = replace(ann)
    return out


def sub_context(ctx: PassContext, **fields: object) -> PassContext:
    """A context for a pipeline run on a copy: same inputs, recipe and data, its own results and properties."""
    base = dict(example_inputs=ctx.example_inputs, recipe=ctx.recipe, overrides=list(ctx.overrides),
                width=ctx.width, properties=set(ctx.properties), width_reference=ctx.width_reference,
                calibration_data=ctx.calibration_data)
    base.update(fields)
    return PassContext(**base)  # type: ignore[arg-type]


def calibration_batches(ctx: PassContext, who: str) -> BatchList:
    """The calibration set as a re-iterable list; PTQ passes read it many times."""
    if ctx.calibration_data is None:
        raise PipelineError.with_parameters(f"{who} needs calibration data (a model file's calibration_data() or {{data}})")
    data = ctx.calibration_data if isinstance(ctx.calibration_data, list) else list(ctx.calibration_data)
    ctx.calibration_data = data
    if not data:
        raise DataError("the calibration set is empty: no batches to calibrate on")
    return data


def set_quantization(gm: nn.Module, enabled: bool) -> None:
    """Switch every weight and activation quantizer on or off (bias quantizers follow the weight quantizer)."""
    for m in gm.modules():
        if isinstance(m, ActivationQuantizer | WeightQuantizer):
            m.enabled = enabled


def float_reference(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The float network the PTQ passes match, BN folded: the graph saved before BN tuning changed its
    statistics, or else ``gm`` with its quantizers switched off (copied before any layer is changed)."""
    if ctx.float_reference is None:
        ref = graph_copy(gm)
        set_quantization(ref, False)
        ctx.float_reference = ref
    if BN_FOLDED in ctx.properties and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                           for m in ctx.float_reference.modules()):
        ctx.float_reference = fold_bn(graph_copy(ctx.float_reference))
    return ctx.float_reference.eval()


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs, so the rest of the network is not run."""


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            output: bool, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``model`` on every batch and return what ``module`` receives (its first input) or returns, concatenated
    over batches; ``reduce`` maps each batch's tensor first (e.g. to per-channel sums)."""
    seen: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> None:
        seen.append((reduce(t) if reduce else t).detach().clone())
        raise _Stop

    handle = (module.register_forward_hook(lambda m, i, o: keep(o)) if output
              else module.register_forward_pre_hook(lambda m, i: keep(i[0])))
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    if not seen:
        raise PipelineError(f"{type(module).__name__} was never called on the calibration data")
    return torch.stack(seen).sum(0) if reduce else torch.cat(seen)


@torch.no_grad()
def capture_node(gm: fx.GraphModule, node: fx.Node, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """What ``node`` of ``gm`` computes on every batch, concatenated; for values no module returns (a residual
    add, a graph input). The graph is interpreted up to that node."""

    seen: list[torch.Tensor] = []

    class Tap(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if n is node:
                seen.append(out.detach().clone())
                raise _Stop
            return out

    was_training = gm.training
    gm.eval()
    try:
        for x, _ in batches:
            try:
                Tap(gm).run(x)
            except _Stop:
                pass
    finally:
        gm.train(was_training)
    if not seen:
        raise PipelineError(f"{node.name} was never computed on the calibration data")
    return torch.cat(seen)


def channel_sums(t: torch.Tensor) -> torch.Tensor:
    """Per-channel (dim 1) sum and element count of one batch, stacked as ``[sum..., count]``."""
    dims = [d for d in range(t.dim()) if d != 1]
    count = t.numel() // t.shape[1]
    return torch.cat([t.double().sum(dims), torch.tensor([float(count)], dtype=torch.float64)])


def channel_mean(model: nn.Module, module: nn.Module, batches: BatchList) -> torch.Tensor:
    """Per-output-channel mean of what ``module`` returns over the batches."""
    sums = capture(model, module, batches, output=True, reduce=channel_sums)
    return (sums[:-1] / sums[-1]).float()
