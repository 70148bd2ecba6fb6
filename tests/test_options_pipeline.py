"""Typed options, pipeline files, and PassManager.run: verification, outputs, data, providers.

Models are built here with onnx.helper (Conv -> BatchNormalization, opset 13, IR 8). Passes
that misbehave on purpose are registered under unique ``test-*-xyz`` names for one test only.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphq
from graphq import options as opts
from graphq import registry
from graphq.data import DataOptions
from graphq.errors import ConfigError, DataError, PassError
from graphq.passes.canonicalize import Canonicalize, CanonicalizeOptions
from graphq.passes.fold_bn import FoldBN, FoldBNOptions
from graphq.pipeline import PassManager, PipelineOptions, presets
from graphq.registry import Pass, PassContext, PassResult
from tests.helpers import conv_bn_graph

IR = 8


def conv_bn_model(channels: int = 4, name: str = "tiny") -> onnx.ModelProto:
    graph = conv_bn_graph(channels, name=name)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR
    return model


def save_model(path: Path, model: onnx.ModelProto | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((model or conv_bn_model()).SerializeToString())
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


PREPARE = '[[passes]]\nname = "canonicalize"\n\n[[passes]]\nname = "fold-bn"\n'


# ---- passes registered for one test -----------------------------------------------------
@dataclass
class NoOptions:
    pass


def _conv_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return next(t for t in model.graph.initializer if t.name == conv.input[1])


class BreakSemantics(Pass):
    """Claims to preserve semantics but doubles the Conv weight."""

    name = "test-break-xyz"
    summary = "doubles a weight (test only)"
    Options = NoOptions
    preserves_semantics = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        w = _conv_weight(model)
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
        return PassResult(model, True)


class InvalidGraph(Pass):
    """Appends a node whose op does not exist in the default domain."""

    name = "test-invalid-xyz"
    summary = "adds an unknown op (test only)"
    Options = NoOptions

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        model.graph.node.append(helper.make_node("NoSuchOpXyz", ["y"], ["z"], name="bad"))
        return PassResult(model, True)


class Raises(Pass):
    name = "test-raise-xyz"
    summary = "raises (test only)"
    Options = NoOptions

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise RuntimeError("kaboom from inside the pass")


class ProbeProviders(Pass):
    """Records the context's providers."""

    name = "test-probe-xyz"
    summary = "records ctx.providers (test only)"
    Options = NoOptions
    seen: list[list[str]] = []

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        ProbeProviders.seen.append(list(ctx.providers))
        return PassResult(model, False)


