"""calibrate: activation scales from data, tensors kept float, int32 biases, bad data.

Graphs are built here, quantized by insert-qdq, calibrated on data made here; every result
passes onnx.checker (full check). Tolerances:

- minmax scales equal the formula written out in numpy on the min/max of an onnxruntime run
  of the float graph, to float32 rounding (rtol 1e-6), zero points exactly;
- the fake-quant graph keeps cosine similarity > 0.99 with the float graph on held-out data
  (uint8 activations, int8 weights on a small conv net: measured 0.999+ with every method);
- biases: the int32 values are ``rint(b / (s_in * s_w))``, dequantized within half a step.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import graphq
from graphq import graph as G
from graphq.data import DataSource
from graphq.errors import ConfigError, DataError, PassError
from graphq.kernels.quant import MIN_SCALE
from graphq.passes.calibrate import (
    Calibrate,
    _follow_sources,
    _run_ahead,
    _ScoringGraph,
    _SpreadBatches,
)
from graphq.passes.insert_qdq import InsertQDQ
from graphq.quant import QuantTable
from graphq.registry import PassContext
from tests.helpers import assert_close, make_model, residual_net, run, tensor

METHODS = ["minmax", "percentile", "entropy", "mse", "auto"]


def build(nodes, inputs, outputs, inits=(), opset: int = 13) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(make_model(nodes, inputs, outputs, inits,
                                                        opset=opset))


def f32(rng: np.random.Generator, scale: float, *shape: int) -> np.ndarray:
    return rng.normal(0, scale, shape).astype(np.float32)


def conv_net(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm."""
    return onnx.shape_inference.infer_shapes(residual_net(rng))


def images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Real-ish images: smooth blobs and edges in [0, 1] with a little noise."""
    yy, xx = np.mgrid[0:8, 0:8] / 7.0
    out = np.empty((n, 3, 8, 8), np.float32)
    for i in range(n):
        for ch in range(3):
            cy, cx, r = rng.uniform(0, 1, 3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 + 0.2 * r))
            edge = (xx * np.cos(r * 6) + yy * np.sin(r * 6) > cx).astype(np.float64)
            out[i, ch] = 0.6 * blob + 0.3 * edge + rng.normal(0, 0.03, (8, 8))
    return np.clip(out, 0.0, 1.0)


def insert(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    options.setdefault("weights", {"reduce_range": False})
    return InsertQDQ(**options).run(model, PassContext()).model


def calibrate(model: onnx.ModelProto, data, **options):
    source = data if isinstance(data, DataSource) else DataSource(data)
    result = Calibrate(**options).run(model, PassContext(data=source))
    onnx.checker.check_model(result.model, full_check=True)
    return result, QuantTable.of(result.model)


def float_values(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> dict:
    """The float graph's values of ``names`` over all feeds, concatenated on axis 0."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    infos = {v.name: v for v in probe.graph.value_info}
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(infos[n] for n in names if n not in present and n in infos)
    outputs = [o.name for o in probe.graph.output]
    runs = [dict(zip(outputs, run(probe, feed), strict=True)) for feed in feeds]
    values = {}
    for name in names:
        values[name] = (np.concatenate([feed[name] for feed in feeds]) if name in feeds[0]
                        else np.concatenate([r[name] for r in runs]))
    return values


def pairs(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    out = {}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        dq = next(n for n in model.graph.node if q.output[0] in n.input)
        out[q.input[0]] = (q, dq)
    return out


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- scales -------------------------------------------------------------------------------------
def test_minmax_scales_follow_the_formula_on_the_data():
    rng = np.random.default_rng(0)
    model = conv_net(rng)
    feeds = [{"x": images(rng, 16)}, {"x": images(rng, 16)}]
    result, table = calibrate(insert(model), feeds, method="minmax")
    assert result.counts["batches"] == 2
    own = [e for e in table.quantized("activation") if not e.method.startswith("shared:")]
    assert {e.tensor for e in own} == {"x", "r1", "c2", "a", "p"}
    values = float_values(model, [e.tensor for e in own], feeds)
    found = pairs(result.model)
    for entry in own:
        v = values[entry.tensor]
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        scale = np.float32((hi - lo) / 255.0)
        zero = int(np.clip(np.rint(-lo / np.float64(scale)), 0, 255))
        assert entry.method == "minmax"
        assert entry.range == pytest.approx([float(v.min()), float(v.max())], rel=1e-6)
        assert entry.scale[0] == pytest.approx(float(scale), rel=1e-6), entry.tensor
        assert entry.zero_point == [zero], entry.tensor
        q, dq = found[entry.tensor]
        assert initializer(result.model, q.input[1]) == pytest.approx(float(scale), rel=1e-6)
        z = initializer(result.model, q.input[2])
        assert z.dtype == np.uint8 and int(z) == zero
        assert list(dq.input[1:]) == list(q.input[1:])
    assert table.get("r1").zero_point == [0]  # a ReLU output: the range starts at 0


def test_pass_through_takes_its_source_scale():
    rng = np.random.default_rng(1)
    result, table = calibrate(insert(conv_net(rng)), [{"x": images(rng, 8)}], method="minmax")
    f, p = table.get("f"), table.get("p")
    assert f.quantized and f.scale == p.scale and f.zero_point == p.zero_point
    found = pairs(result.model)
    assert initializer(result.model, found["f"][0].input[1]) == \
        initializer(result.model, found["p"][0].input[1])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_usable_scales(method):
    rng = np.random.default_rng(2)
    model = conv_net(rng)
    calib, held_out = images(rng, 32), images(rng, 32)
    result, table = calibrate(insert(model), [{"x": calib}], method=method)
    _, minmax = calibrate(insert(model), [{"x": calib}], method="minmax")
    for entry in table.quantized("activation"):
        assert entry.calibrated and len(entry.scale) == 1
        assert np.isfinite(entry.scale[0]) and entry.scale[0] > 0, entry.tensor
        assert 0 <= entry.zero_point[0] <= 255
        lo, hi = entry.range
        ref_lo, ref_hi = minmax.get(entry.tensor).range
        step = minmax.get(entry.tensor).scale[0]
        assert ref_lo - step <= lo <= hi <= ref_hi + step, entry.tensor  # a clip, not a widening
    ref = run(model, {"x": held_out})[0]
    out = run(result.model, {"x": held_out})[0]
    assert cosine(ref, out) > 0.99


@pytest.mark.parametrize("split", ["feeds", "npz", "pieces"])
def test_streaming_in_batches_gives_the_same_minmax_scales(split, tmp_path, monkeypatch):
    """The same scales from one batch of 32, four of 8, and four of 8 each run one sample at
    a time (their runs make more than RUN_BYTES), which count as the 4 batches."""
    import graphq.data

    rng = np.random.default_rng(3)
    model = insert(conv_net(rng))
    x = images(rng, 32)
    whole, one = calibrate(model, [{"x": x}], method="minmax")
    if split == "feeds":
        data = DataSource([{"x": x[i:i + 8]} for i in range(0, 32, 8)])
    else:
        np.savez(tmp_path / "calib.npz", x=x)
        data = DataSource(tmp_path / "calib.npz", batch_size=8)
    runs = []
    if split == "pieces":
        monkeypatch.setattr(graphq.data, "RUN_BYTES", 1)  # every sample a run of its own
        real = graphq.data.Pieces.split

        def split(self, feed, model, providers, share=1.0):
            pieces = real(self, feed, model, providers, share)
            runs.extend(len(p["x"]) for p in pieces)
            return pieces

        monkeypatch.setattr(graphq.data.Pieces, "split", split)
    parts, four = calibrate(model, data, method="minmax")
    assert whole.counts["batches"] == 1 and parts.counts["batches"] == 4
    if split == "pieces":
        assert runs == [1] * 32
    for entry in one.quantized("activation"):
        other = four.get(entry.tensor)
        assert other.scale == entry.scale and other.zero_point == entry.zero_point
        assert other.range == entry.range


# ---- tensors kept float -------------------------------------------------------------------------
def masked_model(rng: np.random.Generator) -> onnx.ModelProto:
    """t = x + mask (mask holds -inf) feeds a MatMul; a clean MatMul branch beside it."""
    inits = {"W": f32(rng, 0.3, 16, 8), "W2": f32(rng, 0.3, 32, 4), "W3": f32(rng, 0.3, 16, 8),
             "shape": np.array([-1, 32], np.int64)}
    nodes = [helper.make_node("Add", ["x", "mask"], ["t"], name="add_mask"),
             helper.make_node("MatMul", ["t", "W"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["hr"], name="rs"),
             helper.make_node("MatMul", ["hr", "W2"], ["y"], name="mm2"),
             helper.make_node("MatMul", ["x", "W3"], ["y2"], name="clean")]
    return build(nodes, [tensor("x", ["N", 4, 16]), tensor("mask", ["N", 4, 16])],
                 [tensor("y", ["N", 4]), tensor("y2", ["N", 4, 8])], inits)


@pytest.mark.parametrize("method", METHODS)
def test_tensor_holding_inf_is_kept_float_and_its_pair_removed(method):
    rng = np.random.default_rng(4)
    model = masked_model(rng)
    x = rng.normal(0, 1, (8, 4, 16)).astype(np.float32)
    mask = np.zeros_like(x)
    mask[:4, :, 12:] = -np.inf  # half of the samples have masked positions
    inserted = insert(model)
    before = QuantTable.of(inserted)
    assert before.get("t").quantized and before.get("h").quantized
    assert before.get("hr").method == "shared:h"
    result, table = calibrate(inserted, [{"x": x, "mask": mask}], method=method)
    for name in ("t", "h"):
        entry = table.get(name)
        assert not entry.quantized and "non-finite" in entry.reason, entry.reason
        assert any(name in note and "non-finite" in note for note in result.notes)
    assert not table.get("hr").quantized and "'h'" in table.get("hr").reason
    found = pairs(result.model)
    assert set(found) == {e.tensor for e in table.quantized() if e.role != "bias"}
    assert not {"t", "h", "hr"} & set(found)
    x_entry = table.get("x")
    assert x_entry.quantized and np.isfinite(x_entry.scale[0]) and x_entry.scale[0] > 0
    # the float path still computes what the float graph does, inf and nan included
    feed = {"x": x, "mask": mask}
    ref, out = run(model, feed), run(result.model, feed)
    assert np.array_equal(np.isfinite(ref[0]), np.isfinite(out[0]))
    assert cosine(ref[1], out[1]) > 0.99


def zero_model(rng: np.random.Generator, bias: bool) -> onnx.ModelProto:
    """h = relu(x @ W) is all zeros for x >= 0 (W <= 0); then a Gemm, with or without bias."""
    inits = {"W": -np.abs(f32(rng, 0.3, 8, 6)), "W2": f32(rng, 0.3, 4, 6)}
    gemm_inputs = ["r", "W2"]
    if bias:
        inits["b2"] = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
        gemm_inputs.append("b2")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", gemm_inputs, ["y"], name="fc", transB=1)]
    return build(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])], inits)


