"""emit: the deploy graph, the fake-quant graph, the quant record and the report.

- ``<stem>.fakequant.onnx``: the calibrated graph as it is: float weights behind Q/DQ pairs.
  It simulates the quantized model in any onnxruntime, and is what the QAT bridge reads.
- ``<stem>.deploy.onnx``: the same graph with every ``constant -> QuantizeLinear`` replaced by
  the integer initializer it computes (int8 or int4 weights, int32 biases) feeding its
  DequantizeLinear: about 4x smaller for int8, 8x for int4 (ONNX INT4, two weights a byte),
  and the form onnxruntime, TensorRT and vendor converters fuse into integer kernels. Its
  outputs equal the fake-quant graph's, since ``Q(w)`` is computed here exactly as
  QuantizeLinear computes it. ``format = "qoperator"`` refuses 4-bit weights: QLinearConv and
  QLinearMatMul take 8-bit integers only.
- ``quant_record.json``: the quantization table: every tensor, its dtype, scale, zero point,
  axis, method, and why it was or was not quantized.
- ``report.md`` (and a ``quantization`` section in ``report.json``): sizes, per-output cosine
  similarity and SQNR against the float input model on held-out data, the tensors with the
  worst SQNR, top-1/top-5 before and after when the data carries labels, and latency.

The files are handed to the pass manager, which writes them once every pass has succeeded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper, version_converter

from graphq import graph as G
from graphq import latency, metrics, qoperator, runtime
from graphq import model as model_io
from graphq.data import PLAIN_SHARE, DataSource, samples_in
from graphq.errors import DataError, PassError
from graphq.kernels import quant as Q
from graphq.passes.fold_bn import FOLDED_KEY
from graphq.progress import Progress
from graphq.quant import QuantTable
from graphq.registry import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@dataclass
class EmitOptions:
    format: Literal["qdq", "qoperator"] = field(default="qdq", metadata={
        "help": "deploy graph form: Q/DQ pairs, or QLinearConv/QLinearMatMul where the "
                "pattern is fully quantized"})
    eval_data: str | None = field(default=None, metadata={
        "help": "held-out data for the report (.npz; a 'label' array gives top-1/top-5), "
                "read in batches of the pipeline's [data] batch_size and [data.image] "
                "settings; default: the pipeline's data"})
    label_key: str = field(default="label", metadata={
        "help": "the array of the eval data that holds class labels"})
    eval_limit: int = field(default=512, metadata={
        "help": "samples of eval data used for the report", "min": 1})
    worst: int = field(default=20, metadata={"help": "tensors listed by worst SQNR", "min": 0})
    latency_runs: int = field(default=20, metadata={
        "help": "interleaved runs timing float vs deploy (0: no timing; fewer, at least 3, "
                "where they would take over 20 s)", "min": 0})
    warn_sqnr_db: float = field(default=15.0, metadata={
        "help": "warn (log, report, notes) when an output, or a part of a concatenated "
                "output, keeps less SQNR than this against the float model on the eval data"})
    require_sqnr_db: float = field(default=0.0, metadata={
        "help": "fail (exit 1, nothing written) when an output or output part keeps less "
                "SQNR than this; 0: never"})
    float_op_weights: Literal["float", "integer"] = field(default="float", metadata={
        "help": "the 8-bit weights (and biases) of Conv/Gemm/MatMul whose inputs stay float "
                "(no integer kernel runs them): 'float' stores their dequantized values "
                "(the same numbers; no DequantizeLinear on every run, 4x the bytes of those "
                "weights), 'integer' stores the integers and a DequantizeLinear"})


@register
class Emit(Pass):
    name = "emit"
    summary = "write deploy + fake-quant graphs, quant_record.json and the report"
    Options = EmitOptions
    preserves_semantics = False

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        table = QuantTable.required(model, "insert-qdq and calibrate", "emit")
        uncalibrated = [e.tensor for e in table.quantized() if not e.calibrated]
        if uncalibrated:
            raise PassError(f"{len(uncalibrated)} quantized tensors have no scale yet "
                            f"(e.g. '{uncalibrated[0]}'): run calibrate before emit")
        if self.options.format == "qoperator":
            _check_qoperator(table)
        counts: dict[str, int] = {}
        deploy, folded, floated = deploy_graph(model, self.options.float_op_weights, counts)
        counts = {"constants_folded_to_integers": folded, **counts}
        float_model = ctx.float_model()
        generators = constant_generators(deploy, float_model)
        regenerated = put_generators(deploy, generators)
        if regenerated:
            counts["constants_computed_again"] = len(regenerated)
            log.info("%d float constant(s) that canonicalize's folding stored and the model "
                     "computes at run time from far smaller constants computed so again in "
                     "the deploy graph ('%s'%s)", len(regenerated), regenerated[0],
                     f" and {len(regenerated) - 1} more" if len(regenerated) > 1 else "")
        if floated:
            counts["float_op_weights_stored_float"] = floated
            log.info("%d weight(s) of compute ops whose inputs stay float stored as their "
                     "dequantized float values (float_op_weights = \"float\")", floated)
        if self.options.format == "qoperator":
            deploy, counts["qlinear_ops"] = qoperator.convert(deploy)
        QuantTable.detach(deploy)
        model_io.drop_metadata(deploy, FOLDED_KEY)  # for the QAT bridge, which reads the fake-quant
        stem = ctx.stem
        ctx.artifacts[f"{stem}.fakequant.onnx"] = model
        ctx.artifacts[f"{stem}.deploy.onnx"] = deploy
        ctx.artifacts["quant_record.json"] = table.to_json()
        report = self._report(model, deploy, float_model, generators, table, ctx)
        for line in summary_lines(report):
            log.info("%s", line)
        four_bit = any(Q.qtype(e.dtype).bits < 8 for e in table.quantized("weight"))
        notes = self._judge(report, model, ctx.report.get("calibrate", {}))
        if not four_bit:
            notes += _judge_speed(report, deploy, ctx.providers)
        ctx.report["quantization"] = report
        ctx.artifacts["report.md"] = render_markdown(report)
        if four_bit:
            notes.append("4-bit weights: onnxruntime's CPU EP has no integer kernel for them, so "
                         "the deploy graph dequantizes them and runs Conv/Gemm/MatMul in float "
                         "on every run (slower than the float model there); its gains are size "
                         "and targets with 4-bit kernels")
        return PassResult(model, False, counts, notes)

    def _report(self, model: onnx.ModelProto, deploy: onnx.ModelProto,
                float_model: onnx.ModelProto, generators: dict[str, onnx.ModelProto],
                table: QuantTable, ctx: PassContext) -> dict[str, Any]:
        report: dict[str, Any] = {
            "size_bytes": {"float": model_io.serialized_size(float_model),
                           "deploy": model_io.serialized_size(deploy)},
            "tensors": {"quantized": len(table.quantized()),
                        "kept_float": sum(not e.quantized for e in table.entries.values())},
        }
        size = report["size_bytes"]
        if size["deploy"] > size["float"]:  # why: the float graph the passes made, in float
            view = G.with_outputs(model, [], float_view=True)
            put_generators(view, generators)  # as in the deploy graph
            size["float_passes"] = model_io.serialized_size(view)
        feeds, labels, where, samples = self._eval_feeds(float_model, ctx)
        if not feeds:
            report["fidelity"] = None
            return report
        report["eval_data"] = where
        report["eval_samples"] = samples
        selected, sources = _selection_sources(model, float_model, deploy)
        evaluated = G.with_outputs(float_model, sources) if sources else float_model
        # the float model, then the deploy graph, on each piece (minutes on a large model)
        progress = Progress("emit: measuring fidelity", total=2 * len(feeds), unit="run")
        ref = _run_all(evaluated, feeds, ctx.providers, progress)
        got = _run_all(G.with_outputs(deploy, sources) if sources else deploy, feeds,
                       ctx.providers, progress)
        progress.close()
        report["outputs"] = Q.output_fidelity(ref, got, G.output_parts(evaluated))
        for name in G.class_score_outputs(model):
            if name in report["outputs"]:  # read through an argmax: how often it agrees
                report["outputs"][name]["argmax_equal"] = metrics.top1(
                    [{name: r[name]} for r in ref], [{name: g[name]} for g in got])
        for key, fidelity in report["outputs"].items():
            if key.split("[")[0] in selected:
                fidelity["selected"] = True  # order-dependent: its sources are judged
        if selected:
            report["selected_outputs"] = selected
        if labels is not None:
            report["accuracy"] = _accuracy(ref, got, labels)
        report["worst_tensors"] = _worst_tensors(model, table, feeds[:WORST_BATCHES], ctx,
                                                 self.options.worst)
        report["worst_tensors_samples"] = sum(samples_in(f, float_model)
                                              for f in feeds[:WORST_BATCHES])
        if self.options.latency_runs:
            graphs = [float_model, deploy]
            if len(float_model.graph.input) > len(runtime.true_inputs(float_model)):
                # initializers listed as graph inputs (IR < 4 style): onnxruntime can neither
                # fold nor pre-pack them in the model as given, and canonicalize's graph
                # runs faster in float already; int8's own share is against that one
                graphs.append(G.with_outputs(model, [], float_view=True))
            feed = ctx.split(feeds[0], float_model, PLAIN_SHARE / len(graphs))[0]  # all alive
            log.info("emit: timing the float model and the deploy graph (%d interleaved "
                     "rounds on one sample)", self.options.latency_runs)
            sessions = [runtime.session(g, ctx.providers) for g in graphs]
            report["latency_ms"] = _latency(sessions, feed, self.options.latency_runs)
            report["latency_ms"]["samples"] = samples_in(feed, float_model)
        return report

    def _judge(self, report: dict[str, Any], model: onnx.ModelProto,
               calibrated: dict[str, Any] | None = None) -> list[str]:
        """Outputs below ``warn_sqnr_db``: a warning each (log, report, note); below
        ``require_sqnr_db``: a PassError. The advice is the sensitivity search, unless
        calibrate ran it already (``calibrated["search"]``, its summary): then what it did
        and what is left; for class scores, an auto_metric that reads their argmax, unless
        calibrate chose by one (``calibrated["auto_metric"]``)."""
        calibrated = calibrated or {}
        search = calibrated.get("search")
        chose, metric = calibrated.get("auto_chose"), calibrated.get("auto_metric")
        low = {k: f["sqnr_db"] for k, f in (report.get("outputs") or {}).items()
               if f["sqnr_db"] < max(self.options.warn_sqnr_db, self.options.require_sqnr_db)
               and not f.get("selected")}
        if not low:
            return []
        where = report.get("eval_data", "the eval data")
        shown = ", ".join(f"'{k}' {v:.1f} dB" for k, v in low.items())
        failed = {k: v for k, v in low.items() if v < self.options.require_sqnr_db} \
            if self.options.require_sqnr_db else {}  # 0: never (an SQNR can be negative)
        # what else may recover it: not the method auto kept already
        other = ("QAT (the qat pass)" if chose == "mse" or metric else
                 "method = \"mse\" or QAT (the qat pass)")
        advice = ("calibrate's target_sqnr_db = 20 keeps float the activations that cost the "
                  "outputs most (search_by = \"segment\": a few runs in all, and it sees the "
                  "error their weights amplify; on a preset: --set calibrate.target_sqnr_db=20 "
                  "--set calibrate.search_by=segment; calibrate.search_min_speedup=1 keeps it "
                  f"no slower than the float model); {other} may also recover it")
        if search is not None:
            ran = (f"calibrate's sensitivity search ran already (target_sqnr_db "
                   f"{search['target_sqnr_db']:g}, search_by \"{search['search_by']}\"): it "
                   f"kept {search['kept_float']} of {search['activations']} activations float "
                   f"for {search['final_db']:.1f} dB on its {search['batches']} batch(es)")
            if search["final_db"] >= search["target_sqnr_db"]:
                advice = (f"{ran}, more than here: these data differ from its batches, or "
                          "its batches are too few to stand for them; a higher "
                          "target_sqnr_db, more calibration data or QAT (the qat pass) may "
                          "recover it")
            else:
                advice = (f"{ran}, short of the target: keeping activations float is not "
                          "what recovers it here; method = \"mse\" or QAT (the qat pass) may")
        if failed:
            raise PassError(f"output SQNR against the float model below require_sqnr_db "
                            f"{self.options.require_sqnr_db:g} dB on {where}: {shown}; {advice}")
        graph = G.import_graph(model)
        bases = dict.fromkeys(k.split("[")[0] for k in low)  # a concatenated output's parts
        stepped = {k: ops for k in bases if (ops := G.steps_after_quantized(graph, k))}
        steps = "".join(
            f"; '{k}' is computed through {'/'.join(ops)} after its last quantized tensors: "
            "values near such a step flip with small errors, which its SQNR counts in full "
            "(judge it by the task: calibrate's auto_metric scores with your own function)"
            for k, ops in stepped.items())
        outputs = report["outputs"]
        scores = [k for k in low if "argmax_equal" in outputs[k]]
        if chose and not scores and not metric:
            steps += (f"; method auto kept {chose} by the worst output SQNR, which weighs every "
                      "value alike (a vocoder's hiss in its pauses counts for little): "
                      "calibrate's auto_metric = \"file.py:function\" has it choose by the "
                      "task's own measure (a HiFi-GAN vocoder's log-mel distance kept "
                      "percentile over the SQNR's mse: no hiss, the same SQNR)")
        if scores:
            agree = ", ".join(f"'{k}' at {outputs[k]['argmax_equal']:.1%}" for k in scores)
            steps += (f"; the argmax over the last axis of {agree} of positions as float's: "
                      "class scores (a Softmax over that axis) are read through an argmax, "
                      "which an SQNR does not weigh")
            steps += (f" (method auto chose by auto_metric '{metric}')" if metric else
                      ": where that is their use, let method auto choose by it, --set "
                      "calibrate.auto_metric=graphq.metrics:top1, or "
                      "graphq.metrics:ctc_greedy for a CTC recognizer's strings")
        warning = (f"low fidelity: output SQNR against the float model on {where}: {shown} "
                   f"(below warn_sqnr_db {self.options.warn_sqnr_db:g} dB): the int8 graph may "
                   f"not be usable{steps}; {advice}")
        log.warning("%s", warning)
        report.setdefault("warnings", []).append(warning)
        return [warning]

    def _eval_feeds(self, model: onnx.ModelProto, ctx: PassContext
                    ) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None, str, int]:
        """The eval batches (up to ``eval_limit`` samples), their labels when every batch has
        some, where they come from, and how many samples they hold."""
        o = self.options
        if o.eval_data is not None:
            path = ctx.path(o.eval_data)
            if not path.exists():
                raise DataError(f"emit eval_data not found: {path}")
            # in the pipeline data's batches: a model whose rows interact (ICLabel averages
            # its views over a batch) is measured as it was calibrated
            like = ctx.data if isinstance(ctx.data, DataSource) else None
            source = DataSource(path, batch_size=like.batch_size if like else 64,
                                image=like.image if like else None, labels=o.label_key)
            where = str(path)
        elif ctx.data is not None:
            source = ctx.data
            where = ("the calibration data (what the scales were fitted to: it can read far "
                     "better than held-out data; emit's eval_data = \"FILE\" measures on "
                     "held-out data)")
        else:
            return [], None, "", 0
        feeds, labels, total = [], [], 0
        batches = iter(source.labeled_feeds(model))
        for feed, label in batches:
            feeds += ctx.split(feed, model, PLAIN_SHARE)  # in order: labels stay in step
            labels.append(label)
            total += samples_in(feed, model)
            if total >= o.eval_limit:
                if next(batches, None) is not None:  # more data, not measured: say so
                    where += (f" (its first {len(labels)} batch(es): eval_limit "
                              f"{o.eval_limit} samples reached, the rest not measured; "
                              f"emit's eval_limit measures more)")
                break
        known = all(label is not None for label in labels)
        return feeds, np.concatenate(labels) if known and labels else None, where, total


def _run_all(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
             providers: list[str], progress: Progress) -> list[dict[str, np.ndarray]]:
    """The outputs of ``model`` on each feed, a step of ``progress`` each."""
    sess = runtime.session(model, providers)
    outputs = []
    for feed in feeds:
        outputs.append(runtime.run(sess, feed))
        progress.step()
    return outputs


def _selection_sources(model: onnx.ModelProto, float_model: onnx.ModelProto,
                       deploy: onnx.ModelProto) -> tuple[dict[str, list[str]], list[str]]:
    """Outputs of the fake-quant ``model`` computed through a selection (an end-to-end
    detector's TopK) -> the float tensors it selects from that the float and deploy graphs
    compute too (:func:`graphq.graph.selection_sources`), and those tensors, less the graph
    outputs: the report judges them instead."""
    found = G.selection_sources(G.import_graph(model))
    if not found:
        return {}, []
    made = [{o for n in m.graph.node for o in n.output} for m in (float_model, deploy)]
    selected = {out: [t.name for t in ts if all(t.name in names for names in made)]
                for out, ts in found.items()}
    selected = {out: names for out, names in selected.items() if names}  # else judged itself
    outputs = {o.name for o in float_model.graph.output}
    sources = [n for n in dict.fromkeys(n for ns in selected.values() for n in ns)
               if n not in outputs]
    return selected, sources


def deploy_graph(model: onnx.ModelProto, float_op_weights: str = "float",
                 counts: dict[str, int] | None = None) -> tuple[onnx.ModelProto, int, int]:
    """Replace each ``constant -> QuantizeLinear`` by the integers it computes; with
    ``float_op_weights = "float"``, the 8-bit (and wider) constants that only compute ops
    whose activations stay float read are stored as their dequantized float values
    (:func:`float_op_constants`); HardSigmoids on insert-qdq's fixed grid become saturating
    Adds (:func:`hard_sigmoid_adds`, their count in ``counts``). Returns the graph, the
    constants folded, those stored float."""
    graph = G.import_graph(model)
    folded = 0
    for q in [n for n in G.nodes(graph) if n.op == "QuantizeLinear"]:
        values = G.constant_values(q.inputs[0])
        if values is None:
            continue
        scale = G.constant_values(q.inputs[1])
        zero = G.constant_values(q.inputs[2])
        axis = q.attrs.get("axis", 1) if np.ndim(scale) == 1 else None
        qt = Q.qtype_of_storage(zero.dtype)  # int4 when the zero point is ONNX INT4
        ints = Q.quantize(values, scale, zero, qt, axis=axis)
        const = gs.Constant(q.outputs[0].name, Q.to_exact(ints, qt))
        G.replace_uses(graph, q.outputs[0], const)
        q.outputs.clear()
        folded += 1
    gathered_tables(graph)
    adds = hard_sigmoid_adds(graph)
    if counts is not None and adds:
        counts["hard_sigmoids_as_adds"] = adds
    floated = float_op_constants(graph) if float_op_weights == "float" else 0
    graph.cleanup().toposort()
    return G.export(graph, like=model), folded, floated


#: a float constant of the deploy graph computed again from what the input model computes it
#: from (:func:`constant_generators`): at least this many bytes ...
REGENERATE_BYTES = 16 * 1024
#: ... and this many times the bytes of the constants it is computed from
REGENERATE_RATIO = 4


def constant_generators(deploy: onnx.ModelProto, original: onnx.ModelProto
                        ) -> dict[str, onnx.ModelProto]:
    """Each float initializer of ``deploy`` that the input model ``original`` computes at run
    time from constants far smaller (at least :data:`REGENERATE_BYTES` and
    :data:`REGENERATE_RATIO` times theirs) -> the model of the nodes that compute it and the
    constants they read (from ``original``, converted to ``deploy``'s opset), where
    onnxruntime computes from them exactly the values stored. canonicalize's constant
    folding stores such tensors so that insert-qdq sees every weight, and where one stays
    float (a filter bank a MatMul reads in float) the deploy graph had grown by it: swift-f0
    builds 0.9 MB of 98%-zero filter banks from index constants with ConstantOfShape and
    ScatterElements, and its deploy graph was 7.6x the float model. :func:`put_generators`
    puts them in place (onnxruntime folds them again when a session loads the graph: no
    run-time cost)."""
    producers = {out: node for node in original.graph.node for out in node.output if out}
    weights = {t.name: t for t in original.graph.initializer}
    found: dict[str, onnx.ModelProto] = {}
    for tensor in deploy.graph.initializer:
        if tensor.name not in producers or tensor.name in weights \
                or tensor.data_type not in _FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(tensor)
        if values.nbytes < REGENERATE_BYTES:
            continue
        nodes, consts = _generator(tensor.name, producers, weights)
        if nodes is None or REGENERATE_RATIO * _stored_bytes(nodes, consts) > values.nbytes:
            continue
        built = _generator_model(tensor.name, nodes, consts, original, deploy, values)
        if built is not None:
            found[tensor.name] = built
    return found


def put_generators(model: onnx.ModelProto, generators: dict[str, onnx.ModelProto]
                   ) -> list[str]:
    """Each initializer of ``model`` that ``generators`` (:func:`constant_generators`) has a
    model for is computed by its nodes instead, their names prefixed to stay apart from
    ``model``'s. Changes ``model`` in place; returns the tensors' names."""
    taken = G.names_made(model.graph) | G.names_read(model.graph) | {
        n.name for n in model.graph.node}
    done: list[str] = []
    for i in reversed(range(len(model.graph.initializer))):
        name = model.graph.initializer[i].name
        if name not in generators:
            continue
        built = onnx.ModelProto()
        built.CopyFrom(generators[name])
        prefix = f"{name}/computed/"
        while any(n.startswith(prefix) for n in taken):
            prefix = f"{prefix}_/"
        _prefix_names(built.graph, prefix, keep=name)
        taken |= G.names_made(built.graph) | {n.name for n in built.graph.node}
        del model.graph.initializer[i]
        model.graph.initializer.extend(built.graph.initializer)
        head = list(built.graph.node) + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(head)
        done.append(name)
    return done


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)


def _generator(name: str, producers: dict[str, onnx.NodeProto],
               weights: dict[str, onnx.TensorProto]
               ) -> tuple[list[onnx.NodeProto] | None, list[onnx.TensorProto]]:
    """The nodes of the input model that compute ``name`` from its initializers alone, in
    the model's order, and those initializers; ``(None, [])`` where it reads a graph input
    or a node with a subgraph."""
    seen: dict[int, onnx.NodeProto] = {}
    consts: dict[str, onnx.TensorProto] = {}
    stack = [name]
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in consts:
            continue
        if tensor in weights:
            consts[tensor] = weights[tensor]
            continue
        node = producers.get(tensor)
        if node is None or G.subgraph_protos(node):
            return None, []
        if id(node) not in seen:
            seen[id(node)] = node
            stack.extend(node.input)
    order = {id(n): k for k, n in enumerate(producers.values())}
    return sorted(seen.values(), key=lambda n: order[id(n)]), list(consts.values())


def _stored_bytes(nodes: list[onnx.NodeProto], consts: list[onnx.TensorProto]) -> int:
    """The bytes of ``consts`` and of the tensors ``nodes`` hold as attributes (Constant)."""
    held = [a.t for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    return sum(numpy_helper.to_array(t).nbytes for t in [*consts, *held])


def _generator_model(name: str, nodes: list[onnx.NodeProto], consts: list[onnx.TensorProto],
                     original: onnx.ModelProto, deploy: onnx.ModelProto, values: np.ndarray
                     ) -> onnx.ModelProto | None:
    """The model of ``nodes`` computing ``name``, at ``deploy``'s opset, or None where it
    cannot be converted or run or computes other values than ``values``."""
    out = onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(values.dtype), values.shape)
    graph = onnx.helper.make_graph(nodes, "generator", [], [out], list(consts))
    model = onnx.helper.make_model(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    try:
        target = model_io.default_opset(deploy)
        if model_io.default_opset(model) != target:
            model = version_converter.convert_version(model, target)
        got = runtime.run(runtime.session(model, ["CPUExecutionProvider"]), {})[name]
    except Exception:  # noqa: BLE001 - the converter and onnxruntime raise many kinds
        return None
    if got.shape != values.shape or not np.array_equal(got, values):
        return None
    del model.graph.value_info[:]
    return model


def _prefix_names(graph: onnx.GraphProto, prefix: str, keep: str) -> None:
    """Every node and tensor name of ``graph`` but ``keep`` with ``prefix`` in front."""
    def renamed(name: str) -> str:
        return name if not name or name == keep else prefix + name

    for tensor in graph.initializer:
        tensor.name = renamed(tensor.name)
    for k, node in enumerate(graph.node):
        node.name = prefix + (node.name or f"{node.op_type}_{k}")
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]


def float_op_constants(graph: gs.Graph) -> int:
    """Each ``DequantizeLinear(8-bit or wider constant)`` whose readers are all compute ops
    that no integer kernel can run (their activation inputs are not dequantized: kept float
    by ``min_sqnr_db``, the sensitivity search or the options) becomes the float constant it
    computes, the same values: onnxruntime keeps a constant's DequantizeLinear and runs it on
    every run (or fuses it with a MatMul into its MatMulNBits kernel, whose arithmetic is
    coarser), which cost all-MiniLM-L6-v2, whose 8 such weights stay float for its outlier
    activations, more than its integer kernels saved (0.86x -> 1.15x FP32 speed, without VNNI;
    its output 17.8 -> 39.2 dB against the fake-quant graph's; deploy 24.7 -> 38.8 MB, the
    float model 87 MB). Returns how many."""
    count = 0
    for dq in [n for n in G.nodes(graph) if n.op == "DequantizeLinear"]:
        ints = G.constant_values(dq.inputs[0])
        out = dq.outputs[0] if dq.outputs else None
        if ints is None or out is None or not out.outputs or np.dtype(ints.dtype).kind == "f":
            continue
        if Q.qtype_of_storage(ints.dtype).bits < 8:
            continue  # 4-bit weights: their size is the point
        if not all(r.op in G.COMPUTE and not _integer_fed(r, out) for r in out.outputs):
            continue
        count += G.dequantize_in_place(graph, dq)
    return count


def _integer_fed(node: gs.Node, constant: gs.Tensor) -> bool:
    """Whether an activation input of the compute op ``node`` (its first two inputs, less
    ``constant``) comes through a Q/DQ pair: then an integer kernel can run it."""
    return any(G.float_source(t) is not t for t in node.inputs[:2] if t is not constant)


def gathered_tables(graph: gs.Graph) -> int:
    """Each ``DequantizeLinear(int8 table, per-row scale, axis 0)`` that only Gathers on
    axis 0 read (an embedding table insert-qdq quantized) becomes, for each Gather:
    ``Mul(Cast(Gather(int8 table, indices)), Gather(row scales, indices))``: a run
    dequantizes the rows it reads, where onnxruntime would keep the DequantizeLinear of the
    constant and dequantize the whole table on every run (all-MiniLM-L6-v2's 30522 x 384
    word embeddings: 3.4 ms a run). The values are the same (``q * s`` in the scale's type);
    the int8 Gather keeps the node's name. Returns how many tables."""
    count = 0
    names = G.used_names(graph)
    where = G.node_graphs(graph)
    outputs = {t.name for g in G.graphs(graph) for t in g.outputs}
    for dq in [n for n in G.nodes(graph) if n.op == "DequantizeLinear"]:
        ints = G.constant_values(dq.inputs[0])
        scale = G.constant_values(dq.inputs[1])
        zero = G.constant_values(dq.inputs[2]) if len(dq.inputs) > 2 else None
        table = dq.outputs[0]
        readers = G.row_gathers(table)
        if (ints is None or scale is None or ints.ndim != 2 or np.ndim(scale) != 1
                or np.dtype(ints.dtype) != np.int8 or scale.size != ints.shape[0]
                or int(dq.attrs.get("axis", 1)) not in (0, -2)
                or (zero is not None and np.any(zero != 0)) or table.name in outputs
                or not readers):
            continue
        home = where[id(dq)]
        rows_scale = gs.Constant(G.unique_name(home, f"{table.name}_row_scale", names),
                                 np.ascontiguousarray(scale.reshape(-1, 1)))
        to = onnx.helper.np_dtype_to_tensor_dtype(scale.dtype)
        for gather in readers:
            g_home, indices, out = where[id(gather)], gather.inputs[1], gather.outputs[0]

            def var(base: str, dtype: Any, graph: gs.Graph = g_home) -> gs.Variable:
                return gs.Variable(G.unique_name(graph, base, names), dtype=dtype)

            rows, cast, row_scale = (var(f"{out.name}_int8", np.int8),
                                     var(f"{out.name}_rows", scale.dtype),
                                     var(f"{out.name}_row_scale", scale.dtype))
            gather.inputs[0], gather.outputs[0] = dq.inputs[0], rows
            g_home.nodes += [
                gs.Node("Cast", G.unique_name(g_home, f"{gather.name}_Cast", names),
                        attrs={"to": to}, inputs=[rows], outputs=[cast]),
                gs.Node("Gather", G.unique_name(g_home, f"{gather.name}_scale", names),
                        attrs={"axis": 0}, inputs=[rows_scale, indices], outputs=[row_scale]),
                gs.Node("Mul", G.unique_name(g_home, f"{gather.name}_Mul", names),
                        inputs=[cast, row_scale], outputs=[out])]
        dq.outputs.clear()
        count += 1
    return count


def hard_sigmoid_adds(graph: gs.Graph) -> int:
    """Each ``DequantizeLinear -> HardSigmoid(alpha, beta) -> QuantizeLinear`` whose Q is
    8-bit with the grid of [0, 1] over its whole range (zero point the type's minimum, scale
    1/255: insert-qdq's fixed grid) becomes ``DequantizeLinear -> Add(beta / alpha) ->
    QuantizeLinear(scale / alpha)``: the same integers (``(alpha x + beta) / scale`` is ``(x
    + beta / alpha) / (scale / alpha)``, and the Q's saturation is HardSigmoid's clip at 0
    and 1), which onnxruntime runs as one QLinearAdd, where it has no integer kernel for
    HardSigmoid and ran it in float between the two. The Add keeps the node's name and reads
    the constant through a DequantizeLinear of its own; the Q gets a scale of its own (the
    DequantizeLinear after it keeps the grid). Returns how many."""
    count, names, where = 0, set(), {}
    for node in [n for n in G.nodes(graph) if n.op == "HardSigmoid"]:
        x, out = node.inputs[0], node.outputs[0]
        if not x.inputs or x.inputs[0].op != "DequantizeLinear" or len(out.outputs) != 1 \
                or out.outputs[0].op != "QuantizeLinear" or len(out.outputs[0].inputs) < 3:
            continue
        q = out.outputs[0]
        scale, zero = G.constant_values(q.inputs[1]), G.constant_values(q.inputs[2])
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        if scale is None or zero is None or scale.size != 1 or zero.dtype.kind not in "iu" \
                or zero.dtype.itemsize != 1 or not alpha > 0:
            continue
        qt = Q.qtype_of_storage(zero.dtype)
        s = float(scale.reshape(()))
        unit_scale, unit_zero = Q.qparams(0.0, 1.0, qt, False)  # insert-qdq's grid
        if int(zero.reshape(())) != int(unit_zero) or not np.isclose(s, unit_scale, rtol=1e-6):
            continue
        if not where:
            names, where = G.used_names(graph), G.node_graphs(graph)
        home = where[id(node)]
        shift = gs.Variable(G.fresh_name(f"{node.name}_shift", names), dtype=scale.dtype)
        ints, step, offset = Q.exact_operand(beta / alpha, qt)
        home.nodes.append(gs.Node(
            "DequantizeLinear", G.fresh_name(f"{node.name}_shift_dq", names),
            inputs=[gs.Constant(G.fresh_name(f"{node.name}_shift_quantized", names), ints),
                    gs.Constant(G.fresh_name(f"{node.name}_shift_scale", names),
                                np.array(step, scale.dtype)),
                    gs.Constant(G.fresh_name(f"{node.name}_shift_zero_point", names), offset)],
            outputs=[shift]))
        node.op, node.attrs = "Add", {}
        node.inputs.append(shift)
        q.inputs[1] = gs.Constant(G.fresh_name(f"{q.name}_shifted_scale", names),
                                  np.array(s / alpha, scale.dtype))
        count += 1
    return count


def _check_qoperator(table: QuantTable) -> None:
    narrow = [e for e in table.quantized("weight") if Q.qtype(e.dtype).bits < 8]
    if narrow:
        raise PassError(
            f"format = \"qoperator\" cannot hold {narrow[0].dtype} weights (e.g. "
            f"'{narrow[0].tensor}', {len(narrow)} tensors): QLinearConv and QLinearMatMul "
            "take 8-bit integers only; use format = \"qdq\" (4-bit initializers feeding "
            "DequantizeLinear), or override those weights to int8")


def _accuracy(ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]],
              labels: np.ndarray) -> dict[str, float]:
    name = next((k for k, v in ref[0].items() if v.dtype.kind in "fiu"), None)  # not strings
    if name is None:
        return {}
    before = np.concatenate([r[name] for r in ref])
    after = np.concatenate([g[name] for g in got])
    if before.ndim != 2 or len(before) != len(labels):
        return {}
    out = {}
    for k in (1, 5):
        if before.shape[1] < k:
            continue
        out[f"top{k}_float"] = _topk(before, labels, k)
        out[f"top{k}_quantized"] = _topk(after, labels, k)
    return out


def _topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


#: eval feeds the worst-tensor table is measured on (each run fetches every activation;
#: batches whose runs make over data.RUN_BYTES are pieces of them, PassContext.split)
WORST_BATCHES = 4


def _worst_tensors(model: onnx.ModelProto, table: QuantTable,
                   feeds: list[dict[str, np.ndarray]], ctx: PassContext, n: int
                   ) -> list[dict[str, Any]]:
    """SQNR of each quantized activation over ``feeds`` (one batch at a time, the squares
    summed): ``sqnr_db``, its value in the fake-quant graph vs its dequantized value there
    (the error its own quantization adds), and ``sqnr_vs_float_db``, its dequantized value
    vs its value in the float view (every pair bypassed): all the error that reaches it,
    which shows where an output's error builds up. The worst ``n`` by the first."""
    if n == 0:
        return []
    pairs = {name: dq.outputs[0].name
             for name, (_, dq) in G.qdq_pairs(G.import_graph(model)).items()}
    names = [e.tensor for e in table.quantized("activation") if e.tensor in pairs]
    if not names:
        return []
    # each activation and its DQ fetched, then each activation in the float view, one run
    # after the other: a quarter of the run budget each (half in all, as calibrate's
    # stream); where a piece cannot be cut to that (single samples), the activations are
    # fetched in two groups, each run then fetching as much as calibrate's stream did
    pieces = [piece for feed in feeds for piece in ctx.split(feed, model, share=0.25)]
    count = 2 if any(ctx.pieces.may_exceed(piece, 0.25) for piece in pieces) else 1
    sums = {t: np.zeros(4) for t in names}  # own signal, own noise, float signal, float noise
    options = runtime.quiet_options()
    options.enable_cpu_mem_arena = False  # the fetched tensors' memory goes back after a run
    # Q/DQ pairs as written, not fused into integer kernels: the values then do not depend
    # on which tensors a session fetches (a fetched tensor blocks the fusions around it)
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    size = -(-len(names) // count)
    progress = Progress("emit: worst tensors", total=count * len(pieces), unit="piece")
    for group in (names[i:i + size] for i in range(0, len(names), size)):
        probed = runtime.session(G.with_outputs(model, group + [pairs[t] for t in group]),
                                 ctx.providers, options)
        exact = runtime.session(G.with_outputs(model, group, float_view=True), ctx.providers,
                                options)
        for piece in pieces:
            values = runtime.run(probed, piece)
            for t in group:
                sums[t][:2] += Q.error_sums(values[t], values[pairs[t]])
            dequantized = {t: values[pairs[t]] for t in group}
            del values
            floats = runtime.run(exact, piece)
            for t in group:
                sums[t][2:] += Q.error_sums(floats[t], dequantized[t])
            del floats, dequantized
            progress.step()
    progress.close()
    rows = [{"tensor": t, "sqnr_db": Q.sqnr_db_of_sums(*sums[t][:2]),
             "sqnr_vs_float_db": Q.sqnr_db_of_sums(*sums[t][2:]), "range": table.get(t).range}
            for t in names]
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows[:n]


#: activations onnxruntime's CPU EP fuses into a float Conv, and runs apart, in float,
#: between the integer ones
FUSED_IN_FLOAT = {"HardSwish", "HardSigmoid"}
#: a deploy graph timed under this share of the float model's speed is called slower (the
#: paired rounds of a 2-core machine put ratios within a few percent of 1.0 either side)
SLOWER_BELOW = 0.95
#: ... unless its two ratios differ by more than this factor: load that came and went
#: decided the timing (a diacritizer read 0.28x and 0.86x on a busy machine, 1.03x quiet)
DISTURBED_RATIO = 1.5


def _judge_speed(report: dict[str, Any], deploy: onnx.ModelProto, providers: list[str]
                 ) -> list[str]:
    """A warning (report, note; an info line in the log, since timing is noisy and small
    nets often run slower in int8) where the deploy graph ran slower than the float model in
    the timing, the rounds' median ratio and the ratio of the medians both under
    :data:`SLOWER_BELOW` and within :data:`DISTURBED_RATIO` of each other, else a note that
    the timing was disturbed (for 8-bit weights: 4-bit weights have their own note), naming the
    ops onnxruntime runs in float between DequantizeLinear and QuantizeLinear in its
    optimized deploy graph."""
    lat = report.get("latency_ms")
    if not lat:
        return []
    canonical = "speedup_canonical" in lat
    speedup, medians = _ratios(lat)
    if not max(speedup, medians) < SLOWER_BELOW:  # both: a ratio alone flips on noise
        return []
    if lat.get("disturbed"):
        note = (f"timing disturbed: the deploy graph's rounds' median ratio {speedup:.2f}x and "
                f"the ratio of the medians {medians:.2f}x differ by more than "
                f"{DISTURBED_RATIO:g}x (other work on the machine came and went); not judged "
                "slower than float: time it again on a quiet machine")
        log.info("%s", note)
        return [note]
    which = "canonicalized float" if canonical else "float"
    islands = runtime.float_islands(deploy, providers)
    float_ops = ""
    if islands:
        ops = ", ".join(f"{n} {op}" for op, n in islands.most_common(6))
        float_ops = (f" (here, in onnxruntime's optimized deploy graph: {ops}; it has no "
                     "integer kernel for them")
        if set(islands) & FUSED_IN_FLOAT:
            float_ops += (", and the float model runs HardSwish / HardSigmoid fused into the "
                          "convolution before it")
        float_ops += ")"
    warning = (f"slower than float: the deploy graph ran at {speedup:.2f}x the {which} "
               f"model's speed in onnxruntime ({', '.join(providers)}; median of "
               f"{lat.get('runs', '?')} interleaved runs on this machine): what onnxruntime "
               "does not fuse into integer kernels runs in float between DequantizeLinear and "
               f"QuantizeLinear{float_ops}, and some integer kernels (depthwise, few input "
               "channels) run slower than float ones on some CPUs; its gain here is size")
    log.info("%s", warning)
    report.setdefault("warnings", []).append(warning)
    return [warning]


def _latency(sessions: list[Any], feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median milliseconds per run of the float model, the deploy graph and (a third session,
    when given) the float graph as canonicalized, interleaved so that load is shared (``runs``
    rounds, fewer where they would take over ``latency.CAP_S``); the deploy graph's speedup
    over each float one as the median of the rounds' ratios (:func:`latency.paired`); and
    the rounds."""
    times = latency.session_times(sessions, feed, budget_s=0.0, min_rounds=runs,
                                  max_rounds=runs)
    ms = [1e3 * float(t) for t in np.median(times, axis=0)]
    out = {"float": ms[0], "deploy": ms[1], "speedup": latency.speedup(times, 1, 0),
           "runs": len(times)}
    if len(sessions) > 2:
        out.update(float_canonical=ms[2], speedup_canonical=latency.speedup(times, 1, 2))
    speedup, medians = _ratios(out)
    out["disturbed"] = max(speedup, medians) > DISTURBED_RATIO * min(speedup, medians)
    return out


def _ratios(lat: dict[str, Any]) -> tuple[float, float]:
    """The deploy graph's speedup over the float model (the canonicalized one where timed) by
    the rounds' median ratio and by the ratio of the medians."""
    canonical = "speedup_canonical" in lat
    return (lat["speedup_canonical" if canonical else "speedup"],
            lat["float_canonical" if canonical else "float"] / lat["deploy"])


def summary_lines(report: dict[str, Any]) -> list[str]:
    size = report["size_bytes"]
    ratio = size['float'] / max(size['deploy'], 1)
    shrink = (f"{ratio:.1f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x LARGER than the "
              "float model: int32 biases, scales and the weights of ops left float outweigh "
              "what its int8 weights save")
    grown = size.get("float_passes", 0) / max(size["float"], 1)
    if ratio < 1 and grown > 1.5:
        # swift-f0 builds its filter banks at run time from small index constants
        shrink = (f"{1 / ratio:.2f}x LARGER than the float model: its float graph after the "
                  f"passes is already {grown:.1f}x the size, constants the model computes at "
                  "run time stored by canonicalize's constant folding "
                  "(canonicalize.fold_constants = false and simplify = false keep them "
                  "computed)")
    lines = [f"size: float {size['float'] / 2**20:.2f} MiB -> deploy "
             f"{size['deploy'] / 2**20:.2f} MiB ({shrink})"]
    outputs = report.get("outputs") or {}
    selected = report.get("selected_outputs") or {}
    if report.get("eval_data"):
        n = report.get("eval_samples")
        count = f"{n} sample{'s' if n != 1 else ''} of " if n else ""
        lines.append(f"measured against the float model on {count}{report['eval_data']}")
    for name, f in outputs.items():
        # integers (class ids, indices): agreement, which an SQNR over ids does not measure
        shown = (f"integers, {f['equal']:.2%} equal to float's" if "equal" in f else
                 f"cosine {f['cosine']:.5f}, SQNR {f['sqnr_db']:.1f} dB")
        if "equal" not in f and "worst_batch_sqnr_db" in f:
            shown += f" (the worst batch {f['worst_batch_sqnr_db']:.1f} dB)"
        if "argmax_equal" in f:
            shown += f"; argmax over its last axis as float's at {f['argmax_equal']:.2%}"
        lines.append(f"output '{name}': {shown}"
                     + (" (selected by TopK/ArgMax: rows follow the order of close scores; "
                        "judged by the tensors it selects from)" if f.get("selected") else ""))
    for name, sources in selected.items():
        if name not in outputs:  # strings: no SQNR
            shown = ", ".join(f"'{s}'" for s in sources) or "none the graphs share"
            lines.append(f"output '{name}': not numeric, selected by TopK/ArgMax: judged by "
                         f"the tensors it selects from: {shown}")
    acc = report.get("accuracy") or {}
    for k in (1, 5):
        if f"top{k}_float" in acc:
            lines.append(f"top-{k}: float {acc[f'top{k}_float']:.4f} -> quantized "
                         f"{acc[f'top{k}_quantized']:.4f}")
    lat = report.get("latency_ms")
    if lat:
        n = lat.get("samples")
        batch = f" (a batch of {n})" if n and n > 1 else " (one sample)" if n else ""
        if "float_canonical" in lat:
            lines.append(f"latency{batch}: float {lat['float']:.3f} ms as given, "
                         f"{lat['float_canonical']:.3f} ms canonicalized (its initializers no "
                         f"longer graph inputs, which onnxruntime can then fold and pre-pack), "
                         f"deploy {lat['deploy']:.3f} ms (medians); deploy "
                         f"{lat['speedup_canonical']:.2f}x the canonicalized float's speed, "
                         f"{lat['speedup']:.2f}x the given model's (the medians of each "
                         "round's ratio: load that comes and goes cancels within a round)")
        else:
            lines.append(f"latency{batch}: float {lat['float']:.3f} ms, deploy "
                         f"{lat['deploy']:.3f} ms (medians: {lat['float'] / lat['deploy']:.2f}"
                         f"x); deploy {lat['speedup']:.2f}x the float speed by the median of "
                         "each round's ratio (load that comes and goes cancels within a round; "
                         "where the two ratios differ, the machine was busy)")
        if lat.get("disturbed"):
            speedup, medians = _ratios(lat)
            lines.append(f"timing disturbed: the two ratios ({speedup:.2f}x, {medians:.2f}x) "
                         f"differ by more than {DISTURBED_RATIO:g}x: other work on the machine "
                         "came and went, and the medians in ms hold it; the rounds' median "
                         "ratio is the one to read, or time it again on a quiet machine")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# graphq quantization report", ""]
    lines += [f"- {line}" for line in summary_lines(report)]
    worst = report.get("worst_tensors") or []
    if worst:
        k = report.get("worst_tensors_samples", 1)
        lines += ["", "## Tensors with the worst SQNR", "",
                  f"Each quantized activation against its float value in the fake-quant graph "
                  f"(the error its own quantization adds), and against its value in the float "
                  f"graph (all the error that reaches it: where an output's error builds up), "
                  f"on the first {k} sample{'s' if k != 1 else ''} of the eval data.", "",
                  "| tensor | SQNR (dB) | SQNR vs float (dB) | range |", "|---|---:|---:|---|"]
        for row in worst:
            rng = row["range"]
            shown = f"[{rng[0]:.4g}, {rng[1]:.4g}]" if rng else "-"
            to_float = row.get("sqnr_vs_float_db")
            lines.append(f"| `{row['tensor']}` | {row['sqnr_db']:.1f} | "
                         f"{'-' if to_float is None else f'{to_float:.1f}'} | {shown} |")
    for warning in report.get("warnings") or []:
        lines += ["", f"**Warning**: {warning}"]
    t = report["tensors"]
    lines += ["", f"{t['quantized']} tensors quantized, {t['kept_float']} kept float; "
              "every decision and its reason is in quant_record.json.", ""]
    return "\n".join(lines)
