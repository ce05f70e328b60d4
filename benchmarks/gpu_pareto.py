"""The paper's experiment on one GPU in one short run: retrain the bundled ResNet-20, fine-tune it with QAT, and
train the width x precision sweep from scratch, several runs at once on the one GPU; then, on the CPU, lower
every run to the integer IR, check it against the reference and draw the plots.

    python benchmarks/gpu_pareto.py run OUT [--resume PREV] [--budget-s 470] [--workers 4]    # on the GPU
    python benchmarks/gpu_pareto.py finish PREV [--results results/gpu-pareto]                  # here, CPU
    python benchmarks/gpu_pareto.py run OUT --smoke --data examples/data/cifar10-sample.tar.gz  # rehearsal
    python benchmarks/gpu_pareto.py profile OUT                  # one step's time and kernels, alone on the GPU

``run`` trains until everything is done or ``--budget-s`` is spent (each run stops at an epoch boundary), then
packs what it has into OUT: ``summary.json`` (per run: epochs reached, top-1 and losses measured on the GPU,
images per second; the aggregate) and at most four ``pack-N.tar`` of at most 15 MiB holding the checkpoints.
``--resume PREV`` unpacks an earlier OUT first and continues every unfinished run from its last epoch.
``finish`` evaluates, lowers and verifies the finished runs on the CPU (``qcompile sweep``'s own code, which
takes a finished checkpoint as trained) and writes the tables, plots and the retrained checkpoint.

On a GPU machine where qcompile is not installed, put it on the path as installed (``passes/`` and
``backends/`` are shipped as ``qcompile.passes`` and ``qcompile.backends``, so the source folder alone does not
import) and keep the current folder off ``sys.path``::

    mkdir -p /tmp/site && cp -r qcompile /tmp/site/ && cp -r passes /tmp/site/qcompile/passes \
        && cp -r backends /tmp/site/qcompile/backends
    PYTHONPATH=/tmp/site python3 -P benchmarks/gpu_pareto.py run $OUT --data DATA --workers 3

Each run is a :func:`qcompile.train.trainer.train` call in a worker process: data on the GPU, channels-last, bf16
autocast, the step replayed as a CUDA graph, fake quantization in fused Triton kernels. A run whose graph or
kernels fail is retried without them, from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from qcompile.data import load_split
from qcompile.models import resnet20_cifar
from qcompile.quantization.latency import LatencyProfile
from qcompile.quantization.recipes import get_recipe
from qcompile.train.distributed import DistContext, default_device
from qcompile.train.plots import plot_sweep
from qcompile.train.run import RunSpec, Splits, prepare_run, train_and_lower
from qcompile.train.sweep import Pair, add_latency, expected_settings, run_dir, run_sweep, write_tables
from qcompile.train.trainer import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PACK_BYTES = 15 << 20
MAX_PACKS = 4  # 60 MiB: what comes back from the device machine is at most 64 MiB
START_MARGIN_S = 25  # no run is started with less time left than this
CHECKPOINT = "resnet20_cifar.pt"


@dataclass(frozen=True)
class Stage:
    """One kind of run's schedule: SGD with nesterov momentum and a cosine learning rate (TrainConfig's defaults
    for the rest)."""

    epochs: int
    batch_size: int
    lr: float
    label_smoothing: float = 0.0
    cutout: int = 0


@dataclass(frozen=True)
class Plan:
    """Everything a run's result depends on: stages, pairs, data sizes."""

    float_stage: Stage
    sweep_stage: Stage
    qat_stage: Stage
    widths: tuple[float, ...]
    recipes: tuple[str, ...]
    qat_recipes: tuple[str, ...]
    train_size: int | None
    eval_size: int | None
    train_eval_size: int
    verify_size: int


FULL = Plan(float_stage=Stage(160, 128, 0.1), sweep_stage=Stage(30, 256, 0.1), qat_stage=Stage(30, 128, 0.01),
            widths=(0.5, 0.75, 1.0, 1.5, 2.0), recipes=("bf16", "int8", "mostly4bit", "int4"),
            qat_recipes=("mostly4bit", "int8"), train_size=None, eval_size=None, train_eval_size=10_000,
            verify_size=1000)
