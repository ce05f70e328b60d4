"""ResNet-50 224x224 on an NVIDIA GPU: TVM int8 and mostly4bit artifacts vs PyTorch bf16 eager and
``torch.compile`` bf16 (channels_last; CUDA graphs at batch 1), batch 256 and batch 1, in one run.

Two steps, because the GPU machine has neither TVM's compiler nor nvcc nor network:

1. here (the build machine, no GPU needed)::

       python benchmarks/tvm_gpu.py build --out bench-gpu --target sm90

   builds ``bench-gpu/<recipe>/b<batch>/tvm/sm90/`` for batch 256 and batch 1 (a fixed batch: with a symbolic
   one, dlight's int8 tensor-core rule failed on most ResNet-50 convs: 9 of 62 int8 kernels on tensor cores,
   against 37 of 55 with batch 256) and ``check.npz``: the reference interpreter's logits on a few seeded random
   images, to check the artifacts' outputs on the GPU.
2. on the GPU machine, with a runtime-only copy of the ``tvm`` package (the installed one without
   ``lib/libtvm_compiler.so`` and ``3rdparty/``) and the matching ``apache-tvm-ffi`` wheel on ``PYTHONPATH``
   (see docs/backends.md, "TVM")::

       TVM_USE_RUNTIME_LIB=1 python benchmarks/tvm_gpu.py run --out bench-gpu --target sm90 [--profile]

   prints top-1 agreement with the reference, img/s and ms per batch for every contender, the ratios to
   ``torch.compile`` bf16, and with ``--profile`` the TVM VM's per-kernel time profile at batch 256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES = ("int8", "mostly4bit")
BATCHES = (256, 1)
CHECK_IMAGES, SEED = 8, 0


def check_images() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((CHECK_IMAGES, 3, 224, 224)).astype(np.float32)


def build_step(args: argparse.Namespace) -> None:
    from _common import lowered
    from qcompile.backends.tvm.build import build

    from qcompile.ir import reference
    from qcompile.models import resnet50

    out = Path(args.out)
    refs = {}
    for recipe in args.recipes:
        ir = lowered(resnet50(), recipe)
        for batch in args.batches:
            art = build(ir, args.target, out / recipe / f"b{batch}", batch=batch)
            print(f"{recipe}: built {art.path} in {art.seconds:.0f} s", flush=True)
        refs[recipe] = reference.run(ir, check_images())[ir.outputs[0]]
    np.savez(out / "check.npz", **refs)


def profile(model: object, recipe: str, batch: int = 256) -> None:
    """Per-kernel time of one batch through the VM's instrument hook (device synchronised around each call)."""
    from qcompile.backends.tvm.measure import call_times, function_times

    times = function_times(call_times(model, np.zeros((batch, 3, 224, 224), np.float32), runs=1))
    total = sum(times.values())
    print(f"TVM {recipe} batch {batch}: {total:.2f} ms in {len(times)} kernels; the top 15:")
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {ms:8.3f} ms {ms / total:6.1%}  {name}")


def run_step(args: argparse.Namespace) -> None:
    import torch
    from _common import median_ms
    from qcompile.backends.tvm import runtime

    from qcompile.models import resnet50

    out = Path(args.out)
    refs = np.load(out / "check.npz")
    sync = torch.cuda.synchronize
    rows: list[tuple[str, int, float]] = []
    for recipe in args.recipes:
        for batch in args.batches:
            model = runtime.load(out / recipe / f"b{batch}" / "tvm" / args.target, device="cuda")
            got = model(check_images())[0]
            agree = float((got.argmax(1) == refs[recipe].argmax(1)).mean())
            print(f"TVM {recipe} (batch-{batch} artifact): top-1 agreement with the reference {agree:.4f} on "
                  f"{CHECK_IMAGES} images", flush=True)
            x = model.to_device(np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32))
            rows.append((f"TVM {recipe}", batch, median_ms(lambda: model.run_device(x), args.repeat, 3,
                                                           model.device.sync)))
            if args.profile and batch == 256:
                profile(model, recipe)
    net = resnet50().cuda().eval().to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    with torch.inference_mode():
        for batch in args.batches:
            compiled = torch.compile(net, mode="reduce-overhead" if batch <= 8 else None)  # CUDA graphs when small
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(
                memory_format=torch.channels_last)
            rows.append(("torch bf16 eager", batch, median_ms(lambda: net(x), args.repeat, 3, sync)))
            rows.append(("torch.compile bf16", batch, median_ms(lambda: compiled(x), args.repeat, 10, sync)))
    peer = {b: ms for name, b, ms in rows if name == "torch.compile bf16"}
    print(f"ResNet-50 224x224 on {torch.cuda.get_device_name()}, target {args.target}, median of {args.repeat}")
    print(f"{'contender':<22}{'batch':>6}{'ms':>10}{'img/s':>10}{'vs torch.compile':>18}")
    for name, batch, ms in rows:
        print(f"{name:<22}{batch:>6}{ms:>10.3f}{batch / ms * 1e3:>10.0f}{peer[batch] / ms:>17.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["build", "run"])
    ap.add_argument("--out", default="bench-gpu")
    ap.add_argument("--target", default="sm90", choices=["sm80", "sm90"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="run step: per-kernel TVM profile at batch 256")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="which artifacts (fewer travel to a GPU machine)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="fixed batch sizes to build and time")
    args = ap.parse_args()
    args.recipes = args.recipes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    (build_step if args.step == "build" else run_step)(args)


if __name__ == "__main__":
    main()
