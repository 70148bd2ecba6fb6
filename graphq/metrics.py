"""Task scores for calibrate's ``auto_metric``: functions of the float model's outputs and a
quantized candidate's, higher meaning closer, for outputs whose use an SQNR does not weigh.

A classifier's or a CTC recognizer's class scores are read through an argmax, and what
flips an argmax is the error where two scores are close, not the error on the largest ones
that an SQNR over the whole output is made of. On PaddleOCR's English PP-OCRv4 recognizer,
method auto by the worst output SQNR kept mse (13.6 dB, percentile 8.9 dB on 64
calibration lines) and quantized 3 activations min_sqnr_db would keep float: 84% of
held-out strings equal to the float model's; by :func:`ctc_greedy` it kept percentile (0.89
against mse's 0.47 on the same lines) and those 3 float: 94%.

Use them as ``auto_metric = "graphq.metrics:top1"`` or ``"graphq.metrics:ctc_greedy"`` in
``[calibrate]`` (``--set calibrate.auto_metric=graphq.metrics:ctc_greedy`` on a preset).
Each is called as ``function(reference, quantized)``: two lists with one dict of output name
-> array per scoring batch. Every float output of the shape the score reads is scored;
outputs of another shape or type (integer ids, a scalar) are left out, and a graph with none
the score can read is an error naming what it needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["ctc_greedy", "top1"]

Outputs = list[dict[str, np.ndarray]]


def top1(reference: Outputs, quantized: Outputs) -> float:
    """The share of positions whose argmax over the last axis is the float model's: class
    agreement of a classifier's ``[N, classes]`` scores, or per step of ``[N, T, classes]``
    (every float output with at least 2 values on its last axis)."""
    equal = total = 0
    for ref, got in _pairs(reference, quantized, None, "top1"):
        same = ref.argmax(-1) == got.argmax(-1)
        equal += int(same.sum())
        total += same.size
    return equal / total


def ctc_greedy(reference: Outputs, quantized: Outputs) -> float:
    """The share of sequences whose greedy CTC decoding is the float model's: the argmax of
    each step over the last axis, repeats merged, the blank (class 0, as PaddleOCR, EasyOCR
    and torch's ``CTCLoss`` have it) dropped. Reads every float output of rank 3 as
    ``[N, T, classes]``, or as ``[T, 1, classes]`` (time-major, one sequence) where its middle
    axis is 1 and its first is not. With the blank at another class the comparison is
    stricter, not wrong: a blank that appears or goes at a sequence's ends then counts."""
    equal = total = 0
    for ref, got in _pairs(reference, quantized, 3, "ctc_greedy"):
        for a, b in zip(_decode(ref), _decode(got), strict=True):
            equal += int(np.array_equal(a, b))
            total += 1
    return equal / total


def _decode(scores: np.ndarray) -> list[np.ndarray]:
    """Greedy CTC decoding of a rank-3 score tensor: one array of class ids per sequence."""
    if scores.shape[1] == 1 and scores.shape[0] > 1:  # [T, 1, classes]: time-major
        scores = scores.transpose(1, 0, 2)
    ids = scores.argmax(-1)
    keep = np.ones(ids.shape, bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    keep &= ids != 0
    return [row[k] for row, k in zip(ids, keep, strict=True)]


def _pairs(reference: Outputs, quantized: Outputs, rank: int | None, what: str
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The (float, quantized) arrays of every batch's float outputs with class scores on
    their last axis, of ``rank`` (any where None); a ValueError naming the outputs where
    there are none."""
    if len(reference) != len(quantized):
        raise ValueError(f"{what}: {len(reference)} reference batches against "
                         f"{len(quantized)} quantized ones")
    found = False
    seen: dict[str, tuple[int, ...]] = {}
    for ref_batch, got_batch in zip(reference, quantized, strict=True):
        for name, ref in ref_batch.items():
            ref = np.asarray(ref)
            seen[name] = ref.shape
            if not (ref.ndim and ref.ndim == (rank or ref.ndim) and ref.dtype.kind == "f"
                    and ref.shape[-1] >= 2 and ref.size and name in got_batch):
                continue
            got = np.asarray(got_batch[name])
            if got.shape != ref.shape:
                raise ValueError(f"{what}: output '{name}' is {got.shape} quantized, "
                                 f"{ref.shape} float")
            found = True
            yield ref, got
    if not found:
        shapes = ", ".join(f"'{k}' {list(v)}" for k, v in seen.items()) or "none"
        need = (f"a float output of rank {rank}, [N, T, classes]" if rank else
                "a float output with class scores on its last axis")
        raise ValueError(f"{what} needs {need}; the outputs are {shapes}")
