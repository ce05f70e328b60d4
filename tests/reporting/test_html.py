"""report.html: one self-contained page with the layer table, the measured figures and the verification."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from qcompile.reporting.html import render_html


def report(measured: bool = True) -> dict:
    layers = [{"name": f"layer<{i}>", "op": "conv2d", "w_bits": 4, "a_bits": 4, "macs": 1000 * (i + 1),
               "linear": 4000 * (i + 1), "quadratic": 16000 * (i + 1), "memory_bits": 64 * (i + 1)} for i in range(3)]
    out = {"model": "m.py", "recipe": "mostly4bit", "width": 1.0, "qcompile_version": "0.1.0", "layers": layers,
           "total": {"params": 10, "macs": 6000, "linear_vs_bf16": 0.25, "quadratic_vs_bf16": 0.0625,
                     "memory_vs_bf16": 0.25},
           "verification": {"reference_vs_fakequant": {"images": 8, "top1_agreement": 1.0, "identical_fraction": 1.0,
                                                       "max_lsb_diff": 0}},
           "warnings": ["a <warning> & more"]}
    if measured:
        out["measured"] = {"runtime": "onnxruntime 1.31.1", "threads": 2, "rounds": 5, "machine": "cpu",
                           "batches": {"1": {"artifact_ms": 1.0, "float_ms": 2.0, "ratio": 0.5}},
                           "layers": [{"name": f"layer<{i}>", "ms": 0.1 * (i + 1), "kernels": ["QLinearConv"]}
                                      for i in range(3)]}
    return out


def test_page_is_self_contained_and_escapes_names() -> None:
    page = render_html(report())
    assert page.startswith("<!DOCTYPE html>") and "http" not in page and "<script" not in page
    assert "layer&lt;2&gt;" in page and "layer<2>" not in page and "a &lt;warning&gt; &amp; more" in page
    assert page.count("<tr>") == (1 + 3) + (1 + 1) + (1 + 1)  # layers, measured, verification: header + rows
    assert "50.0%" in page  # the largest layer's share of the linear cost: 3 of 6 parts
    assert "Not measured" in render_html(report(measured=False))


def test_every_artifacts_check_is_shown() -> None:
    """The TVM check (``tvm_<target>_vs_reference``) beside onnxruntime's, in the page and on the console."""
    from rich.console import Console

    from qcompile.reporting.report import print_report

    r = report(measured=False)
    check = {"images": 8, "top1_agreement": 1.0, "identical_fraction": 1.0, "max_lsb_diff": 0}
    r["verification"]["reference_vs_fakequant"]["reference_top1"] = 0.5
    r["verification"].update(onnx_vs_reference={"serving": check}, tvm_cpu_generic_vs_reference=check)
    for layer in r["layers"]:
        layer["a_signed"] = False
    r["total"].update(params=10, linear=1, quadratic=1, memory_bits=1, linear_vs_bf16_width1=0.25,
                      quadratic_vs_bf16_width1=0.0625, memory_vs_bf16_width1=0.25)
    page = render_html(r)
    assert "onnxruntime (serving) vs integer reference" in page and "TVM (cpu_generic) vs integer reference" in page
    console = Console(record=True, width=200)
    print_report(r, console)
    text = console.export_text()
    assert "onnxruntime (serving) vs integer reference on 8 images" in text
    assert "TVM (cpu_generic) vs integer reference on 8 images" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_page_renders_in_a_headless_browser(tmp_path) -> None:
    """The page as a browser draws it: a screenshot with the table's ink on it, and its DOM with the table."""
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(render_html(report()))
    shot = tmp_path / "shot.png"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"file://{page}"]
    subprocess.run([*base[:-1], f"--screenshot={shot}", "--window-size=1200,900", base[-1]], check=True,
                   capture_output=True, timeout=120)
    dom = subprocess.run([*base[:-1], "--dump-dom", base[-1]], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert "<table>" in dom and "layer&lt;1&gt;" in dom
    image = Image.open(shot).convert("L")
    dark = int((np.asarray(image) < 128).sum())
    assert image.size == (1200, 900) and dark > 2000  # text and bars drawn, not a blank page
