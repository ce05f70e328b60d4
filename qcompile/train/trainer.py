"""The training loop: SGD with momentum and a cosine schedule, fake quantization with straight-through
gradients, bf16 autocast on CUDA (plain float on the CPU), seeded, checkpointed each epoch and resumable,
and data parallel under ``torchrun``. On one GPU the step is a replayed CUDA graph (:mod:`qcompile.train.graphed`)
over channels-last tensors."""

from __future__ import annotations

import io
import math
import pickle
import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from qcompile.artifacts import atomic_path
from qcompile.errors import CheckpointError, QCompileError
from qcompile.frontend.model_file import logits, state_mismatch
from qcompile.quantization.quantizer import NonFiniteActivation
from qcompile.train.data import DeviceData
from qcompile.train.distributed import DistContext, mean_across
from qcompile.train.graphed import CapturedStep
from qcompile.train.qat import ActivationSchedule, set_rank_sync

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the batch size is global: split over the processes)."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    observe_fraction: float = 0.2
    label_smoothing: float = 0.0
    cutout: int = 0  # side of the square zeroed in each training image (0: none)
    seed: int = 0
    checkpoint: Path | None = None
    progress: bool = True
    compile: bool = False
    cuda_graphs: bool = True  # on one GPU (not with compile or data parallelism): replay each step as a graph
    channels_last: bool = True  # on a GPU
    deadline: float | None = None  # a time.time(): stop after the epoch that passes it (resume later)


@dataclass
class TrainResult:
    epochs: int
    steps: int
    seconds: float
    last_epoch_loss: float  # mean training loss over the last epoch (augmented, train mode)
    resumed_from_epoch: int
    completed: bool = True  # False: stopped at the deadline; the checkpoint holds the last finished epoch


def optimizer_for(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD, momentum (nesterov); weight decay on weights only, not on BN parameters or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def cosine(total_steps: int):  # noqa: ANN201 - a LambdaLR factor
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))


def train(model: nn.Module, data: DeviceData, cfg: TrainConfig, dist: DistContext = DistContext()) -> TrainResult:
    """Train ``model`` (in place, on ``dist.device``) for ``cfg.epochs`` epochs of ``data``, resuming from
    ``cfg.checkpoint`` when it exists and writing it after every epoch."""
    cuda = dist.device.type == "cuda"
    channels_last = cuda and cfg.channels_last
    model.to(dist.device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    schedule = ActivationSchedule(model, cfg.epochs * data.steps_per_epoch(cfg.batch_size), cfg.observe_fraction)
    set_rank_sync(model, dist.distributed)
    opt = optimizer_for(model, cfg)
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(cfg.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, elapsed = 0, 0.0
    if cfg.checkpoint is not None and cfg.checkpoint.exists():
        start_epoch, elapsed = load_checkpoint(cfg.checkpoint, model, opt, sched, gen, schedule, cfg)
    runner: nn.Module = model
    if dist.distributed:
        runner = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)  # type: ignore[assignment]
    captured = CapturedStep(runner, opt, dist.device, cfg.label_smoothing) if (
        cuda and cfg.cuda_graphs and not cfg.compile and not dist.distributed) else None
    step = start_epoch * steps_per_epoch
    epoch_loss = float("nan")
    completed = True
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total = torch.zeros((), device=dist.device)
        batches: Iterable = data.train_batches(cfg.batch_size, epoch, cfg.seed, gen, dist.rank, dist.world,
                                               cfg.cutout)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not (cfg.progress and dist.is_main) or None, leave=False)
        for x, y in bar:
            if schedule.before_step(step) and captured is not None:
                captured.reset()  # the quantizers froze: record the step again
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                if captured is not None:
                    loss = captured(x, y)
                else:
                    with torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16, enabled=cuda):
                        loss = F.cross_entropy(logits(runner(x)), y, label_smoothing=cfg.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            except NonFiniteActivation:  # an observing quantizer saw the weights' NaN or inf
                raise _diverged(epoch, cfg, f"an activation became NaN or inf at step {step + 1}") from None
            with warnings.catch_warnings():  # a captured step updates the weights without calling opt.step()
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                sched.step()
            step += 1
            total += loss.detach().float()
        epoch_loss = mean_across(float(total) / steps_per_epoch, dist)
        if not math.isfinite(epoch_loss):  # checked once an epoch: a check per step would wait on the GPU
            raise _diverged(epoch, cfg, f"its mean loss is {epoch_loss}")
        elapsed += time.perf_counter() - t0
        if cfg.checkpoint is not None and dist.is_main:
            save_checkpoint(cfg.checkpoint, model, opt, sched, gen, schedule, epoch + 1, elapsed)
        dist.barrier()
        if cfg.deadline is not None and time.time() >= cfg.deadline and epoch + 1 < cfg.epochs:
            completed = False
            break
    if completed and not schedule.frozen:  # the observe phase outlasted training: quantize with what was observed
        schedule.freeze()
    model.eval()
    return TrainResult(cfg.epochs, step, elapsed, epoch_loss, start_epoch, completed)


def _diverged(epoch: int, cfg: TrainConfig, what: str) -> QCompileError:
    """Training that reached NaN or inf stops, keeping the checkpoint of the last finished epoch, rather than
    writing a model of NaN and scoring it."""
    return QCompileError.with_parameters(f"training diverged in epoch {epoch + 1} of {cfg.epochs}: {what}; train "
                                         f"with a lower {{lr}} (now {cfg.lr:g})")


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: object,
                    gen: torch.Generator, schedule: ActivationSchedule, epoch: int, elapsed: float) -> None:
    """Everything needed to continue exactly: weights, optimiser, schedule, RNG, quantizer states."""
    state = {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "gen": gen.get_state(), "quantizers": schedule.state_dict(),  # type: ignore[attr-defined]
             "epoch": epoch, "elapsed": elapsed}
    buffer = io.BytesIO()  # torch.save into a full disk fails as "enforce fail at inline_container.cc"
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())  # a full disk is an OSError naming the file


def _unreadable(exc: Exception) -> str:
    """Why a resume checkpoint could not be read, in a few words rather than torch's paragraph."""
    text = str(exc)
    if isinstance(exc, EOFError) or "failed reading zip archive" in text:
        return "it is empty, truncated or damaged"
    if isinstance(exc, pickle.UnpicklingError):
        return "it is not a checkpoint qcompile wrote"
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: object,
                    gen: torch.Generator, schedule: ActivationSchedule, cfg: TrainConfig) -> tuple[int, float]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"cannot resume from {path}: it holds another graph, "
                                  f"{state_mismatch(model, state['model'])}; delete it to start over") from None
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        elif state["epoch"] < cfg.epochs:  # a finished run may drop the optimiser's state; an unfinished one not
            raise KeyError("opt")
        sched.load_state_dict(state["sched"])  # type: ignore[attr-defined]
        gen.set_state(state["gen"])
        schedule.load_state_dict(state["quantizers"])
    except (KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot resume from {path}: {_unreadable(exc)}; delete it to start over") from None
    if state["epoch"] > cfg.epochs:
        raise CheckpointError(f"{path} is past epoch {cfg.epochs} (it has {state['epoch']}); delete it to start over")
    return int(state["epoch"]), float(state["elapsed"])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, int]:
    """(top-1, mean cross-entropy, images) in eval mode and float32."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in batches:
        z = logits(model(x)).float()
        correct += int((z.argmax(1) == y).sum())
        loss += float(F.cross_entropy(z, y, reduction="sum"))
        n += len(y)
    model.train(was_training)
    return (correct / n if n else float("nan")), (loss / n if n else float("nan")), n
