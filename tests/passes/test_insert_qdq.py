"""insert-qdq: what is quantized, how, and why not, on graphs built here.

Structure is asserted through the quant table (``QuantTable.of``) and the Q/DQ nodes of the
graph; every result passes onnx.checker (full check) and loads in onnxruntime. Weight
quantization is checked numerically: with activations kept float by overrides, the graph must
equal the float graph whose weights were fake-quantized here in numpy (symmetric int8,
``scale = max|w| / 127`` per output channel, saturated to [-128, 127]; int4 / uint4:
``scale = max|w| / 7``, saturated to [-8, 7]), within 1e-5 of the output's largest magnitude.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphq import cli, latency, runtime
from graphq import graph as G
from graphq.data import DataSource
from graphq.errors import ConfigError, ModelError, PassError
from graphq.passes.calibrate import Calibrate
from graphq.passes.emit import deploy_graph
from graphq.passes.insert_qdq import InsertQDQ
from graphq.quant import QuantTable
from graphq.registry import PassContext
from tests.helpers import assert_close, make_model, op_counts, residual_net, run, tensor

RTOL = 1e-5


def build(nodes, inputs, outputs, inits=(), opset: int = 13, infer: bool = True):
    model = make_model(nodes, inputs, outputs, inits, opset=opset)
    return onnx.shape_inference.infer_shapes(model) if infer else model


def insert(model: onnx.ModelProto, **options):
    """Run the pass on a copy; check the result; return (result, table)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = InsertQDQ(**options).run(copy, PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    table = QuantTable.of(result.model)
    assert table is not None
    for entry in table.entries.values():
        assert entry.reason, f"no reason for '{entry.tensor}'"
    check_pairs(result.model, table)
    return result, table


def pairs(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Float tensor -> (QuantizeLinear, DequantizeLinear) reading it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out = {}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        (dq,) = readers[q.output[0]]
        assert dq.op_type == "DequantizeLinear"
        out[q.input[0]] = (q, dq)
    return out


def check_pairs(model: onnx.ModelProto, table: QuantTable) -> None:
    """One Q/DQ pair per quantized entry, none for the others; only Q reads a quantized one."""
    found = pairs(model)
    assert set(found) == {e.tensor for e in table.quantized()}
    for name in found:
        readers = [n.op_type for n in model.graph.node if name in n.input]
        assert readers == ["QuantizeLinear"], f"'{name}' is read by {readers}"


def quantized(table: QuantTable, role: str | None = None) -> set[str]:
    return {e.tensor for e in table.quantized(role)}


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def assert_calibrated_close(model: onnx.ModelProto, placed: onnx.ModelProto,
                            feeds: list[dict[str, np.ndarray]]) -> None:
    """``placed`` calibrated (minmax on the data it is judged on) passes the checker and keeps
    the float ``model``'s first output above 30 dB SQNR."""
    calibrated = Calibrate(method="minmax").run(placed, PassContext(data=DataSource(feeds))).model
    onnx.checker.check_model(calibrated, full_check=True)
    ref = np.concatenate([run(model, f)[0] for f in feeds])
    got = np.concatenate([run(calibrated, f)[0] for f in feeds])
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > 30.0


def conv_net(rng: np.random.Generator, infer: bool = True) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm."""
    model = residual_net(rng)
    return onnx.shape_inference.infer_shapes(model) if infer else model


def mlp(rng: np.random.Generator, names=("mm1", "mm2")) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul -> y."""
    inits = {"W1": rng.normal(0, 0.3, (8, 6)).astype(np.float32),
             "W2": rng.normal(0, 0.3, (6, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name=names[0]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name=names[1])]
    return build(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])], inits)


# ---- the conv net: what is quantized and where --------------------------------------------------
def test_conv_net_structure():
    model = conv_net(np.random.default_rng(0))
    result, table = insert(model, weights={"reduce_range": False})
    assert result.changed
    assert quantized(table, "activation") == {"x", "r1", "c2", "a", "p", "f"}
    assert quantized(table, "weight") == {"w1", "w2", "wg"}
    assert result.counts == {"activations": 6, "weights": 3, "float": 1}
    assert op_counts(result.model) == {
        "QuantizeLinear": 9, "DequantizeLinear": 9, "Conv": 2, "Relu": 1, "Add": 1,
        "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    # activations wait for calibrate; weights are final
    for entry in table.quantized("activation"):
        assert entry.dtype == "uint8" and not entry.symmetric and entry.scale is None
    for entry in table.quantized("weight"):
        assert entry.dtype == "int8" and entry.symmetric and entry.method == "weight"
        assert entry.scale is not None and all(s > 0 for s in entry.scale)


def test_relu_after_conv_quantizes_the_relu_output_not_the_conv_output():
    _, table = insert(conv_net(np.random.default_rng(1)))
    assert "c1" not in table.entries
    assert table.get("r1").quantized
    assert "Relu" in table.get("r1").reason and "conv1" in table.get("r1").reason


def test_residual_add_is_quantized_when_both_inputs_are():
    _, table = insert(conv_net(np.random.default_rng(2)))
    assert table.get("c2").quantized and table.get("r1").quantized
    assert table.get("a").quantized and "Add 'add'" in table.get("a").reason


def test_pass_through_shares_the_source_scale():
    _, table = insert(conv_net(np.random.default_rng(3)))
    assert table.get("f").method == "shared:p"
    assert table.get("p").method == ""  # its own scale, set by calibrate


def test_transpose_reshape_chain_shares_scales_and_skips_the_shape():
    rng = np.random.default_rng(4)
    inits = {"W1": rng.normal(0, 0.3, (8, 8)).astype(np.float32),
             "W2": rng.normal(0, 0.3, (32, 5)).astype(np.float32),
             "shape": np.array([-1, 32], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Transpose", ["h"], ["ht"], name="tr", perm=[0, 2, 1]),
             helper.make_node("Reshape", ["ht", "shape"], ["hr"], name="rs"),
             helper.make_node("MatMul", ["hr", "W2"], ["y"], name="mm2")]
    model = build(nodes, [tensor("x", ["N", 4, 8])], [tensor("y", ["N", 5])], inits)
    _, table = insert(model)
    assert table.get("ht").method == "shared:h"
    assert table.get("hr").method == "shared:ht"
    assert "shape" not in table.entries


def test_concat_of_quantized_inputs_has_its_own_scale():
    rng = np.random.default_rng(5)
    inits = {"W1": rng.normal(0, 0.3, (8, 4)).astype(np.float32),
             "W2": rng.normal(0, 0.3, (8, 4)).astype(np.float32),
             "W3": rng.normal(0, 0.3, (8, 3)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "W2"], ["b"], name="mm2"),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("MatMul", ["cat", "W3"], ["y"], name="mm3")]
    model = build(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 3])], inits)
    _, table = insert(model)
    assert {"a", "b", "cat"} <= quantized(table, "activation")
    assert not table.get("cat").method.startswith("shared:")


@pytest.mark.parametrize("mask_source", ["graph input", "through Neg"])
def test_add_with_a_float_mask_is_not_quantized(mask_source):
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["s"], name="scores")]
    mask = "mask"
    if mask_source == "through Neg":
        nodes.append(helper.make_node("Neg", ["mask"], ["mask_neg"], name="neg"))
        mask = "mask_neg"
    nodes += [helper.make_node("Add", ["s", mask], ["am"], name="add_mask"),
              helper.make_node("Softmax", ["am"], ["y"], name="softmax", axis=-1)]
    model = build(nodes, [tensor("x", ["N", 4, 16]), tensor("mask", ["N", 4, 8])],
                  [tensor("y", ["N", 4, 8])], {"W": rng.normal(0, 0.3, (16, 8)).astype(np.float32)})
    result, table = insert(model)
    assert table.get("s").quantized  # the scores are a MatMul output
    assert mask not in table.entries and "mask" not in table.entries
    assert "am" not in table.entries  # the Add keeps its float output
    add = next(n for n in result.model.graph.node if n.name == "add_mask")
    assert add.input[1] == mask  # the mask is read as it is, no DequantizeLinear


# ---- weights: per channel on the right axis -----------------------------------------------------
# (reduce_range = false throughout, so that the result does not depend on this CPU's VNNI)
WEIGHT_CASES = {
    # op, attrs, input shape, weight shape, output channel axis of the weight
    "Conv": ("Conv", {}, [2, 4, 5, 5], (6, 4, 3, 3), 0),
    "Conv-groups": ("Conv", {"group": 2}, [2, 4, 5, 5], (6, 2, 3, 3), 0),
    "ConvTranspose": ("ConvTranspose", {}, [2, 4, 5, 5], (4, 6, 3, 3), 1),
    "Gemm-transB0": ("Gemm", {"transB": 0}, [3, 5], (5, 7), 1),
    "Gemm-transB1": ("Gemm", {"transB": 1}, [3, 5], (7, 5), 0),
    "MatMul": ("MatMul", {}, [3, 5], (5, 7), 1),
    "MatMul-3d-input": ("MatMul", {}, [2, 3, 5], (5, 7), 1),
    "MatMul-batched-weight": ("MatMul", {}, [2, 3, 5], (2, 5, 7), 2),
}


def single_op(case: str, rng: np.random.Generator):
    op, attrs, x_shape, w_shape, axis = WEIGHT_CASES[case]
    # channels of very different magnitudes: a per-tensor scale would not reproduce them
    gain = np.exp(rng.uniform(-3, 1, w_shape[axis]))
    shape = [1] * len(w_shape)
    shape[axis] = -1
    w = (rng.normal(0, 1, w_shape) * gain.reshape(shape)).astype(np.float32)
    model = build([helper.make_node(op, ["x", "w"], ["y"], name="op", **attrs)],
                  [tensor("x", x_shape)], [tensor("y", None)], {"w": w})
    x = rng.normal(0, 1, x_shape).astype(np.float32)
    return model, w, x, axis


def fake_quant_weight(w: np.ndarray, axis: int | None, bits: int = 8) -> np.ndarray:
    """Symmetric fake quantization, written out here: scale = max|w| / 127 (the largest weight
    lands on 127), integers saturated to [-128, 127] as QuantizeLinear does; with ``bits=4``
    scale = max|w| / 7 and [-8, 7] (uint4 with zero point 8 makes the same grid)."""
    top = 2 ** (bits - 1) - 1
    if axis is None:
        scale = np.float32(np.abs(w).max() / top)
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=others, keepdims=True) / top).astype(np.float32)
    return (np.clip(np.rint(w / scale), -top - 1, top) * scale).astype(np.float32)


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weight_is_quantized_per_channel_on_its_output_axis(case):
    rng = np.random.default_rng(len(case))
    model, w, x, axis = single_op(case, rng)
    result, table = insert(model, weights={"reduce_range": False},
                           overrides={"x": {"quantize": False}})
    entry = table.get("w")
    assert entry.quantized and entry.role == "weight" and entry.axis == axis
    assert len(entry.scale) == w.shape[axis] and entry.zero_point == [0] * w.shape[axis]
    q, dq = pairs(result.model)["w"]
    for node in (q, dq):
        assert helper.get_attribute_value(
            next(a for a in node.attribute if a.name == "axis")) == axis
    assert initializer(result.model, q.input[1]).shape == (w.shape[axis],)
    ref_model = onnx.ModelProto()
    ref_model.CopyFrom(model)
    ref_model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(fake_quant_weight(w, axis), "w"))
    assert_close(run(ref_model, {"x": x}), run(result.model, {"x": x}), RTOL)


