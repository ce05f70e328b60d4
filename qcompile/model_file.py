"""The model-file contract: a Python file with ``build_model(**kwargs)`` and ``example_input()``.

Optional hooks ``calibration_data()``, ``eval_data()`` and ``train_data()`` return iterables of
``(inputs, labels)`` batches. Every way this can go wrong becomes one :class:`ModelFileError` line.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from qcompile.errors import CheckpointError, ModelFileError

REQUIRED = ("build_model", "example_input")
OPTIONAL = ("calibration_data", "eval_data", "train_data")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _line_in(exc: BaseException, path: Path) -> str:
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{path}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


@dataclass
class ModelFile:
    """A loaded model file and the entry points it defines."""

    path: Path
    module: ModuleType

    def hook(self, name: str) -> Callable[..., object] | None:
        fn = getattr(self.module, name, None)
        return fn if callable(fn) else None

    def build(self, **kwargs: object) -> nn.Module:
        """Call ``build_model(**kwargs)``; a keyword it does not take names the offending ``--model-arg``."""
        fn = self.hook("build_model")
        assert fn is not None
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [k for k in kwargs if k not in params and not takes_any]
        if unknown:
            accepted = ", ".join(k for k in params if params[k].kind is not inspect.Parameter.VAR_POSITIONAL)
            raise ModelFileError(
                f"{self.path}: build_model() takes no argument {unknown[0]!r} (--model-arg); it accepts: {accepted or 'nothing'}"
            )
        try:
            model = fn(**kwargs)
        except Exception as exc:
            raise ModelFileError(f"{_line_in(exc, self.path)}: build_model() failed: {_short(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ModelFileError(f"{self.path}: build_model() returned {type(model).__name__}, expected a torch.nn.Module")
        return model

    def example_input(self) -> tuple[torch.Tensor, ...]:
        """``example_input()`` as a tuple of tensors."""
        fn = self.hook("example_input")
        assert fn is not None
        try:
            value = fn()
        except Exception as exc:
            raise ModelFileError(f"{_line_in(exc, self.path)}: example_input() failed: {_short(exc)}") from None
        inputs = (value,) if isinstance(value, torch.Tensor) else value
        if not isinstance(inputs, tuple | list) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise ModelFileError(f"{self.path}: example_input() must return a Tensor or a tuple of Tensors")
        return tuple(inputs)

    def data(self, name: str) -> Iterable[tuple[torch.Tensor, torch.Tensor]] | None:
        """An optional data hook's batches, or None when the file does not define it."""
        fn = self.hook(name)
        if fn is None:
            return None
        try:
            return fn()  # type: ignore[return-value]
        except Exception as exc:
            raise ModelFileError(f"{_line_in(exc, self.path)}: {name}() failed: {_short(exc)}") from None


def load_model_file(path: str | Path) -> ModelFile:
    """Import a model file by path and check it defines the required entry points."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file {p} does not exist")
    if p.is_dir() or p.suffix != ".py":
        raise ModelFileError(f"model file {p} is not a .py file")
    name = f"qcompile_model_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(p.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelFileError(f"{_line_in(exc, p)}: model file failed to import: {_short(exc)}") from None
    finally:
        sys.path.remove(str(p.resolve().parent))
    missing = [fn for fn in REQUIRED if not callable(getattr(module, fn, None))]
    if missing:
        raise ModelFileError(
            f"model file {p} defines no {' and no '.join(f'{m}()' for m in missing)}; "
            "a model file needs build_model(**kwargs) -> nn.Module and example_input() -> Tensor (see README)"
        )
    return ModelFile(p, module)


def parse_model_args(items: Iterable[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs; values are Python literals where they parse (``0.5``, ``True``), else strings."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ModelFileError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. --model-arg stem=cifar")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def _unwrap(obj: object) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError("it is not a state dict (a mapping of parameter names to tensors)")


def _listing(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict with ``torch.load(weights_only=True)``; any mismatch is one line naming the keys."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {p} with weights_only=True: {_short(exc)}") from None
    try:
        state = dict(_unwrap(obj))
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {p}: {exc}") from None
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_listing(shapes, 2)})")
        raise CheckpointError(
            f"checkpoint {p} does not match the model: {'; '.join(parts)}; "
            "was it saved from another model, width or --model-arg?"
        )
    model.load_state_dict(state)
