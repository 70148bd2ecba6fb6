"""The bridge form: the ONNX graph rewritten so onnx2torch converts it into trainable modules.

onnx2torch converts node by node and holds every initializer a node reads as a frozen buffer.
Before conversion the graph (a copy: the caller's model is not touched) is rewritten, keeping
every tensor name, into nodes of graphq's ``graphq_qat`` domain whose converters
(:mod:`graphq.qat.converters`) build the modules of :mod:`graphq.qat.modules`:

- ``float initializer -> QuantizeLinear -> DequantizeLinear`` (a weight, fake-quant form) and
  ``integer initializer -> DequantizeLinear`` (a weight, deploy form) become
  ``WeightFakeQuant``: a float parameter with its own fake-quant node;
- ``int32 initializer -> DequantizeLinear`` (a bias) becomes ``Bias``: a float parameter on
  the int32 grid of ``input scale x weight scale`` (the ``input`` and ``weight`` attributes name
  the tensors of the op that adds it);
- ``tensor -> QuantizeLinear -> DequantizeLinear`` becomes ``FakeQuant`` (one torch module per
  scale initializer, so a shared scale stays shared);
- a float initializer read as weight or bias by Conv / ConvTranspose / Gemm / MatMul, or as the
  bias added to such a node's output, becomes ``Param``: a trainable float parameter;
- Conv / ConvTranspose whose weight is no longer an initializer go to graphq's ``Conv``
  converter (onnx2torch's reads weights from initializers only).

A QuantizeLinear or DequantizeLinear that is not part of such a pattern stays as it is and is
converted by graphq's converters for those ops (integer output, no gradient).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: onnx2torch prefixes module names with the domain, where a dot is not allowed
DOMAIN = "graphq_qat"

#: ops whose weight (input 1) and bias (input 2) become trainable
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ops onnx2torch cannot convert with a weight that arrives as a tensor
CONV_OPS = ("Conv", "ConvTranspose")


@dataclass
class BridgeForm:
    """The rewritten model and what the rewrite found."""

    model: onnx.ModelProto
    counts: dict[str, int] = field(default_factory=dict)


def _float_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def to_bridge_form(model: onnx.ModelProto, extra_outputs: list[str] | None = None
                   ) -> BridgeForm:
    """The bridge form of ``model`` (a copy); ``extra_outputs`` names tensors the converted
    module should return after the graph's outputs (for distillation on intermediates)."""
    out = _with_shapes(model)
    graph = out.graph
    inits = _float_initializers(graph)
    producer: dict[str, onnx.NodeProto] = {}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.output:
            producer[name] = node
        for name in node.input:
            readers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    counts = defaultdict(int)
    new_nodes: list[onnx.NodeProto] = []
    folded: dict[str, int] = defaultdict(int)  # Q output -> how many of its DQs were replaced

    def is_float_init(name: str) -> bool:
        t = inits.get(name)
        return t is not None and t.data_type in (onnx.TensorProto.FLOAT,
                                                 onnx.TensorProto.FLOAT16,
                                                 onnx.TensorProto.DOUBLE)

    def custom(op: str, inputs: list[str], outputs: list[str], name: str, **attrs):
        return helper.make_node(op, inputs, outputs, name=name, domain=DOMAIN, **attrs)

    def axis_of(node: onnx.NodeProto) -> int:
        for a in node.attribute:
            if a.name == "axis":
                return a.i
        return 1

    def same_qparams(q: onnx.NodeProto, dq: onnx.NodeProto) -> bool:
        if list(q.input[1:]) == list(dq.input[1:]):
            return True
        if len(q.input) != len(dq.input) or axis_of(q) != axis_of(dq):
            return False
        return all(n in inits and m in inits and np.array_equal(
            numpy_helper.to_array(inits[n]), numpy_helper.to_array(inits[m]))
            for n, m in zip(q.input[1:], dq.input[1:], strict=False))

    def bias_operands(bias: str) -> dict[str, str]:
        """The input and weight of the op that adds ``bias``: its int32 grid is
        ``input scale x weight scale`` (write-back requantizes it there)."""
        for reader in readers[bias]:
            if reader.op_type in WEIGHTED and len(reader.input) > 2 and \
                    reader.input[2] == bias and reader.input[0] and reader.input[1]:
                return {"input": reader.input[0], "weight": reader.input[1]}
        return {}

    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        x = node.input[0]
        q = producer.get(x)
        axis = axis_of(node)
        qparams = list(node.input[1:])
        if q is not None and q.op_type == "QuantizeLinear" and same_qparams(q, node) and \
                x not in graph_outputs:
            src = q.input[0]
            op = "WeightFakeQuant" if is_float_init(src) else "FakeQuant"
            new_nodes.append(custom(op, [src, *q.input[1:]], list(node.output), node.name,
                                    axis=axis))
            counts["weights" if op == "WeightFakeQuant" else "activations"] += 1
            folded[x] += 1
        elif x in inits and inits[x].data_type == onnx.TensorProto.INT32:
            new_nodes.append(custom("Bias", [x, *qparams], list(node.output), node.name,
                                    axis=axis, **bias_operands(node.output[0])))
            counts["biases"] += 1
        elif x in inits:
            new_nodes.append(custom("WeightFakeQuant", [x, *qparams], list(node.output),
                                    node.name, axis=axis))
            counts["weights"] += 1
        else:
            new_nodes.append(node)

    # a Q whose every reader became a fake-quant node is gone
    kept = [node for node in new_nodes if not (
        node.op_type == "QuantizeLinear" and node.output[0] not in graph_outputs
        and folded[node.output[0]] == len(readers[node.output[0]]) > 0)]

    # trainable float weights and biases of the weighted ops, one Param node per initializer
    params: dict[str, str] = {}
    taken = {n for node in kept for n in node.output} | set(inits) | \
        {i.name for i in graph.input}

    def param_output(init: str) -> str:
        if init not in params:
            name, i = f"{init}__param", 1
            while name in taken:
                name, i = f"{init}__param_{i}", i + 1
            taken.add(name)
            params[init] = name
        return params[init]

    weighted_outputs = {o for node in kept if node.op_type in WEIGHTED for o in node.output}
    for node in kept:
        slots: list[int] = []
        if node.op_type in WEIGHTED and node.domain in ("", "ai.onnx"):
            slots = [i for i in (0, 1, 2) if i < len(node.input)]
            if node.op_type != "MatMul":
                slots = [i for i in slots if i > 0]
        elif node.op_type == "Add" and any(i in weighted_outputs for i in node.input):
            slots = [0, 1]
        for i in slots:
            name = node.input[i]
            if is_float_init(name) and inits[name].dims and np.prod(inits[name].dims) > 1:
                node.input[i] = param_output(name)
    param_nodes = [custom("Param", [init], [out], f"{out}_node")
                   for init, out in params.items()]
    graph.value_info.extend(helper.make_tensor_value_info(out, inits[init].data_type,
                                                          list(inits[init].dims))
                            for init, out in params.items())
    counts["params"] = len(param_nodes)

    # the weight's shape, for a Conv whose kernel_shape is implied by its weight's dims
    weight_dims = {out: list(inits[init].dims) for init, out in params.items()}
    weight_dims.update({n.output[0]: list(inits[n.input[0]].dims) for n in kept
                        if n.domain == DOMAIN and n.op_type == "WeightFakeQuant"})
    for node in kept:
        if node.op_type in CONV_OPS and node.domain in ("", "ai.onnx") and \
                node.input[1] not in inits:
            node.domain = DOMAIN
            counts["convs"] += 1
            dims = weight_dims.get(node.input[1])
            if dims and not any(a.name == "kernel_shape" for a in node.attribute):
                node.attribute.append(helper.make_attribute("kernel_shape", dims[2:]))

    wanted = graph_outputs | set(extra_outputs or [])
    for node in kept:
        # onnx2torch's Dropout returns one tensor and takes a node with a mask output for a
        # tuple, so 'output' would become the first sample of the batch: the mask goes when
        # nothing reads it (it is optional)
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and \
                len(node.output) > 1 and not readers[node.output[1]] and \
                node.output[1] not in wanted:
            del node.output[1:]

    del graph.node[:]
    graph.node.extend(param_nodes + kept)
    _ensure_names(graph)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    present = {o.name for o in graph.output}
    for name in extra_outputs or []:
        if name not in present:
            graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)
    return BridgeForm(out, dict(counts))


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with inferred shapes: onnx2torch infers shapes again on the bridge
    form, where they stop at the ``graphq_qat`` nodes, and some of its converters
    (BatchNormalization, GlobalAveragePool) need the shape of their input."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):  # > 2 GB, or a bad graph
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out


def _ensure_names(graph: onnx.GraphProto) -> None:
    """Every node named and the names unique (onnx2torch names its modules after them)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
