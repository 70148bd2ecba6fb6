"""calibrate: run the float graph in onnxruntime on data and set every activation's scale.

1. The graph that ``insert-qdq`` made is viewed without its Q/DQ pairs (the float graph),
   with every quantized activation made an output.
2. The data streams through it batch by batch on the pipeline's execution providers; an
   observer per tensor accumulates statistics (min/max, or a histogram) and the batch is
   dropped, so memory stays flat in the number of batches.
3. Each observer's clip range (``minmax``, ``percentile``, ``entropy`` or ``mse``) gives the
   scale and zero point (:mod:`graphq.kernels.quant`); pass-through tensors take their
   source's. ``auto`` keeps one histogram per tensor, derives every method's ranges from it,
   runs the quantized graph with each on calibration batches spread over the data and keeps
   the method whose worst output is closest to the float model's (SQNR). A tensor that held
   non-finite values (an attention mask's -inf) or whose source was kept float is kept float,
   its Q/DQ pair removed, the reason in the table.
   With ``weight_rounding = "gptq"`` the weights are rounded for what their ops' outputs
   lose on the search batches rather than to nearest (:mod:`graphq.rounding`), before
   bias correction and the scoring, which then see the rounded weights.
4. Biases of Conv, ConvTranspose and Gemm whose input and weight are quantized become int32
   with ``scale = input scale x weight scale`` and zero point 0.
5. With ``target_sqnr_db``, the sensitivity search keeps float what costs the outputs most
   (:mod:`graphq.sensitivity`), ranked by each activation's gain alone, or with
   ``search_by = "segment"`` by where its error lands: each compute op's output SQNR with only
   the activations between it and the compute ops before it quantized
   (:mod:`graphq.segments`), which sees error that the op's weights amplify (a depthwise conv
   whose BN-folded weights are ~73 on the channels one uint8 scale leaves 0-1 levels) and
   costs a few runs where ranking each activation costs one run per activation.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphq import graph as G
from graphq import latency, runtime
from graphq import segments as SEG
from graphq import sensitivity as S
from graphq.biases import bias_sites, quantize_biases
from graphq.data import DATA_HINT, PLAIN_SHARE, DataSource, Feed, run_failure, samples_in
from graphq.errors import ConfigError, DataError, GraphqError, PassError
from graphq.kernels import observers as O
from graphq.kernels import quant as Q
from graphq.passes.emit import deploy_graph
from graphq.passes.insert_qdq import COMPUTE, PASS_THROUGH
from graphq.progress import Progress
from graphq.quant import QuantTable, TensorQuant
from graphq.registry import Pass, PassContext, PassResult, register
from graphq.rounding import Rounded, round_weights

log = logging.getLogger(__name__)

#: the methods ``auto`` tries, in the order that breaks ties.
AUTO_METHODS = ("percentile", "mse", "entropy", "minmax")
#: auto_speed_db times the two placements only where a speedup up to this could buy the
#: loss: 8-bit kernels move a quarter of float's bytes, and the whole int8 graphs of the
#: benchmark run at most 3.4x FP32 (resnet50); MiniLM's 14 gated activations lose 9.9 dB
#: quantized, which no speedup buys at 1 dB per 2x, and timing them cost calibrate 47%
MAX_SPEEDUP = 4.0


@dataclass
class CalibrateOptions:
    method: Literal["minmax", "percentile", "entropy", "mse", "auto"] = field(
        default="percentile", metadata={
            "help": "how the clip range is chosen; auto: each of percentile, mse, entropy and "
                    "minmax (from one histogram per tensor) is run on calibration batches "
                    "spread over the data (search_batches, search_samples) and the one whose "
                    "worst output SQNR against the float model is highest is kept, percentile "
                    "unless another beats it by more than auto_margin_db (one session per method)"})
    percentile: float = field(default=99.999, metadata={
        "help": "for method = percentile: the share of values inside the range",
        "min": 50.0, "max": 100.0})
    min_sqnr_db: float = field(default=0.0, metadata={
        "help": "keep float any activation whose expected SQNR at its clip range is below "
                "this (dB; 0: quantize all): outlier-heavy tensors, such as a transformer's "
                "feed-forward activations, then stay exact", "min": 0.0})
    check_min_sqnr: bool = field(default=True, metadata={
        "help": "method auto: the activations min_sqnr_db keeps float stay float only if "
                "the outputs score better that way, by more than auto_margin_db, than with "
                "them quantized too (one more session on the scoring batches); a tensor's "
                "own SQNR does not say what its error does to the outputs, and a float "
                "island costs speed (its compute ops run in float)"})
    auto_speed_db: float = field(default=0.0, metadata={
        "help": "check_min_sqnr's exchange rate of fidelity for speed: the dB of worst output "
                "SQNR a 2x speedup is worth. When the float activations win on score, the two "
                "graphs are timed side by side in onnxruntime (first scoring batch) and the "
                "activations are quantized anyway if that runs faster and scores within "
                "auto_margin_db + auto_speed_db x log2(speedup) of keeping them float "
                "(not timed where even a 4x speedup would not buy the loss; 0: fidelity "
                "only; not with auto_metric, whose units are the user's)",
        "min": 0.0})
    min_sqnr_speedup: float = field(default=0.0, metadata={
        "help": "the speedup auto_speed_db weighs, taken as given instead of timed (0: timed "
                "in onnxruntime); a run that timed it writes what it measured here in its "
                "pipeline.toml, so rerunning that file decides the same",
        "min": 0.0})
    bias_correction: bool = field(default=False, metadata={
        "help": "subtract from each Conv / Gemm bias the mean its weight's quantization error "
                "adds on the calibration data, (W_q - W) . E[x]; the graph's float view then "
                "carries the corrected biases (a later qat pass distills towards them)"})
    weight_rounding: Literal["nearest", "gptq"] = field(default="nearest", metadata={
        "help": "how quantized weights are rounded onto their grid; gptq: column by column, "
                "each rounding error made up for by the columns not yet rounded, by how the "
                "inputs correlate on the search batches (GPTQ), so that the op's output loses "
                "least (with bias_correction, its bias then takes the mean error left); Conv "
                "and ConvTranspose (1-D, 2-D), Gemm and MatMul weights, the rest nearest. "
                "Under method auto it is fitted on every other search batch and kept only if "
                "the graph scores better with it than with nearest rounding on the others: at "
                "8 bits it helped some nets and cost others up to 2 dB; at 4 bits it gained "
                "2-18 dB"})
    rounding_rows: int = field(default=8192, metadata={
        "help": "weight_rounding = gptq: input rows (a Conv's patches, a MatMul's rows) each "
                "weight's statistics are taken from, drawn evenly from the search batches; "
                "the cost is rows x columns^2 per weight", "min": 64})
    target_sqnr_db: float = field(default=0.0, metadata={
        "help": "sensitivity search (0: off): keep float the activations whose quantization "
                "costs the outputs most, fewest first, until every output's SQNR against the "
                "float model on the search batches reaches this (dB); about one run of "
                "those batches per activation (search_by = segment: a few)", "min": 0.0})
    search_by: Literal["activation", "segment"] = field(default="activation", metadata={
        "help": "how the sensitivity search ranks what it keeps float; activation: by the "
                "gain of keeping each one float alone (one run of the search batches per "
                "activation); segment: by the SQNR each compute op's output keeps with only "
                "the activations between it and the compute ops before it quantized (about "
                "two forward passes per batch in all), worst first, a segment at a time"})
    rank_batches: int = field(default=0, metadata={
        "help": "sensitivity search by activation: rank each activation's gain on this many "
                "of the search batches (spread over them; 0: all), the search's cost (one "
                "run per activation); the count kept float is still found on all of them",
        "min": 0})
    max_float: float = field(default=0.25, metadata={
        "help": "the share of activations the sensitivity search may keep float",
        "min": 0.0, "max": 1.0})
    search_min_speedup: float = field(default=0.0, metadata={
        "help": "sensitivity search: keep float no more of what it picked than leaves the "
                "graph running at least this many times the float model's speed (1.0: never "
                "slower than float), what it picked first kept float longest: the float model "
                "and the deploy graphs timed side by side in onnxruntime on the first search "
                "batch, the count found by bisection (whole segments with search_by = "
                "segment); 0: no bound", "min": 0.0})
    max_float_count: int = field(default=-1, metadata={
        "help": "sensitivity search: keep float at most the first this many activations it "
                "picked (-1: no cap); a run whose search_min_speedup timed its choice writes "
                "the count here in its pipeline.toml, with search_min_speedup = 0, so "
                "rerunning that file decides the same", "min": -1})
    search_batches: int = field(default=4, metadata={
        "help": "calibration batches method auto and the sensitivity search score on (at "
                "least; more while they hold fewer than search_samples samples), one drawn "
                "from each stretch of consecutive batches, so that they cover all the data",
        "min": 1})
    search_samples: int = field(default=16, metadata={
        "help": "samples (on the inputs' batch axis) auto and the search score on at least, so "
                "that batches of one image do not leave the choice to a few images",
        "min": 1})
    auto_metric: str = field(default="", metadata={
        "help": "method auto: score the candidates with this function instead of the worst "
                "output SQNR: 'module:function' (importable) or 'file.py:function' (relative "
                "to the pipeline file); it is called as "
                "function(reference, quantized), two lists with one dict of output name -> "
                "array per scoring batch (the float model's outputs, the candidate's), and "
                "returns a number, higher is better; auto keeps the best (ties: the order "
                "percentile, mse, entropy, minmax), auto_margin_db does not apply. graphq "
                "ships two for class scores read through an argmax: "
                "'graphq.metrics:top1' (positions whose argmax is float's) and "
                "'graphq.metrics:ctc_greedy' (a CTC recognizer's strings)"})
    auto_margin_db: float = field(default=0.5, metadata={
        "help": "method auto keeps percentile unless another method's score beats it by "
                "more than this (dB): differences within the scoring noise of a few batches "
                "do not carry over to new data", "min": 0.0})
    sample: int = field(default=65536, metadata={
        "help": "histogram methods: a batch of a tensor with more values than this is "
                "histogrammed from a strided sample of this many, a quarter of it after 8 "
                "batches (the tails, min and max stay exact; 0: every value); large "
                "activations then cost a fraction of a pass", "min": 0})
    bins: int | None = field(default=None, metadata={
        "help": "histogram bins (percentile, entropy, mse); default: the method's own "
                "(2048, entropy 4096)", "min": 128})


    def validate(self) -> None:
        if 0 < self.sample < 1024:
            raise ValueError(f"option 'sample' is {self.sample}; it must be 0 (every value) "
                             "or >= 1024")
        if self.auto_metric and self.method != "auto":
            raise ValueError(f"option 'auto_metric' scores method auto's candidates; method "
                             f"is '{self.method}': set method = \"auto\" or drop auto_metric")


class _SpreadBatches:
    """The batches method auto, its bias-correction check and the sensitivity search score
    on: at least ``batches`` batches holding at least ``samples`` samples, spread over a
    stream of unknown length, so that data whose kinds come in runs (an image folder sorted
    by class, one sample rate after another) is scored on all of them.

    Jittered strata: the stream is cut into strata of ``stride`` consecutive batches and one
    batch of each is kept, drawn uniformly (a reservoir of one, seeded: the same data keeps
    the same batches). When the kept batches of every two neighbouring strata merged into
    one (the draw between them weighted by the batches each stands for, so it stays uniform)
    would still be enough, they are merged and the stride doubles. So the kept batches cover
    the whole stream, at most about twice the need are held, a stream shorter than the need
    is kept whole, and data that alternates (8 kHz, 16 kHz, ...) does not alias with the
    stride as every k-th batch would."""

    def __init__(self, batches: int, samples: int, count: Callable[[dict], int],
                 seed: int = 0) -> None:
        self.need_batches, self.need_samples, self.count = batches, samples, count
        self.stride, self.seen = 1, 0
        self.rng = np.random.default_rng(seed)
        # per stratum: [feed, its samples, batches of the stream the stratum has seen,
        # what the caller keeps with the feed]
        self.kept: list[list] = []

    def _enough(self, kept: list[list]) -> bool:
        return (len(kept) >= self.need_batches
                and sum(k[1] for k in kept) >= self.need_samples)

    def offer(self, feed: dict[str, np.ndarray], payload: object = None) -> None:
        """The next batch of the stream, with what to keep beside it while it is kept."""
        if self.seen % self.stride == 0:
            self.kept.append([feed, self.count(feed), 1, payload])
        else:  # the current stratum: this batch replaces its pick with probability 1/m
            last = self.kept[-1]
            last[2] += 1
            if self.rng.random() * last[2] < 1.0:
                last[0], last[1], last[3] = feed, self.count(feed), payload
        self.seen += 1
        while len(self.kept) > 1:
            merged = [self._merge(self.kept[i:i + 2]) for i in range(0, len(self.kept), 2)]
            if not self._enough(merged):
                break
            self.kept, self.stride = merged, self.stride * 2

    def _merge(self, pair: list[list]) -> list:
        if len(pair) == 1:
            return list(pair[0])
        (a, b), total = pair, pair[0][2] + pair[1][2]
        pick = a if self.rng.random() * total < a[2] else b
        return [pick[0], pick[1], total, pick[3]]

    def batches(self) -> list[dict[str, np.ndarray]]:
        return [k[0] for k in self.kept]

    def payloads(self) -> list[object]:
        return [k[3] for k in self.kept]


@dataclass
class _Stream:
    """What streaming the data through the float view gathered."""

    observers: dict[str, O.Observer]
    means: dict[str, O.ChannelMean]  # per-channel input means, for bias correction
    kept: list[dict[str, np.ndarray]]  # batches spread over the data, for the search
    reference: list[dict[str, np.ndarray]]  # the float graph's outputs on each kept batch
    batches: int
    seconds: float


@register
class Calibrate(Pass):
    name = "calibrate"
    summary = "run the graph on data in onnxruntime; set activation scales and zero points"
    Options = CalibrateOptions
    preserves_semantics = False
    needs_data = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        table = QuantTable.required(model, "insert-qdq", "calibrate")
        self._pinned: dict[str, Any] = {}  # what this run timed (PassResult.pinned)
        if ctx.data is None:
            raise DataError(f"calibrate needs data: {DATA_HINT}")
        scorer = _scorer(model, self.options, ctx)  # a wrong auto_metric fails before streaming
        if self.options.method == "auto" and self.options.auto_metric:
            ctx.report.setdefault("calibrate", {})["auto_metric"] = self.options.auto_metric
        graph = G.import_graph(model)
        given_outputs = list(graph.outputs)
        notes = (_score_sources(model, graph, scorer)
                 if self._searches() and not self.options.auto_metric else [])
        observed = _observed(table)
        corrected = _correctable(graph, table) if self.options.bias_correction else []
        stream = self._observe(model, graph, observed, ctx,
                               sorted({G.float_source(n.inputs[0]).name for n in corrected}))
        originals = _biases(corrected)
        rounded = None
        checked = self.options.method == "auto" and len(stream.kept) >= 2
        if self.options.weight_rounding == "gptq":
            # under auto, fitted on every other search batch and checked on the rest
            fit = stream.kept[0::2] if checked else stream.kept
            rounded = round_weights(model, graph, table, fit, ctx.providers,
                                    self.options.rounding_rows, corrected)
            notes += rounded.notes
        rest = [n for n in corrected if rounded is None or id(n) not in rounded.biased]
        notes += _correct_biases(rest, table, stream.means) if rest else []
        if self.options.method == "auto":
            if rounded is not None and rounded.weights and checked and stream.observers:
                # before auto picks a clip method, so that it picks one for the weights kept
                probe = table.copy()
                self._set_qparams(probe, stream.observers, graph, AUTO_METHODS[0],
                                  self._placement_sqnr(probe, stream.observers))
                kept, more = _check_rounding(model, graph, probe, stream, rounded, corrected,
                                             originals, ctx.providers, scorer)
                rounded.use(kept, table)
                notes += more
            table, chosen, score, scoring = self._auto(model, graph, table, stream, ctx,
                                                       scorer)
            notes = chosen + notes
            if corrected and stream.kept:
                notes += _check_correction(scoring or _ScoringGraph(model, graph, table),
                                           table, stream, score, corrected, originals,
                                           ctx.providers, scorer)
        else:
            notes = self._set_qparams(table, stream.observers, graph) + notes
        if self.options.target_sqnr_db > 0:
            notes += self._sensitivity(model, graph, table, stream, ctx, given_outputs)
        graph.outputs = given_outputs
        _apply(graph, table)
        biases = quantize_biases(graph, table)
        graph.cleanup().toposort()
        out = G.export(graph, like=model)
        table.attach(out)
        counts = {"batches": stream.batches, "activations": len(table.quantized("activation")),
                  "biases": biases, "kept_float": sum(
                      not e.quantized for e in table.entries.values())}
        log.info("calibrated %d tensors on %d batches in %.2f s (%s)", len(observed),
                 stream.batches, stream.seconds, self.options.method)
        return PassResult(out, True, counts, notes, self._pinned)

    def _searches(self) -> bool:
        """Whether the run scores candidates against the float outputs of kept batches."""
        return (self.options.target_sqnr_db > 0 or self.options.method == "auto"
                or self.options.weight_rounding == "gptq")

    # ---- statistics -------------------------------------------------------------------------
    def _observe(self, model: onnx.ModelProto, graph: gs.Graph, observed: list[TensorQuant],
                 ctx: PassContext, means: list[str]) -> _Stream:
        """Stream the data: an observer per ``observed`` tensor, per-channel means of the
        ``means`` tensors (bias correction); batches spread over the data kept for the
        search (:class:`_SpreadBatches`). A Concat output whose inputs are all observed is
        not fetched: its statistics are its inputs' merged (:func:`_derived_concats`)."""
        derived = _derived_concats(graph, {e.tensor for e in observed}, set(means))
        names = [e.tensor for e in observed if e.tensor not in derived]
        extra = [n for n in means if n not in set(names)]
        search = self._searches()
        # the scored outputs too: the kept batches' float outputs are the search's reference
        outputs = [o.name for o in graph.outputs] if search else []
        renamed: dict[str, str] = {}  # tensors inside If branches leave by new names
        view = G.with_outputs(model, names + extra + outputs, float_view=True, renamed=renamed)
        sess = runtime.session(view, ctx.providers, spinning=False)
        channel_means = {n: O.ChannelMean() for n in means}
        observers = {e.tensor: self._observer(e) for e in observed}
        start = time.perf_counter()
        batches = 0
        progress = Progress("calibrate", unit="batch")
        kept = _SpreadBatches(self.options.search_batches, self.options.search_samples,
                              lambda feed: samples_in(feed, model))

        # the feeds in flight, in order, each with whether it ends its batch: batches whose
        # runs would make over data.RUN_BYTES run in pieces (two in flight, all fetched)
        order: deque[tuple[dict[str, np.ndarray], bool]] = deque()

        def feeds() -> Iterator[dict[str, np.ndarray]]:
            for batch in ctx.data.feeds(model):
                pieces = ctx.split(batch, model, share=0.5)
                for i, feed in enumerate(pieces):
                    order.append((feed, i == len(pieces) - 1))
                    yield feed

        fetched = list(dict.fromkeys(names + extra + outputs))
        fetch = [renamed.get(n, n) for n in fetched]
        try:
            for values in _run_ahead(sess, fetch, feeds()):
                feed, ends_batch = order.popleft()
                for name, value in zip(fetched, values, strict=True):
                    if name in observers:
                        observers[name].observe(value)
                    if name in channel_means:
                        channel_means[name].observe(value)
                if search:
                    got = dict(zip(fetched, values, strict=True))
                    kept.offer(feed, {o: runtime.owned(got[o]) for o in outputs})
                if ends_batch:
                    batches += 1
                    progress.update(batches)
        except _RunFailed as failed:
            raise run_failure(model, failed.feed, lambda f: sess.run(fetch, f), failed.error,
                              "the float model", batches + 1) from failed.error
        finally:
            progress.close()
        for output, sources in derived.items():  # in graph order: a Concat of Concats works
            for source in sources:
                observers[output].merge(observers[source])
        if derived:
            log.info("%d Concat output(s): statistics merged from their inputs' (not fetched)",
                     len(derived))
        return _Stream(observers, channel_means, kept.batches(), kept.payloads(), batches,
                       time.perf_counter() - start)

    def _sensitivity(self, model: onnx.ModelProto, graph: gs.Graph, table: QuantTable,
                     stream: _Stream, ctx: PassContext, outputs: list[gs.Tensor]
                     ) -> list[str]:
        """Keep float the activations the search picks (module :mod:`graphq.sensitivity`) in
        ``graph`` (with its corrected biases; not changed) against the float ``model``;
        pass-through tensors that share a scale follow their source. The choice is cut to
        ``max_float_count``, or to what runs at ``search_min_speedup`` (``outputs``: the
        graph's own, for timing it)."""
        o = self.options
        units = _observed(table)
        index = {e.tensor: i for i, e in enumerate(units)}
        pairs = dict(index)
        for e in table.quantized("activation"):
            source = _shared_source(e)
            if source in index:
                pairs[e.tensor] = index[source]
        view = graph.copy()
        _apply(view, table)
        masked, mask_name = S.masked_model(G.export(view.cleanup().toposort(), like=model), pairs,
                                           len(units))
        feeds = stream.kept
        rank = o.rank_batches if o.search_by == "activation" else 0
        score, rank_score = S.session_scores(masked, feeds, stream.reference, mask_name,
                                             ctx.providers, rank)
        limit = math.floor(o.max_float * len(units))
        if o.search_by == "segment":
            result, reasons, scored = _segment_search(masked, mask_name, pairs, len(units),
                                                      feeds, score, o.target_sqnr_db,
                                                      limit, ctx.providers)
            how = f" by segment ({scored} compute-op segments scored)"
        else:
            progress = Progress("sensitivity", total=len(units), unit="activation")
            result = S.search(score, len(units), o.target_sqnr_db, limit, progress, rank_score)
            progress.close()
            on = f" on {rank} of the {len(feeds)} search batches" if rank_score else ""
            reasons = {i: (f"kept float by the sensitivity search: alone it raises the worst "
                           f"output's SQNR by {result.gains_db[i]:.2f} dB{on}")
                       for i in result.floats}
            how = (f" (gains ranked on {rank} of the {len(feeds)} batches: "
                   f"{result.rank_runs} runs)" if rank_score else "")
        picked, cut = result.floats, ""
        cuts = result.cuts or list(range(len(picked) + 1))
        if 0 <= o.max_float_count < len(picked):
            k = max(c for c in cuts if c <= o.max_float_count)
            cut = f"; the first {k} of them kept float (max_float_count {o.max_float_count})"
        elif o.search_min_speedup and picked:
            k, cut = self._speed_cut(model, graph, table, [units[i] for i in picked], cuts,
                                     stream, ctx, outputs)
        else:
            k = len(picked)
        final_db = result.final_db
        if k < len(picked):
            final_db = score(S.mask(len(units), picked[:k]))
            if final_db < result.baseline_db:  # the picks help together, not cut (segments)
                cut += (f"; with those {k} float the outputs scored {final_db:.1f} dB, below "
                        f"{result.baseline_db:.1f} dB with none: none kept float")
                k, final_db = 0, result.baseline_db
        if o.search_min_speedup and picked:
            self._pinned.update(search_min_speedup=0.0, max_float_count=k)
        _keep_float(table, {units[i].tensor: reasons[i] for i in picked[:k]})
        reached = "reached" if final_db >= o.target_sqnr_db else "NOT reached"
        ctx.report.setdefault("calibrate", {})["search"] = {
            "target_sqnr_db": o.target_sqnr_db, "search_by": o.search_by, "kept_float": k,
            "activations": len(units), "baseline_db": round(result.baseline_db, 2),
            "final_db": round(final_db, 2), "batches": len(feeds)}
        note = (f"sensitivity search{how}: worst output SQNR {result.baseline_db:.1f} dB with "
                f"every activation quantized -> {final_db:.1f} dB with "
                f"{k} of {len(units)} kept float (target "
                f"{o.target_sqnr_db:g} dB {reached}; at most {limit}; {result.runs} runs of "
                f"{len(feeds)} batch(es){cut})")
        log.info("%s", note)
        return [note]

    def _speed_cut(self, model: onnx.ModelProto, graph: gs.Graph, table: QuantTable,
                   picked: list[TensorQuant], cuts: list[int], stream: _Stream,
                   ctx: PassContext, outputs: list[gs.Tensor]) -> tuple[int, str]:
        """The most of the activations the search ``picked`` (the first k, k in ``cuts``)
        that can stay float with the graph still running at least ``search_min_speedup``
        times the float model's speed: each count's deploy graph timed side by side with
        the float model (:mod:`graphq.latency`), the count bisected (speed falls, as a
        rule, as more is kept float). Returns it and the note's words."""
        bound = self.options.search_min_speedup
        reference = (ctx.float_model() if ctx.float_source is not None
                     else G.with_outputs(model, [], float_view=True))
        feed = ctx.split(stream.kept[0], reference, PLAIN_SHARE / 2)[0]
        speedups: dict[int, float] = {}

        def speedup(k: int) -> float:
            if k not in speedups:
                candidate = table.copy()
                _keep_float(candidate, {unit.tensor: None for unit in picked[:k]})
                searched = graph.outputs
                graph.outputs = outputs  # timed with the graph's own outputs
                try:
                    deploy = deploy_graph(_ScoringGraph(model, graph, candidate).proto)[0]
                finally:
                    graph.outputs = searched
                log.info("sensitivity search: timing %d of %d float against the float model",
                         k, len(picked))
                float_s, deploy_s = latency.medians([reference, deploy], feed, ctx.providers)
                speedups[k] = float_s / deploy_s
            return speedups[k]

        lo, hi = 0, len(cuts) - 1
        if speedup(cuts[hi]) >= bound:
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if speedup(cuts[mid]) >= bound else (lo, mid)
        k = cuts[lo]
        timings = ", ".join(f"{c} float {speedups[c]:.2f}x" for c in sorted(speedups))
        if k == len(picked):
            return k, (f"; with them float it runs {speedups[k]:.2f}x the float model's speed, "
                       f"within search_min_speedup {bound:g}")
        return k, (f"; the first {k} of them kept float: more runs under search_min_speedup "
                   f"{bound:g} times the float model's speed ({timings})")

    def _auto(self, model: onnx.ModelProto, graph: gs.Graph, table: QuantTable,
              stream: _Stream, ctx: PassContext, scorer: _Scorer
              ) -> tuple[QuantTable, list[str], float, _ScoringGraph | None]:
        """Method ``auto``: the table set by each of :data:`AUTO_METHODS`, scored by
        ``scorer`` (the worst output SQNR of the quantized ``graph`` against the float
        ``model``, or the user's auto_metric) on the kept batches; returns the best table,
        the notes (the scores first), its score and the graph the candidates were scored
        on (None when there was nothing to compare)."""
        if not stream.observers or not stream.kept:
            notes = self._set_qparams(table, stream.observers, graph, AUTO_METHODS[0])
            return table, [f"method auto: nothing to compare (no observed activation or no "
                           f"batch), {AUTO_METHODS[0]} used"] + notes, 0.0, None
        scoring: _ScoringGraph | None = None
        placement = self._placement_sqnr(table, stream.observers)
        tried: dict[str, tuple[float, QuantTable, list[str]]] = {}
        progress = Progress("calibrate auto", total=len(AUTO_METHODS), unit="method")
        for i, method in enumerate(AUTO_METHODS):
            candidate = table.copy()
            notes = self._set_qparams(candidate, stream.observers, graph, method, placement)
            scoring = scoring or _ScoringGraph(model, graph, candidate)
            score = _score(scoring, candidate, stream, ctx.providers, scorer, method)
            tried[method] = (score, candidate, notes)
            progress.update(i + 1)
        progress.close()
        best = _auto_choice({m: tried[m][0] for m in AUTO_METHODS}, scorer.margin)
        scores = ", ".join(f"{m} {scorer.show(tried[m][0])}" for m in AUTO_METHODS)
        samples = sum(samples_in(feed, model) for feed in stream.kept)
        note = (f"method auto: {scorer.label} on {len(stream.kept)} calibration batch(es) "
                f"({samples} samples) {scores}: {best} kept")
        log.info("%s", note)
        ctx.report.setdefault("calibrate", {})["auto_chose"] = best  # emit's advice reads it
        score, chosen, notes = tried[best]
        gated = {t for t, (sqnr, _) in placement.items() if sqnr < self.options.min_sqnr_db}
        if gated and self.options.check_min_sqnr:
            score, chosen, notes = self._check_gate(
                table, gated, placement, (score, chosen, notes), best, graph, stream, ctx,
                scorer, scoring)
        return chosen, [note, *notes], score, scoring

    def _check_gate(self, table: QuantTable, gated: set[str],
                    placement: dict[str, tuple[float, str]],
                    kept: tuple[float, QuantTable, list[str]], method: str, graph: gs.Graph,
                    stream: _Stream, ctx: PassContext, scorer: _Scorer,
                    scoring: _ScoringGraph) -> tuple[float, QuantTable, list[str]]:
        """Method auto's ``kept`` choice (score, table, notes), whose ``gated`` activations
        min_sqnr_db keeps float, against the same method on ``table`` (as insert-qdq left
        it) with those quantized too: the
        float ones stay float only if that scores better by more than the margin (magika's
        1-D conv input, 24.2 dB alone: quantized, its labels agree more often with the float
        model's, and the conv runs as an integer kernel, 0.86x -> 2.3x FP32 speed)."""
        score, chosen, notes = kept
        ungated = {t: ((math.inf, m) if t in gated else (s, m))
                   for t, (s, m) in placement.items()}
        table_all = table.copy()
        all_notes = self._set_qparams(table_all, stream.observers, graph, method, ungated)
        all_score = _score(scoring, table_all, stream, ctx.providers, scorer,
                           f"{method} with the min_sqnr_db activations quantized")
        names = ", ".join(f"'{t}'" for t in sorted(gated)[:3]) + (
            f" and {len(gated) - 3} more" if len(gated) > 3 else "")
        quantized = sum(table_all.get(t).quantized for t in gated)
        traded = ""
        if score > all_score + scorer.margin:
            # auto_metric's units are the user's: no exchange rate applies to them
            rate = self.options.auto_speed_db if scorer.function is None else 0.0
            speedup, timed = 0.0, ""
            if rate and score - all_score - scorer.margin <= latency.speed_db(MAX_SPEEDUP, rate):
                speedup = self.options.min_sqnr_speedup
                if speedup:
                    timed = f"; quantized it runs {speedup:.2f}x the speed (min_sqnr_speedup)"
                else:
                    speedup = self._speedup(scoring, chosen, table_all, stream, ctx)
                    self._pinned["min_sqnr_speedup"] = speedup
                    timed = f"; quantized it runs {speedup:.2f}x the speed"
            elif rate:
                timed = (f"; not timed: at auto_speed_db {rate:g} per 2x the loss needs more "
                         f"than {MAX_SPEEDUP:g}x the speed")
            credit = latency.speed_db(speedup, rate) if speedup > 1 else 0.0
            if score > all_score + scorer.margin + credit:
                note = (f"min_sqnr_db keeps {len(gated)} activation(s) float ({names}): "
                        f"{scorer.show(score)} against {scorer.show(all_score)} with them "
                        f"quantized too{timed}; kept float")
                log.info("%s", note)
                return score, chosen, [*notes, note]
            given = "; the speedup min_sqnr_speedup's" if self.options.min_sqnr_speedup else ""
            traded = (f", {scorer.show(score - all_score)} less for {speedup:.2f}x the speed "
                      f"(auto_speed_db {self.options.auto_speed_db:g} per 2x{given})")
        for t in gated:
            entry = table_all.get(t)
            if entry.quantized:
                entry.reason += (f"; below min_sqnr_db {self.options.min_sqnr_db:g} alone "
                                 f"({placement[t][0]:.1f} dB), but quantizing it scores "
                                 f"{scorer.show(all_score)} against {scorer.show(score)} "
                                 f"float{traded}: quantized")
        note = (f"min_sqnr_db would keep {len(gated)} activation(s) float ({names}), but "
                f"with them quantized too {method} scores {scorer.show(all_score)} against "
                f"{scorer.show(score)} (margin {scorer.margin:g}{traded}): {quantized} "
                f"quantized")
        log.info("%s", note)
        return all_score, table_all, [*all_notes, note]

    def _speedup(self, scoring: _ScoringGraph, chosen: QuantTable, table_all: QuantTable,
                 stream: _Stream, ctx: PassContext) -> float:
        """How many times faster the graph runs with the min_sqnr_db activations quantized
        (``table_all``) than float (``chosen``): their deploy graphs timed side by side in
        onnxruntime on the first scoring batch (:mod:`graphq.latency`)."""
        # deploy_graph exports a new proto before the next scoring.model call patches the
        # scoring graph in place
        graphs = [deploy_graph(scoring.model(table))[0] for table in (chosen, table_all)]
        log.info("calibrate auto: timing the min_sqnr_db activations float and quantized")
        feed = ctx.split(stream.kept[0], graphs[0], PLAIN_SHARE / len(graphs))[0]
        float_s, quantized_s = latency.medians(graphs, feed, ctx.providers)
        return float_s / quantized_s

    def _observer(self, entry: TensorQuant) -> O.Observer:
        o = self.options
        if o.method == "minmax":
            return O.make_observer("minmax")
        sample = o.sample or None  # 0: every value
        if o.method == "auto":  # every method's range from one histogram (entropy's bins)
            return O.HistogramObserver(o.bins or O.EntropyObserver.DEFAULT_BINS, sample)
        hist = {"sample": sample, **({"bins": o.bins} if o.bins is not None else {})}
        if o.method == "percentile":
            return O.make_observer("percentile", percentile=o.percentile,
                                   symmetric=entry.symmetric, **hist)
        return O.make_observer(o.method, qtype=entry.dtype, symmetric=entry.symmetric, **hist)

    def _set_qparams(self, table: QuantTable, observers: dict[str, O.Observer],
                     graph: gs.Graph, method: str | None = None,
                     best: dict[str, tuple[float, str]] | None = None) -> list[str]:
        """Scales and zero points from the observers' clip ranges by ``method`` (default: the
        option's; ``auto`` passes each of its candidates, with ``best``, the
        :meth:`_placement_sqnr` they share)."""
        notes: list[str] = []
        method = method or self.options.method
        if best is None:
            best = self._placement_sqnr(table, observers) if self.options.method == "auto" else {}
        fallbacks = 0
        for entry in table.quantized("activation"):
            if entry.tensor in observers:
                self._from_observer(entry, observers[entry.tensor], notes, method,
                                    best.get(entry.tensor))
                fallbacks += entry.quantized and entry.tensor in best and entry.method != method
        if fallbacks:
            notes.append(f"{fallbacks} activation(s) took {AUTO_METHODS[0]}'s clip range: "
                         f"{method}'s would keep less than min_sqnr_db of them")
        _follow_sources(table)
        _keep_mixed_concats_float(graph, table, notes)
        _follow_sources(table)
        return notes

    def _placement_sqnr(self, table: QuantTable, observers: dict[str, O.Observer]
                        ) -> dict[str, tuple[float, str]]:
        """Method auto: each histogram-observed activation's expected SQNR at the clip range of
        the reference method (percentile, the first candidate). ``min_sqnr_db`` judges it
        there for every candidate, so all are scored on the same integer placement: a method
        that clips harder would otherwise keep more tensors float and win the comparison by
        quantizing less, at the speed of the float islands it leaves (YOLOv8n: entropy won
        at 1.2x the float model's speed and F1 0.79, percentile's placement runs 1.95x)."""
        if self.options.min_sqnr_db <= 0:
            return {}
        reference = AUTO_METHODS[0]
        found: dict[str, tuple[float, str]] = {}
        for entry in table.quantized("activation"):
            obs = observers.get(entry.tensor)
            if isinstance(obs, O.HistogramObserver) and obs.count and not obs.nonfinite:
                lo, hi = self._clip_range(obs, entry, reference)
                found[entry.tensor] = (obs.sqnr_db(lo, hi, entry.dtype, entry.symmetric),
                                       reference)
        return found

    def _clip_range(self, obs: O.Observer, entry: TensorQuant, method: str) -> O.Range:
        """``obs``'s clip range by ``method``: its own, or from auto's plain histogram."""
        if self.options.method != "auto":
            return obs.range()
        if method == "percentile":
            return obs.percentile(self.options.percentile, entry.symmetric)
        if method == "entropy":
            return obs.entropy(entry.dtype, entry.symmetric)
        if method == "mse":
            return obs.mse(entry.dtype, entry.symmetric)
        return obs.range()  # minmax

    def _from_observer(self, entry: TensorQuant, obs: O.Observer, notes: list[str],
                       method: str, best: tuple[float, str] | None = None) -> None:
        def keep_float(reason: str) -> None:
            entry.quantized, entry.reason = False, reason
            notes.append(f"'{entry.tensor}' {reason}")

        if obs.nonfinite:
            keep_float(f"held {obs.nonfinite} non-finite values (inf/nan) in the calibration "
                       "data: kept float")
            return
        if obs.count == 0:
            keep_float("no values were observed (inside an If branch, one that no calibration "
                       "batch took): kept float; calibrate on data that takes it")
            return
        lo, hi = self._clip_range(obs, entry, method)
        entry.range = [float(lo), float(hi)]
        if best is not None:  # auto: judged at the reference method's range for every method
            if best[0] < self.options.min_sqnr_db:
                keep_float(f"{entry.dtype} would keep only {best[0]:.1f} dB of it (at "
                           f"{best[1]}'s clip range, which places the activations for every "
                           f"method auto tries; min_sqnr_db {self.options.min_sqnr_db:g}): "
                           "kept float")
                return
            if method != best[1] and obs.sqnr_db(lo, hi, entry.dtype, entry.symmetric) < \
                    self.options.min_sqnr_db:
                # this method's clip loses what the reference's holds (entropy's KL threshold
                # on a spike at zero): the reference's range
                method = best[1]
                lo, hi = self._clip_range(obs, entry, method)
                entry.range = [float(lo), float(hi)]
        elif self.options.min_sqnr_db > 0 and isinstance(obs, O.HistogramObserver):
            sqnr = obs.sqnr_db(lo, hi, entry.dtype, entry.symmetric)
            if sqnr < self.options.min_sqnr_db:
                keep_float(f"{entry.dtype} would keep only {sqnr:.1f} dB of it (range "
                           f"[{lo:.4g}, {hi:.4g}]; min_sqnr_db {self.options.min_sqnr_db:g}): "
                           "kept float")
                return
        scale, zero = Q.qparams(lo, hi, Q.qtype(entry.dtype), entry.symmetric)
        entry.scale, entry.zero_point = [float(scale)], [int(zero)]
        entry.method = method


