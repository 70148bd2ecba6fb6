"""Converters for the ONNX op versions onnx2torch 1.5.15 lacks.

onnx2torch looks a converter up by ``(domain, op_type, since_version)``, where
``since_version`` is that of the op's schema at the model's opset. Its registry stops at about
opset 16, so a model at opset 17-21 fails on the first op whose schema changed since
(``Constant`` at 19, ``ReduceMean`` at 18, ``Transpose`` at 21, ...). :func:`register` fills
every such gap up to opset 21, deciding from what onnx's Changelog says changed:

Same converter, new version (:data:`_SAME_AS`): the newer schema only widens the types
(bfloat16, float8, int4, string), so onnx2torch's converter of the previous version is
registered again.

New converters (:data:`_CONVERTERS`), where the change has semantics:

- ``Reduce{L1,L2,LogSum,LogSumExp,Max,Mean,Min,Prod,SumSquare}`` 18 (and ``ReduceMax``,
  ``ReduceMin`` 20, which add bool): ``axes`` moved from an attribute to an optional input, and
  ``noop_with_empty_axes`` says whether empty axes mean all axes or none.
- ``Reshape`` 14, 19, 21: ``allowzero=1`` (a 0 in the shape is a real 0, not "copy the input
  dimension"). onnx2torch refuses it, so its Reshape-14 is replaced.
- ``Shape`` 19, 21 (new types only) and 1, 13, 15 (replaced): onnx2torch's Shape builds its
  result with ``torch.tensor(list)``, which is float32 when empty (a scalar input, or
  ``start >= end``); ONNX's is always int64.
- ``Pad`` 18, 19, 21: optional ``axes`` input (18), ``wrap`` mode (19).
- ``Split`` 18: ``num_outputs`` attribute; uneven splits (the last chunk is smaller).
- ``Resize`` 18, 19: ``axes`` attribute (18); other new attributes are refused with a reason.
- ``AveragePool`` 19: ``dilations`` (only all-ones converts: torch's avg_pool has none); and
  7, 10, 11 (replaced) with asymmetric ``pads``, which onnx2torch refuses (inception_v1 has
  ``pads=[0, 0, 1, 1]``).
- ``Dropout`` 10, 12, 13 (replaced): onnx2torch's returns only ``output`` when the node also
  has its ``mask`` output, so consumers of ``output`` get the first row of the batch
  (alexnet, vgg19 and squeezenet from onnx's model zoo).
- ``Gather`` 1, 11, 13 (replaced): onnx2torch's indexes with a tensor, whose CPU backward
  sums repeated indices in a nondeterministic order; this one uses ``index_select``, whose
  backward is deterministic, so a trainable embedding table finetunes the same every run.
- ``IsInf`` 10, 20: ``detect_positive`` / ``detect_negative``, which onnx2torch's IsInf-10
  ignores, so it is replaced.
- ``ScatterND`` 16, 18: ``reduction`` add/mul (16), max/min (18); onnx2torch's ScatterND-16
  refuses every reduction, so it is replaced.
- ``Cast`` 13, 19, 21: bfloat16 and unsigned 16/32/64-bit targets (onnx2torch's Cast-13
  refuses them, so it is replaced); float8 and int4 targets are refused.

Ops onnx2torch lacks entirely: ``CastLike`` 15/19/21, ``Gelu`` 20, ``GroupNormalization``
18/21, ``Mish`` 18, ``Trilu`` 14, ``Size`` 1/13/19/21, ``ScatterElements`` 11/13/16/18,
``GlobalMaxPool`` 1, ``ThresholdedRelu`` 10 and ``Sinh``/``Cosh``/``Asinh``/``Acosh``/``Atanh`` 9.

Replacing one of onnx2torch's own registrations is limited to :data:`_REPLACED`; a version
onnx2torch registers otherwise is left to it. The torch modules here are plain
``nn.Module``s: onnx2torch's ``OnnxToTorchModule`` marker cannot be a base class at import
time, since onnx2torch is imported only through :mod:`graphq.qat._o2t`, which calls
:func:`register`.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import nn

from graphq.qat.modules import torch_pads

log = logging.getLogger(__name__)

Converter = Callable[[Any, Any], Any]

# ---------------------------------------------------------------------------------------------
# onnx2torch helpers (imported by graphq.qat._o2t before any converter here runs)
# ---------------------------------------------------------------------------------------------

_ORIGINAL: dict[tuple[str, int], Converter] = {}
"""onnx2torch's own converters of the versions replaced or delegated to, kept by register()."""


