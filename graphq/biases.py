"""Biases of Conv, ConvTranspose and Gemm as int32 with ``scale = input scale x weight scale``
(zero point 0), once the scales of their quantized input and weight are in the graph: what
onnxruntime's QDQ fusion needs to run the op as an integer kernel."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from graphq import graph as G
from graphq.kernels import quant as Q
from graphq.quant import QuantTable, TensorQuant

BIASED = ("Conv", "ConvTranspose", "Gemm")


def dq_scale(tensor: gs.Tensor) -> np.ndarray | None:
    """The scale of the DequantizeLinear that produces ``tensor``, if one does."""
    if not tensor.inputs or tensor.inputs[0].op != "DequantizeLinear":
        return None
    return G.constant_values(tensor.inputs[0].inputs[1])


class BiasSite(NamedTuple):
    """A bias that can be held as int32: its op, the float bias, the scales of the op's
    dequantized input and weight (a ConvTranspose's per-group weight scale tiled per output
    channel), and the float tensor whose Q/DQ pair makes the input."""

    node: gs.Node
    bias: np.ndarray
    input_scale: np.ndarray
    weight_scale: np.ndarray
    source: str


def bias_sites(graph: gs.Graph) -> list[BiasSite]:
    """Every Conv / ConvTranspose / Gemm whose constant 1-D bias :func:`quantize_biases` can
    hold as int32: it reads a dequantized input and weight (Gemm: with ``beta`` 1)."""
    sites = []
    for node in [n for n in G.nodes(graph) if n.op in BIASED]:
        if len(node.inputs) < 3 or not node.inputs[2].name:
            continue
        bias = G.constant_values(node.inputs[2])
        s_in, s_w = dq_scale(node.inputs[0]), dq_scale(node.inputs[1])
        if bias is None or s_in is None or s_w is None or bias.ndim != 1:
            continue
        if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
            continue
        s_w = np.atleast_1d(s_w)
        if node.op == "ConvTranspose" and s_w.size * int(node.attrs.get("group", 1)) == bias.size:
            s_w = np.tile(s_w, int(node.attrs.get("group", 1)))  # weight axis 1 is per group
        sites.append(BiasSite(node, bias, s_in, s_w, G.float_source(node.inputs[0]).name))
    return sites


def quantize_biases(graph: gs.Graph, table: QuantTable) -> int:
    """Quantize every bias whose op reads a dequantized input and weight (in place, the
    decision in ``table``; a bias that would overflow int32 stays float); returns how many."""
    count = 0
    names = G.used_names(graph)
    where = G.node_graphs(graph)
    for node, bias, s_in, s_w, _ in bias_sites(graph):
        name = node.inputs[2].name
        if not Q.bias_fits_int32(bias, s_in, s_w):
            table.add(TensorQuant(name, "bias", False, f"bias of {node.op} '{node.name}' kept "
                                  "float: at scale = input scale x weight scale it would "
                                  "overflow int32 (the input's range is near zero)",
                                  consumers=[node.name]))
            continue
        ints, scale = Q.bias_int32(bias, s_in, s_w)
        scale = np.broadcast_to(np.asarray(scale, np.float32), bias.shape).copy()
        table.add(TensorQuant(name, "bias", True, f"bias of {node.op} '{node.name}': "
                              "scale = input scale x weight scale", dtype="int32",
                              symmetric=True, axis=0, method="derived",
                              scale=scale.astype(float).tolist(),
                              zero_point=[0] * len(scale), consumers=[node.name]))
        node.inputs[2] = G.dequantized_constant(
            where[id(node)], name, np.asarray(ints, np.int32), scale,
            np.zeros(scale.shape, np.int32), 0, bias.dtype, names)
        count += 1
    return count
