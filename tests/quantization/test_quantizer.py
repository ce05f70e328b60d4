"""Property tests of the quantizer math (docs/numerics.md)."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qcompile.quantization.quantizer import (
    HISTOGRAM_BINS, MAX_SAMPLES_PER_BATCH, ActivationQuantizer, BatchPart, Reservoir, StreamingHistogram,
    WeightQuantizer, fake_quantize, mse_bound, quantize, safe_scale,
)
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
    """A healthy channel's scale depends on its weights alone (a dead one borrows the largest healthy scale)."""
    assume(bool((w.abs().amax((1, 2, 3)) > 1e-6).all()))
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
        out = _Requantize.apply(y, s_acc, s_out, 1, -127, 127)
    trained = _Requantize.apply(y.clone().requires_grad_(True), s_acc, s_out, 1, -127, 127)
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


# The streaming histogram behind the percentile calibrator: bounded memory, percentiles within one bin width.

magnitudes = st.sampled_from([1e-6, 1e-3, 1.0, 7.5, 1e3, 3e5])
chunks = st.lists(st.tuples(arrays(np.float32, st.integers(1, 300), elements=st.floats(0, 1, width=32)), magnitudes),
                  min_size=1, max_size=6)
quantiles = st.one_of(st.sampled_from([0.0, 0.5, 0.99, 0.9999, 1.0]), st.floats(0, 1))


def _histogram_of(parts, bins=HISTOGRAM_BINS):
    h = StreamingHistogram(bins)
    for values, scale in parts:
        h.add(torch.from_numpy(values) * scale)
    return h, np.concatenate([(torch.from_numpy(v) * m).numpy() for v, m in parts])


@settings(max_examples=200, deadline=None)
@given(chunks, quantiles, st.sampled_from([2, 64, 1 << 14]))
def test_histogram_quantile_is_within_one_bin_of_the_exact_quantile(parts, q, bins):
    h, values = _histogram_of(parts, bins)
    exact = float(np.quantile(values.astype(np.float64), q))  # numpy's default: linear, as torch.quantile
    assert abs(h.quantile(q) - exact) <= h.bin_width * (1 + 1e-9)
    assert h.bin_width <= 2 * float(values.max()) / bins or values.max() == 0
    assert h.counts.numel() == bins and int(h.counts.sum()) == values.size == h.total  # bounded, nothing lost


@settings(max_examples=100, deadline=None)
@given(chunks, quantiles)
def test_histogram_quantile_against_torch_quantile(parts, q):
    h, values = _histogram_of(parts)
    # the same float32 values, quantile taken in float64: in float32 torch rounds the rank q·(n-1) itself, which
    # moved its answer by 2e-4 of max|x| on 700 values (a CI failure), more than any bound on the histogram
    exact = torch.quantile(torch.from_numpy(values).double(), q).item()
    assert abs(h.quantile(q) - exact) <= h.bin_width + 1e-6 * float(values.max())


@settings(max_examples=100, deadline=None)
@given(chunks)
def test_widening_merges_counts_exactly(parts):
    streamed, values = _histogram_of(parts)
    at_once = StreamingHistogram()
    at_once.add(torch.from_numpy(values))
    assert streamed.range == at_once.range and torch.equal(streamed.counts, at_once.counts)


def test_histogram_edge_cases():
    h = StreamingHistogram(8)
    assert h.quantile(0.5) == 0.0  # nothing added
    h.add(torch.zeros(5))
    assert h.range == 0.0 and h.quantile(1.0) == 0.0 and int(h.counts[0]) == 5
    h.add(torch.tensor([3.0]))  # range 4: the zeros stay in bin 0
    assert h.range == 4.0 and int(h.counts[0]) == 5 and int(h.counts[6]) == 1
    with pytest.raises(ValueError, match="non-negative finite"):
        h.add(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="non-negative finite"):
        h.add(torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="power of two"):
        StreamingHistogram(100)


