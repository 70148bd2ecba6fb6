"""Fake-quant kernels: forward against the ONNX reference, gradients against their definitions.

Gradients are checked three ways, and it matters which function each check differentiates:

- ``gradcheck`` (float64 finite differences of the real forward) only where the real forward is
  differentiable and its derivative is the one we define: saturated elements (``y`` is
  ``(qmax - z) * s``, linear in ``s``, constant in ``x``) and PACT's clipped elements. Inside the
  range the real forward is a staircase (derivative 0 almost everywhere), so the STE / LSQ
  gradients there are definitions, not derivatives of the forward.
- For those, central differences of the *surrogate*: the forward with the rounding offset
  ``c = round(u) - u`` frozen at the base point, ``s * (clamp(x / s + c + z, qmin, qmax) - z)``,
  at points strictly inside or strictly outside the clamp (its kinks are at ``q = qmin, qmax``).
- Against the same surrogate built from torch autograd (round with a detached offset) and
  torch's own ``_fake_quantize_learnable_*`` ops (an independent LSQ / LSQ+ implementation) on
  points away from rounding ties.
"""

from __future__ import annotations

import io
import time
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from graphq.kernels import fakequant as F  # noqa: E402
from graphq.kernels import quant as Q  # noqa: E402

DTYPES = ["int8", "uint8", "int4", "uint4"]


def onnx_inputs(rng: np.random.Generator, shape: tuple[int, ...], scale: np.ndarray,
                zp: np.ndarray, axis: int | None, name: str) -> np.ndarray:
    """float32 values in ``shape``: exact and near .5 ties, saturating values, inf, random."""
    qt = Q.qtype(name)
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s = np.asarray(scale, np.float64).reshape(bshape)
    z = np.asarray(zp, np.float64).reshape(bshape)
    k = rng.integers(qt.qmin - 3, qt.qmax + 3, size=shape)
    ties = (k - z + 0.5) * s
    sat = rng.choice([-1.0, 1.0], size=shape) * (qt.qmax - qt.qmin + 10) * s
    rand = rng.standard_normal(shape) * (qt.qmax - qt.qmin) / 3 * s
    pick = rng.integers(0, 4, size=shape)
    x = np.where(pick == 0, ties, np.where(pick == 1, sat, rand)).astype(np.float32)
    x = np.where(pick == 3, np.float32(np.asarray(ties, np.float32)), x)  # float32 ties
    flat = x.reshape(-1)
    flat[:2] = [np.inf, -np.inf]
    return x


