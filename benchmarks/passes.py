"""Speed and memory of graphq's passes, and of the peers that do the same jobs, side by side.

What is measured, per model (MiniLM first, then the nine onnx model-zoo "light" graphs, the
shipped digits CNN and the torch BN test net), each job in a FRESH child process so that its
peak memory is its own:

* ``graphq``: ``graphq.model.load_with_source`` -> ``Canonicalize(simplify=False)`` ->
  ``FoldBN()`` -> ``graphq.model.save`` (to a temp folder), each stage timed with
  ``time.perf_counter``. "passes excluding onnxsim" is canonicalize + fold-bn.
* ``graphq-onnxsim``: graphq's onnxsim step alone (``graphq.passes.canonicalize._simplify``),
  on the model as canonicalize hands it to onnxsim (opset upgraded, constants folded).
* ``pipeline-each`` / ``pipeline-off``: the whole ``PassManager`` with the ``prepare`` preset
  (canonicalize with onnxsim, fold-bn, written to a temp folder), verifying after each pass on
  real inputs, or not at all: the difference is the cost of verification.
* peers: onnxruntime's offline graph optimizer (``ort-basic``, ``ort-extended``:
  ``SessionOptions.graph_optimization_level`` with ``optimized_model_filepath``; it folds
  constants and fuses Conv+BN), ``onnxsim`` (``onnxsim.simplify`` with its own BN fusion on)
  and ``onnxoptimizer`` (``fuse_bn_into_conv`` and the elimination passes), each timed from
  reading the file to writing the result. The BatchNormalization nodes left are counted.

Memory: each child records ``ru_maxrss`` (and ``VmHWM``/``VmRSS`` from ``/proc/self/status``)
after its imports, before it loads the model (the baseline), and after every stage; the peak
increase is the final peak minus that baseline. The parent imports nothing heavy, and model
export and input preparation run in a child of their own, so no child inherits a large RSS.

Times are the median over ``--repeat`` children (default 3); raw numbers go to
``passes.json``, tables and the issue's targets (MiniLM: passes excluding onnxsim under 3 s,
peak memory under 3x the model size) to ``passes.md``. With ``--profile`` (default: minilm) a
further child runs canonicalize and fold-bn under cProfile and the hotspots are reported.

Run from the repository root::

    python benchmarks/passes.py                                  # everything, ~20 min
    python benchmarks/passes.py --models minilm,torch_bn --repeat 1
    python benchmarks/passes.py --models zoo/light_resnet50 --jobs graphq,ort-basic

Models: ``minilm``, ``zoo`` (all nine; or ``zoo/light_vgg19`` ...), ``zoo-random`` (the nine
with random calibrated weights as real initializers, see ``tests/realmodels.py``), ``digits``,
``torch_bn``, ``mtcnn``. MiniLM, torch_bn and mtcnn are exported with torch on first use and
cached (``$GRAPHQ_TEST_CACHE`` or ``~/.cache/graphq-tests``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
GRAPHQ_JOBS = ("graphq", "graphq-onnxsim", "pipeline-each", "pipeline-off")
PEER_JOBS = ("ort-basic", "ort-extended", "onnxsim", "onnxoptimizer")
ALL_JOBS = GRAPHQ_JOBS + PEER_JOBS
DEFAULT_MODELS = "minilm,zoo,digits,torch_bn"
ONNXOPTIMIZER_PASSES = [
    "extract_constant_to_initializer", "eliminate_deadend", "eliminate_identity",
    "eliminate_nop_dropout", "eliminate_nop_transpose", "eliminate_unused_initializer",
    "fuse_bn_into_conv",
]
TARGET_SECONDS = 3.0
TARGET_SIZE_RATIO = 3.0
MIN_RATIO_MB = 1.0  # memory / size ratios of smaller models are noise
CHILD_START = time.perf_counter()


# =============================================================================================
# child side: memory probes and stage timing
# =============================================================================================
def _status_mb() -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak of this process image) from /proc/self/status, in MB."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def memory() -> dict[str, float]:
    """Current RSS and peak RSS (ru_maxrss and VmHWM) of this process, in MB."""
    status = _status_mb()
    return {"rss_mb": round(status.get("VmRSS", 0.0), 1),
            "hwm_mb": round(status.get("VmHWM", 0.0), 1),
            "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


class Probe:
    """Times the stages of one child and notes its memory after each."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.baseline: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    def set_baseline(self) -> None:
        """Note memory after the imports, and the time taken since the child started."""
        self.baseline = memory()
        self.info["setup_s"] = time.perf_counter() - CHILD_START

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stages[name] = {"s": time.perf_counter() - start, **memory()}

    def result(self) -> dict[str, Any]:
        """Times and memory; the peak is the one at the end of the last stage (what a job
        does after it, such as reading its output back to count nodes, is not counted)."""
        final = memory()
        base = self.baseline.get("maxrss_mb", 0.0)
        peak = max((s["maxrss_mb"] for s in self.stages.values()), default=final["maxrss_mb"])
        return {"stages": self.stages, "baseline": self.baseline, "final": final,
                "peak_mb": peak, "peak_increase_mb": peak - base,
                "seconds": sum(s["s"] for s in self.stages.values()), **self.info}


