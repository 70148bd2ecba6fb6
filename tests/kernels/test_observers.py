"""Observers: streaming equals one shot, clip ranges on known distributions, non-finite values,
memory, merge."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from graphq.kernels import observers as O
from graphq.kernels import quant as Q

N = 1_000_000


def batches(x: np.ndarray, n: int = 10) -> list[np.ndarray]:
    return [b.reshape(-1, 10) if b.size % 10 == 0 else b for b in np.array_split(x, n)]


def observed(obs: O.Observer, x: np.ndarray, n: int = 10) -> O.Observer:
    for b in batches(x, n):
        obs.observe(b)
    return obs


def fq_mse(x: np.ndarray, clip: tuple[float, float], name: str, symmetric: bool) -> float:
    scale, zp = Q.qparams(*clip, name, symmetric)
    return float(np.mean((Q.fake_quantize(x, scale, zp, name).astype(np.float64) - x) ** 2))


@pytest.fixture(scope="module")
def normal() -> np.ndarray:
    return np.random.default_rng(0).normal(size=N).astype(np.float32)


@pytest.fixture(scope="module")
def outliers(normal: np.ndarray) -> np.ndarray:
    """Normal values with two huge outliers (as in LLM / attention activations)."""
    x = normal.copy()
    x[[123_456, 654_321]] = [50.0, -50.0]
    return x


# -- MinMax -----------------------------------------------------------------------------------


def test_minmax_streaming_equals_one_shot_and_merge(normal: np.ndarray):
    obs = observed(O.MinMaxObserver(), normal)
    assert obs.range() == (float(normal.min()), float(normal.max()))
    assert obs.count == N
    half = N // 2
    a = observed(O.MinMaxObserver(), normal[:half], 5)
    b = observed(O.MinMaxObserver(), normal[half:], 5)
    assert a.merge(b).range() == obs.range() and a.count == N


def test_empty_observers_give_zero_range():
    for method in O.OBSERVERS:
        obs = O.make_observer(method)
        assert obs.range() == (0.0, 0.0)
        obs.observe(np.zeros((4, 4), np.float32))
        assert obs.range() == (0.0, 0.0)
        Q.qparams(*obs.range(), "uint8", symmetric=False)


# -- Histogram: growth, streaming, memory -----------------------------------------------------


def test_histogram_growth_is_exact_rebinning():
    """Batches that keep widening the range: the streamed counts equal a one-pass count of all
    the data on the final grid (growth merges whole cells)."""
    rng = np.random.default_rng(1)
    parts = [rng.normal(0, 1 + 3 * k, 50_000).astype(np.float32) for k in range(10)]
    parts.insert(3, np.array([0.0, 0.0, 1e-3, -250.0], np.float32))
    obs = O.HistogramObserver(2048)
    for part in parts:
        obs.observe(part)
    data = np.concatenate(parts)
    assert obs.count == data.size and obs.counts.sum() == data.size
    assert obs.zeros == 2
    cells = np.floor(data.astype(np.float64) / obs.width).astype(np.int64) - obs.offset
    expected = np.bincount(cells, minlength=obs.bins)
    # float32 indexing (x * (1 / w) - offset) may put a value within ~bins * 2^-24 of a cell
    # width from an edge into the neighbouring cell: a few per 2^24 / bins values
    moved = np.abs(obs.counts - expected).sum()
    assert moved <= 2 * data.size * obs.bins * 2.0**-24
    assert obs.edges[0] <= data.min() and data.max() < obs.edges[-1]
    assert 0.0 in obs.edges


@pytest.mark.parametrize("p,symmetric", [(99.99, False), (99.9, True), (90.0, False)])
def test_histogram_streaming_matches_one_shot(normal: np.ndarray, p: float, symmetric: bool):
    rng = np.random.default_rng(2)
    x = normal * np.repeat(rng.uniform(0.5, 2.0, 10), N // 10).astype(np.float32)
    stream = observed(O.PercentileObserver(p, symmetric), x)
    once = O.PercentileObserver(p, symmetric)
    once.observe(x)
    assert stream.width >= once.width          # streaming may only lose resolution
    assert stream.counts.sum() == once.counts.sum() == N
    for a, b in zip(stream.range(), once.range(), strict=True):
        assert abs(a - b) <= stream.width
    exact = np.percentile(np.abs(x) if symmetric else x, [100 - p, p])
    assert abs(once.range()[1] - exact[1]) <= once.width


def test_memory_is_flat_in_the_number_of_batches():
    rng = np.random.default_rng(3)
    obs = O.HistogramObserver()
    sizes = []
    for k in range(200):
        obs.observe(rng.normal(0, 1 + k / 50, 1000).astype(np.float32))
        if k in (19, 199):
            sizes.append(len(json.loads(json.dumps(obs.state()))["counts"]))
            sizes.append(sum(v.nbytes for v in vars(obs).values() if isinstance(v, np.ndarray)))
    assert obs.count == 200_000
    assert sizes[:2] == sizes[2:] == [2048, 2048 * 8]
    assert set(vars(obs)) == {"count", "nonfinite", "min", "max", "bins", "zeros", "width",
                              "offset", "_counts", "sample", "batches"}


def test_state_is_json(outliers: np.ndarray):
    for method in O.OBSERVERS:
        obs = observed(O.make_observer(method), outliers[:10_000], 2)
        state = json.loads(json.dumps(obs.state()))
        assert state["kind"] == method and state["count"] == 10_000
        assert state["range"] == list(obs.range())


# -- non-finite values ------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(O.OBSERVERS))
def test_non_finite_values_are_ignored_and_counted(method: str, normal: np.ndarray):
    obs = O.make_observer(method)
    clean = O.make_observer(method)
    for b in batches(normal[:100_000]):
        dirty = b.copy().ravel()
        dirty[:3] = [np.nan, np.inf, -np.inf]
        obs.observe(dirty)
        clean.observe(b.ravel()[3:])
    obs.observe(np.full(8, np.nan, np.float32))       # a batch with nothing finite
    assert obs.nonfinite == 38 and obs.count == clean.count
    assert obs.range() == clean.range()
    assert all(np.isfinite(obs.range()))


@pytest.mark.parametrize("method", list(O.OBSERVERS))
def test_attention_mask_values(method: str):
    """Masks hold -inf or float32's lowest value next to ordinary scores."""
    rng = np.random.default_rng(4)
    scores = rng.normal(0, 3, (8, 64, 64)).astype(np.float32)
    mask = np.triu(np.ones((64, 64), bool), 1)
    obs = O.make_observer(method)
    obs.observe(np.where(mask, -np.inf, scores))
    assert obs.nonfinite == 8 * mask.sum()
    lo, hi = obs.range()
    assert np.isfinite(lo) and np.isfinite(hi) and lo <= 0 <= hi
    obs.observe(np.where(mask, np.finfo(np.float32).min, scores))
    lo, hi = obs.range()
    assert np.isfinite(lo) and np.isfinite(hi)
    scale, _ = Q.qparams(lo, hi, "uint8", symmetric=False)
    assert np.isfinite(scale) and scale > 0


