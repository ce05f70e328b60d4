"""CUDA specifics: int8 conv/dense on tensor cores (wmma IMMA), and the kernels compiled to a fatbin here.

The int8 rule applies :mod:`~qcompile.backends.tvm.int8_schedule` (dlight's ``MatmulInt8Tensorization`` without
its software-pipeline annotations, which crash 0.27's ``InjectSoftwarePipeline``) to every int8 x int8 -> int32
reduction (dlight's ``Matmul`` only tries it when every GEMM dimension exceeds 64, which leaves ResNet's
64-channel layers on dp4a), with the tile sizes the target's tuning table gives the GEMM's shape. Fused epilogues
(bias, requantize, ReLU) are inlined after the tensor-core store. Where dlight's Matmul raises on its own int8
tensorization it is re-run without it, and pooling windows are reduced one output element per thread.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qcompile.backends.tvm import TvmBackendError
from qcompile.backends.tvm.int8_schedule import TileConfig
from qcompile.backends.tvm.targets import TargetSpec


def _int8_rule(table: Mapping[str, TileConfig]) -> Any:
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
    from tvm.s_tir.schedule import ScheduleError

    from qcompile.backends.tvm.int8_schedule import DEFAULT, gemm_key, schedule_int8_gemm
    from qcompile.backends.tvm.tuning import checked_schedule

    class Int8TensorCore(GPUScheduleRule):
        """The int8 tensor-core schedule for every int8 GEMM: dlight's wmma tiles, or the tiles and instruction
        (wmma, or pipelined mma) the tuning table gives its shape. A tuned config is checked to compile for this
        very function (its epilogue or inlined producer may differ from the one tuned) and the default taken
        where it does not."""

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not is_int8_gemm(func):
                return None
            config = table.get(gemm_key(func), DEFAULT) if table else DEFAULT
            if config != DEFAULT:
                sch = checked_schedule(func, config, target)
                if sch is not None:
                    return sch
            try:
                return schedule_int8_gemm(func, DEFAULT)
            except (ScheduleError, AssertionError):  # e.g. strided convs (compute-at fails), a matrix product whose
                return None  # consumers do not inline (dlight's assertion): dlight's Matmul (dp4a) takes them

    return Int8TensorCore()


def _matmul_rule() -> Any:
    """dlight's Matmul; where its own int8 tensorization raises (it tries it when every GEMM dimension exceeds 64,
    e.g. ResNet-50's 128-channel 28x28 convs: "not a stage pipeline"), the same rule again with that path off,
    i.e. its CUDA-core schedule; where that raises too (a matrix product whose consumers do not inline: dlight
    asserts), none, so that the fallback rules schedule the function."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.gpu import matmul as dl_matmul
    from tvm.s_tir.schedule import ScheduleError

    class _NoTensorization:
        def apply(self, *_: Any) -> None:
            return None

    class MatmulFallback(dl.gpu.Matmul):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                return super().apply(func, target, tunable)
            except (ScheduleError, AssertionError):
                saved = dl_matmul.MatmulInt8Tensorization
                dl_matmul.MatmulInt8Tensorization = _NoTensorization
                try:
                    return super().apply(func, target, tunable)
                except (ScheduleError, AssertionError):
                    return None
                finally:
                    dl_matmul.MatmulInt8Tensorization = saved

    return MatmulFallback()


SMALL_WINDOW = 64  # a reduction this short (pooling windows: 3x3, 7x7) is cheapest serial in one thread


