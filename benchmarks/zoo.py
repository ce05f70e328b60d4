"""The example model zoo through the qcompile CLI: which models compile, and do their artifacts agree?

    python benchmarks/zoo.py [--models mobilenet_v2 densenet ...] [--recipes int8 mostly4bit]
                             [--data examples/data/cifar10-sample.tar.gz] [--calib-size 256] [--eval-size N]
                             [--verify-size 500] [--batch-size 100] [--out /tmp/qcompile-zoo] [--markdown FILE]
                             [--threads N]

For each example model file x recipe it runs ``qcompile MODEL --recipe R --data ... --backend onnx
--backend tvm --out OUT/<model>-<recipe> --quiet`` in-process (``qcompile.cli.main``), then reads that run's
``report.json`` and prints one markdown table: does it compile (``yes``, or the CLI's one-line error), the
integer reference against the fake-quant model, the ONNX serving / compact artifacts and the TVM CPU library
against the reference (identical final integer outputs, top-1 agreement), MACs, parameters and the linear
cost against bf16. A failing row prints its error and the run goes on; where the CLI failed before writing a
report, the costs come from a cost-only pass over the same model.

Verification uses the first ``--verify-size`` evaluation images, so an ``--eval-size`` below it verifies
fewer. The examples are untrained (seeded weights), so accuracy is not reported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODELS = ("mobilenet_v2", "se_resnet", "efficientnet_b0", "preact_resnet18", "shufflenet_v2", "densenet",
          "convnext", "resnext29_cifar", "bit_resnetv2", "mobilenet_v3", "cbam_resnet",
          "antialiased_resnet")
RECIPES = ("int8", "mostly4bit")
COLUMNS = ("model", "recipe", "compiles", "reference vs fake-quant", "ONNX serving vs ref", "ONNX compact vs ref",
           "TVM CPU vs ref", "MACs", "params", "linear vs bf16", "ONNX ms (vs float)", "seconds")


def model_path(name: str) -> Path:
    """An example's name (``densenet``) or a model file's path."""
    p = Path(name)
    if p.suffix == ".py":
        return p
    return EXAMPLES / f"{name}.py"


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``qcompile.cli.main(argv)`` with its output captured: (exit status, its error line or '')."""
    from qcompile import cli

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    except SystemExit as exc:  # argparse: a bad flag
        rc = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # a crash inside a pass or a backend, not a user error
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return 1, one_line(f"{type(exc).__name__}: {message} ({Path(frame.filename).name}:{frame.lineno})")
    if rc == 0:
        return 0, ""
    if rc in (130, 143):  # interrupted or terminated: the whole run stops, not just this row
        raise SystemExit(rc)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    errors = [ln.removeprefix("qcompile: error: ") for ln in lines if ln.startswith("qcompile: error:")]
    return rc, one_line(errors[-1] if errors else (lines[-1] if lines else f"exit status {rc}"))


def cost_only(path: Path, recipe: str) -> dict[str, Any] | None:
    """MACs, parameters and linear cost from capture + assign_precision + annotate_cost alone, or None."""
    import torch
    from qcompile.passes import AnnotateCost, AssignPrecision

    from qcompile import Pipeline, get_recipe
    from qcompile.frontend.model_file import load_model_file

    try:
        mf = load_model_file(path)
        model = mf.build().eval()
        with torch.no_grad():
            res = Pipeline([AssignPrecision(), AnnotateCost()]).run(model, mf.example_input(),
                                                                     recipe=get_recipe(recipe))
        assert res.context.cost is not None
        return res.context.cost.as_dict()
    except Exception:
        return None


def agreement(result: dict[str, Any] | None) -> str:
    if not result:
        return "—"
    return (f"{result['identical_fraction'] * 100:.2f}% · {result['top1_agreement'] * 100:.1f}%"
            + (f" (max {result['max_lsb_diff']} LSB)" if result.get("max_lsb_diff") else ""))


