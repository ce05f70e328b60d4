import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from qcompile.passes import AlignAddScales, AssignPrecision, Calibrate, FoldBatchNorm, InsertQuantizers
from qcompile.passes.align_add_scales import MANTISSA_BITS, add_groups, best_mantissa, snap
from qcompile.passes.insert_quantizers import activation_quantizers

from qcompile import Pipeline, get_recipe
from qcompile.models import resnet20_cifar
from tests.conftest import randomize_bn


def _calibrated(recipe: str, align: bool):
    torch.manual_seed(0)
    model = randomize_bn(resnet20_cifar(), data=torch.randn(16, 3, 32, 32))
    calib = [(torch.randn(16, 3, 32, 32), torch.zeros(16)) for _ in range(2)]
    passes = [FoldBatchNorm(), AssignPrecision(), InsertQuantizers(), Calibrate()] + ([AlignAddScales()] if align else [])
    return Pipeline(passes).run(model, torch.randn(1, 3, 32, 32), recipe=get_recipe(recipe),
                                calibration_data=calib).graph_module


def _mantissa(x: float) -> float:
    return math.frexp(x)[0]


def test_each_add_class_shares_one_short_mantissa_and_moves_at_most_half_a_bit():
    before = {n: float(q.scale) for n, q in activation_quantizers(_calibrated("mostly4bit", False)).items()}
    gm = _calibrated("mostly4bit", True)
    after = {n: float(q.scale) for n, q in activation_quantizers(gm).items()}
    groups = add_groups(gm)
    # stage 1's identity blocks chain through the stem; each downsampling block starts a new class
    assert len(groups) == 3
    tied = {n for g in groups for n in g}
    assert any("aq_u4" in n for n in tied)  # 4-bit layer inputs read the sum and are tied too
    for g in groups:
        assert len({_mantissa(after[n]) for n in g}) == 1
        m = _mantissa(after[g[0]]) * 2
        assert float(np.float32(m * 2 ** (MANTISSA_BITS - 1))).is_integer()
        for n in g:
            assert 2**-0.5 - 1e-9 <= after[n] / before[n] <= 2**0.5 + 1e-9
    assert all(after[n] == before[n] for n in after if n not in tied)


@given(st.lists(st.floats(1e-4, 1e2), min_size=1, max_size=6))
def test_snapped_scales_are_exact_power_of_two_multiples(scales):
    m = best_mantissa(scales)
    assert 1 <= m < 2 and (m * 2 ** (MANTISSA_BITS - 1)).is_integer()
    for s in scales:
        t = snap(s, m)
        assert float(np.float32(t)) == t
        assert 2**-0.5 - 1e-9 <= t / s <= 2**0.5 + 1e-9
        assert math.log2(t / m).is_integer()
