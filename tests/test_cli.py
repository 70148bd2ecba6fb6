"""The ``graphq`` command: called in-process through graphq.cli.main, and once as a program.

Exit codes: 0 success, 2 usage/configuration/model/data error, 1 a pass failed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphq
from graphq import cli
from graphq import options as opts
from graphq.pipeline import PipelineOptions, presets
from graphq.registry import passes
from tests.helpers import conv_bn_graph

IR = 8


def conv_bn_model(channels: int = 4) -> onnx.ModelProto:
    graph = conv_bn_graph(channels, batch="N")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="cli-tests", producer_version="0.9")
    model.ir_version = IR
    helper.set_model_props(model, {"owner": "tests"})
    return model


def qdq_model() -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> Relu -> y."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
             helper.make_node("Relu", ["dq"], ["y"])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR
    return model


def unconvertible_model() -> onnx.ModelProto:
    """A valid opset-7 model with the experimental ImageScaler, which the version converter
    cannot upgrade: canonicalize fails (the input itself passes the checker)."""
    graph = helper.make_graph(
        [helper.make_node("ImageScaler", ["x"], ["y"], name="strange", scale=2.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 4
    return model


def save(path: Path, model: onnx.ModelProto) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def model_path(tmp_path) -> Path:
    return save(tmp_path / "net.onnx", conv_bn_model())


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("graphq: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---- version, passes, inspect ---------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"graphq {graphq.__version__}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_passes_lists_every_pass_with_options_and_presets(capsys):
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0
    registry = passes()
    assert {"canonicalize", "fold-bn"} <= set(registry)
    for name, cls in registry.items():
        assert f"{name}  -  {cls.summary}" in out
        for option, type_name, _default, _help in opts.describe(cls.Options):
            assert f"    {option} ({type_name}, " in out, option
    assert "    min_opset (int, default 13)" in out
    assert "    fallback (mul-add|keep, default \"mul-add\")" in out
    assert '    ops (list[str], default ["Conv", "ConvTranspose", "Gemm", "MatMul"])' in out
    assert "    keep_initializer_inputs (list[str], default [])" in out
    assert "upgrade the ONNX opset to at least this version" in out  # help lines
    assert "[pipeline] table" in out and "[data] table" in out
    for option, *_ in opts.describe(PipelineOptions):
        assert f"    {option} (" in out
    assert "    verify (each|end|off, default \"each\")" in out
    assert "    limit (int or none, default none)" in out
    assert out.strip().splitlines()[-1] == (
        "presets (graphq run NAME model.onnx): " + ", ".join(sorted(presets())))
    assert "prepare" in presets()


def test_inspect(capsys, model_path):
    code, out, _ = run_cli(capsys, "inspect", model_path)
    assert code == 0
    lines = out.splitlines()
    assert f"model      {model_path}" in lines
    assert "ir_version 8   opsets ai.onnx 13" in lines
    assert "producer   cli-tests 0.9" in lines
    assert "    x: float [N, 3, 8, 8]" in lines
    assert "    y: float [N, 4, 8, 8]" in lines
    assert "parameters 124 in 5 initializers" in lines  # 4*3*3*3 + 4*4
    assert "nodes      2   Q/DQ 0" in lines
    assert "ops        BatchNormalization 1, Conv 1" in lines
    assert not any(line.startswith("in bodies") for line in lines)


def test_inspect_counts_the_ops_inside_loop_bodies(capsys, tmp_path):
    """A recurrent net exported as a Loop: its MatMul is only in the body; inspect says so."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["h_mm"]),
         helper.make_node("Tanh", ["h_mm"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "", "h0"], ["h"], body=body)], "g",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(3, np.int64), "steps")])
    path = tmp_path / "loop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "ops        Loop 1" in out.splitlines()
    assert "in bodies  Identity 1, MatMul 1, Tanh 1   (If branches, Loop/Scan bodies)" in out
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert json.loads(out)["subgraph_ops"] == {"Identity": 1, "MatMul": 1, "Tanh": 1}


