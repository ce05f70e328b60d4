"""Train a CIFAR ResNet in float on the CIFAR-10 train split and save its weights.

The standard recipe: SGD (momentum 0.9, nesterov), lr 0.1 with a cosine schedule, weight decay 5e-4,
random crop (pad 4) + horizontal flip, batch 128. Resumes from ``--resume`` after an interruption.

    python examples/train_cifar.py --depth 20 --epochs 30 --out examples/weights/resnet20_cifar.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qcompile.data import iterate_batches, load_split
from qcompile.models import CifarResNet
from qcompile.train.data import augment

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@torch.no_grad()
def evaluate(model: torch.nn.Module, data) -> float:
    model.eval()
    correct = 0
    for x, y in iterate_batches(data, 500):
        correct += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
    return correct / len(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", required=True, help="where to write the state dict (.pt); a .json with results beside it")
    ap.add_argument("--resume", help="training-state file to write each epoch and resume from")
    ap.add_argument("--init", help="start from these weights (a state dict) with a fresh schedule: fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    train, test = load_split(args.data, "train"), load_split(args.data, "test")
    model = CifarResNet(args.depth, num_classes=len(train.classes), width=args.width)
    if args.init:
        model.load_state_dict(torch.load(args.init, weights_only=True))
    model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start_epoch, elapsed = 0, 0.0
    if args.resume and os.path.exists(args.resume):
        state = torch.load(args.resume, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start_epoch, elapsed = state["epoch"], state["elapsed"]

    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        loss_sum, seen = 0.0, 0
        for x, y in iterate_batches(train, args.batch_size, shuffle=True, seed=args.seed * 1000 + epoch):
            x = augment(x, gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(y)
            seen += len(y)
        elapsed += time.time() - t0
        acc = evaluate(model, test) if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs else float("nan")
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / seen:.4f} test_top1 {acc:.4f} "
              f"epoch_s {time.time() - t0:.0f}", flush=True)
        if args.resume:
            tmp = args.resume + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "epoch": epoch + 1, "elapsed": elapsed}, tmp)
            os.replace(tmp, args.resume)

    acc = evaluate(model, test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, str(out) + ".tmp")
    os.replace(str(out) + ".tmp", out)
    info = {
        "model": f"CifarResNet(depth={args.depth}, width={args.width})",
        "test_top1": acc,
        "test_images": len(test),
        "epochs": args.epochs,
        "train_seconds": round(elapsed),
        "command": "python " + " ".join(sys.argv),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
