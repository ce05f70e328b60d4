"""Tune the int8 tensor-core tile sizes of ResNet-50's GEMM shapes for a CUDA target (see
``qcompile.backends.tvm.tuning``): candidates here, timing on the GPU machine (TVM runtime only), the table here.

1. here (no GPU)::

       python benchmarks/tvm_tune.py candidates --out tune-sm90 --target sm90

   every distinct int8 GEMM shape of the int8 and mostly4bit artifacts at batch 256 and 1 (47 shapes for
   ResNet-50, the same for both recipes), each with every tile configuration of the grid that compiles: the
   trial budget, printed; 3,810 kernels (2,002 ``wmma``, 1,808 pipelined ``mma``) in one module, 28 minutes
   here. ``tvm_gpu.py pack --tuning tune-sm90`` carries it to the GPU machine with the benchmark;
2. there, ``tvm_gpu_session.sh`` runs ``python benchmarks/tvm_tune.py measure --out DIR --json OUT/tuning.json``
   before the benchmark: each kernel timed with ``time_evaluator`` (median of 3 means of 5 calls; every shape's
   wmma candidates before any mma one), each shape's fastest checked against the default's output (``wrong``
   lists those that differ), the JSON rewritten after each shape, so that a crash or ``--budget-s`` keeps what
   was timed;
3. here::

       python benchmarks/tvm_tune.py commit --out tune-sm90 --measured OUT/tuning.json --device "NVIDIA H200"

   writes ``backends/tvm/tuning/sm90.json`` and prints per shape the default and the tuned time, and their sums
   over one forward pass per batch size (each shape times its number of calls). Builds apply the table from then
   on; rebuild the artifacts and time them again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tvm_gpu import lowered_ir, model_arguments  # noqa: E402


def candidates_step(args: argparse.Namespace) -> None:
    from qcompile.backends.tvm import tuning
    from qcompile.backends.tvm.relax_builder import to_relax
    from qcompile.backends.tvm.targets import get_target

    spec = get_target(args.target)
    groups = []
    for recipe in args.recipes:
        ir = lowered_ir(args.model, recipe)
        groups += [tuning.gemm_tasks(to_relax(ir, batch, pack_int4=not spec.is_cuda).mod, spec)
                   for batch in args.batches]
    tasks = tuning.merge_tasks(*groups)
    folder = tuning.build_candidates(tasks, spec, args.out)
    manifest = json.loads((folder / tuning.MANIFEST).read_text())
    print(f"{len(tasks)} GEMM shapes, {len(manifest['candidates'])} candidate kernels "
          f"(grid of {len(tuning.GRID)} configurations) in {folder}")


def measure_step(args: argparse.Namespace) -> None:
    from qcompile.backends.tvm import tuning

    measured = tuning.measure(args.out, device=args.device, out=args.json, budget_s=args.budget_s)
    print(f"timed {len(measured['ms'])} candidate kernels on {args.device}, {len(measured['failed'])} failed, "
          f"{len(measured['wrong'])} fast ones with another output than the default's"
          f"{'' if measured['complete'] else ' (not all: the budget ran out, or launches kept failing)'}")


def commit_step(args: argparse.Namespace) -> None:
    from qcompile.backends.tvm import tuning

    manifest = json.loads((Path(args.out) / tuning.MANIFEST).read_text())
    measured = json.loads(Path(args.measured).read_text())
    rows = tuning.fastest(manifest, measured)
    table = tuning.commit(manifest, measured, args.device, args.table)
    calls = manifest["calls"]
    total_default = total_tuned = 0.0
    print(f"{'GEMM shape':<58}{'calls':>7}{'default ms':>12}{'tuned ms':>10}{'speed-up':>10}  config")
    for key, row in sorted(rows.items()):
        n = calls.get(key, 0)
        total_default += n * (row["default_ms"] or 0.0)
        total_tuned += n * row["ms"]
        config = " ".join(f"{k}={v}" for k, v in (row["config"] or {}).items())
        speedup = row["default_ms"] / row["ms"] if row["default_ms"] else float("nan")
        print(f"{key[:57]:<58}{n:>7}{row['default_ms'] or float('nan'):>12.3f}{row['ms']:>10.3f}{speedup:>9.2f}x  "
              f"{config}")
    if total_tuned:
        print(f"one forward pass per batch size, GEMM kernels only: {total_default:.2f} ms default, "
              f"{total_tuned:.2f} ms tuned "
              f"({total_default / total_tuned:.2f}x); table: {len(table['shapes'])} shapes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["candidates", "measure", "commit"])
    ap.add_argument("--out", default="tune-sm90", help="the candidates' folder")
    model_arguments(ap)
    ap.add_argument("--device", default="cuda", help="measure: cuda or cpu (the rehearsal); commit: the GPU's name")
    ap.add_argument("--json", default="tuning.json", help="measure: where the times go (rewritten per shape)")
    ap.add_argument("--budget-s", type=float, help="measure: start no GEMM shape after this many seconds")
    ap.add_argument("--measured", help="commit: the measure step's JSON")
    ap.add_argument("--table", help="commit: the table to write (default backends/tvm/tuning/<target>.json)")
    args = ap.parse_args()
    {"candidates": candidates_step, "measure": measure_step, "commit": commit_step}[args.step](args)


if __name__ == "__main__":
    main()
