"""ResNet-50 224x224 on an NVIDIA GPU: TVM int8 and mostly4bit artifacts vs PyTorch bf16 eager and
``torch.compile`` bf16 (channels_last; ``max-autotune`` at batch 256, CUDA graphs at batch 1), batch 256 and batch 1,
in one run.

Three steps, because the GPU machine has neither TVM's compiler nor nvcc nor network, and a call carries at most
64 MiB:

1. here (the build machine, no GPU needed)::

       python benchmarks/tvm_gpu.py build --out bench-gpu --target sm90 --data ../shared/data/cifar10-jpeg.tar.gz

   builds ``bench-gpu/<recipe>/b<batch>/tvm/sm90/`` for batch 256 and batch 1 (a fixed batch: with a symbolic
   one, dlight's int8 tensor-core rule failed on most ResNet-50 convs; the batch-1 build replays its kernels as a
   CUDA graph) and ``check.npz``: 1,000 CIFAR-10 test images (upsampled 7x, nearest, so that the GPU machine
   rebuilds the 224x224 inputs exactly from 3 MB) with the reference interpreter's logits for them. The batches of
   one recipe share one ``params.npz`` (hard links), so it travels once.
2. ``python benchmarks/tvm_gpu.py pack --out bench-gpu --bundle .gpu/tvm-gpu.tar.gz --wheel FFI.whl``: one
   tar.gz of the artifacts, a runtime-only copy of the installed ``tvm`` package (no ``libtvm_compiler.so``, no
   ``3rdparty/``), the ``apache-tvm-ffi`` wheel for the GPU machine's Python and, with ``--tuning``, the
   candidates of ``benchmarks/tvm_tune.py``, with ``--profile-stage``, a ``qcompile profile --stage`` folder
   (``--no-bench`` leaves the artifacts out); refused above 64 MiB.
3. on the GPU machine: ``bash benchmarks/tvm_gpu_session.sh "$OUT" .gpu/tvm-gpu.tar.gz --profile`` unpacks it,
   times the tuning candidates and measures the staged latency profile if the bundle has them, and runs
   ``tvm_gpu.py run`` if it has the benchmark: each artifact's agreement
   with the reference on all check images (top-1, identical final integers, largest difference in LSB), img/s
   and ms per batch for every contender (medians), the ratios to ``torch.compile`` bf16, the TVM VM's
   per-kernel profile at the largest batch (which kernels use tensor cores), all of it also in ``--json``.

``--model resnet20`` with ``--target cpu --batches 2,1 --check-images 16`` is the CPU rehearsal that
tests/benchmarks/test_tvm_gpu.py runs through all three steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES = ("int8", "mostly4bit")
BATCHES = (256, 1)
CHECK_IMAGES, SEED, CHUNK = 1000, 0, 32
SOURCE_SIZE = 32  # check images are CIFAR-10's, upsampled by an integer factor
CARRY_BYTES = 64 << 20
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TENSOR_CORE = re.compile(r"wmma::mma_sync|mma\.sync")


def model_for(name: str):  # noqa: ANN201 - a torch module; torch is imported lazily
    """The benchmark's model with seeded random weights (speed does not depend on them)."""
    import torch

    from qcompile.models import resnet20_cifar, resnet50

    torch.manual_seed(SEED)
    return resnet50() if name == "resnet50" else resnet20_cifar()


def lowered_ir(name: str, recipe: str):  # noqa: ANN201 - an IRGraph
    """The model's integer IR for a recipe, the same on every call."""
    from _common import lowered

    return lowered(model_for(name), recipe, size=image_size(name))


def image_size(model: str) -> int:
    return 224 if model == "resnet50" else 32


def check_pixels(n: int, data: str | None) -> np.ndarray:
    """``n`` CIFAR-10 test images (N, 3, 32, 32) uint8, a fixed class-mixed subset; seeded noise without data."""
    if data is None:
        return np.random.default_rng(SEED).integers(0, 256, (n, 3, SOURCE_SIZE, SOURCE_SIZE), dtype=np.uint8)
    from qcompile.data import load_split

    images = np.asarray(load_split(data, "test").subset(n, SEED).images)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def check_inputs(pixels: np.ndarray, size: int) -> np.ndarray:
    """The float32 NCHW inputs: nearest upsampling by ``size // 32`` and ImageNet normalization, the same bits on
    any machine."""
    k = size // SOURCE_SIZE
    x = pixels.repeat(k, axis=2).repeat(k, axis=3).astype(np.float32) / np.float32(255)
    mean = np.asarray(MEAN, np.float32)[:, None, None]
    std = np.asarray(STD, np.float32)[:, None, None]
    return (x - mean) / std