def _segment_search(masked: onnx.ModelProto, mask_name: str, pairs: dict[str, int],
                    count: int, feeds: list[dict[str, np.ndarray]],
                    score: Callable[[np.ndarray], float], target_db: float, limit: int,
                    providers: list[str]) -> tuple[S.Result, dict[int, str], int]:
    """The sensitivity search ranked by segment (:mod:`graphq.segments`): each compute op's
    output SQNR with only its input segment's activations quantized, then whole segments
    kept float, worst first, as few as reach ``target_db``. Returns the result, each float
    unit's reason, and how many segments were scored."""
    baseline = score(np.ones(count, np.float32))
    if baseline >= target_db:  # met already: no segment needs scoring
        return S.Result(baseline, baseline, [], runs=1), {}, 0
    segments = SEG.find(masked, pairs, mask_name)
    local = SEG.local_scores(masked, mask_name, count, segments, feeds, providers)
    ranked = sorted(local, key=lambda i: local[i])
    result = SEG.search_groups(score, count, [segments[i].units for i in ranked], target_db,
                               limit, baseline)
    result.runs += 1
    chosen = set(result.floats)
    reasons: dict[int, str] = {}
    for i in ranked:
        for unit in segments[i].units:
            if unit in chosen and unit not in reasons:
                reasons[unit] = (
                    f"kept float by the sensitivity search: with only the activations between "
                    f"{segments[i].where} and the compute ops before it quantized, its output "
                    f"keeps {local[i]:.1f} dB (the lowest such segments are kept float first)")
    return result, reasons, len(local)


