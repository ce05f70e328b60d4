"""Tuned int8 tensor-core schedules: candidates compiled here, timed on a GPU with the TVM runtime alone, the
fastest tile configuration per GEMM shape committed as a table that CUDA builds apply.

The search is one round over a fixed grid (:data:`GRID`: 48 ``wmma`` and 40 ``mma`` configurations): for every
distinct GEMM shape of a model after fusion (:func:`~qcompile.backends.tvm.int8_schedule.gemm_key`; one function
represents each), every :class:`~qcompile.backends.tvm.int8_schedule.TileConfig` that schedules, all compiled
here into one module (``candidates.so`` + ``candidates.fatbin``). On the GPU, :func:`measure` times each with
``time_evaluator`` and checks, fastest first, that a shape's winner writes the very output of the default
configuration. Back here, :func:`commit` writes each shape's fastest configuration, with its measured time and
the default's, to ``backends/tvm/tuning/<target>.json``; the int8 tensor-core rule schedules every function of a
listed shape with it and every other one with the default.

Not MetaSchedule's tuner and database, for three measured reasons: its search builds and runs every round from one
process, and the GPU machines this project gets have no TVM compiler, no nvcc and no network; its structural
workload matching makes every layer a workload of its own (requantize constants differ), about 150 for
ResNet-50's four artifacts at ~150 KB of JSON each; and its anchor-block matching, which would share a schedule
across epilogues, fails to replay this schedule's trace in 0.27 (``ApplyAnchorTrace``: "Check failed:
inst->outputs.size() <= outputs.size()"). A table keyed by GEMM shape is a few KB and applies to any epilogue.

For a CPU target (the rehearsal of the GPU step) the one candidate per shape is the function as the default CPU
pipeline compiles it.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.backends.tvm import TvmBackendError
from qcompile.backends.tvm.int8_schedule import DEFAULT, PASS_CONFIG, TileConfig

TABLES = Path(__file__).resolve().parent / "tuning"
MANIFEST = "manifest.json"
MAX_FAILURES_IN_A_ROW = 5

# block tiles (warps and 16x16 fragments per warp, along M and N): dlight's 128x128 and smaller ones for the
# small GEMM M of late layers and of batch 1; K steps per shared-memory stage; the copies' vector width
_TILES = ((4, 4, 2, 2), (2, 4, 2, 2), (4, 2, 2, 2), (2, 2, 2, 2), (2, 2, 4, 4), (1, 4, 1, 2), (1, 2, 1, 2),
          (2, 2, 1, 1))
_WMMA = tuple(TileConfig(wm, wn, fm, fn, k, v) for wm, wn, fm, fn in _TILES for k in (1, 2, 4) for v in (4, 16))
# mma: the same block tiles, 32-wide K steps, cp.async copies two or three stages deep
_MMA = tuple(TileConfig(wm, wn, fm, fn, k, v, "mma", stages) for wm, wn, fm, fn in _TILES
             for k, v, stages in ((1, 16, 2), (1, 4, 2), (2, 16, 2), (2, 4, 2), (1, 16, 3)))
GRID: tuple[TileConfig, ...] = (DEFAULT, *(c for c in _WMMA + _MMA if c != DEFAULT))


@dataclass
class Task:
    """One GEMM shape (``key``), a function of that shape (``name``: its name in the fused module) and how many
    calls of the model run a function of that shape (``calls``)."""

    key: str
    name: str
    func: Any
    calls: int = 0


def gemm_tasks(mod: Any, spec: Any) -> list[Task]:
    """One task per distinct int8 GEMM shape of a Relax module, after the CUDA pipeline's legalization and
    fusion (the functions the int8 rule schedules), with the number of calls of that shape in ``main``."""
    import tvm
    from tvm import relax

    from qcompile.backends.tvm import cuda
    from qcompile.backends.tvm.int8_schedule import gemm_key

    with spec.tvm_target():
        fused = tvm.transform.Sequential(cuda.fusion_passes())(mod)
    calls: dict[str, int] = {}
    for block in fused["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.args[0], tvm.ir.GlobalVar):
                calls[value.args[0].name_hint] = calls.get(value.args[0].name_hint, 0) + 1
    tasks: dict[str, Task] = {}
    for gv, func in sorted(fused.functions_items(), key=lambda kv: kv[0].name_hint):
        if cuda.is_int8_gemm(func):
            key = gemm_key(func)
            task = tasks.setdefault(key, Task(key, gv.name_hint, func))
            task.calls += calls.get(gv.name_hint, 0)
    return list(tasks.values())


def merge_tasks(*groups: list[Task]) -> list[Task]:
    """The tasks of several modules (recipes, batch sizes), each shape once."""
    merged: dict[str, Task] = {}
    for group in groups:
        for task in group:
            merged.setdefault(task.key, task)
    return list(merged.values())


def _schedule(func: Any, config: TileConfig) -> Any:
    from tvm.s_tir.schedule import ScheduleError

    from qcompile.backends.tvm.int8_schedule import schedule_int8_gemm

    try:
        return schedule_int8_gemm(func, config)
    except ScheduleError:
        return None


def _compile(funcs: dict[str, Any], spec: Any, rounds: int = 3) -> tuple[Any, str, bytes]:
    """One module of all candidates, and for CUDA its source and fatbin. Candidates whose CUDA nvcc rejects all
    the same are dropped from ``funcs`` and the rest compiled again (nvcc reports at most 100 errors a run)."""
    import tvm

    from qcompile.backends.tvm import cuda

    for _ in range(rounds):
        with tvm.transform.PassContext(config=PASS_CONFIG):
            lib = tvm.compile(tvm.IRModule(funcs), target=spec.tvm_target())
        if not spec.is_cuda:
            return lib, "", b""
        source = cuda.cuda_source(lib)
        try:
            return lib, source, cuda.nvcc(source, spec)
        except cuda.NvccError as exc:
            bad = _kernels_at(source, exc.error_lines())
            if not bad:
                raise
            for name in bad:
                del funcs[name]
    raise TvmBackendError(f"nvcc still rejects candidates after {rounds} rounds")


def _kernels_at(source: str, lines: set[int]) -> set[str]:
    """The candidates (``t<i>_c<j>``) whose kernel definitions hold the given 1-based source lines."""
    owner, found = None, set()
    for number, line in enumerate(source.splitlines(), 1):
        match = re.search(r"__global__ void .*?\b(t\d+_c\d+)_kernel", line)
        if match and not line.rstrip().endswith(";"):
            owner = match.group(1)
        if number in lines and owner is not None:
            found.add(owner)
    return found


def checked_schedule(func: Any, config: TileConfig, target: Any) -> Any:
    """The traced schedule of ``func`` with ``config`` if it schedules and lowers alone for ``target`` (some
    tile shapes fail to lower, e.g. ``tvm_access_ptr element type must match``), else None."""
    import tvm

    sch = _schedule(func, config)
    if sch is None:
        return None
    try:
        with tvm.transform.PassContext(config=PASS_CONFIG):
            tvm.compile(tvm.IRModule({"candidate": sch.mod["main"].with_attr("global_symbol", "candidate")}),
                        target=target)
    except Exception:  # noqa: BLE001 - whatever fails to lower drops the candidate
        return None
    return sch


def _compilable(func: Any, config: TileConfig | None, spec: Any) -> Any:
    """``func`` scheduled with ``config`` if :func:`checked_schedule` takes it, else None; ``config=None`` (a CPU
    target): ``func`` itself."""
    if config is None:
        return func
    sch = checked_schedule(func, config, spec.tvm_target())
    return None if sch is None else sch.mod["main"]


def _args(func: Any) -> list[dict[str, Any]]:
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    return [{"shape": [int(d) for d in a.shape], "dtype": str(a.dtype)} for a in ArgInfo.from_prim_func(func)]


def build_candidates(tasks: list[Task], spec: Any, out: str | Path, grid: tuple[TileConfig, ...] = GRID) -> Path:
    """Compile every (task, config) that schedules into ``out``: the module, its fatbin for CUDA, a manifest."""
    from qcompile.backends.tvm import cuda

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    cuda.import_tensor_intrinsics()
    funcs: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    with spec.tvm_target():
        for t, task in enumerate(tasks):
            args = _args(task.func)
            for c, config in enumerate(grid if spec.is_cuda else (None,)):
                name = f"t{t}_c{c}"
                func = _compilable(task.func, config, spec)
                if func is None:
                    continue
                funcs[name] = func.with_attr("global_symbol", name)
                entries.append({"name": name, "task": task.key, "function": task.name,
                                "config": config.as_dict() if config else None, "args": args})
        lib, source, fatbin = _compile(funcs, spec)
    entries = [e for e in entries if e["name"] in funcs]
    manifest: dict[str, Any] = {"target": spec.name, "tasks": [t.key for t in tasks],
                                "calls": {t.key: t.calls for t in tasks}, "candidates": entries}
    if spec.is_cuda:
        (folder / "candidates.fatbin").write_bytes(fatbin)
        manifest["cuda"] = {"fatbin": "candidates.fatbin", "source_sha256": cuda.source_digest(source)}
    lib.export_library(str(folder / "candidates.so"))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def _random(arg: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(arg["dtype"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -64), min(info.max, 64), arg["shape"], dtype=dtype, endpoint=True)
    return rng.uniform(0.5, 1.5, arg["shape"]).astype(dtype)


def measure(folder: str | Path, device: str = "cuda", number: int = 5, repeat: int = 3,
            out: str | Path | None = None, budget_s: float | None = None) -> dict[str, Any]:
    """Time every candidate of a :func:`build_candidates` folder (the median of ``repeat`` means of ``number``
    calls, in ms) with the TVM runtime alone: the step that runs on the GPU machine. With ``out``, the figures
    so far are rewritten there after each GEMM shape, so that a kernel that kills the process, or the end of
    ``budget_s``, leaves the shapes timed before it."""
    import tvm

    from qcompile.backends.tvm.runtime import serve_fatbin

    start = time.monotonic()
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if "cuda" in manifest:
        serve_fatbin(tvm, folder, manifest)
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    lib = tvm.runtime.load_module(str(folder / "candidates.so"))
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"target": manifest["target"], "device": device, "number": number, "repeat": repeat,
                              "complete": False, "ms": {}, "failed": {}, "wrong": []}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest["candidates"]:
        by_task.setdefault(entry["task"], []).append(entry)
    in_a_row = 0
    for key, entries in _phases(by_task):
        if budget_s is not None and time.monotonic() - start > budget_s or in_a_row >= MAX_FAILURES_IN_A_ROW:
            break
        initial = [_random(a, rng) for a in entries[0]["args"]]
        args = [tvm.runtime.tensor(a, dev) for a in initial]
        for entry in entries:
            try:
                timer = lib.time_evaluator(entry["name"], dev, number=number, repeat=repeat)
                result["ms"][entry["name"]] = statistics.median(timer(*args).results) * 1e3
                in_a_row = 0
            except Exception as exc:  # noqa: BLE001 - e.g. a launch asking for too many registers: next one
                result["failed"][entry["name"]] = str(exc).strip().splitlines()[-1][:300] if str(exc) else repr(exc)
                in_a_row += 1
                if in_a_row >= MAX_FAILURES_IN_A_ROW:  # a dead CUDA context fails every launch after it
                    break
        if in_a_row < MAX_FAILURES_IN_A_ROW:
            result["wrong"] += wrong_fastest(lib, by_task[key], result["ms"], args, initial[-1], set(result["wrong"]))
        if out is not None:
            Path(out).write_text(json.dumps(result, indent=1))
    result["complete"] = len(result["ms"]) + len(result["failed"]) == len(manifest["candidates"])
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def _phases(by_task: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(GEMM shape, candidates) to time in order: every shape's ``wmma`` candidates (the default's form), then
    every shape's ``mma`` ones, so that a kernel that kills the CUDA context, or the end of the budget, in the
    newer form leaves the whole first round timed."""
    def instruction(entry: dict[str, Any]) -> str:
        return (entry["config"] or {}).get("instruction", "wmma")

    return [(key, part) for form in ("wmma", "mma") for key, entries in by_task.items()
            if (part := [e for e in entries if instruction(e) == form])]


