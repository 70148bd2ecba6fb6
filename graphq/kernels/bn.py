"""BatchNormalization folding arithmetic.

Inference BatchNormalization on channel ``c`` is an affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps)
    shift = beta - mean * scale

When ``x = W * a + b`` comes from a linear op whose output channel ``c`` is produced by the
slice ``W[c]`` alone, the BN folds into it::

    W'[c] = scale[c] * W[c]
    b'[c] = scale[c] * b[c] + shift[c]

Where output channel ``c`` lives in the weight depends on the op:

- Conv ``W[M, C/g, k...]``: axis 0.
- ConvTranspose ``W[C, M/g, k...]``: output channel ``c = group * (M/g) + j`` is column ``j``
  of the group's rows, so the weight is viewed as ``[g, C/g, M/g, k...]`` and scaled on
  ``(g, j)``.
- Gemm / MatMul ``W[K, N]``: axis 1; Gemm with ``transB = 1`` has ``W[N, K]``: axis 0.

Arithmetic is in float64 and the results are cast back to the weight's dtype.
"""

from __future__ import annotations

import numpy as np


def scale_shift(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` and ``shift`` (float64) of an inference BatchNormalization."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shift = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
    return scale, shift


def then(scale: np.ndarray, shift: np.ndarray, op: str, c: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray] | None:
    """``scale * x + shift`` followed by ``op`` with the per-channel constant ``c`` on the
    right, as one affine map: ``Add``: ``shift + c``; ``Sub``: ``shift - c``; ``Mul``: both
    ``* c``; ``Div``: both ``/ c`` (None where ``c`` holds a zero); None for another op.
    A bias and a BN written out as arithmetic compose so."""
    c = np.asarray(c, np.float64)
    if op == "Add":
        return scale, shift + c
    if op == "Sub":
        return scale, shift - c
    if op == "Mul":
        return scale * c, shift * c
    if op == "Div" and np.all(c != 0):
        return scale / c, shift / c
    return None


def fold_bias(bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
              dtype: np.dtype) -> np.ndarray:
    """``scale * bias + shift``; a missing bias counts as zero."""
    if bias is None:
        return shift.astype(dtype)
    return (np.asarray(bias, np.float64) * scale + shift).astype(dtype)


def fold_conv_weight(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Scale a Conv weight ``[M, C/g, k...]`` on its output-channel axis 0."""
    shape = (-1,) + (1,) * (weight.ndim - 1)
    return (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)


def fold_conv_transpose_weight(weight: np.ndarray, scale: np.ndarray, groups: int) -> np.ndarray:
    """Scale a ConvTranspose weight ``[C, M/g, k...]`` on output channel ``g * M/g + j``."""
    c_in, m_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    view = weight.astype(np.float64).reshape(groups, c_in // groups, m_per_group, *kernel)
    factors = scale.reshape(groups, 1, m_per_group, *(1,) * len(kernel))
    return (view * factors).reshape(weight.shape).astype(weight.dtype)


def fold_matrix_weight(weight: np.ndarray, scale: np.ndarray, out_axis: int) -> np.ndarray:
    """Scale a 2-D weight on its output axis (1 for ``[K, N]``, 0 for ``[N, K]``)."""
    shape = (1, -1) if out_axis == 1 else (-1, 1)
    return (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)


def fold_gemm_bias(c: np.ndarray | None, beta: float, scale: np.ndarray, shift: np.ndarray,
                   dtype: np.dtype) -> np.ndarray:
    """Gemm's new ``C`` (with its ``beta`` set to 1): ``scale * (beta * C) + shift``.

    ``C`` broadcasts to ``[M, N]``; the result has the broadcast shape of ``C`` and ``[N]``.
    """
    if c is None:
        return shift.astype(dtype)
    return (beta * np.asarray(c, np.float64) * scale + shift).astype(dtype)


def channel_shape(values: np.ndarray, rank: int) -> np.ndarray:
    """Reshape per-channel values ``[C]`` to broadcast on axis 1 of a rank-``rank`` tensor."""
    return values.reshape((-1,) + (1,) * max(rank - 2, 0))
