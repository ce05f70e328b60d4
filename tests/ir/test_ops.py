"""Op schemas: attributes checked where an op is made and where an IR file is loaded, defaults filled in, the
file format unchanged; OpTable: the per-kind registry every backend dispatches through."""

import json

import numpy as np
import pytest

from qcompile.ir import reference
from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.ops import OP_SCHEMAS, OpTable, basic_index
from qcompile.ir.serialize import IRFormatError, load, save
from qcompile.ir.types import DType, TensorInfo

POOL = {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}


def _pool_graph() -> IRGraph:
    """x → quantize → maxpool2d (ceil_mode) → dequantize: small enough to edit its graph.json by hand."""
    g = IRGraph()
    g.inputs.append(g.add_value("x", TensorInfo(DType.FLOAT32, (1, 2, 5, 5))))
    g.add_op("quantize", ["x"], "q", TensorInfo(DType.INT8, (1, 2, 5, 5), np.float32(0.1), None, -127, 127))
    g.add_op("maxpool2d", ["q"], "p", TensorInfo(DType.INT8, (1, 2, 3, 3), np.float32(0.1), None, -127, 127),
             "pool @ model.py:3", **POOL, dilation=[1, 1], ceil_mode=True)
    g.add_op("dequantize", ["p"], "y", TensorInfo(DType.FLOAT32, (1, 2, 3, 3)))
    g.outputs.append("y")
    return g


def test_defaults_are_filled_in_in_schema_order():
    op = Op("maxpool2d", ["x"], "y", {"ceil_mode": True, **POOL})
    assert list(op.attrs) == ["kernel", "stride", "padding", "dilation", "ceil_mode"]
    assert op.attrs["dilation"] == (1, 1) and op.attrs["ceil_mode"] is True
    assert Op("requantize", ["a"], "q", {"multiplier": "m"}).attrs == {"relu": False, "mode": "float32",
                                                                      "multiplier": "m"}


@pytest.mark.parametrize(("kind", "attrs", "message"), [
    ("conv2d", {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}, "conv2d -> y: attribute 'groups' is missing"),
    ("conv2d", {"stride": [1], "padding": [0, 0], "dilation": [1, 1], "groups": 1},
     "attribute 'stride' must be a list of two ints, not \\[1\\]"),
    ("relu", {"inplace": True}, "relu -> y: unknown attribute 'inplace' \\(relu takes no attributes\\)"),
    ("mean", {"dims": [2, 3], "keepdim": 1}, "attribute 'keepdim' must be a bool"),
    ("slice", {"index": [{"slice": [0, 2]}]}, "attribute 'index' must be a list of index items"),
    ("requantize", {"mode": "dyadic", "mantissa": "m"},
     "a dyadic requantize takes the constant\\(s\\) 'mantissa', 'shift'"),
    ("requantize", {"mode": "fixed", "multiplier": "m"}, "attribute 'mode' must be 'float32' or 'dyadic'"),
    ("attention", {}, "unknown IR op kind 'attention'"),
    ("softmax", {}, "op softmax .*'dim'"),
    ("activation", {"function": "swish"}, "attribute 'function' must be one of sigmoid, silu"),
    ("activation", {"function": "clip"}, "clip needs 'min', 'max' or both"),
    ("activation", {"function": "leaky_relu"}, "leaky_relu needs 'alpha'"),
    ("activation", {"function": "rdiv"}, "rdiv needs 'alpha'"),
    ("activation", {"function": "sigmoid", "alpha": 0.1}, "sigmoid takes no attribute 'alpha'"),
    ("lut", {"function": "ReLU6", "max": 6.0}, "an op without 'activation' takes no attribute 'max'"),
])
def test_a_bad_attribute_is_refused_naming_the_op_and_the_attribute(kind, attrs, message):
    with pytest.raises(ValueError, match=message):
        Op(kind, ["x"], "y", attrs)