def test_per_channel_false_gives_one_scale_per_weight():
    rng = np.random.default_rng(7)
    model = conv_net(rng)
    result, table = insert(model, weights={"per_channel": False, "reduce_range": False})
    for entry in table.quantized("weight"):
        assert entry.axis is None and len(entry.scale) == 1 and len(entry.zero_point) == 1
    found = pairs(result.model)
    for name in ("w1", "w2", "wg"):
        q, dq = found[name]
        assert not any(a.name == "axis" for a in q.attribute)
        assert initializer(result.model, q.input[1]).ndim == 0
    model, w, x, _ = single_op("Conv", rng)
    result, _ = insert(model, weights={"per_channel": False, "reduce_range": False},
                       overrides={"x": {"quantize": False}})
    ref_model = onnx.ModelProto()
    ref_model.CopyFrom(model)
    ref_model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(fake_quant_weight(w, None), "w"))
    assert_close(run(ref_model, {"x": x}), run(result.model, {"x": x}), RTOL)


@pytest.mark.parametrize("reduce_range", [True, False])
def test_reduce_range_limits_int8_weights_to_7_bits(reduce_range):
    """The integers QuantizeLinear makes of the weight, as onnxruntime computes them:
    [-64, 63] with reduce_range (kernels/quant.py: "int8 -> [-64, 63]"), the full int8 range
    without. QuantizeLinear saturates only at int8's own limits, so the scale alone must keep
    the largest weight inside 63."""
    rng = np.random.default_rng(8)
    model, w, x, _ = single_op("Gemm-transB1", rng)
    result, table = insert(model, weights={"reduce_range": reduce_range},
                           overrides={"x": {"quantize": False}})
    q, _ = pairs(result.model)["w"]
    probe = onnx.ModelProto()
    probe.CopyFrom(result.model)
    probe.graph.output.append(tensor(q.output[0], None, TensorProto.INT8))
    ints = run(probe, {"x": x})[1]
    assert ints.dtype == np.int8 and ints.shape == w.shape
    if reduce_range:
        assert ints.min() >= -64 and ints.max() <= 63, (
            f"7-bit weights span [{ints.min()}, {ints.max()}], not [-64, 63]")
        assert np.abs(ints.astype(int)).max() >= 63
    else:
        assert np.abs(ints.astype(int)).max() >= 127
    # every channel uses its range: its largest |q| is the top of the scale
    top = np.abs(ints.astype(int)).max(axis=1)
    assert np.all(top >= (63 if reduce_range else 127))


# ---- what stays float ---------------------------------------------------------------------------
def test_graph_outputs_keep_their_names_and_stay_float():
    rng = np.random.default_rng(9)
    model = conv_net(rng)
    # r1 is also a graph output, read by conv2 and the Add as well
    model.graph.output.append(tensor("r1", ["N", 8, 8, 8]))
    result, table = insert(model)
    assert [o.name for o in result.model.graph.output] == ["y", "r1"]
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers["y"] == "Gemm" and producers["r1"] == "Relu"
    for name in ("y", "r1"):
        assert not table.get(name).quantized and "graph output" in table.get(name).reason
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    outs = run(result.model, {"x": x})
    assert [o.dtype for o in outs] == [np.float32, np.float32]


@pytest.mark.parametrize("second_reader", [False, True])
def test_logits_reshaped_into_a_graph_output_stay_float(second_reader):
    """A classifier's logits that reach the graph output only through Reshape/Transpose (a
    CTC recognizer's ``[T, 1, classes]``) keep their float value, as a graph output does: an
    argmax reads them. Read by anything else on the way, they are quantized as before."""
    rng = np.random.default_rng(44)
    inits = {"W": rng.normal(0, 0.3, (16, 12)).astype(np.float32),
             "b": rng.normal(0, 0.1, (12,)).astype(np.float32),
             "shape": np.array([-1, 1, 12], np.int64)}
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="classes"),
             helper.make_node("Reshape", ["logits", "shape"], ["r"], name="to_steps"),
             helper.make_node("Transpose", ["r"], ["y"], name="swap", perm=[1, 0, 2])]
    outputs = [tensor("y", [1, "T", 12])]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["r"], ["z"], name="other"))
        outputs.append(tensor("z", ["T", 1, 12]))
    model = build(nodes, [tensor("x", ["T", 16])], outputs, inits)
    result, table = insert(model)
    assert {"x", "W"} <= quantized(table)
    if second_reader:
        assert "logits" in quantized(table)
    else:
        entry = table.get("logits")
        assert not entry.quantized and "logits" not in pairs(result.model)
        assert entry.reason == ("becomes graph output 'y' through Reshape 'to_steps', "
                                "Transpose 'swap' only: keeps its float value")
        assert not {"r", "y"} & quantized(table)
    feeds = [{"x": rng.normal(0, 1, (5, 16)).astype(np.float32)} for _ in range(3)]
    assert_calibrated_close(model, result.model, feeds)


@pytest.mark.parametrize("squash", ["Tanh", "Sigmoid"])
def test_a_conv_output_squashed_into_a_graph_output_stays_float(squash):
    """A vocoder's last Conv -> Tanh -> waveform (or a mask head's Conv -> Sigmoid): no
    integer op reads the Conv's output, and quantizing it only rounds the output (8 bits:
    a noise floor of -51.5 dBFS in a vocoder's pauses, -82 dBFS float); it keeps its float
    value like logits reshaped into an output, its input and weights still quantized."""
    rng = np.random.default_rng(45)
    inits = {"W1": rng.normal(0, 0.3, (8, 4, 3)).astype(np.float32),
             "W2": rng.normal(0, 0.3, (1, 8, 3)).astype(np.float32),
             "b2": rng.normal(0, 0.1, (1,)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="body", pads=[1, 1]),
             helper.make_node("LeakyRelu", ["h"], ["a"], name="act", alpha=0.1),
             helper.make_node("Conv", ["a", "W2", "b2"], ["post"], name="conv_post",
                              pads=[1, 1]),
             helper.make_node(squash, ["post"], ["audio"], name="squash")]
    model = build(nodes, [tensor("x", ["N", 4, 32])], [tensor("audio", ["N", 1, 32])], inits)
    result, table = insert(model)
    entry = table.get("post")
    assert not entry.quantized and "post" not in pairs(result.model)
    assert entry.reason == (f"becomes graph output 'audio' through {squash} 'squash' only: "
                            "keeps its float value")
    assert {"x", "W1", "a", "W2"} <= quantized(table)  # conv_post's inputs stay integer
    feeds = [{"x": rng.normal(0, 1, (2, 4, 32)).astype(np.float32)} for _ in range(3)]
    assert_calibrated_close(model, result.model, feeds)


def test_integer_tensors_are_never_quantized():
    rng = np.random.default_rng(10)
    inits = {"E": rng.normal(0, 1, (20, 8)).astype(np.float32),
             "W": rng.normal(0, 0.3, (8, 4)).astype(np.float32),
             "W2": rng.normal(0, 0.3, (24, 3)).astype(np.float32),
             "shape": np.array([-1, 24], np.int64),
             "Wi": rng.integers(-3, 3, (5, 2)).astype(np.int32)}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["g"], name="embed"),
             helper.make_node("MatMul", ["g", "W"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["hr"], name="rs"),
             helper.make_node("MatMul", ["hr", "W2"], ["y"], name="mm2"),
             helper.make_node("Shape", ["g"], ["shp"], name="shape_of"),
             helper.make_node("Concat", ["shp", "shp"], ["shp2"], name="cat_int", axis=0),
             helper.make_node("MatMul", ["k", "Wi"], ["yi"], name="mm_int")]
    model = build(nodes, [tensor("ids", ["N", 6], TensorProto.INT64),
                          tensor("k", ["N", 5], TensorProto.INT32)],
                  [tensor("y", ["N", 3]), tensor("shp2", [6], TensorProto.INT64),
                   tensor("yi", ["N", 2], TensorProto.INT32)], inits)
    result, table = insert(model)
    types = elem_types(model)
    for entry in table.entries.values():
        assert types[entry.tensor] == TensorProto.FLOAT, entry.tensor
    assert {"g", "h", "hr"} <= quantized(table, "activation")
    for name in ("ids", "shape", "shp", "shp2", "k", "Wi", "yi"):
        assert name not in table.entries
    assert any("mm_int" in note and "not float" in note for note in result.notes)
    feeds = {"ids": rng.integers(0, 20, (3, 6)).astype(np.int64),
             "k": rng.integers(-3, 3, (3, 5)).astype(np.int32)}
    outs = run(result.model, feeds)
    assert np.array_equal(outs[2], run(model, feeds)[2])  # the integer MatMul is untouched


def test_types_are_found_without_shape_inference():
    """A graph straight from an exporter may carry no value_info: the intermediate tensors'
    types are then unknown to the pass, but they are float all the same."""
    with_types = conv_net(np.random.default_rng(11))
    without = conv_net(np.random.default_rng(11), infer=False)
    assert not without.graph.value_info
    _, expected = insert(with_types)
    _, table = insert(without)
    assert quantized(table) == quantized(expected)


# ---- selection options --------------------------------------------------------------------------
def test_exclude_by_node_name():
    result, table = insert(mlp(np.random.default_rng(12), ("enc/mm", "head/mm")),
                           exclude=["^head/"])
    assert table.get("W1").quantized and "W2" not in table.entries
    assert any("head/mm" in n and "excluded by name" in n for n in result.notes)


def test_include_by_node_name():
    _, table = insert(mlp(np.random.default_rng(13), ("enc/mm", "head/mm")), include=["^enc/"])
    assert table.get("W1").quantized and "W2" not in table.entries


def test_exclude_ops():
    _, table = insert(conv_net(np.random.default_rng(14)), exclude_ops=["Gemm"])
    assert "wg" not in table.entries
    assert {"w1", "w2"} == quantized(table, "weight")


def test_ops_option_limits_the_op_types():
    _, table = insert(conv_net(np.random.default_rng(15)), ops=["Conv"])
    assert quantized(table, "weight") == {"w1", "w2"}
    assert "a" not in table.entries and "p" not in table.entries  # Add, GAP not selected


def test_override_keeps_an_activation_float():
    result, table = insert(conv_net(np.random.default_rng(16)),
                           overrides={"r1": {"quantize": False}})
    entry = table.get("r1")
    assert not entry.quantized and "override" in entry.reason
    assert "r1" not in pairs(result.model)
    # the residual Add reads a float input now, so it stays float too
    assert "a" not in table.entries or not table.get("a").quantized


