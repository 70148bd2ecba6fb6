"""What GPTQ reads (graphq.rounding): a Conv's and a ConvTranspose's input patches and the
sites it rounds.

Patches: with as many drawn as the op has output positions, the weight (as GPTQ's rows) times
the patches gives every value of onnxruntime's Conv / ConvTranspose output, per output channel
(compared sorted, since the positions are drawn in random order), within float32 rounding
(rtol 1e-4, atol 1e-5)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from graphq import graph as G
from graphq.passes.insert_qdq import InsertQDQ
from graphq.quant import QuantTable, TensorQuant
from graphq.registry import PassContext
from graphq.rounding import Site, _geometry, _input_rows, sites
from tests.helpers import make_model, run, tensor

CONVS = {
    "plain": dict(shape=(2, 4, 9, 11), w=(6, 4, 3, 3), attrs={}),
    "strided-padded": dict(shape=(2, 4, 9, 11), w=(6, 4, 3, 3),
                           attrs=dict(strides=[2, 2], pads=[1, 0, 2, 1])),
    "dilated": dict(shape=(1, 3, 12, 12), w=(4, 3, 3, 2), attrs=dict(dilations=[2, 3],
                                                                    pads=[2, 1, 2, 1])),
    "same-upper": dict(shape=(1, 4, 9, 10), w=(4, 4, 4, 4),
                       attrs=dict(auto_pad="SAME_UPPER", strides=[2, 3])),
    "same-lower": dict(shape=(1, 4, 9, 10), w=(4, 4, 4, 4),
                       attrs=dict(auto_pad="SAME_LOWER", strides=[2, 3])),
    "valid": dict(shape=(1, 4, 9, 10), w=(4, 4, 3, 5), attrs=dict(auto_pad="VALID")),
    "grouped": dict(shape=(2, 6, 7, 7), w=(4, 3, 3, 3), attrs=dict(group=2, pads=[1] * 4)),
    "depthwise": dict(shape=(2, 5, 7, 7), w=(5, 1, 3, 3), attrs=dict(group=5, pads=[1] * 4)),
    "1-D": dict(shape=(3, 4, 20), w=(5, 4, 5), attrs=dict(strides=[2], pads=[2, 1])),
}


DECONVS = {
    "stride-2 (PP-OCR det's head)": dict(shape=(2, 4, 5, 6), w=(4, 3, 2, 2),
                                         attrs=dict(strides=[2, 2])),
    "padded, output_padding": dict(shape=(1, 4, 5, 5), w=(4, 3, 3, 3),
                                   attrs=dict(strides=[2, 2], pads=[1, 1, 1, 1],
                                              output_padding=[1, 0])),
    "pads beyond the kernel": dict(shape=(1, 2, 6, 6), w=(2, 3, 3, 3),
                                   attrs=dict(strides=[2, 2], pads=[3, 0, 2, 3])),
    "dilated": dict(shape=(1, 3, 5, 6), w=(3, 2, 3, 2),
                    attrs=dict(dilations=[2, 1], strides=[1, 2], pads=[1, 0, 2, 1])),
    "grouped": dict(shape=(2, 6, 5, 5), w=(6, 2, 3, 3), attrs=dict(group=3, strides=[2, 2])),
    "valid": dict(shape=(1, 4, 4, 5), w=(4, 2, 3, 3), attrs=dict(auto_pad="VALID",
                                                                 strides=[3, 3])),
    "1-D": dict(shape=(2, 4, 9), w=(4, 3, 4), attrs=dict(strides=[2], pads=[1, 2])),
}


CASES = [("Conv", c) for c in CONVS] + [("ConvTranspose", c) for c in DECONVS]


@pytest.mark.parametrize("op, case", CASES)
def test_patches_times_the_weight_rows_give_the_op_output(op, case):
    """A Conv's patches times its weight's rows (output channels of a group by input
    channels x kernel) give its output; a ConvTranspose is read as the Conv it equals: its
    input spread out by the strides and padded, its kernel flipped, its channel axes swapped.
    The rows go back into the weight as they came."""
    spec = (CONVS if op == "Conv" else DECONVS)[case]
    rng = np.random.default_rng(3)
    x = rng.normal(size=spec["shape"]).astype(np.float32)
    w = rng.normal(size=spec["w"]).astype(np.float32)
    node = helper.make_node(op, ["x", "w"], ["y"], name="op", **spec["attrs"])
    model = onnx.shape_inference.infer_shapes(
        make_model([node], [tensor("x", list(x.shape))], [tensor("y", None)], {"w": w}))
    onnx.checker.check_model(model, full_check=True)
    y = run(model, {"x": x})[0]
    conv = G.import_graph(model).nodes[0]
    entry = TensorQuant("w", "weight", True, "", axis=0 if op == "Conv" else 1)
    why, key = _geometry(conv, w, entry)
    assert why is None
    site = Site(conv, conv.inputs[1], entry, "x", key)
    weights = site.rows()
    groups = int(spec["attrs"].get("group", 1))
    assert weights.shape == (groups, y.shape[1] // groups, w.size // y.shape[1])
    site.write(weights)
    np.testing.assert_array_equal(conv.inputs[1].values, w)
    positions = y.shape[0] * int(np.prod(y.shape[2:]))
    rows = _input_rows(x, key, positions + 10, np.random.default_rng(0))
    assert rows.shape == (groups, positions, weights.shape[2] + 1)
    np.testing.assert_array_equal(rows[:, :, -1], 1.0)  # the bias's constant input
    got = np.concatenate([rows[g, :, :-1] @ weights[g].T for g in range(groups)], axis=1)
    want = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(want, axis=0), rtol=1e-4,
                               atol=1e-5)
    if op == "ConvTranspose":  # a per-channel scale (one per channel of a group): each group's
        scale = np.arange(1, w.shape[1] + 1, dtype=np.float32)
        np.testing.assert_array_equal(site.per_row(scale, weights.shape[1]),
                                      np.tile(scale, (groups, 1)))


def test_matmul_rows_are_drawn_from_every_leading_axis():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 5)).astype(np.float32)
    rows = _input_rows(x, ("rows",), 100, rng)
    assert rows.shape == (1, 21, 6)
    np.testing.assert_array_equal(np.sort(rows[0, :, :5], axis=0),
                                  np.sort(x.reshape(-1, 5), axis=0))
    assert _input_rows(x, ("rows",), 8, rng).shape == (1, 8, 6)


def test_sites_round_what_they_can_and_say_why_not_the_rest():
    """A Conv, a ConvTranspose and a MatMul are rounded; a ConvTranspose that sets its output
    shape and a weight two MatMuls share are left to nearest rounding, each named."""
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], name="deconv"),
        helper.make_node("ConvTranspose", ["t", "wo"], ["o"], name="shaped",
                         output_shape=[5, 5]),
        helper.make_node("Flatten", ["o"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "wm"], ["m"], name="matmul"),
        helper.make_node("MatMul", ["m", "ws"], ["s1"], name="shared1"),
        helper.make_node("MatMul", ["s1", "ws"], ["s2"], name="shared2"),
    ]
    model = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("s2", None)],
                       {"wc": f(3, 2, 3, 3), "bc": f(3), "wt": f(3, 2, 2, 2),
                        "wo": f(2, 2, 2, 2), "wm": f(50, 8), "ws": f(8, 8)})
    model = onnx.shape_inference.infer_shapes(model)
    inserted = InsertQDQ(weights={"reduce_range": False}).run(model, PassContext()).model
    graph = G.import_graph(inserted)
    found, skipped = sites(graph, QuantTable.of(inserted))
    assert [s.node.name for s in found] == ["conv", "deconv", "matmul"]
    assert any(n.startswith("ConvTranspose 'shaped'") and "output shape" in n
               for n in skipped), skipped
    shared = [n for n in skipped if "'shared" in n]
    assert shared and all("more than one" in n for n in shared), skipped
    assert isinstance(found[0].weight, gs.Constant)