def test_inspect_json(capsys, model_path):
    code, out, _ = run_cli(capsys, "inspect", model_path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["path"] == str(model_path)
    assert info["ir_version"] == 8
    assert info["opsets"] == {"": 13}
    assert info["producer"] == "cli-tests 0.9"
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 3, 8, 8]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float", "shape": ["N", 4, 8, 8]}]
    assert info["parameters"] == 124
    assert info["initializers"] == 5
    assert info["nodes"] == 2
    assert info["qdq"] == 0
    assert info["ops"] == {"BatchNormalization": 1, "Conv": 1}
    assert info["metadata"] == {"owner": "tests"}
    assert info["external_data"] is False
    assert info["size_bytes"] == model_path.stat().st_size


def test_inspect_counts_qdq(capsys, tmp_path):
    path = save(tmp_path / "q.onnx", qdq_model())
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["qdq"] == 2
    assert info["ops"] == {"DequantizeLinear": 1, "QuantizeLinear": 1, "Relu": 1}
    assert info["parameters"] == 2
    code, out, _ = run_cli(capsys, "inspect", path)
    assert "nodes      3   Q/DQ 2" in out.splitlines()


def test_inspect_external_data(capsys, tmp_path):
    path = graphq.save(conv_bn_model(channels=16), tmp_path / "e.onnx", external_data=True)
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert info["external_data"] is True
    assert info["size_bytes"] == path.stat().st_size + (tmp_path / "e.onnx.data").stat().st_size
    assert info["parameters"] == 16 * 27 + 4 * 16
    code, out, _ = run_cli(capsys, "inspect", path)
    assert "(with external data)" in out


@pytest.mark.parametrize("name, location", [
    ("net[1].onnx", "net[1].onnx.data"),  # glob characters in the file name
    ("net.onnx", "weights.bin"),  # the data file an exporter named
], ids=["glob-chars", "other-location"])
def test_inspect_size_counts_the_data_file_the_model_uses(capsys, tmp_path, name, location):
    path = tmp_path / name
    onnx.save_model(conv_bn_model(channels=16), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=1024)
    data = tmp_path / location
    assert data.is_file()
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["external_data"] is True
    assert info["size_bytes"] == path.stat().st_size + data.stat().st_size


def test_inspect_size_ignores_a_data_file_the_model_does_not_use(capsys, tmp_path):
    path = save(tmp_path / "net.onnx", conv_bn_model())
    (tmp_path / "net.onnx.data").write_bytes(b"\0" * 10_000)  # left by something else
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert info["external_data"] is False
    assert info["size_bytes"] == path.stat().st_size


def test_inspect_missing_model(capsys, tmp_path):
    code, out, err = run_cli(capsys, "inspect", tmp_path / "nope.onnx")
    assert code == 2
    assert out == ""
    assert_one_error_line(err, "model file not found", "nope.onnx")


# ---- run ------------------------------------------------------------------------------------
def test_run_prepare(capsys, tmp_path, model_path):
    out_dir = tmp_path / "out"
    dump = tmp_path / "dump"
    code, out, err = run_cli(capsys, "run", "prepare", model_path, "-o", out_dir,
                             "--dump-dir", dump)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["net.opt.onnx", "pipeline.toml",
                                                         "report.json"]
    assert sorted(p.name for p in dump.iterdir()) == ["01-canonicalize.onnx",
                                                      "02-fold-bn.onnx"]
    model = onnx.load(str(out_dir / "net.opt.onnx"))
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    ort.InferenceSession(str(out_dir / "net.opt.onnx"), providers=["CPUExecutionProvider"])
    report = json.loads((out_dir / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "fold-bn"]
    assert "graphq: [1/2] canonicalize" in err
    assert "graphq: [2/2] fold-bn: changed: folded 1" in err
    assert "graphq: done: 2 passes" in err
    assert "error" not in err


def test_run_with_data_and_providers(capsys, tmp_path, model_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32))
    code, _, err = run_cli(capsys, "run", "prepare", model_path, "-o", tmp_path / "out",
                           "--data", data, "--providers", "cpu")
    assert code == 0, err
    assert (tmp_path / "out" / "net.opt.onnx").is_file()