SMOKE = Plan(float_stage=Stage(1, 64, 0.05), sweep_stage=Stage(1, 64, 0.05), qat_stage=Stage(1, 64, 0.01),
             widths=(0.5, 1.0), recipes=("bf16", "mostly4bit"), qat_recipes=("mostly4bit",), train_size=128,
             eval_size=128, train_eval_size=128, verify_size=32)


@dataclass(frozen=True)
class Job:
    """One training run: the float checkpoint, a sweep pair (from scratch), or a QAT fine-tune of the checkpoint."""

    kind: str  # "float" | "pair" | "qat"
    recipe: str = "bf16"
    width: float = 1.0

    @property
    def key(self) -> str:
        return {"float": "float", "pair": f"sweep/{Pair(self.width, self.recipe).key}",
                "qat": f"qat/{self.recipe}"}[self.kind]

    def stage(self, plan: Plan) -> Stage:
        return {"float": plan.float_stage, "pair": plan.sweep_stage, "qat": plan.qat_stage}[self.kind]

    def settings(self, plan: Plan) -> dict[str, Any]:
        """What the run's result depends on: its stage, and for a QAT run the checkpoint's too."""
        own = asdict(self.stage(plan))
        return {**own, "checkpoint": asdict(plan.float_stage)} if self.kind == "qat" else own

    def checkpoint(self, work: Path) -> Path:
        if self.kind == "pair":
            return run_dir(work / "sweep", Pair(self.width, self.recipe)) / "checkpoint.pt"
        return work / self.key / "checkpoint.pt"

    def config(self, plan: Plan, work: Path | None = None, deadline: float | None = None) -> TrainConfig:
        s = self.stage(plan)
        return TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=0, progress=False,
                           label_smoothing=s.label_smoothing, cutout=s.cutout,
                           checkpoint=None if work is None else self.checkpoint(work), deadline=deadline)


def parse_stage(text: str) -> Stage:
    """``EPOCHS,BATCH,LR[,LABEL_SMOOTHING[,CUTOUT]]``."""
    parts = text.split(",")
    kinds = (int, int, float, float, int)
    try:
        if not 3 <= len(parts) <= 5:
            raise ValueError
        return Stage(*(kind(part) for kind, part in zip(kinds, parts)))
    except ValueError:
        raise SystemExit(f"a stage is EPOCHS,BATCH,LR[,LABEL_SMOOTHING[,CUTOUT]], not {text!r}") from None


def plan_from(recorded: dict[str, Any]) -> Plan:
    """The plan a run's summary records (so ``finish`` lowers what was trained, however it was set)."""
    stages = {k: Stage(**v) for k, v in recorded.items() if k.endswith("_stage")}
    tuples = {k: tuple(v) for k, v in recorded.items() if isinstance(v, list)}
    return Plan(**{**recorded, **stages, **tuples})


def jobs(plan: Plan) -> list[Job]:
    """In the order they start: the checkpoint, the QAT runs (as soon as the checkpoint is done), then the
    pairs, largest first."""
    pairs = [Job("pair", r, w) for w in sorted(plan.widths, reverse=True) for r in plan.recipes]
    return [Job("float"), *(Job("qat", r) for r in plan.qat_recipes), *pairs]


EXAMPLE = (torch.zeros(1, 3, 32, 32),)


def pair_spec(pair: Pair) -> RunSpec:
    return RunSpec(resnet20_cifar(), EXAMPLE, get_recipe(pair.recipe), pair.width)


def qat_spec(recipe: str, work: Path) -> RunSpec:
    model = resnet20_cifar()
    model.load_state_dict(torch.load(work / "float" / CHECKPOINT, map_location="cpu", weights_only=True))
    return RunSpec(model, EXAMPLE, get_recipe(recipe))


def load_splits(plan: Plan, data: str, device: torch.device) -> Splits:
    train_set = load_split(data, "train").subset(plan.train_size)
    test_set = load_split(data, "test").subset(plan.eval_size)
    return Splits.from_imagesets(train_set, test_set, device, plan.train_eval_size)


# ---- worker process ------------------------------------------------------------------------------------------

_SPLITS: dict[str, Splits] = {}