def test_float16_and_zero_batches():
    rng = np.random.default_rng(5)
    obs = O.PercentileObserver(100.0)
    obs.observe(np.zeros(100, np.float16))             # zeros before any range exists
    x = rng.normal(size=1000).astype(np.float16)
    obs.observe(x)
    assert obs.count == 1100 and obs.counts.sum() == 1100
    assert obs.zeros == 100 + int(np.sum(x == 0))
    assert obs.range() == (float(x.min()), float(x.max()))


# -- percentile -------------------------------------------------------------------------------


def test_percentile_on_normal_samples(normal: np.ndarray):
    # standard normal quantiles: P(X < 3.7190) = 0.9999, P(|X| < 3.8906) = 0.9999,
    # P(X < 2.3263) = 0.99
    lo, hi = observed(O.PercentileObserver(99.99), normal).range()
    assert lo == pytest.approx(-3.7190, abs=0.08) and hi == pytest.approx(3.7190, abs=0.08)
    lo, hi = observed(O.PercentileObserver(99.99, symmetric=True), normal).range()
    assert hi == -lo == pytest.approx(3.8906, abs=0.08)
    lo, hi = observed(O.PercentileObserver(99.0), normal).range()
    assert lo == pytest.approx(-2.3263, abs=0.02) and hi == pytest.approx(2.3263, abs=0.02)
    relu = observed(O.PercentileObserver(99.0), np.maximum(normal, 0)).range()
    # after a ReLU half the values are exactly 0; the 1st percentile is 0, not inside a cell
    assert relu[0] == 0.0 and relu[1] == pytest.approx(2.3263, abs=0.02)