def grid(name: str, symmetric: bool, rng: np.random.Generator, n: int | None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Random qparams (per tensor when ``n`` is None)."""
    size = () if n is None else (n,)
    scale = (rng.uniform(0.5, 2.0, size) * 10.0 ** rng.integers(-3, 2, size)).astype(np.float32)
    qt = Q.qtype(name)
    if symmetric:
        zp = np.full(size, (qt.qmin + qt.qmax + 1) // 2)
    else:
        zp = rng.integers(qt.qmin, qt.qmax + 1, size)
    return np.asarray(scale), np.asarray(zp).astype(qt.storage)


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_forward_matches_onnx_reference_bit_exactly(name, axis, symmetric):
    rng = np.random.default_rng(zlib.crc32(f"{name} {axis} {symmetric}".encode()))
    shape = (6, 5, 7, 9)
    n = None if axis is None else shape[axis]
    scale, zp = grid(name, symmetric, rng, n)
    x = onnx_inputs(rng, shape, scale, zp, axis, name)
    ref = Q.fake_quantize(x, scale, zp, name, axis)
    qt = Q.qtype(name)
    t = torch.from_numpy(x)
    outs = {
        "ste": F.fake_quantize_ste(t, scale, zp, qt.qmin, qt.qmax, axis),
        "lsq": F.fake_quantize_lsq(t, torch.from_numpy(scale).requires_grad_(),
                                   torch.from_numpy(zp.astype(np.float32)), qt.qmin, qt.qmax,
                                   axis),
    }
    for method, y in outs.items():
        assert y.dtype == torch.float32
        np.testing.assert_array_equal(bits(y.detach().numpy()), bits(ref), err_msg=method)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_pact_forward_is_onnx_qdq_with_its_qparams(name, symmetric):
    rng = np.random.default_rng(7)
    qt = Q.qtype(name)
    alpha = torch.tensor(2.7)
    scale, zp = F.pact_qparams(alpha, qt.qmin, qt.qmax, symmetric)
    s = scale.numpy()
    x = onnx_inputs(rng, (4000,), s, np.array(zp), None, name)
    x[2:100] = np.linspace(-6, 6, 98, dtype=np.float32)
    y = F.fake_quantize_pact(torch.from_numpy(x), alpha, qt.qmin, qt.qmax, symmetric)
    ref = Q.fake_quantize(x, s, zp, name)
    np.testing.assert_array_equal(bits(y.numpy()), bits(ref))
    assert float(y.max()) == pytest.approx(2.7, rel=1e-6)
    if not symmetric:
        assert float(y.min()) == 0.0


def test_exact_ties_round_half_to_even_and_saturate():
    s = np.float32(0.25)
    x = (np.arange(-600, 600) + 0.5).astype(np.float32) * s
    y = F.fake_quantize_ste(torch.from_numpy(x), s, 0, -128, 127).numpy()
    expected = np.clip(np.rint(np.arange(-600, 600) + 0.5), -128, 127) * s
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    assert y[600] == 0.0 and y[601] == 2 * s  # 0.5 -> 0, 1.5 -> 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((3, 8, 5)).astype(np.float32)).to(dtype)
    scale = np.array([0.01, 0.02, 0.05, 0.1, 0.003, 0.04, 0.2, 0.015], np.float32)
    y = F.fake_quantize_ste(x, scale, 0, -128, 127, axis=1)
    assert y.dtype == dtype
    ref = Q.fake_quantize(x.float().numpy(), scale, np.zeros(8, np.int8), "int8", axis=1)
    assert torch.equal(y, torch.from_numpy(ref).to(dtype))


def test_nonfinite_inputs():
    x = torch.tensor([np.inf, -np.inf, np.nan, 1.0])
    y = F.fake_quantize_ste(x, 0.1, 0, -128, 127)
    assert y[0] == np.float32(12.7) and y[1] == np.float32(-12.8) and torch.isnan(y[2])


def test_torch_native_op_rounds_x_times_reciprocal():
    """Why torch's fused op is not used: it quantizes ``x * (1 / s)``, not ``x / s``."""
    rng = np.random.default_rng(11)
    s = np.float32(0.3)
    x = ((rng.integers(-400, 400, 20000) + 0.5) * np.float64(s)).astype(np.float32)
    native = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(s), 0, -128, 127)
    recip = np.clip(np.rint(x * (np.float32(1) / s)), -128, 127).astype(np.float32) * s
    np.testing.assert_array_equal(native.numpy(), recip)
    ours = F.fake_quantize_ste(torch.from_numpy(x), s, 0, -128, 127).numpy()
    np.testing.assert_array_equal(ours, Q.fake_quantize(x, s, 0, "int8"))
    assert np.count_nonzero(native.numpy() != ours) > 0


def test_argument_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="scale"):
        F.fake_quantize_ste(x, [0.1, 0.2], 0, -128, 127)
    with pytest.raises(ValueError, match="shape"):
        F.fake_quantize_ste(x, [0.1, 0.2], 0, -128, 127, axis=1)
    with pytest.raises(ValueError, match="axis"):
        F.fake_quantize_ste(x, 0.1, 0, -128, 127, axis=2)
    with pytest.raises(ValueError, match="exact"):
        F.fake_quantize_ste(x, 0.1, 0, -(2**31), 2**31 - 1)
    with pytest.raises(TypeError, match="floating"):
        F.fake_quantize_ste(torch.zeros(2, dtype=torch.int32), 0.1, 0, -128, 127)


# ---------------------------------------------------------------------------- gradients


