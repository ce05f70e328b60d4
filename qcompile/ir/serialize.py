"""The IR's on-disk format (numpy and json only; no torch needed to load or run it).

``DIR/graph.json``::

    {"format": "qcompile-ir", "version": 1, "inputs": [...], "outputs": [...],
     "values": {name: {"dtype": "int4", "shape": [...], "scale": 0.1 | [..per channel..] | null,
                       "axis": 0 | null, "qmin": -7, "qmax": 7, "constant": true}},
     "ops": [{"kind": "conv2d", "inputs": [...], "output": "...", "attrs": {...}, "source": "..."}],
     "metadata": {...}}

``DIR/tensors.npz`` holds the constants at their real width: int8 / uint8 / int32 / float32 arrays as such,
4-bit tensors packed two per byte by :mod:`qcompile.ir.int4` (low nibble first, two's complement for int4) as uint8 with their shape in
``graph.json``. Scales are float32 values written as JSON numbers (exact round trip). Writes are atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.artifacts import default_mode
from qcompile.errors import QCompileError
from qcompile.ir import int4
from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.types import DType, TensorInfo

FORMAT = "qcompile-ir"
VERSION = 1


class IRFormatError(QCompileError, ValueError):
    """A directory that is not a readable qcompile IR of a supported version: a user error (the CLI reports
    it as one line), and a ValueError for callers that load IR outside the CLI."""


_STORE = {DType.INT8: np.int8, DType.UINT8: np.uint8, DType.INT32: np.int32, DType.FLOAT32: np.float32}


def _scale_json(scale: np.ndarray | None) -> Any:
    if scale is None:
        return None
    return float(scale) if scale.ndim == 0 else [float(v) for v in scale]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save(graph: IRGraph, directory: str | os.PathLike[str]) -> Path:
    """Write ``graph`` to ``directory`` atomically (a half-written IR never replaces a good one)."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        arrays = {}
        values = {}
        for name, t in graph.values.items():
            entry = {"dtype": t.dtype.value, "shape": list(t.shape), "scale": _scale_json(t.scale), "axis": t.axis,
                     "qmin": t.qmin, "qmax": t.qmax, "constant": name in graph.constants}
            values[name] = entry
            if name in graph.constants:
                data = graph.constants[name]
                entry["shape"] = list(data.shape)
                if t.dtype in (DType.INT4, DType.UINT4):
                    arrays[name] = int4.pack(data)
                else:
                    arrays[name] = np.asarray(data).astype(_STORE[t.dtype])
        doc = {
            "format": FORMAT, "version": VERSION, "inputs": graph.inputs, "outputs": graph.outputs,
            "values": values,
            "ops": [{"kind": op.kind, "inputs": op.inputs, "output": op.output, "attrs": _jsonable(op.attrs),
                     "source": op.source} for op in graph.ops],
            "metadata": _jsonable(graph.metadata),
        }
        (tmp / "graph.json").write_text(json.dumps(doc, indent=1) + "\n")
        np.savez(tmp / "tensors.npz", **{f"t{i}": a for i, a in enumerate(arrays.values())},
                 __names__=np.array(list(arrays), dtype=object).astype(str))
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load(directory: str | os.PathLike[str]) -> IRGraph:
    """Read an IR written by :func:`save`."""
    d = Path(directory)
    try:
        doc = json.loads((d / "graph.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IRFormatError(f"{d} is not a qcompile IR directory: {exc}") from None
    if doc.get("format") != FORMAT:
        raise IRFormatError(f"{d}/graph.json is not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise IRFormatError(f"{d}: IR version {doc.get('version')} is not supported (this build reads {VERSION})")
    with np.load(d / "tensors.npz") as z:
        names = [str(n) for n in z["__names__"]]
        stored = {name: z[f"t{i}"] for i, name in enumerate(names)}
    g = IRGraph(inputs=list(doc["inputs"]), outputs=list(doc["outputs"]), metadata=doc.get("metadata", {}))
    for name, v in doc["values"].items():
        dt = DType(v["dtype"])
        scale = None if v["scale"] is None else np.asarray(v["scale"], dtype=np.float32)
        info = TensorInfo(dt, tuple(v["shape"]), scale, v["axis"], v["qmin"], v["qmax"])
        g.values[name] = info
        if v["constant"]:
            data = stored[name]
            if dt in (DType.INT4, DType.UINT4):
                data = int4.unpack(data, tuple(v["shape"]), dt.signed)
            elif dt is not DType.FLOAT32:
                data = data.astype(np.int32)
            g.constants[name] = data
    try:
        g.ops = [Op(o["kind"], list(o["inputs"]), o["output"], o["attrs"], o.get("source", "")) for o in doc["ops"]]
    except ValueError as exc:  # an unknown kind, or an attribute its schema refuses
        raise IRFormatError(f"{d}/graph.json: {exc}") from None
    return g