# -- entropy and MSE --------------------------------------------------------------------------


def naive_kl(h: np.ndarray, i: int, levels: int) -> float:
    """TensorRT's loop for one candidate, written plainly."""
    p = h[:i].copy()
    p[-1] += h[i:].sum()
    group = np.arange(i) * levels // i
    q = np.zeros(i)
    for g in range(levels):
        cells = group == g
        nonzero = (cells & (p > 0)).sum()
        if nonzero:
            q[cells & (p > 0)] = h[:i][cells].sum() / nonzero
    if np.any((p > 0) & (q == 0)):
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def test_kl_prefix_sums_match_the_plain_loop():
    rng = np.random.default_rng(6)
    h = rng.poisson(rng.uniform(0, 30, 300) * np.exp(-np.arange(300) / 60)).astype(float)
    h[rng.integers(0, 300, 30)] = 0
    h[-1] = 2
    levels = 32
    candidates = np.arange(levels, h.size + 1)
    ref = np.array([naive_kl(h, i, levels) for i in candidates])
    assert np.isinf(ref).any() and np.isfinite(ref).sum() > 200
    best = O._kl_threshold(h, levels)
    assert best == candidates[np.argmin(ref)]
    prefix = {"h": np.concatenate([[0.0], np.cumsum(h)]),
              "nz": np.concatenate([[0.0], np.cumsum(h > 0)]),
              "hlogh": np.concatenate([[0.0], np.cumsum(h * np.log(np.where(h > 0, h, 1)))])}
    fast = O._kl(h, prefix, candidates, levels)
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(ref))
    np.testing.assert_allclose(fast[np.isfinite(ref)], ref[np.isfinite(ref)], atol=1e-12)


def test_expected_error_matches_measured_error(normal: np.ndarray):
    """The closed-form histogram error equals the fake-quantization error on the data."""
    obs = observed(O.HistogramObserver(), normal)
    qt = Q.qtype("int8")
    for clip in [(-4.0, 4.0), (-1.0, 2.5), (-0.05, 0.05)]:
        est = O._expected_sq_error(obs.counts, obs.edges, np.array([clip[0]]),
                                   np.array([clip[1]]), qt, False)[0] / N
        assert est == pytest.approx(fq_mse(normal, clip, "int8", False), rel=0.02)


@pytest.mark.parametrize("name,symmetric", [("int8", True), ("uint8", False), ("int4", False),
                                            ("uint8", True)])