def _common() -> Any:
    return importlib.import_module("onnx2torch.utils.common")


def converter_result(module: nn.Module, node: Any, inputs: Sequence[str] | None = None
                     ) -> Any:
    """The converter result: ``module`` reads ``inputs`` (default: all node inputs)."""
    common = _common()
    mapping = common.OnnxMapping(inputs=tuple(node.input_values if inputs is None else inputs),
                                 outputs=node.output_values)
    return common.OperationConverterResult(torch_module=module, onnx_mapping=mapping)


def _optional_input(node: Any, index: int) -> str:
    """Name of input ``index``, or "" where it is absent."""
    return node.input_values[index] if len(node.input_values) > index else ""


def _constant(name: str, graph: Any) -> torch.Tensor | None:
    """The value of an initializer or Constant output, or None for a computed tensor."""
    if not name:
        return None
    try:
        value = _common().get_const_value(name, graph)
    except KeyError:
        return None
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _delegate(op: str, version: int, node: Any, graph: Any) -> Any:
    """Convert ``node`` with onnx2torch's own converter of ``op``-``version``."""
    return _ORIGINAL[(op, version)](node, graph)


# ---------------------------------------------------------------------------------------------
# Reduce* 18 / 20: axes is an input
# ---------------------------------------------------------------------------------------------


