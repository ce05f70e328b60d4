import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from qcompile.ir import int4


def _old_relax_pack(codes):
    """The TVM builder's former int8 packer, kept here to pin the bit pattern."""
    flat = codes.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    return ((flat[0::2] & 0x0F) | (flat[1::2] << 4)).astype(np.int8)


@st.composite
def _codes(draw):
    signed = draw(st.booleans())
    lo, hi = (-8, 7) if signed else (0, 15)
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=7))
    return draw(arrays(np.int32, shape, elements=st.integers(lo, hi))), signed


@given(_codes())
def test_pack_unpack_round_trip(case):
    codes, signed = case
    packed = int4.pack(codes)
    assert packed.dtype == np.uint8 and packed.shape == ((codes.size + 1) // 2,)
    out = int4.unpack(packed, codes.shape, signed)
    assert out.shape == codes.shape and np.array_equal(out, codes)
    # the int8 view the TVM backend stores is the same bytes and unpacks the same
    assert np.array_equal(int4.unpack(packed.view(np.int8), codes.shape, signed), codes)
    assert np.array_equal(packed.view(np.int8), _old_relax_pack(codes))


def test_layout_low_nibble_first_odd_padded_with_zero():
    assert int4.pack(np.array([1, 2, 3])).tolist() == [0x21, 0x03]
    assert int4.pack(np.array([-1, -8, 7])).tolist() == [0x8F, 0x07]
    assert int4.pack(np.array([15, 8])).tobytes() == bytes([0x8F])
