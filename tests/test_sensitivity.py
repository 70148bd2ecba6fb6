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


def test_search_ranks_on_rank_score_and_counts_on_score():
    """With rank_score (the same score on fewer batches) the per-unit gains are rank_score's
    and cost its runs; the baseline and the count kept float are score's: a ranking that
    differs from the full score's order decides which units go first, the full score how
    many it takes."""
    full, ranked = [0.5, 4.0, 0.0, 2.0, 1.0], [3.0, 0.2, 0.0, 2.5, 1.0]
    result = S.search(additive(full, 10.0), 5, target_db=12.6, limit=5,
                      rank_score=additive(ranked, 8.0))
    assert result.gains_db == pytest.approx({i: g for i, g in enumerate(ranked)})
    # order by ranked gains: 0, 3, 4, 1; full scores 10.5, 12.5, 13.5: three reach 12.6
    assert result.floats == [0, 3, 4]
    assert result.baseline_db == 10.0 and result.final_db == 13.5
    assert result.rank_runs == 6          # its own baseline and one run per unit
    assert result.runs == 5               # the baseline; k = 1, 2, 4 doubling, 3 bisecting
    plain = S.search(additive(full, 10.0), 5, target_db=12.6, limit=5)
    assert plain.floats == [1] and plain.rank_runs == 0


def test_session_scores_rank_on_batches_spread_over_the_feeds(qdq_model):
    """session_scores: the full score over every feed and the rank score over ``rank`` of
    them spread evenly, first and last included (one session)."""
    feeds = digits_feeds(5)
    floats = runtime.session(G.with_outputs(qdq_model, [], float_view=True))
    ref = [runtime.run(floats, f) for f in feeds]
    calibrated = Calibrate(method="minmax").run(qdq_model, PassContext(data=DataSource(feeds)))
    table = QuantTable.of(calibrated.model)
    acts = {e.tensor: i for i, e in enumerate(table.quantized("activation"))}
    masked, name = S.masked_model(calibrated.model, acts, len(acts))
    score, rank_score = S.session_scores(masked, feeds, ref, name, None, rank=2)
    mask = np.ones(len(acts), np.float32)
    sess = runtime.session(masked)
    outs = [runtime.run(sess, {**f, name: mask}) for f in feeds]
    assert score(mask) == pytest.approx(S.worst_sqnr(ref, outs), abs=1e-6)
    ends = [0, len(feeds) - 1]
    assert rank_score(mask) == pytest.approx(
        S.worst_sqnr([ref[i] for i in ends], [outs[i] for i in ends]), abs=1e-6)
    assert S.session_scores(masked, feeds, ref, name, None, rank=0)[1] is None
    assert S.session_scores(masked, feeds, ref, name, None, rank=5)[1] is None


def test_calibrate_ranks_on_rank_batches(qdq_model):
    """Option rank_batches: the search ranks on that many of the search batches and says so;
    the count is still found on all of them, and the target is still reached."""
    feeds = digits_feeds(4)
    result = Calibrate(method="minmax", target_sqnr_db=50.0, max_float=0.5, search_batches=4,
                       rank_batches=1).run(qdq_model, PassContext(data=DataSource(feeds)))
    onnx.checker.check_model(result.model, full_check=True)
    (note,) = [n for n in result.notes if n.startswith("sensitivity search")]
    assert "gains ranked on 1 of the 4 batches" in note and "runs of 4 batch(es)" in note, note
    baseline, final = (float(w) for w in re.findall(r"([0-9.]+) dB with", note))
    assert final > baseline + 1.0, note
    table = QuantTable.of(result.model)
    picked = [e for e in table.entries.values() if e.role == "activation" and
              e.reason.startswith("kept float by the sensitivity search")]
    assert picked and all("on 1 of the 4 search batches" in e.reason for e in picked)


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