def test_override_keeps_a_weight_float():
    result, table = insert(conv_net(np.random.default_rng(17)),
                           overrides={"w2": {"quantize": False}})
    assert not table.get("w2").quantized and "override" in table.get("w2").reason
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"


def test_override_dtype_of_one_activation():
    result, table = insert(conv_net(np.random.default_rng(18)),
                           overrides={"c2": {"dtype": "int8", "symmetric": True}})
    assert table.get("c2").dtype == "int8" and table.get("c2").symmetric
    q, _ = pairs(result.model)["c2"]
    assert initializer(result.model, q.input[2]).dtype == np.int8
    assert table.get("a").dtype == "uint8"


def test_override_of_a_tensor_the_graph_does_not_have_is_an_error():
    """A misspelt tensor name must not be ignored silently (DESIGN: options are typed,
    a typo is an error)."""
    with pytest.raises((PassError, ConfigError), match="r11"):
        insert(conv_net(np.random.default_rng(19)), overrides={"r11": {"quantize": False}})


def test_exclude_ops_with_an_unknown_op_type_is_an_error():
    with pytest.raises(ConfigError, match="Matmul"):
        InsertQDQ(exclude_ops=["Matmul"])


def test_bad_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="regex"):
        InsertQDQ(exclude=["(unclosed"])


# ---- types newer than the model's opset ---------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"activations": {"dtype": "int16"}},
    {"activations": {"dtype": "uint16"}},
    {"overrides": {"x": {"dtype": "int16"}}},
])
def test_wide_types_raise_the_opset_to_21(options):
    model = mlp(np.random.default_rng(20))
    assert model.opset_import[0].version == 13
    result, table = insert(model, **options)
    assert result.model.opset_import[0].version == 21 and result.model.ir_version == 10
    (note,) = [n for n in result.notes if "opset 13 -> 21" in n]
    assert "16 from opset 21 on" in note
    wide = [e for e in table.quantized("activation") if e.dtype.endswith("int16")]
    assert wide
    types = zero_point_types(result.model)
    assert all(types[e.tensor] in (TensorProto.INT16, TensorProto.UINT16) for e in wide)


# ---- 4-bit weights (W4A8) -----------------------------------------------------------------------
FOUR_BIT = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4}


