"""The layering of docs/architecture.md, checked on the source so that a new cross-layer import fails here.

Every ``.py`` under ``qcompile/``, ``passes/`` and ``backends/`` is parsed (never imported: the check must not
need torch, onnx or tvm) under the name it is installed as, and every import it makes is collected, including
relative imports and the lazy ones inside functions, since a lazy import still ties the layers together. Each
rule is one row of :data:`RULES`; the violations that exist today are listed in the row, so the list can only
shrink on purpose and a new one fails. One test does import: the TVM loader, in a subprocess, to check that
importing it (and the packages above it) loads no torch and no TVM compiler.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_AS = {"qcompile": "qcompile", "passes": "qcompile.passes", "backends": "qcompile.backends"}
"""Source folder → package name, as pyproject.toml's package-dir maps them."""

CLI = ("qcompile.__main__", "qcompile.cli")
PIPELINES = "qcompile.pipelines"
"""The one library module that imports the passes: it assembles every pass list."""
TVM_LOADER = "qcompile.backends.tvm.runtime"
"""Loads and runs TVM artifacts where only ``libtvm_runtime.so`` is installed (``TVM_USE_RUNTIME_LIB=1``)."""


@dataclass(frozen=True)
class Rule:
    """What the modules of one layer may import."""

    name: str
    layer: tuple[str, ...]
    """Module prefixes the rule applies to."""
    forbidden: tuple[str, ...] = ()
    """Import prefixes the layer may not use."""
    only: tuple[str, ...] | None = None
    """When set, every import that is not the standard library's must fall under one of these prefixes."""
    exempt: tuple[str, ...] = ()
    """Module prefixes inside ``layer`` that the rule does not constrain (another layer, or the CLI)."""
    exceptions: frozenset[tuple[str, str]] = frozenset()
    """``(module, imported prefix)`` violations that exist today, listed so that only a new one fails."""


RULES = (
    Rule("the IR is numpy only", layer=("qcompile.ir",),
         only=("numpy", "qcompile.ir", "qcompile.errors"),
         exceptions=frozenset({("qcompile.ir.serialize", "qcompile.artifacts")})),
    Rule("backends consume the IR: no torch, no passes, no fx graph, no CLI", layer=("qcompile.backends",),
         only=("numpy", "onnx", "onnxruntime", "tvm", "tvm_ffi", "qcompile.backends", "qcompile.ir",
               "qcompile.errors", "qcompile.artifacts")),
    Rule("the TVM loader (qcompile.backends.tvm.runtime) runs with the runtime library alone: no compiler, no torch",
         layer=(TVM_LOADER,), only=("numpy", "tvm", "tvm_ffi", "qcompile.errors"),
         forbidden=("tvm.relax", "tvm.s_tir", "tvm.tirx", "tvm.target", "tvm.ir", "tvm.te", "tvm.script")),
    Rule("passes know no backend and no CLI", layer=("qcompile.passes",),
         forbidden=("qcompile.backends", "qcompile.cli", "qcompile.train")),
    Rule("the pass lists (qcompile.pipelines) know no backend", layer=(PIPELINES,),
         forbidden=("qcompile.backends",)),
    Rule("the library imports no passes (pass lists come from qcompile.pipelines) and knows no backend",
         layer=("qcompile",), forbidden=("qcompile.passes", "qcompile.backends"),
         exempt=("qcompile.passes", "qcompile.backends", PIPELINES, *CLI),
         exceptions=frozenset({("qcompile.search.sensitivity", "qcompile.passes._layerwise"),
                               ("qcompile.train.qat", "qcompile.passes.align_add_scales"),
                               ("qcompile.train.qat", "qcompile.passes.insert_quantizers"),
                               ("qcompile.train.qat", "qcompile.passes.load_bounds")})),
    Rule("nothing imports the CLI but the CLI", layer=("qcompile",), forbidden=("qcompile.cli",), exempt=CLI),
)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_name(path: Path) -> str:
    """The installed dotted name of a source file under :data:`ROOT`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([INSTALLED_AS[parts[0]], *parts[1:]])


def imports(module: str, source: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``source``, relative ones resolved against ``module``.

    ``from a.b import c`` yields ``a.b.c``: ``c`` may be a submodule (``from qcompile import cli``), and a name
    inside ``a.b`` still falls under ``a.b``'s prefix."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"


def violations(rule: Rule, module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that ``rule`` forbids and does not list as an exception."""
    if not _under(module, rule.layer) or _under(module, rule.exempt):
        return []
    found = []
    for line, name in imports(module, source, is_package):
        bad = _under(name, rule.forbidden) or (
            rule.only is not None and name.split(".")[0] not in sys.stdlib_module_names
            and not _under(name, rule.only))
        if bad and not any(m == module and _under(name, (p,)) for m, p in rule.exceptions):
            found.append(f"{module}:{line} imports {name}")
    return found


def _sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py")
            for folder in INSTALLED_AS for p in sorted((ROOT / folder).rglob("*.py"))}


SOURCES = _sources()