def _sum(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    """``torch.sum`` over ``dims``; no dims is no reduction (torch would reduce all)."""
    return torch.sum(x, dims, keepdim=keepdim) if dims else x


def _along(reduce: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A reduction for which reducing over no axis is the identity."""
    def apply(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
        return reduce(x, dims, keepdim=keepdim) if dims else x
    return apply


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for dim in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, dim, keepdim=keepdim)
    return x


_REDUCERS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceL1": lambda x, d, k: _sum(torch.abs(x), d, k),
    "ReduceL2": lambda x, d, k: torch.sqrt(_sum(x * x, d, k)),
    "ReduceLogSum": lambda x, d, k: torch.log(_sum(x, d, k)),
    "ReduceLogSumExp": _along(torch.logsumexp),
    "ReduceMax": _along(torch.amax),
    "ReduceMean": _along(torch.mean),
    "ReduceMin": _along(torch.amin),
    "ReduceProd": _prod,
    "ReduceSumSquare": lambda x, d, k: _sum(x * x, d, k),
}
"""``(x, dims, keepdim)`` -> reduction of ``x`` over ``dims`` (none: only the elementwise part,
e.g. ``ReduceL1`` gives ``|x|`` and ``ReduceSumSquare`` ``x * x``)."""


class OnnxReduce(nn.Module):
    """ONNX ``Reduce*`` from opset 18.

    ``axes`` comes from a constant (``static_axes``) or the second input. No axes, or empty
    ones, mean all axes; with ``noop_with_empty_axes`` they mean no axis, and only the op's
    elementwise part applies (``ReduceLogSum`` gives ``log(x)``), as in onnx's reference
    implementation and onnxruntime.
    """

    def __init__(self, op_type: str, keepdims: bool, noop_with_empty_axes: bool,
                 static_axes: list[int] | None = None):
        super().__init__()
        self.op_type = op_type
        self.keepdims = keepdims
        self.noop_with_empty_axes = noop_with_empty_axes
        self.static_axes = static_axes

    def forward(self, data: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = axes.tolist() if axes is not None else self.static_axes or []
        if not dims and not self.noop_with_empty_axes:
            dims = list(range(data.dim()))
        return _REDUCERS[self.op_type](data, dims, self.keepdims)


def _reduce(node: Any, graph: Any) -> Any:
    attrs = node.attributes
    axes_name = _optional_input(node, 1)
    static = _constant(axes_name, graph)
    module = OnnxReduce(node.operation_type, keepdims=bool(attrs.get("keepdims", 1)),
                        noop_with_empty_axes=bool(attrs.get("noop_with_empty_axes", 0)),
                        static_axes=None if static is None else static.tolist())
    if axes_name and static is None:
        return converter_result(module, node)
    return converter_result(module, node, node.input_values[:1])


# ---------------------------------------------------------------------------------------------
# Reshape 14 / 19 / 21: allowzero; Shape: int64 when empty
# ---------------------------------------------------------------------------------------------


class OnnxReshapeAllowZero(nn.Module):
    """ONNX ``Reshape`` with ``allowzero=1``: a 0 in ``shape`` is a dimension of size 0."""

    def forward(self, data: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(data, shape.tolist())


def _reshape(node: Any, graph: Any) -> Any:
    if not node.attributes.get("allowzero", 0):
        return _delegate("Reshape", 14, node, graph)
    return converter_result(OnnxReshapeAllowZero(), node)


class OnnxShape(nn.Module):
    """ONNX ``Shape``: the int64 dimensions ``start:end`` (Python slice clamping, as the spec)."""

    def __init__(self, start: int, end: int | None):
        super().__init__()
        self.start = start
        self.end = end

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        return torch.tensor(data.shape[self.start:self.end], dtype=torch.int64,
                            device=data.device)


def _shape(node: Any, graph: Any) -> Any:
    module = OnnxShape(node.attributes.get("start", 0), node.attributes.get("end"))
    return converter_result(module, node)


# ---------------------------------------------------------------------------------------------
# Pad 18 / 19 / 21: axes input, wrap mode
# ---------------------------------------------------------------------------------------------

_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _source_index(begin: int, end: int, size: int, mode: str) -> torch.Tensor:
    """Index into an axis of ``size`` for each position of the axis padded by begin/end.

    Position ``j`` (``-begin <= j < size + end``) reads ``j`` clamped (edge), mirrored about
    the first and last element (reflect), or modulo ``size`` (wrap). Negative pads crop.
    """
    j = torch.arange(-begin, size + end)
    if mode == "edge":
        return j.clamp(0, size - 1)
    if mode == "wrap":
        return j.remainder(size)
    period = max(2 * size - 2, 1)
    j = j.remainder(period)
    return torch.where(j >= size, period - j, j)


class OnnxPad(nn.Module):
    """ONNX ``Pad`` from opset 18: ``pads`` (begins then ends) on ``axes`` (default: all).

    ``constant`` mode is ``F.pad``; ``reflect``, ``edge`` and ``wrap`` gather each padded
    axis with :func:`_source_index`, so they work on any axis of any rank.
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, data: torch.Tensor, pads: torch.Tensor,
                constant_value: torch.Tensor | None = None,
                axes: torch.Tensor | None = None) -> torch.Tensor:
        rank = data.dim()
        dims = list(range(rank)) if axes is None else [a % rank for a in axes.tolist()]
        values = pads.tolist()
        begins, ends = values[: len(dims)], values[len(dims):]
        if self.mode == "constant":
            flat = [0] * (2 * rank)
            for dim, begin, end in zip(dims, begins, ends, strict=True):
                flat[2 * (rank - 1 - dim)] = begin
                flat[2 * (rank - 1 - dim) + 1] = end
            value = 0 if constant_value is None else constant_value.reshape(()).item()
            return F.pad(data, flat, value=value)
        for dim, begin, end in zip(dims, begins, ends, strict=True):
            if begin or end:
                index = _source_index(begin, end, data.shape[dim], self.mode).to(data.device)
                data = torch.index_select(data, dim, index)
        return data


def _pad(node: Any, graph: Any) -> Any:
    mode = node.attributes.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad mode {mode!r} is not one of {_PAD_MODES}")
    return converter_result(OnnxPad(mode), node)


# ---------------------------------------------------------------------------------------------
# Split 18: num_outputs
# ---------------------------------------------------------------------------------------------


class OnnxSplit(nn.Module):
    """ONNX ``Split`` from opset 18: sizes from the ``split`` input, else ``num_outputs``
    chunks of ``ceil(dim / num_outputs)`` (the last one smaller)."""

    def __init__(self, axis: int, num_outputs: int):
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs

    def forward(self, data: torch.Tensor,
                split: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if split is not None:
            sizes: int | list[int] = split.tolist()
        else:
            sizes = math.ceil(data.shape[self.axis] / self.num_outputs)
        chunks = torch.split(data, sizes, dim=self.axis)
        # onnx2torch indexes a node's result only when the node has several outputs
        return chunks[0] if self.num_outputs == 1 else chunks


def _split(node: Any, graph: Any) -> Any:
    outputs = len(node.output_values)
    num_outputs = node.attributes.get("num_outputs", outputs)
    if num_outputs != outputs:
        raise NotImplementedError(f"Split has num_outputs={num_outputs} but {outputs} outputs")
    return converter_result(OnnxSplit(node.attributes.get("axis", 0), num_outputs), node)


# ---------------------------------------------------------------------------------------------
# Resize 18 / 19: axes
# ---------------------------------------------------------------------------------------------


class OnnxResizeAxes(nn.Module):
    """Resize with ``scales`` / ``sizes`` given for ``axes`` only: the others keep their size."""

    def __init__(self, resize: nn.Module, axes: list[int]):
        super().__init__()
        self.resize = resize
        self.axes = axes

    def forward(self, data: torch.Tensor, roi: torch.Tensor | None = None,
                scales: torch.Tensor | None = None,
                sizes: torch.Tensor | None = None) -> torch.Tensor:
        dims = [a % data.dim() for a in self.axes]
        if scales is not None and scales.numel():
            full = torch.ones(data.dim(), dtype=scales.dtype, device=scales.device)
            full[dims] = scales
            scales = full
        if sizes is not None and sizes.numel():
            full = torch.tensor(data.shape, dtype=sizes.dtype, device=sizes.device)
            full[dims] = sizes
            sizes = full
        return self.resize(data, roi, scales, sizes)


def _resize(node: Any, graph: Any) -> Any:
    attrs = node.attributes
    refused = {
        "antialias": attrs.get("antialias", 0) != 0,
        "keep_aspect_ratio_policy": attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch",
        "coordinate_transformation_mode=half_pixel_symmetric":
            attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric",
    }
    for name, present in refused.items():
        if present:
            raise NotImplementedError(f"Resize {name} is not implemented")
    converted = _delegate("Resize", 13, node, graph)
    axes = attrs.get("axes")
    if axes is None:
        return converted
    return converter_result(OnnxResizeAxes(converted.torch_module, list(axes)), node,
                   converted.onnx_mapping.inputs)


# ---------------------------------------------------------------------------------------------
# AveragePool 7-19: asymmetric pads, dilations
# ---------------------------------------------------------------------------------------------

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class OnnxAveragePoolPadded(nn.Module):
    """ONNX ``AveragePool`` with asymmetric ``pads`` (onnx pads: begins, then ends).

    The input is zero-padded explicitly and pooled without padding, which gives each window's
    sum over ``prod(kernel)``. With ``count_include_pad=0`` that is divided by the same pool of
    a padded ones tensor (the fraction of the window that is input), leaving the mean of the
    input elements only.
    """

    def __init__(self, kernel: list[int], strides: list[int], pads: list[int],
                 count_include_pad: bool):
        super().__init__()
        self.kernel = kernel
        self.strides = strides
        self.pads = torch_pads(pads)
        self.count_include_pad = count_include_pad

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return _AVG_POOL[len(self.kernel)](F.pad(x, self.pads), self.kernel, self.strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self._pool(x)
        if self.count_include_pad:
            return pooled
        return pooled / self._pool(torch.ones_like(x[:1, :1]))


def _average_pool(node: Any, graph: Any) -> Any:
    attrs = node.attributes
    dilations = attrs.get("dilations")
    if dilations is not None and any(d != 1 for d in dilations):
        raise NotImplementedError(f"AveragePool with dilations {list(dilations)}: torch's "
                                  "avg_pool has no dilation")
    kernel = list(attrs["kernel_shape"])
    spatial = len(kernel)
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    if attrs.get("auto_pad", "NOTSET") != "NOTSET" or pads[:spatial] == pads[spatial:]:
        return _delegate("AveragePool", 11, node, graph)
    if attrs.get("ceil_mode", 0):
        raise NotImplementedError("AveragePool with asymmetric pads and ceil_mode=1")
    if spatial not in _AVG_POOL:
        raise NotImplementedError(f"AveragePool over {spatial} spatial axes")
    module = OnnxAveragePoolPadded(kernel, list(attrs.get("strides", [1] * spatial)), pads,
                                   bool(attrs.get("count_include_pad", 0)))
    return converter_result(module, node)


# ---------------------------------------------------------------------------------------------
# Dropout 10-13: the mask output
# ---------------------------------------------------------------------------------------------


class OnnxDropout(nn.Module):
    """ONNX ``Dropout``; outputs ``(output, mask)`` when the node lists its ``mask`` output.

    Like onnx2torch's, it drops only in torch training mode (``training_mode`` is ignored);
    ``ratio`` is the attribute (opset 10) or the input (12+), default 0.5. ``seed`` is ignored.
    """

    def __init__(self, ratio: float, with_mask: bool):
        super().__init__()
        self.ratio = ratio
        self.with_mask = with_mask

    def forward(self, data: torch.Tensor, ratio: torch.Tensor | None = None,
                training_mode: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        p = self.ratio if ratio is None else float(ratio)
        if not self.with_mask:
            return F.dropout(data, p, self.training)
        if not self.training or p == 0:
            return data, torch.ones_like(data, dtype=torch.bool)
        mask = torch.rand_like(data, dtype=torch.float32) >= p
        return data * mask / (1 - p), mask


def _dropout(node: Any, graph: Any) -> Any:
    # a second output, even unnamed, makes onnx2torch index the result
    with_mask = len(node.output_values) > 1
    module = OnnxDropout(node.attributes.get("ratio", 0.5), with_mask)
    return converter_result(module, node)


# ---------------------------------------------------------------------------------------------
# IsInf 10 / 20: detect_positive, detect_negative
# ---------------------------------------------------------------------------------------------


class OnnxIsInf(nn.Module):
    """ONNX ``IsInf``: true at +inf if ``detect_positive``, at -inf if ``detect_negative``."""

    def __init__(self, detect_positive: bool, detect_negative: bool):
        super().__init__()
        self.detect_positive = detect_positive
        self.detect_negative = detect_negative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = torch.zeros_like(x, dtype=torch.bool)
        if self.detect_positive:
            found = found | torch.isposinf(x)
        if self.detect_negative:
            found = found | torch.isneginf(x)
        return found


def _is_inf(node: Any, graph: Any) -> Any:
    attrs = node.attributes
    module = OnnxIsInf(bool(attrs.get("detect_positive", 1)),
                       bool(attrs.get("detect_negative", 1)))
    return converter_result(module, node)


# ---------------------------------------------------------------------------------------------
# Gather 1 / 11 / 13: a deterministic gradient
# ---------------------------------------------------------------------------------------------


class OnnxGather(nn.Module):
    """ONNX ``Gather`` (numpy's ``take`` along ``axis``) through ``torch.index_select``.

    onnx2torch's Gather indexes with a tensor (``data[:, indices]``), whose CPU backward
    accumulates repeated indices in a nondeterministic order: a trainable embedding table
    (an int8 Gather table in QAT) then learns different values run to run. index_select's
    backward adds the rows in index order. Negative indices count from the end, and indices of
    any rank (a scalar drops the axis) are flattened and the result reshaped.
    """

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        axis = self.axis % data.dim()
        size = data.shape[axis]
        flat = indices.reshape(-1).long()
        flat = torch.where(flat < 0, flat + size, flat)
        taken = torch.index_select(data, axis, flat)
        shape = (*data.shape[:axis], *indices.shape, *data.shape[axis + 1:])
        return taken.reshape(shape)


def _gather(node: Any, graph: Any) -> Any:
    return converter_result(OnnxGather(node.attributes.get("axis", 0)), node)


# ---------------------------------------------------------------------------------------------
# ScatterND 16 / 18, ScatterElements 11-18: reduction
# ---------------------------------------------------------------------------------------------

_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_reduction(node: Any) -> str:
    reduction = node.attributes.get("reduction", "none")
    if reduction != "none" and reduction not in _SCATTER_REDUCE:
        raise NotImplementedError(f"{node.operation_type} reduction {reduction!r}")
    return reduction


class OnnxScatterND(nn.Module):
    """ONNX ``ScatterND``: ``data[indices[..., :]] (op)= updates``.

    The ``k = indices.shape[-1]`` leading axes of ``data`` are flattened to one, the index
    tuples become row numbers of that view, and the rows are scattered (``index_copy``) or
    reduced into (``scatter_reduce`` with the existing value included).
    """

    def __init__(self, reduction: str):
        super().__init__()
        self.reduction = reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor,
                updates: torch.Tensor) -> torch.Tensor:
        k = indices.shape[-1]
        lead = torch.tensor(data.shape[:k], device=indices.device)
        indices = torch.where(indices < 0, indices + lead, indices)
        strides = torch.ones(k, dtype=indices.dtype, device=indices.device)
        if k > 1:
            strides[:-1] = torch.flip(torch.cumprod(torch.flip(lead[1:], [0]), 0), [0])
        rows = (indices * strides).sum(-1).reshape(-1)
        tail = data.shape[k:]
        table = data.reshape(-1, *tail)
        values = updates.reshape(-1, *tail)
        if self.reduction == "none":
            return table.index_copy(0, rows, values).reshape(data.shape)
        index = rows.reshape(-1, *[1] * len(tail)).expand_as(values)
        out = table.scatter_reduce(0, index, values, _SCATTER_REDUCE[self.reduction])
        return out.reshape(data.shape)


class OnnxScatterElements(nn.Module):
    """ONNX ``ScatterElements``: ``torch.scatter`` / ``scatter_reduce`` on ``axis``."""

    def __init__(self, axis: int, reduction: str):
        super().__init__()
        self.axis = axis
        self.reduction = reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor,
                updates: torch.Tensor) -> torch.Tensor:
        indices = indices.long()  # int32 or int64 in ONNX; torch.scatter takes int64
        indices = torch.where(indices < 0, indices + data.shape[self.axis], indices)
        if self.reduction == "none":
            return torch.scatter(data, self.axis, indices, updates)
        return torch.scatter_reduce(data, self.axis, indices, updates,
                                    _SCATTER_REDUCE[self.reduction])


def _scatter_nd(node: Any, graph: Any) -> Any:
    return converter_result(OnnxScatterND(_scatter_reduction(node)), node)


def _scatter_elements(node: Any, graph: Any) -> Any:
    module = OnnxScatterElements(node.attributes.get("axis", 0), _scatter_reduction(node))
    return converter_result(module, node)


# ---------------------------------------------------------------------------------------------
# Cast 13 / 19 / 21, CastLike
# ---------------------------------------------------------------------------------------------

_TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
    TensorProto.COMPLEX64: torch.complex64,
    TensorProto.COMPLEX128: torch.complex128,
}


class OnnxCast(nn.Module):
    """ONNX ``Cast`` to a fixed dtype (float to int truncates toward zero, as C does)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


class OnnxCastLike(nn.Module):
    """ONNX ``CastLike``: ``x`` cast to the dtype of ``like``."""

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)


def _cast(node: Any, graph: Any) -> Any:
    to = node.attributes["to"]
    if to not in _TORCH_DTYPES:
        name = TensorProto.DataType.Name(to)
        raise NotImplementedError(f"Cast to {name} is not implemented")
    return converter_result(OnnxCast(_TORCH_DTYPES[to]), node)


def _cast_like(node: Any, graph: Any) -> Any:
    return converter_result(OnnxCastLike(), node)


# ---------------------------------------------------------------------------------------------
# ops onnx2torch lacks
# ---------------------------------------------------------------------------------------------


class OnnxGroupNorm(nn.Module):
    """ONNX ``GroupNormalization``: ``F.group_norm`` with per-channel ``scale`` and ``bias``.

    Opset 18 gives ``scale`` and ``bias`` per group; they are repeated over each group's
    channels (``per_group``). ``stash_type=1`` (the default) computes in float32.
    """

    def __init__(self, num_groups: int, epsilon: float, per_group: bool, float32: bool):
        super().__init__()
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.per_group = per_group
        self.float32 = float32

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.per_group:
            repeat = x.shape[1] // self.num_groups
            scale = scale.repeat_interleave(repeat)
            bias = bias.repeat_interleave(repeat)
        dtype = torch.float32 if self.float32 else x.dtype
        y = F.group_norm(x.to(dtype), self.num_groups, scale.to(dtype), bias.to(dtype),
                         self.epsilon)
        return y.to(x.dtype)


class OnnxTrilu(nn.Module):
    """ONNX ``Trilu``: ``torch.triu`` / ``torch.tril`` of the last two axes, diagonal ``k``."""

    def __init__(self, upper: bool):
        super().__init__()
        self.upper = upper

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        diagonal = 0 if k is None else int(k)
        return torch.triu(x, diagonal) if self.upper else torch.tril(x, diagonal)


class OnnxSize(nn.Module):
    """ONNX ``Size``: the element count as an int64 scalar."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


class OnnxGlobalMaxPool(nn.Module):
    """ONNX ``GlobalMaxPool``: the maximum over the spatial axes (2 and up), kept as 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


_ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
}


class OnnxElementwise(nn.Module):
    """A one-input ONNX math op from :data:`_ELEMENTWISE`."""

    def __init__(self, op_type: str):
        super().__init__()
        self.op_type = op_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ELEMENTWISE[self.op_type](x)


def _gelu(node: Any, graph: Any) -> Any:
    return converter_result(nn.GELU(approximate=node.attributes.get("approximate", "none")), node)


def _group_norm_18(node: Any, graph: Any) -> Any:
    attrs = node.attributes
    module = OnnxGroupNorm(attrs["num_groups"], attrs.get("epsilon", 1e-5), per_group=True,
                           float32=True)
    return converter_result(module, node)


def _group_norm_21(node: Any, graph: Any) -> Any:
    attrs = node.attributes
    module = OnnxGroupNorm(attrs["num_groups"], attrs.get("epsilon", 1e-5), per_group=False,
                           float32=bool(attrs.get("stash_type", 1)))
    return converter_result(module, node)


def _mish(node: Any, graph: Any) -> Any:
    return converter_result(nn.Mish(), node)


def _trilu(node: Any, graph: Any) -> Any:
    return converter_result(OnnxTrilu(bool(node.attributes.get("upper", 1))), node)


def _size(node: Any, graph: Any) -> Any:
    return converter_result(OnnxSize(), node)


def _global_max_pool(node: Any, graph: Any) -> Any:
    return converter_result(OnnxGlobalMaxPool(), node)


def _thresholded_relu(node: Any, graph: Any) -> Any:
    return converter_result(nn.Threshold(node.attributes.get("alpha", 1.0), 0.0), node)


def _elementwise(node: Any, graph: Any) -> Any:
    return converter_result(OnnxElementwise(node.operation_type), node)


# ---------------------------------------------------------------------------------------------
# the tables and register()
# ---------------------------------------------------------------------------------------------

_SAME_AS: dict[str, tuple[int, tuple[int, ...]]] = {
    # op: (onnx2torch's version whose converter still applies, the newer versions)
    "Constant": (13, (19, 21)),  # float8 (19), int4/uint4 (21) values
    "ConstantOfShape": (9, (20, 21)),  # bfloat16/float8 (20), int4/uint4 (21) values
    "Equal": (13, (19,)),  # string inputs
    "Flatten": (13, (21,)),  # float8, int4/uint4
    "GreaterOrEqual": (12, (16,)),  # bfloat16
    "LessOrEqual": (12, (16,)),  # bfloat16
    "Identity": (16, (19, 21)),  # float8 (19), int4/uint4 (21)
    "IsNaN": (13, (20,)),  # float8
    "Transpose": (13, (21,)),  # float8, int4/uint4
    "Unsqueeze": (13, (21,)),  # float8, int4/uint4
}

_CONVERTERS: tuple[tuple[str, tuple[int, ...], Converter], ...] = (
    *((op, (18, 20) if op in ("ReduceMax", "ReduceMin") else (18,), _reduce)
      for op in _REDUCERS),
    ("Reshape", (14, 19, 21), _reshape),
    ("Shape", (1, 13, 15, 19, 21), _shape),
    ("Pad", (18, 19, 21), _pad),
    ("Split", (18,), _split),
    ("Resize", (18, 19), _resize),
    ("AveragePool", (7, 10, 11, 19), _average_pool),
    ("Dropout", (10, 12, 13), _dropout),
    ("IsInf", (10, 20), _is_inf),
    ("Gather", (1, 11, 13), _gather),
    ("ScatterND", (16, 18), _scatter_nd),
    ("Cast", (13, 19, 21), _cast),
    ("CastLike", (15, 19, 21), _cast_like),
    ("Gelu", (20,), _gelu),
    ("GroupNormalization", (18,), _group_norm_18),
    ("GroupNormalization", (21,), _group_norm_21),
    ("Mish", (18,), _mish),
    ("Trilu", (14,), _trilu),
    ("Size", (1, 13, 19, 21), _size),
    ("ScatterElements", (11, 13, 16, 18), _scatter_elements),
    ("GlobalMaxPool", (1,), _global_max_pool),
    ("ThresholdedRelu", (10,), _thresholded_relu),
    *((op, (9,), _elementwise) for op in _ELEMENTWISE),
)

_REPLACED = {
    ("AveragePool", 7), ("AveragePool", 10), ("AveragePool", 11), ("Cast", 13), ("Dropout", 10),
    ("Dropout", 12), ("Dropout", 13), ("Gather", 1), ("Gather", 11), ("Gather", 13),
    ("IsInf", 10), ("Reshape", 14), ("ScatterND", 16),
    ("Shape", 1), ("Shape", 13), ("Shape", 15),
}
"""onnx2torch registrations replaced (it refuses or ignores part of that version's spec)."""

_DELEGATES = {("Reshape", 14), ("Resize", 13), ("AveragePool", 11)}
"""onnx2torch converters the new ones call for the cases they already handle."""


def register() -> None:
    """Add the converters above to onnx2torch's registry (idempotent)."""
    from onnx2torch.node_converters import registry

    table = registry._CONVERTER_REGISTRY

    def key(op: str, version: int) -> Any:
        return registry.OperationDescription(domain="", operation_type=op, version=version)

    for op, version in _REPLACED | _DELEGATES:
        current = table[key(op, version)]
        if current.__module__ != __name__:
            _ORIGINAL[(op, version)] = current
    for op, (base, versions) in _SAME_AS.items():
        for version in versions:
            if key(op, version) not in table:
                registry.add_converter(op, version)(table[key(op, base)])
    for op, versions, converter in _CONVERTERS:
        for version in versions:
            if (op, version) in _REPLACED:
                table[key(op, version)] = converter
            elif key(op, version) not in table:
                registry.add_converter(op, version)(converter)
    log.debug("onnx2torch converters registered for %d op versions",
              sum(len(versions) for _, versions, _ in _CONVERTERS))
