"""A TVM artifact against the reference interpreter on a whole data split (the acceptance check).

    python benchmarks/tvm_agreement.py OUT/ir OUT/tvm/cpu --data cifar10-jpeg.tar.gz [--split test] [--limit N]

A CUDA artifact (``OUT/tvm/sm90``) runs on the machine's GPU. Prints the ``tvm_<target>_vs_reference`` figures
(top-1 agreement, identical final integers, max LSB difference), the reference's and TVM's top-1 accuracy, and
the time each took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from qcompile.backends.tvm import runtime

from qcompile.data import iterate_batches, load_split
from qcompile.ir import reference
from qcompile.ir.agreement import compare_backend
from qcompile.ir.serialize import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ir")
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args()
    ir = load(args.ir)
    model = runtime.load(args.artifact)
    data = load_split(args.data, args.split).subset(args.limit)
    pairs, labels, t_ref = [], [], 0.0
    for x, y in iterate_batches(data, args.batch_size):
        x = x.numpy()
        start = time.perf_counter()
        pairs.append((x, reference.run(ir, x)[ir.outputs[0]]))
        t_ref += time.perf_counter() - start
        labels.append(y.numpy())
    start = time.perf_counter()
    outs: list[np.ndarray] = []
    result = compare_backend(ir, lambda x: outs.append(model(x)[0]) or outs[-1], pairs)
    t_tvm = time.perf_counter() - start
    y = np.concatenate(labels)
    ref_top1 = float((np.concatenate([r for _, r in pairs]).argmax(1) == y).mean())
    tvm_top1 = float((np.concatenate(outs).argmax(1) == y).mean())
    print({f"tvm_{model.meta['target']}_vs_reference": result, "reference_top1": ref_top1, "tvm_top1": tvm_top1,
           "reference_s": round(t_ref, 1), "tvm_s": round(t_tvm, 1)})


if __name__ == "__main__":
    main()
