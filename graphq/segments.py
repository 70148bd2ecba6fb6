"""Segments: where an activation's quantization error lands, and what it costs there.

A quantized activation is judged by ``min_sqnr_db`` on its own values, which misses error
that a later op amplifies: PicoDet's first depthwise conv reads channels whose ranges go
from 0.09 to 36, so one per-tensor uint8 scale leaves the narrow ones 0-1 levels, and its
BatchNorm-folded weights on exactly those channels are ~73 (median ~1). Every tensor alone
keeps >= 24.8 dB; the conv's output keeps 14 dB, and the outputs of the whole net -0.3 dB.

A *segment* is what lies between compute ops: for each Conv / ConvTranspose / Gemm /
MatMul of the main graph (and each graph output, and each tensor an If or Loop reads, its
branches' reads of the main graph included: walks stop at those nodes, so what reaches the
outputs only through them would be in no segment), the quantized activations that reach its
input without crossing another compute op (e.g. a conv's output -> HardSwish -> the next
conv's input: four tensors), together with the tensors the walk back stops at (compute-op
outputs, graph inputs): its *bounds*. :func:`local_scores` measures, on a few batches, the
SQNR of the segment's end (the compute op's output) with only the segment's activations
quantized, its bounds fed with the values of the graph with every activation float, and the
weights quantized throughout: the error the segment's activations add where it is consumed,
the consumer's weights' gain included, independent of every other segment. It costs
one float run that fetches the bounds, and two runs of each segment (about two forward
passes of the graph per batch), against one forward pass per activation for scoring each
alone through the whole graph.

:func:`search_groups` then keeps float whole segments, worst first, as few as bring every
output to a target (doubling, then bisecting the count, with whole-graph runs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from graphq import graph as G
from graphq import runtime
from graphq import sensitivity as S
from graphq.kernels import quant as Q

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


@dataclass
class Segment:
    """The quantized activations that reach ``end`` without crossing a compute op."""

    end: str                  # a compute op's output, or a graph output
    where: str                # for notes: "Conv 'name'" or "graph output 'name'"
    units: list[int]          # mask indices of its quantized activations
    bounds: list[str]         # the tensors its walk stopped at (fed float)
    nodes: list[int]          # indices in the graph's node list of what it runs


def find(model: onnx.ModelProto, units: dict[str, int], mask: str = "") -> list[Segment]:
    """The segments of ``model``'s main graph (the graph of
    :func:`graphq.sensitivity.masked_model`, whose input ``mask`` is no bound; ``units``:
    float tensor name -> mask index), each compute op's and each graph output's, those that
    hold at least one unit. Nodes that hold subgraphs (If, Loop) are not walked into: their
    outputs are bounds."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in nodes if n.op_type == "Constant" and n.output}
    inputs = {i.name for i in model.graph.input}

    def walk(start: list[str]) -> tuple[set[int], set[str], set[int]]:
        seen, todo = set(), list(start)
        found, bounds, ran = set(), set(), set()
        while todo:
            name = todo.pop()
            if not name or name in seen or name in constants:
                continue
            seen.add(name)
            if name in units:
                found.add(units[name])
            index = producer.get(name)
            if index is None:
                if name in inputs and name != mask:
                    bounds.add(name)
                continue
            node = nodes[index]
            if node.op_type in G.COMPUTE or G.subgraph_protos(node):
                bounds.add(name)
                continue
            ran.add(index)
            todo.extend(node.input)
        return found, bounds, ran

    segments = []
    for i, node in enumerate(nodes):
        if node.op_type not in G.COMPUTE or not node.output:
            continue
        found, bounds, ran = walk(list(node.input))
        if found:
            segments.append(Segment(node.output[0], f"{node.op_type} '{node.name}'",
                                    sorted(found), sorted(bounds), sorted(ran | {i})))
    for out in model.graph.output:
        if out.name in producer and nodes[producer[out.name]].op_type in G.COMPUTE:
            continue  # its compute op's segment
        found, bounds, ran = walk([out.name])
        if found:
            segments.append(Segment(out.name, f"graph output '{out.name}'", sorted(found),
                                    sorted(bounds), sorted(ran)))
    # what an If or Loop reads (its inputs, and the tensors its bodies read from this graph):
    # the walks above stop at it, so activations that reach the outputs only through it
    # would be in no segment
    ends = {s.end for s in segments}
    for node in nodes:
        if not G.subgraph_protos(node):
            continue
        for name in dict.fromkeys([*node.input, *G.outer_reads(node)]):
            if not name or name in ends or name in constants or name not in producer or \
                    nodes[producer[name]].op_type in G.COMPUTE:
                continue
            found, bounds, ran = walk([name])
            if found:
                ends.add(name)
                segments.append(Segment(name, f"{node.op_type} '{node.name}' input '{name}'",
                                        sorted(found), sorted(bounds), sorted(ran)))
    return segments