def bn_count(model: Any) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def bn_count_file(path: Path) -> tuple[int, int]:
    """(BatchNormalization nodes, all nodes) of a saved model, weights left unread."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return bn_count(model), len(model.graph.node)


def read_feeds(path: Path | None) -> list[dict[str, Any]] | None:
    """The feed dicts written by :func:`write_feeds` (keys ``"<i>.<input name>"``)."""
    if path is None:
        return None
    import numpy as np

    feeds: dict[int, dict[str, Any]] = {}
    with np.load(path) as data:
        for key in data.files:
            index, _, name = key.partition(".")
            feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


# ---- graphq jobs ------------------------------------------------------------------------------
def _graphq_imports() -> None:
    """Import graphq and warm its one-time onnxruntime IR-version probe (process setup)."""
    import graphq.passes.canonicalize  # noqa: F401
    import graphq.passes.fold_bn  # noqa: F401
    from graphq import model as model_io

    model_io.max_runtime_ir_version()


def job_graphq(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    _graphq_imports()
    from graphq import model as model_io
    from graphq.passes.canonicalize import Canonicalize
    from graphq.passes.fold_bn import FoldBN
    from graphq.registry import PassContext

    probe.set_baseline()
    with probe.stage("load"):
        model, _ = model_io.load_with_source(path)
    probe.info["bn_in"] = bn_count(model)
    probe.info["nodes_in"] = len(model.graph.node)
    with probe.stage("canonicalize"):
        model = Canonicalize(simplify=False).run(model, PassContext()).model
    with probe.stage("fold-bn"):
        result = FoldBN().run(model, PassContext())
        model = result.model
    probe.info["fold_counts"] = result.counts
    with probe.stage("save"):
        out = model_io.save(model, work / "out.onnx")
    probe.info["bn_out"] = bn_count(model)
    probe.info["nodes_out"] = len(model.graph.node)
    probe.info["out_mb"] = file_mb(out)


def job_graphq_onnxsim(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    _graphq_imports()
    from graphq import model as model_io
    from graphq.passes.canonicalize import Canonicalize, _simplify
    from graphq.registry import PassContext

    probe.set_baseline()
    with probe.stage("import onnxsim"):  # canonicalize imports it on first use
        import onnxsim  # noqa: F401
    with probe.stage("load+canonicalize"):  # the model as canonicalize hands it to onnxsim
        model, _ = model_io.load_with_source(path)
        model = Canonicalize(simplify=False, infer_shapes=False).run(model, PassContext()).model
    with probe.stage("onnxsim"):
        simplified, why = _simplify(model)
    probe.info["onnxsim_ok"] = simplified is not None
    probe.info["onnxsim_why"] = why
    probe.info["onnxsim_increase_mb"] = (probe.stages["onnxsim"]["maxrss_mb"]
                                         - probe.stages["load+canonicalize"]["maxrss_mb"])


def _job_pipeline(path: Path, work: Path, feeds: Path | None, probe: Probe, verify: str
                  ) -> None:
    _graphq_imports()  # onnxsim (which imports torch) is left to canonicalize, as in a real run
    import graphq

    data = read_feeds(feeds)
    pm = graphq.PassManager.from_toml("prepare")
    pm.settings.verify = verify
    probe.set_baseline()
    with probe.stage("run"):
        result = pm.run(path, outdir=work / "out", data=data)
    probe.info["passes"] = {r.name: round(r.seconds, 4) for r in result.records}
    probe.info["verify_s"] = sum(r.verified.get("seconds", 0.0) for r in result.records)
    probe.info["verified"] = {r.name: r.verified for r in result.records}
    probe.info["bn_out"] = bn_count(result.model)
    probe.info["nodes_out"] = len(result.model.graph.node)


def job_pipeline_each(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    _job_pipeline(path, work, feeds, probe, "each")


def job_pipeline_off(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    _job_pipeline(path, work, feeds, probe, "off")


# ---- peers --------------------------------------------------------------------------------------
def _job_ort(path: Path, work: Path, probe: Probe, level_name: str) -> None:
    import onnxruntime as ort

    probe.set_baseline()
    out = work / "out.onnx"
    with probe.stage("load+optimize+save"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    probe.info["bn_out"], probe.info["nodes_out"] = bn_count_file(out)
    probe.info["out_mb"] = file_mb(out)


def job_ort_basic(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    _job_ort(path, work, probe, "ORT_ENABLE_BASIC")


def job_ort_extended(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    _job_ort(path, work, probe, "ORT_ENABLE_EXTENDED")


def job_onnxsim(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    import onnx
    import onnxsim

    probe.set_baseline()
    with probe.stage("load"):
        model = onnx.load(str(path))
    with probe.stage("simplify"):
        model, ok = onnxsim.simplify(model, skip_fuse_bn=False, check_n=0)
    with probe.stage("save"):
        onnx.save(model, str(work / "out.onnx"))
    probe.info["ok"] = bool(ok)
    probe.info["bn_out"] = bn_count(model)
    probe.info["nodes_out"] = len(model.graph.node)


def job_onnxoptimizer(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    import onnx
    import onnxoptimizer

    probe.set_baseline()
    with probe.stage("load"):
        model = onnx.load(str(path))
    with probe.stage("optimize"):
        model = onnxoptimizer.optimize(model, ONNXOPTIMIZER_PASSES)
    with probe.stage("save"):
        onnx.save(model, str(work / "out.onnx"))
    probe.info["passes_used"] = ONNXOPTIMIZER_PASSES
    probe.info["bn_out"] = bn_count(model)
    probe.info["nodes_out"] = len(model.graph.node)


# ---- profile ----------------------------------------------------------------------------------
def _hotspots(profiler: Any, top: int) -> dict[str, list[dict[str, Any]]]:
    """The functions with the most cumulative and the most own time."""
    import pstats

    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_, calls, own, cumulative, _) in stats.items():
        where = f"{_short(file)}:{line}({func})" if line else func
        rows.append({"function": where, "calls": calls, "own_s": round(own, 4),
                     "cumulative_s": round(cumulative, 4)})
    by_cum = sorted(rows, key=lambda r: -r["cumulative_s"])[:top]
    by_own = sorted(rows, key=lambda r: -r["own_s"])[:top]
    return {"cumulative": by_cum, "own": by_own}


def _short(file: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def job_profile(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    import cProfile

    _graphq_imports()
    from graphq import model as model_io
    from graphq.passes.canonicalize import Canonicalize
    from graphq.passes.fold_bn import FoldBN
    from graphq.registry import PassContext

    probe.set_baseline()
    steps: list[tuple[str, Callable[[Any], Any]]] = [
        ("load", lambda _: model_io.load_with_source(path)[0]),
        ("canonicalize", lambda m: Canonicalize(simplify=False).run(m, PassContext()).model),
        ("fold-bn", lambda m: FoldBN().run(m, PassContext()).model),
        ("save", lambda m: model_io.save(m, work / "out.onnx") and m),
    ]
    model, hot = None, {}
    for name, step in steps:
        profiler = cProfile.Profile()
        with probe.stage(name):
            model = profiler.runcall(step, model)
        hot[name] = _hotspots(profiler, 25)
    probe.info["hotspots"] = hot


class MemTrace:
    """Peak RSS inside chosen functions, via resetting the kernel's high-water mark.

    Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, so the peak inside a
    call is VmHWM read at its exit (C calls included). It also resets ru_maxrss, so this
    runs in a child of its own, never in one whose peak is reported.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.stack: list[dict[str, Any]] = []

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")

    def _touch(self) -> None:
        """Carry the peak seen so far into every open frame, then reset the mark."""
        hwm = _status_mb()["VmHWM"]
        for frame in self.stack:
            frame["peak_mb"] = max(frame["peak_mb"], hwm)
        self._reset()

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def traced(*args: Any, **kwargs: Any) -> Any:
            self._touch()
            rss = _status_mb()["VmRSS"]
            row = {"function": label, "depth": len(self.stack), "rss_in_mb": rss,
                   "peak_mb": rss}
            self.rows.append(row)
            self.stack.append(row)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                row["s"] = round(time.perf_counter() - start, 4)
                self._touch()
                self.stack.pop()
                row["rss_out_mb"] = _status_mb()["VmRSS"]
                row["peak_increase_mb"] = round(row["peak_mb"] - rss, 1)
                row["kept_mb"] = round(row["rss_out_mb"] - rss, 1)

        setattr(owner, attr, traced)


