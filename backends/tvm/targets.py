"""What the CLI's ``--target`` names mean: a TVM target, and for CUDA the nvcc code it ships."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from qcompile.backends.host import cpu_flags
from qcompile.backends.tvm import TvmBackendError


@dataclass(frozen=True)
class TargetSpec:
    """One artifact target. ``gencode`` are nvcc's -gencode pairs (CUDA only)."""

    name: str
    kind: str
    attrs: tuple[tuple[str, str | int], ...]
    gencode: tuple[str, ...] = ()
    cpu_flags: tuple[str, ...] = ()

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` (0.27 wants a dict, not a string); CUDA builds on an LLVM host."""
        import tvm

        config = {"kind": self.kind, **dict(self.attrs)}
        if self.is_cuda:
            config["host"] = {"kind": "llvm"}
        return tvm.target.Target(config)

    def host_can_run(self) -> bool:
        """Whether this machine can run the code: for a CPU target, its CPU has the instructions the code was
        compiled for; for a CUDA target, the driver reports a GPU."""
        if self.is_cuda:
            return cuda_device_count() > 0
        return bool(cpu_flags()) and set(self.cpu_flags) <= cpu_flags()


def cuda_device_count() -> int:
    """NVIDIA GPUs the driver reports (0 without a driver), asked of ``libcuda`` directly, without loading TVM's
    CUDA runtime."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


TARGETS: dict[str, TargetSpec] = {
    # x86-64 with AVX-512 VNNI (vpdpbusd): Cascade Lake and later Intel, Zen 4 and later AMD
    "cpu": TargetSpec("cpu", "llvm", (("mcpu", "cascadelake"),), cpu_flags=("avx512f", "avx512bw", "avx512_vnni")),
    # A100: SASS for sm_80 plus compute_80 PTX, so later GPUs can JIT the same artifact; shared memory per block
    # without opting in (48 KiB), which dlight's GEMV rules otherwise assume with a warning
    "sm80": TargetSpec("sm80", "cuda", (("arch", "sm_80"), ("max_shared_memory_per_block", 49152)),
                       gencode=("arch=compute_80,code=sm_80", "arch=compute_80,code=compute_80")),
    "sm90": TargetSpec("sm90", "cuda", (("arch", "sm_90"), ("max_shared_memory_per_block", 49152)),
                       gencode=("arch=compute_90,code=sm_90",)),
}

# plain x86-64 (AVX2): for hosts without VNNI, e.g. to test the CPU path on an older CI machine
TARGETS["cpu-generic"] = TargetSpec("cpu-generic", "llvm", (("mcpu", "x86-64-v3"),), cpu_flags=("avx2", "fma"))


def host_cpu_target() -> str:
    """``cpu`` where this machine can run its code (AVX-512 VNNI), else ``cpu-generic``: the CPU target whose
    artifacts can be checked here."""
    return "cpu" if TARGETS["cpu"].host_can_run() else "cpu-generic"


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise TvmBackendError(f"unknown TVM target {name!r}; use one of: {', '.join(TARGETS)}")
    return TARGETS[name]
