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
   ``fold-bn`` does that and reports it. A failure of onnxsim is a warning, never fatal.
5. Shape inference, so that later passes know ranks and dtypes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper, version_converter

from graphq import graph as G
from graphq import model as model_io
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
    simplify: bool = field(default=True, metadata={
        "help": "run onnxsim (its BN fusion off); a failure is a warning"})
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
            model = upgrade_opset(model, o.min_opset)
            notes.append(f"opset {counts['opset_before']} -> {o.min_opset}")
            changed = True
        removed = _drop_initializer_inputs(model, set(o.keep_initializer_inputs))
        if removed:
            counts["initializer_inputs_removed"] = removed
            changed = True
        if o.fold_constants:
            before = len(model.graph.node)
            model = _fold_constants(model)
            counts["constant_nodes_folded"] = before - len(model.graph.node)
            changed |= counts["constant_nodes_folded"] > 0
        if o.simplify:
            simplified, why = _simplify(model)
            if simplified is None:
                notes.append(f"onnxsim skipped: {why}")
                log.warning("onnxsim did not run: %s; the graph goes on unsimplified", why)
            else:
                changed |= _structure(simplified) != _structure(model)
                model = simplified
        if o.infer_shapes:
            model, error = model_io.infer_shapes(model)
            if error:
                notes.append(f"shape inference failed: {error}")
                log.warning("shape inference failed: %s", error)
        model_io.fix_ir_version(model)
        counts["opset_after"] = model_io.default_opset(model)
        counts["nodes_after"] = len(model.graph.node)
        return PassResult(model, changed, counts, notes)


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the model to opset ``target``; name the node that blocks it when it fails.

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
    return out


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


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold with graphsurgeon, then apply the result to ``model`` in place: the nodes it
    removed go, the constants it computed become initializers, unused initializers go.
    (Exporting graphsurgeon's graph instead would copy every weight, twice.)"""
    graph = G.import_graph(model)
    before = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    graph.fold_constants(error_ok=True).cleanup()
    produced = {t.name for node in graph.nodes for t in node.outputs}
    folded = {name: t for name, t in graph.tensors().items()
              if isinstance(t, gs.Constant) and name not in before}
    proto = model.graph
    for i in reversed(range(len(proto.node))):
        if not any(out in produced for out in proto.node[i].output if out):
            del proto.node[i]
    for name, tensor in folded.items():
        proto.initializer.append(numpy_helper.from_array(np.asarray(tensor.values), name))
    used = {o.name for o in proto.output} | _names_read(proto)
    for i in reversed(range(len(proto.initializer))):
        if proto.initializer[i].name not in used:
            del proto.initializer[i]
    return model


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes read, inside subgraphs too."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
                names.update(o.name for o in sub.output)
    return names


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


def _structure(model: onnx.ModelProto) -> tuple:
    """What a rewrite changes: the nodes' wiring and the initializers' names."""
    nodes = tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node)
    return nodes, tuple(sorted(t.name for t in model.graph.initializer))
