"""fold-bn: fold inference BatchNormalization into the linear op that produces its input.

Algebra (see :mod:`graphq.kernels.bn`): BN is ``scale * x + shift`` per channel, with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``. When ``x`` is the
output of a Conv, ConvTranspose, Gemm or 2-D MatMul with a constant weight, and nothing
else reads ``x``, the weight's output-channel slices are multiplied by ``scale`` and the bias
becomes ``scale * bias + shift`` (a missing bias is created; a MatMul gets an Add).

A BatchNormalization that cannot fold, because its producer is shared with other readers,
is not one of those ops, has a non-constant weight, or is absent (BN on a graph input),
becomes ``Mul(x, scale) -> Add(shift)`` (``fallback = "mul-add"``) or is left as it is
(``fallback = "keep"``). BN in training mode, or with non-constant statistics, is always left.
Every BN that does not fold is reported with the reason.

With ``affine`` (default), a chain of Add/Sub/Mul/Div by constants that vary along the
output channels alone, following such an op whose output nothing else reads (a bias and a
BN written out as arithmetic, as converters of TF graphs write them; canonicalize moves the
Transposes of an NHWC layout out of the way), is ``scale * x + shift`` too and folds the same.

The output tensor of the BN keeps its name, so graph outputs and downstream readers are
unchanged. A weight read by another node too is copied, never modified under that node.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphq import graph as G
from graphq import model as model_io
from graphq.kernels import bn as K
from graphq.registry import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: metadata key: the names of the Conv nodes a BatchNormalization was folded into (a JSON
#: list), for the QAT bridge's batch norm in the loop
FOLDED_KEY = "graphq.folded_bn"


@dataclass
class FoldBNOptions:
    ops: list[str] = field(default_factory=lambda: list(FOLDABLE), metadata={
        "help": "producer op types to fold into: " + ", ".join(FOLDABLE)})
    fallback: Literal["mul-add", "keep"] = field(default="mul-add", metadata={
        "help": "what to do with a BN that cannot fold: turn it into Mul+Add, or keep it"})
    affine: bool = field(default=True, metadata={
        "help": "also fold the Add/Sub/Mul/Div by per-channel constants that follow those "
                "ops (a bias and a BN written out as arithmetic, as converters of TF graphs "
                "write them)"})

    def validate(self) -> None:
        for op in self.ops:
            if op not in FOLDABLE:
                raise ValueError(f"option 'ops' has '{op}'; allowed: {', '.join(FOLDABLE)}")


class Refusal(Exception):
    """Why one BatchNormalization is not folded."""


@register
class FoldBN(Pass):
    name = "fold-bn"
    summary = ("fold BatchNormalization, and per-channel arithmetic, into "
               "Conv/ConvTranspose/Gemm/MatMul (else Mul+Add)")
    Options = FoldBNOptions
    rtol = 1e-4
    atol = 1e-5

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = G.import_graph(model)
        names = G.used_names(graph)
        counts = {"folded": 0, "mul_add": 0, "kept": 0}
        notes = []
        folded: list[str] = []
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            label = f"BatchNormalization '{bn.name or bn.outputs[0].name}'"
            try:
                scale, shift = _bn_params(bn)
            except Refusal as why:
                counts["kept"] += 1
                notes.append(f"{label} kept: {why}")
                continue
            try:
                op, into = self._fold(graph, bn, scale, shift, names)
                if op == "Conv" and into:
                    folded.append(into)
                counts["folded"] += 1
                counts[f"folded_{op.lower()}"] = counts.get(f"folded_{op.lower()}", 0) + 1
                log.debug("%s folded into %s", label, op)
                continue
            except Refusal as why:
                reason = str(why)
            if self.options.fallback == "mul-add":
                try:
                    _to_mul_add(graph, bn, scale, shift, names)
                    counts["mul_add"] += 1
                    notes.append(f"{label} became Mul+Add: {reason}")
                    continue
                except Refusal as why:
                    reason = f"{reason}; no Mul+Add either: {why}"
            counts["kept"] += 1
            notes.append(f"{label} kept: {reason}")
        if self.options.affine:
            counts["affine_folded"], counts["affine_ops"] = self._fold_affine(graph, names)
        for note in notes:
            log.debug("%s", note)
        _log_reasons(notes)
        changed = counts["folded"] + counts["mul_add"] + counts.get("affine_folded", 0) > 0
        if changed:
            graph.cleanup()
            model = G.export(graph, like=model)
            if folded:
                record_folded(model, folded)
        return PassResult(model, changed, counts, notes)

    def _fold(self, graph: gs.Graph, bn: gs.Node, scale: np.ndarray, shift: np.ndarray,
              names: set[str]) -> tuple[str, str]:
        """Fold ``bn`` into its producer; returns the producer's op type and name."""
        x = bn.inputs[0]
        if not x.inputs:
            raise Refusal("its input is a graph input, produced by no node")
        producer = x.inputs[0]
        if producer.op not in self.options.ops:
            raise Refusal(f"its input comes from {producer.op}, which is not folded into "
                          f"(ops: {', '.join(self.options.ops)})")
        if len(x.outputs) > 1 or G.is_graph_output(graph, x):
            raise Refusal(f"the output of {producer.op} '{producer.name}' is also read "
                          "elsewhere, so it cannot change")
        op, into = producer.op, producer.name
        _FOLDS[producer.op](graph, producer, scale, shift, names)
        _take_output(producer, [bn])
        return op, into

    def _fold_affine(self, graph: gs.Graph, names: set[str]) -> tuple[int, int]:
        """Each chain of Add/Sub/Mul/Div by per-channel constants that follows a foldable
        op (:func:`_affine_chain`) folded into it as ``scale * x + shift``. Returns the
        chains and their ops."""
        chains = ops = 0
        for producer in [n for n in graph.nodes if n.op in self.options.ops]:
            chain, scale, shift = _affine_chain(graph, producer)
            if not chain:
                continue
            try:
                _FOLDS[producer.op](graph, producer, scale, shift, names)
            except Refusal as why:
                log.debug("%s '%s': its arithmetic not folded: %s", producer.op,
                          producer.name, why)
                continue
            _take_output(producer, chain)
            chains, ops = chains + 1, ops + len(chain)
        if chains:
            log.info("fold-bn: %d chain(s) of %d Add/Sub/Mul/Div by per-channel constants "
                     "folded into the ops before them", chains, ops)
        return chains, ops


