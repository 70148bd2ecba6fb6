"""The object view of a model that passes rewrite: onnx-graphsurgeon, with what it drops kept.

onnx-graphsurgeon rewires tensors and nodes as objects, which is how passes must work (never
by building or parsing names). Its export drops ``metadata_props``, ``doc_string``, producer,
model version and functions, and may reset the IR version: :func:`export` puts them back from
the model the graph was imported from.

4-bit constants (zero points, deploy weights) are numpy arrays of ``ml_dtypes.int4`` /
``uint4`` here, as ``onnx.numpy_helper`` reads ONNX INT4 / UINT4 (and as graphsurgeon hands
them out once their values are read); graphsurgeon 0.6 writes such arrays one byte a value,
which the INT4 format refuses, so :func:`export` packs them first (:func:`_pack_protos`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphq import model as model_io

# graphsurgeon prints its own warnings to stdout; graphq logs what matters itself.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
# onnxruntime's graph-optimizer notes (printed while folding constants) are noise here too.
ort.set_default_logger_severity(4)

log = logging.getLogger(__name__)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The graphsurgeon graph of a model."""
    return gs.import_onnx(model)


def export(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the model-level fields of ``like``."""
    _pack_protos(graph)
    out = gs.export_onnx(graph, do_type_check=False)
    copy_model_fields(out, like)
    exported = {(o.domain, o.version) for o in out.opset_import}
    for opset in like.opset_import:
        if not any(domain == opset.domain for domain, _ in exported):
            out.opset_import.append(opset)
    return out


FOUR_BIT = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))

#: Ops with weights whose inputs quantization is placed around (insert-qdq quantizes them;
#: a segment of graphq.segments ends at one).
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: Ops of one tensor that act on each value alone (Clip's bounds are scalars): the output has
#: the input's shape, and a Transpose commutes with them.
ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
                         "Elu", "Selu", "Softplus", "Softsign", "Abs", "Neg", "Exp", "Erf",
                         "Sqrt", "Reciprocal", "Clip", "Mish", "Gelu", "Floor", "Ceil",
                         "Round"})


def _pack_protos(graph: gs.Graph) -> None:
    """Give every 4-bit or string constant held as a numpy array the TensorProto that
    numpy_helper makes (INT4 / UINT4 two values a byte; STRING as string_data), which
    graphsurgeon then writes as it is (it would write strings as raw bytes, which ONNX does
    not allow). Constants never read keep the TensorProto they were imported from
    (graphsurgeon's ``_values`` is still a LazyValues then: reading ``values`` would unpack
    them only to pack them again)."""
    for tensor in {id(t): t for g in graphs(graph) for t in g.tensors().values()}.values():
        if not isinstance(tensor, gs.Constant):
            continue
        if isinstance(getattr(tensor, "_values", None), LazyValues):
            continue
        values = np.asarray(tensor.values)
        if values.dtype not in FOUR_BIT and values.dtype.kind not in "OUS":
            continue
        tensor.values = LazyValues(numpy_helper.from_array(values, tensor.name))


def copy_model_fields(out: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Copy what tools that rebuild a model drop: IR version, producer, docs, metadata."""
    out.ir_version = like.ir_version
    out.producer_name = like.producer_name
    out.producer_version = like.producer_version
    out.domain = like.domain
    out.model_version = like.model_version
    out.doc_string = like.doc_string
    out.graph.doc_string = like.graph.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    if not out.functions and like.functions:
        out.functions.extend(like.functions)


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of a tensor when it is a constant (an initializer or a Constant node)."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` (graph outputs are left as they are)."""
    for reader in list(old.outputs):
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new


def qdq_pair(graph: gs.Graph, tensor: gs.Tensor, scale: np.ndarray, zero_point: np.ndarray,
             axis: int | None, names: set[str]) -> gs.Variable:
    """Append ``tensor -> QuantizeLinear -> DequantizeLinear`` to the graph, the scale and
    zero point shared by both nodes; return the dequantized tensor (nothing reads it yet)."""
    base = tensor.name
    scale_c = gs.Constant(unique_name(graph, f"{base}_scale", names), scale)
    zero_c = gs.Constant(unique_name(graph, f"{base}_zero_point", names), zero_point)
    attrs = {"axis": axis} if axis is not None else {}
    quantized = gs.Variable(unique_name(graph, f"{base}_quantized", names),
                            dtype=zero_point.dtype, shape=tensor.shape)
    restored = gs.Variable(unique_name(graph, f"{base}_dequantized", names),
                           dtype=tensor.dtype, shape=tensor.shape)
    q = gs.Node("QuantizeLinear", unique_name(graph, f"{base}_QuantizeLinear", names),
                attrs=dict(attrs), inputs=[tensor, scale_c, zero_c], outputs=[quantized])
    dq = gs.Node("DequantizeLinear", unique_name(graph, f"{base}_DequantizeLinear", names),
                 attrs=dict(attrs), inputs=[quantized, scale_c, zero_c], outputs=[restored])
    graph.nodes.extend([q, dq])
    return restored


def dequantized_constant(graph: gs.Graph, base: str, ints: np.ndarray, scale: np.ndarray,
                         zero_point: np.ndarray, axis: int | None, dtype: np.dtype,
                         names: set[str]) -> gs.Variable:
    """Append ``integer constant -> DequantizeLinear``; return the float tensor it makes."""
    values = gs.Constant(unique_name(graph, f"{base}_quantized", names), ints)
    scale_c = gs.Constant(unique_name(graph, f"{base}_scale", names), scale)
    zero_c = gs.Constant(unique_name(graph, f"{base}_zero_point", names), zero_point)
    restored = gs.Variable(unique_name(graph, f"{base}_dequantized", names), dtype=dtype,
                           shape=list(ints.shape))
    attrs = {"axis": axis} if axis is not None else {}
    graph.nodes.append(gs.Node("DequantizeLinear",
                               unique_name(graph, f"{base}_DequantizeLinear", names),
                               attrs=attrs, inputs=[values, scale_c, zero_c],
                               outputs=[restored]))
    return restored


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs a node holds as attributes (an If's branches, a Loop's or Scan's body)."""
    return [a for a in node.attrs.values() if isinstance(a, gs.Graph)]


def subgraph_protos(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs an ONNX node holds as attributes (an If's branches, a Loop's or Scan's
    body): :func:`subgraphs` for protos."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and the graphs nested in its nodes' attributes, outermost first:
    :func:`graphs` for protos."""
    yield graph
    for node in graph.node:
        for sub in subgraph_protos(node):
            yield from graph_protos(sub)


def names_made(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes write, inside subgraphs too (with the
    subgraphs' inputs and initializers)."""
    names = set()
    for node in graph.node:
        names.update(node.output)
        for sub in subgraph_protos(node):
            names |= names_made(sub)
            names.update(i.name for i in sub.input)
            names.update(t.name for t in sub.initializer)
    return names


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes read, inside subgraphs too."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for sub in subgraph_protos(node):
            names |= names_read(sub)
            names.update(o.name for o in sub.output)
    return names


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """The names the graphs ``node`` holds read from the graph around it, at any depth
    (sorted)."""
    reads: set[str] = set()
    for sub in subgraph_protos(node):
        made = names_made(sub) | {i.name for i in sub.input} | {t.name for t in sub.initializer}
        reads |= names_read(sub) - made
    return sorted(name for name in reads if name)


def sort_nodes(graph: onnx.GraphProto) -> int:
    """Put ``graph``'s nodes (and its subgraphs') in topological order, in place, keeping the
    given order among nodes that are ready together; returns how many nodes moved. A node
    with a subgraph depends on the outer names its subgraph reads (:func:`outer_reads`).
    Nodes in a cycle stay at the end, in their order (onnx.checker then names them)."""
    moved = sum(sort_nodes(sub) for node in graph.node for sub in subgraph_protos(node))
    produced = {out for node in graph.node for out in node.output if out}
    needs = [[n for n in {*node.input, *outer_reads(node)} if n in produced]
             for node in graph.node]
    done: set[str] = set()
    order: list[int] = []
    left = list(range(len(graph.node)))
    while left:
        ready = [i for i in left if all(n in done for n in needs[i])]
        if not ready:
            order += left
            break
        for i in ready:
            done.update(graph.node[i].output)
        order += ready
        taken = set(ready)
        left = [i for i in left if i not in taken]
    if order == list(range(len(order))):
        return moved
    nodes = [onnx.NodeProto() for _ in order]
    for new, i in zip(nodes, order, strict=True):
        new.CopyFrom(graph.node[i])
    del graph.node[:]
    graph.node.extend(nodes)
    return moved + sum(i != j for j, i in enumerate(order))


def graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every graph nested in its nodes, outermost first."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from graphs(sub)


def nodes(graph: gs.Graph) -> list[gs.Node]:
    """The nodes of ``graph`` and of every graph nested in it."""
    return [n for g in graphs(graph) for n in g.nodes]


def owner(graph: gs.Graph, tensor: gs.Tensor, where: dict[int, gs.Graph]) -> gs.Graph:
    """The graph (``graph`` or one nested in it) a Q/DQ pair on ``tensor`` belongs in, where
    every reader of ``tensor`` sees it: the graph of its producer; for a constant, the one
    graph all its readers are in; else ``graph``. ``where``: :func:`node_graphs`."""
    if tensor.inputs:
        return where.get(id(tensor.inputs[0]), graph)
    if isinstance(tensor, gs.Constant):
        homes = {id(where[id(r)]): where[id(r)] for r in tensor.outputs if id(r) in where}
        if len(homes) == 1:
            return next(iter(homes.values()))
    return graph


def node_graphs(graph: gs.Graph) -> dict[int, gs.Graph]:
    """``id(node)`` -> the graph that holds it, for every node of :func:`graphs`."""
    return {id(n): g for g in graphs(graph) for n in g.nodes}


def qdq_pairs(graph: gs.Graph, nested: bool = False) -> dict[str, tuple[gs.Node, gs.Node]]:
    """Float tensor name -> the (QuantizeLinear, DequantizeLinear) pair that follows it
    (``nested``: in the graphs nested in If branches too)."""
    pairs = {}
    for q in [n for n in (nodes(graph) if nested else graph.nodes) if n.op == "QuantizeLinear"]:
        readers = q.outputs[0].outputs
        if len(readers) == 1 and readers[0].op == "DequantizeLinear":
            pairs[q.inputs[0].name] = (q, readers[0])
    return pairs


def row_gathers(table: gs.Tensor) -> list[gs.Node]:
    """The Gathers that read ``table`` as rows (data input, axis 0, computed indices), when
    those are all its readers; else ``[]`` (an embedding table only lookups read)."""
    readers = list(table.outputs)
    if readers and all(r.op == "Gather" and r.inputs[0] is table and len(r.inputs) > 1
                       and r.inputs[1] is not table and constant_values(r.inputs[1]) is None
                       and int(r.attrs.get("axis", 0)) in (0, -2) for r in readers):
        return readers
    return []


def float_source(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor a ``Q -> DQ`` pair stands for (``tensor`` itself when it is none)."""
    if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
        quantized = tensor.inputs[0].inputs[0]
        if quantized.inputs and quantized.inputs[0].op == "QuantizeLinear":
            return quantized.inputs[0].inputs[0]
    return tensor


def with_outputs(model: onnx.ModelProto, names: list[str], float_view: bool = False,
                 renamed: dict[str, str] | None = None) -> onnx.ModelProto:
    """A copy of the model with the tensors ``names`` made graph outputs too; with
    ``float_view`` every Q/DQ pair is bypassed first (the graph as it was before them), and
    each DequantizeLinear of a constant (an int32 bias) becomes the float constant it
    computes (onnxruntime would run it on every run: a float baseline timed with them ran
    slower than the float graph).

    A tensor inside an If branch leaves through new outputs of the branch and its If node
    (the other branch gives an empty tensor: a batch that took it yields zero values), up
    to a graph output of a new name, which ``renamed`` (when given) maps the name to."""
    graph = import_graph(model)
    if float_view:
        for q, dq in qdq_pairs(graph, nested=True).values():
            replace_uses(graph, dq.outputs[0], q.inputs[0])
        _dequantize_constants(graph)
    tensors = graph.tensors()
    present = {t.name for t in graph.outputs}
    inner = [n for n in names if n not in tensors]
    graph.outputs.extend(tensors[name] for name in names
                         if name in tensors and name not in present)
    if inner:
        paths = _branch_paths(graph)
        taken = used_names(graph)
        for name in inner:
            if name not in paths:
                raise KeyError(f"tensor '{name}' is in no graph of the model, or in a Loop/Scan "
                               "body, whose values cannot be read out")
            tensor, path = paths[name]
            out = _lift(tensor, path, taken)
            graph.outputs.append(out)
            if renamed is not None:
                renamed[name] = out.name
    graph.cleanup()
    return export(graph, like=model)


def _dequantize_constants(graph: gs.Graph) -> None:
    """Each ``DequantizeLinear(constant)`` (in nested graphs too) becomes its float values."""
    for dq in [n for n in nodes(graph) if n.op == "DequantizeLinear" and n.outputs]:
        if not is_graph_output(graph, dq.outputs[0]):
            dequantize_in_place(graph, dq)


def dequantize_in_place(graph: gs.Graph, dq: gs.Node) -> bool:
    """Where ``dq`` is a DequantizeLinear of constants, its readers read the float constant it
    computes instead (``<output>_float``) and ``dq`` writes nothing; whether it was."""
    from graphq.kernels import quant as Q  # kernels do the arithmetic

    ints = constant_values(dq.inputs[0])
    scale = constant_values(dq.inputs[1])
    zero = constant_values(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if ints is None or scale is None or (len(dq.inputs) > 2 and zero is None) \
            or not dq.outputs:
        return False
    axis = dq.attrs.get("axis", 1) if np.ndim(scale) == 1 else None
    out = dq.outputs[0]
    replace_uses(graph, out, gs.Constant(f"{out.name}_float",
                                         Q.dequantize(ints, scale, zero, axis=axis)))
    dq.outputs.clear()
    return True


def _branch_paths(graph: gs.Graph, path: tuple = ()
                  ) -> dict[str, tuple[gs.Tensor, tuple[tuple[gs.Node, gs.Graph], ...]]]:
    """Each tensor produced inside an If branch (at any depth) -> the tensor and the
    (If node, branch) steps from the outermost graph to it."""
    found = {}
    for node in graph.nodes:
        if node.op != "If":
            continue
        for branch in subgraphs(node):
            steps = (*path, (node, branch))
            for inner in branch.nodes:
                for t in inner.outputs:
                    found.setdefault(t.name, (t, steps))
            found.update(_branch_paths(branch, steps))
    return found


def _lift(tensor: gs.Tensor, path: tuple[tuple[gs.Node, gs.Graph], ...],
          taken: set[str]) -> gs.Tensor:
    """Make ``tensor`` an output of each branch on ``path`` and of its If node, innermost
    first; the If's other branch outputs an empty tensor of the same type and rank."""
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
    rank = len(tensor.shape) if tensor.shape is not None else 1
    current = tensor
    for node, branch in reversed(path):
        branch.outputs.append(current)
        for other in subgraphs(node):
            if other is branch:
                continue
            empty = gs.Variable(fresh_name(f"{tensor.name}_untaken", taken), dtype)
            value = gs.Constant(fresh_name(f"{tensor.name}_untaken_value", taken),
                                np.zeros([0] * max(rank, 1), dtype))
            other.nodes.append(gs.Node("Constant", fresh_name(f"{tensor.name}_untaken", taken),
                                       {"value": value}, [], [empty]))
            other.outputs.append(empty)
        current = gs.Variable(fresh_name(f"{tensor.name}_lifted", taken), dtype)
        node.outputs.append(current)
    return current


#: one part of a graph output: (label, axis, start, stop)
Part = tuple[str, int, int, int]

#: parts of a tensor while they are traced: the axis and the (start, stop) of each part on it
_Cut = tuple[int, tuple[tuple[int, int], ...]]

#: ops that keep each value where it was: the parts of their input are those of their output
_IN_PLACE = ("Identity", "QuantizeLinear", "DequantizeLinear")
#: ops that keep the values in order in another shape: the part axis maps through by the shapes
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
#: the ops :func:`output_parts` follows back from a graph output to the Concat that makes it
#: (an Add only as the sensitivity search's blend of a Q/DQ pair, see :func:`_cut_through`)
_CARRIERS = ("Transpose", *_RESHAPES, *_IN_PLACE, "Add")


def output_parts(model: onnx.ModelProto) -> dict[str, list[Part]]:
    """Graph outputs that a Concat makes from inputs of known sizes on its axis -> the part
    each input fills, ``(label, axis, start, stop)`` on the output's own axes, the label as
    ``output[:, 4:22]``.

    Fidelity is judged per part as well as whole: a detector whose one output holds box
    coordinates (pixels) beside class scores (0..1) would otherwise be scored by its boxes
    alone, whatever became of the scores.

    The Concat need not make the output itself: the parts are followed through ops that only
    move values, Transpose (the part axis permuted), Reshape / Flatten / Squeeze / Unsqueeze
    where the part axis stays whole (dims merged or split before it or after it; merged with
    the dims after it, a part spans ``k`` times the indices), Q/DQ pairs (and the sensitivity
    search's blend of one, :func:`graphq.sensitivity.masked_model`); and through a
    Concat on another axis of inputs that all have the same parts (a YOLOX head: each level
    concatenates [box, obj, cls] on the channel axis, the levels are concatenated on the
    anchor axis, then transposed: the parts are the last axis' columns). Where the mapping is
    not certain (a shape not known, a Reshape that splits the part axis or merges it with a
    dim before it), the output has no parts."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = [o.name for o in model.graph.output if _reaches_concat(o.name, producers)]
    if not names:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model_io.skeleton(model), data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes, no parts
        return {}
    g = inferred.graph
    shapes = {v.name: model_io.dims(v) for v in [*g.value_info, *g.input, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    parts: dict[str, list[Part]] = {}
    memo: dict[str, _Cut | None] = {}
    for name in names:
        cut = _cut(name, producers, shapes, memo)
        if cut is None:
            continue
        axis, spans = cut
        parts[name] = [(f"{name}[{', '.join([':'] * axis + [f'{start}:{stop}'])}]", axis,
                        start, stop) for start, stop in spans]
    return parts


def _reaches_concat(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether a Concat makes ``name`` through :data:`_CARRIERS` (first inputs): whether
    :func:`output_parts` needs shapes for it."""
    node = producers.get(name)
    while node is not None and node.op_type in _CARRIERS and node.input:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Concat"


def _cut(name: str, producers: dict[str, onnx.NodeProto],
         shapes: dict[str, list | None], memo: dict[str, _Cut | None]) -> _Cut | None:
    """The parts of tensor ``name`` (see :func:`output_parts`), or None."""
    if name not in memo:
        memo[name] = None  # a graph has no cycles; this only guards against a malformed one
        node = producers.get(name)
        memo[name] = _cut_through(node, producers, shapes, memo) if node is not None else None
    return memo[name]


def _cut_through(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                 shapes: dict[str, list | None], memo: dict[str, _Cut | None]) -> _Cut | None:
    """The parts of the output of ``node`` (one of :data:`_CARRIERS` or a Concat)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Concat":
        return _concat_cut(node, attrs.get("axis", 0), producers, shapes, memo)
    if node.op_type == "Add" and len(node.input) == 2:
        # the sensitivity search's blend ``x + m * (DQ(Q(x)) - x)``: x's values, in place
        x, mixed = node.input
        mul = producers.get(mixed)
        subs = [producers.get(i) for i in (mul.input if mul and mul.op_type == "Mul" else [])]
        if any(s is not None and s.op_type == "Sub" and list(s.input[1:]) == [x]
               and _dequantizes(s.input[0], x, producers) for s in subs):
            return _cut(x, producers, shapes, memo)
        return None
    if node.op_type not in _CARRIERS or not node.input:
        return None
    inner = _cut(node.input[0], producers, shapes, memo)
    if inner is None or node.op_type in _IN_PLACE:
        return inner
    axis, spans = inner
    if node.op_type == "Transpose":
        perm = list(attrs.get("perm") or [])
        if not perm:
            rank = len(shapes.get(node.output[0]) or [])
            perm = list(range(rank))[::-1]
        return (perm.index(axis), spans) if axis in perm else None
    moved = _regrouped(shapes.get(node.input[0]), shapes.get(node.output[0]), axis)
    if moved is None:
        return None
    to, k = moved
    return to, tuple((start * k, stop * k) for start, stop in spans)


def _concat_cut(node: onnx.NodeProto, axis: int, producers: dict[str, onnx.NodeProto],
                shapes: dict[str, list | None], memo: dict[str, _Cut | None]) -> _Cut | None:
    """The parts of a Concat's output: the parts its inputs all have on another axis, or else
    the slice each input fills on its axis."""
    rank = len(shapes.get(node.output[0]) or [])
    if not rank or len(node.input) < 2:
        return None
    axis %= rank
    inner = [_cut(i, producers, shapes, memo) for i in node.input]
    if inner[0] is not None and inner[0][0] != axis and all(c == inner[0] for c in inner):
        return inner[0]
    sizes = [(shapes.get(i) or [None] * rank)[axis] for i in node.input]
    if not all(isinstance(n, int) for n in sizes):
        return None
    bounds = np.cumsum([0, *sizes]).tolist()
    return axis, tuple(zip(bounds[:-1], bounds[1:], strict=True))


def _dequantizes(name: str, source: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether ``name`` is ``DequantizeLinear(QuantizeLinear(source))``."""
    dq = producers.get(name)
    q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q is not None and q.op_type == "QuantizeLinear" and q.input[0] == source


def _regrouped(src: list | None, dst: list | None, axis: int) -> tuple[int, int] | None:
    """Where ``axis`` of a tensor of shape ``src`` goes when its values, in order, take shape
    ``dst``: ``(axis of dst, k)``, index ``i`` of ``axis`` becoming indices ``i*k`` to
    ``i*k + k - 1`` of that axis (k > 1: ``axis`` merged with dims after it); None where it
    does not stay whole (split, merged with a dim before it) or the dims are not known."""
    if not src or not dst or axis >= len(src):
        return None
    lead = 0  # dims both shapes begin with (a symbolic batch dim among them) index the same
    while lead < min(axis, len(dst)) and src[lead] is not None and src[lead] == dst[lead]:
        lead += 1
    size, before = src[axis], src[lead:axis]
    if not isinstance(size, int) or size < 2 or not all(isinstance(d, int) for d in before):
        return None
    prefix, run = int(np.prod(before)), 1
    for to in range(lead, len(dst)):
        d = dst[to]
        if d == 1:
            continue
        if not isinstance(d, int):
            return None
        if run == prefix:  # dst[to] begins where ``axis`` does
            if d % size:
                return None
            k, after, rest = d // size, src[axis + 1:], dst[to + 1:]
            if k == 1:
                return to, 1
            known = all(isinstance(n, int) for n in [*after, *rest])
            return (to, k) if known and np.prod(after) == k * np.prod(rest) else None
        run *= d
        if run > prefix:
            return None
    return None


#: ops whose outputs depend on the order of their input's values, not only on the values
SELECTING = ("TopK", "NonMaxSuppression", "ArgMax", "ArgMin")


def _selects_by_scores(node: gs.Node) -> bool:
    """Whether the selection ``node`` orders by float scores the graph computes (which
    quantization noise can swap), not by integers or the graph's inputs: a TopK over a
    batch's sequence lengths (torch's pack_padded_sequence sort, as a diacritizer's export
    has it) only reorders the batch, and had every output after it judged by the tensor it
    gathered instead."""
    scores = node.inputs[:2] if node.op == "NonMaxSuppression" else node.inputs[:1]
    return any(_maybe_float(t) and bool(t.inputs) and t.inputs[0].op != "Constant"
               for t in scores)


def selection_sources(graph: gs.Graph) -> dict[str, list[gs.Tensor]]:
    """Graph outputs computed through a selection (:data:`SELECTING`: an end-to-end detector's
    TopK over anchor scores, then the boxes gathered at its indices) -> the tensors the
    selection reads from outside it (the scores and boxes of every anchor, through Q/DQ
    pairs to their float tensors; float ones only: neither indices, constants nor graph
    inputs).

    Such an output cannot be compared value by value with the float model's: noise that
    swaps two close scores swaps whole rows, and the low-score rows past the detections
    hold whatever anchors come next. Its sources keep every anchor in its place."""
    tainted: set[int] = set()  # ids of tensors downstream of a selection
    made: set[int] = set()  # ids of nodes in that region
    changed = True
    while changed:  # until nothing more is reached (one pass where the nodes are sorted)
        changed = False
        for node in graph.nodes:
            if id(node) not in made and ((node.op in SELECTING and _selects_by_scores(node))
                                         or any(id(t) in tainted for t in node.inputs)):
                made.add(id(node))
                tainted.update(id(t) for t in node.outputs)
                changed = True
    found: dict[str, list[gs.Tensor]] = {}
    for out in graph.outputs:
        if id(out) not in tainted:
            continue
        sources: dict[str, gs.Tensor] = {}
        stack, seen = [out], {id(out)}
        while stack:
            tensor = stack.pop()
            node = tensor.inputs[0] if tensor.inputs else None
            if node is None or id(node) not in made:
                continue
            for t in node.inputs:
                if id(t) in tainted:
                    if id(t) not in seen:
                        seen.add(id(t))
                        stack.append(t)
                    continue
                source = float_source(t)
                producer = source.inputs[0] if source.inputs else None
                if isinstance(source, gs.Constant) or producer is None \
                        or producer.op == "Constant" or not _maybe_float(source):
                    continue
                sources.setdefault(source.name, source)
        found[out.name] = list(sources.values())
    return found


#: HardSwish(x) = x * HardSigmoid(x) with these attributes (ONNX's definition): the form
#: canonicalize writes HardSwish spelled out in and insert-qdq writes a quantized HardSwish in
HARD_SWISH_GATE = {"alpha": 1.0 / 6.0, "beta": 0.5}


def class_score_outputs(model: onnx.ModelProto) -> list[str]:
    """The graph outputs a Softmax or LogSoftmax makes over their last axis: class scores,
    which a classifier or a CTC recognizer reads through an argmax. Followed back through
    Identity and reshapes that keep the last axis's size (onnxsim's Gemm fusion leaves a
    recognizer's ``[N, T, classes]`` as a Softmax over ``[N * T, classes]`` reshaped); an
    opset < 13 Softmax without an axis counts where its input is 2-D, the only rank where
    its default axis 1, over the flattened rest, is the last."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    producers = {o: n for n in model.graph.node for o in n.output}
    dims = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]
            if v.type.tensor_type.HasField("shape")}
    found = []
    for out in model.graph.output:
        name, node = out.name, producers.get(out.name)
        last = (dims.get(name) or [None])[-1]
        while node is not None and (node.op_type == "Identity" or (
                node.op_type in _RESHAPES and last is not None
                and (dims.get(node.input[0]) or [None])[-1] == last)):
            name = node.input[0]
            node = producers.get(name)
        if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
            continue
        axes = [a.i for a in node.attribute if a.name == "axis"]
        axis = axes[0] if axes else (-1 if opset >= 13 else 1)
        shape = dims.get(name) or dims.get(node.input[0])
        if axis == -1 or (shape is not None and axis == len(shape) - 1):
            found.append(out.name)
    return found


#: ops whose output jumps where a float input crosses a value: a comparison (a local-maximum
#: test ``x == MaxPool(x)``), a sign, an arctangent of a ratio (tf2onnx's atan2)
STEPPING = ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Sign", "Atan")


def steps_after_quantized(graph: gs.Graph, output: str) -> list[str]:
    """The :data:`STEPPING` ops (op types, in no order) that the graph output ``output`` is
    computed through after the last quantized tensors before it (a walk back that stops at
    DequantizeLinear outputs, constants and graph inputs), where a computed float tensor
    enters them: there the small error of the tensors before flips values near the step,
    and the output's SQNR says more about those flips than about the error."""
    tensors = graph.tensors()
    start = tensors.get(output)
    found: set[str] = set()
    stack, seen = [start] if start is not None else [], set()
    while stack:
        tensor = stack.pop()
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or id(node) in seen or node.op == "DequantizeLinear":
            continue
        seen.add(id(node))
        if node.op in STEPPING and any(
                t.inputs and t.inputs[0].op != "Constant" and _maybe_float(t)
                for t in node.inputs):
            found.add(node.op)
        stack.extend(t for t in node.inputs if not isinstance(t, gs.Constant))
    return sorted(found)


def _maybe_float(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is float or of a type the graph does not say."""
    dtype = element_type(tensor)
    return dtype is None or dtype.kind == "f"


def element_type(tensor: gs.Tensor) -> np.dtype | None:
    """``tensor``'s element type: by its type, or its values where it is a constant (None
    where neither says)."""
    dtype = tensor.dtype
    if dtype is None:
        values = constant_values(tensor)
        dtype = None if values is None else values.dtype
    return None if dtype is None else np.dtype(dtype)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def unique_name(graph: gs.Graph, base: str, taken: set[str] | None = None) -> str:
    """A tensor or node name starting with ``base`` that the graph does not use yet."""
    return fresh_name(base, used_names(graph) if taken is None else taken)


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2`` ... the first not in ``taken`` (then added to it)."""
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def used_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name of ``graph`` and of the graphs nested in it."""
    names: set[str] = set()
    for g in graphs(graph):
        names.update(g.tensors().keys())
        names.update(node.name for node in g.nodes)
    return names


def op_histogram(nodes: Iterable[onnx.NodeProto]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in nodes:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
