"""Which quantized activations cost the outputs most: a search that keeps them float.

Every activation's Q -> DQ pair ``x -> y`` is rewritten as ``x + m[i] * (y - x)``, where ``m``
is one extra float input of the graph: ``m[i] = 1`` quantizes activation ``i``, ``0`` keeps it
float. One onnxruntime session then evaluates any choice of float activations, with the
weights quantized throughout. Scores are the worst output's SQNR against the float model
(every Q/DQ pair bypassed) on a few batches.

The search (:func:`search`): the score with every activation quantized; the gain of keeping
each one float alone (one run per activation); then the activations in order of gain, as few
as reach ``target_db`` (found by doubling, then bisecting the count), at most ``limit``.
Costs: (activations + ~2 log2(activations)) runs of the batches given; with ``rank_score``
(fewer batches) the per-activation runs are of those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphq import graph as G
from graphq import runtime
from graphq.kernels import quant as Q
from graphq.progress import Progress

Feed = dict[str, np.ndarray]

MASK_INPUT = "graphq_sensitivity_mask"


def masked_model(model: onnx.ModelProto, units: dict[str, int], count: int
                 ) -> tuple[onnx.ModelProto, str]:
    """``model`` with the pair after each tensor of ``units`` (name -> mask index) blended by
    the mask input (its name is returned): ``x + m[i] * (DQ(Q(x)) - x)``."""
    graph = G.import_graph(model)
    names = G.used_names(graph)
    mask = gs.Variable(G.unique_name(graph, MASK_INPUT, names), np.float32, [count])
    graph.inputs.append(mask)
    for tensor, (q, dq) in G.qdq_pairs(graph).items():
        if tensor not in units:
            continue
        x, y = q.inputs[0], dq.outputs[0]
        base = f"{tensor}_sensitivity"
        blended = gs.Variable(G.unique_name(graph, base, names), x.dtype, x.shape)
        G.replace_uses(graph, y, blended)
        index = gs.Constant(G.unique_name(graph, f"{base}_index", names),
                            np.array([units[tensor]], np.int64))
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        m32, m, d, md = (gs.Variable(G.unique_name(graph, f"{base}_{k}", names), t)
                         for k, t in (("m32", np.float32), ("m", dtype), ("d", dtype),
                                      ("md", dtype)))
        graph.nodes += [
            gs.Node("Gather", G.unique_name(graph, f"{base}_gather", names), {"axis": 0},
                    [mask, index], [m32]),
            gs.Node("Cast", G.unique_name(graph, f"{base}_cast", names),
                    {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)}, [m32], [m]),
            gs.Node("Sub", G.unique_name(graph, f"{base}_sub", names), {}, [y, x], [d]),
            gs.Node("Mul", G.unique_name(graph, f"{base}_mul", names), {}, [d, m], [md]),
            gs.Node("Add", G.unique_name(graph, f"{base}_add", names), {}, [x, md],
                    [blended]),
        ]
        for i, out in enumerate(graph.outputs):  # a pair on a graph output
            if out is y:
                graph.outputs[i] = blended
    graph.cleanup().toposort()
    return G.export(graph, like=model), mask.name


def worst_sqnr(ref: Sequence[dict[str, np.ndarray]], out: Sequence[dict[str, np.ndarray]],
               parts: dict[str, list[G.Part]] | None = None) -> float:
    """The lowest SQNR (dB) over the float outputs, each over all batches together, and over
    their ``parts`` (:func:`graphq.graph.output_parts`)."""
    floats = {name for name, first in ref[0].items() if first.dtype.kind == "f"}
    fidelity = Q.output_fidelity(ref, out, {k: v for k, v in (parts or {}).items()
                                            if k in floats})
    keys = floats | {label for name in floats for label, *_ in (parts or {}).get(name, [])}
    return min((fidelity[k]["sqnr_db"] for k in keys if k in fidelity), default=math.inf)


@dataclass
class Result:
    """What the search found: ``floats`` (unit indices kept float, most sensitive first)."""

    baseline_db: float
    final_db: float
    floats: list[int]
    gains_db: dict[int, float] = field(default_factory=dict)
    runs: int = 0
    rank_runs: int = 0  #: runs of ``rank_score`` (fewer batches), when one was given
    #: the counts of ``floats`` the choice may be cut to, ascending (None: any count; a
    #: search by segment keeps a segment's activations together)
    cuts: list[int] | None = None


def mask(count: int, floats: Sequence[int]) -> np.ndarray:
    """The mask input that keeps the units ``floats`` float (0.0) and quantizes the rest."""
    m = np.ones(count, np.float32)
    m[list(floats)] = 0.0
    return m


def search(score: Callable[[np.ndarray], float], count: int, target_db: float, limit: int,
           progress: Progress | None = None,
           rank_score: Callable[[np.ndarray], float] | None = None) -> Result:
    """Unit indices to keep float (``score(mask)``: the worst output SQNR for a mask of 1.0
    quantized / 0.0 float); see the module doc. ``rank_score``: the same on fewer batches,
    for the per-unit gains only (one run per unit, the search's cost); the count kept float
    is still found with ``score``."""
    runs = {"score": 0, "rank": 0}

    def run(floats: Sequence[int], by: Callable[[np.ndarray], float] = score) -> float:
        runs["rank" if by is not score else "score"] += 1
        return by(mask(count, floats))

    def result(final: float, floats: list[int], gains: dict[int, float] | None = None
               ) -> Result:
        return Result(baseline, final, floats, gains or {}, runs["score"], runs["rank"])

    baseline = run([])
    if baseline >= target_db or limit <= 0 or count == 0:
        return result(baseline, [])
    ranker = rank_score or score
    rank_base = baseline if ranker is score else run([], ranker)
    gains = {}
    for i in range(count):
        gains[i] = run([i], ranker) - rank_base
        if progress is not None:
            progress.update(i + 1)
    order = [i for i in sorted(gains, key=lambda i: -gains[i]) if gains[i] > 0][:limit]
    if not order:
        return result(baseline, [], gains)
    best, scores = fewest_reaching(lambda k: run(order[:k]), len(order), target_db,
                                   {0: baseline})
    return result(scores[best], order[:best], gains)


def fewest_reaching(score_of: Callable[[int], float], top: int, target_db: float,
                    scores: dict[int, float] | None = None) -> tuple[int, dict[int, float]]:
    """The fewest ``k`` in ``0..top`` whose ``score_of(k)`` (the score with the first ``k``
    of an ordered list kept float, as a rule growing with ``k``) reaches ``target_db``, found
    by doubling, then bisecting; when none evaluated reaches it, the best evaluated (the
    fewest among ties). ``scores``: scores already known (``k -> dB``); returned with every
    score evaluated."""
    scores = {} if scores is None else scores

    def at(k: int) -> float:
        if k not in scores:
            scores[k] = score_of(k)
        return scores[k]

    if at(0) >= target_db:
        return 0, scores
    if top > 0:
        k = 1
        while k < top and at(k) < target_db:
            k *= 2
        k = min(k, top)
        if at(k) >= target_db:   # bisect down to the fewest that reach the target
            lo, hi = k // 2, k
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if at(mid) >= target_db else (mid, hi)
            return hi, scores
    return max(scores, key=lambda c: (scores[c], -c)), scores


def session_scores(model: onnx.ModelProto, feeds: Sequence[Feed],
                   reference: Sequence[dict[str, np.ndarray]], mask_name: str,
                   providers: list[str] | None, rank: int = 0
                   ) -> tuple[Callable[[np.ndarray], float], Callable[[np.ndarray], float] | None]:
    """``score(mask)`` over ``feeds`` with one session of the masked ``model`` (the worst
    output SQNR, parts of concatenated outputs apart), and (None unless ``0 < rank <
    len(feeds)``) the same over ``rank`` of them spread evenly (first and last included)."""
    sess = runtime.session(model, providers)
    parts = G.output_parts(model)

    def over(which: Sequence[int]) -> Callable[[np.ndarray], float]:
        def score(mask: np.ndarray) -> float:
            outs = [runtime.run(sess, {**feeds[i], mask_name: mask}) for i in which]
            return worst_sqnr([reference[i] for i in which], outs, parts)
        return score

    every = range(len(feeds))
    if not 0 < rank < len(feeds):
        return over(every), None
    return over(every), over(sorted({round(x) for x in np.linspace(0, len(feeds) - 1, rank)}))
