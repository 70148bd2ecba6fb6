"""Fidelity per part of a concatenated output: a detection head whose one output holds box
coordinates (pixels) beside class scores (0..1) is judged on each part as well as whole, in
method auto's and the sensitivity search's scores and in emit's report.

The models are built here: ``x -> Conv -> (boxes: Conv * 300, scores: Sigmoid(Conv)) ->
Concat(axis 1) -> y``, the same with shape-only ops (Transpose, Reshape, Flatten, Unsqueeze)
between the Concat and y, and a YOLOX head (per level ``Concat([box, obj, cls], axis 1) ->
Reshape [N, 5 + C, H*W]``, the levels ``Concat(axis 2) -> Transpose(0, 2, 1)``). Numbers are
compared with numpy on the same slices (rtol 1e-9); each part found holds exactly the values
of the Concat inputs it stands for (onnxruntime, the values sorted: shape ops move values,
none change).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphq import graph as G
from graphq import runtime
from graphq import sensitivity as S
from graphq.kernels.quant import output_fidelity, sqnr_db
from graphq.passes.insert_qdq import InsertQDQ
from graphq.pipeline import PassManager
from graphq.registry import PassContext
from tests.helpers import make_model, run, tensor


def head(channels: int | str = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = {k: rng.normal(0, sd, s).astype(np.float32) for k, s, sd in
         (("W", (8, 3, 3, 3), 0.5), ("Wb", (4, 8, 1, 1), 0.5), ("Ws", (2, 8, 1, 1), 10.0))}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["f"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f"], ["r"]),
        helper.make_node("Conv", ["r", "Wb"], ["b"], name="box_conv"),
        helper.make_node("Mul", ["b", "stride"], ["boxes"], name="box_scale"),
        helper.make_node("Conv", ["r", "Ws"], ["s"], name="cls_conv"),
        helper.make_node("Sigmoid", ["s"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], name="head", axis=1),
    ]
    w["stride"] = np.array(300.0, np.float32)
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 6, 8, 8])], w)
    return onnx.shape_inference.infer_shapes(model)


def test_output_parts_of_a_concatenated_output():
    parts = G.output_parts(head())
    assert parts == {"y": [("y[:, 0:4]", 1, 0, 4), ("y[:, 4:6]", 1, 4, 6)]}


def test_no_parts_without_a_concat_or_with_unknown_sizes():
    model = head()
    model.graph.node[-1].op_type = "Sum"  # y is no longer a Concat's output
    del model.graph.node[-1].attribute[:]
    assert G.output_parts(model) == {}
    unknown = head()  # the scores replaced by an input of unknown channels
    unknown.graph.node[-1].input[1] = "extra"
    unknown.graph.input.append(tensor("extra", ["N", "C", 8, 8]))
    assert G.output_parts(unknown) == {}


def test_fidelity_of_each_part_and_the_worst():
    rng = np.random.default_rng(1)
    ref = [{"y": np.concatenate([rng.uniform(0, 300, (2, 4, 8, 8)),
                                 rng.uniform(0, 1, (2, 2, 8, 8))], 1).astype(np.float32)}
           for _ in range(3)]
    # boxes off by 0.5 px, scores by 0.1: the whole output looks fine, the scores do not
    got = [{"y": r["y"] + np.concatenate([np.full((2, 4, 8, 8), 0.5),
                                          np.full((2, 2, 8, 8), 0.1)], 1).astype(np.float32)}
           for r in ref]
    parts = G.output_parts(head())
    fid = output_fidelity(ref, got, parts)
    assert set(fid) == {"y", "y[:, 0:4]", "y[:, 4:6]"}
    a = np.concatenate([r["y"][:, 4:6].ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g["y"][:, 4:6].ravel() for g in got]).astype(np.float64)
    assert np.isclose(fid["y[:, 4:6]"]["sqnr_db"], sqnr_db(a, b), rtol=1e-9)
    assert fid["y"]["sqnr_db"] > 45 > 20 > fid["y[:, 4:6]"]["sqnr_db"]
    assert S.worst_sqnr(ref, got) == fid["y"]["sqnr_db"]
    assert S.worst_sqnr(ref, got, parts) == fid["y[:, 4:6]"]["sqnr_db"]


def quantized_report(model: onnx.ModelProto, tmp_path, data: list[dict[str, np.ndarray]]
                     ) -> tuple[dict[str, dict[str, float]], float, str]:
    """insert-qdq, calibrate (auto) and emit on ``model``: the report's outputs, the score
    auto gave the graph it kept, the text of report.md."""
    pipeline = ('[pipeline]\nverify = "off"\n[[passes]]\nname = "insert-qdq"\n'
                '[[passes]]\nname = "calibrate"\nmethod = "auto"\n[[passes]]\nname = "emit"\n')
    path = tmp_path / "head.onnx"
    onnx.save(model, str(path))
    result = PassManager.from_text(pipeline).run(path, tmp_path / "out", data=data)
    outputs = result.report["quantization"]["outputs"]
    notes = [n for p in result.report["passes"] if p["name"] == "calibrate" for n in p["notes"]]
    auto = next(n for n in notes if n.startswith("method auto"))
    kept = auto.split(": ")[-1].removesuffix(" kept")
    score = float(auto.split(f" {kept} ")[1].split(" dB")[0])
    return outputs, score, (tmp_path / "out" / "report.md").read_text()


def test_emit_reports_each_part(tmp_path):
    rng = np.random.default_rng(2)
    data = [{"x": rng.uniform(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    outputs, score, report = quantized_report(head(), tmp_path, data)
    assert set(outputs) == {"y", "y[:, 0:4]", "y[:, 4:6]"}
    worst = min(v["sqnr_db"] for v in outputs.values())
    assert worst < outputs["y"]["sqnr_db"] - 3  # the scores' part is the worst
    # auto scored its graph on the same batches by the worst part, not the whole output
    assert abs(score - worst) < 0.5, (score, outputs)
    assert "y[:, 4:6]" in report


def tailed(tail: list[onnx.NodeProto], shape: list | None, inits: dict | None = None,
           model: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """``model`` (:func:`head`) with its Concat's output renamed ``cat`` and ``tail`` (nodes
    from ``cat`` to ``y``) after it; ``shape``: y's, as declared."""
    model = head() if model is None else model
    next(n for n in model.graph.node if n.op_type == "Concat").output[0] = "cat"
    model.graph.node.extend(tail)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k)
                                   for k, v in (inits or {}).items())
    del model.graph.value_info[:], model.graph.output[:]
    model.graph.output.append(tensor("y", shape))
    return onnx.shape_inference.infer_shapes(model)


