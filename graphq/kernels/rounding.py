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


def upper_inverse(r: np.ndarray, leaf: int = 256) -> np.ndarray:
    """The inverse of upper-triangular matrices (a stack), by halves:
    ``[[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]``, so that most of the work is
    matrix products (about a third of a general inverse's, which numpy has no triangular
    version of)."""
    d = r.shape[-1]
    if d <= leaf:
        return np.linalg.inv(r)
    half = d // 2
    a, c = upper_inverse(r[..., :half, :half], leaf), upper_inverse(r[..., half:, half:], leaf)
    out = np.zeros_like(r)
    out[..., :half, :half], out[..., half:, half:] = a, c
    out[..., :half, half:] = -(a @ r[..., :half, half:]) @ c
    return out


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
    # u: the upper Cholesky factor of H^-1 (u^T u = H^-1), as the inverse of the upper
    # factor r of H = r r^T (the Cholesky factor of H with its order reversed): one
    # factorization and one inverse, no second factorization of a computed inverse
    r = np.linalg.cholesky(h[:, ::-1, ::-1])[:, ::-1, ::-1]
    u = upper_inverse(r)
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
