"""The pass manager: an ordered pipeline of passes, read from TOML or built in Python.

The manager runs passes in order, times each, and verifies after each (``verify = "each"``)
or after the last (``"end"``): the ONNX checker (full check under 2 GB), an onnxruntime
session loads the graph, and, for passes that preserve semantics, the outputs on sample
inputs (the pipeline's data when there is some, else random inputs of the model's shapes)
are compared with those of the pass's input at the tolerance the pass states. A failure names
the pass and the passes that ran before it. Outputs are written only when every pass and
check succeeded, each file atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from graphq import __version__, runtime
from graphq import graph as G
from graphq import model as model_io
from graphq import options as opts
from graphq.data import DATA_HINT, PLAIN_SHARE, DataOptions, DataSource, Feed, run_failure
from graphq.errors import (
    ConfigError,
    DataError,
    GraphqError,
    ModelError,
    PassError,
    did_you_mean,
    first_line,
)
from graphq.registry import Pass, PassContext, create

log = logging.getLogger(__name__)


@dataclass
class PipelineOptions:
    """The ``[pipeline]`` table of a pipeline file."""

    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"], metadata={
        "help": "onnxruntime execution providers, in order of preference"})
    fallback: bool = field(default=False, metadata={
        "help": "drop asked providers that are not available instead of failing"})
    verify: Literal["each", "end", "off"] = field(default="each", metadata={
        "help": "verify the graph after each pass, after the last, or not at all"})
    samples: int = field(default=2, metadata={
        "help": "batches of sample inputs used to compare outputs", "min": 1})


@dataclass
class PassRecord:
    """What one pass did, for the log and the report."""

    name: str
    changed: bool
    seconds: float
    counts: dict[str, int]
    notes: list[str]
    verified: dict[str, Any] = field(default_factory=dict)
    pinned: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """What :meth:`PassManager.run` returns."""

    model: onnx.ModelProto
    records: list[PassRecord]
    files: dict[str, Path]
    report: dict[str, Any]


class PassManager:
    """An ordered pipeline of passes with its settings."""

    def __init__(self, passes: list[Pass], settings: PipelineOptions | None = None,
                 data: DataOptions | None = None, origin: Path | None = None) -> None:
        if not passes:
            raise ConfigError("a pipeline needs at least one pass")
        self.passes = list(passes)
        self.settings = settings or PipelineOptions()
        self.data = data or DataOptions()
        self.origin = origin  # the pipeline file, for messages and relative paths

    # ---- reading and printing pipelines -------------------------------------------------
    @classmethod
    def from_toml(cls, spec: str | Path, overrides: Sequence[str] = ()) -> PassManager:
        """Read a pipeline file, or a preset by name (see :func:`presets`); ``overrides``
        set options on it (:func:`apply_overrides`)."""
        path = resolve_pipeline(spec)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the pipeline file {path}: {exc}") from exc
        return cls.from_text(text, origin=path, overrides=overrides)

    @classmethod
    def from_text(cls, text: str, origin: Path | None = None,
                  overrides: Sequence[str] = ()) -> PassManager:
        where = str(origin) if origin else "<pipeline>"
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
        apply_overrides(doc, overrides)
        if overrides:
            where += f" with --set {' '.join(overrides)}"
        allowed = ("pipeline", "data", "passes")
        for key in doc:
            if key not in allowed:
                raise ConfigError(f"{where}: unknown table '{key}'{did_you_mean(key, allowed)}; "
                                  f"allowed: [pipeline], [data], [[passes]]")
        settings = opts.parse(PipelineOptions, _table(doc, "pipeline", where),
                              f"{where}: [pipeline]")
        data = opts.parse(DataOptions, _table(doc, "data", where), f"{where}: [data]")
        entries = doc.get("passes")
        if isinstance(entries, dict):
            raise ConfigError(f"{where}: passes are a list of tables: write [[passes]] "
                              "(two brackets) before each pass, not [passes]")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: no passes; add at least one [[passes]] table "
                              "with a name (see `graphq passes`)")
        passes = []
        for i, entry in enumerate(entries, 1):
            spot = f"{where}: [[passes]] #{i}"
            if not isinstance(entry, dict) or "name" not in entry:
                raise ConfigError(f"{spot}: each [[passes]] table needs a name = \"...\"")
            table = dict(entry)
            passes.append(create(table.pop("name"), table, spot))
        return cls(passes, settings, data, origin)

    def to_toml(self, data_source: str | None = None,
                pinned: Sequence[dict[str, Any]] = ()) -> str:
        """The pipeline as TOML text that :meth:`from_text` reads back to the same pipeline.

        ``data_source`` replaces ``[data] source`` (the run writes the resolved path there);
        ``pinned`` (one dict a pass, as :class:`PassResult` has them) replaces the options a
        run decided by timing, with a comment naming the values given.
        """
        lines = ["[pipeline]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in opts.to_table(self.settings).items()]
        data = opts.to_table(self.data)
        if data_source is not None:
            data["source"] = data_source
        if data != opts.to_table(DataOptions()):
            lines += ["", "[data]"] + [f"{k} = {_toml_value(v)}" for k, v in data.items()]
        for i, p in enumerate(self.passes):
            table = p.to_table()
            pins = pinned[i] if i < len(pinned) else {}
            lines += ["", "[[passes]]"]
            if pins:
                given = ", ".join(f"{k} = {_toml_value(table[k])}" for k in pins)
                lines.append(f"# pinned to what this run chose by timing (given: {given}); "
                             "rerunning this file places the same")
            table.update(pins)
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(p.name for p in self.passes)}])"

    # ---- running --------------------------------------------------------------------------
    def run(self, model: str | Path | onnx.ModelProto, outdir: str | Path | None = None, *,
            data: str | Path | Any = None, providers: list[str] | None = None,
            dump_dir: str | Path | None = None, stem: str | None = None,
            reference: str | Path | onnx.ModelProto | None = None) -> RunResult:
        """Run the pipeline on a model file or proto; write results under ``outdir``.

        ``data`` overrides ``[data] source``: a path, or an iterable of feed dicts. ``stem``
        names the output files (default: the model file's, or the graph's name);
        ``reference`` is the float model reports compare with (default: ``model``).
        """
        source = model_io.Source(None, False)
        if isinstance(model, onnx.ModelProto):
            proto = model_io.load(model)
        else:
            proto, source = model_io.load_with_source(model)
        if stem is None:
            stem = source.path.stem if source.path else _safe_stem(proto.graph.name)
        outdir = Path(outdir) if outdir is not None else None
        final_path = outdir / f"{stem}.opt.onnx" if outdir else None
        for folder, flag in ((outdir, "-o/outdir"), (dump_dir, "--dump-dir")):
            if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
                raise ConfigError(f"{flag} {folder} is a file, not a folder; "
                                  "give a folder path (it is created if missing)")
        if source.path and outdir and (model_io.same_file(final_path, source.path)):
            raise ConfigError(f"the output {final_path} would overwrite the input model; "
                              "choose another output folder with -o")
        _check_input(proto, source)
        for i, p in enumerate(self.passes):  # what a later pass would refuse, before any runs
            try:
                p.precheck(proto)
            except GraphqError as exc:
                exc.args = (f"pass '{p.name}' (step {i + 1}, checked before any pass ran): "
                            f"{exc}",)
                raise
        ctx = PassContext(
            providers=runtime.resolve_providers(providers or self.settings.providers,
                                                self.settings.fallback),
            data=self._data_source(data), outdir=outdir,
            float_source=reference if reference is not None else (
                source.path if source.path else model),
            external_data=source.external_data, stem=stem, base_dir=self._base_dir(),
        )
        needy = next(((i, p) for i, p in enumerate(self.passes) if p.needs_data), None)
        if needy is not None and ctx.data is None:  # not after the passes before it ran
            raise DataError(f"pass '{needy[1].name}' (step {needy[0] + 1}, checked before any "
                            f"pass ran): {needy[1].name} needs data: {DATA_HINT}")
        log.info("model %s: opset %d, %d nodes; %d passes; providers %s",
                 source.path or stem, model_io.default_opset(proto), len(proto.graph.node),
                 len(self.passes), ", ".join(ctx.providers))
        checker = _Verifier(self, ctx)
        checker.start(proto)
        records: list[PassRecord] = []
        for i, p in enumerate(self.passes):
            record, proto = self._run_pass(i, p, proto, ctx, records)
            if self.settings.verify == "each" or (
                    self.settings.verify == "end" and i == len(self.passes) - 1):
                record.verified = checker.check(proto, self.passes[: i + 1], records)
            records.append(record)
            _log_record(i, len(self.passes), record)
            if dump_dir is not None:
                model_io.save(proto, Path(dump_dir) / f"{i + 1:02d}-{p.name}.onnx",
                              external_data=source.external_data or None)
        end_to_end = checker.finish(self.passes)
        data_path = ctx.data.source if ctx.data is not None else None
        text = self.to_toml(str(data_path.resolve()) if isinstance(data_path, Path) else None,
                            [r.pinned for r in records])
        report = {
            "graphq": __version__,
            "model": str(source.path) if source.path else None,
            "pipeline": text,
            "passes": [r.__dict__ for r in records],
            "verified_end_to_end": end_to_end,
            "result": {"opset": model_io.default_opset(proto), "nodes": len(proto.graph.node)},
            **ctx.report,
        }
        files: dict[str, Path] = {}
        rank = int(os.environ.get("RANK", "0"))
        if outdir is not None and rank != 0:
            log.info("rank %d of a distributed run: rank 0 writes the outputs", rank)
        elif outdir is not None:
            files = self._write(outdir, final_path, proto, report, text, ctx)
        return RunResult(proto, records, files, report)

    def _base_dir(self) -> Path:
        """Relative paths in the pipeline file are relative to its folder."""
        return self.origin.parent if self.origin and not _is_preset(self.origin) else Path()

    def _data_source(self, data: Any) -> DataSource | None:
        d = self.data
        if data is None and d.source is not None:
            data = self._base_dir() / d.source
        if data is None:
            return None
        if isinstance(data, DataSource):
            return data
        return DataSource(data, batch_size=d.batch_size, limit=d.limit, image=d.image,
                          labels=d.labels)

    def _run_pass(self, i: int, p: Pass, proto: onnx.ModelProto, ctx: PassContext,
                  records: list[PassRecord]) -> tuple[PassRecord, onnx.ModelProto]:
        start = time.perf_counter()
        try:
            result = p.run(proto, ctx)
        except GraphqError as exc:
            exc.args = (f"{_step(i, p, records)}: {exc}",)
            raise
        except Exception as exc:
            raise PassError(f"{_step(i, p, records)} failed: {type(exc).__name__}: {exc}"
                            ) from exc
        seconds = time.perf_counter() - start
        return PassRecord(p.name, result.changed, seconds, result.counts, result.notes,
                          pinned=result.pinned), result.model

    def _write(self, outdir: Path, final_path: Path, proto: onnx.ModelProto,
               report: dict[str, Any], pipeline_text: str, ctx: PassContext
               ) -> dict[str, Path]:
        outdir.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        if not ctx.artifacts:
            files["model"] = model_io.save(proto, final_path,
                                           external_data=ctx.external_data or None)
        for name, content in ctx.artifacts.items():
            path = outdir / name
            if isinstance(content, onnx.ModelProto):
                files[name] = model_io.save(content, path,
                                            external_data=ctx.external_data or None)
            elif isinstance(content, dict):
                files[name] = _write_text(path, json.dumps(content, indent=2,
                                                           default=_json_default))
            else:
                files[name] = _write_text(path, str(content))
        report["files"] = {k: str(v) for k, v in files.items()}
        files["report"] = _write_text(outdir / "report.json",
                                      json.dumps(report, indent=2, default=_json_default))
        files["pipeline"] = _write_text(outdir / "pipeline.toml", pipeline_text)
        for name, path in files.items():
            log.info("wrote %s: %s", name, path)
        return files


class _Verifier:
    """Checks a model after a pass: checker, an onnxruntime session, outputs vs reference."""

    def __init__(self, manager: PassManager, ctx: PassContext) -> None:
        self.settings = manager.settings
        self.ctx = ctx
        self.feeds: list[Feed] = []
        self.reference: list[dict[str, np.ndarray]] | None = None
        self.original: list[dict[str, np.ndarray]] | None = None

    def start(self, proto: onnx.ModelProto) -> None:
        if self.settings.verify == "off":
            return
        n = self.settings.samples
        if self.ctx.data is not None:
            feeds = self.ctx.data.feeds(proto)
            # the first piece of each (PassContext.split): a check, run after every pass
            self.feeds = [self.ctx.split(f, proto, PLAIN_SHARE)[0]
                          for f, _ in zip(feeds, range(n), strict=False)]
        else:
            self.feeds = runtime.sample_feeds(proto, n)
        self.ctx.check_feeds = self.feeds
        try:
            sess = runtime.session(proto, self.ctx.providers)
        except Exception as exc:  # noqa: BLE001 - a pass may make it loadable (an old opset)
            log.warning("onnxruntime cannot load the input model (%s); its outputs will not be "
                        "compared", first_line(exc, 200))
            return
        outputs = []
        for i, feed in enumerate(self.feeds):
            try:
                outputs.append(runtime.run(sess, feed))
            except Exception as exc:  # noqa: BLE001 - random inputs may be out of its range
                if self.ctx.data is not None:  # the data does not fit the model: say so now
                    raise run_failure(proto, feed, lambda f: runtime.run(sess, f), exc,
                                      batch=i + 1) from exc
                log.warning("the input model does not run in onnxruntime on random inputs (%s); "
                            "outputs will not be compared: give --data",
                            first_line(exc, 200))
                self.feeds = []  # later graphs would fail on them too, not by their passes
                return
        self.reference = self.original = outputs

    def check(self, proto: onnx.ModelProto, done: list[Pass],
              records: list[PassRecord]) -> dict[str, Any]:
        p = done[-1]
        step = _step(len(done) - 1, p, records)
        start = time.perf_counter()
        with runtime.materialized(proto) as serialized:
            try:
                _checker(serialized, full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise PassError(f"{step} produced an invalid graph (onnx.checker): "
                                f"{str(exc).strip()[:500]}") from exc
            try:
                sess = runtime.session_of(serialized, self.ctx.providers)
                outputs = [runtime.run(sess, feed) for feed in self.feeds]
            except Exception as exc:
                raise PassError(f"{step} produced a graph onnxruntime cannot run: "
                                f"{str(exc).strip()[:500]}") from exc
        result: dict[str, Any] = {"checker": True, "onnxruntime": True}
        semantic = all(q.preserves_semantics for q in done) if self.settings.verify == "end" \
            else p.preserves_semantics
        if self.reference is not None and outputs and semantic:
            rtol, atol = _tolerance(done if self.settings.verify == "end" else [p])
            worst = self._compare(outputs, rtol, atol, step)
            result.update(max_rel_err=worst, rtol=rtol, atol=atol)
        if outputs:
            self.reference = outputs
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result

    def finish(self, passes: list[Pass]) -> dict[str, Any] | None:
        """After pass-by-pass checks, compare the last outputs with the input model's, so
        that errors within each pass's tolerance cannot add up unseen."""
        if (self.settings.verify != "each" or len(passes) < 2 or self.original is None
                or self.reference is self.original
                or not all(p.preserves_semantics for p in passes)):
            return None
        rtol, atol = _tolerance(passes)
        self.reference, outputs = self.original, self.reference
        worst = self._compare(outputs, rtol, atol, "the pipeline as a whole")
        return {"max_rel_err": worst, "rtol": rtol, "atol": atol}

    def _compare(self, outputs: list[dict[str, np.ndarray]], rtol: float, atol: float,
                 step: str) -> float:
        worst = 0.0
        for ref, out in zip(self.reference, outputs, strict=True):
            for diff in runtime.compare(ref, out, rtol, atol):
                if not diff.ok:
                    raise PassError(f"{step} changed output '{diff.name}' beyond its tolerance "
                                    f"(rtol {rtol:g}, atol {atol:g}): {diff.detail}")
                worst = max(worst, diff.rel)
        return worst