def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=f"{op}_{output}", **attrs)


TO_NHWC = node("Transpose", ["cat"], "t", perm=[0, 2, 3, 1])
SHAPED = [  # tail, y's shape, its constants, the parts' axis and (start, stop)
    ([node("Transpose", ["cat"], "y", perm=[0, 2, 3, 1])], ["N", 8, 8, 6], {},
     3, [(0, 4), (4, 6)]),
    ([node("Reshape", ["cat", "shape"], "y")], ["N", 6, 64], {"shape": np.array([0, 6, -1])},
     1, [(0, 4), (4, 6)]),  # the dims after the concat axis merged
    ([node("Flatten", ["cat"], "y", axis=1)], ["N", 384], {},
     1, [(0, 256), (256, 384)]),  # merged with the concat axis: a part spans 64x the indices
    ([TO_NHWC, node("Reshape", ["t", "shape"], "y")], ["N", 64, 6], {"shape": np.array([0, -1, 6])},
     2, [(0, 4), (4, 6)]),  # the dims before the concat axis merged
    ([node("Unsqueeze", ["cat", "a"], "u"), node("Transpose", ["u"], "y", perm=[1, 0, 3, 4, 2])],
     [1, "N", 8, 8, 6], {"a": np.array([1])}, 4, [(0, 4), (4, 6)]),
]


