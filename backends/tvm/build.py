"""Compile the Relax module for a target and export an artifact folder ``DIR/tvm/<target>/``.

Contents: ``model.so`` (the VM executable), ``params.npz`` (weights, 4-bit ones packed), ``meta.json`` (input
and output shapes, parameter order, target); for CUDA also ``model.fatbin`` (SASS, and PTX where the target
says so) and ``kernels.cu``. TVM 0.27 exports CUDA modules as source compiled when loaded; the loader
(:mod:`qcompile.backends.tvm.runtime`) hands the shipped fatbin to that step instead, so serving needs no compiler.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qcompile.backends.tvm import TvmBackendError, require_tvm
from qcompile.backends.tvm import cuda as tvm_cuda
from qcompile.backends.tvm.int8_schedule import PASS_CONFIG
from qcompile.backends.tvm.relax_builder import RelaxModel, to_relax
from qcompile.backends.tvm.targets import TargetSpec, get_target
from qcompile.backends.tvm.tuning import load_table

from qcompile.artifacts import atomic_path, write_json, write_text
from qcompile.errors import first_line
from qcompile.ir.graph import IRGraph

# replaying a CUDA graph saves a few microseconds per kernel: all of a batch-1 call's time on a GPU, nothing at
# batch 256, where it would hide the kernels from the VM's per-call profile (a graph replays them in one call)
GRAPH_MAX_BATCH = 16
# free space the export needs: its object files and the library, about 2 x 2.8 MB for ResNet-50 on the CPU, with
# room for larger models
EXPORT_SPACE = 32 * 2**20


@dataclass
class Artifact:
    """A built artifact: its folder, and the compiled executable (for inspection in this process)."""

    path: Path
    executable: Any
    seconds: float


def compile_relax(model: RelaxModel, spec: TargetSpec, cuda_graph: bool = False) -> Any:
    """``tvm.compile`` with the CUDA tensor-core pipeline for GPU targets, the default one on CPU.

    ``cuda_graph``: Relax's ``RewriteCUDAGraph`` records the kernels that read only weights and intermediates
    as one CUDA graph on the first call and replays it after, so a small batch pays one launch for them instead
    of one per kernel (only the input's quantize and the kernel writing the output stay outside).
    """
    tvm = require_tvm()
    target = spec.tvm_target()
    pipeline = tvm_cuda.relax_pipeline(target, load_table(spec.name)) if spec.is_cuda else "default"
    config = {"relax.backend.use_cuda_graph": cuda_graph, **(PASS_CONFIG if spec.is_cuda else {})}
    try:
        with tvm.transform.PassContext(config=config):
            return tvm.compile(model.mod, target=target, relax_pipeline=pipeline)
    except Exception as exc:  # a schedule or code generator inside TVM that cannot take one of the model's kernels
        raise TvmBackendError.with_parameters(
            f"TVM could not compile the model for {{target}} {spec.name}: {first_line(exc)}; the ONNX artifacts "
            "do not need TVM ({backend} onnx)") from exc


def _save_params(path: Path, params: list[tuple[str, np.ndarray]]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{f"p{i}": a for i, (_, a) in enumerate(params)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def export_library(executable: Any, target: Path) -> None:
    """``executable.export_library`` written atomically to ``target``, with the compiler's object files in a
    folder beside it rather than in the temporary directory, so that what the build writes lands where its artifact
    goes (and is gone with it); a link that failed for want of space is an ``OSError`` like any other full disk,
    not a compiler log.

    LLVM ends the process when it cannot write an object file, so a file system with less than
    :data:`EXPORT_SPACE` free is refused before it is tried."""
    free = shutil.disk_usage(target.parent).free
    if free < EXPORT_SPACE:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.1f} MiB free, and building a TVM "
                                    f"library needs {EXPORT_SPACE // 2**20} MiB", str(target))
    with atomic_path(target) as tmp:
        lib = tmp.with_name(tmp.name + ".so")  # the linker picks its mode of output from the suffix
        workspace = tmp.with_name(tmp.name + ".build")
        workspace.mkdir()
        try:
            executable.export_library(str(lib), workspace_dir=str(workspace))
            lib.replace(tmp)
        except RuntimeError as exc:
            if os.strerror(errno.ENOSPC) in str(exc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from None
            raise
        finally:
            lib.unlink(missing_ok=True)
            shutil.rmtree(workspace, ignore_errors=True)


def build(ir: IRGraph, target: str, out: str | Path, batch: int | None = None,
          float_dtype: str = "float64", cuda_graph: bool | None = None) -> Artifact:
    """Build ``out/tvm/<target>/``; ``batch=None`` compiles a symbolic batch dimension (``float_dtype``: see
    :func:`~qcompile.backends.tvm.relax_builder.to_relax`). ``cuda_graph`` (see :func:`compile_relax`) defaults
    to on for CUDA builds with a fixed batch of at most :data:`GRAPH_MAX_BATCH`."""
    spec = get_target(target)
    if cuda_graph is None:
        cuda_graph = spec.is_cuda and batch is not None and batch <= GRAPH_MAX_BATCH
    start = time.perf_counter()
    model = to_relax(ir, batch, float_dtype, pack_int4=not spec.is_cuda)  # GPUs unpack no 4-bit weights per call
    executable = compile_relax(model, spec, cuda_graph)
    folder = Path(out) / "tvm" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "target": spec.name, "tvm_target": str(spec.tvm_target()), "batch": model.batch,
        "input": {"name": ir.inputs[0], "shape": list(ir.values[ir.inputs[0]].shape[1:])},
        "outputs": [{"name": o, "shape": list(ir.values[o].shape[1:])} for o in ir.outputs],
        "params": [name for name, _ in model.params],
        "ir": {k: str(v) for k, v in ir.metadata.items()},
    }
    if spec.is_cuda:
        source = tvm_cuda.cuda_source(executable)
        write_text(folder / "kernels.cu", source)
        with atomic_path(folder / "model.fatbin") as tmp:
            tmp.write_bytes(tvm_cuda.nvcc(source, spec))
        meta["cuda"] = {"fatbin": "model.fatbin", "source_sha256": tvm_cuda.source_digest(source),
                        "gencode": list(spec.gencode), "graph": cuda_graph,
                        "tuning_table_shapes": len(load_table(spec.name))}
    export_library(executable, folder / "model.so")
    _save_params(folder / "params.npz", model.params)
    write_json(folder / "meta.json", meta)
    return Artifact(folder, executable, time.perf_counter() - start)