def _auto_choice(scores: dict[str, float], margin_db: float) -> str:
    """The method of the best score (ties: the earlier in :data:`AUTO_METHODS`); the first
    method (percentile) unless the best beats it by more than ``margin_db``."""
    best = max(AUTO_METHODS, key=lambda m: scores[m])
    first = AUTO_METHODS[0]
    return best if scores[best] > scores[first] + margin_db else first


def _score(scoring: _ScoringGraph, table: QuantTable, stream: _Stream,
           providers: list[str], scorer: _Scorer, what: str) -> float:
    """``scorer``'s score of the graph quantized by ``table`` (``scoring``'s graph, patched)
    against the float outputs the stream kept (``what``: the candidate, for error messages)."""
    sess = runtime.session(scoring.model(table), providers)
    outs = [runtime.run(sess, feed) for feed in stream.kept]
    return scorer(stream.reference, outs, what)


def placement_scores(reference: onnx.ModelProto, placements: list[onnx.ModelProto],
                     feeds: list[Feed], ctx: PassContext) -> list[float]:
    """The worst output SQNR (dB; each part of a concatenated output apart) against the float
    ``reference`` on ``feeds`` of each of ``placements``: insert-qdq's graphs of one model,
    each quantizing a subset of the first's activations (a longer float prefix), all
    calibrated alike: the first by this pass (percentile) on ``feeds``, each with those
    scales for the activations it quantizes. insert-qdq's float_prefix_search weighs the
    prefixes it timed by these scores."""
    first = Calibrate().run(placements[0], dataclasses.replace(ctx, data=DataSource(feeds)))
    calibrated = QuantTable.required(first.model, "calibrate", "placement_scores")
    scorer = _Scorer(reference, 0.0)
    runs = [piece for feed in feeds for piece in ctx.split(feed, reference, PLAIN_SHARE / 2)]

    def outputs(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
        sess = runtime.session(model, ctx.providers)
        return [runtime.run(sess, feed) for feed in runs]

    expected = outputs(reference)
    scores = []
    for i, placed in enumerate(placements):
        table = _with_scales(QuantTable.required(placed, "insert-qdq", "placement_scores"),
                             calibrated)
        scoring = _ScoringGraph(placed, G.import_graph(placed), table)
        scores.append(scorer(expected, outputs(scoring.model(table)),
                             f"float prefix placement {i}"))
    return scores


def _with_scales(table: QuantTable, calibrated: QuantTable) -> QuantTable:
    """``table`` (another placement's, from insert-qdq) with the activation scales of
    ``calibrated``: an activation it has none for stays float. In place; returns it."""
    for entry in table.quantized("activation"):
        if _shared_source(entry) is not None or entry.fixed:
            continue
        source = calibrated.get(entry.tensor)
        if source is None or not source.quantized:
            entry.quantized, entry.scale, entry.zero_point = False, None, None
        else:
            entry.scale, entry.zero_point = source.scale, source.zero_point
            entry.range = source.range
    _follow_sources(table)
    return table


class _ScoringGraph:
    """The quantized graph that method auto scores each candidate table on: built once
    (graph copy, Q/DQ pairs kept float removed, int32 biases, export: half of a scoring run
    on YOLOv8n), then each table's activation scales and zero points and the int32 biases
    they imply are written into its initializers. A table that places the pairs otherwise
    (another set of quantized activations, a bias that no longer fits int32) or a graph
    whose initializers cannot be found by name is built again.

    The float biases are read from ``graph`` at each call (bias correction changes them)."""

    def __init__(self, model: onnx.ModelProto, graph: gs.Graph, table: QuantTable) -> None:
        self.source, self.graph = model, graph
        names = Counter(n.name for n in G.nodes(graph))  # unnamed or twice: not found by name
        self.nodes = {n.name: n for n in G.nodes(graph) if names[n.name] == 1}
        self._build(table)

    @staticmethod
    def _placement(table: QuantTable) -> frozenset[str]:
        return frozenset(e.tensor for e in table.quantized("activation"))

    def _build(self, table: QuantTable) -> None:
        view = self.graph.copy()
        _apply(view, table)
        self.pairs = {t: (q.inputs[1].name, q.inputs[2].name, Q.qtype(table.entries[t].dtype))
                      for t, (q, _) in G.qdq_pairs(view, nested=True).items()
                      if t in table.entries and table.entries[t].role == "activation"}
        sites = bias_sites(view)
        quantize_biases(view, table.copy())
        self.sites = []  # (op name, its input's float tensor, weight scale, int32, scale names)
        for site in sites:
            dq = site.node.inputs[2].inputs[0] if site.node.inputs[2].inputs else None
            if dq is not None and dq.op == "DequantizeLinear":
                self.sites.append((site.node.name, site.source, site.weight_scale,
                                   dq.inputs[0].name, dq.inputs[1].name))
        self.key = (self._placement(table), self._fits(table))
        self.proto = G.export(view.cleanup().toposort(), like=self.source)
        inits = {t.name: t for g in G.graph_protos(self.proto.graph) for t in g.initializer}
        wanted = [n for s, z, _ in self.pairs.values() for n in (s, z)]
        wanted += [n for *_, ints, scale in self.sites for n in (ints, scale)]
        self.patchable = (len(self.nodes) == len(G.nodes(self.graph))  # names unique
                          and all(n in inits for n in wanted)
                          and len(sites) == len(self.sites)
                          and not any(qt.bits == 4 for *_, qt in self.pairs.values()))
        self.inits = inits

    def _bias(self, name: str) -> np.ndarray | None:
        node = self.nodes.get(name)
        return None if node is None else G.constant_values(node.inputs[2])

    def _input_scale(self, table: QuantTable, source: str) -> float | None:
        entry = table.entries.get(source)
        return None if entry is None or not entry.quantized else entry.scale[0]

    def _fits(self, table: QuantTable) -> tuple[bool, ...]:
        """For each bias site whose input is still quantized: whether it fits int32."""
        fits = []
        for name, source, s_w, *_ in self.sites:
            bias, s_in = self._bias(name), self._input_scale(table, source)
            fits.append(bias is not None and s_in is not None and
                        Q.bias_fits_int32(bias, s_in, s_w))
        return tuple(fits)

    def model(self, table: QuantTable) -> onnx.ModelProto:
        """The graph quantized by ``table``."""
        if not self.patchable or (self._placement(table), self._fits(table)) != self.key:
            self._build(table)
            return self.proto
        for tensor, (scale, zero, qt) in self.pairs.items():
            entry = table.entries[tensor]
            self._write(scale, np.asarray(entry.scale[0], np.float32))
            self._write(zero, np.asarray(entry.zero_point[0]).astype(qt.storage))
        for name, source, s_w, ints, scale in self.sites:
            q, s = Q.bias_int32(self._bias(name), self._input_scale(table, source), s_w)
            self._write(ints, np.asarray(q, np.int32))
            self._write(scale, np.broadcast_to(np.asarray(s, np.float32), q.shape).copy())
        return self.proto

    def _write(self, name: str, values: np.ndarray) -> None:
        self.inits[name].CopyFrom(onnx.numpy_helper.from_array(values, name))


class _Scorer:
    """How method auto and its bias-correction check rank a quantized graph on the kept
    batches: by default the worst output SQNR against the float graph (dB; auto keeps
    percentile unless another beats it by ``margin`` dB), or the user's ``auto_metric``
    ``function(reference, quantized) -> number`` (higher better, no margin)."""

    def __init__(self, model: onnx.ModelProto, margin_db: float,
                 function: Callable[..., object] | None = None, name: str = "") -> None:
        self.parts = G.output_parts(model)
        self.function = function
        self.label = f"auto_metric {name}" if function else "worst output SQNR"
        self.margin = 0.0 if function else margin_db

    def show(self, value: float) -> str:
        return f"{value:.6g}" if self.function else f"{value:.1f} dB"

    def __call__(self, reference: list[dict[str, np.ndarray]],
                 outs: list[dict[str, np.ndarray]], what: str) -> float:
        if self.function is None:
            return S.worst_sqnr(reference, outs, self.parts)
        try:
            value = self.function(reference, outs)
        except Exception as exc:  # noqa: BLE001 -- the user's code: name it, keep the cause
            raise PassError(f"calibrate {self.label} failed on {what}: "
                            f"{type(exc).__name__}: {exc}") from exc
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise PassError(f"calibrate {self.label} returned {value!r} on {what}: it must "
                            "return a finite number, higher meaning better")
        return number


def _scorer(model: onnx.ModelProto, options: CalibrateOptions, ctx: PassContext) -> _Scorer:
    """The :class:`_Scorer` of the options: ``auto_metric`` loaded, ``'module:function'`` by
    import, ``'file.py:function'`` from that file (relative to the pipeline file). A name,
    not a Python callable, so that the pipeline file a run writes reproduces the run."""
    spec = options.auto_metric
    if not spec:
        return _Scorer(model, options.auto_margin_db)
    where, sep, name = spec.rpartition(":")
    fix = ("give 'module:function' (an importable module) or 'path/to/file.py:function' "
           "(relative to the pipeline file)")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"calibrate auto_metric '{spec}' is not 'module:function' or "
                          f"'file.py:function'; {fix}")
    try:
        if where.endswith(".py"):
            path = ctx.path(where)
            if not path.is_file():
                raise ConfigError(f"calibrate auto_metric '{spec}': no file {path}; {fix}")
            loaded = importlib.util.spec_from_file_location(f"graphq_auto_metric_{path.stem}",
                                                            path)
            assert loaded is not None and loaded.loader is not None
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- an import error of the user's module
        raise ConfigError(f"calibrate auto_metric '{spec}': loading '{where}' failed: "
                          f"{type(exc).__name__}: {exc}; {fix}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"calibrate auto_metric '{spec}': '{where}' has no function "
                          f"'{name}'; {fix}")
    return _Scorer(model, options.auto_margin_db, function, f"'{spec}'")


