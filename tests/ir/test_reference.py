import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qcompile.ir.graph import IRGraph, Op
from qcompile.ir.reference import (DivisionByZeroError, IntegerOverflowError, activation, avgpool_divisors,
                                   avgpool_windows, conv2d, global_avgpool_multiplier, resize_bilinear, rhe, run)
from qcompile.ir.types import DType, TensorInfo


def _dense_graph(k: int, x_code: int, w_code: int) -> IRGraph:
    g = IRGraph()
    g.inputs.append(g.add_value("x", TensorInfo(DType.FLOAT32, (1, k))))
    g.add_op("quantize", ["x"], "xq", TensorInfo(DType.UINT8, (1, k), np.float32(1.0)))
    w = g.add_constant("w", np.full((1, k), w_code, dtype=np.int32), TensorInfo(DType.INT8, (1, k), np.ones(1), 0))
    g.add_op("dense", ["xq", w], "acc", TensorInfo(DType.INT32, (1, 1), np.ones(1, dtype=np.float32), 1))
    g.add_op("dequantize", ["acc"], "y", TensorInfo(DType.FLOAT32, (1, 1)))
    g.outputs.append("y")
    return g


def test_int32_overflow_is_reported_not_wrapped():
    k = 70_000  # 70000 * 255 * 127 > 2^31
    g = _dense_graph(k, 255, 127)
    with pytest.raises(IntegerOverflowError, match="exceeds int32"):
        run(g, np.full((1, k), 255.0, dtype=np.float32))


def test_accumulation_just_inside_int32_is_exact():
    k = 66_000  # 66000 * 255 * 127 = 2,137,455,000 < 2^31 - 1
    g = _dense_graph(k, 255, 127)
    y = run(g, np.full((1, k), 255.0, dtype=np.float32))["y"]
    assert int(run(g, np.full((1, k), 255.0, dtype=np.float32), keep=True)["acc"][0, 0]) == 66_000 * 255 * 127
    assert y.dtype == np.float32


def test_round_half_to_even():
    assert list(rhe(np.array([0.5, 1.5, 2.5, -0.5, -1.5]))) == [0, 2, 2, -0, -2]


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 4)])
def test_integer_conv_matches_a_direct_loop(stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, (2, 4, 7, 7)).astype(np.int32)
    w = rng.integers(-7, 8, (8, 4 // groups, 3, 3)).astype(np.int32)
    out = conv2d(x, w, (stride, stride), (padding, padding), (dilation, dilation), groups)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))).astype(np.int64)
    cg, og = 4 // groups, 8 // groups
    for n in range(2):
        for o in range(8):
            g = o // og
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    patch = xp[n, g * cg:(g + 1) * cg, i * stride:i * stride + dilation * 2 + 1:dilation,
                               j * stride:j * stride + dilation * 2 + 1:dilation]
                    assert out[n, o, i, j] == int((patch * w[o]).sum())


def global_pool_graph(codes: TensorInfo, pooled: TensorInfo, keepdim: bool) -> IRGraph:
    """x → quantize to ``codes`` → ``global_avgpool`` to ``pooled`` → dequantize: one pooling, for any backend."""
    g = IRGraph()
    g.inputs.append(g.add_value("x", TensorInfo(DType.FLOAT32, codes.shape)))
    g.add_op("quantize", ["x"], "q", codes)
    g.add_op("global_avgpool", ["q"], "p", pooled, keepdim=keepdim)
    g.add_op("dequantize", ["p"], "y", TensorInfo(DType.FLOAT32, pooled.shape))
    g.outputs.append("y")
    return g


