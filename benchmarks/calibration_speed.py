"""Calibration at the speed of a forward pass (issue 18): a whole ``qcompile`` run against the plain float
forward over the same calibration images, measured in one run.

    python benchmarks/calibration_speed.py [--model examples/resnet50.py] [--recipe mostly4bit]
                                           [--calibrators ema_max,percentile] [--data ARCHIVE]
                                           [--calib-size 512] [--batch-size 256] [--verify-size 16]
                                           [--eval-size 16] [--out DIR]

Each measurement is a child process waited for with ``os.wait4``, so its CPU time and peak RSS are its own:
first the float forward of the model file's ``build_model()`` over the ``--calib-size`` images the CLI calibrates
on (same draw, normalisation, batch size and torch threads, under ``torch.no_grad``), then for each calibrator
``qcompile MODEL --recipe R --calibrator C --data ARCHIVE --calib-size N --batch-size B --verify-size V
--eval-size E --backend onnx --measure 0 --quiet``. The data cache is filled before anything is timed (a cold
cache decodes the archive once: about 10 s for CIFAR-10). Printed: wall and CPU seconds, peak RSS, the calibrate
pass's seconds from the run's report, and the ratios the issue sets limits on: whole run / float forward (1.5),
peak RSS (2.5 GB), percentile / ema_max (1.2). Wall time on a shared machine swings with other load; the CPU
seconds (user + system) are printed beside it for that reason. These are figures, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
WALL_LIMIT, RSS_LIMIT_GB, PERCENTILE_LIMIT = 1.5, 2.5, 1.2


def run_measured(argv: list[str], logs: Path) -> dict[str, Any]:
    """Run ``argv`` from the repository root: wall and CPU (user + system) seconds, peak RSS in GB, exit status
    and output of that child alone."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    with out.open("w") as fo, err.open("w") as fe:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_gb": usage.ru_maxrss / 2**20,
            "rc": proc.returncode, "stdout": out.read_text(), "stderr": err.read_text()}


def calibration_images(args: argparse.Namespace) -> tuple[list[Any], tuple[int, int]]:
    """The normalised calibration batches the CLI builds from ``--data`` (same draw, size and statistics)."""
    from qcompile.data import default_normalization, iterate_batches, load_split
    from qcompile.frontend.model_file import load_model_file

    example = load_model_file(args.model).example_input()[0]
    size = (example.shape[2], example.shape[3])
    train = load_split(args.data, "train", size).subset(args.calib_size, seed=0)
    test = load_split(args.data, "test", size).subset(args.eval_size)
    stats = default_normalization(train, test)
    return [x for x, _ in iterate_batches(train, args.batch_size, stats=stats)], size


def float_forward(args: argparse.Namespace) -> None:
    """The child of the float measurement: prints one JSON line with the forward loop's seconds."""
    import torch

    from qcompile.frontend.model_file import load_model_file

    batches, _ = calibration_images(args)
    model = load_model_file(args.model).build().eval()
    with torch.no_grad():
        start, cpu = time.perf_counter(), time.process_time()
        for x in batches:
            model(x)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"forward_wall": wall, "forward_cpu": cpu, "images": sum(len(x) for x in batches),
                      "threads": torch.get_num_threads()}))


def qcompile_argv(args: argparse.Namespace, calibrator: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "qcompile", str(args.model), "--recipe", args.recipe, "--calibrator", calibrator,
            "--data", str(args.data), "--calib-size", str(args.calib_size), "--batch-size", str(args.batch_size),
            "--verify-size", str(args.verify_size), "--eval-size", str(args.eval_size), "--backend", "onnx",
            "--measure", "0", "--quiet", "--out", str(out)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "resnet50.py")
    ap.add_argument("--recipe", default="mostly4bit")
    ap.add_argument("--calibrators", default="ema_max,percentile")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--verify-size", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=16)
    ap.add_argument("--out", type=Path, help="run folders (default: a temporary folder, removed)")
    ap.add_argument("--float-forward", action="store_true", help=argparse.SUPPRESS)  # the float child
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.float_forward:
        float_forward(args)
        return 0
    if not args.data.exists():
        print(f"no data at {args.data} (pass --data)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    _, size = calibration_images(args)  # fills the decode cache, so no child decodes the archive
    print(f"data cache ready in {time.perf_counter() - start:.1f} s; {args.calib_size} calibration images at "
          f"{size[0]}x{size[1]}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        forward = run_measured([sys.executable, __file__, "--float-forward", *(argv or sys.argv[1:])],
                               base / "float")
        if forward["rc"] != 0:
            print(forward["stderr"], file=sys.stderr)
            return 1
        f = json.loads(forward["stdout"].strip().splitlines()[-1])
        print(f"\nfloat forward, {f['images']} images, {f['threads']} torch threads: {f['forward_wall']:.1f} s wall, "
              f"{f['forward_cpu']:.1f} s CPU (child process: {forward['wall']:.1f} s wall, peak RSS "
              f"{forward['rss_gb']:.2f} GB)\n")
        print("| calibrator | wall s | x float wall | CPU s | x float CPU | calibrate pass s | peak RSS GB |")
        print("|---|---|---|---|---|---|---|")
        runs = {}
        for cal in args.calibrators.split(","):
            run = run_measured(qcompile_argv(args, cal, base / cal), base / f"{cal}-logs")
            if run["rc"] != 0:
                print(f"| {cal} | failed: {run['stderr'].strip().splitlines()[-1:]} |")
                continue
            report = json.loads((base / cal / "report.json").read_text())
            run["calibrate"] = next(p["seconds"] for p in report["passes"] if p["name"] == "calibrate")
            runs[cal] = run
            print(f"| {cal} | {run['wall']:.1f} | {run['wall'] / f['forward_wall']:.2f} | {run['cpu']:.1f} | "
                  f"{run['cpu'] / f['forward_cpu']:.2f} | {run['calibrate']:.1f} | {run['rss_gb']:.2f} |")
    print(f"\nlimits: whole run <= {WALL_LIMIT}x the float forward's wall time, peak RSS <= {RSS_LIMIT_GB} GB")
    if {"ema_max", "percentile"} <= runs.keys():
        p, e = runs["percentile"], runs["ema_max"]
        print(f"percentile / ema_max: wall {p['wall'] / e['wall']:.2f}, CPU {p['cpu'] / e['cpu']:.2f}, calibrate pass "
              f"{p['calibrate'] / e['calibrate']:.2f} (limit {PERCENTILE_LIMIT})")
    return 0 if len(runs) == len(args.calibrators.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