def _take_output(producer: gs.Node, chain: list[gs.Node]) -> None:
    """``producer`` (folded) writes the output of the last node of ``chain``, which goes."""
    outputs = [chain[-1].outputs[0]]
    for node in chain:
        node.outputs.clear()
        node.inputs.clear()
    if producer.op == "MatMul":  # the Add that _fold_matmul appended now ends the chain
        producer = producer.outputs[0].outputs[0]
    producer.outputs = outputs


def _affine_chain(graph: gs.Graph, producer: gs.Node
                  ) -> tuple[list[gs.Node], np.ndarray, np.ndarray]:
    """The Add/Sub/Mul/Div nodes that follow ``producer`` one after the other, each the only
    reader of the tensor before it (no graph output), each with a constant that varies along
    the output channels alone (axis 1) or not at all (``x - c`` and ``x / c``, not ``c - x``
    or ``c / x``), and the ``scale``, ``shift`` (float64, one per channel) they compose to
    (:func:`graphq.kernels.bn.then`). ``([], ...)`` where there is none."""
    layout = _output_layout(producer)
    none = ([], np.ones(0), np.zeros(0))
    if layout is None:
        return none
    rank, channels = layout
    scale, shift = np.ones(channels), np.zeros(channels)
    chain: list[gs.Node] = []
    x = producer.outputs[0] if len(producer.outputs) == 1 else None
    while x is not None and len(x.outputs) == 1 and not G.is_graph_output(graph, x):
        node = x.outputs[0]
        if node.op not in ("Add", "Sub", "Mul", "Div") or len(node.inputs) != 2 \
                or node.inputs[0] is node.inputs[1] or len(node.outputs) != 1:
            break
        first = node.inputs[0] is x
        c = _per_channel(G.constant_values(node.inputs[1 if first else 0]), rank, channels)
        composed = K.then(scale, shift, node.op, c) if c is not None and (
            first or node.op in ("Add", "Mul")) else None
        if composed is None:
            break
        scale, shift = composed
        chain.append(node)
        x = node.outputs[0]
    return (chain, scale, shift) if chain else none


def _output_layout(node: gs.Node) -> tuple[int, int] | None:
    """The rank of a foldable op's output and its channels (axis 1), where its weight is
    constant (a MatMul's output known to be 2-D, as :func:`_fold_matmul` needs)."""
    weight = G.constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim < 2:
        return None
    if node.op == "Conv":
        return weight.ndim, weight.shape[0]
    if node.op == "ConvTranspose":
        return weight.ndim, weight.shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return 2, weight.shape[0 if node.attrs.get("transB", 0) else 1]
    out = node.outputs[0] if node.outputs else None
    if node.op == "MatMul" and weight.ndim == 2 and out is not None and out.shape is not None \
            and len(out.shape) == 2:
        return 2, weight.shape[1]
    return None


