"""Tuning int8 tensor-core tile sizes: candidates compile here (nvcc, no GPU), a table of measured winners
applies to every later CUDA build of the same GEMM shapes, a build without a table keeps dlight's tiles, timing
the candidates survives one that cannot run, and a fast candidate with a wrong output never wins."""

import json
import re
import shutil

import pytest

pytest.importorskip("tvm")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from qcompile.backends.tvm import tuning  # noqa: E402
from qcompile.backends.tvm.build import build  # noqa: E402
from qcompile.backends.tvm.cuda import kernel_bodies  # noqa: E402
from qcompile.backends.tvm.int8_schedule import DEFAULT, TileConfig  # noqa: E402
from qcompile.backends.tvm.relax_builder import to_relax  # noqa: E402
from qcompile.backends.tvm.targets import get_target  # noqa: E402
from tests.backends.test_tvm import CPU, ConvChain  # noqa: E402
from tests.passes.test_lower_integer import _lowered  # noqa: E402

SMALL, WIDE = TileConfig(2, 2, 1, 1, 1, 4), TileConfig(2, 2, 2, 2, 2, 16)
MMA = TileConfig(1, 2, 1, 2, 1, 4, "mma", 2)


def _launch_bounds(source: str) -> set[int]:
    """Threads per block of the tensor-core kernels."""
    bounds = {name: int(n) for n, name in re.findall(r"__launch_bounds__\((\d+)\)\s+(\w+)\(", source)}
    return {bounds[name] for name, body in kernel_bodies(source).items() if "wmma::mma_sync" in body}


def _build_with_tables(ir, tables, out, monkeypatch):  # noqa: ANN001, ANN202
    """A batch-8 sm90 build of ``ir`` with the tuning tables of folder ``tables``: the artifact."""
    monkeypatch.setattr(tuning, "TABLES", tables)
    tuning.load_table.cache_clear()
    try:
        return build(ir, "sm90", out, batch=8)
    finally:
        tuning.load_table.cache_clear()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_candidates_compile_and_a_measured_table_applies_to_later_builds(tmp_path, monkeypatch):
    spec = get_target("sm90")
    ir = _lowered(ConvChain(), "int8", size=12).context.ir
    tasks = tuning.gemm_tasks(to_relax(ir, 8, pack_int4=False).mod, spec)
    assert len(tasks) == 4 and all(t.calls == 1 for t in tasks)  # three convs and the fc, each its own shape

    folder = tuning.build_candidates(tasks, spec, tmp_path / "candidates", grid=(DEFAULT, SMALL, WIDE))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "candidates.fatbin").stat().st_size > 0 and (folder / "candidates.so").is_file()
    kept = {(c["task"], TileConfig(**c["config"])) for c in manifest["candidates"]}
    assert all((t.key, DEFAULT) in kept and (t.key, SMALL) in kept for t in tasks)
    # 16-byte copies of a padded conv input, which 0.27 writes as CUDA nvcc rejects until repair_vectors
    assert all((t.key, WIDE) in kept for t in tasks if "R3x3" in t.key)

    # the GPU step's output, here a stand-in: SMALL fastest everywhere
    measured = {"ms": {c["name"]: 1.0 if TileConfig(**c["config"]) == SMALL else 2.0
                       for c in manifest["candidates"]}}
    table = tuning.commit(manifest, measured, "test", tmp_path / "tables" / "sm90.json")
    assert {row["ms"] for row in table["shapes"].values()} == {1.0}
    assert {row["default_ms"] for row in table["shapes"].values()} == {2.0}

    default = (build(ir, "sm90", tmp_path / "default", batch=8).path / "kernels.cu").read_text()
    art = _build_with_tables(ir, tmp_path / "tables", tmp_path / "tuned", monkeypatch)
    tuned = (art.path / "kernels.cu").read_text()
    assert _launch_bounds(default) == {DEFAULT.threads} and _launch_bounds(tuned) == {SMALL.threads}
    assert sum("wmma::mma_sync" in body for body in kernel_bodies(tuned).values()) == 4
    assert json.loads((art.path / "meta.json").read_text())["cuda"]["tuning_table_shapes"] == 4