def si(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def measured(report: dict[str, Any] | None) -> str:
    """The serving artifact's median latency at the first measured batch, and its ratio to the float model's
    measured in the same rounds (``--measure``, on by default)."""
    batches = ((report or {}).get("measured") or {}).get("batches") or {}
    if not batches:
        return "—"
    batch, m = next(iter(batches.items()))
    ratio = f"{m['ratio']:.2f}×" if m.get("ratio") is not None else "float not timed"
    return f"{m['artifact_ms']:.2f} ({ratio}) at batch {batch}"


def row_of(name: str, recipe: str, rc: int, error: str, report: dict[str, Any] | None,
           total: dict[str, Any] | None, seconds: float) -> dict[str, str]:
    ver = (report or {}).get("verification", {})
    onnx = ver.get("onnx_vs_reference", {})
    tvm = ver.get("tvm_cpu_vs_reference")
    tvm_cell = agreement(tvm)
    if tvm is None and "tvm_cpu" in (report or {}).get("artifacts", {}):
        tvm_cell = "built, not verified"
    return {
        "model": name,
        "recipe": recipe,
        "compiles": "yes" if rc == 0 else error.replace("|", "\\|"),
        "reference vs fake-quant": agreement(ver.get("reference_vs_fakequant")),
        "ONNX serving vs ref": agreement(onnx.get("serving")),
        "ONNX compact vs ref": agreement(onnx.get("compact")),
        "TVM CPU vs ref": tvm_cell,
        "MACs": si(total["macs"]) if total else "—",
        "params": si(total["params"]) if total else "—",
        "linear vs bf16": f"{total['linear_vs_bf16']:.4f}" if total else "—",
        "ONNX ms (vs float)": measured(report),
        "seconds": f"{seconds:.0f}",
    }


def markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    note = ("Agreement cells: identical final integer outputs · top-1 agreement (and the largest difference in "
            "LSB where not 0); — where that stage did not run. ONNX ms: the serving artifact's median latency in "
            "onnxruntime on this machine and its ratio to the float model's, timed in the same interleaved rounds.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(EXAMPLES / "data" / "cifar10-sample.tar.gz"),
                    help="CIFAR-style archive or ImageFolder (default: the bundled sample)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                    help=f"example names or model-file paths (default: {' '.join(MODELS)})")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="RECIPE",
                    help=f"recipes (default: {' '.join(RECIPES)})")
    ap.add_argument("--calib-size", type=int, default=256, metavar="N", help="calibration images (default 256)")
    ap.add_argument("--eval-size", type=int, default=None, metavar="N", help="evaluation images (default: all)")
    ap.add_argument("--verify-size", type=int, default=500, metavar="N",
                    help="images the artifacts are checked on, the first of the evaluation images (default 500)")
    ap.add_argument("--out", default="/tmp/qcompile-zoo", help="one OUT/<model>-<recipe> folder per run")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    ap.add_argument("--batch-size", type=int, default=100, metavar="N",
                    help="batch size of calibration, verification and evaluation (default 100: verification "
                         "keeps every intermediate tensor of a batch)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_root = Path(args.out)
    rows = []
    runs = [(m, r) for m in args.models for r in args.recipes]
    for i, (name, recipe) in enumerate(runs, 1):
        path = model_path(name)
        label = path.stem
        out = out_root / f"{label}-{recipe}"
        shutil.rmtree(out, ignore_errors=True)  # never read a previous run's report
        cli_args = [str(path), "--recipe", recipe, "--data", args.data, "--calib-size", str(args.calib_size),
                    "--verify-size", str(args.verify_size), "--batch-size", str(args.batch_size), "--backend", "onnx", "--backend", "tvm",
                    "--out", str(out), "--quiet"]
        if args.eval_size is not None:
            cli_args += ["--eval-size", str(args.eval_size)]
        print(f"[{i}/{len(runs)}] {label} {recipe} ...", flush=True)
        start = time.perf_counter()
        rc, error = run_cli(cli_args)
        seconds = time.perf_counter() - start
        report = None
        if (out / "report.json").exists():
            report = json.loads((out / "report.json").read_text())
        total = (report or {}).get("total") or cost_only(path, recipe)
        row = row_of(label, recipe, rc, error, report, total, seconds)
        rows.append(row)
        status = "ok" if rc == 0 else f"FAILED: {error}"
        warned = f"; {len(report.get('warnings', []))} warnings in the report" if report else ""
        print(f"    {status} ({seconds:.0f} s{warned}); reference vs fake-quant {row['reference vs fake-quant']}",
              flush=True)
    table = markdown(rows)
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
