"""fold-bn: each producer kind and each refusal, on graphs built here.

Tolerance: outputs equal to the unfolded graph within 1e-5 of the output's largest
magnitude (float32 arithmetic, weights refolded in float64) - ten times tighter than the
1e-4 the pass states to the manager.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphq.passes.fold_bn import FoldBN
from graphq.registry import PassContext
from tests.helpers import (
    assert_close,
    bn_node,
    bn_params,
    make_model,
    op_counts,
    run,
    tensor,
)

RTOL = 1e-5


def fold(model: onnx.ModelProto, **options):
    before = onnx.ModelProto()
    before.CopyFrom(model)
    result = FoldBN(**options).run(model, PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return before, result


def check_equivalent(before, after, feeds):
    assert_close(run(before, feeds), run(after.model, feeds), RTOL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 8])  # 8 = depthwise (C_in = C_out = 8)
def test_conv(bias, groups):
    rng = np.random.default_rng(groups)
    c_in, c_out = 8, 8
    inits = {"w": rng.normal(0, 0.3, (c_out, c_in // groups, 3, 3)).astype(np.float32),
             **bn_params(rng, c_out)}
    conv_inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.normal(0, 1, c_out).astype(np.float32)
        conv_inputs.append("b")
    model = make_model(
        [helper.make_node("Conv", conv_inputs, ["c"], group=groups, pads=[1, 1, 1, 1],
                          name="conv"),
         bn_node("c", "y")],
        [tensor("x", [2, c_in, 6, 6])], [tensor("y", [2, c_out, 6, 6])], inits)
    before, result = fold(model)
    assert result.changed and result.counts["folded"] == 1
    assert result.counts["folded_conv"] == 1
    assert op_counts(result.model) == {"Conv": 1}
    conv = result.model.graph.node[0]
    assert len(conv.input) == 3 and conv.output[0] == "y"  # bias created; output name kept
    check_equivalent(before, result, {"x": rng.normal(0, 1, (2, c_in, 6, 6)).astype(np.float32)})


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose(bias, groups):
    rng = np.random.default_rng(10 + groups)
    c_in, m_per_group = 4, 3
    c_out = m_per_group * groups
    inits = {"w": rng.normal(0, 0.3, (c_in, m_per_group, 3, 3)).astype(np.float32),
             **bn_params(rng, c_out)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.normal(0, 1, c_out).astype(np.float32)
        inputs.append("b")
    model = make_model(
        [helper.make_node("ConvTranspose", inputs, ["c"], group=groups, strides=[2, 2]),
         bn_node("c", "y")],
        [tensor("x", [1, c_in, 5, 5])], [tensor("y", [1, c_out, 11, 11])], inits)
    before, result = fold(model)
    assert op_counts(result.model) == {"ConvTranspose": 1}
    assert result.counts["folded_convtranspose"] == 1
    check_equivalent(before, result, {"x": rng.normal(0, 1, (1, c_in, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), ()])
def test_gemm(trans_b, c_shape):
    rng = np.random.default_rng(trans_b)
    k, n = 5, 6
    w_shape = (n, k) if trans_b else (k, n)
    inits = {"w": rng.normal(0, 0.5, w_shape).astype(np.float32), **bn_params(rng, n)}
    inputs = ["x", "w"]
    if c_shape is not None:
        inits["c"] = rng.normal(0, 1, c_shape).astype(np.float32)
        inputs.append("c")
    model = make_model(
        [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3),
         bn_node("g", "y")],
        [tensor("x", [3, k])], [tensor("y", [3, n])], inits)
    before, result = fold(model)
    assert op_counts(result.model) == {"Gemm": 1}
    check_equivalent(before, result, {"x": rng.normal(0, 1, (3, k)).astype(np.float32)})


def test_matmul_2d_gets_an_add():
    rng = np.random.default_rng(3)
    inits = {"w": rng.normal(0, 0.5, (5, 4)).astype(np.float32), **bn_params(rng, 4)}
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), bn_node("m", "y")],
                       [tensor("x", [3, 5])], [tensor("y", [3, 4])], inits)
    model = onnx.shape_inference.infer_shapes(model)
    before, result = fold(model)
    assert op_counts(result.model) == {"MatMul": 1, "Add": 1}
    assert result.model.graph.node[-1].output[0] == "y"
    check_equivalent(before, result, {"x": rng.normal(0, 1, (3, 5)).astype(np.float32)})


def test_matmul_3d_is_not_folded_but_becomes_mul_add():
    """BN's channel axis 1 of a [B, S, N] MatMul output is S, not the weight's N."""
    rng = np.random.default_rng(4)
    inits = {"w": rng.normal(0, 0.5, (5, 4)).astype(np.float32), **bn_params(rng, 3)}
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), bn_node("m", "y")],
                       [tensor("x", [2, 3, 5])], [tensor("y", [2, 3, 4])], inits)
    model = onnx.shape_inference.infer_shapes(model)
    before, result = fold(model)
    assert result.counts["folded"] == 0 and result.counts["mul_add"] == 1
    assert "not known to be 2-D" in result.notes[0]
    assert op_counts(result.model) == {"MatMul": 1, "Mul": 1, "Add": 1}
    check_equivalent(before, result, {"x": rng.normal(0, 1, (2, 3, 5)).astype(np.float32)})


def conv_bn_model(rng, extra_nodes=(), outputs=("y",), weight_name="w"):
    inits = {weight_name: rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32),
             **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", weight_name], ["c"], name="conv"),
             bn_node("c", "y"), *extra_nodes]
    return make_model(nodes, [tensor("x", [1, 3, 4, 4])],
                      [tensor(o, [1, 4, 4, 4]) for o in outputs], inits)


def feeds(rng):
    return {"x": rng.normal(0, 1, (1, 3, 4, 4)).astype(np.float32)}


def test_shared_producer_becomes_mul_add_with_reason():
    rng = np.random.default_rng(5)
    model = conv_bn_model(rng, [helper.make_node("Relu", ["c"], ["r"])], outputs=("y", "r"))
    before, result = fold(model)
    assert result.counts == {"folded": 0, "mul_add": 1, "kept": 0, "affine_folded": 0,
                             "affine_ops": 0}
    assert "also read elsewhere" in result.notes[0]
    assert op_counts(result.model) == {"Conv": 1, "Mul": 1, "Add": 1, "Relu": 1}
    check_equivalent(before, result, feeds(rng))


def test_producer_that_is_a_graph_output_is_not_changed():
    rng = np.random.default_rng(6)
    model = conv_bn_model(rng, outputs=("y", "c"))
    before, result = fold(model)
    assert result.counts["mul_add"] == 1
    check_equivalent(before, result, feeds(rng))


def test_bn_on_graph_input_becomes_mul_add():
    rng = np.random.default_rng(7)
    model = make_model([bn_node("x", "y")], [tensor("x", [2, 4, 3])], [tensor("y", [2, 4, 3])],
                       bn_params(rng, 4))
    before, result = fold(model)
    assert result.counts["mul_add"] == 1
    assert "graph input" in result.notes[0]
    assert "BatchNormalization" not in op_counts(result.model)
    check_equivalent(before, result, {"x": rng.normal(0, 1, (2, 4, 3)).astype(np.float32)})


@pytest.mark.parametrize("before", ["Conv", "Concat"])
def test_bn_whose_input_has_no_shape_takes_the_rank_from_the_ops_before(before):
    """A BN after a Tanh whose output shape inference left without a shape (RivaGAN's
    encoder: a Conv over a Concat): the rank comes from the Conv's weight, or through the
    Tanh and the Concat from their first input, and the BN becomes Mul+Add (it had been kept,
    "the rank of its input is not known (run canonicalize first)", after canonicalize)."""
    rng = np.random.default_rng(8)
    inits = {"w": rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32), **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]) if before == "Conv" else
             helper.make_node("Concat", ["x", "x2"], ["c"], axis=1),
             helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("Tanh", ["t"], ["t2"]),
             bn_node("t2", "b"),
             helper.make_node("Relu", ["b"], ["y"])]
    inputs = [tensor("x", [2, 3 if before == "Conv" else 2, 5, 5])]
    feed = {"x": rng.normal(0, 1, (2, 3 if before == "Conv" else 2, 5, 5)).astype(np.float32)}
    if before == "Concat":
        inputs.append(tensor("x2", [2, 2, 5, 5]))
        feed["x2"] = rng.normal(0, 1, (2, 2, 5, 5)).astype(np.float32)
        del inits["w"]
    model = make_model(nodes, inputs, [tensor("y", [2, 4, 5, 5])], inits)  # none inside
    before_model, result = fold(model)
    assert result.counts["mul_add"] == 1 and result.counts["kept"] == 0, result.notes
    check_equivalent(before_model, result, feed)


def test_fallback_keep_leaves_the_bn_and_says_why():
    rng = np.random.default_rng(8)
    model = make_model([bn_node("x", "y")], [tensor("x", [2, 4])], [tensor("y", [2, 4])],
                       bn_params(rng, 4))
    _, result = fold(model, fallback="keep")
    assert not result.changed
    assert result.counts["kept"] == 1
    assert op_counts(result.model) == {"BatchNormalization": 1}
    assert "kept" in result.notes[0] and "graph input" in result.notes[0]


def test_non_constant_statistics_are_kept():
    rng = np.random.default_rng(9)
    params = bn_params(rng, 4)
    mean = params.pop("bn_mean")
    model = conv_bn_model(rng)
    model.graph.initializer.remove(
        next(t for t in model.graph.initializer if t.name == "bn_mean"))
    model.graph.input.append(tensor("bn_mean", [4]))
    before, result = fold(model)
    assert result.counts["kept"] == 1 and "mean 'bn_mean' is not a constant" in result.notes[0]
    f = feeds(rng) | {"bn_mean": mean}
    check_equivalent(before, result, f)


def test_weight_shared_by_two_convs_is_copied():
    rng = np.random.default_rng(11)
    other = helper.make_node("Conv", ["x", "w"], ["z"], name="other")
    model = conv_bn_model(rng, [other], outputs=("y", "z"))
    before, result = fold(model)
    assert result.counts["folded"] == 1
    inputs = {n.name: list(n.input) for n in result.model.graph.node}
    assert inputs["other"][1] == "w" and inputs["conv"][1] != "w"
    check_equivalent(before, result, feeds(rng))


def test_ops_option_limits_what_folds():
    rng = np.random.default_rng(12)
    model = conv_bn_model(rng)
    _, result = fold(model, ops=["Gemm"])
    assert result.counts["folded"] == 0 and result.counts["mul_add"] == 1


def test_bad_option_value_names_the_allowed_ones():
    from graphq.errors import ConfigError

    with pytest.raises(ConfigError, match="allowed: Conv, ConvTranspose, Gemm, MatMul"):
        FoldBN(ops=["Conv", "Relu"])


def test_training_mode_bn_is_kept():
    rng = np.random.default_rng(13)
    model = conv_bn_model(rng)
    bn = model.graph.node[1]
    bn.output.extend(["running_mean", "running_var"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    model.opset_import[0].version = 15
    model.graph.output.append(tensor("running_mean", [4]))
    model.graph.output.append(tensor("running_var", [4]))
    _, result = fold(model)
    assert result.counts["kept"] == 1 and "training mode" in result.notes[0]


def test_no_bn_is_no_change():
    rng = np.random.default_rng(14)
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2])],
                       [tensor("y", [2])])
    _, result = fold(model)
    assert not result.changed and result.counts == {"folded": 0, "mul_add": 0, "kept": 0,
                                                    "affine_folded": 0, "affine_ops": 0}
    del rng


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_per_channel_arithmetic_after_a_linear_op_folds(op):
    """A bias and a BN written out as Add, Sub, Mul, Div by per-channel constants (and a
    scalar) after a Conv or Gemm whose output nothing else reads fold into its weight and
    bias, ``scale * x + shift``: the op is left with the chain's output name."""
    rng = np.random.default_rng(30)
    c = 5
    if op == "Conv":
        shape, w = [1, c, 1, 1], rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)
        first = helper.make_node("Conv", ["x", "w"], ["p"], pads=[1, 1, 1, 1], name="conv")
        x_shape, y_shape = [2, 3, 6, 6], [2, c, 6, 6]
    else:
        shape, w = [c], rng.normal(0, 0.3, (c, 3)).astype(np.float32)
        first = helper.make_node("Gemm", ["x", "w"], ["p"], transB=1, name="gemm")
        x_shape, y_shape = [2, 3], [2, c]
    const = lambda: rng.normal(0, 1, shape).astype(np.float32)  # noqa: E731
    inits = {"w": w, "bias": const(), "mean": const(), "gamma": const(),
             "var": (np.abs(const()) + 0.5), "half": np.array(0.5, np.float32)}
    nodes = [first,
             helper.make_node("Add", ["p", "bias"], ["a"]),
             helper.make_node("Sub", ["a", "mean"], ["s"]),
             helper.make_node("Mul", ["gamma", "s"], ["m"]),
             helper.make_node("Div", ["m", "var"], ["d"]),
             helper.make_node("Mul", ["d", "half"], ["y0"]),
             helper.make_node("Relu", ["y0"], ["y"])]
    model = make_model(nodes, [tensor("x", x_shape)], [tensor("y", y_shape)], inits)
    before, result = fold(model)
    assert result.counts["affine_folded"] == 1 and result.counts["affine_ops"] == 5
    assert op_counts(result.model) == {op: 1, "Relu": 1}
    assert result.model.graph.node[0].output[0] == "y0"
    check_equivalent(before, result, {"x": rng.normal(0, 1, x_shape).astype(np.float32)})


