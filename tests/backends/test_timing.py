"""Interleaved timing: every runner timed once per round, in an order that rotates."""

from collections import Counter

from qcompile.backends.timing import interleaved_times


def test_each_runner_takes_each_place_in_the_round_equally_often():
    calls: list[str] = []
    runners = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    samples = interleaved_times(runners, rounds=6, warmup=1, min_round_ms=0.0)
    assert {k: len(v) for k, v in samples.items()} == {"a": 6, "b": 6, "c": 6}
    timed = calls[3:]  # after one warm-up run each, one timed run per runner per round
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    places = Counter((place, k) for r in rounds for place, k in enumerate(r))
    assert set(places.values()) == {2}  # 6 rounds: each runner twice in each of the 3 places


def test_runners_keyed_by_model_and_batch_share_the_rounds():
    """``batch_latencies`` keys its runners by (model, batch size): every pair runs in every round."""
    calls: list[tuple[str, int]] = []
    keys = [(m, b) for b in (1, 8) for m in ("artifact", "float")]
    runners = {k: (lambda k=k: calls.append(k)) for k in keys}
    samples = interleaved_times(runners, rounds=4, warmup=1, min_round_ms=0.0)
    assert set(samples) == set(keys) and all(len(v) == 4 for v in samples.values())
    timed = calls[len(keys):]
    assert all(sorted(timed[i:i + 4]) == sorted(keys) for i in range(0, len(timed), 4))
