"""Accuracy against linear cost: integer-programming plans (--recipe auto --budget linear=B) and the uniform
recipes, plain and with the PTQ pipelines, on the project's ResNet-20 and CIFAR-10.

Each configuration runs the same passes as the CLI (qcompile.pipelines.ptq_passes), is evaluated on the test split and
lowered to the integer IR and verified against the fake-quant model. Rows are appended to ``OUT/ptq_budgets.csv``
as they finish (a re-run skips configurations already there), which image each got right goes to
``OUT/hits.npz``, and ``OUT/ptq_budgets.png`` is redrawn from the CSV.

    nice -n 10 python benchmarks/ptq_budgets.py --data ../shared/data/cifar10-jpeg.tar.gz [--calib-seed S]
    python benchmarks/ptq_budgets.py --merge PART_DIR... --out results/ptq   # runs made in parallel, one table
    python benchmarks/ptq_budgets.py --compare --out results/ptq

``--compare`` sets every IP plan against each uniform recipe of equal or higher linear cost, in the same PTQ
mode and on the same calibration draw: the difference in top-1 with its 95% interval from the paired per-image
outcomes (the test images are shared, so the interval reflects the images on which the two models disagree),
per draw and as the mean over draws. It writes ``OUT/comparison.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from qcompile.passes.adaquant import SCOPES

from qcompile.artifacts import atomic_path, write_json
from qcompile.cli import build_parser, resolve_data
from qcompile.frontend.model_file import load_model_file
from qcompile.pipeline import Pipeline
from qcompile.pipelines import ptq_passes
from qcompile.quantization.recipes import get_recipe
from qcompile.reporting.evaluate import accuracy, hits, take_images
from qcompile.reporting.verify import verify_reference
from qcompile.search.bit_allocation import parse_budget
from qcompile.search.sensitivity import METRICS

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["name", "recipe", "ptq", "budget", "sensitivity", "adaquant_scope", "calib_seed", "linear_vs_bf16",
          "quadratic_vs_bf16", "memory_vs_bf16", "top1", "float_top1", "images", "verified_images", "verify_identical",
          "verify_top1_agreement", "seconds"]
UNIFORM = ("mostly4bit", "int8", "int4")


def configurations(budgets: list[str], modes: list[str], metric: str = "kl", scope: str = "layer", seed: int = 0,
                   ) -> list[tuple[str, str, str | None, str | None]]:
    """(name, recipe, ptq mode, budget) in the order they are worth measuring; IP plans measured with a
    non-default sensitivity metric are named for it (``auto-linear0.30-plain-loss``), advanced runs with block
    AdaQuant end in ``-block``, and runs on another calibration draw than 0 in ``-s<seed>``."""
    out = []
    suffix = "" if metric == "kl" else f"-{metric}"
    for mode in modes:
        ptq = None if mode == "plain" else mode
        tag = mode + ("-block" if scope == "block" and mode == "advanced" else "")
        end = f"-s{seed}" if seed else ""
        out += [(f"mostly4bit-{tag}{end}", "mostly4bit", ptq, None)]
        out += [(f"auto-linear{b}-{tag}{suffix}{end}", "auto", ptq, f"linear={b}") for b in budgets]
        out += [(f"{r}-{tag}{end}", r, ptq, None) for r in ("int8", "int4")]
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


def read_hits(path: Path) -> dict[str, np.ndarray]:
    """Per configuration, which test images it classified correctly (stored bit-packed)."""
    if not path.exists():
        return {}
    with np.load(path) as z:
        n = int(z["_images"])
        return {k: np.unpackbits(z[k])[:n].astype(bool) for k in z.files if k != "_images"}


def write_hits(path: Path, table: dict[str, np.ndarray]) -> None:
    sizes = {len(v) for v in table.values()}
    if len(sizes) > 1:
        raise SystemExit(f"hits of different test sets ({sorted(sizes)} images) cannot share {path}")
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, _images=np.array(sizes.pop() if sizes else 0),
                            **{k: np.packbits(v) for k, v in table.items()})


def merge(parts: list[Path], out: Path) -> None:
    """One table (CSV, plans, hits) from benchmark runs made in parallel into separate directories."""
    rows = read_rows(out / "ptq_budgets.csv")
    plans = json.loads((out / "plans.json").read_text()) if (out / "plans.json").exists() else {}
    table = read_hits(out / "hits.npz")
    for part in parts:
        names = {r["name"] for r in rows}
        rows += [r for r in read_rows(part / "ptq_budgets.csv") if r["name"] not in names]
        if (part / "plans.json").exists():
            plans.update(json.loads((part / "plans.json").read_text()))
        table.update(read_hits(part / "hits.npz"))
    write_rows(out / "ptq_budgets.csv", rows)
    write_json(out / "plans.json", plans)
    write_hits(out / "hits.npz", table)


def compare(out: Path) -> list[dict[str, object]]:
    """Every IP plan against each uniform recipe of equal or higher linear cost, same mode, scope and draw: the
    difference in top-1 (points) with a 95% interval from the paired per-image outcomes; then the mean over
    draws. Printed and written to ``OUT/comparison.csv``."""
    rows, table = read_rows(out / "ptq_budgets.csv"), read_hits(out / "hits.npz")

    def setting(r: dict[str, str]) -> tuple[str, str, str]:
        """What an IP plan and a uniform recipe must share to be compared: mode, AdaQuant scope, draw."""
        return r["ptq"], r.get("adaquant_scope") or "layer", r.get("calib_seed") or "0"

    result: list[dict[str, object]] = []
    for ip in (r for r in rows if r["recipe"] == "auto" and r["name"] in table):
        for uni in rows:
            if (uni["recipe"] in UNIFORM and uni["name"] in table and setting(uni) == setting(ip)
                    and float(uni["linear_vs_bf16"]) >= float(ip["linear_vs_bf16"]) - 1e-9):
                d = table[ip["name"]].astype(float) - table[uni["name"]].astype(float)
                se = float(d.std(ddof=1) / math.sqrt(len(d)))
                mode, scope, seed = setting(ip)
                result.append({"mode": mode, "scope": scope, "sensitivity": ip.get("sensitivity") or "kl",
                               "budget": ip["budget"], "calib_seed": seed,
                               "uniform": uni["recipe"], "ip_top1": 100 * float(ip["top1"]),
                               "uniform_top1": 100 * float(uni["top1"]), "diff": 100 * float(d.mean()),
                               "ci95": 196 * se, "disagree": int((d != 0).sum())})
    groups: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for r in result:
        groups.setdefault((r["mode"], r["scope"], r["sensitivity"], r["budget"], r["uniform"]), []).append(r)
    for (mode, scope, metric, budget, uni), rs in sorted(groups.items(), key=str):
        diffs = [float(r["diff"]) for r in rs]  # type: ignore[arg-type]
        ci = math.sqrt(sum(float(r["ci95"]) ** 2 for r in rs)) / len(rs)  # type: ignore[arg-type]
        print(f"{mode:>8} {scope:>5} {metric:>4} {budget:>12} vs {uni:<10} " + "  ".join(
            f"s{r['calib_seed']}: {float(r['ip_top1']):.2f}-{float(r['uniform_top1']):.2f} = {float(r['diff']):+.2f}"
            f"±{float(r['ci95']):.2f}" for r in rs) + f"   mean {sum(diffs) / len(diffs):+.2f}±{ci:.2f}")
    with atomic_path(out / "comparison.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["mode", "scope", "sensitivity", "budget", "calib_seed", "uniform", "ip_top1",
                                "uniform_top1", "diff", "ci95", "disagree"])
        w.writeheader()
        w.writerows({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in result)
    return result


def plot(csv_path: Path, png_path: Path) -> None:
    """Top-1 against linear cost: one line of IP plans per PTQ mode, sensitivity measure and AdaQuant scope, the
    uniform recipes as labelled squares; each point is the mean over calibration draws, its bar their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    series: dict[tuple[str, str, str, str], dict[float, list[float]]] = {}
    for r in rows:
        kind = "IP" if r["recipe"] == "auto" else r["recipe"]
        k = (kind, r["ptq"], r.get("sensitivity") or "kl", r.get("adaquant_scope") or "layer")
        series.setdefault(k, {}).setdefault(float(r["linear_vs_bf16"]), []).append(100 * float(r["top1"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"plain": "tab:blue", "light": "tab:green", "advanced": "tab:red"}
    for (kind, mode, metric, scope), pts in sorted(series.items()):
        xs = sorted(pts)
        ys = [float(np.mean(pts[x])) for x in xs]
        err = [[ys[i] - min(pts[x]) for i, x in enumerate(xs)], [max(pts[x]) - ys[i] for i, x in enumerate(xs)]]
        color = colors.get(mode, "gray")
        if kind == "IP":
            style = ("o-" if metric == "kl" else "^--") if scope == "layer" else "d:"
            label = f"IP plans ({mode}, {metric}" + (", block AdaQuant" if scope == "block" else "") + ")"
            ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, capsize=3, label=label)
        else:
            ax.errorbar(xs, ys, yerr=err, fmt="D" if scope == "block" else "s", color=color, mfc="none", ms=8,
                        capsize=3)
            ax.annotate(kind, (xs[0], ys[0]), textcoords="offset points", xytext=(5, -10), fontsize=7, color=color)
    if rows:
        ax.axhline(100 * float(rows[0]["float_top1"]), color="gray", ls="--", lw=1, label="float")
    ax.set_xlabel("linear cost vs bf16")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("ResNet-20 CIFAR-10: IP plans vs uniform recipes (squares); mean and range over calibration draws",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "resnet20_cifar.py"))
    ap.add_argument("--data", help="CIFAR-10 archive or ImageFolder directory (needed to measure)")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--calib-seed", type=int, default=0, help="which calibration draw (qcompile --calib-seed)")
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--verify-size", type=int, default=500)
    ap.add_argument("--budgets", default="0.25,0.30,0.40")
    ap.add_argument("--modes", default="plain,advanced,light", help="PTQ modes: plain, light, advanced")
    ap.add_argument("--only", help="comma-separated configuration names to run (default: all)")
    ap.add_argument("--adaquant-iters", type=int, default=200)
    ap.add_argument("--adaquant-scope", choices=SCOPES, default="layer")
    ap.add_argument("--sensitivity", choices=METRICS, default="kl", help="per-layer degradation measure of the IP")
    ap.add_argument("--out", default=str(ROOT / "results" / "ptq"))
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="merge these runs' tables into --out, then plot")
    ap.add_argument("--compare", action="store_true", help="IP plans vs uniform recipes of >= cost, paired")
    args = ap.parse_args()
    out = Path(args.out)
    csv_path, plans_path, hits_path = out / "ptq_budgets.csv", out / "plans.json", out / "hits.npz"
    if args.merge:
        merge([Path(p) for p in args.merge], out)
    if args.merge or args.plot_only or args.compare:
        plot(csv_path, out / "ptq_budgets.png")
        if args.compare:
            compare(out)
        return
    if not args.data:
        raise SystemExit("--data is needed to measure (or use --merge, --compare, --plot-only)")
    cli = build_parser().parse_args([args.model, "--data", args.data, "--calib-size", str(args.calib_size),
                                     "--calib-seed", str(args.calib_seed)]
                                    + (["--eval-size", str(args.eval_size)] if args.eval_size else []))
    mf = load_model_file(args.model)
    model = mf.build().eval()
    calib, evald = resolve_data(cli, mf)
    done = {r["name"] for r in read_rows(csv_path)}
    plans = json.loads(plans_path.read_text()) if plans_path.exists() else {}
    float_hits = hits(model, evald, desc="eval float")
    float_top1 = accuracy(float_hits)
    print(f"float top-1 {float_top1:.4f} on {len(float_hits)} images", flush=True)
    configs = {c[0]: c for c in configurations(args.budgets.split(","), args.modes.split(","), args.sensitivity,
                                               args.adaquant_scope, args.calib_seed)}
    for name in (args.only.split(",") if args.only else configs):
        if name in done:
            continue
        if name not in configs:
            raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(configs)}")
        _, recipe, ptq, budget = configs[name]
        start = time.time()
        plan = get_recipe(recipe)
        passes = ptq_passes(plan, ptq, budget=parse_budget(budget) if budget else None,
                            adaquant_iterations=args.adaquant_iters, metric=args.sensitivity,
                            adaquant_scope=args.adaquant_scope)
        with torch.no_grad():
            result = Pipeline(passes).run(model, mf.example_input(), recipe=plan, calibration_data=calib)
        got = hits(result.graph_module, evald, desc=name)
        ver = verify_reference(result.graph_module, result.context.ir, take_images(evald, args.verify_size)).summary()
        cost = result.context.cost
        row = {"name": name, "recipe": recipe, "ptq": ptq or "plain", "budget": budget or "",
               "sensitivity": args.sensitivity if plan.searched else "",
               "adaquant_scope": args.adaquant_scope if ptq == "advanced" else "", "calib_seed": args.calib_seed,
               "linear_vs_bf16": f"{cost.linear_vs_bf16:.6f}", "quadratic_vs_bf16": f"{cost.quadratic_vs_bf16:.6f}",
               "memory_vs_bf16": f"{cost.memory_vs_bf16:.6f}", "top1": f"{accuracy(got):.4f}",
               "float_top1": f"{float_top1:.4f}", "images": len(got), "verified_images": ver["images"],
               "verify_identical": ver["identical_fraction"], "verify_top1_agreement": ver["top1_agreement"],
               "seconds": round(time.time() - start)}
        write_rows(csv_path, [*read_rows(csv_path), row])
        write_hits(hits_path, {**read_hits(hits_path), name: got.numpy()})
        mp = result.context.results.get("mixed_precision")
        if mp:
            plans[name] = {k: mp[k] for k in ("budget", "budget_cost", "plan_cost", "plan_cost_vs_bf16",
                                              "predicted_degradation", "sensitivity_metric", "plan")}
            write_json(plans_path, plans)
        print(json.dumps(row), flush=True)
        plot(csv_path, out / "ptq_budgets.png")


if __name__ == "__main__":
    main()
