"""emit, through the pass manager: the files, the deploy graph, the report; refusals.

A weight-heavy net built here (Conv 64x64x3x3, Gemm 256x64, 256x256, 10x256) goes through
insert-qdq, calibrate (minmax) and emit into a temporary folder. Tolerances:

- deploy vs fake-quant outputs in onnxruntime with graph optimizations off: within 1e-6 of the
  output's largest magnitude (the output is a float Gemm after DequantizeLinear, and the
  deploy integers are those QuantizeLinear computes, so they agree to float rounding);
- fake-quant vs float: cosine similarity > 0.99;
- deploy size: more than 3x smaller than the float file (int8 weights, int32 biases).

W4A8 (int4 weights, uint8 activations) runs the same pipeline on that net and on a MatMul net:
opset 21 and INT4 zero points and deploy weights; the deploy weights equal a numpy 4-bit
quantization (``scale = max|w| / 7`` per output channel, [-8, 7]); deploy vs fake-quant within
1e-6 of the output's largest magnitude (far inside one quantization step), optimizations off
and on; weight initializers 8x smaller than float32 (the whole conv net's file > 6x, measured
6.6x: per-channel scales and int32 biases stay). The shipped digits CNN at W4A8 keeps top-1
within 0.015 of float on its 360 held-out images (measured: float 0.9972, W4A8 0.9889).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphq import graph as G
from graphq import runtime
from graphq.errors import DataError, PassError
from graphq.kernels import quant as Q
from graphq.passes import emit as E
from graphq.passes.calibrate import Calibrate
from graphq.passes.canonicalize import Canonicalize
from graphq.passes.emit import Emit
from graphq.passes.fold_bn import FoldBN
from graphq.passes.insert_qdq import InsertQDQ
from graphq.pipeline import PassManager
from graphq.quant import METADATA_KEY, QuantTable
from tests.helpers import make_model, run, tensor

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
FILES = {"net.deploy.onnx", "net.fakequant.onnx", "quant_record.json", "report.md",
         "report.json", "pipeline.toml"}


def heavy_net(rng: np.random.Generator) -> onnx.ModelProto:
    def w(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32)

    inits = {"wc": w(64, 64, 3, 3), "bc": w(64, 1)[:, 0] * 0.1,
             "w1": w(256, 64), "b1": w(256, 1)[:, 0] * 0.1,
             "w2": w(256, 256), "b2": w(256, 1)[:, 0] * 0.1,
             "w3": w(10, 256), "b3": w(10, 1)[:, 0] * 0.1}
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["g2"], name="fc2", transB=1),
        helper.make_node("Relu", ["g2"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="fc3", transB=1),
    ]
    model = make_model(nodes, [tensor("x", ["N", 64, 6, 6])], [tensor("y", ["N", 10])], inits)
    return onnx.shape_inference.infer_shapes(model)


def inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    base = rng.normal(0, 1, (n, 64, 1, 1)) + 0.3 * rng.normal(0, 1, (n, 64, 6, 6))
    return base.astype(np.float32)


def passes(**emit_options) -> list:
    emit_options.setdefault("latency_runs", 0)
    return [InsertQDQ(weights={"reduce_range": False}), Calibrate(method="minmax"),
            Emit(**emit_options)]


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    """One run shared by the tests that only read its files."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("emit")
    path = folder / "net.onnx"
    onnx.save(heavy_net(rng), path)
    calib = [{"x": inputs(rng, 16)}, {"x": inputs(rng, 16)}]
    out = folder / "out"
    result = PassManager(passes(latency_runs=2)).run(path, out, data=calib)
    return {"model": path, "out": out, "result": result, "x": inputs(rng, 16)}


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


# ---- files --------------------------------------------------------------------------------------
def test_writes_every_file_and_no_opt_model(emitted):
    names = {p.name for p in emitted["out"].iterdir()}
    assert names == FILES
    assert not (emitted["out"] / "net.opt.onnx").exists()
    for name in ("net.deploy.onnx", "net.fakequant.onnx"):
        onnx.checker.check_model(str(emitted["out"] / name), full_check=True)


def test_quant_record_is_the_table_of_the_fakequant_graph(emitted):
    record = json.loads((emitted["out"] / "quant_record.json").read_text())
    fakequant = onnx.load(emitted["out"] / "net.fakequant.onnx")
    assert record == QuantTable.of(fakequant).to_json()
    roles = {t["tensor"]: t["role"] for t in record["tensors"] if t["quantized"]}
    assert {k for k, v in roles.items() if v == "weight"} == {"wc", "w1", "w2", "w3"}
    assert {k for k, v in roles.items() if v == "bias"} == {"bc", "b1", "b2", "b3"}
    assert all(t["reason"] for t in record["tensors"])


def test_pipeline_file_reads_back(emitted):
    manager = PassManager.from_toml(emitted["out"] / "pipeline.toml")
    assert [p.name for p in manager.passes] == ["insert-qdq", "calibrate", "emit"]


def test_report_has_a_quantization_section(emitted):
    report = json.loads((emitted["out"] / "report.json").read_text())
    q = report["quantization"]
    assert q["size_bytes"]["deploy"] < q["size_bytes"]["float"]
    # the files' bytes, nodes and names included (not the tensors' data alone)
    assert q["size_bytes"] == {"float": emitted["model"].stat().st_size,
                               "deploy": (emitted["out"] / "net.deploy.onnx").stat().st_size}
    assert q["tensors"]["quantized"] > 0
    assert q["outputs"]["y"]["cosine"] > 0.99
    # two batches: the worse one's own SQNR beside the pooled one, in the summary too
    y = q["outputs"]["y"]
    assert y["worst_batch_sqnr_db"] <= y["sqnr_db"]
    assert f"SQNR {y['sqnr_db']:.1f} dB (the worst batch {y['worst_batch_sqnr_db']:.1f} dB)" \
        in "\n".join(E.summary_lines(q))
    assert set(q["latency_ms"]) == {"float", "deploy", "speedup", "runs", "samples",
                                    "disturbed"}
    assert q["latency_ms"]["runs"] == 2  # latency_runs: a small net is far from the cap
    assert q["worst_tensors"] and all("sqnr_db" in row for row in q["worst_tensors"])
    assert q["worst_tensors_samples"] == 32  # both calibration batches of 16 (at most 4)
    assert "accuracy" not in q  # the calibration data carries no labels
    # where the outputs were measured, in the log's summary and the report: here in-sample
    (where,) = [line for line in E.summary_lines(q) if line.startswith("measured against")]
    assert where.startswith("measured against the float model on 32 samples of the "
                            "calibration data (what the scales were fitted to: it can read "
                            "far better than held-out data"), where
    assert where in (emitted["out"] / "report.md").read_text()
    text = (emitted["out"] / "report.md").read_text()
    assert text.startswith("# graphq quantization report") and "quant_record.json" in text
    assert "on the first 32 samples of the eval data" in text


def test_worst_tensors_are_measured_over_the_first_batches(emitted):
    """Each listed tensor's SQNR sums the squares of the first batches (not the first
    batch's alone, which for a batch-1 model is one sample), against its own quantization
    and against the float view (the error that reaches it: lower past the first layer)."""
    report = json.loads((emitted["out"] / "report.json").read_text())["quantization"]
    fakequant = onnx.load(emitted["out"] / "net.fakequant.onnx")
    pairs = {name: dq.outputs[0].name
             for name, (_, dq) in G.qdq_pairs(G.import_graph(fakequant)).items()}
    rows = report["worst_tensors"][:3]
    probed = G.with_outputs(fakequant, [r["tensor"] for r in rows] +
                            [pairs[r["tensor"]] for r in rows])
    rng = np.random.default_rng(0)
    heavy_net(rng)  # the fixture's draws, in order: the net, then the two batches
    batches = [{"x": inputs(rng, 16)}, {"x": inputs(rng, 16)}]
    unfused = ort.SessionOptions()  # the Q/DQ pairs as written, as emit runs them
    unfused.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(probed.SerializeToString(), unfused,
                                   providers=["CPUExecutionProvider"])
    outs = [dict(zip([o.name for o in session.get_outputs()], session.run(None, b),
                     strict=True)) for b in batches]
    exact = ort.InferenceSession(
        G.with_outputs(fakequant, [r["tensor"] for r in rows],
                       float_view=True).SerializeToString(), unfused,
        providers=["CPUExecutionProvider"])
    floats = [dict(zip([o.name for o in exact.get_outputs()], exact.run(None, b), strict=True))
              for b in batches]
    for row in rows:
        a = np.concatenate([o[row["tensor"]].ravel() for o in outs]).astype(np.float64)
        b = np.concatenate([o[pairs[row["tensor"]]].ravel() for o in outs]).astype(np.float64)
        assert row["sqnr_db"] == pytest.approx(Q.sqnr_db(a, b), abs=1e-6)
        # against the float view: all the error that reaches it, its own included
        f = np.concatenate([o[row["tensor"]].ravel() for o in floats]).astype(np.float64)
        assert row["sqnr_vs_float_db"] == pytest.approx(Q.sqnr_db(f, b), abs=1e-6)
    assert any(r["sqnr_vs_float_db"] < r["sqnr_db"] - 1.0 for r in report["worst_tensors"])
    assert "| tensor | SQNR (dB) | SQNR vs float (dB) | range |" in \
        (emitted["out"] / "report.md").read_text()