def _trace_targets() -> list[tuple[Any, str, str]]:
    import onnx
    import onnx_graphsurgeon as gs

    import graphq.graph as G
    from graphq import model as model_io
    from graphq.passes import canonicalize as C
    from graphq.passes import fold_bn as F

    targets = [(model_io, n, f"model.{n}") for n in (
        "load_with_source", "_parse", "save", "byte_size", "skeleton", "fix_ir_version")]
    targets += [(C, n, f"canonicalize.{n}") for n in (
        "upgrade_opset", "_drop_initializer_inputs", "_fold_constants", "_infer_shapes")]
    targets += [(C.Canonicalize, "run", "Canonicalize.run"), (F.FoldBN, "run", "FoldBN.run"),
                (G, "import_graph", "graph.import_graph"), (G, "export", "graph.export"),
                (gs.Graph, "fold_constants", "gs.Graph.fold_constants"),
                (gs.Graph, "cleanup", "gs.Graph.cleanup"),
                (onnx.shape_inference, "infer_shapes", "onnx.shape_inference.infer_shapes"),
                (onnx, "save_model", "onnx.save_model")]
    return targets


def job_memtrace(path: Path, work: Path, feeds: Path | None, probe: Probe) -> None:
    _graphq_imports()
    from graphq import model as model_io
    from graphq.passes.canonicalize import Canonicalize
    from graphq.passes.fold_bn import FoldBN
    from graphq.registry import PassContext

    trace = MemTrace()
    for owner, attr, label in _trace_targets():
        trace.wrap(owner, attr, label)
    probe.set_baseline()
    model, _ = model_io.load_with_source(path)
    model = Canonicalize(simplify=False).run(model, PassContext()).model
    model = FoldBN().run(model, PassContext()).model
    model_io.save(model, work / "out.onnx")
    probe.info["trace"] = trace.rows


