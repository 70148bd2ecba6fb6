"""Fake quantization for quantization-aware training: ONNX Q -> DQ forward, surrogate gradients.

This is the only graphq module that imports torch, and only the QAT bridge imports it.

Forward, for every method, with ``s`` and ``z`` per tensor or per slice along ``axis``::

    q = round(x / s) + z            round half to even (torch.round), x / s a true division
    y = (clamp(q, qmin, qmax) - z) * s

computed in float32 (float64 for float64 inputs; float16 / bfloat16 go to float32 and back), so
a float32 ``y`` equals :func:`graphq.kernels.quant.fake_quantize`, that is onnxruntime's
QuantizeLinear -> DequantizeLinear, bit for bit. ``s`` is clamped to ``MIN_SCALE`` and a learned
``z`` is rounded (half to even) and clamped to ``[qmin, qmax]``; gradients pass straight through
both. inf saturates; NaN propagates (ONNX leaves it undefined).

torch's ``fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` (and their ``_learnable``
twins) are not used: they round half to even too, but compute ``x * (1 / s)``, which lands on
the other side of a tie than ``x / s`` for a few per cent of exact ties.

Gradients; ``g`` is the upstream gradient, ``u = x / s``, ``q = round(u) + z`` (before the clamp),
*inside* means ``qmin <= q <= qmax``, sums run over the elements that share one ``s``:

STE (the clipped straight-through estimator); scale and zero point are constants::

    dL/dx = g * inside

LSQ (Esser et al. 2020, learned step size) and LSQ+'s learned zero point (Bhalgat et al. 2020)::

    dL/dx = g * inside
    dL/ds = gs * sum g * { round(u) - u   inside;   qmin - z   q < qmin;   qmax - z   q > qmax }
    dL/dz = gs * sum g * { 0              inside;   -s         outside }

These are the exact derivatives of the surrogate ``s * (clamp(r(x / s) + z, qmin, qmax) - z)``
where ``r`` has round's value and derivative 1; with ``z = 0`` the outside terms are the paper's
``-Q_N`` and ``Q_P``. ``gs`` (grad_scale) is the paper's ``1 / sqrt(N * qmax)`` by default, ``N``
the number of elements sharing one ``s`` in this call (the batch included), or a constant, like
msModelSlim's ``QatConfig(grad_scale=0.001)``.

PACT (Choi et al. 2018), a learned clip ``alpha`` quantized on its own grid, ``z`` fixed::

    s = alpha / n,   n = qmax - z,   lo = (qmin - z) / n * alpha
    unsigned (symmetric=False): z = qmin, so lo = 0: the paper's clip(x, 0, alpha), quantized
    symmetric:                  z = (qmin + qmax + 1) // 2, lo = -128/127 alpha for 8 bits: a
                                two-sided clip like PaddleSlim's, plus the grid's extra level
    dL/dx     = g * [lo <= x < alpha]
    dL/dalpha = sum g * [x >= alpha]  +  (qmin - z) / n * sum g * [x < lo]
              (+ sum g * [lo <= x < alpha] * (round(u) - u) / n       with quant_error=True)

The forward is the plain Q -> DQ above with ``(s, z)`` (saturation is the clip), so the ONNX
graph written back with those qparams computes the same thing. Without ``quant_error`` this is
the paper's gradient (PaddleSlim's for the unsigned case; its symmetric clip has ``-1`` where
``(qmin - z) / n`` is ``-128/127``); ``quant_error`` adds the LSQ rounding term through
``s = alpha / n``, which lets an ``alpha`` that is too large shrink. PaddleSlim regularizes
``alpha`` with ``L2Decay(1e-4)``: :func:`pact_l2`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from graphq.kernels.quant import MIN_SCALE, QType, qtype

#: Integers beyond 2**24 are not exact in float32: such qtypes (int32) are refused.
_MAX_EXACT = 2**24

Scalar = float | int | np.ndarray | torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"fake quantization needs a floating point tensor, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_range(qmin: int, qmax: int) -> None:
    if not qmin < qmax:
        raise ValueError(f"qmin {qmin} must be below qmax {qmax}")
    if max(-qmin, qmax) > _MAX_EXACT:
        raise ValueError(f"range [{qmin}, {qmax}] is not exact in float32 (|q| <= 2**24)")


def _param_shape(x: torch.Tensor, axis: int | None) -> tuple[list[int], int | None]:
    """Broadcast shape of per-tensor (all ones) or per-``axis`` values, and the axis length."""
    shape = [1] * x.ndim
    if axis is None:
        return shape, None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} out of range for rank {x.ndim}")
    axis %= x.ndim
    shape[axis] = x.shape[axis]
    return shape, x.shape[axis]


def _shaped(value: Scalar | None, x: torch.Tensor, shape: list[int], length: int | None,
            dtype: torch.dtype, what: str) -> torch.Tensor:
    """``value`` on ``x``'s device in ``dtype``, reshaped to broadcast (autograd-tracked).
    A tensor already in place costs no copy (this runs on every fake-quant call)."""
    if isinstance(value, torch.Tensor) and value.dtype == dtype and value.device == x.device:
        t = value
    else:
        t = torch.as_tensor(0.0 if value is None else value, device=x.device)
        t = t.to(device=x.device, dtype=dtype)
    if t.numel() == 1:
        return t if t.ndim == 0 else t.reshape([1] * len(shape))
    if length is None or not (t.shape == (length,) or list(t.shape) == shape):
        want = "one value" if length is None else f"one value, shape ({length},) or {shape}"
        raise ValueError(f"{what}: need {want}, got shape {tuple(t.shape)}")
    return t.reshape(shape)


def quantize(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | float, qmin: int, qmax: int
             ) -> torch.Tensor:
    """ONNX QuantizeLinear without the cast: ``clamp(round(x / s) + z, qmin, qmax)`` in ``x``'s
    float dtype (``s``, ``z`` broadcastable; no gradient through the rounding)."""
    return torch.round(x / s).add_(z).clamp_(qmin, qmax)


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | float) -> torch.Tensor:
    """ONNX DequantizeLinear: ``float32(q - z) * s``."""
    return (q.float() - z) * s


def _fq(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int
        ) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` (``s``, ``z`` ready: clamped, integer)."""
    return quantize(x, s, z, qmin, qmax).sub_(z).mul_(s)


