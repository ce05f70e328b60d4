"""The measured cost model: a latency profile of one runtime on one machine, used like the paper's cost models.

The paper's linear, quadratic and memory models are assumptions about hardware; on a CPU without 4-bit
kernels a 4-bit layer is no faster than an 8-bit one. A profile holds what ``qcompile profile`` measured: per
distinct layer shape (op, channels, kernel, stride, padding, dilation, groups, input size) and precision, the
time of that layer in the deployed model (its kernel and the ops that run after it up to the next layer, as
:mod:`qcompile.ir.layers` groups them), plus the model's overhead outside any layer (input quantization,
layout changes). A plan's predicted latency is the overhead plus the sum over its layers, in integer
nanoseconds so that a budget is checked exactly, like the other cost models.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx, nn

from qcompile.errors import QCompileError
from qcompile.quantization.spec import Precision

FORMAT, VERSION = "qcompile-latency-profile", 1
FLOAT = "float"


class ProfileError(QCompileError):
    """A latency profile that cannot be read, or that lacks a layer shape or precision a run needs."""


def precision_key(p: Precision) -> str:
    """``float`` for a float (bf16) layer, which runtimes without bf16 run in float32; else ``w8a8`` style."""
    return FLOAT if p.is_float else str(p)


def layer_key(module: nn.Module, node: fx.Node) -> str:
    """The shape a layer's latency depends on, as one string: ``conv2d 16>32 k3x3 s2x2 p1x1 d1x1 g1 @16x32x32``
    (input shape last, without the batch: a profile is measured at one batch size, which it records);
    ``dense 64>10 @64`` for a linear layer."""
    x = node.args[0]
    shape = "x".join(str(d) for d in x.meta["tensor_meta"].shape[1:]) if isinstance(x, fx.Node) else "?"
    if isinstance(module, nn.Linear):
        return f"dense {module.in_features}>{module.out_features} @{shape}"
    conv = module
    pair = ("x".join(str(v) for v in getattr(conv, k)) for k in ("kernel_size", "stride", "padding", "dilation"))
    k, s, p, d = pair
    return f"conv2d {conv.in_channels}>{conv.out_channels} k{k} s{s} p{p} d{d} g{conv.groups} @{shape}"


@dataclass
class LatencyProfile:
    """Milliseconds per (layer shape, precision), the overhead per precision, and where they were taken."""

    entries: dict[str, dict[str, float]] = field(default_factory=dict)
    overhead: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, precision: str, samples: Iterable[float]) -> None:
        """Record a shape's time at a precision: the mean of the layers of that shape measured (each already a
        median over runs), so that over the model they came from the layers' times keep their sum."""
        self.entries.setdefault(key, {})[precision] = round(statistics.fmean(samples), 6)

    def layer_ns(self, key: str, precision: Precision) -> int:
        """A layer's predicted time in integer nanoseconds."""
        row = self.entries.get(key)
        p = precision_key(precision)
        if row is None or p not in row:
            where = self.meta.get("model", "another model")
            raise ProfileError(f"the latency profile (measured on {where}) has no entry for {key} at {p}; "
                               f"measure this model's profile with qcompile profile")
        return math.ceil(row[p] * 1e6)

    def overhead_ns(self, quantized: bool) -> int:
        """The model's time outside its layers, for a quantized or a float model."""
        key = "quantized" if quantized else FLOAT
        return math.ceil(self.overhead.get(key, 0.0) * 1e6)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **self.meta, "overhead_ms": self.overhead,
                "layers_ms": self.entries}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        """Read a profile written by :meth:`save`; anything else is a :class:`ProfileError`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"cannot read latency profile {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ProfileError(f"{path} is not a qcompile latency profile (format {FORMAT} version {VERSION})")
        entries, overhead = data.pop("layers_ms", None), data.pop("overhead_ms", None)
        valid = (isinstance(entries, dict) and isinstance(overhead, dict)
                 and all(isinstance(r, dict) and all(isinstance(v, (int, float)) for v in r.values())
                         for r in entries.values()))
        if not valid:
            raise ProfileError(f"latency profile {path} is malformed: layers_ms and overhead_ms must map to numbers")
        meta = {k: v for k, v in data.items() if k not in ("format", "version")}
        return cls(entries, overhead, meta)
