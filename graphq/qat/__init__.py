"""The QAT bridge: an ONNX graph into PyTorch for finetuning, and its learned values back.

::

    from graphq import qat

    bridge = qat.prepare("out/model.fakequant.onnx", method="lsq")
    opt = torch.optim.Adam(bridge.param_groups(1e-4))  # scales: steps relative to their size
    for x, y in loader:                       # the user's own loop
        loss = loss_fn(bridge.module(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    qat.emit(bridge.write_back(), "out/qat", eval_data="test.npz")

``prepare`` converts the graph through onnx2torch (:func:`to_torch`) with graphq's converters
for Q/DQ and the trainable weights; ``write_back`` puts the learned weights, biases and scales
onto the same ONNX graph by initializer name (no re-export: node names and structure stay);
``emit`` writes the deploy graph, fake-quant graph, quant record and report as post-training
quantization does. The ``qat`` pass (:mod:`graphq.passes.qat`) does all of it in a pipeline.

torch and onnx2torch are imported only here (see :mod:`graphq.qat._o2t`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphq import model as model_io
from graphq.errors import GraphqError, ModelError
from graphq.qat._o2t import INSTALL_HINT, onnx2torch
from graphq.quant import QuantTable
from graphq.runtime import true_inputs

try:
    import torch  # noqa: F401
except ImportError as _exc:
    raise GraphqError(f"torch is not installed; {INSTALL_HINT}") from _exc
from graphq.qat.converters import DEFAULT_TRAIN, METHODS, TRAINABLE, Conversion, active  # noqa: E402
from graphq.qat.modules import freeze_foreign  # noqa: E402

__all__ = ["DEFAULT_TRAIN", "METHODS", "TRAINABLE", "Bridge", "emit", "prepare", "to_torch"]

_CONTROL_FLOW = ("If", "Loop", "Scan")


def to_torch(model: str | Path | onnx.ModelProto, *, method: str = "ste",
             train: tuple[str, ...] | list[str] = DEFAULT_TRAIN,
             grad_scale: float | None = None, extra_outputs: list[str] | None = None,
             batch_norm: bool = False) -> Any:
    """``model`` (float, or with Q/DQ) as a ``torch.fx.GraphModule``.

    Q/DQ pairs become fake-quant modules (:class:`graphq.kernels.fakequant.FakeQuantize`)
    with the graph's scales and zero points and ``method``'s gradients (``ste``: scales
    fixed; ``lsq``: learned step size, ``grad_scale`` as LSQ's; ``pact``: learned clip on
    activations whose grid allows it, LSQ elsewhere); weights and biases of Conv /
    ConvTranspose / Gemm / MatMul become parameters; ``train`` picks which of weights,
    biases, scales and input_scales (of quantizers reading a graph input) require grad. The
    module's ``forward`` takes the graph's inputs in order and returns its output (a tuple
    for several, ``extra_outputs`` last). ``batch_norm``: the Convs that graphq's fold-bn
    folded a BatchNormalization into (recorded in the graph's metadata) train with batch
    normalization in the loop again (:class:`graphq.qat.modules.ConvBatchNorm`); write-back
    folds it back.
    """
    from graphq.qat.bridge import to_bridge_form

    proto = model if isinstance(model, onnx.ModelProto) else model_io.load(model)
    flow = sorted({n.op_type for n in proto.graph.node if n.op_type in _CONTROL_FLOW})
    if flow:
        raise ModelError(f"the graph holds {', '.join(flow)} (control flow): the QAT bridge "
                         "converts straight-line graphs only")
    o2t = onnx2torch()
    form = to_bridge_form(proto, extra_outputs)
    table = QuantTable.of(proto)
    fixed = frozenset(e.tensor for e in table.entries.values()
                      if e.quantized and e.method == "fixed") \
        if table is not None else frozenset()
    conversion = Conversion(method=method, train=tuple(train), grad_scale=grad_scale,
                            fixed=fixed)
    with active(conversion):
        try:
            module = o2t.convert(form.model)
        except NotImplementedError as exc:
            raise ModelError(f"cannot convert the graph to PyTorch: {_converter_message(exc)}"
                             ) from exc
    conversion.link_biases()
    freeze_foreign(module)
    module.graphq_counts = dict(form.counts)
    if batch_norm:
        from graphq.passes.fold_bn import folded_convs
        from graphq.qat.modules import train_batch_norm

        convs = folded_convs(proto)
        if not convs:
            raise GraphqError("batch_norm = true: the graph records no Conv that fold-bn "
                              "folded a BatchNormalization into (run graphq's fold-bn before "
                              "insert-qdq, or leave batch_norm off)")
        module.graphq_counts["batch_norms"] = train_batch_norm(module, convs)
    module.graphq_input_names = [i.name for i in true_inputs(proto)]
    return module


def _converter_message(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"domain='([^']*)', operation_type='([^']*)', version=(\d+)", text)
    if m:
        domain = f"{m.group(1)}::" if m.group(1) else ""
        return (f"no converter for {domain}{m.group(2)} (opset {m.group(3)}); run the "
                "'canonicalize' pass first, or report the op")
    return text


class Bridge:
    """A graph in PyTorch, ready to finetune; :meth:`write_back` returns the ONNX graph with
    the learned values."""

    def __init__(self, model: onnx.ModelProto, module: Any, stem: str = "model") -> None:
        import torch

        self.model = model
        self.module = module
        self.stem = stem
        self.input_names = list(module.graphq_input_names)
        self.output_names = [o.name for o in model.graph.output]
        self.device = torch.device("cpu")

    def parameters(self) -> Iterator[Any]:
        """The parameters that train (requires_grad)."""
        return (p for p in self.module.parameters() if p.requires_grad)

    def named_parameters(self) -> Iterator[tuple[str, Any]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)

    def param_groups(self, lr: float, scale_lr: float = 1.0) -> list[dict[str, Any]]:
        """The parameters that train as groups for a torch optimizer: weights and biases at
        ``lr``; each learned scale or PACT clip at ``lr * scale_lr * mean|value|`` (a step
        relative to its size, as the ``qat`` pass trains them) and without weight decay.
        ``parameters()`` at one ``lr`` moves a weight scale hundreds of times faster than
        its weights (see :func:`graphq.qat.train.param_groups`)."""
        from graphq.qat.train import param_groups

        return param_groups(self.module, lr, scale_lr)

    def to(self, device: Any) -> Bridge:
        import torch

        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def inputs(self, feed: Mapping[str, np.ndarray]) -> list[Any]:
        """A feed dict as the module's positional arguments, on the module's device."""
        import torch

        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise GraphqError(f"the feed has no input '{missing[0]}'; the graph's inputs: "
                              f"{', '.join(self.input_names)}")
        return [torch.as_tensor(np.asarray(feed[n])).to(self.device) for n in self.input_names]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> list[Any]:
        """Run the module on a feed dict; the outputs as a list."""
        out = self.module(*self.inputs(feed))
        return list(out) if isinstance(out, tuple | list) else [out]

    def freeze_batch_norm(self) -> int:
        """From now on the batch norms in the loop (``batch_norm=True``) train with their
        running statistics, as torch.ao's ``freeze_bn_stats``; returns how many."""
        from graphq.qat.modules import freeze_batch_norms

        return freeze_batch_norms(self.module)

    def write_back(self) -> onnx.ModelProto:
        """The graph :meth:`prepare` read, with the learned values (a new proto); batch
        norms trained in the loop are folded into their Convs first."""
        from graphq.qat.writeback import write_back

        return write_back(self.model, self.module)


def prepare(model: str | Path | onnx.ModelProto, *, method: str = "lsq",
            train: tuple[str, ...] | list[str] = DEFAULT_TRAIN,
            grad_scale: float | None = None, device: Any = None,
            extra_outputs: list[str] | None = None, batch_norm: bool = False) -> Bridge:
    """A :class:`Bridge` for ``model``: graphq's ``<stem>.fakequant.onnx`` (or any graph with
    Q/DQ pairs, or a float graph). Options as :func:`to_torch`; ``device`` e.g. ``"cuda"``."""
    proto = model_io.load(model)
    stem = "model" if isinstance(model, onnx.ModelProto) else Path(model).name.split(".")[0]
    module = to_torch(proto, method=method, train=train, grad_scale=grad_scale,
                      extra_outputs=extra_outputs, batch_norm=batch_norm)
    bridge = Bridge(proto, module, stem)
    if device is not None:
        bridge.to(device)
    return bridge


def emit(model: onnx.ModelProto, outdir: str | Path, *, eval_data: str | Path | None = None,
         data: Any = None, float_model: str | Path | onnx.ModelProto | None = None,
         stem: str = "model", **options: Any) -> dict[str, Path]:
    """Write ``model`` (from :meth:`Bridge.write_back`) as a pipeline's ``emit`` pass does:
    ``<stem>.deploy.onnx``, ``<stem>.fakequant.onnx``, ``quant_record.json``, the report.
    The report compares with ``float_model`` (default: ``model`` with its Q/DQ pairs
    bypassed) on ``eval_data`` (or ``data``); ``options`` are emit's. Returns the files."""
    from graphq import graph as G
    from graphq.passes.emit import Emit
    from graphq.pipeline import PassManager, PipelineOptions

    if eval_data is not None:
        options["eval_data"] = str(Path(eval_data).resolve())
    if data is None and eval_data is None:
        raise GraphqError("emit needs eval_data or data for its report")
    reference = float_model if float_model is not None else G.with_outputs(
        model, [], float_view=True)
    manager = PassManager([Emit(**options)], PipelineOptions(verify="off"))
    result = manager.run(model, outdir, data=data if data is not None else eval_data,
                         stem=stem, reference=reference)
    return result.files