def _zero_operand(zero_point: Scalar | None, x: torch.Tensor, shape: list[int],
                  length: int | None, dtype: torch.dtype, qmin: int, qmax: int
                  ) -> torch.Tensor | float:
    """A Python number as the effective zero point, a float (clamped, rounded half to even):
    the kernel takes a float as is; anything else as :func:`_shaped`."""
    if isinstance(zero_point, float | int) and not isinstance(zero_point, bool):
        return float(round(min(max(zero_point, qmin), qmax)))
    return _shaped(zero_point, x, shape, length, dtype, "zero_point")


def _effective_zp(z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.round(z.clamp(qmin, qmax))


def _zero_point_operand(z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor | float:
    """The effective zero point (rounded half to even, clamped), as a Python float when it is
    one value on the CPU (a scalar operand is cheaper than a 0-d tensor in an elementwise op,
    and Python's round is half to even too); otherwise a tensor. A float is taken as is: the
    caller's effective zero point (:meth:`FakeQuantize.forward`)."""
    if isinstance(z, float):
        return z
    if z.numel() == 1 and z.device.type == "cpu":
        return float(round(min(max(float(z), qmin), qmax)))
    return _effective_zp(z, qmin, qmax)


class _FakeQuantFn(torch.autograd.Function):
    """Q -> DQ forward; STE gradient for ``x``, LSQ / LSQ+ gradients for ``s`` and ``z``.

    The forward keeps what the backward needs instead of ``x``: the *inside* mask and, when
    the scale learns, the per-element LSQ factor, both float32 and computed in place or into
    ``out=`` float tensors: on CPU a comparison into a bool tensor, a bool -> float conversion
    or a float * bool product is 4-40x slower than a float op.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_scale):
        s = scale.clamp_min(MIN_SCALE)
        z = _zero_point_operand(zero_point, qmin, qmax)
        need_s, need_z = ctx.needs_input_grad[1:3]
        u = (x if x.dtype == s.dtype else x.to(s.dtype)) / s
        q = torch.round(u) if need_s else u.round_()
        q.add_(z)  # also for z = 0: round(-0.3) is -0.0, and ONNX gives +0.0
        y = q.clamp(qmin, qmax)
        inside = torch.eq(q, y, out=q)  # 1.0 inside, 0.0 clamped (and NaN)
        if not (isinstance(z, float) and z == 0.0):
            y.sub_(z)  # the clamped integer minus z: y * s is the output
        d = None
        if need_s:  # round(u) - u inside, qmin - z below, qmax - z above: y - u * inside
            d = torch.addcmul(y, u, inside, value=-1.0, out=u)
        ctx.save_for_backward(inside, d, s)
        ctx.dtype, ctx.grad_scale, ctx.need_z = x.dtype, grad_scale, need_z
        y.mul_(s)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        inside, d, s = ctx.saved_tensors
        g = grad if grad.dtype == s.dtype else grad.to(s.dtype)
        gx = gs_ = gz = None
        if ctx.needs_input_grad[0] or ctx.need_z:
            gx = g * inside
        if d is not None:
            gs_ = _sum_product(g, d, s.shape) * ctx.grad_scale
        if ctx.need_z:  # -s * sum of g outside = -s * (sum g - sum g * inside)
            gz = (g.sum_to_size(s.shape) - gx.sum_to_size(s.shape)) * (-s) * ctx.grad_scale
        if not ctx.needs_input_grad[0]:
            gx = None
        elif gx.dtype != ctx.dtype:
            gx = gx.to(ctx.dtype)
        return gx, gs_, gz, None, None, None


def _sum_product(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(a * b).sum_to_size(shape)``; one dot product (no temporary) when ``shape`` is one
    value."""
    if math.prod(shape) == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return (a * b).sum_to_size(shape)


def _pact_grid(qmin: int, qmax: int, symmetric: bool) -> tuple[int, int]:
    """``(z, n)`` of a PACT grid: ``s = alpha / n``, ``alpha = (qmax - z) * s``."""
    z = (qmin + qmax + 1) // 2 if symmetric else qmin
    return z, qmax - z


def _pact_scale(alpha: torch.Tensor, n: int) -> torch.Tensor:
    return alpha.clamp_min(MIN_SCALE * n) / n


def _pact_bounds(alpha: torch.Tensor, qmin: int, z: int, n: int) -> tuple:
    """``(s, hi, lo)``: the step ``alpha / n`` (alpha clamped) and the floats just below the
    clamped ``alpha`` and ``lo``, in ``alpha``'s dtype; numpy scalars for one value on the CPU (a
    scalar operand is several times cheaper than a tensor in clamp and div), else tensors."""
    if alpha.numel() == 1 and alpha.device.type == "cpu":
        f = np.float32 if alpha.dtype == torch.float32 else np.float64
        a = max(f(alpha.item()), f(MIN_SCALE * n))
        down = f(-np.inf)
        return a / f(n), np.nextafter(a, down), np.nextafter(a * f((qmin - z) / n), down)
    a = alpha.clamp_min(MIN_SCALE * n)
    down = torch.full_like(a, -math.inf)
    return _pact_scale(alpha, n), torch.nextafter(a, down), \
        torch.nextafter(a * ((qmin - z) / n), down)


def _operand(v: np.generic | torch.Tensor) -> float | torch.Tensor:
    return float(v) if isinstance(v, np.generic) else v


class _PactFn(torch.autograd.Function):
    """Q -> DQ forward on the grid of ``alpha``; PACT gradients (formulas in the module doc).

    The forward clips ``x`` to ``[lo', alpha']``, the floats just below ``lo`` and ``alpha``:
    then ``xc == x`` exactly when ``lo <= x < alpha`` (the inside mask, one comparison into a
    float32 tensor), ``xc == alpha'`` when ``x >= alpha`` and ``xc == lo'`` when ``x < lo``
    (the backward's masks, from the saved ``xc`` alone), and the clipped values round to the
    same grid points as the clamp of ONNX QuantizeLinear (``alpha' / s`` and ``lo' / s`` are
    within an ulp of ``n`` and ``qmin - z``). The backward makes one or two passes fewer.
    """

    @staticmethod
    def forward(ctx, x, alpha, qmin, qmax, symmetric, quant_error):
        z, n = _pact_grid(qmin, qmax, symmetric)
        s, hi, lo = (_operand(v) for v in _pact_bounds(alpha, qmin, z, n))
        xc = torch.clamp(x if x.dtype == alpha.dtype else x.to(alpha.dtype), lo, hi)
        inside = torch.eq(xc, x, out=torch.empty_like(xc))  # [lo <= x < alpha] as 0.0 / 1.0
        # in [lo, alpha] round(x / s) + z needs no clamp; + 0.0 turns round's -0.0 into ONNX's 0
        y = torch.div(xc, s).round_().add_(0.0).mul_(s)
        ctx.save_for_backward(xc, inside, *(v for v in (s, hi, lo) if torch.is_tensor(v)))
        ctx.bounds = None if torch.is_tensor(s) else (s, hi, lo)
        ctx.info = (alpha.shape, qmin, z, n, quant_error)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xc, inside, *saved = ctx.saved_tensors
        s, hi, lo = ctx.bounds or saved
        shape, qmin, z, n, quant_error = ctx.info
        g = grad if grad.dtype == xc.dtype else grad.to(xc.dtype)
        ga = None
        if ctx.needs_input_grad[1]:
            mask = torch.empty_like(xc)
            ga = _sum_product(g, torch.eq(xc, hi, out=mask), shape)  # sum g * [x >= alpha]
            if qmin != z:  # + (qmin - z) / n * sum g * [x < lo]
                ga = ga + _sum_product(g, torch.eq(xc, lo, out=mask), shape) * ((qmin - z) / n)
            if quant_error:  # + sum g * [lo <= x < alpha] * (round(u) - u) / n
                u = torch.div(xc, s, out=mask)
                d = torch.round(u).sub_(u).mul_(inside).div_(n)
                ga = ga + _sum_product(g, d, shape)
        gx = g * inside if ctx.needs_input_grad[0] else None
        if gx is not None and gx.dtype != grad.dtype:
            gx = gx.to(grad.dtype)
        return gx, ga, None, None, None, None


def fake_quantize_ste(x: torch.Tensor, scale: Scalar, zero_point: Scalar | None, qmin: int,
                      qmax: int, axis: int | None = None) -> torch.Tensor:
    """ONNX Q -> DQ of ``x`` with the clipped straight-through gradient ``g * inside``.

    ``scale`` / ``zero_point`` (floats, numpy or tensors; per tensor, or 1-D along ``axis``) are
    constants: no gradient reaches them.
    """
    _check_range(qmin, qmax)
    shape, length = _param_shape(x, axis)
    dtype = _compute_dtype(x)
    s = _shaped(scale, x, shape, length, dtype, "scale").detach()
    z = _zero_operand(zero_point, x, shape, length, dtype, qmin, qmax)
    z = z.detach() if isinstance(z, torch.Tensor) else z
    return _FakeQuantFn.apply(x, s, z, qmin, qmax, 1.0)


def lsq_grad_scale(numel: int, num_scales: int, qmax: int) -> float:
    """LSQ's ``1 / sqrt(N * Q_P)``: ``N = numel / num_scales`` per scale, ``Q_P = qmax``."""
    return 1.0 / math.sqrt(max(numel // max(num_scales, 1), 1) * max(qmax, 1))


def fake_quantize_lsq(x: torch.Tensor, scale: Scalar, zero_point: Scalar | None, qmin: int,
                      qmax: int, axis: int | None = None, grad_scale: float | None = None
                      ) -> torch.Tensor:
    """ONNX Q -> DQ of ``x`` with LSQ gradients for ``scale`` (and LSQ+'s for a ``zero_point``
    that requires grad); ``grad_scale=None`` is the paper's ``1 / sqrt(N * qmax)``."""
    _check_range(qmin, qmax)
    shape, length = _param_shape(x, axis)
    dtype = _compute_dtype(x)
    s = _shaped(scale, x, shape, length, dtype, "scale")
    z = _zero_operand(zero_point, x, shape, length, dtype, qmin, qmax)
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x.numel(), s.numel(), qmax)
    return _FakeQuantFn.apply(x, s, z, qmin, qmax, float(grad_scale))


def fake_quantize_pact(x: torch.Tensor, alpha: Scalar, qmin: int, qmax: int,
                       symmetric: bool = False, axis: int | None = None,
                       quant_error: bool = False) -> torch.Tensor:
    """PACT: ``x`` clipped to ``[lo, alpha]`` and quantized on that grid (module doc), with
    gradients for ``x`` and ``alpha``. :func:`pact_qparams` gives the grid's scale and zero
    point."""
    _check_range(qmin, qmax)
    shape, length = _param_shape(x, axis)
    a = _shaped(alpha, x, shape, length, _compute_dtype(x), "alpha")
    return _PactFn.apply(x, a, qmin, qmax, symmetric, quant_error)


def pact_qparams(alpha: Scalar, qmin: int, qmax: int, symmetric: bool = False
                 ) -> tuple[torch.Tensor, int]:
    """``(scale, zero_point)`` of the PACT grid: ``scale = alpha / (qmax - z)`` in float32 (as
    the forward computes it for float32 / float16 inputs), ``z`` as in the module doc."""
    z, n = _pact_grid(qmin, qmax, symmetric)
    a = torch.as_tensor(alpha).detach().to(torch.float32)
    return _pact_scale(a, n), z


def lsq_init_scale(x: np.ndarray | torch.Tensor, qmax: int, axis: int | None = None
                   ) -> np.ndarray:
    """LSQ's initial step size ``2 * mean(|x|) / sqrt(qmax)`` (float32; per slice on ``axis``)."""
    t = torch.as_tensor(x).detach().to(torch.float64).abs()
    if axis is None:
        m = t.mean()
    else:
        dims = [d for d in range(t.ndim) if d != axis % t.ndim]
        m = t.mean(dim=dims)
    s = (2.0 * m / math.sqrt(qmax)).clamp_min(MIN_SCALE)
    return s.to(torch.float32).cpu().numpy()


METHODS = ("ste", "lsq", "pact")


class FakeQuantize(nn.Module):
    """A fake-quant node for QAT: ONNX Q -> DQ forward; ``method`` picks the gradient.

    ``ste``: ``scale`` / ``zero_point`` are fixed buffers. ``lsq``: ``scale`` is an
    ``nn.Parameter`` (``learn_scale``, default on) and so is ``zero_point`` with
    ``learn_zero_point`` (LSQ+, asymmetric only); ``grad_scale=None`` is the paper's default,
    a float a constant (0.001 in msModelSlim). ``pact``: the learned ``alpha`` replaces the scale
    (``alpha = scale * (qmax - z)``); the zero point is fixed: ``qmin`` when asymmetric, the
    midpoint when symmetric. Values are initialized from numpy qparams, e.g. those of
    :func:`graphq.kernels.quant.qparams` (per tensor, or 1-D along ``axis``);
    :meth:`qparams` writes them back. ``scale`` defaults to 1.0 (torch.ao's default); a
    missing ``zero_point`` is the midpoint ``(qmin + qmax + 1) // 2`` when symmetric, ``qmin``
    otherwise. ``enabled = False`` makes the module the identity.
    """

    def __init__(self, dtype: str | QType = "int8", symmetric: bool = True,
                 axis: int | None = None, method: str = "ste", scale: Scalar = 1.0,
                 zero_point: Scalar | None = None, learn_scale: bool | None = None,
                 learn_zero_point: bool = False, grad_scale: float | None = None,
                 quant_error: bool = False, enabled: bool = True) -> None:
        super().__init__()
        self.qtype = qtype(dtype)
        _check_range(self.qtype.qmin, self.qtype.qmax)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        learn_scale = method != "ste" if learn_scale is None else learn_scale
        self._validate(method, symmetric, learn_scale, learn_zero_point, grad_scale,
                       quant_error)
        self.method, self.symmetric, self.axis = method, symmetric, axis
        self.learn_scale, self.learn_zero_point = learn_scale, learn_zero_point
        self.grad_scale, self.quant_error, self.enabled = grad_scale, quant_error, enabled
        s = torch.as_tensor(np.asarray(scale, np.float32)).clone()
        if axis is not None and s.ndim != 1:
            raise ValueError(f"axis={axis} needs a 1-D scale (one per channel), "
                             f"got shape {tuple(s.shape)}")
        z = self._zero_point(zero_point, s.shape)
        if method == "pact":
            self._register("alpha", s * float(self.qtype.qmax - int(z.flatten()[0])),
                           learn_scale)
        else:
            self._register("scale", s, learn_scale)
        self._register("zero_point", z, learn_zero_point)
        self._zero_key: tuple | None = None
        self._zero_value: torch.Tensor | float = 0.0
        self._pact_n = self.qtype.qmax - int(z.flatten()[0])  # PACT's z is fixed

    @staticmethod
    def _validate(method: str, symmetric: bool, learn_scale: bool, learn_zero_point: bool,
                  grad_scale: float | None, quant_error: bool) -> None:
        if method == "ste" and learn_scale:
            raise ValueError("method 'ste' keeps the scale fixed; use 'lsq' to learn it")
        if learn_zero_point and (method != "lsq" or symmetric):
            raise ValueError("learn_zero_point needs method 'lsq' and symmetric=False")
        if grad_scale is not None and method != "lsq":
            raise ValueError("grad_scale applies to method 'lsq' only")
        if quant_error and method != "pact":
            raise ValueError("quant_error applies to method 'pact' only")

    def _zero_point(self, zero_point: Scalar | None, shape: torch.Size) -> torch.Tensor:
        qt = self.qtype
        mid = (qt.qmin + qt.qmax + 1) // 2
        default = mid if self.symmetric else qt.qmin
        if zero_point is None:
            return torch.full(shape, float(default))
        z = torch.as_tensor(np.asarray(zero_point, np.float64)).to(torch.float32)
        if z.numel() not in (1, max(int(np.prod(shape)), 1)):
            raise ValueError(f"zero_point shape {tuple(z.shape)} does not match scale "
                             f"shape {tuple(shape)}")
        fixed = self.symmetric or self.method == "pact"
        if fixed and not torch.all(z == default):
            raise ValueError(f"zero_point must be {default} for a "
                             f"{'symmetric' if self.symmetric else 'pact'} {qt.name} quantizer")
        if torch.any((z < qt.qmin) | (z > qt.qmax)):
            raise ValueError(f"zero_point outside [{qt.qmin}, {qt.qmax}]")
        return z.expand(shape).clone() if z.numel() == 1 else z.reshape(shape).clone()

    def _register(self, name: str, value: torch.Tensor, learn: bool) -> None:
        if learn:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        qmin, qmax = self.qtype.qmin, self.qtype.qmax
        if self.method == "pact":
            return fake_quantize_pact(x, self.alpha, qmin, qmax, self.symmetric, self.axis,
                                      self.quant_error)
        z = self.zero_point if self.learn_zero_point else self._fixed_zero_point()
        if self.method == "lsq":
            return fake_quantize_lsq(x, self.scale, z, qmin, qmax, self.axis, self.grad_scale)
        return fake_quantize_ste(x, self.scale, z, qmin, qmax, self.axis)

    def _fixed_zero_point(self) -> torch.Tensor | float:
        """A fixed zero point that is one value on every channel (symmetric weights: 0) as a
        Python float, effective (rounded, clamped): the kernel then adds a scalar instead of
        rounding and broadcasting a tensor on every call. Recomputed when the buffer changes."""
        z = self.zero_point
        key = (z._version, z.data_ptr(), z.device)
        if self._zero_key != key:
            qt = self.qtype
            zz = _effective_zp(z.detach().float(), qt.qmin, qt.qmax).flatten()
            self._zero_value = float(zz[0]) if bool((zz == zz[0]).all()) else z
            self._zero_key = key
        return self._zero_value

    @torch.no_grad()
    def qparams(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, zero_point)`` as the forward uses them on float32 input: scale float32,
        zero point rounded and in the qtype's storage dtype; shape ``()`` per tensor."""
        qt = self.qtype
        z = _effective_zp(self.zero_point.detach().float(), qt.qmin, qt.qmax)
        s_np = self.step().cpu().numpy().astype(np.float32)
        z_np = z.cpu().numpy().astype(qt.storage)
        if self.axis is None:
            return s_np.reshape(()), z_np.reshape(())
        return s_np.reshape(-1), np.broadcast_to(z_np.reshape(-1), s_np.reshape(-1).shape).copy()

    def step(self) -> torch.Tensor:
        """The scale the forward uses on float32 input (float32, no gradient): the clamped
        ``scale``, or PACT's ``alpha / n``."""
        if self.method == "pact":
            return _pact_scale(self.alpha.detach().float(), self._pact_n)
        return self.scale.detach().float().clamp_min(MIN_SCALE)

    @torch.no_grad()
    def rescale(self, factor: Scalar) -> None:
        """Multiply the step by ``factor`` (one value, or one per slice along ``axis``; finite,
        ``>= 0``): the grid of ``x * factor``. With the zero point kept,
        ``fq(x * c; step * c) == c * fq(x; step)`` for ``c > 0`` (but for float rounding), so
        a caller that fake-quantizes ``x`` and multiplies by ``c`` afterwards can store
        ``x * c`` and this grid instead. The clamped step is rescaled: ``scale`` (a buffer for
        ``ste``, a parameter for ``lsq``) or PACT's ``alpha`` (``alpha = step * n``); the
        zero point, learned or not, is unchanged."""
        store = self.alpha if self.method == "pact" else self.scale
        f = torch.as_tensor(factor).detach().to(device=store.device, dtype=torch.float32)
        if f.numel() not in (1, store.numel()):
            raise ValueError(f"rescale: need one factor or {store.numel()} (one per step), "
                             f"got shape {tuple(f.shape)}")
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError("rescale: the factor must be finite and >= 0")
        low = MIN_SCALE * self._pact_n if self.method == "pact" else MIN_SCALE
        value = store.float().clamp_min(low) * f.reshape(-1).reshape(
            store.shape if f.numel() > 1 else [1] * store.ndim)
        store.copy_(value.to(store.dtype))

    def extra_repr(self) -> str:
        return (f"{self.qtype.name}, method={self.method}, symmetric={self.symmetric}, "
                f"axis={self.axis}, enabled={self.enabled}")


def pact_l2(modules: nn.Module | Iterable[nn.Module], weight: float = 1e-4) -> torch.Tensor:
    """``0.5 * weight * sum(alpha^2)`` over the PACT :class:`FakeQuantize` modules found in
    ``modules`` (PaddleSlim's ``L2Decay(1e-4)`` on alpha); add it to the loss."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    alphas = [m.alpha for root in roots for m in root.modules()
              if isinstance(m, FakeQuantize) and m.method == "pact"]
    if not alphas:
        return torch.zeros(())
    return 0.5 * weight * sum((a.float() ** 2).sum() for a in alphas)
