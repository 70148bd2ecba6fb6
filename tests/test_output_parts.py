"""Fidelity per part of a concatenated output: a detection head whose one output holds box
coordinates (pixels) beside class scores (0..1) is judged on each part as well as whole, in
method auto's and the sensitivity search's scores and in emit's report.

The model is built here: ``x -> Conv -> (boxes: Conv * 300, scores: Sigmoid(Conv)) ->
Concat(axis 1) -> y``. Numbers are compared with numpy on the same slices (rtol 1e-9).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphq import graph as G
from graphq import sensitivity as S
from graphq.kernels.quant import output_fidelity, sqnr_db
from graphq.pipeline import PassManager
from tests.helpers import make_model, tensor


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


def test_emit_reports_each_part(tmp_path):
    rng = np.random.default_rng(2)
    data = [{"x": rng.uniform(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    pipeline = ('[pipeline]\nverify = "off"\n[[passes]]\nname = "insert-qdq"\n'
                '[[passes]]\nname = "calibrate"\nmethod = "auto"\n[[passes]]\nname = "emit"\n')
    path = tmp_path / "head.onnx"
    onnx.save(head(), str(path))
    result = PassManager.from_text(pipeline).run(path, tmp_path / "out", data=data)
    outputs = result.report["quantization"]["outputs"]
    assert set(outputs) == {"y", "y[:, 0:4]", "y[:, 4:6]"}
    notes = [n for p in result.report["passes"] if p["name"] == "calibrate" for n in p["notes"]]
    auto = next(n for n in notes if n.startswith("method auto"))
    kept = auto.split(": ")[-1].removesuffix(" kept")
    score = float(auto.split(f" {kept} ")[1].split(" dB")[0])
    worst = min(v["sqnr_db"] for v in outputs.values())
    assert worst < outputs["y"]["sqnr_db"] - 3  # the scores' part is the worst
    # auto scored its graph on the same batches by the worst part, not the whole output
    assert abs(score - worst) < 0.5, (auto, outputs)
    assert "y[:, 4:6]" in (tmp_path / "out" / "report.md").read_text()