def _check_rounding(model: onnx.ModelProto, graph: gs.Graph, table: QuantTable,
                    stream: _Stream, rounded: Rounded, corrected: list[gs.Node],
                    originals: dict[int, np.ndarray], providers: list[str], scorer: _Scorer
                    ) -> tuple[bool, list[str]]:
    """Keep the GPTQ-rounded weights (fitted on every other search batch) only if the graph
    (activations by ``table``) scores at least as well with them as with nearest rounding on
    the other search batches; otherwise the graph gets the nearest-rounded weights, the
    biases of ``corrected`` corrected for their error. Returns whether they were kept, and
    the notes.

    Scored on the batches it was fitted to, the rounding wins where it only fits them: PP-OCR
    cls's 10 calibration crops scored 22.8 dB with it against 19.1 nearest, held out 15.7
    against 19.3. Measured with the same activation scales on 6 nets, scoring on the other
    batches picked the better of the two held out on all 6, scoring on the fitted ones on 4.
    Run before auto picks a clip method: picked with the rounded weights in place, the method
    stayed when the rounding was undone."""
    half = dataclasses.replace(stream, kept=stream.kept[1::2],
                               reference=stream.reference[1::2])
    where = f"{len(half.kept)} search batches it was not fitted to"
    with_it = _score(_ScoringGraph(model, graph, table), table, half, providers, scorer,
                     "the graph with GPTQ's rounding")
    kept_biases = _biases(corrected)
    rounded.use(False, table)
    _put_biases(corrected, originals)
    nearest_notes = _correct_biases(corrected, table, stream.means) if corrected else []
    without = _score(_ScoringGraph(model, graph, table), table, half, providers, scorer,
                     "the graph with its weights rounded to nearest")
    now, other = scorer.show(with_it), scorer.show(without)
    if without > with_it:
        note = (f"weight rounding undone: the {scorer.label} on the {where} is {other} with "
                f"nearest rounding, {now} with GPTQ's (percentile ranges)")
        log.info("%s", note)
        return False, [note, *nearest_notes]
    rounded.use(True, table)
    _put_biases(corrected, kept_biases)
    note = (f"weight rounding kept: {scorer.label} on the {where} {now} with GPTQ's, {other} "
            "with nearest rounding (percentile ranges)")
    log.info("%s", note)
    return True, [note]