@pytest.mark.parametrize("tail, shape, inits, axis, spans", SHAPED,
                         ids=["transpose", "reshape-after", "flatten", "transpose-reshape-before",
                              "unsqueeze-transpose"])
def test_parts_through_shape_ops(tail, shape, inits, axis, spans):
    model = tailed(tail, shape, inits)
    parts = G.output_parts(model)
    assert parts == {"y": [(f"y[{', '.join([':'] * axis + [f'{a}:{b}'])}]", axis, a, b)
                           for a, b in spans]}
    assert_parts_hold(model, [["boxes"], ["scores"]])


@pytest.mark.parametrize("tail, shape, inits", [
    ([node("Reshape", ["cat", "shape"], "y")], ["N", 2, 3, 64], {"shape": np.array([0, 2, 3, -1])}),
    ([node("Reshape", ["cat", "shape"], "y")], ["N", 3, 128], {"shape": np.array([0, 3, -1])}),
    ([TO_NHWC, node("Reshape", ["t", "shape"], "y")], ["N", 384], {"shape": np.array([0, -1])}),
    ([node("Reshape", ["cat", "shape"], "y")], None, None),  # the shape is an input: not known
    ([node("Relu", ["cat"], "y")], ["N", 6, 8, 8], {}),  # not a shape-only op
], ids=["splits-the-axis", "regroups-the-axis", "merges-with-dims-before", "unknown", "relu"])
def test_no_parts_where_the_mapping_is_not_certain(tail, shape, inits):
    model = tailed(tail, shape, inits)
    if inits is None:
        model.graph.input.append(tensor("shape", [3], onnx.TensorProto.INT64))
    assert G.output_parts(model) == {}


def yolox(classes: int = 2) -> onnx.ModelProto:
    """``x [N, 3, 8, 8] -> Conv`` (level 0, 8x8) ``-> MaxPool`` (level 1, 4x4); each level
    ``Concat([Conv * 32, Sigmoid(Conv), Sigmoid(Conv)], axis 1) -> Reshape [N, 5+C, H*W]``;
    ``Concat(axis 2) -> Transpose(0, 2, 1)``: ``y [N, 80, 5+C]``."""
    rng = np.random.default_rng(3)
    w = {"W": rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32),
         "stride": np.array(32.0, np.float32), "s": np.array([0, 5 + classes, -1])}
    nodes = [helper.make_node("Conv", ["x", "W"], ["f0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["f0"], ["f1"], kernel_shape=[2, 2], strides=[2, 2])]
    for level in (0, 1):
        branches = []
        for kind, n, sd in (("box", 4, 0.5), ("obj", 1, 5.0), ("cls", classes, 5.0)):
            w[f"W{kind}{level}"] = rng.normal(0, sd, (n, 8, 1, 1)).astype(np.float32)
            nodes.append(node("Conv", [f"f{level}", f"W{kind}{level}"], f"{kind}_conv{level}"))
            scale = node("Mul", [f"{kind}_conv{level}", "stride"], f"{kind}{level}")
            nodes.append(scale if kind == "box" else
                         node("Sigmoid", [f"{kind}_conv{level}"], f"{kind}{level}"))
            branches.append(f"{kind}{level}")
        nodes += [node("Concat", branches, f"level{level}", axis=1),
                  node("Reshape", [f"level{level}", "s"], f"flat{level}")]
    nodes += [node("Concat", ["flat0", "flat1"], "anchors", axis=2),
              node("Transpose", ["anchors"], "y", perm=[0, 2, 1])]
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 80, 5 + classes])],
                       w)
    return onnx.shape_inference.infer_shapes(model)


