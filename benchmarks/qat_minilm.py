"""Label-free QAT on a real pretrained model: all-MiniLM-L6-v2 sentence embeddings.

The float model is quantized by graphq's ``int8`` pipeline (percentile calibration on 64
sentences), once as the preset ships it (``min_sqnr_db = 25``: tensors that would lose too
much stay float) and once with every tensor quantized (``min_sqnr_db = 0``, the fast form).
Then the ``qat`` pass finetunes each calibrated graph without labels, distilling the float
model's ``last_hidden_state`` on 512 training sentences, and the result is scored on 128
held-out sentences: the cosine between float and quantized sentence embeddings (mean pooling,
normalized, as sentence-transformers computes them), worst and mean. Each finetune runs
again with the pass's ``eval_data`` check on 64 further sentences (kept only if it scores at
least as well there as the calibrated graph).

Sentences: English sentences from the docstrings of Python's standard library (real prose,
available offline), shuffled with a fixed seed; calibration uses the first 64 of the 512
training sentences; the 128 scored and the 64 of eval_data are disjoint from them and from
each other. Writes ``results/qat_minilm.md`` and ``.json``.

    python benchmarks/qat_minilm.py --lr 3e-5 --scale-lr 10   # the README's run, ~10-20 min
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphq import runtime  # noqa: E402
from graphq.pipeline import PassManager  # noqa: E402

MODULES = (
    "os json re pathlib collections functools itertools argparse logging subprocess threading "
    "asyncio email http.client urllib.request unittest decimal fractions statistics random "
    "datetime calendar csv sqlite3 zipfile tarfile shutil tempfile textwrap string difflib "
    "heapq bisect typing dataclasses enum contextlib inspect pickle socket ssl hashlib hmac "
    "secrets uuid base64 gzip bz2 lzma io codecs locale gettext math cmath operator copy "
    "pprint weakref abc numbers array queue sched select signal mmap ctypes ast dis tokenize "
    "pdb timeit trace traceback warnings doctest xml.dom.minidom html.parser mimetypes smtplib "
    "imaplib ftplib poplib wave colorsys cmd shlex configparser plistlib netrc getpass "
    "platform sysconfig site venv zipapp runpy importlib pkgutil modulefinder glob fnmatch "
    "linecache filecmp stat fileinput").split()

PTQ = """
[pipeline]
verify = "off"
[[passes]]
name = "canonicalize"
[[passes]]
name = "fold-bn"
[[passes]]
name = "insert-qdq"
weights = {{ dtype = "int8", per_channel = true, symmetric = true }}
activations = {{ dtype = "uint8", symmetric = false }}
[[passes]]
name = "calibrate"
method = "percentile"
percentile = 99.999
min_sqnr_db = {min_sqnr_db}
"""

QAT = """
[pipeline]
verify = "off"
[[passes]]
name = "qat"
method = "{method}"
epochs = {epochs}
lr = {lr}
scale_lr = {scale_lr}
"""


def sentences() -> list[str]:
    found: set[str] = set()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this platform lacks
            continue
        for obj in [module] + [getattr(module, n) for n in dir(module) if not n.startswith("_")]:
            try:
                doc = inspect.getdoc(obj)
            except Exception:  # noqa: BLE001
                continue
            for s in re.split(r"(?<=[.!?])\s+", (doc or "").replace("\n", " ")):
                words = s.split()
                if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and \
                        not re.search(r"[{}\[\]<>=_`|]|\w\(", s):
                    found.add(" ".join(words))
    out = sorted(found)
    np.random.default_rng(0).shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--scale-lr", type=float, default=1.0)
    parser.add_argument("--method", default="lsq")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    from tests import realmodels as R

    tok = R._minilm_tokenizer()

    def feeds(ss: list[str], batch: int) -> list[dict[str, np.ndarray]]:
        out = []
        for i in range(0, len(ss), batch):
            enc = tok(ss[i:i + batch], padding=True, truncation=True, max_length=128,
                      return_tensors="np")
            out.append({k: np.asarray(enc[k], np.int64) for k in R.MINILM_INPUTS})
        return out

    corpus = sentences()
    train, held, checks = corpus[:512], corpus[512:640], corpus[640:704]
    enc = tok(checks, padding=True, truncation=True, max_length=128, return_tensors="np")
    work = Path(tempfile.mkdtemp(prefix="qat-minilm-"))
    eval_path = work / "eval.npz"  # held out from training, calibration and scoring
    np.savez(eval_path, **{k: np.asarray(enc[k], np.int64) for k in R.MINILM_INPUTS})
    calib, train_feeds, held_feeds = feeds(train[:64], 8), feeds(train, 16), feeds(held, 16)
    path = R.minilm_onnx()
    float_sess = runtime.session(onnx.load(path))

    def score(model: onnx.ModelProto) -> dict[str, float]:
        sess, sims = runtime.session(model), []
        for f in held_feeds:
            mask = f["attention_mask"]
            a = R.minilm_sentence_embeddings(float_sess.run(None, f)[0], mask)
            b = R.minilm_sentence_embeddings(sess.run(None, f)[0], mask)
            sims += np.sum(a * b, axis=1).tolist()
        return {"worst": float(min(sims)), "mean": float(np.mean(sims))}

    rows = []
    for min_sqnr in (25.0, 0.0):
        t = time.perf_counter()
        cal = PassManager.from_text(PTQ.format(min_sqnr_db=min_sqnr)).run(path, data=calib).model
        ptq = score(cal) | {"seconds": time.perf_counter() - t}
        t = time.perf_counter()
        result = PassManager.from_text(QAT.format(
            method=args.method, epochs=args.epochs, lr=args.lr, scale_lr=args.scale_lr)
        ).run(cal, data=train_feeds)
        qat = score(result.model) | {"seconds": time.perf_counter() - t,
                                      "epoch_loss": result.report["qat"]["epoch_loss"]}
        # the same finetune with the qat pass's eval_data check (64 other sentences)
        checked = PassManager.from_text(QAT.format(
            method=args.method, epochs=args.epochs, lr=args.lr, scale_lr=args.scale_lr)
            + f'eval_data = "{eval_path}"\n').run(cal, data=train_feeds)
        check = checked.report["qat"]["eval"]
        qat_checked = score(checked.model) | {"check": check}
        rows.append({"min_sqnr_db": min_sqnr, "ptq": ptq, "qat": qat,
                     "qat_checked": qat_checked})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    setup = {"sentences": {"train": len(train), "calibration": 64, "held_out": len(held),
                           "eval_data": len(checks)},
             "qat": {"method": args.method, "epochs": args.epochs, "lr": args.lr,
                     "scale_lr": args.scale_lr, "loss": "distill", "batch": 16}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qat_minilm.json").write_text(json.dumps({"setup": setup, "rows": rows},
                                                         indent=2))
    lines = ["# Label-free QAT on all-MiniLM-L6-v2", "",
             f"Generated by `python benchmarks/qat_minilm.py` ({time.strftime('%Y-%m-%d')}). "
             f"Setup: {json.dumps(setup)}.", "",
             "Sentence-embedding cosine, float vs quantized, on 128 held-out sentences:", "",
             "| PTQ setting | PTQ worst | PTQ mean | QAT worst | QAT mean | QAT time s | "
             "with eval_data: kept (eval SQNR before -> after) | worst | mean |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        c = r["qat_checked"]
        after = c["check"]["after_db"]
        lines.append(f"| int8, min_sqnr_db = {r['min_sqnr_db']:g} | {r['ptq']['worst']:.4f} | "
                     f"{r['ptq']['mean']:.4f} | {r['qat']['worst']:.4f} | "
                     f"{r['qat']['mean']:.4f} | {r['qat']['seconds']:.0f} | "
                     f"{c['check']['kept']} ({c['check']['before_db']:.2f} -> "
                     f"{'n/a' if after is None else f'{after:.2f}'} dB) | "
                     f"{c['worst']:.4f} | {c['mean']:.4f} |")
    lines += ["", "eval_data: 64 further sentences (held out from training, calibration and "
              "the 128 scored here); the qat pass keeps the finetuned values only if the "
              "worst output SQNR on them is at least the calibrated graph's."]
    (args.out / "qat_minilm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