def zero_point_types(model: onnx.ModelProto) -> dict[str, int]:
    """Quantized tensor -> the ONNX type of its QuantizeLinear's zero point."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return {name: inits[q.input[2]] for name, (q, _) in pairs(model).items()}


@pytest.mark.parametrize("dtype", list(FOUR_BIT))
@pytest.mark.parametrize("opset", [13, 21])
def test_4_bit_weights_store_4_bit_zero_points_at_opset_21(dtype, opset):
    """QuantizeLinear takes INT4 / UINT4 zero points from opset 21: a model below it is
    converted (and says so), IR version 10 (what opset 21 needs, which onnxruntime reads);
    activations keep 8 bits."""
    model = conv_net(np.random.default_rng(25))
    if opset == 21:
        model.opset_import[0].version, model.ir_version = 21, 10
    result, table = insert(model, weights={"dtype": dtype})
    assert result.model.opset_import[0].version == 21 and result.model.ir_version == 10
    upgraded = [n for n in result.notes if "opset 13 -> 21" in n]
    assert len(upgraded) == (opset == 13)
    assert not any("reduce_range" in n for n in result.notes)  # for int8 weights only
    types = zero_point_types(result.model)
    for name in ("w1", "w2", "wg"):
        entry = table.get(name)
        assert entry.dtype == dtype and entry.symmetric and entry.axis is not None
        assert set(entry.zero_point) == {0 if dtype == "int4" else 8}
        assert types[name] == FOUR_BIT[dtype]
    for entry in table.quantized("activation"):
        assert entry.dtype == "uint8" and types[entry.tensor] == TensorProto.UINT8


@pytest.mark.parametrize("dtype", list(FOUR_BIT))
@pytest.mark.parametrize("case", ["Conv", "Conv-groups", "ConvTranspose", "Gemm-transB1",
                                  "MatMul", "MatMul-batched-weight"])
def test_4_bit_weight_matches_a_numpy_fake_quant(case, dtype):
    """With the activation kept float, the graph computes the op on the weight fake-quantized
    to 4 bits in numpy (scale = max|w| / 7 per output channel, [-8, 7]); weights.reduce_range
    is left at its default, which on a CPU without VNNI would cut int8 weights to 7 bits, and
    must leave 4-bit weights their 16 levels."""
    rng = np.random.default_rng(len(case) + 30)
    model, w, x, axis = single_op(case, rng)
    result, table = insert(model, weights={"dtype": dtype}, overrides={"x": {"quantize": False}})
    assert table.get("w").axis == axis and table.get("w").dtype == dtype
    ref_model = onnx.ModelProto()
    ref_model.CopyFrom(model)
    ref_model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(fake_quant_weight(w, axis, bits=4), "w"))
    assert_close(run(ref_model, {"x": x}), run(result.model, {"x": x}), RTOL)
    per_tensor, _ = insert(model, weights={"dtype": dtype, "per_channel": False},
                           overrides={"x": {"quantize": False}})
    ref_model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(fake_quant_weight(w, None, bits=4), "w"))
    assert_close(run(ref_model, {"x": x}), run(per_tensor.model, {"x": x}), RTOL)


def test_one_weight_overridden_to_int4():
    result, table = insert(conv_net(np.random.default_rng(26)),
                           overrides={"w2": {"dtype": "int4"}})
    assert result.model.opset_import[0].version == 21
    types = zero_point_types(result.model)
    assert table.get("w2").dtype == "int4" and types["w2"] == TensorProto.INT4
    assert types["w1"] == types["wg"] == TensorProto.INT8


def test_reduce_range_with_4_bit_weights_is_a_config_error():
    with pytest.raises(ConfigError, match="reduce_range applies to int8 weights only"):
        InsertQDQ(weights={"dtype": "int4", "reduce_range": True})


@pytest.mark.parametrize("dtype", list(FOUR_BIT))
def test_4_bit_activations_are_refused_with_the_reason(dtype):
    """onnxruntime 1.31 has no integer kernel reading 4-bit activations; measured: its 4-bit
    Q/DQ run as a float simulation, and beside int8 weights its QDQ fusion makes a
    QLinearConv that refuses int4 input (the session does not load)."""
    with pytest.raises(ConfigError, match="4-bit activations are not supported: onnxruntime "
                                          "has no integer kernel"):
        InsertQDQ(activations={"dtype": dtype})
    with pytest.raises(PassError, match=f"activation 'x' {dtype}: 4-bit activations"):
        insert(mlp(np.random.default_rng(21)), weights={"dtype": "int4"},
               overrides={"x": {"dtype": dtype}})


def test_int16_activations_at_opset_21():
    rng = np.random.default_rng(21)
    model = mlp(rng)
    model.opset_import[0].version = 21
    model.ir_version = 10
    result, table = insert(model, activations={"dtype": "int16"})
    q, _ = pairs(result.model)["x"]
    zero = next(t for t in result.model.graph.initializer if t.name == q.input[2])
    assert zero.data_type == TensorProto.INT16
    assert table.get("x").dtype == "int16"


def test_nothing_quantizable_is_a_config_error():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["y"])]
    model = build(nodes, [tensor("x", [2, 5])], [tensor("y", [2, 5])])
    with pytest.raises(ConfigError, match="nothing in this model can be quantized: it has no "
                       "Conv/ConvTranspose/Gemm/MatMul .* it holds Relu x1, Softmax x1\\); "
                       "there is nothing to convert"):
        insert(model)


def test_every_compute_op_excluded_is_a_config_error():
    with pytest.raises(ConfigError, match="nothing in this model can be quantized: no "
                       ".* was selected; check the ops, include and exclude options"):
        insert(mlp(np.random.default_rng(24)), exclude_ops=["MatMul"])


def test_compute_ops_only_inside_a_loop_body_are_named():
    """A recurrent net exported as a Loop (Keras LSTMs through tf2onnx): its MatMuls are all
    in the body, which is not quantized; the error says so instead of pointing at options."""
    rng = np.random.default_rng(25)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 4)).astype(np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["h_mm"], name="step_matmul"),
         helper.make_node("Tanh", ["h_mm"], ["h_out"], name="step_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="step_cond")],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL),
                 tensor("h_in", [1, 4])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("h_out", [1, 4])], [w])
    nodes = [helper.make_node("Loop", ["steps", "", "h0"], ["h"], name="rnn", body=body)]
    model = build(nodes, [tensor("h0", [1, 4])], [tensor("h", [1, 4])],
                  {"steps": np.array(3, np.int64)}, infer=False)
    with pytest.raises(ConfigError, match="inside the bodies of Loop 'rnn' \\(MatMul x1\\), "
                       "which graphq does not quantize"):
        insert(model)


def test_include_that_matches_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="include"):
        insert(mlp(np.random.default_rng(22)), include=["^no-such-node$"])


# ---- Resize: only its data input is an activation -----------------------------------------------
@pytest.mark.parametrize("roi", [False, True])
def test_resize_parameters_are_not_quantized(roi):
    """Resize's roi and scales are parameters (float constants), not activations: fake
    quantizing scales = [1, 1, 2, 2] turns 1.0 into 0.996 and changes the output shape."""
    rng = np.random.default_rng(23)
    inits = {"w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (2, 4, 1, 1)).astype(np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    if roi:
        inits["roi"] = np.zeros((0,), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "roi" if roi else "", "scales"], ["u"],
                              name="up", mode="nearest"),
             helper.make_node("Conv", ["u", "w2"], ["y"], name="conv2")]
    model = build(nodes, [tensor("x", [2, 3, 4, 4])], [tensor("y", [2, 2, 8, 8])], inits)
    result, table = insert(model)
    assert "scales" not in table.entries and "roi" not in table.entries
    assert table.get("u").quantized


@pytest.mark.parametrize("quantize_affine", [False, True])
def test_mul_add_by_a_constant_stay_float_unless_asked(quantize_affine):
    """Concat -> Mul(scale) -> Add(shift) -> Relu -> Conv (a BatchNormalization after a
    Concat, as DenseNet has): by default the affine steps are float between the quantized
    Concat and the Conv's quantized input; quantize_affine makes each output a quantization
    point of its own. The float graph's values are unchanged either way."""
    rng = np.random.default_rng(8)
    inits = {"W1": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
             "W2": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
             "s": rng.uniform(0.5, 2, (1, 8, 1, 1)).astype(np.float32),
             "t": rng.normal(0, 0.5, (1, 8, 1, 1)).astype(np.float32),
             "W3": rng.normal(0, 0.3, (5, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("Mul", ["cat", "s"], ["scaled"], name="bn_mul"),
             helper.make_node("Add", ["scaled", "t"], ["shifted"], name="bn_add"),
             helper.make_node("Relu", ["shifted"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W3"], ["y"], name="c3")]
    model = build(nodes, [tensor("x", [2, 3, 6, 6])], [tensor("y", [2, 5, 6, 6])], inits)
    result, table = insert(model, quantize_affine=quantize_affine)
    acts = quantized(table, "activation")
    assert {"x", "a", "b", "cat", "r"} <= acts
    if quantize_affine:
        assert "scaled" in acts and "shifted" not in table.entries  # the Relu's Q does it
        assert table.get("r").reason == "output of Add 'bn_add' -> Relu"
    else:
        assert not {"scaled", "shifted"} & set(table.entries)
        assert not {"scaled", "shifted"} & set(pairs(result.model))
        (note,) = [n for n in result.notes if "by a constant" in n]
        assert note.startswith("1 Mul/Add by a constant") and note.endswith("'bn_mul'")
        assert table.get("r").reason == "input of Conv 'c3'"  # the Add after it is float
    # calibrated (minmax on the data it is judged on), it stays close to the float graph
    feeds = [{"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    assert_calibrated_close(model, result.model, feeds)


def test_bias_add_after_a_matmul_stays_integer():
    """MatMul -> Add(bias) -> MatMul (a transformer's projection): the Add by a constant reads
    a compute op's output, so it stays a quantized op (onnxruntime's QLinearAdd) by default,
    while a Mul by a constant after a Concat does not."""
    rng = np.random.default_rng(9)
    inits = {"W1": rng.normal(0, 0.3, (8, 8)).astype(np.float32),
             "b1": rng.normal(0, 0.1, (8,)).astype(np.float32),
             "W2": rng.normal(0, 0.3, (8, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
             helper.make_node("MatMul", ["hb", "W2"], ["y"], name="mm2")]
    model = build(nodes, [tensor("x", ["N", 3, 8])], [tensor("y", ["N", 3, 4])], inits)
    result, table = insert(model)
    assert {"h", "hb"} <= quantized(table, "activation")
    assert table.get("hb").reason == "output of Add 'bias'"
    assert table.get("b1").method == "constant"
    assert not [n for n in result.notes if "by a constant" in n]


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_weight_clip_mse_clips_outliers_and_matches_a_numpy_fake_quant(dtype):
    """weights.clip = "mse": channel 0 holds the 144 quantiles of a Laplace distribution (a
    long-tailed weight), so at 4 bits its range shrinks (measured: to 0.82 of max|w|) and its
    largest weights saturate; every channel's squared weight error is at most minmax's; the
    graph computes the op on the weight fake-quantized in numpy with the recorded scales
    (symmetric, saturated to the type's ends), within 1e-5."""
    rng = np.random.default_rng(40)
    w = (rng.normal(0, 1, (6, 16, 3, 3)) * np.exp(rng.uniform(-3, 1, (6, 1, 1, 1))))
    p = (np.arange(144) + 0.5) / 144
    w[0] = rng.permutation(-0.01 * np.sign(p - 0.5) * np.log(1 - 2 * np.abs(p - 0.5))
                           ).reshape(16, 3, 3)
    w = w.astype(np.float32)
    model = build([helper.make_node("Conv", ["x", "w"], ["y"], name="op")],
                  [tensor("x", [2, 16, 5, 5])], [tensor("y", None)], {"w": w})
    x = rng.normal(0, 1, (2, 16, 5, 5)).astype(np.float32)
    options = {"dtype": dtype, "reduce_range": False}
    result, table = insert(model, weights={**options, "clip": "mse"},
                           overrides={"x": {"quantize": False}})
    _, plain = insert(model, weights=options, overrides={"x": {"quantize": False}})
    entry = table.get("w")
    assert entry.method == "weight-mse" and plain.get("w").method == "weight"
    scale, full = np.array(entry.scale), np.array(plain.get("w").scale)
    assert np.all(scale <= full * (1 + 1e-6))
    top = 7 if dtype == "int4" else 127
    shape = (-1, 1, 1, 1)

    def fq(s: np.ndarray) -> np.ndarray:
        s32 = s.astype(np.float32).reshape(shape)
        return (np.clip(np.rint(w / s32), -top - 1, top) * s32).astype(np.float32)

    clipped, minmax = fq(scale), fq(full)
    if dtype == "int4":
        assert scale[0] < 0.9 * full[0]
        # the largest saturated: more than the half step rounding could explain
        assert np.abs(clipped[0]).max() < np.abs(w[0]).max() - 0.5 * scale[0]
    err = ((clipped - w) ** 2).reshape(len(scale), -1).sum(1)
    assert np.all(err <= ((minmax - w) ** 2).reshape(len(scale), -1).sum(1) * (1 + 1e-6))
    ref_model = onnx.ModelProto()
    ref_model.CopyFrom(model)
    ref_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(clipped, "w"))
    assert_close(run(ref_model, {"x": x}), run(result.model, {"x": x}), RTOL)


def test_weight_clip_mse_with_reduce_range_is_refused_or_noted():
    """7-bit weights saturate at the 8-bit ends, so clipping them is no clip: asking for both is
    a config error; reduce_range by default (a CPU without VNNI) keeps minmax, with a note."""
    with pytest.raises(ConfigError, match="clip = 'mse' with reduce_range = true"):
        InsertQDQ(weights={"clip": "mse", "reduce_range": True})
    p = InsertQDQ(weights={"clip": "mse"})
    result = p.run(conv_net(np.random.default_rng(41)), PassContext())
    table = QuantTable.of(result.model)
    methods = {e.method for e in table.quantized("weight")}
    if runtime.cpu_saturates_u8s8():
        assert methods == {"weight"}
        assert any("clip = 'mse' not applied" in n for n in result.notes)
    else:
        assert methods == {"weight-mse"}


# ---- float_prefix_search: the longest float prefix that runs as fast as the fastest -------------
def conv_inputs(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Conv / Gemm name -> the op types that make its input and its weight (or 'const' /
    'input' for an initializer / a graph input)."""
    made = {o: n.op_type for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}

    def maker(name: str) -> str:
        return "const" if name in inits else made.get(name, "input")
    return {n.name: (maker(n.input[0]), maker(n.input[1])) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm")}


@pytest.mark.parametrize("timings_ms, kept", [
    ((1.0, 0.7, 0.9), 1),      # one float conv is fastest, two are slower
    ((1.0, 0.9, 0.6), 2),      # both
    ((1.0, 1.2, 1.3), 0),      # all quantized is fastest, any float prefix slower
    ((1.0, 1.04, 1.2), 1),     # one float conv within 5% of the fastest: kept float
    ((1.0, 0.97, 0.96), 2),    # all within 5%: the longest prefix
    ((1.0, 0.61, 0.66), 1),    # two float convs more than 5% slower than one
])
def test_float_prefix_search_keeps_the_longest_fast_prefix_float(monkeypatch, timings_ms, kept):
    """The search times the placements with the first 0, 1, 2 compute ops float (as deploy
    graphs: integer weights, int32 biases) and keeps the longest float prefix within 5% of
    the fastest; the float convs read float inputs and float weights, the reason is in the
    table, and calibrated the graph stays close to the float model."""
    from graphq.passes import insert_qdq

    monkeypatch.setattr(insert_qdq, "PREFIX_MAX_WEIGHT_SHARE", 1.0)  # conv1 + conv2: 90%
    rng = np.random.default_rng(40)
    model = conv_net(rng)
    timed: list[list[dict[str, tuple[str, str]]]] = []

    def medians(models, feed, providers, **_):
        assert feed["x"].shape == (2, 3, 8, 8) and providers == ["CPUExecutionProvider"]
        timed.append([conv_inputs(m) for m in models])
        return [t / 1e3 for t in timings_ms]

    monkeypatch.setattr(latency, "medians", medians)
    feeds = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    result = InsertQDQ(float_prefix_search=2, weights={"reduce_range": False}).run(
        model, PassContext(data=DataSource(feeds)))
    onnx.checker.check_model(result.model, full_check=True)
    table = QuantTable.of(result.model)
    check_pairs(result.model, table)
    # the timed candidates: deploy graphs (integer weights behind DequantizeLinear) with the
    # first k convs float: those read float inputs and float weights
    (candidates,) = timed
    dq = "DequantizeLinear"
    assert [c["conv1"] for c in candidates] == [(dq, dq), ("input", "const"), ("input", "const")]
    assert [c["conv2"] for c in candidates] == [(dq, dq), (dq, dq), ("Relu", "const")]
    assert all(c["fc"] == (dq, dq) for c in candidates)
    # the kept placement
    floats = ["conv1", "conv2"][:kept]
    for conv, weight in (("conv1", "w1"), ("conv2", "w2")):
        entry = table.get(weight)
        assert entry.quantized == (conv not in floats)
        if conv in floats:
            assert "float_prefix_search" in entry.reason and f"first {kept}" in entry.reason
    assert table.get("wg").quantized
    assert ("x" in quantized(table, "activation")) == (kept == 0)
    (note,) = [n for n in result.notes if n.startswith("float_prefix_search")]
    assert "0 float 1 ms" in note and "2 float" in note
    assert ("kept float" in note) == (kept > 0)
    if kept:
        assert f"({1 / timings_ms[kept]:.2f}x the speed of all quantized" in note
    else:
        assert "more than 5% slower than the fastest" in note
    assert_calibrated_close(model, result.model, feeds)


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its initializers moved into Constant nodes (as paddle2onnx writes
    weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@pytest.mark.parametrize("constants", [False, True])
@pytest.mark.parametrize("cut", [1, 0])
def test_float_prefix_search_times_no_prefix_holding_most_weights(monkeypatch, cut, constants):
    """A float prefix may hold at most PREFIX_MAX_WEIGHT_SHARE of the compute ops' weights
    (int8 is also for size: MTCNN pnet's deploy graph with its first 3 of 5 convs float,
    97% of its weights, was larger than the float model). With the cap between conv1's share
    and conv1 + conv2's, only the placements with 0 and 1 float convs are timed; below
    conv1's share nothing is timed and all stay quantized; the note says why either way.
    Weights held in Constant nodes count the same."""
    from graphq.passes import insert_qdq

    model = conv_net(np.random.default_rng(43))
    size = {t.name: t.dims[0] * int(np.prod(t.dims[1:])) for t in model.graph.initializer}
    if constants:
        model = as_constant_nodes(model)
    per_op = {n.name: sum(size.get(i, 0) for i in n.input) for n in model.graph.node
              if n.op_type in ("Conv", "Gemm")}
    total = sum(per_op.values())
    first, second = per_op["conv1"] / total, (per_op["conv1"] + per_op["conv2"]) / total
    assert first < second < 1
    monkeypatch.setattr(insert_qdq, "PREFIX_MAX_WEIGHT_SHARE",
                        (first + second) / 2 if cut else first / 2)
    timed = []

    def medians(models, feed, providers, **_):
        timed.append(len(models))
        return [1.0] * len(models)  # all alike: the longest timed prefix wins

    monkeypatch.setattr(latency, "medians", medians)
    result, table = insert(model, float_prefix_search=2)
    (note,) = [n for n in result.notes if n.startswith("float_prefix_search")]
    if cut:
        assert timed == [2]
        assert not table.get("w1").quantized and table.get("w2").quantized
        assert f"at most the first 1 timed: with 'conv2' too the float prefix would hold " \
               f"{second:.0%} of the compute ops' weights" in note, note
    else:
        assert timed == []
        assert {"w1", "w2", "wg"} <= quantized(table, "weight")
        assert f"'conv1' alone holds {first:.0%}" in note, note
    onnx.checker.check_model(result.model, full_check=True)


def test_float_prefix_search_times_in_onnxruntime_without_data():
    """Without data the search times sample inputs; whichever prefix wins, the note lists the
    latency of each candidate and the graph is valid."""
    model = conv_net(np.random.default_rng(41))
    result, table = insert(model, float_prefix_search=1)
    (note,) = [n for n in result.notes if n.startswith("float_prefix_search")]
    assert re.search(r"0 float [0-9.e-]+ ms, 1 float [0-9.e-]+ ms\)$", note), note
    assert table.get("w1").quantized == ("kept float" not in note)
    assert table.get("w2").quantized and table.get("wg").quantized


def test_longest_prefix_within_the_margin():
    assert latency.longest_within([1.0], 0.05) == 0
    assert latency.longest_within([1.0, 1.06], 0.05) == 0
    assert latency.longest_within([1.0, 1.04], 0.05) == 1
    assert latency.longest_within([1.0, 0.8, 0.79, 0.5], 0.05) == 3
    assert latency.longest_within([1.0, 0.80, 0.79, 0.9], 0.05) == 2
    assert latency.longest_within([0.5, 1.0, 0.52, 0.9], 0.05) == 2


def test_float_prefix_search_option_is_checked():
    with pytest.raises(ConfigError, match="'float_prefix_search' must be an integer >= 0"):
        InsertQDQ(float_prefix_search=-1)


@pytest.mark.parametrize("timings_ms, scores, kept", [
    ((1.0, 1.1, 1.2), (10.0, 20.0, 20.1), 1),  # conv1 float: +10 dB for 0.14 dB of slowdown
    ((1.0, 1.1, 1.2), (10.0, 20.0, 21.0), 2),  # conv2 too: +1 dB more for 0.12 dB more
    ((1.0, 1.1, 1.2), (10.0, 10.3, 10.6), 0),  # gains under 0.5 dB + the slowdown
    ((1.0, 1.1, 1.2), (10.0, 10.9, 9.0), 1),   # +0.9 dB for 0.14 dB of slowdown
    ((1.0, 1.1, 1.2), (31.0, 40.0, 45.0), 0),  # over 30 dB, more buys nothing
    ((1.0, 1.1, 2.1), (10.0, 20.0), 1),        # conv2 float runs 2.1x: not weighed
    # past 1.5x each 2x costs 24 dB more: 1.6x costs 0.68 + 2.23 dB, 1.9x 0.93 + 8.18 dB
    ((1.0, 1.1, 1.6), (10.0, 10.0, 13.5), 2),
    ((1.0, 1.1, 1.6), (10.0, 10.0, 13.0), 0),
    ((1.0, 1.1, 1.9), (10.0, 10.0, 19.0), 0),
    ((1.0, 1.1, 1.9), (10.0, 10.0, 20.0), 2),
])
def test_float_prefix_speed_db_keeps_a_slower_prefix_that_scores_better(monkeypatch, timings_ms,
                                                                       scores, kept):
    """With float_prefix_speed_db the prefixes slower than the speed pick (here none float,
    the fastest), up to 2x its latency, are scored with it, each calibrated alike on the
    data's first batches; the best by score (at most 30 dB) less float_prefix_speed_db per
    2x slower, and 24 dB more per 2x past 1.5x (a hard bound at 1.5x let timing noise flip
    a 20 dB choice), is kept float when it beats the pick by more than 0.5 dB. The choice
    is in the reason, the note and the pinned options."""
    from graphq.passes import calibrate, insert_qdq

    monkeypatch.setattr(insert_qdq, "PREFIX_MAX_WEIGHT_SHARE", 1.0)
    rng = np.random.default_rng(40)
    model = conv_net(rng)
    feeds = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    monkeypatch.setattr(latency, "medians", lambda *a, **k: [t / 1e3 for t in timings_ms])
    scored = []

    def placement_scores(reference, placements, given, ctx):
        scored.append((len(placements), len(given)))
        return list(scores)

    monkeypatch.setattr(calibrate, "placement_scores", placement_scores)
    result = InsertQDQ(float_prefix_search=2, float_prefix_speed_db=1.0).run(
        model, PassContext(data=DataSource(feeds)))
    assert scored == [(len(scores), 4)]  # the placements weighed, the first 4 batches
    onnx.checker.check_model(result.model, full_check=True)
    table = QuantTable.of(result.model)
    assert [table.get(w).quantized for w in ("w1", "w2")] == [kept < 1, kept < 2]
    (note,) = [n for n in result.notes if n.startswith("float_prefix_search")]
    assert f"with the first k float: 0 float {scores[0]:.1f} dB, 1 float" in note, note
    if kept:
        assert result.pinned == {"float_prefix_search": 0, "float_prefix": kept}
        assert f"a longer float prefix for fidelity: {scores[kept]:.1f} dB against " \
               f"{scores[0]:.1f} dB with 0 float, at {timings_ms[kept]:.2f}x the latency" \
               in note, note
        assert "for fidelity" in table.get("w1").reason
    else:
        assert result.pinned == {"float_prefix_search": 0}
        assert "no longer prefix within 2x its latency scores more than 0.5 dB + 1 dB " \
               "per 2x slower above it (24 dB more per 2x past 1.5x), scores over 30 dB " \
               "counting as 30" in note, note


def test_float_prefix_speed_db_scores_on_4_batches_or_16_samples(monkeypatch):
    """The placements are scored on the data's first 4 batches, or fewer once they hold 16
    samples (all their float outputs are held at once)."""
    from graphq.passes import calibrate, insert_qdq

    monkeypatch.setattr(insert_qdq, "PREFIX_MAX_WEIGHT_SHARE", 1.0)
    rng = np.random.default_rng(40)
    model = conv_net(rng)
    monkeypatch.setattr(latency, "medians", lambda *a, **k: [1e-3, 1.1e-3, 1.2e-3])
    given: list[list[dict[str, np.ndarray]]] = []
    monkeypatch.setattr(calibrate, "placement_scores",
                        lambda ref, placed, feeds, ctx: given.append(feeds) or [1.0] * 3)
    for batch, taken in ((2, 4), (8, 2), (20, 1)):
        given.clear()
        feeds = [{"x": rng.normal(0, 1, (batch, 3, 8, 8)).astype(np.float32)}
                 for _ in range(6)]
        InsertQDQ(float_prefix_search=2, float_prefix_speed_db=1.0).run(
            model, PassContext(data=DataSource(feeds)))
        assert [len(f) for f in given] == [taken]
        assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(given[0], feeds[:taken],
                                                                  strict=True))


def test_float_prefix_speed_db_scores_nothing_when_the_speed_pick_is_the_longest(monkeypatch):
    """Nothing to weigh where the speed pick is the longest prefix timed, or without the
    option: no placement is calibrated or scored."""
    from graphq.passes import calibrate, insert_qdq

    monkeypatch.setattr(insert_qdq, "PREFIX_MAX_WEIGHT_SHARE", 1.0)
    rng = np.random.default_rng(40)
    model = conv_net(rng)
    feeds = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}]
    monkeypatch.setattr(calibrate, "placement_scores", lambda *a: pytest.fail("scored"))
    for timings, rate, kept in (([1e-3, 0.9e-3, 0.8e-3], 1.0, 2),
                                ([1e-3, 1.2e-3, 1.3e-3], 0.0, 0)):
        monkeypatch.setattr(latency, "medians", lambda *a, t=timings, **k: t)
        result = InsertQDQ(float_prefix_search=2, float_prefix_speed_db=rate).run(
            model, PassContext(data=DataSource(feeds)))
        assert result.pinned.get("float_prefix", 0) == kept


def test_placement_scores_calibrates_the_placements_alike():
    """placement_scores: each placement of the timed prefixes calibrated alike (the first by
    calibrate, the others with its scales) and scored against the float model. An input
    whose first channel sits near 1000 (which conv1 does not read) leaves the other
    channels a step of about 4 under one 8-bit scale: with conv1 float, which reads the
    input, the outputs score far better; each score is that of the placement's own graph,
    run apart with the first one's scales."""
    from graphq import sensitivity
    from graphq.passes import calibrate

    rng = np.random.default_rng(44)
    model = conv_net(rng)
    (w1,) = [t for t in model.graph.initializer if t.name == "w1"]
    weight = numpy_helper.to_array(w1).copy()
    weight[:, 0] = 0.0
    w1.CopyFrom(numpy_helper.from_array(weight, "w1"))
    feeds = []
    for _ in range(3):
        x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
        x[:, 0] += 1000.0
        feeds.append({"x": x})
    placed = [InsertQDQ(float_prefix=k).run(model, PassContext()).model for k in (0, 1)]
    ctx = PassContext(data=DataSource(feeds))
    scores = calibrate.placement_scores(model, placed, feeds, ctx)
    assert all(np.isfinite(scores)) and scores[1] > scores[0] + 6, scores
    # the second placement's score is its graph with the first's calibrated scales
    first = Calibrate().run(placed[0], ctx).model
    scaled = calibrate._with_scales(QuantTable.of(placed[1]), QuantTable.of(first))
    second = calibrate._ScoringGraph(placed[1], G.import_graph(placed[1]), scaled).model(scaled)
    onnx.checker.check_model(second, full_check=True)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(second.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = [{"y": ref.run(None, f)[0]} for f in feeds]
    outs = [{"y": got.run(None, f)[0]} for f in feeds]
    assert sensitivity.worst_sqnr(expected, outs) == pytest.approx(scores[1], abs=1e-6)
    a, b = QuantTable.of(first), QuantTable.of(placed[1])
    for entry in b.quantized("activation"):
        assert a.get(entry.tensor).quantized


@pytest.mark.parametrize("timings_ms, kept", [((1.0, 0.7, 0.9), 1), ((1.0, 1.2, 1.3), 0)])
def test_a_timed_prefix_is_pinned_and_float_prefix_places_it_again(monkeypatch, timings_ms,
                                                                     kept):
    """The search's choice comes back as pinned options (float_prefix = k, the search off);
    a pass given them places the same Q/DQ pairs and the same table without timing."""
    from graphq.passes import insert_qdq

    monkeypatch.setattr(insert_qdq, "PREFIX_MAX_WEIGHT_SHARE", 1.0)
    model = conv_net(np.random.default_rng(40))
    monkeypatch.setattr(latency, "medians", lambda *a, **k: [t / 1e3 for t in timings_ms])
    searched = InsertQDQ(float_prefix_search=2).run(model, PassContext())
    expected = {"float_prefix_search": 0, **({"float_prefix": kept} if kept else {})}
    assert searched.pinned == expected
    monkeypatch.setattr(latency, "medians", lambda *a, **k: pytest.fail("timed a pinned prefix"))
    again = InsertQDQ(**{"float_prefix_search": 2, **searched.pinned}).run(model, PassContext())
    onnx.checker.check_model(again.model, full_check=True)
    assert again.pinned == {}
    assert [n.op_type for n in again.model.graph.node] == [
        n.op_type for n in searched.model.graph.node]
    a, b = QuantTable.of(searched.model), QuantTable.of(again.model)
    assert {t: e.quantized for t, e in a.entries.items()} == {
        t: e.quantized for t, e in b.entries.items()}
    if kept:
        assert f"float_prefix = {kept}" in b.get("w1").reason
        assert any(n == f"float_prefix = {kept}: 'conv1' kept float" for n in again.notes)


def test_float_prefix_keeps_the_first_compute_ops_float_untimed(monkeypatch):
    """float_prefix = 2 keeps conv1 and conv2 float (their weights and inputs) and runs no
    search even where float_prefix_search asks for one; more than the graph has keeps all
    but the last compute op float."""
    monkeypatch.setattr(latency, "medians", lambda *a, **k: pytest.fail("timed"))
    model = conv_net(np.random.default_rng(43))
    result, table = insert(model, float_prefix=2, float_prefix_search=3)
    onnx.checker.check_model(result.model, full_check=True)
    check_pairs(result.model, table)
    assert not {"w1", "w2"} & quantized(table, "weight") and "wg" in quantized(table, "weight")
    assert "float_prefix = 2" in table.get("w2").reason
    assert any(n.endswith("(float_prefix_search not run: float_prefix is given)")
               for n in result.notes)
    _, table = insert(model, float_prefix=9)
    assert quantized(table, "weight") == {"wg"}
    with pytest.raises(ConfigError, match="'float_prefix' must be an integer >= 0, got -1"):
        InsertQDQ(float_prefix=-1)


def test_float_prefix_search_skips_large_models(monkeypatch):
    from graphq.passes import insert_qdq
    monkeypatch.setattr(insert_qdq, "PREFIX_MAX_BYTES", 1024)
    monkeypatch.setattr(latency, "medians", lambda *a, **k: pytest.fail("timed a large model"))
    result, table = insert(conv_net(np.random.default_rng(42)), float_prefix_search=2)
    assert any(n.startswith("float_prefix_search skipped: the model is over") for n in result.notes)
    assert {"w1", "w2", "wg"} <= quantized(table, "weight")


def log_spectrum_net(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv (a filter bank) -> Pow 2 (power) -> Transpose -> Slice -> MatMul (mel
    projection) -> Clip -> Log -> y: a spectrogram front end (openwakeword's melspectrogram
    has this shape), whose power spans many decades."""
    inits = {"wf": rng.normal(0, 0.5, (8, 1, 16)).astype(np.float32),
             "mel": np.abs(rng.normal(0, 0.3, (6, 5))).astype(np.float32),
             "lo": np.array(1e-10, np.float32), "hi": np.array(1e10, np.float32),
             "two": np.array(2.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "wf"], ["f"], name="stft", strides=[8]),
             helper.make_node("Pow", ["f", "two"], ["pw"], name="power"),
             helper.make_node("Transpose", ["pw"], ["pt"], name="frames", perm=[0, 2, 1]),
             helper.make_node("Slice", ["pt", "s0", "s1", "s2"], ["ps"], name="bins"),
             helper.make_node("MatMul", ["ps", "mel"], ["m"], name="melmm"),
             helper.make_node("Clip", ["m", "lo", "hi"], ["mc"], name="floor"),
             helper.make_node("Log", ["mc"], ["y"], name="log")]
    inits.update({"s0": np.array([0], np.int64), "s1": np.array([6], np.int64),
                  "s2": np.array([2], np.int64)})
    return build(nodes, [tensor("x", ["N", 1, 64])], [tensor("y", None)], inits)


def test_a_compute_op_that_feeds_only_a_log_stays_float():
    """The mel projection before a Log stays float with its input (the power spectrum): one
    8-bit scale over values spanning decades zeroes the small ones, which the Log turns into
    errors as large as the output; the filter bank before it stays quantized."""
    rng = np.random.default_rng(43)
    model = log_spectrum_net(rng)
    result, table = insert(model)
    assert "mel" in table.entries and not table.get("mel").quantized
    assert "feeds only Log 'log'" in table.get("mel").reason
    assert not {"ps", "m", "mc"} & quantized(table)
    assert {"x", "f"} <= quantized(table, "activation") and table.get("wf").quantized
    assert any(n.startswith("MatMul 'melmm' kept float: its output feeds only Log") for n in
               result.notes)
    # the power of noise spans decades: the log spectrum stays close after calibration
    feeds = [{"x": (rng.normal(0, 1, (2, 1, 64)) * 10.0 ** rng.uniform(-0.5, 0, (2, 1, 1))
                    ).astype(np.float32)} for _ in range(3)]
    assert_calibrated_close(model, result.model, feeds)


def cqt_net(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> two filter-bank Convs (real, imaginary) -> magnitude (squares added, Sqrt) ->
    Concat with the magnitude of a strided octave -> Add eps -> Log -> Conv (the network
    after) -> y: a constant-Q front end (Basic Pitch's has this shape)."""
    inits = {"wr": rng.normal(0, 0.5, (6, 1, 16)).astype(np.float32),
             "wi": rng.normal(0, 0.5, (6, 1, 16)).astype(np.float32),
             "wo": rng.normal(0, 0.5, (6, 1, 16)).astype(np.float32),
             "wn": rng.normal(0, 0.3, (4, 12, 3)).astype(np.float32),
             "eps": np.array(1e-6, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "wr"], ["re"], name="cqt_re", strides=[4]),
             helper.make_node("Conv", ["x", "wi"], ["im"], name="cqt_im", strides=[4]),
             helper.make_node("Conv", ["x", "wo"], ["oc"], name="cqt_octave", strides=[4]),
             helper.make_node("Mul", ["re", "re"], ["re2"], name="re_sq"),
             helper.make_node("Mul", ["im", "im"], ["im2"], name="im_sq"),
             helper.make_node("Add", ["re2", "im2"], ["pw"], name="power"),
             helper.make_node("Sqrt", ["pw"], ["mag"], name="magnitude"),
             helper.make_node("Abs", ["oc"], ["omag"], name="octave_magnitude"),
             helper.make_node("Concat", ["mag", "omag"], ["bins"], name="octaves", axis=1),
             helper.make_node("Add", ["bins", "eps"], ["floored"], name="floor"),
             helper.make_node("Log", ["floored"], ["logmag"], name="log"),
             helper.make_node("Conv", ["logmag", "wn"], ["y"], name="net")]
    return build(nodes, [tensor("x", ["N", 1, 64])], [tensor("y", None)], inits)


def test_filter_banks_whose_magnitude_a_log_reads_stay_float():
    """The filter-bank Convs of a constant-Q front end reach the Log only through the
    magnitude (Mul, Add, Sqrt, Abs, Concat, Add eps): they stay float with their input; the
    Conv after the Log, a compute op of its own, is quantized. After calibration the log
    spectrum's network output stays close to float."""
    rng = np.random.default_rng(45)
    model = cqt_net(rng)
    result, table = insert(model)
    for name, weight in (("cqt_re", "wr"), ("cqt_im", "wi"), ("cqt_octave", "wo")):
        assert not table.get(weight).quantized
        assert "feeds only Log 'log' (through elementwise ops at most)" in \
            table.get(weight).reason
        assert any(n.startswith(f"Conv '{name}' kept float") for n in result.notes)
    assert "x" not in quantized(table)
    assert table.get("wn").quantized and "logmag" in quantized(table, "activation")
    feeds = [{"x": (rng.normal(0, 1, (2, 1, 64)) * 10.0 ** rng.uniform(-1, 0, (2, 1, 1))
                    ).astype(np.float32)} for _ in range(3)]
    assert_calibrated_close(model, result.model, feeds)


@pytest.mark.parametrize("op", ["QuantizeLinear", "ConvInteger", "QLinearConv"])
def test_a_quantized_model_is_refused_with_the_ops_it_has(tmp_path, op):
    """A model quantized already (here: a graph with a Q/DQ pair, ConvInteger or QLinearConv,
    as onnxruntime's quantizer writes them) gets a clear error naming what it has, exit 2,
    from insert-qdq's precheck before the passes before it run."""
    rng = np.random.default_rng(44)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    s, z = np.array(0.02, np.float32), np.array(128, np.uint8)
    wq = np.round(w / 0.01).astype(np.int8)
    inits = {"w": w, "s": s, "z": z, "wq": wq, "ws": np.array(0.01, np.float32),
             "wz": np.array(0, np.int8), "wzu": np.array(0, np.uint8)}
    if op == "QuantizeLinear":
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("Conv", ["xd", "w"], ["y"])]
        outputs = [tensor("y", None)]
    elif op == "ConvInteger":
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("ConvInteger", ["xq", "wq", "z", "wz"], ["y"])]
        outputs = [tensor("y", None, TensorProto.INT32)]
    else:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("QLinearConv", ["xq", "s", "z", "wq", "ws", "wz", "s",
                                                  "wzu"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "s", "wzu"], ["y"])]
        outputs = [tensor("y", None)]
    model = build(nodes, [tensor("x", ["N", 3, 8, 8])], outputs, inits)
    path = tmp_path / "q.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    with pytest.raises(ModelError, match=f"the model is quantized already \\(it has [^)]*{op}"):
        InsertQDQ().run(model, PassContext())
    # and before any pass of a pipeline runs (its precheck)
    with pytest.raises(ModelError, match="the model is quantized already"):
        InsertQDQ().precheck(model)
    # from the command line: exit 2, the input untouched, nothing written
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    assert cli.main(["-q", "run", "int8", str(path), "--data", str(tmp_path / "d.npz"),
                     "-o", str(out)]) == 2
    assert path.read_bytes() == before and not out.exists()


@pytest.mark.parametrize("act", ["silu", "leaky", "hardswish"])
def test_sigmoid_and_leaky_relu_between_convs_stay_integer(act, tmp_path):
    """Conv -> SiLU (x * Sigmoid(x)) or LeakyRelu -> Conv: the activation's output is
    quantized, so onnxruntime runs QLinearSigmoid + QLinearMul or QLinearLeakyRelu between
    the integer convs (no float island); calibrated, the graph stays close to float.
    x * HardSigmoid(x): HardSigmoid has no integer kernel and stays a float op between DQ and
    Q, but the Mul over the feature map becomes QLinearMul."""
    rng = np.random.default_rng(45)
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32)}
    middle = {"silu": [helper.make_node("Sigmoid", ["c1"], ["g"], name="sig"),
                       helper.make_node("Mul", ["c1", "g"], ["a"], name="silu")],
              "hardswish": [helper.make_node("HardSigmoid", ["c1"], ["g"], name="hsig",
                                             alpha=1 / 6),
                            helper.make_node("Mul", ["c1", "g"], ["a"], name="hswish")],
              "leaky": [helper.make_node("LeakyRelu", ["c1"], ["a"], name="leaky",
                                         alpha=0.1)]}[act]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             *middle,
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1] * 4)]
    model = build(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])], inits)
    result, table = insert(model, weights={"reduce_range": False})
    assert {"x", "c1", "a"} | ({"g"} if act != "leaky" else set()) <= quantized(table)
    feeds = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    calibrated = Calibrate(method="minmax").run(result.model, PassContext(
        data=DataSource(feeds))).model
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(calibrated.SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    ops = op_counts(onnx.load(options.optimized_model_filepath))
    want = {"silu": {"QLinearSigmoid", "QLinearMul"}, "leaky": {"QLinearLeakyRelu"},
            "hardswish": {"QLinearMul"}}[act]
    assert want <= set(ops) and not {"Sigmoid", "Mul", "LeakyRelu"} & set(ops), ops
    assert ops.get("HardSigmoid", 0) == (act == "hardswish"), ops
    assert_calibrated_close(model, result.model, feeds)



def hard_gate_net(op: str, rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv -> HardSwish, or x * HardSigmoid(x; 0.2, 0.5) (PP-LCNet's gate) -> Conv."""
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32)}
    middle = {"HardSwish": [helper.make_node("HardSwish", ["c1"], ["a"], name="hswish")],
              "HardSigmoid": [helper.make_node("HardSigmoid", ["c1"], ["g"], name="hsig",
                                               alpha=0.2, beta=0.5),
                              helper.make_node("Mul", ["c1", "g"], ["a"], name="gate")]}[op]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             *middle,
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1] * 4)]
    return build(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])], inits,
                 opset=14)


