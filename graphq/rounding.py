"""calibrate's ``weight_rounding = "gptq"``: round each weight for what its op's output loses
on the calibration data, not weight by weight (:func:`graphq.kernels.rounding.gptq`).

For each Conv and ConvTranspose (1-D, 2-D; grouped and depthwise too), Gemm and MatMul whose
constant weight is quantized, the rows its weight multiplies (a Conv's input patches; a
ConvTranspose's patches of its input spread out by its strides, the Conv it equals with the
kernel flipped; a Gemm's input rows)
are sampled on the search batches from the float graph, ``H = E[x x^T]`` is accumulated (one
per input tensor and geometry: the query, key and value projections of one input share it)
and the weight is rounded column by column onto its grid (the scale insert-qdq gave it, per
row the range nearest rounding spans, so 7-bit weights stay 7-bit). With bias correction,
the op's bias then takes the mean error the rounding leaves, ``(W_q - W) E[x]``, ``E[x]``
over the patches (a Conv's zero padding seen). Measured on the benchmark's nets (held-out
worst output, same activation scales), this did better than letting GPTQ round with the bias
as a last column of constant input. The rounded weight replaces the float one in the graph,
exactly on the grid: the fake-quant graph's float view carries it, and emit's deploy graph
stores the same integers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphq import graph as G
from graphq import runtime
from graphq.kernels import quant as Q
from graphq.kernels.rounding import gptq
from graphq.passes.insert_qdq import channel_axis
from graphq.progress import Progress
from graphq.quant import QuantTable, TensorQuant

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


@dataclass
class Site:
    """A weight GPTQ rounds: its op, the float constant, its table entry, the float tensor
    the op reads (``source``) and how the op reads it (``key``: sites with the same source
    and key share ``H``)."""

    node: gs.Node
    weight: gs.Tensor
    entry: TensorQuant
    source: str
    key: tuple

    @property
    def groups(self) -> int:
        conv = self.node.op in ("Conv", "ConvTranspose")
        return int(self.node.attrs.get("group", 1)) if conv else 1

    def rows(self, values: np.ndarray | None = None) -> np.ndarray:
        """The weight (or ``values`` of its shape) as (groups, rows of a group, columns): a
        Conv's output channels by (input channels of the group x kernel), a ConvTranspose's
        (C, M / groups, kernel) the same way for the Conv it equals (output channels of a
        group by input channels of the group x the flipped kernel), a Gemm / MatMul's
        outputs by inputs."""
        w = np.asarray(G.constant_values(self.weight) if values is None else values,
                       np.float64)
        if self.node.op == "ConvTranspose":
            g, spatial = self.groups, tuple(range(3, w.ndim + 1))
            w = np.flip(w.reshape(g, w.shape[0] // g, *w.shape[1:]), spatial)
            return np.swapaxes(w, 1, 2).reshape(g, w.shape[2], -1)
        if self.node.op == "Conv":
            w = w.reshape(w.shape[0], -1)
        elif not (self.node.op == "Gemm" and self.node.attrs.get("transB", 0)):
            w = w.T
        return w.reshape(self.groups, -1, w.shape[1])

    def write(self, rows: np.ndarray) -> None:
        values = np.asarray(G.constant_values(self.weight))
        if self.node.op == "ConvTranspose":
            g, c = self.groups, values.shape[0] // self.groups
            w = np.swapaxes(rows.reshape(g, values.shape[1], c, *values.shape[2:]), 1, 2)
            w = np.flip(w, tuple(range(3, w.ndim))).reshape(values.shape)
        else:
            w = rows.reshape(-1, rows.shape[2])
            if self.node.op == "Conv":
                w = w.reshape(values.shape)
            elif not (self.node.op == "Gemm" and self.node.attrs.get("transB", 0)):
                w = w.T
        _set_values(self.weight, np.ascontiguousarray(w).astype(values.dtype))

    def per_row(self, values: np.ndarray, rows: int) -> np.ndarray:
        """A per-tensor or per-channel scale or zero point as one value per row (groups,
        ``rows`` of a group, as :meth:`rows` gives them): a ConvTranspose's per-channel
        values (one per output channel of a group) repeat in every group."""
        g, r = self.groups, rows
        a = np.asarray(values, np.float64).reshape(-1)
        return a.reshape(g, r) if a.size == g * r else np.broadcast_to(a, (g, r)).copy()


def _set_values(tensor: gs.Tensor, values: np.ndarray) -> None:
    if isinstance(tensor, gs.Constant):
        tensor.values = values
    else:  # a Constant node's output (paddle2onnx)
        node = tensor.inputs[0]
        node.attrs["value"] = gs.Constant(node.attrs["value"].name, values)


def sites(graph: gs.Graph, table: QuantTable) -> tuple[list[Site], list[str]]:
    """The weights GPTQ can round, and a note for each quantized one it cannot, with why."""
    found, skipped = [], []
    for node in G.nodes(graph):
        if node.op not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or len(node.inputs) < 2:
            continue
        weight = G.float_source(node.inputs[1])
        entry = table.get(weight.name)
        values = G.constant_values(weight)
        if (weight is node.inputs[1] or entry is None or entry.role != "weight"
                or not entry.quantized or values is None):
            continue
        why, key = _geometry(node, values, entry)
        if why is None and len(weight.outputs) != 1:
            why = "its weight feeds more than one quantizer"
        if why is None and len(node.inputs[1].outputs) != 1:
            why = "its weight is read by more than one op"
        if why is not None:
            skipped.append(f"{node.op} '{node.name}': {why}")
            continue
        found.append(Site(node, weight, entry, G.float_source(node.inputs[0]).name, key))
    return found, skipped


def _geometry(node: gs.Node, values: np.ndarray, entry: TensorQuant
              ) -> tuple[str | None, tuple]:
    """Why GPTQ cannot round this op's weight (None: it can), and how the op reads its
    input: ``("rows",)`` (the last axis is the columns) or a Conv's patch geometry."""
    channel = channel_axis(node, 1, values.ndim)
    if entry.axis is not None and channel is not None and entry.axis not in (
            channel, channel - values.ndim):
        return f"its weight is quantized per channel on axis {entry.axis}", ()
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA", ()
    if node.op not in ("Conv", "ConvTranspose"):
        return (None, ("rows",)) if values.ndim == 2 else (f"its weight is {values.ndim}-D", ())
    if values.ndim not in (3, 4):
        return f"a {values.ndim - 2}-D {node.op}", ()
    spatial = values.ndim - 2
    kernel = tuple(int(k) for k in values.shape[2:])
    strides = tuple(int(s) for s in node.attrs.get("strides", [1] * spatial))
    dilations = tuple(int(d) for d in node.attrs.get("dilations", [1] * spatial))
    pads = tuple(int(p) for p in node.attrs.get("pads", [0] * 2 * spatial))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    groups = int(node.attrs.get("group", 1))
    if node.op == "Conv":
        return None, ("conv", kernel, strides, dilations, pads, auto_pad, groups)
    if "output_shape" in node.attrs or auto_pad not in ("NOTSET", "VALID"):
        return "a ConvTranspose that sets its output shape or auto_pad", ()
    if auto_pad == "VALID":
        pads = (0,) * 2 * spatial
    extra = tuple(int(p) for p in node.attrs.get("output_padding", [0] * spatial))
    return None, ("deconv", kernel, strides, dilations, pads, extra, groups)


