"""Interleaved timing of several ways to run one model, shared by the backends' measurements.

Each round runs every runner in turn, enough times to last about ``min_round_ms`` (counted from the warm-up),
and keeps the median of those single runs: a sub-millisecond model is timed neither by one run at the mercy of
the scheduler's tick nor by a mean that one late thread wake-up drags up, and what the machine does during a
round hits every runner alike, so a ratio of two runners is best taken per round
(:func:`qcompile.reporting.measured.median_ratio`). The order rotates from round to round, so that every runner
takes every place in a round equally often (the first of a round starts on what the previous round left in the
caches).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping


def interleaved_times(runners: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 3,
                      min_round_ms: float = 20.0) -> dict[str, list[float]]:
    """Per runner, its latency per run in ms in each of ``rounds`` interleaved rounds."""
    per_round = {}
    for key, run in runners.items():
        start = time.perf_counter()
        for _ in range(warmup):
            run()
        warm_ms = (time.perf_counter() - start) * 1e3 / warmup
        per_round[key] = max(1, math.ceil(min_round_ms / max(warm_ms, 1e-3)))
    samples: dict[str, list[float]] = {key: [] for key in runners}
    keys = list(runners)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times = []
            for _ in range(per_round[key]):
                start = time.perf_counter()
                runners[key]()
                times.append((time.perf_counter() - start) * 1e3)
            samples[key].append(statistics.median(times))
    return samples
