"""TVM CPU artifact vs the onnxruntime int8 artifact vs float onnxruntime: ResNet-18 224x224, batch 1 and 8,
2 threads, medians, all measured in one run.

    python benchmarks/tvm_cpu.py [--recipe int8] [--target cpu] [--repeat 5] [--work DIR]

Prints build times, median latency per batch and the ratios (TVM / onnxruntime int8, TVM / float).
The TVM artifact uses the untuned default LLVM schedules (no MetaSchedule records).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")  # read when tvm is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import float_onnx, lowered, median_ms  # noqa: E402
from qcompile.backends import onnx as qonnx  # noqa: E402
from qcompile.backends.tvm import runtime  # noqa: E402
from qcompile.backends.tvm.build import build  # noqa: E402

from qcompile.models import resnet18  # noqa: E402

THREADS = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="int8")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", help="folder for the artifacts (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="tvm_cpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    model = resnet18().eval()
    ir = lowered(model, args.recipe)
    int8_sess = qonnx.session(qonnx.to_onnx(ir, "serving"), threads=THREADS, spin_between_runs=False)
    float_sess = qonnx.session(str(float_onnx(model, 224, work / "float.onnx")), threads=THREADS,
                               spin_between_runs=False)
    print(f"ResNet-18 224x224 {args.recipe}, {THREADS} threads, target {args.target}, median of {args.repeat}")
    print(f"{'batch':>5} {'TVM ms':>10} {'ORT int8 ms':>12} {'ORT float ms':>13} {'TVM/ORT int8':>13} {'TVM/float':>10}"
          f" {'build s':>8}")
    for batch in (int(b) for b in args.batches.split(",")):
        start = time.perf_counter()
        art = build(ir, args.target, work / f"b{batch}", batch=batch)
        build_s = time.perf_counter() - start
        tvm_model = runtime.load(art.path)
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        t_tvm = median_ms(lambda: tvm_model.run_batch(x), args.repeat)
        t_int8 = median_ms(lambda: qonnx.run(int8_sess, [x]), args.repeat)
        t_float = median_ms(lambda: qonnx.run(float_sess, [x]), args.repeat)
        print(f"{batch:>5} {t_tvm:>10.1f} {t_int8:>12.2f} {t_float:>13.2f} {t_tvm / t_int8:>13.1f} "
              f"{t_tvm / t_float:>10.1f} {build_s:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