@pytest.fixture
def registered():
    """Register test passes by class for one test; unregister afterwards."""
    added = []

    def add(cls):
        registry.register(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        registry._PASSES.pop(name, None)


# ---- options.parse --------------------------------------------------------------------------
def config_error(cls, table, where="W") -> str:
    with pytest.raises(ConfigError) as info:
        opts.parse(cls, table, where)
    assert info.value.exit_code == 2
    return str(info.value)


def test_parse_defaults_and_values():
    o = opts.parse(FoldBNOptions, {}, "W")
    assert o.fallback == "mul-add"
    assert o.ops == ["Conv", "ConvTranspose", "Gemm", "MatMul"]
    o = opts.parse(FoldBNOptions, {"fallback": "keep", "ops": ["Conv"]}, "W")
    assert (o.fallback, o.ops) == ("keep", ["Conv"])
    c = opts.parse(CanonicalizeOptions, {"min_opset": 17, "simplify": False}, "W")
    assert (c.min_opset, c.simplify, c.fold_constants) == (17, False, True)
    p = opts.parse(PipelineOptions, {"samples": 3}, "W")
    assert p.samples == 3
    d = opts.parse(DataOptions, {"limit": 5}, "W")
    assert d.limit == 5 and d.source is None


def test_parse_unknown_key_did_you_mean():
    msg = config_error(FoldBNOptions, {"fallbak": "keep"}, "pass 'fold-bn'")
    assert msg.startswith("pass 'fold-bn': ")
    assert "unknown option 'fallbak'" in msg
    assert "did you mean 'fallback'?" in msg
    assert "allowed: ops, fallback" in msg


def test_parse_unknown_key_without_close_match_lists_allowed():
    msg = config_error(CanonicalizeOptions, {"zzzz": 1})
    assert "unknown option 'zzzz'" in msg
    assert "did you mean" not in msg
    assert "min_opset" in msg and "keep_initializer_inputs" in msg


@pytest.mark.parametrize("cls, table, expected", [
    (CanonicalizeOptions, {"simplify": "yes"},
     "option 'simplify' must be true or false, not 'yes'"),
    (CanonicalizeOptions, {"simplify": 1}, "option 'simplify' must be true or false, not 1"),
    (CanonicalizeOptions, {"min_opset": 13.0}, "option 'min_opset' must be an integer, not 13.0"),
    (CanonicalizeOptions, {"min_opset": True}, "option 'min_opset' must be an integer, not True"),
    (CanonicalizeOptions, {"min_opset": "13"}, "option 'min_opset' must be an integer, not '13'"),
    (PipelineOptions, {"providers": "CPUExecutionProvider"},
     "option 'providers' must be a list of str"),
    (DataOptions, {"source": 3}, "option 'source' must be a string, not 3"),
    (DataOptions, {"limit": 1.5}, "option 'limit' must be an integer, not 1.5"),
])
def test_parse_wrong_types(cls, table, expected):
    assert expected in config_error(cls, table)


@pytest.mark.parametrize("cls, table, expected", [
    (FoldBNOptions, {"fallback": "drop"},
     "option 'fallback' is 'drop'; allowed: 'mul-add', 'keep'"),
    (FoldBNOptions, {"fallback": "keeep"}, "(did you mean 'keep'?)"),
    (PipelineOptions, {"verify": "always"}, "allowed: 'each', 'end', 'off'"),
    (FoldBNOptions, {"ops": ["Conv", "Relu"]},
     "'Relu'; allowed: Conv, ConvTranspose, Gemm, MatMul"),
])
def test_parse_values_not_allowed(cls, table, expected):
    assert expected in config_error(cls, table)


@pytest.mark.parametrize("cls, table, expected", [
    (CanonicalizeOptions, {"min_opset": 5}, "option 'min_opset' is 5; it must be >= 7"),
    (CanonicalizeOptions, {"min_opset": 999}, "option 'min_opset' is 999; it must be <= "),
    (PipelineOptions, {"samples": 0}, "option 'samples' is 0; it must be >= 1"),
    (DataOptions, {"batch_size": -1}, "option 'batch_size' is -1; it must be >= 1"),
    (DataOptions, {"limit": 0}, "option 'limit' is 0; it must be >= 1"),
])
def test_parse_min_max(cls, table, expected):
    assert expected in config_error(cls, table)


@dataclass
class QuantSpec:
    dtype: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    bits: int = field(default=8, metadata={"min": 2, "max": 8})


@dataclass
class NestedOptions:
    groups: list[list[int]] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)
    weights: QuantSpec = field(default_factory=QuantSpec)
    kinds: list[Literal["a", "b"]] = field(default_factory=list)
    limit: int | None = None
    either: int | str = 0


def test_parse_nested_types_accepts_good_values():
    o = opts.parse(NestedOptions, {
        "groups": [[1, 2], [3]], "scales": {"a": 1, "b": 0.5},
        "weights": {"dtype": "uint8", "bits": 4}, "kinds": ["b", "a"], "either": "x"}, "W")
    assert o.groups == [[1, 2], [3]]
    assert o.scales == {"a": 1.0, "b": 0.5} and isinstance(o.scales["a"], float)
    assert o.weights == QuantSpec(dtype="uint8", per_channel=True, bits=4)
    assert o.kinds == ["b", "a"]
    assert o.either == "x"


