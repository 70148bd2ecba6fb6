"""Calibration time against one FP32 pass over the same data, per method and model.

The issue's target: any histogram calibration takes at most 1.5x the time of one FP32 pass
(the float model in onnxruntime over the calibration data, batch by batch, same session
options). For each model (the data of ``benchmarks/ptq_vs_ort.py``: digits, MiniLM, MTCNN,
random-weight zoo nets) this script

1. runs the ``int8`` preset up to ``insert-qdq`` once (canonicalize, fold-bn, insert-qdq;
   verification off), which is not calibration;
2. in ONE process, interleaved round-robin (the method order rotated each round, ``--rounds``
   rounds): one FP32 pass (an onnxruntime session of the float model, created once, default
   SessionOptions as graphq's own sessions; ``run`` on every calibration batch), then the
   whole ``calibrate`` pass of one method (float view, session creation, streaming the
   batches through the observers, clip ranges, qparams, bias quantization, export), then
   another FP32 pass;
3. reports per method the median over rounds of ``calibrate / mean(the two FP32 passes
   around it)``, and the same for the streaming alone (the batches through the session and
   the observers, as the pass logs it) and for the part after it (clip ranges and the rest).

Load on the machine hits the FP32 passes and the calibration alike (they alternate within
seconds); the load average is recorded. Run from the repository root::

    python benchmarks/calibration_speed.py                       # every model, ~15 min
    python benchmarks/calibration_speed.py --models digits,resnet50 --rounds 5

Writes ``calibration_speed.json`` and ``calibration_speed.md`` under ``--out`` (default
``benchmarks/results``); with ``--batches N`` (a calibration set of N batches, the size users
calibrate with, where the fixed costs amortize) ``calibration_speed_bN.*``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import ptq_vs_ort as P  # noqa: E402  (the same models and calibration data)

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
HISTOGRAM = ("percentile", "entropy", "mse")
TARGET = P.TARGET_CALIB_RATIO


def prepare(model: str, work: Path, batches: int = 0
            ) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """The model's calibration feeds (``batches`` > 0: that many, see :func:`enlarged`) and
    its graph after insert-qdq (int8 preset)."""
    import graphq
    from graphq.pipeline import resolve_pipeline

    meta = P.child_prep(model, work)
    feeds = P.read_feeds(work / "calib.npz", meta["inputs"])
    if batches > len(feeds):
        feeds, meta["data"] = enlarged(model, meta, feeds, batches)
    text = resolve_pipeline("int8").read_text(encoding="utf-8")
    head = text.split('[[passes]]\nname = "calibrate"')[0]
    head = head.replace('verify = "each"', 'verify = "off"')
    result = graphq.PassManager.from_text(head).run(meta["path"], None, data=feeds)
    return meta, result.model, feeds


def enlarged(model: str, meta: dict[str, Any], feeds: list[dict[str, Any]], batches: int
             ) -> tuple[list[dict[str, Any]], str]:
    """A calibration set of ``batches`` batches, the size users calibrate with (the
    benchmark's own sets are 4-16 batches, where fixed costs dominate): the zoo nets get
    more random photo crops (seed 2); the other models' batches repeat in order (the same
    work per batch: onnxruntime caches no results)."""
    import onnx

    if model in P.ZOO:
        from tests import realmodels as R

        proto = onnx.load(meta["path"], load_external_data=False)
        more = R.zoo_feeds(proto, batches, seed=2)
        return more, (f"{batches} random crops of the 5 scikit-image photos (seed 2), batch 1; "
                      "random weights")
    out = [feeds[i % len(feeds)] for i in range(batches)]
    return out, f"{meta['data']}; the {len(feeds)} calibration batches repeated to {batches}"


def calibrate_pass(method: str) -> Any:
    """The int8 preset's calibrate pass with ``method`` (its other options as the preset;
    ``auto``, the preset's own method, with its bias correction and the check under auto
    that keeps it only where the graph scores better)."""
    from graphq.passes.calibrate import Calibrate, CalibrateOptions

    return Calibrate(CalibrateOptions(method=method, percentile=99.999, min_sqnr_db=25.0,
                                      bias_correction=method == "auto"))


class _Streaming(logging.Handler):
    """Catches the streaming time the calibrate pass logs."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("calibrated %d tensors"):
            self.seconds.append(float(record.args[2]))