def test_every_layer_is_scanned_under_its_installed_name() -> None:
    assert {"qcompile.ir.graph", "qcompile.passes.load_bounds", "qcompile.backends.tvm.build", TVM_LOADER,
            "qcompile.cli", "qcompile.cli.train"} <= SOURCES.keys()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_layer_rule_holds(rule: Rule) -> None:
    found = [v for module, (source, pkg) in SOURCES.items() for v in violations(rule, module, source, pkg)]
    assert not found, f"{rule.name} (see docs/architecture.md):\n" + "\n".join(found)


IR, BACKENDS, TVM_LOADER_RULE, PASSES, PIPELINE_LISTS, LIBRARY, NO_CLI = RULES


@pytest.mark.parametrize(("rule", "module", "source"), [
    (BACKENDS, "qcompile.backends.onnx", "from qcompile.passes import fold_bn\n"),
    (BACKENDS, "qcompile.backends.onnx", "def export():\n    from ..passes import fold_bn\n"),
    (TVM_LOADER_RULE, TVM_LOADER, "def load():\n    from tvm import relax\n"),
    (TVM_LOADER_RULE, TVM_LOADER, "from qcompile.backends.tvm.build import build\n"),
    (TVM_LOADER_RULE, TVM_LOADER, "import torch\n"),
    (IR, "qcompile.ir.graph", "import torch\n"),
    (IR, "qcompile.ir.serialize", "from qcompile.reporting.verify import verify_reference\n"),
    (PASSES, "qcompile.passes.calibrate", "from qcompile import cli\n"),
    (LIBRARY, "qcompile.reporting.report", "from qcompile.passes.fold_bn import fold_bn\n"),
    (LIBRARY, "qcompile.search.sensitivity", "from qcompile.passes import FoldBatchNorm\n"),
    (LIBRARY, "qcompile.train.qat", "from qcompile.passes import InsertQuantizers\n"),
    (PIPELINE_LISTS, "qcompile.pipelines", "from qcompile.backends.onnx import export\n"),
    (NO_CLI, "qcompile.train.run", "from qcompile.cli.train import run_subcommand\n"),
], ids=lambda v: v.name if isinstance(v, Rule) else None)
def test_checker_reports_a_forbidden_import(rule: Rule, module: str, source: str) -> None:
    """The checker itself: a forbidden import (absolute, relative or lazy) placed in a real module is reported,
    and a listed exception covers only the import it names (serialize may import artifacts, not verify)."""
    assert violations(rule, module, source)


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
"""A command-line flag inside a message: ``--out``, ``--max-degradation``."""


def raised_flags(source: str) -> Iterator[tuple[int, str]]:
    """``(line, flag)`` of every flag named by a string literal (f-strings' parts included) inside a ``raise``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield from ((node.lineno, flag) for flag in FLAG.findall(part.value))


def test_only_the_cli_names_its_flags() -> None:
    """Library code raises errors whose messages name no flag: they name parameters
    (``QCompileError.with_parameters``, ``InvalidValueError``) and the CLI words them as its flags
    (``qcompile.cli.arguments.in_flags``), so the library reads right from Python and a flag renamed in the CLI
    is renamed in one package."""
    found = [f"{module}:{line} raises a message naming {flag}"
             for module, (source, _) in SOURCES.items() if not _under(module, CLI)
             for line, flag in raised_flags(source)]
    assert not found, "name it with QCompileError.with_parameters (docs/architecture.md):\n" + "\n".join(found)


def test_the_cli_words_every_parameter_the_library_names() -> None:
    """Every ``{parameter}`` of a ``with_parameters`` message, and every ``InvalidValueError``'s field, has a flag."""
    from qcompile.cli.arguments import FLAGS
    from qcompile.errors import InvalidValueError

    named = {(module, field) for module, (source, _) in SOURCES.items() for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "with_parameters"
             for part in ast.walk(node) if isinstance(part, ast.Constant) and isinstance(part.value, str)
             for field in re.findall(r"(?<!\{)\{([a-z_]+)\}(?!\})", part.value)}
    named |= {("qcompile.errors", cls.field) for cls in InvalidValueError.__subclasses__()}
    assert named and not {f"{module}: {{{field}}}" for module, field in named if field not in FLAGS}


def test_checker_reports_a_flag_in_a_raise() -> None:
    source = ('def f(text):\n'
              '    """Parse --budget."""\n'
              '    note = "--bits"\n'
              '    raise ValueError(f"--budget {text!r}: e.g. linear=0.3, not -1 or --" + "; see --max-degradation")\n')
    assert sorted(raised_flags(source)) == [(4, "--budget"), (4, "--max-degradation")]


def test_importing_the_tvm_loader_loads_no_compiler_and_no_torch() -> None:
    """What the source rule cannot see: the packages above the loader (``qcompile``, ``qcompile.backends``,
    ``qcompile.backends.tvm``) run on import too, and must leave torch, TVM's compiler and the builder unloaded
    (``require_tvm`` is called by the builder, never at package import). Needs neither tvm nor torch."""
    script = ("import sys, qcompile.backends.tvm.runtime\n"
              "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tvm', 'onnx')\n"
              "             or m.startswith(('qcompile.backends.tvm.', 'qcompile.passes', 'qcompile.ir'))\n"
              "             and m != 'qcompile.backends.tvm.runtime')\n"
              "assert not bad, bad\n")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