def _train_once(job: Job, plan: Plan, work: Path, deadline: float, splits: Splits, dist: DistContext,
                graphs: bool) -> tuple[torch.nn.Module, Any]:
    cfg = job.config(plan, work, deadline)
    cfg.cuda_graphs = graphs
    cfg.checkpoint.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    if job.kind == "float":
        torch.manual_seed(cfg.seed)
        model: torch.nn.Module = resnet20_cifar()
    else:
        spec = pair_spec(Pair(job.width, job.recipe)) if job.kind == "pair" else qat_spec(job.recipe, work)
        model = prepare_run(spec, cfg).graph
    return model, train(model, splits.train, cfg, dist)


def run_job(job: Job, plan: Plan, data: str, work: str, deadline: float, device: str,
            threads: int, graphs_ok: bool) -> dict[str, Any]:
    """Train one run to its end or the deadline, on the GPU with graphs and fused kernels, falling back to eager
    steps and then to eager fake quantization if either fails; the result row (never raises)."""
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    row: dict[str, Any] = {"key": job.key, **asdict(job), "settings": job.settings(plan), "errors": []}
    dev = torch.device(device)
    try:
        if data not in _SPLITS:
            _SPLITS[data] = load_splits(plan, data, dev)
        splits = _SPLITS[data]
        dist = DistContext(device=dev)
        t0 = time.time()
        ladder = ((True, True), (False, True), (False, False)) if graphs_ok else ((False, True), (False, False))
        for attempt, (graphs, fused) in enumerate(ladder):
            if not fused:
                from qcompile.quantization import fused_kernels

                fused_kernels.set_enabled(False)
            try:
                model, result = _train_once(job, plan, Path(work), deadline, splits, dist, graphs)
                row.update(cuda_graphs=graphs and dev.type == "cuda", fused_quant=fused)
                break
            except Exception as exc:  # noqa: BLE001 - recorded, then retried more simply
                row["errors"].append(f"attempt {attempt + 1}: {traceback.format_exc(limit=-4)[-1500:]}")
                if attempt == len(ladder) - 1:
                    raise exc
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.time() - t0
        steps_per_epoch = splits.train.steps_per_epoch(job.stage(plan).batch_size)
        epochs_now = result.steps // steps_per_epoch - result.resumed_from_epoch
        images = epochs_now * steps_per_epoch * job.stage(plan).batch_size
        row.update(status="done" if result.completed else "stopped", epoch=result.steps // steps_per_epoch,
                   epochs=result.epochs, train_seconds=result.seconds, wall_seconds=wall, images=images,
                   images_per_second=images / wall if wall else None)
        if job.kind == "float" and result.completed:
            torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                       Path(work) / "float" / CHECKPOINT)
        if result.completed:
            top1, eval_loss, _ = evaluate(model, splits.eval.eval_batches())
            _, train_loss, _ = evaluate(model, splits.train_eval.eval_batches())
            row.update(top1=top1, eval_loss=eval_loss, train_loss=train_loss,
                       generalization_gap=eval_loss - train_loss)
    except Exception:  # noqa: BLE001 - a failed run must not stop the others
        row.update(status="failed", error=traceback.format_exc(limit=-6)[-3000:])
    return row


