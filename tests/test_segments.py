"""Segments (graphq.segments) and calibrate's sensitivity search by segment.

The graph is PicoDet's failure in small: Conv (3 -> 8 channels, two of them 300x narrower
than the rest) -> HardSwish written out as paddle2onnx writes it (x * Clip(x + 3, 0, 6) / 6)
-> depthwise Conv whose weights on the two narrow channels are 1000x larger (what BN folding
leaves; the narrow channels then carry most of its output) -> 1x1 Conv. One uint8 scale over
the first conv's output leaves the narrow channels a level or two; every activation alone
keeps >= 25 dB, the depthwise conv's output does not.

- ``find``: the depthwise conv's segment holds the four tensors from the first conv's
  output to its input, bounded by that output; the 1x1 conv's holds the depthwise output;
- ``local_scores``: the SQNR each compute op's output keeps with only its segment quantized
  equals that SQNR recomputed here with the segment's Q/DQ pairs alone kept in the graph
  (onnxruntime, no graph optimizations; within 0.05 dB); the depthwise conv's is the lowest
  and far below 25 dB;
- ``search_groups`` on a known additive score takes the fewest groups in order, counts a
  unit once, stops at the limit, and may be cut only between groups;
- calibrate with ``target_sqnr_db`` and ``search_by = "segment"`` keeps the depthwise conv's
  segment float (the reason names the conv), and the output reaches the target on the search
  batches (recomputed here, within 0.2 dB of the note), where ``min_sqnr_db = 25`` alone
  keeps everything quantized and the output below 25 dB. Every result passes the checker.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

from graphq import graph as G
from graphq import segments as SEG
from graphq import sensitivity as S
from graphq.data import DataSource
from graphq.kernels.quant import sqnr_db
from graphq.passes.calibrate import Calibrate
from graphq.passes.insert_qdq import InsertQDQ
from graphq.quant import QuantTable
from graphq.registry import PassContext
from tests.helpers import make_model, run, tensor

NARROW = (6, 7)


def picodet_block(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w1[list(NARROW)] /= 300.0
    dw = rng.normal(0, 1.0, (8, 1, 3, 3)).astype(np.float32)
    dw[list(NARROW)] *= 1000.0
    w3 = rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32)
    inits = {"w1": w1, "b1": rng.normal(0, 0.2, 8).astype(np.float32), "dw": dw,
             "b2": np.zeros(8, np.float32), "w3": w3, "three": np.float32(3.0),
             "zero": np.float32(0.0), "six": np.float32(6.0)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Add", ["c1", "three"], ["a1"], name="add"),
        helper.make_node("Clip", ["a1", "zero", "six"], ["g1"], name="clip"),
        helper.make_node("Mul", ["c1", "g1"], ["m1"], name="mul"),
        helper.make_node("Div", ["m1", "six"], ["h1"], name="div"),
        helper.make_node("Conv", ["h1", "dw", "b2"], ["d1"], name="dwconv", group=8,
                         pads=[1] * 4),
        helper.make_node("Conv", ["d1", "w3"], ["y"], name="pwconv"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 3, 12, 12])], [tensor("y", ["N", 4, 12, 12])],
                       inits)
    return onnx.shape_inference.infer_shapes(model)


def feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (4, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def qdq() -> onnx.ModelProto:
    return InsertQDQ(weights={"reduce_range": False}).run(picodet_block(), PassContext()).model


@pytest.fixture(scope="module")
def calibrated(qdq) -> onnx.ModelProto:
    return Calibrate(method="minmax").run(qdq, PassContext(data=DataSource(feeds(4)))).model


def units_of(model: onnx.ModelProto) -> dict[str, int]:
    table = QuantTable.of(model)
    names = [e.tensor for e in table.quantized("activation") if e.method != "constant"]
    return {n: i for i, n in enumerate(names)}


def test_find_bounds_each_segment_at_the_compute_op_before_it(calibrated):
    units = units_of(calibrated)
    masked, mask = S.masked_model(calibrated, units, len(units))
    segments = {s.where: s for s in SEG.find(masked, units, mask)}
    names = {i: n for n, i in units.items()}
    dw = segments["Conv 'dwconv'"]
    assert dw.end == "d1" and dw.bounds == ["c1"]
    assert {names[u] for u in dw.units} == {"c1", "g1", "m1", "h1"} & set(units)
    assert {names[u] for u in segments["Conv 'pwconv'"].units} == {"d1"}
    assert segments["Conv 'conv1'"].bounds == ["x"]
    assert mask not in {b for s in segments.values() for b in s.bounds}


def only(model: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """``model`` with the activation Q/DQ pairs not on ``keep`` bypassed (weights stay)."""
    graph = G.import_graph(model)
    activations = set(units_of(model))
    for name, (q, dq) in G.qdq_pairs(graph).items():
        if name in activations and name not in keep:
            G.replace_uses(graph, dq.outputs[0], q.inputs[0])
    return G.export(graph.cleanup().toposort(), like=model)


def test_local_scores_are_each_segments_error_at_its_compute_op(calibrated):
    units = units_of(calibrated)
    names = {i: n for n, i in units.items()}
    masked, mask = S.masked_model(calibrated, units, len(units))
    segments = SEG.find(masked, units, mask)
    data = feeds(2, seed=5)
    scores = SEG.local_scores(masked, mask, len(units), segments, data)
    assert set(scores) == set(range(len(segments)))
    for i, segment in enumerate(segments):
        keep = {names[u] for u in segment.units}
        probe = onnx.ModelProto()
        probe.CopyFrom(only(calibrated, keep))
        probe.graph.output.append(helper.make_tensor_value_info(segment.end, 1, None))
        # every other activation float, the weights quantized in both
        plain = onnx.ModelProto()
        plain.CopyFrom(only(calibrated, set()))
        plain.graph.output.append(helper.make_tensor_value_info(segment.end, 1, None))
        ref = np.concatenate([run(plain, f)[-1] for f in data])
        got = np.concatenate([run(probe, f)[-1] for f in data])
        assert scores[i] == pytest.approx(sqnr_db(ref, got), abs=0.05), segment.where
    worst = min(scores, key=scores.get)
    assert segments[worst].where == "Conv 'dwconv'" and scores[worst] < 20.0


def additive(gains: dict[int, float], base: float):
    return lambda mask: base + sum(g for u, g in gains.items() if mask[u] == 0.0)


def test_search_groups_takes_the_fewest_groups_in_order():
    gains = {0: 4.0, 1: 1.0, 2: 2.0, 3: 0.5, 4: 3.0}
    groups = [[0, 1], [1, 2], [4], [3]]
    result = SEG.search_groups(additive(gains, 10.0), 5, groups, 16.5, limit=5)
    assert result.floats == [0, 1, 2]         # 10 + 4 + 1 + 2 = 17; the first group alone 15
    assert result.baseline_db == 10.0 and result.final_db == 17.0
    assert result.cuts == [0, 2, 3]  # a cut keeps whole groups: none, [0, 1], [0, 1, 2]
    capped = SEG.search_groups(additive(gains, 10.0), 5, groups, 40.0, limit=4)
    assert capped.floats == [0, 1, 2, 4] and capped.final_db == 20.0
    met = SEG.search_groups(additive(gains, 10.0), 5, groups, 9.0, limit=5)
    assert met.floats == [] and met.runs == 1


def worst_output(model: onnx.ModelProto, reference: onnx.ModelProto, data) -> float:
    return min(sqnr_db(np.concatenate([run(reference, f)[0] for f in data]),
                       np.concatenate([run(model, f)[0] for f in data])),
               np.inf)


def test_calibrate_search_by_segment_keeps_the_depthwise_input_float(qdq):
    data = feeds(4)
    plain = Calibrate(method="minmax", min_sqnr_db=25.0).run(
        qdq, PassContext(data=DataSource(data))).model
    table = QuantTable.of(plain)
    assert all(e.quantized for e in table.quantized("activation"))  # each alone is fine
    before = worst_output(plain, picodet_block(), data)
    assert before < 25.0
    result = Calibrate(method="minmax", min_sqnr_db=25.0, target_sqnr_db=30.0,
                       search_by="segment", max_float=1.0, search_batches=4).run(
        qdq, PassContext(data=DataSource(data)))
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    (note,) = [n for n in result.notes if n.startswith("sensitivity search by segment")]
    floats = {e.tensor: e for e in QuantTable.of(model).entries.values()
              if e.role == "activation" and e.reason.startswith("kept float by the sensitivity")}
    assert "c1" in floats and "Conv 'dwconv'" in floats["c1"].reason
    assert not set(floats) & set(G.qdq_pairs(G.import_graph(model)))  # their pairs are gone
    after = worst_output(model, picodet_block(), data)
    said = [float(w) for w in re.findall(r"(-?[0-9.]+) dB with", note)]
    assert said == pytest.approx([before, after], abs=0.2), note
    assert after >= 30.0 and "target 30 dB reached" in note


def if_net() -> onnx.ModelProto:
    """x -> MatMul -> m -> Sigmoid -> s; an If (cond: an input) passes s out, or 1 - s: the
    activations m and s reach the output only through the If."""
    rng = np.random.default_rng(3)
    one = helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])
    then = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "then", [],
                             [tensor("t", ["N", 8])])
    other = helper.make_graph([helper.make_node("Sub", ["one", "s"], ["e"])], "else", [],
                              [tensor("e", ["N", 8])], [one])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Sigmoid", ["m"], ["s"], name="sig"),
             helper.make_node("If", ["c"], ["y"], name="choose", then_branch=then,
                              else_branch=other)]
    return make_model(nodes, [tensor("x", ["N", 16]), tensor("c", [], onnx.TensorProto.BOOL)],
                      [tensor("y", ["N", 8])],
                      {"w": rng.normal(0, 1, (16, 8)).astype(np.float32)})


def test_activations_that_reach_the_outputs_through_an_if_have_a_segment():
    """The walks stop at an If (its branches are not walked into): the tensors it reads, its
    branches' reads of this graph included, end segments of their own, so the segment search
    can keep them float."""
    rng = np.random.default_rng(4)
    data = [{"x": rng.normal(0, 2, (4, 16)).astype(np.float32), "c": np.array(i % 2 == 0)}
            for i in range(4)]
    placed = InsertQDQ(weights={"reduce_range": False}).run(if_net(), PassContext()).model
    model = Calibrate(method="minmax").run(placed, PassContext(data=DataSource(data))).model
    units = units_of(model)
    assert {"m", "s"} <= set(units)
    masked, mask = S.masked_model(model, units, len(units))
    segments = SEG.find(masked, units, mask)
    names = {i: n for n, i in units.items()}
    reached = [s for s in segments if s.where.startswith("If 'choose' input")]
    assert len(reached) == 1 and {names[u] for u in reached[0].units} == {"m", "s"}
    assert reached[0].bounds == ["m"]  # the MatMul's output: fed float
    scores = SEG.local_scores(masked, mask, len(units), segments, data)
    index = segments.index(reached[0])
    assert index in scores and 20.0 < scores[index] < 80.0
