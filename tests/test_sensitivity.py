"""The sensitivity search: the masked graph, the search itself, and calibrate's use of it.

- the masked graph computes the fake-quant graph with every mask 1, the graph with its
  activation pairs bypassed with every mask 0 (weights still quantized), exactly (the blend
  is x + m * (y - x) in float32, exact for m in {0, 1});
- ``search`` on a known additive score finds the fewest units that reach the target, in
  order of gain, and respects the limit;
- ``calibrate(target_sqnr_db=...)`` on the shipped digits CNN keeps float what the search
  picks, and the note's SQNRs are what the calibrated graphs score on the search batches
  (recomputed here, within 0.2 dB: the search's session lets onnxruntime fuse float ops).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphq import graph as G
from graphq import runtime
from graphq import sensitivity as S
from graphq.data import DataSource, samples_in
from graphq.passes.calibrate import Calibrate, _SpreadBatches
from graphq.passes.insert_qdq import InsertQDQ
from graphq.quant import QuantTable
from graphq.registry import PassContext

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def digits_feeds(n: int, batch: int = 16) -> list[dict[str, np.ndarray]]:
    with np.load(DIGITS / "calib.npz") as data:
        (name,) = [k for k in data.files if k != "label"]
        x = data[name]
    return [{name: x[i * batch:(i + 1) * batch]} for i in range(n)]


def exact(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session that computes the graph as written (no QDQ fusion into integer kernels,
    whose uint8 x int8 sums may saturate on CPUs without VNNI)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return runtime.session(model, options=options)


@pytest.fixture(scope="module")
def qdq_model() -> onnx.ModelProto:
    model = onnx.load(str(DIGITS / "digits_cnn.onnx"))
    return InsertQDQ().run(model, PassContext()).model


@pytest.fixture(scope="module")
def calibrated(qdq_model) -> onnx.ModelProto:
    return Calibrate(method="minmax").run(qdq_model, PassContext(
        data=DataSource(digits_feeds(4)))).model


def test_masked_model_blends_exactly(calibrated):
    table = QuantTable.of(calibrated)
    acts = [e.tensor for e in table.quantized("activation")]
    units = {t: i for i, t in enumerate(acts)}
    masked, mask_name = S.masked_model(calibrated, units, len(acts))
    onnx.checker.check_model(masked, full_check=True)
    sess = runtime.session(masked)
    feed = digits_feeds(5)[4]
    fake = runtime.run(exact(calibrated), feed)
    ones = runtime.run(sess, {**feed, mask_name: np.ones(len(acts), np.float32)})
    assert ones.keys() == fake.keys()
    for name in fake:
        np.testing.assert_array_equal(ones[name], fake[name])
    # every activation pair bypassed, weight pairs kept: the mask of zeros
    graph = G.import_graph(calibrated)
    for tensor, (q, dq) in G.qdq_pairs(graph).items():
        if tensor in units:
            G.replace_uses(graph, dq.outputs[0], q.inputs[0])
    weights_only = runtime.run(exact(G.export(graph.cleanup(), like=calibrated)), feed)
    zeros = runtime.run(sess, {**feed, mask_name: np.zeros(len(acts), np.float32)})
    for name in fake:
        np.testing.assert_array_equal(zeros[name], weights_only[name])
        assert not np.array_equal(zeros[name], fake[name])


def additive(gains: list[float], base: float):
    """score(mask) = base + the gains of the units kept float (mask 0)."""
    def score(mask: np.ndarray) -> float:
        return base + float(np.sum(np.asarray(gains)[mask == 0]))
    return score


def test_search_takes_the_fewest_in_order_of_gain():
    gains = [0.5, 4.0, 0.0, 2.0, 1.0, -1.0]
    result = S.search(additive(gains, 10.0), 6, target_db=15.5, limit=6)
    assert result.floats == [1, 3]           # 10 + 4 + 2 = 16 >= 15.5; one alone is 14
    assert result.baseline_db == 10.0 and result.final_db == 16.0
    assert result.gains_db == {i: g for i, g in enumerate(gains)}
    assert S.search(additive(gains, 10.0), 6, target_db=17.0, limit=6).floats == [1, 3, 4]


def test_search_stops_at_the_limit_and_when_met_already():
    gains = [0.5, 4.0, 0.0, 2.0, 1.0, -1.0]
    capped = S.search(additive(gains, 10.0), 6, target_db=40.0, limit=2)
    assert capped.floats == [1, 3] and capped.final_db == 16.0   # the best within the limit
    met = S.search(additive(gains, 10.0), 6, target_db=9.0, limit=6)
    assert met.floats == [] and met.runs == 1
    useless = S.search(additive([0.0, -0.5], 10.0), 2, target_db=20.0, limit=2)
    assert useless.floats == [] and useless.final_db == 10.0


def test_calibrate_keeps_float_what_the_search_picks(qdq_model):
    feeds = digits_feeds(4)
    result = Calibrate(method="minmax", target_sqnr_db=50.0, max_float=0.5,
                       search_batches=2).run(qdq_model, PassContext(data=DataSource(feeds)))
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    (note,) = [n for n in result.notes if n.startswith("sensitivity search")]
    table = QuantTable.of(model)
    picked = [e for e in table.entries.values() if e.role == "activation" and
              e.reason.startswith("kept float by the sensitivity search")]
    assert picked and all(not e.quantized and e.scale is None for e in picked)
    assert f"with {len(picked)} of" in note
    # the note's numbers are what the graphs score on the two batches calibrate kept
    spread = _SpreadBatches(2, 16, lambda feed: samples_in(feed, qdq_model))
    for feed in feeds:
        spread.offer(feed)
    search = spread.batches()
    assert len(search) == 2
    floats = runtime.session(G.with_outputs(qdq_model, [], float_view=True))
    ref = [runtime.run(floats, f) for f in search]
    written = exact(model)
    final = S.worst_sqnr(ref, [runtime.run(written, f) for f in search])
    baseline_model = Calibrate(method="minmax").run(
        qdq_model, PassContext(data=DataSource(feeds))).model
    plain = exact(baseline_model)
    baseline = S.worst_sqnr(ref, [runtime.run(plain, f) for f in search])
    # the search's session lets onnxruntime fuse float ops (rounding differences only)
    said = [float(w) for w in re.findall(r"([0-9.]+) dB with", note)]
    assert said == pytest.approx([baseline, final], abs=0.2), note
    assert final > baseline + 1.0
    pairs = G.qdq_pairs(G.import_graph(model))
    assert not {e.tensor for e in picked} & set(pairs)   # their Q/DQ pairs are gone
