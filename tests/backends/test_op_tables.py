"""Every backend covers every IR op kind through its OpTable, or lists the kinds it does not support (and raises
its unsupported error for them); optional dependencies are imported through one helper with a one-line error.
Needs neither onnx nor tvm, except where a test says so."""

import sys

import pytest
from qcompile.backends import onnx as qonnx
from qcompile.backends.tvm import TvmBackendError, relax_builder, require_tvm, runtime

from qcompile.errors import QCompileError, require_extra
from qcompile.ir import reference
from qcompile.ir.graph import IRGraph
from qcompile.ir.ops import OP_SCHEMAS, OpTable
from qcompile.ir.types import DType, TensorInfo

TABLES = {"reference": reference.OPS, "onnx": qonnx.OPS, "relax": relax_builder.OPS}


@pytest.mark.parametrize("backend", list(TABLES))
def test_every_backend_implements_or_refuses_every_op_kind(backend):
    assert TABLES[backend].uncovered() == set()


def _relu_graph() -> IRGraph:
    g = IRGraph()
    g.inputs.append(g.add_value("x", TensorInfo(DType.FLOAT32, (1, 4))))
    g.add_op("relu", ["x"], "y", TensorInfo(DType.FLOAT32, (1, 4)))
    g.outputs.append("y")
    return g


def test_an_unsupported_kind_is_the_exporters_error(monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.setattr(qonnx, "OPS", OpTable("onnx", unsupported=OP_SCHEMAS))
    with pytest.raises(qonnx.OnnxExportError, match="IR op relu \\(\\) has no ONNX transcription"):
        qonnx.to_onnx(_relu_graph())


def test_an_unsupported_kind_is_the_relax_builders_error(monkeypatch):
    pytest.importorskip("tvm")
    monkeypatch.setattr(relax_builder, "OPS", OpTable("relax", unsupported=OP_SCHEMAS))
    with pytest.raises(TvmBackendError, match="IR op relu \\(\\) has no Relax transcription"):
        relax_builder.to_relax(_relu_graph())


def test_require_extra_returns_the_package_once_every_part_imports():
    import json

    assert require_extra("json", "json.decoder", extra="x", needed_for="y") is json


@pytest.mark.parametrize(("hidden", "call", "error", "message"), [
    ("onnx", lambda tmp: qonnx.to_onnx(_relu_graph()), qonnx.OnnxExportError,
     "the ONNX backend needs the onnx extra: pip install 'qcompile\\[onnx\\]'"),
    ("onnxruntime", lambda tmp: qonnx.session("model.onnx"), qonnx.OnnxExportError,
     "running ONNX models needs the onnx extra: pip install 'qcompile\\[onnx\\]'"),
    ("tvm.relax", lambda tmp: require_tvm(), TvmBackendError,
     "the TVM backend needs the tvm extra: pip install 'qcompile\\[tvm\\]'"),
    ("tvm.runtime.vm", lambda tmp: runtime.load(tmp), runtime.ArtifactError,
     "running TVM artifacts needs the tvm extra: pip install 'qcompile\\[tvm\\]'"),
])
def test_a_missing_extra_is_a_one_line_error_naming_it(hidden, call, error, message, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, hidden, None)  # what an uninstalled package looks like to importlib
    monkeypatch.delenv("TVM_USE_RUNTIME_LIB", raising=False)
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(error, match=f"^{message}$") as info:  # the whole message, one line
        call(tmp_path)
    assert isinstance(info.value, QCompileError)