def test_eval_limit_counts_samples_on_the_batch_axis(tmp_path):
    """A recurrent state [2, N, 3] as the first input: eval_limit counts samples on each
    input's batch axis (not the first input's first dim), and the report says how many."""
    rng = np.random.default_rng(6)
    w = rng.normal(0, 1, (4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["state", "axis0"], ["state_sum"], keepdims=0),
             helper.make_node("Add", ["h", "state_sum"], ["y"], name="add")]
    model = make_model(nodes, [tensor("state", [2, "N", 3]), tensor("x", ["N", 4])],
                       [tensor("y", ["N", 3])], {"w": w, "axis0": np.array([0], np.int64)})
    path = tmp_path / "rnn.onnx"
    onnx.save(model, path)
    data = [{"state": rng.normal(0, 1, (2, 4, 3)).astype(np.float32),
             "x": rng.normal(0, 1, (4, 4)).astype(np.float32)} for _ in range(6)]
    out = tmp_path / "out"
    PassManager(passes(eval_limit=8)).run(path, out, data=data)
    report = json.loads((out / "report.json").read_text())["quantization"]
    assert report["eval_samples"] == 8  # two batches of 4 (a count of 2 a batch: 4 batches)
    text = (out / "report.md").read_text()
    assert "measured against the float model on 8 samples of " in text
    # the limit cut 4 batches off: the report says so (a [frames, bins] model's first file
    # alone, 1200 frames of a 16-piece folder, had read as the whole held-out set)
    assert ("(its first 2 batch(es): eval_limit 8 samples reached, the rest not measured; "
            "emit's eval_limit measures more)") in text
    PassManager(passes(eval_limit=8)).run(path, out, data=data[:2])
    assert "eval_limit" not in (out / "report.md").read_text()  # all of it measured


def test_measuring_and_timing_say_what_they_do(tmp_path, monkeypatch, caplog):
    """emit's measuring runs (the float model and the deploy graph on each piece of the eval
    data, then the worst-tensor probes) report progress, and the timing says it times: a
    large model's emit had run two silent minutes."""
    from graphq.progress import Progress

    class Every(Progress):  # a line at every step (5 s apart otherwise)
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "every": 0.0})

    monkeypatch.setattr(E, "Progress", Every)
    rng = np.random.default_rng(12)
    path = tmp_path / "heavy.onnx"
    onnx.save(heavy_net(rng), path)
    data = [{"x": inputs(rng, 4)} for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="graphq"):
        PassManager(passes(latency_runs=3)).run(path, tmp_path / "out", data=data)
    assert "emit: measuring fidelity: 6/6 runs" in caplog.text  # 3 batches x 2 graphs
    assert re.search(r"emit: worst tensors: \d+/\d+ pieces", caplog.text)
    assert "emit: timing the float model and the deploy graph (3 interleaved rounds" \
        in caplog.text


def test_eval_data_is_read_in_the_pipeline_datas_batches(tmp_path):
    """ICLabel averages its views over the rows of a batch: its rows are not independent,
    and held-out data read in 64-row batches measured another model than the 16-row batches
    it was calibrated on. eval_data is read in the pipeline data's batch size (64 rows where
    the pipeline has no data source of its own)."""
    from graphq.data import DataSource
    from graphq.registry import PassContext

    model = heavy_net(np.random.default_rng(7))
    held = tmp_path / "held.npz"
    np.savez(held, x=inputs(np.random.default_rng(8), 40))
    emit = Emit(eval_data=str(held))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=inputs(np.random.default_rng(9), 16))
    ctx = PassContext(data=DataSource(calib, batch_size=8))
    feeds, _, _, total = emit._eval_feeds(model, ctx)
    assert [f["x"].shape[0] for f in feeds] == [8] * 5 and total == 40
    feeds, _, _, total = emit._eval_feeds(model, PassContext())
    assert [f["x"].shape[0] for f in feeds] == [40] and total == 40


@pytest.mark.parametrize("mode", ["float", "integer"])
def test_weights_of_ops_that_stay_float_are_stored_dequantized(tmp_path, mode):
    """x -> MatMul(w1) -> h -> MatMul(w2) -> y with x kept float (an override, as min_sqnr_db
    keeps outlier activations): no integer kernel can run the first MatMul, so its weight is
    stored as its dequantized float values (float_op_weights = "float", the default): no
    DequantizeLinear on every run. The second MatMul reads a quantized h: its weight stays
    integer. "integer" keeps both DequantizeLinears. The deploy computes what the fake-quant
    graph computes."""
    rng = np.random.default_rng(7)
    inits = {"w1": rng.normal(0, 0.5, (16, 32)).astype(np.float32),
             "w2": rng.normal(0, 0.5, (32, 8)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    model = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 8])], inits)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    data = [{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(3)]
    out = tmp_path / "out"
    steps = [InsertQDQ(weights={"reduce_range": False}, overrides={"x": {"quantize": False}}),
             Calibrate(method="minmax"), Emit(latency_runs=0, float_op_weights=mode)]
    PassManager(steps).run(path, out, data=data)
    deploy = onnx.load(out / "mlp.deploy.onnx")
    inits = initializers(deploy)
    producer = {o: n for n in deploy.graph.node for o in n.output}
    weight = {n.name: n.input[1] for n in deploy.graph.node if n.op_type == "MatMul"}
    entry = next(e for e in json.loads((out / "quant_record.json").read_text())["tensors"]
                 if e["tensor"] == "w1")
    assert entry["quantized"]  # the record is the fake-quant's: w1 is quantized there
    if mode == "float":
        assert weight["mm1"] in inits and weight["mm1"] not in producer
        values = numpy_helper.to_array(inits[weight["mm1"]])
        steps = values / np.asarray(entry["scale"], np.float32)  # per output column
        np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)  # on the int8 grid
    else:
        assert producer[weight["mm1"]].op_type == "DequantizeLinear"
    assert producer[weight["mm2"]].op_type == "DequantizeLinear"  # integer-fed: stays int8
    report = json.loads((out / "report.json").read_text())["quantization"]
    assert report["size_bytes"]["deploy"] > (16 * 32 * 4 if mode == "float" else 0)
    fakequant = onnx.load(out / "mlp.fakequant.onnx")
    probe = {"x": rng.normal(0, 1, (8, 16)).astype(np.float32)}
    for a, b in zip(run(fakequant, probe), run(deploy, probe), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

# ---- the deploy graph ---------------------------------------------------------------------------
def test_deploy_has_integer_weights_and_biases_feeding_dequantize(emitted):
    deploy = onnx.load(emitted["out"] / "net.deploy.onnx")
    inits = initializers(deploy)
    for q in (n for n in deploy.graph.node if n.op_type == "QuantizeLinear"):
        assert q.input[0] not in inits, f"QuantizeLinear of the constant '{q.input[0]}'"
    kinds = {}
    for dq in (n for n in deploy.graph.node if n.op_type == "DequantizeLinear"):
        if dq.input[0] in inits:
            kinds[dq.input[0]] = inits[dq.input[0]].data_type
    assert sorted(kinds.values()).count(TensorProto.INT8) == 4
    assert sorted(kinds.values()).count(TensorProto.INT32) == 4
    assert len(kinds) == 8
    for name in ("wc", "w1", "w2", "w3", "bc", "b1", "b2", "b3"):
        assert name not in inits  # no float copy of a weight or bias left
    assert all(p.key != METADATA_KEY for p in deploy.metadata_props)


def test_deploy_integers_are_what_quantize_linear_computes(emitted):
    """Each int8 weight in the deploy graph equals onnxruntime's QuantizeLinear output for
    the same weight in the fake-quant graph."""
    fakequant = onnx.load(emitted["out"] / "net.fakequant.onnx")
    deploy = onnx.load(emitted["out"] / "net.deploy.onnx")
    inits = {k: numpy_helper.to_array(v) for k, v in initializers(deploy).items()}
    probe = onnx.ModelProto()
    probe.CopyFrom(fakequant)
    weights = [q for q in probe.graph.node if q.op_type == "QuantizeLinear"
               and q.input[0] in ("wc", "w1", "w2", "w3")]
    probe.graph.output.extend(tensor(q.output[0], None, TensorProto.INT8) for q in weights)
    outs = run(probe, {"x": emitted["x"][:1]})[1:]
    for q, ints in zip(weights, outs, strict=True):
        np.testing.assert_array_equal(inits[q.output[0]], ints)


def test_deploy_is_about_4x_smaller(emitted):
    float_size = emitted["model"].stat().st_size
    deploy_size = (emitted["out"] / "net.deploy.onnx").stat().st_size
    assert float_size / deploy_size > 3.0


def test_deploy_equals_fakequant_and_both_are_close_to_float(emitted):
    out = emitted["out"]
    x = {"x": emitted["x"]}
    ref = run(onnx.load(emitted["model"]), x)[0]
    fq = run(onnx.load(out / "net.fakequant.onnx"), x)[0]
    dep = run(onnx.load(out / "net.deploy.onnx"), x)[0]
    assert np.max(np.abs(dep - fq)) <= 1e-6 * np.max(np.abs(fq)) + 1e-7
    cos = float(np.sum(ref * fq) / (np.linalg.norm(ref) * np.linalg.norm(fq)))
    assert cos > 0.99


# ---- eval data with labels ----------------------------------------------------------------------
def test_eval_data_with_labels_gives_top1_before_and_after(tmp_path):
    rng = np.random.default_rng(1)
    model = heavy_net(rng)
    x = inputs(rng, 64)
    labels = run(model, {"x": x})[0].argmax(axis=1)  # the float model is right by construction
    np.savez(tmp_path / "eval.npz", x=x, label=labels)
    result = PassManager(passes(eval_data=str(tmp_path / "eval.npz"))).run(
        model, tmp_path / "out", data=[{"x": inputs(rng, 32)}])
    q = result.report["quantization"]
    assert q["eval_data"] == str(tmp_path / "eval.npz")
    acc = q["accuracy"]
    assert acc["top1_float"] == 1.0 and acc["top5_float"] == 1.0
    assert 0.9 <= acc["top1_quantized"] <= 1.0 and acc["top5_quantized"] >= 0.98
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["quantization"]["accuracy"] == acc


# ---- refusals: nothing is written ---------------------------------------------------------------
@pytest.mark.parametrize("existing", [False, True])
def test_emit_without_calibrate_is_a_pass_error_and_writes_nothing(tmp_path, existing):
    rng = np.random.default_rng(2)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    manager = PassManager([InsertQDQ(), Emit(latency_runs=0)])
    with pytest.raises(PassError, match="run calibrate before emit"):
        manager.run(heavy_net(rng), out, data=[{"x": inputs(rng, 4)}])
    assert (list(out.iterdir()) == []) if existing else not out.exists()


def test_emit_without_insert_qdq_is_a_pass_error(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(PassError, match="no quantization table"):
        PassManager([Emit(latency_runs=0)]).run(heavy_net(rng), tmp_path / "out",
                                                data=[{"x": inputs(rng, 4)}])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing", "wrong input name"])
def test_bad_eval_data_is_a_data_error_and_writes_nothing(tmp_path, problem):
    rng = np.random.default_rng(4)
    path = Path(tmp_path / "eval.npz")
    if problem == "wrong input name":
        np.savez(path, image=inputs(rng, 8), label=np.zeros(8, np.int64))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="not found" if problem == "missing" else "'image'"):
        PassManager(passes(eval_data=str(path))).run(heavy_net(rng), out,
                                                     data=[{"x": inputs(rng, 8)}])
    assert not out.exists()


# ---- format = "qoperator" -----------------------------------------------------------------------
def conv_chain(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> MaxPool -> Conv: every Conv fully quantized."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "W3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["y"]),
    ]
    inits = {"W1": rng.normal(0, 0.3, (8, 3, 3, 3)), "B1": rng.normal(0, 0.1, 8),
             "W2": rng.normal(0, 0.2, (8, 8, 3, 3)), "B2": rng.normal(0, 0.1, 8),
             "W3": rng.normal(0, 0.3, (4, 8, 1, 1))}
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    return make_model(nodes, [tensor("x", [2, 3, 8, 8])], [tensor("y", [2, 4, 4, 4])], inits)