def test_measuring_records_a_failing_candidate_and_goes_on(tmp_path):
    """The GPU step must not lose a whole run to one kernel: a candidate that cannot run is listed under
    ``failed``, the others are timed, and the figures are written as they come."""
    spec = get_target(CPU)
    ir = _lowered(ConvChain(), "int8", size=12).context.ir
    folder = tuning.build_candidates(tuning.gemm_tasks(to_relax(ir, 2).mod, spec), spec, tmp_path / "candidates")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["candidates"].insert(1, {**manifest["candidates"][0], "name": "not_in_the_module"})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    measured = tuning.measure(folder, device="cpu", number=1, repeat=1, out=tmp_path / "times.json")
    assert list(measured["failed"]) == ["not_in_the_module"] and measured["complete"]
    assert len(measured["ms"]) == len(manifest["candidates"]) - 1
    assert json.loads((tmp_path / "times.json").read_text()) == measured
    assert set(tuning.fastest(manifest, measured)) == set(manifest["tasks"])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_a_tuned_config_that_does_not_compile_for_a_function_falls_back_to_the_default(tmp_path, monkeypatch):
    """A table entry is per GEMM shape; a function of that shape with another epilogue or producer might not
    lower with it: the build then schedules that function with the default tiles, still on tensor cores."""
    spec = get_target("sm90")
    ir = _lowered(ConvChain(), "int8", size=12).context.ir
    tasks = tuning.gemm_tasks(to_relax(ir, 8, pack_int4=False).mod, spec)
    padded = next(t for t in tasks if "R3x3" in t.key)
    broken = TileConfig(1, 2, 1, 2, 4, 4)  # 0.27: "tvm_access_ptr element type must match" on a 3x3 conv
    assert tuning.checked_schedule(padded.func, broken, spec.tvm_target()) is None
    table = tmp_path / "sm90.json"
    table.write_text(json.dumps({"target": "sm90", "shapes": {padded.key: {"config": broken.as_dict()}}}))
    source = (_build_with_tables(ir, tmp_path, tmp_path / "out", monkeypatch).path / "kernels.cu").read_text()
    assert _launch_bounds(source) == {DEFAULT.threads}
    assert sum("wmma::mma_sync" in body for body in kernel_bodies(source).values()) == 4


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_a_table_of_pipelined_mma_winners_builds_ldmatrix_mma_kernels(tmp_path, monkeypatch):
    """The mma form of the schedule: fragments through ``ldmatrix``, ``mma.sync`` m16n8k32 in every GEMM kernel
    instead of wmma, and the global -> shared copies of an unpadded GEMM as ``cp.async`` in a two-stage
    pipeline; nvcc compiles it for sm90."""
    spec = get_target("sm90")
    ir = _lowered(ConvChain(), "int8", size=12).context.ir
    tasks = tuning.gemm_tasks(to_relax(ir, 8, pack_int4=False).mod, spec)
    table = tmp_path / "sm90.json"
    table.write_text(json.dumps({"target": "sm90", "shapes": {t.key: {"config": MMA.as_dict()} for t in tasks}}))
    source = (_build_with_tables(ir, tmp_path, tmp_path / "out", monkeypatch).path / "kernels.cu").read_text()
    gemms = [body for body in kernel_bodies(source).values() if "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"
             in body]
    assert len(gemms) == 4 and all("ldmatrix.sync.aligned" in body for body in gemms)
    assert "wmma::" not in source
    assert re.search(r"cp\.async\.c[ag]\.shared\.global", source)  # the copy helpers the kernels call
    assert any(re.search(r"ptx_cp_async_legacy_c[ag]_", body) for body in gemms)
    assert all("cp_async_wait_group" in body for body in gemms)


def _add(written: int, k: int):  # noqa: ANN202 - a TVMScript function: c[:written] = a[:written] + k
    @T.prim_func
    def func(a: T.Buffer((64,), "int32"), c: T.Buffer((64,), "int32")):
        for i in range(written):
            c[i] = a[i] + k
    return func


def test_the_fastest_candidate_must_write_the_default_candidates_output():
    """Checked fastest first, up to the first that agrees: an off-by-one kernel and one that writes half its
    output (the output is reset before each run) are found wrong; slower ones are not run."""
    kernels = {"default": _add(64, 1), "half": _add(32, 1), "off_by_one": _add(64, 2), "right": _add(64, 1),
               "slow_wrong": _add(64, 3)}
    lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in kernels.items()}), target="llvm")
    initial = [np.arange(64, dtype="int32"), np.full(64, 7, "int32")]
    args = [tvm.runtime.tensor(a, tvm.cpu(0)) for a in initial]
    entries = [{"name": n, "config": None if n == "default" else SMALL.as_dict()} for n in kernels]
    ms = {"half": 0.1, "off_by_one": 0.2, "right": 0.3, "default": 0.4, "slow_wrong": 0.5}
    wrong = tuning.wrong_fastest(lib, entries, ms, args, initial[-1])
    assert wrong == ["half", "off_by_one"]
    manifest = {"candidates": [{**e, "task": "t", "function": "f"} for e in entries]}
    assert tuning.fastest(manifest, {"ms": ms, "wrong": wrong})["t"]["ms"] == 0.3


def test_every_shapes_wmma_candidates_are_timed_before_any_mma_one():
    """A kernel of the newer form that kills the CUDA context (after which every launch fails) must not cost the
    first round: all shapes' wmma candidates come first."""
    by_task = {task: [{"name": f"{task}_{i}", "config": c.as_dict()} for i, c in enumerate((DEFAULT, MMA, SMALL))]
               for task in ("a", "b")}
    order = [(key, [e["name"] for e in entries]) for key, entries in tuning._phases(by_task)]
    assert order == [("a", ["a_0", "a_2"]), ("b", ["b_0", "b_2"]), ("a", ["a_1"]), ("b", ["b_1"])]