def _share_params(folders: list[Path]) -> None:
    """Hard-link byte-identical ``params.npz`` files of one recipe's batches to the first, so they travel once."""
    first = folders[0] / "params.npz"
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    for folder in folders[1:]:
        other = folder / "params.npz"
        if hashlib.sha256(other.read_bytes()).hexdigest() == digest:
            other.unlink()
            os.link(first, other)


def build_step(args: argparse.Namespace) -> None:
    from qcompile.backends.tvm.build import build

    from qcompile.ir import reference
    from qcompile.ir.agreement import final_scale

    out = Path(args.out)
    size = image_size(args.model)
    pixels = check_pixels(args.check_images, args.data)
    x = check_inputs(pixels, size)
    check: dict[str, np.ndarray] = {"pixels": pixels}
    for recipe in args.recipes:
        ir = lowered_ir(args.model, recipe)
        folders = []
        for batch in args.batches:
            art = build(ir, args.target, out / recipe / f"b{batch}", batch=batch)
            folders.append(art.path)
            print(f"{recipe}: built {art.path} in {art.seconds:.0f} s", flush=True)
        _share_params(folders)
        check[f"logits_{recipe}"] = np.concatenate(
            [reference.run(ir, x[i:i + CHUNK])[ir.outputs[0]] for i in range(0, len(x), CHUNK)])
        check[f"scale_{recipe}"] = final_scale(ir)
        print(f"{recipe}: reference logits for {len(x)} images", flush=True)
    np.savez(out / "check.npz", **check)
    (out / "build.json").write_text(json.dumps({"model": args.model, "target": args.target,
                                                "recipes": args.recipes, "batches": args.batches}))


def _runtime_files() -> list[tuple[Path, str]]:
    """The installed ``tvm`` package without its compiler: (file, name in the bundle)."""
    import importlib.util

    root = Path(importlib.util.find_spec("tvm").origin).parent
    skip = ("3rdparty", "__pycache__")
    return [(f, f"tvm-runtime/tvm/{f.relative_to(root)}") for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != "libtvm_compiler.so" and not set(skip) & set(f.relative_to(root).parts)]


