"""onnxruntime sessions: execution provider choice, sample inputs, output comparison."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from graphq import model as model_io
from graphq.errors import ConfigError

log = logging.getLogger(__name__)

# onnxruntime's own warnings (graph optimizer notes) are not the user's business.
ort.set_default_logger_severity(4)

#: short names accepted for execution providers.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cann": "CANNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def resolve_providers(asked: list[str], fallback: bool = False) -> list[str]:
    """Check the asked execution providers against those onnxruntime has here.

    A provider that is not available is an error listing the available ones, unless
    ``fallback`` is set: then it is dropped with a warning. CPU is always appended last.
    """
    available = ort.get_available_providers()
    chosen = []
    for name in asked:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full in available:
            if full not in chosen:
                chosen.append(full)
        elif fallback:
            log.warning("execution provider %s is not available here; falling back", full)
        else:
            raise ConfigError(
                f"execution provider '{name}' is not available in this onnxruntime "
                f"(available: {', '.join(available)}); install the onnxruntime build for it "
                "(e.g. onnxruntime-gpu for CUDA/TensorRT, onnxruntime-cann for CANN), "
                "or set fallback = true in [pipeline]"
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def quiet_options() -> ort.SessionOptions:
    """Session options with onnxruntime's own log limited to errors (graphq says what
    matters)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def session(model: onnx.ModelProto, providers: list[str] | None = None,
            options: ort.SessionOptions | None = None, *, spinning: bool = True
            ) -> ort.InferenceSession:
    """An onnxruntime session of an in-memory model (through a temporary file over 2 GB)."""
    with materialized(model) as source:
        return session_of(source, providers, options, spinning=spinning)


def session_of(source: bytes | Path, providers: list[str] | None = None,
               options: ort.SessionOptions | None = None, *, spinning: bool = True
               ) -> ort.InferenceSession:
    """An onnxruntime session of serialized bytes or a model file. ``spinning=False`` stops
    its threads from busy-waiting between runs, for work that alternates with other compute
    on the same cores (a teacher model between training steps). Where onnxruntime's full
    graph optimization fails, the session is made one level less optimized (``options`` is
    left at that level)."""
    if options is None:
        options = quiet_options()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = str(source) if isinstance(source, Path) else source
    providers = providers or ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:
        if options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            raise
        # onnxruntime's layout optimizations (ORT_ENABLE_ALL) have failed on valid graphs:
        # a terrain UNet's float view with its 933 activations as outputs lost a Conv
        # output ("Failed to find node output ... producing output"); the same values come
        # from the graph optimized one level less
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            sess = ort.InferenceSession(source, options, providers=providers)
        except Exception:  # noqa: BLE001 -- the first error is the one to report
            raise exc from None
        log.info("onnxruntime's full graph optimization failed (%s); the session runs the "
                 "graph optimized one level less", str(exc).strip().splitlines()[0][:200])
    # run() copies outputs out of its arena, and shrinks it after each run on the CPU alone
    # (onnxruntime refuses that without one)
    sess.graphq_arena = options.enable_cpu_mem_arena
    sess.graphq_shrinks = options.enable_cpu_mem_arena and sess.get_providers() == [
        "CPUExecutionProvider"]
    return sess


@contextlib.contextmanager
def materialized(model: onnx.ModelProto) -> Iterator[bytes | Path]:
    """The model as bytes, or over 2 GB as a temporary file with external data."""
    proto = model
    if model_io.fitted_ir_version(model) != model.ir_version:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        model_io.fix_ir_version(proto)
    if model_io.byte_size(proto) < model_io.EXTERNAL_DATA_LIMIT:
        yield proto.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="graphq-") as tmp:
        yield model_io.save(proto, Path(tmp) / "model.onnx", external_data=True)