@pytest.mark.parametrize("table, expected", [
    ({"groups": [[1, 2], ["x"]]}, "W: option 'groups'[1][0] must be an integer, not 'x'"),
    ({"groups": [1]}, "W: option 'groups'[0] must be a list of int, not 1"),
    ({"scales": {"a": 1, "b": "x"}}, "W: option 'scales'.b must be a number, not 'x'"),
    ({"scales": [1]}, "W: option 'scales' must be a table"),
    ({"weights": {"dtyp": "int8"}}, "unknown option 'dtyp' (did you mean 'dtype'?)"),
    ({"weights": {"dtype": "int4"}}, "option 'weights': option 'dtype' is 'int4'"),
    ({"weights": {"bits": 9}}, "option 'weights': option 'bits' is 9; it must be <= 8"),
    ({"weights": 3}, "option 'weights' must be a table"),
    ({"kinds": ["a", "c"]}, "option 'kinds'[1] is 'c'; allowed: 'a', 'b'"),
    ({"limit": "x"}, "option 'limit' must be an integer, not 'x'"),
    ({"either": 1.5}, "option 'either': 1.5 is not int or str"),
])
def test_parse_nested_types_errors(table, expected):
    assert expected in config_error(NestedOptions, table)


def test_pass_keyword_options_are_parsed():
    assert FoldBN(fallback="keep").options.fallback == "keep"
    with pytest.raises(ConfigError, match="pass 'fold-bn': unknown option 'fallbak'"):
        FoldBN(fallbak="keep")


# ---- pipeline files ---------------------------------------------------------------------
def pipeline_error(tmp_path: Path, text: str, name: str = "pipe.toml") -> str:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        PassManager.from_toml(path)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


def test_from_toml_reads_passes_settings_and_data(tmp_path):
    path = write(tmp_path / "p.toml", '[pipeline]\nverify = "end"\nsamples = 3\n\n'
                 '[data]\nbatch_size = 4\n\n' + PREPARE
                 + 'fallback = "keep"\nops = ["Conv"]\n')
    pm = PassManager.from_toml(path)
    assert [p.name for p in pm.passes] == ["canonicalize", "fold-bn"]
    assert isinstance(pm.passes[1], FoldBN)
    assert pm.passes[1].options == FoldBNOptions(ops=["Conv"], fallback="keep")
    assert pm.settings.verify == "end" and pm.settings.samples == 3
    assert pm.data.batch_size == 4
    assert pm.origin == path


def test_unknown_top_level_table(tmp_path):
    msg = pipeline_error(tmp_path, '[pipline]\nverify = "each"\n' + PREPARE)
    assert "unknown table 'pipline'" in msg
    assert "did you mean 'pipeline'?" in msg


def test_missing_passes(tmp_path):
    msg = pipeline_error(tmp_path, '[pipeline]\nverify = "each"\n')
    assert "no passes" in msg and "[[passes]]" in msg


def test_pass_without_name(tmp_path):
    msg = pipeline_error(tmp_path, '[[passes]]\nname = "canonicalize"\n\n'
                         '[[passes]]\nfallback = "keep"\n')
    assert "[[passes]] #2" in msg
    assert "name" in msg


def test_pass_name_not_a_string(tmp_path):
    msg = pipeline_error(tmp_path, '[[passes]]\nname = 3\n')
    assert "[[passes]] #1" in msg and "'name' must be a pass name string" in msg


def test_unknown_pass_name_did_you_mean(tmp_path):
    msg = pipeline_error(tmp_path, '[[passes]]\nname = "canonicalize"\n\n'
                         '[[passes]]\nname = "fold_bn"\n')
    assert "[[passes]] #2" in msg
    assert "unknown pass 'fold_bn'" in msg
    assert "did you mean 'fold-bn'?" in msg
    for name in graphq.registered_passes():
        assert name in msg.split("passes: ")[1]


