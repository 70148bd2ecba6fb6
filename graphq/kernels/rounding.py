"""Weight rounding that sees the data: GPTQ (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers").

Nearest rounding minimizes each weight's own error. What the op's output loses is
``(W_q - W) x`` on the data, ``tr((W_q - W) H (W_q - W)^T)`` with ``H = E[x x^T]`` over its
inputs: GPTQ rounds one input column at a time and moves the columns not yet rounded to make
up for the error just made, by the inputs' correlations (the Optimal Brain Surgeon update,
from the Cholesky factor of ``H^-1``); columns with the largest ``H_ii`` go first.

Everything is batched over groups (a grouped or depthwise Conv: one ``H`` per group).
"""

from __future__ import annotations

import numpy as np

#: GPTQ's damping: ``damp x mean(diag H)`` added to ``H``'s diagonal, so that inputs that
#: barely vary (or are seen on fewer positions than there are columns) do not get huge updates
DAMP = 0.01
#: columns rounded per block before the rest is updated at once (a matrix product)
BLOCK = 128


def gptq(rows: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
         lo: np.ndarray, hi: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Round ``rows`` (groups, rows, columns) onto the grid ``(q - zero_point) x scale``,
    ``lo <= q <= hi`` (per row: arrays of shape (groups, rows)), column by column.

    ``hessian``: (groups, columns, columns) ``E[x x^T]`` of the inputs the columns multiply.
    Returns the rounded rows (float64, exactly on the grid)."""
    g, r, d = rows.shape
    if hessian.shape != (g, d, d):
        raise ValueError(f"hessian has shape {hessian.shape}; expected {(g, d, d)}")
    w = rows.astype(np.float64)
    h = hessian.astype(np.float64).copy()
    diag = np.einsum("gii->gi", h)  # a view: writes go into h
    diag[diag <= 0] = 1.0  # an input that was always 0: its column's error costs nothing
    order = np.argsort(-diag, axis=1, kind="stable")  # largest inputs first
    diag += damp * diag.mean(axis=1, keepdims=True)
    w = np.take_along_axis(w, order[:, None, :], axis=2)
    h = h[np.arange(g)[:, None, None], order[:, :, None], order[:, None, :]]
    inverse = np.linalg.inv(h)
    u = np.swapaxes(np.linalg.cholesky((inverse + np.swapaxes(inverse, 1, 2)) / 2), 1, 2)
    s = scale.astype(np.float64)[:, :, None]
    z = zero_point.astype(np.float64)[:, :, None]
    lo3, hi3 = lo[:, :, None], hi[:, :, None]
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        block = w[:, :, start:stop]  # a view of w
        errors = np.empty_like(block)
        for i in range(stop - start):
            c = start + i
            col = block[:, :, i:i + 1]
            q = (np.clip(np.round(col / s + z), lo3, hi3) - z) * s
            err = (col - q) / u[:, c, c][:, None, None]
            block[:, :, i:] -= err * u[:, None, c, c:stop]
            block[:, :, i:i + 1] = q
            errors[:, :, i:i + 1] = err
        if stop < d:
            w[:, :, stop:] -= errors @ u[:, start:stop, stop:]
    out = np.empty_like(w)
    np.put_along_axis(out, order[:, None, :], w, axis=2)
    return out