def _die_with_parent() -> None:
    """A worker initializer: on Linux, be sent SIGTERM when the process that started the pool dies, so killing
    ``run`` does not leave orphans training (Ctrl-C reaches them anyway, as the whole process group)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- the GPU run ---------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fused_check(device: torch.device) -> dict[str, Any]:
    """The fused kernels against the eager definition on this device, bfloat16 and float32, values and masks."""
    from qcompile.quantization import fused_kernels
    from qcompile.quantization.quantizer import _Requantize, _RoundClip

    if device.type != "cuda":
        return {"checked": False}
    g = torch.Generator(device).manual_seed(0)
    report: dict[str, Any] = {"checked": True, "mismatches": {}}
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(64, 32, 16, 16, generator=g, device=device) * 3).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        s, s_acc = torch.tensor(0.05, device=device), torch.rand(32, generator=g, device=device) * 1e-2 + 1e-3
        fused = (_RoundClip.apply(x, s, -8, 7), _Requantize.apply(x, s_acc, s, 1, -128, 127))
        fused_kernels.set_enabled(False)
        eager = (_RoundClip.apply(x, s, -8, 7), _Requantize.apply(x, s_acc, s, 1, -128, 127))
        fused_kernels.set_enabled(True)
        report["mismatches"][str(dtype)] = [int((a != b).sum()) for a, b in zip(fused, eager)]
    return report


def graph_check(device: torch.device, steps: int = 8) -> dict[str, Any]:
    """Train one small QAT model twice from the same start on the same batches, eagerly and with the captured
    step, through the activation freeze; the parameters must agree to within bf16 / cuDNN noise (and move)."""
    import copy

    from qcompile.train.graphed import CapturedStep, init_momentum, sgd_step
    from qcompile.train.qat import ActivationSchedule
    from qcompile.train.trainer import optimizer_for

    if device.type != "cuda":
        return {"checked": False}
    try:
        cfg = TrainConfig(lr=0.05)
        start = prepare_run(pair_spec(Pair(0.5, "mostly4bit")), cfg).graph.to(device)
        start.to(memory_format=torch.channels_last)
        eager, graphed = copy.deepcopy(start), copy.deepcopy(start)
        g = torch.Generator(device).manual_seed(0)
        batches = [(torch.randn(64, 3, 32, 32, generator=g, device=device),
                    torch.randint(0, 10, (64,), generator=g, device=device)) for _ in range(2 * steps)]
        opt_e, opt_g = optimizer_for(eager, cfg), optimizer_for(graphed, cfg)
        init_momentum(opt_e)
        lr = torch.tensor(cfg.lr, device=device)
        captured = CapturedStep(graphed, opt_g, device)
        for i, (x, y) in enumerate(batches):
            if i == steps:
                ActivationSchedule(eager, 1, 1.0).freeze()
                ActivationSchedule(graphed, 1, 1.0).freeze()
                captured.reset()
            opt_e.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(eager(x), y)
            loss.backward()
            sgd_step(opt_e, lr)
            captured(x, y)
        torch.cuda.synchronize()
        with torch.no_grad():
            rel = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
                      for a, b in zip(eager.parameters(), graphed.parameters()))
            moved = max(float((a - b).abs().max()) for a, b in zip(start.parameters(), graphed.parameters()))
        return {"checked": True, "max_relative_difference": rel, "moved": moved, "agree": rel < 0.05 and moved > 0}
    except Exception:  # noqa: BLE001 - the runs then train without graphs
        return {"checked": True, "agree": None, "error": traceback.format_exc(limit=-6)[-3000:]}


def unpack(source: Path, work: Path) -> dict[str, Any]:
    """Extract ``source``'s packs into ``work``; its summary (empty when there is none)."""
    work.mkdir(parents=True, exist_ok=True)
    for pack_file in sorted(source.glob("pack-*.tar")):
        with tarfile.open(pack_file) as tar:
            tar.extractall(work, filter="data")
    summary = source / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def pack(work: Path, out: Path, finished: set[Path]) -> list[str]:
    """Tar every checkpoint under ``work`` into ``out/pack-N.tar`` (each at most PACK_BYTES), dropping the
    optimiser state of finished runs, which nothing needs again."""
    files = sorted(p for p in work.rglob("*.pt") if "cache" not in p.parts)
    for f in files:
        if f in finished:
            state = torch.load(f, map_location="cpu", weights_only=True)
            if state.pop("opt", None) is not None:
                torch.save(state, f)
    packs: list[list[Path]] = [[]]
    size = 0
    for f in files:
        n = f.stat().st_size
        if packs[-1] and size + n > PACK_BYTES:
            packs.append([])
            size = 0
        packs[-1].append(f)
        size += n
    for left_out in packs[MAX_PACKS:]:  # more than comes back: the checkpoint and QAT runs sort first
        _log(f"not packed (over {MAX_PACKS} packs): {[str(f.relative_to(work)) for f in left_out]}")
    names = []
    for i, group in enumerate(p for p in packs[:MAX_PACKS] if p):
        name = out / f"pack-{i + 1}.tar"
        with tarfile.open(name, "w") as tar:
            for f in group:
                tar.add(f, arcname=str(f.relative_to(work)))
        names.append(name.name)
    return names