def bench(model: str, methods: list[str], rounds: int, work: Path, batches: int = 0
          ) -> dict[str, Any]:
    import onnxruntime as ort

    from graphq.data import DataSource
    from graphq.registry import PassContext

    meta, qdq, feeds = prepare(model, work, batches)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    t0 = time.perf_counter()
    fp32 = ort.InferenceSession(meta["path"], so, providers=["CPUExecutionProvider"])
    session_s = time.perf_counter() - t0

    def fp32_pass() -> float:
        t = time.perf_counter()
        for feed in feeds:
            fp32.run(None, feed)
        return time.perf_counter() - t

    handler = _Streaming()
    log = logging.getLogger("graphq.passes.calibrate")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    fp32_pass()                                  # warm-up
    calibrate_pass(methods[0]).run(qdq, PassContext(data=DataSource(feeds)))
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    try:
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for method in order:
                before = fp32_pass()
                handler.seconds.clear()
                t = time.perf_counter()
                calibrate_pass(method).run(qdq, PassContext(data=DataSource(feeds)))
                total = time.perf_counter() - t
                after = fp32_pass()
                runs[method].append({"fp32_s": (before + after) / 2, "calib_s": total,
                                     "stream_s": handler.seconds[0]})
    finally:
        log.removeHandler(handler)
    out: dict[str, Any] = {"model": model, "path": meta["path"], "data": meta["data"],
                           "batches": len(feeds), "fp32_session_s": session_s,
                           "load": os.getloadavg(), "methods": {}}
    for method, rs in runs.items():
        out["methods"][method] = {
            "runs": rs,
            "fp32_s": statistics.median(x["fp32_s"] for x in rs),
            "calib_s": statistics.median(x["calib_s"] for x in rs),
            "ratio": statistics.median(x["calib_s"] / x["fp32_s"] for x in rs),
            "stream_ratio": statistics.median(x["stream_s"] / x["fp32_s"] for x in rs),
            "rest_ratio": statistics.median((x["calib_s"] - x["stream_s"]) / x["fp32_s"]
                                            for x in rs),
        }
    return out


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Calibration time / one FP32 pass",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cpus')} cores; onnxruntime {m.get('onnxruntime')}, "
        f"numpy {m.get('numpy')}, graphq {m.get('graphq')}, Python {m.get('python')}. "
        f"Run {doc['started']} ({doc['minutes']:.1f} min), {doc['rounds']} interleaved rounds "
        "per method; load average (1-minute) at the end of each model in the table.",
        "",
        ("Calibration set: the benchmark's own (`batches` column; ptq_vs_ort's data)."
         if not doc.get("batches") else
         f"Calibration set: {doc['batches']} batches per model (`--batches`): fresh photo "
         "crops for the zoo nets, the benchmark's own batches repeated for the others."),
        "",
        "`xFP32` = the whole calibrate pass (float view, session, streaming, clip ranges, "
        "qparams, export) / one FP32 pass over the same batches (FP32 session created once, "
        "excluded), median over rounds of the ratio to the mean of the FP32 passes just "
        "before and after it; `stream` = the streaming alone / FP32; `rest` = everything else "
        f"/ FP32. Target: histogram methods <= {TARGET:g}x. `auto` (the `int8` preset's "
        "calibrate, for reference: one histogram per tensor, every method's clip ranges, "
        "each candidate run on the scoring batches, bias correction and its check) is not "
        "one of them.",
        "",
        "| model | batches | FP32 pass s | load | " + " | ".join(
            f"{x} xFP32 (stream + rest)" for x in doc["methods"]) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(doc["methods"]),
    ]
    verdicts = []
    for entry in doc["models"]:
        if "error" in entry:
            lines.append(f"| {entry['model']} | failed: {entry['error']} |")
            continue
        cells = []
        fp32 = statistics.median(v["fp32_s"] for v in entry["methods"].values())
        for method in doc["methods"]:
            v = entry["methods"].get(method)
            if v is None:
                cells.append("-")
                continue
            cells.append(f"{v['ratio']:.2f} ({v['stream_ratio']:.2f} + {v['rest_ratio']:.2f})")
            if method in HISTOGRAM:
                verdicts.append((entry["model"], method, v["ratio"]))
        lines.append(f"| {entry['model']} | {entry['batches']} | {fp32:.3f} | "
                     f"{entry['load'][0]:.1f} | " + " | ".join(cells) + " |")
    met = [v for v in verdicts if v[2] <= TARGET]
    lines += ["", f"Histogram methods within {TARGET:g}x: {len(met)} of {len(verdicts)}."]
    missed = [f"{model} {method} {ratio:.2f}x" for model, method, ratio in verdicts
              if ratio > TARGET]
    if missed:
        lines.append("Not met: " + ", ".join(missed) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="all", help="comma list, or mtcnn / zoo / all")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=0,
                    help="calibrate on this many batches (default: the benchmark's own 4-16; "
                         "more: fresh photo crops for the zoo nets, the batches repeated for "
                         "the others)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args(argv)
    models = P.expand(args.models, P.MODELS, P.ALIASES)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    doc: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "machine": P.machine(), "rounds": args.rounds, "methods": methods,
                           "batches": args.batches,
                           "models": []}
    with tempfile.TemporaryDirectory(prefix="graphq-calib-speed-") as tmp:
        for model in models:
            try:
                entry = bench(model, methods, args.rounds, Path(tmp) / model, args.batches)
            except Exception as exc:  # noqa: BLE001 - recorded in the results
                entry = {"model": model, "error": P.error_text(exc)}
            doc["models"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "methods"} | {
                m: round(v["ratio"], 2) for m, v in entry.get("methods", {}).items()}),
                flush=True)
    doc["minutes"] = (time.time() - start) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "calibration_speed" + (f"_b{args.batches}" if args.batches else "")
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = render(doc)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
