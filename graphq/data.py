"""Data that pipelines run the model on: checked against the model's inputs, read lazily.

Sources:

- an ``.npz`` file: one array per input name, samples on axis 0, cut into batches;
- a ``.npy`` file: the samples of a single-input model, on axis 0;
- a folder of ``.npz`` / ``.npy`` files: one sample or batch each (shapes may differ),
  read in name order, one file at a time;
- inputs that batch along dims the model names differently and that count differently in
  the data (a graph network's ``[num_nodes, F]``, ``[2, num_edges]``, ``[num_graphs]``):
  each file (or the one ``.npz``) is one batch, fed whole, never split;
- a folder of images (.jpg, .jpeg, .png, .bmp, .webp), with ``[data.image]`` saying how
  to turn them into the model's single input: size, mean, std, layout, channel order;
- from Python, any iterable of feed dicts ``{input name: array}``.

Every feed is checked before use: a wrong input name, dtype, rank or fixed dim is a
DataError that names the input and what the model expects.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from graphq import graph as G
from graphq import runtime
from graphq.errors import DataError, did_you_mean, first_line
from graphq.runtime import batch_axes, input_spec, true_inputs

log = logging.getLogger(__name__)

#: what a pass that needs data says when there is none
DATA_HINT = ("give --data PATH or [data] source (an .npz keyed by input name, a folder of "
             ".npz/.npy files, or an image folder with [data.image]); from Python, "
             "PassManager.run(..., data=...) also takes an iterable of feed dicts")

Feed = dict[str, np.ndarray]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageOptions:
    """The ``[data.image]`` table: ``x = (pixel * scale - mean) / std``, per channel."""

    size: list[int] = field(default_factory=lambda: [224, 224], metadata={
        "help": "height and width the images are resized to"})
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406], metadata={
        "help": "per-channel mean subtracted after scaling (ImageNet's by default)"})
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225], metadata={
        "help": "per-channel standard deviation divided by"})
    scale: float = field(default=1 / 255, metadata={"help": "pixel values are multiplied by "
                                                    "this first"})
    layout: Literal["NCHW", "NHWC"] = field(default="NCHW", metadata={
        "help": "the model input's layout"})
    channels: Literal["RGB", "BGR", "L"] = field(default="RGB", metadata={
        "help": "channel order (L: one grey channel)"})

    def validate(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError("image size must be [height, width]")
        n = 1 if self.channels == "L" else 3
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, n):
                raise ValueError(f"image {name} needs 1 or {n} values for {self.channels}")
        if any(v == 0 for v in self.std):
            raise ValueError("image std must not be 0")


@dataclass
class DataOptions:
    """The ``[data]`` table of a pipeline file."""

    source: str | None = field(default=None, metadata={
        "help": "an .npz/.npy file, a folder of them, or a folder of images with "
                "[data.image] (relative to the pipeline file)"})
    batch_size: int = field(default=16, metadata={"help": "samples per batch", "min": 1})
    limit: int | None = field(default=None, metadata={
        "help": "use at most this many samples", "min": 1})
    image: ImageOptions | None = field(default=None, metadata={
        "help": "how image files become the model's input"})
    labels: str = field(default="label", metadata={
        "help": "an array of this name that is not a model input holds class labels: the "
                "report then gives top-1/top-5 before and after"})


class DataSource:
    """Feeds for a model, read from files or taken from an iterable."""

    def __init__(self, source: str | Path | Iterable[Feed], batch_size: int = 16,
                 limit: int | None = None, image: ImageOptions | None = None,
                 labels: str = "label") -> None:
        if isinstance(source, str | Path):
            source = Path(source)
            if not source.exists():
                raise DataError(f"data not found: {source}")
            if source.is_file() and source.suffix not in (".npz", ".npy"):
                raise DataError(
                    f"data file {source} is neither .npz nor .npy; save the inputs with "
                    "numpy.savez(path, **{input_name: array})"
                )
        self.source = source
        self.batch_size = batch_size
        self.limit = limit
        self.image = image
        self.labels = labels
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"DataSource({self.source!r}, batch_size={self.batch_size}, limit={self.limit})"

    def feeds(self, model: onnx.ModelProto) -> Iterator[Feed]:
        """Checked feeds for ``model``, batch by batch, at most ``limit`` samples."""
        for feed, _ in self.labeled_feeds(model):
            yield feed

    def first(self, model: onnx.ModelProto) -> Feed | None:
        """The first checked feed, or None when there is none or the source is a one-shot
        iterator (reading from it would take that batch from the passes after)."""
        return next(iter(self.head(model, 1)), None)

    def head(self, model: onnx.ModelProto, count: int) -> list[Feed]:
        """The first ``count`` checked feeds (fewer where the data has fewer), or none when
        the source is a one-shot iterator (reading from it would take those batches from
        the passes after)."""
        if not isinstance(self.source, Path) and iter(self.source) is self.source:
            return []
        return list(itertools.islice(self.feeds(model), count))

    def labeled_feeds(self, model: onnx.ModelProto) -> Iterator[tuple[Feed, np.ndarray | None]]:
        """Like :meth:`feeds`, with each batch's labels when the data carries an array
        named ``labels`` that is not a model input (else None)."""
        inputs = {v.name: v for v in true_inputs(model)}
        base = batch_axes(list(inputs.values()))
        names = _batch_names(list(inputs.values()), base)
        key = self.labels if self.labels not in inputs else None
        left = self.limit
        count = 0
        fixed = _fixed_batch(inputs, base)
        raws = (part for whole in self._raw(list(inputs), base, names, fixed)
                for part in _fixed_batches(dict(whole), fixed, list(inputs), self._warn))
        for raw in raws:
            labels = raw.pop(key, None) if key else None
            feed = check_feed(raw, inputs, where=self._where(count))
            if labels is not None:
                feed[key] = np.asarray(labels)
            axes = _feed_axes(feed, base, names)
            for part in _fit_batch(feed, inputs, axes):
                if left is not None and left <= 0:
                    return
                if left is not None:
                    n = _batch_len(part, axes)
                    if n > left:
                        part = _take(part, axes, 0, left)
                    left -= min(n, left)
                count += 1
                label = part.pop(key, None) if key else None
                yield part, label
        if count == 0:
            raise DataError(f"the data {self.source} holds no samples")

    def _warn(self, text: str) -> None:
        """Log a warning about the data once, however often it is read."""
        if text not in self._warned:
            self._warned.add(text)
            log.warning("data %s: %s", self.source, text)

    def _where(self, index: int) -> str:
        return f"data {self.source}, batch {index}" if isinstance(self.source, Path) else \
            f"data batch {index}"

    def _raw(self, names: list[str], axes: dict[str, int | None],
             dims: dict[str, str | None], fixed: int | None = None
             ) -> Iterator[dict[str, Any]]:
        """The data as read, batch by batch (``fixed``: the model's fixed batch size, in
        which images are batched, a remainder left out)."""
        source = self.source
        if not isinstance(source, Path):
            yield from source
        elif source.is_dir():
            images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files = sorted(p for p in source.iterdir() if p.suffix in (".npz", ".npy"))
            if images and not files:
                if fixed and len(images) % fixed:
                    self._warn(_left_out(fixed, len(images), "images"))
                    images = images[:len(images) - len(images) % fixed]
                yield from _image_batches(images, names, self.image,
                                          fixed or self.batch_size, source)
                return
            if not files:
                raise DataError(f"the data folder {source} has no .npz, .npy or image files")
            for path in files:
                yield _read_file(path, names)
        else:
            arrays = _read_file(source, names)
            axes = _feed_axes(arrays, axes, dims)
            if all(axes.get(k) is None for k in names if k in arrays):
                yield arrays  # no input batches: the file is one feed, its labels whole
                return
            total = _batch_len(arrays, axes)
            for start in range(0, total, self.batch_size):
                yield _take(arrays, axes, start, start + self.batch_size)


def _fixed_batch(inputs: dict[str, onnx.ValueInfoProto], axes: dict[str, int | None]
                 ) -> int | None:
    """N where every input's first axis is fixed to the same N > 1 and none has a batch axis
    (:func:`graphq.runtime.batch_axes`): the model takes batches of exactly N samples."""
    if any(a is not None for a in axes.values()):
        return None
    firsts = {dims[0] for v in inputs.values() if (dims := input_spec(v)[1])}
    n = firsts.pop() if len(firsts) == 1 else None
    return n if isinstance(n, int) and n > 1 else None


def _fixed_batches(raw: dict[str, Any], n: int | None, names: list[str],
                   warn: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """``raw`` cut into batches of ``n`` samples on axis 0, for a model whose batch is fixed
    at ``n`` (a remainder left out, with a warning); as it is otherwise, or where it does
    not hold a multiple of ``n`` samples or more (checked then as any feed is)."""
    lengths = {np.shape(raw[k])[0] for k in names if k in raw and np.ndim(raw[k]) > 0}
    total = lengths.pop() if len(lengths) == 1 else 0
    if n is None or total <= n:
        yield raw
        return
    if total % n:
        warn(_left_out(n, total, "samples"))
    for start in range(0, total - n + 1, n):
        yield {k: v[start:start + n] if np.ndim(v) > 0 and np.shape(v)[0] == total else v
               for k, v in raw.items()}


def _left_out(n: int, total: int, what: str) -> str:
    return (f"the model's batch is fixed at {n} samples; the last {total % n} of {total} "
            f"{what} are left out")


def _fit_batch(feed: Feed, inputs: dict[str, onnx.ValueInfoProto],
               axes: dict[str, int | None]) -> Iterator[Feed]:
    """Split a batch into single samples when the model's batch dim is fixed to 1."""
    fixed_one = any(axes[k] is not None and input_spec(v)[1][axes[k]] == 1
                    for k, v in inputs.items())
    n = _batch_len(feed, axes)
    if not fixed_one or n <= 1:
        yield feed
        return
    for i in range(n):
        yield _take(feed, axes, i, i + 1)


