"""The paper's plots: top-1 against linear, quadratic and memory cost (one curve per recipe, the Pareto
frontier over all points marked) and top-1 against width."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcompile.artifacts import atomic_path

COSTS = {"linear_cost": "linear compute cost", "quadratic_cost": "quadratic compute cost",
         "memory_cost": "memory cost", "latency_cost": "measured latency (profile)"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower cost, higher accuracy), by increasing cost."""
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def _by_recipe(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("top1") is not None:
            out.setdefault(r["recipe"], []).append(r)
    return out


def plot_sweep(rows: Sequence[dict[str, Any]], out: Path, title: str = "") -> list[Path]:
    """Write ``top1_vs_<cost>.png`` for each cost model (``latency`` when the rows have a predicted latency from
    a measured profile) and ``top1_vs_width.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups = _by_recipe(rows)
    written = []
    for key, label in COSTS.items():
        if any(r.get(key) is None for rs in groups.values() for r in rs):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for recipe, rs in groups.items():
            rs = sorted(rs, key=lambda r: r[key])
            ax.plot([r[key] for r in rs], [100 * r["top1"] for r in rs], "o-", label=recipe)
        front = pareto_front([(r[key], r["top1"]) for rs in groups.values() for r in rs])
        if front:
            ax.step([c for c, _ in front], [100 * a for _, a in front], "k--", where="post", lw=1,
                    label="Pareto frontier")
            ax.scatter([c for c, _ in front], [100 * a for _, a in front], s=120, facecolors="none",
                       edgecolors="k", zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))  # 0.25, 0.5, 1, 2 rather than 10^x labels
        ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(f"{label} (relative to {'float' if key == 'latency_cost' else 'bf16'} at width 1.0)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / f"top1_vs_{key.removesuffix('_cost')}.png"))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for recipe, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["width"])
        ax.plot([r["width"] for r in rs], [100 * r["top1"] for r in rs], "o-", label=recipe)
    ax.set_xlabel("width multiplier")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "top1_vs_width.png"))
    plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path
