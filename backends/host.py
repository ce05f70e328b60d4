"""What this machine's CPU offers, as the backends need to know it: which instructions compiled code may use and
which integer kernels onnxruntime takes."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``avx2``, ``avx512_vnni``, ...); empty where unknown."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def u8s8_pairs_saturate() -> bool:
    """Whether onnxruntime's uint8 × int8 kernels on this CPU add byte products in pairs into 16 bits, saturating
    (``vpmaddubsw``: x86-64 with AVX2, or AVX-512 without VNNI), so that two products past 32,767 together change
    the sum. VNNI and AMX add them in 32 bits; other architectures do not pair them so. An x86-64 CPU whose flags
    are unknown is taken to saturate."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}