def _checker(serialized: bytes | Path, full_check: bool) -> None:
    """onnx.checker on serialized bytes, or by path (a model over 2 GB)."""
    onnx.checker.check_model(serialized if isinstance(serialized, bytes) else str(serialized),
                             full_check=full_check)


def _tolerance(passes: list[Pass]) -> tuple[float, float]:
    """The tolerance of several passes in a row: their errors may add up."""
    return sum(p.rtol for p in passes), sum(p.atol for p in passes)


def _check_input(proto: onnx.ModelProto, source: model_io.Source) -> None:
    """The input must be a valid ONNX model before any pass is blamed for anything."""
    where = str(source.path) if source.path else "the input model"
    error = _invalid(proto)
    # onnxruntime runs a graph whose nodes are out of order; onnx.checker and the passes need
    # them sorted, which changes nothing the model computes
    if error is not None and "topologically sorted" in str(error):
        moved = G.sort_nodes(proto.graph)
        if moved:
            log.info("%s: %d node(s) were out of topological order; sorted (the input is not "
                     "changed)", where, moved)
            error = _invalid(proto)
    if error is not None:
        raise ModelError(f"{where} is not a valid ONNX model (onnx.checker: "
                         f"{first_line(error)}); fix or re-export it") from error


def _invalid(proto: onnx.ModelProto) -> onnx.checker.ValidationError | None:
    """onnx.checker's error on ``proto`` (shallow check), None where it passes."""
    with runtime.materialized(proto) as serialized:
        try:
            _checker(serialized, full_check=False)
        except onnx.checker.ValidationError as exc:
            return exc
    return None


