"""Write learned values back onto the ONNX graph they came from, by initializer name.

No re-export through torch.onnx: the graph keeps its nodes, names and structure, and only
initializer values change: float weights and biases, weights held as integers (requantized
with their learned scale), scales and zero points, and int32 biases, which are requantized at
``input scale x weight scale`` of the learned scales. The quant table is updated to match.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from graphq.errors import PassError
from graphq.kernels import quant as Q
from graphq.qat import modules as M
from graphq.quant import QuantTable


class _Initializers:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.index = {t.name: i for i, t in enumerate(graph.initializer)}

    def proto(self, name: str) -> onnx.TensorProto:
        if name not in self.index:
            raise PassError(f"write-back: the graph has no initializer '{name}'; was the "
                            "module converted from another graph?")
        return self.graph.initializer[self.index[name]]

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.proto(name))

    def put(self, name: str, values: np.ndarray) -> None:
        """Replace initializer ``name`` with ``values`` in its own type and shape."""
        old = self.proto(name)
        values = np.asarray(values).reshape(tuple(old.dims))
        # the initializer's own numpy type (ml_dtypes.int4 for INT4: from_array packs it)
        new = numpy_helper.from_array(
            values.astype(helper.tensor_dtype_to_np_dtype(old.data_type)), name)
        self.graph.initializer[self.index[name]].CopyFrom(new)


def _numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def write_back(model: onnx.ModelProto, module: nn.Module) -> onnx.ModelProto:
    """A copy of ``model`` (the graph ``module`` was converted from) with ``module``'s learned
    values (its :class:`~graphq.qat.modules.ConvBatchNorm` modules folded first)."""
    M.fold_batch_norms(module)  # batch norms in the loop: into their Convs' values
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = _Initializers(out.graph)
    seen: set[int] = set()
    for sub in module.modules():
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        if isinstance(sub, M.Param):
            inits.put(sub.onnx_names["value"], _numpy(sub.value))
        elif isinstance(sub, M.WeightFakeQuant):
            _write_weight(inits, sub)
        elif isinstance(sub, M.ActivationFakeQuant):
            _write_qparams(inits, sub.onnx_names, sub.quant)
        elif isinstance(sub, M.Bias):
            _write_bias(inits, sub)
    table = QuantTable.of(out)
    if table is not None:
        _update_table(table, out, inits)
        table.attach(out)
    return out


def _write_qparams(inits: _Initializers, names: dict, quant) -> tuple[np.ndarray, np.ndarray]:
    scale, zp = quant.qparams()
    inits.put(names["scale"], scale)
    if names.get("zero_point"):
        inits.put(names["zero_point"], zp)
    return scale, zp


def _write_weight(inits: _Initializers, sub: M.WeightFakeQuant) -> None:
    scale, zp = _write_qparams(inits, sub.onnx_names, sub.quant)
    weight = _numpy(sub.weight)
    if sub.onnx_names["weight"]:
        inits.put(sub.onnx_names["weight"], weight)
    if sub.onnx_names["quantized"]:
        qt = sub.quant.qtype
        inits.put(sub.onnx_names["quantized"],
                  Q.quantize(weight, scale, zp, qt, axis=sub.quant.axis))


def _write_bias(inits: _Initializers, bias: M.Bias) -> None:
    """The int32 bias on the grid its forward used (:meth:`Bias.grid`: input scale x weight
    scale of the learned quantizers), and that grid as its scale."""
    names = bias.onnx_names
    value = _numpy(bias.bias).astype(np.float64)
    grid = np.broadcast_to(_numpy(bias.grid()), value.shape)
    if not Q.bias_fits_int32(value, grid, 1.0):
        raise PassError(f"write-back: bias '{names['quantized']}' overflows int32 at scale "
                        "input scale x weight scale after training; train without 'scales' "
                        "or with a lower learning rate")
    ints, scale = Q.bias_int32(value, grid, np.float32(1.0))
    inits.put(names["quantized"], ints)
    inits.put(names["scale"], scale)


def _update_table(table: QuantTable, model: onnx.ModelProto, inits: _Initializers) -> None:
    """Scales, zero points and clip ranges of the table from the written graph."""
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    # integers held as initializers (int32 biases, deploy weights) have no float tensor
    # name in the graph: their entry is the one of that role read by the same node
    by_consumer = {(e.role, c): e for e in table.entries.values() for c in e.consumers}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[1] not in inits.index:
            continue
        src = node.input[0]
        q = producers.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            entry = table.get(q.input[0])
        elif src in inits.index:
            entry = next((by_consumer.get((role, r.name)) for r in readers.get(node.output[0], [])
                          for role in ("bias", "weight")
                          if by_consumer.get((role, r.name)) is not None), None)
        else:
            entry = table.get(src)
        if entry is None or not entry.quantized:
            continue
        scale = np.atleast_1d(inits.array(node.input[1])).astype(np.float64)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = np.atleast_1d(inits.array(zp_name)).astype(np.int64) if zp_name else \
            np.zeros(scale.shape, np.int64)
        entry.scale = scale.tolist()
        entry.zero_point = zp.tolist()
        if entry.role != "bias" and entry.dtype in Q.QTYPES:
            qt = Q.qtype(entry.dtype)
            entry.range = [float(np.min((qt.qmin - zp) * scale)),
                           float(np.max((qt.qmax - zp) * scale))]
        if "qat" not in entry.method:
            entry.method = f"{entry.method}+qat" if entry.method else "qat"