@pytest.mark.parametrize("method", METHODS)
def test_zero_range_tensor_gets_a_finite_scale(method):
    rng = np.random.default_rng(5)
    model = zero_model(rng, bias=False)
    x = np.abs(rng.normal(0, 1, (16, 8))).astype(np.float32)
    result, table = calibrate(insert(model), [{"x": x}], method=method)
    entry = table.get("r")
    assert entry.quantized and entry.range == [0.0, 0.0]
    assert np.isfinite(entry.scale[0]) and entry.scale[0] >= MIN_SCALE
    assert entry.zero_point == [0]
    assert np.array_equal(run(result.model, {"x": x})[0], run(model, {"x": x})[0])


def test_bias_after_a_zero_range_input_is_not_saturated():
    """With the input scale at its floor (2**-23), ``b / (s_in * s_w)`` is ~1e9 and more:
    clipping it to int32 changes the bias. The output here is the bias alone."""
    rng = np.random.default_rng(6)
    model = zero_model(rng, bias=True)
    x = np.abs(rng.normal(0, 1, (16, 8))).astype(np.float32)
    result, _ = calibrate(insert(model), [{"x": x}], method="minmax")
    ref, out = run(model, {"x": x}), run(result.model, {"x": x})
    assert_close(ref, out, rtol=1e-3)


# ---- biases -------------------------------------------------------------------------------------
BIAS_CASES = {
    # op, attrs, input shape, weight shape, bias length
    "Conv": ("Conv", {"pads": [1, 1, 1, 1]}, [4, 4, 6, 6], (6, 4, 3, 3), 6),
    "Conv-groups": ("Conv", {"group": 2}, [4, 4, 6, 6], (6, 2, 3, 3), 6),
    "ConvTranspose": ("ConvTranspose", {"strides": [2, 2]}, [4, 4, 5, 5], (4, 6, 3, 3), 6),
    "ConvTranspose-groups": ("ConvTranspose", {"group": 2}, [4, 4, 5, 5], (4, 3, 3, 3), 6),
    "Gemm-transB0": ("Gemm", {"transB": 0}, [4, 5], (5, 7), 7),
    "Gemm-transB1": ("Gemm", {"transB": 1}, [4, 5], (7, 5), 7),
}


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_bias_becomes_int32_with_input_times_weight_scale(case, per_channel):
    op, attrs, x_shape, w_shape, n = BIAS_CASES[case]
    rng = np.random.default_rng(len(case))
    b = f32(rng, 0.5, n)
    model = build([helper.make_node(op, ["x", "w", "b"], ["c"], name="op", **attrs),
                   helper.make_node("Relu", ["c"], ["y"], name="relu")],
                  [tensor("x", ["N", *x_shape[1:]])], [tensor("y", None)],
                  {"w": f32(rng, 0.3, *w_shape), "b": b})
    x = rng.normal(0, 1, x_shape).astype(np.float32)
    inserted = insert(model, weights={"per_channel": per_channel, "reduce_range": False})
    result, table = calibrate(inserted, [{"x": x}], method="minmax")
    assert result.counts["biases"] == 1
    entry = table.get("b")
    assert entry.role == "bias" and entry.quantized and entry.dtype == "int32"
    assert entry.zero_point == [0] * n
    s_in = np.float32(table.get("x").scale[0])
    s_w = np.asarray(table.get("w").scale, np.float32)
    if op == "ConvTranspose" and s_w.size > 1:  # one weight scale per channel of a group
        s_w = np.tile(s_w, n // s_w.size)
    expected_scale = np.broadcast_to(s_in * s_w, (n,))
    node = next(nd for nd in result.model.graph.node if nd.name == "op")
    dq = next(nd for nd in result.model.graph.node if node.input[2] in nd.output)
    assert dq.op_type == "DequantizeLinear"
    ints = initializer(result.model, dq.input[0])
    scale = initializer(result.model, dq.input[1])
    assert ints.dtype == np.int32 and ints.shape == (n,)
    np.testing.assert_array_equal(scale, expected_scale)
    np.testing.assert_allclose(entry.scale, expected_scale, rtol=1e-7)
    np.testing.assert_array_equal(ints, np.rint(b / expected_scale.astype(np.float64)))
    assert np.all(np.abs(ints * scale.astype(np.float64) - b) <= scale / 2 + 1e-12)
    assert cosine(run(model, {"x": x})[0], run(result.model, {"x": x})[0]) > 0.99


def test_calibrated_resize_keeps_its_output_shape():
    rng = np.random.default_rng(7)
    inits = {"w": f32(rng, 0.3, 4, 3, 3, 3), "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["u"], name="up", mode="nearest"),
             helper.make_node("MaxPool", ["u"], ["y"], name="pool", kernel_shape=[2, 2])]
    model = build(nodes, [tensor("x", [2, 3, 4, 4])], [tensor("y", [2, 4, 7, 7])], inits)
    x = images(rng, 2)[:, :, :4, :4]
    result, _ = calibrate(insert(model), [{"x": x}], method="minmax")
    ref, out = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert out.shape == ref.shape
    assert cosine(ref, out) > 0.99


# ---- refusals and bad data ----------------------------------------------------------------------
def test_no_data_is_a_data_error():
    model = insert(conv_net(np.random.default_rng(8)))
    with pytest.raises(DataError, match="calibrate needs data"):
        Calibrate().run(model, PassContext())


def test_no_table_is_a_pass_error():
    rng = np.random.default_rng(9)
    with pytest.raises(PassError, match="run insert-qdq before calibrate"):
        calibrate(conv_net(rng), [{"x": images(rng, 2)}])


def test_empty_npz_is_a_data_error(tmp_path):
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    model = insert(conv_net(np.random.default_rng(10)))
    with pytest.raises(DataError, match="no samples"):
        calibrate(model, DataSource(tmp_path / "empty.npz"))


def test_wrong_input_name_is_a_data_error_naming_both():
    rng = np.random.default_rng(11)
    model = insert(conv_net(rng))
    with pytest.raises(DataError, match=r"'image' is not an input.*inputs are: x"):
        calibrate(model, [{"image": images(rng, 2)}])


def test_wrong_rank_is_a_data_error_naming_the_input():
    rng = np.random.default_rng(12)
    model = insert(conv_net(rng))
    with pytest.raises(DataError, match="input 'x' has shape"):
        calibrate(model, [{"x": images(rng, 2)[0]}])


def test_nan_in_the_data_is_a_data_error_naming_the_input():
    """NaN is never a value a model input means (unlike a mask's -inf): calibrating on it
    would silently keep the input and everything downstream float, so it is refused."""
    rng = np.random.default_rng(13)
    model = insert(conv_net(rng))
    x = images(rng, 8)
    x[3, 1, 2, 2] = np.nan
    with pytest.raises(DataError, match="'x'.*(NaN|nan)|(NaN|nan).*'x'"):
        calibrate(model, [{"x": x}], method="minmax")


# ---- a Concat of mixed ranges (a detection head: boxes 0..320 beside scores 0..1) ----------
def concat_model(rng: np.random.Generator, gain: float) -> onnx.ModelProto:
    """Two Conv->Relu branches, one ``gain`` times wider, concatenated, then a Conv."""
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["x", "Wb"], ["b"], name="conv_b"),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "Wc"], ["y"], name="conv_c"),
    ]
    inits = {"Wa": f32(rng, 1.0, 4, 3, 1, 1), "Wb": f32(rng, gain, 4, 3, 1, 1),
             "Wc": f32(rng, 0.3, 2, 8, 1, 1)}
    return build(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 2, 6, 6])], inits)


