"""Quantization arithmetic: qtypes, scales and zero points, quantize / dequantize, error metrics.

Affine quantization maps a real ``x`` to an integer ``q`` of a qtype with range ``[qmin, qmax]``
(ONNX QuantizeLinear / DequantizeLinear)::

    q  = saturate(round(x / scale) + zero_point)      round: half to even; saturate: clip
    x' = (q - zero_point) * scale

both computed in float32 like onnxruntime's CPU kernels, so the results match them bit for bit.
Per-axis quantization gives ``scale`` and ``zero_point`` one value per slice along ``axis``.

Scale and zero point from a clip range ``[lo, hi]`` (as onnxruntime's ``compute_scale_zp`` and
torch.ao's observers do). The range is first widened to hold 0, so that 0 is exact::

    lo = min(lo, 0),  hi = max(hi, 0)
    symmetric:   scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)
                 zero_point = (qmin + qmax + 1) // 2     (0 for signed, 128 for uint8)
    asymmetric:  scale = (hi - lo) / (qmax - qmin)
                 zero_point = clip(round(qmin - lo / scale), qmin, qmax)
    scale = max(scale, MIN_SCALE)

``MIN_SCALE`` is float32 machine epsilon (``2**-23``, torch.ao's floor too): a zero range
(a tensor of zeros) gets a tiny positive scale, never 0, inf or nan. ``reduce_range`` drops one
bit (``qmin >> 1``, ``qmax >> 1``: int8 -> [-64, 63], uint8 -> [0, 127]) for kernels whose
accumulators would overflow with the full range.

A bias added to the int32 accumulator of ``x * W`` is quantized with zero point 0 and
``scale = input_scale * weight_scale`` (per output channel when the weight is).

int4 / uint4 values are held in int8 / uint8 arrays here (``QType.storage``), so that the
arithmetic is numpy's own. A graph stores them as ONNX INT4 / UINT4, packed two to a byte;
``QType.exact`` is the numpy dtype that stands for exactly such a tensor (``ml_dtypes.int4`` /
``uint4``, which ``onnx.numpy_helper`` writes as INT4 / UINT4 and reads back):
:func:`to_exact` converts integers to it, :func:`qtype_of_storage` maps it back to the QType.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes  # onnx's own dependency: its numpy types for INT4 / UINT4
import numpy as np

#: The smallest scale :func:`qparams` returns (float32 machine epsilon).
MIN_SCALE = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class QType:
    """An integer quantization type: its name, range, the numpy dtype the arithmetic holds it
    in (``storage``) and the numpy dtype of exactly its values (``exact``: what a graph
    stores; the storage dtype except for the 4-bit types)."""

    name: str
    qmin: int
    qmax: int
    storage: type[np.integer]
    exact: type

    @property
    def bits(self) -> int:
        return (self.levels - 1).bit_length()

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def levels(self) -> int:
        """Number of representable integers, ``qmax - qmin + 1``."""
        return self.qmax - self.qmin + 1


QTYPES: dict[str, QType] = {q.name: q for q in (
    QType("int8", -128, 127, np.int8, np.int8),
    QType("uint8", 0, 255, np.uint8, np.uint8),
    QType("int4", -8, 7, np.int8, ml_dtypes.int4),
    QType("uint4", 0, 15, np.uint8, ml_dtypes.uint4),
    QType("int16", -(2**15), 2**15 - 1, np.int16, np.int16),
    QType("uint16", 0, 2**16 - 1, np.uint16, np.uint16),
    QType("int32", -(2**31), 2**31 - 1, np.int32, np.int32),
)}


def _resolve(name: str | QType) -> QType:
    if isinstance(name, QType):
        return name
    try:
        return QTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown qtype {name!r}; allowed: {', '.join(QTYPES)}") from None


def qtype(name: str | QType) -> QType:
    """The :class:`QType` called ``name`` (a QType passes through); ValueError if unknown."""
    return _resolve(name)


def qtype_of_storage(dtype: np.dtype | type) -> QType:
    """The type whose exact dtype is ``dtype``: what a zero point read from a graph stands for
    (int8 -> int8, never int4; ``ml_dtypes.int4``, as numpy_helper reads ONNX INT4 -> int4)."""
    dt = np.dtype(dtype)
    for qt in QTYPES.values():
        if np.dtype(qt.exact) == dt:
            return qt
    raise ValueError(f"no quantization type is stored as {dt}")


def to_exact(q: np.ndarray | int | list, qtype: str | QType) -> np.ndarray:
    """Integers of ``qtype`` (held in any integer dtype) as its exact dtype, the form a graph
    stores (``ml_dtypes.int4`` for int4). A value outside ``[qmin, qmax]`` is a ValueError:
    the cast would wrap it (9 -> -7 in int4), not saturate it."""
    qt = _resolve(qtype)
    a = np.asarray(q)
    if a.size and (int(a.min()) < qt.qmin or int(a.max()) > qt.qmax):
        raise ValueError(f"to_exact: values in [{int(a.min())}, {int(a.max())}] do not fit "
                         f"{qt.name} [{qt.qmin}, {qt.qmax}]")
    return a.astype(qt.exact)


def _scalar_or_array(a: np.ndarray) -> np.ndarray | np.generic:
    return a[()] if a.ndim == 0 else a


def qparams(lo: float | np.ndarray, hi: float | np.ndarray, qtype: str | QType,
            symmetric: bool, reduce_range: bool = False
            ) -> tuple[np.ndarray | np.float32, np.ndarray | np.integer]:
    """``(scale, zero_point)`` for the clip range ``[lo, hi]`` (formulas in the module doc).

    Scalars give scalars (per tensor), arrays give arrays (per channel). The scale is float32,
    the zero point has the qtype's storage dtype. Non-finite bounds or ``lo > hi`` are a
    ValueError: callers filter inf / nan before they reach here.
    """
    qt = _resolve(qtype)
    lo64, hi64 = np.broadcast_arrays(np.asarray(lo, np.float64), np.asarray(hi, np.float64))
    if not (np.all(np.isfinite(lo64)) and np.all(np.isfinite(hi64))):
        raise ValueError("qparams: the range is not finite; filter inf / nan first")
    if np.any(lo64 > hi64):
        raise ValueError("qparams: lo > hi")
    qmin, qmax = (qt.qmin >> 1, qt.qmax >> 1) if reduce_range else (qt.qmin, qt.qmax)
    lo64, hi64 = np.minimum(lo64, 0.0), np.maximum(hi64, 0.0)
    if symmetric:  # the largest |x| lands on the nearer end, so nothing needs clipping
        mid = (qmin + qmax + 1) // 2
        scale = np.maximum(-lo64, hi64) / min(qmax - mid, mid - qmin)
    else:
        scale = (hi64 - lo64) / (qmax - qmin)
    scale32 = np.maximum(scale, MIN_SCALE).astype(np.float32)
    if not np.all(np.isfinite(scale32)):
        raise ValueError("qparams: the scale overflows float32")
    if symmetric:
        zp = np.full(scale32.shape, (qmin + qmax + 1) // 2, np.float64)
    else:
        zp = np.clip(np.rint(qmin - lo64 / scale32.astype(np.float64)), qmin, qmax)
    return _scalar_or_array(scale32), _scalar_or_array(zp.astype(qt.storage))


def exact_operand(value: float, qtype: str | QType) -> tuple[np.ndarray, np.float32,
                                                             np.ndarray]:
    """``(integer, scale, zero_point)`` of ``qtype`` that dequantize to ``value`` exactly: one
    step of ``|value|`` above or below zero (a constant operand that must not round, such as
    the shift of a HardSigmoid written as a saturating Add)."""
    qt = _resolve(qtype)
    if value == 0:
        q, scale, zero = 0, 1.0, 0
    elif value > 0:
        q, scale, zero = 1, value, 0
    elif qt.signed:
        q, scale, zero = -1, -value, 0
    else:
        q, scale, zero = 0, -value, 1
    return np.array(q, qt.storage), np.float32(scale), np.array(zero, qt.storage)


def _along(values: object, ndim: int, axis: int | None, length: int | None,
           dtype: type) -> np.ndarray:
    """``values`` shaped to broadcast against a rank-``ndim`` tensor: per tensor or on ``axis``."""
    v = np.asarray(values, dtype)
    if axis is None:
        if v.size != 1:
            raise ValueError(f"per-tensor quantization needs one value, got shape {v.shape}")
        return v.reshape(())
    if v.ndim != 1 or v.size != length:
        raise ValueError(f"per-axis values need shape ({length},), got {v.shape}")
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _axis(x: np.ndarray, axis: int | None) -> tuple[int | None, int | None]:
    if axis is None:
        return None, None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} out of range for rank {x.ndim}")
    axis %= x.ndim
    return axis, x.shape[axis]


def quantize(x: np.ndarray, scale: float | np.ndarray, zero_point: int | np.ndarray | None,
             qtype: str | QType, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``.

    ``x`` and ``scale`` are taken as float32 (ONNX's float input); ``axis=None`` is per
    tensor, otherwise ``scale`` / ``zero_point`` are 1-D along ``axis``. NaN (undefined in
    ONNX) maps to the zero point.
    """
    qt = _resolve(qtype)
    x32 = np.asarray(x, np.float32)
    axis, length = _axis(x32, axis)
    s = _along(scale, x32.ndim, axis, length, np.float32)
    zp = _along(0 if zero_point is None else zero_point, x32.ndim, axis, length, np.int64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r = np.rint(x32 / s).astype(np.float64)
    r = np.where(np.isnan(r), 0.0, r) + zp
    return np.clip(r, qt.qmin, qt.qmax).astype(qt.storage)


def dequantize(q: np.ndarray, scale: float | np.ndarray,
               zero_point: int | np.ndarray | None = None, axis: int | None = None
               ) -> np.ndarray:
    """ONNX DequantizeLinear: ``float32(q - zero_point) * scale`` (float32 result)."""
    q64 = np.asarray(q).astype(np.int64)
    axis, length = _axis(q64, axis)
    s = _along(scale, q64.ndim, axis, length, np.float32)
    zp = _along(0 if zero_point is None else zero_point, q64.ndim, axis, length, np.int64)
    return (q64 - zp).astype(np.float32) * s


def fake_quantize(x: np.ndarray, scale: float | np.ndarray,
                  zero_point: int | np.ndarray | None, qtype: str | QType,
                  axis: int | None = None) -> np.ndarray:
    """``dequantize(quantize(x))``: ``x`` on the quantization grid, clipped to its range."""
    return dequantize(quantize(x, scale, zero_point, qtype, axis), scale, zero_point, axis)


def bias_int32(bias: np.ndarray, input_scale: float | np.ndarray,
               weight_scale: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q_bias, scale)``: ``scale = input_scale * weight_scale`` (float32, per channel when
    the weight scale is), ``q_bias = saturate_int32(round_half_even(bias / scale))``; the zero
    point is 0."""
    scale = np.asarray(input_scale, np.float32) * np.asarray(weight_scale, np.float32)
    if not np.all(scale > 0) or not np.all(np.isfinite(scale)):
        raise ValueError("bias_int32: input_scale * weight_scale must be positive and finite")
    b = np.asarray(bias, np.float64)
    q = np.rint(b / scale.astype(np.float64))
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32), scale.astype(np.float32)


def bias_fits_int32(bias: np.ndarray, input_scale: float | np.ndarray,
                    weight_scale: float | np.ndarray) -> bool:
    """Whether :func:`bias_int32` represents ``bias`` without saturating: every
    ``|bias| / (input_scale * weight_scale)`` within int32 (it is not after an input whose
    range is near zero, whose scale is then tiny)."""
    scale = np.asarray(input_scale, np.float64) * np.asarray(weight_scale, np.float64)
    return bool(np.all(np.abs(np.asarray(bias, np.float64)) / scale <= np.iinfo(np.int32).max))


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal to quantization noise ratio ``10 log10(sum(ref^2) / sum((ref - approx)^2))`` in dB;
    inf when ``approx == ref``."""
    r = np.asarray(ref, np.float64)
    noise = float(np.sum((r - np.asarray(approx, np.float64)) ** 2))
    return sqnr_db_of_sums(float(np.sum(r**2)), noise)


def error_sums(ref: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    """``(sum(ref^2), sum((ref - approx)^2))`` in float64 over the values finite in both: a
    batch's share of :func:`sqnr_db_of_sums`."""
    aa, _, _, dd = _square_sums(ref, approx)
    return aa, dd


#: values per block of :func:`_square_sums` (its float64 temporaries: a few MiB)
_SUM_BLOCK = 1 << 18


def _square_sums(ref: np.ndarray, approx: np.ndarray) -> tuple[float, float, float, float]:
    """``sum(a^2), sum(b^2), sum(a b), sum((a - b)^2)`` in float64 over the values finite in
    both, block by block: whole-tensor float64 copies, masks and differences had made about
    ten times a tensor's float32 size at once (emit's worst-tensor table on CRAFT's 64-channel
    maps of 78 MB: over 1 GB)."""
    a_all, b_all = np.asarray(ref).reshape(-1), np.asarray(approx).reshape(-1)
    sums = np.zeros(4)
    for start in range(0, a_all.size, _SUM_BLOCK):
        a = a_all[start:start + _SUM_BLOCK].astype(np.float64)
        b = b_all[start:start + _SUM_BLOCK].astype(np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        if not finite.all():
            a, b = a[finite], b[finite]
        d = a - b
        sums += (a @ a, b @ b, a @ b, d @ d)
    aa, bb, ab, dd = (float(v) for v in sums)
    return aa, bb, ab, dd


def sqnr_db_of_sums(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB from the summed squares (accumulated over batches):
    inf without noise, -inf without signal."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def cosine(ref: np.ndarray, approx: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors; 1.0 for two zero tensors, 0.0 for one."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(approx, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def output_fidelity(ref: Sequence[dict[str, np.ndarray]], got: Sequence[dict[str, np.ndarray]],
                    parts: dict[str, list[tuple[str, int, int, int]]] | None = None
                    ) -> dict[str, dict[str, float]]:
    """Per numeric output name, ``cosine`` and ``sqnr_db`` of ``got`` against ``ref`` over all
    batches together (lists of output dicts, one per batch), on the values finite in both,
    and for integer outputs (class ids, indices) ``equal``, the share of values that agree;
    with ``parts`` (output -> ``(label, axis, start, stop)``), each part of an output too,
    keyed by its label. Over more than one batch, ``worst_batch_sqnr_db`` too, the lowest
    batch's own SQNR: one pooled figure hid a salient-object net whose maps read 16.7 dB
    over 33 photos and -11.7 dB on the worst (one photo a batch).

    The sums run batch by batch, in float64 blocks (:func:`_square_sums`): all batches
    concatenated in float64, masked and subtracted, had made ten copies of an output's
    values at once (2 GB for 16 batches of CRAFT's 2.5 M-value feature map)."""
    result = {}
    pieces: list[tuple[str, str, tuple[int, int, int] | None]] = []
    for name in ref[0]:
        if np.asarray(ref[0][name]).dtype.kind not in "fiub":
            continue  # strings: no SQNR
        pieces.append((name, name, None))
        pieces += [(label, name, (axis, start, stop))
                   for label, axis, start, stop in (parts or {}).get(name, [])]
    for key, name, cut in pieces:
        if cut is not None and ref[0][name].ndim <= cut[0]:
            continue
        # sum(a^2), sum(b^2), sum(a b), sum((a - b)^2) over the finite; equal and all values
        sums = np.zeros(6)
        worst = math.inf
        for r, g in zip(ref, got, strict=True):
            a, b = _cut_values(r[name], cut), _cut_values(g[name], cut)
            batch = _square_sums(a, b)
            sums[:4] += batch
            worst = min(worst, sqnr_db_of_sums(batch[0], batch[3]))
            sums[4] += np.count_nonzero(a == b)
            sums[5] += a.size
        aa, bb, ab, dd = (float(v) for v in sums[:4])
        na, nb = math.sqrt(aa), math.sqrt(bb)
        result[key] = {"cosine": (1.0 if na == nb else 0.0) if na == 0.0 or nb == 0.0
                       else ab / (na * nb),
                       "sqnr_db": sqnr_db_of_sums(aa, dd)}
        if len(ref) > 1:
            result[key]["worst_batch_sqnr_db"] = worst
        if np.asarray(ref[0][name]).dtype.kind in "iub":  # class ids, indices, flags
            result[key]["equal"] = float(sums[4] / sums[5]) if sums[5] else 1.0
    return result


def _cut_values(x: np.ndarray, cut: tuple[int, int, int] | None) -> np.ndarray:
    """The values of ``x`` (or of its ``(axis, start, stop)`` part), flat."""
    if cut is not None:
        axis, start, stop = cut
        x = np.take(x, np.arange(start, stop), axis=axis)
    return np.asarray(x).reshape(-1)


def bias_shift(weight: np.ndarray, quantized: np.ndarray, mean: np.ndarray,
               groups: int = 1) -> np.ndarray | None:
    """``(W_q - W) . E[x]`` per output channel: the mean a weight's quantization error adds to
    its op's output, for bias correction. Weights are (out, in / groups, *kernel) (Conv; a
    Gemm / MatMul weight as (N, K)), ``mean`` is ``E[x]`` per input channel; ``None`` when
    the shapes do not fit."""
    error = np.asarray(quantized, np.float64) - np.asarray(weight, np.float64)
    cout, cin_g = error.shape[:2]
    if mean.size != cin_g * groups or cout % groups:
        return None
    error = error.reshape(cout, cin_g, -1).sum(axis=2).reshape(groups, cout // groups, cin_g)
    return np.einsum("gok,gk->go", error, mean.reshape(groups, cin_g)).reshape(cout)


def weight_range(w: np.ndarray, axis: int | None = None
                 ) -> tuple[float | np.ndarray, float | np.ndarray]:
    """``(min, max)`` of ``w`` (float64): scalars per tensor, or arrays of length
    ``w.shape[axis]`` per channel (reducing every other axis)."""
    a = np.asarray(w, np.float64)
    if axis is None:
        return float(a.min()), float(a.max())
    axis, _ = _axis(a, axis)
    others = tuple(i for i in range(a.ndim) if i != axis)
    return a.min(axis=others), a.max(axis=others)


#: the fractions of a weight's range :func:`weight_range_mse` tries (1.0 included: it never
#: does worse than the full range).
WEIGHT_CLIPS = tuple(np.round(np.arange(0.30, 1.0001, 0.02), 2))


def weight_range_mse(w: np.ndarray, axis: int | None, qtype: str | QType, symmetric: bool,
                     clips: Sequence[float] = WEIGHT_CLIPS
                     ) -> tuple[float | np.ndarray, float | np.ndarray]:
    """The clip range of ``w`` (per tensor, or per channel on ``axis``) whose quantization
    error ``sum((fake_quantize(w) - w) ** 2)`` is least: :func:`weight_range` shrunk by the
    best of ``clips`` (fractions of it), chosen for each channel on its own. The weights
    outside the range saturate at the qtype's ends, so the qtype must be the one the graph
    stores (a reduced range saturates elsewhere: not for ``reduce_range`` weights)."""
    lo, hi = weight_range(w, axis)
    a = np.asarray(w, np.float32)
    rows = a.reshape(1, -1) if axis is None else \
        np.moveaxis(a, _axis(a, axis)[0], 0).reshape(a.shape[axis], -1)
    lo1, hi1 = np.atleast_1d(lo), np.atleast_1d(hi)
    best = np.ones(len(lo1))
    least = np.full(len(lo1), np.inf)
    qt = _resolve(qtype)
    error = np.empty_like(rows)
    for clip in sorted(clips, reverse=True):  # ties keep the wider range
        scale, zero = qparams(lo1 * clip, hi1 * clip, qt, symmetric)
        s = np.asarray(scale, np.float32).reshape(-1, 1)
        z = np.asarray(zero, np.float32).reshape(-1, 1)
        np.divide(rows, s, out=error)  # fake_quantize's arithmetic, in place
        np.rint(error, out=error)
        error += z
        np.clip(error, qt.qmin, qt.qmax, out=error)
        error -= z
        error *= s
        error -= rows
        total = np.einsum("ck,ck->c", error, error, dtype=np.float64)
        better = total < least
        least[better], best[better] = total[better], clip
    if axis is None:
        return float(lo1[0] * best[0]), float(hi1[0] * best[0])
    return lo1 * best, hi1 * best