@pytest.mark.parametrize("case", ["spatial", "reversed_sub", "shared", "graph_output",
                                  "zero_div", "off"])
def test_arithmetic_that_is_not_per_channel_scale_and_shift_stays(case):
    """A constant that varies along another axis, ``c - x``, a Conv output read twice or
    returned, a division by a zero, or ``affine = false``: nothing folds."""
    rng = np.random.default_rng(31)
    c = 4
    inits = {"w": rng.normal(0, 0.3, (c, 2, 1, 1)).astype(np.float32),
             "k": rng.normal(0, 1, (1, 1, 3, 1) if case == "spatial" else (1, c, 1, 1))
             .astype(np.float32)}
    if case == "zero_div":
        inits["k"][0, 1] = 0.0
    op = {"reversed_sub": "Sub", "zero_div": "Div"}.get(case, "Add")
    args = ["k", "p"] if case == "reversed_sub" else ["p", "k"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
             helper.make_node(op, args, ["y"])]
    outputs = [tensor("y", [1, c, 3, 3])]
    if case == "shared":
        nodes.append(helper.make_node("Relu", ["p"], ["r"]))
        outputs.append(tensor("r", [1, c, 3, 3]))
    if case == "graph_output":
        outputs.append(tensor("p", [1, c, 3, 3]))
    model = make_model(nodes, [tensor("x", [1, 2, 3, 3])], outputs, inits)
    before, result = fold(model, affine=case != "off")
    assert not result.changed and result.counts.get("affine_folded", 0) == 0
    assert op_counts(result.model)[op] == 1
