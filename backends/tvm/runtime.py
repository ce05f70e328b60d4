"""Run a TVM artifact (``DIR/tvm/<target>/``) with only the TVM runtime library: no compiler, no torch.

Serve with ``TVM_USE_RUNTIME_LIB=1`` in the environment: ``import tvm`` then loads ``libtvm_runtime.so`` (a few
MB) instead of the 260 MB compiler library (the loader works without it too). For CUDA artifacts it loads the CUDA
runtime sidecar and answers TVM's load-time compile callback with the fatbin built by ``qcompile``, after
checking that it was compiled from the very source the module holds.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import QCompileError, require_extra


class ArtifactError(QCompileError):
    """An artifact folder is missing files, or cannot run on this machine."""


def serve_fatbin(tvm: Any, folder: Path, meta: dict[str, Any]) -> None:
    """Load the CUDA runtime sidecar and make TVM's load-time CUDA compile return the shipped fatbin
    (``meta["cuda"]``: its file name in ``folder`` and the SHA-256 of the source it was built from)."""
    import hashlib

    import tvm_ffi

    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise ArtifactError(f"cannot load the TVM CUDA runtime ({exc}); is this a machine with an NVIDIA "
                            "driver?") from None
    fatbin = (folder / meta["cuda"]["fatbin"]).read_bytes()
    digest = meta["cuda"]["source_sha256"]

    def compile_cuda(code: str, *_: Any) -> bytes:
        if hashlib.sha256(code.encode()).hexdigest() != digest:
            raise ArtifactError(f"{folder}: the library holds different CUDA source than {meta['cuda']['fatbin']} "
                                "was built from")
        return fatbin

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


class TvmModel:
    """A loaded artifact: ``model(x)`` takes float32 NCHW images of any count and returns the outputs."""

    def __init__(self, folder: str | os.PathLike[str], device: str | None = None) -> None:
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{self.folder}: not a TVM artifact folder ({exc})") from None
        if device is None:
            device = "cuda" if "cuda" in self.meta else "cpu"
        tvm = require_extra("tvm", "tvm.runtime.vm", extra="tvm", needed_for="running TVM artifacts",
                            error=ArtifactError)
        if "cuda" in self.meta:
            serve_fatbin(tvm, self.folder, self.meta)
        self.device = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self.vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(self.folder / "model.so")), self.device)
        with np.load(self.folder / "params.npz") as arrays:
            self.params = [tvm.runtime.tensor(arrays[f"p{i}"], self.device) for i in range(len(self.meta["params"]))]
        self.batch: int | None = self.meta["batch"]
        self._tvm = tvm

    def to_device(self, x: np.ndarray) -> Any:
        """Images as a TVM tensor on the artifact's device (to time the model without the copy)."""
        return self._tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), self.device)

    def run_device(self, x: Any) -> Any:
        """One call on a device tensor; the outputs stay on the device."""
        return self.vm["main"](x, *self.params)

    def run_batch(self, x: np.ndarray) -> list[np.ndarray]:
        """One call of the compiled function (``len(x)`` must be the artifact's batch if it has one)."""
        out = self.run_device(self.to_device(x))
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs for every image; a fixed-batch artifact runs in chunks, the last one zero-padded."""
        x = np.asarray(x, np.float32)
        expected = tuple(self.meta["input"]["shape"])
        if tuple(x.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ArtifactError(f"{self.folder}: the artifact takes inputs of shape (N, {shape}), "
                                f"got {tuple(x.shape)}")
        if self.batch is None or len(x) == self.batch:
            return self.run_batch(x)
        chunks: list[list[np.ndarray]] = []
        for start in range(0, len(x), self.batch):
            part = x[start:start + self.batch]
            n = len(part)
            if n < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - n, *part.shape[1:]), np.float32)])
            chunks.append([o[:n] for o in self.run_batch(part)])
        return [np.concatenate(outs) for outs in zip(*chunks)]


def load(folder: str | os.PathLike[str], device: str | None = None) -> TvmModel:
    """Load ``DIR/tvm/<target>/`` on ``cpu`` or ``cuda`` (default: the device it was built for)."""
    return TvmModel(folder, device)
