"""graphq's converters for onnx2torch: the ``graphq_qat`` ops of the bridge form, and
QuantizeLinear / DequantizeLinear (opsets 10 to 25) where they stand alone.

Converters are registered once per process (:func:`register`, called by
:func:`graphq.qat._o2t.onnx2torch`). What a conversion needs beyond the node (the fake-quant
method, which values train, the modules already built for a shared scale) lives in a
:class:`Conversion` made active for the duration of one :func:`graphq.qat.to_torch` call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from onnx import numpy_helper

from graphq.errors import GraphqError
from graphq.kernels import quant as Q
from graphq.kernels.fakequant import FakeQuantize
from graphq.kernels.quant import QType, qtype, qtype_of_storage
from graphq.qat import modules as M
from graphq.qat.bridge import DOMAIN
from graphq.qat.ops import converter_result

METHODS = ("ste", "lsq", "pact")
#: the groups of values that can learn; ``input_scales`` are the scales of quantizers that
#: read a graph input directly (fixed by default: the data do not change while finetuning,
#: and learning them costs the first layer's input gradient, ~10% of a small net's step)
TRAINABLE = ("weights", "biases", "scales", "input_scales")
#: what learns by default
DEFAULT_TRAIN = ("weights", "biases", "scales")

#: QuantizeLinear / DequantizeLinear versions converted (their schemas' since_version)
QDQ_VERSIONS = (10, 13, 19, 21, 23, 24, 25)


@dataclass
class Conversion:
    """The settings and state of one conversion."""

    method: str = "ste"
    train: tuple[str, ...] = DEFAULT_TRAIN
    grad_scale: float | None = None
    activations: dict[tuple[str, ...], M.ActivationFakeQuant] = field(default_factory=dict)
    #: tensor name -> the fake-quant module that computes it
    quantizers: dict[str, M.ActivationFakeQuant | M.WeightFakeQuant] = field(
        default_factory=dict)
    #: each Bias with the names of its op's input and weight
    biases: list[tuple[M.Bias, str, str]] = field(default_factory=list)
    #: tensors whose grid is fixed (the quant table's ``fixed`` entries: HardSigmoid's [0, 1],
    #: which emit's integer Add relies on): their fake-quant keeps it, whatever the method
    fixed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GraphqError(f"unknown QAT method {self.method!r}; methods: "
                              f"{', '.join(METHODS)}")
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown:
            raise GraphqError(f"unknown trainable group {unknown[0]!r}; groups: "
                              f"{', '.join(TRAINABLE)}")

    def fake_quant(self, scale: np.ndarray, zero_point: np.ndarray, qt: QType,
                   axis: int | None, weight: bool, graph_input: bool = False,
                   fixed: bool = False) -> FakeQuantize:
        """The fake-quant node for calibrated ``(scale, zero_point)``: ``ste`` keeps them,
        ``lsq`` learns the scale, ``pact`` learns an activation's clip where its grid allows
        (symmetric, or unsigned from zero) and the step size (LSQ) elsewhere. Which scales
        learn: ``scales`` in :attr:`train`, and ``input_scales`` for a ``graph_input``; a
        ``fixed`` grid is kept (``ste``)."""
        mid = (qt.qmin + qt.qmax + 1) // 2
        z = np.asarray(zero_point, np.int64)
        symmetric = bool(np.all(z == mid))
        method = "ste" if fixed else self.method
        if method == "pact" and (weight or not (symmetric or np.all(z == qt.qmin))):
            method = "lsq"
        kwargs = {"grad_scale": self.grad_scale} if method == "lsq" else {}
        group = "input_scales" if graph_input else "scales"
        return FakeQuantize(qt, symmetric=symmetric, axis=axis, method=method,
                            scale=np.asarray(scale, np.float32), zero_point=z,
                            learn_scale=group in self.train and method != "ste", **kwargs)

    def link_biases(self) -> None:
        """Put each int32 bias on the grid of its op's input and weight quantizers (once every
        node is converted: a bias may come before them in the graph)."""
        for bias, x, w in self.biases:
            xq, wq = self.quantizers.get(x), self.quantizers.get(w)
            if xq is not None and wq is not None:
                bias.link(xq.quant, wq.quant)


_ACTIVE: Conversion | None = None


@contextlib.contextmanager
def active(conversion: Conversion) -> Iterator[Conversion]:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, conversion
    try:
        yield conversion
    finally:
        _ACTIVE = previous


def _conversion() -> Conversion:
    return _ACTIVE if _ACTIVE is not None else Conversion()


def _initializer(graph, name: str, node) -> np.ndarray:
    if name not in graph.initializers:
        raise NotImplementedError(
            f"{node.operation_type} '{node.name}': input '{name}' must be a constant "
            "initializer for the QAT bridge")
    return numpy_helper.to_array(graph.initializers[name].proto)


def _qparams(node, graph, first: int) -> tuple[np.ndarray, np.ndarray, QType, str | None]:
    """``(scale, zero_point, qtype, zero point name)`` of a Q/DQ-like node whose scale is
    input ``first``."""
    if node.attributes.get("block_size", 0):
        raise NotImplementedError(f"'{node.name}': blocked quantization is not supported by "
                                  "the QAT bridge")
    names = node.input_values
    scale = _initializer(graph, names[first], node).astype(np.float32)
    zp_name = names[first + 1] if len(names) > first + 1 and names[first + 1] else None
    if zp_name is None:
        return scale, np.zeros(scale.shape, np.int64), qtype("uint8"), None
    proto = graph.initializers[zp_name].proto if zp_name in graph.initializers else None
    if proto is None:
        raise NotImplementedError(f"'{node.name}': zero point '{zp_name}' must be an "
                                  "initializer")
    zp = numpy_helper.to_array(proto)
    return scale, zp.astype(np.int64), qtype_of_storage(zp.dtype), zp_name


def _axis(node, scale: np.ndarray) -> int | None:
    return None if scale.size == 1 and scale.ndim <= 1 else int(node.attributes.get("axis", 1))


def _per_tensor(scale: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (scale.reshape(()), zp.reshape(())) if scale.size == 1 else (scale, zp)


def _fake_quant(node, graph):
    conv = _conversion()
    scale, zp, qt, zp_name = _qparams(node, graph, 1)
    names = node.input_values
    key = (names[1], zp_name or "")
    module = conv.activations.get(key)
    if module is None:
        s, z = _per_tensor(scale, zp)
        quant = conv.fake_quant(s, z, qt, _axis(node, scale), weight=False,
                                graph_input=names[0] in graph.input_values,
                                fixed=names[0] in conv.fixed)
        module = M.ActivationFakeQuant(quant, {"scale": names[1], "zero_point": zp_name})
        conv.activations[key] = module
    conv.quantizers[node.output_values[0]] = module
    return converter_result(module, node, (names[0],))


def _weight_fake_quant(node, graph):
    conv = _conversion()
    scale, zp, qt, zp_name = _qparams(node, graph, 1)
    names = node.input_values
    values = _initializer(graph, names[0], node)
    axis = _axis(node, scale)
    s, z = _per_tensor(scale, zp)
    if not np.issubdtype(values.dtype, np.floating):  # deploy form: integers, dequantized
        weight = Q.dequantize(values, s, z, axis)
        onnx_names = {"weight": None, "quantized": names[0]}
    else:
        weight = values
        onnx_names = {"weight": names[0], "quantized": None}
    onnx_names.update(scale=names[1], zero_point=zp_name)
    quant = conv.fake_quant(s, z, qt, axis, weight=True)
    module = M.WeightFakeQuant(weight, quant, onnx_names, "weights" in conv.train)
    conv.quantizers[node.output_values[0]] = module
    return converter_result(module, node, ())


def _bias(node, graph):
    conv = _conversion()
    names = node.input_values
    scale, zp, _, zp_name = _qparams(node, graph, 1)
    value = Q.dequantize(_initializer(graph, names[0], node), scale, zp, _axis(node, scale))
    module = M.Bias(value, {"quantized": names[0], "scale": names[1], "zero_point": zp_name},
                    "biases" in conv.train, scale)
    operands = (node.attributes.get("input"), node.attributes.get("weight"))
    if operands[0] and operands[1]:
        conv.biases.append((module, operands[0], operands[1]))
    return converter_result(module, node, ())


def _param(node, graph):
    conv = _conversion()
    name = node.input_values[0]
    value = _initializer(graph, name, node)
    trainable = ("biases" if value.ndim == 1 else "weights") in conv.train
    return converter_result(M.Param(value, name, trainable), node, ())


def _conv(node, graph):
    shape = graph.value_info.get(node.input_values[1])
    rank = None
    if shape is not None and shape.type.tensor_type.HasField("shape"):
        rank = len(shape.type.tensor_type.shape.dim) - 2
    kernel = node.attributes.get("kernel_shape")
    spatial = len(kernel) if kernel is not None else rank
    if spatial is None:
        raise NotImplementedError(f"{node.operation_type} '{node.name}': spatial rank unknown "
                                  "(no kernel_shape and no shape for the weight)")
    return converter_result(M.Conv(node.operation_type, dict(node.attributes), spatial,
                                   node.name), node)


def _quantize_linear(node, graph):
    scale, zp, qt, _ = _qparams(node, graph, 1)
    s, z = _per_tensor(scale, zp)
    return converter_result(M.QuantizeLinear(s, z, qt, int(node.attributes.get("axis", 1))), node,
                   (node.input_values[0],))


def _dequantize_linear(node, graph):
    scale, zp, _, _ = _qparams(node, graph, 1)
    s, z = _per_tensor(scale, zp)
    return converter_result(M.DequantizeLinear(s, z, int(node.attributes.get("axis", 1))), node,
                   (node.input_values[0],))


_registered = False


def register() -> None:
    """Register graphq's converters with onnx2torch (once)."""
    global _registered
    if _registered:
        return
    from onnx2torch.node_converters.registry import add_converter

    for op, fn in (("FakeQuant", _fake_quant), ("WeightFakeQuant", _weight_fake_quant),
                   ("Bias", _bias), ("Param", _param), ("Conv", _conv),
                   ("ConvTranspose", _conv)):
        add_converter(operation_type=op, version=1, domain=DOMAIN)(fn)
    for version in QDQ_VERSIONS:
        add_converter(operation_type="QuantizeLinear", version=version)(_quantize_linear)
        add_converter(operation_type="DequantizeLinear", version=version)(_dequantize_linear)
    from graphq.qat import ops

    ops.register()
    _registered = True
