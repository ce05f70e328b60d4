"""The model-file contract: a Python file with ``build_model(**kwargs)`` and ``example_input()``.

Optional hooks ``calibration_data()`` and ``eval_data()`` return iterables of ``(inputs, labels)`` batches
(calibration batches may be inputs alone). Every way this can go wrong becomes one :class:`ModelFileError` line.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import sys
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompile.errors import CheckpointError, DataError, ModelFileError, first_line
from qcompile.frontend.source_lines import user_frame
from qcompile.frontend.tracing import unwrapped

REQUIRED = ("build_model", "example_input")


def logits(output: object) -> torch.Tensor:
    """The logits of a model's output: the tensor, or the first of a tuple or list (a model that returns
    ``(logits, features)``, as the compiled model may)."""
    return output[0] if isinstance(output, tuple | list) else output  # type: ignore[return-value]


def _line_in(exc: BaseException, path: Path) -> str:
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{path}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


_HALF = (torch.float16, torch.bfloat16)


def in_float32(model: nn.Module) -> nn.Module:
    """``model`` with float16 / bfloat16 parameters and buffers made float32 (exactly: every half value is a
    float32 one), with a warning: the passes and the float reference compute in float32, and a checkpoint then loads
    into float32 tensors, unrounded."""
    tensors = [*model.parameters(), *model.buffers()]
    half = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.dtype in _HALF})
    if half:
        warnings.warn(f"the model holds {' and '.join(half)} tensors; it is compiled from their float32 values "
                      "(exact)", stacklevel=2)
        model.float()
    return model


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
            raise ModelFileError.with_parameters(
                f"{self.path}: build_model() takes no argument {unknown[0]!r} ({{model_arg}}); "
                f"it accepts: {accepted or 'nothing'}"
            )
        try:
            model = fn(**kwargs)
        except Exception as exc:
            raise ModelFileError(f"{_line_in(exc, self.path)}: build_model() failed: {first_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ModelFileError(f"{self.path}: build_model() returned {type(model).__name__}, expected a torch.nn.Module")
        return in_float32(unwrapped(model))

    def example_input(self) -> tuple[torch.Tensor, ...]:
        """``example_input()`` as a tuple of tensors."""
        fn = self.hook("example_input")
        assert fn is not None
        try:
            value = fn()
        except Exception as exc:
            raise ModelFileError(f"{_line_in(exc, self.path)}: example_input() failed: {first_line(exc)}") from None
        inputs = (value,) if isinstance(value, torch.Tensor) else value
        if not isinstance(inputs, tuple | list) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise ModelFileError(f"{self.path}: example_input() must return a Tensor or a tuple of Tensors")
        other = next((t.dtype for t in inputs if t.dtype != torch.float32), None)
        if other is not None:
            hint = "" if other.is_floating_point else " (a model that scales its images itself takes them as float32)"
            raise ModelFileError(f"{self.path}: example_input() returns a {str(other).removeprefix('torch.')} tensor; "
                                 f"the compiled model takes float32 inputs{hint}")
        return tuple(inputs)

    def data(self, name: str) -> Iterable[tuple[torch.Tensor, torch.Tensor]] | None:
        """An optional data hook's batches, or None when the file does not define it."""
        fn = self.hook(name)
        if fn is None:
            return None
        try:
            return fn()  # type: ignore[return-value]
        except Exception as exc:
            raise ModelFileError(f"{_line_in(exc, self.path)}: {name}() failed: {first_line(exc)}") from None


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
        raise ModelFileError(f"{_line_in(exc, p)}: model file failed to import: {first_line(exc)}") from None
    finally:
        sys.path.remove(str(p.resolve().parent))
    missing = [fn for fn in REQUIRED if not callable(getattr(module, fn, None))]
    if missing:
        raise ModelFileError(
            f"model file {p} defines no {' and no '.join(f'{m}()' for m in missing)}; "
            "a model file needs build_model(**kwargs) -> nn.Module and example_input() -> Tensor (see docs/model-files.md)"
        )
    return ModelFile(p, module)