def test_a_refused_op_leaves_the_graph_unchanged():
    g = IRGraph()
    g.add_value("x", TensorInfo(DType.FLOAT32, (1, 4)))
    with pytest.raises(ValueError, match="unknown attribute 'axis'"):
        g.add_op("concat", ["x"], "y", TensorInfo(DType.FLOAT32, (1, 4)), axis=1)
    assert list(g.values) == ["x"] and not g.ops


def test_the_file_format_is_unchanged(tmp_path):
    """graph.json holds the attributes as given, in order, with their JSON types; a load and a save rewrite it
    byte for byte."""
    path = save(_pool_graph(), tmp_path / "ir")
    text = (path / "graph.json").read_text()
    pool = json.loads(text)["ops"][1]
    assert pool == {"kind": "maxpool2d", "inputs": ["q"], "output": "p", "source": "pool @ model.py:3",
                    "attrs": {**POOL, "dilation": [1, 1], "ceil_mode": True}}
    again = save(load(path), tmp_path / "again")
    assert (again / "graph.json").read_text() == text


def _edit_pool(path, edit) -> None:
    doc = json.loads((path / "graph.json").read_text())
    edit(doc["ops"][1]["attrs"])
    (path / "graph.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda a: a.pop("kernel"), "attribute 'kernel' is missing"),
    (lambda a: a.update(kernel="2x2"), "attribute 'kernel' must be a list of two ints, not '2x2'"),
    (lambda a: a.update(count_include_pad=False), "unknown attribute 'count_include_pad'"),
])
def test_a_bad_attribute_in_graph_json_is_an_ir_format_error(edit, message, tmp_path):
    path = save(_pool_graph(), tmp_path / "ir")
    _edit_pool(path, edit)
    with pytest.raises(IRFormatError, match=f"graph.json: op maxpool2d -> p: {message}"):
        load(path)


def test_an_absent_optional_attribute_loads_as_its_default(tmp_path):
    path = save(_pool_graph(), tmp_path / "ir")
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    expected = reference.run(load(path), x)["y"]
    _edit_pool(path, lambda a: a.pop("dilation"))
    g = load(path)
    assert g.ops[1].attrs["dilation"] == (1, 1)
    assert np.array_equal(reference.run(g, x)["y"], expected)


def test_a_table_lists_the_kinds_it_neither_implements_nor_refuses():
    table: OpTable = OpTable("toy", unsupported={"lut"})

    @table.implements("add")
    def add(*args):
        return args

    assert table.lookup("add") is add and table.lookup("lut") is None and table.lookup("mul") is None
    assert table.uncovered() == set(OP_SCHEMAS) - {"add", "lut"}
    with pytest.raises(ValueError, match="implemented twice"):
        table.implements("add")
    with pytest.raises(ValueError, match="implemented twice, or also listed as unsupported"):
        table.implements("lut")
    with pytest.raises(ValueError, match="'attention' is not an IR op kind"):
        table.implements("attention")
    with pytest.raises(ValueError, match="unknown op kinds listed as unsupported"):
        OpTable("toy", unsupported={"attention"})


def test_the_reference_raises_for_a_kind_it_does_not_implement(monkeypatch):
    monkeypatch.setattr(reference, "OPS", OpTable("reference", unsupported=OP_SCHEMAS))
    with pytest.raises(NotImplementedError, match="reference: no implementation for op quantize"):
        reference.run(_pool_graph(), np.zeros((1, 2, 5, 5), np.float32))


@pytest.mark.parametrize("index, rank, expected", [
    ([{"ellipsis": True}, {"index": 0}, {"index": 0}], 4, ([(2, 0, 1, 1), (3, 0, 1, 1)], [2, 3])),
    ([{"slice": [None, None, None]}, {"slice": [1, None, 2]}], 4, ([(1, 1, None, 2)], [])),
    ([{"slice": [None, None, None]}, {"index": -1}, {"ellipsis": True}], 3, ([(1, -1, None, 1)], [1])),
    ([{"ellipsis": True}, {"index": -2}], 2, ([(1, -2, -1, 1)], [1])),
    ([{"none": True}], 2, None),
])
def test_basic_index_expands_the_ellipsis_and_cuts_integers_to_one(index, rank, expected):
    assert basic_index(index, rank) == expected
