"""The Pareto sweep: train every (width, recipe) pair, tabulate accuracy against cost, draw the plots.

Each finished pair leaves ``runs/<pair>/result.json``; a rerun skips those and resumes an interrupted pair from
its checkpoint, so a sweep can be spread over several sessions. ``sweep.csv`` and ``sweep.json`` are rewritten
after every pair from all results so far; the PNGs are drawn at the end.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcompile.artifacts import write_json, write_text
from qcompile.errors import QCompileError, first_line
from qcompile.pipeline import Pipeline
from qcompile.pipelines import qat_prepare_passes
from qcompile.quantization.latency import LatencyProfile
from qcompile.train.distributed import DistContext
from qcompile.train.plots import plot_sweep
from qcompile.train.run import RunSpec, Splits, train_and_lower, training_settings
from qcompile.train.trainer import TrainConfig

COLUMNS = ("width", "recipe", "params", "macs", "linear_cost", "quadratic_cost", "memory_cost", "latency_cost", "top1",
           "float_top1", "int_top1", "train_loss", "eval_loss", "generalization_gap", "train_top1", "epochs",
           "train_images", "eval_images", "train_seconds", "processes", "reference_top1", "reference_agreement",
           "reference_images")


@dataclass(frozen=True)
class Pair:
    width: float
    recipe: str

    @property
    def key(self) -> str:
        return f"w{self.width:g}-{self.recipe}"


def run_dir(out: Path, pair: Pair) -> Path:
    return out / "runs" / pair.key


def finished(out: Path, pair: Pair, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The pair's result if a previous run finished it with the same settings (a different one is an error:
    mixing them in one table would compare unlike runs)."""
    f = run_dir(out, pair) / "result.json"
    if not f.exists():
        return None
    try:
        row = json.loads(f.read_text())
    except (OSError, ValueError) as exc:  # edited or damaged: the pair is trained (or resumed) again
        warnings.warn(f"cannot read {f} ({first_line(exc)}); training the pair again", stacklevel=2)
        return None
    missing = [k for k in expected if k not in row] if isinstance(row, dict) else list(expected)
    if missing:
        warnings.warn(f"{f} is not a finished pair's result (it lacks {', '.join(missing)}); training the pair "
                      "again", stacklevel=2)
        return None
    differs = [f"{k} {row.get(k)} (now {v})" for k, v in expected.items() if row.get(k) != v]
    if differs:
        raise QCompileError.with_parameters(f"{f} was trained with other settings: {', '.join(differs)}; "
                                            "use another {out}")
    return row


def expected_settings(cfg: TrainConfig, train_images: int, eval_images: int) -> dict[str, Any]:
    """What a finished pair's row must record to be reused under ``cfg`` on splits of these sizes."""
    return {**training_settings(cfg), "train_images": train_images, "eval_images": eval_images}


def predicted_latency(spec: RunSpec, profile: LatencyProfile) -> int:
    """A pair's latency in nanoseconds as the profile predicts it (capture, width, precision: no training)."""
    torch.manual_seed(0)
    ctx = Pipeline(qat_prepare_passes(spec.width, profile)).run(
        spec.model, spec.example_inputs, leaf_modules=spec.leaf_modules, recipe=spec.recipe,
        overrides=spec.overrides, width=1.0 if spec.width is None else spec.width).context
    assert ctx.cost is not None and ctx.cost.latency_ns is not None
    return ctx.cost.latency_ns


def add_latency(rows: Sequence[dict[str, Any]], make_spec: Callable[[Pair], RunSpec],
                profile: LatencyProfile) -> None:
    """Each row's ``latency_cost``: its predicted latency relative to the float model at width 1, as the other
    costs are relative to bf16 at width 1 (the measured cost model's x-axis)."""
    reference = predicted_latency(make_spec(Pair(1.0, "bf16")), profile)
    for row in rows:
        row["latency_cost"] = predicted_latency(make_spec(Pair(row["width"], row["recipe"])), profile) / reference


def run_sweep(pairs: Sequence[Pair], make_spec: Callable[[Pair], RunSpec], splits: Splits, cfg: TrainConfig,
              out: Path, dist: DistContext = DistContext(), verify_size: int = 200, title: str = "",
              on_pair: Callable[[Pair, dict[str, Any], bool], None] | None = None,
              profile: LatencyProfile | None = None) -> list[dict[str, Any]]:
    """Train the pairs not yet finished under ``out``, in order; returns every pair's row (with a latency
    ``profile``, each row's predicted latency too, and a plot against it)."""
    rows = []
    expected = expected_settings(cfg, len(splits.train), len(splits.eval))
    for pair in pairs:
        row = finished(out, pair, expected)
        reused = row is not None
        if row is None:
            row = train_and_lower(make_spec(pair), splits, cfg, dist, run_dir(out, pair), verify_size)
        if dist.is_main:
            assert row is not None
            rows.append(row)
            write_tables(rows, out)
            if on_pair is not None:
                on_pair(pair, row, reused)
    if dist.is_main:
        if profile is not None:
            add_latency(rows, make_spec, profile)
            write_tables(rows, out)
        plot_sweep(rows, out, title)
    return rows


def write_tables(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """``sweep.csv`` and ``sweep.json``: one row per pair; empty / null where a value does not apply."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    write_text(out / "sweep.csv", buf.getvalue())
    write_json(out / "sweep.json", {"columns": list(COLUMNS), "rows": [{k: r.get(k) for k in COLUMNS} for r in rows]})