def test_unknown_pass_option_names_file_index_pass_and_key(tmp_path):
    msg = pipeline_error(tmp_path, PREPARE + 'fallbak = "keep"\n')
    assert "[[passes]] #2 (pass 'fold-bn')" in msg
    assert "unknown option 'fallbak' (did you mean 'fallback'?)" in msg


def test_bad_pass_option_value_names_file_index_pass_and_key(tmp_path):
    msg = pipeline_error(tmp_path, '[[passes]]\nname = "canonicalize"\nmin_opset = "13"\n')
    assert "[[passes]] #1 (pass 'canonicalize')" in msg
    assert "option 'min_opset' must be an integer" in msg


def test_bad_verify_value(tmp_path):
    msg = pipeline_error(tmp_path, '[pipeline]\nverify = "always"\n' + PREPARE)
    assert "[pipeline]" in msg
    assert "option 'verify' is 'always'" in msg
    assert "'each', 'end', 'off'" in msg


def test_bad_data_table(tmp_path):
    msg = pipeline_error(tmp_path, '[data]\nbatch_size = 0\n' + PREPARE)
    assert "[data]" in msg and "option 'batch_size' is 0" in msg


def test_pipeline_not_a_table(tmp_path):
    msg = pipeline_error(tmp_path, 'pipeline = 3\n' + PREPARE)
    assert "'pipeline' must be a table" in msg


def test_toml_syntax_error(tmp_path):
    msg = pipeline_error(tmp_path, '[[passes]\nname = "fold-bn"\n')
    assert "not valid TOML" in msg
    assert "line 1" in msg


def test_from_text_without_origin_names_the_pipeline():
    with pytest.raises(ConfigError, match="^<pipeline>: unknown table 'x'"):
        PassManager.from_text('[x]\n' + PREPARE)


def test_empty_pass_list_in_python():
    with pytest.raises(ConfigError, match="at least one pass"):
        PassManager([])


# ---- printing a pipeline back ---------------------------------------------------------------
def test_to_toml_round_trip_with_non_default_options():
    names = ["a b", 'q"x', "back\\slash", "tab\there", "uni é", "[brackets] = 'x'"]
    pm = PassManager([Canonicalize(keep_initializer_inputs=names, min_opset=17, simplify=False),
                      FoldBN(fallback="keep", ops=["Conv", "Gemm"])],
                     PipelineOptions(verify="end", samples=3, fallback=True),
                     DataOptions(source="calib dir/x.npz", batch_size=4, limit=10))
    text = pm.to_toml()
    doc = tomllib.loads(text)  # valid TOML
    assert doc["passes"][0]["keep_initializer_inputs"] == names
    assert doc["passes"][1]["fallback"] == "keep"
    back = PassManager.from_text(text)
    assert back.to_toml() == text
    assert back.passes[0].options == pm.passes[0].options
    assert back.passes[1].options == pm.passes[1].options
    assert back.settings == pm.settings
    assert back.data == pm.data


def test_to_toml_round_trip_with_per_tensor_overrides():
    """insert-qdq's overrides are a table of tables (dataclasses inside a dict): the written
    pipeline (every run writes one) reads back to the same options."""
    from graphq.passes.insert_qdq import InsertQDQ

    p = InsertQDQ(overrides={"input/x": {"quantize": False}, "w": {"dtype": "int4"}},
                  weights={"clip": "mse", "reduce_range": False})
    text = PassManager([p]).to_toml()
    doc = tomllib.loads(text)
    assert doc["passes"][0]["overrides"] == {"input/x": {"quantize": False},
                                             "w": {"quantize": True, "dtype": "int4"}}
    back = PassManager.from_text(text)
    assert back.passes[0].options == p.options
    assert back.to_toml() == text


def test_to_toml_of_defaults_round_trips():
    pm = PassManager.from_text(PREPARE)
    assert PassManager.from_text(pm.to_toml()).to_toml() == pm.to_toml()
    assert "[data]" not in pm.to_toml()  # default data table is left out


