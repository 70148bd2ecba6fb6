"""Tests of the QAT bridge. They need torch and onnx2torch (the QAT install in the README);
:func:`require_bridge` skips a test module where those are missing."""

from __future__ import annotations

from typing import Any

import pytest


def require_bridge() -> Any:
    """onnx2torch as graphq imports it (with its converters registered), or skip the module."""
    pytest.importorskip("torch")
    from graphq.errors import GraphqError
    from graphq.qat._o2t import onnx2torch

    try:
        return onnx2torch()
    except GraphqError as exc:
        pytest.skip(f"the QAT bridge is not installed: {exc}", allow_module_level=True)