def surrogate_autograd(x, s, z, qmin, qmax):
    """The LSQ surrogate from torch autograd: round with a detached offset, clamp, dequantize."""
    u = x / s
    r = u + (torch.round(u) - u).detach()
    zr = z + (torch.round(z.clamp(qmin, qmax)) - z).detach()
    return (torch.clamp(r + zr, qmin, qmax) - zr) * s


def lsq_case(rng, name, axis, shape=(5, 4, 6), dtype=torch.float64):
    qt = Q.qtype(name)
    n = None if axis is None else shape[axis]
    scale, zp = grid(name, False, rng, n)
    x = onnx_inputs(rng, shape, scale, zp, axis, name)
    x = np.where(np.isfinite(x), x, 0.0)
    sh = [1] * len(shape)
    if axis is not None:
        sh[axis] = -1
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    st = torch.tensor(scale, dtype=dtype).reshape(sh).requires_grad_()
    zt = torch.tensor(zp.astype(np.float64), dtype=dtype).reshape(sh).requires_grad_()
    g = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    return qt, xt, st, zt, g


def grads(y, g, *ts):
    return torch.autograd.grad(y, ts, g)


@pytest.mark.parametrize("name", ["int8", "uint8", "int4"])
@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_gradients_equal_autograd_surrogate(name, axis):
    rng = np.random.default_rng(5)
    qt, x, s, z, g = lsq_case(rng, name, axis)
    ours = grads(F.fake_quantize_lsq(x, s, z, qt.qmin, qt.qmax, axis, 1.0), g, x, s, z)
    ref = grads(surrogate_autograd(x, s, z, qt.qmin, qt.qmax), g, x, s, z)
    for a, b, what in zip(ours, ref, "xsz", strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=what)


