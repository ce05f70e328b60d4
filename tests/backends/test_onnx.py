"""The ONNX transcription of the IR runs in onnxruntime and matches the reference interpreter."""

import tempfile

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")

from qcompile.backends import onnx as qonnx  # noqa: E402

from qcompile.ir import int4, reference  # noqa: E402
from qcompile.ir.reference import global_avgpool_multiplier  # noqa: E402
from qcompile.ir.graph import IRGraph  # noqa: E402
from qcompile.ir.types import DType, TensorInfo  # noqa: E402
from tests.ir.test_reference import arithmetic_activations, pooling_case  # noqa: E402
from tests.passes.test_lower_integer import ArithmeticNet, FunctionalNet, ModuleNet, _lowered  # noqa: E402


@pytest.mark.parametrize("flavour", ["serving", "compact"])
@pytest.mark.parametrize("build", [FunctionalNet, ModuleNet, ArithmeticNet])
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


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_weights_that_could_saturate_u8s8_kernels_are_uint8_where_asked_and_as_exact(weight_type):
    """uint8 weights (zero point 128) for the 8-bit layers whose codes pass 64, int8 for the rest (4-bit layers):
    the same codes. On a CPU whose uint8 x int8 kernels saturate (AVX2), int8 weights may differ from the reference;
    uint8 ones never do."""
    import onnx
    import torch

    torch.manual_seed(0)
    ir = _lowered(ModuleNet(), "mostly4bit").context.ir
    model = qonnx.to_onnx(ir, "serving", weight_type=weight_type)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcompile.weight_type"] == weight_type
    inits = {t.name.rpartition("__")[0]: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    widths = set()
    for op in ir.ops:
        if op.kind not in ("conv2d", "dense"):
            continue
        w, codes = inits[op.inputs[1]], ir.constants[op.inputs[1]]
        wide = ir.values[op.inputs[1]].dtype.bits == 8 and np.abs(codes).max() > 64
        unsigned = weight_type == "uint8" and wide
        widths.add(unsigned)
        assert w.dtype == (np.uint8 if unsigned else np.int8)
        assert np.array_equal(w.astype(np.int32) - (128 if unsigned else 0), codes)
        assert inits[f"{op.inputs[1]}_zp"].dtype == w.dtype
    assert widths == ({True, False} if weight_type == "uint8" else {False})  # 8-bit first and last, 4-bit between
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    if weight_type == "uint8" or not qonnx.u8s8_pairs_saturate():
        acc_scale = ir.values[ir.producer(ir.outputs[0]).inputs[0]].scale
        ref, out = reference.run(ir, x)[ir.outputs[0]], qonnx.run(qonnx.session(model), [x])[0]
        assert np.array_equal(np.rint(ref / acc_scale), np.rint(out / acc_scale))


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", {"avx2", "fma"}, True),  # AMD before Zen 4, Intel before Cascade Lake: vpmaddubsw
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, True),  # Skylake-SP: AVX-512 without VNNI
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),  # Alder Lake
    ("x86_64", set(), True),  # flags unknown: taken to saturate, so the artifacts stay exact
    ("aarch64", set(), False),
])
def test_auto_weight_type_follows_the_cpu(monkeypatch, machine, flags, saturates):
    from qcompile.backends import host

    monkeypatch.setattr(host.platform, "machine", lambda: machine)
    monkeypatch.setattr(host, "cpu_flags", lambda: frozenset(flags))
    assert host.u8s8_pairs_saturate() is saturates
    assert qonnx.unsigned_weights("auto") is saturates
    assert qonnx.unsigned_weights("uint8") and not qonnx.unsigned_weights("int8")
    with pytest.raises(qonnx.OnnxExportError, match="unknown ONNX weight type"):
        qonnx.unsigned_weights("int4")


def test_dyadic_ir_is_refused():
    from qcompile.passes import LowerInteger

    from qcompile.pipeline import Pipeline

    res = _lowered(ModuleNet(), "int8")
    Pipeline([LowerInteger(dyadic=True)]).run_graph(res.graph_module, res.context)
    with pytest.raises(qonnx.OnnxExportError, match="dyadic"):
        qonnx.to_onnx(res.context.ir)


