"""graphq.model: loading, saving and the fields that must survive both (and a pipeline run).

Every model is built here with onnx.helper: a Conv (16 output channels, so its weight is
1728 bytes, over the 1024-byte external-data threshold) followed by a BatchNormalization.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphq
from graphq import model as model_io
from graphq.errors import ModelError
from graphq.pipeline import PassManager
from tests.helpers import conv_bn_graph

IR = 8  # onnx 1.23's helper writes IR 14, which onnxruntime 1.31 refuses
METADATA = {"author": "graphq tests", "license": "test-only"}


def conv_bn_model(channels: int = 16, opset: int = 13, ir_version: int = IR,
                  seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(W[channels,3,3,3]) -> BatchNormalization -> y, with model fields."""
    graph = conv_bn_graph(channels, seed=seed)
    graph.doc_string = "graph doc"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="graphq-tests", producer_version="1.2.3")
    model.ir_version = ir_version
    model.doc_string = "a model for the model_io tests"
    model.model_version = 42
    model.domain = "org.graphq.tests"
    helper.set_model_props(model, METADATA)
    return model


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_initializers(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    ia, ib = initializers(a), initializers(b)
    assert sorted(ia) == sorted(ib)
    for name in ia:
        assert ia[name].dtype == ib[name].dtype, name
        np.testing.assert_array_equal(ia[name], ib[name], err_msg=name)


def assert_model_fields(model: onnx.ModelProto, opsets: dict[str, int] | None = None) -> None:
    """The user's fields survive; graphq adds only its own ``graphq.*`` metadata keys."""
    props = {p.key: p.value for p in model.metadata_props}
    assert {k: v for k, v in props.items() if not k.startswith("graphq.")} == METADATA
    assert model.doc_string == "a model for the model_io tests"
    assert model.producer_name == "graphq-tests"
    assert model.producer_version == "1.2.3"
    assert model.model_version == 42
    assert model.domain == "org.graphq.tests"
    assert model.graph.doc_string == "graph doc"
    want = opsets or {"": 13}
    assert {o.domain: o.version for o in model.opset_import} == want


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".graphq-"))


# ---- load ---------------------------------------------------------------------------------
def test_load_from_path_bytes_and_proto_give_the_same_model(tmp_path):
    model = conv_bn_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    from_path = graphq.load(path)
    from_str = graphq.load(str(path))
    from_bytes = graphq.load(model.SerializeToString())
    from_proto = graphq.load(model)
    for loaded in (from_path, from_str, from_bytes, from_proto):
        assert isinstance(loaded, onnx.ModelProto)
        assert loaded.SerializeToString() == model.SerializeToString()


def test_load_of_a_proto_is_a_copy(tmp_path):
    model = conv_bn_model()
    before = model.SerializeToString()
    copy = graphq.load(model)
    assert copy is not model
    copy.graph.node.pop()
    copy.graph.initializer[0].raw_data = b"\0" * 4
    copy.metadata_props.add(key="added", value="1")
    copy.ir_version = 3
    assert model.SerializeToString() == before
    assert len(model.graph.node) == 2


def test_load_with_source_reports_path_and_inline_weights(tmp_path):
    path = tmp_path / "m.onnx"
    model_io.save(conv_bn_model(), path)
    proto, source = model_io.load_with_source(path)
    assert source.path == path
    assert source.external_data is False
    assert_same_initializers(proto, conv_bn_model())


# ---- what survives a save and a pipeline run -------------------------------------------
def test_model_fields_survive_save_and_load(tmp_path):
    model = conv_bn_model()
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    path = model_io.save(model, tmp_path / "m.onnx")
    back = graphq.load(path)
    assert_model_fields(back, {"": 13, "ai.onnx.ml": 3})
    assert_same_initializers(back, model)