@pytest.mark.parametrize("name", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [None, 0])
def test_lsq_gradients_equal_formula(name, axis):
    rng = np.random.default_rng(6)
    qt, x, s, z, g = lsq_case(rng, name, axis)
    gx, gs, gz = grads(F.fake_quantize_lsq(x, s, z, qt.qmin, qt.qmax, axis, 1.0),
                       g, x, s, z)
    xn, sn, zn, gn = (t.detach().numpy() for t in (x, s, z, g))
    u = xn / sn
    q = np.rint(u) + zn
    inside = (q >= qt.qmin) & (q <= qt.qmax)
    d = np.where(inside, np.rint(u) - u, np.where(q < qt.qmin, qt.qmin - zn, qt.qmax - zn))
    dims = tuple(i for i in range(xn.ndim) if axis is None or i != axis)
    np.testing.assert_allclose(gx.numpy(), gn * inside, rtol=0, atol=0)
    np.testing.assert_allclose(gs.numpy(), (gn * d).sum(dims, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(gz.numpy(), (gn * ~inside * -sn).sum(dims, keepdims=True),
                               rtol=1e-12)
    assert inside.any() and (~inside).any()


def test_ste_gradient_is_clip_mask_and_scale_is_constant():
    rng = np.random.default_rng(8)
    qt, x, s, z, g = lsq_case(rng, "uint8", None)
    y = F.fake_quantize_ste(x, s, z, qt.qmin, qt.qmax)
    (gx,) = grads(y, g, x)
    q = torch.round(x / s) + z
    assert torch.equal(gx, g * ((q >= qt.qmin) & (q <= qt.qmax)))
    assert not torch.autograd.grad(y, s, g, allow_unused=True, materialize_grads=True)[0].any()


def central_diff(f, t: torch.Tensor, index, h: float = 1e-6) -> float:
    old = t.data[index].item()
    t.data[index] = old + h
    up = f()
    t.data[index] = old - h
    down = f()
    t.data[index] = old
    return (up - down) / (2 * h)


@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_gradients_equal_finite_differences_of_frozen_surrogate(axis):
    rng = np.random.default_rng(9)
    qt, x, s, z, g = lsq_case(rng, "uint8", axis)
    q = (torch.round(x / s) + z).detach()
    keep = (q != qt.qmin) & (q != qt.qmax)  # the surrogate's kinks
    g = g * keep
    c = (torch.round(x / s) - x / s).detach()

    def loss() -> float:
        with torch.no_grad():
            y = s * (torch.clamp(x / s + c + z, qt.qmin, qt.qmax) - z)
            return float((g * y).sum())

    gx, gs, gz = grads(F.fake_quantize_lsq(x, s, z, qt.qmin, qt.qmax, axis, 1.0),
                       g, x, s, z)
    # the surrogate is linear between kinks, which are >= 1 step of q away: steps of 0.1 q
    umax = (x / s).detach().abs().amax(dim=[d for d in range(3) if s.shape[d] == 1],
                                       keepdim=True)
    hs = (0.1 * s / umax).detach()
    for idx in [(0,) * 3, (1, 2, 3), (4, 3, 5)]:
        h = 0.1 * s.min().item()
        assert central_diff(loss, x, idx, h) == pytest.approx(gx[idx].item(), abs=1e-9)
    for idx in np.ndindex(*s.shape):
        diff = central_diff(loss, s, idx, hs[idx].item())
        assert diff == pytest.approx(gs[idx].item(), rel=1e-7, abs=1e-9)
        diff = central_diff(loss, z, idx, 0.1)
        assert diff == pytest.approx(gz[idx].item(), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("axis", [None, 0])
def test_gradcheck_where_the_forward_is_differentiable(axis):
    """Saturated elements: ``y = (qmax - z) * s`` or ``(qmin - z) * s``, so finite differences of
    the real forward give LSQ's outside terms for ``s`` and 0 for ``x``."""
    rng = np.random.default_rng(10)
    shape = (3, 4)
    n = None if axis is None else shape[axis]
    scale = torch.tensor(rng.uniform(0.05, 0.2, () if n is None else (n,)),
                         dtype=torch.float64, requires_grad=True)
    sign = torch.tensor(rng.choice([-1.0, 1.0], shape), dtype=torch.float64)
    x = (sign * torch.tensor(rng.uniform(40, 80, shape))).requires_grad_()
    zp = torch.tensor(-3.0, dtype=torch.float64)

    def f(x, s):
        return F.fake_quantize_lsq(x, s, zp, -128, 127, axis, grad_scale=1.0)

    assert torch.autograd.gradcheck(f, (x, scale), eps=1e-6, atol=1e-7)


def test_lsq_default_grad_scale_and_constant():
    rng = np.random.default_rng(12)
    qt, x, s, z, g = lsq_case(rng, "int8", 1, dtype=torch.float32)

    def gscale(grad_scale):
        y = F.fake_quantize_lsq(x, s, z, qt.qmin, qt.qmax, axis=1, grad_scale=grad_scale)
        return grads(y, g, s, z)

    base_s, base_z = gscale(1.0)
    per_scale = x.numel() // x.shape[1]
    default = 1.0 / np.sqrt(per_scale * qt.qmax)
    assert F.lsq_grad_scale(x.numel(), x.shape[1], qt.qmax) == pytest.approx(default)
    for grad_scale, factor in [(None, default), (0.001, 0.001)]:
        gs, gz = gscale(grad_scale)
        torch.testing.assert_close(gs, base_s * factor, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gz, base_z * factor, rtol=1e-6, atol=1e-9)
    gx_default = grads(F.fake_quantize_lsq(x, s, z, qt.qmin, qt.qmax, 1), g, x)[0]
    gx_one = grads(F.fake_quantize_lsq(x, s, z, qt.qmin, qt.qmax, 1, 1.0), g, x)[0]
    assert torch.equal(gx_default, gx_one)  # grad_scale touches s and z only


@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_matches_torch_learnable_ops_away_from_ties(axis):
    """torch's ``_fake_quantize_learnable_*`` implement LSQ / LSQ+ independently (with
    ``x * (1 / s)``); on points away from ties every gradient agrees."""
    rng = np.random.default_rng(13)
    qt, x, s, z, g = lsq_case(rng, "uint8", axis, dtype=torch.float32)
    u = (x / s).detach()
    g = g * ((u - torch.floor(u) - 0.5).abs() > 1e-3)
    ours = grads(F.fake_quantize_lsq(x, s, z, qt.qmin, qt.qmax, axis, 0.01), g, x, s, z)
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(
            x, s.reshape(1), z.reshape(1), qt.qmin, qt.qmax, 0.01)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(
            x, s.reshape(-1), z.reshape(-1), axis, qt.qmin, qt.qmax, 0.01)
    theirs = grads(y, g, x, s, z)
    for a, b, what in zip(ours, theirs, "xsz", strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=what)


def pact_case(rng, symmetric, dtype=torch.float64):
    x = torch.tensor(rng.standard_normal(3000) * 2, dtype=dtype, requires_grad=True)
    alpha = torch.tensor(1.7, dtype=dtype, requires_grad=True)
    g = torch.tensor(rng.standard_normal(3000), dtype=dtype)
    return x, alpha, g


@pytest.mark.parametrize("symmetric", [False, True])
def test_pact_plain_gradients(symmetric):
    rng = np.random.default_rng(14)
    x, alpha, _ = pact_case(rng, symmetric)
    y = F.fake_quantize_pact(x, alpha, -128, 127, symmetric)
    gx, ga = grads(y, torch.full_like(x, 3.0), x, alpha)
    high = x.detach() >= 1.7
    lo = -128 / 127 * 1.7 if symmetric else 0.0
    low = x.detach() < lo
    expected = 3.0 * high.sum().item() - (3.0 * 128 / 127 * low.sum().item() if symmetric else 0)
    assert ga.item() == pytest.approx(expected, rel=1e-12)
    assert torch.equal(gx, 3.0 * (~high & ~low))
    if not symmetric:
        assert ga.item() == 3.0 * high.sum().item()  # count of clipped elements * upstream


def test_pact_per_channel_alpha_gradient_counts_each_channel():
    x = torch.tensor([[0.5, 2.0, 3.0, -1.0], [0.5, 0.7, 0.9, 5.0]], requires_grad=True)
    alpha = torch.tensor([1.0, 0.8], requires_grad=True)
    y = F.fake_quantize_pact(x, alpha, 0, 255, axis=0)
    gx, ga = grads(y, torch.full_like(x, 2.0), x, alpha)
    assert ga.tolist() == [4.0, 4.0]  # clipped: 2.0, 3.0 | 0.9, 5.0
    assert gx.tolist() == [[2.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("quant_error", [False, True])
def test_pact_gradients_equal_finite_differences_of_surrogate(symmetric, quant_error):
    """Plain: rounding is identity in the surrogate, ``clip(x, lo, alpha)`` plus a frozen
    error. quant_error: the grid ``s = alpha / n`` with the rounding offset frozen."""
    rng = np.random.default_rng(15)
    x, alpha, g = pact_case(rng, symmetric)
    qmin, qmax = -8, 7
    z = 0 if symmetric else qmin
    n = qmax - z
    ratio = (qmin - z) / n
    xd = x.detach()
    s0 = 1.7 / n
    u = xd / s0
    away = ((xd - 1.7).abs() > s0) & ((xd - ratio * 1.7).abs() > s0)
    g = g * away
    c = torch.round(u) - u

    def loss() -> float:
        a = alpha.detach()
        if quant_error:
            s = a / n
            y = s * (torch.clamp(xd / s + c + z, qmin, qmax) - z)
        else:
            y = torch.minimum(torch.maximum(xd, ratio * a), a)
        return float((g * y).sum())

    y = F.fake_quantize_pact(x, alpha, qmin, qmax, symmetric, quant_error=quant_error)
    gx, ga = grads(y, g, x, alpha)
    assert central_diff(loss, alpha, ()) == pytest.approx(ga.item(), rel=1e-6, abs=1e-8)
    for idx in [(0,), (7,), (1234,)]:
        assert central_diff(loss, x, idx) == pytest.approx(gx[idx].item(), abs=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_pact_gradcheck_on_clipped_elements(symmetric):
    """Clipped elements sit on ``alpha`` or ``lo``: the real forward is linear in alpha there."""
    rng = np.random.default_rng(16)
    x = torch.tensor(rng.uniform(3.0, 6.0, 20), dtype=torch.float64)
    if symmetric:
        x = x * torch.tensor(rng.choice([-1.0, 1.0], 20), dtype=torch.float64)
    x.requires_grad_()
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def f(x, a):
        return F.fake_quantize_pact(x, a, -128, 127, symmetric)

    assert torch.autograd.gradcheck(f, (x, alpha), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- training


def test_lsq_learns_a_scale_that_lowers_the_error():
    torch.manual_seed(0)
    x = torch.randn(4096)

    def mse(s: float) -> float:
        return float(((F.fake_quantize_ste(x, s, 0, -8, 7) - x) ** 2).mean())

    best = min(mse(s / 1000) for s in range(50, 1000, 5))
    for grad_scale, lr in [(None, 5.0), (0.001, 20.0)]:
        s = torch.nn.Parameter(torch.tensor(0.02))
        opt = torch.optim.SGD([s], lr=lr)
        for _ in range(200):
            opt.zero_grad()
            ((F.fake_quantize_lsq(x, s, 0, -8, 7, grad_scale=grad_scale) - x) ** 2).mean()\
                .backward()
            opt.step()
        assert mse(s.item()) < 0.05 * mse(0.02)
        assert mse(s.item()) < 1.1 * best


def test_pact_alpha_moves_toward_a_good_clip():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4096))

    def mse(a: float) -> float:
        return float(((F.fake_quantize_pact(x, a, 0, 15) - x) ** 2).mean())

    best_alpha = min(range(50, 600), key=lambda a: mse(a / 100)) / 100
    for a0, quant_error, lr in [(0.3, False, 1.0), (20.0, True, 100.0)]:
        a = torch.nn.Parameter(torch.tensor(a0))
        opt = torch.optim.SGD([a], lr=lr)
        for _ in range(200):
            opt.zero_grad()
            ((F.fake_quantize_pact(x, a, 0, 15, quant_error=quant_error) - x) ** 2).mean()\
                .backward()
            opt.step()
        assert abs(a.item() - best_alpha) < 0.25 * abs(a0 - best_alpha)
        assert mse(a.item()) < 0.1 * mse(a0)


# ---------------------------------------------------------------------------- module


@pytest.mark.parametrize("method", ["ste", "lsq", "pact"])
@pytest.mark.parametrize("axis", [None, 0])
def test_module_from_numpy_qparams_round_trip(method, axis):
    rng = np.random.default_rng(17)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    symmetric = method != "lsq"
    name = "int8" if symmetric else "uint8"
    lo, hi = Q.weight_range(w, axis)
    scale, zp = Q.qparams(lo, hi, name, symmetric)
    fq = F.FakeQuantize(name, symmetric, axis, method, scale, zp)
    s2, z2 = fq.qparams()
    assert s2.dtype == np.float32 and z2.dtype == Q.qtype(name).storage
    assert s2.shape == z2.shape == (() if axis is None else (8,))
    if method == "pact":  # alpha = scale * n, written back as alpha / n: within an ulp
        np.testing.assert_allclose(s2, scale, rtol=2e-7)
    else:
        np.testing.assert_array_equal(s2, scale)
    np.testing.assert_array_equal(z2, zp)
    y = fq(torch.from_numpy(w)).detach().numpy()
    np.testing.assert_array_equal(y, Q.fake_quantize(w, s2, z2, name, axis))


def test_module_write_back_after_training_reproduces_forward():
    rng = np.random.default_rng(18)
    x = torch.from_numpy(rng.standard_normal((16, 4, 5)).astype(np.float32)) * 3 + 1
    fq = F.FakeQuantize("uint8", False, 1, "lsq", np.full(4, 0.05, np.float32),
                        np.full(4, 100, np.uint8), learn_zero_point=True, grad_scale=1.0)
    opt = torch.optim.SGD(fq.parameters(), lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        ((fq(x) - x) ** 2).mean().backward()
        opt.step()
    assert not torch.equal(fq.zero_point.detach(), torch.full((4,), 100.0))
    s, z = fq.qparams()
    np.testing.assert_array_equal(fq(x).detach().numpy(),
                                  Q.fake_quantize(x.numpy(), s, z, "uint8", 1))


def test_module_parameters_and_buffers():
    ste = F.FakeQuantize("int8", scale=0.1)
    lsq = F.FakeQuantize("int8", method="lsq", scale=0.1)
    lsqp = F.FakeQuantize("uint8", False, method="lsq", scale=0.1, zero_point=3,
                          learn_zero_point=True)
    pact = F.FakeQuantize("uint8", False, method="pact", scale=0.1)
    assert [n for n, _ in ste.named_parameters()] == []
    assert sorted(n for n, _ in ste.named_buffers()) == ["scale", "zero_point"]
    assert [n for n, _ in lsq.named_parameters()] == ["scale"]
    assert sorted(n for n, _ in lsqp.named_parameters()) == ["scale", "zero_point"]
    assert [n for n, _ in pact.named_parameters()] == ["alpha"]
    assert pact.alpha.item() == pytest.approx(0.1 * 255)
    assert "method=pact" in repr(pact)


def test_module_disabled_is_identity():
    fq = F.FakeQuantize("int8", method="lsq", scale=0.1, enabled=False)
    x = torch.randn(4, 4) * 100
    assert fq(x) is x
    fq.enabled = True
    assert not torch.equal(fq(x), x)


def test_module_state_dict_save_load():
    a = F.FakeQuantize("int8", True, 0, "lsq", np.array([0.1, 0.2, 0.3], np.float32))
    with torch.no_grad():
        a.scale.mul_(1.5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = F.FakeQuantize("int8", True, 0, "lsq", np.ones(3, np.float32))
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(3, 10)
    assert torch.equal(a(x), b(x))
    for u, v in zip(a.qparams(), b.qparams(), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["ste", "lsq", "pact"])
def test_module_half_input(dtype, method):
    fq = F.FakeQuantize("uint8", False, None, method, 0.02, 0 if method == "pact" else 10)
    x = (torch.randn(2, 3, 8, 8) * 2).to(dtype).requires_grad_()
    y = fq(x)
    assert y.dtype == dtype
    s, z = fq.qparams()
    ref = Q.fake_quantize(x.detach().float().numpy(), s, z, "uint8")
    assert torch.equal(y, torch.from_numpy(ref).to(dtype))
    y.float().sum().backward()
    assert x.grad.dtype == dtype
    for p in fq.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


@pytest.mark.parametrize("zero_points", [[10.0, 10.0, 10.0], [10.0, 20.0, 30.0]])
def test_module_fixed_zero_point_follows_its_buffer(zero_points):
    """The module passes a uniform fixed zero point to the kernel as a number; a changed
    buffer (load_state_dict, an in-place edit) is seen on the next call."""
    fq = F.FakeQuantize("uint8", False, 0, "ste", np.full(3, 0.05, np.float32), zero_points)
    x = torch.randn(3, 40) * 3

    def reference() -> torch.Tensor:
        s, z = fq.qparams()
        return torch.from_numpy(Q.fake_quantize(x.numpy(), s, z, "uint8", axis=0))

    assert torch.equal(fq(x), reference())
    state = {k: v.clone() for k, v in fq.state_dict().items()}
    state["zero_point"] += 7
    fq.load_state_dict(state)
    assert torch.equal(fq(x), reference())
    with torch.no_grad():
        fq.zero_point[0] = 0.0
    y = fq(x)
    assert torch.equal(y, reference())
    assert not torch.equal(y, F.fake_quantize_ste(x, fq.scale, torch.tensor(zero_points) + 7,
                                                  0, 255, axis=0))


def test_module_argument_errors():
    with pytest.raises(ValueError, match="method"):
        F.FakeQuantize(method="dorefa")
    with pytest.raises(ValueError, match="lsq"):
        F.FakeQuantize(method="ste", learn_scale=True)
    with pytest.raises(ValueError, match="symmetric=False"):
        F.FakeQuantize(method="lsq", learn_zero_point=True)
    with pytest.raises(ValueError, match="zero_point must be 128"):
        F.FakeQuantize("uint8", True, zero_point=100)
    with pytest.raises(ValueError, match="1-D"):
        F.FakeQuantize("int8", axis=0, scale=0.1)
    with pytest.raises(ValueError, match="unknown qtype"):
        F.FakeQuantize("int7")
    with pytest.raises(ValueError, match="exact"):
        F.FakeQuantize("int32")
    with pytest.raises(ValueError, match="grad_scale"):
        F.FakeQuantize(method="pact", grad_scale=0.001)


def test_pact_l2_and_lsq_init():
    model = torch.nn.Sequential(F.FakeQuantize("uint8", False, method="pact", scale=0.1),
                                F.FakeQuantize("int8", method="lsq", scale=0.1),
                                F.FakeQuantize("uint8", True, method="pact", scale=0.1))
    expected = 0.5 * 1e-4 * ((0.1 * 255) ** 2 + (0.1 * 127) ** 2)
    assert F.pact_l2(model).item() == pytest.approx(expected, rel=1e-6)
    w = np.array([[1.0, -3.0], [0.5, 0.5]], np.float32)
    np.testing.assert_allclose(F.lsq_init_scale(w, 127), 2 * 1.25 / np.sqrt(127), rtol=1e-6)
    np.testing.assert_allclose(F.lsq_init_scale(w, 127, axis=0),
                               2 * np.array([2.0, 0.5]) / np.sqrt(127), rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["ste", "lsq", "pact"])
def test_module_on_cuda_matches_cpu(method):
    fq = F.FakeQuantize("int8", True, 1, method, np.array([0.01, 0.03, 0.1], np.float32))
    x = torch.from_numpy(onnx_inputs(np.random.default_rng(19), (4, 3, 16),
                                     np.array([0.01, 0.03, 0.1]), np.zeros(3), 1, "int8"))
    x = x.requires_grad_()
    y = fq(x)
    y.sum().backward()
    grads_cpu = [p.grad.clone() for p in fq.parameters()] + [x.grad.clone()]
    fq_cuda = fq.to("cuda")
    fq_cuda.zero_grad()
    xc = x.detach().cuda().requires_grad_()
    yc = fq_cuda(xc)
    yc.sum().backward()
    assert torch.equal(yc.cpu(), y)
    grads_cuda = [p.grad.cpu() for p in fq_cuda.parameters()] + [xc.grad.cpu()]
    for a, b in zip(grads_cpu, grads_cuda, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- speed


def test_speed_sanity():
    """Printed, not asserted: forward + backward on 1x64x56x56 against an identity op (the
    fastest of 20 runs, as other work on the machine makes the mean noisy)."""
    x = torch.randn(1, 64, 56, 56, requires_grad=True)
    g = torch.ones_like(x)
    cases = {
        "identity (x * 1)": lambda: x * 1.0,
        "torch native per-tensor": lambda: torch.fake_quantize_per_tensor_affine(
            x, 0.02, 0, -128, 127),
        "ste per-tensor": F.FakeQuantize("int8", scale=0.02),
        "ste per-channel": F.FakeQuantize("int8", axis=1, scale=np.full(64, 0.02, np.float32)),
        "lsq per-tensor": F.FakeQuantize("int8", method="lsq", scale=0.02),
        "pact": F.FakeQuantize("uint8", False, method="pact", scale=0.02),
    }
    for name, f in cases.items():
        call = f if not isinstance(f, torch.nn.Module) else (lambda m=f: m(x))
        call().backward(g)
        best = float("inf")
        for _ in range(20):
            t0 = time.perf_counter()
            call().backward(g)
            best = min(best, time.perf_counter() - t0)
        print(f"{name:28s} {best * 1e3:7.3f} ms fwd+bwd")