def parse_model_args(items: Iterable[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs; values are Python literals where they parse (``0.5``, ``True``), else strings."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ModelFileError.with_parameters(f"{{model_arg}} {item!r}: expected KEY=VALUE, e.g. {{model_arg}} stem=cifar")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def _listing(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _names(keys: Iterable[object], limit: int = 5) -> str:
    return _listing([str(k) for k in keys], limit) or "none"


def _select(obj: object, key: str | None) -> object:
    """``obj[key]`` when a key is asked for, so an EMA copy is taken only on request."""
    if key is None:
        return obj
    if not isinstance(obj, Mapping) or key not in obj:
        found = _names(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError.with_parameters(f"it has no entry {key!r} ({{weights_key}}; found: {found})")
    return obj[key]


def _unwrap(obj: object) -> Mapping[str, object]:
    """Descend through training-script containers (``{"model": {"state_dict": ...}, "epoch": 3}``)."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = f"; its keys: {_names(obj)} (pick one with {{weights_key}})" if isinstance(obj, Mapping) else ""
        raise CheckpointError.with_parameters(
            "it is not a state dict (a mapping of parameter names to tensors) and holds none under "
            f"{', '.join(CONTAINER_KEYS)}{keys}"
        )
    return obj


def _check_tensors(state: Mapping[str, object]) -> None:
    """Every entry is a tensor, except a module's ``_extra_state``, which PyTorch loads as any value."""
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"its state dict has a key {k!r} that is not a string")
        if not isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
            raise CheckpointError(f"entry {k!r} of its state dict is a {type(v).__name__}, not a tensor")


def _without_prefix(state: Mapping[str, object], prefix: str) -> Mapping[str, object]:
    """``state`` with ``prefix`` (ending in a dot) taken off every key, its ``_metadata`` entries renamed alike."""
    stripped = OrderedDict((k[len(prefix):], v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == prefix[:-1] else k[len(prefix):], v)
            for k, v in metadata.items()
            if k == prefix[:-1] or k.startswith(prefix)
        )
    return stripped


def _strip_wrappers(state: Mapping[str, object]) -> Mapping[str, object]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes, nested too, renaming the ``_metadata`` entries alike."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = _without_prefix(state, prefix)
    return state


def _strip_holder(model: nn.Module, state: Mapping[str, object]) -> tuple[Mapping[str, object], str | None]:
    """Drop a prefix that every key shares when it names nothing in the model and the keys without it all do:
    the wrapper a training framework saves (PyTorch Lightning's ``model.``, a ``net.`` attribute). Returns the
    state and the prefix dropped."""
    heads = {k.partition(".")[0] for k in state}
    if len(heads) != 1 or not all("." in k for k in state):
        return state, None
    prefix = f"{heads.pop()}."
    expected = model.state_dict().keys()
    own = {k.partition(".")[0] for k in expected} | {name for name, _ in model.named_children()}
    stripped = _without_prefix(state, prefix)
    if prefix[:-1] in own or not set(stripped) <= set(expected):
        return state, None
    return stripped, prefix


def state_mismatch(model: nn.Module, state: Mapping[str, object], missing: list[str] | None = None,
                   unexpected: list[str] | None = None) -> str:
    """The keys missing from ``state`` and unexpected in it (as PyTorch reported them, else compared by name) and
    the shapes that differ, as one clause list."""
    expected = model.state_dict()
    if missing is None or unexpected is None:
        missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({_listing(shapes, 2)})")
    return "; ".join(parts)


def _strict_load(model: nn.Module, state: Mapping[str, object], where: str) -> None:
    """PyTorch decides (module-specific legacy handling applies); its key lists come from a post-hook."""
    found: dict[str, list[str]] = {}

    def record(module: nn.Module, keys: Any) -> None:
        found.update(missing=list(keys.missing_keys), unexpected=list(keys.unexpected_keys))

    handle = model.register_load_state_dict_post_hook(record)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = state_mismatch(model, state, found.get("missing", []), found.get("unexpected", []))
        if not detail:
            lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
            detail = lines[0] if lines else first_line(exc)
        raise CheckpointError.with_parameters(
            f"{where} does not match the model: {detail}; was it saved from another model, width or {{model_arg}}?"
        ) from None
    finally:
        handle.remove()


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _load_error(p: Path, exc: Exception) -> CheckpointError:
    """One line for a file ``torch.load(weights_only=True)`` refuses: not torch.save's at all, a damaged archive,
    or a pickled object (which says what to do)."""
    text = str(exc)
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        return CheckpointError(f"checkpoint {p} is empty")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle
        return CheckpointError(f"checkpoint {p} is not a file torch.save wrote (it starts with {head!r}); pass the "
                               "state dict saved with torch.save(model.state_dict(), PATH), or a .safetensors file")
    if "failed finding central directory" in text or "failed reading zip archive" in text:
        return CheckpointError(f"checkpoint {p} is truncated or damaged: its zip archive cannot be read")
    if "Weights only load failed" in text:
        found = _UNSUPPORTED_GLOBAL.search(text)
        what = f" ({found.group(1)})" if found else ""
        return CheckpointError(
            f"checkpoint {p} holds a pickled Python object{what}, such as a whole model saved with torch.save(model), "
            "which weights_only=True does not unpickle; save its state dict where the model class is defined: "
            "torch.save(model.state_dict(), PATH)")
    return CheckpointError(f"cannot load checkpoint {p} with weights_only=True: {first_line(exc)}")


def _safetensors(p: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors (the format timm and Hugging Face publish weights in: no pickled code)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"checkpoint {p} is a safetensors file, which needs the safetensors package: "
                              "pip install 'qcompile[safetensors]'") from None
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors checkpoint {p}: {first_line(exc)}") from None


def load_weights(model: nn.Module, path: str | Path, key: str | None = None) -> list[str]:
    """Load a checkpoint exactly when ``model.load_state_dict(strict=True)`` accepts it; a refusal is one line.

    ``torch.load(weights_only=True)`` never runs pickled code; a ``.safetensors`` file holds none. Training
    containers are unwrapped (``key`` picks an entry such as ``model_ema`` first) and DataParallel / torch.compile
    prefixes stripped, keeping the ``_metadata`` versions that BatchNorm's legacy loading reads, as is a
    framework's wrapper prefix that every key shares and the model lacks (returned as a note for the report). As
    with PyTorch, a refused load may have copied the matching tensors already.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        obj: object = _safetensors(p)
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _load_error(p, exc) from None
    try:
        state = _unwrap(_select(obj, key))
        _check_tensors(state)
    except CheckpointError as exc:
        raise CheckpointError.with_parameters(f"checkpoint {p}: {exc.template or exc}") from None
    state, prefix = _strip_holder(model, _strip_wrappers(state))
    _strict_load(model, state, f"checkpoint {p}")
    return [f"checkpoint {p}: every key began with {prefix!r} (a training wrapper's attribute), which was dropped"
            ] if prefix else []


def check_batches(model: nn.Module, example: Sequence[torch.Tensor],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None, what: str) -> None:
    """The first batch has the example input's shape except for the batch size, the model runs on it, and the
    labels index its logits (:func:`check_labels`).

    Calibrating, verifying or measuring accuracy on another shape would silently use costs and scales of the
    wrong model; a model that fails on a batch (one written for the example's batch size, ``x.view(1, -1)``)
    would fail deep inside a pass, so it is run here once, where the error can say which batch and which line."""
    first = next(iter(batches), None) if batches is not None else None
    if first is None:
        return
    if len(example) != 1 or not isinstance(first[0], torch.Tensor):
        held = "a tensor" if isinstance(first[0], torch.Tensor) else f"a {type(first[0]).__name__}"
        raise DataError(f"the {what} batches' inputs are {held} and example_input() gives {len(example)} "
                        "tensor(s): calibration, accuracy and verification take models of one input tensor, "
                        "whose batches are (images, labels); a model of several inputs compiles without data, for "
                        "its costs")
    got, want = tuple(first[0].shape), tuple(example[0].shape)
    if got[1:] != want[1:]:
        raise DataError(f"the {what} images have shape {got} but example_input() is {want}; they must agree except "
                        "for the batch size")
    try:
        with torch.no_grad():
            out = logits(model(first[0]))
    except Exception as exc:
        if got[0] != want[0] and _runs(model, example):
            hint = f"; it runs on example_input() at batch size {want[0]}: does it assume that batch size?"
        elif got[0] != want[0]:
            hint = "; it fails on example_input() too"
        else:
            hint = ""
        raise DataError(f"the model fails on the first {what} batch, of shape {got}, at {user_frame(exc)}: "
                        f"{first_line(exc)}{hint}") from None
    labels = _labels(batches)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and labels is not None:
        check_labels(out.shape[1], labels, what, getattr(getattr(batches, "data", None), "classes", ()))


def _labels(batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor | None:
    """Every label of the batches (None where a batch has none): from an image set's array without decoding
    its images, or from batches already in memory."""
    held = getattr(getattr(batches, "data", None), "labels", None)
    if held is not None:
        return torch.as_tensor(held)
    labels = [y for _, y in batches]
    return torch.cat([y.reshape(-1) for y in labels]) if labels and all(y is not None for y in labels) else None


def check_labels(logit_count: int, labels: torch.Tensor, what: str, classes: Sequence[str] = ()) -> None:
    """Labels index the model's logits: a label past the last logit is a miss in every accuracy, whatever the
    model computes (and stops training with an IndexError), so data for a model of fewer classes is refused. With
    the data's class names (``--data``), a model of more logits than classes is warned about: a hit then needs its
    first classes to be the data's, in sorted order."""
    if len(labels) == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    named = f" ({len(classes)} classes)" if classes else ""
    if low < 0 or high >= logit_count:
        raise DataError(f"the {what} labels run from {low} to {high}{named} but the model gives {logit_count} logits "
                        "per image, which labels index: is the data for another model?")
    if classes and logit_count > len(classes):
        warnings.warn(f"the model gives {logit_count} logits and the {what} data has {len(classes)} classes: "
                      f"top-1 counts a hit only if the model's first {len(classes)} classes are the data's "
                      f"({', '.join(classes[:3])}, ...) in this order", stacklevel=2)


def logit_count(model: nn.Module, example: Sequence[torch.Tensor]) -> int | None:
    """How many logits the model gives per image (run once on the example, in eval mode so that no statistics
    move), or None for an output that is not (N, classes)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits(model(*example))
    except Exception:  # said in one line, with the line, where the model is captured
        return None
    finally:
        model.train(was_training)
    return out.shape[1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None


def hook_batches(batches: Iterable[Any], hook: str, labelled: bool) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """A data hook's batches as ``(inputs, labels)``. Calibration needs no labels, so a calibration hook may yield
    image tensors alone (``labelled=False``: their labels are None); NumPy arrays are tensors; one-hot or
    probability labels ``(N, C)`` are read as their top class; a batch of another form (a dict, as Hugging Face
    loaders give) is one line saying which pairs to yield."""
    for batch in batches:
        if isinstance(batch, np.ndarray | torch.Tensor) and not labelled:
            yield torch.as_tensor(batch), None
            continue
        if isinstance(batch, Mapping):
            keys = ", ".join(repr(k) for k in batch)
            raise DataError(f"{hook}() yields dicts (keys {keys}); yield (inputs, labels) pairs instead, e.g. "
                            "(batch['image'], batch['label'])")
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            held = f"a {type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, tuple | list) else "")
            need = "(inputs, labels) pairs" if labelled else "(inputs, labels) pairs or input tensors"
            raise DataError(f"{hook}() yields {held}; it must yield {need}")
        inputs, labels = batch
        inputs = torch.as_tensor(inputs) if isinstance(inputs, np.ndarray) else inputs
        labels = torch.as_tensor(labels)
        if labels.ndim == 2:
            labels = labels.argmax(dim=1) if labels.shape[1] > 1 else labels[:, 0]
        if labels.is_floating_point():
            labels = labels.long()
        yield inputs, labels


def _runs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> bool:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception:
        return False
    return True