def _resnet20_ir(recipe, align=True):
    import torch
    from qcompile.passes import (
        AlignAddScales,
        AssignPrecision,
        Calibrate,
        FoldBatchNorm,
        InsertQuantizers,
        LowerInteger,
    )

    from qcompile import Pipeline, get_recipe
    from qcompile.models import resnet20_cifar
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(resnet20_cifar(), data=torch.randn(16, 3, 32, 32))
    calib = [(torch.randn(16, 3, 32, 32), torch.zeros(16)) for _ in range(2)]
    passes = [FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate()]
    passes += [AlignAddScales()] if align else []
    return Pipeline(passes + [LowerInteger()]).run(
        model, torch.randn(1, 3, 32, 32), recipe=get_recipe(recipe), calibration_data=calib).context.ir


def _optimized_ops(model_proto, tmp_path):
    import onnx

    optimized = tmp_path / "opt.onnx"
    sess = qonnx.session(model_proto, optimized_path=str(optimized))
    return sess, [n.op_type for n in onnx.load(str(optimized)).graph.node]


@pytest.mark.parametrize("recipe", ["int8", "mostly4bit"])
def test_serving_runs_every_conv_dense_and_add_as_integer_kernels(recipe, tmp_path):
    """With aligned add scales every residual add is a QLinearAdd (one per quantizer reading the sum: the
    residual, and a 4-bit layer's input), and the model still equals the reference."""
    import torch

    ir = _resnet20_ir(recipe)
    model_proto = qonnx.to_onnx(ir, "serving")
    sess, ops = _optimized_ops(model_proto, tmp_path)
    assert ops.count("QLinearConv") >= 21 and ops.count("QGemm") == 1
    # mostly4bit: 8 of the 9 sums are read by a 4-bit layer, 7 by the next shortcut or the pooling head (the
    # two entering downsampling blocks are not); int8: the 8-bit residual is the next layer's input
    assert ops.count("QLinearAdd") == (9 if recipe == "int8" else 15)
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "ConvInteger", "Sum", "Add"} & set(ops)
    # mostly4bit: the stem's 8-bit codes requantized to 4 bits; the logits come out of QGemm, and the pooling's
    # DequantizeLinear is fused into QLinearGlobalAveragePool
    assert ops.count("DequantizeLinear") == (0 if recipe == "int8" else 1)
    assert ops.count("QLinearGlobalAveragePool") == 1
    read = {i for node in model_proto.graph.node for i in node.input} | set(ir.outputs)
    assert all(set(node.output) & read for node in model_proto.graph.node)  # no node computes what nobody reads
    x = torch.randn(32, 3, 32, 32).numpy()
    pairs = [(x, reference.run(ir, x)[ir.outputs[0]])]
    v = qonnx.compare_with_reference(ir, model_proto, pairs)
    assert v["identical_fraction"] == 1.0 and v["max_lsb_diff"] == 0


def test_unaligned_adds_stay_exact_float_sums(tmp_path):
    import torch

    ir = _resnet20_ir("int8", align=False)
    model_proto = qonnx.to_onnx(ir, "serving")
    _, ops = _optimized_ops(model_proto, tmp_path)
    assert "QLinearAdd" not in ops and ops.count("Sum") == 9
    x = torch.randn(16, 3, 32, 32).numpy()
    v = qonnx.compare_with_reference(ir, model_proto, [(x, reference.run(ir, x)[ir.outputs[0]])])
    assert v["identical_fraction"] == 1.0 and v["max_lsb_diff"] == 0