@pytest.mark.parametrize("opset, ir_version", [(13, IR), (11, 6)], ids=["opset13", "opset11"])
def test_model_fields_survive_a_canonicalize_and_fold_bn_run(tmp_path, opset, ir_version):
    """graphsurgeon's export (and the opset converter) drop metadata_props and doc_string:
    graphq puts them back. Opset 11 is upgraded to 13 on the way."""
    model = conv_bn_model(opset=opset, ir_version=ir_version)
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    src = model_io.save(model, tmp_path / "m.onnx")
    pm = PassManager.from_text('[[passes]]\nname = "canonicalize"\n\n'
                               '[[passes]]\nname = "fold-bn"\n')
    result = pm.run(src, tmp_path / "out")
    # the BN really was folded by graphsurgeon (so the export path was exercised)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert_model_fields(result.model, {"": 13, "ai.onnx.ml": 3})
    written = graphq.load(result.files["model"])
    assert_model_fields(written, {"": 13, "ai.onnx.ml": 3})
    assert [n.op_type for n in written.graph.node] == ["Conv"]


# ---- ir_version -----------------------------------------------------------------------------
def test_ir_version_14_is_clamped_to_what_onnxruntime_reads(tmp_path):
    model = conv_bn_model(ir_version=14)
    if model_io.max_runtime_ir_version() < 14:  # the premise: onnxruntime refuses IR 14
        with pytest.raises(Exception, match="IR version"):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    path = model_io.save(model, tmp_path / "m.onnx")
    saved = onnx.load(str(path))
    assert saved.ir_version == min(14, model_io.max_runtime_ir_version())
    assert saved.ir_version <= model_io.max_runtime_ir_version()
    sess = ort_session(path)  # loads
    out = sess.run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0]
    assert out.shape == (1, 16, 8, 8)
    assert model.ir_version == 14  # the given proto is not modified


def test_max_runtime_ir_version_is_what_onnxruntime_accepts():
    version = model_io.max_runtime_ir_version()
    assert 7 <= version <= onnx.IR_VERSION
    model = conv_bn_model(ir_version=version)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_ir_version_too_low_for_the_opset_is_raised(tmp_path):
    model = conv_bn_model(opset=13, ir_version=3)
    path = model_io.save(model, tmp_path / "m.onnx")
    saved = onnx.load(str(path))
    assert saved.ir_version >= 7
    onnx.checker.check_model(saved)
    ort_session(path)


