"""Loading and saving ONNX models without losing anything on the way.

What is kept: ``metadata_props``, ``doc_string``, producer, model version, domain, opset
imports, local functions, and the external-data layout (a model that came with its weights in
an external file is saved that way again; a model over 2 GB always is).

What is fixed: ``ir_version`` is raised to what the model's opsets need and clamped to what
the installed onnxruntime accepts (onnx 1.23 writes IR 14, onnxruntime 1.31 reads up to 13).

How it is written: into a temporary folder beside the destination, then renamed into place,
so a crash never leaves a half-written model, and a stale ``.data`` file is replaced, never
appended to. The input file is never opened for writing.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from graphq.errors import ModelError, first_line

log = logging.getLogger(__name__)

TWO_GB = 2**31
#: the size above which a model must keep its weights in an external file.
EXTERNAL_DATA_LIMIT = TWO_GB - 64 * 2**20


@dataclass(frozen=True)
class Source:
    """Where a model came from, so that it can be written back the same way."""

    path: Path | None
    external_data: bool


def load(model: str | os.PathLike | onnx.ModelProto | bytes) -> onnx.ModelProto:
    """Load a model from a path, serialized bytes or a ModelProto (which is copied).

    Raises ModelError with the reason and the fix when the file is missing, truncated,
    not an ONNX model, or refers to external data that is not there.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if isinstance(model, bytes):
        return _parse(model, "the given bytes")
    return load_with_source(model)[0]


def load_with_source(path: str | os.PathLike, external_data: bool = True
                     ) -> tuple[onnx.ModelProto, Source]:
    """Load a model file and say how it stores its weights.

    ``external_data=False`` leaves weights kept in an external file unread (for inspection).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a folder: give the path of an .onnx file")
    proto = _parse(path.read_bytes(), str(path))
    external = any(external_data_helper.uses_external_data(t) for t in all_tensors(proto.graph))
    if external and external_data:
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelError(
                f"{path} keeps its weights in an external data file that cannot be read "
                f"({exc}); keep the .data file beside the model under the name it was saved with"
            ) from exc
    _check_has_graph(proto, str(path))
    return proto, Source(path=path, external_data=external)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    if not data:
        raise ModelError(f"{where} is empty: it is not an ONNX model")
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"{where} is not a valid ONNX model (the protobuf does not parse: {exc}); "
            "the file may be truncated or of another format: export it again"
        ) from exc
    _check_has_graph(proto, where)
    return proto


def _check_has_graph(proto: onnx.ModelProto, where: str) -> None:
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(
            f"{where} parses but holds no ONNX graph or no opset import; "
            "the file may be truncated or of another format: export it again"
        )


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """The size of a tensor's data from its dims and type, without touching the data
    (TensorProto.ByteSize() serializes it: 0.08 s and a transient copy on a 90 MB model)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return tensor.ByteSize()
    count = 1
    for d in tensor.dims:
        count *= d
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is not None:
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def byte_size(model: onnx.ModelProto) -> int:
    """About the serialized size of a model, without serializing it (ModelProto.ByteSize()
    raises over 2 GB): its initializers' data, nodes and functions."""
    graph = model.graph
    return (sum(tensor_nbytes(t) for t in graph.initializer)
            + sum(n.ByteSize() for n in graph.node)
            + sum(f.ByteSize() for f in model.functions) + 4096)


def serialized_size(model: onnx.ModelProto) -> int:
    """The bytes ``model`` takes written as one file (ModelProto.ByteSize: names, shapes and
    nodes included, which on a 0.4 MB graph with 256 Q/DQ nodes is a fifth of it), or
    :func:`byte_size`'s estimate where it would not fit one."""
    estimate = byte_size(model)
    return model.ByteSize() if estimate < EXTERNAL_DATA_LIMIT else estimate


def external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    """The distinct external data files a model refers to, resolved against ``folder``."""
    files = []
    for tensor in all_tensors(model.graph):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            path = folder / info.location
            if path not in files:
                files.append(path)
    return files


def all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


