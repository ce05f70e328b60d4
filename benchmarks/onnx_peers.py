"""qcompile's ONNX artifacts against the tool a user would pick instead: onnxruntime's own ``quantize_static``.

For each model the same float weights are exported three ways and timed side by side in one process:

- ``float``       — ``torch.onnx.export`` of the float model, run by onnxruntime;
- ``ort_u8s8``    — that file quantized by ``onnxruntime.quantization.quantize_static`` (QDQ, uint8 activations,
  int8 per-channel weights, MinMax calibration): the peer;
- ``qc_int8`` / ``qc_mostly4bit`` — qcompile's ``serving`` artifacts of the two recipes
  (``qc_mostly4bit_compact`` is listed for its size and top-1: it runs the same kernels as the serving file).

Latencies are medians over interleaved rounds (every artifact runs in each round, enough times to last about
20 ms, so machine noise hits all of them alike; ratios are medians of the per-round ratios), onnxruntime with 2 intra-op threads that do not spin between runs (spinning threads of the
sessions not being timed would otherwise take the cores from the one that is: that inflated every latency
here by up to 1.7x before). On the CIFAR ResNet-20 checkpoint the script also measures
the top-1 of every artifact. With ``--breakdown`` it also profiles each quantized artifact at the largest batch
and prints the kernel time per operator type (onnxruntime's own profiler), which shows where one artifact spends
the time another does not. Print-only: nothing here is a test.

    python benchmarks/onnx_peers.py                       # ResNet-18/50 224x224 (batch 1, 8) and ResNet-20
    python benchmarks/onnx_peers.py --models resnet20 --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/onnx_peers.py --models resnet50 --breakdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import float_onnx, lowered  # noqa: E402
from qcompile.backends import onnx as qonnx  # noqa: E402
from qcompile.backends.onnx_measure import interleaved_latency  # noqa: E402

from qcompile.data import iterate_batches, load_split  # noqa: E402
from qcompile.reporting.measured import median_ratio, median_ratio_interval  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THREADS = 2


@dataclass
class Case:
    """One model: how to build it, its input size, calibration batches and (optionally) labelled test data."""

    name: str
    build: Callable[[], torch.nn.Module]
    size: int
    batches: tuple[int, ...]
    calib: list[torch.Tensor] = field(default_factory=list)
    test: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def settle_bn(model: torch.nn.Module, size: int, seed: int = 0) -> torch.nn.Module:
    """Give a randomly initialised model realistic BatchNorm statistics (so activations neither vanish nor
    explode through 50 layers) by running random images through it in train mode with cumulative averaging."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, size, size, generator=gen))
    return model.eval()


def imagenet_case(name: str) -> Case:
    from qcompile.models import resnet18, resnet50

    ctor = {"resnet18": resnet18, "resnet50": resnet50}[name]
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
    return Case(name, lambda: settle_bn(ctor(), 224), 224, (1, 8), calib)


def cifar_case(data: str | None, eval_size: int | None) -> Case:
    from qcompile.frontend.model_file import load_weights
    from qcompile.models import resnet20_cifar

    source = data or str(REPO / "examples" / "data" / "cifar10-sample.tar.gz")

    def build() -> torch.nn.Module:
        model = resnet20_cifar()
        load_weights(model, REPO / "examples" / "weights" / "resnet20_cifar.pt")
        return model.eval()

    train = load_split(source, "train").subset(512)
    test = load_split(source, "test").subset(eval_size)
    calib = [x for x, _ in iterate_batches(train, 128)]
    labelled = [(x.numpy(), y.numpy()) for x, y in iterate_batches(test, 500)]
    return Case("resnet20", build, 32, (1, 8), calib, labelled)


