"""Which line of the user's code to blame: for an exception, the innermost frame in model code, and for a graph
node, the frame that created it (recorded at trace time). Model code is everything but torch and qcompile, so a
message names the user's ``forward`` line rather than the tracer's or a pass's."""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
from collections.abc import Sequence

import torch
from torch import fx

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_PLUMBING = (os.path.join(_TORCH_DIR, "fx") + os.sep, os.path.join(_TORCH_DIR, "nn", "modules", "module.py"))
_QCOMPILE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_BUNDLED_MODELS = os.path.join(_QCOMPILE_DIR, "models") + os.sep


def _package_dir(name: str) -> str:
    """Where an installed subpackage lives: ``qcompile.passes`` and ``qcompile.backends`` are folders beside
    ``qcompile/`` in a source checkout (pyproject's package-dir), inside it in a wheel."""
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None and spec.origin else os.path.join(_QCOMPILE_DIR, name.split(".")[-1], "")
    return os.path.dirname(os.path.abspath(origin)) + os.sep


_QCOMPILE_DIRS = tuple(dict.fromkeys((_QCOMPILE_DIR, *map(_package_dir, ("qcompile.passes", "qcompile.backends")))))
_FRAME = re.compile(r'File "(.+)", line (\d+)')


def is_model_code(path: str) -> bool:
    """Anything but torch and qcompile: the user's files and installed packages (torchvision is not torch).
    qcompile's bundled models are model code too."""
    if path.startswith(_TORCH_DIR):
        return False
    return not path.startswith(_QCOMPILE_DIRS) or path.startswith(_BUNDLED_MODELS)


def _is_torch_model_code(path: str) -> bool:
    """torch's own modules (a root ``nn.Sequential``'s forward), not the tracer or the module-call wrapper."""
    return path.startswith(_TORCH_DIR) and not path.startswith(_TORCH_PLUMBING)


def _blamed_frame(paths: Sequence[str]) -> int | None:
    """Index of the innermost frame in model code, else of the innermost in torch's own modules (better than no
    location when the whole model is torch's), else None."""
    for wanted in (is_model_code, _is_torch_model_code):
        hits = [i for i, p in enumerate(paths) if wanted(p)]
        if hits:
            return hits[-1]
    return None


def user_frame(exc: BaseException) -> str:
    """``file:line`` and the code of the frame to blame for ``exc``: the user's offending line where there is one."""
    frames = traceback.extract_tb(exc.__traceback__)
    i = _blamed_frame([os.path.abspath(f.filename) for f in frames])
    if i is None:
        return "unknown location"
    f = frames[i]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f"{f.filename}:{f.lineno}{code}"


def source_location(node: fx.Node) -> str:
    """``file:line`` of the code that created ``node`` (recorded at trace time), or ``unknown location``."""
    frames = _FRAME.findall(node.stack_trace or "")
    i = _blamed_frame([os.path.abspath(path) for path, _ in frames])
    return "unknown location" if i is None else f"{os.path.abspath(frames[i][0])}:{frames[i][1]}"