def _activation_quantizers(model: onnx.ModelProto) -> int:
    """QuantizeLinear nodes of activations (weights' read initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "QuantizeLinear" and n.input[0] not in inits
               for n in model.graph.node)


def test_search_min_speedup_keeps_float_only_what_runs_fast_enough(qdq_model, monkeypatch):
    """search_min_speedup: of what the search picked, the first k stay float, k the most
    whose deploy graph runs at least that many times the float model's speed (timed side by
    side, bisected); the count is pinned as max_float_count, which reproduces the choice
    untimed. Timings are given (the machine is noisy): here a graph's speedup is the number
    of activations it quantizes, which falls as more stay float, so the bound set at the
    count of the graph with the first c float must cut the choice to exactly c."""
    from graphq import latency

    feeds = digits_feeds(4)
    common = {"method": "minmax", "target_sqnr_db": 60.0, "max_float": 0.5,
              "search_batches": 2}

    def calibrate(**options):
        return Calibrate(**common, **options).run(qdq_model, PassContext(data=DataSource(feeds)))

    def floats(result) -> list[str]:
        return sorted(e.tensor for e in QuantTable.of(result.model).entries.values()
                      if e.reason.startswith("kept float by the sensitivity search"))

    picked = floats(calibrate())
    assert len(picked) >= 3, picked
    timed = []

    def medians(models, feed, providers, **kw):
        timed.append(models)
        return [float(_activation_quantizers(models[1])), 1.0]

    monkeypatch.setattr(latency, "medians", medians)
    capped = calibrate(max_float_count=1)
    assert not timed and capped.pinned == {}
    assert len(floats(capped)) == 1 and set(floats(capped)) < set(picked)
    assert "(max_float_count 1)" in capped.notes[-1]
    bound = _activation_quantizers(capped.model)
    cut = calibrate(search_min_speedup=float(bound))
    assert timed and all(_activation_quantizers(m[0]) == 0 for m in timed)  # the float model
    for _, deploy in timed:  # deploy graphs: weights folded to integers
        onnx.checker.check_model(deploy, full_check=True)
    assert floats(cut) == floats(capped)
    assert cut.pinned == {"search_min_speedup": 0.0, "max_float_count": 1}
    (note,) = [n for n in cut.notes if n.startswith("sensitivity search")]
    assert f"the first 1 of them kept float: more runs under search_min_speedup {bound}" \
           in note, note
    # a bound every choice meets keeps all it picked; one none meets keeps none float
    timed.clear()
    assert floats(calibrate(search_min_speedup=1.0)) == picked and len(timed) == 1
    none = calibrate(search_min_speedup=1e9)
    assert floats(none) == [] and none.pinned["max_float_count"] == 0
    assert QuantTable.of(none.model).get(picked[0]).quantized


def test_a_speed_cut_that_scores_below_none_float_keeps_none(qdq_model, monkeypatch):
    """Segments picked together may help only together: where the first k kept float (the
    speed bound's cut) score below keeping none float, none is kept, and that is what is
    pinned. The search, its scores and the timings are given here."""
    from graphq import latency
    from graphq.passes import calibrate as calibrate_module

    def session_scores(model, feeds, reference, mask_name, providers, rank=0):
        return (lambda mask: 8.0 if mask[0] == 0.0 and mask[1] == 1.0 else 10.0), None

    def segment_search(masked, mask_name, pairs, count, feeds, score, target, limit, prov):
        return (S.Result(10.0, 15.0, [0, 1], runs=2, cuts=[0, 1, 2]),
                {0: "kept float by the sensitivity search: a", 1: "kept float by the "
                 "sensitivity search: b"}, 2)

    speeds = iter([[1.0, 2.0], [2.0, 1.0]])  # both float: 0.5x; the first alone: 2x
    monkeypatch.setattr(S, "session_scores", session_scores)
    monkeypatch.setattr(calibrate_module, "_segment_search", segment_search)
    monkeypatch.setattr(latency, "medians", lambda models, feed, providers, **kw: next(speeds))
    result = Calibrate(method="minmax", target_sqnr_db=20.0, search_by="segment",
                       search_min_speedup=1.0).run(
        qdq_model, PassContext(data=DataSource(digits_feeds(2))))
    (note,) = [n for n in result.notes if n.startswith("sensitivity search")]
    assert "with those 1 float the outputs scored 8.0 dB, below 10.0 dB with none: none kept " \
           "float" in note, note
    assert "-> 10.0 dB with 0 of" in note
    assert result.pinned == {"search_min_speedup": 0.0, "max_float_count": 0}
    table = QuantTable.of(result.model)
    assert not [e for e in table.entries.values() if "sensitivity" in e.reason]
