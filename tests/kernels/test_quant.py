"""Quantization arithmetic against onnxruntime's QuantizeLinear / DequantizeLinear and by hand."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphq.kernels import quant as Q

ONNX_TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
              "int4": TensorProto.INT4, "uint4": TensorProto.UINT4}
#: onnx 1.23 writes IR 14, onnxruntime 1.31 reads up to 13; int4 needs IR 10 and opset 21.
IR = {19: 9, 21: 10}


def qdq_model(shape, scale, zero_point, name: str, axis: int | None, opset: int
              ) -> onnx.ModelProto:
    """x -> QuantizeLinear -> q (as int8 / uint8 via Cast) and -> DequantizeLinear -> y."""
    onnx_type = ONNX_TYPES[name]
    raw = TensorProto.INT8 if Q.qtype(name).signed else TensorProto.UINT8
    scale, zero_point = np.asarray(scale, np.float32), np.asarray(zero_point)
    inits = [helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.ravel().tolist()),
             helper.make_tensor("zp", onnx_type, zero_point.shape,
                                zero_point.ravel().astype(int).tolist())]
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("Cast", ["q"], ["q_raw"], to=raw),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("q_raw", raw, list(shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR[opset]
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def sample(rng: np.random.Generator, shape, scale) -> np.ndarray:
    """Random values, exact ties k + 0.5 of x / scale, and values that saturate."""
    s = np.broadcast_to(np.asarray(scale, np.float32), shape)
    x = rng.normal(0, 60, shape) * s
    ties = (rng.integers(-300, 300, shape) + 0.5) * s
    x = np.where(rng.random(shape) < 0.3, ties, x)
    return x.astype(np.float32)


@pytest.mark.parametrize("name,opset", [("int8", 19), ("uint8", 19), ("int4", 21),
                                        ("uint4", 21)])
@pytest.mark.parametrize("axis", [None, 1, -1])
def test_quantize_dequantize_match_onnxruntime(name: str, opset: int, axis: int | None):
    rng = np.random.default_rng(0)
    shape = (3, 5, 4)
    qt = Q.qtype(name)
    n = None if axis is None else shape[axis]
    size = () if n is None else (n,)
    # powers of two make many x / scale exact ties; the others are arbitrary float32 scales
    scale = np.where(rng.random(size) < 0.5, 2.0 ** rng.integers(-4, 2, size),
                     rng.uniform(0.01, 0.3, size)).astype(np.float32)
    zero_point = rng.integers(qt.qmin, qt.qmax + 1, size).astype(qt.storage)
    model = qdq_model(shape, scale, zero_point, name, axis, opset)
    x = sample(rng, shape, scale if axis is None else scale.reshape(
        [-1 if i == axis % 3 else 1 for i in range(3)]))
    q_ref, y_ref = run_ort(model, x)
    q = Q.quantize(x, scale, zero_point, name, axis)
    assert q.dtype == qt.storage
    np.testing.assert_array_equal(q, q_ref)
    assert q.min() == qt.qmin and q.max() == qt.qmax      # saturation was exercised
    y = Q.dequantize(q, scale, zero_point, axis)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(Q.fake_quantize(x, scale, zero_point, name, axis), y_ref)


def test_round_half_to_even_and_saturation():
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 1000.0, -1000.0], np.float32)
    np.testing.assert_array_equal(Q.quantize(x, 1.0, 0, "int8"), [0, 2, 2, 4, 0, -2, -2, 127, -128])
    np.testing.assert_array_equal(Q.quantize(x, 1.0, 128, "uint8"),
                                  [128, 130, 130, 132, 128, 126, 126, 255, 0])
    np.testing.assert_array_equal(Q.quantize(x, 1.0, 0, "int4"), [0, 2, 2, 4, 0, -2, -2, 7, -8])
    assert Q.quantize(np.float32(2.5), 1.0, None, "int8") == 2


def test_quantize_rejects_bad_axis_values():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="per-axis"):
        Q.quantize(x, [1.0, 1.0], [0, 0], "int8", axis=1)
    with pytest.raises(ValueError, match="one value"):
        Q.quantize(x, [1.0, 1.0], 0, "int8")
    with pytest.raises(ValueError, match="axis 2"):
        Q.quantize(x, [1.0, 1.0], [0, 0], "int8", axis=2)


def test_qtype_table():
    assert (Q.qtype("int8").qmin, Q.qtype("int8").qmax) == (-128, 127)
    assert (Q.qtype("uint4").qmin, Q.qtype("uint4").qmax, Q.qtype("uint4").storage) == (
        0, 15, np.uint8)
    assert Q.qtype("int4").storage is np.int8 and Q.qtype("int4").levels == 16
    assert Q.qtype("int32").qmax == 2**31 - 1
    assert Q.qtype(Q.qtype("int16")) is Q.qtype("int16")
    with pytest.raises(ValueError, match="allowed: int8, uint8, int4"):
        Q.qtype("int7")


def test_qparams_symmetric():
    scale, zp = Q.qparams(-2.0, 3.0, "int8", symmetric=True)
    assert scale.dtype == np.float32 and zp.dtype == np.int8
    # the largest |x| lands on the nearer end of the range: 127, not 127.5 (which rounds
    # to 128 and relies on saturation, and with reduce_range would give 64 > 63)
    assert scale == np.float32(3.0 / 127) and zp == 0
    scale, zp = Q.qparams(-2.0, 3.0, "uint8", symmetric=True)
    assert scale == np.float32(3.0 / 127) and zp == 128 and zp.dtype == np.uint8
    scale, zp = Q.qparams(0.0, 7.0, "int4", symmetric=True)
    assert scale == np.float32(1.0) and zp == 0
    scale, zp = Q.qparams(-1.0, 1.0, "int8", symmetric=True, reduce_range=True)
    assert scale == np.float32(1.0 / 63)
    assert Q.quantize(np.array([1.0, -1.0], np.float32), scale, zp, "int8").tolist() == [63, -63]


def test_qparams_asymmetric():
    scale, zp = Q.qparams(-1.0, 3.0, "uint8", symmetric=False)
    assert scale == np.float32(4.0 / 255) and zp == 64        # round(63.75)
    scale, zp = Q.qparams(-1.0, 3.0, "int8", symmetric=False)
    assert scale == np.float32(4.0 / 255) and zp == -64
    # the range is widened to hold 0: 0 is exactly representable
    scale, zp = Q.qparams(2.0, 5.0, "uint8", symmetric=False)
    assert scale == np.float32(5.0 / 255) and zp == 0
    scale, zp = Q.qparams(-5.0, -2.0, "uint8", symmetric=False)
    assert scale == np.float32(5.0 / 255) and zp == 255
    assert Q.dequantize(Q.quantize(np.float32(0), scale, zp, "uint8"), scale, zp) == 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_zero_range_is_tiny_positive(symmetric: bool):
    for name in ("int8", "uint8", "int16"):
        scale, zp = Q.qparams(0.0, 0.0, name, symmetric)
        assert 0 < scale <= 1e-6 and np.isfinite(scale) and scale == np.float32(Q.MIN_SCALE)
        x = np.zeros(4, np.float32)
        np.testing.assert_array_equal(Q.fake_quantize(x, scale, zp, name), x)


def test_qparams_rejects_non_finite_and_inverted():
    for lo, hi in [(-np.inf, 1.0), (0.0, np.nan), (np.array([0.0, -1.0]), np.array([1.0, np.inf]))]:
        with pytest.raises(ValueError, match="not finite"):
            Q.qparams(lo, hi, "int8", True)
    with pytest.raises(ValueError, match="lo > hi"):
        Q.qparams(2.0, 1.0, "int8", False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_per_channel_matches_per_tensor(symmetric: bool):
    lo = np.array([-1.0, 0.0, -3.0, 0.0, 0.5])
    hi = np.array([1.0, 2.0, 0.0, 0.0, 4.0])
    scale, zp = Q.qparams(lo, hi, "uint8", symmetric)
    assert scale.shape == (5,) and scale.dtype == np.float32 and zp.dtype == np.uint8
    for c in range(5):
        s, z = Q.qparams(lo[c], hi[c], "uint8", symmetric)
        assert scale[c] == s and zp[c] == z


@pytest.mark.parametrize("name,symmetric", [("int8", True), ("uint8", False), ("int8", False),
                                            ("uint8", True), ("int4", True), ("int16", False)])
def test_fake_quantize_error_within_half_step(name: str, symmetric: bool):
    rng = np.random.default_rng(1)
    lo, hi = np.array([-0.7, -3.0, 0.0, -1e-3]), np.array([2.3, 0.5, 6.0, 1e-3])
    scale, zp = Q.qparams(lo, hi, name, symmetric)
    x = rng.uniform(lo, hi, (10_000, 4)).astype(np.float32)
    x[:2] = [lo, hi]
    err = np.abs(Q.fake_quantize(x, scale, zp, name, axis=1).astype(np.float64) - x)
    # half a step, plus float32 rounding of x / scale (visible with 16-bit steps)
    assert np.all(err <= 0.5 * scale + 2 * Q.MIN_SCALE * np.abs(x))


def test_bias_int32():
    bias = np.array([0.5, -1.25, 1e9, -1e9, 0.0], np.float32)
    q, scale = Q.bias_int32(bias, np.float32(0.01), np.full(5, 0.5, np.float32))
    assert q.dtype == np.int32 and scale.dtype == np.float32
    np.testing.assert_array_equal(scale, np.float32(0.01) * np.float32(0.5))
    np.testing.assert_array_equal(q, [100, -250, 2**31 - 1, -(2**31), 0])
    q, scale = Q.bias_int32(np.array([0.3]), 0.1, 0.2)
    assert q[0] == 15 and scale == np.float32(0.1) * np.float32(0.2)
    with pytest.raises(ValueError, match="positive"):
        Q.bias_int32(bias, 0.0, 1.0)
    assert not Q.bias_fits_int32(bias, np.float32(0.01), np.full(5, 0.5, np.float32))
    assert Q.bias_fits_int32(bias[[0, 1, 4]], np.float32(0.01), np.full(3, 0.5, np.float32))


def test_sqnr_and_cosine():
    ref = np.ones(100)
    assert Q.sqnr_db(ref, ref) == float("inf")
    assert Q.sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)
    assert Q.cosine(ref, 3 * ref) == pytest.approx(1.0)
    assert Q.cosine(ref, -ref) == pytest.approx(-1.0)
    assert Q.cosine([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert Q.cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert Q.cosine(np.zeros((2, 2)), np.ones((2, 2))) == 0.0



def test_error_sums_add_up_over_batches_on_finite_values():
    """Summed over batches, the squares give the SQNR of the batches together; values not
    finite in either tensor (a -inf mask) are left out; a bool decision counts 0/1."""
    rng = np.random.default_rng(0)
    ref = [rng.normal(0, 1, (3, 4)).astype(np.float32) for _ in range(2)]
    got = [r + rng.normal(0, 0.1, r.shape).astype(np.float32) for r in ref]
    sums = [Q.error_sums(r, g) for r, g in zip(ref, got, strict=True)]
    together = Q.sqnr_db(np.concatenate(ref), np.concatenate(got))
    assert Q.sqnr_db_of_sums(sum(s for s, _ in sums), sum(e for _, e in sums)) == \
        pytest.approx(together)
    masked = np.array([1.0, -np.inf, 2.0])
    assert Q.error_sums(masked, np.array([1.0, 0.0, 1.5])) == (5.0, 0.25)
    assert Q.error_sums(np.array([True, False]), np.array([False, False])) == (1.0, 1.0)

def test_output_fidelity_sums_batch_by_batch_as_over_all_batches_together(monkeypatch):
    """output_fidelity's per-batch sums (in blocks) give the cosine and SQNR of all batches
    concatenated, on the values finite in both (a -inf mask, a NaN), and the worst batch's
    own SQNR; an integer output's ``equal`` counts every value; zero signal reads cosine 1
    against zero, 0 against anything else."""
    rng = np.random.default_rng(4)
    ref = [{"y": rng.normal(0, 1, (2, 5)).astype(np.float32),
            "ids": rng.integers(0, 3, (2, 5))} for _ in range(3)]
    got = [{"y": r["y"] + rng.normal(0, 0.1, (2, 5)).astype(np.float32),
            "ids": np.where(rng.random((2, 5)) < 0.2, 9, r["ids"])} for r in ref]
    ref[1]["y"][0, 0], got[2]["y"][1, 3] = -np.inf, np.nan
    fid = Q.output_fidelity(ref, got)
    a = np.concatenate([r["y"].ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g["y"].ravel() for g in got]).astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    assert finite.sum() == a.size - 2
    assert fid["y"]["sqnr_db"] == pytest.approx(Q.sqnr_db(a[finite], b[finite]), rel=1e-12)
    assert fid["y"]["cosine"] == pytest.approx(Q.cosine(a[finite], b[finite]), rel=1e-12)
    ids = np.concatenate([r["ids"].ravel() for r in ref])
    assert fid["ids"]["equal"] == np.mean(ids == np.concatenate([g["ids"].ravel()
                                                                 for g in got]))
    per_batch = [Q.sqnr_db_of_sums(*Q.error_sums(r["y"], g["y"]))
                 for r, g in zip(ref, got, strict=True)]
    assert fid["y"]["worst_batch_sqnr_db"] == pytest.approx(min(per_batch), rel=1e-12)
    assert "worst_batch_sqnr_db" not in Q.output_fidelity(ref[:1], got[:1])["y"]
    monkeypatch.setattr(Q, "_SUM_BLOCK", 3)  # blocks across the batches' 10 values
    for key, values in Q.output_fidelity(ref, got).items():
        assert values == pytest.approx(fid[key], rel=1e-12)
    zero = [{"y": np.zeros(3, np.float32)}]
    assert Q.output_fidelity(zero, zero)["y"]["cosine"] == 1.0
    assert Q.output_fidelity(zero, [{"y": np.ones(3, np.float32)}])["y"]["cosine"] == 0.0


def test_weight_range():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    assert Q.weight_range(w) == (-10.0, 13.0)
    lo, hi = Q.weight_range(w, axis=0)
    np.testing.assert_array_equal(lo, [-10, 2])
    np.testing.assert_array_equal(hi, [1, 13])
    lo, hi = Q.weight_range(w, axis=-1)
    np.testing.assert_array_equal(lo, [-10, -9, -8, -7])
    np.testing.assert_array_equal(hi, [10, 11, 12, 13])


@pytest.mark.parametrize("qtype,symmetric", [("int4", True), ("uint8", False), ("int8", True)])
def test_weight_range_mse_is_never_worse_than_minmax_and_keeps_an_exact_grid(qtype, symmetric):
    """Per channel: the squared error of fake_quantize at the searched range is at most the
    full range's, every range lies within [min, max]; a channel already on the full range's
    grid (error 0) keeps its full range (ties keep the wider); at 4 bits the heavy-tailed
    channels are clipped; per tensor (axis None) gives scalars."""
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(6, 200)).astype(np.float32)
    lo_full, hi_full = Q.weight_range(w, axis=0)
    scale, zero = Q.qparams(lo_full[1], hi_full[1], qtype, symmetric)
    qt = Q.qtype(qtype)
    levels = np.arange(qt.qmin + symmetric, qt.qmax + 1)  # symmetric: -7..7, not -8
    w[1] = ((rng.choice(levels, 200) - zero.astype(int)) * scale).astype(np.float32)
    w[1, :2] = (levels[[0, -1]] - zero.astype(int)) * scale  # spans the grid
    lo_full, hi_full = Q.weight_range(w, axis=0)
    lo, hi = Q.weight_range_mse(w, 0, qtype, symmetric)

    def error(lo_: np.ndarray, hi_: np.ndarray) -> np.ndarray:
        s, z = Q.qparams(lo_, hi_, qtype, symmetric)
        return ((Q.fake_quantize(w, s, z, qtype, axis=0) - w) ** 2).sum(axis=1)

    assert np.all(error(lo, hi) <= error(lo_full, hi_full) * (1 + 1e-6))
    assert np.all(lo >= lo_full) and np.all(hi <= hi_full)
    assert error(lo_full, hi_full)[1] == 0 and (lo[1], hi[1]) == (lo_full[1], hi_full[1])
    if qt.bits == 4:  # 16 levels: t-distributed channels clip (8 bits keep their tails)
        assert np.all(hi[[0, *range(2, 6)]] < 0.9 * hi_full[[0, *range(2, 6)]])
    lo_t, hi_t = Q.weight_range_mse(w, None, qtype, symmetric)
    assert isinstance(lo_t, float) and isinstance(hi_t, float)
    assert Q.weight_range(w)[0] <= lo_t <= 0 <= hi_t <= Q.weight_range(w)[1]


def test_qtype_of_storage_is_the_full_width_type():
    assert Q.qtype_of_storage(np.int8).name == "int8"
    assert Q.qtype_of_storage(np.uint8).name == "uint8"
    assert Q.qtype_of_storage(np.int32).name == "int32"
    with pytest.raises(ValueError, match="float32"):
        Q.qtype_of_storage(np.float32)


# ---- 4-bit: exact dtypes and ONNX INT4 / UINT4 --------------------------------------------------
def test_4_bit_exact_dtype_is_what_numpy_helper_reads():
    """A zero point read from an ONNX INT4 tensor is an ml_dtypes.int4 array: it maps back to
    the int4 QType (and its arithmetic still works on it)."""
    for name, onnx_type in (("int4", TensorProto.INT4), ("uint4", TensorProto.UINT4)):
        qt = Q.qtype(name)
        assert qt.bits == 4 and qt.exact is not qt.storage
        read = numpy_helper.to_array(helper.make_tensor("z", onnx_type, [2], [qt.qmin, qt.qmax]))
        assert read.dtype == np.dtype(qt.exact)
        assert Q.qtype_of_storage(read.dtype) is qt
        q = Q.quantize(np.array([0.0, 100.0, -100.0], np.float32), 1.0, read[0], qt)
        assert q.dtype == qt.storage and q.tolist() == [qt.qmin, qt.qmax, qt.qmin]
    assert [Q.qtype(n).bits for n in ("int8", "uint8", "int16", "int32")] == [8, 8, 16, 32]


@pytest.mark.parametrize("name,onnx_type", [("int4", TensorProto.INT4),
                                            ("uint4", TensorProto.UINT4)])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 3, 3)])
def test_4_bit_tensors_round_trip_packed(name: str, onnx_type: int, shape):
    """to_exact -> numpy_helper.from_array writes ONNX INT4 / UINT4 two values a byte (odd
    counts padded), and to_array gives the same integers back; helper.make_tensor agrees."""
    qt = Q.qtype(name)
    ints = np.random.default_rng(0).integers(qt.qmin, qt.qmax + 1, shape).astype(qt.storage)
    proto = numpy_helper.from_array(Q.to_exact(ints, qt), "w")
    assert proto.data_type == onnx_type and len(proto.raw_data) == (ints.size + 1) // 2
    back = numpy_helper.to_array(proto)
    np.testing.assert_array_equal(back.astype(np.int64), ints.astype(np.int64))
    made = helper.make_tensor("w", onnx_type, shape, ints.ravel().tolist())
    np.testing.assert_array_equal(numpy_helper.to_array(made).astype(np.int64),
                                  ints.astype(np.int64))


def test_to_exact_refuses_what_would_wrap():
    assert Q.to_exact(np.array([-8, 7], np.int8), "int4").tolist() == [-8, 7]
    assert Q.to_exact(np.int8(3), "uint4").shape == ()
    for name, values in (("int4", [8]), ("int4", [-9]), ("uint4", [-1]), ("uint4", [16])):
        with pytest.raises(ValueError, match=f"do not fit {name}"):
            Q.to_exact(np.array(values), name)
    assert Q.to_exact(np.array([300]), "int32").dtype == np.int32


def test_qparams_4_bit_weights_per_channel():
    """Symmetric 4-bit per channel: scale = max|w| / 7 (the largest weight lands on 7, or on
    -7 + zp), zero point 0 for int4 and 8 for uint4: both give the grid -7..7 x scale."""
    lo, hi = np.array([-0.7, -2.0, 0.0]), np.array([0.35, 1.0, 1.4])
    for name, zero in (("int4", 0), ("uint4", 8)):
        scale, zp = Q.qparams(lo, hi, name, symmetric=True)
        np.testing.assert_array_equal(scale, (np.array([0.7, 2.0, 1.4]) / 7).astype(np.float32))
        assert zp.dtype == Q.qtype(name).storage and zp.tolist() == [zero] * 3
    scale, zp = Q.qparams(-1.0, 2.0, "uint4", symmetric=False)
    assert scale == np.float32(3.0 / 15) and zp == 5


@pytest.mark.parametrize("qtype", ["uint8", "int8"])
@pytest.mark.parametrize("value", [3.0, 2.5, -1.25, 0.0])
def test_exact_operand_dequantizes_to_its_value(qtype, value):
    """A constant operand that must not round (a HardSigmoid's shift beta / alpha): its
    integer, scale and zero point of the type dequantize to the value itself."""
    q, scale, zero = Q.exact_operand(value, qtype)
    assert q.dtype == zero.dtype == Q.qtype(qtype).storage
    assert Q.dequantize(q, scale, zero) == np.float32(value)