def _is_default(config: dict[str, Any] | None) -> bool:
    """Whether a manifest's config is the default's (None: a CPU target's one candidate); manifests written
    before a field existed leave it out, which means its default."""
    return config is None or TileConfig(**config) == DEFAULT


def wrong_fastest(lib: Any, entries: list[dict[str, Any]], ms: dict[str, float], args: list[Any],
                  initial_output: np.ndarray, known_wrong: Collection[str] = ()) -> list[str]:
    """The candidates of one GEMM shape, fastest first, whose output differs from the default configuration's,
    up to the first that agrees: the winner is then a kernel known to compute the same integers. The output
    (the last argument: Relax passes a TIR function its outputs last) is reset before each run, so a kernel that
    leaves part of it unwritten disagrees too. Candidates in ``known_wrong`` are passed over, not run again.
    Only the fastest are checked: copying every candidate's output back would cost more than timing it."""
    default = next((e["name"] for e in entries if _is_default(e["config"])), None)
    if default not in ms:
        return []

    def output(name: str) -> np.ndarray:
        args[-1].copyfrom(initial_output)
        lib[name](*args)
        return args[-1].numpy()

    try:
        expected, wrong = output(default), []
    except Exception:  # noqa: BLE001 - e.g. a CUDA context that a candidate killed: the next launches say so
        return []
    for name in sorted((e["name"] for e in entries if e["name"] in ms and e["name"] not in known_wrong),
                       key=ms.__getitem__):
        try:
            agrees = name == default or np.array_equal(output(name), expected)
        except Exception:  # noqa: BLE001 - a run that fails after its timing passed is no winner either
            agrees = False
        if agrees:
            break
        wrong.append(name)
    return wrong