def _biases(nodes: list[gs.Node]) -> dict[int, np.ndarray]:
    """The constant biases of Conv / Gemm ``nodes``, by node id."""
    return {id(n): n.inputs[2].values for n in nodes}


def _put_biases(nodes: list[gs.Node], values: dict[int, np.ndarray]) -> None:
    for n in nodes:
        n.inputs[2].values = values[id(n)]


def _check_correction(scoring: _ScoringGraph, table: QuantTable,
                      stream: _Stream, score: float, nodes: list[gs.Node],
                      originals: dict[int, np.ndarray], providers: list[str],
                      scorer: _Scorer) -> list[str]:
    """Keep the corrected biases only if the graph scores at least as well with them as with
    the original ones (``score``: with them). The correction takes every input position of a
    Conv to see the channel's mean; on short sequences, where zero padding covers much of the
    input, it can overshoot (silero VAD's 1-D convs: 30.2 -> 21.7 dB)."""
    corrected = _biases(nodes)
    _put_biases(nodes, originals)
    without = _score(scoring, table, stream, providers, scorer,
                     "the graph without bias correction")
    now, other = scorer.show(score), scorer.show(without)
    if without > score:
        note = (f"bias correction undone: the {scorer.label} on the search batches is {other} "
                f"without it, {now} with it")
    else:
        _put_biases(nodes, corrected)
        note = (f"bias correction kept: {scorer.label} on the search batches {now} with it, "
                f"{other} without")
    log.info("%s", note)
    return [note]


