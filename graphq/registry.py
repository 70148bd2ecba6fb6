"""The pass contract and the registry of passes.

A pass is a small class with a registered ``name`` (``fold-bn``), a typed ``Options``
dataclass, a one-line ``summary``, and one method, :meth:`Pass.run`, that takes the model and
a :class:`PassContext` and returns a :class:`PassResult`: the model, whether it changed, and
counts for the report. A pass that claims ``preserves_semantics`` states the tolerance at
which the manager compares its outputs with its input's: for every output,
``max|out - ref| <= rtol * max|ref| + atol``.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx

from graphq import options as opts
from graphq import runtime
from graphq.data import Pieces
from graphq.errors import ConfigError, did_you_mean


@dataclass
class PassResult:
    """What a pass returns: the model, whether it changed, counts and notes for the report,
    and the options it pinned: values that make a rerun decide as this run did where it
    decided by timing (the manager writes them into the run's pipeline.toml in place of the
    options given)."""

    model: onnx.ModelProto
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pinned: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the model."""

    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    data: Any = None  # graphq.data.DataSource or None
    outdir: Path | None = None
    float_source: Path | onnx.ModelProto | None = None  # the input, as the user gave it
    external_data: bool = False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("graphq"))
    #: files for the manager to write once every pass has succeeded, by file name:
    #: a ModelProto, a str (text) or a dict (JSON). A pipeline that has any writes no
    #: ``<stem>.opt.onnx``.
    artifacts: dict[str, Any] = field(default_factory=dict)
    #: sections passes add to report.json
    report: dict[str, Any] = field(default_factory=dict)
    stem: str = "model"
    #: the folder relative paths in pass options are read from (the pipeline file's)
    base_dir: Path = field(default_factory=Path)
    #: cuts batches whose runs would make too much (:meth:`split`)
    pieces: Pieces = field(default_factory=Pieces)
    #: the feeds the pass manager compares each pass's outputs on (set when it starts; none
    #: where it does not check): a pass can try a rewrite it may drop on the same inputs
    check_feeds: list[dict[str, Any]] = field(default_factory=list)

    def split(self, feed: dict[str, Any], model: onnx.ModelProto, share: float = 1.0
              ) -> list[dict[str, Any]]:
        """``feed`` in pieces whose runs of ``model`` make at most ``share`` of
        ``data.RUN_BYTES`` of intermediate tensors (:class:`graphq.data.Pieces`)."""
        return self.pieces.split(feed, model, self.providers, share)

    def first_feed(self, model: onnx.ModelProto, share: float = 1.0) -> dict[str, Any]:
        """The first piece (:meth:`split`, at ``share``) of the data's first batch, or a
        random sample of the model's inputs (:func:`graphq.runtime.sample_feeds`) where there
        are no data, or none that can be read twice: what a pass times or checks a graph on."""
        feed = self.data.first(model) if self.data is not None else None
        if feed is None:
            feed = runtime.sample_feeds(model)[0]
        return self.split(feed, model, share)[0]

    def path(self, value: str | Path) -> Path:
        """A path from a pass option, relative to the pipeline file."""
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    def float_model(self) -> onnx.ModelProto:
        """The input model before any pass, read again (it is not kept in memory)."""
        if self.float_source is None:
            raise ValueError("this context has no input model")
        from graphq import model as model_io

        return model_io.load(self.float_source)


class Pass(ABC):
    """Base class of every pass; subclasses are registered with :func:`register`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    preserves_semantics: ClassVar[bool] = True
    rtol: ClassVar[float] = 1e-4
    atol: ClassVar[float] = 1e-5
    #: the pass cannot run without data (the pass manager refuses such a pipeline without
    #: data before any pass runs)
    needs_data: ClassVar[bool] = False

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an options object or keyword options, not both")
        if options is None:
            options = opts.parse(self.Options, kwargs, f"pass '{self.name}'")
        elif not isinstance(options, self.Options):
            raise TypeError(f"pass '{self.name}' takes {self.Options.__name__} options")
        self.options = options

    @abstractmethod
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Rewrite ``model`` (a proto the pass may modify) and say what changed."""

    def precheck(self, model: onnx.ModelProto) -> None:
        """Refuse, before any pass of the pipeline runs, an input this pass will refuse
        whatever the passes before it do (raise a GraphqError); by default nothing."""
        return None

    def to_table(self) -> dict[str, Any]:
        return {"name": self.name, **opts.to_table(self.options)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"{type(self).__name__}({args})"


_PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name in pipelines."""
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"two passes are named '{cls.name}'")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    _PASSES[cls.name] = cls
    return cls


def passes() -> dict[str, type[Pass]]:
    """All registered passes by name, in registration order."""
    import graphq.passes  # noqa: F401 - registers the built-in passes

    return dict(_PASSES)


def create(name: Any, table: dict[str, Any], where: str) -> Pass:
    """Instantiate the pass ``name`` from a TOML table; errors name ``where``."""
    registry = passes()
    if not isinstance(name, str):
        raise ConfigError(f"{where}: 'name' must be a pass name string, not {name!r}")
    if name not in registry:
        raise ConfigError(
            f"{where}: unknown pass '{name}'{did_you_mean(name, registry)}; "
            f"passes: {', '.join(registry)} (see `graphq passes`)"
        )
    cls = registry[name]
    return cls(opts.parse(cls.Options, table, f"{where} (pass '{name}')"))