def test_reservoir_keeps_everything_in_order_until_full_then_a_fixed_size_subset():
    r = Reservoir(10, seed=3)
    r.add(torch.arange(4.0))
    r.add(torch.arange(4.0, 10.0))
    assert torch.equal(r.values(), torch.arange(10.0))
    r.add(torch.arange(10.0, 1000.0))
    kept = r.values()
    assert kept.numel() == 10 and len(set(kept.tolist())) == 10 and bool((kept < 1000).all())
    again = Reservoir(10, seed=3)
    again.add(torch.arange(4.0))
    again.add(torch.arange(4.0, 10.0))
    again.add(torch.arange(10.0, 1000.0))
    assert torch.equal(again.values(), kept)  # seeded
    assert torch.equal(Reservoir(4).values(), torch.zeros(1))


def test_percentile_bound_is_the_histogram_of_the_values_within_one_bin():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 20, 20)  # 51,200 values: every one is taken
    aq = ActivationQuantizer(QuantSpec(8, True, calibrator=Calibrator.PERCENTILE))
    aq(x)
    width = aq.calibrator.histogram.bin_width
    assert abs(aq.bound() - torch.quantile(x.abs().flatten(), 0.9999).item()) <= width + 1e-6
    assert width <= 2 * float(x.abs().max()) / 2**14


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "strided slice"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_observed_max_is_max_abs_whatever_the_memory_layout(layout, sign):
    x = torch.randn(4, 8, 6, 6) * sign
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "transposed": x.transpose(1, 3), "strided slice": x[:, ::2, 1:]}[layout]
    aq = ActivationQuantizer(QuantSpec(8, True, calibrator=Calibrator.MAX))
    aq(x)
    assert aq.bound() == float(x.abs().max())
    aq = ActivationQuantizer(QuantSpec(8, True, calibrator=Calibrator.MAX))
    aq(-torch.zeros(3))
    assert str(aq.bound()) == "0.0"


def _observe(calibrator, batches, part_images=None):
    """An activation quantizer after observing ``batches``, each whole or in parts of ``part_images`` images."""
    aq = ActivationQuantizer(QuantSpec(4, True, calibrator=calibrator), seed=5)
    for x in batches:
        if part_images is None:
            aq(x)
            continue
        part = BatchPart(len(x))
        aq.begin_batch(part)
        for chunk in x.split(part_images):
            part.count = len(chunk)
            aq(chunk)
            part.start += part.count
        aq.end_batch()
    return aq


@pytest.mark.parametrize("calibrator", [Calibrator.EMA_MAX, Calibrator.MAX, Calibrator.PERCENTILE, Calibrator.MSE])
@pytest.mark.parametrize("per_image", [50, 4096])  # every value of the batch taken / a draw of 65,536
def test_a_batch_observed_in_parts_calibrates_as_observed_whole(calibrator, per_image):
    torch.manual_seed(0)
    batches = [torch.randn(24, per_image).mul_(i + 1).contiguous() for i in range(3)]
    batches[1] = batches[1].reshape(24, -1, 4, 4).contiguous(memory_format=torch.channels_last) \
        if per_image % 16 == 0 else batches[1]
    assert (batches[0].numel() > MAX_SAMPLES_PER_BATCH) == (per_image == 4096)
    whole = _observe(calibrator, batches)
    for size in (1, 5, 24):
        parts = _observe(calibrator, batches, size)
        assert parts.batches == whole.batches == 3
        assert torch.equal(parts.ema_max, whole.ema_max) and torch.equal(parts.running_max, whole.running_max)
        assert parts.bound() == whole.bound()


def test_a_tensor_that_does_not_split_with_the_batch_is_drawn_from_its_first_part():
    constant = torch.linspace(0, 3, 70000)
    aq = ActivationQuantizer(QuantSpec(8, True, calibrator=Calibrator.PERCENTILE))
    part = BatchPart(6)
    aq.begin_batch(part)
    for start in (0, 3):
        part.start, part.count = start, 3
        aq(constant)
    aq.end_batch()
    whole = ActivationQuantizer(QuantSpec(8, True, calibrator=Calibrator.PERCENTILE))
    whole(constant)
    assert aq.batches == 1 and aq.bound() == whole.bound()
