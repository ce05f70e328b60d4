"""TVM backend: the integer IR as a Relax module, compiled for LLVM CPU and NVIDIA GPUs.

Modules: :mod:`.relax_builder` (IR → Relax), :mod:`.targets` (what ``cpu``/``sm80``/``sm90`` mean),
:mod:`.cuda` (tensor-core schedules and the fatbin), :mod:`.build` (compile and export an artifact).
Artifacts are run by :mod:`qcompile.backends.tvm.runtime`, which needs only the TVM runtime library.
"""

from __future__ import annotations

import os
from typing import Any

from qcompile.errors import QCompileError, require_extra


class TvmBackendError(QCompileError):
    """An IR construct with no Relax transcription, or a TVM build that cannot be done here."""


def require_tvm() -> Any:
    """The ``tvm`` package with its compiler (``tvm.relax``, not only the runtime), or a one-line error naming the
    extra to install."""
    if os.environ.get("TVM_USE_RUNTIME_LIB") == "1":
        raise TvmBackendError("building TVM artifacts needs the TVM compiler library: unset TVM_USE_RUNTIME_LIB")
    return require_extra("tvm", "tvm.relax", extra="tvm", needed_for="the TVM backend", error=TvmBackendError)