def test_run_with_data_that_does_not_fit(capsys, tmp_path, model_path):
    data = tmp_path / "calib.npz"
    np.savez(data, image=np.zeros((3, 3, 8, 8), np.float32))
    code, _, err = run_cli(capsys, "run", "prepare", model_path, "-o", tmp_path / "out",
                           "--data", data)
    assert code == 2
    assert_one_error_line(err, "'image' is not an input of the model", "inputs are: x")
    assert not (tmp_path / "out").exists()


def test_run_with_an_unavailable_provider(capsys, tmp_path, model_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(capsys, "run", "prepare", model_path, "-o", tmp_path / "out",
                           "--providers", "cuda")
    assert code == 2
    assert_one_error_line(err, "'cuda' is not available", "CPUExecutionProvider")
    assert not (tmp_path / "out").exists()


def test_run_nonexistent_pipeline(capsys, tmp_path, model_path):
    code, out, err = run_cli(capsys, "run", "no-such-pipeline", model_path,
                             "-o", tmp_path / "out")
    assert code == 2
    assert out == ""
    assert err.strip() == ("graphq: error: 'no-such-pipeline' is neither a pipeline file nor "
                           "a preset; presets: " + ", ".join(sorted(presets())))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"\x00\xffnot a model" * 8, "truncated"],
                         ids=["empty", "garbage", "truncated"])
def test_run_corrupt_model(capsys, tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        full = conv_bn_model().SerializeToString()
        content = full[: len(full) // 2]
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "run", "prepare", path, "-o", tmp_path / "out")
    assert code == 2
    assert_one_error_line(err, "bad.onnx")
    assert not (tmp_path / "out").exists()


def test_run_model_with_missing_external_data(capsys, tmp_path):
    path = graphq.save(conv_bn_model(channels=16), tmp_path / "e.onnx", external_data=True)
    (tmp_path / "e.onnx.data").unlink()
    code, _, err = run_cli(capsys, "run", "prepare", path, "-o", tmp_path / "out")
    line = assert_one_error_line(err, "e.onnx")
    assert "internal error" not in line
    assert code == 2


def test_run_pipeline_with_unknown_key(capsys, tmp_path, model_path):
    pipe = tmp_path / "p.toml"
    pipe.write_text('[[passes]]\nname = "canonicalize"\n\n[[passes]]\nname = "fold-bn"\n'
                    'fallbak = "keep"\n')
    code, _, err = run_cli(capsys, "run", pipe, model_path, "-o", tmp_path / "out")
    assert code == 2
    assert_one_error_line(err, str(pipe), "[[passes]] #2", "pass 'fold-bn'",
                          "unknown option 'fallbak'", "did you mean 'fallback'?")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["-o", "--dump-dir"])
