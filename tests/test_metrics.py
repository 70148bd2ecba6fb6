"""graphq.metrics: the task scores calibrate's auto_metric can name, checked on outputs
built by hand, where what each must return is known."""

from __future__ import annotations

import numpy as np
import pytest

from graphq import metrics


def scores_of(ids: list[list[int]], classes: int = 5, time_major: bool = False) -> np.ndarray:
    """Class scores whose argmax per step is ``ids`` (rows are sequences), with a runner-up
    close below the best, as a recognizer's softmax has them."""
    rng = np.random.default_rng(0)
    out = rng.uniform(0.0, 0.1, (len(ids), len(ids[0]), classes)).astype(np.float32)
    for n, row in enumerate(ids):
        for t, k in enumerate(row):
            out[n, t, k] = 0.9
    return out.transpose(1, 0, 2) if time_major else out


def test_top1_is_the_share_of_positions_whose_argmax_is_floats():
    ref = scores_of([[1, 1, 0, 2, 0], [3, 0, 3, 0, 0]])
    got = scores_of([[1, 0, 0, 2, 2], [3, 3, 0, 0, 0]])
    # 4 of the 10 steps differ (1 -> 0 and 0 -> 2 in the first row, 0 -> 3 and 3 -> 0)
    assert metrics.top1([{"y": ref}], [{"y": got}]) == pytest.approx(0.6)
    # over batches and outputs together; an integer output (ids) is not read
    two = [{"y": ref, "ids": np.zeros((2, 5), np.int64)}, {"y": ref[:1]}]
    assert metrics.top1(two, [{"y": got, "ids": np.ones((2, 5), np.int64)}, {"y": ref[:1]}]) \
        == pytest.approx((6 + 5) / 15)
    # a classifier's [N, classes]
    logits = np.array([[0.1, 2.0, 0.3], [1.0, 0.0, 0.5]], np.float32)
    assert metrics.top1([{"p": logits}], [{"p": logits[::-1].copy()}]) == 0.0
    assert metrics.top1([{"p": logits}], [{"p": logits + 0.01}]) == 1.0


def test_ctc_greedy_compares_the_decoded_strings():
    """Steps that move a character's boundary against a blank or a repeat decode alike
    (the first sequence: '1 2' both); a merged repeat does not (the second: '3 3' against
    '3'), nor a blank between repeats."""
    ref = scores_of([[1, 1, 0, 2, 0], [3, 0, 3, 0, 0]])
    got = scores_of([[1, 0, 0, 2, 2], [3, 3, 0, 0, 0]])
    assert metrics.ctc_greedy([{"y": ref}], [{"y": got}]) == pytest.approx(0.5)
    assert metrics.ctc_greedy([{"y": ref}], [{"y": ref.copy()}]) == 1.0
    # [T, 1, classes] (a time-major recognizer, one sequence a batch) is one string, not T
    one_ref = scores_of([[1, 1, 0, 2, 0]], time_major=True)
    one_got = scores_of([[1, 0, 0, 2, 2]], time_major=True)
    assert one_ref.shape == (5, 1, 5)
    assert metrics.ctc_greedy([{"y": one_ref}, {"y": one_ref}],
                              [{"y": one_got}, {"y": scores_of([[1, 0, 2, 0, 2]], time_major=True)}]
                              ) == pytest.approx(0.5)  # '1 2' then '1 2 2' against '1 2'


def test_a_score_that_can_read_no_output_says_what_it_needs():
    ids = [{"ids": np.zeros((2, 5), np.int64)}]
    with pytest.raises(ValueError, match=r"top1 needs a float output with class scores on "
                                         r"its last axis; the outputs are 'ids' \[2, 5\]"):
        metrics.top1(ids, ids)
    flat = [{"p": np.zeros((2, 5), np.float32)}]
    with pytest.raises(ValueError, match=r"ctc_greedy needs a float output of rank 3, "
                                         r"\[N, T, classes\]; the outputs are 'p' \[2, 5\]"):
        metrics.ctc_greedy(flat, flat)
    with pytest.raises(ValueError, match=r"output 'p' is \(1, 5\) quantized, \(2, 5\) float"):
        metrics.top1(flat, [{"p": np.zeros((1, 5), np.float32)}])
    with pytest.raises(ValueError, match="1 reference batches against 2 quantized ones"):
        metrics.top1(flat, flat * 2)