def test_qoperator_format_uses_qlinearconv_and_agrees_with_qdq(tmp_path):
    rng = np.random.default_rng(60)
    path = tmp_path / "net.onnx"
    onnx.save(conv_chain(rng), path)
    calib = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    x = {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    outs = {}
    for fmt in ("qdq", "qoperator"):
        # default reduce_range: QLinearConv always runs the integer kernel, which saturates
        # with full 8-bit weights on x86 CPUs without VNNI
        pipeline = [InsertQDQ(), Calibrate(method="minmax"), Emit(format=fmt, latency_runs=0)]
        result = PassManager(pipeline).run(path, tmp_path / fmt, data=calib)
        deploy = onnx.load(str(result.files["net.deploy.onnx"]))
        onnx.checker.check_model(deploy, full_check=True)
        outs[fmt] = (deploy, run(deploy, x)[0])
    ops = [n.op_type for n in outs["qoperator"][0].graph.node]
    assert ops.count("QLinearConv") == 2  # conv3's Relu output is the graph output: Q/DQ
    assert "Conv" in ops  # that last conv stays in Q/DQ form
    step = max(t["scale"][0] for t in json.loads(
        (tmp_path / "qdq" / "quant_record.json").read_text())["tensors"]
        if t["role"] == "activation" and t["quantized"])
    assert float(np.max(np.abs(outs["qoperator"][1] - outs["qdq"][1]))) <= step


# ---- 4-bit weights (W4A8) -----------------------------------------------------------------------
def matmul_net(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,32] -> MatMul(W1[32,64]) -> Add(b1) -> Relu -> MatMul(W2[64,10]) -> y."""
    inits = {"W1": rng.normal(0, 1 / np.sqrt(32), (32, 64)).astype(np.float32),
             "b1": rng.normal(0, 0.1, 64).astype(np.float32),
             "W2": rng.normal(0, 1 / np.sqrt(64), (64, 10)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "b1"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    model = make_model(nodes, [tensor("x", ["N", 32])], [tensor("y", ["N", 10])], inits)
    return onnx.shape_inference.infer_shapes(model)


def matmul_inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0, 1, (n, 32)).astype(np.float32)


#: net, inputs, {weight: output-channel axis}, biases that become int32
W4A8_NETS = {
    "conv-gemm": (heavy_net, inputs, {"wc": 0, "w1": 0, "w2": 0, "w3": 0},
                  {"bc", "b1", "b2", "b3"}),
    "matmul": (matmul_net, matmul_inputs, {"W1": 1, "W2": 1}, set()),
}


@pytest.fixture(scope="module", params=list(W4A8_NETS))
def w4a8(request, tmp_path_factory):
    build, make_inputs, weights, biases = W4A8_NETS[request.param]
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp(f"w4a8-{request.param}")
    path = folder / "net.onnx"
    onnx.save(build(rng), path)
    calib = [{"x": make_inputs(rng, 16)}, {"x": make_inputs(rng, 16)}]
    pipeline = [InsertQDQ(weights={"dtype": "int4"}), Calibrate(method="minmax"),
                Emit(latency_runs=0)]
    result = PassManager(pipeline).run(path, folder / "out", data=calib)
    return {"model": path, "out": folder / "out", "result": result, "weights": weights,
            "biases": biases, "x": make_inputs(rng, 16)}


def dequantized_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The initializers that DequantizeLinear nodes read as their integer input."""
    inits = initializers(model)
    return {dq.input[0]: inits[dq.input[0]] for dq in model.graph.node
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits}


def test_w4a8_graphs_are_opset_21_with_int4_weights_and_int32_biases(w4a8):
    out = w4a8["out"]
    for name in ("net.deploy.onnx", "net.fakequant.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
        model = onnx.load(out / name)
        assert model.opset_import[0].version == 21 and model.ir_version == 10
    record = {t["tensor"]: t for t in json.loads((out / "quant_record.json").read_text())[
        "tensors"] if t["quantized"]}
    for name, axis in w4a8["weights"].items():
        assert record[name]["dtype"] == "int4" and record[name]["axis"] == axis
        assert set(record[name]["zero_point"]) == {0}
    assert {k for k, t in record.items() if t["role"] == "bias"} == w4a8["biases"]
    assert all(t["dtype"] == "int32" for t in record.values() if t["role"] == "bias")
    assert all(t["dtype"] == "uint8" for t in record.values() if t["role"] == "activation")

    fakequant = onnx.load(out / "net.fakequant.onnx")
    inits = initializers(fakequant)
    for q in (n for n in fakequant.graph.node if n.op_type == "QuantizeLinear"):
        want = TensorProto.INT4 if q.input[0] in w4a8["weights"] else TensorProto.UINT8
        assert inits[q.input[2]].data_type == want, q.input[0]

    deploy = onnx.load(out / "net.deploy.onnx")
    assert not set(w4a8["weights"]) & set(initializers(deploy))  # no float copy left
    kinds: dict[int, int] = {}
    for dq in (n for n in deploy.graph.node if n.op_type == "DequantizeLinear"):
        t = initializers(deploy).get(dq.input[0])
        if t is not None:
            kinds[t.data_type] = kinds.get(t.data_type, 0) + 1
            assert initializers(deploy)[dq.input[2]].data_type == t.data_type
    assert kinds.pop(TensorProto.INT4) == len(w4a8["weights"])
    assert kinds.pop(TensorProto.INT32, 0) == len(w4a8["biases"])
    assert set(kinds) <= {TensorProto.UINT8}  # constant operands of joining ops (the Add's)


def test_w4a8_deploy_weights_are_the_numpy_4_bit_quantization(w4a8):
    """Unpacked, each INT4 weight of the deploy graph is clip(rint(w / scale), -8, 7) with
    scale = max|w| / 7 per output channel, computed here from the float weight."""
    original = {k: numpy_helper.to_array(v) for k, v in initializers(
        onnx.load(w4a8["model"])).items()}
    fakequant = onnx.load(w4a8["out"] / "net.fakequant.onnx")
    # the deploy graph's integer initializer takes the place of QuantizeLinear(w)'s output
    quantized_name = {q.input[0]: q.output[0] for q in fakequant.graph.node
                      if q.op_type == "QuantizeLinear"}
    deploy = initializers(onnx.load(w4a8["out"] / "net.deploy.onnx"))
    for name, axis in w4a8["weights"].items():
        w = original[name]
        others = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=others, keepdims=True) / 7).astype(np.float32)
        expected = np.clip(np.rint(w / scale), -8, 7).astype(np.int64)
        stored = deploy[quantized_name[name]]
        assert stored.data_type == TensorProto.INT4
        np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int64), expected)
        assert np.all(np.abs(expected).max(axis=others) == 7)  # each channel uses its range