def pooling_case(in_dtype: DType, out_dtype: DType, spatial: tuple[int, ...], s_in: float, ratio: float,
                 keepdim: bool, n: int = 8, c: int = 16, seed: int = 0) -> tuple[IRGraph, np.ndarray]:
    """A global pooling graph over ``spatial`` ((H, W), or (L,) for an (N, C, L) value) and inputs that quantize
    to random codes of ``in_dtype`` (every code reachable)."""
    codes_t = TensorInfo(in_dtype, (n, c, *spatial), np.float32(s_in))
    shape = (n, c, *[1] * len(spatial)) if keepdim else (n, c)
    pooled_t = TensorInfo(out_dtype, shape, np.float32(s_in * ratio))
    rng = np.random.default_rng(seed)
    codes = rng.integers(codes_t.qmin, codes_t.qmax + 1, size=codes_t.shape)
    return global_pool_graph(codes_t, pooled_t, keepdim), (codes * np.float32(s_in)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(in_dtype=st.sampled_from([DType.UINT8, DType.INT8, DType.UINT4, DType.INT4]),
       out_dtype=st.sampled_from([DType.UINT8, DType.INT8, DType.UINT4]), h=st.integers(1, 9), w=st.integers(1, 9),
       s_in=st.floats(1e-3, 1.0), ratio=st.floats(0.02, 2.0), keepdim=st.booleans(), flat=st.booleans())
def test_global_avgpool_is_the_quantized_mean_but_for_float_rounding(in_dtype, out_dtype, h, w, s_in, ratio, keepdim,
                                                                     flat):
    """The integer pooling rounds the exact mean of the codes' values, except where that mean lies within a
    float32 rounding of a half step (there either neighbour is right); over (H, W) or over L of (N, C, L)."""
    spatial = (h * w,) if flat else (h, w)
    g, x = pooling_case(in_dtype, out_dtype, spatial, s_in, ratio, keepdim)
    out = run(g, x, keep=True)
    codes, got = out["q"].astype(np.int64), out["p"]
    assert got.shape == ((8, 16, *[1] * len(spatial)) if keepdim else (8, 16))
    pooled = g.values["p"]
    axes = tuple(range(2, codes.ndim))
    exact = codes.sum(axis=axes, keepdims=keepdim) * (float(np.float32(s_in)) / (h * w * float(pooled.scale)))
    want = np.clip(np.rint(exact), pooled.qmin, pooled.qmax)
    near_tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-5 * np.maximum(1.0, np.abs(exact))
    assert np.all((got == want) | (near_tie & (np.abs(got - want) <= 1)))


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2),
       ceil=st.booleans(), include_pad=st.booleans(), seed=st.integers(0, 2**16))
def test_avgpool_windows_over_divisors_is_pytorchs_average_pool(h, w, k, s, p, ceil, include_pad, seed):
    """The (H·W, OH·OW) window matrix and divisors a backend pools with in double give PyTorch's ``avg_pool2d``
    (padding, ``ceil_mode`` overhang and ``count_include_pad`` included), as the reference's own pooling does."""
    assume(2 * p <= k <= min(h, w) + 2 * p)  # PyTorch's conditions on a pooling window
    x = np.random.default_rng(seed).standard_normal((2, 3, h, w))
    attrs = {"kernel": [k, k], "stride": [s, s], "padding": [p, p], "ceil_mode": ceil, "count_include_pad": include_pad}
    expected = torch.nn.functional.avg_pool2d(torch.from_numpy(x), k, s, p, ceil, include_pad).numpy()
    sums = x.reshape(6, h * w) @ avgpool_windows((h, w), attrs)
    pooled = (sums / avgpool_divisors((h, w), attrs).reshape(-1)).reshape(expected.shape)
    np.testing.assert_allclose(pooled, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad_is_pytorchs_pad(mode):
    x = np.random.default_rng(0).integers(-128, 128, (2, 3, 5, 6)).astype(np.int32)
    g = IRGraph(inputs=["x"], outputs=["y"])
    g.add_value("x", TensorInfo(DType.INT8, x.shape, np.float32(0.1), qmin=-128, qmax=127))
    g.add_op("pad", ["x"], "y", TensorInfo(DType.INT8, (2, 3, 8, 9), np.float32(0.1), qmin=-128, qmax=127),
             pads=[1, 2, 3, 0], mode=mode)
    expected = torch.nn.functional.pad(torch.from_numpy(x).double(), [1, 2, 3, 0], mode=mode).numpy()
    np.testing.assert_array_equal(run(g, x)["y"], expected)


def test_global_avgpool_is_undefined_where_onnxruntime_refuses_it():
    codes = TensorInfo(DType.UINT8, (1, 4, 7, 7), np.float32(0.1))
    assert global_avgpool_multiplier(codes, TensorInfo(DType.UINT8, (1, 4, 1, 1), np.float32(0.05))) is not None
    assert global_avgpool_multiplier(codes, TensorInfo(DType.UINT8, (1, 4, 1, 1), np.float32(1e-6))) is None  # ≥ 256
    assert global_avgpool_multiplier(codes, TensorInfo(DType.UINT8, (1, 4, 1, 1), np.float32(1e9))) is None  # < 2^-32
    huge = TensorInfo(DType.UINT8, (1, 4, 4096, 4096), np.float32(0.1))  # 2^24 pixels
    assert global_avgpool_multiplier(huge, TensorInfo(DType.UINT8, (1, 4, 1, 1), np.float32(0.1))) is None


_TORCH_FUNCTIONS = {
    "sigmoid": lambda t: t.sigmoid(), "silu": lambda t: t * t.sigmoid(), "tanh": lambda t: t.tanh(),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2.0))),
    "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
    "hardswish": lambda t: t * (t + 3).clamp(0, 6) / 6, "hardsigmoid": lambda t: (t + 3).clamp(0, 6) / 6,
}


@settings(max_examples=40, deadline=None)
@given(fn=st.sampled_from(sorted(_TORCH_FUNCTIONS)),
       xs=st.lists(st.floats(-60, 60, width=32), min_size=1, max_size=64))
