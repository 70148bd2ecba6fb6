"""Side-by-side timing (graphq.latency): rounds interleaved, their number bounded in time."""

from __future__ import annotations

import time

import numpy as np
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
    fast, slow = Sleeper(0.001), Sleeper(0.02)  # 20x: a loaded machine once slept 1 ms for 4.5
    times = latency.session_times([fast, slow], {}, budget_s=0.0, min_rounds=5, max_rounds=5)
    assert times.shape == (5, 2)
    assert (times[:, 0] < times[:, 1]).all()
    assert latency.paired(times)[1] > 2.0
    assert fast.runs == slow.runs == 5 + 2  # two warm-up runs each


def test_slow_runs_stop_at_the_time_cap_after_the_floor_rounds(monkeypatch):
    """Runs that would take longer than CAP_S in all: FLOOR_ROUNDS rounds, then stop, and
    one warm-up run each instead of two."""
    monkeypatch.setattr(latency, "CAP_S", 0.2)
    a, b = Sleeper(0.05), Sleeper(0.05)
    times = latency.session_times([a, b], {}, budget_s=0.0, min_rounds=20, max_rounds=20)
    assert len(times) == latency.FLOOR_ROUNDS
    assert a.runs == b.runs == latency.FLOOR_ROUNDS + 1
    assert latency.paired(latency.session_times([a, b], {}, 0.0, 20, 20)) == [
        1.0, pytest.approx(1.0, abs=0.5)]


def test_paired_ratios_cancel_load_that_hits_some_rounds():
    """Load that slows every run of a round 3x, in rounds where it hit the second session
    more often than the first: each session's own median says the second is 3.1x slower,
    the rounds' ratios say 1.04x, as it is."""
    times = np.array([[1.0, 3.1], [3.0, 1.04], [1.0, 1.04], [3.0, 3.12], [1.0, 3.12]])
    assert np.median(times[:, 1]) / np.median(times[:, 0]) == pytest.approx(3.1)
    assert latency.paired(times) == [1.0, pytest.approx(1.04)]


def test_medians_rank_by_paired_ratios(monkeypatch):
    """medians(): the first model's median seconds, the others' as that times their paired
    ratio; a decision's rounds are at least DECISION_ROUNDS."""
    sessions = [Sleeper(0.002), Sleeper(0.004)]
    monkeypatch.setattr(latency.runtime, "session", lambda model, providers: sessions.pop(0))
    monkeypatch.setattr(latency, "DECISION_BUDGET_S", 0.0)
    first, second = sessions
    base, other = latency.medians(["a", "b"], {}, ["CPUExecutionProvider"], budget_s=0.0)
    assert other / base == pytest.approx(2.0, rel=0.4)
    assert first.runs == second.runs == latency.DECISION_ROUNDS + 2



def test_speed_db_is_the_exchange_rate_per_doubling():
    assert latency.speed_db(2.0, 1.0) == pytest.approx(1.0)
    assert latency.speed_db(4.0, 1.5) == pytest.approx(3.0)
    assert latency.speed_db(0.5, 1.0) == pytest.approx(-1.0)
    assert latency.speed_db(1.7, 0.0) == 0.0