@pytest.mark.parametrize("op", ["HardSwish", "HardSigmoid"])
def test_hard_sigmoid_on_its_fixed_grid_is_an_integer_add_in_the_deploy_graph(op, tmp_path):
    """A quantized HardSwish becomes ``x * HardSigmoid(x; 1/6, 1/2)``; a quantized
    ``x * HardSigmoid(x)``'s gate takes the fixed grid of [0, 1] (scale 1/255, zero point 0),
    which calibrate leaves. The deploy graph writes the HardSigmoid as ``x + beta / alpha``
    (the constant through a DequantizeLinear) before a Q of scale 1/255 / alpha, whose
    saturation is the clip: onnxruntime fuses it into QLinearAdd, no float op is left
    between the convs, and the deploy graph computes the fake-quant graph's integers
    (outputs within 1e-5 of their range, graphs as written; measured: equal)."""
    rng = np.random.default_rng(47)
    model = hard_gate_net(op, rng)
    result, table = insert(model, weights={"reduce_range": False})
    gate = "a_gate" if op == "HardSwish" else "g"
    entry = table.get(gate)
    assert entry.quantized and entry.method == "fixed" and entry.zero_point == [0]
    assert entry.scale == [pytest.approx(1 / 255)] and "fixed grid" in entry.reason
    (hsig,) = [n for n in result.model.graph.node if n.op_type == "HardSigmoid"]
    alpha, beta = (1 / 6, 0.5) if op == "HardSwish" else (0.2, 0.5)
    assert {a.name: a.f for a in hsig.attribute} == {"alpha": pytest.approx(alpha),
                                                     "beta": beta}
    assert "HardSwish" not in op_counts(result.model)
    feeds = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    calibrated = Calibrate(method="minmax").run(result.model, PassContext(
        data=DataSource(feeds))).model
    assert QuantTable.of(calibrated).get(gate).scale == entry.scale  # calibrate leaves it
    assert_calibrated_close(model, result.model, feeds)
    counts: dict[str, int] = {}
    deploy, _, _ = deploy_graph(calibrated, counts=counts)
    onnx.checker.check_model(deploy, full_check=True)
    assert counts == {"hard_sigmoids_as_adds": 1}
    (add,) = [n for n in deploy.graph.node if n.op_type == "Add"]
    assert add.name == hsig.name and add.input[0] == hsig.input[0]
    (shift,) = [n for n in deploy.graph.node if n.output[0] == add.input[1]]
    assert shift.op_type == "DequantizeLinear"
    (q,) = [n for n in deploy.graph.node if n.op_type == "QuantizeLinear" and
            n.input[0] == add.output[0]]
    assert initializer(deploy, q.input[1]) == pytest.approx(1 / 255 / alpha)
    assert initializer(deploy, q.input[2]) == 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(deploy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = op_counts(onnx.load(options.optimized_model_filepath))
    assert {"QLinearAdd", "QLinearMul"} <= set(ops), ops
    assert not {"HardSigmoid", "HardSwish", "Mul", "Add"} & set(ops), ops
    for feed in feeds:
        want, got = run(calibrated, feed)[0], run(deploy, feed)[0]
        assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max()


def test_a_squeeze_excitation_gate_keeps_its_calibrated_grid():
    """x * HardSigmoid(Conv(GlobalAveragePool(x))), PP-LCNet's squeeze-excitation: the gate
    (a few values per channel) keeps a calibrated scale and its HardSigmoid its beta; the
    Mul is still quantized."""
    rng = np.random.default_rng(49)
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
             "ws": rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["c1"], ["p"], name="squeeze"),
             helper.make_node("Conv", ["p", "ws"], ["s"], name="excite"),
             helper.make_node("HardSigmoid", ["s"], ["g"], name="hsig", alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["c1", "g"], ["a"], name="gate"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1] * 4)]
    model = build(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])], inits)
    result, table = insert(model)
    assert {"g", "a"} <= quantized(table) and not table.get("g").calibrated
    assert table.get("g").method == ""
    (hsig,) = [n for n in result.model.graph.node if n.op_type == "HardSigmoid"]
    assert {a.name: a.f for a in hsig.attribute}["beta"] == 0.5