@pytest.mark.parametrize("data", ["normal", "relu_outlier", "student", "offset"])
def test_expected_error_by_levels_equals_the_cell_by_cell_sum(data: str, name: str,
                                                             symmetric: bool):
    """The error summed over quantization intervals (8-bit: 255 midpoints a candidate) is the
    cell-by-cell integral, to rounding, on every kind of range (clipping, rounding, data far
    from 0), and picks the same best candidate."""
    rng = np.random.default_rng(11)
    x = {"normal": rng.normal(size=N),
         "relu_outlier": np.concatenate([np.maximum(rng.normal(size=N), 0), [40.0]]),
         "student": rng.standard_t(2, size=N),
         "offset": 100.0 + 0.5 * rng.normal(size=N)}[data].astype(np.float32)
    obs = observed(O.HistogramObserver(bins=4096), x)
    counts = obs._nonzero_counts()
    occupied = np.flatnonzero(counts)
    first, last = occupied[0], occupied[-1] + 1
    counts, edges = counts[first:last], obs.edges[first:last + 1]
    qt = Q.qtype(name)
    lo0, hi0 = obs._bounds()
    f = np.linspace(0.01, 1.0, 100)
    top = max(-lo0, hi0)
    lo, hi = (-f * top, f * top) if symmetric else (f * lo0, f * hi0)
    scale, zp = Q.qparams(lo, hi, qt, symmetric)
    s = np.broadcast_to(np.asarray(scale, np.float64), lo.shape)
    z = np.broadcast_to(np.asarray(zp, np.float64), lo.shape)
    by_levels = O._sq_error_by_levels(counts, edges, s, z, qt)
    by_cells = O._sq_error_by_cells(counts, edges, s, z, qt)
    np.testing.assert_allclose(by_levels, by_cells, rtol=1e-8)
    assert np.argmin(by_levels) == np.argmin(by_cells)


def test_mse_searches_one_sided_data_once(monkeypatch):
    """Data on one side of 0 (a ReLU output): the joint search of both ends is the search of
    the far end, so it is the only one; signed data: an end is searched again only after the
    other end moved."""
    calls = []
    search = O._search
    monkeypatch.setattr(O, "_search", lambda *a, **k: calls.append(1) or search(*a, **k))
    rng = np.random.default_rng(12)
    observed(O.MSEObserver("uint8"), np.maximum(rng.normal(size=N), 0).astype(np.float32)).range()
    assert len(calls) == 1
    calls.clear()
    observed(O.MSEObserver("uint8"), rng.normal(size=N).astype(np.float32)).range()
    assert 3 <= len(calls) <= 1 + 2 * O._MSE_ROUNDS


def test_sq_error_integral_matches_numeric_integration():
    """Phi(x) = integral of (t - fq(t))^2 from the grid's low end, inside and outside."""
    scale, zp = Q.qparams(-1.0, 2.0, "uint4", symmetric=False)
    s, z = float(scale), float(zp)
    grid_lo, grid_hi = s * (0 - z), s * (15 - z)
    t = np.linspace(grid_lo - 0.7, grid_hi + 0.9, 400_001)
    fq = (np.clip(np.rint(t / s) + z, 0, 15) - z) * s          # fake_quantize in float64
    sq = (t - fq) ** 2
    numeric = np.concatenate([[0.0], np.cumsum((sq[1:] + sq[:-1]) / 2 * np.diff(t))])
    numeric -= np.interp(grid_lo, t, numeric)
    points = np.array([grid_lo - 0.5, grid_lo, 0.013, 0.5 * s, 0.77, grid_hi, grid_hi + 0.8])
    phi = O._sq_error_integral(points[None, :], np.array([[grid_lo]]), np.array([[grid_hi]]),
                               np.array([[s]]))[0]
    np.testing.assert_allclose(phi, np.interp(points, t, numeric), rtol=1e-4, atol=1e-9)


