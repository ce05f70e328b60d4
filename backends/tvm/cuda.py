"""CUDA specifics: int8 conv/dense on tensor cores (wmma IMMA), and the kernels compiled to a fatbin here.

The int8 rule is dlight's ``MatmulInt8Tensorization`` applied to every int8 x int8 -> int32 reduction (dlight's
``Matmul`` only tries it when every GEMM dimension exceeds 64, which leaves ResNet's 64-channel layers on
dp4a), with its software-pipeline annotations removed: 0.27's ``InjectSoftwarePipeline`` crashes on them
(``GetWmmaFragmentSize``). Fused epilogues (bias, requantize, ReLU) are inlined after the tensor-core store.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from qcompile.backends.tvm import TvmBackendError
from qcompile.backends.tvm.targets import TargetSpec


def _int8_rule() -> Any:
    from tvm.s_tir.dlight.gpu.matmul import MatmulInt8Tensorization

    class Int8TensorCore(MatmulInt8Tensorization):
        """dlight's int8 wmma schedule without software pipelining."""

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            sch = super().apply(func, target, tunable)
            if sch is None:
                return None
            _strip_pipeline(sch, sch.get_sblock("root"))
            return sch

    return Int8TensorCore()


def _strip_pipeline(sch: Any, block: Any) -> None:
    for loop in sch.get_loops(block):
        for key in list(sch.get(loop).annotations.keys()):
            if key.startswith("software_pipeline"):
                sch.unannotate(loop, key)
    for child in sch.get_child_blocks(block):
        _strip_pipeline(sch, child)


def relax_pipeline(target: Any) -> Any:
    """The default CUDA pipeline of 0.27 with the int8 tensor-core rule first among the dlight rules."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    legalize = [
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(_int8_rule(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
    ]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(cuda.library_dispatch_passes(target) + legalize
                                           + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))
            return seq(mod)

    return _pipeline


def cuda_source(executable: Any) -> str:
    """The generated CUDA C of a compiled executable (its ``cuda`` module)."""
    stack = [executable.mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source()
        stack.extend(m.imports)
    raise TvmBackendError("the CUDA build produced no CUDA module")


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def nvcc(source: str, spec: TargetSpec, fmt: str = "fatbin") -> bytes:
    """Compile CUDA C with nvcc to a fatbin (the target's SASS and PTX) or to PTX for inspection; no fast-math,
    so that quantize's division and requantize's rounding are those of the reference."""
    exe = shutil.which("nvcc")
    if exe is None:
        raise TvmBackendError(f"--target {spec.name} needs nvcc on PATH (the CUDA toolkit) to build the fatbin")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / f"kernels.{fmt}"
        src.write_text(source)
        arch = dict(spec.attrs)["arch"].replace("sm_", "compute_")
        codes = [f"-gencode={g}" for g in spec.gencode] if fmt == "fatbin" else [f"-arch={arch}"]
        proc = subprocess.run([exe, f"--{fmt}", "-O3", *codes, "-o", str(out), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise TvmBackendError(f"nvcc failed for {spec.name}: {proc.stderr.strip().splitlines()[-1:]}")
        return out.read_bytes()