def _add_model(a, b, out):
    """DQ → Add → Q (+ Clip to a narrower code range) on two code tensors, as the exporter writes an add."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    def zp(t):
        return np.uint8(128 if t.dtype.signed else 0)

    c = [numpy_helper.from_array(np.array(v), n) for n, v in [
        ("sa", a.scale), ("sb", b.scale), ("sc", out.scale), ("za", zp(a)), ("zb", zp(b)), ("zc", zp(out)),
        ("lo", np.uint8(out.qmin + zp(out))), ("hi", np.uint8(out.qmax + zp(out)))]]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("Add", ["fa", "fb"], ["s"]), helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["q"]),
             helper.make_node("Clip", ["q", "lo", "hi"], ["y"])]
    io = [helper.make_tensor_value_info(n, TP.UINT8, ["N"]) for n in ("a", "b", "y")]
    model = helper.make_model(helper.make_graph(nodes, "add", io[:2], io[2:], c), opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = qonnx.IR_VERSION
    onnx.checker.check_model(model)
    return model


@settings(max_examples=25, deadline=None)
@given(m=st.integers(128, 255), ea=st.integers(-3, 3), eb=st.integers(-3, 3), e4=st.integers(2, 5),
       signed_a=st.booleans(), out_bits=st.sampled_from([4, 8]))
def test_fused_add_is_exact_when_it_says_so(m, ea, eb, e4, signed_a, out_bits):
    """onnxruntime's fused QLinearAdd against the IR's float32 DQ → add → Q on every pair of codes."""
    from qcompile.ir.types import DType, TensorInfo

    sc = np.float32(m / 128 * 2.0**-6)
    a = TensorInfo(DType.INT8 if signed_a else DType.UINT8, (), np.float32(sc * 2.0**ea))
    b = TensorInfo(DType.UINT8, (), np.float32(sc * 2.0**eb))
    out = TensorInfo(DType.for_bits(out_bits, False), (), np.float32(sc * (2.0**e4 if out_bits == 4 else 1.0)))
    assert qonnx.fused_add_is_exact(a, b, out)
    sess = qonnx.session(_add_model(a, b, out))
    qa, qb = np.meshgrid(np.arange(a.qmin, a.qmax + 1), np.arange(b.qmin, b.qmax + 1))
    qa, qb = qa.reshape(-1), qb.reshape(-1)
    got = sess.run(None, {"a": (qa + (128 if signed_a else 0)).astype(np.uint8), "b": qb.astype(np.uint8)})[0]
    f32 = np.float32
    want = np.clip(np.rint((qa.astype(f32) * a.scale + qb.astype(f32) * b.scale) / out.scale), out.qmin, out.qmax)
    np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))


@settings(max_examples=40, deadline=None)
@given(in_dtype=st.sampled_from([DType.UINT8, DType.INT8, DType.UINT4, DType.INT4]),
       out_dtype=st.sampled_from([DType.UINT8, DType.INT8, DType.UINT4]), h=st.integers(1, 9), w=st.integers(1, 9),
       s_in=st.floats(1e-3, 1.0), ratio=st.floats(0.02, 2.0), keepdim=st.booleans(), flat=st.booleans())
def test_global_avgpool_is_onnxruntimes_integer_pooling_bit_for_bit(in_dtype, out_dtype, h, w, s_in, ratio,
                                                                      keepdim, flat):
    """The exporter's DQ → GlobalAveragePool → Q, fused by onnxruntime into QLinearGlobalAveragePool, against the
    reference's integer sum and float32 multiply, on random codes of every container and signedness, over (H, W)
    or over L of (N, C, L)."""
    import onnx

    g, x = pooling_case(in_dtype, out_dtype, (h * w,) if flat else (h, w), s_in, ratio, keepdim, n=32)
    assume(global_avgpool_multiplier(g.values["q"], g.values["p"]) is not None)
    model = qonnx.to_onnx(g, "serving")
    with tempfile.TemporaryDirectory() as tmp:
        sess = qonnx.session(model, optimized_path=f"{tmp}/opt.onnx")
        assert "QLinearGlobalAveragePool" in [n.op_type for n in onnx.load(f"{tmp}/opt.onnx").graph.node]
    np.testing.assert_array_equal(qonnx.run(sess, [x])[0], reference.run(g, x)["y"])


def _matmul_graph(a: TensorInfo, b: TensorInfo, out: TensorInfo, relu: bool) -> IRGraph:
    """Two float inputs quantized to ``a`` and ``b``, their codes' matrix product requantized to ``out``."""
    g = IRGraph(inputs=["x", "y"], outputs=["z"])
    g.add_value("x", TensorInfo(DType.FLOAT32, a.shape))
    g.add_value("y", TensorInfo(DType.FLOAT32, b.shape))
    g.add_op("quantize", ["x"], "a", a)
    g.add_op("quantize", ["y"], "b", b)
    s_acc = np.asarray(np.float32(a.scale) * np.float32(b.scale), np.float32)
    g.add_op("matmul", ["a", "b"], "acc", TensorInfo(DType.INT32, (*a.shape[:-1], b.shape[-1]), s_acc))
    mult = g.add_constant("mult", (s_acc.astype(np.float64) / float(out.scale)).astype(np.float32),
                          TensorInfo(DType.FLOAT32, ()))
    g.add_op("requantize", ["acc"], "q", out, relu=relu, multiplier=mult)
    g.add_op("dequantize", ["q"], "z", TensorInfo(DType.FLOAT32, out.shape))
    return g