def test_run_output_folder_that_is_a_file(capsys, tmp_path, model_path, option):
    """An output folder that is a file is a usage error (exit 2), not an internal error."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    argv = ["run", "prepare", model_path, "-o", tmp_path / "out", option, blocker]
    code, _, err = run_cli(capsys, *argv)
    line = assert_one_error_line(err, "afile")
    assert "internal error" not in line
    assert code == 2
    assert blocker.read_text() == "not a folder"


def test_run_failing_pass_is_exit_1(capsys, tmp_path):
    path = save(tmp_path / "old.onnx", unconvertible_model())
    code, out, err = run_cli(capsys, "run", "prepare", path, "-o", tmp_path / "out")
    assert code == 1
    assert_one_error_line(err, "pass 'canonicalize'", "step 1",
                          "cannot upgrade the model from opset 7 to 13",
                          "ImageScaler node 'strange'", "ImageScaler does not exist in opset 13")
    assert not (tmp_path / "out").exists()


def test_run_verbose_error_prints_the_traceback(capsys, tmp_path, model_path):
    code, _, err = run_cli(capsys, "run", "-v", "no-such-pipeline", model_path,
                           "-o", tmp_path / "out")
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert "ConfigError" in err
    assert "no-such-pipeline" in err


def test_run_verbose_before_the_command_prints_the_traceback(capsys, tmp_path, model_path):
    """`graphq -v run ...`: -v is a global option too (the main parser lists it)."""
    code, _, err = run_cli(capsys, "-v", "run", "no-such-pipeline", model_path,
                           "-o", tmp_path / "out")
    assert code == 2
    assert "Traceback (most recent call last)" in err


def test_run_quiet_prints_no_info(capsys, tmp_path, model_path):
    code, out, err = run_cli(capsys, "run", "-q", "prepare", model_path, "-o", tmp_path / "out")
    assert code == 0
    assert out == "" and err == ""
    assert (tmp_path / "out" / "net.opt.onnx").is_file()


def test_run_quiet_before_the_command_prints_no_info(capsys, tmp_path, model_path):
    """`graphq -q run ...`: -q is a global option too (the main parser lists it)."""
    code, out, err = run_cli(capsys, "-q", "run", "prepare", model_path, "-o", tmp_path / "out")
    assert code == 0
    assert "graphq: [1/2]" not in err
    assert err == ""


def test_run_writes_nothing_on_failure_into_an_existing_outdir(capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    path = save(tmp_path / "old.onnx", unconvertible_model())
    code, _, _ = run_cli(capsys, "run", "prepare", path, "-o", out_dir)
    assert code == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]


# ---- the installed program ------------------------------------------------------------------
def test_console_script_version_and_exit_codes(tmp_path, model_path):
    exe = shutil.which("graphq") or str(Path(sys.executable).parent / "graphq")
    assert Path(exe).exists(), "the graphq console script is not installed"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert version.stdout.strip() == f"graphq {graphq.__version__}"

    bad = subprocess.run([exe, "run", "no-such-pipeline", str(model_path), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.startswith("graphq: error: 'no-such-pipeline' is neither")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr

    usage = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2
    assert "usage: graphq" in usage.stderr


# ---- data the model does not run on --------------------------------------------------------
def batch_of_one_model() -> onnx.ModelProto:
    """x [N, 4] -> MatMul -> Reshape to the constant [1, 2, 3]: the input declares a variable
    batch, the graph only runs with one sample (as exported with a traced batch of 1)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Reshape", ["m", "shape"], ["y"], name="fixed_reshape")]
    graph = helper.make_graph(
        nodes, "b1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR
    return model


def test_run_on_data_a_batch_of_one_graph_cannot_take(capsys, tmp_path):
    """Batches of 8 fail in onnxruntime on the input model itself: a data error (exit 2)
    naming the batch and that each sample runs alone, with the fix; --batch-size 1 runs."""
    path = save(tmp_path / "b1.onnx", batch_of_one_model())
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32))
    code, _, err = run_cli(capsys, "run", "int8", path, "--data", data, "-o", tmp_path / "out")
    assert code == 2, err
    assert_one_error_line(err, "the input model does not run in onnxruntime on batch 1 of the "
                          "data (8 samples)", "fixed_reshape", "Each of its samples runs on "
                          "its own", "--batch-size 1", "batch_size = 1 under [data]")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "run", "int8", path, "--data", data, "-o", tmp_path / "out",
                           "--batch-size", "1")
    assert code == 0, err
    assert "batch_size = 1" in (tmp_path / "out" / "pipeline.toml").read_text()
    assert (tmp_path / "out" / "b1.deploy.onnx").is_file()
    code, _, err = run_cli(capsys, "run", "int8", path, "--data", data, "-o", tmp_path / "o2",
                           "--batch-size", "0")
    assert code == 2
    assert_one_error_line(err, "--batch-size must be at least 1, got 0")