@pytest.mark.parametrize("optimized", [False, True])
def test_w4a8_deploy_equals_fakequant_in_onnxruntime(w4a8, optimized):
    out, x = w4a8["out"], {"x": w4a8["x"]}
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run_file(path):
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return sess.run(None, x)[0]

    fq, dep = run_file(out / "net.fakequant.onnx"), run_file(out / "net.deploy.onnx")
    assert np.max(np.abs(dep - fq)) <= 1e-6 * np.max(np.abs(fq)) + 1e-7
    ref = run_file(w4a8["model"])
    cos = float(np.sum(ref * fq) / (np.linalg.norm(ref) * np.linalg.norm(fq)))
    assert cos > 0.95  # 4-bit random Gaussian weights: measured 0.96-0.99


def test_w4a8_deploy_weights_are_8x_smaller(w4a8):
    float_inits = initializers(onnx.load(w4a8["model"]))
    deploy = dequantized_initializers(onnx.load(w4a8["out"] / "net.deploy.onnx"))
    int4 = [t for t in deploy.values() if t.data_type == TensorProto.INT4]
    float_bytes = sum(len(float_inits[name].raw_data) for name in w4a8["weights"])
    int4_bytes = sum(len(t.raw_data) for t in int4)
    assert float_bytes / int4_bytes == 8.0  # every weight here has an even number of values
    report = w4a8["result"].report["quantization"]["size_bytes"]
    file_size = (w4a8["out"] / "net.deploy.onnx").stat().st_size
    assert abs(report["deploy"] - file_size) <= 4096  # the report counts INT4 at 4 bits
    if "wc" in w4a8["weights"]:  # weights dominate the conv net: 6.6x with scales, biases
        assert w4a8["model"].stat().st_size / file_size > 6.0


def test_qoperator_refuses_4_bit_weights_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(61)
    pipeline = [InsertQDQ(weights={"dtype": "int4"}), Calibrate(method="minmax"),
                Emit(format="qoperator", latency_runs=0)]
    calib = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}]
    with pytest.raises(PassError, match="qoperator.*int4 weights.*QLinearConv and "
                                        "QLinearMatMul take 8-bit integers only"):
        PassManager(pipeline).run(conv_chain(rng), tmp_path / "out", data=calib)
    assert not (tmp_path / "out").exists()


def test_shipped_digits_cnn_at_w4a8_keeps_top1_near_float(tmp_path):
    """The digits CNN (BN folded) with int4 weights and uint8 activations, calibrated as the
    shipped int8 example is: on the 360 held-out images top-1 goes 0.9972 -> 0.9889 (3 more
    errors; int8: no change). Allowed: 0.015 below float (5 images)."""
    pipeline = [Canonicalize(), FoldBN(), InsertQDQ(weights={"dtype": "int4"}),
                Calibrate(method="percentile", min_sqnr_db=25.0),
                Emit(eval_data=str(DIGITS / "test.npz"), latency_runs=0)]
    result = PassManager(pipeline).run(DIGITS / "digits_cnn.onnx", tmp_path / "out",
                                       data=DIGITS / "calib.npz")
    q = result.report["quantization"]
    acc = q["accuracy"]
    assert acc["top1_float"] > 0.99
    assert acc["top1_quantized"] >= acc["top1_float"] - 0.015
    weights = [t for t in json.loads((tmp_path / "out" / "quant_record.json").read_text())[
        "tensors"] if t["role"] == "weight"]
    assert len(weights) == 5 and all(t["dtype"] == "int4" for t in weights)
    deploy = onnx.load(tmp_path / "out" / "digits_cnn.deploy.onnx")
    onnx.checker.check_model(deploy, full_check=True)
    assert sum(t.data_type == TensorProto.INT4 for t in
               dequantized_initializers(deploy).values()) == 5


# ---- low fidelity: a warning, or a refusal ----------------------------------------------------
def test_a_faithful_graph_has_no_warning(emitted):
    q = emitted["result"].report["quantization"]
    assert min(f["sqnr_db"] for f in q["outputs"].values()) > 15
    assert not [w for w in q.get("warnings", []) if not w.startswith("slower than float")]


def test_a_deploy_graph_slower_than_float_is_warned(tmp_path, monkeypatch):
    """Timed slower than the float model (the timing stubbed: float 1 ms, deploy 2 ms), the
    report and emit's notes say so, with the speed and the rounds; 4-bit weights, which run
    in float by design, get their own note instead."""
    import graphq.passes.emit as E

    monkeypatch.setattr(E.latency, "session_times",
                        lambda sessions, feed, **kw: np.array([[0.001, 0.002]] * kw["max_rounds"]))
    rng = np.random.default_rng(7)
    result = PassManager(passes(latency_runs=5)).run(heavy_net(rng), tmp_path / "out",
                                                     data=[{"x": inputs(rng, 16)}])
    q = result.report["quantization"]
    assert q["latency_ms"] == {"float": 1.0, "deploy": 2.0, "speedup": 0.5, "runs": 5,
                               "samples": 16, "disturbed": False}
    (warning,) = q["warnings"]
    assert warning.startswith("slower than float: the deploy graph ran at 0.50x the float "
                              "model's speed in onnxruntime (CPUExecutionProvider; median of 5 "
                              "interleaved runs")
    assert warning in result.records[-1].notes
    assert f"**Warning**: {warning}" in (tmp_path / "out" / "report.md").read_text()
    four = PassManager([InsertQDQ(weights={"dtype": "int4"}), Calibrate(method="minmax"),
                        Emit(latency_runs=5)]).run(heavy_net(rng), tmp_path / "out4",
                                                   data=[{"x": inputs(rng, 16)}])
    assert not [w for w in four.report["quantization"].get("warnings", [])
                if w.startswith("slower")]
    assert any(n.startswith("4-bit weights") for n in four.records[-1].notes)


def test_worst_tensors_of_uncut_single_samples_are_fetched_in_two_groups(tmp_path,
                                                                         monkeypatch):
    """Data of single samples is never cut (its run size is not measured): the worst-tensor
    table then fetches its activations in two groups, so that no run fetches more than
    calibrate's stream did (an afis fingerprint net peaked at 12.8 GB fetching them all,
    their DQ outputs and their float values at once); the rows are the same as fetched in
    one group."""
    import graphq.passes.emit as E
    from graphq.data import Pieces

    rng = np.random.default_rng(9)
    model = heavy_net(rng)
    data = [{"x": inputs(rng, 1)} for _ in range(4)]
    fetched: list[tuple[int, bool]] = []
    with_outputs = E.G.with_outputs

    def recording(proto, names, float_view=False, **kwargs):
        fetched.append((len(names), float_view))
        return with_outputs(proto, names, float_view, **kwargs)

    monkeypatch.setattr(E.G, "with_outputs", recording)
    rows = {}
    for measured in (True, False):
        if measured:  # as if the samples' runs were measured and fit
            monkeypatch.setattr(Pieces, "may_exceed", lambda *a, **k: False)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(E.G, "with_outputs", recording)
        fetched.clear()
        result = PassManager(passes(worst=50)).run(model, tmp_path / f"out{measured}",
                                                   data=data)
        rows[measured] = result.report["quantization"]["worst_tensors"]
        table = [f for f in fetched if f != (0, False)][-4 if not measured else -2:]
        # 6 activations: with their DQ outputs, then in the float view
        assert table == ([(12, False), (6, True)] if measured else
                         [(6, False), (3, True), (6, False), (3, True)]), fetched
    assert rows[True] == rows[False] and len(rows[True]) == 6


def test_a_timing_whose_two_ratios_disagree_is_no_slowdown(tmp_path, monkeypatch):
    """The rounds' median ratio under 0.95x but the medians' ratio far above (float 1, 2, 3
    ms against deploy 1.1, 2.2, 1 ms: 0.91x paired, 1.82x of the medians): noise, not a
    slowdown; no warning."""
    import graphq.passes.emit as E

    rounds = np.array([[0.001, 0.0011], [0.002, 0.0022], [0.003, 0.001]])
    monkeypatch.setattr(E.latency, "session_times", lambda sessions, feed, **kw: rounds)
    rng = np.random.default_rng(7)
    result = PassManager(passes(latency_runs=3)).run(heavy_net(rng), tmp_path / "out",
                                                     data=[{"x": inputs(rng, 16)}])
    q = result.report["quantization"]
    assert q["latency_ms"]["speedup"] == pytest.approx(1 / 1.1)
    assert not [w for w in q.get("warnings", []) if w.startswith("slower")]