def _per_channel(values: np.ndarray | None, rank: int, channels: int) -> np.ndarray | None:
    """``values`` as one float64 value per channel, where they broadcast over a rank-``rank``
    output along axis 1 alone (or are one value); else None."""
    if values is None or values.dtype.kind != "f" or values.ndim > rank:
        return None
    full = values.reshape((1,) * (rank - values.ndim) + values.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1) or \
            full.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1).astype(np.float64), (channels,)).copy()


def folded_convs(model: onnx.ModelProto) -> list[str]:
    """The Conv nodes of ``model`` that a BatchNormalization was folded into (as recorded in
    its metadata by this pass; empty when none was)."""
    for prop in model.metadata_props:
        if prop.key == FOLDED_KEY:
            return list(json.loads(prop.value))
    return []


def record_folded(model: onnx.ModelProto, names: list[str]) -> None:
    """Add ``names`` to the folded Conv nodes recorded in ``model``'s metadata."""
    merged = list(dict.fromkeys(folded_convs(model) + list(names)))
    model_io.drop_metadata(model, FOLDED_KEY)
    prop = model.metadata_props.add()
    prop.key, prop.value = FOLDED_KEY, json.dumps(merged)


def _log_reasons(notes: list[str], shown: int = 5) -> None:
    """The first few reasons at INFO; all of them are in the report and at DEBUG."""
    for note in notes[:shown]:
        log.info("%s", note)
    if len(notes) > shown:
        log.info("... and %d more BatchNormalization notes (see report.json, or -v)",
                 len(notes) - shown)


