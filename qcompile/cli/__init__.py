"""The ``qcompile`` command line: ``qcompile MODEL.py`` compiles (:mod:`qcompile.cli.compile`, its artifacts
built and verified by :mod:`qcompile.cli.artifacts`), ``qcompile train|sweep MODEL.py`` trains
(:mod:`qcompile.cli.train`), ``qcompile profile MODEL.py`` measures a latency profile
(:mod:`qcompile.cli.profile`); every flag is defined and checked in :mod:`qcompile.cli.arguments`. A user error is
one line naming the flag to fix, and exit status 2."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from qcompile.artifacts import STORAGE_ERRORS
from qcompile.errors import QCompileError

__all__ = ["build_parser", "main", "resolve_data"]  # the parser and data resolution serve the benchmarks too
_LAZY = {"build_parser": "qcompile.cli.arguments", "resolve_data": "qcompile.cli.compile"}


def __getattr__(name: str) -> Any:
    """``build_parser`` and ``resolve_data``, imported when asked for: this module loads without torch, so that
    :func:`main` can load torch with interrupts deferred."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcompile.cli' has no attribute {name!r}")


def _one_line_warnings() -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints each warning as one line, once per run: a model's own warning
    (a deprecated call in its forward) is raised again each time the model runs (capture, calibration,
    verification), each time from another frame."""
    shown: set[str] = set()

    def show(message: Warning | str, *_: object, **__: object) -> None:
        text = str(message).strip()
        line = f"qcompile: warning: {text.splitlines()[0] if text else type(message).__name__}"
        if line not in shown:
            shown.add(line)
            print(line, file=sys.stderr)

    return show


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that its output transaction cleans up as on Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM while torch and numpy load, acted on once they have loaded: raised inside a C extension's
    import, the interrupt came out as an ImportError traceback (numpy: "cannot load module more than once per
    process") with exit status 1."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    saved = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    if received:
        raise Terminated if received[0] == signal.SIGTERM else KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qcompile`` console script; user errors are one line and exit status 2, warnings
    (a cache entry recomputed, a degenerate range) one line each; SIGTERM stops a run as Ctrl-C does (nothing
    half-written is left), exit status 143."""
    argv = sys.argv[1:] if argv is None else list(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings()
            return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def console() -> None:
    """The ``qcompile`` command: :func:`main`, then exit with its status. Once ``main`` has returned, the run is
    complete or cleaned up; a Ctrl-C or SIGTERM while the interpreter then shuts down (torch's exit handlers) could
    only print a traceback, so both are ignored from there on."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _main(argv: list[str]) -> int:
    try:
        with _signals_deferred():
            # torch.fx imports torch._dynamo on its first trace: a SIGTERM inside that import left it half-loaded,
            # and the run then stopped with a trace error ("module 'torch._dynamo' has no attribute 'guards'")
            import torch._dynamo  # noqa: F401

            from qcompile.cli.arguments import build_parser, in_flags
            from qcompile.cli.compile import compile_model
        if argv and argv[0] in ("train", "sweep"):  # subcommands; anything else is a model file
            from qcompile.cli.train import run_subcommand

            return run_subcommand(argv)
        if argv and argv[0] == "profile":
            from qcompile.cli.profile import profile_model

            return profile_model(argv[1:])
        return compile_model(build_parser().parse_args(argv))
    except QCompileError as exc:
        print(f"qcompile: error: {in_flags(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        print("qcompile: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error of the compile
        sys.stderr.close()
        return 0
    except OSError as exc:  # outside an output folder (a training run's checkpoint, a temporary file)
        if exc.errno not in STORAGE_ERRORS:
            raise
        print(f"qcompile: error: cannot write {exc.filename or 'a file'}: {exc.strerror}", file=sys.stderr)
        return 2
