"""Accuracy against linear cost: integer-programming plans (--recipe auto --budget linear=B) and the uniform
recipes, plain and with the PTQ pipelines, on the project's ResNet-20 and CIFAR-10.

Each configuration runs the same passes as the CLI (qcompile.ptq.ptq_passes), is evaluated on the test split and
lowered to the integer IR and verified against the fake-quant model. Rows are appended to ``OUT/ptq_budgets.csv``
as they finish (a re-run skips configurations already there), and ``OUT/ptq_budgets.png`` is redrawn from the CSV.

    nice -n 10 python benchmarks/ptq_budgets.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from qcompile.artifacts import atomic_path, write_json
from qcompile.bit_allocation import parse_budget
from qcompile.cli import build_parser, resolve_data
from qcompile.evaluate import take_images, top1
from qcompile.model_file import load_model_file
from qcompile.pipeline import Pipeline
from qcompile.ptq import ptq_passes
from qcompile.recipes import get_recipe
from qcompile.sensitivity import METRICS
from qcompile.verify import verify_reference

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["name", "recipe", "ptq", "budget", "sensitivity", "linear_vs_bf16", "quadratic_vs_bf16", "memory_vs_bf16",
          "top1", "float_top1", "images", "verified_images", "verify_identical", "verify_top1_agreement", "seconds"]


def configurations(budgets: list[str], modes: list[str], metric: str = "kl",
                   ) -> list[tuple[str, str, str | None, str | None]]:
    """(name, recipe, ptq mode, budget) in the order they are worth measuring; IP plans measured with a
    non-default sensitivity metric are named for it (``auto-linear0.30-plain-loss``)."""
    out = []
    suffix = "" if metric == "kl" else f"-{metric}"
    for mode in modes:
        ptq = None if mode == "plain" else mode
        out += [(f"mostly4bit-{mode}", "mostly4bit", ptq, None)]
        out += [(f"auto-linear{b}-{mode}{suffix}", "auto", ptq, f"linear={b}") for b in budgets]
        out += [(f"{r}-{mode}", r, ptq, None) for r in ("int8", "int4")]
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    """The whole table, rewritten atomically after each configuration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot(csv_path: Path, png_path: Path) -> None:
    """Top-1 against linear cost: one line of IP plans per PTQ mode and sensitivity metric, uniform recipes as
    labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"plain": "tab:blue", "light": "tab:green", "advanced": "tab:red"}
    for mode, color in colors.items():
        for metric, style in (("kl", "o-"), ("loss", "^--")):
            ip = sorted((float(r["linear_vs_bf16"]), 100 * float(r["top1"])) for r in rows
                        if r["recipe"] == "auto" and r["ptq"] == mode and (r.get("sensitivity") or "loss") == metric)
            if ip:
                ax.plot(*zip(*ip), style, color=color, label=f"IP plans ({mode}, {metric} sensitivity)")
        uni = [r for r in rows if r["recipe"] != "auto" and r["ptq"] == mode]
        for r in uni:
            ax.plot(float(r["linear_vs_bf16"]), 100 * float(r["top1"]), "s", color=color, mfc="none", ms=8)
            ax.annotate(f"{r['recipe']}", (float(r["linear_vs_bf16"]), 100 * float(r["top1"])),
                        textcoords="offset points", xytext=(5, -10), fontsize=7, color=color)
    if rows:
        ax.axhline(100 * float(rows[0]["float_top1"]), color="gray", ls="--", lw=1, label="float")
    ax.set_xlabel("linear cost vs bf16")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("ResNet-20 CIFAR-10: IP mixed precision vs uniform recipes (squares)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "resnet20_cifar.py"))
    ap.add_argument("--data", required=True, help="CIFAR-10 archive or ImageFolder directory")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--verify-size", type=int, default=500)
    ap.add_argument("--budgets", default="0.25,0.30,0.40")
    ap.add_argument("--modes", default="plain,advanced,light", help="PTQ modes: plain, light, advanced")
    ap.add_argument("--only", help="comma-separated configuration names to run (default: all)")
    ap.add_argument("--adaquant-iters", type=int, default=200)
    ap.add_argument("--sensitivity", choices=METRICS, default="kl", help="per-layer degradation measure of the IP")
    ap.add_argument("--out", default=str(ROOT / "results" / "ptq"))
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    csv_path, plans_path = out / "ptq_budgets.csv", out / "plans.json"
    if args.plot_only:
        plot(csv_path, out / "ptq_budgets.png")
        return
    cli = build_parser().parse_args([args.model, "--data", args.data, "--calib-size", str(args.calib_size)]
                                    + (["--eval-size", str(args.eval_size)] if args.eval_size else []))
    mf = load_model_file(args.model)
    model = mf.build().eval()
    calib, evald = resolve_data(cli, mf)
    done = {r["name"] for r in read_rows(csv_path)}
    plans = json.loads(plans_path.read_text()) if plans_path.exists() else {}
    float_top1, n = top1(model, evald, desc="eval float")
    print(f"float top-1 {float_top1:.4f} on {n} images", flush=True)
    configs = {c[0]: c for c in configurations(args.budgets.split(","), args.modes.split(","), args.sensitivity)}
    for name in (args.only.split(",") if args.only else configs):
        if name in done:
            continue
        if name not in configs:
            raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(configs)}")
        _, recipe, ptq, budget = configs[name]
        start = time.time()
        passes = ptq_passes(ptq, recipe == "auto", parse_budget(budget) if budget else None,
                            adaquant_iterations=args.adaquant_iters, metric=args.sensitivity)
        with torch.no_grad():
            result = Pipeline(passes).run(model, mf.example_input(), recipe=get_recipe(recipe), calibration_data=calib)
        acc, images = top1(result.graph_module, evald, desc=name)
        ver = verify_reference(result.graph_module, result.context.ir, take_images(evald, args.verify_size)).summary()
        cost = result.context.cost
        row = {"name": name, "recipe": recipe, "ptq": ptq or "plain", "budget": budget or "",
               "sensitivity": args.sensitivity if recipe == "auto" else "",
               "linear_vs_bf16": f"{cost.linear_vs_bf16:.6f}", "quadratic_vs_bf16": f"{cost.quadratic_vs_bf16:.6f}",
               "memory_vs_bf16": f"{cost.memory_vs_bf16:.6f}", "top1": f"{acc:.4f}", "float_top1": f"{float_top1:.4f}",
               "images": images, "verified_images": ver["images"], "verify_identical": ver["identical_fraction"],
               "verify_top1_agreement": ver["top1_agreement"], "seconds": round(time.time() - start)}
        write_rows(csv_path, [*read_rows(csv_path), row])
        mp = result.context.results.get("mixed_precision")
        if mp:
            plans[name] = {k: mp[k] for k in ("budget", "budget_cost", "plan_cost", "plan_cost_vs_bf16",
                                              "predicted_degradation", "sensitivity_metric", "plan")}
            write_json(plans_path, plans)
        print(json.dumps(row), flush=True)
        plot(csv_path, out / "ptq_budgets.png")


if __name__ == "__main__":
    main()