def test_symmetric_activations_keep_hard_swish_calibrated():
    """Symmetric activations (the int8-tensorrt preset) have no code at 0 to saturate at: the
    HardSwish stays one op, its output calibrated like any other."""
    model = hard_gate_net("HardSwish", np.random.default_rng(48))
    result, table = insert(model, activations={"symmetric": True, "dtype": "int8"})
    assert op_counts(result.model).get("HardSwish") == 1
    assert "HardSigmoid" not in op_counts(result.model)
    assert not [e for e in table.entries.values() if e.method == "fixed"]
    assert table.get("a").quantized and not table.get("a").calibrated


def test_gelu_fused_by_canonicalize_runs_as_one_float_kernel(tmp_path):
    """Conv -> GELU (Erf form) -> Conv, quantized: onnxruntime gives each reader of a
    DequantizeLinear its own copy, so it cannot fuse the Erf form (two dequantizations, five
    float ops); canonicalize's Gelu (fuse_gelu = "raise-opset", the int8 presets') runs as
    one kernel after one DequantizeLinear."""
    from graphq.passes.canonicalize import Canonicalize
    from tests.passes.test_canonicalize import gelu_model

    rng = np.random.default_rng(46)
    feeds = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    ops = {}
    for mode in ("off", "raise-opset"):
        model = Canonicalize(fuse_gelu=mode).run(gelu_model("div"), PassContext()).model
        result, table = insert(model)
        assert "c" in quantized(table)  # the GELU input
        calibrated = Calibrate(method="minmax").run(result.model, PassContext(
            data=DataSource(feeds))).model
        assert_calibrated_close(model, result.model, feeds)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{mode}.onnx")
        ort.InferenceSession(calibrated.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        ops[mode] = op_counts(onnx.load(options.optimized_model_filepath))
    assert ops["off"]["Erf"] == 1 and "Gelu" not in ops["off"], ops["off"]
    assert ops["raise-opset"]["Gelu"] == 1 and "Erf" not in ops["raise-opset"], ops
    assert ops["raise-opset"]["DequantizeLinear"] == ops["off"]["DequantizeLinear"] - 1, ops


@pytest.mark.parametrize("decider", ["GreaterOrEqual", "ArgMax", "GreaterOrEqual+Gemm"])
def test_a_score_a_comparison_reads_stays_float(decider):
    """Gemm -> Sigmoid -> score; a threshold (GreaterOrEqual 0.5, as a wake-word model's If
    condition) or an ArgMax reads the score: quantized to its calibration range it clips (a
    score calibrated on negatives never reaches 0.5), so the Gemm's output stays float with
    the reason, and the decisions stay the float model's on inputs far outside the
    calibration data. When a compute op reads the score too, it is quantized for that op."""
    rng = np.random.default_rng(47)
    classes = 4 if decider == "ArgMax" else 1
    w = rng.normal(0, 0.5, (16, classes)).astype(np.float32)
    inits = {"w": w, "half": np.array(0.5, np.float32),
             "w2": rng.normal(0, 0.5, (classes, 2)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w"], ["logit"], name="head"),
             helper.make_node("Sigmoid", ["logit"], ["score"], name="sig")]
    outputs = [tensor("y", None, TensorProto.INT64 if decider == "ArgMax" else TensorProto.BOOL)]
    if decider == "ArgMax":
        nodes.append(helper.make_node("ArgMax", ["score"], ["y"], name="pick", axis=1))
    else:
        nodes.append(helper.make_node("GreaterOrEqual", ["score", "half"], ["y"], name="fire"))
    if decider.endswith("Gemm"):
        nodes.append(helper.make_node("MatMul", ["score", "w2"], ["z"], name="next"))
        outputs.append(tensor("z", None))
    model = build(nodes, [tensor("x", ["N", 16])], outputs, inits, opset=16)
    result, table = insert(model)
    entry = table.get("score")
    if decider.endswith("Gemm"):
        assert entry.quantized
        return
    # the Gemm's output too (its range would end where the calibration data's does), so the
    # Sigmoid is not quantized either
    logit = table.get("logit")
    assert not logit.quantized and entry is None and "x" in quantized(table)
    assert logit.reason.startswith(f"read by {decider} '{nodes[-1].name}' through Sigmoid "
                                   "'sig'"), logit.reason
    if decider == "ArgMax":
        return
    # calibrated on inputs that all score low, judged on inputs of the same range that
    # score high: the decisions are the float model's
    sign = np.sign(w[:, 0])
    low = [{"x": (-sign * rng.uniform(0, 1, (8, 16))).astype(np.float32)} for _ in range(4)]
    high = {"x": (sign * rng.uniform(0, 1, (64, 16))).astype(np.float32)}
    calibrated = Calibrate(method="minmax").run(result.model, PassContext(
        data=DataSource(low))).model
    assert run(model, high)[0].mean() > 0.9  # the float model fires
    np.testing.assert_array_equal(run(calibrated, high)[0], run(model, high)[0])

def embedding_net(rng: np.random.Generator, rows: int = 300, extra_reader: str | None = None
                  ) -> onnx.ModelProto:
    """ids -> Gather(word table) + Gather(small table) -> MatMul: an embedding lookup."""
    inits = {"words": rng.normal(0, 0.3, (rows, 32)).astype(np.float32),
             "kinds": rng.normal(0, 0.3, (2, 32)).astype(np.float32),
             "w": rng.normal(0, 0.2, (32, 8)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["words", "ids"], ["e"], name="embed"),
             helper.make_node("Gather", ["kinds", "kind"], ["k"], name="embed_kind"),
             helper.make_node("Add", ["e", "k"], ["s"], name="sum"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="proj")]
    outputs = [tensor("y", ["B", 6, 8])]
    if extra_reader == "matmul":  # tied weights: the table is also a MatMul's weight
        nodes.append(helper.make_node("MatMul", ["y", "w_t"], ["z"], name="tied"))
        inits["w_t"] = rng.normal(0, 0.2, (8, rows)).astype(np.float32)
        nodes.append(helper.make_node("Gemm", ["s2", "words"], ["t"], name="tied_gemm",
                                      transB=1))
        nodes.insert(1, helper.make_node("ReduceMean", ["e"], ["s2"], name="pool", axes=[1],
                                         keepdims=0))
        outputs += [tensor("z", ["B", 6, rows]), tensor("t", ["B", rows])]
    return build(nodes, [tensor("ids", ["B", 6], TensorProto.INT64),
                         tensor("kind", ["B", 6], TensorProto.INT64)], outputs, inits)


def embedding_feeds(rng: np.random.Generator, rows: int = 300, n: int = 3) -> list[dict]:
    return [{"ids": rng.integers(0, rows, (4, 6)).astype(np.int64),
             "kind": rng.integers(0, 2, (4, 6)).astype(np.int64)} for _ in range(n)]


def test_gather_table_is_int8_per_row_and_the_deploy_graph_gathers_int8_rows():
    """A Gather's constant table (an embedding) is quantized int8, symmetric, one scale per
    row; a table under MIN_TABLE_SIZE values stays float. The fake-quant graph equals a numpy
    per-row fake quant of the table (tolerance 1e-6 relative); the deploy graph stores the
    table as int8, gathers the int8 rows, then scales them (no DequantizeLinear of the whole
    table left), and its outputs equal the fake-quant graph's exactly."""
    from graphq.passes.emit import deploy_graph

    rng = np.random.default_rng(60)
    model = embedding_net(rng)
    result, table = insert(model)
    words = table.get("words")
    assert words.quantized and words.role == "weight" and words.dtype == "int8"
    assert words.axis == 0 and words.symmetric and len(words.scale) == 300
    assert "Gather 'embed'" in words.reason
    assert table.get("kinds") is None and "kinds" not in pairs(result.model)
    table_values = initializer(model, "words")
    np.testing.assert_allclose(words.scale, np.abs(table_values).max(1) / 127, rtol=1e-6)
    feeds = embedding_feeds(rng)
    calibrated = Calibrate(method="minmax").run(result.model, PassContext(
        data=DataSource(feeds))).model
    # the fake-quant embedding is the numpy per-row fake quant of the table
    s = np.asarray(words.scale, np.float32)[:, None]
    fq_table = np.clip(np.rint(table_values / s), -127, 127) * s
    probe = onnx.ModelProto()
    probe.CopyFrom(calibrated)
    probe.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    for feed in feeds:
        assert_close(run(probe, feed)[-1], fq_table[feed["ids"]], 1e-6)
    deploy, _, _ = deploy_graph(calibrated)
    onnx.checker.check_model(deploy, full_check=True)
    embed = next(n for n in deploy.graph.node if n.name == "embed")
    assert embed.op_type == "Gather" and embed.input[1] == "ids"
    ints = initializer(deploy, embed.input[0])
    assert ints.dtype == np.int8 and ints.shape == (300, 32)
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [300, 32]
                   for t in deploy.graph.initializer)  # no float copy of the table
    dq_reads = [n for n in deploy.graph.node if n.op_type == "DequantizeLinear"
                and n.input[0] == embed.input[0]]
    assert not dq_reads
    assert {"Cast", "Mul"} <= {n.op_type for n in deploy.graph.node}
    for feed in feeds:
        np.testing.assert_array_equal(run(deploy, feed)[0], run(calibrated, feed)[0])


def test_gather_table_read_by_another_op_is_left_to_that_op():
    """A table a Gemm reads too (tied input and output embeddings) is that Gemm's weight
    (per output channel), and the Gather reads the same dequantized table; the deploy
    graph keeps its DequantizeLinear (the Gemm needs the whole table)."""
    from graphq.passes.emit import deploy_graph

    rng = np.random.default_rng(61)
    model = embedding_net(rng, extra_reader="matmul")
    result, table = insert(model)
    words = table.get("words")
    assert words.quantized and "weight of Gemm 'tied_gemm'" in words.reason
    feeds = embedding_feeds(rng)
    calibrated = Calibrate(method="minmax").run(result.model, PassContext(
        data=DataSource(feeds))).model
    deploy, _, _ = deploy_graph(calibrated)
    onnx.checker.check_model(deploy, full_check=True)
    assert not any(n.op_type == "Cast" for n in deploy.graph.node)
    for feed in feeds:
        for a, b in zip(run(deploy, feed), run(calibrated, feed), strict=True):
            np.testing.assert_array_equal(a, b)


def test_gather_tables_stay_float_by_exclude_ops_or_override():
    rng = np.random.default_rng(62)
    model = embedding_net(rng)
    _, table = insert(model, exclude_ops=["Gather"])
    assert table.get("words") is None
    _, table = insert(model, overrides={"words": {"quantize": False}})
    assert not table.get("words").quantized
    with pytest.raises(PassError, match="tables are int8, symmetric, per row"):
        insert(model, overrides={"words": {"dtype": "uint8"}})


def half_mlp(rng: np.random.Generator, first_half: bool) -> onnx.ModelProto:
    """x -> MatMul (float32, or float16 with ``first_half``) -> Cast float16 -> MatMul
    (float16 weight) -> Cast float -> y: a mixed-precision export."""
    w1 = rng.normal(0, 0.3, (8, 6)).astype(np.float16 if first_half else np.float32)
    inits = {"W1": w1, "W2": rng.normal(0, 0.3, (6, 4)).astype(np.float16)}
    to16 = helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16)
    nodes = ([to16] if first_half else []) + [
        helper.make_node("MatMul", ["x16" if first_half else "x", "W1"], ["h"], name="mm1"),
        *([] if first_half else [helper.make_node("Cast", ["h"], ["h16"],
                                                  to=TensorProto.FLOAT16)]),
        helper.make_node("MatMul", ["h" if first_half else "h16", "W2"], ["y16"], name="mm2"),
        helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    return build(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])], inits)