def _correctable(graph: gs.Graph, table: QuantTable) -> list[gs.Node]:
    """Conv and Gemm nodes (alpha = beta = 1, transA = 0) whose weight the table quantized
    and whose float constant bias no other node reads."""
    out = []
    for node in G.nodes(graph):
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3:
            continue
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or
                                  float(node.attrs.get("alpha", 1.0)) != 1.0 or
                                  float(node.attrs.get("beta", 1.0)) != 1.0):
            continue
        bias, weight = node.inputs[2], table.get(G.float_source(node.inputs[1]).name)
        if (isinstance(bias, gs.Constant) and len(bias.outputs) == 1 and bias.values.ndim == 1
                and weight is not None and weight.role == "weight" and weight.quantized):
            out.append(node)
    return out


def _correct_biases(nodes: list[gs.Node], table: QuantTable,
                    means: dict[str, O.ChannelMean]) -> list[str]:
    """Bias correction: ``b -= (W_q - W) . E[x]`` per output channel
    (:func:`graphq.kernels.quant.bias_shift`), ``E[x]`` the input's per-channel mean on the
    calibration data (zero padding at borders is not modelled)."""
    count = 0
    for node in nodes:
        mean = means[G.float_source(node.inputs[0]).name].mean()
        source = G.float_source(node.inputs[1])
        w, entry = G.constant_values(source), table.get(source.name)
        if mean is None or w is None:
            continue
        wq = Q.fake_quantize(w, np.asarray(entry.scale), np.asarray(entry.zero_point),
                             entry.dtype, axis=entry.axis)
        if node.op == "Gemm" and not node.attrs.get("transB", 0):
            w, wq = w.T, wq.T  # (N, K), as a Conv weight is (out, in)
        shift = Q.bias_shift(w, wq, mean, int(node.attrs.get("group", 1)))
        bias = node.inputs[2].values
        if shift is None or shift.shape != bias.shape:
            continue
        node.inputs[2].values = (bias - shift).astype(bias.dtype)
        count += 1
    note = (f"bias correction: {count} of {len(nodes)} Conv/Gemm biases less the mean their "
            "weight's quantization error adds on the calibration data")
    log.info("%s", note)
    return [note]