def test_a_float_activation_is_pytorchs_function_rounded_once(fn, xs):
    """PyTorch's definition in float64, rounded once to float32: torch computing the same formula in float64
    gives the same float32 values, but where numpy's and torch's float64 ``tanh`` / ``erf`` differ by units in the
    last place and a cancellation amplifies them (``1 + tanh(u)`` near −1: GELU far below 0), a few float64
    units of ``|x|``."""
    x = np.array(xs, np.float32)
    expected = _TORCH_FUNCTIONS[fn](torch.from_numpy(x).double()).float().numpy()
    got = activation(x, fn, {})
    slack = 2**-23 * np.abs(expected) + np.abs(x).astype(np.float64) * 2**-50
    assert np.all(np.abs(got.astype(np.float64) - expected) <= slack), (got, expected)


def test_clip_and_leaky_relu_read_their_parameters():
    x = np.array([-8.0, -1.0, 0.5, 7.0], np.float32)
    assert activation(x, "clip", {"min": 0.0, "max": 6.0}).tolist() == [0.0, 0.0, 0.5, 6.0]
    assert activation(x, "clip", {"max": 1.0}).tolist() == [-8.0, -1.0, 0.5, 1.0]
    assert activation(x, "leaky_relu", {"alpha": 0.25}).tolist() == [-2.0, -0.25, 0.5, 7.0]
    assert activation(x, "add", {"alpha": 3.0}).tolist() == [-5.0, 2.0, 3.5, 10.0]
    assert activation(x, "rsub", {"alpha": 1.0}).tolist() == [9.0, 2.0, 0.5, -6.0]
    assert activation(x, "div", {"alpha": 2.0}).tolist() == [-4.0, -0.5, 0.25, 3.5]
    assert activation(x, "rdiv", {"alpha": 1.0}).tolist() == [-0.125, -1.0, 2.0, np.float32(1 / 7)]


def arithmetic_activations() -> tuple[IRGraph, np.ndarray]:
    """An IR of the five arithmetic ``activation`` functions in a chain, and an input (shared by the backends'
    tests)."""
    g = IRGraph()
    info = TensorInfo(DType.FLOAT32, (1, 4, 3, 3))
    g.inputs.append(g.add_value("x", info))
    y = "x"
    for i, (fn, alpha) in enumerate([("add", 3.0), ("mul", 0.5), ("rsub", 1.0), ("div", 6.0), ("rdiv", 2.0)]):
        y = g.add_op("activation", [y], f"y{i}", info, function=fn, alpha=alpha)
    g.outputs.append(y)
    return g, np.random.default_rng(0).uniform(0.5, 2.0, (2, 4, 3, 3)).astype(np.float32)


def test_a_division_by_a_divisor_quantized_to_zero_is_an_error_naming_its_source():
    """SimAM divides by ``4 * (variance + eps)``: quantized, a small variance becomes code 0, and ``0 / 0`` has no
    code (it came out as int32's minimum and crashed the next table)."""
    g = IRGraph(inputs=["x", "d"], outputs=["y"])
    for name in ("x", "d"):
        g.add_value(name, TensorInfo(DType.FLOAT32, (1, 3)))
    g.add_op("quantize", ["d"], "dq", TensorInfo(DType.UINT8, (1, 3), np.float32(0.5)))
    g.add_op("dequantize", ["dq"], "dd", TensorInfo(DType.FLOAT32, (1, 3)))
    g.ops.append(Op("div", ["x", "dd"], "y", source="truediv @ simam.py:9"))
    g.add_value("y", TensorInfo(DType.FLOAT32, (1, 3)))
    x = np.zeros((1, 3), np.float32)
    assert run(g, x, np.array([[1.0, 2.0, 3.0]], np.float32))["y"].tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(DivisionByZeroError, match=r"^truediv @ simam.py:9 divides by zero: its divisor is quantized"):
        run(g, x, np.array([[1.0, 0.2, 3.0]], np.float32))  # 0.2 at scale 0.5 is code 0


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), oh=st.integers(1, 30), ow=st.integers(1, 30),
       align=st.booleans(), factor=st.sampled_from([None, 0.5, 1.5, 2.0, 7 / 3]), seed=st.integers(0, 2**16))
def test_bilinear_resize_is_pytorchs_in_float64(h, w, oh, ow, align, factor, seed):
    """``upsample_bilinear`` samples where PyTorch does (sizes or a scale factor, ``align_corners`` either way):
    within a few float64 units of its float64 kernel, whose operation order differs."""
    x = np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)
    kwargs = {"size": (oh, ow)} if factor is None else {"scale_factor": factor}
    assume(factor is None or min(int(h * factor), int(w * factor)) > 0)
    want = F.interpolate(torch.from_numpy(x).double(), mode="bilinear", align_corners=align, **kwargs).numpy()
    scale = [0.0, 0.0] if factor is None else [factor, factor]
    got = resize_bilinear(x, {"size": list(want.shape[2:]), "align_corners": align, "scale": scale})
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=2e-7, atol=1e-12)
