"""canonicalize: bring any exported graph to the form the other passes expect.

Steps, in order, each optional:

1. Upgrade the default-domain opset to at least ``min_opset`` (onnx.version_converter).
   When that is impossible, the error names the node whose op cannot be converted.
2. Initializers that are also listed as graph inputs (old exporters, IR < 4) become plain
   initializers, unless named in ``keep_initializer_inputs`` (inputs the user feeds).
3. Fold constants: every node whose inputs are all constant is evaluated and replaced by its
   value, which turns weights built at run time (ConstantOfShape, Unsqueeze of constants,
   shape arithmetic) into initializers.
4. onnxsim simplification, with its own BatchNormalization fusion turned off so that
   ``fold-bn`` does that and reports it. A failure of onnxsim, or a simplified graph whose
   outputs move beyond the pass's tolerance on the inputs the pass manager checks it on, is
   a warning, never fatal: the graph goes on unsimplified.
5. ``Sum`` nodes become ``Add`` (two inputs; a chain of them for more, one ``Identity`` for
   one): older exporters (the onnx model zoo's ResNet and ShuffleNet) write residual sums as
   ``Sum``, for which onnxruntime has no integer kernel, while ``Add`` becomes QLinearAdd.
6. ``PRelu`` with a constant slope becomes ``Max(x, Mul(x, slope))`` when every slope is in
   ``[0, 1]`` (``slope * x`` is below ``x`` for ``x > 0``, above it for ``x < 0``), else
   ``Add(Relu(x), Mul(Min(x, 0), slope))``: the same values, which onnxruntime computes 4-5x
   faster than its PRelu with per-channel slopes (MTCNN's PRelus took as long as all its
   convolutions).
7. Shape inference, so that later passes know ranks and dtypes.
8. Channel shuffles (ShuffleNet's ``Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4]
   -> Reshape [N, C, H, W]``) become one ``Gather`` of the channels (same values): once the
   convolutions around it are integer, onnxruntime runs them in NHWC and wraps each 5-D
   Transpose in layout transposes, which cost more than the int8 convolutions gain.

Between 3 and 4: GELU written with Erf (``x * 0.5 * (1 + erf(x / sqrt(2)))``, as exporters
write it below opset 20) becomes one ``Gelu`` (opset 20), where the opset is 20 already or
``fuse_gelu = "raise-opset"`` raises it. onnxruntime fuses the Erf form itself in a float
graph, but not once its input is quantized: it gives each reader of a DequantizeLinear its own
copy, so the two readers of ``x`` no longer share one tensor, and the int8 graph runs two
dequantizations and five float ops where the float graph runs one kernel. Before onnxsim,
whose fusion of a Mul into the next Conv would take the ``* 0.5`` away. Then HardSwish
written out, ``x * Clip(x + 3, 0, 6) / 6`` (paddle2onnx's PP-OCR and PP-LCNet models, older
PyTorch exports), becomes ``x * HardSigmoid(x; 1/6, 1/2)``, and ``Clip(x + 3, 0, 6) / 6``
alone ``HardSigmoid``: the same values in 2 ops instead of 4, and the form insert-qdq runs as
a QLinearAdd and a QLinearMul once quantized (4 float ops between integer ones otherwise).

After 4: each Transpose moves below the elementwise ops that read it alone (a
constant operand transposed back, a second operand transposed alike taken before its
Transpose) and a Transpose that undoes the one before it goes: a converter that keeps a TF
graph's NHWC layout around NCHW convolutions writes ``Conv -> Transpose -> Add (bias) -> Sub,
Mul, Add (a BN) -> Relu -> Transpose -> Conv``; the Transposes then cancel and the arithmetic
follows the Conv, where fold-bn folds it (open_nsfw: 102 Transposes -> 2, the int8 graph
1.59x -> 2.92x FP32 speed; after onnxsim, which removes the Casts and Identities between
them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper, version_converter

from graphq import graph as G
from graphq import model as model_io
from graphq import runtime
from graphq.data import PLAIN_SHARE
from graphq.errors import PassError
from graphq.registry import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@dataclass
class CanonicalizeOptions:
    min_opset: int = field(default=13, metadata={
        "help": "upgrade the ONNX opset to at least this version", "min": 7,
        "max": onnx.defs.onnx_opset_version()})
    keep_initializer_inputs: list[str] = field(default_factory=list, metadata={
        "help": "initializers listed as graph inputs that stay inputs (the user feeds them)"})
    fold_constants: bool = field(default=True, metadata={
        "help": "evaluate constant subgraphs (ConstantOfShape weights, shape arithmetic)"})
    sink_transposes: bool = field(default=True, metadata={
        "help": "move Transposes below the elementwise ops that read them and drop those "
                "that undo each other (a TF graph's NHWC layout around NCHW convolutions)"})
    simplify: bool = field(default=True, metadata={
        "help": "run onnxsim (its BN fusion off); a failure is a warning"})
    shuffle_to_gather: bool = field(default=True, metadata={
        "help": "rewrite channel shuffles (Reshape-Transpose-Reshape) as one Gather"})
    sum_to_add: bool = field(default=True, metadata={
        "help": "rewrite Sum nodes as Add (which onnxruntime runs as QLinearAdd once "
                "quantized)"})
    prelu_to_max: bool = field(default=True, metadata={
        "help": "rewrite PRelu with a constant slope as Max(x, Mul(x, slope)) (slopes in "
                "[0, 1]) or Relu(x) + Min(x, 0) * slope: same values, 4-5x faster in "
                "onnxruntime"})
    fuse_gelu: Literal["opset-20", "raise-opset", "off"] = field(default="opset-20", metadata={
        "help": "rewrite GELU written with Erf as one Gelu op: 'opset-20' where the model's "
                "opset is 20 or more, 'raise-opset' also raises the opset to 20 for it when the "
                "graph has one, 'off' (onnxruntime runs the Erf form as 5 ops and 2 "
                "dequantizations once its input is quantized, Gelu as one kernel)"})
    fuse_hard_swish: bool = field(default=True, metadata={
        "help": "rewrite x * Clip(x + 3, 0, 6) / 6 as x * HardSigmoid(x) (and Clip(x + 3, 0, "
                "6) / 6 as HardSigmoid): the same values in 2 ops instead of 4, which "
                "insert-qdq then runs as QLinearAdd and QLinearMul"})
    infer_shapes: bool = field(default=True, metadata={"help": "run ONNX shape inference"})


@register
class Canonicalize(Pass):
    name = "canonicalize"
    summary = "opset >= 13, initializer inputs, constant folding, onnxsim, shape inference"
    Options = CanonicalizeOptions
    rtol = 1e-4
    atol = 1e-5

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        o = self.options
        counts = {"opset_before": model_io.default_opset(model), "nodes_before": len(
            model.graph.node)}
        notes: list[str] = []
        changed = False
        if counts["opset_before"] < o.min_opset:
            model, dropped = upgrade_opset(model, o.min_opset)
            notes += [f"opset {counts['opset_before']} -> {o.min_opset}", *dropped]
            changed = True
        removed = _drop_initializer_inputs(model, set(o.keep_initializer_inputs))
        if removed:
            counts["initializer_inputs_removed"] = removed
            changed = True
        if o.fold_constants:
            before = len(model.graph.node)
            counts["initializer_identities_dropped"] = _share_constant_identities(model.graph)
            model = _fold_constants(model)
            counts["constant_nodes_folded"] = before - len(model.graph.node)
            changed |= counts["constant_nodes_folded"] > 0
        if o.fuse_gelu != "off":
            model, fused, note = _fuse_gelus(model, o.fuse_gelu == "raise-opset")
            counts["gelus_fused"] = fused
            changed |= fused > 0
            notes += [note] if note else []
        if o.fuse_hard_swish:
            counts["hard_swishes_fused"] = _hard_swishes_to_ops(model.graph)
            changed |= counts["hard_swishes_fused"] > 0
        if o.simplify:
            notes += _rank_shapeless_outputs(model)  # onnxsim checks the graph first
            simplified, why = _simplify(model)
            if simplified is not None:
                why = _moved_outputs(model, simplified, ctx, self.rtol, self.atol)
                simplified = None if why else simplified
            if simplified is None:
                notes.append(f"onnxsim's graph not used: {why}")
                log.warning("onnxsim's graph not used: %s; the graph goes on unsimplified", why)
            else:
                changed |= _structure(simplified) != _structure(model)
                model = simplified
        if o.sink_transposes:
            moved, dropped = _sink_transposes(model.graph)
            counts["transposes_moved"], counts["transposes_dropped"] = moved, dropped
            changed |= moved + dropped > 0
        if o.sum_to_add:
            counts["sums_rewritten"] = _sums_to_adds(model.graph)
            changed |= counts["sums_rewritten"] > 0
        if o.prelu_to_max:
            counts["prelus_rewritten"] = _prelus_to_max(model.graph)
            changed |= counts["prelus_rewritten"] > 0
        if o.infer_shapes:
            model, error = model_io.infer_shapes(model)
            if error:
                notes.append(f"shape inference failed: {error}")
                log.warning("shape inference failed: %s", error)
        notes += _rank_shapeless_outputs(model)
        if o.shuffle_to_gather:
            counts["channel_shuffles_rewritten"] = _shuffles_to_gathers(model.graph)
            changed |= counts["channel_shuffles_rewritten"] > 0
        model_io.fix_ir_version(model)
        counts["opset_after"] = model_io.default_opset(model)
        counts["nodes_after"] = len(model.graph.node)
        return PassResult(model, changed, counts, notes)


def _rank_shapeless_outputs(model: onnx.ModelProto) -> list[str]:
    """Give each main-graph output whose type has no shape (unknown rank: PP-OCRv5's
    recognizer declares a rank-0 output, the opset converter drops it and ends the graph in
    a Reshape to a computed shape) that many unknown dims as one onnxruntime run on a sample
    input makes: onnx.checker requires a shape there, and every pass after would fail it.
    In place; a note each (none where the run fails)."""
    missing = [o for o in model.graph.output if o.type.HasField("tensor_type")
               and not o.type.tensor_type.HasField("shape")]
    if not missing:
        return []
    try:
        sess = runtime.session(model)
        values = sess.run([o.name for o in missing], runtime.sample_feeds(model)[0])
    except Exception as exc:  # noqa: BLE001 -- the checker names the problem then
        log.debug("no sample run to give outputs a rank: %s", exc)
        return []
    notes = []
    for out, value in zip(missing, values, strict=True):
        shape = out.type.tensor_type.shape
        shape.SetInParent()
        for _ in range(np.ndim(value)):
            shape.dim.add()
        notes.append(f"graph output '{out.name}' has no shape after shape inference (its "
                     f"rank is unknown): given {np.ndim(value)} unknown dims, as a run on a "
                     "sample input makes")
    return notes


def _sums_to_adds(graph: onnx.GraphProto) -> int:
    """Rewrite the main graph's ``Sum`` nodes in place: ``Sum(a, b)`` -> ``Add(a, b)`` (same
    name and output), ``Sum(a, b, c)`` -> ``Add(Add(a, b), c)`` (onnxruntime's Sum adds in
    that order too), ``Sum(a)`` -> ``Identity(a)``. Returns how many were rewritten."""
    taken = {n.name for n in graph.node} | {v for n in graph.node for v in n.output}
    taken |= {i.name for i in graph.input} | {i.name for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        count += 1
        name = node.name or f"Sum_{node.output[0]}"
        ins = list(node.input)
        if len(ins) == 1:
            nodes.append(helper.make_node("Identity", ins, list(node.output), name=name))
            continue
        acc = ins[0]
        for k, operand in enumerate(ins[1:], start=1):
            last = k == len(ins) - 1
            out = node.output[0] if last else G.fresh_name(f"{node.output[0]}_partial{k}", taken)
            step = name if last else G.fresh_name(f"{name}_add{k}", taken)
            nodes.append(helper.make_node("Add", [acc, operand], [out], name=step))
            acc = out
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _prelus_to_max(graph: onnx.GraphProto) -> int:
    """Rewrite the main graph's ``PRelu(x, slope)`` whose slope is an initializer in place (the
    last node keeps the PRelu's name and output): ``Max(x, Mul(x, slope))`` when every slope
    is in ``[0, 1]``, else ``Add(Relu(x), Mul(Min(x, 0), slope))``. Returns how many."""
    inits = {i.name: i for i in graph.initializer}
    taken = {n.name for n in graph.node} | {v for n in graph.node for v in n.output}
    taken |= {i.name for i in graph.input} | set(inits)
    nodes: list[onnx.NodeProto] = []
    zero: str | None = None
    count = 0
    for node in graph.node:
        slope = inits.get(node.input[1]) if node.op_type == "PRelu" and \
            node.domain in ("", "ai.onnx") and len(node.input) == 2 else None
        values = numpy_helper.to_array(slope) if slope is not None else None
        if values is None or values.size == 0 or values.dtype.kind != "f":
            nodes.append(node)
            continue
        count += 1
        x, s, y = node.input[0], node.input[1], node.output[0]
        name = node.name or f"PRelu_{y}"

        def fresh(suffix: str, y: str = y) -> str:
            return G.fresh_name(f"{y}_{suffix}", taken)

        if np.all(values >= 0) and np.all(values <= 1):
            scaled = fresh("scaled")
            nodes += [helper.make_node("Mul", [x, s], [scaled], name=fresh("slope")),
                      helper.make_node("Max", [x, scaled], [y], name=name)]
            continue
        if zero is None:
            zero = G.fresh_name("prelu_zero", taken)
            graph.initializer.append(numpy_helper.from_array(np.zeros((), values.dtype), zero))
        pos, neg, scaled = fresh("positive"), fresh("negative"), fresh("scaled")
        nodes += [helper.make_node("Relu", [x], [pos], name=fresh("relu")),
                  helper.make_node("Min", [x, zero], [neg], name=fresh("min")),
                  helper.make_node("Mul", [neg, s], [scaled], name=fresh("slope")),
                  helper.make_node("Add", [pos, scaled], [y], name=name)]
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


GELU_OPSET = 20
"""The first opset with Gelu."""


def _fuse_gelus(model: onnx.ModelProto, raise_opset: bool
                ) -> tuple[onnx.ModelProto, int, str]:
    """Rewrite the main graph's Erf-form GELUs as Gelu (:func:`_gelus_to_op`), raising the
    opset to 20 first when ``raise_opset`` and the graph has one. A failed raise leaves the
    model as it is, with a note: the rewrite only makes it faster."""
    opset = model_io.default_opset(model)
    if opset < GELU_OPSET:
        found = len(_erf_gelus(model.graph))
        if not (raise_opset and found):
            return model, 0, ""
        try:
            model, dropped = upgrade_opset(model, GELU_OPSET)
        except PassError as exc:
            log.warning("GELU left in its Erf form: %s", exc)
            return model, 0, f"GELU left in its Erf form: {exc}"
        if dropped:
            log.info("%s", "; ".join(dropped))
        count = _gelus_to_op(model.graph)
        note = (f"opset {opset} -> {GELU_OPSET} for {count} Gelu op(s) (fuse_gelu = "
                "\"raise-opset\")")
        log.info("%s", note)
        return model, count, "; ".join([note, *dropped])
    return model, _gelus_to_op(model.graph), ""


@dataclass
class _Found:
    """A pattern of the main graph: ``nodes`` compute ``y`` from ``x``; ``name`` is its last
    node's."""

    x: str
    y: str
    name: str
    nodes: list[onnx.NodeProto]
    swish: bool = False  #: a HardSwish pattern (else a HardSigmoid one)