def _take(feed: dict[str, np.ndarray], axes: dict[str, int | None], start: int,
          stop: int) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of every array on its batch axis (axis 0 for arrays that are
    not model inputs, such as labels); an input without a batch axis is shared whole."""
    out = {}
    for k, v in feed.items():
        axis = axes.get(k, 0)
        if axis is None or np.ndim(v) <= axis:
            out[k] = v
        else:
            out[k] = v[(slice(None),) * axis + (slice(start, stop),)]
    return out


def _image_batches(paths: list[Path], names: list[str], options: ImageOptions | None,
                   batch_size: int, folder: Path) -> Iterator[dict[str, np.ndarray]]:
    """Decode, resize and normalize images into batches for a single-input model."""
    if options is None:
        raise DataError(f"{folder} holds images: add a [data.image] table (size, mean, std, "
                        "layout, channels) to say how they become the model's input")
    if len(names) != 1:
        raise DataError(f"images can feed a model with one input; this one has "
                        f"{len(names)} ({', '.join(names)}): use .npz files keyed by input name")
    for start in range(0, len(paths), batch_size):
        batch = np.stack([load_image(p, options) for p in paths[start:start + batch_size]])
        yield {names[0]: batch}


def load_image(path: Path, options: ImageOptions) -> np.ndarray:
    """One image as a float32 array in the layout and normalization of ``options``."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("reading images needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as img:
            mode = "L" if options.channels == "L" else "RGB"
            img = img.convert(mode).resize((options.size[1], options.size[0]),
                                           Image.Resampling.BILINEAR)
            pixels = np.asarray(img, np.float32)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if options.channels == "BGR":
        pixels = pixels[:, :, ::-1]
    x = (pixels * options.scale - np.asarray(options.mean, np.float32)) / np.asarray(
        options.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if options.layout == "NCHW" else x,
                                dtype=np.float32)