def ort_quantize(float_path: Path, calib: list[torch.Tensor], out: Path) -> None:
    """onnxruntime's documented static-quantization flow: pre-process, then QDQ u8s8 per-channel."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    prepped = out.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(prepped))
    quantize_static(str(prepped), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepped.unlink()


def qcompile_artifacts(model: torch.nn.Module, case: Case, recipe: str, workdir: Path) -> dict[str, Path]:
    ir = lowered(model, recipe, case.size, calib=case.calib)
    paths = {}
    for flavour, suffix in (("serving", ""), ("compact", "_compact")):
        path = workdir / f"qc_{recipe}{suffix}.onnx"
        qonnx.save(qonnx.to_onnx(ir, flavour), path)
        paths[f"qc_{recipe}{suffix}"] = path
    return paths


def op_breakdowns(paths: dict[str, Path], x: np.ndarray, runs: int, warmup: int = 3,
                  ) -> dict[str, dict[str, tuple[int, float]]]:
    """Per artifact and operator type of onnxruntime's optimized graph: (nodes, kernel ms per run), from its
    profiler over ``runs`` interleaved runs after ``warmup``."""
    sessions = {key: qonnx.session(str(path), threads=THREADS, spin_between_runs=False,
                                   profile_prefix=str(path.with_suffix(""))) for key, path in paths.items()}
    for _ in range(warmup + runs):
        for sess in sessions.values():
            qonnx.run(sess, [x])
    tables = {}
    for key, sess in sessions.items():
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        start = [e for e in events if e.get("name") == "model_run"][warmup]["ts"]
        micros: dict[str, float] = defaultdict(float)
        calls: Counter[str] = Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                micros[e["args"]["op_name"]] += e["dur"]
                calls[e["args"]["op_name"]] += 1
        tables[key] = {op: (calls[op] // runs, micros[op] / runs / 1e3) for op in sorted(micros)}
    return tables


def print_breakdown(tables: dict[str, dict[str, tuple[int, float]]], batch: int) -> None:
    def cell(table: dict[str, tuple[int, float]], op: str) -> str:
        nodes, ms = table.get(op, (0, 0.0))
        return f"{nodes:>10} {ms:>10.2f} ms"

    ops = sorted({op for t in tables.values() for op in t}, key=lambda op: -max(t.get(op, (0, 0.0))[1]
                                                                                for t in tables.values()))
    print(f"kernel time per operator type at batch {batch} (nodes, ms per run):")
    print(f"  {'operator':<26}" + "".join(f"{k:>24}" for k in tables))
    for op in ops:
        print(f"  {op:<26}" + "".join(cell(t, op) for t in tables.values()))
    print(f"  {'total':<26}"
          + "".join(f"{'':>10} {sum(v for _, v in t.values()):>10.2f} ms" for t in tables.values()))


def accuracy(sess: object, test: list[tuple[np.ndarray, np.ndarray]]) -> float:
    correct = total = 0
    for x, y in test:
        correct += int((qonnx.run(sess, [x])[0].argmax(1) == y).sum())
        total += len(y)
    return correct / total


def run_case(case: Case, rounds: int, workdir: Path, breakdown: bool = False) -> dict[str, object]:
    print(f"\n== {case.name} ({case.size}x{case.size}) ==", flush=True)
    model = case.build()
    paths = {"float": workdir / f"{case.name}_float.onnx", "ort_u8s8": workdir / f"{case.name}_ort_u8s8.onnx"}
    float_onnx(model, case.size, paths["float"])
    ort_quantize(paths["float"], case.calib, paths["ort_u8s8"])
    for recipe in ("int8", "mostly4bit"):
        paths.update(qcompile_artifacts(model, case, recipe, workdir))
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    timed = [k for k in paths if not k.endswith("_compact")]
    result: dict[str, object] = {"sizes_bytes": sizes, "latency_ms": {}}
    result["ratio_vs_peer"], result["ratio_interval_vs_peer"] = {}, {}
    for batch in case.batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, case.size, case.size), dtype=np.float32)
        samples = interleaved_latency({k: str(paths[k]) for k in timed}, x, rounds, THREADS)
        result["latency_ms"][batch] = {k: statistics.median(v) for k, v in samples.items()}
        result["ratio_vs_peer"][batch] = {k: median_ratio(v, samples["ort_u8s8"]) for k, v in samples.items()}
        result["ratio_interval_vs_peer"][batch] = {k: median_ratio_interval(v, samples["ort_u8s8"])
                                                   for k, v in samples.items()}
    if breakdown:
        batch = max(case.batches)
        x = np.random.default_rng(0).standard_normal((batch, 3, case.size, case.size), dtype=np.float32)
        tables = op_breakdowns({k: paths[k] for k in ("ort_u8s8", "qc_int8", "qc_mostly4bit")}, x, rounds)
        result["breakdown"] = {"batch": batch, "ops": tables}
    if case.test:
        sessions = {k: qonnx.session(str(paths[k]), threads=THREADS) for k in [*timed, "qc_mostly4bit_compact"]}
        result["top1"] = {k: accuracy(s, case.test) for k, s in sessions.items()}
        result["top1_images"] = sum(len(y) for _, y in case.test)
    report(case, result)
    return result


def report(case: Case, result: dict[str, object]) -> None:
    sizes = result["sizes_bytes"]
    print(f"{'artifact':<24}{'size MB':>10}{'vs float':>10}")
    for k, v in sizes.items():
        print(f"{k:<24}{v / 1e6:>10.2f}{v / sizes['float']:>10.3f}")
    for batch, lat in result["latency_ms"].items():
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in lat.items()))
        r, ci = result["ratio_vs_peer"][batch], result["ratio_interval_vs_peer"][batch]
        ratios = ", ".join(f"{k} {r[k]:.3f}x [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
                           for k in ("qc_int8", "qc_mostly4bit", "float"))
        print(f"  vs ort_u8s8 (median of per-round ratios [95% interval]): {ratios}; qc_mostly4bit / qc_int8 "
              f"{lat['qc_mostly4bit'] / lat['qc_int8']:.3f}")
    if "breakdown" in result:
        print_breakdown(result["breakdown"]["ops"], result["breakdown"]["batch"])
    if "top1" in result:
        print(f"top-1 on {result['top1_images']} test images: "
              + ", ".join(f"{k} {v * 100:.2f}%" for k, v in result["top1"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50,resnet20")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median over them)")
    ap.add_argument("--data", help="CIFAR-10 archive for ResNet-20's calibration and top-1 (default: the sample)")
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--breakdown", action="store_true", help="also print kernel time per operator type")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            case = cifar_case(args.data, args.eval_size) if name == "resnet20" else imagenet_case(name)
            results[name] = run_case(case, args.rounds, Path(tmp), args.breakdown)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
