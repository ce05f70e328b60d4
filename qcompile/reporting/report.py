"""The cost report: ``report.json`` and the per-layer table printed by the CLI."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import fx, nn

import qcompile
from qcompile.frontend.graph import is_matmul, layer_names, module_of
from qcompile.ir.bounds import accumulator_bounds
from qcompile.pipeline import PassContext
from qcompile.quantization.spec import get_annotation
from qcompile.reporting.measured import layer_timings


def op_name(module: nn.Module) -> str:
    """``conv2d`` / ``dense`` and friends, as the report names layer kinds."""
    if isinstance(module, nn.Linear):
        return "dense"
    for kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, kind):
            return kind.__name__.lower()
    return type(module).__name__.lower()


def build_report(gm: fx.GraphModule, ctx: PassContext, model: str) -> dict[str, Any]:
    """The report as a JSON-ready dict (later stages add ``accuracy``, ``artifacts``, ``verification``)."""
    if ctx.cost is None:
        raise ValueError("build_report needs the annotate_cost pass to have run")
    names = layer_names(gm)
    bounds = {b.op: b for b in accumulator_bounds(ctx.ir)} if ctx.ir is not None else {}
    layers = []
    for n in gm.graph.nodes:
        if is_matmul(n):  # a matrix product of two tensors: a row of its own, no weights
            ann = get_annotation(n)
            assert ann is not None and ann.cost is not None and ann.precision is not None
            layers.append({"name": n.name, "op": "matmul", "role": [], "macs": ann.cost.macs, "params": 0,
                           "w_bits": ann.precision.w_bits, "a_bits": ann.precision.a_bits, "a_signed": None,
                           "linear": ann.cost.linear, "quadratic": ann.cost.quadratic, "memory_bits": 0})
            continue
        if n not in names:
            continue
        ann = get_annotation(n)
        assert ann is not None and ann.cost is not None and ann.precision is not None and ann.input_act is not None
        layers.append(
            {
                "name": names[n],
                "op": op_name(module_of(gm, n)),
                "role": sorted(r.value for r in ann.role),
                "macs": ann.cost.macs,
                "params": ann.cost.weights,
                "w_bits": ann.precision.w_bits,
                "a_bits": ann.precision.a_bits,
                "a_signed": ann.input_act.signed if ann.input_act.is_quantized else None,
                "linear": ann.cost.linear,
                "quadratic": ann.cost.quadratic,
                "memory_bits": ann.cost.memory_bits,
            }
        )
        if ann.cost.latency_ns is not None:
            layers[-1]["predicted_ms"] = ann.cost.latency_ns / 1e6
        if n.name in bounds:  # the worst-case |int32 accumulator| over every input, and its distance from 2^31
            layers[-1].update(accumulator_bound=bounds[n.name].bound,
                              int32_headroom_bits=round(bounds[n.name].headroom_bits, 2))
    return {
        "model": model,
        "recipe": ctx.recipe.name,
        "width": ctx.width,
        "qcompile_version": qcompile.__version__,
        "layers": layers,
        "total": ctx.cost.as_dict(),
        "passes": [{"name": name, "seconds": round(sec, 4)} for name, sec in ctx.timings],
        "warnings": list(ctx.warnings),
    }


def _si(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _say(console: Console, line: str) -> None:
    """Print a line of names, paths and messages as it is: "pip install 'qcompile[onnx]'" is not rich markup
    (which would eat "[onnx]"), nor ":name:" an emoji code."""
    console.print(line, markup=False, emoji=False)


def _add_row(table: Table, *cells: str) -> None:
    """A table row printed as it is (layer names and paths are data, not markup: see :func:`_say`)."""
    table.add_row(*(Text(c) for c in cells))


def _measured_line(measured: dict[str, Any], tail: str) -> str:
    """One backend's ``--measure`` figures in a line: per batch the artifact beside the float model."""
    runs = "; ".join(f"batch {b}: {r['artifact_ms']:.3f} ms" + (
        f" vs float {r['float_ms']:.3f} ms (ratio {r['ratio']:.3f})" if r["float_ms"] is not None else "")
        for b, r in measured["batches"].items())
    return (f"measured ({measured['backend']}, {measured['runtime']}, {measured['threads']} threads, median of "
            f"{measured['rounds']} interleaved rounds): {runs}; {tail}")


