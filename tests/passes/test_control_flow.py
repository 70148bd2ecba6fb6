"""Quantization inside If branches: canonicalize, insert-qdq, calibrate and emit on a graph
whose convolutions live in the branches of an If (as silero VAD's sample-rate switch).

The graph is built here: ``If(flag)`` runs ``Conv -> Relu -> Conv`` on ``x`` in its then
branch and one ``Conv`` in its else branch, each with a bias. Every result passes
onnx.checker (full check) and runs in onnxruntime. Tolerances:

- the quantized graphs stay within 5% of the float output's largest magnitude (uint8
  activations, 7- or 8-bit weights on a conv of 3x3x3 taps: measured 1-2%);
- the deploy graph (integer weights) equals the fake-quant graph within 1e-5 of the output's
  largest magnitude (the same integers, dequantized once ahead or in the graph);
- a branch no calibration batch took keeps its activations float, with that reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphq.data import DataSource
from graphq.passes.calibrate import Calibrate
from graphq.passes.canonicalize import Canonicalize
from graphq.passes.emit import deploy_graph
from graphq.passes.insert_qdq import InsertQDQ
from graphq.quant import QuantTable
from graphq.registry import PassContext
from tests.helpers import make_model, run, tensor


def conv(name: str, x: str, y: str, rng: np.random.Generator, c_in: int, c_out: int):
    """A 3x3 Conv whose weight and bias are Constant nodes of the branch (as exporters write
    them inside subgraphs)."""
    w = rng.normal(0, 0.3, (c_out, c_in, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, c_out).astype(np.float32)
    return [
        helper.make_node("Constant", [], [f"{name}_w"], name=f"{name}_w",
                         value=numpy_helper.from_array(w, f"{name}_w")),
        helper.make_node("Constant", [], [f"{name}_b"], name=f"{name}_b",
                         value=numpy_helper.from_array(b, f"{name}_b")),
        helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name,
                         pads=[1, 1, 1, 1]),
    ]


def if_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    then_nodes = (conv("then_conv1", "x", "t1", rng, 3, 8)
                  + [helper.make_node("Relu", ["t1"], ["t1r"], name="then_relu")]
                  + conv("then_conv2", "t1r", "t2", rng, 8, 4))
    else_nodes = conv("else_conv", "x", "e1", rng, 3, 4)
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, 8, 8])
           for n in ("t2", "e1")]
    then_g = helper.make_graph(then_nodes, "then", [], [out[0]])
    else_g = helper.make_graph(else_nodes, "else", [], [out[1]])
    nodes = [helper.make_node("If", ["flag"], ["y"], name="switch", then_branch=then_g,
                              else_branch=else_g)]
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8]), tensor("flag", [], TensorProto.BOOL)],
                       [tensor("y", ["N", 4, 8, 8])])
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(rng: np.random.Generator, flags: list[bool], n: int = 4) -> list[dict]:
    return [{"x": rng.uniform(0, 1, (n, 3, 8, 8)).astype(np.float32),
             "flag": np.array(flag)} for flag in flags]


def branch(model: onnx.ModelProto, name: str) -> onnx.GraphProto:
    node = next(n for n in model.graph.node if n.op_type == "If")
    return next(a.g for a in node.attribute if a.name == name)


def ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def quantize(model: onnx.ModelProto, data: list[dict], **calibrate):
    ctx = PassContext(data=DataSource(data))
    model = Canonicalize().run(model, ctx).model
    model = InsertQDQ(weights={"reduce_range": False}).run(model, ctx).model
    onnx.checker.check_model(model, full_check=True)
    result = Calibrate(method="minmax", **calibrate).run(model, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result


def test_canonicalize_makes_branch_constants_initializers():
    model = Canonicalize().run(if_model(), PassContext()).model
    onnx.checker.check_model(model, full_check=True)
    for name in ("then_branch", "else_branch"):
        assert "Constant" not in ops(branch(model, name))
    assert {t.name for t in branch(model, "then_branch").initializer} == {
        "then_conv1_w", "then_conv1_b", "then_conv2_w", "then_conv2_b"}
    assert {t.name for t in branch(model, "else_branch").initializer} == {
        "else_conv_w", "else_conv_b"}
    f = feeds(np.random.default_rng(1), [True, False])
    for feed in f:
        np.testing.assert_array_equal(run(if_model(), feed)[0], run(model, feed)[0])


def test_canonicalize_keeps_an_outer_constant_only_a_branch_reads():
    """An outer Constant node read only inside a branch folds into an initializer, which the
    branch still finds (it was deleted with nothing in its place before)."""
    model = if_model()
    rng = np.random.default_rng(2)
    shift = rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32)
    model.graph.node.insert(0, helper.make_node(
        "Constant", [], ["shift"], name="shift", value=numpy_helper.from_array(shift, "shift")))
    else_g = branch(model, "else_branch")
    else_g.node[-1].output[0] = "e0"
    else_g.node.append(helper.make_node("Add", ["e0", "shift"], ["e1"], name="else_shift"))
    onnx.checker.check_model(model, full_check=True)
    out = Canonicalize().run(model, PassContext()).model
    onnx.checker.check_model(out, full_check=True)
    assert "shift" in {t.name for t in out.graph.initializer}
    feed = feeds(rng, [False])[0]
    np.testing.assert_allclose(run(model, feed)[0], run(out, feed)[0], rtol=0, atol=0)


@pytest.mark.parametrize("taken", [[True, False], [True]], ids=["both", "then-only"])
def test_if_branches_are_quantized_and_calibrated(taken):
    rng = np.random.default_rng(3)
    result = quantize(if_model(), feeds(rng, taken * 3))
    model, table = result.model, QuantTable.of(result.model)
    then_g, else_g = branch(model, "then_branch"), branch(model, "else_branch")
    # weights are quantized in both branches, from the weights themselves
    assert {e.tensor for e in table.quantized("weight")} == {
        "then_conv1_w", "then_conv2_w", "else_conv_w"}
    assert ops(then_g).count("DequantizeLinear") >= 4 and "QuantizeLinear" in ops(then_g)
    # the then branch's activations are calibrated; the else branch's only when data took it
    assert table.get("t1r").quantized and table.get("t1r").scale is not None
    x = table.get("x")
    assert x.quantized and x.scale is not None  # the outer input, read in both branches
    assert "QuantizeLinear" in ops(model.graph)  # its pair sits in the outer graph
    else_out = table.get("e1")
    assert not else_out.quantized and "graph output" in else_out.reason  # a branch output
    if taken == [True]:
        assert not any(e.quantized for e in table.entries.values()
                       if e.role == "activation" and e.tensor.startswith("else"))
    # biases: int32 inside the branch, scale = input scale x weight scale
    bias = table.get("then_conv2_b")
    assert bias.quantized and bias.dtype == "int32"
    assert "DequantizeLinear" in ops(else_g)

    deploy, folded, _ = deploy_graph(model)
    onnx.checker.check_model(deploy, full_check=True)
    assert folded == 3
    weights = {t.name: numpy_helper.to_array(t) for g in (branch(deploy, "then_branch"),
                                                          branch(deploy, "else_branch"))
               for t in g.initializer}
    assert any(v.dtype == np.int8 and v.ndim == 4 for v in weights.values())
    assert not any(v.dtype == np.float32 and v.ndim == 4 for v in weights.values())
    for feed in feeds(np.random.default_rng(4), [True, False]):
        ref = run(if_model(), feed)[0]
        fake, dep = run(model, feed)[0], run(deploy, feed)[0]
        peak = float(np.abs(ref).max())
        assert np.abs(fake - ref).max() <= 0.05 * peak
        assert np.abs(dep - fake).max() <= 1e-5 * peak


def test_an_untaken_branch_is_reported():
    result = quantize(if_model(), feeds(np.random.default_rng(5), [True, True]))
    table = QuantTable.of(result.model)
    # the else Conv's input is the outer x, quantized; nothing of its own is observed
    assert not table.get("x").reason.startswith("no values")
    result = quantize(if_model(), feeds(np.random.default_rng(5), [False, False]))
    table = QuantTable.of(result.model)
    t1r = table.get("t1r")
    assert not t1r.quantized and "no calibration batch took" in t1r.reason
    assert any("no calibration batch took" in n for n in result.notes)