def test_to_toml_round_trip_with_a_control_character_in_a_name():
    """TOML forbids a raw U+007F (DEL) in a basic string; it must be written escaped."""
    pm = PassManager([Canonicalize(keep_initializer_inputs=["del\x7fname"])])
    back = PassManager.from_text(pm.to_toml())
    assert back.passes[0].options.keep_initializer_inputs == ["del\x7fname"]


# ---- presets ----------------------------------------------------------------------------
def test_prepare_preset():
    assert "prepare" in presets()
    pm = PassManager.from_toml("prepare")
    assert [p.name for p in pm.passes] == ["canonicalize", "fold-bn"]
    assert pm.settings.verify == "each"
    assert pm.origin == presets()["prepare"]
    assert PassManager.from_text(pm.to_toml()).to_toml() == pm.to_toml()


@pytest.mark.parametrize("spec, expected", [
    ("prepar", "did you mean 'prepare'?"),
    ("no-such-preset", "neither a pipeline file nor a preset"),
    ("dir/missing.toml", "pipeline file not found: dir/missing.toml"),
])
def test_unknown_preset_lists_presets(spec, expected):
    with pytest.raises(ConfigError) as info:
        PassManager.from_toml(spec)
    assert expected in str(info.value)
    assert "prepare" in str(info.value).split("presets: ")[1].split(", ")
    assert info.value.exit_code == 2


def test_pipeline_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        PassManager.from_toml(tmp_path)


# ---- run: verification ----------------------------------------------------------------------
def test_run_verifies_each_pass(tmp_path):
    result = PassManager.from_text(PREPARE).run(conv_bn_model())
    assert [r.name for r in result.records] == ["canonicalize", "fold-bn"]
    for record in result.records:
        v = record.verified
        assert v["checker"] is True and v["onnxruntime"] is True
        assert 0 <= v["max_rel_err"] <= v["rtol"] == 1e-4
        assert isinstance(record.seconds, float) and record.seconds >= 0
    fold = result.records[1]
    assert fold.changed is True
    assert fold.counts["folded"] == 1
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert result.files == {}


def test_run_verify_off_records_nothing():
    pm = PassManager.from_text('[pipeline]\nverify = "off"\n' + PREPARE)
    result = pm.run(conv_bn_model())
    assert [r.verified for r in result.records] == [{}, {}]
    assert all(r.seconds >= 0 for r in result.records)


def test_run_verify_end_records_only_the_last_pass():
    pm = PassManager.from_text('[pipeline]\nverify = "end"\n' + PREPARE)
    result = pm.run(conv_bn_model())
    assert result.records[0].verified == {}
    assert result.records[1].verified["checker"] is True
    assert "max_rel_err" in result.records[1].verified


def test_run_does_not_modify_the_given_proto():
    model = conv_bn_model()
    before = model.SerializeToString()
    result = PassManager.from_text(PREPARE).run(model)
    assert model.SerializeToString() == before
    assert result.model is not model


def test_dump_dir_writes_the_graph_after_each_pass(tmp_path):
    dump = tmp_path / "dump"
    PassManager.from_text(PREPARE).run(conv_bn_model(), dump_dir=dump)
    assert sorted(p.name for p in dump.iterdir()) == ["01-canonicalize.onnx", "02-fold-bn.onnx"]
    first = onnx.load(str(dump / "01-canonicalize.onnx"))
    second = onnx.load(str(dump / "02-fold-bn.onnx"))
    assert [n.op_type for n in first.graph.node] == ["Conv", "BatchNormalization"]
    assert [n.op_type for n in second.graph.node] == ["Conv"]


