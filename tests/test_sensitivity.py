"""The degradation measures behind the mixed-precision search."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import RecipeError
from qcompile.sensitivity import METRICS, calibration_loss, degradation, mean_kl, sensitivities


def logits_batches(seed: int, sizes=(5, 3)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 10, generator=gen) * 3 for n in sizes]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_kl_is_zero_for_the_reference_and_positive_otherwise(a, b):
    ref, other = logits_batches(a), logits_batches(b)
    assert mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-6)
    assert mean_kl(ref, [r + 5.0 for r in ref]) == pytest.approx(0.0, abs=1e-5)  # softmax ignores a shift
    assert a == b or mean_kl(ref, other) > 0


def test_kl_is_the_mean_over_images_of_the_textbook_formula():
    ref, other = logits_batches(1), logits_batches(2)
    p = torch.cat([r.softmax(1) for r in ref])
    q = torch.cat([o.softmax(1) for o in other])
    expected = float((p * (p.log() - q.log())).sum(1).mean())
    assert mean_kl(ref, other) == pytest.approx(expected, rel=1e-5)


def test_loss_metric_is_the_change_of_mean_cross_entropy():
    ref, other = logits_batches(3), logits_batches(4)
    batches = [(torch.zeros(len(z), 1), torch.arange(len(z)) % 10) for z in ref]
    expected = calibration_loss(other, batches) - calibration_loss(ref, batches)
    assert degradation("loss", ref, other, batches) == pytest.approx(expected)
    assert degradation("kl", ref, other, batches) == pytest.approx(mean_kl(ref, other))
    assert calibration_loss(ref, batches) == pytest.approx(float(torch.nn.functional.cross_entropy(
        torch.cat(ref), torch.cat([y for _, y in batches]))))


def test_unknown_metric_is_refused():
    assert METRICS == ("kl", "loss")
    with pytest.raises(RecipeError, match="unknown sensitivity metric 'mse'"):
        sensitivities(None, None, {}, [], [], metric="mse")  # type: ignore[arg-type]