def test_float16_ops_stay_float_with_the_reason():
    """A mixed-precision graph: the float32 MatMul is quantized, the float16 one stays float
    with its weight, the reason in the table and notes (Q/DQ of float16 needs opset 19 and
    float16 scales: the pass had written pairs onnxruntime refused); a graph whose every
    compute op is float16 is a config error that says so and names the fix."""
    result, table = insert(half_mlp(np.random.default_rng(26), first_half=False))
    assert {"x", "W1"} <= quantized(table) and "W2" not in quantized(table)
    assert "computes in float16" in table.get("W2").reason
    assert any(n.startswith("MatMul 'mm2' kept float: it computes in float16") and
               "convert the model to float32" in n for n in result.notes), result.notes
    with pytest.raises(ConfigError, match=r"nothing in this model can be quantized: its 2 "
                       r"MatMul op\(s\) compute in float16: .*float32"):
        insert(half_mlp(np.random.default_rng(27), first_half=True))


def test_recurrent_weights_are_recorded_float_and_named_when_nothing_else_is(caplog):
    """ONNX LSTM/GRU weights are not quantized: they go into the table, kept float with the
    reason (a note too, and one warning), so the record accounts for them; a graph of one
    GRU alone is a config error that names it instead of saying it has no MatMul."""
    rng = np.random.default_rng(28)
    hidden, feat = 4, 8
    gru_inits = {"W": rng.normal(0, 0.3, (1, 3 * hidden, feat)).astype(np.float32),
                 "R": rng.normal(0, 0.3, (1, 3 * hidden, hidden)).astype(np.float32),
                 "B": np.zeros((1, 6 * hidden), np.float32)}
    gru = helper.make_node("GRU", ["x", "W", "R", "B"], ["", "h"], name="gru",
                           hidden_size=hidden)
    alone = build([gru], [tensor("x", [5, 2, feat])], [tensor("h", [1, 2, hidden])],
                  gru_inits)
    with pytest.raises(ConfigError, match="its weights are in GRU 'gru': graphq does not "
                       "quantize recurrent ops"):
        insert(alone)
    head = {"Wo": rng.normal(0, 0.3, (hidden, 3)).astype(np.float32)}
    nodes = [gru, helper.make_node("MatMul", ["h", "Wo"], ["y"], name="head")]
    with caplog.at_level("WARNING", logger="graphq"):
        result, table = insert(build(nodes, [tensor("x", [5, 2, feat])],
                                     [tensor("y", [1, 2, 3])], {**gru_inits, **head}))
    assert "GRU 'gru' stays float: graphq does not quantize recurrent ops" in caplog.text
    assert "Wo" in quantized(table)
    for name in ("W", "R", "B"):
        entry = table.get(name)
        assert entry is not None and not entry.quantized and entry.role == "weight"
        assert entry.reason.startswith("GRU 'gru' kept float: graphq does not quantize")
    assert any(n.startswith("GRU 'gru' kept float") for n in result.notes)