def test_a_timing_whose_two_ratios_are_both_low_but_far_apart_is_disturbed(tmp_path,
                                                                            monkeypatch):
    """Both ratios under 0.95x but 5x apart (float 1, 1, 1, 5, 5 ms against deploy 1.1,
    1.1, 6, 6, 6 ms: 0.83x paired, 0.17x of the medians): load came and went; a note says
    the timing was disturbed, no slowdown warning."""
    import graphq.passes.emit as E

    rounds = np.array([[1.0, 1.1], [1.0, 1.1], [1.0, 6.0], [5.0, 6.0], [5.0, 6.0]]) / 1e3
    monkeypatch.setattr(E.latency, "session_times", lambda sessions, feed, **kw: rounds)
    rng = np.random.default_rng(8)
    result = PassManager(passes(latency_runs=5)).run(heavy_net(rng), tmp_path / "out",
                                                     data=[{"x": inputs(rng, 16)}])
    q = result.report["quantization"]
    lat = q["latency_ms"]
    paired, medians = lat["speedup"], lat["float"] / lat["deploy"]
    assert max(paired, medians) < 0.95 and max(paired, medians) > 1.5 * min(paired, medians)
    assert not [w for w in q.get("warnings", []) if w.startswith("slower")]
    assert any(n.startswith("timing disturbed") for n in result.records[-1].notes)


@pytest.mark.parametrize("disturbed", [False, True])
def test_a_disturbed_speedup_is_marked_in_the_report(tmp_path, monkeypatch, disturbed):
    """A speedup whose two ratios differ over 1.5x (a digit CNN's float median inflated by
    load: 4.48x by the medians, 1.89x by the rounds) is marked disturbed in report.json and
    said so in the summary and report.md: its ms figures hold the load; a steady one is
    not."""
    import graphq.passes.emit as E

    # float 2, 2, 9, 9, 9 ms against deploy 1, 1, 4.5, 4.5, 1 ms: 2x paired, 9x the medians
    rounds = np.array([[2.0, 1.0], [2.0, 1.0], [9.0, 4.5], [9.0, 4.5], [9.0, 1.0]]) / 1e3 \
        if disturbed else np.array([[2.0, 1.0], [2.1, 1.0], [2.0, 1.1]]) / 1e3
    monkeypatch.setattr(E.latency, "session_times", lambda sessions, feed, **kw: rounds)
    rng = np.random.default_rng(9)
    out = tmp_path / "out"
    result = PassManager(passes(latency_runs=len(rounds))).run(
        heavy_net(rng), out, data=[{"x": inputs(rng, 16)}])
    lat = result.report["quantization"]["latency_ms"]
    assert lat["disturbed"] is disturbed
    said = "timing disturbed: the two ratios" in (out / "report.md").read_text()
    assert said is disturbed and not [w for w in result.report["quantization"].get(
        "warnings", []) if w.startswith("slower")]