# ---- external data --------------------------------------------------------------------------
def test_external_data_save_writes_data_file_and_reloads_equal(tmp_path):
    model = conv_bn_model()
    path = model_io.save(model, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.is_file()
    assert data.stat().st_size >= 16 * 3 * 3 * 3 * 4  # the Conv weight at least
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    # the .onnx itself no longer holds the weight
    assert path.stat().st_size < data.stat().st_size
    # readable as the model file is (onnx creates the data file 0600)
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(path.stat().st_mode)
    back, source = model_io.load_with_source(path)
    assert source.external_data is True
    assert_same_initializers(back, model)
    assert_model_fields(back)
    ort_session(path)


def test_load_with_source_without_reading_external_data(tmp_path):
    path = model_io.save(conv_bn_model(), tmp_path / "m.onnx", external_data=True)
    proto, source = model_io.load_with_source(path, external_data=False)
    assert source.external_data is True
    w = next(t for t in proto.graph.initializer if t.name == "W")
    assert w.data_location == TensorProto.EXTERNAL
    assert not w.raw_data


def test_external_save_over_a_larger_stale_data_file_replaces_it(tmp_path):
    fresh = tmp_path / "fresh"
    model_io.save(conv_bn_model(), fresh / "m.onnx", external_data=True)
    fresh_size = (fresh / "m.onnx.data").stat().st_size

    path = tmp_path / "m.onnx"
    model_io.save(conv_bn_model(channels=64, seed=1), path, external_data=True)
    stale_size = (tmp_path / "m.onnx.data").stat().st_size
    assert stale_size > fresh_size
    model_io.save(conv_bn_model(), path, external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size == fresh_size  # not appended to
    assert (tmp_path / "m.onnx.data").read_bytes() == (fresh / "m.onnx.data").read_bytes()
    assert_same_initializers(graphq.load(path), conv_bn_model())
    assert leftovers(tmp_path) == []


def test_external_save_twice_gives_the_same_data_file(tmp_path):
    path = tmp_path / "m.onnx"
    model_io.save(conv_bn_model(), path, external_data=True)
    first = (tmp_path / "m.onnx.data").read_bytes()
    model_io.save(conv_bn_model(), path, external_data=True)
    assert (tmp_path / "m.onnx.data").read_bytes() == first


def test_inline_save_after_external_save_removes_the_data_file(tmp_path):
    path = tmp_path / "m.onnx"
    model_io.save(conv_bn_model(), path, external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    model_io.save(conv_bn_model(), path, external_data=False)
    assert not (tmp_path / "m.onnx.data").exists()
    back, source = model_io.load_with_source(path)
    assert source.external_data is False
    assert_same_initializers(back, conv_bn_model())


def test_external_save_with_only_small_tensors_leaves_no_stale_data_file(tmp_path):
    """A stale ``.data`` beside a model that does not use it misleads readers (and inspect)."""
    path = tmp_path / "m.onnx"
    model_io.save(conv_bn_model(channels=64), path, external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    small = conv_bn_model(channels=4)  # every tensor under the 1024-byte threshold
    model_io.save(small, path, external_data=True)
    back, source = model_io.load_with_source(path)
    assert_same_initializers(back, small)
    assert source.external_data is False
    assert not (tmp_path / "m.onnx.data").exists(), (
        "a stale m.onnx.data from the earlier save is left beside a model that does not use it")


def test_save_does_not_modify_the_given_proto(tmp_path):
    model = conv_bn_model(ir_version=14)
    before = model.SerializeToString()
    model_io.save(model, tmp_path / "m.onnx", external_data=True)
    model_io.save(model, tmp_path / "n.onnx")
    assert model.SerializeToString() == before


# ---- atomic save ----------------------------------------------------------------------------
def test_save_leaves_no_temporary_files(tmp_path):
    model_io.save(conv_bn_model(), tmp_path / "a.onnx")
    model_io.save(conv_bn_model(), tmp_path / "b.onnx", external_data=True)
    model_io.save(conv_bn_model(), tmp_path / "a.onnx", external_data=True)
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.onnx", "a.onnx.data", "b.onnx", "b.onnx.data"]


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, external):
    path = tmp_path / "m.onnx"
    model_io.save(conv_bn_model(), path, external_data=external)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(proto, f, *args, **kwargs):
        Path(f).write_bytes(b"half a model")  # it got this far, then failed
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model_io.save(conv_bn_model(channels=64, seed=3), path, external_data=external)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    assert_same_initializers(graphq.load(path), conv_bn_model())


def test_save_to_a_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="folder"):
        model_io.save(conv_bn_model(), tmp_path)


def test_save_creates_missing_parent_folders(tmp_path):
    path = model_io.save(conv_bn_model(), tmp_path / "a" / "b" / "m.onnx")
    assert path.is_file()
    assert_same_initializers(graphq.load(path), conv_bn_model())


# ---- errors ---------------------------------------------------------------------------------
def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found") as info:
        graphq.load(tmp_path / "nope.onnx")
    assert "nope.onnx" in str(info.value)
    assert info.value.exit_code == 2


def test_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="is a folder") as info:
        graphq.load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_empty_file_is_a_model_error(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="empty") as info:
        graphq.load(path)
    assert "empty.onnx" in str(info.value)


@pytest.mark.parametrize("content", [
    b"\x00\xff" * 40 + b"not a model",
    b"this is a text file, not ONNX\n",
], ids=["binary", "text"])
def test_garbage_is_a_model_error(tmp_path, content):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        graphq.load(path)
    message = str(info.value)
    assert "garbage.onnx" in message
    assert "not a valid ONNX model" in message or "no ONNX graph" in message


def test_garbage_bytes_are_a_model_error():
    with pytest.raises(ModelError, match="the given bytes"):
        graphq.load(b"\x00\xff" * 40)
    with pytest.raises(ModelError, match="empty"):
        graphq.load(b"")


def test_protobuf_without_graph_is_a_model_error(tmp_path):
    path = tmp_path / "nograph.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    with pytest.raises(ModelError, match="no ONNX graph"):
        graphq.load(path)


def test_truncated_model_is_a_model_error(tmp_path):
    full = model_io.save(conv_bn_model(), tmp_path / "full.onnx").read_bytes()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ModelError) as info:
        graphq.load(path)
    assert "trunc.onnx" in str(info.value)
    assert "truncated" in str(info.value)