def test_parts_of_a_yolox_head():
    model = yolox()
    assert G.output_parts(model) == {"y": [("y[:, :, 0:4]", 2, 0, 4), ("y[:, :, 4:5]", 2, 4, 5),
                                           ("y[:, :, 5:7]", 2, 5, 7)]}
    assert_parts_hold(model, [["box0", "box1"], ["obj0", "obj1"], ["cls0", "cls1"]])
    # levels whose channels are split otherwise: the parts are the levels' anchors
    other = yolox()
    next(n for n in other.graph.node if n.output[0] == "level1").input[:] = ["obj1", "box1",
                                                                              "cls1"]
    assert G.output_parts(other) == {"y": [("y[:, 0:64]", 1, 0, 64), ("y[:, 64:80]", 1, 64, 80)]}


def assert_parts_hold(model: onnx.ModelProto, pieces: list[list[str]]) -> None:
    """Part i of y holds the values of the tensors ``pieces[i]`` (sorted), and nothing else."""
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)
    names = [n for group in pieces for n in group]
    y, *values = run(G.with_outputs(model, names), {"x": x})
    found = dict(zip(names, values, strict=True))
    parts = G.output_parts(model)["y"]
    assert len(parts) == len(pieces)
    for (_, axis, start, stop), group in zip(parts, pieces, strict=True):
        part = np.take(y, np.arange(start, stop), axis=axis)
        expected = np.concatenate([found[n].ravel() for n in group])
        np.testing.assert_array_equal(np.sort(part.ravel()), np.sort(expected))


def test_yolox_parts_scored_by_auto_and_reported(tmp_path):
    rng = np.random.default_rng(5)
    data = [{"x": rng.uniform(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    outputs, score, report = quantized_report(yolox(), tmp_path, data)
    parts = G.output_parts(yolox())["y"]
    assert set(outputs) == {"y"} | {label for label, *_ in parts}
    worst = min(v["sqnr_db"] for v in outputs.values())
    assert worst < outputs["y"]["sqnr_db"] - 3  # a score part is the worst
    assert abs(score - worst) < 0.5, (score, outputs)
    assert all(label in report for label, *_ in parts)
    # the report's numbers are numpy's on the same slices of the float and deploy outputs
    sessions = [runtime.session(m, None) for m in
                (yolox(), onnx.load(str(tmp_path / "out" / "head.deploy.onnx")))]
    ref, got = ([runtime.run(sess, feed)["y"] for feed in data] for sess in sessions)
    for label, axis, start, stop in parts:
        a, b = (np.concatenate([np.take(y, np.arange(start, stop), axis).ravel() for y in ys])
                .astype(np.float64) for ys in (ref, got))
        assert np.isclose(outputs[label]["sqnr_db"], sqnr_db(a, b), rtol=1e-9)


def test_parts_through_qdq_pairs_and_the_sensitivity_blend():
    """The Concat of two Conv outputs is quantized: Q/DQ pairs stand between it and y (a
    Transpose, a Reshape), which the sensitivity search's masked graph blends. (The
    Transpose's output also feeds a Relu: values reaching a graph output only through
    Transpose/Reshape would stay float.)"""
    model = head()
    keep = [n for n in model.graph.node if n.op_type not in ("Mul", "Sigmoid")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.node[-1].input[:] = ["b", "s"]
    model = tailed([TO_NHWC, node("Reshape", ["t", "shape"], "y")], ["N", 64, 6],
                   {"shape": np.array([0, -1, 6])}, model)
    model.graph.node.append(node("Relu", ["t"], "z"))
    model.graph.output.append(tensor("z", ["N", 8, 8, 6]))
    expected = {"y": [("y[:, :, 0:4]", 2, 0, 4), ("y[:, :, 4:6]", 2, 4, 6)]}
    assert G.output_parts(model) == expected
    qdq = InsertQDQ().run(model, PassContext()).model
    pairs = G.qdq_pairs(G.import_graph(qdq))
    assert {"cat", "t"} <= set(pairs)  # the Concat's and the Transpose's outputs are quantized
    assert G.output_parts(qdq) == expected
    masked, _ = S.masked_model(qdq, {name: 0 for name in pairs}, 1)
    assert sum(n.op_type == "Add" for n in masked.graph.node) == len(pairs)
    assert G.output_parts(masked) == expected