def hardswish_net(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv -> HardSwish -> Conv -> y."""
    inits = {"w1": rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.1, (8, 16, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c"], ["h"], name="hswish"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [tensor("x", ["N", 8, 16, 16])], [tensor("y", ["N", 8, 16, 16])],
                       inits, opset=14)
    return onnx.shape_inference.infer_shapes(model)


def test_a_slowdown_names_the_ops_onnxruntime_runs_in_float(tmp_path, monkeypatch):
    """onnxruntime has no integer HardSwish: with symmetric activations (no fixed grid for
    HardSigmoid, see insert-qdq) the HardSwish runs in float between DequantizeLinear and
    QuantizeLinear in its optimized deploy graph, as HardSigmoid and Mul
    (runtime.float_islands), and the slowdown warning (timing stubbed) names it and why the
    float model does not pay it."""
    import graphq.passes.emit as E

    monkeypatch.setattr(E.latency, "session_times",
                        lambda sessions, feed, **kw: np.array([[0.001, 0.002]] * 3))
    rng = np.random.default_rng(8)
    x = rng.normal(0, 1, (4, 8, 16, 16)).astype(np.float32)
    steps = [InsertQDQ(weights={"reduce_range": False}, activations={"symmetric": True}),
             Calibrate(method="minmax"), Emit(latency_runs=3)]
    result = PassManager(steps).run(hardswish_net(rng), tmp_path / "out", data=[{"x": x}])
    (deploy,) = (onnx.load(p) for p in (tmp_path / "out").glob("*.deploy.onnx"))
    # onnxruntime writes the HardSwish as HardSigmoid and Mul, both in float
    assert runtime.float_islands(deploy) == {"HardSigmoid": 1, "Mul": 1}
    (warning,) = result.report["quantization"]["warnings"]
    assert ("(here, in onnxruntime's optimized deploy graph: 1 HardSigmoid, 1 Mul; it has no "
            "integer kernel for them, and the float model runs HardSwish / HardSigmoid fused "
            "into the convolution before it)") in warning, warning
    assert runtime.float_islands(heavy_net(rng)) == {}  # a float graph has none


def test_hard_swish_deploy_graph_has_no_float_op_between_integer_convs(tmp_path):
    """The default (asymmetric uint8) activations: insert-qdq writes the HardSwish as
    ``x * HardSigmoid(x)`` with the gate on its fixed grid, and emit's deploy graph runs the
    HardSigmoid as a saturating integer Add (its count in emit's counts): onnxruntime's
    optimized deploy graph has no float op left, and the record says why the gate's scale is
    what it is."""
    rng = np.random.default_rng(9)
    x = rng.normal(0, 1, (4, 8, 16, 16)).astype(np.float32)
    result = PassManager(passes()).run(hardswish_net(rng), tmp_path / "out", data=[{"x": x}])
    assert result.records[-1].counts["hard_sigmoids_as_adds"] == 1
    (deploy,) = (onnx.load(p) for p in (tmp_path / "out").glob("*.deploy.onnx"))
    onnx.checker.check_model(deploy, full_check=True)
    assert runtime.float_islands(deploy) == {}
    record = json.loads((tmp_path / "out" / "quant_record.json").read_text())
    (gate,) = [t for t in record["tensors"] if t["method"] == "fixed"]
    assert gate["scale"] == [pytest.approx(1 / 255)] and gate["zero_point"] == [0]
    assert "fixed grid" in gate["reason"]


def test_an_output_below_warn_sqnr_db_is_warned_in_log_report_and_notes(tmp_path, caplog):
    """Calibrated on inputs 100x smaller than the eval data, every activation saturates: the
    report says so (log warning, report.json, report.md, emit's notes) and still writes."""
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "eval.npz", x=inputs(rng, 16))
    with caplog.at_level("WARNING", logger="graphq"):
        result = PassManager(passes(eval_data=str(tmp_path / "eval.npz"))).run(
            heavy_net(rng), tmp_path / "out", data=[{"x": inputs(rng, 16) * 0.01}])
    q = result.report["quantization"]
    assert q["outputs"]["y"]["sqnr_db"] < 15
    (warning,) = q["warnings"]
    assert warning.startswith("low fidelity: output SQNR against the float model on "
                              f"{tmp_path / 'eval.npz'}: 'y' ")
    assert "below warn_sqnr_db 15 dB" in warning and "target_sqnr_db" in warning
    assert warning in result.records[-1].notes
    assert any(r.levelname == "WARNING" and "low fidelity" in r.getMessage()
               for r in caplog.records)
    assert f"**Warning**: {warning}" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("calibrated", [{}, {"auto_chose": "mse"}, {"auto_chose": "percentile"},
                                        {"auto_chose": "mse", "auto_metric": "m.py:f"}])
def test_low_fidelity_advice_follows_what_method_auto_did(calibrated):
    """Where method auto chose by the SQNR, the warning points to auto_metric (a vocoder's
    hiss in its pauses reads as little; its log-mel distance kept percentile over the SQNR's
    mse) and does not advise the method auto kept already; after an auto_metric, neither."""
    model = heavy_net(np.random.default_rng(13))
    report = {"outputs": {"y": {"sqnr_db": 10.0, "cosine": 0.9}}, "eval_data": "held.npz"}
    (warning,) = Emit(latency_runs=0)._judge(report, model, calibrated)
    chose = calibrated.get("auto_chose")
    assert ("auto_metric = \"file.py:function\"" in warning) == bool(
        chose and "auto_metric" not in calibrated)
    if chose:
        assert "method auto kept" not in warning or f"method auto kept {chose} by" in warning
    advised_mse = 'method = "mse" or QAT' in warning
    assert advised_mse == (chose != "mse" and "auto_metric" not in calibrated)
    assert "QAT (the qat pass) may also recover it" in warning


def test_a_low_output_after_method_auto_points_to_auto_metric(tmp_path):
    """The pipeline's own record of what method auto kept reaches emit's warning."""
    rng = np.random.default_rng(14)
    np.savez(tmp_path / "eval.npz", x=inputs(rng, 16))
    steps = [InsertQDQ(weights={"reduce_range": False}), Calibrate(method="auto"),
             Emit(latency_runs=0, eval_data=str(tmp_path / "eval.npz"))]
    result = PassManager(steps).run(heavy_net(rng), tmp_path / "out",
                                    data=[{"x": inputs(rng, 16) * 0.01}])
    chose = result.report["calibrate"]["auto_chose"]
    (warning,) = result.report["quantization"]["warnings"]
    assert f"method auto kept {chose} by the worst output SQNR" in warning
    assert "auto_metric = \"file.py:function\"" in warning


def test_a_low_output_after_the_sensitivity_search_is_not_advised_the_search(tmp_path):
    """Where calibrate's sensitivity search ran and the output is still low, the warning says
    what the search did (kept float, the score on its batches, short of an unreachable target)
    and does not advise running it again (as it did for PP-OCRv4's English recognizer:
    '11.6 dB -> 11.6 dB with 0 of 159 kept float', then the same options as advice)."""
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "eval.npz", x=inputs(rng, 16))
    steps = [InsertQDQ(weights={"reduce_range": False}),
             Calibrate(method="minmax", target_sqnr_db=90.0),
             Emit(latency_runs=0, eval_data=str(tmp_path / "eval.npz"))]
    result = PassManager(steps).run(heavy_net(rng), tmp_path / "out",
                                    data=[{"x": inputs(rng, 16) * 0.01}])
    search = result.report["calibrate"]["search"]
    assert search["target_sqnr_db"] == 90.0 and search["final_db"] < 90.0
    (warning,) = result.report["quantization"]["warnings"]
    assert "calibrate's sensitivity search ran already (target_sqnr_db 90" in warning
    assert f"kept {search['kept_float']} of {search['activations']} activations" in warning
    assert "short of the target" in warning and "--set calibrate.target_sqnr_db" not in warning


def test_an_output_below_require_sqnr_db_fails_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(6)
    with pytest.raises(PassError, match=r"below require_sqnr_db 90 dB on the calibration "
                                        r"data .*: 'y' [0-9.]+ dB; calibrate's target_sqnr_db"):
        PassManager(passes(require_sqnr_db=90.0)).run(
            heavy_net(rng), tmp_path / "out", data=[{"x": inputs(rng, 16)}])
    assert not (tmp_path / "out").exists()


def test_a_negative_sqnr_does_not_fail_with_require_sqnr_db_off(tmp_path):
    """require_sqnr_db = 0 (the default) means never: an output whose SQNR is negative (here
    against a reference that negates it; a QAT run judged against the PTQ graph it started
    from read -0.9 dB) is warned, not failed."""
    rng = np.random.default_rng(7)
    model = heavy_net(rng)
    negated = onnx.ModelProto()
    negated.CopyFrom(model)
    negated.graph.node[-1].output[0] = "y_pos"
    negated.graph.node.append(helper.make_node("Neg", ["y_pos"], ["y"]))
    result = PassManager(passes()).run(model, tmp_path / "out", data=[{"x": inputs(rng, 16)}],
                                       reference=negated)
    fidelity = result.report["quantization"]["outputs"]["y"]
    assert fidelity["sqnr_db"] < 0
    assert any("'y' -" in w for w in result.report["quantization"]["warnings"])


def test_quant_table_copy_is_independent_and_equal():
    """QuantTable.copy (what calibrate's auto copies per candidate): equal entries, and a
    change to the copy's flags or lists leaves the original as it was."""
    import copy

    from graphq.quant import TensorQuant

    table = QuantTable()
    table.add(TensorQuant("a", "activation", True, "output of Conv", dtype="uint8",
                          scale=[0.5], zero_point=[3], range=[-1.5, 126.0], consumers=["c1"]))
    table.add(TensorQuant("w", "weight", True, "weight of Conv", dtype="int8", axis=0,
                          scale=[0.1, 0.2], zero_point=[0, 0], consumers=["c1"]))
    twin = table.copy()
    assert twin.to_json() == copy.deepcopy(table).to_json() == table.to_json()
    a = twin.get("a")
    a.quantized, a.scale[0], a.consumers[0] = False, 9.0, "other"
    twin.get("w").zero_point.append(1)
    assert table.get("a").quantized and table.get("a").scale == [0.5]
    assert table.get("a").consumers == ["c1"] and table.get("w").zero_point == [0, 0]


def topk_detector(rng: np.random.Generator) -> onnx.ModelProto:
    """An end-to-end detector head: per anchor a MatMul gives 4 box values and a score (its
    Sigmoid); TopK picks the 5 best anchors of 64 and GatherElements their boxes, concatenated
    with their scores into ``dets`` [N, 5, 5]."""
    w = rng.normal(0, 0.5, (16, 5)).astype(np.float32)
    inits = {"w": w, "box_cols": np.array([4, 1], np.int64), "k": np.array([5], np.int64),
             "axes": np.array([2], np.int64), "rep": np.array([1, 1, 4], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["head"], name="head"),
        helper.make_node("Split", ["head", "box_cols"], ["boxes", "logit"], name="split", axis=2),
        helper.make_node("Sigmoid", ["logit"], ["score"], name="sigmoid"),
        helper.make_node("Squeeze", ["score", "axes"], ["flat"], name="squeeze"),
        helper.make_node("TopK", ["flat", "k"], ["best", "index"], name="topk", axis=1),
        helper.make_node("Unsqueeze", ["index", "axes"], ["index3"], name="unsqueeze"),
        helper.make_node("Tile", ["index3", "rep"], ["index4"], name="tile"),
        helper.make_node("GatherElements", ["boxes", "index4"], ["picked"], name="gather",
                         axis=1),
        helper.make_node("Unsqueeze", ["best", "axes"], ["best3"], name="unsqueeze_best"),
        helper.make_node("Concat", ["picked", "best3"], ["dets"], name="concat", axis=2),
    ]
    model = make_model(nodes, [tensor("x", ["N", 64, 16])], [tensor("dets", ["N", 5, 5])], inits)
    return onnx.shape_inference.infer_shapes(model)


def test_an_output_selected_by_topk_is_judged_by_what_it_selects_from(tmp_path):
    """The output of an end-to-end detector (TopK over anchor scores, boxes gathered at its
    indices) is order-dependent: graph.selection_sources names the boxes and scores of every
    anchor; calibrate's search scores those (a note says so), and emit reports them, judges
    them, and marks the output as selected instead of warning on it."""
    rng = np.random.default_rng(5)
    model = topk_detector(rng)
    found = G.selection_sources(G.import_graph(model))
    assert {k: sorted(t.name for t in v) for k, v in found.items()} == \
        {"dets": ["boxes", "flat"]}
    calib = [{"x": rng.normal(0, 1, (8, 64, 16)).astype(np.float32)} for _ in range(4)]
    result = PassManager([InsertQDQ(), Calibrate(method="auto"), Emit(latency_runs=0)]).run(
        model, tmp_path / "out", data=calib)
    calibrate_notes = result.records[1].notes
    assert any("output 'dets' is selected by TopK" in n and "'boxes'" in n and "'flat'" in n
               for n in calibrate_notes)
    q = result.report["quantization"]
    assert sorted(q["selected_outputs"]["dets"]) == ["boxes", "flat"]
    outputs = q["outputs"]
    assert outputs["dets"]["selected"] is True
    assert outputs["dets"]["sqnr_db"] < 15.0  # close scores swapped: whole rows differ
    for source in ("boxes", "flat"):
        assert "selected" not in outputs[source]
        assert outputs[source]["sqnr_db"] > 25.0  # every anchor in its place: int8 noise only
    assert not [w for w in q.get("warnings", []) if "'dets'" in w]
    for name in ("deploy", "fakequant"):
        onnx.checker.check_model(str(tmp_path / "out" / f"test.{name}.onnx"), full_check=True)
    assert "selected by TopK/ArgMax" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("order", ["input", "integers"])
def test_an_output_ordered_by_inputs_or_integers_is_judged_itself(tmp_path, order):
    """A selection whose order quantization cannot change, a TopK straight over an input or
    over integers the graph computes (sequence lengths, as torch's pack_padded_sequence
    sorts a batch by them; a diacritizer's outputs had all been judged by the tensor it
    gathers), is no selection: its output is scored, reported and judged as any output is."""
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.5, (16, 4)).astype(np.float32)
    first = [] if order == "input" else [
        helper.make_node("Cast", ["s_float"], ["s"], to=TensorProto.INT64)]
    nodes = [*first,
             helper.make_node("TopK", ["s", "k"], ["best", "index"], name="topk", axis=1),
             helper.make_node("Unsqueeze", ["index", "axes"], ["index3"], name="unsqueeze"),
             helper.make_node("Tile", ["index3", "rep"], ["index16"], name="tile"),
             helper.make_node("GatherElements", ["x", "index16"], ["rows"], name="pick",
                              axis=1),
             helper.make_node("MatMul", ["rows", "w"], ["y"], name="head")]
    scores = "s" if order == "input" else "s_float"
    model = make_model(nodes, [tensor("x", ["N", 32, 16]), tensor(scores, ["N", 32])],
                       [tensor("y", ["N", 5, 4])],
                       {"w": w, "k": np.array([5], np.int64), "axes": np.array([2], np.int64),
                        "rep": np.array([1, 1, 16], np.int64)})
    assert G.selection_sources(G.import_graph(onnx.shape_inference.infer_shapes(model))) == {}
    calib = [{"x": rng.normal(0, 1, (4, 32, 16)).astype(np.float32),
              scores: rng.normal(0, 10, (4, 32)).astype(np.float32)} for _ in range(3)]
    result = PassManager([InsertQDQ(), Calibrate(method="auto"), Emit(latency_runs=0)]).run(
        model, tmp_path / "out", data=calib)
    q = result.report["quantization"]
    assert "selected_outputs" not in q and "selected" not in q["outputs"]["y"]
    assert q["outputs"]["y"]["sqnr_db"] > 25.0
    assert not any("is selected by" in n for n in result.records[1].notes)


