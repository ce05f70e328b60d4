"""Verification: run the fake-quant model and the reference interpreter on the same inputs and compare.

Per layer: every integer tensor the IR names after an fx node (quantizer outputs, conv/dense accumulators)
against the fake-quant value divided by its scale. End to end: top-1 agreement of the logits, and the final
integer outputs (the accumulators the outputs are dequantized from).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from itertools import repeat

import numpy as np
import torch
from torch import fx
from torch.fx.node import map_aggregate
from tqdm import tqdm

from qcompile.frontend.model_file import logits
from qcompile.ir import reference
from qcompile.ir.agreement import TensorAgreement
from qcompile.ir.graph import IRGraph


@dataclass
class Verification:
    """Reference vs fake-quant over a data set."""

    images: int = 0
    top1_agree: int = 0
    labelled: int = 0
    """Images with labels (calibration images may have none), which the reference's top-1 is measured on."""
    reference_correct: int = 0
    final: list[TensorAgreement] = field(default_factory=list)
    layers: list[TensorAgreement] = field(default_factory=list)
    reference_outputs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    """(inputs, reference logits) per batch: what the backends are compared against, so that the reference
    interpreter runs once for all of them."""

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.images if self.images else float("nan")

    @property
    def reference_top1(self) -> float | None:
        """None when no image had a label."""
        return self.reference_correct / self.labelled if self.labelled else None

    def summary(self) -> dict[str, object]:
        """The ``report.json`` entry."""
        final_el = sum(t.elements for t in self.final)
        return {
            "images": self.images,
            "top1_agreement": self.top1_agreement,
            "identical_fraction": sum(t.identical for t in self.final) / final_el if final_el else 1.0,
            "max_lsb_diff": max((t.max_lsb_diff for t in self.final), default=0),
            "reference_top1": self.reference_top1,
            "layers": [dict(asdict(t), identical_fraction=t.identical_fraction) for t in self.layers],
        }


def _float32(a: object) -> object:
    return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


VERIFY_PART_ELEMENTS = 1 << 19
"""Input values compared per run (3 images of 3x224x224): the reference keeps every intermediate tensor of a
run, about 0.2 GB per ImageNet-sized image for ResNet-50, so a batch is verified in parts of this size."""


def _values_read(n: fx.Node) -> list[fx.Node]:
    """The graph values ``n`` reads, parameters and buffers aside (GeM's ``x.pow(self.p)`` reads one value)."""
    return [a for a in n.all_input_nodes if a.op != "get_attr"]


def tabulated_nodes(gm: fx.GraphModule, ir: IRGraph) -> set[str]:
    """The fx nodes whose functions the IR's ``lut`` ops tabulate: each chain of one-input nodes from the
    quantizer a table's output is named after back to the codes it reads."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found: set[str] = set()
    for op in ir.ops:
        if op.kind != "lut" or op.output not in nodes:
            continue
        chain: list[str] = []
        n = nodes[op.output].args[0] if nodes[op.output].args else None
        while isinstance(n, fx.Node) and n.name != op.inputs[0] and len(values := _values_read(n)) == 1:
            chain.append(n.name)
            n = values[0]
        if isinstance(n, fx.Node) and n.name == op.inputs[0]:
            found.update(chain)
    return found


class _Comparer(fx.Interpreter):
    """Runs the fake-quant graph and compares every named integer tensor with the reference's values as it is
    produced (before a later in-place op can change it), so no copy of it is kept.

    The functions the IR tabulates run in float32, as the tables were computed: in float64, ``leaky_relu(x,
    0.1)`` of a code whose result lies on a rounding tie (code -15 gives -1.5 codes where the input and output
    scales agree) can round the other way, a difference of the check, not of the model."""

    def __init__(self, gm: fx.GraphModule, ir: IRGraph, reference_values: dict[str, np.ndarray],
                 by_name: dict[str, TensorAgreement]) -> None:
        super().__init__(gm)
        self.ir = ir
        self.reference_values = reference_values
        self.by_name = by_name
        self.tabulated = tabulated_nodes(gm, ir)

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if n.name in self.tabulated:
            return map_aggregate(args, _float32), map_aggregate(kwargs, _float32)  # type: ignore[return-value]
        return args, kwargs

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if n.name in self.tabulated and isinstance(out, torch.Tensor):
            out = out.double()
        if n.name in self.by_name and isinstance(out, torch.Tensor):
            t = self.ir.values[n.name]
            codes = np.rint(out.detach().numpy().astype(np.float64) / t.broadcast_scale(out.ndim).astype(np.float64))
            ref = self.reference_values[n.name]
            self.by_name[n.name].update(ref, codes)
            if f"final:{n.name}" in self.by_name:
                self.by_name[f"final:{n.name}"].update(ref, codes)
        return out


def verify_reference(gm: fx.GraphModule, ir: IRGraph, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                     dtype: torch.dtype = torch.float64) -> Verification:
    """Compare the reference interpreter with the fake-quant graph, batch by batch (in parts of at most
    :data:`VERIFY_PART_ELEMENTS` input values).

    The fake-quant graph runs on a float64 copy by default: its quantized values are exact either way, and
    float64 accumulation keeps the comparison about the integer semantics rather than float32 summation order
    (float32 accumulation alone flips about one code in 10^3-10^4 after a deep stack of layers).
    """
    gm = copy.deepcopy(gm).to(dtype)
    fx_names = {n.name for n in gm.graph.nodes}
    compared = [name for name, t in ir.values.items()
                if name in fx_names and t.dtype.is_int and name not in ir.constants]
    finals = [f for f in ir.final_integers() if f in compared]
    result = Verification(layers=[TensorAgreement(n) for n in compared], final=[TensorAgreement(n) for n in finals])
    by_name = {t.name: t for t in result.layers} | {f"final:{t.name}": t for t in result.final}
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        for batch, labels in tqdm(batches, desc="verify", unit="batch", disable=None, leave=False):
            size = max(1, VERIFY_PART_ELEMENTS // max(1, batch[0].numel()))
            for x, y in zip(batch.split(size), labels.split(size) if labels is not None else repeat(None)):
                inputs = np.asarray(x.numpy(), np.float32)
                env = reference.run(ir, inputs, keep=True)
                fq_out = _Comparer(gm, ir, env, by_name).run(x.to(dtype))
                logits_ref = env[ir.outputs[0]]
                del env
                result.reference_outputs.append((inputs, logits_ref))
                logits_fq = logits(fq_out).numpy()
                result.images += len(x)
                result.top1_agree += int((logits_ref.argmax(1) == logits_fq.argmax(1)).sum())
                if y is not None:
                    result.labelled += len(y)
                    result.reference_correct += int((logits_ref.argmax(1) == y.numpy()).sum())
    gm.train(was_training)
    return result