class _Uses:
    """The main graph's constants, producers and readers, to match patterns with: the
    tensors inside a pattern have no reader outside it, and are no graph output nor read by
    a subgraph (If branches)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.consts = {t.name: t for t in graph.initializer}
        self.consts.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                            for a in n.attribute if a.name == "value"})
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        for node in graph.node:
            for sub in G.subgraph_protos(node):
                self.outputs |= G.names_read(sub)

    def scalar(self, name: str, value: float) -> bool:
        t = self.consts.get(name)
        v = numpy_helper.to_array(t) if t is not None else None
        return v is not None and v.size == 1 and v.dtype.kind == "f" and \
            abs(float(v.reshape(-1)[0]) - value) <= 1e-4 * abs(value)

    @staticmethod
    def other(node: onnx.NodeProto, name: str) -> str | None:
        """The other input of a two-input node that reads ``name``."""
        ins = list(node.input)
        return ins[1 - ins.index(name)] if len(ins) == 2 and name in ins else None

    def only_reader(self, name: str, *ops: str) -> onnx.NodeProto | None:
        """The one reader of ``name``, if its op is one of ``ops`` and ``name`` is inner."""
        users = self.readers.get(name, [])
        ok = len(users) == 1 and users[0].op_type in ops and name not in self.outputs
        return users[0] if ok and users[0].domain in ("", "ai.onnx") else None


def _erf_gelus(graph: onnx.GraphProto) -> list[_Found]:
    """Each ``x * 0.5 * (1 + erf(x / sqrt(2)))`` of the main graph, in the orders exporters
    write it: ``Mul(Mul(x, 1 + erf), 0.5)``, ``Mul(Mul(x, 0.5), 1 + erf)``,
    ``Mul(x, Mul(1 + erf, 0.5))`` (``x / sqrt(2)`` also as ``x * (1 / sqrt(2))``); the
    tensors between ``x`` and the result have no reader outside it and are no graph output."""
    u = _Uses(graph)
    producer, readers, outputs = u.producer, u.readers, u.outputs
    scalar, other, only_reader = u.scalar, u.other, u.only_reader
    found = []
    for erf in graph.node:
        if erf.op_type != "Erf" or erf.domain not in ("", "ai.onnx"):
            continue
        scaled = producer.get(erf.input[0])
        if scaled is None or erf.input[0] in outputs or len(readers[erf.input[0]]) != 1:
            continue
        if scaled.op_type == "Div" and scalar(scaled.input[1], np.sqrt(2.0)):
            x = scaled.input[0]
        elif scaled.op_type == "Mul":
            x = next((i for i in scaled.input if scalar(other(scaled, i) or "", 1 / np.sqrt(2.0))),
                     None)
        else:
            continue
        add = only_reader(erf.output[0], "Add")
        if x is None or add is None or not scalar(other(add, erf.output[0]) or "", 1.0):
            continue
        mul = only_reader(add.output[0], "Mul")
        b = other(mul, add.output[0]) if mul is not None else None
        if b is None:
            continue
        if b == x:  # Mul(x, 1 + erf), then * 0.5
            last = only_reader(mul.output[0], "Mul")
            if last is None or not scalar(other(last, mul.output[0]) or "", 0.5):
                continue
            nodes = [scaled, erf, add, mul, last]
        elif scalar(b, 0.5):  # Mul(1 + erf, 0.5), then x *
            last = only_reader(mul.output[0], "Mul")
            if last is None or other(last, mul.output[0]) != x:
                continue
            nodes = [scaled, erf, add, mul, last]
        else:  # Mul(Mul(x, 0.5), 1 + erf)
            half = producer.get(b)
            if half is None or half.op_type != "Mul" or other(half, x) is None or \
                    not scalar(other(half, x), 0.5) or len(readers[b]) != 1 or b in outputs:
                continue
            last = mul
            nodes = [scaled, erf, add, half, mul]
        found.append(_Found(x, last.output[0], last.name, nodes))
    return found


def _gelus_to_op(graph: onnx.GraphProto) -> int:
    """Replace each GELU :func:`_erf_gelus` finds by one ``Gelu`` (its last node's name and
    output, in that node's place). Returns how many."""
    return _replace(graph, _erf_gelus(graph), lambda gelu: [helper.make_node(
        "Gelu", [gelu.x], [gelu.y], name=gelu.name or f"Gelu_{gelu.y}")])


def _hard_swishes(graph: onnx.GraphProto) -> list[_Found]:
    """Each ``x * Clip(x + 3, 0, 6) / 6`` of the main graph (HardSwish as paddle2onnx and
    older PyTorch exports write it; ``/ 6`` also as ``* (1 / 6)``, after the product with
    ``x`` or before it), and each ``Clip(x + 3, 0, 6) / 6`` read otherwise (HardSigmoid);
    the tensors inside have no reader outside it and are no graph output."""
    u = _Uses(graph)

    def sixth(node: onnx.NodeProto | None, name: str) -> bool:
        """``node`` divides ``name`` by 6, or multiplies it by 1/6."""
        return node is not None and (
            (node.op_type == "Div" and list(node.input) == [name, node.input[1]]
             and u.scalar(node.input[1], 6.0))
            or (node.op_type == "Mul" and u.scalar(u.other(node, name) or "", 1 / 6)))

    found = []
    for clip in graph.node:
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx") or len(clip.input) != 3 \
                or not (u.scalar(clip.input[1], 0.0) and u.scalar(clip.input[2], 6.0)):
            continue
        add = u.producer.get(clip.input[0])
        if add is None or add.op_type != "Add" or u.only_reader(clip.input[0], "Clip") is None:
            continue
        x = next((i for i in add.input if u.scalar(u.other(add, i) or "", 3.0)), None)
        first = u.only_reader(clip.output[0], "Mul", "Div")
        if x is None or first is None:
            continue
        if first.op_type == "Mul" and u.other(first, clip.output[0]) == x:
            last = u.only_reader(first.output[0], "Mul", "Div")
            if sixth(last, first.output[0]):
                found.append(_Found(x, last.output[0], last.name, [add, clip, first, last], True))
        elif sixth(first, clip.output[0]):
            mul = u.only_reader(first.output[0], "Mul")
            if mul is not None and u.other(mul, first.output[0]) == x:
                found.append(_Found(x, mul.output[0], mul.name, [add, clip, first, mul], True))
            else:
                found.append(_Found(x, first.output[0], first.name, [add, clip, first]))
    return found


def _hard_swishes_to_ops(graph: onnx.GraphProto) -> int:
    """Replace each pattern :func:`_hard_swishes` finds by ``HardSigmoid(x; 1/6, 1/2)``, times
    ``x`` for a HardSwish (the last node's name and output; the HardSigmoid takes the Clip's
    name). Returns how many."""
    taken = {n.name for n in graph.node} | {v for n in graph.node for v in n.output}

    def build(found: _Found) -> list[onnx.NodeProto]:
        clip = found.nodes[1].name or G.fresh_name(f"{found.y}_HardSigmoid", taken)
        gate = G.fresh_name(f"{found.y}_gate", taken) if found.swish else found.y
        nodes = [helper.make_node("HardSigmoid", [found.x], [gate], name=clip,
                                  **G.HARD_SWISH_GATE)]
        if found.swish:
            nodes.append(helper.make_node("Mul", [found.x, gate], [found.y],
                                          name=found.name or f"HardSwish_{found.y}"))
        return nodes

    return _replace(graph, _hard_swishes(graph), build)


def _replace(graph: onnx.GraphProto, found: list[_Found],
             build: Callable[[_Found], list[onnx.NodeProto]]) -> int:
    """Replace each pattern's nodes by what ``build`` makes of it, in its last node's place
    (after ``x``: the last node comes after the others); drop the shapes of the tensors gone
    and the constants nothing reads any more. Returns how many."""
    if not found:
        return 0
    replace: dict[int, list[onnx.NodeProto]] = {}
    for pattern in found:
        for node in pattern.nodes:
            replace[id(node)] = []
        replace[id(pattern.nodes[-1])] = build(pattern)
    nodes = [m for n in graph.node for m in replace.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    dropped = {o for g in found for n in g.nodes for o in n.output} - {g.y for g in found}
    keep = [v for v in graph.value_info if v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    constants = {i for g in found for n in g.nodes for i in n.input} - G.names_read(graph)
    inits = [t for t in graph.initializer if t.name not in constants]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return len(found)


def _dims(graph: onnx.GraphProto) -> dict[str, list[int | str | None]]:
    """Tensor name -> its dims from shape inference (:func:`graphq.model.dims`)."""
    known = ((v.name, model_io.dims(v)) for v in [*graph.input, *graph.value_info,
                                                   *graph.output])
    return {name: d for name, d in known if d is not None}


def _shuffle_groups(x: list, split: list, y: list) -> int | None:
    """``g`` when ``x`` [N, C, H, W] -> ``split`` [N, g, C/g, H, W] and ``y == x``."""
    if len(x) != 4 or len(split) != 5 or y != x or not isinstance(x[1], int):
        return None
    g, per = split[1], split[2]
    if not (isinstance(g, int) and isinstance(per, int) and g * per == x[1] > 0):
        return None
    same = [split[0], *split[3:]] == [x[0], *x[2:]]
    known = all(d is not None for d in [x[0], *x[2:]])
    return g if same and known else None


def _shuffles_to_gathers(graph: onnx.GraphProto) -> int:
    """Replace each channel shuffle ``Reshape -> Transpose(0, 2, 1, 3, 4) -> Reshape`` whose
    shapes shape inference knows by ``Gather(x, idx, axis=1)`` (the last Reshape's name and
    output), ``idx = arange(C).reshape(g, C / g).T.flatten()``."""
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dims = _dims(graph)
    taken = {i.name for i in graph.initializer} | {v for n in graph.node for v in n.output}

    def only_use(tensor: str, op: str) -> onnx.NodeProto | None:
        users = uses.get(tensor, [])
        ok = len(users) == 1 and users[0].op_type == op and tensor not in outputs
        return users[0] if ok else None

    replace: dict[int, onnx.NodeProto | None] = {}
    for first in graph.node:
        if first.op_type != "Reshape":
            continue
        tr = only_use(first.output[0], "Transpose")
        last = only_use(tr.output[0], "Reshape") if tr is not None else None
        if last is None:
            continue
        perm = [list(a.ints) for a in tr.attribute if a.name == "perm"]
        g = _shuffle_groups(dims.get(first.input[0], []), dims.get(first.output[0], []),
                            dims.get(last.output[0], []))
        if perm != [[0, 2, 1, 3, 4]] or g is None:
            continue
        channels = dims[first.input[0]][1]
        idx = np.arange(channels, dtype=np.int64).reshape(g, channels // g).T.reshape(-1)
        name = G.fresh_name(f"{last.output[0]}_channel_order", taken)
        graph.initializer.append(numpy_helper.from_array(idx, name))
        replace[id(first)] = replace[id(tr)] = None
        replace[id(last)] = helper.make_node("Gather", [first.input[0], name],
                                             list(last.output), name=last.name, axis=1)
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    _drop_unused(graph)
    return sum(n is not None for n in replace.values())


def upgrade_opset(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, list[str]]:
    """Convert the model to opset ``target``; name the node that blocks it when it fails.
    Returns the model and a note for each graph output whose declared shape the newer
    opset's shape inference contradicts, dropped (:func:`graphq.model.fix_declared_outputs`).

    The converter runs on the model's skeleton (weights left out, see
    :func:`graphq.model.skeleton`), so that it is fast and works over 2 GB; the weights are
    put back by name afterwards.
    """
    try:
        out = version_converter.convert_version(model_io.skeleton(model), target)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        node = _blocking_node(model, target)
        where, why = "", (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        if node is not None:
            where = f" at {node.op_type} node '{node.name}'"
            if not onnx.defs.has(node.op_type, max_inclusive_version=target):
                why = (f"{node.op_type} does not exist in opset {target} "
                       "(it was experimental or has been removed from ONNX)")
        raise PassError(
            f"cannot upgrade the model from opset {model_io.default_opset(model)} to {target}"
            f"{where}: {why}; re-export the model at opset >= {target}, or replace that op"
        ) from exc
    weights = {t.name: t for t in model.graph.initializer}
    for i, tensor in enumerate(out.graph.initializer):
        original = weights.get(tensor.name)
        if original is not None and not _has_data(tensor) and _has_data(original):
            out.graph.initializer[i].CopyFrom(original)
    G.copy_model_fields(out, model)
    out.ir_version = max(model.ir_version, 7)
    return out, model_io.fix_declared_outputs(out)


def _has_data(tensor: onnx.TensorProto) -> bool:
    return bool(tensor.raw_data) or any(
        len(getattr(tensor, f)) for f in ("float_data", "int32_data", "int64_data",
                                          "double_data", "uint64_data", "string_data"))


def _blocking_node(model: onnx.ModelProto, target: int) -> onnx.NodeProto | None:
    """The first node whose op alone cannot be converted to ``target``."""
    seen = set()
    opset = model_io.default_opset(model)
    for node in model.graph.node:
        key = (node.domain, node.op_type, tuple(a.name for a in node.attribute))
        if key in seen or node.domain not in ("", "ai.onnx"):
            continue
        seen.add(key)
        inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                  for n in node.input if n]
        outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                   for n in node.output if n]
        single = helper.make_model(
            helper.make_graph([node], "probe", inputs, outputs),
            opset_imports=[helper.make_opsetid("", opset)], ir_version=model.ir_version)
        try:
            version_converter.convert_version(single, target)
        except Exception:  # noqa: BLE001
            return node
    return None


def _drop_initializer_inputs(model: onnx.ModelProto, keep: set[str]) -> int:
    inits = {t.name for t in model.graph.initializer}
    stay = [i for i in model.graph.input if i.name not in inits or i.name in keep]
    removed = len(model.graph.input) - len(stay)
    if removed:
        del model.graph.input[:]
        model.graph.input.extend(stay)
        model.ir_version = max(model.ir_version, 4)
    return removed


def _share_constant_identities(graph: onnx.GraphProto) -> int:
    """Readers of an ``Identity`` of an initializer read the initializer itself, and the
    Identity goes (not where it makes a graph output): the torch exporter writes each extra
    use of a shared weight so, and folding materialized one copy per use (chython-rxnmap's
    transformer, its layers' weights shared: 85 MB -> 643 MB of initializers, 3.3 GB at the
    peak, before onnxsim merged them again). In place, subgraphs' outer-scope reads too;
    returns how many Identities went."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits
             and n.output[0] not in outputs}
    if not alias:
        return 0
    for i in reversed(range(len(graph.node))):
        node = graph.node[i]
        if node.op_type == "Identity" and node.output and node.output[0] in alias:
            del graph.node[i]
    for sub in G.graph_protos(graph):
        for node in sub.node:
            for k, name in enumerate(node.input):
                if name in alias:
                    node.input[k] = alias[name]
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name in alias:
            del graph.value_info[i]
    return len(alias)


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold with graphsurgeon, then apply the result to ``model`` in place: the nodes it
    removed go, the constants it computed become initializers, unused initializers go.
    (Exporting graphsurgeon's graph instead would copy every weight, twice.)"""
    graph = G.import_graph(model)
    before = {name for name, t in _tensors(graph).items() if isinstance(t, gs.Constant)}
    # flatten_subgraphs off: graphsurgeon 0.6's inlining of an If whose condition folds
    # leaves readers of the If's second output dangling (silero VAD's LSTM state)
    graph.fold_constants(error_ok=True, recurse_subgraphs=False, flatten_subgraphs=False).cleanup()
    produced = {t.name for node in graph.nodes for t in node.outputs}
    folded = {name: t for name, t in _tensors(graph).items()
              if isinstance(t, gs.Constant) and name not in before}
    proto = model.graph
    for i in reversed(range(len(proto.node))):
        if not any(out in produced for out in proto.node[i].output if out):
            del proto.node[i]
    # a folded tensor that only a subgraph reads (an If branch's outer-scope input) too;
    # the subgraphs' own nodes are left as they are
    read, made = G.names_read(proto), G.names_made(proto)
    read |= {o.name for o in proto.output}  # a constant output (a weight it returns) too
    for name, tensor in folded.items():
        if name in read and name not in made:
            proto.initializer.append(numpy_helper.from_array(np.asarray(tensor.values), name))
    used = {o.name for o in proto.output} | G.names_read(proto)
    for i in reversed(range(len(proto.initializer))):
        if proto.initializer[i].name not in used:
            del proto.initializer[i]
    for node in proto.node:
        for sub in G.subgraph_protos(node):
            _constants_to_initializers(sub)
    return model


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """In a subgraph (an If branch, a Loop body) and the graphs nested in it, each Constant
    node holding a tensor becomes an initializer of its graph, as graphsurgeon's folding makes
    them in the main graph: weights and biases there are then constants to quantize. A
    constant that graphs nested deeper read stays a node (graphsurgeon would copy an
    initializer into each of them)."""
    deeper = set()
    for node in graph.node:
        for sub in G.subgraph_protos(node):
            deeper |= G.names_read(sub)
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) \
            if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is not None and node.output[0] not in deeper:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            continue
        keep.append(node)
        for sub in G.subgraph_protos(node):
            _constants_to_initializers(sub)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _tensors(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """The tensors of ``graph`` and of the subgraphs of its nodes (If/Loop bodies)."""
    tensors: dict[str, gs.Tensor] = {}
    for g in G.graphs(graph):
        for name, t in g.tensors().items():
            tensors.setdefault(name, t)
    return tensors


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    if model_io.byte_size(model) > model_io.EXTERNAL_DATA_LIMIT:
        return None, "the model is over 2 GB"
    try:
        import onnxsim
    except ImportError as exc:
        return None, f"onnxsim cannot be imported ({exc})"
    try:
        out, ok = onnxsim.simplify(model, skip_fuse_bn=True, check_n=0)
    except Exception as exc:  # noqa: BLE001 - onnxsim raises many kinds
        return None, f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    if not ok:
        return None, "its own check of the simplified model failed"
    G.copy_model_fields(out, model)
    return out, ""


def _moved_outputs(before: onnx.ModelProto, after: onnx.ModelProto, ctx: PassContext,
                   rtol: float, atol: float) -> str:
    """Why onnxsim's graph ``after`` may not replace ``before``: an output it moves beyond the
    pass's tolerance, where its Gemm fusions and folded constants add up (PP-OCRv5 mobile
    rec: 6.8e-4 on a softmax, where the tolerance is 1e-4, and the run failed), on the feeds
    the pass manager checks the pass on (the first piece of each of its first batches;
    checked on the first batch alone, a second batch of English lines moved that softmax by
    4.6e-4 and failed the run), or without them the data's first batch (a random sample
    without data); "" when they agree or cannot be run (the pipeline's check says why)."""
    try:
        feeds = ctx.check_feeds or [ctx.first_feed(before, PLAIN_SHARE)]
        old, new = runtime.session(before, ctx.providers), runtime.session(after, ctx.providers)
        runs = [(runtime.run(old, feed), runtime.run(new, feed)) for feed in feeds]
    except Exception:  # noqa: BLE001 - random inputs may be out of its range
        return ""
    bad = next((d for ref, got in runs for d in runtime.compare(ref, got, rtol, atol)
                if not d.ok), None)
    return "" if bad is None else (f"it changed output '{bad.name}' beyond canonicalize's "
                                   f"tolerance (rtol {rtol:g}, atol {atol:g}: {bad.detail})")


def _structure(model: onnx.ModelProto) -> tuple:
    """What a rewrite changes: the nodes' wiring and the initializers' names."""
    nodes = tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node)
    return nodes, tuple(sorted(t.name for t in model.graph.initializer))


#: elementwise ops of two tensors: with a constant (transposed along), or with a second
#: tensor transposed the same way
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min"})


def _sink_transposes(graph: onnx.GraphProto) -> tuple[int, int]:
    """Move each Transpose of the main graph below the elementwise ops that read it alone,
    ``op(Transpose(x)) -> Transpose(op(x))`` (a constant operand transposed by the inverse
    permutation, a second operand that is a Transpose of the same permutation read there
    alone taken before it), and drop each Transpose that undoes the one before it. A
    converter that writes a TF graph's NHWC layout around NCHW convolutions leaves
    ``Conv -> Transpose -> Add (bias) -> Sub, Mul, Add (BN) -> Relu -> Transpose -> Conv``:
    the arithmetic then follows the Conv (fold-bn folds it) and the Transposes cancel.
    Returns the moves and the Transposes dropped."""
    moved = dropped = 0
    while True:
        step = _sink_round(graph)
        cut = _cancel_transposes(graph)
        moved, dropped = moved + step, dropped + cut
        if not step and not cut:
            return moved, dropped


def _perm(node: onnx.NodeProto) -> list[int] | None:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm or None  # no perm: reversed axes, the rank unknown here


def _sink_round(graph: onnx.GraphProto) -> int:
    """One round of :func:`_sink_transposes`' moves, each node moved at most once."""
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) | set(G.outer_reads(node)):
            readers.setdefault(name, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    taken = G.names_made(graph) | G.names_read(graph) | {n.name for n in graph.node}
    touched: set[int] = set()
    after: dict[int, onnx.NodeProto] = {}  # id(op) -> the Transpose to place after it
    gone: set[int] = set()  # the second operands' Transposes, no longer read

    def transposed(name: str, op: onnx.NodeProto) -> onnx.NodeProto | None:
        """The Transpose that makes ``name``, where ``op`` alone reads it (once)."""
        t = producer.get(name)
        ok = t is not None and t.op_type == "Transpose" and id(t) not in touched and \
            _perm(t) is not None and readers.get(name) == [op] and name not in outputs and \
            list(op.input).count(name) == 1
        return t if ok else None

    for op in graph.node:
        if op.domain not in ("", "ai.onnx") or len(op.output) != 1 or id(op) in touched \
                or not op.input:
            continue
        if op.op_type in G.ELEMENTWISE:
            operands = [0]
        elif op.op_type in _BINARY and len(op.input) == 2:
            operands = [0, 1]
        else:
            continue
        ts = [transposed(op.input[k], op) for k in operands]
        t = next((x for x in ts if x is not None), None)
        if t is None:
            continue
        perm = _perm(t)
        plan: dict[int, str | np.ndarray] = {}
        for k, x in zip(operands, ts, strict=True):
            name = op.input[k]
            if x is not None and _perm(x) == perm:
                plan[k] = x.input[0]
            elif name in inits:
                values = numpy_helper.to_array(inits[name])
                if values.ndim > len(perm):
                    break
                if values.ndim:  # a scalar is as it was
                    values = values.reshape((1,) * (len(perm) - values.ndim) + values.shape)
                    plan[k] = np.ascontiguousarray(values.transpose(np.argsort(perm)))
            else:
                break  # an operand neither transposed alike nor constant
        else:
            for k, new in plan.items():
                if isinstance(new, np.ndarray):
                    name = G.fresh_name(f"{op.input[k]}_transposed", taken)
                    graph.initializer.append(numpy_helper.from_array(new, name))
                    new = name
                source = producer.get(op.input[k])
                if source is not t and source is not None and source.op_type == "Transpose":
                    gone.add(id(source))
                    touched.add(id(source))
                op.input[k] = new
            y = op.output[0]
            z = G.fresh_name(f"{y}_before_transpose", taken)
            op.output[0] = z
            t.input[0], t.output[0] = z, y
            touched.update((id(op), id(t)))
            after[id(op)] = t
    if not after:
        return 0
    placed = {id(t) for t in after.values()} | gone
    order: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) not in placed:
            order.append(node)
        if id(node) in after:
            order.append(after[id(node)])
    del graph.node[:]
    graph.node.extend(order)
    _drop_unused(graph)
    return len(after)


def _cancel_transposes(graph: onnx.GraphProto) -> int:
    """Readers of a Transpose that undoes the Transpose before it read that one's input."""
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    bypass: dict[str, str] = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        if first is None or first.op_type != "Transpose" or node.output[0] in outputs:
            continue
        p1, p2 = _perm(first), _perm(node)
        if p1 is not None and p2 is not None and len(p1) == len(p2) and \
                [p1[i] for i in p2] == list(range(len(p1))):
            bypass[node.output[0]] = first.input[0]
    if not bypass:
        return 0
    for node in graph.node:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    _drop_unused(graph)
    return len(bypass)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Nodes none of whose outputs is read or a graph output, until none is left; then the
    initializers no longer read (those listed as graph inputs stay) and the value infos of
    tensors no longer there."""
    kept = {o.name for o in graph.output} | {i.name for i in graph.input}
    while True:
        read = G.names_read(graph) | kept
        keep = [n for n in graph.node if any(o in read for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    read = G.names_read(graph) | kept
    inits = [t for t in graph.initializer if t.name in read]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    made = G.names_made(graph) | kept | {t.name for t in graph.initializer}
    infos = [v for v in graph.value_info if v.name in made]
    if len(infos) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(infos)