def test_a_pass_that_breaks_semantics_is_caught(tmp_path, registered):
    registered(BreakSemantics)
    pm = PassManager.from_text('[[passes]]\nname = "canonicalize"\n\n'
                               '[[passes]]\nname = "test-break-xyz"\n')
    out = tmp_path / "out"
    with pytest.raises(PassError) as info:
        pm.run(save_model(tmp_path / "m.onnx"), out)
    message = str(info.value)
    assert "pass 'test-break-xyz'" in message
    assert "step 2" in message
    assert "ran before it: canonicalize" in message
    assert "changed output 'y'" in message
    assert info.value.exit_code == 1
    assert not out.exists()


def test_a_pass_that_breaks_semantics_is_caught_at_the_end(tmp_path):
    pm = PassManager([Canonicalize(), BreakSemantics(), FoldBN()],
                     PipelineOptions(verify="end"))
    with pytest.raises(PassError, match="changed output 'y'"):
        pm.run(conv_bn_model(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_pass_that_makes_an_invalid_graph_is_caught(tmp_path, registered):
    registered(InvalidGraph)
    pm = PassManager.from_text('[[passes]]\nname = "fold-bn"\n\n'
                               '[[passes]]\nname = "test-invalid-xyz"\n')
    out = tmp_path / "out"
    with pytest.raises(PassError) as info:
        pm.run(conv_bn_model(), out)
    message = str(info.value)
    assert "pass 'test-invalid-xyz'" in message
    assert "ran before it: fold-bn" in message
    assert "invalid graph (onnx.checker)" in message
    assert "NoSuchOpXyz" in message
    assert not out.exists()


def test_a_pass_that_raises_is_a_pass_error(tmp_path, registered):
    registered(Raises)
    pm = PassManager.from_text('[[passes]]\nname = "canonicalize"\n\n'
                               '[[passes]]\nname = "test-raise-xyz"\n')
    out = tmp_path / "out"
    with pytest.raises(PassError) as info:
        pm.run(conv_bn_model(), out)
    message = str(info.value)
    assert "pass 'test-raise-xyz'" in message
    assert "ran before it: canonicalize" in message
    assert "RuntimeError: kaboom from inside the pass" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not out.exists()


def test_an_invalid_input_model_is_not_blamed_on_the_first_pass():
    """The input is checked before any pass runs: an invalid input is the model's fault."""
    graph = helper.make_graph(
        [helper.make_node("FooBarXyz", ["x"], ["y"], name="n1")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR
    with pytest.raises(graphq.GraphqError) as info:
        PassManager([FoldBN()]).run(model)
    assert isinstance(info.value, graphq.ModelError), (
        f"{type(info.value).__name__} (exit {info.value.exit_code}): {info.value}")


# ---- run: outputs ---------------------------------------------------------------------------
def test_run_writes_model_report_and_pipeline(tmp_path):
    src = save_model(tmp_path / "in" / "net.onnx")
    out = tmp_path / "out"
    pm = PassManager.from_text('[pipeline]\nsamples = 1\n' + PREPARE + 'fallback = "keep"\n')
    result = pm.run(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["net.opt.onnx", "pipeline.toml",
                                                     "report.json"]
    assert result.files == {"model": out / "net.opt.onnx", "report": out / "report.json",
                            "pipeline": out / "pipeline.toml"}
    written = onnx.load(str(out / "net.opt.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert [n.op_type for n in written.graph.node] == ["Conv"]
    ort.InferenceSession(str(out / "net.opt.onnx"), providers=["CPUExecutionProvider"])

    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "fold-bn"]
    assert report["model"] == str(src)
    assert report["graphq"] == graphq.__version__
    assert report["passes"][1]["counts"]["folded"] == 1
    assert report["passes"][1]["verified"]["checker"] is True
    assert report["files"]["model"] == str(out / "net.opt.onnx")

    again = PassManager.from_toml(out / "pipeline.toml")
    assert again.to_toml() == pm.to_toml()
    assert again.passes[1].options.fallback == "keep"
    assert again.settings.samples == 1


def test_run_keeps_external_data_layout(tmp_path):
    src = tmp_path / "m.onnx"
    graphq.save(conv_bn_model(channels=16), src, external_data=True)
    out = tmp_path / "out"
    PassManager.from_text(PREPARE).run(src, out)
    assert (out / "m.opt.onnx.data").is_file()
    ort.InferenceSession(str(out / "m.opt.onnx"), providers=["CPUExecutionProvider"])


def test_run_leaves_the_input_file_alone(tmp_path):
    src = save_model(tmp_path / "m.onnx")
    old = 1_600_000_000
    os.utime(src, (old, old))
    before = src.read_bytes()
    PassManager.from_text(PREPARE).run(src, tmp_path)  # the output goes beside the input
    assert src.read_bytes() == before
    assert src.stat().st_mtime == old
    assert (tmp_path / "m.opt.onnx").is_file()


def test_run_refuses_to_overwrite_the_input(tmp_path):
    """The output ``<stem>.opt.onnx`` already is the input (a link to it): refuse."""
    src = save_model(tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(src, out / "m.opt.onnx")
    before = src.read_bytes()
    with pytest.raises(ConfigError, match="would overwrite the input model") as info:
        PassManager.from_text(PREPARE).run(src, out)
    assert info.value.exit_code == 2
    assert src.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["m.opt.onnx"]


def test_run_on_an_opt_model_in_the_outdir_does_not_touch_it(tmp_path):
    out = tmp_path / "out"
    src = save_model(out / "m.opt.onnx")
    before = src.read_bytes()
    PassManager.from_text(PREPARE).run(src, out)
    assert src.read_bytes() == before
    assert (out / "m.opt.opt.onnx").is_file()


def test_run_of_a_proto_writes_inside_the_outdir(tmp_path):
    """The output name comes from graph.name for a proto; it must not make sub-folders."""
    out = tmp_path / "out"
    result = PassManager([FoldBN()]).run(conv_bn_model(name="sub/dir/net"), out)
    assert result.files["model"].parent == out
    assert not (out / "sub").exists()


# ---- run: data ------------------------------------------------------------------------------
def test_data_is_used_for_verification(tmp_path):
    """Doubling the Conv weight is invisible on zero inputs: data of zeros hides the break,
    random data (the default) finds it. So the verification ran on the given data."""
    zeros = tmp_path / "zeros.npz"
    np.savez(zeros, x=np.zeros((4, 3, 8, 8), np.float32))
    pm = PassManager([BreakSemantics()])
    result = pm.run(conv_bn_model(), data=zeros)
    assert result.records[0].verified["max_rel_err"] == 0.0
    with pytest.raises(PassError, match="test-break-xyz"):
        pm.run(conv_bn_model())
    feeds = [{"x": np.zeros((1, 3, 8, 8), np.float32)}]
    assert pm.run(conv_bn_model(), data=feeds).records[0].verified["max_rel_err"] == 0.0


def test_data_from_the_pipeline_file_is_relative_to_it(tmp_path, registered, monkeypatch):
    registered(BreakSemantics)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    np.savez(cfg / "calib.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    path = write(cfg / "p.toml", '[data]\nsource = "calib.npz"\n\n'
                 '[[passes]]\nname = "test-break-xyz"\n')
    monkeypatch.chdir(tmp_path)  # not the pipeline's folder
    result = PassManager.from_toml(path).run(conv_bn_model())
    assert result.records[0].verified["max_rel_err"] == 0.0


def test_written_pipeline_toml_runs_again_with_its_data(tmp_path, monkeypatch):
    """out/pipeline.toml is the pipeline as run: read back, it must find the same data."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    np.savez(cfg / "calib.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    path = write(cfg / "p.toml", '[data]\nsource = "calib.npz"\n\n' + PREPARE)
    monkeypatch.chdir(tmp_path)
    PassManager.from_toml(path).run(conv_bn_model(), tmp_path / "out")
    again = PassManager.from_toml(tmp_path / "out" / "pipeline.toml")
    result = again.run(conv_bn_model())  # DataError 'data not found' when the path broke
    assert [r.name for r in result.records] == ["canonicalize", "fold-bn"]


@pytest.mark.parametrize("arrays, expected", [
    ({"inp": np.zeros((2, 3, 8, 8), np.float32)},
     ["'inp' is not an input of the model", "the model's inputs are: x"]),
    ({"x": np.zeros((2, 3, 8, 8), np.int64)},
     ["input 'x' is int64 but the model expects float32"]),
    ({"x": np.zeros((2, 3, 8), np.float32)},
     ["input 'x' has shape [2, 3, 8]", "expects rank 4"]),
    ({"x": np.zeros((2, 5, 8, 8), np.float32)},
     ["input 'x' has shape [2, 5, 8, 8]", "axis 1 must be 3"]),
])
def test_data_that_does_not_fit_the_model(tmp_path, arrays, expected):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        PassManager.from_text(PREPARE).run(conv_bn_model(), tmp_path / "out", data=path)
    for text in expected:
        assert text in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_data_folder_of_npy_for_a_single_input_model(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        np.save(folder / f"{i:03d}.npy", rng.standard_normal((1, 3, 8, 8)))  # float64: cast
    result = PassManager.from_text(PREPARE).run(conv_bn_model(), data=folder)
    assert "max_rel_err" in result.records[1].verified
    zeros = tmp_path / "zeros"
    zeros.mkdir()
    np.save(zeros / "a.npy", np.zeros((1, 3, 8, 8), np.float32))
    broken = PassManager([BreakSemantics()]).run(conv_bn_model(), data=zeros)
    assert broken.records[0].verified["max_rel_err"] == 0.0


def test_data_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        PassManager.from_text(PREPARE).run(conv_bn_model(), data=tmp_path / "nope.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npz, .npy or image files"):
        PassManager.from_text(PREPARE).run(conv_bn_model(), data=tmp_path / "empty")


# ---- run: providers ---------------------------------------------------------------------
def needs_no_cuda():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")


def test_unavailable_provider_is_a_config_error(tmp_path):
    needs_no_cuda()
    pm = PassManager.from_text('[pipeline]\nproviders = ["CUDAExecutionProvider"]\n' + PREPARE)
    with pytest.raises(ConfigError) as info:
        pm.run(conv_bn_model(), tmp_path / "out")
    message = str(info.value)
    assert "'CUDAExecutionProvider' is not available" in message
    for name in ort.get_available_providers():
        assert name in message
    assert "fallback = true" in message
    assert not (tmp_path / "out").exists()


def test_unavailable_provider_with_fallback_runs_on_cpu(tmp_path, registered, caplog,
                                                        monkeypatch):
    needs_no_cuda()
    registered(ProbeProviders)
    ProbeProviders.seen.clear()
    monkeypatch.setattr(logging.getLogger("graphq"), "propagate", True)
    pm = PassManager.from_text('[pipeline]\nproviders = ["CUDAExecutionProvider"]\n'
                               'fallback = true\n\n[[passes]]\nname = "test-probe-xyz"\n\n'
                               '[[passes]]\nname = "fold-bn"\n')
    with caplog.at_level(logging.WARNING, logger="graphq"):
        result = pm.run(conv_bn_model(), tmp_path / "out")
    assert ProbeProviders.seen == [["CPUExecutionProvider"]]
    assert result.records[1].verified["onnxruntime"] is True
    assert (tmp_path / "out" / "tiny.opt.onnx").is_file()
    assert any("CUDAExecutionProvider is not available" in r.getMessage()
               for r in caplog.records)


def test_run_providers_argument_overrides_and_accepts_aliases(registered):
    registered(ProbeProviders)
    ProbeProviders.seen.clear()
    PassManager.from_text('[[passes]]\nname = "test-probe-xyz"\n').run(
        conv_bn_model(), providers=["cpu"])
    assert ProbeProviders.seen == [["CPUExecutionProvider"]]