def _bn_params(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    if bn.attrs.get("training_mode", 0) == 1 or any(
            t.name and t.outputs for t in bn.outputs[1:]):
        raise Refusal("it is in training mode (its running statistics are outputs)")
    if bn.attrs.get("spatial", 1) != 1:
        raise Refusal("it has spatial = 0 (per-element statistics), which is not folded")
    values = []
    for role, tensor in zip(("scale", "bias", "mean", "var"), bn.inputs[1:5], strict=True):
        value = G.constant_values(tensor)
        if value is None:
            raise Refusal(f"its {role} '{tensor.name}' is not a constant")
        values.append(value)
    return K.scale_shift(*values, eps=float(bn.attrs.get("epsilon", 1e-5)))


def _constant(node: gs.Node, index: int, role: str) -> np.ndarray:
    if len(node.inputs) <= index or not node.inputs[index].name:
        raise Refusal(f"{node.op} '{node.name}' has no {role}")
    value = G.constant_values(node.inputs[index])
    if value is None:
        raise Refusal(f"the {role} of {node.op} '{node.name}' is not a constant")
    return value


def _optional(node: gs.Node, index: int, role: str) -> np.ndarray | None:
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    return _constant(node, index, role)


def _check_channels(node: gs.Node, channels: int, scale: np.ndarray) -> None:
    if channels != scale.shape[0]:
        raise Refusal(f"{node.op} '{node.name}' has {channels} output channels but the BN "
                      f"has {scale.shape[0]}")


def _set_input(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray, role: str,
               names: set[str]) -> None:
    """Give ``node`` new constant values at input ``index``, in place if nobody else reads it."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = values
        return
    base = old.name if old is not None and old.name else f"{node.name or node.op}_{role}"
    new = gs.Constant(G.unique_name(graph, f"{base}_bnfold", names), values)
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if index < len(node.inputs):
        node.inputs[index] = new
    else:
        node.inputs.append(new)


def _fold_conv(graph, conv, scale, shift, names) -> None:
    weight = _constant(conv, 1, "weight")
    _check_channels(conv, weight.shape[0], scale)
    bias = _optional(conv, 2, "bias")
    _set_input(graph, conv, 1, K.fold_conv_weight(weight, scale), "weight", names)
    _set_input(graph, conv, 2, K.fold_bias(bias, scale, shift, weight.dtype), "bias", names)


def _fold_conv_transpose(graph, conv, scale, shift, names) -> None:
    weight = _constant(conv, 1, "weight")
    groups = int(conv.attrs.get("group", 1))
    _check_channels(conv, weight.shape[1] * groups, scale)
    bias = _optional(conv, 2, "bias")
    folded = K.fold_conv_transpose_weight(weight, scale, groups)
    _set_input(graph, conv, 1, folded, "weight", names)
    _set_input(graph, conv, 2, K.fold_bias(bias, scale, shift, weight.dtype), "bias", names)


def _fold_gemm(graph, gemm, scale, shift, names) -> None:
    weight = _constant(gemm, 1, "weight")
    out_axis = 0 if gemm.attrs.get("transB", 0) else 1
    _check_channels(gemm, weight.shape[out_axis], scale)
    c = _optional(gemm, 2, "bias")
    beta = float(gemm.attrs.get("beta", 1.0))
    _set_input(graph, gemm, 1, K.fold_matrix_weight(weight, scale, out_axis), "weight", names)
    _set_input(graph, gemm, 2, K.fold_gemm_bias(c, beta, scale, shift, weight.dtype), "bias",
               names)
    gemm.attrs["beta"] = 1.0


def _fold_matmul(graph, matmul, scale, shift, names) -> None:
    weight = _constant(matmul, 1, "weight")
    if weight.ndim != 2:
        raise Refusal(f"the weight of MatMul '{matmul.name}' is not 2-D")
    out = matmul.outputs[0]
    if out.shape is None or len(out.shape) != 2:
        raise Refusal(f"the output of MatMul '{matmul.name}' is not known to be 2-D, so BN's "
                      "channel axis 1 may not be its weight's output axis")
    _check_channels(matmul, weight.shape[1], scale)
    _set_input(graph, matmul, 1, K.fold_matrix_weight(weight, scale, 1), "weight", names)
    bias = gs.Constant(G.unique_name(graph, f"{matmul.name or 'MatMul'}_bnfold_bias", names),
                       K.fold_bias(None, scale, shift, weight.dtype))
    product = gs.Variable(G.unique_name(graph, f"{out.name}_matmul", names), out.dtype, out.shape)
    outputs = list(matmul.outputs)
    matmul.outputs = [product]
    add = gs.Node("Add", G.unique_name(graph, f"{matmul.name or 'MatMul'}_bnfold_add", names),
                  inputs=[product, bias], outputs=outputs)
    graph.nodes.insert(graph.nodes.index(matmul) + 1, add)


_FOLDS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm,
          "MatMul": _fold_matmul}


#: ops whose output has the rank of their first input
_SAME_RANK = G.ELEMENTWISE | {"Concat", "BatchNormalization", "Dropout", "Identity", "Cast",
                              "PRelu"}


def _rank(tensor: gs.Tensor, depth: int = 8) -> int | None:
    """``tensor``'s rank: from its shape, or (up to ``depth`` ops back) from the first input
    of a rank-keeping op that makes it, or the weight of the Conv that does (RivaGAN's
    encoder, whose Conv outputs over a Concat shape inference left without a shape)."""
    if tensor.shape is not None:
        return len(tensor.shape)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op in ("Conv", "ConvTranspose") and \
            len(producer.inputs) > 1:
        weight = G.constant_values(producer.inputs[1])
        return weight.ndim if weight is not None else None
    if depth == 0 or producer is None or producer.op not in _SAME_RANK or not producer.inputs:
        return None
    return _rank(producer.inputs[0], depth - 1)


def _to_mul_add(graph: gs.Graph, bn: gs.Node, scale: np.ndarray, shift: np.ndarray,
                names: set[str]) -> None:
    x, y = bn.inputs[0], bn.outputs[0]
    rank = _rank(x)
    rank = _rank(y) if rank is None else rank
    if rank is None:
        raise Refusal("the rank of its input is not known (shape inference gave it none, nor "
                      "the ops before it)")
    dtype = x.dtype if x.dtype is not None else G.constant_values(bn.inputs[1]).dtype
    dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else dtype
    base = bn.name or y.name
    mul_c = gs.Constant(G.unique_name(graph, f"{base}_scale", names),
                        K.channel_shape(scale, rank).astype(dtype))
    add_c = gs.Constant(G.unique_name(graph, f"{base}_shift", names),
                        K.channel_shape(shift, rank).astype(dtype))
    scaled = gs.Variable(G.unique_name(graph, f"{base}_scaled", names), x.dtype, x.shape)
    mul = gs.Node("Mul", G.unique_name(graph, f"{base}_mul", names), inputs=[x, mul_c],
                  outputs=[scaled])
    bn.inputs.clear()
    bn.outputs.clear()
    add = gs.Node("Add", G.unique_name(graph, f"{base}_add", names), inputs=[scaled, add_c],
                  outputs=[y])
    index = graph.nodes.index(bn)
    graph.nodes[index:index + 1] = [mul, add]