def pack_step(args: argparse.Namespace) -> None:
    """The parts given (the benchmark unless ``--no-bench``, tuning candidates, a staged latency profile) with
    the runtime-only TVM and the wheels, as one file a device call carries."""
    bundle = Path(args.bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    parts = {"bench": None if args.no_bench else args.out, "tuning": args.tuning, "profile": args.profile_stage}
    with tarfile.open(bundle, "w:gz") as tar:
        for arcname, folder in parts.items():
            if folder:
                tar.add(folder, arcname=arcname)  # hard links stay links: shared params.npz are stored once
        for path, name in _runtime_files():
            tar.add(path, arcname=name)
        for wheel in args.wheel:
            tar.add(wheel, arcname=Path(wheel).name)
    size = bundle.stat().st_size
    print(f"{bundle}: {size / 2**20:.1f} MiB")
    if size > CARRY_BYTES:
        bundle.unlink()
        sys.exit(f"the bundle is {size / 2**20:.1f} MiB, more than a device call carries (64 MiB): pack fewer "
                 "parts, recipes or batches")


def kernel_profile(model: object, x: np.ndarray, source: str | None) -> list[dict[str, object]]:
    """Per-kernel time of one call through the VM's instrument hook (device synchronised around each call), and
    whether the kernel's CUDA source uses tensor cores."""
    from qcompile.backends.tvm.measure import call_times, function_times

    bodies = _function_bodies(source) if source else {}
    times = function_times(call_times(model, x, runs=1))
    return [{"kernel": name, "ms": ms, "tensor_core": bool(TENSOR_CORE.search(bodies.get(name, "")))}
            for name, ms in sorted(times.items(), key=lambda kv: -kv[1])]


def _function_bodies(source: str) -> dict[str, str]:
    """Function name -> the CUDA of all its kernels (``<function>_kernel``, ``<function>_kernel_1``, ...)."""
    from qcompile.backends.tvm.cuda import kernel_bodies

    functions: dict[str, str] = {}
    for kernel, body in kernel_bodies(source).items():
        name = re.sub(r"_kernel(_\d+)?$", "", kernel)
        functions[name] = functions.get(name, "") + body
    return functions


def _print_profile(recipe: str, batch: int, rows: list[dict[str, object]]) -> None:
    total = sum(r["ms"] for r in rows)
    cores = sum(r["tensor_core"] for r in rows)
    print(f"TVM {recipe} batch {batch}: {total:.2f} ms in {len(rows)} kernels ({cores} on tensor cores); top 15:")
    for r in rows[:15]:
        print(f"  {r['ms']:8.3f} ms {r['ms'] / total:6.1%} {'TC' if r['tensor_core'] else '  '}  {r['kernel']}")


def _time_artifact(args: argparse.Namespace, setup: dict[str, object], recipe: str, batch: int,
                   check: dict[str, np.ndarray], report: dict[str, object]) -> float:
    """One artifact: its agreement with the reference on every check image, its median ms, its kernel profile."""
    from _common import median_ms
    from qcompile.backends.tvm import runtime

    from qcompile.ir.agreement import compare_logits

    size = image_size(setup["model"])
    folder = Path(args.out) / recipe / f"b{batch}" / "tvm" / setup["target"]
    model = runtime.load(folder, device=args.device)
    x_check, ref = check_inputs(check["pixels"], size), check[f"logits_{recipe}"]
    pairs = [(x_check[i:i + batch * 4], ref[i:i + batch * 4]) for i in range(0, len(x_check), batch * 4)]
    agree = compare_logits(check[f"scale_{recipe}"], lambda b: model(b)[0], pairs)
    report["agreement"][f"{recipe}/b{batch}"] = agree
    print(f"TVM {recipe} (batch-{batch} artifact) vs the reference on {agree['images']} images: top-1 "
          f"{agree['top1_agreement']:.4f}, identical final integers {agree['identical_fraction']:.4f}, "
          f"max {agree['max_lsb_diff']} LSB", flush=True)
    x = model.to_device(np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32))
    ms = median_ms(lambda: model.run_device(x), args.repeat, 3, model.device.sync)
    if args.profile and batch == max(setup["batches"]):
        source = folder / "kernels.cu"
        prof = kernel_profile(model, np.zeros((batch, 3, size, size), np.float32),
                              source.read_text() if source.exists() else None)
        report["profile"][f"{recipe}/b{batch}"] = prof
        _print_profile(recipe, batch, prof)
    return ms


