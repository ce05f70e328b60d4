"""The ONNX transcription of the IR runs in onnxruntime and matches the reference interpreter."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from qcompile.backends import onnx as qonnx  # noqa: E402
from qcompile.ir import reference  # noqa: E402
from tests.passes.test_lower_integer import FunctionalNet, ModuleNet, _lowered  # noqa: E402


@pytest.mark.parametrize("flavour", ["serving", "compact"])
@pytest.mark.parametrize("build", [FunctionalNet, ModuleNet])
def test_onnxruntime_matches_reference_mostly4bit(build, flavour):
    import torch

    torch.manual_seed(0)  # the model's initial weights, independent of what ran before
    ir = _lowered(build(), "mostly4bit").context.ir
    model = qonnx.to_onnx(ir, flavour)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcompile.flavour"] == flavour and meta["qcompile.recipe"] == "mostly4bit"
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    ref = reference.run(ir, x)[ir.outputs[0]]
    out = qonnx.run(qonnx.session(model), [x])[0]
    acc_scale = ir.values[ir.producer(ir.outputs[0]).inputs[0]].scale
    diff = np.abs(np.rint(ref / acc_scale) - np.rint(out / acc_scale))
    assert (diff == 0).mean() >= 0.999
    assert (ref.argmax(1) == out.argmax(1)).all()


def test_compact_stores_packed_int4():
    from onnx import TensorProto

    ir = _lowered(ModuleNet(), "mostly4bit").context.ir
    compact, serving = qonnx.to_onnx(ir, "compact"), qonnx.to_onnx(ir, "serving")
    assert any(t.data_type == TensorProto.INT4 for t in compact.graph.initializer)
    assert not any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in serving.graph.initializer)
    assert compact.ByteSize() < serving.ByteSize()


def test_dyadic_ir_is_refused():
    from qcompile.passes import LowerInteger
    from qcompile.pipeline import Pipeline

    res = _lowered(ModuleNet(), "int8")
    Pipeline([LowerInteger(dyadic=True)]).run_graph(res.graph_module, res.context)
    with pytest.raises(qonnx.OnnxExportError, match="dyadic"):
        qonnx.to_onnx(res.context.ir)


@pytest.mark.parametrize("recipe", ["int8", "mostly4bit"])
def test_serving_runs_every_conv_and_dense_as_integer_kernels(recipe, tmp_path):
    import onnx
    import torch

    from qcompile import Pipeline, get_recipe
    from qcompile.models import resnet20_cifar
    from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(resnet20_cifar(), data=torch.randn(16, 3, 32, 32))
    calib = [(torch.randn(16, 3, 32, 32), torch.zeros(16)) for _ in range(2)]
    ir = Pipeline([FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate(), LowerInteger()]).run(
        model, torch.randn(1, 3, 32, 32), recipe=get_recipe(recipe), calibration_data=calib).context.ir
    optimized = tmp_path / "opt.onnx"
    qonnx.session(qonnx.to_onnx(ir, "serving"), optimized_path=str(optimized))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") >= 21 and ops.count("QGemm") == 1
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "ConvInteger"} & set(ops)


@pytest.mark.parametrize("flavour", ["serving", "compact"])
@pytest.mark.parametrize("recipe", ["int8", "mostly4bit"])
def test_pooled_stem_runs_as_integer_kernels_and_matches_reference(recipe, flavour, tmp_path):
    """A ResNet-18 stem (conv → ReLU → max pool) read at two precisions (mostly4bit: the 4-bit conv and the
    8-bit identity shortcut) still fuses into QLinearConv, and pooling the codes matches the reference. The
    compact file's packed 4-bit weights are widened by constant folding at session start, so it runs the same
    integer kernels."""
    import onnx
    import torch

    from qcompile import Pipeline, get_recipe
    from qcompile.models import resnet18
    from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(resnet18(width=0.25, num_classes=10), data=torch.randn(8, 3, 48, 48))
    calib = [(torch.randn(8, 3, 48, 48), torch.zeros(8)) for _ in range(2)]
    ir = Pipeline([FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate(), LowerInteger()]).run(
        model, torch.randn(1, 3, 48, 48), recipe=get_recipe(recipe), calibration_data=calib).context.ir
    optimized = tmp_path / "opt.onnx"
    model_proto = qonnx.to_onnx(ir, flavour)
    sess = qonnx.session(model_proto, optimized_path=str(optimized))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "ConvInteger", "Cast"} & set(ops)
    x = np.random.default_rng(1).standard_normal((16, 3, 48, 48)).astype(np.float32)
    ref = reference.run(ir, x)[ir.outputs[0]]
    out = qonnx.run(sess, [x])[0]
    acc_scale = ir.values[ir.producer(ir.outputs[0]).inputs[0]].scale
    assert np.array_equal(np.rint(ref / acc_scale), np.rint(out / acc_scale))


def test_packed_int4_costs_half_a_byte_per_weight():
    from onnx import TensorProto, numpy_helper

    codes = np.random.default_rng(3).integers(-7, 8, size=(9, 3, 3, 3)).astype(np.int8)
    t = qonnx._onnx().helper.make_tensor("w", TensorProto.INT4, list(codes.shape), qonnx.pack_nibbles(codes), raw=True)
    assert len(t.raw_data) == (codes.size + 1) // 2
    assert np.array_equal(numpy_helper.to_array(t), codes)