def skeleton(model: onnx.ModelProto, limit: int = 1024) -> onnx.ModelProto:
    """A copy of the model whose initializers over ``limit`` bytes keep only name, type, dims.

    Shape inference and other whole-model analyses run on it without serializing the
    weights (6x faster on a 570 MB model, and possible over 2 GB).
    """
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    graph = out.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for tensor in model.graph.initializer:
        if tensor_nbytes(tensor) > limit:
            tensor = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type,
                                      dims=tensor.dims)
        graph.initializer.append(tensor)
    return out


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """ONNX shape inference on the model's skeleton, the inferred types copied back into
    ``model``; returns the model and an error message ("" when it worked)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference errors are reported, not fatal
        return model, first_line(exc)
    graph = model.graph
    for name in ("node", "output", "value_info"):
        target = getattr(graph, name)
        del target[:]
        target.extend(getattr(inferred.graph, name))
    return model, ""


def fix_declared_outputs(model: onnx.ModelProto) -> list[str]:
    """Drop the declared shape (the type stays) of each graph output whose nodes make another
    rank or size, in place: ddddocr's OCR model declares (1, seqlen) and returns
    (16, 1, 8210); shape inference at opset 21 then refuses the graph, and every pass after
    an opset upgrade failed onnx.checker. One note per output dropped."""
    probe = skeleton(model)
    del probe.graph.value_info[:]
    for out in probe.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - nothing to compare with
        return []
    found = {o.name: dims(o) for o in inferred.graph.output}
    notes = []
    for out in model.graph.output:
        declared, made = dims(out), found.get(out.name)
        if declared is None or made is None:
            continue
        if len(declared) != len(made) or any(
                isinstance(a, int) and isinstance(b, int) and a != b
                for a, b in zip(declared, made, strict=True)):
            out.type.tensor_type.ClearField("shape")
            notes.append(f"graph output '{out.name}' is declared with shape {declared} but its "
                         f"nodes make {made}: the declared shape is dropped (its type is kept)")
    return notes


def dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """The dims of a tensor value: int, symbolic name, or None where unknown; None when
    the value has no tensor shape."""
    ttype = value.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports (1 when it imports none)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


@functools.lru_cache(maxsize=1)
def max_runtime_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads, found by asking it."""
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for version in range(onnx.IR_VERSION, 6, -1):
        probe.ir_version = version
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any refusal means "not this version"
            continue
        return version
    return 7


def fitted_ir_version(model: onnx.ModelProto) -> int:
    """ir_version raised to what the opsets need, clamped to what onnxruntime reads."""
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return min(max(model.ir_version, needed), max_runtime_ir_version())


def fix_ir_version(model: onnx.ModelProto) -> None:
    """Set ir_version to :func:`fitted_ir_version` in place."""
    version = fitted_ir_version(model)
    if version != model.ir_version:
        log.debug("ir_version %d -> %d", model.ir_version, version)
        model.ir_version = version


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> Path:
    """Save a model atomically; return the path written.

    ``external_data``: True keeps weights in ``<name>.data`` beside the model, False inlines
    them, None decides by size (external above 2 GB). The given proto is not modified.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"cannot save the model to {path}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = byte_size(model) > EXTERNAL_DATA_LIMIT
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=".graphq-", dir=path.parent))
    try:
        if external_data:  # onnx converts the proto it saves: work on a copy
            out = onnx.ModelProto()
            out.CopyFrom(model)
            fix_ir_version(out)
            onnx.save_model(
                out, tmp / path.name, save_as_external_data=True,
                all_tensors_to_one_file=True, location=data_name, size_threshold=1024,
            )
        else:  # no copy of the weights: the fitted IR version is set for the write only
            version, model.ir_version = model.ir_version, fitted_ir_version(model)
            try:
                onnx.save_model(model, tmp / path.name)
            finally:
                model.ir_version = version
        if (tmp / data_name).exists():
            # onnx creates the data file private (0600): give it the model file's mode
            os.chmod(tmp / data_name, stat.S_IMODE(os.stat(tmp / path.name).st_mode))
            os.replace(tmp / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            # a stale data file from an earlier external save would mislead readers
            (path.parent / data_name).unlink()
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (existing or not)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def drop_metadata(model: onnx.ModelProto, key: str) -> None:
    """Remove ``key`` from ``model``'s metadata_props (in place)."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