def _derived_concats(graph: gs.Graph, observed: set[str], fetched: set[str]
                     ) -> dict[str, list[str]]:
    """Observed Concat outputs (of the main graph) whose every input's float source is
    observed too, each with those sources, in graph order. A Concat's values are its inputs'
    values, so its statistics are theirs merged (min, max, counts exactly; a histogram up to
    one cell of the coarser grid): the output need not leave the session, which saves
    onnxruntime copying it out of its blocked layout and the observer a pass over it
    (DenseNet's concatenations are its largest tensors). ``fetched``: tensors fetched anyway
    (bias correction's means), observed directly."""
    derived: dict[str, list[str]] = {}
    for node in graph.nodes:
        out = node.outputs[0].name if node.op == "Concat" and node.outputs else None
        if out not in observed or out in fetched:
            continue
        sources = [G.float_source(t).name for t in node.inputs]
        if sources and all(s in observed and s != out for s in sources):
            derived[out] = sources
    return derived


def _score_sources(model: onnx.ModelProto, graph: gs.Graph, scorer: _Scorer) -> list[str]:
    """Outputs computed through a selection (an end-to-end detector's TopK) are scored on the
    tensors the selection reads instead (:func:`graphq.graph.selection_sources`): ``graph``'s
    outputs are those while the search runs (the caller puts the given ones back), and
    ``scorer`` judges the parts of theirs that concatenate ranges. A note each."""
    found = {out: ts for out, ts in G.selection_sources(graph).items() if ts}
    if not found:  # none, or the selection reads nothing of the graph's: the output scores
        return []
    sources = list({t.name: t for ts in found.values() for t in ts}.values())
    graph.outputs = [o for o in graph.outputs if o.name not in found] + sources
    scorer.parts = G.output_parts(G.with_outputs(model, [t.name for t in sources]))
    notes = []
    for out, ts in found.items():
        names = ", ".join(f"'{t.name}'" for t in ts) or "none"
        notes.append(f"output '{out}' is selected by TopK/ArgMax/NonMaxSuppression (its rows "
                     f"follow the order of close scores): the search scores the tensors it "
                     f"selects from instead: {names}")
        log.info("%s", notes[-1])
    return notes