def test_rebin_keeps_mass_outside_the_target_cells():
    spread = O._rebin(np.array([1.0, 2.0, 3.0]), -0.5, 1.0, np.array([0.0, 1.0, 2.0]))
    np.testing.assert_allclose(spread, [2.0, 4.0])    # halves of the end cells stay in
    same = O._rebin(np.array([1.0, 2.0, 3.0]), 0.0, 0.5, np.array([0.0, 1.0, 1.5]))
    np.testing.assert_allclose(same, [3.0, 3.0])


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("name,symmetric", [("int8", True), ("uint8", False)])
def test_heavy_tail_is_clipped(outliers: np.ndarray, method: str, name: str, symmetric: bool):
    obs = observed(O.make_observer(method, qtype=name, symmetric=symmetric), outliers)
    clip = obs.range()
    assert -50.0 / 3 < clip[0] < -2.0 and 2.0 < clip[1] < 50.0 / 3
    assert fq_mse(outliers, clip, name, symmetric) < 0.5 * fq_mse(
        outliers, (-50.0, 50.0), name, symmetric)


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("name,symmetric", [("int8", True), ("uint8", False)])
def test_heavy_tail_after_relu(normal: np.ndarray, method: str, name: str, symmetric: bool):
    x = np.maximum(normal, 0)
    x[123] = 50.0
    obs = observed(O.make_observer(method, qtype=name, symmetric=symmetric), x)
    lo, hi = obs.range()
    assert lo == (-hi if symmetric else 0.0)
    assert 2.0 < hi < 50.0 / 1.5
    if symmetric:     # with uint8 one outlier costs more clipped than it saves in rounding
        assert fq_mse(x, (lo, hi), name, symmetric) < fq_mse(x, (0.0, 50.0), name, symmetric)
    else:
        assert method == "entropy" or fq_mse(x, (lo, hi), name, symmetric) < fq_mse(
            x, (0.0, 50.0), name, symmetric)


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("low,name,symmetric", [(-1.0, "int8", True), (0.0, "uint8", False),
                                                (-1.0, "uint8", False)])
def test_uniform_is_not_clipped(method: str, low: float, name: str, symmetric: bool):
    x = np.random.default_rng(7).uniform(low, 6.0, N).astype(np.float32)
    lo, hi = observed(O.make_observer(method, qtype=name, symmetric=symmetric), x).range()
    assert hi > 0.98 * x.max()
    tolerance = float(0.02 * (x.max() - low))  # a float: newer pytest refuses numpy scalars
    assert lo == (-hi if symmetric else pytest.approx(float(x.min()), abs=tolerance))


def test_entropy_searches_many_candidates(outliers: np.ndarray):
    obs = observed(O.EntropyObserver("int8", symmetric=True), outliers)
    cells = obs._abs_counts(obs._nonzero_counts()).size
    assert cells >= 1500                       # candidates 128 .. >= 1500 cells of |x|
    assert 128 < obs.range()[1] / obs.width < cells - 100


def test_mse_asymmetric_moves_each_end():
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.gamma(2.0, size=N) - 1.0, [-30.0]]).astype(np.float32)
    lo, hi = observed(O.MSEObserver("uint8"), x).range()
    assert -10.0 < lo < -1.0 and hi > 0.6 * x.max()
    assert fq_mse(x, (lo, hi), "uint8", False) < fq_mse(x, (-30.0, float(x.max())), "uint8", False)


