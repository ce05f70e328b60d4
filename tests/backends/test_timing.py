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