@settings(max_examples=30, deadline=None)
@given(a_dtype=st.sampled_from([DType.UINT8, DType.INT8, DType.UINT4, DType.INT4]),
       b_dtype=st.sampled_from([DType.UINT8, DType.INT8]), out_dtype=st.sampled_from([DType.UINT8, DType.INT8]),
       k=st.integers(1, 300), s_a=st.floats(1e-3, 1.0), s_b=st.floats(1e-3, 1.0), ratio=st.floats(1e-3, 0.2),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_matmul_is_the_references_integer_product_bit_for_bit(a_dtype, b_dtype, out_dtype, k, s_a, s_b, ratio, relu,
                                                              seed):
    """``MatMulInteger`` and the float32 multiply by M: onnxruntime's codes equal the reference's for every
    signedness and container (its fused ``QLinearMatMul`` takes uint8 only, and a float ``MatMul`` rounds)."""
    a = TensorInfo(a_dtype, (4, 2, 3, k), np.float32(s_a))
    b = TensorInfo(b_dtype, (4, 1, k, 5), np.float32(s_b))
    out_scale = np.float32(s_a * s_b * k * ratio * 64)
    g = _matmul_graph(a, b, TensorInfo(out_dtype, (4, 2, 3, 5), out_scale), relu)
    rng = np.random.default_rng(seed)
    x, y = ((rng.integers(t.qmin, t.qmax + 1, t.shape) * t.scale).astype(np.float32) for t in (a, b))
    got = qonnx.run(qonnx.session(qonnx.to_onnx(g, "serving")), [x, y])[0]
    np.testing.assert_array_equal(got, reference.run(g, x, y)["z"])


def test_fused_add_is_refused_for_unaligned_scales():
    from qcompile.ir.types import DType, TensorInfo

    a = TensorInfo(DType.INT8, (), np.float32(0.0237))
    b = TensorInfo(DType.UINT8, (), np.float32(0.0098))
    out = TensorInfo(DType.UINT8, (), np.float32(0.0153))
    assert not qonnx.fused_add_is_exact(a, b, out)
    long_mantissa = np.float32(1 / 3)  # power-of-two ratios, but the float32 products round: ties move
    a = TensorInfo(DType.INT8, (), long_mantissa * 4)
    b = TensorInfo(DType.UINT8, (), long_mantissa)
    out = TensorInfo(DType.UINT8, (), long_mantissa * 2)
    assert not qonnx.fused_add_is_exact(a, b, out)


@pytest.mark.parametrize("flavour", ["serving", "compact"])
@pytest.mark.parametrize("recipe", ["int8", "mostly4bit"])
def test_pooled_stem_runs_as_integer_kernels_and_matches_reference(recipe, flavour, tmp_path):
    """A ResNet-18 stem (conv → ReLU → max pool) read at two precisions (mostly4bit: the 4-bit conv and the
    8-bit identity shortcut) still fuses into QLinearConv, and pooling the codes matches the reference. The
    compact file's packed 4-bit weights are widened by constant folding at session start, so it runs the same
    integer kernels."""
    import onnx
    import torch
    from qcompile.passes import AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers, LowerInteger

    from qcompile import Pipeline, get_recipe
    from qcompile.models import resnet18
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(resnet18(width=0.25, num_classes=10), data=torch.randn(8, 3, 48, 48))
    calib = [(torch.randn(8, 3, 48, 48), torch.zeros(8)) for _ in range(2)]
    ir = Pipeline([FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate(), LowerInteger()]).run(
        model, torch.randn(1, 3, 48, 48), recipe=get_recipe(recipe), calibration_data=calib).context.ir
    optimized = tmp_path / "opt.onnx"
    model_proto = qonnx.to_onnx(ir, flavour)
    sess = qonnx.session(model_proto, optimized_path=str(optimized))
    graph = onnx.load(str(optimized)).graph
    ops = [n.op_type for n in graph.node]
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "ConvInteger"} & set(ops)
    weights = {i.name for i in graph.initializer}
    assert not any(n.op_type == "Cast" and n.input[0] in weights for n in graph.node)  # widened at session start
    x = np.random.default_rng(1).standard_normal((16, 3, 48, 48)).astype(np.float32)
    ref = reference.run(ir, x)[ir.outputs[0]]
    out = qonnx.run(sess, [x])[0]
    acc_scale = ir.values[ir.producer(ir.outputs[0]).inputs[0]].scale
    assert np.array_equal(np.rint(ref / acc_scale), np.rint(out / acc_scale))


