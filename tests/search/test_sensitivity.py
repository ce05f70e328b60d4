"""The degradation measures behind the mixed-precision search, and the cache of the tables they fill."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qcompile.passes import AnnotateCost, AssignPrecision
from qcompile.passes.mixed_precision import MixedPrecision

from qcompile import Pipeline, cache, get_recipe
from qcompile.errors import PipelineError, RecipeError
from qcompile.search import sensitivity
from qcompile.search.bit_allocation import parse_budget
from qcompile.search.sensitivity import METRICS, calibration_loss, degradation, mean_kl, sensitivities
from tests.passes.ptq_helpers import batches


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


def test_kl_of_near_identical_outputs_is_not_rounded_below_zero():
    # unclamped, float32 rounding makes about half of these a hair negative
    for seed in range(20):
        ref, noise = logits_batches(seed, (64,)), logits_batches(seed + 100, (64,))
        for eps in (1e-8, 1e-7, 1e-6):
            assert mean_kl(ref, [r + eps * n for r, n in zip(ref, noise)]) >= 0


DATA = batches(n=1)


def search(model: torch.nn.Module, metric: str = "kl") -> dict:
    """The mixed-precision pass on TinyNet (3 layers, candidates w4a4 and w8a8) and one batch of 8x8 images."""
    passes = [AssignPrecision(), AnnotateCost(), MixedPrecision(parse_budget("linear=0.4"), metric=metric)]
    with torch.no_grad():
        result = Pipeline(passes).run(model, DATA[0][0][:1], recipe=get_recipe("auto"), calibration_data=DATA)
    return result.context.results["mixed_precision"]


def rehashed(change):
    """Edit the cached table's content and store it with a correct hash, so only the table check can object."""
    def tamper(path: Path) -> None:
        content = json.loads(path.read_text())["content"]
        change(content)
        cache.store_json(path, sensitivity.CACHE_KIND, sensitivity.CACHE_VERSION, content)
    return tamper


def unhashed(path: Path) -> None:
    entry = json.loads(path.read_text())
    entry["content"]["layers"]["body"]["w4a4"] = 0.5
    path.write_text(json.dumps(entry))


def older_version(path: Path) -> None:
    content = json.loads(path.read_text())["content"]
    cache.store_json(path, sensitivity.CACHE_KIND, sensitivity.CACHE_VERSION - 1, content)


TAMPER = {  # how the cached table is damaged, and what the warning says about it
    "garbage": (lambda p: p.write_bytes(b"\x00\xff not json"), "is unreadable (UnicodeDecodeError"),
    "truncated JSON": (lambda p: p.write_text(p.read_text()[:40]), "is unreadable (JSONDecodeError"),
    "changed without its hash": (unhashed, "does not match its content hash"),
    "older format version": (older_version, f"is format version {sensitivity.CACHE_VERSION - 1}, expected"),
    "negative KL": (rehashed(lambda c: c["layers"]["body"].update(w4a4=-0.01)),
                    "gives layer body at w4a4 a negative KL divergence (-0.01)"),
    "NaN": (rehashed(lambda c: c["layers"]["body"].update(w4a4=float("nan"))),
            "gives layer body at w4a4 nan, not a finite number"),
    "a string": (rehashed(lambda c: c["layers"]["body"].update(w4a4="0.01")),
                 "gives layer body at w4a4 '0.01', not a finite number"),
    "infinite reference loss": (rehashed(lambda c: c.update(reference_loss=float("inf"))),
                                "has reference loss inf, not a finite number"),
    "missing layer": (rehashed(lambda c: c["layers"].pop("body")),
                      "has the wrong layers (missing: body; unknown: none)"),
    "unknown layer": (rehashed(lambda c: c["layers"].update(extra={"w4a4": 0.0})),
                      "has the wrong layers (missing: none; unknown: extra)"),
    "missing candidate": (rehashed(lambda c: c["layers"]["body"].clear()),
                          "has candidates [] for layer body, expected [w4a4]"),
    "another metric": (rehashed(lambda c: c.update(metric="loss")), "measures 'loss', not 'kl'"),
}


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_an_unusable_cached_table_is_measured_again_with_a_warning(tamper, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    change, reason = TAMPER[tamper]
    first = search(tiny)
    path = Path(first["sensitivity_cache"])
    change(path)
    with pytest.warns(cache.CacheWarning) as record:
        again = search(tiny)
    (w,) = record
    assert str(w.message).startswith(f"cache entry {path} {reason}")
    assert str(w.message).endswith(": deleted, recomputing")
    assert warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line).count("\n") == 1
    assert again["sensitivity_measured"] == 3 and again["sensitivity"] == first["sensitivity"]
    assert search(tiny)["sensitivity_measured"] == 0  # the measured table was stored again


def test_a_negative_loss_entry_is_legitimate(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    path = Path(search(tiny, "loss")["sensitivity_cache"])
    rehashed(lambda c: c["layers"]["body"].update(w4a4=-0.01))(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache.CacheWarning)
        again = search(tiny, "loss")
    assert again["sensitivity_measured"] == 0 and again["sensitivity"]["body"]["w4a4"] == -0.01


def test_a_measured_table_that_is_not_finite_is_an_error_and_not_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(sensitivity, "degradation", lambda *args: float("nan"))
    with pytest.raises(PipelineError, match=r"the measured sensitivity table gives layer \w+ at w4a4 nan, not a "
                                            r"finite number; nothing was cached"):
        search(tiny)
    assert not list(tmp_path.rglob("*.json"))


def test_unlabelled_calibration_batches_are_measured_by_kl_alone(tiny, tmp_path, monkeypatch):
    """Calibration images may come without labels: the KL search needs none; the loss metric says it needs them."""
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    images = [(x, None) for x, _ in DATA]
    passes = [AssignPrecision(), AnnotateCost(), MixedPrecision(parse_budget("linear=0.4"))]
    with torch.no_grad():
        result = Pipeline(passes).run(tiny, DATA[0][0][:1], recipe=get_recipe("auto"), calibration_data=images)
    assert result.context.results["mixed_precision"]["sensitivity_reference_loss"] is None
    with pytest.raises(PipelineError, match="the 'loss' sensitivity metric needs labelled calibration batches"):
        sensitivities(tiny, None, {}, [], images, metric="loss")  # type: ignore[arg-type]