def run(args: argparse.Namespace) -> int:
    start = time.time()
    plan = SMOKE if args.smoke else FULL
    if args.float_stage:
        plan = replace(plan, float_stage=parse_stage(args.float_stage))
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    previous = unpack(Path(args.resume), work) if args.resume else {}
    os.environ["QCOMPILE_CACHE"] = str(work / "cache")
    device = default_device(args.device)
    summary: dict[str, Any] = {
        "plan": asdict(plan), "smoke": args.smoke, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "torch": torch.__version__, "workers": args.workers,
        "budget_s": args.budget_s, "resumed_from": args.resume,
    }
    stages = {j.key: j.settings(plan) for j in jobs(plan)}  # a run trained otherwise is trained again
    runs = {k: r for k, r in previous.get("runs", {}).items()
            if r.get("status") == "done" and r.get("settings", stages.get(k)) == stages.get(k)}
    try:
        summary["fused_check"] = fused_check(device)
        _log(f"fused kernel check: {summary['fused_check']}")
        summary["graph_check"] = graph_check(device)
        _log(f"CUDA graph check: {summary['graph_check']}")
        sizes = [len(load_split(args.data, split).subset(n))  # decode once; the workers read the cache
                 for split, n in (("train", plan.train_size), ("test", plan.eval_size))]
        _log(f"data ready ({time.time() - start:.0f} s)")
        expected = expected_settings(Job("pair").config(plan), *sizes)
        tabled = tabled_pairs(Path(args.table), expected) if args.table else set()
        deadline = start + args.budget_s
        queue = [j for j in jobs(plan) if j.key not in runs and j.key not in tabled
                 and (not args.only or j.key in args.only.split(","))]
        summary["in_table"] = sorted(tabled)
        running: dict[Future, Job] = {}
        t_train = time.time()
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_die_with_parent) as pool:
            while queue or running:
                ready = [j for j in queue if j.kind != "qat" or runs.get("float", {}).get("status") == "done"]
                blocked = not ready and not running
                while ready and len(running) < args.workers and deadline - time.time() > START_MARGIN_S:
                    job = ready.pop(0)
                    queue.remove(job)
                    running[pool.submit(run_job, job, plan, args.data, str(work), deadline, str(device),
                                        max(1, (os.cpu_count() or 1) // args.workers),
                                        summary["graph_check"].get("agree") is not False)] = job
                    _log(f"started {job.key}")
                if not running or blocked:
                    break
                done, _ = wait(running, timeout=5, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    row = fut.result()
                    runs[job.key] = row
                    _log(f"{job.key}: {row.get('status')} epoch {row.get('epoch')}/{row.get('epochs')} top-1 "
                         f"{row.get('top1')} img/s {row.get('images_per_second')} {row.get('error', '')}"
                         + (f" retried: {len(row['errors'])}" if row.get("errors") else ""))
        train_wall = time.time() - t_train
        images = sum(r.get("images", 0) for r in runs.values() if r.get("key") not in previous.get("runs", {}))
        summary.update(train_wall_seconds=train_wall, images=images, aggregate_images_per_second=images / train_wall,
                       not_started=[j.key for j in queue])
    finally:
        summary["runs"] = runs
        finished = {j.checkpoint(work) for j in jobs(plan) if runs.get(j.key, {}).get("status") == "done"}
        summary["packs"] = pack(work, out, finished)
        summary["wall_seconds"] = time.time() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        _log(f"packed {summary['packs']} into {out} after {summary['wall_seconds']:.0f} s")
    return 0


# ---- finishing on the CPU -----------------------------------------------------------------------------------


def tabled_rows(table: Path, expected: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier ``finish``'s ``runs.json`` trained with ``expected`` settings
    (:func:`qcompile.train.sweep.expected_settings`)."""
    rows = json.loads(table.read_text()) if table.exists() else []
    return [r for r in rows if all(r.get(k) == v for k, v in expected.items())]


def tabled_pairs(table: Path, expected: dict[str, Any]) -> set[str]:
    """The sweep jobs an earlier ``finish`` already tabulated in ``table`` with these settings."""
    return {Job("pair", r["recipe"], r["width"]).key for r in tabled_rows(table, expected)}


def merge_rows(new: list[dict[str, Any]], table: Path, expected: dict[str, Any]) -> list[dict[str, Any]]:
    """``new`` and the rows of an earlier ``runs.json`` for other pairs trained the same way, ordered by width
    then recipe: the sweep grows over several GPU runs without keeping their checkpoints."""
    fresh = {(r["width"], r["recipe"]) for r in new}
    kept = [r for r in tabled_rows(table, expected) if (r["width"], r["recipe"]) not in fresh]
    order = {name: i for i, name in enumerate(FULL.recipes)}
    return sorted([*new, *kept], key=lambda r: (r["width"], order.get(r["recipe"], len(order))))


def finish(args: argparse.Namespace) -> int:
    """Lower, verify and tabulate the finished runs of a GPU run's output that ``--results`` does not hold yet
    (pairs already in its ``runs.json``, and a checkpoint or QAT run recorded there with the same settings, are
    kept as they are), and rewrite the tables and plots from all of them."""
    source, results = Path(args.out), Path(args.results)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    summary = unpack(source, work)
    plan = plan_from(summary["plan"])
    done = {k for k, r in summary.get("runs", {}).items() if r.get("status") == "done"}
    splits = load_splits(plan, args.data, torch.device("cpu"))
    results.mkdir(parents=True, exist_ok=True)
    previous = json.loads((results / "summary.json").read_text()) if (results / "summary.json").exists() else {}
    report: dict[str, Any] = {**previous, "runs": {**previous.get("runs", {}), **{
        k: r for k, r in summary.get("runs", {}).items() if k in done}}}
    report.setdefault("gpu_runs", []).append({k: summary.get(k) for k in (
        "device", "torch", "workers", "budget_s", "train_wall_seconds", "images", "aggregate_images_per_second",
        "wall_seconds", "fused_check", "graph_check", "not_started")})
    settings = Job("float").settings(plan)
    if "float" in done and report.get("checkpoint", {}).get("settings") != settings:
        model = resnet20_cifar()
        model.load_state_dict(torch.load(work / "float" / CHECKPOINT, weights_only=True))
        top1, loss, n = evaluate(model, splits.eval.eval_batches())
        report["checkpoint"] = {"test_top1": top1, "test_loss": loss, "test_images": n, "settings": settings}
        shutil.copy(work / "float" / CHECKPOINT, results / CHECKPOINT)
        print(f"checkpoint: top-1 {100 * top1:.2f}% on {n} test images", flush=True)
    expected = expected_settings(Job("pair").config(plan), len(splits.train), len(splits.eval))
    tabled = tabled_pairs(results / "runs.json", expected)
    pairs = [Pair(j.width, j.recipe) for j in jobs(plan) if j.kind == "pair" and j.key in done - tabled]
    new = run_sweep(pairs, pair_spec, splits, Job("pair").config(plan), work / "sweep",
                    verify_size=plan.verify_size,
                    on_pair=lambda p, r, _: print(f"{p.key}: top-1 {r['top1']}", flush=True)) if pairs else []
    rows = merge_rows(new, results / "runs.json", expected)
    if rows:
        if args.profile:
            add_latency(rows, pair_spec, LatencyProfile.load(args.profile))
        (results / "runs.json").write_text(json.dumps(rows, indent=1, default=str))
        write_tables(rows, results)
        plot_sweep(rows, results, "ResNet-20 on CIFAR-10, trained on one GPU")
    tabled = {Job("pair", r["recipe"], r["width"]).key for r in rows}
    report["missing_pairs"] = [j.key for j in jobs(plan) if j.kind == "pair" and j.key not in tabled]
    report["sweep_rows"] = len(rows)
    report.setdefault("qat", {})
    for recipe in plan.qat_recipes:
        job = Job("qat", recipe)
        if job.key in done and report["qat"].get(recipe, {}).get("settings") != job.settings(plan):
            row = train_and_lower(qat_spec(recipe, work), splits, job.config(plan), DistContext(),
                                  work / job.key, plan.verify_size)
            report["qat"][recipe] = {**row, "settings": job.settings(plan)}  # type: ignore[dict-item]
            print(f"QAT {recipe}: top-1 {row['top1']} (gap {row['generalization_gap']:.4f})", flush=True)  # type: ignore[index]
    (results / "summary.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {results}", flush=True)
    return 0


# ---- where a step's time goes (GPU) ------------------------------------------------------------------------


def profile_step(args: argparse.Namespace) -> int:
    """Time one run's training step alone on the device (median of CUDA-event-timed replays, observing and after
    the freeze) and write it with the kernels that take the time (``torch.profiler``, top 25) to
    ``OUT/steps.json`` (one file: what comes back from a device machine is counted in files)."""
    from torch.profiler import ProfilerActivity, profile

    from qcompile.train.graphed import CapturedStep
    from qcompile.train.qat import ActivationSchedule
    from qcompile.train.trainer import optimizer_for

    device = default_device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.pairs.split(","):
        width, recipe = key.removeprefix("w").split("-", 1)
        cfg = Job("pair", recipe, float(width)).config(FULL)
        batch = args.batch or cfg.batch_size
        model = prepare_run(pair_spec(Pair(float(width), recipe)), cfg).graph.to(device)
        if cuda:
            model.to(memory_format=torch.channels_last)
        opt = optimizer_for(model, cfg)
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(batch, 3, 32, 32, generator=g, device=device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=g, device=device)
        step = CapturedStep(model, opt, device) if cuda else None

        def one() -> None:
            if step is not None:
                step(x, y)
                return
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for phase in ("observing", "frozen"):
            if phase == "frozen":
                ActivationSchedule(model, 1, 1.0).freeze()
                if step is not None:
                    step.reset()
            for _ in range(5):
                one()
            times = []
            for _ in range(args.steps):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    one()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    one()
                    times.append((time.perf_counter() - t0) * 1e3)
            ms = sorted(times)[len(times) // 2]
            row = {"pair": key, "phase": phase, "batch": batch, "ms_per_step": ms, "images_per_second":
                   batch / ms * 1e3}
            print(f"{key} {phase}: {ms:.3f} ms per step, {batch / ms * 1e3:,.0f} img/s alone", flush=True)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(3):
                    one()
                if cuda:
                    torch.cuda.synchronize()
            sort = "cuda_time_total" if cuda else "cpu_time_total"
            rows.append({**row, "kernels": prof.key_averages().table(sort_by=sort, row_limit=25).splitlines()})
    (out / "steps.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train on the GPU (or rehearse with --smoke)")
    r.add_argument("out")
    r.add_argument("--resume", help="an earlier run's OUT to continue from")
    r.add_argument("--budget-s", type=float, default=470.0, help="stop training after this many seconds")
    r.add_argument("--workers", type=int, default=4, help="training processes sharing the device")
    r.add_argument("--smoke", action="store_true", help="tiny sizes: a rehearsal of the whole path")
    r.add_argument("--device", default=None)
    r.add_argument("--only", default="", metavar="KEY,KEY", help="train only these runs (e.g. sweep/w1-int4)")
    r.add_argument("--float-stage", default="", metavar="EPOCHS,BATCH,LR[,LS[,CUTOUT]]",
                   help="another schedule for the checkpoint (its QAT runs follow it)")
    r.add_argument("--table", default=str(ROOT / "results" / "gpu-pareto" / "runs.json"),
                   help="skip the pairs this earlier finish's runs.json holds ('' to train them all)")
    f = sub.add_parser("finish", help="lower, verify and tabulate a run's output (CPU)")
    f.add_argument("out", help="a run's OUT")
    f.add_argument("--results", default=str(ROOT / "results" / "gpu-pareto"))
    f.add_argument("--profile", default=str(ROOT / "results" / "profiles" / "onnx-cpu-resnet20-widths-b1.json"),
                   help="a latency profile for the measured-latency plot ('' for none)")
    for p in (r, f):
        p.add_argument("--data", default=str(DEFAULT_DATA))
        p.add_argument("--work", default="/tmp/gpu-pareto-work", help="scratch folder (emptied first)")
    s = sub.add_parser("profile", help="time and profile single training steps on the device")
    s.add_argument("out")
    s.add_argument("--pairs", default="w1-bf16,w1-mostly4bit,w2-mostly4bit", metavar="wW-RECIPE,...")
    s.add_argument("--batch", type=int, default=0, help="default: the sweep's batch size")
    s.add_argument("--steps", type=int, default=50, help="timed steps per phase (median)")
    s.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.command == "profile":
        return profile_step(args)
    if args.command == "finish" and args.profile and not Path(args.profile).exists():
        args.profile = ""
    return run(args) if args.command == "run" else finish(args)


if __name__ == "__main__":
    sys.exit(main())