def float_islands(model: onnx.ModelProto, providers: list[str] | None = None
                  ) -> collections.Counter[str] | None:
    """The op types onnxruntime runs in float between DequantizeLinear and QuantizeLinear in
    ``model`` (a deploy graph) once it has optimized it (on a path from a DequantizeLinear to
    a QuantizeLinear): what its integer fusions left out. None where the optimized graph
    cannot be had."""
    with tempfile.TemporaryDirectory(prefix="graphq-") as tmp:
        options = quiet_options()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            session(model, providers, options)
            optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 -- a diagnosis only: say nothing rather than fail
            log.debug("no optimized graph to inspect: %s", exc)
            return None
    nodes = [n for n in optimized.graph.node
             if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    made = {o: n for n in optimized.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in optimized.graph.node:
        for name in node.input:
            readers[name].append(node)

    # a Shape's output is no float value: the shape arithmetic after it is not counted
    stops = ("QuantizeLinear", "DequantizeLinear", "Shape", "Size")

    def closure(start: list[onnx.NodeProto], step) -> set[int]:
        seen: set[int] = set()
        todo = [n for n in start if n.op_type not in stops]
        while todo:
            node = todo.pop()
            if id(node) not in seen:
                seen.add(id(node))
                todo += [n for n in step(node) if n.op_type not in stops]
        return seen

    dq = [n for n in optimized.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in optimized.graph.node if n.op_type == "QuantizeLinear"]
    after = closure([r for n in dq for o in n.output for r in readers[o]],
                    lambda n: [r for o in n.output for r in readers[o]])
    before = closure([made[i] for n in q for i in n.input if i in made],
                     lambda n: [made[i] for i in n.input if i in made])
    return collections.Counter(n.op_type for n in nodes if id(n) in after & before)


@functools.lru_cache(maxsize=1)
def cpu_saturates_u8s8() -> bool:
    """True on an x86 CPU without VNNI: onnxruntime's uint8 x int8 kernels there add pairs
    of products in int16 (VPMADDUBSW), which saturates when activations near 255 meet
    weights near +-127; 7-bit weights (reduce_range) avoid it. VNNI CPUs and ARM do not."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def true_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs the user feeds: those without an initializer of the same name."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_spec(value: onnx.ValueInfoProto) -> tuple[np.dtype, list[int | str | None]]:
    """The numpy dtype and the dims (int, symbolic name or None) of a graph input."""
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    return dtype, model_io.dims(value) or []


def batch_axes(inputs: list[onnx.ValueInfoProto]) -> dict[str, int | None]:
    """The axis of each input that counts samples (None: the input has none, e.g. a scalar
    sample rate, which every sample of a batch shares).

    Where the inputs name their batch dim (the symbolic name most of them carry on axis 0),
    it is the axis of that name: a recurrent state ``[2, batch, 128]`` batches on axis 1.
    Otherwise axis 0, unless axis 0 is fixed to a size other than 1; then the first axis of
    unknown size (none: the input is not batched).
    """
    dims = {v.name: input_spec(v)[1] for v in inputs}
    firsts = [d[0] for d in dims.values() if d and isinstance(d[0], str) and d[0]]
    name = max(set(firsts), key=firsts.count) if firsts else None
    axes: dict[str, int | None] = {}
    for key, d in dims.items():
        if not d:
            axes[key] = None
        elif name is not None and name in d:
            axes[key] = d.index(name)
        elif not isinstance(d[0], int) or d[0] == 1:
            axes[key] = 0
        else:
            axes[key] = next((i for i, x in enumerate(d) if not isinstance(x, int)), None)
    return axes


def sample_feeds(model: onnx.ModelProto, n: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random inputs of the model's shapes: unknown dims are 1 on the batch axis
    (:func:`batch_axes`) and 32 elsewhere.

    Floats are standard normal; integers and booleans are 0 or 1, so that indices and masks
    stay valid. Symbolic dims of the same name get the same size.
    """
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        sizes: dict[str, int] = {}
        feed = {}
        inputs = true_inputs(model)
        batch = batch_axes(inputs)
        for value in inputs:
            dtype, dims = input_spec(value)
            shape = []
            for axis, d in enumerate(dims):
                if isinstance(d, int):
                    shape.append(d)
                else:
                    size = 1 if axis == batch[value.name] else 32
                    shape.append(sizes.setdefault(d, size) if d else size)
            if dtype.kind == "f":
                feed[value.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iub":
                feed[value.name] = rng.integers(0, 2, shape).astype(dtype)
            else:
                raise ConfigError(
                    f"cannot make a sample for input '{value.name}' of type {dtype}; "
                    "give data with --data"
                )
        feeds.append(feed)
    return feeds


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``sess`` on ``feed``, by name: from a session with onnxruntime's
    arena, in memory of their own (:func:`owned`; without one, an output's memory goes back
    with the output, and a copy would only double what a run holds: emit's worst-tensor
    probes fetch every activation); a session of :func:`session_of` on the CPU alone with
    its arena gives back what the run no longer holds when it ends."""
    names = [o.name for o in sess.get_outputs()]
    shrink = _SHRINKING if getattr(sess, "graphq_shrinks", False) else None
    values = sess.run(names, feed, shrink)
    if getattr(sess, "graphq_arena", True):
        values = [owned(v) for v in values]
    return dict(zip(names, values, strict=True))


def owned(value: object) -> object:
    """``value``, an output of an onnxruntime run, copied into memory numpy owns where it
    views onnxruntime's: such an array holds on to the arena block it lies in, and the
    block to the rest of its region (freed chunks included) even after the session is
    gone. Outputs kept across runs (calibrate's reference outputs of the search batches,
    emit's of the eval data) had CRAFT's whole streaming arena outlive its session: 1 GB
    more, measured after 16 runs fetching 35 activations each."""
    if isinstance(value, np.ndarray) and value.base is not None:
        return np.array(value)
    return value


#: run options that shrink the CPU arena at the end of a run: a session kept alive between
#: runs holds the peak its largest run reached otherwise
_SHRINKING = ort.RunOptions()
_SHRINKING.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def _as_array(value: object) -> np.ndarray | None:
    """A non-tensor output as an array where it is one in disguise: ZipMap's list of
    {label: probability} dicts (each row by its sorted labels), a sequence of equal-shaped
    tensors (stacked); else None."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        if all(sorted(v) == keys for v in value):
            return np.array([[v[k] for k in keys] for v in value], np.float64)
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        if len({v.shape for v in value}) == 1:
            return np.stack(value)
    return None


@dataclass
class OutputDiff:
    """How far one output is from its reference."""

    name: str
    max_abs: float
    ref_max: float
    ok: bool
    reason: str = ""

    @property
    def rel(self) -> float:
        return self.max_abs / self.ref_max if self.ref_max > 0 else self.max_abs

    @property
    def detail(self) -> str:
        """What differs, in words: the reason, or the largest difference against the
        largest reference value."""
        return self.reason or (f"max |diff| {self.max_abs:.3g} against max |ref| "
                               f"{self.ref_max:.3g} (relative {self.rel:.3g})")


def compare(ref: dict[str, np.ndarray], out: dict[str, np.ndarray],
            rtol: float, atol: float) -> list[OutputDiff]:
    """Compare outputs by name: ``max|out - ref| <= rtol * max|ref| + atol`` on each."""
    diffs = []
    for name, r in ref.items():
        if name not in out:
            diffs.append(OutputDiff(name, np.inf, 0.0, False, "output is missing"))
            continue
        o = out[name]
        if not isinstance(r, np.ndarray) or not isinstance(o, np.ndarray):
            r, o = _as_array(r), _as_array(o)
            if r is None or o is None:
                same = bool(out[name] == ref[name])
                diffs.append(OutputDiff(name, 0.0 if same else np.inf, 0.0, same,
                                        "" if same else "non-tensor output differs"))
                continue
        if o.shape != r.shape:
            diffs.append(OutputDiff(name, np.inf, 0.0, False, f"shape {o.shape} != {r.shape}"))
            continue
        if r.dtype.kind not in "fc":
            same = bool(np.array_equal(o, r))
            diffs.append(OutputDiff(name, 0.0 if same else np.inf, 0.0, same,
                                    "" if same else "integer output differs"))
            continue
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        finite = np.isfinite(r64)
        if not np.array_equal(finite, np.isfinite(o64)) or not np.array_equal(
                r64[~finite], o64[~finite], equal_nan=True):
            diffs.append(OutputDiff(name, np.inf, 0.0, False, "non-finite values differ"))
            continue
        max_abs = float(np.max(np.abs(o64[finite] - r64[finite]), initial=0.0))
        ref_max = float(np.max(np.abs(r64[finite]), initial=0.0))
        diffs.append(OutputDiff(name, max_abs, ref_max, max_abs <= rtol * ref_max + atol))
    return diffs
