"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from types import ModuleType
from typing import TypeVar

_PARAMETER = re.compile(r"\{([a-z_]+)\}")
E = TypeVar("E", bound="QCompileError")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: how an exception from torch or a user's code is quoted in one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class QCompileError(Exception):
    """Base class: the message alone tells the user what to fix.

    A message that names library parameters is built with :meth:`with_parameters` from a template with
    ``{parameter}`` fields: read from Python it names the API's parameters (``max_degradation``), and a front end
    words them its own way with :meth:`worded` (the CLI as its flags), so no library module names a CLI flag.
    """

    template: str | None = None

    @classmethod
    def with_parameters(cls: type[E], template: str) -> E:
        exc = cls(_PARAMETER.sub(lambda m: m.group(1), template))
        exc.template = template
        return exc

    def parameters(self) -> list[str]:
        """The parameters the message names."""
        return _PARAMETER.findall(self.template or "")

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each parameter called as ``names`` says (by its API name where it says nothing)."""
        if self.template is None:
            return str(self)
        return _PARAMETER.sub(lambda m: names.get(m.group(1), m.group(1)), self.template)


class ModelFileError(QCompileError):
    """The model file is missing, does not import, or lacks an entry point."""


class CheckpointError(QCompileError):
    """A checkpoint cannot be read or does not match the model."""


class CaptureError(QCompileError):
    """torch.fx could not capture the model."""


class RecipeError(QCompileError):
    """An unknown recipe, or an override that is malformed, matches nothing, or cannot be honoured."""


class PipelineError(QCompileError):
    """A pass ran without what it requires, or broke the graph."""


class DataError(QCompileError):
    """A data set path is wrong, empty, or not in a supported layout."""


class InvalidValueError(QCompileError):
    """A value given for one of the library's parameters cannot be used.

    The offending ``value`` and what is wrong with it (``reason``) are attributes, and ``field`` names the
    parameter as the library's API calls it, so that a front end can word the message in its own terms with
    :meth:`worded` (the CLI names its flag) while the library's message names no front end's options.
    """

    field = "value"
    """The parameter, as the library's API calls it."""
    noun = "value"
    """How the library's own message names it."""

    def __init__(self, value: object, reason: str) -> None:
        self.value, self.reason = value, reason
        super().__init__(self.naming(self.noun))

    def naming(self, name: str) -> str:
        """The message with the parameter called ``name``."""
        return f"{name} {self.value!r}: {self.reason}"

    def worded(self, names: Mapping[str, str]) -> str:
        return self.naming(names[self.field]) if self.field in names else str(self)


class BudgetError(InvalidValueError, RecipeError):
    """A cost budget that is not ``KIND=RATIO`` with a known KIND and RATIO in (0, 1]."""

    field = noun = "budget"


class BitWidthsError(InvalidValueError, RecipeError):
    """Candidate bit widths that are not a comma-separated list of integers."""

    field, noun = "bits", "bit widths"


class DegradationError(InvalidValueError, RecipeError):
    """A degradation bound for mixed precision that is not a finite number >= 0."""

    field, noun = "max_degradation", "degradation bound"


class OutputDirError(InvalidValueError):
    """An output folder a run could not replace. ``action`` (``create``, ``write``) is set when the folder is
    fine but doing that to it failed, for the message to say so."""

    field, noun = "out", "output folder"

    def __init__(self, value: object, reason: str, action: str | None = None) -> None:
        self.action = action
        super().__init__(value, reason)

    def naming(self, name: str) -> str:
        if self.action:
            return f"cannot {self.action} {name} {self.value}: {self.reason}"
        return f"{name} {self.value} {self.reason}"


def require_extra(*modules: str, extra: str, needed_for: str,
                  error: type[QCompileError] = QCompileError) -> ModuleType:
    """The first of ``modules`` once all of them import (a package, then the parts of it the caller needs): the
    optional dependencies (onnx, tvm, ...) are imported where used, and a missing one is ``error`` in one line
    naming the extra that installs it. Here because every layer, the runtime-only TVM loader included, may
    import this module."""
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError:
        raise error(f"{needed_for} needs the {extra} extra: pip install 'qcompile[{extra}]'") from None
    return loaded[0]