def _time_torch(args: argparse.Namespace, setup: dict[str, object],
                record: Callable[[str, int, float], None]) -> None:
    """PyTorch eager and ``torch.compile`` (not in the CPU rehearsal), bf16 channels-last on the GPU:
    ``--compile-mode`` (default ``max-autotune``) at large batches, ``reduce-overhead`` (CUDA graphs) at 8 and
    below."""
    import torch
    from _common import median_ms

    cuda, size = args.device == "cuda", image_size(setup["model"])
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    net = model_for(setup["model"]).to(dev).eval().to(memory_format=torch.channels_last, dtype=dtype)
    with torch.inference_mode():
        for batch in setup["batches"]:
            x = torch.randn(batch, 3, size, size, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
            record(f"torch {dtype} eager".replace("torch.", ""), batch, median_ms(lambda: net(x), args.repeat, 3, sync))
            if cuda:
                compiled = torch.compile(net, mode="reduce-overhead" if batch <= 8 else args.compile_mode)
                record("torch.compile bf16", batch, median_ms(lambda: compiled(x), args.repeat, 10, sync))


def _rows(rows: list[tuple[str, int, float]]) -> list[dict[str, object]]:
    """The figures with img/s and the ratio to ``torch.compile`` at the same batch, where that was measured."""
    peer = {b: ms for name, b, ms in rows if name == "torch.compile bf16"}
    return [{"contender": name, "batch": batch, "ms": ms, "images_per_second": batch / ms * 1e3,
             "vs_torch_compile": peer[batch] / ms if batch in peer else None} for name, batch, ms in rows]


def run_step(args: argparse.Namespace) -> None:
    """Every artifact and contender; one that fails is reported and the rest still run, and the JSON is rewritten
    after each figure, so that a call cut short keeps what was measured (a GPU call is scarce)."""
    import torch

    out = Path(args.out)
    setup = json.loads((out / "build.json").read_text())
    check = dict(np.load(out / "check.npz"))
    report: dict[str, object] = {"model": setup["model"], "target": setup["target"], "repeat": args.repeat,
                                 "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                 "compile_mode": args.compile_mode, "agreement": {}, "profile": {}, "rows": [],
                                 "errors": {}}
    rows: list[tuple[str, int, float]] = []

    def record(name: str, batch: int, ms: float) -> None:
        rows.append((name, batch, ms))
        report["rows"] = _rows(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    for recipe in setup["recipes"]:
        for batch in setup["batches"]:
            try:
                record(f"TVM {recipe}", batch, _time_artifact(args, setup, recipe, batch, check, report))
            except Exception as exc:  # noqa: BLE001 - reported, and the other artifacts still measured
                report["errors"][f"TVM {recipe}/b{batch}"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"TVM {recipe} batch {batch} FAILED: {type(exc).__name__}: {exc}", flush=True)
    try:
        _time_torch(args, setup, record)
    except Exception as exc:  # noqa: BLE001 - as above
        report["errors"]["torch"] = f"{type(exc).__name__}: {exc}"[:500]
        print(f"torch FAILED: {type(exc).__name__}: {exc}", flush=True)
    size = image_size(setup["model"])
    print(f"{setup['model']} {size}x{size} on {report['device']}, target {setup['target']}, median of {args.repeat}")
    print(f"{'contender':<22}{'batch':>6}{'ms':>10}{'img/s':>10}{'vs torch.compile':>18}")
    for row in _rows(rows):
        ratio = row["vs_torch_compile"]
        print(f"{row['contender']:<22}{row['batch']:>6}{row['ms']:>10.3f}{row['images_per_second']:>10.0f}"
              + (f"{ratio:>17.2f}x" if ratio is not None else f"{'-':>18}"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that say which artifacts (model, target, recipes, fixed batches), shared with tvm_tune.py."""
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "resnet20"],
                    help="resnet20 (32x32): the CPU rehearsal")
    ap.add_argument("--target", default="sm90", choices=["sm80", "sm90", "cpu", "cpu-generic"])
    ap.add_argument("--recipes", default=",".join(RECIPES), type=lambda s: s.split(","), help="which artifacts")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), type=lambda s: [int(b) for b in s.split(",")],
                    help="fixed batch sizes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["build", "pack", "run"])
    ap.add_argument("--out", default="bench-gpu", help="the artifacts' folder")
    model_arguments(ap)
    ap.add_argument("--data", help="build: CIFAR-10 archive for the check images (seeded noise without it)")
    ap.add_argument("--check-images", type=int, default=CHECK_IMAGES)
    ap.add_argument("--bundle", default=".gpu/tvm-gpu.tar.gz", help="pack: the file a device call carries")
    ap.add_argument("--wheel", action="append", default=[], help="pack: a wheel to carry (apache-tvm-ffi)")
    ap.add_argument("--tuning", help="pack: a tvm_tune.py candidates folder to time there too")
    ap.add_argument("--profile-stage", help="pack: a qcompile profile --stage folder to measure there too")
    ap.add_argument("--no-bench", action="store_true", help="pack: leave the benchmark's artifacts out")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="run: cpu is the rehearsal")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--compile-mode", default="max-autotune",
                    help="run: torch.compile's mode above batch 8 (at 8 and below: reduce-overhead)")
    ap.add_argument("--profile", action="store_true", help="run: per-kernel TVM profile at the largest batch")
    ap.add_argument("--json", help="run: also write every figure here")
    args = ap.parse_args()
    {"build": build_step, "pack": pack_step, "run": run_step}[args.step](args)


if __name__ == "__main__":
    main()