def test_packed_int4_costs_half_a_byte_per_weight():
    from onnx import TensorProto, numpy_helper

    codes = np.random.default_rng(3).integers(-7, 8, size=(9, 3, 3, 3)).astype(np.int8)
    t = qonnx._onnx().helper.make_tensor("w", TensorProto.INT4, list(codes.shape), int4.pack(codes).tobytes(), raw=True)
    assert len(t.raw_data) == (codes.size + 1) // 2
    assert np.array_equal(numpy_helper.to_array(t), codes)


@pytest.mark.parametrize("recipe", ["int8", "mostly4bit"])
def test_only_the_clips_the_runtime_needs_remain(recipe):
    """Signed 8-bit activations use the container's full range, so int8 needs no Clip; 4-bit codes in 8-bit
    containers keep one each, and the report says why."""
    ir = _resnet20_ir(recipe)
    model = qonnx.to_onnx(ir, "serving")
    clips = qonnx.remaining_clips(ir, model)
    assert len(clips) == sum(n.op_type == "Clip" for n in model.graph.node)
    if recipe == "int8":
        assert clips == []
    else:
        assert clips and all(c["why"].startswith("4-bit codes in [0, 15] stored in 8 bits") for c in clips)
        assert all(ir.values[c["tensor"]].dtype.bits == 4 for c in clips)


@pytest.mark.parametrize("kind, attrs, shape", [
    ("adaptive_avgpool2d", {"output_size": [1, 1]}, (64, 16, 1, 1)),
    ("adaptive_avgpool2d", {"output_size": [2, 2]}, (64, 16, 2, 2)),
    ("adaptive_avgpool2d", {"output_size": [3, 2]}, (64, 16, 3, 2)),
    ("mean", {"dims": [2, 3], "keepdim": False}, (64, 16)),
])
def test_pooling_a_float_op_s_output_sums_in_double_as_the_reference(kind, attrs, shape):
    """A float op's output (here a ReLU of floats; a GroupNorm's in BiT's head) is not a grid of codes: float32
    sums of its values round where the reference's float64 sum, rounded once, does not (one BiT logit in 5,000
    was 1 LSB off), so the exporter pools it in double."""
    g = IRGraph()
    g.inputs.append(g.add_value("x", TensorInfo(DType.FLOAT32, (64, 16, 7, 6))))
    g.add_op("relu", ["x"], "r", TensorInfo(DType.FLOAT32, (64, 16, 7, 6)))
    g.add_op(kind, ["r"], "y", TensorInfo(DType.FLOAT32, shape), **attrs)
    g.outputs.append("y")
    x = (np.random.default_rng(0).standard_normal((64, 16, 7, 6)) * 3).astype(np.float32)
    got = qonnx.run(qonnx.session(qonnx.to_onnx(g, "serving")), [x])[0]
    np.testing.assert_array_equal(got, reference.run(g, x)["y"])


def test_float_arithmetic_activations_agree_with_the_reference():
    g, x = arithmetic_activations()
    out = qonnx.run(qonnx.session(qonnx.to_onnx(g)), [x])[0]
    np.testing.assert_allclose(out, reference.run(g, x)[g.outputs[0]], rtol=1e-6)
