"""Side-by-side timing (graphq.latency): rounds interleaved, their number bounded in time."""

from __future__ import annotations

import time

import pytest

from graphq import latency


class Sleeper:
    """A stand-in session whose run takes ``seconds``; counts its runs."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.runs = seconds, 0

    def run(self, outputs, feed):
        self.runs += 1
        time.sleep(self.seconds)


def test_timing_ranks_the_faster_session_and_runs_the_rounds_asked():
    fast, slow = Sleeper(0.001), Sleeper(0.004)
    (f, s), rounds = latency.session_timings([fast, slow], {}, budget_s=0.0, min_rounds=5,
                                             max_rounds=5)
    assert rounds == 5
    assert f < s
    assert fast.runs == slow.runs == 5 + 2  # two warm-up runs each


def test_slow_runs_stop_at_the_time_cap_after_the_floor_rounds(monkeypatch):
    """Runs that would take longer than CAP_S in all: FLOOR_ROUNDS rounds, then stop, and
    one warm-up run each instead of two."""
    monkeypatch.setattr(latency, "CAP_S", 0.2)
    a, b = Sleeper(0.05), Sleeper(0.05)
    _, rounds = latency.session_timings([a, b], {}, budget_s=0.0, min_rounds=20,
                                        max_rounds=20)
    assert rounds == latency.FLOOR_ROUNDS
    assert a.runs == b.runs == latency.FLOOR_ROUNDS + 1
    assert latency.session_medians([a, b], {}, 0.0, 20, 20) == [pytest.approx(0.05, abs=0.03)] * 2