def test_run_on_a_sample_the_model_cannot_take(capsys, tmp_path):
    """A token id beyond the vocabulary in the 6th sample: with verification off, calibrate's
    streaming meets it in batch 3 (batches of 2), and the error names the batch, the sample
    and what to check (exit 2)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR
    path = save(tmp_path / "tokens.onnx", model)
    ids = rng.integers(0, 10, (8, 3))
    ids[5, 1] = 99
    data = tmp_path / "ids.npz"
    np.savez(data, ids=ids)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[pipeline]\nverify = "off"\n[data]\nbatch_size = 2\n'
                        '[[passes]]\nname = "insert-qdq"\n[[passes]]\nname = "calibrate"\n'
                        '[[passes]]\nname = "emit"\n')
    code, _, err = run_cli(capsys, "run", pipeline, path, "--data", data, "-o", tmp_path / "out")
    assert code == 2, err
    assert_one_error_line(err, "pass 'calibrate'", "the float model does not run in onnxruntime "
                          "on batch 3 of the data (2 samples)", "Sample 1 of that batch fails "
                          "on its own too", "token ids within its vocabulary")
    assert not (tmp_path / "out").exists()


def test_run_without_data_on_a_model_random_inputs_do_not_fit(capsys, tmp_path):
    """Without data, random inputs that the input model cannot take (a free length that its
    graph fixes at 4; random inputs use 32) are not blamed on the passes: a warning, and the
    graphs after each pass are checked but not run on them."""
    inits = [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")]
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"], name="fixed"),
         helper.make_node("Relu", ["r"], ["y"], name="relu")], "free",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR
    path = save(tmp_path / "free.onnx", model)
    code, _, err = run_cli(capsys, "run", "prepare", path, "-o", tmp_path / "out")
    assert code == 0, err
    assert "the input model does not run in onnxruntime on random inputs" in err
    assert (tmp_path / "out" / "free.opt.onnx").is_file()


def test_run_sets_options_of_a_preset_from_the_command_line(capsys, tmp_path):
    """--set SECTION.OPTION=VALUE changes a preset's options (a pass's, a nested table's,
    [data]'s) for this run; the written pipeline.toml holds them. A bare word is a string."""
    path = save(tmp_path / "b1.onnx", batch_of_one_model())
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32))
    code, _, err = run_cli(capsys, "run", "int8", path, "--data", data, "-o", tmp_path / "out",
                           "--set", "data.batch_size=1", "--set", "calibrate.method=minmax",
                           "--set", "insert-qdq.weights.dtype=int4", "--set",
                           "calibrate.min_sqnr_db = 0", "--set", "emit.latency_runs=0")
    assert code == 0, err
    written = graphq.PassManager.from_toml(tmp_path / "out" / "pipeline.toml")
    by_name = {p.name: p.to_table() for p in written.passes}
    assert written.data.batch_size == 1
    assert by_name["calibrate"]["method"] == "minmax"
    assert by_name["calibrate"]["min_sqnr_db"] == 0.0
    assert by_name["insert-qdq"]["weights"]["dtype"] == "int4"
    assert by_name["insert-qdq"]["weights"]["per_channel"] is True  # the rest of the table kept
    assert by_name["emit"]["latency_runs"] == 0


@pytest.mark.parametrize("setting, fragments", [
    ("calibrate.method", ["--set 'calibrate.method': write SECTION.OPTION=VALUE"]),
    ("calibrat.method=mse", ["no pass 'calibrat'", "did you mean 'calibrate'",
                             "its passes: canonicalize, fold-bn, insert-qdq, calibrate, emit"]),
    ("calibrate.methd=mse", ["methd"]),
    ("calibrate.method=best", ["best"]),
])
def test_run_with_a_bad_setting_is_a_usage_error(capsys, tmp_path, model_path, setting,
                                                 fragments):
    code, _, err = run_cli(capsys, "run", "int8", model_path, "-o", tmp_path / "out",
                           "--set", setting)
    assert code == 2, err
    assert_one_error_line(err, *fragments)
    assert not (tmp_path / "out").exists()
