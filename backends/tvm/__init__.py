"""TVM backend: the integer IR as a Relax module, compiled for LLVM CPU and NVIDIA GPUs.

Modules: :mod:`.relax_builder` (IR → Relax), :mod:`.targets` (what ``cpu``/``sm80``/``sm90`` mean),
:mod:`.cuda` (tensor-core schedules and the fatbin), :mod:`.build` (compile and export an artifact).
Artifacts are run by :mod:`qcompile.backends.tvm.runtime`, which needs only the TVM runtime library.
"""

from __future__ import annotations

import os
from typing import Any

from qcompile.errors import QCompileError


class TvmBackendError(QCompileError):
    """An IR construct with no Relax transcription, or a TVM build that cannot be done here."""


def require_tvm() -> Any:
    """The ``tvm`` package, or a one-line error naming the extra to install."""
    if os.environ.get("TVM_USE_RUNTIME_LIB") == "1":
        raise TvmBackendError("building TVM artifacts needs the TVM compiler library: unset TVM_USE_RUNTIME_LIB")
    try:
        import tvm
        from tvm import relax  # noqa: F401  (the compiler library, not only the runtime)
    except ImportError:
        raise TvmBackendError("the TVM backend needs the tvm extra: pip install 'qcompile[tvm]'") from None
    return tvm
