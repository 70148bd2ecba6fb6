"""Data readers: each input is batched on its own axis (a recurrent state [2, batch, 128]
on axis 1, a scalar sample rate on none), as silero VAD's inputs are."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphq.data
from graphq.data import DataSource, samples_in
from graphq.errors import DataError
from graphq.runtime import batch_axes, sample_feeds, true_inputs
from tests.helpers import make_model, tensor


def stateful_model(named: bool) -> onnx.ModelProto:
    """x [B, 4], state [2, B, 3], sr [] -> y = x, s = state (the inputs are what matters)."""
    b = "batch" if named else None
    nodes = [helper.make_node("Identity", ["x"], ["y"]),
             helper.make_node("Identity", ["state"], ["s"]),
             helper.make_node("Identity", ["sr"], ["r"])]
    return make_model(nodes, [tensor("x", [b, 4]), tensor("state", [2, b, 3]),
                              tensor("sr", [], TensorProto.INT64)],
                      [tensor("y", [b, 4]), tensor("s", [2, b, 3]),
                       tensor("r", [], TensorProto.INT64)])


@pytest.mark.parametrize("named", [True, False], ids=["named-dims", "unnamed-dims"])
def test_batch_axes(named):
    axes = batch_axes(true_inputs(stateful_model(named)))
    assert axes == {"x": 0, "state": 1, "sr": None}


def test_batch_axes_follow_the_batch_name():
    """A named batch dim wins over position: here the state's batch is on axis 0 of a
    [batch, 2, 3] tensor, and an input whose first dim is fixed to 1 batches on axis 0."""
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ("x", "state", "one")]
    model = make_model(nodes, [tensor("x", ["batch", 4]), tensor("state", ["batch", 2, 3]),
                               tensor("one", [1, "time"])],
                       [tensor(f"{n}_out", None) for n in ("x", "state", "one")])
    assert batch_axes(true_inputs(model)) == {"x": 0, "state": 0, "one": 0}


def test_npz_batches_slice_each_input_on_its_own_axis(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    state = rng.normal(size=(2, 10, 3)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, state=state, sr=np.array(8000, np.int64))
    model = stateful_model(named=False)
    feeds = list(DataSource(path, batch_size=4).feeds(model))
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    assert [f["state"].shape for f in feeds] == [(2, 4, 3), (2, 4, 3), (2, 2, 3)]
    np.testing.assert_array_equal(np.concatenate([f["state"] for f in feeds], axis=1), state)
    assert all(f["sr"].shape == () and int(f["sr"]) == 8000 for f in feeds)
    assert [samples_in(f, model) for f in feeds] == [4, 4, 2]
    limited = list(DataSource(path, batch_size=4, limit=5).feeds(model))
    assert [f["state"].shape[1] for f in limited] == [4, 1]
    np.testing.assert_array_equal(limited[1]["x"], x[4:5])


def test_different_sample_counts_name_the_inputs_and_axes(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 4), np.float32), state=np.zeros((2, 3, 3), np.float32),
             sr=np.array(8000, np.int64))
    with pytest.raises(DataError, match=r"'x' 4 \(axis 0\), 'state' 3 \(axis 1\)"):
        list(DataSource(path, batch_size=2).feeds(stateful_model(named=True)))



def graph_net() -> onnx.ModelProto:
    """A graph network's inputs: node features [num_nodes, 4], edges [2, num_edges], one slot
    per graph [num_graphs]; y = mean over nodes of feat @ w (the inputs are what matters)."""
    w = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["feat", "w"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["y"], axes=[0], keepdims=1),
             helper.make_node("Identity", ["edge_index"], ["e"]),
             helper.make_node("Identity", ["slots"], ["g"])]
    return make_model(nodes, [tensor("feat", ["num_nodes", 4]),
                              tensor("edge_index", [2, "num_edges"], TensorProto.INT64),
                              tensor("slots", ["num_graphs"])],
                      [tensor("y", [1, 3]), tensor("e", [2, "num_edges"], TensorProto.INT64),
                       tensor("g", ["num_graphs"])], {"w": w})


def graph_batch(rng: np.random.Generator, graphs: int) -> dict[str, np.ndarray]:
    n = int(rng.integers(5, 20))
    return {"feat": rng.normal(size=(n, 4)).astype(np.float32),
            "edge_index": rng.integers(0, n, (2, 2 * n)).astype(np.int64),
            "slots": np.zeros(graphs, np.float32)}


def test_inputs_batched_along_differently_named_dims_are_fed_whole(tmp_path):
    """Graph networks: nodes, edges and graphs count differently, and the model names those
    dims differently: each file (a folder's, or a single .npz) is one batch, fed whole,
    never split or cut by batch_size / limit; one sample each."""
    rng = np.random.default_rng(2)
    model = graph_net()
    folder = tmp_path / "graphs"
    folder.mkdir()
    batches = [graph_batch(rng, graphs) for graphs in (1, 3, 2)]
    for i, batch in enumerate(batches):
        np.savez(folder / f"{i}.npz", **batch)
    feeds = list(DataSource(folder, batch_size=2).feeds(model))
    assert len(feeds) == 3
    for feed, batch in zip(feeds, batches, strict=True):
        for k, v in batch.items():
            np.testing.assert_array_equal(feed[k], v)
    assert [samples_in(f, model) for f in feeds] == [1, 1, 1]
    assert len(list(DataSource(folder, limit=2).feeds(model))) == 2
    np.savez(tmp_path / "one.npz", **batches[1])
    (whole,) = DataSource(tmp_path / "one.npz", batch_size=2).feeds(model)
    assert whole["feat"].shape == batches[1]["feat"].shape and whole["slots"].shape == (3,)


def test_graph_network_is_quantized_from_a_folder_of_graph_batches(tmp_path):
    """The same from the command line: graphq run int8 on a folder of graph batches works."""
    from graphq import cli

    rng = np.random.default_rng(3)
    model = graph_net()
    onnx.save(model, tmp_path / "gnn.onnx")
    folder = tmp_path / "graphs"
    folder.mkdir()
    for i in range(6):
        np.savez(folder / f"{i}.npz", **graph_batch(rng, 1 + i % 3))
    out = tmp_path / "out"
    assert cli.main(["-q", "run", "int8", str(tmp_path / "gnn.onnx"), "--data", str(folder),
                     "-o", str(out)]) == 0
    deploy = onnx.load(out / "gnn.deploy.onnx")
    assert any(n.op_type == "DequantizeLinear" for n in deploy.graph.node)

def test_sample_feeds_agree_on_the_batch():
    (feed,) = sample_feeds(stateful_model(named=False))
    assert feed["x"].shape == (1, 4) and feed["state"].shape == (2, 1, 3)
    assert feed["sr"].shape == ()


def test_pieces_cut_batches_to_what_their_runs_make_measured_per_input_byte(monkeypatch):
    """What a run makes per byte of input is measured once, on one sample (here 3x: x's
    Relu, its Neg and their Sum, each the size of x); every batch is cut into pieces that
    make at most RUN_BYTES x share: 8 samples at 3 per piece, wider samples (twice the bytes)
    at 1, half the share at 1; a batch that fits, or of one sample, stays whole."""
    from graphq.data import Pieces

    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Neg", ["x"], ["n"]),
                        helper.make_node("Sum", ["r", "n"], ["y"])],
                       [tensor("x", ["N", 4, None])], [tensor("y", ["N", 4, None])])
    per_sample = 4 * 6 * 4
    monkeypatch.setattr(graphq.data, "RUN_BYTES", 3 * per_sample * 3 + 5)
    pieces = Pieces()
    x = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6)
    cut = pieces.split({"x": x}, model, None)
    assert pieces.ratio == pytest.approx(3.0)
    assert [len(p["x"]) for p in cut] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in cut]), x)
    wide = np.zeros((4, 4, 12), np.float32)
    assert [len(p["x"]) for p in pieces.split({"x": wide}, model, None)] == [1, 1, 1, 1]
    assert [len(p["x"]) for p in pieces.split({"x": x[:4]}, model, None, share=0.5)] == \
        [1, 1, 1, 1]
    assert [len(p["x"]) for p in pieces.split({"x": x[:3]}, model, None)] == [3]
    assert [len(p["x"]) for p in pieces.split({"x": x[:1]}, model, None)] == [1]
    monkeypatch.setattr(graphq.data, "RUN_BYTES", 10**9)
    (whole,) = pieces.split({"x": x}, model, None)
    assert whole["x"] is x


def test_pieces_measure_on_more_samples_where_one_does_not_run(capfd):
    """A graph that cannot run one sample (a Reshape to [4, -1], as ICLabel's views; a 3x3
    conv over one spectrogram frame) was measured as making 0 bytes, so batches were never
    cut, and onnxruntime's error line went to stderr in a successful run: the measurement
    goes on to the first 4, 16, ... samples, the first slice that runs, and says nothing
    on stderr. A graph that runs no slice stays whole."""
    from graphq.data import Pieces

    model = make_model([helper.make_node("Reshape", ["x", "four"], ["r"]),
                        helper.make_node("Relu", ["r"], ["y"])],
                       [tensor("x", ["N", 6])], [tensor("y", [4, None])],
                       {"four": np.array([4, -1], np.int64)})
    pieces = Pieces()
    x = np.ones((8, 6), np.float32)
    assert len(pieces.split({"x": x}, model, None)) == 1
    assert pieces.ratio == pytest.approx(2.0)  # r and y, each the size of x
    assert "onnxruntime" not in capfd.readouterr().err
    never = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                       [tensor("x", ["N", 6])], [tensor("y", [5, None])],
                       {"shape": np.array([5, -1], np.int64)})
    unmeasured = Pieces()
    assert len(unmeasured.split({"x": x}, never, None)) == 1
    assert unmeasured.ratio == 0.0
    assert "onnxruntime" not in capfd.readouterr().err


def test_a_string_input_accepts_the_str_arrays_an_npz_holds(tmp_path):
    """numpy saves str arrays as <U, not object: a string input takes them (as object, what
    onnxruntime feeds), and a float array for it is still refused by name."""
    model = make_model([helper.make_node("Identity", ["s"], ["t"])],
                       [tensor("s", ["N", 2], TensorProto.STRING)],
                       [tensor("t", ["N", 2], TensorProto.STRING)])
    np.savez(tmp_path / "words.npz", s=np.array([["ab", "c"], ["d", "ef"]]))
    (feed,) = DataSource(tmp_path / "words.npz").feeds(model)
    assert feed["s"].dtype == object and feed["s"].tolist() == [["ab", "c"], ["d", "ef"]]
    np.savez(tmp_path / "floats.npz", s=np.zeros((2, 2), np.float32))
    with pytest.raises(DataError, match="input 's' is float32 but the model expects object"):
        list(DataSource(tmp_path / "floats.npz").feeds(model))


def test_a_batch_fixed_at_n_is_fed_n_samples_at_a_time(tmp_path, caplog):
    """A model whose every input fixes axis 0 at 10 (an export with a fixed batch) takes 10
    samples a run: one .npz of 24 samples gives two batches of 10 (labels cut alike) and a
    warning that 4 are left out; 20 give two, quietly; 5 are a data error that says the batch
    is fixed and what to give (it used to name only the shape)."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [10, 3])],
                       [tensor("y", [10, 3])])
    x = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    np.savez(tmp_path / "d24.npz", x=x, label=np.arange(24))
    with caplog.at_level("WARNING", logger="graphq.data"):
        got = list(DataSource(tmp_path / "d24.npz").labeled_feeds(model))
    assert [f["x"].shape for f, _ in got] == [(10, 3), (10, 3)]
    assert np.array_equal(got[1][0]["x"], x[10:20]) and np.array_equal(got[1][1], np.arange(10, 20))
    assert "batch is fixed at 10 samples; the last 4 of 24 samples are left out" in caplog.text
    caplog.clear()
    np.savez(tmp_path / "d20.npz", x=x[:20])
    with caplog.at_level("WARNING", logger="graphq.data"):
        assert len(list(DataSource(tmp_path / "d20.npz", batch_size=4).feeds(model))) == 2
    assert not caplog.text
    np.savez(tmp_path / "d5.npz", x=x[:5])
    with pytest.raises(DataError, match=r"axis 0 must be 10; the model's batch is fixed at 10 "
                       r"samples: give 10 or a multiple of 10 per file"):
        list(DataSource(tmp_path / "d5.npz").feeds(model))