def _submodel(model: onnx.ModelProto, segment: Segment, mask: str,
              dtypes: dict[str, int]) -> onnx.ModelProto:
    """The nodes of ``segment`` as a model of its bounds and the mask; its end the output."""
    nodes = [model.graph.node[i] for i in segment.nodes]
    read = {name for n in nodes for name in n.input}
    initializers = [t for t in model.graph.initializer if t.name in read]
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    mask_info = next(i for i in model.graph.input if i.name == mask)
    inputs = [helper.make_tensor_value_info(b, dtypes[b], None) for b in segment.bounds]
    output = helper.make_tensor_value_info(segment.end, types.get(segment.end) or
                                           onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "segment", [*inputs, mask_info], [output], initializers)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    sub.functions.extend(model.functions)
    return sub


def local_scores(masked: onnx.ModelProto, mask: str, count: int, segments: list[Segment],
                 feeds: Sequence[Feed], providers: list[str] | None = None
                 ) -> dict[int, float]:
    """Segment index -> the SQNR (dB) of its end with its units quantized (mask 1) against
    the same nodes with every activation float (mask 0), over ``feeds``; its bounds take the
    values of the whole graph with every activation float (mask 0; the weights quantized, as
    in both runs). ``masked``: the graph of :func:`graphq.sensitivity.masked_model` with
    ``count`` units. A segment whose nodes onnxruntime cannot run alone is left out
    (logged)."""
    bounds = sorted({b for s in segments for b in s.bounds})
    inputs = {i.name for i in masked.graph.input}
    fetch = [b for b in bounds if b not in inputs]
    view = runtime.session(G.with_outputs(masked, fetch), providers, spinning=False)
    ones, zeros = np.ones(count, np.float32), np.zeros(count, np.float32)
    start = time.perf_counter()
    sessions: dict[int, object] = {}
    signal: dict[int, float] = {}
    noise: dict[int, float] = {}
    for feed in feeds:
        values = dict(zip(fetch, view.run(fetch, {**feed, mask: zeros}), strict=True))
        values.update({k: v for k, v in feed.items() if k in bounds})
        if not sessions:
            dtypes = {b: helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
                      for b, v in values.items()}
            for i, segment in enumerate(segments):
                if not all(b in values for b in segment.bounds):
                    continue  # an optional input the data does not give
                try:
                    sessions[i] = runtime.session(_submodel(masked, segment, mask, dtypes),
                                                  providers, spinning=False)
                except Exception as why:  # noqa: BLE001 - that segment is not scored
                    log.debug("segment of %s not scored: %s", segment.where, why)
        for i, sess in sessions.items():
            segment = segments[i]
            given = {b: values[b] for b in segment.bounds}
            ref = sess.run(None, {**given, mask: zeros})[0]
            got = sess.run(None, {**given, mask: ones})[0]
            s, e = Q.error_sums(ref, got)
            signal[i] = signal.get(i, 0.0) + s
            noise[i] = noise.get(i, 0.0) + e
    log.info("segments: %d of %d scored on %d batch(es) in %.1f s", len(sessions),
             len(segments), len(feeds), time.perf_counter() - start)
    return {i: Q.sqnr_db_of_sums(signal[i], noise[i]) for i in sessions}


def search_groups(score: Callable[[np.ndarray], float], count: int,
                  groups: Sequence[Sequence[int]], target_db: float, limit: int,
                  baseline: float | None = None) -> S.Result:
    """Keep float the units of the first k ``groups`` (worst first; a unit counted once, in
    the first group that holds it; a group that would take the units float past ``limit``
    is passed over), the fewest k whose ``score`` reaches ``target_db``; found by doubling
    k, then bisecting. When the target is out of reach, the best k evaluated. ``gains_db``
    is empty (no unit is run alone). ``baseline``: the score with every unit quantized, when
    already known (not run again, not counted in ``runs``)."""
    order: list[int] = []
    ends: list[int] = [0]  # ends[k]: how many units the first k groups hold
    seen: set[int] = set()
    for group in groups:
        new = [u for u in group if u not in seen]
        if new and len(order) + len(new) <= limit:
            order.extend(new)
            seen.update(new)
            ends.append(len(order))

    def score_of(k: int) -> float:  # the score with the first k groups float
        return score(S.mask(count, order[:ends[k]]))

    known = {} if baseline is None else {0: baseline}
    best, scores = S.fewest_reaching(score_of, len(ends) - 1, target_db, dict(known))
    return S.Result(scores[0], scores[best], order[:ends[best]],
                    runs=len(scores) - len(known), cuts=ends[:best + 1])
