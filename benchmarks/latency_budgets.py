"""Latency budgets on this CPU: ResNet-20 plans from the measured cost model beside the uniform recipes.

Measures (or reuses) the onnxruntime latency profile of ResNet-20 at batch 1, then compiles the uniform recipes and
``--recipe auto --budget latency=R`` for each R, every run with ``--measure`` (the artifact and the float model
timed in the same interleaved rounds). Prints, and writes as Markdown and JSON: each plan's predicted and measured
latency relative to float, whether the measured one is within the budget, its 4-bit layers and its top-1.
Print-only: nothing here is a test; run it on an idle machine.

    python benchmarks/latency_budgets.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path
from tempfile import TemporaryDirectory

from qcompile.cli import main as qcompile

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path("examples") / "resnet20_cifar.py"  # relative to ROOT: the profile records the path it is given
PROFILE = ROOT / "results" / "profiles" / "onnx-cpu-resnet20-b1.json"


def run(argv: list[str]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = qcompile(argv)
    if code != 0:
        raise RuntimeError(f"qcompile {' '.join(argv)} failed: {out.getvalue().strip().splitlines()[-1]}")


def compile_row(name: str, argv: list[str], common: list[str], tmp: Path) -> dict[str, object]:
    out = tmp / name
    try:
        run([str(MODEL), *argv, *common, "--out", str(out)])
    except RuntimeError as exc:
        return {"config": name, "error": str(exc).rsplit(": ", 1)[-1]}
    report = json.loads((out / "report.json").read_text())
    measured = report["measured"]["batches"]["1"]
    plan = report.get("ptq", {}).get("mixed_precision")
    four = sum(layer["w_bits"] == 4 for layer in report["layers"])
    return {"config": name, "predicted": report["total"].get("latency_vs_float"), "measured": measured["ratio"],
            "artifact_ms": measured["artifact_ms"], "float_ms": measured["float_ms"],
            "top1": report["accuracy"]["quant_top1"], "float_top1": report["accuracy"]["float_top1"],
            "four_bit_layers": f"{four}/{len(report['layers'])}", "linear_vs_bf16": report["total"]["linear_vs_bf16"],
            "budget": plan["budget"] if plan else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the CIFAR-10 archive")
    ap.add_argument("--budgets", default="0.5,0.7,0.9")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--reprofile", action="store_true", help="measure the profile again")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "latency")
    args = ap.parse_args()
    os.chdir(ROOT)
    if args.reprofile or not PROFILE.exists():
        PROFILE.parent.mkdir(parents=True, exist_ok=True)
        run(["profile", str(MODEL), "--rounds", str(args.rounds), "--out", str(PROFILE)])
    common = ["--data", args.data, "--measure", str(args.rounds), "--cost-model", f"measured:{PROFILE}",
              "--verify-size", "1000", "--quiet", *(["--eval-size", str(args.eval_size)] if args.eval_size else [])]
    configs = [(r, ["--recipe", r]) for r in ("int8", "mostly4bit", "int4")]
    configs += [(f"auto latency={b}", ["--recipe", "auto", "--budget", f"latency={b}"])
                for b in args.budgets.split(",")]
    rows = []
    with TemporaryDirectory() as tmp:
        for name, argv in configs:
            rows.append(compile_row(name.replace(" ", "_"), argv, common, Path(tmp)))
            rows[-1]["config"] = name
            print(rows[-1], flush=True)
    lines = ["| config | predicted latency vs float | measured vs float (batch 1) | within budget | 4-bit layers "
             "| linear cost vs bf16 | top-1 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error']} | | | | | |")
            continue
        budget = float(str(r["budget"]).split("=")[1]) if r["budget"] else None
        within = "—" if budget is None else ("yes" if r["measured"] <= budget else "no")
        lines.append(f"| {r['config']} | {r['predicted']:.3f} | {r['measured']:.3f} ({r['artifact_ms']:.3f} vs "
                     f"{r['float_ms']:.3f} ms) | {within} | {r['four_bit_layers']} | {r['linear_vs_bf16']:.4f} "
                     f"| {100 * r['top1']:.2f}% |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency_budgets.md").write_text("\n".join(lines) + "\n")
    (args.out / "latency_budgets.json").write_text(json.dumps({"profile": str(PROFILE.relative_to(ROOT)),
                                                               "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