JOBS: dict[str, Callable[[Path, Path, Path | None, Probe], None]] = {
    "graphq": job_graphq, "graphq-onnxsim": job_graphq_onnxsim,
    "pipeline-each": job_pipeline_each, "pipeline-off": job_pipeline_off,
    "ort-basic": job_ort_basic, "ort-extended": job_ort_extended,
    "onnxsim": job_onnxsim, "onnxoptimizer": job_onnxoptimizer, "profile": job_profile,
    "memtrace": job_memtrace,
}


def child_main(args: argparse.Namespace) -> int:
    """Run one job on one model and write its result to ``<work>/result.json``."""
    work = Path(args.work)
    probe = Probe()
    feeds = Path(args.feeds) if args.feeds else None
    try:
        JOBS[args.child](Path(args.model), work, feeds, probe)
        result = probe.result()
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
        result = {**probe.result(), "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    (work / "result.json").write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


# =============================================================================================
# preparing models (in a child: it imports torch/transformers)
# =============================================================================================
def file_mb(path: Path) -> float:
    """Size of a model file plus its external data files, in MB."""
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return round(size / MB, 3)


def write_feeds(feeds: list[dict[str, Any]], path: Path) -> Path:
    import numpy as np

    np.savez(path, **{f"{i}.{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
    return path


def _digits_feeds(n: int = 2, batch: int = 16) -> list[dict[str, Any]]:
    import numpy as np

    with np.load(REPO / "examples" / "digits" / "calib.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return [{k: v[i * batch:(i + 1) * batch] for k, v in arrays.items()} for i in range(n)]


def _model_entries(spec: str, rm: Any) -> list[tuple[str, Path, Callable[[], list]]]:
    """(name, path, feeds function) for one ``--models`` item."""
    if spec == "minilm":
        return [("minilm", rm.minilm_onnx(), lambda: rm.minilm_feeds(2, batch_size=4))]
    if spec == "digits":
        return [("digits", REPO / "examples" / "digits" / "digits_cnn.onnx", _digits_feeds)]
    if spec == "torch_bn":
        return [("torch_bn", rm.torch_bn_onnx(), lambda: rm.torch_bn_feeds(2))]
    if spec == "mtcnn":
        return [(f"mtcnn/{k}", p, lambda k=k: rm.mtcnn_feeds(k, 2))
                for k, p in rm.mtcnn_onnx().items()]
    kind, _, only = spec.partition("/")
    if kind not in ("zoo", "zoo-random"):
        raise SystemExit(f"unknown model '{spec}'; known: minilm, zoo, zoo/<stem>, zoo-random, "
                         "digits, torch_bn, mtcnn")
    paths = [p for p in rm.zoo_models() if not only or p.stem == only]
    if not paths:
        raise SystemExit(f"no zoo model named '{only}'")
    if kind == "zoo-random":
        paths = [rm.randomized_zoo_onnx(p) for p in paths]
    return [(f"{kind}/{p.stem.split('-seed')[0].removeprefix('zoo-')}", p,
             lambda p=p: rm.zoo_feeds(p, 2)) for p in paths]


def prepare_main(args: argparse.Namespace) -> int:
    """Export/locate the models, write their feeds; print the list as JSON."""
    sys.path.insert(0, str(REPO))
    from tests import realmodels as rm

    work = Path(args.work)
    out = []
    for spec in args.models.split(","):
        for name, path, feeds in _model_entries(spec.strip(), rm):
            feed_path = work / f"feeds-{len(out)}.npz"
            try:
                write_feeds(feeds(), feed_path)
            except Exception as exc:  # noqa: BLE001 - verification falls back to random inputs
                print(f"no real inputs for {name} ({exc}); random ones are used", file=sys.stderr)
                feed_path = None
            out.append({"name": name, "path": str(path), "size_mb": file_mb(Path(path)),
                        "feeds": str(feed_path) if feed_path else None,
                        "bn_in": _bn_in(Path(path))})
    (work / "models.json").write_text(json.dumps(out), encoding="utf-8")
    return 0


def _bn_in(path: Path) -> int:
    return bn_count_file(path)[0]


# =============================================================================================
# parent side: running children, aggregating, writing the report
# =============================================================================================
def run_child(job: str, model: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One job on one model in a fresh interpreter; its result dict (or the error)."""
    work = Path(tempfile.mkdtemp(prefix=f"graphq-bench-{job}-"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--model",
           model["path"], "--work", str(work)]
    if model.get("feeds"):
        cmd += ["--feeds", model["feeds"]]
    start, load = time.perf_counter(), os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=_child_env())
        result_file = work / "result.json"
        if result_file.exists():
            result = json.loads(result_file.read_text(encoding="utf-8"))
        else:
            result = {"error": f"child exited {proc.returncode}: {proc.stderr[-800:]}"}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["child_wall_s"] = round(time.perf_counter() - start, 3)
    result["loadavg_1min"] = [load, os.getloadavg()[0]]  # before, after: other work running?
    return result


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def prepare_models(models: str, work: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare", "--models", models,
           "--work", str(work)]
    subprocess.run(cmd, check=True, cwd=REPO, env=_child_env())
    return json.loads((work / "models.json").read_text(encoding="utf-8"))


def measure_model(model: dict[str, Any], jobs: list[str], repeat: int, timeout: float
                  ) -> dict[str, list[dict[str, Any]]]:
    """Every job on one model, ``repeat`` times, interleaved (job order within a round)."""
    runs: dict[str, list[dict[str, Any]]] = {job: [] for job in jobs}
    for r in range(repeat):
        for job in jobs:
            result = run_child(job, model, timeout)
            runs[job].append(result)
            status = result.get("error") or f"{result.get('seconds', 0):.3f} s, peak " \
                f"+{result.get('peak_increase_mb', 0):.0f} MB"
            print(f"  [{r + 1}/{repeat}] {job}: {status}", flush=True)
    return runs


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if "error" not in r]


def _stage(runs: list[dict[str, Any]], name: str) -> float | None:
    return median([r["stages"][name]["s"] for r in _ok(runs) if name in r.get("stages", {})])


def _peak_at(runs: list[dict[str, Any]], name: str, base: bool) -> float | None:
    """Median ru_maxrss after a stage (minus the baseline when ``base``)."""
    values = []
    for r in _ok(runs):
        if name in r.get("stages", {}):
            peak = r["stages"][name]["maxrss_mb"]
            values.append(peak - r["baseline"]["maxrss_mb"] if base else peak)
    return median(values)


def _field(runs: list[dict[str, Any]], key: str) -> Any:
    ok = _ok(runs)
    if not ok:
        return None
    values = [r.get(key) for r in ok]
    if all(isinstance(v, int | float) for v in values):
        return median(values)
    return values[0]


def summarize_graphq(model: dict[str, Any], runs: dict[str, list[dict[str, Any]]]
                     ) -> dict[str, Any]:
    g = runs.get("graphq", [])
    s: dict[str, Any] = {k: _stage(g, k) for k in ("load", "canonicalize", "fold-bn", "save")}
    if s["canonicalize"] is not None and s["fold-bn"] is not None:
        s["passes_excl_onnxsim"] = s["canonicalize"] + s["fold-bn"]
        s["end_to_end"] = sum(s[k] for k in ("load", "canonicalize", "fold-bn", "save"))
    s["baseline_mb"] = median([r["baseline"]["maxrss_mb"] for r in _ok(g)])
    s["peak_mb"] = _field(g, "peak_mb")
    s["peak_increase_mb"] = _field(g, "peak_increase_mb")
    s["peak_increase_to_fold_mb"] = _peak_at(g, "fold-bn", base=True)
    s["rss_after"] = {k: median([r["stages"][k]["rss_mb"] for r in _ok(g)
                                 if k in r["stages"]]) for k in ("load", "canonicalize",
                                                                 "fold-bn", "save")}
    s["peak_after"] = {k: _peak_at(g, k, base=False) for k in ("load", "canonicalize",
                                                               "fold-bn", "save")}
    s["out_mb"] = _field(g, "out_mb")
    weights = max(model["size_mb"], s["out_mb"] or 0.0)
    s["weights_mb"] = weights
    for key in ("peak_increase_mb", "peak_increase_to_fold_mb"):
        if s[key] is not None and weights >= MIN_RATIO_MB:
            s[key.replace("_mb", "_per_size")] = s[key] / weights
    s["bn_out"] = _field(g, "bn_out")
    s["fold_counts"] = _field(g, "fold_counts")
    sim = runs.get("graphq-onnxsim", [])
    s["onnxsim"] = _stage(sim, "onnxsim")
    s["onnxsim_import"] = _stage(sim, "import onnxsim")
    s["onnxsim_import_mb"] = _peak_at(sim, "import onnxsim", base=True)
    s["onnxsim_increase_mb"] = _field(sim, "onnxsim_increase_mb")
    s["onnxsim_ok"] = _field(sim, "onnxsim_ok")
    for job in ("pipeline-each", "pipeline-off"):
        p = runs.get(job, [])
        s[job] = {"seconds": _stage(p, "run"), "verify_s": _field(p, "verify_s"),
                  "peak_increase_mb": _field(p, "peak_increase_mb"),
                  "bn_out": _field(p, "bn_out"),
                  "passes": _passes_median(p), "error": _first_error(p)}
    s["errors"] = {j: _first_error(runs.get(j, [])) for j in GRAPHQ_JOBS if
                   _first_error(runs.get(j, []))}
    return s


def _passes_median(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    names = {k for r in _ok(runs) for k in r.get("passes", {})}
    return {k: median([r["passes"].get(k) for r in _ok(runs)]) for k in sorted(names)}


def _first_error(runs: list[dict[str, Any]]) -> str | None:
    return next((r["error"] for r in runs if "error" in r), None)


def summarize_peer(runs: list[dict[str, Any]], graphq_s: float | None) -> dict[str, Any]:
    seconds = median([r["seconds"] for r in _ok(runs)])
    return {"seconds": seconds, "peak_mb": _field(runs, "peak_mb"),
            "peak_increase_mb": _field(runs, "peak_increase_mb"),
            "bn_out": _field(runs, "bn_out"), "nodes_out": _field(runs, "nodes_out"),
            "ratio_to_graphq": seconds / graphq_s if seconds and graphq_s else None,
            "error": _first_error(runs)}


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), cpu)
    versions = {}
    for dist in ("graphq", "onnx", "onnxruntime", "onnxsim", "onnxoptimizer",
                 "onnx_graphsurgeon", "numpy", "protobuf", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": _mem_total_gb(),
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions}


def _mem_total_gb() -> float | None:
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


# ---- markdown ---------------------------------------------------------------------------------
def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def graphq_table(models: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | MB in | MB out | load s | canonicalize s | fold-bn s | **passes excl. "
        "onnxsim s** | save s | onnxsim s (+import) | pipeline off s | "
        "pipeline each s (verify s) | base MB | peak MB | peak +MB (to fold-bn) | +MB / size "
        "| BN in → left |",
        "|---|" + "---:|" * 15,
    ]
    for m in models:
        s = m["graphq"]
        each, off = s["pipeline-each"], s["pipeline-off"]
        lines.append(
            f"| {m['name']} | {_f(m['size_mb'], 1)} | {_f(s['out_mb'], 1)} | {_f(s['load'], 3)} "
            f"| {_f(s['canonicalize'], 3)} | {_f(s['fold-bn'], 3)} | "
            f"**{_f(s.get('passes_excl_onnxsim'), 3)}** | {_f(s['save'], 3)} | "
            f"{_f(s['onnxsim'], 2)} (+{_f(s['onnxsim_import'], 1)}) | "
            f"{_f(off['seconds'], 2)} | {_f(each['seconds'], 2)} "
            f"({_f(each['verify_s'], 2)}) | {_f(s['baseline_mb'], 0)} | {_f(s['peak_mb'], 0)} | "
            f"{_f(s['peak_increase_mb'], 0)} ({_f(s['peak_increase_to_fold_mb'], 0)}) | "
            f"{_f(s.get('peak_increase_per_size'), 2, 'x')} | {m['bn_in']} → "
            f"{_f(s['bn_out'])} |")
    return lines


def peer_table(models: list[dict[str, Any]], peers: list[str]) -> list[str]:
    head = "| model | graphq load→save s | graphq peak +MB | " + " | ".join(
        f"{p} s (×graphq) | {p} peak +MB | {p} BN left" for p in peers) + " |"
    lines = [head, "|---|" + "---:|" * (2 + 3 * len(peers))]
    for m in models:
        s = m["graphq"]
        cells = [m["name"], _f(s.get("end_to_end"), 3), _f(s["peak_increase_mb"], 0)]
        for p in peers:
            r = m["peers"].get(p)
            if r is None or r["seconds"] is None:
                err = (r or {}).get("error") or "not run"
                cells += [f"failed: {err[:60]}" if r else "–", "–", "–"]
                continue
            cells += [f"{_f(r['seconds'], 3)} ({_f(r['ratio_to_graphq'], 2)}x)",
                      _f(r["peak_increase_mb"], 0), f"{_f(r['bn_out'])} / {m['bn_in']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets_text(models: list[dict[str, Any]]) -> list[str]:
    m = next((m for m in models if m["name"] == "minilm"), None)
    if m is None or m["graphq"].get("passes_excl_onnxsim") is None:
        return ["MiniLM was not measured, so the issue's targets are not evaluated."]
    s = m["graphq"]
    t = s["passes_excl_onnxsim"]
    size = m["size_mb"]
    limit = TARGET_SIZE_RATIO * size
    to_fold, total = s["peak_increase_to_fold_mb"], s["peak_increase_mb"]
    return [
        "| MiniLM target | limit | measured | met? |",
        "|---|---:|---:|---|",
        f"| passes excluding onnxsim (canonicalize without onnxsim + fold-bn) | "
        f"< {TARGET_SECONDS:.0f} s | {t:.3f} s | {'yes' if t < TARGET_SECONDS else 'NO'} |",
        f"| peak memory increase, load + passes (before save) | < {limit:.0f} MB (3 × "
        f"{size:.1f} MB) | {to_fold:.0f} MB ({to_fold / size:.2f}x) | "
        f"{'yes' if to_fold < limit else 'NO'} |",
        f"| peak memory increase, load + passes + save | < {limit:.0f} MB | {total:.0f} MB "
        f"({total / size:.2f}x) | {'yes' if total < limit else 'NO'} |",
        f"| absolute peak RSS of the child (baseline {s['baseline_mb']:.0f} MB after imports) | "
        f"< {limit:.0f} MB | {s['peak_mb']:.0f} MB ({s['peak_mb'] / size:.2f}x) | "
        f"{'yes' if s['peak_mb'] < limit else 'NO'} |",
    ]


def memory_breakdown(models: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | baseline | " + " | ".join(f"after {k}: RSS / peak" for k in
                                                  ("load", "canonicalize", "fold-bn", "save"))
             + " |", "|---|" + "---:|" * 5]
    for m in models:
        s = m["graphq"]
        cells = [m["name"], _f(s["baseline_mb"], 0)]
        cells += [f"{_f(s['rss_after'][k], 0)} / {_f(s['peak_after'][k], 0)}"
                  for k in ("load", "canonicalize", "fold-bn", "save")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def hotspot_lines(profiles: dict[str, Any], top: int = 12) -> list[str]:
    lines = []
    for name, prof in profiles.items():
        if "error" in prof:
            lines += [f"Profile of {name} failed: {prof['error']}", ""]
            continue
        for stage in ("load", "canonicalize", "fold-bn", "save"):
            rows = prof["hotspots"][stage]
            lines += [f"**{name}, {stage}** ({prof['stages'][stage]['s']:.3f} s under cProfile)",
                      "", "| function | calls | own s | cumulative s |", "|---|---:|---:|---:|"]
            shown = [r for r in rows["cumulative"] if "cProfile" not in r["function"]
                     and not r["function"].startswith("benchmarks/")]
            lines += [f"| `{r['function']}` | {r['calls']} | {r['own_s']:.3f} | "
                      f"{r['cumulative_s']:.3f} |" for r in shown[:top]]
            lines.append("")
    return lines


def memtrace_lines(profiles: dict[str, Any]) -> list[str]:
    lines = []
    for name, prof in profiles.items():
        trace = prof.get("memtrace", {})
        if "trace" not in trace:
            lines += [f"Memory trace of {name} failed: {trace.get('error')}", ""]
            continue
        lines += [f"**{name}** (baseline {trace['baseline']['rss_mb']:.0f} MB; nesting shown "
                  "by indentation)", "",
                  "| call | s | RSS at entry MB | peak inside, +MB over entry | kept after, +MB |",
                  "|---|---:|---:|---:|---:|"]
        for row in trace["trace"]:
            indent = "&nbsp;&nbsp;" * 2 * row["depth"]
            lines.append(f"| {indent}`{row['function']}` | {row['s']:.3f} | "
                         f"{row['rss_in_mb']:.0f} | {row['peak_increase_mb']:.0f} | "
                         f"{row['kept_mb']:.0f} |")
        lines.append("")
    return lines


def write_markdown(report: dict[str, Any], path: Path) -> None:
    models, info = report["models"], report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    peers = [p for p in PEER_JOBS if any(p in m["peers"] for m in models)]
    lines = [
        "# graphq passes: speed and memory, with peers", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; Python "
        f"{info['python']}; {versions}.", "",
        f"Command: `{report['command']}` ({report['repeat']} repeats, medians; every job in a "
        f"fresh process; {report['wall_minutes']:.1f} min in all). 1-minute load average "
        f"around the children: median {report['loadavg']['median']:.2f}, max "
        f"{report['loadavg']['max']:.2f} (the measured child itself counts for about 1).", "",
        "## Targets (MiniLM)", "", *targets_text(models), "", *report["verdict"], "",
        "## graphq stages", "",
        "Times in seconds (median). *passes excl. onnxsim* = canonicalize (simplify=False) + "
        "fold-bn. *onnxsim* = graphq's onnxsim step alone, timed in its own process. "
        "*pipeline* = `PassManager` with the `prepare` preset (canonicalize with onnxsim, "
        "fold-bn, files written), verify off / each (real inputs, 2 batches). Memory: "
        "ru_maxrss in MB; *base* after imports, before loading; *peak +MB* is the increase "
        "over base for load → canonicalize → fold-bn → save (in brackets: up to fold-bn, "
        "before save); *+MB / size* divides the full increase by the model's weight size "
        "(the larger of the input file and graphq's output: the zoo graphs build their "
        "weights with ConstantOfShape, so their input files are a few KB).", "",
        *graphq_table(models), "",
        "## Peers doing the same job", "",
        "Each peer timed from reading the file to writing its result (ORT: creating a "
        "session with `optimized_model_filepath`), against graphq load → canonicalize "
        "(no onnxsim) → fold-bn → save; ×graphq = peer time / graphq time. *BN left* = "
        "BatchNormalization nodes in the peer's output / in the input (graphq leaves the "
        "number in the first table).", "",
        *peer_table(models, peers), "",
        "## Where the memory goes (graphq, RSS / ru_maxrss in MB after each stage)", "",
        *memory_breakdown(models), "",
    ]
    if report.get("profiles"):
        lines += ["## Memory inside graphq's functions (load → canonicalize → fold-bn → save)",
                  "", "Peak RSS inside each call, from the kernel's high-water mark reset at "
                  "every call boundary (`/proc/self/clear_refs`), in a child of its own.", "",
                  *memtrace_lines(report["profiles"])]
        lines += ["## Hotspots (cProfile, cumulative seconds)", "",
                  *hotspot_lines(report["profiles"])]
    if report.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def verdict(models: list[dict[str, Any]]) -> list[str]:
    m = next((m for m in models if m["name"] == "minilm"), None)
    if m is None or m["graphq"].get("passes_excl_onnxsim") is None:
        return []
    s, size = m["graphq"], m["size_mb"]
    t, fold, total = s["passes_excl_onnxsim"], s["peak_increase_to_fold_mb"], \
        s["peak_increase_mb"]
    time_ok = "met" if t < TARGET_SECONDS else "NOT met"
    mem_ok = "met" if fold < TARGET_SIZE_RATIO * size else "NOT met"
    save_ok = "met" if total < TARGET_SIZE_RATIO * size else "NOT met"
    return [
        f"On MiniLM ({size:.1f} MB), graphq's passes excluding onnxsim take {t:.3f} s "
        f"(canonicalize {s['canonicalize']:.3f} s + fold-bn {s['fold-bn']:.3f} s): the 3 s "
        f"target is {time_ok}. Peak memory rises {fold:.0f} MB over the post-import baseline "
        f"through load and the passes ({fold / size:.2f}x the model size): the 3x target is "
        f"{mem_ok}; with the save included it rises {total:.0f} MB ({total / size:.2f}x): "
        f"{save_ok}. onnxsim alone adds {_f(s['onnxsim'], 2)} s (plus "
        f"{_f(s['onnxsim_import'], 1)} s to import it). The whole `prepare` pipeline takes "
        f"{_f(s['pipeline-off']['seconds'], 2)} s unverified and "
        f"{_f(s['pipeline-each']['seconds'], 2)} s verified after each pass "
        f"(verification {_f(s['pipeline-each']['verify_s'], 2)} s).",
    ]


def auto_notes(models: list[dict[str, Any]]) -> list[str]:
    """Failures, BatchNormalizations peers leave, and the cost of importing onnxsim."""
    notes = []
    for m in models:
        s = m["graphq"]
        for job, error in s["errors"].items():
            notes.append(f"{m['name']}: graphq job {job} failed: {error}")
        for peer, r in m["peers"].items():
            if r["error"]:
                notes.append(f"{m['name']}: {peer} failed: {r['error'][:300]}")
            elif r["bn_out"] and (s["bn_out"] or 0) < r["bn_out"]:
                notes.append(f"{m['name']}: {peer} leaves {r['bn_out']} of {m['bn_in']} "
                             f"BatchNormalization nodes; graphq leaves {s['bn_out']}.")
    imports = [m["graphq"]["onnxsim_import"] for m in models if m["graphq"]["onnxsim_import"]]
    grows = [m["graphq"]["onnxsim_import_mb"] for m in models
             if m["graphq"]["onnxsim_import_mb"] is not None]
    if imports:
        notes.append(f"Importing onnxsim takes {median(imports):.1f} s and "
                     f"{median(grows) or 0:.0f} MB (median; it imports torch). canonicalize "
                     "imports it on first use, so the pipeline columns include it; the "
                     "onnxsim column does not.")
    return notes


def _load_summary(raw: dict[str, Any]) -> dict[str, float]:
    """1-minute load averages seen around the children (our child counts for about 1)."""
    loads = [v for runs in raw.values() for results in runs.values() for r in results
             for v in r.get("loadavg_1min", [])]
    return {"median": median(loads) or 0.0, "max": max(loads, default=0.0)}


def build_report(models: list[dict[str, Any]], raw: dict[str, Any], args: argparse.Namespace,
                 wall: float) -> dict[str, Any]:
    for m in models:
        runs = raw[m["name"]]
        m["graphq"] = summarize_graphq(m, runs)
        m["peers"] = {p: summarize_peer(runs[p], m["graphq"].get("end_to_end"))
                      for p in PEER_JOBS if p in runs}
    return {"command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO),
                                             *sys.argv[1:]]),
            "repeat": args.repeat, "wall_minutes": wall / 60, "machine": machine_info(),
            "loadavg": _load_summary(raw),
            "models": models, "verdict": verdict(models), "notes": auto_notes(models),
            "raw": raw}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma-separated models (default {DEFAULT_MODELS})")
    ap.add_argument("--jobs", default=",".join(ALL_JOBS),
                    help="comma-separated jobs (default: all): " + ", ".join(ALL_JOBS))
    ap.add_argument("--repeat", type=int, default=3, help="children per job and model")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                    help="folder for passes.json and passes.md")
    ap.add_argument("--profile", default="minilm",
                    help="models to profile with cProfile (comma-separated names; '' for none)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per child")
    ap.add_argument("--child", choices=sorted(JOBS), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--feeds", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.prepare:
        return prepare_main(args)
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in ALL_JOBS]
    if unknown:
        raise SystemExit(f"unknown jobs {unknown}; known: {', '.join(ALL_JOBS)}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphq-bench-") as tmp:
        models = prepare_models(args.models, Path(tmp))
        raw, profiles = {}, {}
        for m in models:
            print(f"{m['name']} ({m['size_mb']:.1f} MB, {m['bn_in']} BN)", flush=True)
            raw[m["name"]] = measure_model(m, jobs, args.repeat, args.timeout)
            if m["name"] in args.profile.split(","):
                profiles[m["name"]] = run_child("profile", m, args.timeout)
                profiles[m["name"]]["memtrace"] = run_child("memtrace", m, args.timeout)
    report = build_report(models, raw, args, time.perf_counter() - start)
    report["profiles"] = profiles
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passes.json").write_text(json.dumps(report, indent=1, default=str), "utf-8")
    write_markdown(report, out / "passes.md")
    print(f"wrote {out / 'passes.json'} and {out / 'passes.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