class _RunFailed(Exception):
    """onnxruntime failed on ``feed`` (:func:`_run_ahead`)."""

    def __init__(self, feed: dict[str, np.ndarray], error: BaseException) -> None:
        super().__init__(str(error))
        self.feed, self.error = feed, error


def _run_ahead(sess, names: list[str], feeds: Iterable[dict[str, np.ndarray]]
               ) -> Iterator[list[np.ndarray]]:
    """``sess.run(names, feed)`` for each feed, the next batch running (and its feed being
    read) on a worker thread while the caller observes the current one: onnxruntime
    releases the GIL, so its threads and the observers' numpy work overlap. At most two
    batches of outputs are alive at once."""
    with ThreadPoolExecutor(1, thread_name_prefix="graphq-calibrate") as pool:
        feeds = iter(feeds)

        def next_run() -> list[np.ndarray] | None:
            feed = next(feeds, None)
            if feed is None:
                return None
            try:
                return sess.run(names, feed)
            except GraphqError:
                raise
            except Exception as exc:  # noqa: BLE001 - onnxruntime's, raised for this feed
                raise _RunFailed(feed, exc) from exc

        pending = pool.submit(next_run)
        while True:
            values = pending.result()
            if values is None:
                return
            pending = pool.submit(next_run)
            yield values


#: a Concat whose inputs' ranges differ by more than this keeps its output float.
MIXED_RANGE_RATIO = 16.0


def _keep_mixed_concats_float(graph: gs.Graph, table: QuantTable, notes: list[str]) -> None:
    """One scale over inputs of very different ranges (box coordinates 0..320 beside class
    scores 0..1) erases the narrow ones: such a Concat keeps its output float; its inputs
    stay quantized, each with its own scale."""
    for node in [n for n in G.nodes(graph) if n.op == "Concat"]:
        out = table.get(node.outputs[0].name)
        if out is None or not out.quantized:
            continue
        floats = [t.name for t in node.inputs if G.constant_values(t) is None and not (
            (e := table.get(G.float_source(t).name)) is not None and e.quantized)]
        if floats and not _feeds_compute(node.outputs[0]):
            out.quantized = False
            out.scale = out.zero_point = None
            out.reason = (f"Concat '{node.name}' has a float input ('{floats[0]}'): it runs in "
                          "float, no integer op reads its output, and one scale over it would "
                          "only round the float input's values (a detector's class logits "
                          "beside its box terms)")
            notes.append(f"'{out.tensor}' {out.reason}")
            _follow_sources(table)  # what shares its scale is float now too
            continue
        spans = []
        for t in node.inputs:
            entry = table.get(G.float_source(t).name)
            if entry is not None and entry.range is not None:
                spans.append(entry.range[1] - entry.range[0])
        if len(spans) < 2 or min(spans) <= 0:
            continue
        ratio = max(spans) / min(spans)
        if ratio > MIXED_RANGE_RATIO:
            out.quantized = False
            out.scale = out.zero_point = None
            out.reason = (f"Concat '{node.name}' joins inputs whose ranges differ {ratio:.0f}x "
                          f"(more than {MIXED_RANGE_RATIO:g}x): one scale would erase the "
                          "narrow ones, so the concatenation stays float")
            notes.append(f"'{out.tensor}' {out.reason}")


def _feeds_compute(tensor: gs.Tensor) -> bool:
    """Whether a compute op (Conv, Gemm, MatMul, ...) reads ``tensor``, through Q/DQ pairs and
    pass-through ops (Reshape, Split, ...)."""
    seen, todo = set(), [tensor]
    while todo:
        t = todo.pop()
        for reader in t.outputs:
            if id(reader) in seen:
                continue
            seen.add(id(reader))
            if reader.op in COMPUTE:
                return True
            if reader.op in (*PASS_THROUGH, "QuantizeLinear", "DequantizeLinear"):
                todo.extend(reader.outputs)
    return False


def _keep_float(table: QuantTable, reasons: dict[str, str | None]) -> None:
    """Keep the activations ``reasons`` names float (with that reason, where not None), and
    the pass-through tensors that share a scale with them."""
    for tensor, reason in reasons.items():
        entry = table.entries[tensor]
        entry.quantized, entry.scale, entry.zero_point = False, None, None
        entry.reason = reason or entry.reason
    _follow_sources(table)


def _follow_sources(table: QuantTable) -> None:
    """Pass-through tensors (``shared:<source>``) take their source's qparams, or stay float
    with it."""
    for entry in table.quantized("activation"):
        source = _shared_source(entry)
        if source is None:
            continue
        origin = table.get(source)
        if origin is None or not origin.quantized:
            entry.quantized, entry.reason = False, f"its source '{source}' is float"
            continue
        entry.scale, entry.zero_point = origin.scale, origin.zero_point
        entry.range = origin.range


def _observed(table: QuantTable) -> list[TensorQuant]:
    """The activations that get their own statistics (not pass-through, not fixed)."""
    return [e for e in table.quantized("activation")
            if _shared_source(e) is None and not e.fixed]


def _shared_source(entry: TensorQuant) -> str | None:
    return entry.method.removeprefix("shared:") if entry.method.startswith("shared:") else None


def _apply(graph: gs.Graph, table: QuantTable) -> None:
    """Write the table's activation qparams into the graph; remove pairs kept float."""
    pairs = G.qdq_pairs(graph, nested=True)
    for entry in table.entries.values():
        if entry.role != "activation" or entry.tensor not in pairs:
            continue
        q, dq = pairs[entry.tensor]
        if not entry.quantized:
            G.replace_uses(graph, dq.outputs[0], q.inputs[0])
            continue
        qt = Q.qtype(entry.dtype)
        q.inputs[1].values = np.asarray(entry.scale[0], np.float32)
        q.inputs[2].values = np.asarray(entry.zero_point[0]).astype(qt.storage)