def artifact_checks(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each artifact's check against the integer reference, named as a user knows it: onnxruntime per ONNX
    flavour, TVM per target (``report.json`` keys: ``onnx_vs_reference`` by flavour, ``tvm_<target>_vs_reference``)."""
    ver = report.get("verification", {})
    checks = [(f"onnxruntime ({flavour})", res) for flavour, res in ver.get("onnx_vs_reference", {}).items()]
    checks += [(f"TVM ({key.removeprefix('tvm_').removesuffix('_vs_reference')})", res) for key, res in ver.items()
               if key.startswith("tvm_") and key.endswith("_vs_reference")]
    return checks


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Per-layer table and totals with ratios to bf16."""
    console = console or Console(width=None if Console().is_terminal else 140)
    table = Table(title=Text(f"{report['model']} · recipe {report['recipe']} · width {report['width']}",
                             style="table.title"))
    measured = layer_timings(report)
    ms = {m["name"]: m["ms"] for m in measured["layers"]} if measured else {}
    predicted = "predicted_latency_ms" in report["total"]
    extra = (["predicted ms"] if predicted else []) + (["measured ms"] if measured else [])
    for col in ("layer", "op", "MACs", "w/a bits", "act", "linear", "quadratic", "memory", *extra):
        table.add_column(col, justify="left" if col in ("layer", "op", "act") else "right")
    for layer in report["layers"]:
        sign = "-" if layer["a_signed"] is None else ("signed" if layer["a_signed"] else "unsigned")
        bits = "bf16" if layer["w_bits"] == 16 else f"{layer['w_bits']}/{layer['a_bits']}"
        times = ([f"{layer['predicted_ms']:.3f}"] if predicted else []) + (
            [f"{ms[layer['name']]:.3f}" if layer["name"] in ms else ""] if measured else [])
        _add_row(
            table, layer["name"], layer["op"], _si(layer["macs"]), bits, sign,
            _si(layer["linear"]), _si(layer["quadratic"]), _si(layer["memory_bits"] / 8) + "B", *times,
        )
    t = report["total"]
    blank = [""] * len(extra)
    table.add_section()
    totals = ([f"{t['predicted_latency_ms']:.3f}"] if predicted else []) + (
        [f"{sum(ms.values()):.3f}"] if measured else [])
    _add_row(table, "total", "", _si(t["macs"]), "", "", _si(t["linear"]), _si(t["quadratic"]),
             _si(t["memory_bits"] / 8) + "B", *totals)
    _add_row(table, "vs bf16", "", "", "", "", f"{t['linear_vs_bf16']:.4f}", f"{t['quadratic_vs_bf16']:.4f}",
             f"{t['memory_vs_bf16']:.4f}", *([f"{t['latency_vs_float']:.4f}"] if predicted else []),
             *([""] if measured else []))
    if report["width"] != 1.0:
        _add_row(table, "vs bf16 width 1", "", "", "", "", f"{t['linear_vs_bf16_width1']:.4f}",
                 f"{t['quadratic_vs_bf16_width1']:.4f}", f"{t['memory_vs_bf16_width1']:.4f}", *blank)
    console.print(table)
    if report.get("measured"):
        _say(console, _measured_line(report["measured"], f"per layer at batch {report['measured']['layers_batch']} "
                                                         "(kernel time)"))
    tvm_measured = report.get("measured_tvm")
    if tvm_measured:
        top = ", ".join(f"{f['name']} {f['ms']:.3f} ms" for f in tvm_measured["functions"][:3])
        _say(console, _measured_line(tvm_measured, f"slowest functions at batch {tvm_measured['functions_batch']}: "
                                                   f"{top}"))
    _say(console, f"params {t['params']:,} · MACs per batch {t['macs']:,}")
    acc = report.get("accuracy")
    if acc:
        _say(console, f"top-1 on {acc['n']} images: float {acc['float_top1'] * 100:.2f}% · "
                      f"{report['recipe']} {acc['quant_top1'] * 100:.2f}% "
                      f"(calibrated on {acc['calibration_images']} images)")
    ver = report.get("verification", {}).get("reference_vs_fakequant")
    if ver:
        top1 = ver["reference_top1"]
        labelled = f" · reference top-1 {top1 * 100:.2f}%" if top1 is not None else ""
        _say(console, f"integer reference vs fake-quant on {ver['images']} images: top-1 agreement "
                      f"{ver['top1_agreement'] * 100:.2f}% · identical final outputs {ver['identical_fraction'] * 100:.3f}% "
                      f"· max diff {ver['max_lsb_diff']} LSB{labelled}")
    for artifact, res in artifact_checks(report):
        _say(console, f"{artifact} vs integer reference on {res['images']} images: top-1 agreement "
                      f"{res['top1_agreement'] * 100:.2f}% · identical final outputs {res['identical_fraction'] * 100:.3f}% "
                      f"· max diff {res['max_lsb_diff']} LSB")
    clips = Counter(c["why"] for c in report.get("onnx_clips", []))
    if clips:
        _say(console, "ONNX serving model keeps " + "; ".join(f"{n} Clip{'s' if n > 1 else ''}: {why}"
                                                              for why, n in clips.items()))
    print_ptq(report, console)
    for w in report.get("warnings", []):
        console.print(Text.assemble(("warning:", "yellow"), f" {w}"))


def print_ptq(report: dict[str, Any], console: Console) -> None:
    """The PTQ summary: the mixed-precision plan with its cost and accuracy, and what each PTQ pass did."""
    ptq = report.get("ptq")
    if not ptq:
        return
    acc = report.get("accuracy", {}).get("quant_top1")
    plan = ptq.get("mixed_precision")
    if plan:
        widths = ", ".join(f"{k}={v}" for k, v in plan["plan"].items())
        _say(console, f"mixed precision ({plan['objective']}): cost {plan['plan_cost_vs_bf16']:.4f} of bf16, "
                      f"predicted {plan['sensitivity_metric']} degradation {plan['predicted_degradation']:.4g}"
                      + (f", measured top-1 {acc * 100:.2f}%" if acc is not None else "")
                      + f"; sensitivities {plan['sensitivity_measured']} measured, {plan['sensitivity_reused']} "
                        f"reused from {plan['sensitivity_cache']}")
        _say(console, f"plan: {widths}")
    ada = ptq.get("adaquant")
    if ada:
        units = ada["units"]
        kept = sum(r["kept"] for r in units)
        _say(console, f"adaquant ({ada['scope']} by {ada['scope']}): {kept}/{len(units)} {ada['scope']}s improved; MSE "
                      f"{sum(r['mse_before'] for r in units):.4g} -> "
                      f"{sum(min(r['mse_after'], r['mse_before']) for r in units):.4g} (sum over {ada['scope']}s)")
    if "bn_tune" in ptq:
        _say(console, f"bn_tune: {ptq['bn_tune']['batchnorms']} BatchNorms re-estimated on "
                      f"{ptq['bn_tune']['images']} images")
    if "bias_correct" in ptq:
        _say(console, f"bias_correct: {len(ptq['bias_correct']['layers'])} layer biases corrected")
