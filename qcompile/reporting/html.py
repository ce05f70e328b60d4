"""``report.html``: the report as one self-contained page (no network, no scripts), for reading and sharing.

The per-layer table shows each layer's share of the model's predicted cost (linear, quadratic, memory) and, when
the run measured the artifact, its share of the measured time, as bars side by side: where the cost model and
the hardware disagree is what a user choosing a recipe needs to see. Plots (sweeps) are embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from qcompile.reporting.measured import layer_timings
from qcompile.reporting.report import artifact_checks

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px}
.sub{color:#5a6472;margin-bottom:14px}
table{border-collapse:collapse;margin:6px 0}
th,td{padding:3px 8px;border-bottom:1px solid #e3e7ec;text-align:right;white-space:nowrap}
th{background:#f3f5f8;font-weight:600}td.l,th.l{text-align:left}
.bar{display:inline-block;height:10px;vertical-align:middle;margin-right:6px;border-radius:2px}
.cell{display:flex;align-items:center;justify-content:flex-end;min-width:150px}
.linear{background:#4c78a8}.quadratic{background:#72b7b2}.memory{background:#eeca3b}.measured{background:#e45756}
.warn{color:#9a5b00}img{max-width:720px;border:1px solid #e3e7ec;margin:6px 12px 6px 0}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:0}dt{color:#5a6472}dd{margin:0}
"""

_COSTS = ("linear", "quadratic", "memory_bits")


def _e(x: Any) -> str:
    return html.escape(str(x))


def _bar(share: float, widest: float, kind: str) -> str:
    """A bar 100 px wide for the column's largest share ``widest``, with the percentage beside it."""
    return (f'<div class="cell"><span class="bar {kind}" style="width:{share / (widest or 1.0) * 100:.1f}px">'
            f"</span>{share * 100:.1f}%</div>")


def _shares(values: list[float]) -> list[float]:
    total = sum(values) or 1.0
    return [v / total for v in values]


def _layer_table(report: dict[str, Any]) -> str:
    layers = report["layers"]
    shares = {k: _shares([layer[k] for layer in layers]) for k in _COSTS}
    measured = {m["name"]: m for m in (layer_timings(report) or {}).get("layers", [])}
    measured_share = dict(zip(measured, _shares([m["ms"] for m in measured.values()])))
    widest_measured = max(measured_share.values(), default=1.0)
    head = ["layer", "op", "w/a bits", "MACs", "linear", "quadratic", "memory"]
    if measured:
        head += ["measured", "ms", "kernel"]
    rows = ["<tr>" + "".join(f'<th class="{"l" if h in ("layer", "op", "kernel") else ""}">{_e(h)}</th>'
                             for h in head) + "</tr>"]
    for i, layer in enumerate(layers):
        bits = "bf16" if layer["w_bits"] == 16 else f"{layer['w_bits']}/{layer['a_bits']}"
        cells = [f'<td class="l">{_e(layer["name"])}</td>', f'<td class="l">{_e(layer["op"])}</td>',
                 f"<td>{_e(bits)}</td>", f"<td>{layer['macs']:,}</td>"]
        cells += [f"<td>{_bar(shares[k][i], max(shares[k]), k.split('_')[0])}</td>" for k in _COSTS]
        if measured:
            m = measured.get(layer["name"])
            bar = _bar(measured_share[m["name"]], widest_measured, "measured") if m else ""
            cells += ([f"<td>{bar}</td>", f"<td>{m['ms']:.3f}</td>", f'<td class="l">{_e(", ".join(m["kernels"]))}</td>']
                      if m else ["<td></td>"] * 3)
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _facts(report: dict[str, Any]) -> str:
    t = report["total"]
    facts = [("parameters", f"{t['params']:,}"), ("MACs per batch", f"{t['macs']:,}"),
             ("linear cost vs bf16", f"{t['linear_vs_bf16']:.4f}"),
             ("quadratic cost vs bf16", f"{t['quadratic_vs_bf16']:.4f}"),
             ("memory vs bf16", f"{t['memory_vs_bf16']:.4f}")]
    acc = report.get("accuracy")
    if acc:
        facts.append((f"top-1 on {acc['n']} images",
                      f"float {acc['float_top1'] * 100:.2f}% · {report['recipe']} {acc['quant_top1'] * 100:.2f}%"))
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"


def _verification(report: dict[str, Any]) -> str:
    rows = []
    ver = report.get("verification", {})
    checks = [("integer reference vs fake-quant", ver.get("reference_vs_fakequant"))]
    checks += [(f"{artifact} vs integer reference", res) for artifact, res in artifact_checks(report)]
    for what, res in checks:
        if res:
            rows.append(f'<tr><td class="l">{_e(what)}</td><td>{res["images"]}</td>'
                        f"<td>{res['top1_agreement'] * 100:.2f}%</td><td>{res['identical_fraction'] * 100:.3f}%</td>"
                        f"<td>{_e(res['max_lsb_diff'])}</td></tr>")
    if not rows:
        return "<p>No verification in this run.</p>"
    return ('<table><tr><th class="l">check</th><th>images</th><th>top-1 agreement</th>'
            "<th>identical outputs</th><th>max diff (LSB)</th></tr>" + "".join(rows) + "</table>")


def _measured(report: dict[str, Any]) -> str:
    m = report.get("measured")
    if not m:
        return "<p>Not measured in this run.</p>"
    untimed = "<td>—</td><td>—</td>"  # no float build to time beside it
    rows = "".join(
        f"<tr><td>{_e(b)}</td><td>{r['artifact_ms']:.3f}</td>"
        + (f"<td>{r['float_ms']:.3f}</td><td>{r['ratio']:.3f}</td>" if r["float_ms"] is not None else untimed)
        + "</tr>" for b, r in m["batches"].items())
    return (f'<p class="sub">{_e(m["runtime"])}, {m["threads"]} threads, median of {m["rounds"]} interleaved '
            f"rounds on {_e(m['machine'])}</p><table><tr><th>batch</th><th>artifact ms</th><th>float ms</th>"
            f"<th>ratio</th></tr>{rows}</table>")


def _plot(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(path.stem)}" src="data:image/png;base64,{data}">'


def render_html(report: dict[str, Any], plots: tuple[Path, ...] = ()) -> str:
    """The page for one report (and the PNG plots of a sweep, embedded)."""
    warnings = "".join(f'<li class="warn">{_e(w)}</li>' for w in report.get("warnings", []))
    title = f"{report['model']} · recipe {report['recipe']} · width {report['width']}"
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>",
        f'<h1>{_e(title)}</h1><div class="sub">qcompile {_e(report.get("qcompile_version", ""))}</div>',
        _facts(report),
        "<h2>Layers: share of predicted cost and of measured time</h2>", _layer_table(report),
        "<h2>Measured latency</h2>", _measured(report),
        "<h2>Verification</h2>", _verification(report),
    ]
    if plots:
        parts += ["<h2>Plots</h2>", *(_plot(p) for p in plots)]
    if warnings:
        parts += ["<h2>Warnings</h2>", f"<ul>{warnings}</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)
