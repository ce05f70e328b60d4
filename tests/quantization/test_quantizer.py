"""Property tests of the quantizer math (DESIGN.md numerics)."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qcompile.quantization.quantizer import ActivationQuantizer, WeightQuantizer, fake_quantize, mse_bound, quantize, safe_scale
from qcompile.quantization.spec import Calibrator, Granularity, QuantSpec

bits = st.integers(2, 8)
signed = st.booleans()
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
tensors = arrays(np.float32, st.integers(1, 64), elements=finite).map(torch.from_numpy)
scales = st.floats(0.0009765625, 8.0, width=32).map(lambda s: torch.tensor(s))


@given(tensors, scales, bits, signed)
def test_idempotent(x, s, b, sg):
    spec = QuantSpec(b, sg)
    once = fake_quantize(x, s, spec.qmin, spec.qmax)
    assert torch.equal(fake_quantize(once, s, spec.qmin, spec.qmax), once)


@given(tensors, scales, bits, signed)
def test_codes_in_range_and_unsigned_never_negative(x, s, b, sg):
    spec = QuantSpec(b, sg)
    q = quantize(x, s, spec.qmin, spec.qmax)
    assert bool(((q >= spec.qmin) & (q <= spec.qmax)).all())
    assert torch.equal(q, q.round())
    if not sg:
        assert bool((fake_quantize(x, s, spec.qmin, spec.qmax) >= 0).all())


@given(st.integers(-60, 60), st.integers(-10, 3), bits)
def test_ties_round_half_to_even(k, e, b):
    spec = QuantSpec(b, True)
    s = torch.tensor(2.0**e)  # a power-of-two scale keeps (k + 0.5) * s an exact tie in float32
    x = torch.tensor(k + 0.5) * s
    q = quantize(x, s, spec.qmin, spec.qmax)
    expected = min(max(k if k % 2 == 0 else k + 1, spec.qmin), spec.qmax)
    assert int(q) == expected


@given(scales, bits, signed)
def test_zero_maps_to_zero(s, b, sg):
    spec = QuantSpec(b, sg)
    assert float(fake_quantize(torch.zeros(3), s, spec.qmin, spec.qmax).abs().max()) == 0.0


@settings(max_examples=50)
@given(arrays(np.float32, (4, 3, 2, 2), elements=st.floats(-10, 10, width=32)).map(torch.from_numpy),
       st.integers(0, 3), st.floats(0.125, 64.0, width=32), bits)
def test_per_channel_scales_independent(w, ch, factor, b):
    wq = WeightQuantizer(QuantSpec(b, True, Granularity.PER_CHANNEL, Calibrator.MAX))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = wq(w)
        w2 = w.clone()
        w2[ch] *= factor
        after = wq(w2)
    others = [c for c in range(4) if c != ch]
    assert torch.equal(before[others], after[others])


@given(tensors, scales, bits, signed)
def test_ste_gradient_identity_inside_zero_outside(x, s, b, sg):
    spec = QuantSpec(b, sg)
    x = x.clone().requires_grad_(True)
    fake_quantize(x, s, spec.qmin, spec.qmax).sum().backward()
    q = torch.round(x.detach() / s)
    inside = (q >= spec.qmin) & (q <= spec.qmax)
    assert torch.equal(x.grad, inside.float())


@settings(max_examples=30, deadline=None)
@given(tensors, scales, bits, signed, st.sampled_from([torch.float32, torch.float64]))
def test_no_grad_evaluation_gives_the_same_values_and_leaves_the_input_alone(x, s, b, sg, dtype):
    spec = QuantSpec(b, sg)
    x = x.to(dtype)
    before = x.clone()
    with torch.no_grad():
        evaluated = fake_quantize(x, s, spec.qmin, spec.qmax)
    trained = fake_quantize(x.clone().requires_grad_(True), s, spec.qmin, spec.qmax)
    assert torch.equal(x, before) and evaluated.dtype == dtype
    assert torch.equal(evaluated, trained.detach())


def test_requantize_leaves_the_accumulator_input_alone():
    from qcompile.quantization.quantizer import _Requantize

    y = torch.linspace(-3, 3, 97, dtype=torch.float64).reshape(1, 97, 1, 1)
    before = y.clone()
    s_acc, s_out = torch.full((1, 97, 1, 1), 0.01), torch.tensor(0.05)
    with torch.no_grad():
        out = _Requantize.apply(y, s_acc, s_out, -127, 127)
    trained = _Requantize.apply(y.clone().requires_grad_(True), s_acc, s_out, -127, 127)
    assert torch.equal(y, before) and torch.equal(out, trained.detach())
    assert out.dtype == torch.float64 and out.abs().max() <= 127 * s_out + 1e-6


def test_degenerate_ranges_get_a_safe_scale():
    with pytest.warns(UserWarning, match="degenerate"):
        s = safe_scale(torch.tensor([0.0, 2.0, float("nan")]), 127, "t")
    assert torch.isfinite(s).all() and (s > 0).all() and s[0] == s[1] == 2.0 / 127
    wq = WeightQuantizer(QuantSpec(4, True, Granularity.PER_CHANNEL, Calibrator.MAX))
    with pytest.warns(UserWarning):
        out = wq(torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    aq = ActivationQuantizer(QuantSpec(8, False))
    aq(torch.zeros(4, 4))  # a dead activation
    with pytest.warns(UserWarning):
        aq.freeze()
    assert torch.isfinite(aq.scale) and aq.scale > 0
    assert torch.equal(aq(torch.zeros(2)), torch.zeros(2))


def test_activation_quantizer_observes_then_freezes():
    aq = ActivationQuantizer(QuantSpec(8, True))
    x = torch.linspace(-2, 2, 101)
    assert torch.equal(aq(x), x)  # observing: values pass through
    aq(x * 3)
    aq.freeze()
    assert aq.scale.item() == pytest.approx((0.9 * 2 + 0.1 * 6) / 127)
    assert not torch.equal(aq(x), x)


@pytest.mark.parametrize("calibrator", [Calibrator.PERCENTILE, Calibrator.MSE, Calibrator.MAX])
def test_clipping_calibrators_choose_bounds_within_the_range(calibrator):
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[0] = 40.0  # one outlier
    aq = ActivationQuantizer(QuantSpec(4, True, calibrator=calibrator))
    aq(x)
    bound = aq.bound()
    if calibrator is Calibrator.MAX:
        assert bound == 40.0
    else:
        assert 1.0 < bound < 10.0  # the outlier is clipped


def test_mse_bound_beats_max_bound():
    torch.manual_seed(0)
    x = torch.randn(5000)
    x[0] = 30.0
    spec = QuantSpec(4, True)
    b = mse_bound(x, spec, float(x.abs().max()))
    err = lambda bound: float(((fake_quantize(x, torch.tensor(bound / spec.qmax), spec.qmin, spec.qmax) - x) ** 2).mean())
    assert err(b) < err(30.0)