@pytest.mark.parametrize("gain, concat_quantized", [(300.0, False), (2.0, True)])
def test_concat_of_mixed_ranges_stays_float(gain, concat_quantized):
    rng = np.random.default_rng(40)
    data = [{"x": rng.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    result, table = calibrate(insert(concat_model(rng, gain)), data, method="minmax")
    assert table.get("ra").quantized and table.get("rb").quantized  # branches keep theirs
    assert table.get("cat").quantized is concat_quantized
    if not concat_quantized:
        assert "ranges differ" in table.get("cat").reason
        assert "cat" not in pairs(result.model)


@pytest.mark.parametrize("reader", ["Reshape", "Conv"])
def test_concat_with_a_float_input_stays_float_unless_an_integer_op_reads_it(reader):
    """Class logits beside box terms: ``rb`` is small but for one bright pixel a batch, so
    min_sqnr_db keeps it float (about 17 dB), while the Concat's output, whose power the wide
    ``ra`` holds, keeps about 40 dB and its own scale. That scale would only round the float
    input's values when nothing integer reads the output (a Reshape, then a Softplus to a
    graph output): it stays float; a Conv reader keeps it quantized (the Conv's integer
    input). (A Reshape, a Tanh or a Sigmoid straight to a
    graph output keeps it float already in insert-qdq.)"""
    rng = np.random.default_rng(42)
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["x2", "Wb"], ["b"], name="conv_b"),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
    ]
    side = 64
    if reader == "Reshape":
        nodes += [helper.make_node("Reshape", ["cat", "flat"], ["r"], name="reshape"),
                  helper.make_node("Softplus", ["r"], ["y"], name="scores")]
        out, inits = tensor("y", [1, 8 * side * side]), {"flat": np.array([1, -1], np.int64)}
    else:
        nodes.append(helper.make_node("Conv", ["cat", "Wc"], ["y"], name="conv_c"))
        out, inits = tensor("y", [1, 2, side, side]), {"Wc": f32(rng, 0.3, 2, 8, 1, 1)}
    inits |= {"Wa": f32(rng, 50.0, 4, 3, 1, 1), "Wb": np.abs(f32(rng, 1.0, 4, 3, 1, 1))}
    shape = [1, 3, side, side]
    model = build(nodes, [tensor("x", shape), tensor("x2", shape)], [out], inits)
    data = []
    for _ in range(4):
        x2 = np.abs(rng.normal(0, 0.07, shape)).astype(np.float32)
        x2[0, :, int(rng.integers(side)), int(rng.integers(side))] = 50.0  # one bright pixel
        data.append({"x": rng.normal(0, 1, shape).astype(np.float32), "x2": x2})
    result, table = calibrate(insert(model), data, method="percentile", percentile=100.0,
                              min_sqnr_db=25.0)
    assert table.get("ra").quantized and not table.get("rb").quantized
    cat = table.get("cat")
    if reader == "Reshape":
        assert not cat.quantized and "has a float input ('rb" in cat.reason
        assert "cat" not in pairs(result.model)
    else:
        assert cat.quantized and "cat" in pairs(result.model)


def nested_concat_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Three Conv->Relu branches; ``cat1 = Concat(ra, rb)``, ``cat2 = Concat(cat1, rc, ra)``
    (a Concat of a Concat, one input twice), then a Conv."""
    nodes = [helper.make_node("Conv", ["x", f"W{k}"], [k], name=f"conv_{k}") for k in "abc"]
    nodes += [helper.make_node("Relu", [k], [f"r{k}"]) for k in "abc"]
    nodes += [helper.make_node("Concat", ["ra", "rb"], ["cat1"], name="cat1", axis=1),
              helper.make_node("Concat", ["cat1", "rc", "ra"], ["cat2"], name="cat2", axis=1),
              helper.make_node("Conv", ["cat2", "Wd"], ["y"], name="conv_d")]
    inits = {"Wa": f32(rng, 1.0, 4, 3, 1, 1), "Wb": f32(rng, 2.0, 4, 3, 1, 1),
             "Wc": f32(rng, 0.5, 4, 3, 1, 1), "Wd": f32(rng, 0.3, 2, 16, 1, 1)}
    return build(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 2, 6, 6])], inits)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_concat_statistics_come_from_its_inputs_without_fetching_it(method, monkeypatch):
    """A Concat whose inputs are all observed is not fetched from the session; its range is
    its inputs' merged: min/max exactly, a percentile within a cell or two of the one on its
    own values observed directly (2048 cells over the range)."""
    from graphq import graph as G
    from graphq.kernels import observers as O
    rng = np.random.default_rng(44)
    model = nested_concat_model(rng)
    data = [{"x": rng.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)} for _ in range(6)]
    fetched: list[str] = []
    with_outputs = G.with_outputs

    def spy(model, names, *args, **kwargs):
        fetched.extend(names)
        return with_outputs(model, names, *args, **kwargs)

    monkeypatch.setattr(G, "with_outputs", spy)
    _, table = calibrate(insert(model), data, method=method, percentile=99.0)
    assert {"ra", "rb", "rc"} <= set(fetched) and not {"cat1", "cat2"} & set(fetched)
    values = float_values(model, ["cat1", "cat2"], data)
    for name in ("cat1", "cat2"):
        entry, v = table.get(name), values[name]
        assert entry.quantized and entry.method == method
        if method == "minmax":
            assert entry.range == pytest.approx([float(v.min()), float(v.max())], rel=1e-6)
        else:
            direct = O.make_observer("percentile", percentile=99.0, symmetric=False)
            for batch in np.split(v, len(data)):
                direct.observe(batch)
            cell = float(v.max() - min(v.min(), 0.0)) / 2048
            assert entry.range[0] == 0.0 == direct.range()[0]  # ReLU: the zeros
            assert abs(entry.range[1] - direct.range()[1]) <= 2 * cell, name


def test_loop_bodies_are_reported_as_not_quantized():
    """If branches are quantized (tests/passes/test_control_flow.py); a Loop's body is not:
    its values cannot be read out per iteration for calibration."""
    from graphq.passes.insert_qdq import InsertQDQ as Insert

    rng = np.random.default_rng(41)
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]),
         helper.make_node("Relu", ["v"], ["v_out"])],
        "body", [tensor("i", [], onnx.TensorProto.INT64), tensor("c", [], onnx.TensorProto.BOOL),
                 tensor("v", [1, 2, 6, 6])],
        [tensor("c_out", [], onnx.TensorProto.BOOL), tensor("v_out", [1, 2, 6, 6])])
    model = concat_model(rng, 2.0)
    model.graph.node.append(helper.make_node("Loop", ["trips", "", "y"], ["out"], name="loopy",
                                             body=body))
    model.graph.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "trips"))
    model.graph.output.append(tensor("out", [1, 2, 6, 6]))
    result = Insert().run(model, PassContext())
    assert any("Loop 'loopy'" in note and "not quantized" in note for note in result.notes)


# ---- streaming ----------------------------------------------------------------------------------
class _CountingSession:
    """Stands in for an onnxruntime session: records how many results are alive."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def run(self, names, feed):
        self.calls += 1
        if self.fail_at is not None and feed["i"] == self.fail_at:
            raise DataError(f"batch {self.fail_at} is bad")
        return [feed["i"] * 10]


