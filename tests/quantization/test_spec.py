import pytest
from torch import fx

from qcompile.quantization.spec import META_KEY, Calibrator, Granularity, NumFormat, QuantSpec, annotate, get_annotation


@pytest.mark.parametrize(
    ("bits", "signed", "qmin", "qmax"),
    [(8, True, -127, 127), (8, False, 0, 255), (4, True, -7, 7), (4, False, 0, 15), (2, True, -1, 1)],
)
def test_symmetric_ranges(bits, signed, qmin, qmax):
    spec = QuantSpec(bits, signed)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


def test_bf16_spec_is_not_quantized():
    spec = QuantSpec.bf16()
    assert not spec.is_quantized and spec.bits == 16 and spec.fmt is NumFormat.BF16
    assert spec.calibrator is Calibrator.NONE and spec.describe() == "bf16"


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError):
        QuantSpec(1)
    with pytest.raises(ValueError):
        QuantSpec(8, fmt=NumFormat.BF16)


def test_spec_is_frozen_and_hashable():
    spec = QuantSpec(4, False, Granularity.PER_CHANNEL, Calibrator.MAX)
    assert spec.with_signed(True) == QuantSpec(4, True, Granularity.PER_CHANNEL, Calibrator.MAX)
    assert len({spec, spec.with_signed(False)}) == 1


def test_annotation_lives_in_node_meta():
    g = fx.Graph()
    x = g.placeholder("x")
    assert get_annotation(x) is None
    ann = annotate(x)
    assert x.meta[META_KEY] is ann and annotate(x) is ann
    x.meta[META_KEY] = {"bits": 4}
    with pytest.raises(TypeError, match="expected NodeQuant"):
        get_annotation(x)


def test_a_positive_spec_starts_at_code_1_and_is_unsigned():
    spec = QuantSpec(8, signed=False, positive=True)
    assert (spec.qmin, spec.qmax, spec.describe()) == (1, 255, "u8pos")
    with pytest.raises(ValueError, match="unsigned"):
        QuantSpec(8, signed=True, positive=True)