def _conv_patches(x: np.ndarray, key: tuple, count: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """``count`` input patches of a Conv (at output positions drawn without replacement) as
    (groups, count, columns), columns in the weight's (channel, kernel) order."""
    _, kernel, strides, dilations, pads, auto_pad, groups = key
    if x.ndim == 3:  # 1-D: as 2-D with a height of 1
        x = x[:, :, None, :]
        kernel, strides, dilations = (1, *kernel), (1, *strides), (1, *dilations)
        pads = (0, pads[0], 0, pads[1])
    size = x.shape[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 4
        for i in range(2):
            out = -(-size[i] // strides[i])
            total = max((out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - size[i], 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + 2] = (large, small) if auto_pad == "SAME_LOWER" else (small, large)
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, height, width = x.shape
    out = [(dim - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i, dim in enumerate((height, width))]
    total = n * out[0] * out[1]
    if total <= 0:
        return np.zeros((groups, 0, c // groups * kernel[0] * kernel[1]), np.float32)
    pick = rng.choice(total, min(count, total), replace=False)
    image, rest = np.divmod(pick, out[0] * out[1])
    oy, ox = np.divmod(rest, out[1])
    iy = oy[:, None] * strides[0] + dilations[0] * np.arange(kernel[0])
    ix = ox[:, None] * strides[1] + dilations[1] * np.arange(kernel[1])
    patches = x[image[:, None, None, None], np.arange(c)[None, :, None, None],
                iy[:, None, :, None], ix[:, None, None, :]]
    return patches.reshape(len(pick), groups, -1).transpose(1, 0, 2)


def _spread(x: np.ndarray, key: tuple) -> tuple[np.ndarray, tuple]:
    """A ConvTranspose's input as the input of the Conv it equals (stride 1, its dilations,
    its kernel flipped): ``strides - 1`` zeros between neighbours, then ``d (k - 1) - pad``
    on each side (``+ output_padding`` at the end; a negative amount crops), and that
    Conv's patch geometry."""
    _, kernel, strides, dilations, pads, extra, groups = key
    spatial = len(kernel)
    spread = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in
                                          zip(x.shape[2:], strides, strict=True)), x.dtype)
    spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    widths, crops = [(0, 0), (0, 0)], [slice(None), slice(None)]
    for i in range(spatial):
        reach = dilations[i] * (kernel[i] - 1)
        before, after = reach - pads[i], reach - pads[i + spatial] + extra[i]
        widths.append((max(before, 0), max(after, 0)))
        end = spread.shape[2 + i] + max(before, 0) + max(after, 0) - max(-after, 0)
        crops.append(slice(max(-before, 0), end))
    spread = np.pad(spread, widths)[tuple(crops)]
    return spread, ("conv", kernel, (1,) * spatial, dilations, (0,) * 2 * spatial, "NOTSET",
                    groups)


def _input_rows(x: np.ndarray, key: tuple, count: int, rng: np.random.Generator
                ) -> np.ndarray:
    """Up to ``count`` rows of what the weight multiplies, as (groups, rows, columns + 1),
    the last column the constant 1 (the bias's input)."""
    x = np.asarray(x, np.float32)
    if key[0] == "deconv":
        x, key = _spread(x, key)
    if key[0] == "conv":
        rows = _conv_patches(x, key, count, rng)
    else:
        flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(0, 0)
        if len(flat) > count:
            flat = flat[np.sort(rng.choice(len(flat), count, replace=False))]
        rows = flat[None]
    ones = np.ones(rows.shape[:2] + (1,), np.float32)
    return np.concatenate([rows, ones], axis=2)


def second_moments(model: onnx.ModelProto, found: Sequence[Site], batches: Sequence[Feed],
                   providers: list[str], rows: int) -> dict[tuple, np.ndarray]:
    """``E[x x^T]`` (float64, groups x (columns + 1)^2, the constant 1 last) per (source,
    key) over ``rows`` input rows drawn evenly from ``batches``, run through the float view of
    ``model``. A source no batch reached (an If branch never taken) is left out."""
    wanted = sorted({s.source for s in found})
    renamed: dict[str, str] = {}
    view = G.with_outputs(model, wanted, float_view=True, renamed=renamed)
    sess = runtime.session(view, providers, spinning=False)
    fetch = [renamed.get(n, n) for n in wanted]
    keys = sorted({(s.source, s.key) for s in found}, key=repr)
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = dict.fromkeys(keys, 0)
    per_batch = math.ceil(rows / max(len(batches), 1))
    progress = Progress("gptq statistics", total=len(batches), unit="batch")
    for b, feed in enumerate(batches):
        values = dict(zip(wanted, sess.run(fetch, feed), strict=True))
        for k, (source, key) in enumerate(keys):
            x = values[source]
            if x.size == 0:
                continue
            rng = np.random.default_rng([b, k])
            r = _input_rows(x, key, per_batch, rng)
            if r.shape[1] == 0:
                continue
            h = np.matmul(np.swapaxes(r, 1, 2), r).astype(np.float64)
            sums[(source, key)] = sums.get((source, key), 0) + h
            counts[(source, key)] += r.shape[1]
        progress.update(b + 1)
    progress.close()
    return {k: v / counts[k] for k, v in sums.items()}


@dataclass
class Rounded:
    """What :func:`round_weights` did: each site with its float weight before and after,
    the ids of the ops whose bias it corrected, and its notes. :meth:`use` switches the
    graph's weights between the two (the biases are the caller's)."""

    weights: list[tuple[Site, np.ndarray, np.ndarray]]
    biased: set[int]
    notes: list[str]

    def use(self, rounded: bool, table: QuantTable) -> None:
        """Put the rounded (or the original) weights in the graph, and say so in ``table``'s
        entries (method ``...+gptq``)."""
        for site, before, after in self.weights:
            _set_values(site.weight, after if rounded else before)
            entry = table.get(site.weight.name)
            base = entry.method.removesuffix("+gptq")
            entry.method = base + "+gptq" if rounded else base


def round_weights(model: onnx.ModelProto, graph: gs.Graph, table: QuantTable,
                  batches: Sequence[Feed], providers: list[str], rows: int,
                  correct: Sequence[gs.Node] = ()) -> Rounded:
    """GPTQ-round every weight of ``graph`` it can, in place: the float weight becomes the
    rounded one, and the constant bias of an op in ``correct`` (calibrate's bias correction)
    takes the mean error left."""
    start = time.perf_counter()
    found, skipped = sites(graph, table)
    notes = [f"weight rounding: nearest for {s}" for s in skipped]
    if not found:
        return Rounded([], set(), notes + ["weight rounding: no weight GPTQ can round"])
    moments = second_moments(model, found, batches, providers, rows)
    correct_ids = {id(n) for n in correct}
    done: list[tuple[Site, np.ndarray, np.ndarray]] = []
    biased, unseen = set(), []
    progress = Progress("gptq", total=len(found), unit="weight")
    for i, site in enumerate(found):
        progress.update(i)
        h = moments.get((site.source, site.key))
        if h is None:
            unseen.append(site.node.name)
            continue
        w, entry = site.rows(), site.entry
        scale, zero = (site.per_row(v, w.shape[1]) for v in (entry.scale, entry.zero_point))
        before = np.asarray(G.constant_values(site.weight))
        # each row keeps the span nearest rounding gives it (a 7-bit weight stays 7-bit)
        nearest = site.rows(Q.quantize(before, np.asarray(entry.scale),
                                       np.asarray(entry.zero_point), entry.dtype, entry.axis))
        lo = np.minimum(nearest.min(axis=2), zero)
        hi = np.maximum(nearest.max(axis=2), zero)
        rounded = gptq(w, h[:, :-1, :-1], scale, zero, lo, hi)
        site.write(rounded)
        done.append((site, before, np.asarray(G.constant_values(site.weight))))
        if id(site.node) in correct_ids:  # with the patches' means: padding seen
            shift = np.einsum("grc,gc->gr", rounded - w, h[:, :-1, -1]).reshape(-1)
            bias = site.node.inputs[2]
            bias.values = (bias.values - shift).astype(bias.values.dtype)
            biased.add(id(site.node))
    progress.update(len(found))
    progress.close()
    result = Rounded(done, biased, notes)
    result.use(True, table)
    note = (f"weight rounding: GPTQ rounded {len(done)} weights on {len(batches)} search "
            f"batches ({rows} input rows each), {len(biased)} biases corrected for the mean "
            f"error left, in {time.perf_counter() - start:.1f} s")
    if unseen:
        note += (f"; nearest for {len(unseen)} whose input no batch reached "
                 f"('{unseen[0]}', ...)")
    log.info("%s", note)
    result.notes.append(note)
    return result