def test_missing_external_data_file_is_a_model_error(tmp_path):
    path = model_io.save(conv_bn_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelError) as info:
        graphq.load(path)
    assert "external data" in str(info.value)
    assert "m.onnx" in str(info.value)


def test_truncated_external_data_file_is_a_model_error(tmp_path):
    path = model_io.save(conv_bn_model(), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match="external data"):
        graphq.load(path)


# ---- skeleton -------------------------------------------------------------------------------
def test_skeleton_drops_big_tensor_data_and_keeps_the_rest():
    model = conv_bn_model()
    skel = model_io.skeleton(model, limit=1024)
    by_name = {t.name: t for t in skel.graph.initializer}
    assert list(by_name) == [t.name for t in model.graph.initializer]
    w = by_name["W"]
    assert w.data_type == TensorProto.FLOAT
    assert list(w.dims) == [16, 3, 3, 3]
    assert not w.raw_data and not w.float_data
    for name in ("gamma", "beta", "mean", "var"):  # 64 bytes each: kept whole
        np.testing.assert_array_equal(numpy_helper.to_array(by_name[name]),
                                      initializers(model)[name])
    assert [n.op_type for n in skel.graph.node] == ["Conv", "BatchNormalization"]
    assert [i.name for i in skel.graph.input] == ["x"]
    assert [o.name for o in skel.graph.output] == ["y"]
    assert skel.ir_version == model.ir_version
    assert {o.domain: o.version for o in skel.opset_import} == {"": 13}
    # the original is untouched and shape inference runs on the skeleton
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (16, 3, 3, 3)
    inferred = onnx.shape_inference.infer_shapes(skel)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    assert shapes["c"] == [1, 16, 8, 8]


def test_skeleton_limit_decides_what_is_kept():
    model = conv_bn_model()
    kept = model_io.skeleton(model, limit=10**6)
    assert_same_initializers(kept, model)
    emptied = model_io.skeleton(model, limit=0)
    for t in emptied.graph.initializer:
        assert not t.raw_data, t.name
        assert list(t.dims) == list(next(
            u for u in model.graph.initializer if u.name == t.name).dims)


def test_same_file():
    assert model_io.same_file(Path("a/../b.onnx"), Path("b.onnx"))
    assert not model_io.same_file(Path("a.onnx"), Path("b.onnx"))


def test_same_file_sees_links(tmp_path):
    real = tmp_path / "real.onnx"
    real.write_bytes(b"x")
    link = tmp_path / "link.onnx"
    os.symlink(real, link)
    assert model_io.same_file(real, link)


