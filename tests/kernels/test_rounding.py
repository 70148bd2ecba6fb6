"""GPTQ weight rounding (graphq.kernels.rounding), on sklearn's digits: the inputs are the
8x8 images (64 strongly correlated pixels), the weight a least-squares linear classifier
fitted on them, rounded to 4 bits per row (its error then matters). Errors are measured on
held-out images, not the ones ``H`` is taken from."""

from __future__ import annotations

import numpy as np
import pytest

from graphq.kernels.rounding import gptq, upper_inverse

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits():
    images, labels = sklearn_datasets.load_digits(return_X_y=True)
    x = images.astype(np.float64) / 16.0
    onehot = np.eye(10)[labels]
    fit, held = x[:1200], x[1200:]
    aug = np.hstack([fit, np.ones((len(fit), 1))])
    coef = np.linalg.lstsq(aug, onehot[:1200], rcond=None)[0]  # (65, 10)
    return fit, held, coef[:64].T.copy(), coef[64].copy()  # w (10, 64), bias (10,)


def grid(w: np.ndarray, bits: int = 4):
    """Per-row symmetric scales and the signed range of ``bits``."""
    top = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=-1) / top
    shape = scale.shape
    return scale, np.zeros(shape), np.full(shape, -top - 1.0), np.full(shape, float(top))


def nearest(w, scale, zero, lo, hi):
    return (np.clip(np.round(w / scale[..., None] + zero[..., None]), lo[..., None],
                    hi[..., None]) - zero[..., None]) * scale[..., None]


def moments(x: np.ndarray) -> np.ndarray:
    return (x.T @ x / len(x))[None]


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding(digits):
    _, _, w, _ = digits
    scale, zero, lo, hi = grid(w[None])
    rounded = gptq(w[None], np.eye(64)[None], scale, zero, lo, hi)
    np.testing.assert_array_equal(rounded, nearest(w[None], scale, zero, lo, hi))


def test_gptq_rounds_onto_the_grid_for_less_output_error(digits):
    """Held-out output error (mean squared, the classifier's 10 scores) at least 2x lower
    than nearest rounding's (measured 5.5x); every value on the row's grid, inside [lo, hi];
    the classifier's held-out predictions agree with float's at least as often."""
    fit, held, w, _ = digits
    scale, zero, lo, hi = grid(w[None])
    hi[0, :3] = 5.0  # a narrower range on some rows is kept
    rounded = gptq(w[None], moments(fit), scale, zero, lo, hi)
    base = nearest(w[None], scale, zero, lo, hi)
    q = rounded / scale[..., None] + zero[..., None]
    np.testing.assert_allclose(q, np.round(q), atol=1e-9)
    assert np.all(q >= lo[..., None] - 1e-9) and np.all(q <= hi[..., None] + 1e-9)
    ref = held @ w.T
    err_gptq = np.mean((held @ rounded[0].T - ref) ** 2)
    err_near = np.mean((held @ base[0].T - ref) ** 2)
    assert err_gptq < err_near / 2, (err_gptq, err_near)
    agree = [np.mean((held @ m[0].T).argmax(1) == ref.argmax(1)) for m in (rounded, base)]
    assert agree[0] >= agree[1], agree


def test_gptq_rounds_each_group_on_its_own(digits):
    """Groups (a grouped Conv) are rounded as if one at a time, each with its own H."""
    fit, _, w, _ = digits
    rows = np.stack([w[:5, :32], w[5:, 32:]])
    scale, zero, lo, hi = grid(rows)
    h = np.concatenate([moments(fit[:, :32]), moments(fit[:, 32:])])
    both = gptq(rows, h, scale, zero, lo, hi)
    for g in range(2):
        one = gptq(rows[g:g + 1], h[g:g + 1], scale[g:g + 1], zero[g:g + 1], lo[g:g + 1],
                   hi[g:g + 1])
        np.testing.assert_allclose(both[g], one[0], rtol=0, atol=1e-12)


def test_gptq_refuses_moments_of_the_wrong_shape(digits):
    _, _, w, _ = digits
    scale, zero, lo, hi = grid(w[None])
    with pytest.raises(ValueError, match=r"expected \(1, 64, 64\)"):
        gptq(w[None], np.eye(65)[None], scale, zero, lo, hi)


def test_upper_inverse_inverts_stacks_of_upper_triangular_matrices():
    """By halves down to leaves of 4 (odd sizes split unevenly), against numpy's inverse."""
    rng = np.random.default_rng(2)
    r = np.triu(rng.normal(size=(3, 37, 37))) + 6 * np.eye(37)
    got = upper_inverse(r, leaf=4)
    np.testing.assert_allclose(got, np.linalg.inv(r), rtol=1e-9, atol=1e-12)
    assert np.all(np.tril(got[0], -1) == 0)
