"""The QOperator form of a deploy graph: QLinearConv and QLinearMatMul instead of Q/DQ.

A deploy graph in Q/DQ form says ``DQ(x) -> Conv(DQ(w), DQ(b)) -> Q(y)``; the QOperator form
says the same with one integer node, which some runtimes and converters take instead::

    y_q = QLinearConv(x_q, x_scale, x_zp, w_q, w_scale, w_zp, y_scale, y_zp, b_q)
    y_q = QLinearMatMul(a_q, a_scale, a_zp, b_q, b_scale, b_zp, y_scale, y_zp)

A Relu between the op and its Q is dropped when the Q's zero point is the type's minimum
(the Q then clips at zero itself). Patterns that are not fully quantized, Gemm (which has no
standard QLinear op), MatMul with per-column weight scales, and 4-bit weights (QLinearConv and
QLinearMatMul take 8-bit integers only) stay in Q/DQ form.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphq import graph as G


def convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite the fully quantized Conv and MatMul patterns; return the model and a count."""
    graph = G.import_graph(model)
    count = 0
    for node in [n for n in graph.nodes if n.op in ("Conv", "MatMul")]:
        count += _rewrite(graph, node)
    if count:
        graph.cleanup().toposort()
    return G.export(graph, like=model), count


def _dq_inputs(tensor: gs.Tensor) -> list[gs.Tensor] | None:
    """The (integer, scale, zero point) inputs of the DequantizeLinear producing ``tensor``."""
    if not tensor.inputs or tensor.inputs[0].op != "DequantizeLinear":
        return None
    dq = tensor.inputs[0]
    return list(dq.inputs[:3]) if len(dq.inputs) >= 3 else None


def _output_q(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, gs.Node | None] | None:
    """The QuantizeLinear that alone reads the op's output, through a droppable Relu."""
    readers = node.outputs[0].outputs
    if len(readers) != 1 or G.is_graph_output(graph, node.outputs[0]):
        return None
    relu = None
    if readers[0].op == "Relu":
        relu = readers[0]
        readers = relu.outputs[0].outputs
        if len(readers) != 1 or G.is_graph_output(graph, relu.outputs[0]):
            return None
    q = readers[0]
    if q.op != "QuantizeLinear" or len(q.inputs) < 3 or q.attrs.get("axis") is not None and \
            np.ndim(G.constant_values(q.inputs[1])) > 0:
        return None
    if relu is not None:
        zero = G.constant_values(q.inputs[2])
        if zero is None or int(zero) != np.iinfo(zero.dtype).min:
            return None
    return q, relu


def _rewrite(graph: gs.Graph, node: gs.Node) -> int:
    x, w = _dq_inputs(node.inputs[0]), _dq_inputs(node.inputs[1])
    found = _output_q(graph, node)
    if x is None or w is None or found is None:
        return 0
    weight = G.constant_values(w[0])
    if weight is None or weight.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return 0  # not constant, or 4-bit
    q, _ = found
    inputs = [*x, *w, q.inputs[1], q.inputs[2]]
    if node.op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = _dq_inputs(node.inputs[2])
            if b is None or G.constant_values(b[0]) is None:
                return 0
            inputs.append(b[0])
        new = gs.Node("QLinearConv", node.name, attrs=dict(node.attrs), inputs=inputs,
                      outputs=list(q.outputs))
    else:
        if np.ndim(G.constant_values(w[1])) > 0 or np.ndim(G.constant_values(x[1])) > 0:
            return 0  # per-column scales: onnxruntime's QLinearMatMul takes scalars
        new = gs.Node("QLinearMatMul", node.name, inputs=inputs, outputs=list(q.outputs))
    q.outputs.clear()
    node.outputs.clear()
    graph.nodes.append(new)
    return 1
