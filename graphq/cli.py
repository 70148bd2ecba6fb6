"""The ``graphq`` command.

Exit codes: 0 success, 2 usage or configuration error (bad arguments, pipeline file, model
file or data), 1 a pass failed or its result failed verification. One message per error;
the traceback only with ``-v``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphq import __version__
from graphq import model as model_io
from graphq.errors import ConfigError, GraphqError

log = logging.getLogger("graphq")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except GraphqError as exc:
        _fail(str(exc), args.verbose)
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", args.verbose)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one clear message
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback "
              "and report it)", args.verbose)
        return 1


def _fail(message: str, verbose: int) -> None:
    if verbose:
        log.exception("%s", message)
    else:
        print(f"graphq: error: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphq", description="graphq: an ONNX graph-rewriting compiler for quantization.")
    _verbosity(parser, default=0)
    # the same flags after the command; SUPPRESS keeps them from resetting those given before
    common = argparse.ArgumentParser(add_help=False)
    _verbosity(common, default=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"graphq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run a pipeline on a model",
                         description="Run a pipeline (a .toml file or a preset name) on a model.")
    run.add_argument("pipeline", help="pipeline .toml file, or a preset name (see `graphq passes`)")
    run.add_argument("model", help="the input .onnx model (never modified)")
    run.add_argument("-o", "--outdir", default="out", help="output folder (default: out)")
    run.add_argument("--data", help="data: an .npz/.npy file or a folder of them "
                     "(overrides [data] source)")
    run.add_argument("--batch-size", type=int, metavar="N",
                     help="samples per data batch (overrides [data] batch_size; default 16)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                     help="set an option of the pipeline (a preset too), repeatable: "
                          "calibrate.target_sqnr_db=25, calibrate.search_by=segment, "
                          "insert-qdq.weights.dtype=int4, data.batch_size=1")
    run.add_argument("--providers", help="onnxruntime execution providers, comma-separated "
                     "(overrides [pipeline] providers), e.g. CUDAExecutionProvider,cpu")
    run.add_argument("--dump-dir", help="write the graph after each pass into this folder")
    run.set_defaults(func=_cmd_run)

    passes = sub.add_parser("passes", parents=[common], help="list passes, options and presets")
    passes.set_defaults(func=_cmd_passes)

    inspect = sub.add_parser("inspect", parents=[common], help="summarize a model")
    inspect.add_argument("model", help="an .onnx model")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def _verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more detail; with errors, the traceback")
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=False if default == 0 else default,
                        help="warnings and errors only")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("graphq: %(message)s" if not verbose else
                                           "graphq %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("graphq")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _cmd_run(args: argparse.Namespace) -> int:
    from graphq.pipeline import PassManager

    overrides = list(args.set)
    if args.batch_size is not None:  # --set data.batch_size=N, with the flag's own message
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        overrides.append(f"data.batch_size={args.batch_size}")
    manager = PassManager.from_toml(args.pipeline, overrides)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] \
        if args.providers else None
    result = manager.run(args.model, args.outdir, data=args.data, providers=providers,
                         dump_dir=args.dump_dir)
    total = sum(r.seconds for r in result.records)
    log.info("done: %d passes in %.2f s; output in %s", len(result.records), total, args.outdir)
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from graphq import options as opts
    from graphq.data import DataOptions
    from graphq.pipeline import PipelineOptions, presets
    from graphq.registry import passes

    out = []
    for name, cls in passes().items():
        out.append(f"{name}  -  {cls.summary}")
        out += _option_lines(opts.describe(cls.Options))
        out.append("")
    out.append("[pipeline] table")
    out += _option_lines(opts.describe(PipelineOptions))
    out.append("")
    out.append("[data] table")
    out += _option_lines(opts.describe(DataOptions))
    out.append("")
    out.append("presets (graphq run NAME model.onnx): " + ", ".join(sorted(presets())))
    print("\n".join(out))
    return 0


def _option_lines(rows: list[tuple[str, str, Any, str]]) -> list[str]:
    if not rows:
        return ["    (no options)"]
    lines = []
    for name, type_name, default, help_text in rows:
        shown = "required" if default is dataclasses.MISSING else f"default {_show(default)}"
        lines.append(f"    {name} ({type_name}, {shown})")
        if help_text:
            lines.append(f"        {help_text}")
    return lines


def _show(value: Any) -> str:
    from graphq.pipeline import _toml_value

    return "none" if value is None else _toml_value(value)


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(Path(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model      {info['path']}")
    print(f"size       {info['size_bytes'] / 2**20:.2f} MiB"
          + (" (with external data)" if info["external_data"] else ""))
    print(f"ir_version {info['ir_version']}   opsets "
          + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items()))
    print(f"producer   {info['producer'] or '-'}")
    for kind in ("inputs", "outputs"):
        print(f"{kind}")
        for v in info[kind]:
            print(f"    {v['name']}: {v['dtype']} [{', '.join(map(str, v['shape']))}]")
    print(f"parameters {info['parameters']:,} in {info['initializers']} initializers")
    print(f"nodes      {info['nodes']}   Q/DQ {info['qdq']}")
    print("ops        " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    if info["subgraph_ops"]:
        print("in bodies  " + ", ".join(f"{k} {v}" for k, v in info["subgraph_ops"].items())
              + "   (If branches, Loop/Scan bodies)")
    return 0


def inspect_model(path: Path) -> dict[str, Any]:
    """What `graphq inspect` shows, as a dict."""
    from graphq.graph import op_histogram

    proto, source = model_io.load_with_source(path, external_data=False)
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    ops = op_histogram(graph.node)
    size = path.stat().st_size + sum(
        p.stat().st_size for p in model_io.external_files(proto, path.parent) if p.exists())
    return {
        "path": str(path),
        "size_bytes": size,
        "external_data": source.external_data,
        "ir_version": proto.ir_version,
        "opsets": {o.domain: o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [_value(v) for v in graph.input if v.name not in inits],
        "outputs": [_value(v) for v in graph.output],
        "parameters": int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer)),
        "initializers": len(graph.initializer),
        "nodes": len(graph.node),
        "qdq": ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0),
        "ops": ops,
        "subgraph_ops": op_histogram(_nested_nodes(graph)),
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }


def _nested_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of the graphs nested in ``graph``'s nodes (If branches, Loop/Scan bodies),
    at every depth."""
    from graphq.graph import subgraph_protos

    return [n for node in graph.node for sub in subgraph_protos(node)
            for n in [*sub.node, *_nested_nodes(sub)]]


def _value(v: onnx.ValueInfoProto) -> dict[str, Any]:
    t = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in t.shape.dim]
    dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "?"
    return {"name": v.name, "dtype": dtype, "shape": dims}


if __name__ == "__main__":
    sys.exit(main())