# -- merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_merge_halves_close_to_one_observer(outliers: np.ndarray, method: str):
    rng = np.random.default_rng(9)
    x = outliers * np.float32(1.5)
    x[:N // 2] = rng.normal(0.5, 1.0, N // 2)        # the halves have different ranges
    whole = observed(O.make_observer(method), x)
    a = observed(O.make_observer(method), x[:N // 2], 5)
    b = observed(O.make_observer(method), x[N // 2:], 5)
    merged = a.merge(b)
    assert merged.count == N and merged.counts.sum() == pytest.approx(N)
    assert merged.zeros == whole.zeros
    assert (merged.min, merged.max) == (whole.min, whole.max)
    # the distributions agree to within about one cell of the coarser grid
    width = max(merged.width, whole.width)
    cdf_whole = np.concatenate([[0.0], np.cumsum(whole.counts)])
    cdf_merged = np.interp(whole.edges, merged.edges,
                           np.concatenate([[0.0], np.cumsum(merged.counts)]))
    assert np.max(np.abs(cdf_merged - cdf_whole)) < 0.01 * N
    # percentile reads the distribution directly; KL minima are flat, hence the looser 10%
    tolerance = {"percentile": 3 * width, "mse": 0.03 * 75, "entropy": 0.1 * 75}[method]
    for m, w in zip(merged.range(), whole.range(), strict=True):
        assert abs(m - w) <= tolerance


def test_merge_with_empty_and_zero_only_observers(normal: np.ndarray):
    full = observed(O.HistogramObserver(), normal[:1000], 1)
    zeros = O.HistogramObserver()
    zeros.observe(np.zeros(10, np.float32))
    full.merge(zeros).merge(O.HistogramObserver())
    assert full.count == 1010 and full.counts.sum() == 1010 and full.zeros == 10
    empty = O.HistogramObserver().merge(zeros)
    assert empty.range() == (0.0, 0.0) and empty.count == 10


def test_merge_rejects_other_kinds():
    with pytest.raises(ValueError, match="cannot merge"):
        O.MinMaxObserver().merge(O.HistogramObserver())
    with pytest.raises(ValueError, match="bins"):
        O.HistogramObserver(1024).merge(O.HistogramObserver(2048))


# -- factory and performance ------------------------------------------------------------------


def test_make_observer():
    assert isinstance(O.make_observer("minmax"), O.MinMaxObserver)
    obs = O.make_observer("percentile", percentile=99.9, symmetric=True)
    assert isinstance(obs, O.PercentileObserver) and obs.p == 99.9
    assert O.make_observer("entropy", qtype="uint8").options() == {
        "qtype": "uint8", "symmetric": False, "bins": 4096, "sample": None}
    assert isinstance(O.make_observer("mse", bins=512), O.MSEObserver)
    with pytest.raises(ValueError, match="allowed: minmax, percentile, entropy, mse"):
        O.make_observer("kl")
    with pytest.raises(ValueError, match="unknown option.*percentil.*allowed: percentile"):
        O.make_observer("percentile", percentil=99.0)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        O.make_observer("percentile", percentile=0.0)
    with pytest.raises(ValueError, match="unknown qtype"):
        O.make_observer("mse", qtype="int3")


@pytest.mark.parametrize("method", list(O.OBSERVERS))
def test_observe_speed(method: str, normal: np.ndarray):
    obs = O.make_observer(method)
    obs.observe(normal)                                # 4 MB of float32; sets the grid
    start = time.perf_counter()
    obs.observe(normal * np.float32(1.01))
    observe_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    obs.range()
    range_ms = 1e3 * (time.perf_counter() - start)
    print(f"{method}: observe 4 MB {observe_ms:.1f} ms, range {range_ms:.1f} ms")


def feature_maps(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """``n`` ReLU'd NCHW feature maps (1, 32, 64, 64) of smooth blobs, heavier on some
    channels, with a bright first column in every row (a border effect)."""
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0, 1, (2, 32, 1, 1))
        gain = rng.lognormal(0, 0.7, (32, 1, 1))
        x = gain * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
        x = x + rng.normal(0, 0.05, x.shape) - 0.1
        x[:, :, 0] = 6.0
        out.append(np.maximum(x, 0)[None].astype(np.float32))
    return out


@pytest.mark.parametrize("method,opts", [
    ("percentile", {"percentile": 99.9}), ("percentile", {"percentile": 99.99}),
    ("entropy", {"qtype": "uint8"}), ("mse", {"qtype": "uint8"})])
def test_sampled_histogram_is_close_to_the_exact_one(method: str, opts: dict):
    """A histogram whose bulk comes from a strided sample of each batch (sample=16384 of
    131072 values): the counts add up to every value, exact zeros included, within 0.1%; the
    far tail is counted exactly; the clip ranges stay within a few percent of the exact
    histogram's; the bright first column of every 64-wide row keeps its share (a stride
    dividing 64 would see it in every sample or in none)."""
    maps = feature_maps(np.random.default_rng(3), 12)
    exact, sampled = O.make_observer(method, **opts), O.make_observer(method, sample=16384, **opts)
    for m in maps:
        exact.observe(m)
        sampled.observe(m)
    assert sampled.count == exact.count == 12 * m.size
    assert (sampled.min, sampled.max) == (exact.min, exact.max)
    assert np.array_equal(sampled.edges, exact.edges)
    assert sampled.counts.sum() == pytest.approx(exact.counts.sum(), rel=1e-3)
    assert sampled.zeros == pytest.approx(exact.zeros, rel=0.03)
    top = np.cumsum(exact.counts[::-1])[::-1] <= 0.001 * exact.counts.sum()  # the far tail
    assert top.any()
    np.testing.assert_allclose(sampled.counts[top], exact.counts[top], rtol=1e-12)
    cell = np.searchsorted(sampled.edges, 6.0, side="right") - 1   # the cell holding 6.0
    share = [o.counts[cell] / o.counts.sum() for o in (exact, sampled)]
    assert share[0] >= 1 / 64
    assert share[1] == pytest.approx(share[0], rel=0.1), share
    lo, hi = sampled.range()
    elo, ehi = exact.range()
    assert lo == elo == 0.0
    assert hi == pytest.approx(ehi, rel=0.05), (method, hi, ehi)


def test_sample_option():
    with pytest.raises(ValueError, match="sample must be None or an integer >= 1024"):
        O.HistogramObserver(sample=10)
    obs = O.make_observer("percentile", sample=4096)
    small = np.arange(4096, dtype=np.float32)
    obs.observe(small)                              # not above the sample: every value
    assert obs.counts.sum() == 4096 and obs.zeros == 1
    assert obs.state()["options"]["sample"] == 4096
    assert O._prime_at_least(1) == 2 and O._prime_at_least(8) == 11


def test_sampled_batch_counts_extremes_and_non_finite_values_exactly():
    """A sampled batch takes its min, max and non-finite values from the one mask that splits
    off the tails (the bulk cannot hold them): a new minimum below the grid, a new maximum,
    NaN and +-inf are counted as an unsampled batch counts them, and every value lands."""
    rng = np.random.default_rng(5)
    first = rng.normal(0, 1, 50_000).astype(np.float32)
    second = rng.normal(0, 1, 50_000).astype(np.float32)
    second[[10, 20, 30, 40]] = [np.nan, np.inf, -np.inf, np.nan]
    second[123], second[456] = -9.0, 11.0            # beyond everything seen so far
    exact = O.make_observer("percentile", percentile=99.99)
    sampled = O.make_observer("percentile", percentile=99.99, sample=4096)
    for obs in (exact, sampled):
        obs.observe(first)
        obs.observe(second)
    assert sampled.nonfinite == exact.nonfinite == 4
    assert sampled.count == exact.count == 100_000 - 4
    assert (sampled.min, sampled.max) == (exact.min, exact.max) == (-9.0, 11.0)
    # the bulk's count is an estimate from ~4096 of the second batch's 50000 values
    assert sampled.counts.sum() == pytest.approx(exact.counts.sum(), rel=5e-3)
    # the new extremes' cells (far beyond the first batch's tails): counted one by one
    for value in (-9.0, 11.0):
        cell = np.searchsorted(exact.edges, value, side="right") - 1
        assert sampled.counts[cell] == exact.counts[cell] >= 1
    assert sampled.range() == pytest.approx(exact.range(), rel=1e-3)



@pytest.mark.parametrize("shift", [0.0, -2.0])
def test_sampled_batch_with_finite_values_takes_only_the_tails_it_reaches(shift: float):
    """Finite batches take the fast path (the batch's min and max say which tails it has): a
    ReLU-like batch (shift 0: no value below the zeros at the observed min) and a signed one
    (shift -2) with a new minimum and maximum are counted as the unsampled histogram counts
    them in the tails, with min, max and count exact."""
    rng = np.random.default_rng(11)
    batches = [np.maximum(rng.normal(0, 1, 60_000), 0).astype(np.float32) + shift
               for _ in range(3)]
    batches[2][[7, 70]] = [shift - 5.0, 9.0]
    exact = O.make_observer("percentile", percentile=99.99)
    sampled = O.make_observer("percentile", percentile=99.99, sample=4096)
    for b in batches:
        exact.observe(b)
        sampled.observe(b)
    assert sampled.count == exact.count == 180_000
    assert (sampled.min, sampled.max) == (exact.min, exact.max) == (shift - 5.0, 9.0)
    top = np.cumsum(exact.counts[::-1])[::-1] <= 0.001 * exact.counts.sum()
    np.testing.assert_allclose(sampled.counts[top], exact.counts[top], rtol=1e-12)
    low = np.cumsum(exact.counts) <= 0.001 * exact.counts.sum()
    np.testing.assert_allclose(sampled.counts[low], exact.counts[low], rtol=1e-12)
    assert sampled.range() == pytest.approx(exact.range(), rel=1e-3)


def test_later_batches_sample_a_quarter(monkeypatch):
    """The first FULL_SAMPLE_BATCHES batches' bulk comes from ``sample`` values, later ones'
    from a quarter of it (at least 1024); the first batch is counted in full (no sample)."""
    asked = []
    real = O._sampled

    def spy(values, sample, batch):
        asked.append(sample)
        return real(values, sample, batch)

    monkeypatch.setattr(O, "_sampled", spy)
    obs = O.make_observer("entropy", qtype="uint8", sample=8192)
    rng = np.random.default_rng(2)
    for _ in range(12):
        obs.observe(rng.random(50_000).astype(np.float32))
    assert asked == [8192] * (O.FULL_SAMPLE_BATCHES - 1) + [2048] * (12 - O.FULL_SAMPLE_BATCHES)
    assert obs.counts.sum() == pytest.approx(12 * 50_000, rel=5e-3)
    assert O.HistogramObserver(sample=2048)._batch_sample() == 2048
    late = O.HistogramObserver(sample=2048)
    late.batches = O.FULL_SAMPLE_BATCHES + 1
    assert late._batch_sample() == 1024

def test_channel_mean_is_the_finite_values_mean_per_channel():
    """Axis 1 of NCHW batches (of different spatial sizes) and the last axis of 2-D ones, in
    float64; non-finite values are left out of both the sum and the count of their channel."""
    rng = np.random.default_rng(5)
    batches = [rng.normal(1.0, 2.0, (2, 3, 5, 5)).astype(np.float32),
               rng.normal(1.0, 2.0, (1, 3, 7, 4)).astype(np.float32)]
    mean = O.ChannelMean()
    for b in batches:
        mean.observe(b)
    flat = np.concatenate([np.moveaxis(b, 1, 0).reshape(3, -1) for b in batches], axis=1)
    np.testing.assert_allclose(mean.mean(), flat.astype(np.float64).mean(axis=1), rtol=1e-12)
    bad = batches[0].copy()
    bad[0, 1, 0, 0], bad[1, 2, 3, 3], bad[1, 2, 0, 1] = np.inf, np.nan, -np.inf
    mean = O.ChannelMean()
    mean.observe(bad)
    keep = np.isfinite(bad)
    want = [bad[:, c][keep[:, c]].astype(np.float64).mean() for c in range(3)]
    np.testing.assert_allclose(mean.mean(), want, rtol=1e-12)
    np.testing.assert_array_equal(mean.count, [50, 49, 48])
    gemm = O.ChannelMean()
    x = rng.normal(size=(6, 4)).astype(np.float32)
    gemm.observe(x)
    np.testing.assert_allclose(gemm.mean(), x.astype(np.float64).mean(axis=0), rtol=1e-12)