def _read_file(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            if len(names) != 1:
                raise DataError(
                    f"{path} is a .npy file, which holds one array, but the model has "
                    f"{len(names)} inputs ({', '.join(names)}); use an .npz keyed by input name"
                )
            return {names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc


def samples_in(feed: Feed, model: onnx.ModelProto) -> int:
    """The samples in one feed of ``model``, counted on each input's batch axis (1 for a
    feed of inputs that batch along different dims, :func:`_feed_axes`)."""
    return _batch_len(feed, _axes_of(feed, model))


def _axes_of(feed: Feed, model: onnx.ModelProto) -> dict[str, int | None]:
    """The batch axis of each of ``feed``'s inputs (:func:`batch_axes`, :func:`_feed_axes`)."""
    inputs = true_inputs(model)
    axes = batch_axes(inputs)
    return _feed_axes(feed, axes, _batch_names(inputs, axes))


#: the bytes of intermediate tensors one run may make (:class:`Pieces`): a YOLO's batch of
#: 16 photos at 1280x1280 makes 13 GB (843 MB a photo), DNSMOS's of 16 clips 9 s long
#: 5.9 GB (367 MB a clip, from 577 KB of input); timed in 4 sessions at once, or fetched for
#: calibration, such batches took 10-15 GB
RUN_BYTES = 1 << 30

#: the share of ``RUN_BYTES`` a plain run (no intermediate tensor fetched) may make: it holds
#: a fraction of what it makes at its peak, as onnxruntime reuses buffers (DNSMOS's 16 clips
#: make 5.9 GB; the run peaked 1.3 GB above its session's), but each session keeps its peak
#: (DNSMOS's graphq run peaked at 3.0 GB at share 1, 4.7 GB at 2, 6.8 GB at 4)
PLAIN_SHARE = 2.0


class Pieces:
    """Cuts batches into pieces of consecutive samples whose runs make at most ``share`` of
    ``RUN_BYTES`` of intermediate tensors: every node's outputs, summed, measured once on
    the first batch's first sample run alone, as bytes per byte of input (so batches of
    other shapes, wider images, are cut to fit too); where one sample does not run (a
    ``[frames, bins]`` input's single frame under a 3x3 convolution, a Reshape to
    ``[4, -1]``), on its first 4, 16, ... samples, the first slice that runs. A batch whose
    samples cannot be told apart (one sample, inputs batched along different dims) stays
    whole, and so do all where no slice runs."""

    def __init__(self) -> None:
        self.ratio: float | None = None  # intermediate bytes per input byte

    def split(self, feed: Feed, model: onnx.ModelProto, providers: list[str] | None,
              share: float = 1.0) -> list[Feed]:
        axes = _axes_of(feed, model)
        n = _batch_len(feed, axes)
        if n <= 1:
            return [feed]
        if self.ratio is None:
            self.ratio = _measured_ratio(model, feed, axes, n, providers)
        per_sample = self.ratio * _input_bytes(feed) / n
        return list(_cut(feed, axes, n, int(RUN_BYTES * share // max(per_sample, 1.0))))

    def may_exceed(self, feed: Feed, share: float = 1.0) -> bool:
        """Whether a run of ``feed`` (a piece :meth:`split` gave) may make more than ``share``
        of ``RUN_BYTES``: by the measured ratio, or unknown (True) where nothing was measured,
        as for data of single samples, which are never cut."""
        return self.ratio is None or self.ratio * _input_bytes(feed) > RUN_BYTES * share


def _measured_ratio(model: onnx.ModelProto, feed: Feed, axes: dict[str, int | None], n: int,
                    providers: list[str] | None) -> float:
    """Intermediate bytes per input byte, on the first slice of 1, 4, 16, ... of the ``n``
    samples of ``feed`` that runs (0 where none does: its batches are then not cut)."""
    names = [o for node in model.graph.node for o in node.output if o]
    options = runtime.quiet_options()
    options.log_severity_level = 4  # a slice too small to run is expected: no error line
    try:
        sess = runtime.session(G.with_outputs(model, names), providers, options,
                               spinning=False)
    except Exception as exc:  # noqa: BLE001 - a measurement: without it, batches stay whole
        log.debug("intermediate tensors not measured (%s)", first_line(exc, 200))
        return 0.0
    error = ""
    for size in [*itertools.takewhile(lambda k: k < n, (4 ** i for i in itertools.count())), n]:
        piece = _take(feed, axes, 0, size)
        try:
            made = sum(v.nbytes for v in sess.run(None, piece) if isinstance(v, np.ndarray))
        except Exception as exc:  # noqa: BLE001 - a slice too small for the graph
            error = first_line(exc, 200)
            continue
        ratio = made / max(_input_bytes(piece), 1)
        log.debug("a run makes %.3g bytes of intermediate tensors per byte of input "
                  "(measured on %d sample(s)%s)", ratio, size,
                  f"; fewer did not run: {error}" if error else "")
        return ratio
    log.debug("intermediate tensors not measured (%s)", error)
    return 0.0


def _cut(feed: Feed, axes: dict[str, int | None], n: int, step: int) -> Iterator[Feed]:
    """``feed`` (``n`` samples) in pieces of ``step`` samples (at least one); whole when
    they fit."""
    step = max(1, step)
    if step >= n:
        yield feed
        return
    for start in range(0, n, step):
        yield _take(feed, axes, start, min(start + step, n))


def _input_bytes(feed: Feed) -> int:
    return sum(np.asarray(v).nbytes for v in feed.values())


def _batch_names(inputs: list[onnx.ValueInfoProto], axes: dict[str, int | None]
                 ) -> dict[str, str | None]:
    """The symbolic name of each input's batch axis (None where it has none or no name)."""
    names = {}
    for v in inputs:
        dims, axis = input_spec(v)[1], axes.get(v.name)
        name = dims[axis] if axis is not None and dims and axis < len(dims) else None
        names[v.name] = name if isinstance(name, str) and name else None
    return names


def _feed_axes(feed: dict[str, Any], axes: dict[str, int | None],
               names: dict[str, str | None]) -> dict[str, int | None]:
    """``axes``, or no batch axis at all for ``feed`` when its inputs count different numbers
    on their batch axes and those axes have different names in the model (a graph network's
    ``[num_nodes, F]``, ``[2, num_edges]``, ``[num_graphs]``): such a feed is one batch, fed
    whole and never split. Inputs whose batch axes share a name and disagree stay an error
    (:func:`_batch_len`)."""
    lengths: dict[str, set[int]] = {}  # batch dim name -> the counts its inputs hold
    for k, v in feed.items():
        axis = axes.get(k, 0)
        if k not in names or axis is None or np.ndim(v) <= axis:
            continue
        if names[k] is None:
            return axes  # an unnamed batch dim: nothing says it is not the others'
        lengths.setdefault(names[k], set()).add(np.shape(v)[axis])
    counts = [next(iter(n)) for n in lengths.values() if len(n) == 1]
    if len(counts) == len(lengths) > 1 and len(set(counts)) > 1:
        return dict.fromkeys(axes)
    return axes


def run_failure(model: onnx.ModelProto, feed: Feed, run: Any, exc: BaseException,
                what: str = "the input model", batch: int = 1) -> DataError:
    """The error for ``what`` failing in onnxruntime on batch ``batch`` of the data
    (``run(feed)`` raised ``exc``): names the batch and the error. The batch's samples are
    then run one at a time (at most ``_ALONE``): where each runs alone, the graph fixes the
    batch size at 1 and the message says how to feed one sample at a time; where one fails
    alone too, it names that sample."""
    n = samples_in(feed, model)
    text = (f"{what} does not run in onnxruntime on batch {batch} of the data ({n} sample"
            f"{'s' if n != 1 else ''}): {first_line(exc)}")
    axes = batch_axes(true_inputs(model))
    for i in range(min(n, _ALONE) if n > 1 else 0):
        one = {k: v if axes.get(k, 0) is None or np.ndim(v) <= axes.get(k, 0) else
               np.take(v, [i], axis=axes.get(k, 0)) for k, v in feed.items()}
        try:
            run(one)
        except Exception as alone:  # noqa: BLE001 - onnxruntime's, on this sample
            return DataError(f"{text}. Sample {i} of that batch fails on its own too "
                             f"({first_line(alone)[:120]}). {_CHECK}")
    if n > 1:
        return DataError(
            f"{text}. Each of its samples runs on its own: the graph fixes the batch size at "
            "1 although its input declares a variable one (a Reshape to a constant shape, "
            "say). Feed one sample at a time: `graphq run ... --batch-size 1`, or "
            "batch_size = 1 under [data] in the pipeline file")
    return DataError(f"{text}. {_CHECK}")


#: samples of a failing batch :func:`run_failure` runs one at a time.
_ALONE = 64

_CHECK = ("Check that the data is what the model expects (value ranges, token ids within its "
          "vocabulary, the sizes its graph assumes)")


def _batch_len(feed: dict[str, np.ndarray], axes: dict[str, int | None]) -> int:
    """The samples in a batch, counted on each input's batch axis (:func:`batch_axes`)."""
    lengths = {}
    for k, v in feed.items():
        axis = axes.get(k, 0)
        if axis is not None and np.ndim(v) > axis:
            lengths[k] = v.shape[axis]
    if len(set(lengths.values())) > 1:
        where = ", ".join(f"'{k}' {n} (axis {axes.get(k, 0)})" for k, n in lengths.items())
        raise DataError(f"the inputs hold different numbers of samples: {where}; every "
                        "input needs the same number of samples on its batch axis")
    if not lengths:
        return 1 if feed else 0
    return next(iter(lengths.values()))


def check_feed(raw: dict[str, Any], inputs: dict[str, onnx.ValueInfoProto], where: str) -> Feed:
    """Check one feed against the model's inputs; cast within a kind (float64 -> float32)."""
    for name in raw:
        if name not in inputs:
            raise DataError(
                f"{where}: '{name}' is not an input of the model{did_you_mean(name, inputs)}; "
                f"the model's inputs are: {', '.join(inputs)}"
            )
    feed = {}
    for name, value in inputs.items():
        if name not in raw:
            raise DataError(
                f"{where}: no array for the model input '{name}'; "
                f"the data has: {', '.join(raw) or '(nothing)'}"
            )
        dtype, dims = input_spec(value)
        array = np.asarray(raw[name])
        if array.dtype != dtype:
            strings = array.dtype.kind in "US" and dtype.kind == "O"  # npz keeps str as <U
            if array.dtype.kind != dtype.kind and not strings and not (
                    array.dtype.kind in "iu" and dtype.kind in "iu"):
                raise DataError(
                    f"{where}: input '{name}' is {array.dtype} but the model expects {dtype}"
                )
            array = array.astype(dtype)
        if array.dtype.kind == "f" and np.isnan(array).any():
            raise DataError(
                f"{where}: input '{name}' holds {int(np.isnan(array).sum())} NaN values; "
                "clean the data (NaN has no meaning as model input)"
            )
        if dims and array.ndim != len(dims):
            raise DataError(
                f"{where}: input '{name}' has shape {list(array.shape)} but the model expects "
                f"rank {len(dims)}: {_shape_text(dims)}"
            )
        for axis, (have, want) in enumerate(zip(array.shape, dims, strict=False)):
            if isinstance(want, int) and have != want and not (axis == 0 and want == 1):
                fixed = (f"; the model's batch is fixed at {want} samples: give {want} or a "
                         f"multiple of {want} per file" if axis == 0 else "")
                raise DataError(
                    f"{where}: input '{name}' has shape {list(array.shape)} but the model "
                    f"expects {_shape_text(dims)} (axis {axis} must be {want}{fixed})"
                )
        feed[name] = array
    return feed


def _shape_text(dims: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