def fastest(manifest: dict[str, Any], measured: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per GEMM shape, its fastest measured configuration that is not known to compute a wrong result: config,
    ms, the default config's ms, the function."""
    out: dict[str, dict[str, Any]] = {}
    wrong = set(measured.get("wrong", ()))
    for entry in manifest["candidates"]:
        ms = measured["ms"].get(entry["name"])
        if ms is None or entry["name"] in wrong:
            continue
        row = out.setdefault(entry["task"], {"ms": float("inf"), "default_ms": None, "function": entry["function"]})
        if _is_default(entry["config"]):
            row["default_ms"] = ms
        if ms < row["ms"]:
            row.update(config=entry["config"], ms=ms)
    return out


def commit(manifest: dict[str, Any], measured: dict[str, Any], device_name: str,
           table: str | Path | None = None) -> dict[str, Any]:
    """Merge the measured winners into the target's table (``backends/tvm/tuning/<target>.json``) and return it.
    Shapes whose fastest is the default are recorded too, so that the table says what was measured."""
    path = Path(table) if table is not None else TABLES / f"{manifest['target']}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"target": manifest["target"], "shapes": {}}
    for key, row in fastest(manifest, measured).items():
        data["shapes"][key] = {**row, "measured_on": device_name}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    load_table.cache_clear()
    return data


@cache
def load_table(target: str) -> dict[str, TileConfig]:
    """The committed configurations of a target by GEMM shape (empty without a table)."""
    path = TABLES / f"{target}.json"
    if not path.is_file():
        return {}
    shapes = json.loads(path.read_text())["shapes"]
    return {key: TileConfig(**row["config"]) for key, row in shapes.items() if row.get("config")}
