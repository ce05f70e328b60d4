"""Bias correction: remove each quantized layer's expected output shift relative to the float network.

Quantization errors do not average to zero per channel (rounding of a channel's weights, clipping, the errors
of earlier layers), so a quantized layer's output is shifted. Layer by layer in graph order, the per-channel
mean of the layer's output in the quantized network (earlier layers already corrected) is compared with the
float network's on the calibration set, and the difference is added to the layer's bias, which the integer
kernel adds as int32.
"""

from __future__ import annotations

from collections import Counter

from qcompile.passes._layerwise import calibration_batches, channel_mean, float_reference
from torch import fx
from torch.nn.utils import parametrize
from tqdm import tqdm

from qcompile.frontend.graph import compute_nodes, layer_names, module_of
from qcompile.pipeline import CALIBRATED, QUANTIZERS, Pass, PassContext


class BiasCorrect(Pass):
    name = "bias_correct"
    single_threaded = True
    requires = frozenset({QUANTIZERS, CALIBRATED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        data = calibration_batches(ctx, "bias_correct")
        ref = float_reference(gm, ctx)
        nodes = compute_nodes(gm)
        names = layer_names(gm)
        sites = Counter(str(n.target) for n in nodes)
        rows = []
        skipped = []
        for node in tqdm(nodes, desc="bias_correct", unit="layer", disable=None, leave=False):
            layer = module_of(gm, node)
            if layer is None or not parametrize.is_parametrized(layer, "weight"):
                continue
            if getattr(layer, "bias", None) is None or sites[str(node.target)] > 1:
                skipped.append(names[node])
                continue
            shift = channel_mean(ref, ref.get_submodule(str(node.target)), data) - channel_mean(gm, layer, data)
            effective = layer.bias.detach().clone()  # int32-rounded where quantized: what the shift was measured with
            bias = layer.parametrizations.bias.original if parametrize.is_parametrized(layer, "bias") else layer.bias
            bias.data.copy_(effective + shift.to(bias.dtype))
            rows.append({"layer": names[node], "mean_abs_shift": float(shift.abs().mean())})
        if skipped:
            ctx.warnings.append(f"bias_correct: no bias to correct (or a shared module) in {', '.join(skipped)}")
        ctx.results["bias_correct"] = {"layers": rows}
        return gm
