"""Errors graphq raises on purpose, each with the exit code the command line gives it.

Every message names the problem and, where there is one, the fix. The command line prints
the message alone (no traceback unless ``-v``) and exits with ``exit_code``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GraphqError(Exception):
    """Base class of the errors graphq raises on purpose."""

    exit_code = 1


class ConfigError(GraphqError):
    """A usage or configuration error: bad pipeline file, option, path or argument (exit 2)."""

    exit_code = 2


class ModelError(GraphqError):
    """The input model cannot be read or is not a valid ONNX model (exit 2)."""

    exit_code = 2


class DataError(GraphqError):
    """The data given to the pipeline does not fit the model (exit 2)."""

    exit_code = 2


class PassError(GraphqError):
    """A pass failed, or its result failed verification (exit 1)."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut at
    ``limit`` characters with "..." where it is longer: onnxruntime's and onnx's messages
    run to many lines of C++ context."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` when a close choice exists, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


#: what to install for the QAT bridge (torch's CPU build first; onnx2torch without its
#: dependencies, which would pull torchvision and a CUDA torch)
QAT_INSTALL = ("the QAT bridge needs torch and onnx2torch: pip install torch==2.13.0 && "
               "pip install --no-deps onnx2torch==1.5.15")