def _window_rule() -> Any:
    """Pooling (a reduction of one buffer over a small window) with one output element per thread, and its
    epilogue (requantize, cast) computed by that thread from a register: one kernel. dlight's
    Reduction/GeneralReduction rules give every output element a 256-thread block and a cross-thread reduction
    over its 9 window elements (ResNet-50's max pool took 49.7 ms of a 114.6 ms batch of 256 on an H100), and its
    Fallback launches the epilogue as a second kernel that reads the window results back from an int32 buffer."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight import gpu
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    class SmallWindowReduction(gpu.Fallback):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reductions = [i for i in infos if "R" in i.dom_kind()]
            if not reductions:
                return None
            for info in reductions:
                extents = [it.dom for it, kind in zip(info.iters, info.dom_kind()) if kind == "R"]
                if not all(isinstance(e, int | tirx.IntImm) for e in extents):
                    return None
                if math.prod(int(e) for e in extents) > SMALL_WINDOW or len(info.read_bufs(sch)) != 1:
                    return None
            return self.fused(sch, infos) or super().apply(func, target, tunable)

        def fused(self, sch: Any, infos: list[Any]) -> Any:
            """One reduction (its producers inlined) and the spatial blocks after it, in one kernel: the
            reduction's spatial loops over the threads, the epilogue computed at each thread's element, the
            window result in a register. None where the function is not of that shape."""
            infos = try_inline(sch, infos)
            if not infos or "R" not in infos[0].dom_kind() or any("R" in i.dom_kind() for i in infos[1:]):
                return None
            red = infos[0].block_rv
            loops = sch.get_loops(red)
            spatial = [lp for lp, kind in zip(loops, infos[0].dom_kind()) if kind == "S"]
            window = [lp for lp, kind in zip(loops, infos[0].dom_kind()) if kind == "R"]
            if len(spatial) + len(window) != len(loops) or not spatial:
                return None
            try:
                sch.reorder(*spatial, *window)
                bx, tx = sch.split(sch.fuse(*spatial), factors=[None, 256])
                sch.bind(bx, "blockIdx.x")
                sch.bind(tx, "threadIdx.x")
                for epilogue in infos[1:]:
                    sch.reverse_compute_at(epilogue.block_rv, tx)
                sch.set_scope(red, 0, "local")
                sch.decompose_reduction(red, window[0])
            except s_tir.ScheduleError:
                return None
            return sch

    return SmallWindowReduction()


def is_int8_gemm(func: Any) -> bool:
    """One reduction block reading two int8 buffers into int32, with a GEMM-shaped index map."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks

    if not isinstance(func, tirx.PrimFunc):
        return False
    sch = s_tir.Schedule(func)
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if blocks is None:
        return False
    block = sch.get(blocks[0])
    reads = [r.source.dtype for r in block.reads]
    return (len(reads) >= 2 and reads[:2] == ["int8", "int8"] and block.writes[0].source.dtype == "int32"
            and get_index_map(block) is not None)


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin.cuda`` (which the int8 rule needs) in seconds rather than minutes.

    It parses ~250 TVMScript functions, each calling ``inspect.stack()``; for every ``<frozen importlib>`` frame
    that walks all of ``sys.modules`` in ``inspect.getmodule`` (77 s of CPU with torch loaded). The module of a
    frame's file does not change during the import, so it is looked up once per file name.
    """
    if "tvm.s_tir.tensor_intrin.cuda" in sys.modules:
        return
    original = inspect.getmodule
    memo: dict[str, Any] = {}

    def getmodule(obj: Any, _filename: str | None = None) -> Any:
        if _filename is None:
            return original(obj)
        if _filename not in memo:
            memo[_filename] = original(obj, _filename)
        return memo[_filename]

    inspect.getmodule = getmodule
    try:
        import tvm.s_tir.tensor_intrin.cuda  # noqa: F401
    finally:
        inspect.getmodule = original


def fusion_passes() -> list[Any]:
    """Legalization and fusion: what turns the Relax graph into the fused functions that get scheduled (and
    that tuning tables key by their GEMM shape)."""
    from tvm import relax

    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]


def relax_pipeline(target: Any, table: Mapping[str, TileConfig] | None = None) -> Any:
    """The default CUDA pipeline of 0.27 with the int8 tensor-core rule first among the dlight rules, scheduling
    with the tile sizes of a tuning ``table`` (GEMM shape -> config, :mod:`qcompile.backends.tvm.tuning`)."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    import_tensor_intrinsics()
    schedule = fusion_passes() + [
        dl.ApplyDefaultSchedule(_int8_rule(table or {}), _matmul_rule(), _window_rule(), dl.gpu.GEMV(),
                                dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
    ]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(cuda.library_dispatch_passes(target) + schedule
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


def kernel_bodies(source: str) -> dict[str, str]:
    """Kernel name -> its CUDA (from the name on), for every ``__global__`` kernel of generated source; the source
    declares each kernel before defining it, and the definition is what is kept. TVM names a fused function's
    kernels ``<function>_kernel``, ``<function>_kernel_1``, ..."""
    kernels: dict[str, str] = {}
    for part in re.split(r'extern "C" __global__ void', source)[1:]:
        kernels[re.match(r"\s*(?:__launch_bounds__\(\d+\)\s*)?(\w+)\(", part).group(1)] = part
    return kernels


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


_MAKE_VECTOR = re.compile(r"\bmake_(u?)int([1-4])\(")


def repair_vectors(source: str) -> str:
    """0.27's CUDA codegen writes a vector of ``4n`` 8-bit lanes (a 16-byte copy of a padded conv input: its zero
    padding) as ``make_[u]int<n>`` with ``4n`` char arguments, which nvcc rejects; each such call becomes ``n``
    words packing four lanes each, lane ``i`` in byte ``i`` (little-endian, the lanes' order in memory). Lines
    are kept, so that nvcc's error lines still point into the source TVM wrote."""
    out, pos = [], 0
    for match in _MAKE_VECTOR.finditer(source):
        if match.start() < pos:
            continue
        unsigned, n, args, start = match.group(1), int(match.group(2)), [], match.end()
        depth, i = 1, start
        while depth:
            ch = source[i]
            depth += (ch == "(") - (ch == ")")
            if (ch == "," and depth == 1) or depth == 0:
                args.append(source[start:i].strip())
                start = i + 1
            i += 1
        if len(args) != 4 * n:
            continue
        lanes = [f"((unsigned)(unsigned char)({a}) << {8 * (k % 4)})" for k, a in enumerate(args)]
        words = [" | ".join(lanes[4 * w:4 * w + 4]) for w in range(n)]
        word = "unsigned" if unsigned else "int"
        out.append(source[pos:match.start()] + f"make_{unsigned}int{n}("
                   + ", ".join(f"({word})({w})" for w in words) + ")")
        pos = i
    return "".join(out) + source[pos:]


def nvcc(source: str, spec: TargetSpec, fmt: str = "fatbin") -> bytes:
    """Compile CUDA C with nvcc to a fatbin (the target's SASS and PTX) or to PTX for inspection; no fast-math,
    so that quantize's division and requantize's rounding are those of the reference. The source is compiled
    after :func:`repair_vectors` (the artifact's ``kernels.cu`` and digest stay those of TVM's source)."""
    exe = shutil.which("nvcc")
    if exe is None:
        raise TvmBackendError.with_parameters(f"{{target}} {spec.name} needs nvcc on PATH (the CUDA toolkit) to build "
                                              "the fatbin")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / f"kernels.{fmt}"
        src.write_text(repair_vectors(source))
        arch = dict(spec.attrs)["arch"].replace("sm_", "compute_")
        codes = [f"-gencode={g}" for g in spec.gencode] if fmt == "fatbin" else [f"-arch={arch}"]
        proc = subprocess.run([exe, f"--{fmt}", "-O3", *codes, "-o", str(out), str(src)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:]
            raise NvccError(f"nvcc failed for {spec.name}: {last}", proc.stderr)
        return out.read_bytes()


class NvccError(TvmBackendError):
    """nvcc rejected the generated CUDA; ``log`` is its whole stderr (errors as ``FILE(LINE): error: ...``)."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log

    def error_lines(self) -> set[int]:
        return {int(m) for m in re.findall(r"\((\d+)\): error", self.log)}