def test_an_integer_output_is_reported_by_agreement(tmp_path):
    """An ArgMax output (class ids): the report gives the share of ids equal to the float
    model's, the number its log line shows (an SQNR over ids measures nothing)."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (16, 10)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"], name="head"),
             helper.make_node("ArgMax", ["logits"], ["cls"], name="argmax", axis=1,
                              keepdims=0)]
    model = make_model(nodes, [tensor("x", ["N", 16])],
                       [tensor("cls", ["N"], TensorProto.INT64)], {"w": w})
    calib = [{"x": rng.normal(0, 1, (64, 16)).astype(np.float32)} for _ in range(4)]
    result = PassManager([InsertQDQ(), Calibrate(method="minmax"), Emit(latency_runs=0)]).run(
        model, tmp_path / "out", data=calib)
    cls = result.report["quantization"]["outputs"]["cls"]
    ref = np.concatenate([run(model, f)[0] for f in calib])
    deploy = onnx.load(str(tmp_path / "out" / "test.deploy.onnx"))
    got = np.concatenate([run(deploy, f)[0] for f in calib])
    assert cls["equal"] == pytest.approx(float(np.mean(ref == got)))
    assert 0.5 < cls["equal"] <= 1.0
    line = f"output 'cls': integers, {cls['equal']:.2%} equal to float's"
    assert line in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("listed", [True, False])
def test_latency_of_a_model_listing_initializers_as_inputs_has_a_canonical_baseline(
        tmp_path, monkeypatch, listed):
    """A model that lists its initializers as graph inputs (IR 3 style) runs slower in float
    as given than canonicalized (onnxruntime can neither fold nor pre-pack them): emit times
    the canonicalized float graph too and reports the deploy graph's speedup over both, its
    own share first; a model that does not is timed against itself alone. Timings are given
    (the machine is noisy): the rule and the wording are what is tested."""
    from graphq import latency

    rng = np.random.default_rng(8)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [tensor("x", ["N", 16])], [tensor("y", ["N", 8])],
                       {"w": rng.normal(0, 0.5, (16, 8)).astype(np.float32)})
    if listed:
        model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [16, 8]))
    counts = []

    def session_times(sessions, feed, budget_s=2.0, min_rounds=7, max_rounds=60):
        counts.append(len(sessions))
        return np.array([[4.0, 1.0, 2.0][:len(sessions)]] * 3)

    monkeypatch.setattr(latency, "session_times", session_times)
    calib = [{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(2)]
    result = PassManager([Canonicalize(), InsertQDQ(), Calibrate(method="minmax"),
                          Emit(latency_runs=3)]).run(model, tmp_path / "out", data=calib)
    lat = result.report["quantization"]["latency_ms"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert lat["speedup"] == pytest.approx(4.0)
    if listed:
        assert counts == [3]
        assert lat["speedup_canonical"] == pytest.approx(2.0)
        assert "ms canonicalized (its initializers no longer graph inputs" in text
        assert "deploy 2.00x the canonicalized float's speed, 4.00x the given model's" in text
    else:
        assert counts == [2] and "float_canonical" not in lat
        assert "deploy 4.00x the float speed" in text


def test_the_float_view_stores_dequantized_biases_as_float(emitted):
    """The float view of a calibrated graph (emit's canonicalized baseline, calibrate's and
    the search's float sessions) bypasses the Q/DQ pairs and stores each int32 bias's
    DequantizeLinear as the float values it computes: with the DequantizeLinears kept, that
    baseline ran them on every run (a CNTK MNIST net's 'canonicalized' baseline 1.35x slower
    than canonicalize's graph). The same outputs, bit for bit."""
    fakequant = onnx.load(emitted["out"] / "net.fakequant.onnx")
    view = G.with_outputs(fakequant, [], float_view=True)
    onnx.checker.check_model(view, full_check=True)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in view.graph.node}
    graph = G.import_graph(fakequant)  # the pairs bypassed, the biases' DQs left
    for q, dq in G.qdq_pairs(graph).values():
        G.replace_uses(graph, dq.outputs[0], q.inputs[0])
    graph.cleanup()
    kept = G.export(graph, like=fakequant)
    assert sum(n.op_type == "DequantizeLinear" for n in kept.graph.node) == 4  # conv, 3 fc
    x = emitted["x"]
    np.testing.assert_array_equal(run(view, {"x": x})[0], run(kept, {"x": x})[0])


def test_a_deploy_graph_larger_than_the_float_model_is_said_so():
    """'0.9x smaller' read as a typo: a deploy graph larger than the float model (a graph
    whose weights came stored as int8 already, most of its ops float) is called larger."""
    from graphq.passes.emit import summary_lines

    assert summary_lines({"size_bytes": {"float": 4 * 2**20, "deploy": 2**20}})[0] == \
        "size: float 4.00 MiB -> deploy 1.00 MiB (4.0x smaller)"
    (line,) = summary_lines({"size_bytes": {"float": 2**20, "deploy": 1.1 * 2**20}})
    assert line.startswith("size: float 1.00 MiB -> deploy 1.10 MiB (1.10x LARGER than the "
                           "float model: int32 biases, scales and the weights of ops left "
                           "float outweigh"), line


def test_a_deploy_graph_larger_because_folding_stored_computed_constants_says_so(tmp_path):
    """A graph that builds a large constant at run time from a small one (swift-f0's filter
    banks: ConstantOfShape and ScatterElements; here a [256, 256] ConstantOfShape a MatMul
    reads) is stored with that constant by canonicalize's folding: the deploy graph is
    larger than the float model, and the report says it is the float graph after the passes
    that grew (report.json's size_bytes.float_passes), not int32 biases and scales."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"],
                              value=numpy_helper.from_array(np.array([0.01], np.float32))),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [tensor("x", ["N", 256])], [tensor("y", ["N", 256])],
                       {"shape": np.array([256, 256], np.int64)})
    data = [{"x": rng.normal(0, 1, (8, 256)).astype(np.float32)}]
    result = PassManager([Canonicalize(), *passes()]).run(model, tmp_path / "out", data=data)
    size = result.report["quantization"]["size_bytes"]
    assert size["deploy"] > size["float"] and size["float_passes"] > 100 * size["float"]
    assert "its float graph after the passes is already" in \
        result.files["report.md"].read_text()


def bank_net(rng: np.random.Generator) -> onnx.ModelProto:
    """A [513, 128] filter bank built at run time from 1032 indices and weights
    (ConstantOfShape + ScatterElements + Reshape, as swift-f0 builds its STFT's), read by a
    MatMul over the input, then a Gemm."""
    flat = np.sort(rng.choice(513 * 128, 1032, replace=False)).astype(np.int64)
    inits = {"size": np.array([513 * 128], np.int64), "idx": flat,
             "val": rng.uniform(0.1, 1, flat.size).astype(np.float32),
             "shape": np.array([513, 128], np.int64),
             "wf": rng.normal(0, 0.1, (16, 128)).astype(np.float32),
             "bf": np.zeros(16, np.float32)}
    nodes = [helper.make_node("ConstantOfShape", ["size"], ["zeros"],
                              value=numpy_helper.from_array(np.array([0], np.float32))),
             helper.make_node("ScatterElements", ["zeros", "idx", "val"], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], ["bank"]),
             helper.make_node("MatMul", ["x", "bank"], ["spec"], name="spectrum"),
             helper.make_node("Relu", ["spec"], ["r"]),
             helper.make_node("Gemm", ["r", "wf", "bf"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [tensor("x", ["N", 513])], [tensor("y", ["N", 16])], inits)


def test_a_float_constant_the_model_builds_at_run_time_is_computed_again_in_deploy(tmp_path):
    """canonicalize folds the bank into 262 KB of float weights so that insert-qdq sees it;
    where its MatMul stays float, the deploy graph computes it again from the model's 10 KB
    of indices and weights (swift-f0's deploy graph was 7.6x the float model by them): the
    same nodes, renamed apart, no large float initializer, outputs equal to the fake-quant
    graph's in onnxruntime, and the deploy graph smaller than the float model."""
    rng = np.random.default_rng(5)
    model = bank_net(rng)
    data = [{"x": rng.uniform(0, 1, (8, 513)).astype(np.float32)}]
    steps = [Canonicalize(), InsertQDQ(exclude=["spectrum"]), Calibrate(method="minmax"),
             Emit(latency_runs=0)]
    result = PassManager(steps).run(model, tmp_path / "out", data=data)
    assert result.records[-1].counts["constants_computed_again"] == 1
    fakequant = onnx.load(next(p for n, p in result.files.items()
                               if n.endswith("fakequant.onnx")))
    deploy = onnx.load(next(p for n, p in result.files.items() if n.endswith("deploy.onnx")))
    onnx.checker.check_model(deploy, full_check=True)
    assert "ScatterElements" not in {n.op_type for n in fakequant.graph.node}
    ops = [n.op_type for n in deploy.graph.node]
    assert {"ConstantOfShape", "ScatterElements", "Reshape"} <= set(ops)
    assert len({n.name for n in deploy.graph.node}) == len(deploy.graph.node)
    big = [t.name for t in deploy.graph.initializer
           if numpy_helper.to_array(t).nbytes >= E.REGENERATE_BYTES]
    assert big == []
    size = result.report["quantization"]["size_bytes"]
    assert size["deploy"] < size["float"]
    x = rng.uniform(0, 1, (4, 513)).astype(np.float32)
    np.testing.assert_array_equal(run(deploy, {"x": x})[0], run(fakequant, {"x": x})[0])


def test_a_constant_computed_from_large_weights_or_an_input_stays_stored():
    """Only what is far larger than the constants it is computed from is computed again: a
    transposed weight (the same bytes, an initializer or a Constant node's) and a constant
    read through a graph input's shape stay as canonicalize stored them."""
    w = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"],
                              value=numpy_helper.from_array(np.array([1], np.float32))),
             helper.make_node("Add", ["x", "ones"], ["x1"]),
             helper.make_node("MatMul", ["x1", "wt"], ["y"])]
    stored = make_model(nodes[-1:], [tensor("x1", [64, 128])], [tensor("y", [64, 64])],
                        {"wt": w.T.copy(), "ones": np.ones((64, 128), np.float32)})
    for weight in ("constant", "initializer"):
        original = make_model(nodes if weight == "constant" else nodes[1:],
                              [tensor("x", [64, 128])], [tensor("y", [64, 64])],
                              {} if weight == "constant" else {"w": w})
        assert E.put_generators(stored, E.constant_generators(stored, original)) == []
        assert sorted(t.name for t in stored.graph.initializer) == ["ones", "wt"]


def test_a_low_output_computed_through_a_step_is_said_to_be(tmp_path):
    """An output computed through a comparison after its quantized tensors (a local-maximum
    test, x * (x == MaxPool(x)), as a fingerprint net's minutia map is): its values flip
    where the error moves a value across the step, so its SQNR reads low while the values
    that pass the test stay close; the low-fidelity warning says which ops do it and points
    to judging by the task. A plain output has no such words."""
    rng = np.random.default_rng(12)
    inits = {"w": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Equal", ["m", "c"], ["peak"]),
             helper.make_node("Cast", ["peak"], ["peakf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["c", "peakf"], ["y"])]
    model = onnx.shape_inference.infer_shapes(make_model(
        nodes, [tensor("x", ["N", 4, 16, 16])], [tensor("y", ["N", 4, 16, 16])], inits))
    data = [{"x": rng.normal(0, 1, (8, 4, 16, 16)).astype(np.float32)}]
    result = PassManager(passes(warn_sqnr_db=60.0)).run(model, tmp_path / "out", data=data)
    (warning,) = [w for w in result.report["quantization"]["warnings"]
                  if w.startswith("low fidelity")]
    assert "'y' is computed through Equal after its last quantized tensors: values near " \
           "such a step flip with small errors" in warning, warning
    assert "calibrate's auto_metric" in warning
    plain = PassManager(passes(warn_sqnr_db=60.0)).run(heavy_net(rng), tmp_path / "plain",
                                                      data=[{"x": inputs(rng, 8)}])
    (warning,) = [w for w in plain.report["quantization"]["warnings"]
                  if w.startswith("low fidelity")]
    assert "computed through" not in warning
    # a comparison of a graph input (an attention mask's ids) is no such step
    mask = make_model([helper.make_node("Equal", ["ids", "zero"], ["pad"]),
                       helper.make_node("Where", ["pad", "low", "x"], ["y"])],
                      [tensor("ids", ["N", 8], TensorProto.INT64), tensor("x", ["N", 8])],
                      [tensor("y", ["N", 8])],
                      {"zero": np.array(0, np.int64), "low": np.array(-1e4, np.float32)})
    assert G.steps_after_quantized(G.import_graph(mask), "y") == []
    assert G.steps_after_quantized(G.import_graph(model), "y") == ["Equal"]


def recognizer(rng: np.random.Generator) -> onnx.ModelProto:
    """A CTC-recognizer head as onnxsim leaves PP-OCR's: per-step features [N, 4, 6] through
    a Gemm over [N * 4, 6], a Softmax over the classes, reshaped back to [N, 4, 10]."""
    inits = {"w": rng.normal(0, 1, (6, 10)).astype(np.float32),
             "b": rng.normal(0, 0.1, 10).astype(np.float32),
             "flat": np.array([-1, 6], np.int64), "steps": np.array([-1, 4, 10], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("Gemm", ["x2", "w", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
             helper.make_node("Reshape", ["p", "steps"], ["y"])]
    return onnx.shape_inference.infer_shapes(make_model(
        nodes, [tensor("x", ["N", 4, 6])], [tensor("y", ["N", 4, 10])], inits))


def test_class_scores_are_judged_by_their_argmax_too(tmp_path):
    """An output a Softmax makes over its last axis (through a reshape that keeps it) is read
    through an argmax: the report gives the share of positions whose argmax is the float
    model's beside its SQNR, and a low-fidelity warning on it points to calibrate's
    auto_metric with graphq.metrics' scores, or, where method auto chose by one, says so."""
    rng = np.random.default_rng(21)
    model = recognizer(rng)
    assert G.class_score_outputs(model) == ["y"]
    data = [{"x": rng.normal(0, 1, (16, 4, 6)).astype(np.float32)} for _ in range(2)]
    result = PassManager(passes(warn_sqnr_db=60.0)).run(model, tmp_path / "out", data=data)
    report = result.report["quantization"]
    deploy = onnx.load(str(next(p for k, p in result.files.items()
                                if k.endswith(".deploy.onnx"))))
    ref = np.concatenate([run(model, f)[0] for f in data]).argmax(-1)
    got = np.concatenate([run(deploy, f)[0] for f in data]).argmax(-1)
    share = float(np.mean(ref == got))
    assert 0.5 < share < 1.0  # a few steps flip (measured 98.4%)
    assert report["outputs"]["y"]["argmax_equal"] == pytest.approx(share)
    assert f"argmax over its last axis as float's at {share:.2%}" in \
        result.files["report.md"].read_text()
    (warning,) = [w for w in report["warnings"] if w.startswith("low fidelity")]
    assert (f"the argmax over the last axis of 'y' at {share:.1%} of positions as float's"
            in warning), warning
    assert "--set calibrate.auto_metric=graphq.metrics:top1, or graphq.metrics:ctc_greedy " \
           "for a CTC recognizer's strings" in warning

    chosen = PassManager([InsertQDQ(weights={"reduce_range": False}),
                          Calibrate(method="auto", auto_metric="graphq.metrics:top1",
                                    search_samples=1),
                          Emit(latency_runs=0, warn_sqnr_db=60.0)]
                         ).run(model, tmp_path / "chosen", data=data)
    (note,) = [n for r in chosen.records for n in r.notes if n.startswith("method auto")]
    assert note.startswith("method auto: auto_metric 'graphq.metrics:top1' on "), note
    (warning,) = [w for w in chosen.report["quantization"]["warnings"]
                  if w.startswith("low fidelity")]
    assert "(method auto chose by auto_metric 'graphq.metrics:top1')" in warning
    assert "--set calibrate.auto_metric" not in warning


@pytest.mark.parametrize("case,expected", [
    ("reshaped", ["y"]), ("other-axis", []), ("last-changed", []),
    ("opset12-2d", ["y"]), ("opset12-3d", [])])
def test_class_score_outputs(case, expected):
    """Which outputs count as class scores: a Softmax over the last axis, followed through
    reshapes that keep that axis's size; not one over another axis, nor one whose values a
    reshape regroups; opset 12's default axis 1 (over the flattened rest) only on 2-D."""
    rng = np.random.default_rng(0)
    if case in ("reshaped", "other-axis", "last-changed"):
        model = recognizer(rng)
        if case == "other-axis":
            model.graph.node[2].attribute[0].i = 0
        if case == "last-changed":
            model.graph.initializer[3].CopyFrom(
                numpy_helper.from_array(np.array([-1, 8, 5], np.int64), "steps"))
            del model.graph.value_info[:]
            del model.graph.output[:]
            model.graph.output.append(tensor("y", ["N", 8, 5]))
            model = onnx.shape_inference.infer_shapes(model)
    else:
        shape = ["N", 10] if case == "opset12-2d" else ["N", 4, 10]
        model = make_model([helper.make_node("Softmax", ["x"], ["y"])], [tensor("x", shape)],
                           [tensor("y", shape)], opset=12)
    assert G.class_score_outputs(model) == expected
