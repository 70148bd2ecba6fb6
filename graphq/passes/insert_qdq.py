"""insert-qdq: decide what is quantized and how, and insert QuantizeLinear/DequantizeLinear.

Placement follows what onnxruntime's CPU execution provider fuses into integer kernels
(``DQ -> Conv -> Q`` becomes QLinearConv, ``DQ -> MatMul -> Q`` QLinearMatMul, and so on):

- **compute ops** (Conv, ConvTranspose, Gemm, MatMul): activation inputs are quantized; a
  constant weight is quantized per channel on its output axis; the output is quantized,
  after a Relu/Clip that alone reads it (a ``Q`` whose zero point is the type's minimum does
  the Relu, so onnxruntime drops it);
- **joining ops** (Add, Mul, Concat, AveragePool, GlobalAveragePool, Resize, Sigmoid,
  LeakyRelu, HardSigmoid, HardSwish): quantized when every non-constant input already is, with
  an output scale of their own (onnxruntime runs Sigmoid and LeakyRelu as table lookups,
  QLinearSigmoid and QLinearLeakyRelu, so a SiLU ``x * Sigmoid(x)`` between convolutions stays
  integer: YOLOv8n 2.05x -> 2.4x FP32 speed, its class scores 9.9 -> 13.9 dB held out;
  onnxruntime has no integer kernel for HardSigmoid or HardSwish, so with 8-bit asymmetric
  activations a HardSwish becomes ``x * HardSigmoid(x)`` whose gate takes the fixed grid of
  [0, 1], on which emit's deploy graph runs it as a saturating QLinearAdd and the Mul as
  QLinearMul (:meth:`_Planner._unit_grid`); a squeeze-excitation gate's HardSigmoid runs in
  float between DequantizeLinear and QuantizeLinear, its Mul over the feature map as
  QLinearMul); a Mul or Add by a
  constant (an elementwise scale or shift) stays float unless ``quantize_affine``, or unless
  it reads a compute op's output (a bias Add after a MatMul stays integer);
- **pass-through ops** (Reshape, Transpose, Flatten, MaxPool, Squeeze, ...): quantized when
  their input is; the output shares the input's scale and zero point;
- **tables**: the constant float table a Gather reads on axis 0 by computed indices (an
  embedding, at least ``MIN_TABLE_SIZE`` values, no other op reading it) is int8 per row,
  symmetric, whatever the weights spec (no integer kernel reads it); emit's deploy graph
  stores it as int8, gathers the int8 rows and scales them (all-MiniLM-L6-v2: 60 -> 24 MB).
  The Gather's output is not quantized by this (its readers decide).

Kept float, with the reason in the table: tensors that are not float (indices, shapes,
masks of integers), graph inputs feeding nothing quantized, the inputs of an op whose other
inputs are float (an attention mask added to scores stays out), nodes excluded by name or op
type, tensors forced by ``overrides``. Graph outputs keep their names and float values.

The Q/DQ pairs of activations carry a placeholder scale until ``calibrate`` sets it; those of
weights are final (computed from the weights). Biases are quantized to int32 by ``calibrate``
once the input scale is known (``scale = input scale x weight scale``).

A type the model's opset cannot quantize to raises the opset (onnx.version_converter, as
``canonicalize`` does) to the first that can: 21 for int16 / uint16 and for 4-bit weights
(``int4`` / ``uint4``, W4A8 with 8-bit activations), whose zero points are ONNX INT4 / UINT4
tensors; IR version 10. The note says so.
A weight's range is its min and max per channel; ``weights.clip = "mse"`` shrinks each
channel's range where that lowers its squared quantization error (a few large weights clip,
the rest get finer steps: worth it at 4 bits).
``reduce_range`` is for 8-bit weights only. 4-bit activations are refused: onnxruntime has no
integer kernel that reads them (QLinearConv, QLinearMatMul, ConvInteger and MatMulInteger take
8-bit inputs only); its 4-bit QuantizeLinear / DequantizeLinear run, but only as a float
simulation, and with int8 weights its QDQ fusion builds a QLinearConv that rejects the int4
input, so the session does not load (onnxruntime 1.31.1, CPU).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphq import graph as G
from graphq import latency, runtime
from graphq import model as model_io
from graphq.biases import quantize_biases
from graphq.data import PLAIN_SHARE, samples_in
from graphq.errors import ConfigError, ModelError, PassError, did_you_mean
from graphq.kernels import quant as Q
from graphq.passes.canonicalize import upgrade_opset
from graphq.passes.emit import deploy_graph
from graphq.quant import QuantTable, Role, TensorQuant
from graphq.registry import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)

COMPUTE = G.COMPUTE
JOINING = ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Resize", "Sigmoid",
           "LeakyRelu", "HardSigmoid", "HardSwish")
PASS_THROUGH = ("Reshape", "Transpose", "Flatten", "MaxPool", "Squeeze", "Unsqueeze",
                "Slice", "Split", "Identity", "DepthToSpace", "SpaceToDepth")
#: ops that only rearrange their input's values: a compute op's output that reaches a graph
#: output through them alone keeps its float value, as a graph output does.
RESHAPING = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")
#: elementwise ops that squash their input into a bounded output: a compute op's output read
#: only by them on its way to a graph output keeps its float value too (quantizing it only
#: adds error: no integer op reads it). A vocoder's last Conv -> Tanh -> waveform, its
#: pre-activation quantized to 8 bits, put a noise floor of -51.5 dBFS into the pauses
#: (float: -82 dBFS): 8 bits hold about 48 dB.
SQUASHING = ("Tanh", "Sigmoid")
#: joining ops that, with one constant operand, are an elementwise scale or shift.
AFFINE = ("Add", "Mul")
FUSED_ACTIVATIONS = ("Relu", "Clip")
#: readers that amplify a quantization error of their input (logits, or values whose
#: logarithm is taken): it is kept float.
SENSITIVE_READERS = ("Softmax", "LogSoftmax", "Log")
#: readers that decide by comparing values (with a threshold, or among themselves): where
#: quantization clips or rounds their input, the decision flips. A tensor they read, and the
#: compute op's output it comes from through :data:`ON_THE_WAY` ops, stay float unless a
#: compute op reads them too (a wake-word score calibrated on speech without the word: its
#: logit's range ended at 0, the score at 0.017, and the If's 0.5 threshold was never met).
DECIDING_READERS = ("Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal", "ArgMax",
                    "ArgMin")
#: ops between a compute op and a decision that keep the order of their input's values.
ON_THE_WAY = (*RESHAPING, "Sigmoid", "Tanh", "Softmax", "Relu", "Clip", "HardSigmoid",
              "LeakyRelu")
#: readers for which the relative error of small values matters: a compute op that feeds
#: only them (through a Relu/Clip) stays float altogether, its input too (a spectrogram's
#: power spans 10 decades: one 8-bit scale over it zeroes all but its top, and the Log
#: after the mel projection turns that into errors as large as the output).
LOG_READERS = ("Log",)
#: ops a compute op's output may pass on the way to a Log and still count as feeding only it
#: (:func:`_read_only_by`): a constant-Q transform's filter-bank convolutions, then the
#: magnitude (squares summed, Sqrt), the octaves concatenated, the Log. Basic Pitch's CQT
#: quantized kept its outputs at 7-9 dB against float; kept float, 32-35 dB.
TOWARD_LOG = (*RESHAPING, *FUSED_ACTIVATIONS, "Abs", "Neg", "Mul", "Add", "Sub", "Div", "Pow",
              "Sqrt", "ReduceSum", "ReduceMean", "ReduceL2", "ReduceSumSquare", "Slice",
              "Pad", "Concat", "Split", "Max", "Min")
#: ops whose constant table (input 0) is quantized per row: an embedding lookup.
TABLES = ("Gather",)
#: a Gather's constant table smaller than this (values) stays float (a 2-row token-type
#: table saves nothing worth a Cast and a Mul)
MIN_TABLE_SIZE = 4096
DEFAULT_OPS = [*COMPUTE, *JOINING, *PASS_THROUGH, *TABLES]

DTypeName = Literal["int8", "uint8", "int16", "uint16", "int4", "uint4"]
FOUR_BIT = ("int4", "uint4")
#: the first opset whose QuantizeLinear takes each type.
MIN_OPSET = {"int8": 13, "uint8": 13, "int16": 21, "uint16": 21, "int4": 21, "uint4": 21,
             "int32": 13}
NO_4BIT_ACTIVATIONS = (
    "4-bit activations are not supported: onnxruntime has no integer kernel that reads them "
    "(QLinearConv, QLinearMatMul, ConvInteger and MatMulInteger take 8-bit inputs only; its "
    "4-bit Q/DQ run only as a float simulation, and next to int8 weights its QDQ fusion makes "
    "a QLinearConv that rejects int4, so the session fails to load); use int4 weights with "
    "uint8 or int8 activations (W4A8)")
#: the inputs of joining ops that carry data (the others are parameters such as Resize's).
DATA_INPUTS = {"Resize": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,)}
FLOATS = (np.float32,)
#: recurrent ops, whose weights stay float, and why
RECURRENT = ("LSTM", "GRU", "RNN")
RECURRENT_WHY = ("graphq does not quantize recurrent ops (ONNX's LSTM/GRU/RNN take float "
                 "weights only, no Q/DQ form of them runs as an integer kernel; the same cell "
                 "written as MatMul/Gemm ops, as some exporters unroll it, is quantized)")
#: why an op that computes in float16 stays float
HALF = ("graphq quantizes float32 ops (QuantizeLinear reads float16 "
        "only from opset 19 on, with float16 scales onnxruntime's integer kernels do not fuse); "
        "export or convert the model to float32 and quantize that")
#: float_prefix_search keeps the longest float prefix that runs within this fraction of the
#: fastest placement's latency
PREFIX_MARGIN = 0.05
#: float_prefix_search times no prefix that holds more than this share of the compute ops'
#: weights: int8 is also for size (MTCNN pnet's first 3 of 5 convs hold 97% of its weights,
#: and its deploy graph with them float came out larger than the float model)
PREFIX_MAX_WEIGHT_SHARE = 0.5
#: larger models skip float_prefix_search (one session per candidate holds its weights)
PREFIX_MAX_BYTES = 512 * 2**20
#: float_prefix_speed_db: the data's first batches calibrate and score the timed prefixes,
#: up to this many, or fewer once they hold this many samples
PREFIX_SCORE_BATCHES = 4
PREFIX_SCORE_SAMPLES = 16
#: float_prefix_speed_db: a longer prefix must score this much better, besides its slowdown
PREFIX_GAIN_DB = 0.5
#: float_prefix_speed_db: scores above this count as this (more fidelity buys nothing there:
#: a tiny net's second conv float scored 44 against 35 dB, and at 1 dB per 2x that would
#: have paid for 10x its latency)
PREFIX_ENOUGH_DB = 30.0
#: float_prefix_speed_db: no prefix running more than this times the speed pick's latency is
#: weighed (the int8 preset is the fast one) ...
PREFIX_MAX_SLOWDOWN = 2.0
#: ... and past this many times, each 2x slower costs this many dB more besides the option's
#: rate: a hard bound at 1.5x let timing noise decide large gains (TesseraNet's 3 float stem
#: convs, timed 1.25x the pick's latency in one run and over 1.5x in the next, kept 10.5
#: against 2.1 dB held out; madmom's note CNN, timed 1.35x and 1.59x, 29-32 against 11-16 dB)
PREFIX_STEEP_FROM = 1.5
PREFIX_STEEP_DB = 24.0
#: the table reason of a prefix kept float until the timings that chose it are known
_PENDING = "kept float by float_prefix_search (pending)"


@dataclass
class WeightSpec:
    dtype: DTypeName = field(default="int8", metadata={"help": "weight integer type"})
    per_channel: bool = field(default=True, metadata={
        "help": "one scale per output channel (else one per tensor)"})
    symmetric: bool = field(default=True, metadata={"help": "zero point at the middle"})
    reduce_range: bool | None = field(default=None, metadata={
        "help": "7-bit weights, so x86 CPUs without VNNI do not saturate uint8 x int8 sums; "
                "default: on when this machine's CPU lacks VNNI and activations are uint8 "
                "(int8 weights only)"})
    clip: Literal["minmax", "mse"] = field(default="minmax", metadata={
        "help": "each channel's range: minmax holds every weight; mse shrinks it (to 30% "
                "at most) where that lowers the channel's squared quantization error, "
                "clipping a few large weights so the rest get finer steps: for 4-bit "
                "weights (measured at int4: worst output SQNR +0.8 to +6.0 dB on MTCNN's nets "
                "and MiniLM, -1.0 dB on the digits CNN, whose top-1 rose 98.89 -> 99.17%); "
                "not with reduce_range, whose 7 bits saturate at 8"})

    def validate(self) -> None:
        if self.reduce_range and self.clip == "mse":
            raise ValueError("weights.clip = 'mse' with reduce_range = true: clipped weights "
                             "saturate at the 8-bit ends, not the 7-bit ones; set one of them "
                             "off")
        if self.reduce_range and self.dtype != "int8":
            raise ValueError(f"reduce_range applies to int8 weights only, not {self.dtype}: "
                             "it keeps uint8 x int8 integer kernels from saturating, and "
                             f"{self.dtype} weights do not run in them")


@dataclass
class ActivationSpec:
    dtype: DTypeName = field(default="uint8", metadata={
        "help": "activation integer type (not 4-bit)"})
    symmetric: bool = field(default=False, metadata={"help": "zero point at the middle"})

    def validate(self) -> None:
        if self.dtype in FOUR_BIT:
            raise ValueError(f"activations dtype {self.dtype}: {NO_4BIT_ACTIVATIONS}")


@dataclass
class Override:
    quantize: bool = field(default=True, metadata={"help": "false keeps the tensor float"})
    dtype: DTypeName | None = field(default=None, metadata={"help": "another integer type"})
    symmetric: bool | None = field(default=None, metadata={"help": "another symmetry"})


@dataclass
class InsertQDQOptions:
    weights: WeightSpec = field(default_factory=WeightSpec, metadata={
        "help": "how weights are quantized"})
    activations: ActivationSpec = field(default_factory=ActivationSpec, metadata={
        "help": "how activations are quantized (uint8 is what CPU integer kernels fuse)"})
    ops: list[str] = field(default_factory=lambda: list(DEFAULT_OPS), metadata={
        "help": "op types that are quantized (Gather: its constant embedding table, int8 "
                "per row)"})
    include: list[str] = field(default_factory=list, metadata={
        "help": "node-name regexes: when given, only matching nodes are quantized"})
    exclude: list[str] = field(default_factory=list, metadata={
        "help": "node-name regexes of nodes kept float"})
    exclude_ops: list[str] = field(default_factory=list, metadata={
        "help": "op types kept float"})
    overrides: dict[str, Override] = field(default_factory=dict, metadata={
        "help": "per tensor name: { quantize = false } or another dtype/symmetry"})
    quantize_affine: bool = field(default=False, metadata={
        "help": "quantize the output of a Mul or Add by a constant (an elementwise scale or "
                "shift, such as a BatchNormalization that follows a Concat): false keeps "
                "such steps float between the quantized tensors around them (one "
                "requantization less each; a compute op that reads one still quantizes its "
                "input), except right after a compute op (a MatMul's bias Add stays "
                "integer); true makes them all integer ops of their own"})
    float_prefix_search: int = field(default=0, metadata={
        "help": "time in onnxruntime (the pipeline's providers, the data's first batch) the "
                "graph with its first 0, 1, ... N quantized compute ops kept float and keep the "
                "longest float prefix that runs within 5% of the fastest of them: a network's "
                "first layers (few channels, large images) can run slower as integer kernels "
                "than as float ones, and kept float they add no quantization error; 0 turns "
                "the search off"})
    float_prefix: int = field(default=0, metadata={
        "help": "keep the first N quantized compute ops float without timing anything (in "
                "place of float_prefix_search: a run whose search timed its choice writes it "
                "here, with float_prefix_search = 0, in its pipeline.toml, so rerunning that "
                "file places the same)"})
    float_prefix_speed_db: float = field(default=0.0, metadata={
        "help": "float_prefix_search weighs fidelity too: the longer prefixes it timed "
                "(slower than its speed pick, the longest within 5% of the fastest) are "
                "scored in onnxruntime with that pick, calibrated on the data's first 4 "
                "batches or 16 samples (worst output SQNR against the float model), and the "
                "best one "
                "is kept float if it scores more than 0.5 dB + this many dB per 2x it runs "
                "slower above the pick, and 24 dB more per 2x past 1.5x its latency; at most "
                "2x its latency, and a score over 30 dB counts as 30 (0: speed alone)",
        "min": 0.0})

    def validate(self) -> None:
        for key in ("float_prefix_search", "float_prefix"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"option '{key}' must be an integer >= 0, got {value!r}")
        known = set(COMPUTE) | set(JOINING) | set(PASS_THROUGH) | set(TABLES)
        for op in self.ops:
            if op not in known:
                raise ValueError(f"option 'ops' has '{op}'{did_you_mean(op, known)}; "
                                 f"quantizable ops: {', '.join(sorted(known))}")
        for op in self.exclude_ops:
            if not onnx.defs.has(op):
                raise ValueError(f"option 'exclude_ops' has '{op}', which is no ONNX op type"
                                 f"{did_you_mean(op, known)}")
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"'{pattern}' is not a valid regex: {exc}") from exc


@register
class InsertQDQ(Pass):
    name = "insert-qdq"
    summary = "choose what is quantized and insert QuantizeLinear/DequantizeLinear pairs"
    Options = InsertQDQOptions
    preserves_semantics = False

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        model, upgraded = self._fit_opset(model)
        model, _ = model_io.infer_shapes(model)  # the types decide what is float
        graph = G.import_graph(model)
        _refuse_quantized(_op_counts(model))
        self._check_overrides(graph)
        out, table, planner = self._place(model, [])
        if not table.quantized():
            # nothing failed: the model (or the options' selection) has nothing to quantize
            raise ConfigError(f"nothing in this model can be quantized: {_why_nothing(graph)}")
        planner.warn_unquantized()
        notes = upgraded + planner.notes
        pinned: dict[str, Any] = {}
        if self.options.float_prefix:
            out, table, planner, note = self._prefix_given(model, planner)
            notes = upgraded + planner.notes + [note]
        elif self.options.float_prefix_search and len(planner.computes) > 1:
            out, table, planner, note, pinned = self._prefix_search(model, ctx, out, table,
                                                                    planner)
            notes = upgraded + planner.notes + [note]
        counts = {
            "activations": len(table.quantized("activation")),
            "weights": len(table.quantized("weight")),
            "float": sum(not e.quantized for e in table.entries.values()),
        }
        return PassResult(out, True, counts, notes, pinned)

    def precheck(self, model: onnx.ModelProto) -> None:
        """A model quantized already, or without any op insert-qdq quantizes or reads a table
        of (in any graph, Loop bodies too), is refused before the passes before it run (a 31
        MB LightGBM ensemble took 82 s of canonicalize to be told so, ddddocr's quantized
        OCR 14 s)."""
        ops = _op_counts(model)
        _refuse_quantized(ops)
        if not set(ops) & {*COMPUTE, *TABLES, *RECURRENT}:
            raise ConfigError("nothing in this model can be quantized: "
                              f"{_why_nothing(G.import_graph(model))}")

    def _prefix_given(self, model: onnx.ModelProto, planner: _Planner
                      ) -> tuple[onnx.ModelProto, QuantTable, _Planner, str]:
        """Option ``float_prefix``: the first N compute ops float, as asked (all but the
        last, where the graph has no more)."""
        k = min(self.options.float_prefix, len(planner.computes) - 1)
        first = [i for i, _ in planner.computes[:k]]
        reason = f"kept float with the first {k} compute op(s): float_prefix = " \
                 f"{self.options.float_prefix}"
        out, table, chosen = self._place(model, first, reason)
        names = ", ".join(f"'{name}'" for _, name in planner.computes[:k]) or "none"
        note = f"float_prefix = {self.options.float_prefix}: {names} kept float"
        if self.options.float_prefix_search:
            note += " (float_prefix_search not run: float_prefix is given)"
        log.info("%s", note)
        return out, table, chosen, note

    def _place(self, model: onnx.ModelProto, floats: list[int], reason: str = ""
               ) -> tuple[onnx.ModelProto, QuantTable, _Planner]:
        """The graph with its Q/DQ pairs, its table and planner; the main graph's nodes at
        the indices ``floats`` (after toposort) are kept float (``reason`` in the table)."""
        graph = G.import_graph(model)
        graph.toposort()
        planner = _Planner(graph, self.options, {id(graph.nodes[i]): reason for i in floats})
        table = planner.plan()
        names = G.used_names(graph)
        where = G.node_graphs(graph)
        for entry in table.quantized():
            tensor = planner.tensors[entry.tensor]
            _insert_pair(G.owner(graph, tensor, where), tensor, entry, names)
        graph.cleanup().toposort()
        out = G.export(graph, like=model)
        table.attach(out)
        return out, table, planner

    def _prefix_search(self, model: onnx.ModelProto, ctx: PassContext, out: onnx.ModelProto,
                       table: QuantTable, planner: _Planner
                       ) -> tuple[onnx.ModelProto, QuantTable, _Planner, str, dict[str, Any]]:
        """Option ``float_prefix_search``: time the placements with the first 0..N compute
        ops float side by side (:mod:`graphq.latency`) and keep the longest float prefix
        within ``PREFIX_MARGIN`` of the fastest (speed first; among placements that fast,
        the most precision; timings within the margin are noise on a loaded machine, so the
        choice between them would otherwise be a coin toss). A timed choice is pinned:
        ``float_prefix`` k and the search off, for the written pipeline.toml."""
        n = min(self.options.float_prefix_search, len(planner.computes) - 1)
        if model.ByteSize() > PREFIX_MAX_BYTES:
            note = (f"float_prefix_search skipped: the model is over "
                    f"{PREFIX_MAX_BYTES // 2**20} MiB (each timed placement is a session of "
                    "its own); exclude the first compute ops by name to keep them float")
            log.info("%s", note)
            return out, table, planner, note, {}
        n, capped = _weight_capped(planner, n)
        if n == 0:
            log.info("%s", capped)
            return out, table, planner, capped, {}
        first = [i for i, _ in planner.computes]
        placed = [(out, table, planner)] + [self._place(model, first[:k], _PENDING)
                                            for k in range(1, n + 1)]
        feed = ctx.first_feed(model, PLAIN_SHARE / len(placed))  # their sessions all alive
        log.info("float_prefix_search: timing %d placements in onnxruntime", len(placed))
        seconds = latency.medians([_timing_model(m) for m, _, _ in placed], feed, ctx.providers)
        k = latency.longest_within(seconds, PREFIX_MARGIN)
        timings = ", ".join(f"{i} float {t * 1e3:.3g} ms" for i, t in enumerate(seconds))
        margin = f"{PREFIX_MARGIN:.0%}"
        why = f"the longest float prefix within {margin} of the fastest placement"
        weighed = ""
        if self.options.float_prefix_speed_db and k < n and ctx.data is not None:
            k, why, weighed = self._weigh(model, ctx, [m for m, _, _ in placed], seconds, k, why)
        if k == 0:
            note = (f"float_prefix_search: the first compute ops stay quantized (keeping them "
                    f"float runs more than {margin} slower than the fastest placement; latency "
                    f"in onnxruntime with the first k of them float: {timings}){weighed}"
                    f"{capped}")
            log.info("%s", note)
            return out, table, planner, note, {"float_prefix_search": 0}
        out, table, chosen = placed[k]
        reason = (f"kept float with the first {k} compute op(s): {why} "
                  f"({seconds[k] * 1e3:.3g} ms against {seconds[0] * 1e3:.3g} ms all "
                  "quantized; float_prefix_search)")
        for entry in table.entries.values():
            if entry.reason == _PENDING:
                entry.reason = reason
        table.attach(out)
        names = ", ".join(f"'{name}'" for _, name in planner.computes[:k])
        note = (f"float_prefix_search: {names} kept float, {why} ({seconds[0] / seconds[k]:.2f}x "
                f"the speed of all quantized; latency in onnxruntime with the first k compute "
                f"ops float: {timings}){weighed}{capped}")
        log.info("%s", note)
        return out, table, chosen, note, {"float_prefix_search": 0, "float_prefix": k}

    def _weigh(self, model: onnx.ModelProto, ctx: PassContext, placed: list[onnx.ModelProto],
               seconds: list[float], k: int, why: str) -> tuple[int, str, str]:
        """Option ``float_prefix_speed_db``: the timed prefixes longer than the speed pick
        ``k`` and within :data:`PREFIX_MAX_SLOWDOWN` of its latency scored with it
        (:func:`graphq.passes.calibrate.placement_scores` on the data's first batches); the
        best by score (at most :data:`PREFIX_ENOUGH_DB`) less what its slowdown costs
        (:func:`_slowdown_db`) is kept if that beats ``k``'s by more than
        :data:`PREFIX_GAIN_DB`. Returns the prefix, the reason's words and the note's."""
        from graphq.passes.calibrate import placement_scores  # calibrate imports this module

        longer = [j for j in range(k + 1, len(placed))
                  if seconds[j] <= PREFIX_MAX_SLOWDOWN * seconds[k]]
        feeds: list[dict[str, np.ndarray]] = []
        for feed in ctx.data.head(model, PREFIX_SCORE_BATCHES) if longer else []:
            feeds.append(feed)  # all float outputs are held: enough samples, not more
            if sum(samples_in(f, model) for f in feeds) >= PREFIX_SCORE_SAMPLES:
                break
        if not feeds:
            return k, why, ""
        log.info("float_prefix_search: scoring %d placements on %d batch(es)",
                 len(longer) + 1, len(feeds))
        scores = dict(zip([k, *longer], placement_scores(
            model, [placed[j] for j in (k, *longer)], feeds, ctx), strict=True))
        rate = self.options.float_prefix_speed_db
        value = {j: min(s, PREFIX_ENOUGH_DB) - _slowdown_db(seconds[j] / seconds[k], rate)
                 for j, s in scores.items()}
        best = max(value, key=lambda j: (value[j], j))
        listing = ", ".join(f"{j} float {s:.1f} dB" for j, s in scores.items())
        scored = (f"worst output SQNR against the float model on {len(feeds)} batch(es), "
                  f"with the first k float: {listing}")
        if best == k or value[best] <= value[k] + PREFIX_GAIN_DB:
            return k, why, (f"; no longer prefix within {PREFIX_MAX_SLOWDOWN:g}x its latency "
                            f"scores more than {PREFIX_GAIN_DB:g} dB + {rate:g} dB per 2x "
                            f"slower above it ({PREFIX_STEEP_DB:g} dB more per 2x past "
                            f"{PREFIX_STEEP_FROM:g}x), scores over {PREFIX_ENOUGH_DB:g} dB "
                            f"counting as {PREFIX_ENOUGH_DB:g} ({scored})")
        gain = (f"{scores[best]:.1f} dB against {scores[k]:.1f} dB with {k} float, at "
                f"{seconds[best] / seconds[k]:.2f}x the latency (float_prefix_speed_db "
                f"{rate:g} per 2x)")
        return best, f"a longer float prefix for fidelity: {gain}", f" ({scored})"

    def _check_overrides(self, graph: gs.Graph) -> None:
        tensors = graph.tensors()
        for name in self.options.overrides:
            if name not in tensors:
                raise PassError(f"option 'overrides' names tensor '{name}', which the graph "
                                f"does not have{did_you_mean(name, tensors)} (names after "
                                "canonicalize: see --dump-dir)")

    def _fit_opset(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
        """Raise the opset to the first one whose QuantizeLinear takes every asked type
        (21 for 16- and 4-bit types), as canonicalize's ``min_opset`` does."""
        opset = model_io.default_opset(model)
        kinds = [self.options.weights.dtype, self.options.activations.dtype]
        kinds += [o.dtype for o in self.options.overrides.values() if o.dtype]
        need = max(MIN_OPSET[k] for k in kinds)
        if opset >= need:
            return model, []
        short = sorted({k for k in kinds if MIN_OPSET[k] > opset})
        model, dropped = upgrade_opset(model, need)
        model_io.fix_ir_version(model)
        note = (f"opset {opset} -> {need} (IR version {model.ir_version}): QuantizeLinear "
                f"takes {'/'.join(short)} from opset {need} on")
        log.info("%s", note)
        return model, [note, *dropped]


class _Planner:
    """Walks the graph in order and fills the table."""

    def __init__(self, graph: gs.Graph, options: InsertQDQOptions,
                 floats: dict[int, str] | None = None) -> None:
        self.graph = graph
        self.o = options
        #: compute nodes kept float whatever the options say (by id), with the reason
        self.floats = floats or {}
        #: index in ``graph.nodes`` and name of the main graph's compute nodes it quantizes,
        #: in order
        self.computes: list[tuple[int, str]] = []
        self._index: dict[int, int] = {}
        self.table = QuantTable()
        self.tensors: dict[str, gs.Tensor] = {}
        self.notes: list[str] = []
        self.half: list[str] = []  #: compute ops kept float: float16
        self.recurrent: list[str] = []  #: LSTM/GRU/RNN ops, weights kept float
        # graph outputs, and the outputs of If branches (they leave to the outer graph)
        self.outputs = {t.name for g in G.graphs(graph) for t in g.outputs}
        self.affine_float: list[str] = []  # Mul / Add by a constant left float
        self._new: list[gs.Node] = []  # nodes added to the graph being walked
        self._names: set[str] | None = None
        reduce = options.weights.reduce_range
        if reduce is None:
            reduce = (options.activations.dtype == "uint8" and options.weights.dtype == "int8"
                      and runtime.cpu_saturates_u8s8())
        self.reduce_range = reduce
        if reduce and options.weights.clip == "mse":
            self.notes.append("weights.clip = 'mse' not applied to the int8 weights: they use "
                              "7 bits (reduce_range: this CPU has no VNNI), and clipped "
                              "weights would saturate at the 8-bit ends; set "
                              "weights.reduce_range = false to clip them")
        elif reduce and options.weights.reduce_range is None:
            self.notes.append("weights use 7 bits (reduce_range): this CPU has no VNNI, and "
                              "its uint8 x int8 kernels saturate with 8-bit weights; set "
                              "weights.reduce_range = false for a VNNI or ARM target")

    def plan(self) -> QuantTable:
        self.graph.toposort()
        self._index = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self._walk(self.graph)
        if self.affine_float:
            self.notes.append(
                f"{len(self.affine_float)} Mul/Add by a constant after a quantized tensor kept "
                "float (elementwise scale/shift steps; quantize_affine = true quantizes them): "
                + ", ".join(f"'{n}'" for n in self.affine_float[:5])
                + (" ..." if len(self.affine_float) > 5 else ""))
        return self.table

    def _walk(self, graph: gs.Graph) -> None:
        """Decide for the nodes of ``graph`` in order, and inside each If's branches (their
        tensors are calibrated through outputs the calibration view adds); a Loop's or
        Scan's body stays float."""
        outer, self._new = self._new, []
        for node in graph.nodes:
            if node.op == "If":
                for branch in G.subgraphs(node):
                    self._walk(branch)
            elif node.op in ("Loop", "Scan"):
                self.notes.append(f"{node.op} '{node.name}': the nodes of its body are not "
                                  "quantized (kept float): its values cannot be read out per "
                                  "iteration for calibration")
            elif node.op in RECURRENT:
                reason = f"{node.op} '{node.name}' kept float: {RECURRENT_WHY}"
                self.notes.append(reason)
                self.recurrent.append(f"{node.op} '{node.name}'")
                for i in (1, 2, 3):  # W, R, B
                    t = node.inputs[i] if i < len(node.inputs) else None
                    if t is not None and t.name and t.name not in self.table.entries \
                            and G.constant_values(t) is not None:
                        self._float_weight(node, i, reason)
            kind = self._selected(node)
            if kind == "compute":
                self._compute(node)
            elif kind == "joining":
                self._joining(node)
            elif kind == "pass-through":
                self._pass_through(node)
            elif kind == "table":
                self._table(node)
        graph.nodes.extend(self._new)  # a HardSwish's Mul (:meth:`_hard_swish`)
        self._new = outer

    def _selected(self, node: gs.Node) -> str | None:
        if node.op not in self.o.ops or node.op in self.o.exclude_ops:
            return None
        if self.o.include and not any(re.search(p, node.name) for p in self.o.include):
            return None
        if any(re.search(p, node.name) for p in self.o.exclude):
            self.notes.append(f"{node.op} '{node.name}' kept float: excluded by name")
            return None
        if id(node) in self.floats:
            self._float_weight(node, _weight_index(node), self.floats[id(node)])
            return None
        if node.op in COMPUTE:
            return "compute"
        if node.op in TABLES:
            return "table"
        return "joining" if node.op in JOINING else "pass-through"

    # ---- decisions -----------------------------------------------------------------------
    def _compute(self, node: gs.Node) -> None:
        weight_index = _weight_index(node)
        if weight_index is None and node.op != "MatMul":
            self.notes.append(f"{node.op} '{node.name}' kept float: its weight is not a "
                              "constant")
            return
        activations = [i for i, t in enumerate(node.inputs[:2]) if i != weight_index]
        if any(_half(t) for t in node.inputs[:2]):
            reason = f"{node.op} '{node.name}' kept float: it computes in float16: {HALF}"
            self.notes.append(reason)
            self.half.append(f"{node.op} '{node.name}'")
            self._float_weight(node, weight_index, reason)
            return
        if not all(self._is_float(node.inputs[i]) for i in activations):
            self.notes.append(f"{node.op} '{node.name}' kept float: an input is not float")
            return
        log_reader = _read_only_by(node.outputs[0], LOG_READERS, _toward_log, 16)
        if log_reader is not None:
            reader, _ = log_reader
            reason = (f"{node.op} '{node.name}' kept float: its output feeds only "
                      f"{reader.op} '{reader.name}' (through elementwise ops at most), where "
                      "the quantization error of small values becomes large (the relative "
                      "precision of every value counts)")
            self.notes.append(reason)
            self._float_weight(node, weight_index, reason)
            return
        for i in activations:
            self._activation(node.inputs[i], f"input of {node.op} '{node.name}'")
        if weight_index is not None:
            self._weight(node, weight_index)
        self._output(node)
        if id(node) in self._index:
            self.computes.append((self._index[id(node)], node.name))

    def _float_weight(self, node: gs.Node, index: int | None, reason: str) -> None:
        """The constant weight of a compute op kept float (if it has one), with the reason."""
        if index is not None:
            self.table.add(TensorQuant(node.inputs[index].name, "weight", False, reason,
                                       consumers=[node.name]))

    def _joining(self, node: gs.Node) -> None:
        data = [node.inputs[i] for i in DATA_INPUTS.get(node.op, range(len(node.inputs)))
                if i < len(node.inputs) and node.inputs[i].name]
        inputs = [t for t in data if G.constant_values(t) is None]
        if not inputs or not all(self._quantized(t) for t in inputs):
            return
        if node.op in AFFINE and len(inputs) == 1 and not self.o.quantize_affine \
                and not _computed(inputs[0]):
            self.affine_float.append(node.name)
            return
        if not all(self._is_float(t) for t in node.outputs[:1]):
            return
        if node.op == "HardSwish" and self._grid_spec() is not None:
            self._hard_swish(node, inputs[0])
            return
        for t in data:
            values = G.constant_values(t)
            if values is not None and values.size and self._is_float(t):
                self._constant(t, node)
        self._output(node)
        if node.op == "HardSigmoid":
            self._unit_grid(node)

    def _grid_spec(self) -> Q.QType | None:
        """The activation type a HardSigmoid's output can take :meth:`_unit_grid` in: 8-bit,
        asymmetric (a symmetric grid has no code at 0 to saturate at)."""
        spec = self.o.activations
        qt = Q.qtype(spec.dtype)
        return qt if qt.bits == 8 and not spec.symmetric else None

    def _hard_swish(self, node: gs.Node, x: gs.Tensor) -> None:
        """A quantized ``HardSwish(x)`` becomes ``x * HardSigmoid(x; 1/6, 1/2)``, the gate on
        :meth:`_unit_grid` and the Mul joining ``x`` and it: onnxruntime has no integer
        kernel for HardSwish and ran it in float between DequantizeLinear and
        QuantizeLinear; this way it runs as QLinearAdd and QLinearMul (trueocr's orientation
        net, 18 HardSwish: 0.57x -> 0.87x FP32 speed without VNNI). The Mul writes the
        HardSwish's output tensor; the HardSigmoid keeps the node's name."""
        if self._names is None:
            self._names = G.used_names(self.graph)
        out = node.outputs[0]
        gate = gs.Variable(G.fresh_name(f"{out.name}_gate", self._names), dtype=out.dtype,
                           shape=out.shape)
        node.op, node.attrs = "HardSigmoid", dict(G.HARD_SWISH_GATE)
        node.outputs[0] = gate
        mul = gs.Node("Mul", G.fresh_name(f"{node.name}_Mul", self._names), inputs=[x, gate],
                      outputs=[out])
        self._new.append(mul)
        self._joining(node)
        self._joining(mul)

    def _unit_grid(self, node: gs.Node) -> None:
        """A quantized HardSigmoid that gates its own input, ``x * HardSigmoid(x)`` (a
        HardSwish; a squeeze-excitation gate over a few values per channel keeps its
        calibrated, finer grid: as an integer op it would save nothing), takes the fixed grid
        of [0, 1] over the whole 8-bit range (zero point the type's minimum, scale 1/255):
        its clip at 0 and 1 is then the QuantizeLinear's saturation, and
        ``Q(HardSigmoid(x))`` is ``Q'(x + beta / alpha)`` for a Q' of scale ``1/255 /
        alpha``: emit's deploy graph runs it as that Add, which onnxruntime fuses into
        QLinearAdd (:func:`graphq.passes.emit.hard_sigmoid_adds`); calibration leaves the
        grid alone."""
        out = node.outputs[0]
        entry = self.table.get(out.name)
        qt = self._grid_spec()
        swish = any(r.op == "Mul" and node.inputs[0] in r.inputs for r in out.outputs)
        if entry is None or not entry.quantized or entry.scale is not None or qt is None \
                or entry.dtype != qt.name or not float(node.attrs.get("alpha", 0.2)) > 0 \
                or not swish:
            return
        scale, zero = Q.qparams(0.0, 1.0, qt, False)
        entry.scale, entry.zero_point = [float(scale)], [int(zero)]
        entry.range, entry.method = [0.0, 1.0], "fixed"
        entry.reason += (f", on the fixed grid of [0, 1] (scale 1/{qt.qmax - qt.qmin}, zero "
                         f"point {int(zero)}): an integer op in onnxruntime")

    def _pass_through(self, node: gs.Node) -> None:
        source = node.inputs[0] if node.inputs else None
        if source is None or not self._quantized(source):
            return
        for out in node.outputs:
            if out.name and self._is_float(out) and out.name not in self.outputs \
                    and _deciding_reader(out) is None:
                entry = self._activation(out, f"output of {node.op} '{node.name}', sharing "
                                         f"the scale of '{source.name}'")
                if entry is not None and entry.quantized:
                    entry.method = f"shared:{source.name}"

    def _moved_to_output(self, tensor: gs.Tensor) -> list[str]:
        """The ops and the graph output when ``tensor`` reaches a graph output through
        :data:`RESHAPING` and :data:`SQUASHING` ops alone (a classifier's logits reshaped
        to ``[T, 1, classes]``, a vocoder's last Conv through Tanh): the output is then the
        compute op's values rearranged or squashed, and quantizing them would round logits
        that an argmax or a threshold reads, or a waveform; else []."""
        ops: list[str] = []
        while len(tensor.outputs) == 1 and tensor.outputs[0].op in (*RESHAPING, *SQUASHING) \
                and tensor.name not in self.outputs:
            reader = tensor.outputs[0]
            ops.append(f"{reader.op} '{reader.name}'")
            tensor = reader.outputs[0]
        return [*ops, tensor.name] if ops and tensor.name in self.outputs \
            and not tensor.outputs else []

    def _output(self, node: gs.Node) -> None:
        out = node.outputs[0]
        readers = out.outputs
        if (len(readers) == 1 and readers[0].op in FUSED_ACTIVATIONS and out.name not in
                self.outputs and not any(re.search(p, readers[0].name) for p in self.o.exclude)):
            out = readers[0].outputs[0]
            reason = f"output of {node.op} '{node.name}' -> {readers[0].op}"
        else:
            reason = f"output of {node.op} '{node.name}'"
        if out.name in self.outputs:
            self.table.add(TensorQuant(out.name, "activation", False,
                                       "a graph output: keeps its float value"))
            return
        moved = self._moved_to_output(out)
        if moved:
            self.table.add(TensorQuant(out.name, "activation", False, f"becomes graph output "
                                       f"'{moved[-1]}' through {', '.join(moved[:-1])} only: "
                                       "keeps its float value"))
            return
        decided = _deciding_reader(out)
        if decided is not None:
            decider, way = decided
            through = f" through {', '.join(f'{n.op} {n.name!r}' for n in way)}" if way else ""
            self.table.add(TensorQuant(out.name, "activation", False, f"read by {decider.op} "
                                       f"'{decider.name}'{through}, whose decision flips "
                                       "where quantization clips or rounds: kept float"))
            return
        sensitive = _read_only_by(out, SENSITIVE_READERS, _keeps_logits, 4)
        if sensitive is not None:
            reader, way = sensitive
            steps = [f"{r.op} by a constant" if r.op in AFFINE else r.op for r in way]
            through = f" through {', '.join(steps)}" if steps else ""
            self.table.add(TensorQuant(out.name, "activation", False, "read only by "
                                       f"{reader.op} '{reader.name}'{through}, which amplifies "
                                       "its error: kept float"))
            return
        if self._is_float(out):
            self._activation(out, reason)

    def _decide(self, tensor: gs.Tensor, role: Role, spec: WeightSpec | ActivationSpec,
                reason: str) -> TensorQuant:
        """A new table entry for ``tensor``: the spec, as a per-tensor override changes it."""
        self.tensors[tensor.name] = tensor
        override = self.o.overrides.get(tensor.name)
        if override is not None and not override.quantize:
            return self.table.add(TensorQuant(tensor.name, role, False,
                                              "kept float by an override"))
        dtype = override.dtype if override and override.dtype else spec.dtype
        if role == "activation" and dtype in FOUR_BIT:
            raise PassError(f"option 'overrides' makes the activation '{tensor.name}' "
                            f"{dtype}: {NO_4BIT_ACTIVATIONS}")
        symmetric = override.symmetric if override and override.symmetric is not None \
            else spec.symmetric
        return self.table.add(TensorQuant(tensor.name, role, True, reason, dtype=dtype,
                                          symmetric=symmetric,
                                          consumers=[n.name for n in tensor.outputs]))

    def _activation(self, tensor: gs.Tensor, reason: str) -> TensorQuant:
        if tensor.name in self.table.entries:
            return self.table.entries[tensor.name]
        return self._decide(tensor, "activation", self.o.activations, reason)

    def _constant(self, tensor: gs.Tensor, node: gs.Node) -> None:
        """A constant operand of a joining op: per-tensor qparams from its own values."""
        entry = self._activation(tensor, f"constant input of {node.op} '{node.name}'")
        if not entry.quantized or entry.scale is not None:
            return
        lo, hi = Q.weight_range(G.constant_values(tensor))
        scale, zero = Q.qparams(lo, hi, Q.qtype(entry.dtype), entry.symmetric)
        entry.scale, entry.zero_point = [float(scale)], [int(zero)]
        entry.range, entry.method = [float(lo), float(hi)], "constant"

    def _weight(self, node: gs.Node, index: int) -> None:
        tensor = node.inputs[index]
        if tensor.name in self.table.entries:
            return
        entry = self._decide(tensor, "weight", self.o.weights,
                             f"weight of {node.op} '{node.name}'")
        if not entry.quantized:
            return
        values = G.constant_values(tensor)
        axis = channel_axis(node, index, values.ndim) if self.o.weights.per_channel else None
        reduce = self.reduce_range and entry.dtype == "int8"
        if self.o.weights.clip == "mse" and not reduce:
            lo, hi = Q.weight_range_mse(values, axis, entry.dtype, entry.symmetric)
            entry.method = "weight-mse"
        else:
            lo, hi = Q.weight_range(values, axis)
            entry.method = "weight"
        scale, zero = Q.qparams(lo, hi, Q.qtype(entry.dtype), entry.symmetric,
                                reduce_range=reduce)
        entry.axis = axis
        entry.scale = np.atleast_1d(scale).astype(float).tolist()
        entry.zero_point = np.atleast_1d(zero).astype(int).tolist()
        entry.range = [float(np.min(lo)), float(np.max(hi))]

    def _table(self, node: gs.Node) -> None:
        """A Gather on axis 0 of a constant float table of rows (an embedding) by computed
        indices: the table int8 per row (symmetric; whatever the weights spec says, since no
        integer kernel reads it), if no other op reads it. emit's deploy graph gathers the
        int8 rows and scales them (:func:`graphq.passes.emit.gathered_tables`)."""
        table = node.inputs[0]
        values = G.constant_values(table)
        if (values is None or values.ndim != 2 or values.size < MIN_TABLE_SIZE
                or not self._is_float(table) or table.name in self.table.entries
                or not G.row_gathers(table)):
            return
        override = self.o.overrides.get(table.name)
        if override is not None and override.quantize and (
                override.dtype not in (None, "int8") or override.symmetric is False):
            raise PassError(f"option 'overrides' gives the Gather table '{table.name}' "
                            f"dtype {override.dtype or 'int8'}, symmetric "
                            f"{override.symmetric}: tables are int8, symmetric, per row; "
                            "use { quantize = false } to keep it float")
        entry = self._decide(table, "weight", WeightSpec(),
                             f"table of Gather '{node.name}' (an embedding): int8 per row; "
                             "the deploy graph gathers the int8 rows, then scales them")
        if not entry.quantized:
            return
        entry.dtype, entry.symmetric, entry.axis, entry.method = "int8", True, 0, "weight"
        lo, hi = Q.weight_range(values, 0)
        scale, zero = Q.qparams(lo, hi, Q.qtype("int8"), True)
        entry.scale = np.atleast_1d(scale).astype(float).tolist()
        entry.zero_point = np.atleast_1d(zero).astype(int).tolist()
        entry.range = [float(np.min(lo)), float(np.max(hi))]

    # ---- facts ---------------------------------------------------------------------------
    def _quantized(self, tensor: gs.Tensor) -> bool:
        entry = self.table.get(tensor.name)
        return entry is not None and entry.quantized

    @staticmethod
    def _is_float(tensor: gs.Tensor) -> bool:
        return G.element_type(tensor) in [np.dtype(f) for f in FLOATS]

    def warn_unquantized(self) -> None:
        """Say once, as a warning, that float16 ops or recurrent ops stay float (each is a
        note of its own in the record): the deploy graph then shrinks and speeds up only
        where the rest of the model is."""
        if self.half:
            log.warning("%d compute op(s) stay float, %s: they compute in float16: %s",
                        len(self.half), _first(self.half), HALF)
        if self.recurrent:
            log.warning("%s %s float: %s", _first(self.recurrent),
                        "stays" if len(self.recurrent) == 1 else "stay", RECURRENT_WHY)


def _half(tensor: gs.Tensor) -> bool:
    return G.element_type(tensor) == np.float16


def _first(ops: list[str]) -> str:
    return ", ".join(ops[:3]) + (" ..." if len(ops) > 3 else "")


def _computed(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is the output of a compute op (or of the Relu/Clip after one): a
    bias Add after a MatMul stays an integer op there (onnxruntime runs it as QLinearAdd,
    one pass instead of DequantizeLinear, Add and QuantizeLinear)."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op in FUSED_ACTIVATIONS and node.inputs and node.inputs[0].inputs:
        node = node.inputs[0].inputs[0]
    return node is not None and node.op in COMPUTE


#: ops that only a quantized model has (the ``QLinear*`` family besides)
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QGemm", "QAttention")


def _op_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op type the model has, in every graph (Loop bodies too)."""
    return Counter(n.op_type for g in G.graph_protos(model.graph) for n in g.node)


def _refuse_quantized(ops: Counter[str]) -> None:
    """A model (its :func:`_op_counts`) that is quantized already (by graphq, onnxruntime's
    quantizer or an exporter's QAT) cannot be quantized again: the float values it was made
    from are gone."""
    found = Counter({op: n for op, n in ops.items()
                     if op in QUANTIZED_OPS or op.startswith("QLinear")})
    if found:
        listed = ", ".join(f"{n} {op}" for op, n in found.most_common())
        raise ModelError(f"the model is quantized already (it has {listed}): quantize the "
                         "float model it was made from instead")


def _why_nothing(graph: gs.Graph) -> str:
    """Why no tensor of ``graph`` was quantized: its compute ops are all inside Loop/Scan
    bodies, or it has none, or the options selected none."""
    outside = [n for g in _not_looped(graph) for n in g.nodes if n.op in COMPUTE]
    looped = []
    for node in G.nodes(graph):
        if node.op in ("Loop", "Scan"):
            inside = Counter(n.op for sub in G.subgraphs(node) for n in G.nodes(sub)
                             if n.op in COMPUTE)
            if inside:
                ops = ", ".join(f"{k} x{v}" for k, v in sorted(inside.items()))
                looped.append(f"{node.op} '{node.name}' ({ops})")
    if looped and not outside:
        return (f"its compute ops are all inside the bodies of {', '.join(looped)}, which "
                "graphq does not quantize (a body's values cannot be read out per iteration "
                "for calibration); the model has nothing else to quantize")
    recurrent = [f"{n.op} '{n.name}'" for n in G.nodes(graph) if n.op in RECURRENT]
    if not outside and recurrent:
        return (f"its weights are in {', '.join(recurrent[:3])}"
                f"{' ...' if len(recurrent) > 3 else ''}: {RECURRENT_WHY}; and it has no "
                f"{'/'.join(COMPUTE)} besides")
    if not outside:
        held = Counter(n.op for n in G.nodes(graph)).most_common(5)
        ops = ", ".join(f"{op} x{n}" for op, n in held) or "no ops"
        return (f"it has no {'/'.join(COMPUTE)} (the ops graphq quantizes, and the ops "
                f"between them once they are; it holds {ops}); there is nothing to convert")
    if all(any(_half(t) for t in n.inputs[:2]) for n in outside):
        return (f"its {len(outside)} {'/'.join(sorted({n.op for n in outside}))} op(s) "
                f"compute in float16: {HALF}")
    return (f"no {'/'.join(COMPUTE)} with float inputs was selected; check the ops, include "
            "and exclude options")


def _not_looped(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and the If branches nested in it, not the Loop/Scan bodies."""
    yield graph
    for node in graph.nodes:
        if node.op == "If":
            for sub in G.subgraphs(node):
                yield from _not_looped(sub)


def _slowdown_db(ratio: float, rate: float) -> float:
    """What running ``ratio`` times the speed pick's latency costs a longer float prefix, in
    dB: ``rate`` per 2x, and :data:`PREFIX_STEEP_DB` more per 2x past
    :data:`PREFIX_STEEP_FROM`."""
    steep = PREFIX_STEEP_DB * max(0.0, math.log2(ratio / PREFIX_STEEP_FROM))
    return latency.speed_db(ratio, rate) + steep


def _weight_capped(planner: _Planner, n: int) -> tuple[int, str]:
    """The longest float prefix (at most ``n`` of the planner's compute ops, in order) that
    holds at most :data:`PREFIX_MAX_WEIGHT_SHARE` of their constant inputs' values
    (initializers and Constant nodes, as paddle2onnx writes weights; read through their
    Q/DQ pairs), and what the cap cut ("" when it cut nothing)."""
    by_name = {node.name: node for node in planner.graph.nodes}
    computes = [name for _, name in planner.computes]
    weights = [sum(v.size for t in by_name[name].inputs
                   if (v := G.constant_values(G.float_source(t))) is not None)
               for name in computes]
    held = np.cumsum(weights)  # held[j]: the weights of the first j + 1 compute ops
    k = next((j for j in range(n) if held[j] > PREFIX_MAX_WEIGHT_SHARE * held[-1]), n)
    if k == n:
        return n, ""
    why = (f"{held[k] / held[-1]:.0%} of the compute ops' weights (over "
           f"{PREFIX_MAX_WEIGHT_SHARE:.0%}: the deploy graph would barely shrink)")
    if k == 0:
        return 0, (f"float_prefix_search: the first compute ops stay quantized: "
                   f"'{computes[0]}' alone holds {why}")
    return k, (f"; at most the first {k} timed: with '{computes[k]}' too the float prefix "
               f"would hold {why}")


def _timing_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A placement as its deploy graph runs: biases int32 and weights folded to integers at
    the scales in the graph. Timing needs no calibration: Q/DQ pairs with placeholder scales
    run as fast as calibrated ones."""
    graph = G.import_graph(model)
    quantize_biases(graph, QuantTable())
    graph.cleanup().toposort()
    return deploy_graph(G.export(graph, like=model))[0]


def _keeps_logits(node: gs.Node) -> bool:
    """Ops between logits and the Softmax that reads them: reshapes, and an Add/Mul by a
    constant (a bias the exporter left apart: tf2onnx writes a Conv1D as Conv, Squeeze, Add;
    a morpheme tagger's logits quantized there over [-130, 67] flipped its Softmax's close
    calls, word accuracy 84.6% -> 73.8%)."""
    return node.op in RESHAPING or (
        node.op in AFFINE and any(G.constant_values(t) is not None for t in node.inputs))


def _toward_log(node: gs.Node) -> bool:
    return node.op in TOWARD_LOG


def _deciding_reader(tensor: gs.Tensor, depth: int = 4) -> tuple[gs.Node, list[gs.Node]] | None:
    """A reader in :data:`DECIDING_READERS` that ``tensor`` reaches directly or through
    :data:`ON_THE_WAY` ops (those ops, in order), when no compute op reads ``tensor`` or a
    tensor on the way; else None."""
    readers = tensor.outputs
    if any(r.op in COMPUTE for r in readers):
        return None
    found = next((r for r in readers if r.op in DECIDING_READERS), None)
    if found is not None:
        return found, []
    if depth == 0:
        return None
    for r in readers:
        if r.op in ON_THE_WAY and r.outputs:
            further = _deciding_reader(r.outputs[0], depth - 1)
            if further is not None:
                return further[0], [r, *further[1]]
    return None


def _read_only_by(tensor: gs.Tensor, readers: tuple[str, ...],
                  through: Callable[[gs.Node], bool], depth: int
                  ) -> tuple[gs.Node, list[gs.Node]] | None:
    """The first of ``readers`` (op types) and the ops on the way, when every path from
    ``tensor`` ends at one of them through ops ``through`` accepts alone (at most ``depth``
    of them), else None: no other op (a compute op, a graph output) reads anything on the
    way. Each op is looked at once (``x * x``, the branches of a magnitude meeting again)."""
    found, way, stack, seen = None, [], [(tensor, depth)], set()
    while stack:
        t, left = stack.pop()
        if not t.outputs:
            return None
        for r in t.outputs:
            if r.op in readers:
                found = found or r
            elif not through(r) or left == 0 or not r.outputs:
                return None
            elif id(r) not in seen:
                seen.add(id(r))
                way.append(r)
                stack += [(out, left - 1) for out in r.outputs]
    return None if found is None else (found, way)


def _weight_index(node: gs.Node) -> int | None:
    """Which input of a compute op is its constant weight (None when there is none)."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return 1 if len(node.inputs) > 1 and G.constant_values(node.inputs[1]) is not None \
            else None
    for i in (1, 0):
        if len(node.inputs) > i and G.constant_values(node.inputs[i]) is not None:
            return i
    return None


def channel_axis(node: gs.Node, index: int, rank: int) -> int | None:
    """The output-channel axis of the weight at input ``index``, for per-channel scales."""
    if rank < 2:
        return None
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    # MatMul: a right-hand weight [.., K, N] makes output columns, a left-hand one rows
    return rank - 1 if index == 1 else rank - 2


def _insert_pair(graph: gs.Graph, tensor: gs.Tensor, entry: TensorQuant,
                 names: set[str]) -> None:
    """``tensor -> Q -> DQ -> (every reader of tensor)``; graph outputs keep ``tensor``."""
    qt = Q.qtype(entry.dtype)
    if entry.scale is not None:
        scale = np.asarray(entry.scale, np.float32)
        zero = Q.to_exact(entry.zero_point, qt)  # INT4 / UINT4 for the 4-bit types
        if entry.axis is None:
            scale, zero = scale.reshape(()), zero.reshape(())
    else:  # placeholder until calibrate sets it
        scale, zero = np.array(1.0, np.float32), Q.to_exact(np.zeros((), np.int64), qt)
    readers = list(tensor.outputs)
    restored = G.qdq_pair(graph, tensor, scale, zero, entry.axis, names)
    for reader in readers:
        for i, t in enumerate(reader.inputs):
            if t is tensor:
                reader.inputs[i] = restored