def _safe_stem(name: str) -> str:
    """A file name stem from a graph name: no folders, no leading dots."""
    stem = re.sub(r"[^\w.-]", "_", name).lstrip(".")
    return stem or "model"


def _step(i: int, p: Pass, records: list[PassRecord]) -> str:
    before = ", ".join(r.name for r in records[:i]) or "none"
    return f"pass '{p.name}' (step {i + 1}; ran before it: {before})"


def _log_record(i: int, n: int, r: PassRecord) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in r.counts.items())
    state = "changed" if r.changed else "no change"
    verified = ""
    if r.verified:
        verified = "; verified"
        if "max_rel_err" in r.verified:
            v = r.verified
            verified += f" (max rel err {v['max_rel_err']:.2g}, tol {v['rtol']:g})"
    log.info("[%d/%d] %s: %s%s (%.2f s)%s", i + 1, n, r.name, state,
             f": {counts}" if counts else "", r.seconds, verified)


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a table [{key}]")
    return value


# ---- overrides ------------------------------------------------------------------------------
def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> None:
    """Set options of a parsed pipeline file in place, each ``SECTION.KEY=VALUE``: SECTION is
    ``pipeline``, ``data`` or a pass name (every pass of that name), KEY an option (dotted
    into a table: ``insert-qdq.weights.dtype=int4``), VALUE a TOML value or a bare word (a
    string). The options are checked as the file's are, when the pipeline is built."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, option = key.strip().partition(".")
        if not sep or not dot or not option or not section:
            raise ConfigError(f"--set '{item}': write SECTION.OPTION=VALUE, e.g. "
                              "calibrate.method=mse, insert-qdq.weights.dtype=int4, "
                              "data.batch_size=1")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: a string
        if section in ("pipeline", "data"):
            tables = [doc.setdefault(section, {})]
            if not isinstance(tables[0], dict):
                raise ConfigError(f"--set '{item}': [{section}] is not a table in the file")
        else:
            entries = doc.get("passes") if isinstance(doc.get("passes"), list) else []
            tables = [e for e in entries if isinstance(e, dict) and e.get("name") == section]
            if not tables:
                names = [str(e.get("name")) for e in entries if isinstance(e, dict)]
                raise ConfigError(f"--set '{item}': the pipeline has no pass '{section}'"
                                  f"{did_you_mean(section, names)}; its passes: "
                                  f"{', '.join(names) or '(none)'}; or set pipeline.* / data.*")
        *path, last = option.split(".")
        for table in tables:
            for part in path:
                table = table.setdefault(part, {})
                if not isinstance(table, dict):
                    raise ConfigError(f"--set '{item}': '{part}' is not a table")
            table[last] = value


# ---- presets --------------------------------------------------------------------------------
def presets() -> dict[str, Path]:
    """The pipeline presets shipped in the package, by name."""
    folder = resources.files("graphq") / "presets"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def _is_preset(path: Path) -> bool:
    return path.parent == Path(str(resources.files("graphq") / "presets"))


def resolve_pipeline(spec: str | Path) -> Path:
    """A pipeline file path, or the file of a preset named ``spec``."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"{path} is not a file; give a pipeline .toml file or a preset name")
    known = presets()
    if str(spec) in known:
        return known[str(spec)]
    hint = did_you_mean(str(spec), known)
    if path.suffix == ".toml" or "/" in str(spec):
        raise ConfigError(f"pipeline file not found: {spec}{hint}; presets: {', '.join(known)}")
    raise ConfigError(f"'{spec}' is neither a pipeline file nor a preset{hint}; "
                      f"presets: {', '.join(sorted(known))}")


# ---- TOML writing ----------------------------------------------------------------------------
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):  # TOML forbids a raw DEL, which JSON leaves as it is
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


__all__ = ["PassManager", "PipelineOptions", "PassRecord", "RunResult", "presets",
           "resolve_pipeline"]