@pytest.mark.parametrize("total, need, samples, size", [
    (5, 3, 1, 1), (2, 4, 1, 1), (100, 4, 1, 1), (100, 4, 10, 3), (100, 1, 10, 2), (1000, 4, 16, 1),
])
def test_spread_batches_keep_one_batch_per_stratum_over_the_whole_stream(
        total, need, samples, size):
    """Kept: one batch drawn from each stratum of ``stride`` consecutive batches, strata
    merging in pairs (the stride doubling) while that still leaves ``need`` batches holding
    ``samples`` samples: at least the need, at most about twice it ever held, the strata
    covering the whole stream; a stream shorter than the need kept whole."""
    kept_by = _SpreadBatches(need, samples, lambda feed: size)
    held = 0
    for i in range(total):
        kept_by.offer({"i": i})
        held = max(held, len(kept_by.kept))
    kept = [feed["i"] for feed in kept_by.batches()]
    enough = max(need, -(-samples // size))
    if total <= enough:
        assert kept == list(range(total))
        return
    stride = kept_by.stride
    assert [k // stride for k in kept] == list(range(len(kept)))  # one per stratum, in order
    assert len(kept) == -(-total // stride)  # ... and the strata reach the stream's end
    assert enough <= len(kept) <= 2 * enough and held <= 2 * enough, (kept, held)


def test_spread_batches_do_not_alias_with_alternating_data():
    """Data whose kinds alternate (8 kHz, 16 kHz, 8 kHz ...): every k-th batch for an even k
    would score one kind only; the draw within each stratum scores both."""
    for seed in range(5):
        kept_by = _SpreadBatches(4, 1, lambda feed: 1, seed=seed)
        for i in range(64):
            kept_by.offer({"kind": i % 2})
        assert {feed["kind"] for feed in kept_by.batches()} == {0, 1}, seed


def test_run_ahead_keeps_order_and_runs_at_most_one_batch_ahead():
    sess = _CountingSession()
    got = []
    for values in _run_ahead(sess, ["y"], ({"i": i} for i in range(5))):
        got.append(values[0])
        assert sess.calls <= len(got) + 1  # the current batch, and the next one running
    assert got == [0, 10, 20, 30, 40] and sess.calls == 5
    assert list(_run_ahead(sess, ["y"], iter([]))) == []


def test_run_ahead_raises_the_sessions_error_where_it_happened():
    got = []
    with pytest.raises(DataError, match="batch 2 is bad"):
        for values in _run_ahead(_CountingSession(fail_at=2), ["y"], ({"i": i} for i in range(5))):
            got.append(values[0])
    assert got == [0, 10]


# ---- bias correction ----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Conv-groups", "Gemm-transB"])
def test_bias_correction_cancels_the_weights_mean_error(op):
    """With bias_correction, the per-channel mean of (fake-quant output - float output) over
    the calibration data drops to the activation rounding's share: the bias absorbs
    (W_q - W) . E[x]. Inputs have a nonzero mean (|x| + 1), weights 4-bit so the weight
    error is large; 1x1 kernels, so no padding enters."""
    rng = np.random.default_rng(9)
    if op == "Conv-groups":
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="op", group=2)
        w, x_shape, axes = f32(rng, 0.3, 6, 2, 1, 1), (8, 4, 5, 5), (0, 2, 3)
    else:
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="op", transB=1)
        w, x_shape, axes = f32(rng, 0.3, 6, 4), (64, 4), (0,)
    model = build([node], [tensor("x", ["N", *x_shape[1:]])], [tensor("y", None)],
                  {"w": w, "b": f32(rng, 0.5, 6)})
    feeds = [{"x": (np.abs(rng.normal(0, 1, x_shape)) + 1).astype(np.float32)}
             for _ in range(3)]
    inserted = insert(model, weights={"dtype": "int4"})
    errors = {}
    for corrected in (False, True):
        result, table = calibrate(inserted, feeds, method="minmax", bias_correction=corrected)
        diff = np.concatenate([run(result.model, f)[0] - run(model, f)[0] for f in feeds])
        errors[corrected] = np.abs(diff.mean(axis=axes))
        notes = [n for n in result.notes if n.startswith("bias correction")]
        assert notes == (["bias correction: 1 of 1 Conv/Gemm biases less the mean their "
                          "weight's quantization error adds on the calibration data"]
                         if corrected else [])
        assert table.get("b").quantized and table.get("b").dtype == "int32"
    assert errors[False].max() > 0.01
    assert errors[True].max() < errors[False].max() / 5, errors


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    def walk(graph):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                yield from (walk(attr.g) if attr.HasField("g") else
                            (g for sub in attr.graphs for g in walk(sub)))
    return {t.name: numpy_helper.to_array(t) for g in walk(model.graph) for t in g.initializer}


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == \
        [(n.op_type, list(n.input)) for n in b.graph.node]
    ia, ib = _initializers(a), _initializers(b)
    assert set(ia) == set(ib)
    for name, values in ia.items():
        assert values.dtype == ib[name].dtype and values.shape == ib[name].shape, name
        np.testing.assert_array_equal(values, ib[name], err_msg=name)


@pytest.mark.parametrize("net", ["residual", "if-branches"])
def test_auto_scores_each_candidate_on_one_graph_patched_as_built_anew(net):
    """auto builds its scoring graph once and writes each candidate's scales, zero points and
    int32 biases into it: the same initializers, bit for bit, as building it for that
    candidate; a bias changed in the graph (bias correction) reaches the int32 bias; a table
    that keeps another tensor float builds the graph again."""
    from tests.passes.test_control_flow import feeds as if_feeds
    from tests.passes.test_control_flow import if_model

    rng = np.random.default_rng(5)
    if net == "residual":
        model, data = conv_net(rng), [{"x": images(rng, 4)} for _ in range(4)]
    else:
        model, data = if_model(), if_feeds(rng, [True, False, True])
        model = graphq.passes.canonicalize.Canonicalize().run(model, PassContext()).model
    inserted = insert(model)
    tables = {m: calibrate(inserted, data, method=m)[1] for m in ("minmax", "percentile", "mse")}
    graph = G.import_graph(inserted)
    scoring = _ScoringGraph(inserted, graph, tables["minmax"])
    assert scoring.patchable and scoring.pairs and scoring.sites
    built = scoring.proto
    for method in ("percentile", "mse", "minmax"):
        patched = scoring.model(tables[method])
        assert patched is built  # patched, not built again
        _same_graph(patched, _ScoringGraph(inserted, G.import_graph(inserted),
                                           tables[method]).proto)
    # a bias moved in the graph (as bias correction moves it) is requantized
    name = scoring.sites[0][0]
    node = next(n for n in G.nodes(graph) if n.name == name)
    node.inputs[2].values = node.inputs[2].values + np.float32(0.01)
    fresh = _ScoringGraph(inserted, graph, tables["mse"]).proto
    _same_graph(scoring.model(tables["mse"]), fresh)
    assert scoring.proto is built
    # another placement: built again, equal to a fresh build
    other = tables["mse"].copy()
    entry = next(e for e in other.quantized("activation") if not e.method.startswith("shared:"))
    entry.quantized, entry.scale, entry.zero_point = False, None, None
    _follow_sources(other)
    rebuilt = scoring.model(other)
    assert rebuilt is not built
    _same_graph(rebuilt, _ScoringGraph(inserted, graph, other).proto)


@pytest.mark.parametrize("kernel, kept", [(1, True), (3, False)])
def test_auto_keeps_bias_correction_only_where_it_helps(kernel, kept):
    """Under method auto the corrected biases are scored against the original ones on the
    search batches. The correction takes every input position of a Conv to see the channel's
    mean: right for a 1x1 kernel; for a 3x3 kernel padded over a 1x1 input, 8 of 9 taps see
    zeros, the shift overshoots 9-fold, and the original biases come back."""
    rng = np.random.default_rng(10)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="op",
                            pads=[kernel // 2] * 4)
    model = build([node], [tensor("x", ["N", 4, 1, 1])], [tensor("y", None)],
                  {"w": f32(rng, 0.3, 6, 4, kernel, kernel), "b": f32(rng, 0.5, 6)})
    feeds = [{"x": (np.abs(rng.normal(0, 1, (16, 4, 1, 1))) + 1).astype(np.float32)}
             for _ in range(4)]
    inserted = insert(model, weights={"dtype": "int4"})
    result, table = calibrate(inserted, feeds, method="auto", bias_correction=True)
    (note,) = [n for n in result.notes if n.startswith("bias correction ")]
    assert note.startswith("bias correction kept" if kept else "bias correction undone"), note
    bias = table.get("b")
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    restored = np.asarray(bias.scale) * next(
        numpy_helper.to_array(t) for t in result.model.graph.initializer
        if t.name.startswith("b_quantized"))
    # the int32 bias holds the original values (undone) or shifted ones (kept)
    assert np.allclose(restored, original, atol=np.max(bias.scale)) is not kept


# ---- method auto --------------------------------------------------------------------------------
def spread(feeds: list[dict], batches: int, samples: int) -> list[dict]:
    """The feeds calibrate keeps for auto (the same seeded draw as :class:`_SpreadBatches`)."""
    kept = _SpreadBatches(batches, samples, lambda feed: len(next(iter(feed.values()))))
    for feed in feeds:
        kept.offer(feed)
    return kept.batches()


def worst_sqnr_db(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict]) -> float:
    """Each float output's SQNR over all feeds together (numpy), the lowest; the quantized
    graph as onnxruntime runs it by default (fused integer kernels), as auto scores it."""
    worst = np.inf
    sess = ort.InferenceSession(quantized.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ref = [run(model, f) for f in feeds]
    out = [sess.run(None, f) for f in feeds]
    for i in range(len(ref[0])):
        a = np.concatenate([r[i].ravel() for r in ref]).astype(np.float64)
        b = np.concatenate([o[i].ravel() for o in out]).astype(np.float64)
        worst = min(worst, 10 * np.log10(np.sum(a * a) / np.sum((a - b) ** 2)))
    return float(worst)


def test_auto_keeps_the_method_with_the_best_output_on_the_batches_it_kept():
    """auto's scores are the worst output SQNR of each method's graph on ``search_batches``
    batches spread over the data (recomputed here with numpy from each method run alone with
    auto's 4096-bin histogram), it keeps the best, and its table is that method's table."""
    rng = np.random.default_rng(11)
    model = conv_net(rng)
    # 7-bit weights: no uint8 x int8 saturation in the fused kernels of AVX2 CPUs
    inserted = insert(model, weights={"reduce_range": True})
    feeds = [{"x": images(rng, 8)} for _ in range(5)]
    for feed in feeds:  # an outlier in every batch: the methods' clips differ
        feed["x"][0, 0, 0, 0] = 4.0
    result, table = calibrate(inserted, feeds, method="auto", search_batches=3,
                              search_samples=1, auto_margin_db=0.0)
    (note,) = [n for n in result.notes if n.startswith("method auto")]
    assert "on 3 calibration batch(es) (24 samples)" in note, note
    found = dict(re.findall(r"(percentile|mse|entropy|minmax) ([-\d.]+) dB", note))
    assert list(found) == ["percentile", "mse", "entropy", "minmax"], note
    alone, scores = {}, {}
    for method, text in found.items():
        alone[method] = calibrate(inserted, feeds, method=method, bins=4096)
        scores[method] = worst_sqnr_db(model, alone[method][0].model,
                                       spread(feeds, 3, 1))
        assert float(text) == pytest.approx(scores[method], abs=0.051), (method, note)
    best = note.rsplit(": ", 1)[1].removesuffix(" kept")
    assert scores[best] >= max(scores.values()) - 1e-6, (scores, note)
    assert max(scores.values()) - min(scores.values()) > 1.0, note  # a real choice
    best_result, best_table = alone[best]
    for entry in best_table.quantized("activation"):
        other = table.get(entry.tensor)
        assert other.method == entry.method
        assert entry.method == best or entry.method.startswith("shared:"), entry.method
        assert other.scale == entry.scale and other.zero_point == entry.zero_point
    held_out = {"x": images(rng, 16)}
    np.testing.assert_array_equal(run(result.model, held_out)[0],
                                  run(best_result.model, held_out)[0])


def test_auto_places_activations_by_percentile_for_every_method():
    """With min_sqnr_db, auto judges every activation at percentile's clip range and keeps
    float the same ones whatever method it then keeps: a harder-clipping method alone keeps
    more tensors float (here some method alone does), and would otherwise win the comparison
    by quantizing less."""
    rng = np.random.default_rng(12)
    model = conv_net(rng)
    inserted = insert(model, weights={"reduce_range": True})
    feeds = [{"x": images(rng, 8) * rng.laplace(1.0, 0.6, (8, 1, 1, 1)).astype(np.float32)}
             for _ in range(5)]
    floats = {}
    for method in ("percentile", "mse", "entropy", "minmax", "auto"):
        result, table = calibrate(inserted, feeds, method=method, bins=4096,
                                  min_sqnr_db=30.0, search_samples=1, auto_margin_db=0.0)
        floats[method] = {e.tensor for e in table.entries.values()
                          if e.role == "activation" and not e.quantized
                          and "graph output" not in e.reason}
        if method == "auto":
            for name in floats[method]:
                reason = table.get(name).reason
                assert "percentile's clip range" in reason or "source" in reason, reason
    assert any(floats[m] != floats["percentile"] for m in ("mse", "entropy")), floats
    assert floats["auto"] == floats["percentile"], floats


def gated_case(rng: np.random.Generator) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """The conv net after insert-qdq (7-bit weights) and 5 batches of images scaled by
    Laplace factors: some activations fall below a min_sqnr_db of 40, and keeping them float
    scores better on the outputs (with auto_margin_db 0)."""
    inserted = insert(conv_net(rng), weights={"reduce_range": True})
    feeds = [{"x": images(rng, 8) * rng.laplace(1.0, 0.6, (8, 1, 1, 1)).astype(np.float32)}
             for _ in range(5)]
    return inserted, feeds


def floats(table: QuantTable) -> set[str]:
    """The activations kept float for a reason other than being a graph output."""
    return {e.tensor for e in table.entries.values() if e.role == "activation"
            and not e.quantized and "graph output" not in e.reason}


def test_auto_quantizes_what_min_sqnr_db_gates_unless_float_scores_better():
    """check_min_sqnr (default on): the activations min_sqnr_db keeps float stay float only if
    the outputs score better that way by more than auto_margin_db. With a margin no score
    difference reaches, they are quantized (their reason says so) and the outputs are the
    ones the percentile table of the same placement gives; with the check off, or a margin of
    0 (float scores higher here), they stay float."""
    rng = np.random.default_rng(12)
    inserted, feeds = gated_case(rng)

    common = {"method": "auto", "bins": 4096, "min_sqnr_db": 40.0, "search_samples": 1}
    _, unchecked = calibrate(inserted, feeds, check_min_sqnr=False, auto_margin_db=0.0,
                             **common)
    gated = floats(unchecked)
    assert gated and all("percentile's clip range" in unchecked.get(t).reason
                         or "source" in unchecked.get(t).reason for t in gated)
    strict, strict_table = calibrate(inserted, feeds, auto_margin_db=0.0, **common)
    assert floats(strict_table) == gated
    assert any(n.startswith("min_sqnr_db keeps") for n in strict.notes), strict.notes
    loose, table = calibrate(inserted, feeds, auto_margin_db=1000.0, **common)
    assert not floats(table), floats(table)
    (note,) = [n for n in loose.notes if n.startswith("min_sqnr_db would keep")]
    assert f"{len([t for t in gated if 'source' not in unchecked.get(t).reason])}" in note
    for t in gated:
        if "source" not in unchecked.get(t).reason:
            assert "but quantizing it scores" in table.get(t).reason, table.get(t).reason
    plain, _ = calibrate(inserted, feeds, method="percentile", bins=4096)
    held_out = {"x": images(rng, 16)}
    np.testing.assert_allclose(run(loose.model, held_out)[0], run(plain.model, held_out)[0],
                               rtol=0, atol=1e-5)


def test_min_sqnr_check_trades_fidelity_for_speed_at_auto_speed_db(monkeypatch):
    """auto_speed_db: where keeping min_sqnr_db's activations float scores better (margin 0
    here), the float and the quantized placement are timed side by side, and the activations
    are quantized anyway when the quantized graph runs faster and loses less than auto_speed_db
    per 2x speedup. Timings are given (the machine is noisy), the rule is what is tested: a
    2x speedup at 1000 dB per 2x buys any loss; a quantized graph that runs slower buys
    nothing; auto_speed_db 0 times nothing, nor does a loss more than MAX_SPEEDUP would buy.
    One run with real timings checks the timed graphs are the two placements' deploy graphs."""
    from graphq import latency
    from graphq.passes import calibrate as calibrate_module

    inserted, feeds = gated_case(np.random.default_rng(12))
    common = {"method": "auto", "bins": 4096, "min_sqnr_db": 40.0, "search_samples": 1,
              "auto_margin_db": 0.0}

    _, kept = calibrate(inserted, feeds, **common)
    gated = floats(kept)
    assert gated
    timed = []

    def medians(models, feed, providers, **kw):
        timed.append(models)
        return seconds

    monkeypatch.setattr(latency, "medians", medians)
    seconds = [2.0, 1.0]  # quantized: 2x the speed
    traded, table = calibrate(inserted, feeds, auto_speed_db=1000.0, **common)
    assert len(timed) == 1 and len(timed[0]) == 2
    float_g, quant_g = timed[0]
    for g in (float_g, quant_g):
        onnx.checker.check_model(g, full_check=True)
        assert not [n for n in g.graph.node if n.op_type == "QuantizeLinear" and n.input[0]
                    in {t.name for t in g.graph.initializer}]  # weights folded: deploy
    n_q = [sum(n.op_type == "QuantizeLinear" for n in g.graph.node) for g in timed[0]]
    assert n_q[1] > n_q[0], n_q
    assert not (floats(table) & gated), floats(table)
    (note,) = [n for n in traded.notes if n.startswith("min_sqnr_db would keep")]
    assert "less for 2.00x the speed (auto_speed_db 1000 per 2x)" in note, note
    # the timed speedup is pinned; given, it decides the same without timing
    assert traded.pinned == {"min_sqnr_speedup": 2.0}
    timed.clear()
    given, again = calibrate(inserted, feeds, auto_speed_db=1000.0, min_sqnr_speedup=2.0,
                             **common)
    assert not timed and given.pinned == {} and floats(again) == floats(table)
    assert any("2.00x the speed (auto_speed_db 1000 per 2x; the speedup min_sqnr_speedup's)"
               in n for n in given.notes), given.notes
    seconds = [1.0, 2.0]  # quantized runs slower: float wins on both counts
    slower, table = calibrate(inserted, feeds, auto_speed_db=1000.0, **common)
    assert floats(table) == gated
    assert slower.pinned == {"min_sqnr_speedup": 0.5}
    _, again = calibrate(inserted, feeds, auto_speed_db=1000.0, min_sqnr_speedup=0.5, **common)
    assert floats(again) == gated
    assert any(n.startswith("min_sqnr_db keeps") and "runs 0.50x the speed" in n
               for n in slower.notes), slower.notes
    timed.clear()
    _, table = calibrate(inserted, feeds, auto_speed_db=0.0, **common)
    assert not timed and floats(table) == gated
    # a loss no speedup up to MAX_SPEEDUP buys is not timed
    monkeypatch.setattr(calibrate_module, "MAX_SPEEDUP", 1.0 + 1e-9)
    hopeless, table = calibrate(inserted, feeds, auto_speed_db=1.0, **common)
    assert not timed and floats(table) == gated
    assert any(n.startswith("min_sqnr_db keeps") and "not timed: at auto_speed_db 1 per 2x"
               in n for n in hopeless.notes), hopeless.notes
    monkeypatch.undo()  # the real latency.medians again
    real, _ = calibrate(inserted, feeds, auto_speed_db=1.0, **common)
    assert any("the speed" in n for n in real.notes if "min_sqnr_db" in n), real.notes


def test_auto_candidate_takes_percentiles_range_where_its_own_loses_the_tensor():
    """A tensor of small values with rare large ones: entropy's KL threshold clips it to
    +-1.25 (expected SQNR 1.8 dB), percentile's range holds 29 dB. Under auto's shared
    placement the tensor is quantized, and the entropy candidate takes percentile's range for
    it rather than destroying it (the digits CNN's entropy candidate scored -3.1 dB that way)."""
    import onnx_graphsurgeon as gs

    from graphq.kernels import observers as O
    from graphq.quant import TensorQuant

    rng = np.random.default_rng(13)
    x = np.where(rng.random(200000) < 0.99, rng.normal(0, 0.01, 200000),
                 rng.normal(0, 5, 200000)).astype(np.float32)
    obs = O.HistogramObserver(4096, None)
    obs.observe(x)
    step = Calibrate(method="auto", min_sqnr_db=25.0)
    picked = {}
    for method in ("entropy", "mse"):
        table = QuantTable()
        table.add(TensorQuant("x", "activation", True, "input of Conv 'c'", dtype="uint8",
                              symmetric=False))
        notes = step._set_qparams(table, {"x": obs}, gs.Graph(), method)
        entry = table.get("x")
        assert entry.quantized
        picked[method] = (entry.method, notes)
    lo, hi = obs.percentile(99.999, False)
    assert picked["entropy"][0] == "percentile"
    assert any("took percentile's clip range: entropy's" in n for n in picked["entropy"][1])
    assert picked["mse"][0] == "mse" and not picked["mse"][1]  # mse's own range holds it
    assert obs.sqnr_db(*obs.entropy("uint8", False), "uint8", False) < 25 <= \
        obs.sqnr_db(lo, hi, "uint8", False)


def auto_note(result) -> tuple[dict[str, float], str]:
    """auto's scores and kept method, read from its note."""
    (note,) = [n for n in result.notes if n.startswith("method auto")]
    scores = {m: float(v) for m, v in
              re.findall(r"(percentile|mse|entropy|minmax) ([-\d.]+) dB", note)}
    return scores, note.rsplit(": ", 1)[1].removesuffix(" kept")


def test_auto_keeps_percentile_unless_another_method_beats_it_by_the_margin():
    """A method other than percentile is kept only when its score beats percentile's by more
    than auto_margin_db; within the margin auto keeps percentile and percentile's table."""
    rng = np.random.default_rng(11)
    model = conv_net(rng)
    inserted = insert(model, weights={"reduce_range": True})
    feeds = [{"x": images(rng, 8)} for _ in range(5)]
    feeds[0]["x"][0, 0, 0, 0] = 4.0  # percentile 99.9 clips it, and loses to minmax
    auto = {"method": "auto", "search_batches": 3, "search_samples": 1, "percentile": 99.9}
    free, _ = calibrate(inserted, feeds, auto_margin_db=0.0, **auto)
    scores, best = auto_note(free)
    assert best != "percentile", scores  # the setup gives another method the lead
    gap = scores[best] - scores["percentile"]
    assert gap > 0.2, scores
    above, _ = calibrate(inserted, feeds, auto_margin_db=gap - 0.15, **auto)
    assert auto_note(above)[1] == best
    within, table = calibrate(inserted, feeds, auto_margin_db=gap + 0.15, **auto)
    assert auto_note(within)[1] == "percentile"
    _, alone = calibrate(inserted, feeds, method="percentile", percentile=99.9, bins=4096)
    for entry in alone.quantized("activation"):
        assert table.get(entry.tensor).scale == entry.scale, entry.tensor


def test_auto_scores_on_at_least_search_samples_samples():
    """Batches of one image: auto keeps batches until search_samples samples (not only
    search_batches batches), spread over the data, and its scores are those of exactly
    these batches."""
    rng = np.random.default_rng(5)
    model = conv_net(rng)
    inserted = insert(model, weights={"reduce_range": True})
    feeds = [{"x": images(rng, 1)} for _ in range(12)]
    result, _ = calibrate(inserted, feeds, method="auto", search_batches=2, search_samples=6,
                          auto_margin_db=0.0)
    (note,) = [n for n in result.notes if n.startswith("method auto")]
    assert "on 6 calibration batch(es) (6 samples)" in note, note
    scores, best = auto_note(result)
    alone = calibrate(inserted, feeds, method=best, bins=4096)[0].model
    kept = spread(feeds, 2, 6)
    assert len(kept) == 6 and [id(f) for f in kept] != [id(f) for f in feeds[:6]]
    assert scores[best] == pytest.approx(worst_sqnr_db(model, alone, kept), abs=0.051)
    assert scores[best] != pytest.approx(worst_sqnr_db(model, alone, feeds[:6]), abs=0.051)
    assert scores[best] != pytest.approx(worst_sqnr_db(model, alone, feeds[:2]), abs=0.051)


def test_method_auto_on_a_graph_whose_nodes_have_no_names():
    """Method auto's scoring graph reads each biased op's float bias by the op's name; in a
    graph of unnamed nodes (one built by hand, run without canonicalize) a Reshape answered
    for a Gemm's name and calibrate failed with an IndexError. Unnamed ops are now looked
    up by none: the scoring graph is rebuilt per candidate, the scores those of graphs
    calibrated by each method alone."""
    rng = np.random.default_rng(5)
    inits = {"w1": rng.normal(0, 0.5, (6, 8)).astype(np.float32),
             "b1": rng.normal(0, 0.1, 8).astype(np.float32),
             "w2": rng.normal(0, 0.5, (8, 3)).astype(np.float32),
             "b2": rng.normal(0, 0.1, 3).astype(np.float32),
             "flat": np.array([-1, 6], np.int64)}
    model = make_model([helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                        helper.make_node("Gemm", ["x2", "w1", "b1"], ["h"]),
                        helper.make_node("Relu", ["h"], ["r"]),
                        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"])],
                       [tensor("x", ["N", 2, 3])], [tensor("y", ["N", 3])], inits)
    assert {n.name for n in model.graph.node} == {""}
    inserted = insert(model)
    feeds = [{"x": rng.normal(0, 1, (8, 2, 3)).astype(np.float32)} for _ in range(3)]
    result, _ = calibrate(inserted, feeds, method="auto", search_samples=1)
    (note,) = [n for n in result.notes if n.startswith("method auto")]
    scores = dict(re.findall(r"(percentile|mse|entropy|minmax) (-?[\d.]+) dB", note))
    assert len(scores) == 4, note
    for method, score in scores.items():
        alone = calibrate(inserted, feeds, method=method, bins=4096)[0].model
        assert float(score) == pytest.approx(
            worst_sqnr_db(model, alone, spread(feeds, 3, 1)), abs=0.051), (method, note)


# ---- auto_metric: the user's own score ------------------------------------------------------


METRICS = """
import numpy as np

calls = []


def max_abs_error(reference, quantized):
    return -max(float(np.abs(r[k] - q[k]).max()) for r, q in zip(reference, quantized)
                for k in r)


def prefer_third(reference, quantized):
    assert len(reference) == len(quantized) == 3, (len(reference), len(quantized))
    assert sorted(reference[0]) == sorted(quantized[0]) == ["y"]
    calls.append(1)
    return [0.0, 0.0, 0.1, 0.0][len(calls) - 1]
"""


def test_auto_metric_decides_which_method_auto_keeps(tmp_path):
    """auto_metric ('file.py:function', relative to the pipeline file) scores each candidate
    on the kept batches' float and quantized outputs; auto keeps the best without
    auto_margin_db (0.1 over percentile's 0.0 wins), the note names the metric and its
    scores, and the pipeline file the run writes names it again."""
    rng = np.random.default_rng(11)
    inserted = insert(conv_net(rng), weights={"reduce_range": True})
    feeds = [{"x": images(rng, 8)} for _ in range(5)]
    (tmp_path / "metrics.py").write_text(METRICS)
    auto = {"method": "auto", "search_batches": 3, "search_samples": 1}
    result, table = calibrate(inserted, feeds, auto_metric=f"{tmp_path}/metrics.py:prefer_third",
                              **auto)
    (note,) = [n for n in result.notes if n.startswith("method auto")]
    assert note.startswith("method auto: auto_metric '") and "on 3 calibration batch(es)" in note
    assert note.endswith("percentile 0, mse 0, entropy 0.1, minmax 0: entropy kept"), note
    own = {e.method for e in table.quantized("activation")
           if e.method != "constant" and not e.method.startswith("shared:")}
    assert own == {"entropy"}

    onnx.save(inserted, tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in feeds]))
    (tmp_path / "p.toml").write_text(
        '[data]\nsource = "calib.npz"\nbatch_size = 8\n\n[[passes]]\nname = "calibrate"\n'
        'method = "auto"\nsearch_batches = 3\nsearch_samples = 1\n'
        'auto_metric = "metrics.py:max_abs_error"\n')
    run = graphq.PassManager.from_toml(tmp_path / "p.toml").run(tmp_path / "in.onnx",
                                                                tmp_path / "out")
    (note,) = [n for r in run.records for n in r.notes if n.startswith("method auto")]
    assert "auto_metric 'metrics.py:max_abs_error'" in note
    scores = dict(re.findall(r"(percentile|mse|entropy|minmax) (-[\d.e-]+)", note))
    assert len(scores) == 4
    best = max(scores, key=lambda m: float(scores[m]))
    assert note.endswith(f"{best} kept")
    alone = calibrate(inserted, feeds, method=best, bins=4096)[0].model
    kept = spread(feeds, 3, 1)
    float_view = G.with_outputs(inserted, [], float_view=True)
    reference = [run_model(float_view, f) for f in kept]
    quantized = [run_model(alone, f) for f in kept]
    error = -max(float(np.abs(r[k] - q[k]).max())
                 for r, q in zip(reference, quantized, strict=True) for k in r)
    assert float(scores[best]) == pytest.approx(error, rel=1e-4)
    assert 'auto_metric = "metrics.py:max_abs_error"' in (tmp_path / "out/pipeline.toml"
                                                          ).read_text()


def run_model(model: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))


@pytest.mark.parametrize("spec,message", [
    ("nocolon", "is not 'module:function' or 'file.py:function'"),
    ("missing.py:f", "no file"),
    ("graphq_no_such_module:f", "loading 'graphq_no_such_module' failed: ModuleNotFoundError"),
    ("math:no_such_function", "'math' has no function 'no_such_function'"),
])
def test_auto_metric_that_cannot_be_loaded_is_a_config_error(spec, message):
    rng = np.random.default_rng(3)
    inserted = insert(conv_net(rng))
    with pytest.raises(ConfigError, match=re.escape(message)):
        calibrate(inserted, [{"x": images(rng, 4)}], method="auto", auto_metric=spec)


def test_auto_metric_needs_method_auto_and_a_finite_number(tmp_path):
    rng = np.random.default_rng(3)
    inserted = insert(conv_net(rng))
    feeds = [{"x": images(rng, 4)}]
    with pytest.raises(ConfigError, match="'auto_metric' scores method auto's candidates"):
        Calibrate(method="percentile", auto_metric="math:sqrt")
    (tmp_path / "bad.py").write_text("def nan(r, q):\n    return float('nan')\n\n"
                                     "def boom(r, q):\n    return 1 / 0\n")
    with pytest.raises(PassError, match=r"returned nan on percentile: it must return a finite"):
        calibrate(inserted, feeds, method="auto", auto_metric=f"{tmp_path}/bad.py:nan")
    with pytest.raises(PassError, match=r"failed on percentile: ZeroDivisionError"):
        calibrate(inserted, feeds, method="auto", auto_metric=f"{tmp_path}/bad.py:boom")


def test_auto_and_the_search_score_against_outputs_the_stream_kept(monkeypatch):
    """The kept batches' float outputs come from the streaming session (fetched beside the
    observed tensors): method auto, its bias-correction check and the sensitivity search run
    no float session of their own, and those outputs are the float graph's."""
    import graphq.passes.calibrate as C

    rng = np.random.default_rng(21)
    inserted = insert(conv_net(rng), weights={"reduce_range": True})
    feeds = [{"x": images(rng, 4)} for _ in range(6)]
    seen = {}
    observe = C.Calibrate._observe

    def spy(self, *args, **kwargs):
        seen["stream"] = observe(self, *args, **kwargs)
        return seen["stream"]

    monkeypatch.setattr(C.Calibrate, "_observe", spy)
    with_outputs = G.with_outputs

    def no_bare_float_view(model, names, *args, **kwargs):  # a float session of their own
        assert names, "a float view without observed outputs: a second float session"
        return with_outputs(model, names, *args, **kwargs)

    monkeypatch.setattr(C.G, "with_outputs", no_bare_float_view)
    result, _ = calibrate(inserted, feeds, method="auto", search_batches=3, search_samples=1,
                          bias_correction=True, target_sqnr_db=60.0, max_float=0.5)
    assert any(n.startswith("method auto") for n in result.notes)
    assert any(n.startswith("sensitivity search") for n in result.notes)
    stream = seen["stream"]
    assert len(stream.reference) == len(stream.kept) == 3
    float_view = with_outputs(inserted, [], float_view=True)
    for feed, got in zip(stream.kept, stream.reference, strict=True):
        want = run_model(float_view, feed)
        assert sorted(got) == sorted(want) == ["y"]
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, gain_db", [("int8", 0.25), ("int4", 3.0)])
def test_gptq_weight_rounding_keeps_the_grid_and_loses_less_than_nearest(dtype, gain_db):
    """weight_rounding = "gptq" on the small conv net: every rounded weight lies on its grid
    (the deploy graph stores the same integers) inside the span nearest rounding gives its
    row; with bias_correction the biases of its ops take the mean error left; the held-out
    outputs lose less to float than with nearest rounding and bias correction (output SQNR
    measured 44.6 -> 45.1 dB int8, 28.5 -> 34.2 dB int4), activations alike (minmax)."""
    rng = np.random.default_rng(4)
    model = conv_net(rng)
    feeds = [{"x": images(rng, 16)} for _ in range(4)]
    held = [{"x": images(rng, 16)} for _ in range(4)]
    inserted = insert(model, weights={"dtype": dtype, "reduce_range": False})
    sqnr, tables, weights = {}, {}, {}
    for rounding in ("nearest", "gptq"):
        result, table = calibrate(inserted, feeds, method="minmax", weight_rounding=rounding,
                                  bias_correction=True)
        ref = np.concatenate([run(model, f)[0] for f in held])
        got = np.concatenate([run(result.model, f)[0] for f in held])
        sqnr[rounding] = 10 * np.log10(np.sum(ref ** 2) / np.sum((got - ref) ** 2))
        tables[rounding], weights[rounding] = table, _initializers(result.model)
        notes = [n for n in result.notes if n.startswith("weight rounding")]
        assert notes == ([] if rounding == "nearest" else [pytest.approx(notes[0])])
    assert sqnr["gptq"] > sqnr["nearest"] + gain_db, sqnr
    note = notes[0]
    assert note.startswith("weight rounding: GPTQ rounded 3 weights on 4 search batches"), note
    assert "3 biases corrected" in note, note
    for name, op in {"w1": "Conv", "w2": "Conv", "wg": "Gemm"}.items():  # channels: axis 0
        entry = tables["gptq"].get(name)
        assert entry.method == "weight+gptq"
        assert entry.scale == tables["nearest"].get(name).scale
        w, w0 = weights["gptq"][name], weights["nearest"][name]
        s = np.asarray(entry.scale).reshape((-1,) + (1,) * (w.ndim - 1))
        q, q0 = w / s, np.round(w0 / s)
        np.testing.assert_allclose(q, np.round(q), atol=1e-4)
        rows = lambda a: a.reshape(len(a), -1)  # noqa: E731
        assert np.all(rows(np.round(q)).min(1) >= rows(q0).min(1))
        assert np.all(rows(np.round(q)).max(1) <= rows(q0).max(1))
        assert not np.array_equal(np.round(q), q0), f"{op} {name} rounded as nearest"
    for bias in ("b1", "b2", "bg"):  # int32 biases: the adjusted float bias / its scale
        assert tables["gptq"].get(bias).dtype == "int32"
        assert not np.array_equal(weights["gptq"][f"{bias}_quantized"],
                                  weights["nearest"][f"{bias}_quantized"])


def test_auto_keeps_gptq_rounding_only_where_it_scores_better(monkeypatch):
    """Under method auto the weights are rounded on every other search batch and scored
    against nearest rounding on the others: GPTQ's (4-bit weights on the small conv net) are
    kept; a rounding that scores worse (every weight a step off nearest, put in GPTQ's place)
    is undone, and the graph is then the one nearest rounding gives, biases corrected for its
    error."""
    rng = np.random.default_rng(4)
    model = conv_net(rng)
    feeds = [{"x": images(rng, 16)} for _ in range(4)]
    inserted = insert(model, weights={"dtype": "int4", "reduce_range": False})
    options = dict(method="auto", bias_correction=True)
    result, table = calibrate(inserted, feeds, weight_rounding="gptq", **options)
    assert any(n.startswith("weight rounding: GPTQ rounded 3 weights on 2 search batches")
               for n in result.notes), result.notes
    assert any(n.startswith("weight rounding kept:") and "on the 2 search batches it was not "
               "fitted to" in n for n in result.notes), result.notes
    assert table.get("w1").method == "weight+gptq"

    def step_off(rows, hessian, scale, zero_point, lo, hi):
        q = np.round(rows / scale[..., None] + zero_point[..., None]) + 1
        return (np.clip(q, lo[..., None], hi[..., None]) - zero_point[..., None]) * \
            scale[..., None]

    monkeypatch.setattr(graphq.rounding, "gptq", step_off)
    worse, worse_table = calibrate(inserted, feeds, weight_rounding="gptq", **options)
    assert any(n.startswith("weight rounding undone:") for n in worse.notes), worse.notes
    nearest, nearest_table = calibrate(inserted, feeds, **options)
    assert worse_table.get("w1").method == nearest_table.get("w1").method == "weight"
    got, want = _initializers(worse.model), _initializers(nearest.model)
    for name in ("w1", "w2", "wg", "b1_quantized", "b2_quantized", "bg_quantized"):
        np.testing.assert_array_equal(got[name], want[name])


def deconv_net(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv (stride 2) -> Relu -> ConvTranspose (stride 2, bias) -> Relu ->
    ConvTranspose (2 groups, padded): a segmentation head's upsampling."""
    f = lambda *s: (rng.normal(size=s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["t"], name="up",
                         strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["u"], name="relu2"),
        helper.make_node("ConvTranspose", ["u", "wg"], ["y"], name="grouped", group=2,
                         pads=[1, 1, 1, 1]),
    ]
    return onnx.shape_inference.infer_shapes(make_model(
        nodes, [tensor("x", [None, 3, 8, 8])], [tensor("y", None)],
        {"w1": f(16, 3, 3, 3), "b1": f(16), "wt": f(16, 12, 2, 2), "bt": f(12),
         "wg": f(12, 4, 3, 3)}))


def test_gptq_rounds_conv_transpose_weights():
    """A ConvTranspose's weight is rounded as the Conv it equals (per output channel of a
    group, axis 1): on its grid, and the held-out output loses less than with nearest
    rounding at 4 bits (measured 14.8 -> 30.8 dB; 14.7 with only the Conv rounded),
    activations alike (minmax)."""
    rng = np.random.default_rng(5)
    model = deconv_net(rng)
    feeds = [{"x": images(rng, 16)} for _ in range(4)]
    held = [{"x": images(rng, 16)} for _ in range(4)]
    inserted = insert(model, weights={"dtype": "int4", "reduce_range": False})
    sqnr, weights = {}, {}
    for rounding in ("nearest", "gptq"):
        result, table = calibrate(inserted, feeds, method="minmax", weight_rounding=rounding)
        ref = np.concatenate([run(model, f)[0] for f in held])
        got = np.concatenate([run(result.model, f)[0] for f in held])
        sqnr[rounding] = 10 * np.log10(np.sum(ref ** 2) / np.sum((got - ref) ** 2))
        weights[rounding] = _initializers(result.model)
    assert any(n.startswith("weight rounding: GPTQ rounded 3 weights") for n in result.notes)
    assert sqnr["gptq"] > sqnr["nearest"] + 8.0, sqnr
    for name in ("wt", "wg"):
        entry = table.get(name)
        assert entry.method == "weight+gptq" and entry.axis == 1
        w, w0 = weights["gptq"][name], weights["nearest"][name]
        s = np.asarray(entry.scale).reshape(1, -1, 1, 1)
        np.testing.assert_allclose(w / s, np.round(w / s), atol=1e-4)
        assert np.abs(np.round(w / s)).max() <= 8
        assert not np.array_equal(np.round(w / s), np.round(w0 / s)), name