def test_sort_nodes_orders_a_graph_and_its_branches_in_place():
    """Nodes out of order are sorted (ties keep their given order), an If after the node
    its branch reads from outside, and a branch's own nodes too; a sorted graph is left as
    it is (0 moved)."""
    from onnx import TensorProto, helper

    from graphq.graph import sort_nodes

    then = helper.make_graph(
        [helper.make_node("Identity", ["t1"], ["t2"], name="then_b"),
         helper.make_node("Neg", ["a"], ["t1"], name="then_a")],  # reads 'a' from outside
        "then", [], [helper.make_tensor_value_info("t2", TensorProto.FLOAT, [2])])
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="else_a")],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other),
         helper.make_node("Relu", ["x"], ["a"], name="relu"),
         helper.make_node("ReduceSum", ["a"], ["s"], name="sum", keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"], name="greater")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    assert sort_nodes(model.graph) > 0
    assert [n.name for n in model.graph.node] == ["relu", "sum", "greater", "if"]
    branches = {a.name: [n.name for n in a.g.node] for a in model.graph.node[3].attribute}
    assert branches == {"then_branch": ["then_a", "then_b"], "else_branch": ["else_a"]}
    onnx.checker.check_model(model, full_check=True)
    assert sort_nodes(model.graph) == 0


def test_a_session_the_full_optimizer_fails_on_runs_optimized_one_level_less(monkeypatch,
                                                                             caplog):
    """onnxruntime's ORT_ENABLE_ALL optimizations failed on a valid float view (a terrain
    UNet's, with its 933 activations as outputs: 'Failed to find node output'): the session
    is made again at ORT_ENABLE_EXTENDED, with a log line; an error at both levels is the
    first one."""
    from graphq import runtime

    model = conv_bn_model()
    real = ort.InferenceSession
    levels = []

    def flaky(source, options, providers):
        levels.append(options.graph_optimization_level)
        if options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            raise RuntimeError("Failed to find node output or a constant initializer")
        return real(source, options, providers=providers)

    monkeypatch.setattr(runtime.ort, "InferenceSession", flaky)
    with caplog.at_level("INFO", logger="graphq"):
        sess = runtime.session(model)
    assert levels == [ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                      ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED]
    assert "full graph optimization failed (Failed to find node output" in caplog.text
    x = np.random.default_rng(1).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape[0] == 1

    def broken(source, options, providers):
        raise RuntimeError(f"bad at {options.graph_optimization_level}")

    monkeypatch.setattr(runtime.ort, "InferenceSession", broken)
    with pytest.raises(RuntimeError, match="ORT_ENABLE_ALL"):
        runtime.session(model)


def test_runs_shrink_the_cpu_arena_of_sessions_that_have_one():
    """runtime.run ends each run of a CPU session that has onnxruntime's arena by shrinking
    it (a session kept alive otherwise holds its largest run's peak: a 1 MB watermark
    reader's int8 run peaked at 7.2 GB with several alive, 3.0 GB shrinking); a session
    without an arena (emit's worst-tensor probes) runs as it is: onnxruntime refuses to
    shrink an arena it has not got."""
    from graphq import runtime

    model = conv_bn_model()
    x = np.random.default_rng(2).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    plain = runtime.session(model)
    options = runtime.quiet_options()
    options.enable_cpu_mem_arena = False
    bare = runtime.session(model, options=options)
    assert plain.graphq_shrinks and not bare.graphq_shrinks
    name = plain.get_inputs()[0].name
    out = runtime.run(plain, {name: x})
    np.testing.assert_array_equal(next(iter(out.values())), runtime.run(bare, {name: x})[
        next(iter(out))])
    with pytest.raises(Exception, match="arena"):  # why the flag is needed
        bare.run(None, {name: x}, runtime._SHRINKING)


def test_run_outputs_own_their_memory():
    """runtime.run copies each output out of onnxruntime's memory (which onnxruntime's arrays
    view): an output kept after its session is gone held the session's arena region, as
    calibrate's reference outputs held CRAFT's streaming arena (1 GB); the values are the
    same. A session without an arena gives them as they are."""
    from graphq import runtime

    model = conv_bn_model()
    x = np.random.default_rng(3).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    sess = runtime.session(model)
    name = sess.get_inputs()[0].name
    raw = sess.run(None, {name: x})[0]
    assert raw.base is not None and not raw.flags.owndata  # what onnxruntime gives
    out = next(iter(runtime.run(sess, {name: x}).values()))
    assert out.flags.owndata and out.base is None
    np.testing.assert_array_equal(out, raw)
    kept = np.arange(4.0)
    assert runtime.owned(kept) is kept and runtime.owned("text") == "text"
    options = runtime.quiet_options()
    options.enable_cpu_mem_arena = False  # its outputs' memory goes back with them: no copy
    bare = runtime.session(model, options=options)
    assert not next(iter(runtime.run(bare, {name: x}).values())).flags.owndata