@pytest.mark.parametrize("bias", ["constant", "computed"])
def test_logits_before_a_softmax_stay_float_through_a_reshape_and_a_bias(bias):
    """tf2onnx writes a Conv1D classifier as Conv -> Squeeze -> Add(bias) -> Softmax: the
    conv's output (the logits, the bias apart) stays float as if the Softmax read it
    directly; where the Add's other operand is computed, not a constant, it is quantized."""
    rng = np.random.default_rng(29)
    inits = {"W": rng.normal(0, 0.3, (5, 4, 1, 3)).astype(np.float32),
             "axes": np.array([2], np.int64)}
    if bias == "constant":
        inits["b"] = rng.normal(0, 1, (1, 5, 8)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             *([] if bias == "constant" else [helper.make_node("Sigmoid", ["x2"], ["b"])]),
             helper.make_node("Conv", ["r", "W"], ["c"], name="conv", pads=[0, 1, 0, 1]),
             helper.make_node("Squeeze", ["c", "axes"], ["s"]),
             helper.make_node("Add", ["s", "b"], ["logits"], name="bias"),
             helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1)]
    inputs = [tensor("x", [2, 4, 1, 8])] + ([] if bias == "constant" else
                                            [tensor("x2", [1, 5, 8])])
    model = build(nodes, inputs, [tensor("y", [2, 5, 8])], inits)
    _, table = insert(model)
    entry = table.get("c")
    if bias == "constant":
        assert entry is not None and not entry.quantized
        assert entry.reason == ("read only by Softmax 'softmax' through Squeeze, Add by a "
                                "constant, which amplifies its error: kept float")
    else:
        assert "c" in quantized(table)
    assert {"r", "W"} <= quantized(table)
